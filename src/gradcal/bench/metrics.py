"""Benchmark figures: how far a method's draws (or point) are from the reference posterior,
and what the method cost (wall time, peak memory)."""

from __future__ import annotations

import math
import multiprocessing
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradcal.diagnostics.distances import NoiseFloor, c2st, mmd_samples, split_half_floor

__all__ = [
    "LEVELS",
    "Cost",
    "Scores",
    "interval_coverage",
    "isolation_available",
    "mean_error",
    "measure_cost",
    "reference_floor",
    "reset_peak_memory",
    "run_isolated",
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
        reference: reference draws (m, D); each coordinate must vary (else ValueError).

    Example:
        >>> ref = torch.tensor([[0.0], [2.0]])            # mean 1, sd sqrt(2)
        >>> round(mean_error(torch.tensor([1.0 + 2 ** 0.5]), ref), 6)
        1.0
    """
    point = estimate.mean(0) if estimate.ndim == 2 else estimate
    ref = reference.to(point.dtype)
    sd = ref.std(0)
    flat = (sd == 0).nonzero().flatten().tolist()
    if flat:  # an error in sd units has no meaning there (it would be inf or NaN)
        raise ValueError(
            f"mean_error: the reference has sd 0 in coordinate(s) {flat}; an error in "
            "reference sd is undefined there."
        )
    return float(((point - ref.mean(0)).abs() / sd).max())


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


def reference_floor(reference: Tensor, n: int, n_splits: int = 10) -> NoiseFloor:
    r"""The MMD noise floor at the sizes a run is scored at: n draws against the m draws
    of ``reference`` (m, D), all from the reference posterior (mean, sd).

    Fresh draws are not at hand, so the floor of the reference's random halves (h = m // 2
    each, :func:`~gradcal.diagnostics.distances.split_half_floor`) is rescaled: under the
    null the unbiased MMD² has mean about 0 and an sd proportional to
    $1/n + 1/m$ (Gretton et al. 2012), so both figures are multiplied by
    $(1/n + 1/m) / (2/h)$.

    Example:
        >>> ref = torch.randn(400, 2)
        >>> reference_floor(ref, 50).std > 3 * reference_floor(ref, 400).std
        True
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an int >= 1, got {n!r}.")
    halves = split_half_floor(reference, n_splits=n_splits, seed=0)
    scale = (1 / n + 1 / reference.shape[0]) / (2 / (reference.shape[0] // 2))
    return NoiseFloor(halves.mean * scale, halves.std * scale)


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


def _status_kib(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (Linux), in KiB; None
    elsewhere."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_memory() -> bool:
    """Reset this process's peak resident memory (VmHWM) to its resident memory now, by
    writing 5 to /proc/self/clear_refs (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        return False
    return True


@dataclass
class Cost:
    """Wall time (s) and peak resident memory above the start (MiB; NaN off Linux)."""

    wall_s: float = math.nan
    peak_mib: float = math.nan


@contextmanager
def measure_cost() -> Iterator[Cost]:
    """Time the block and take its peak resident memory above the start: the kernel's
    high-water mark (VmHWM), reset at the start, minus the resident memory (VmRSS) then.
    Exact (no sampling) and costs two reads of /proc; NaN where /proc is missing.

    The process's allocator may serve the block from memory freed earlier and still
    resident, which this cannot see: the benchmark runs every cell in a fresh child process
    (:func:`run_isolated`) for that.

    Example:
        >>> with measure_cost() as cost:
        ...     x = torch.ones(2**22)        # 16 MiB
        >>> cost.wall_s > 0
        True
    """
    cost = Cost()
    start_kib = _status_kib("VmRSS") if reset_peak_memory() else None
    start = time.perf_counter()
    try:
        yield cost
    finally:
        cost.wall_s = time.perf_counter() - start
        peak_kib = _status_kib("VmHWM")
        if start_kib is not None and peak_kib is not None:
            cost.peak_mib = max(0, peak_kib - start_kib) / 2**10


def _child(
    connection: Any, fn: Callable[..., Any], args: tuple[Any, ...], state: dict[str, Any]
) -> None:
    """In the child: torch's thread count and default dtype as in the parent, then
    ``fn(*args)`` sent back (or the error, as text)."""
    torch.set_num_threads(state["threads"])
    torch.set_default_dtype(state["dtype"])
    try:
        connection.send(("ok", fn(*args)))
    except BaseException as error:  # sent back to the parent, which raises it
        connection.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        connection.close()


@contextmanager
def _main_left_out() -> Iterator[None]:
    """Hide the main module while a child starts: multiprocessing would run the caller's
    script again in it (all of it, in a script without an ``if __name__ == "__main__"``
    guard); the child needs only importable functions."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def isolation_available() -> bool:
    """Whether :func:`run_isolated` runs in a child process here (needs ``forkserver``)."""
    return "forkserver" in multiprocessing.get_all_start_methods()


def run_isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a fresh child process, its result returned (``fn`` must be defined
    in an importable module, not the main script; it, its arguments and its result must
    pickle; an error in it is raised here as ``RuntimeError``).

    The child is forked from a server process that has imported the benchmark and nothing
    else (multiprocessing's ``forkserver``), so it starts with no memory freed by earlier
    work to reuse, and its peak memory is its own; torch's thread count and default dtype
    are the caller's. Where ``forkserver`` is not available it runs here. The server
    starts once (seconds: it imports torch), each call then costs about 0.1 s.
    """
    if not isolation_available():
        return fn(*args)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["gradcal.bench.server"])
    receive, send = context.Pipe(duplex=False)
    state = {"threads": torch.get_num_threads(), "dtype": torch.get_default_dtype()}
    process = context.Process(target=_child, args=(send, fn, args, state), daemon=True)
    with _main_left_out():
        process.start()
    send.close()
    try:
        kind, value = receive.recv()
    except EOFError:
        kind, value = "error", "the child process ended without a result"
    finally:
        receive.close()
        process.join()
    if kind == "error":
        code = f" (exit code {process.exitcode})" if process.exitcode else ""
        raise RuntimeError(f"{value}{code}")
    return value
