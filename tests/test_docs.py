"""The documentation site builds offline with warnings as errors (`mkdocs build --strict`)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="needs the docs extra: pip install -e '.[docs]'",
)


def _build(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_docs_build_strict_with_api_reference_and_guide(tmp_path):
    site = tmp_path / "site"
    result = _build(site)
    assert result.returncode == 0, result.stderr[-4000:]
    api = (site / "api" / "results" / "index.html").read_text()
    assert "load_run" in api and "weights_only" in api  # rendered from the docstrings
    guide = (site / "finished-runs-in-python" / "index.html").read_text()
    assert "to_inference_data" in guide  # a README section became a page
    assert (site / "examples" / "sp500" / "index.html").is_file()
    assert (site / "examples" / "sp500" / "config.toml").is_file()  # README links resolve
    assert (site / "architecture" / "index.html").is_file()
    assert (site / "tutorial.ipynb").is_file()


def test_readme_sections_become_pages():
    sys.path.insert(0, str(ROOT / "docs" / "hooks"))
    try:
        from readme import page_name, readme_pages
    finally:
        sys.path.pop(0)
    assert page_name("Losses (`gradcal.losses`)") == "losses.md"
    assert page_name("The `gradcal` command") == "the-gradcal-command.md"
    pages = readme_pages(ROOT)
    headings = [
        line[3:] for line in (ROOT / "README.md").read_text().splitlines() if line[:3] == "## "
    ]
    assert list(pages) == ["index.md", *(page_name(h) for h in headings)]
    assert "](architecture.md)" in pages["development.md"]  # docs/ prefix dropped
    assert "](examples/sp500/README.md)" in pages["the-gradcal-command.md"]  # a folder link
