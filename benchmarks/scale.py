"""Seconds and peak memory of one VI epoch against the number of agents N, per gradient mode.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/scale.py [--sizes 1e3 1e4 1e5 1e6]
        [--models rama_cont sir] [--modes plain checkpointed forward horizon]
        [--steps 100] [--draws 10] [--epochs 2] [--devices auto] [--max-gib 6]
        [--measures memory time] [--glibc-default-malloc]

One VI epoch: draw ``--draws`` parameters from a neural spline flow (zuko NSF, 4 or 3
parameters), simulate them in one batch for ``--steps`` steps, MMD loss against data
simulated at the truth, the gradient by the chosen mode, w * KL(q || prior), one Adam step.
Modes:

- ``plain``: reverse mode through the whole simulation (the graph of every step is kept);
- ``checkpointed``: reverse mode with ``checkpoint_every = round(sqrt(steps))``
  (:func:`gradcal.simulate.simulate_and_observe_model`): same gradient, one more forward;
- ``forward``: forward mode (``diff_mode="forward"``), one tangent per parameter;
- ``horizon``: reverse mode with ``gradient_horizon = round(sqrt(steps))``: a different
  (truncated) gradient, for comparison.

Models: Rama Cont (s = 0.1, sigmoid_k = 5) and SIR on a ring lattice with 10 contacts per
node, 10% of them rewired at random (Watts-Strogatz-like, built without networkx).

Every case runs in two fresh subprocesses. Time: the median over ``--epochs`` epochs after
one warm-up epoch. Memory: one epoch in a process of its own; on the CPU the peak resident
set during it above the resident set before it (Linux ``/proc/self/clear_refs``,
``VmHWM``), with glibc's ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors go back to
the system and the resident set follows the live tensors (by default glibc keeps freed
blocks of up to 32 MiB, and the resident set then shows fragmentation, not the graph; this
setting slows allocation down, hence the separate process); on CUDA the peak of
``torch.cuda.max_memory_allocated`` above the memory allocated before the epoch. ``--devices
auto`` measures the CPU and, where CUDA is available, the GPU with the same settings. A
case whose memory, extrapolated linearly from the previous size, would pass ``--max-gib``
(or whose time would pass ``--max-seconds``) is skipped and says so. Finally, for each
model, mode and device, the least-squares slope of log(time) and log(memory) against log N
over the sizes measured (goal for time: at most 1.1).

Time runs set glibc's ``MALLOC_MMAP_MAX_=0`` and ``MALLOC_TRIM_THRESHOLD_`` = 16 GiB (unless
``--glibc-default-malloc``): by default glibc maps every block over 32 MiB afresh from the
kernel and unmaps it when freed, so at 10^6 agents and 10 draws every (B, N) tensor (40 MB)
costs page faults (the kernel zeroing it) on each allocation; that made one epoch 3 to 4
times slower per agent than at 10^5 agents. With the setting, freed memory is reused. The
same applies to any large run on the CPU (``examples/million_agents.py`` sets it too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from gradcal.infer.vi import VI
from gradcal.losses import MMDLoss
from gradcal.models import SIR, RamaCont
from gradcal.posterior_estimators import Flow

TRUTHS = {
    "rama_cont": [0.0, math.log10(0.5), 0.0, math.log10(0.7)],
    "sir": [-2.0, -0.5, -1.0],
}


class EdgeList:
    """The two attributes of a networkx graph that :class:`SIR` reads, for big graphs."""

    def __init__(self, n: int, edges: np.ndarray):
        self.nodes = range(n)
        self.edges = edges


def small_world(n: int, contacts: int = 10, rewire: float = 0.1, seed: int = 0) -> EdgeList:
    """Ring lattice, each node linked to its ``contacts`` nearest, a fraction rewired."""
    rng = np.random.default_rng(seed)
    source = np.repeat(np.arange(n), contacts // 2)
    offsets = np.tile(np.arange(1, contacts // 2 + 1), n)
    target = (source + offsets) % n
    moved = rng.random(target.shape) < rewire
    target[moved] = rng.integers(0, n, int(moved.sum()))
    keep = source != target
    return EdgeList(n, np.stack((source[keep], target[keep]), axis=1))


def build_model(name: str, n: int, steps: int) -> torch.nn.Module:
    if name == "rama_cont":
        return RamaCont(n, steps, s=0.1, sigmoid_k=5.0, log10_params=True)
    return SIR(small_world(n), steps, tau_softmax=0.1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def one_case(
    measure: str, model_name: str, mode: str, n: int, device_name: str, args: argparse.Namespace
) -> dict[str, float]:
    """Seconds per epoch (``measure="time"``) or peak bytes of one epoch, in this process."""
    torch.manual_seed(0)
    device = torch.device(device_name)
    model = build_model(model_name, n, args.steps).to(device)
    truth = torch.tensor(TRUTHS[model_name], device=device)
    with torch.no_grad():
        data = [y.detach() for y in model.run_and_observe(truth)]
    every = max(1, round(math.sqrt(args.steps)))
    loss = MMDLoss(
        model,
        data,
        checkpoint_every=every if mode == "checkpointed" else None,
        gradient_horizon=every if mode == "horizon" else None,
    )
    d = truth.numel()
    prior = torch.distributions.Independent(
        torch.distributions.Normal(truth + 0.3, torch.full_like(truth, 0.3)), 1
    )
    family = Flow(d, loc=truth + 0.3, scale=0.3).to(device)
    vi = VI(
        loss,
        prior,
        family,
        w=0.01,
        optimizer=torch.optim.Adam(family.parameters(), lr=1e-3),
        n_samples_per_epoch=args.draws,
        n_samples_regularisation=1000,
        diff_mode="forward" if mode == "forward" else "reverse",
        progress_bar=False,
        device=device,
        seed=0,
    )

    def epoch() -> None:
        vi.step(data)
        vi.optimizer.step()

    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set to the current one
        before = _status_kib("VmRSS") * 1024
    epoch()  # the memory run's epoch; the warm-up of the time run
    _sync(device)
    times = []
    for _ in range(args.epochs if measure == "time" else 0):
        start = time.perf_counter()
        epoch()
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = _status_kib("VmHWM") * 1024 - before
    if measure == "time":
        return {"seconds": statistics.median(times)}
    return {"peak_bytes": peak}


REUSE_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30)}


def _run_case(
    model: str,
    mode: str,
    n: int,
    device: str,
    argv: list[str],
    measures: list[str],
    reuse_memory: bool,
) -> dict | str:
    result: dict[str, float] = {}
    for measure in measures:
        command = [sys.executable, __file__, "--one", measure, model, mode, str(n), device]
        env = dict(os.environ)
        if measure == "memory":
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        elif reuse_memory:
            env.update(REUSE_FREED_MEMORY)
        done = subprocess.run([*command, *argv], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:80]
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return result


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = np.log(xs), np.log(ys)
    return float(np.polyfit(lx, ly, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6])
    parser.add_argument("--models", nargs="+", default=["rama_cont", "sir"])
    parser.add_argument(
        "--modes", nargs="+", default=["plain", "checkpointed", "forward", "horizon"]
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--devices", nargs="+", default=["auto"])
    parser.add_argument("--max-gib", type=float, default=6.0)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--measures", nargs="+", default=["memory", "time"])
    parser.add_argument("--glibc-default-malloc", action="store_true")
    parser.add_argument("--one", nargs=5, metavar=("MEASURE", "MODEL", "MODE", "N", "DEVICE"))
    args = parser.parse_args()
    for model in args.models:
        if model not in TRUTHS:
            parser.error(f"--models: expected rama_cont or sir, got {model!r}")
    for mode in args.modes:
        if mode not in ("plain", "checkpointed", "forward", "horizon"):
            parser.error(f"--modes: expected plain, checkpointed, forward, horizon; got {mode!r}")
    for measure in args.measures:
        if measure not in ("memory", "time"):
            parser.error(f"--measures: expected memory or time, got {measure!r}")
    if args.one:
        measure, model, mode, n, device = args.one
        print(json.dumps(one_case(measure, model, mode, int(n), device, args)))
        return

    devices = ["cpu", "cuda"] if args.devices == ["auto"] else args.devices
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    argv = ["--steps", str(args.steps), "--draws", str(args.draws), "--epochs", str(args.epochs)]
    sizes = sorted(int(s) for s in args.sizes)
    print(
        f"torch {torch.__version__}, threads {os.environ.get('OMP_NUM_THREADS', '?')}, "
        f"{args.steps} steps, {args.draws} draws per epoch, median of {args.epochs} epochs, "
        f"load average {os.getloadavg()[0]:.2f}, "
        f"malloc: {'glibc default' if args.glibc_default_malloc else 'freed memory reused'}"
    )
    print(f"{'model':<10}{'device':<7}{'mode':<13}{'N':>9}{'s/epoch':>10}{'peak MiB':>10}")
    summary = []
    for model in args.models:
        for device in devices:
            for mode in args.modes:
                measured: list[tuple[int, float, float]] = []
                for n in sizes:
                    if measured:
                        n0, s0, b0 = measured[-1]
                        gib, sec = b0 * n / n0 / 2**30, s0 * n / n0  # 0 when not measured
                        if gib > args.max_gib or sec > args.max_seconds:
                            print(
                                f"{model:<10}{device:<7}{mode:<13}{n:>9}  skipped: "
                                f"predicted {gib:.1f} GiB, {sec:.0f} s"
                            )
                            continue
                    result = _run_case(
                        model, mode, n, device, argv, args.measures, not args.glibc_default_malloc
                    )
                    if isinstance(result, str):
                        print(f"{model:<10}{device:<7}{mode:<13}{n:>9}  {result}")
                        continue
                    sec, peak = result.get("seconds", 0.0), max(result.get("peak_bytes", 0), 1)
                    measured.append((n, sec, peak))
                    shown_sec = f"{sec:>10.3f}" if "seconds" in result else f"{'-':>10}"
                    shown_mib = (
                        f"{peak / 2**20:>10.1f}" if "peak_bytes" in result else f"{'-':>10}"
                    )
                    print(
                        f"{model:<10}{device:<7}{mode:<13}{n:>9}{shown_sec}{shown_mib}", flush=True
                    )
                if len(measured) >= 2:
                    ns, secs, peaks = zip(*measured, strict=True)
                    s_time = slope(ns, secs) if "time" in args.measures else math.nan
                    s_mem = slope(ns, peaks) if "memory" in args.measures else math.nan
                    summary.append((model, device, mode, s_time, s_mem))
    print("\nlog-log slopes against N (goal for time: <= 1.1)")
    for model, device, mode, s_time, s_mem in summary:
        print(f"  {model:<10}{device:<7}{mode:<13} time {s_time:5.2f}   memory {s_mem:5.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
