"""gradcal.bench: the quick benchmark end to end, its metrics and its exact references."""

from __future__ import annotations

import contextlib
import csv
import ctypes
import json
import math
import platform
import sys
import time

import pytest
import torch

from gradcal.bench import METHODS, TASKS, make_task, runner
from gradcal.bench.methods import Method, MethodOutput
from gradcal.bench.metrics import interval_coverage, mean_error, reference_floor, score
from gradcal.bench.runner import run_bench
from gradcal.bench.tasks import simulated_reference, stored_reference
from gradcal.cli import main
from gradcal.diagnostics.distances import mmd_samples


def _rows(folder):
    with (folder / "results.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def test_quick_benchmark_runs_every_task_and_method_with_figures_in_range(tmp_path):
    out = tmp_path / "quick"
    assert main(["-q", "bench", "--quick", "--out", str(out)]) == 0
    rows = _rows(out)
    available = [m for m, method in METHODS.items() if method.unavailable() is None]
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in TASKS for m in available}
    for r in rows:
        where = f"{r['task']} / {r['method']}"
        assert r["status"] == "ok", where
        budget, sims = int(r["budget"]), int(r["sims"])
        # MCMC rounds its steps down; HMC's two-step minimum spends 8 + 2 * 8 * 5 = 88
        assert 0.5 * budget <= sims <= (88 if r["method"] == "hmc" else budget), where
        assert float(r["wall_s"]) > 0, where
        assert math.isfinite(float(r["peak_mib"])) and float(r["peak_mib"]) >= 0, where
        assert 0 <= float(r["mean_error"]) < math.inf, where
        figures = [float(r[k]) for k in ("c2st", "mmd", "cov50", "cov90")]
        if METHODS[r["method"]].point:  # SMD: scored on its error only
            assert all(math.isnan(x) for x in figures), where
            continue
        c2st, mmd, cov50, cov90 = figures
        assert 0 <= c2st <= 1 and math.isfinite(mmd) and 0 <= cov50 <= cov90 <= 1, where
    page = (out / "bench.html").read_text()
    assert all(f"<h2>{t}</h2>" in page for t in TASKS)
    with (out / "references.csv").open(newline="") as file:
        references = {r["task"]: r for r in csv.DictReader(file)}
    assert float(references["random_walk"]["ess"]) > 100  # importance sampling's ESS
    assert float(references["rama_cont"]["ess"]) > 1000 < float(references["sir"]["ess"])
    # the folder is never overwritten silently; --resume runs nothing that is done
    assert main(["-q", "bench", "--quick", "--out", str(out)]) == 2
    assert main(["-q", "bench", "--quick", "--out", str(out), "--resume"]) == 0
    assert _rows(out) == rows


@pytest.mark.parametrize(
    "options",
    [
        ["--tasks", "nope"],
        ["--methods", "vi-reverse-gauss,nope"],
        ["--seeds", "0"],
        ["--budgets", "5"],
        ["--resume", "--overwrite"],
    ],
)
def test_bench_refuses_bad_options_with_exit_code_2(tmp_path, options, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path / "b"), *options]) == 2
    assert "config error" in capsys.readouterr().err
    assert not (tmp_path / "b" / "results.csv").exists()


def test_resume_with_other_settings_is_refused(tmp_path):
    run_bench(tmp_path, "quick", tasks=["bimodal"], methods=["is"])
    with pytest.raises(ValueError, match="other settings"):
        run_bench(tmp_path, "quick", tasks=["bimodal"], methods=["is"], seeds=2, resume=True)
    run_bench(tmp_path, "quick", tasks=["bimodal"], methods=["is", "smd"], resume=True)
    assert [r["method"] for r in _rows(tmp_path)] == ["is", "smd"]
    # each invocation that ran is recorded with its rows (the refused one is not)
    runs = json.loads((tmp_path / "settings.json").read_text())["runs"]
    assert [r["rows"] for r in runs] == [1, 1]
    assert all(r["started"] <= r["ended"] and len(r["load_average_at_end"]) == 3 for r in runs)
    page = (tmp_path / "bench.html").read_text()
    assert "Run " in page and " (load average " in page


def test_metrics_against_a_known_shift():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(20_000, 2, generator=generator, dtype=torch.float64)
    same = torch.randn(4000, 2, generator=generator, dtype=torch.float64)
    # Coverage of N(0, 1)'s central 90 % interval by n = 4000 draws: binomial sd
    # sqrt(0.9 * 0.1 / 4000) = 0.0047 per coordinate; the reference's quantiles (m = 20000,
    # density 0.103 there) add about 0.003: sd < 0.006, so 0.025 is over 4 sd.
    assert abs(interval_coverage(same, reference, 0.9) - 0.9) < 0.025
    assert abs(interval_coverage(same, reference, 0.5) - 0.5) < 0.025
    # shifted by one sd: Phi(1.645 - 1) - Phi(-1.645 - 1) = 0.7365 of the draws inside
    assert abs(interval_coverage(same + 1, reference, 0.9) - 0.7365) < 0.025
    # the mean error of a point is exact; of draws, the shift plus the sample mean's noise
    # (sd 1 / sqrt(4000) = 0.016 per coordinate)
    shift = torch.tensor([0.0, 2.0], dtype=torch.float64)
    point = reference.mean(0) + shift * reference.std(0)
    assert mean_error(point, reference) == pytest.approx(2.0)
    assert abs(mean_error(same + shift, reference) - 2.0) < 0.07
    # two sd apart in one coordinate: the classifier tells 200 + 200 draws apart (the Bayes
    # accuracy is Phi(1) = 0.84; chance gives 0.5 with sd 0.5 / sqrt(400) = 0.025)
    scores = score(same[:200] + shift, None, reference[:200], folds=2, epochs=10)
    assert scores.c2st > 0.7 and scores.cov90 < 0.8


def test_normal_reference_is_the_conjugate_posterior():
    task = make_task("normal")
    posterior = task.prior.posterior(task.data)
    theta = task.prior.sample((50,))
    # log posterior - (log prior + log likelihood) is the same constant at every theta
    difference = posterior.log_prob(theta) - (
        task.prior.log_prob(theta) - task.loss(theta, task.data)
    )
    assert difference.std() < 1e-4 * difference.abs().mean()


def test_bimodal_reference_matches_the_posterior_on_a_grid():
    task = make_task("bimodal")
    draws = task.reference(4000, False).samples
    # theta_1 and theta_2 are independent a posteriori: grid each with the other fixed.
    grid = torch.linspace(-4, 4, 8001)
    means = []
    for i in range(2):
        theta = torch.zeros(grid.numel(), 2)
        theta[:, i] = grid
        theta[:, 1 - i] = 1.0
        log_p = task.prior.log_prob(theta) - task.loss(theta, task.data)
        p = torch.softmax(log_p.double(), 0)
        means.append(float((p * (grid.abs() if i == 0 else grid)).sum()))
    # posterior sd of each coordinate 1 / sqrt(10.25) = 0.31: with 4000 draws the mean's
    # sd is 0.005; 0.02 is 4 sd. P(theta_1 > 0) = 1/2 with sd 0.008; 0.04 is 5 sd.
    assert abs(draws[:, 0].abs().mean() - means[0]) < 0.02
    assert abs(draws[:, 1].mean() - means[1]) < 0.02
    assert abs((draws[:, 0] > 0).double().mean() - 0.5) < 0.04


def test_merge_combines_parts_dedupes_and_refuses_other_columns(tmp_path, capsys):
    # two processes' parts (one per method), sharing one task x method row that a part
    # holds as failed: the merge keeps every row once, the ok one
    run_bench(tmp_path / "a", "quick", tasks=["bimodal"], methods=["is", "smd"])
    run_bench(tmp_path / "b", "quick", tasks=["bimodal", "normal"], methods=["is"])
    part_b = _rows(tmp_path / "b")
    part_b[0]["status"] = "failed: made up"
    with (tmp_path / "b" / "results.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, list(part_b[0]))
        writer.writeheader()
        writer.writerows(part_b)
    out = tmp_path / "merged"
    parts = [str(tmp_path / "b"), str(tmp_path / "a")]
    assert main(["-q", "bench", "--merge", *parts, "--out", str(out)]) == 0
    rows = _rows(out)
    keys = [(r["task"], r["method"]) for r in rows]
    assert sorted(keys) == [("bimodal", "is"), ("bimodal", "smd"), ("normal", "is")]
    assert all(r["status"] == "ok" for r in rows)
    with (out / "references.csv").open(newline="") as file:
        assert sorted(r["task"] for r in csv.DictReader(file)) == ["bimodal", "normal"]
    page = (out / "bench.html").read_text()
    assert "<h2>bimodal</h2>" in page and "<h2>normal</h2>" in page
    assert "Merged from 2 part(s)" in page and str(tmp_path / "a") in page  # each part's runs
    assert page.count(", 2 rows)") == 2  # a: is and smd on bimodal; b: is on two tasks
    # a merged folder is a part like any other; its own parts are carried over
    again = tmp_path / "again"
    assert main(["-q", "bench", "--merge", str(out), parts[1], "--out", str(again)]) == 0
    assert len(_rows(again)) == 3
    assert len(json.loads((again / "settings.json").read_text())["parts"]) == 3
    # an occupied output is refused; a part with other columns: exit 2, one line
    assert main(["-q", "bench", "--merge", *parts, "--out", str(out)]) == 2
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    bad.write_text("task,method,budget\nbimodal,is,60\n")
    code = main(["-q", "bench", "--merge", parts[0], str(bad), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.csv has columns" in err[0]
    assert not (tmp_path / "c").exists()
    assert (
        main(
            ["-q", "bench", "--merge", parts[0], parts[1], "--quick", "--out", str(tmp_path / "x")]
        )
        == 2
    )


@pytest.mark.parametrize(("name", "n"), [("rama_cont", 300), ("sir", 600)])
def test_stored_reference_converged_and_matches_a_fresh_small_one(name, n):
    draws, evidence = stored_reference(name)
    assert draws.shape == (1000, 2) and torch.isfinite(draws).all()
    # convergence evidence: a high ESS, and two independent halves whose means differ by
    # less than 4 Monte Carlo scales sqrt(1/ESS_1 + 1/ESS_2) (in posterior sd)
    assert evidence["ess"] > 1000
    assert evidence["half_gap"] < 4 * evidence["half_gap_scale"]
    # the stored draws are the task's posterior: a fresh, smaller importance sample (other
    # seed) has the same weighted mean within 4 Monte Carlo scales (its ESS and the
    # stored one's); the two draws of one seed are identical (deterministic)
    task = make_task(name)
    _, small = simulated_reference(task, n, 50, seed=1000)
    again, _ = simulated_reference(task, 20, 5, seed=7)
    assert torch.equal(again, simulated_reference(task, 20, 5, seed=7)[0])
    scale = math.sqrt(1 / small["ess"] + 1 / evidence["ess"])
    gap = (torch.tensor(small["mean"]) - torch.tensor(evidence["mean"])).abs()
    assert (gap / torch.tensor(evidence["sd"]) < 4 * scale).all(), (gap, scale)
    # and the same sd: an sd estimate's relative sd is about 1 / sqrt(2 ESS) for a
    # near-Normal posterior, so 4 such scales
    ratio = torch.tensor(small["sd"]) / torch.tensor(evidence["sd"])
    assert ((ratio - 1).abs() < 4 * scale / math.sqrt(2)).all(), ratio


class _Alloc(Method):
    """A stand-in method that holds ``chunks`` tensors of 16 MiB at once, then frees them;
    ``prepare_s``: seconds of set-up (an import, say) that ``run`` does itself if
    ``prepare`` was not called first, as NPE's import of sbi."""

    def __init__(self, name, chunks, prepare_s=0.0):
        self.name, self.summary, self.chunks, self.prepare_s = name, name, chunks, prepare_s
        self.ready = False

    def prepare(self):
        time.sleep(self.prepare_s)
        self.ready = True

    def run(self, task, loss, sims, n_draws, seed):
        if not self.ready:
            self.prepare()
        held = [torch.ones(2**22) for _ in range(self.chunks)]  # float32: 16 MiB each
        del held
        loss.draws += sims
        generator = torch.Generator().manual_seed(seed)
        return MethodOutput(samples=torch.randn(n_draws, task.dim, generator=generator))


@contextlib.contextmanager
def _heap_that_keeps_freed_memory():
    """glibc's malloc serving 16 MiB blocks from its heap and never giving freed memory
    back (a long-running process often is in this state): freed memory stays resident."""
    libc = ctypes.CDLL("libc.so.6")
    mmap_threshold, trim_threshold = -3, -1  # mallopt's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    libc.mallopt(mmap_threshold, 32 * 2**20)
    libc.mallopt(trim_threshold, 2**30)
    try:
        yield
    finally:
        libc.mallopt(mmap_threshold, 128 * 2**10)
        libc.mallopt(trim_threshold, 128 * 2**10)
        libc.malloc_trim(0)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="peak memory is measured on Linux; the heap set-up is glibc's",
)
def test_each_cell_has_its_own_peak_memory_and_time(tmp_path, monkeypatch):
    """A cell's peak is its own: 320 MiB freed by an earlier cell and kept by the allocator
    must not hide the 160 MiB the next cell holds; and set-up (imports) is not timed."""
    methods = {
        "big": _Alloc("big", 20),  # 320 MiB
        "small": _Alloc("small", 10),  # 160 MiB
        "slow_import": _Alloc("slow_import", 0, prepare_s=0.5),
    }
    monkeypatch.setattr(runner, "METHODS", methods)
    with _heap_that_keeps_freed_memory():
        run_bench(tmp_path, "quick", tasks=["normal"], methods=list(methods))
    rows = {r["method"]: r for r in _rows(tmp_path)}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    peak = {name: float(r["peak_mib"]) for name, r in rows.items()}
    # what a cell holds, give or take the interpreter's own few MiB
    assert 300 <= peak["big"] <= 360 and 140 <= peak["small"] <= 200, peak
    assert peak["slow_import"] < 20, peak
    assert float(rows["slow_import"]["wall_s"]) < 0.25, rows["slow_import"]  # 0.5 s set-up


def test_reference_floor_is_at_the_sizes_compared():
    """The floor of the MMD between n draws and the m reference draws (as runs are scored),
    not between two halves of m / 2: its sd against that of the MMD of fresh n-draw sets."""
    generator = torch.Generator().manual_seed(3)
    m, n, repeats = 400, 50, 200
    reference = torch.randn(m, 2, generator=generator)
    null = torch.tensor(
        [mmd_samples(torch.randn(n, 2, generator=generator), reference) for _ in range(repeats)]
    )
    floor = reference_floor(reference, n=n, n_splits=repeats)
    # Monte Carlo error of an sd from 200 values of a skewed statistic: about 10 % each
    # (1 / sqrt(2 * 200) = 5 %, doubled for the chi-square-like tail), so the ratio of two
    # lies within 0.6 to 1.6 (over 3 such errors). Halves of 200 against 200 give an sd
    # (1/200 + 1/200) / (1/50 + 1/400) = 0.44 times the one at 50 against 400.
    assert 0.6 < floor.std / float(null.std()) < 1.6, (floor, float(null.std()))
    assert abs(floor.mean - float(null.mean())) < 3 * float(null.std()) / math.sqrt(repeats)


def test_mean_error_refuses_a_reference_without_spread():
    reference = torch.tensor([[0.0, 1.0], [2.0, 1.0], [1.0, 1.0]])  # coordinate 1 constant
    with pytest.raises(ValueError, match="sd 0"):
        mean_error(torch.tensor([1.0, 1.0]), reference)
    with pytest.raises(ValueError, match="sd 0"):
        score(None, torch.tensor([1.0, 1.0]), reference)
