"""Signature-kernel MMD against MMD on lag windows and energy distance: time and a short fit.

    OMP_NUM_THREADS=1 python benchmarks/signature.py [--repeats 3] [--epochs 60]
        [--figure docs/signature-kernel.png]

Part 1: seconds per epoch's gradient work (simulate B = 10 draws, the loss, one reverse
pass; and the signature loss in forward mode too) on Rama Cont (1000 agents, 100 steps) and
SIR (Watts-Strogatz graph of 500 nodes, 50 steps), for each loss at its defaults
(MMD and energy distance on lag windows of 3 values).
Part 2: a short VI fit on Rama Cont (diagonal Gaussian, 10 draws an epoch, the same number
of epochs, one fixed w for every loss (default 0.01): w = "calibrate" was too expensive
for this measurement) with each loss: the posterior mean and sd against the truth; the figure shows
the marginals.
Part 3 (``--sensitivity``): how far each loss moves, in units of its own simulation noise,
when one parameter moves by 0.2 from the truth, on Rama Cont and SIR.
Prints the load average, since the figures depend on it.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import networkx
import torch

from gradcal.infer.vi import VI
from gradcal.losses import EnergyDistanceLoss, MMDLoss, SignatureMMDLoss
from gradcal.models import SIR, RamaCont
from gradcal.posterior_estimators import DiagonalGaussian

RC_TRUTH = torch.tensor([math.log10(1.0), math.log10(0.5), math.log10(1.0), math.log10(0.7)])
SIR_TRUTH = torch.tensor([-1.0, -0.5, -0.8])


def losses(model, y) -> dict:
    """The three losses at their defaults (lag windows of 3 for MMD and energy)."""
    return {
        "signature": SignatureMMDLoss(model, y),
        "mmd (window 3)": MMDLoss(model, y, window=3),
        "energy (window 3)": EnergyDistanceLoss(model, y, window=3),
    }


def seconds(f, repeats: int) -> float:
    f()  # first-call costs out of the way
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing(repeats: int) -> None:
    graph = networkx.watts_strogatz_graph(500, 6, 0.1, seed=0)
    tasks = {
        "Rama Cont": (RamaCont(1000, 100, s=0.1, sigmoid_k=5.0, log10_params=True), RC_TRUTH),
        "SIR": (SIR(graph, 50), SIR_TRUTH),
    }
    print("seconds per epoch (B = 10 draws: simulate, loss, gradient), median of", repeats)
    for task, (model, truth) in tasks.items():
        torch.manual_seed(0)
        y = [o.detach() for o in model.run_and_observe(truth)]
        y = y[0] if len(y) == 1 else y
        theta = truth.expand(10, -1).clone()

        def simulate_only(model=model, theta=theta) -> None:
            with torch.no_grad():
                model.run_and_observe(theta)

        print(
            f"  {task:<10} simulation alone (no gradient) {seconds(simulate_only, repeats):8.3f}"
        )
        for name, loss in losses(model, y).items():

            def reverse(loss=loss, theta=theta, y=y) -> None:
                leaf = theta.clone().requires_grad_()
                loss(leaf, y).sum().backward()

            print(f"  {task:<10} {name:<18} reverse {seconds(reverse, repeats):8.3f}")
            if name == "signature":

                def forward(loss=loss, theta=theta, y=y) -> None:
                    tangent = torch.zeros_like(theta)
                    tangent[:, 0] = 1.0
                    with torch.no_grad():
                        torch.func.jvp(lambda p: loss(p, y).sum(), (theta,), (tangent,))

                print(
                    f"  {task:<10} {name:<18} forward (1 tangent) {seconds(forward, repeats):8.3f}"
                )


def fit(epochs: int, w: float, figure: str | None) -> None:
    model = RamaCont(1000, 100, s=0.1, sigmoid_k=5.0, log10_params=True)
    torch.manual_seed(1)
    (y,) = [o.detach() for o in model.run_and_observe(RC_TRUTH)]
    prior = torch.distributions.MultivariateNormal(torch.zeros(4), torch.eye(4))
    print(f"\nVI on Rama Cont: diagonal Gaussian, {epochs} epochs x 10 draws, w = {w}")
    print("  truth", [round(v, 3) for v in RC_TRUTH.tolist()])
    results = {}
    for name, loss in losses(model, y).items():
        q = DiagonalGaussian(torch.zeros(4), 1.0)
        optimizer = torch.optim.Adam(q.parameters(), lr=0.05)
        vi = VI(loss, prior, q, w=w, optimizer=optimizer, n_samples_per_epoch=10, seed=0)
        start = time.perf_counter()
        vi.run(y, epochs, max_epochs_without_improvement=epochs)
        elapsed = time.perf_counter() - start
        with torch.no_grad():
            draws = q.sample(4000)[0]
        results[name] = draws
        mean, sd = draws.mean(0), draws.std(0)
        error = (mean - RC_TRUTH).abs()

        def show(t: torch.Tensor) -> list[float]:
            return [round(v, 3) for v in t.tolist()]

        print(
            f"  {name:<18} {elapsed / epochs:6.2f} s/epoch  mean {show(mean)}  sd {show(sd)}"
            f"  |mean - truth| {show(error)}"
        )
    if figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 4, figsize=(12, 3), constrained_layout=True)
        names = ["log10 gamma_0", "log10 gamma_1", "log10 sigma", "log10 eta"]
        for k, ax in enumerate(axes):
            for name, draws in results.items():
                ax.hist(draws[:, k].numpy(), bins=50, density=True, histtype="step", label=name)
            ax.axvline(float(RC_TRUTH[k]), color="black", lw=1)
            ax.set(xlabel=names[k])
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Rama Cont, VI with w = {w}, {epochs} epochs x 10 draws (black: truth)")
        fig.savefig(figure, dpi=110)


def sensitivity(draws: int, delta: float) -> None:
    """How far each loss moves, in units of its own simulation noise, when one parameter
    moves by ``delta`` from the truth: (mean at truth + delta e_k - mean at truth) / sd at
    truth, over ``draws`` simulations each; Rama Cont and SIR. The standard error of each
    figure is about sqrt(2 / draws)."""
    graph = networkx.watts_strogatz_graph(500, 6, 0.1, seed=0)
    tasks = {
        "Rama Cont": (RamaCont(1000, 100, s=0.1, sigmoid_k=5.0, log10_params=True), RC_TRUTH),
        "SIR": (SIR(graph, 50), SIR_TRUTH),
    }
    for task, (model, truth) in tasks.items():
        torch.manual_seed(2)
        y = [o.detach() for o in model.run_and_observe(truth)]
        y = y[0] if len(y) == 1 else y
        print(f"\n{task}: loss shift / its sd when one parameter moves by {delta} ({draws} sims)")
        variants = losses(model, y)
        variants["signature, lead-lag"] = SignatureMMDLoss(
            model, y, transforms=("time", "lead_lag")
        )
        for name, loss in variants.items():
            with torch.no_grad():
                torch.manual_seed(3)
                base = loss(truth.expand(draws, -1).clone(), y)
                shifts = []
                for k in range(len(truth)):
                    moved = truth.clone()
                    moved[k] += delta
                    value = loss(moved.expand(draws, -1).clone(), y).mean()
                    shifts.append(float((value - base.mean()) / base.std()))
            print(f"  {name:<20} " + "  ".join(f"{v:6.2f}" for v in shifts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--w", type=float, default=0.01, help="the same w for every loss")
    parser.add_argument("--figure", default=None, help="PNG of the fitted marginals")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-fit", action="store_true")
    parser.add_argument("--sensitivity", action="store_true", help="also part 3")
    args = parser.parse_args()
    print("load average before:", os.getloadavg())
    if not args.skip_timing:
        timing(args.repeats)
    if not args.skip_fit:
        fit(args.epochs, args.w, args.figure)
    if args.sensitivity:
        sensitivity(20, 0.2)
    print("load average after:", os.getloadavg())


if __name__ == "__main__":
    main()
