"""gradcal.mpi_setup under torchrun: BlackBIRDS' rank-0 semantics of the vi free functions."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("mpi_worker.py")
pytestmark = pytest.mark.xdist_group("distributed")  # one process group at a time


def _run(out, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [sys.executable, *(launcher if nproc > 1 else []), str(WORKER), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow  # two torchrun launches: about 25 s on two idle cores
def test_two_ranks_give_rank_zero_the_single_process_results(tmp_path):
    (tmp_path / "one").mkdir()
    _run(tmp_path / "one", 1)
    _run(tmp_path, 2)
    single = torch.load(tmp_path / "one" / "mpi-0.pt", weights_only=True)
    first, second = (torch.load(tmp_path / f"mpi-{r}.pt", weights_only=True) for r in (0, 1))
    assert (single["rank"], single["size"], single["has_comm"]) == (0, 1, False)
    assert [(r["rank"], r["size"], r["has_comm"]) for r in (first, second)] == [
        (0, 2, True),
        (1, 2, True),
    ]
    assert first["bcast"] == second["bcast"] == 100  # rank 0's object
    assert first["gather"] == [0, 1] and second["gather"] is None
    # rank 0 draws, both ranks simulate a share, rank 0 gets everything, as under MPI
    torch.testing.assert_close(first["theta"], single["theta"])
    torch.testing.assert_close(first["loss"], single["loss"])
    torch.testing.assert_close(first["jacobians"], single["jacobians"])
    torch.testing.assert_close(first["differentiated"], single["differentiated"])
    torch.testing.assert_close(first["grad"], single["grad"])
    assert (second["theta"], second["loss"], second["jacobians"]) == ([], 0.0, [])
    assert second["differentiated"] == 0.0 and second["grad"] is None
