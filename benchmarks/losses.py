"""Loss benchmarks: batched MMDLoss versus a loop, and MMD memory on long series.

    OMP_NUM_THREADS=1 python benchmarks/losses.py [--repeats 5] [--lengths 100 1000 10000]

Part 1: forward + backward time of ``MMDLoss`` on Rama Cont (1000 agents, 100 steps) for
B in {1, 10, 30}, one batched call versus a loop of B single-draw calls.
Part 2: peak resident memory of one forward + backward MMD between a simulated and an
observed series of length T (each measured in a fresh process, with malloc returning large
blocks to the system at once so that the peak follows live memory): the exact quadratic
estimator, the same computed in row blocks (``chunk_size=256``, exact, blocks recomputed in
the backward pass), and the linear-time estimator.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from gradcal.losses import MMDLoss
from gradcal.models import RamaCont

MEMORY_PROBE = """
import sys, time, torch
from gradcal.discrepancies import mmd
torch.set_num_threads(1)
t, mode = int(sys.argv[1]), sys.argv[2]
kwargs = {"full": {}, "chunked": {"chunk_size": 256}, "linear": {"estimator": "linear"}}[mode]
warm = torch.randn(1, 600, requires_grad=True)
mmd(warm, torch.randn(600), **kwargs).sum().backward()  # first-call costs out of the way
x = torch.randn(1, t, requires_grad=True)
y = torch.randn(t)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set size
before = status("VmRSS")
start = time.perf_counter()
mmd(x, y, **kwargs).sum().backward()
elapsed = time.perf_counter() - start
print(status("VmHWM") - before, elapsed)
"""

# Blocks above 1 MB are mapped and unmapped by malloc, so the peak resident size follows the
# memory torch holds rather than what glibc's heap keeps after fragmentation.
PROBE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"}


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing(repeats: int) -> None:
    torch.manual_seed(0)
    model = RamaCont(1000, 100, s=0.1, sigmoid_k=5.0, log10_params=True)
    theta = torch.tensor([0.0, math.log10(0.5), 0.0, math.log10(0.7)])
    y = model.run_and_observe(theta)[0].detach()
    loss = MMDLoss(model, y)

    def batched(b: int) -> None:
        params = theta.expand(b, -1).clone().requires_grad_()
        loss(params, y).sum().backward()

    def looped(b: int) -> None:
        for _ in range(b):
            params = theta.clone().requires_grad_()
            loss(params, y).backward()

    print("MMDLoss on Rama Cont (1000 agents, 100 steps), forward + backward, median seconds")
    print(f"{'B':>4} {'batched s':>10} {'loop s':>9} {'loop/batched':>13}")
    for b in (1, 10, 30):
        t_batch = median_seconds(lambda: batched(b), repeats)  # noqa: B023
        t_loop = median_seconds(lambda: looped(b), repeats)  # noqa: B023
        print(f"{b:>4} {t_batch:>10.4f} {t_loop:>9.4f} {t_loop / t_batch:>12.1f}x")


def memory(lengths: list[int]) -> None:
    print("\nMMD of a series of length T, one forward + backward: peak memory (MB), seconds")
    print(
        f"{'T':>6} {'full MB':>9} {'full s':>7} {'chunked MB':>11} {'chunked s':>10} "
        f"{'linear MB':>10} {'linear s':>9}"
    )
    for t in lengths:
        row = []
        for mode in ("full", "chunked", "linear"):
            out = subprocess.run(
                [sys.executable, "-c", MEMORY_PROBE, str(t), mode],
                capture_output=True,
                text=True,
                check=True,
                env=PROBE_ENV,
            ).stdout.split()
            row += [float(out[0]), float(out[1])]
        print(
            f"{t:>6} {row[0]:>9.1f} {row[1]:>7.3f} {row[2]:>11.1f} {row[3]:>10.3f} "
            f"{row[4]:>10.1f} {row[5]:>9.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    timing(args.repeats)
    memory(args.lengths)


if __name__ == "__main__":
    main()
