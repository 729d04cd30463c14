"""Benchmark figures: how far a method's draws (or point) are from the reference posterior,
and what the method cost (wall time, peak memory)."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from gradcal.diagnostics.distances import NoiseFloor, c2st, mmd_samples, split_half_floor

__all__ = [
    "LEVELS",
    "Cost",
    "Scores",
    "interval_coverage",
    "mean_error",
    "measure_cost",
    "reference_floor",
    "score",
]

LEVELS = (0.5, 0.9)  # central intervals of the reference whose coverage is reported


@dataclass
class Scores:
    """Accuracy figures of one run against the reference (NaN where they do not apply).

    c2st: classifier two-sample accuracy (0.5 best, 1 worst); mmd: squared MMD (compare with
    the reference's split-half noise floor); mean_error: largest over the coordinates of
    |mean - reference mean| / reference sd; cov50, cov90: mean over the coordinates of the
    fraction of the draws inside the reference's central 50 % and 90 % intervals.
    """

    c2st: float = math.nan
    mmd: float = math.nan
    mean_error: float = math.nan
    cov50: float = math.nan
    cov90: float = math.nan


def mean_error(estimate: Tensor, reference: Tensor) -> float:
    r"""Error of a posterior mean (or point) in reference sd:
    $\max_d |m_d - \bar r_d| / s_d$.

    Arguments:
        estimate: draws (n, D) (their mean is used) or a point (D,).
        reference: reference draws (m, D).

    Example:
        >>> ref = torch.tensor([[0.0], [2.0]])            # mean 1, sd sqrt(2)
        >>> round(mean_error(torch.tensor([1.0 + 2 ** 0.5]), ref), 6)
        1.0
    """
    point = estimate.mean(0) if estimate.ndim == 2 else estimate
    ref = reference.to(point.dtype)
    return float(((point - ref.mean(0)).abs() / ref.std(0)).max())


def interval_coverage(samples: Tensor, reference: Tensor, level: float) -> float:
    """Mean over coordinates of the fraction of ``samples`` (n, D) inside the reference's
    central ``level`` interval (its (1 - level)/2 and (1 + level)/2 quantiles); ``level``
    when the two agree.

    Example:
        >>> ref = torch.linspace(0, 1, 1001)[:, None]
        >>> interval_coverage(torch.tensor([[0.5], [0.01], [0.99], [0.3]]), ref, 0.9)
        0.5
    """
    ref = reference.to(samples.dtype)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=samples.dtype)
    low, high = torch.quantile(ref, q, dim=0)
    inside = (samples >= low) & (samples <= high)
    return float(inside.to(samples.dtype).mean())


def reference_floor(reference: Tensor, n_splits: int = 10) -> NoiseFloor:
    """The MMD noise floor of the reference: MMD between its random halves (mean, sd)."""
    return split_half_floor(reference, n_splits=n_splits, seed=0)


def score(
    samples: Tensor | None,
    point: Tensor | None,
    reference: Tensor,
    seed: int = 0,
    folds: int = 5,
    epochs: int = 30,
) -> Scores:
    """All accuracy figures of one run: draws (n, D) get every figure, a point (D,) only
    ``mean_error``. ``seed``, ``folds`` and ``epochs`` go to
    :func:`~gradcal.diagnostics.distances.c2st`.

    Example:
        >>> ref = torch.randn(200, 2)
        >>> good = score(torch.randn(200, 2), None, ref, folds=2, epochs=10)
        >>> bad = score(ref + 2, None, ref, folds=2, epochs=10)
        >>> good.c2st < 0.65 < 0.9 < bad.c2st, good.mean_error < 0.3 < 1.5 < bad.mean_error
        (True, True)
    """
    if samples is None:
        return Scores(mean_error=mean_error(point, reference))
    samples = samples.detach().to(reference.dtype)
    finite = torch.isfinite(samples).all(-1)
    if not finite.all():  # non-finite draws cannot be scored: the run failed
        raise ValueError(f"{int((~finite).sum())} of the method's draws are not finite")
    return Scores(
        c2st=c2st(samples, reference, folds=folds, seed=seed, epochs=epochs),
        mmd=mmd_samples(samples, reference),
        mean_error=mean_error(samples, reference),
        cov50=interval_coverage(samples, reference, LEVELS[0]),
        cov90=interval_coverage(samples, reference, LEVELS[1]),
    )


def _rss_bytes() -> int | None:
    """This process's resident memory from /proc (Linux), None elsewhere."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Cost:
    """Wall time (s) and peak resident memory above the start (MiB; NaN off Linux)."""

    wall_s: float = math.nan
    peak_mib: float = math.nan


@contextmanager
def measure_cost(interval: float = 0.005) -> Iterator[Cost]:
    """Time the block and sample the process's resident memory every ``interval`` seconds;
    ``peak_mib`` is the largest sample minus the resident memory at the start.

    Example:
        >>> with measure_cost() as cost:
        ...     x = torch.ones(2**22)        # 16 MiB
        >>> cost.wall_s > 0
        True
    """
    cost = Cost()
    start_rss = _rss_bytes()
    peak = [start_rss or 0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            rss = _rss_bytes()
            if rss is not None and rss > peak[0]:
                peak[0] = rss

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    if start_rss is not None:
        thread.start()
    try:
        yield cost
    finally:
        cost.wall_s = time.perf_counter() - start
        done.set()
        if start_rss is not None:
            thread.join()
            end = _rss_bytes() or 0
            cost.peak_mib = (max(peak[0], end) - start_rss) / 2**20
