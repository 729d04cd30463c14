"""The examples the README points to run and write what they promise."""

import subprocess
import sys
from pathlib import Path

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
