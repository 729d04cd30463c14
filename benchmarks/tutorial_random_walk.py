"""The seed tutorial's random walk: posterior accuracy and stopping epoch over seeds.

    OMP_NUM_THREADS=1 python benchmarks/tutorial_random_walk.py [--seeds 10]
        [--method pathwise|score] [--rules blackbirds smoothed] [--no-blackbirds]

The set-up of the tutorial "Bayesian inference for differentiable ABMs with variational
inference" (section 2), written as its users write it against BlackBIRDS 1.3: a Bernoulli
random walk of 100 positions at p = 0.2, one straight-through Gumbel-softmax draw per step
(tau 0.5); the loss is the energy distance between simulated and observed increments (its
constant observed-observed term left out); q = N(mu, clamp(sigma^2, 0.01, 1e6)^2) over logit
p, starting at mu = 0, sigma = 1; prior N(logit 0.9, 1); Adam lr 5e-3; 30 draws per epoch;
w = 1; 1000 epochs, early stopping after 100 without improvement; ``torch.manual_seed(seed)``
before the fit; the best state is loaded afterwards, as the tutorial does.

Reference: importance sampling from the prior (10,000 draws, w = 1, target prior x
exp(-loss), one loss evaluation per draw as in the tutorial), resampled to 10,000 draws.
Metric: energy distance (``gradcal.discrepancies.energy_distance``, unstandardised) between
10,000 draws of the fitted q and the reference draws. For each rule of gradcal's ``VI``
(``stopping=``), and for BlackBIRDS when ``blackbirds`` is importable in the same
environment (``pip install blackbirds==1.3``; it writes its estimator files into a temporary
folder), one row per seed and the median and quartiles of the distance and of the epoch at
which the run stopped.

The walk draws all its steps in one Gumbel-softmax call (the loss sees only increments):
the same law of values and straight-through gradients as a step-by-step loop, and cheap
enough for many seeds on a CPU. Expect minutes per run and package on one thread.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch

from gradcal.discrepancies import energy_distance
from gradcal.infer.reference import importance_sampling

N_TIMESTEPS = 100
PRIOR = torch.distributions.Normal(torch.logit(torch.tensor(0.9)), 1.0)


def walk_increments(logit_p: torch.Tensor, n_timesteps: int, tau: float = 0.5) -> torch.Tensor:
    """Increments (n_timesteps - 1,) of +-1 steps, up with probability sigmoid(logit_p)."""
    p = torch.sigmoid(logit_p).reshape(1)
    log_probs = torch.stack([p, 1 - p], -1).log().expand(n_timesteps - 1, 2)
    up = torch.nn.functional.gumbel_softmax(log_probs, tau=tau, hard=True)[:, 0]
    return 2 * up - 1


def loss(logit_p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Energy distance of simulated to observed increments, less its constant y-y term."""
    x = walk_increments(logit_p, N_TIMESTEPS)[:, None]
    dy = y.diff()[:, None]
    n = x.shape[0]
    within = (x - x.T).abs().sum() / (n * (n - 1))
    return 2 * (dy - x.T).abs().mean() - within


class Gaussian(torch.nn.Module):
    """The tutorial's family: N(mu, s^2) with s = clamp(sigma^2, 0.01, 1e6)."""

    def __init__(self) -> None:
        super().__init__()
        self.mu = torch.nn.Parameter(torch.zeros(1))
        self.sigma = torch.nn.Parameter(torch.ones(1))

    def normal(self) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.mu, torch.clamp(self.sigma**2, 1e-2, 1e6))

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.normal().rsample((n,))
        return theta, self.normal().log_prob(theta)

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        return self.normal().log_prob(theta)


def data_and_reference(n: int = 10_000) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Observed positions (100,), n reference draws (n, 1) and the importance ESS."""
    torch.manual_seed(0)  # one two-way draw per step, as the tutorial simulates its data
    p = torch.tensor([0.2])
    steps = [
        torch.nn.functional.gumbel_softmax(torch.cat([p, 1 - p]).log(), tau=0.5, hard=True)[0]
        for _ in range(N_TIMESTEPS - 1)
    ]
    y = torch.cat([torch.zeros(1), (2 * torch.stack(steps) - 1).cumsum(0)])
    samples = importance_sampling(loss, PRIOR, y, n, w=1.0, seed=0)
    return y, samples.resample(n, torch.Generator().manual_seed(0)), samples.ess


def fit(
    vi_class: Callable, y: torch.Tensor, seed: int, method: str, n_epochs: int, **options
) -> tuple[Gaussian, int]:
    """One tutorial run; returns q in its best state and the number of epochs run."""
    torch.manual_seed(seed)
    q = Gaussian()
    vi = vi_class(
        loss,
        posterior_estimator=q,
        prior=PRIOR,
        optimizer=torch.optim.Adam(q.parameters(), lr=5e-3),
        w=1,
        n_samples_per_epoch=30,
        gradient_estimation_method=method,
        progress_bar=False,
        **options,
    )
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:  # BlackBIRDS writes *_estimator.pt here
        os.chdir(folder)
        try:
            vi.run(y, n_epochs=n_epochs, max_epochs_without_improvement=100)
        finally:
            os.chdir(here)
    q.load_state_dict(vi.best_estimator_state_dict)
    return q, len(vi.losses_hist["total"])


def quartiles(values: list[float]) -> str:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return f"{med:.4g} [{q1:.4g}, {q3:.4g}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--method", choices=["pathwise", "score"], default="pathwise")
    parser.add_argument("--rules", nargs="+", default=["blackbirds", "smoothed"])
    parser.add_argument("--epochs", type=int, default=1000, help="at most (the tutorial's 1000)")
    parser.add_argument("--no-blackbirds", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    y, reference, ess = data_and_reference()
    print(
        f"reference: ESS {ess:.0f} of 10000; mean {reference.mean():.3f} sd {reference.std():.3f}"
    )
    arms: dict[str, tuple[Callable, dict]] = {}
    if not args.no_blackbirds and importlib.util.find_spec("blackbirds") is not None:
        arms["BlackBIRDS"] = (importlib.import_module("blackbirds.infer.vi").VI, {})
    from gradcal.infer.vi import VI

    for rule in args.rules:
        arms[f"gradcal {rule}"] = (VI, {"stopping": rule})
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in arms}
    print(f"{args.method}; per seed: energy distance / epochs run")
    print("seed  " + "  ".join(f"{name:>24}" for name in arms))
    for seed in range(args.seeds):
        row = []
        for name, (vi_class, options) in arms.items():
            q, epochs = fit(vi_class, y, seed, args.method, args.epochs, **options)
            torch.manual_seed(10_000 + seed)
            with torch.no_grad():
                draws = q.sample(10_000)[0].reshape(-1, 1)
            distance = float(energy_distance(draws, reference, chunk_size=1000))
            results[name].append((distance, epochs))
            row.append(f"{distance:>15.4f} / {epochs:>5d}")
        print(f"{seed:>4}  " + "  ".join(row), flush=True)
    print("median [quartiles]:")
    for name, values in results.items():
        distances, epochs = zip(*values, strict=True)
        print(
            f"  {name:>20}: energy distance {quartiles(list(distances))}; "
            f"epochs run {quartiles(list(epochs))}"
        )


if __name__ == "__main__":
    main()
