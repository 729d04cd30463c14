"""The examples the README points to run and write what they promise."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_rama_cont_example_writes_a_png(tmp_path):
    out = tmp_path / "returns.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "rama_cont_returns.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in result.stdout


def test_million_agents_example_runs_small():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "million_agents.py"),
            *("--agents", "300", "--steps", "10", "--draws", "4", "--epochs", "2"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Rama Cont, 300 agents, 10 steps, 4 draws per epoch")
    assert sum(line.startswith("epoch") for line in lines) == 2
    assert "GiB" in lines[-1]


BROCK_HOMMES = ROOT / "examples" / "brock_hommes" / "config.toml"


def _gradcal(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "gradcal.cli", "-q", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_brock_hommes_example_checks_and_asks_for_a_calibrated_w(tmp_path):
    from gradcal.config import read_toml

    result = _gradcal("check", BROCK_HOMMES, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    config = read_toml(BROCK_HOMMES)
    assert config["method"]["w"] == "calibrate" and config["loss"]["kind"] == "mmd"
    assert [p["name"] for p in config["parameters"]] == ["b2", "b3"]


@pytest.mark.slow
def test_brock_hommes_example_reports_the_chosen_w_with_its_coverage(tmp_path):
    """``gradcal run`` of the example (1.5-2 minutes of CPU): the report names the chosen
    w, its bootstrap coverage estimate and the cost, and the run's diagnostics hold them."""
    out = tmp_path / "run"
    result = _gradcal("run", BROCK_HOMMES, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    weight = json.loads((out / "diagnostics.json").read_text())["weight"]
    assert math.isfinite(weight["w"]) and weight["w"] > 0
    assert weight["n_bootstrap"] == 100 and weight["resample"] == "block"
    # GPC takes the smallest w whose coverage reaches 0.9: c(w) is 0.9 to within one
    # bootstrap data set (1 / 100) there, and its standard error is sqrt(0.9 0.1 / 100)
    assert 0.9 <= weight["coverage"] <= 0.91
    assert math.isclose(weight["coverage_error"], 0.03, abs_tol=0.001)
    page = (out / "report.html").read_text()
    assert "<h3>Choice of w</h3>" in page
    for text in (
        f"w = {weight['w']:.4g} was chosen",
        f"estimated coverage is {weight['coverage']:.3g} +- {weight['coverage_error']:.2g}",
        f"{weight['simulations']} simulations",
    ):
        assert text in page, text
