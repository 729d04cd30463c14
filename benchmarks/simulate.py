"""Batched simulation versus a loop of single draws, measured side by side.

    OMP_NUM_THREADS=1 python benchmarks/simulate.py [--repeats 5] [--quick]

For Rama Cont (1000 agents, 100 steps) and SIR (1000-node Watts-Strogatz graph, k = 10,
p = 0.1, 100 steps), prints the median time of one simulation of B draws run as one batch
and as a Python loop over single draws, forward only and forward + backward, and the
loop / batched ratio. Goal: at least 10x at B = 30 for Rama Cont.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import networkx
import torch

from gradcal.models import SIR, Model, RamaCont


def _one_run(model: Model, params: torch.Tensor, backward: bool) -> None:
    params = params.clone().requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        loss = sum(y.square().mean() for y in model.run_and_observe(params))
        if backward:
            loss.backward()


def batched(model: Model, theta: torch.Tensor, b: int, backward: bool) -> None:
    _one_run(model, theta.expand(b, -1), backward)


def looped(model: Model, theta: torch.Tensor, b: int, backward: bool) -> None:
    for _ in range(b):
        _one_run(model, theta, backward)


def median_seconds(fn: Callable[..., None], args: tuple, repeats: int) -> float:
    fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="B in {1, 10} only")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = {
        "RamaCont": (
            RamaCont(1000, 100, s=0.1, sigmoid_k=5.0, log10_params=True),
            torch.tensor([0.0, math.log10(0.5), 0.0, math.log10(0.7)]),
        ),
        "SIR": (
            SIR(networkx.watts_strogatz_graph(1000, 10, 0.1, seed=0), 100),
            torch.tensor([-2.0, -0.5, -1.0]),
        ),
    }
    sizes = [1, 10] if args.quick else [1, 10, 30, 100]
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats}"
    )
    print(
        f"{'model':<9} {'mode':<9} {'B':>4} {'batched s':>10} {'loop s':>9} {'loop/batched':>13}"
    )
    for name, (model, theta) in cases.items():
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "forward"
            for b in sizes:
                t_batch = median_seconds(batched, (model, theta, b, backward), args.repeats)
                t_loop = median_seconds(looped, (model, theta, b, backward), args.repeats)
                print(
                    f"{name:<9} {mode:<9} {b:>4} {t_batch:>10.4f} {t_loop:>9.4f} "
                    f"{t_loop / t_batch:>12.1f}x"
                )


if __name__ == "__main__":
    main()
