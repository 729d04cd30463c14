"""Every Python example in the README and in the user-guide pages runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# The user-guide pages that hold what the README held before it became a front page: their
# examples ran as README examples, and run here the same way. Pages with examples of
# their own that are tested elsewhere (objectives, choosing-w, migration) are not listed.
GUIDE = [
    "installation",
    "demo",
    "the-gradcal-command",
    "finished-runs-in-python",
    "simulators",
    "losses",
    "variational-families",
    "calibrating-generalised-variational-inference",
    "gradient-mcmc",
    "point-estimates-simulated-minimum-distance",
    "reference-posteriors",
    "can-i-trust-it",
    "plots",
    "scaling-out",
    "performance",
    "development",
]
PAGES = [ROOT / "README.md", *(ROOT / "docs" / f"{name}.md" for name in GUIDE)]
BLOCKS = [
    (f"{page.name}:{index}", block)
    for page in PAGES
    for index, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]


def test_readme_has_a_calibration_example_near_the_top():
    readme = (ROOT / "README.md").read_text()
    first = readme.split("```python\n", 1)
    assert len(first) == 2 and len(first[0].splitlines()) < 25  # within the first screen
    example = first[1].split("```", 1)[0]
    for step in ("model = ", "prior = ", "VI(", ".run(", ".sample("):
        assert step in example, step
    assert len(readme.splitlines()) <= 150


@pytest.mark.parametrize("name, block", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_readme_example_runs(name, block, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", block],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(tmp_path.iterdir()), f"{name}: examples must not write files"
