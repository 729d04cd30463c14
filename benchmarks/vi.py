"""Seconds per VI epoch on the BlackBIRDS tutorial's Rama Cont set-up, side by side.

    OMP_NUM_THREADS=1 python benchmarks/vi.py [--epochs 6] [--repeats 3]

Set-up: 1000 agents, 100 steps, s = 0.1, sigmoid_k = 5, MMD loss against data simulated at
the tutorial's truth, the tutorial's normflows affine-coupling flow, w = 0.001, MVN prior,
Monte Carlo KL with BlackBIRDS' default 10,000 draws. For B = 10 and 30 draws per epoch:

- (i)   gradcal's batched ``RamaCont`` and ``MMDLoss``, pathwise reverse mode;
- (ii)  the tutorial's own single-draw model and loss (examples/blackbirds_rama_cont.py),
        batched automatically by vmap, and the same run draw by draw; (ii') the same model
        with ``trim_time_series`` keeping the last step only (the tutorial keeps all of it);
- (iii) as (i) in forward mode;
- floor: one batched simulation of B draws without gradients.

When ``blackbirds`` is importable the same tutorial configuration runs on it in the same
process and the ratio is printed; otherwise the BlackBIRDS 1.3 figures measured on this
machine class (1.2 s per epoch at B = 10, 3.4 s at B = 30) are used for the goal ratios.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from gradcal.infer.vi import VI
from gradcal.losses import MMDLoss
from gradcal.models import RamaCont

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from blackbirds_rama_cont import LogModel, make_flow
from blackbirds_rama_cont import MMDLoss as TutorialMMDLoss

BLACKBIRDS_SECONDS = {10: 1.2, 30: 3.4}  # BlackBIRDS 1.3, one thread, this machine class
TRUTH = torch.log10(torch.tensor([1.0, 0.5, 1.0, 0.7]))


def seconds_per_epoch(make_vi, data, epochs: int, repeats: int) -> float:
    """Median over repeats of the mean epoch time of a fresh run (after one warm-up run)."""
    make_vi().run(data, 2, 10**9)
    times = []
    for _ in range(repeats):
        vi = make_vi()
        start = time.perf_counter()
        vi.run(data, epochs, 10**9)
        times.append((time.perf_counter() - start) / epochs)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    builtin = RamaCont(1000, 100, s=0.1, sigmoid_k=5.0, log10_params=True)
    tutorial = LogModel(n_agents=1000, n_timesteps=100, s=0.1, sigmoid_k=5.0)
    # The tutorial's trim_time_series keeps the whole history, so every step copies it:
    # O(T^2) work. The same model keeping only the last step, which is all step() reads:
    trimmed = LogModel(n_agents=1000, n_timesteps=100, s=0.1, sigmoid_k=5.0)
    trimmed.trim_time_series = lambda x: x[-1:]
    y = builtin.run_and_observe(TRUTH)[0].detach()
    prior = torch.distributions.MultivariateNormal(torch.zeros(4), torch.eye(4))

    def make_vi(loss, b: int, options: dict) -> VI:
        flow = make_flow(4)
        return VI(
            loss,
            prior,
            flow,
            w=0.001,
            gradient_clipping_norm=1.0,
            optimizer=torch.optim.AdamW(flow.parameters(), lr=1e-3),
            n_samples_per_epoch=b,
            progress_bar=False,
            seed=0,
            **options,
        )

    has_blackbirds = importlib.util.find_spec("blackbirds") is not None
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.epochs} epochs x {args.repeats} runs; blackbirds importable: {has_blackbirds}"
    )
    for b in (10, 30):
        rows = {}
        with torch.no_grad():
            params = TRUTH.expand(b, -1).clone()
            builtin.run_and_observe(params)
            start = time.perf_counter()
            for _ in range(5):
                builtin.run_and_observe(params)
            rows["floor: one batched simulation, no gradient"] = (time.perf_counter() - start) / 5
        configs = {
            "(i) built-in batched, reverse": (MMDLoss(builtin, y), {}),
            "(ii) tutorial model, vmap": (
                TutorialMMDLoss(model=tutorial, y=y),
                {"batching": "vmap"},
            ),
            "(ii) tutorial model, loop": (
                TutorialMMDLoss(model=tutorial, y=y),
                {"batching": "loop"},
            ),
            "(ii') tutorial model trimmed, vmap": (
                TutorialMMDLoss(model=trimmed, y=y),
                {"batching": "vmap"},
            ),
            "(ii') tutorial model trimmed, loop": (
                TutorialMMDLoss(model=trimmed, y=y),
                {"batching": "loop"},
            ),
            "(iii) built-in batched, forward": (MMDLoss(builtin, y), {"diff_mode": "forward"}),
        }
        for name, (loss, kwargs) in configs.items():
            rows[name] = seconds_per_epoch(
                functools.partial(make_vi, loss, b, kwargs),
                y,
                args.epochs,
                args.repeats,
            )
        reference = BLACKBIRDS_SECONDS[b]
        floor, first = (
            rows["floor: one batched simulation, no gradient"],
            rows["(i) built-in batched, reverse"],
        )
        print(f"\nB = {b}: seconds per epoch (BlackBIRDS 1.3 reference {reference} s)")
        for name, seconds in rows.items():
            print(
                f"  {name:<45} {seconds:8.4f} s   {reference / seconds:6.1f}x faster than "
                f"BlackBIRDS   {seconds / floor:5.1f}x floor   {seconds / first:4.2f}x (i)"
            )


if __name__ == "__main__":
    main()
