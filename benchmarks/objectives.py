"""VI objectives side by side: C2ST against exact samples and seconds per epoch.

    OMP_NUM_THREADS=1 python benchmarks/objectives.py [--epochs 300] [--draws 64] [--flow]
    OMP_NUM_THREADS=1 python benchmarks/objectives.py --figure docs/objectives.png
    OMP_NUM_THREADS=1 python benchmarks/objectives.py --brock-hommes [--epochs 1500]

Targets (tests/objective_targets.py, exact samples): a bimodal posterior with mode weights
0.614 / 0.386, a banana and a heavy-tailed (Student t, 3 dof) one, all in 2-D with w = 1.
For each target: reverse KL (sticking the landing) with a diagonal Gaussian (and a neural
spline flow with ``--flow``), then every objective (reverse KL, importance-weighted K = 8,
Renyi alpha = 0.5 and 0.2 with K = 8, forward KL) with a 4-component GaussianMixture, all
with the pathwise reverse-mode estimator, Adam at lr 0.02 (flows 3e-3), ``--draws`` draws
per epoch for ``--epochs`` epochs, seed 0. Printed per run: C2ST (gradcal.diagnostics.c2st,
2000 draws of q against 2000 exact draws; 0.5 is indistinguishable, its sd under equal
distributions is at most 0.008), for the bimodal target the weight q gives to theta_1 > 0,
and seconds per epoch. On the bimodal target every objective is also fitted with the score
estimator (no simulator gradient; VIMCO control variates for the grouped bounds), row
"mixture/score", and forward KL, Renyi alpha = 0.2 and reverse KL fit a FlowMixture (4
components sharing a one-transform spline of 16-16 hidden units, lr 0.02), row
"flow_mix". Then, on the bimodal target with the mixture, seconds per epoch of every
objective with each estimator (pathwise reverse, pathwise forward mode, score), side by
side.

``--brock-hommes``: a classical posterior with an exact likelihood through the simulator
path instead: Brock-Hommes "wavy" (gradcal.models.BrockHommesBeliefs.wavy, four
parameters, uniform prior) against the 1000 exact-likelihood reference draws in
tests/data/brock_hommes_wavy. Every objective fits the same constrained NSF (3 transforms,
32-32 hidden units) with 64 draws per epoch, Adam at lr 0.01 with cosine decay, seed 0;
printed: C2ST and the squared MMD (gradcal.diagnostics.mmd_samples, standardised by the
reference) of 1000 draws of q against the reference, with the MMD's split-half noise
floor of the reference, and seconds per epoch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from objective_targets import TARGETS, bimodal_weight_of_positive_mode

from gradcal.diagnostics import c2st, mmd_samples, split_half_floor
from gradcal.infer.objectives import (
    ForwardKL,
    ImportanceWeighted,
    Renyi,
    ReverseKL,
)
from gradcal.infer.vi import VI
from gradcal.posterior_estimators import DiagonalGaussian, Flow, FlowMixture, GaussianMixture

OBJECTIVES = {
    "reverse_kl": lambda: ReverseKL(sticking_the_landing=True),
    "importance_weighted": lambda: ImportanceWeighted(k=8),
    "renyi(0.5)": lambda: Renyi(0.5, k=8),
    "renyi(0.2)": lambda: Renyi(0.2, k=8),
    "forward_kl": ForwardKL,
}
FAMILIES = {
    "diagonal": lambda: DiagonalGaussian(torch.zeros(2), 1.5),
    "mixture": lambda: GaussianMixture.spread(2, 4, 1.5, seed=0),
    "nsf": lambda: Flow(2, scale=2.0),
    "flow_mix": lambda: FlowMixture(2, 4, transforms=1, hidden_features=(16, 16), spread=1.5),
}


def fit(target, family, objective, epochs, draws, estimator="pathwise"):
    """(q, seconds per epoch) after ``epochs`` epochs of VI."""
    q = FAMILIES[family]()
    lr = 3e-3 if family == "nsf" else 0.02
    vi = VI(
        target.loss,
        target.prior,
        q,
        n_samples_per_epoch=draws,
        optimizer=torch.optim.Adam(q.parameters(), lr=lr),
        progress_bar=False,
        seed=0,
        objective=OBJECTIVES[objective](),
        kl="monte_carlo",
        n_samples_regularisation=draws,
        diff_mode="forward" if estimator == "forward" else "reverse",
        gradient_estimation_method="score" if estimator == "score" else "pathwise",
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mass warning: the benchmark reports C2ST
        vi.run(torch.zeros(1), epochs, epochs)
    return q, (time.perf_counter() - start) / epochs


BROCK_HOMMES = Path(__file__).parents[1] / "tests" / "data" / "brock_hommes_wavy"


def fit_brock_hommes(objective: str, epochs: int, draws: int = 64) -> tuple[Any, float]:
    """(q, seconds per epoch) of one objective on the Brock-Hommes wavy posterior."""
    import numpy as np

    from gradcal.losses import NegativeLogLikelihood
    from gradcal.models import BrockHommesBeliefs
    from gradcal.posterior_estimators import Constrained

    obs = torch.tensor(np.loadtxt(BROCK_HOMMES / "obs.txt"), dtype=torch.float32)
    low, high = torch.tensor([0.0, 0, 0, -1]), torch.tensor([1.0, 1, 1, 0])
    prior = torch.distributions.Independent(torch.distributions.Uniform(low, high), 1)
    torch.manual_seed(0)  # the flow's initial weights
    q = Constrained(Flow(4, transforms=3, hidden_features=(32, 32)), prior)
    optimizer = torch.optim.Adam(q.parameters(), lr=0.01)
    vi = VI(
        NegativeLogLikelihood(BrockHommesBeliefs.wavy()),
        prior,
        q,
        n_samples_per_epoch=draws,
        n_samples_regularisation=256,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs),
        progress_bar=False,
        seed=0,
        objective=OBJECTIVES[objective](),
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mass warning: the benchmark reports C2ST
        vi.run(obs, epochs, epochs)
    return q, (time.perf_counter() - start) / epochs


def brock_hommes(epochs: int) -> None:
    """C2ST and MMD against the reference draws, every objective side by side."""
    import numpy as np

    reference = torch.tensor(np.loadtxt(BROCK_HOMMES / "posterior_samples.txt")).float()
    floor = split_half_floor(reference)
    print(
        f"Brock-Hommes wavy, {epochs} epochs of 64 draws; MMD^2 noise floor of the reference "
        f"(halves of 500): {floor.mean:.2e} +- {floor.std:.2e}"
    )
    print(f"{'objective':20} {'C2ST':>6} {'MMD^2':>9} {'s/epoch':>8}")
    for objective in OBJECTIVES:
        q, seconds = fit_brock_hommes(objective, epochs)
        with torch.no_grad():
            draws = q.sample(1000)[0]
        score, distance = c2st(draws, reference), mmd_samples(draws, reference)
        print(f"{objective:20} {score:6.3f} {distance:9.2e} {seconds:8.4f}")


def figure(path: str, epochs: int, draws: int) -> None:
    """theta_1 of the bimodal target: exact draws against four fits, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = TARGETS["bimodal"]
    exact = target.exact(20_000, 1)[:, 0]
    fits = [
        ("diagonal", "reverse_kl"),
        ("mixture", "reverse_kl"),
        ("mixture", "renyi(0.2)"),
        ("mixture", "forward_kl"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.0), sharey=True)
    bins = torch.linspace(-2.0, 2.0, 81)
    for ax, (family, objective) in zip(axes, fits, strict=True):
        q, _ = fit(target, family, objective, epochs, draws)
        with torch.no_grad():
            theta = q.sample(20_000)[0][:, 0]
        weight = float((theta > 0).float().mean())
        ax.hist(exact, bins=bins, density=True, color="0.75", label="exact")
        ax.hist(theta, bins=bins, density=True, histtype="step", lw=1.5, label="q")
        ax.set_title(f"{objective}, {family}\nweight of theta_1 > 0: {weight:.2f}", fontsize=9)
        ax.set_xlabel("theta_1")
    axes[0].legend(fontsize=8)
    fig.suptitle("bimodal posterior (true weight of theta_1 > 0: 0.61)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--draws", type=int, default=64)
    parser.add_argument("--flow", action="store_true", help="also reverse KL with an NSF")
    parser.add_argument("--targets", nargs="*", default=list(TARGETS))
    parser.add_argument("--figure", help="only draw the bimodal figure into this PNG file")
    parser.add_argument(
        "--brock-hommes", action="store_true", help="only the Brock-Hommes reference check"
    )
    args = parser.parse_args()
    if args.figure:
        figure(args.figure, args.epochs, args.draws)
        return
    if args.brock_hommes:
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        brock_hommes(args.epochs)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return
    print(
        f"load average before: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}"
    )
    truth = bimodal_weight_of_positive_mode()
    print(f"bimodal target: weight of theta_1 > 0 is {truth:.3f}")
    print(f"{'target':9} {'family':15} {'objective':20} {'C2ST':>6} {'w(+)':>6} {'s/epoch':>8}")
    for name in args.targets:
        target = TARGETS[name]
        exact = target.exact(2000, 1)
        runs = [("diagonal", "reverse_kl", "pathwise")] + (
            [("nsf", "reverse_kl", "pathwise"), ("nsf", "forward_kl", "pathwise")]
            if args.flow
            else []
        )
        runs += [("mixture", objective, "pathwise") for objective in OBJECTIVES]
        runs += [("flow_mix", o, "pathwise") for o in ("reverse_kl", "renyi(0.2)", "forward_kl")]
        if name == "bimodal":
            runs += [("mixture", objective, "score") for objective in OBJECTIVES]
        for family, objective, estimator in runs:
            q, seconds = fit(target, family, objective, args.epochs, args.draws, estimator)
            with torch.no_grad():
                draws = q.sample(2000)[0]
            score = c2st(draws, exact)
            weight = float((draws[:, 0] > 0).float().mean()) if name == "bimodal" else None
            shown = f"{weight:6.3f}" if weight is not None else f"{'':6}"
            label = family if estimator == "pathwise" else f"{family}/{estimator}"
            print(f"{name:9} {label:15} {objective:20} {score:6.3f} {shown} {seconds:8.4f}")
    print("\nseconds per epoch by estimator (bimodal, mixture, 20 epochs each)")
    print(f"{'objective':20} {'pathwise':>9} {'forward':>9} {'score':>9}")
    for objective in OBJECTIVES:
        cells = []
        for estimator in ("pathwise", "forward", "score"):
            _, seconds = fit(TARGETS["bimodal"], "mixture", objective, 20, args.draws, estimator)
            cells.append(f"{seconds:9.4f}")
        print(f"{objective:20} {' '.join(cells)}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
