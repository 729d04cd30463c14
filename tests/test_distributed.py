"""Two processes with gloo on loopback: gradients, VI, failures, checkpoints."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradcal.distributed import _first_host, shard

WORKER = Path(__file__).with_name("distributed_worker.py")
# One worker runs these one after another: two process groups starting at once on a busy
# two-core machine make gloo's start-up racy.
pytestmark = pytest.mark.xdist_group("distributed")


def _launch(scenario, out, nproc=2, timeout=180):
    # The tests folder first, then the caller's path (which may point at the gradcal under
    # test, e.g. a worktree's src/): replacing it would test whichever gradcal is installed.
    path = os.pathsep.join(p for p in (str(WORKER.parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    if nproc == 1:
        command = [sys.executable, str(WORKER), scenario, str(out)]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            str(WORKER),
            scenario,
            str(out),
        ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(result):
    assert result.returncode == 0, result.stderr[-4000:]


def test_all_reduced_gradient_equals_the_single_process_gradient(tmp_path):
    (tmp_path / "one").mkdir()
    _ok(_launch("gradient", tmp_path / "one", nproc=1))
    _ok(_launch("gradient", tmp_path, nproc=2))
    single = torch.load(tmp_path / "one" / "gradient-0.pt", weights_only=True)
    for r in (0, 1):
        ranked = torch.load(tmp_path / f"gradient-{r}.pt", weights_only=True)
        for a, b in zip(single["grads"], ranked["grads"], strict=True):
            torch.testing.assert_close(a, b)
        assert ranked["loss"] == pytest.approx(single["loss"])


def test_two_rank_vi_matches_one_process_on_the_same_global_draws(tmp_path):
    (tmp_path / "one").mkdir()
    _ok(_launch("vi", tmp_path / "one", nproc=1))
    _ok(_launch("vi", tmp_path, nproc=2))
    single = torch.load(tmp_path / "one" / "vi-0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"vi-{r}.pt", weights_only=True) for r in (0, 1)]
    for key in single["state"]:
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key])  # identical ranks
        torch.testing.assert_close(ranks[0]["state"][key], single["state"][key])
    assert ranks[0]["history"]["total"] == pytest.approx(single["history"]["total"])


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["renyi", "forward_kl", "renyi-score", "iw1-score"])
def test_two_rank_weighted_objectives_match_one_process(tmp_path, objective):
    """Renyi (groups of 3, one per rank) and forward KL (weights normalised over both
    ranks' draws), and with the score estimator Renyi (VIMCO within each group) and the
    importance-weighted bound with K = 1 (each draw's baseline the mean of every other
    rank's terms too): the same q, totals and ESS as one process on the same global draws."""
    scenario = f"objective-{objective}"
    (tmp_path / "one").mkdir()
    _ok(_launch(scenario, tmp_path / "one", nproc=1))
    _ok(_launch(scenario, tmp_path, nproc=2))
    single = torch.load(tmp_path / "one" / f"{scenario}-0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"{scenario}-{r}.pt", weights_only=True) for r in (0, 1)]
    for key in single["state"]:
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key])
        torch.testing.assert_close(ranks[0]["state"][key], single["state"][key])
    for key in ("total", "ess"):
        assert ranks[0]["history"][key] == pytest.approx(single["history"][key])


def test_a_rank_that_raises_stops_every_rank_quickly(tmp_path):
    started = time.monotonic()
    result = _launch("fail", tmp_path, nproc=2, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - started < 90
    assert "simulator exploded on rank 1" in result.stderr
    assert "another rank failed" in result.stderr


@pytest.mark.parametrize("scenario", ["fail-smd", "fail-mcmc-warmup", "fail-mcmc-sampling"])
def test_a_rank_that_raises_in_smd_or_mcmc_stops_every_rank(tmp_path, scenario):
    """Rank 1's loss raises: rank 1 exits with its error and rank 0 with "another rank
    failed", well before the workers' 60 s collective timeout (a rank left waiting in a
    collective would only stop there, with gloo's timeout error)."""
    started = time.monotonic()
    result = _launch(scenario, tmp_path, nproc=2, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - started < 45
    assert "simulator exploded on rank 1" in result.stderr
    assert "another rank failed" in result.stderr


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_a_two_rank_checkpoint_with_one_or_two_ranks(tmp_path, nproc):
    """With w = "calibrate" (unseeded, each rank's global stream seeded apart): w is chosen
    once, on rank 0, and every rank runs at it; a resumed run keeps the checkpoint's w and
    chooses nothing."""
    from distributed_worker import SERIES, prior, series_loss, unseeded_calibration

    _ok(_launch("checkpoint-4-fresh", tmp_path, nproc=2))
    first = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert first["epoch"] == 4
    ranks = [torch.load(tmp_path / f"checkpoint-{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["calls"] > 4 and ranks[1]["calls"] == 4  # chosen on rank 0 alone
    torch.manual_seed(100)  # rank 0's stream: its choice, made here again
    chosen = unseeded_calibration().choose(series_loss, prior(), SERIES).w
    assert ranks[0]["w"] == ranks[1]["w"] == first["w"] == chosen
    # The resuming ranks start q at (3, 3), not (0.5, -0.5): a restart would not continue.
    _ok(_launch("checkpoint-8-resume", tmp_path, nproc=nproc))
    for r in range(nproc):
        resumed = torch.load(tmp_path / f"checkpoint-{r}.pt", weights_only=True)
        assert resumed["epochs"] == 8
        assert resumed["calls"] == 4  # epochs 4..7 only, on every rank: w not chosen again
        assert resumed["w"] == chosen
        assert resumed["history"]["total"][:4] == first["history"]["total"]
    if nproc == 2:  # the same number of ranks: bit for bit an uninterrupted 2-rank run
        (tmp_path / "straight").mkdir()
        _ok(_launch("checkpoint-8-fresh", tmp_path / "straight", nproc=2))
        straight = torch.load(tmp_path / "straight" / "checkpoint-0.pt", weights_only=True)
        assert straight["calls"] > 8 and straight["w"] == chosen
        for key, value in straight["state"].items():
            assert torch.equal(value, resumed["state"][key]), key
        assert straight["history"]["total"] == resumed["history"]["total"]


def test_smd_mcmc_and_importance_sampling_shard_their_batch_axis(tmp_path):
    (tmp_path / "one").mkdir()
    _ok(_launch("shards", tmp_path / "one", nproc=1))
    _ok(_launch("shards", tmp_path, nproc=2))
    single = torch.load(tmp_path / "one" / "shards-0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"shards-{r}.pt", weights_only=True) for r in (0, 1)]
    for key in single:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # every rank has everything
        assert ranks[0][key].shape == single[key].shape, key
    # SMD is deterministic here: two ranks with two starts each follow one process's steps
    torch.testing.assert_close(ranks[0]["smd"], single["smd"])
    torch.testing.assert_close(ranks[0]["smd_losses"], single["smd_losses"])
    torch.testing.assert_close(ranks[0]["single_start"], single["single_start"])
    torch.testing.assert_close(ranks[0]["single_loss"], single["single_loss"])


def test_shard_and_slurm_node_lists():
    assert [shard(7, of=2, at=r) for r in (0, 1)] == [(0, 4), (4, 3)]
    assert shard(5) == (0, 5)  # a single process takes everything
    assert _first_host("node[03-05,07],gpu1") == "node03"
    assert _first_host("login1") == "login1"


def test_the_command_runs_data_parallel_with_nproc(tmp_path):
    from test_cli import _gradcal, _write

    config = _write(tmp_path, epochs=3)
    result = _gradcal("run", config, "--out", tmp_path / "out", "--nproc", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("report:") == 1  # rank 0 alone writes and reports
    assert (tmp_path / "out" / "report.html").exists()
    with open(tmp_path / "out" / "history.csv") as f:
        assert len(f.read().splitlines()) == 4
