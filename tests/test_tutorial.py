"""docs/tutorial.ipynb runs from top to bottom, in its short mode (GRADCAL_TUTORIAL_SHORT=1).

About 35 s of CPU on one core (kernel start included); the short mode cuts epochs and draws,
so the numbers it prints are rougher than the full notebook's.
"""

import importlib.util
import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "docs" / "tutorial.ipynb"

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("nbclient", "nbformat", "ipykernel")),
    reason="needs nbclient, nbformat and ipykernel (the test extra)",
)


def _text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_tutorial_runs_in_short_mode(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("GRADCAL_TUTORIAL_SHORT", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    src = str(Path(__file__).parents[1] / "src")  # the kernel imports this checkout's gradcal
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code"), (
        "commit the notebook without outputs"
    )
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure
    outputs = "\n".join(_text(c) for c in notebook.cells if c.cell_type == "code")
    assert "short mode" in outputs
    for label in ("pathwise", "score", "reference", "exact", "VI", "MALA", "estimate:"):
        assert label in outputs
    assert not list(tmp_path.iterdir()), "the tutorial must not write files"
