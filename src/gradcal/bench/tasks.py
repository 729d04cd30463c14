r"""Benchmark tasks: observed data, a prior, a loss, a weight w and a reference posterior.

Every task defines the generalised posterior of the VI convention,
:math:`\pi_w(\theta \mid y) \propto \exp(-\bar l(\theta, y) / w)\, \pi(\theta)`, with
:math:`\bar l` the loss (its expectation over the simulator's randomness when the loss is
simulated), and a reference sample of it made by an exact or asymptotically exact method.
Everything is regenerated deterministically from fixed seeds, except the Brock-Hommes
reference, which is stored (package data, see ``bench/data/README.md``).

Tasks (:data:`TASKS`):

- ``normal``: Normal draws with unknown mean and scale, Normal-inverse-gamma prior; exact
  conjugate posterior. Tests: correlated, skewed scale parameter on a positive support.
- ``random_walk``: the random walk's logit with the energy-distance loss (w = 5); reference by
  importance sampling from the prior with the loss averaged over repeated simulations (ESS
  reported). Tests: discrete randomness (straight-through Bernoulli steps), a simulated loss.
- ``brock_hommes``: Brock-Hommes (wavy set-up, four belief coefficients) with the exact
  likelihood; the 1000 published exact-likelihood posterior draws. Tests: a chaotic
  deterministic skeleton, a box prior, posteriors far narrower than the prior.
- ``bimodal``: 2-d draws with mean (|theta_1|, theta_2); exact posterior with two modes at
  +-|theta_1| about nine posterior sd apart. Tests: multimodality.

Rama Cont and SIR are not tasks: a reference posterior with convergence evidence for their
MMD losses (four parameters, a simulated loss, w = 0.01) needs far more simulations than
the benchmark's run time allows on two cores (see docs/bench.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from gradcal.infer.reference import importance_sampling
from gradcal.losses import EnergyDistanceLoss, NegativeLogLikelihood
from gradcal.models import BrockHommesBeliefs, NormalDraws, RandomWalk
from gradcal.rng import seeded

__all__ = [
    "TASKS",
    "AveragedLoss",
    "FoldedMean",
    "NormalInverseGamma",
    "Reference",
    "Task",
    "bimodal",
    "brock_hommes",
    "make_task",
    "normal",
    "random_walk",
]


@dataclass
class Reference:
    """A sample of the reference posterior: theta (n, D), how it was made, its ESS if weighted."""

    samples: Tensor
    kind: str
    ess: float | None = None
    note: str = ""


@dataclass
class Task:
    """One benchmark problem.

    Attributes:
        name, summary, tests: its name, what it is, what it tests.
        names: parameter names (D,).
        prior: a distribution over theta (D,) with a ``support`` (per coordinate or one).
        supports: the D coordinate supports (what the VI families are mapped onto).
        loss: ``loss(theta (B, D), data) -> (B,)`` (``batched = True``).
        data: the observed data handed to the loss.
        w: the weight of the generalised posterior.
        simulate: theta (B, D) -> summaries (B, K) for neural posterior estimation, and
            ``observed_summary`` (K,) the same summary of the data.
        reference: n, quick -> :class:`Reference` (deterministic).
        lr: Adam's learning rate for VI and SMD on this task.
    """

    name: str
    summary: str
    tests: str
    names: list[str]
    prior: Distribution
    supports: list[constraints.Constraint]
    loss: Any
    data: Any
    w: float
    simulate: Callable[[Tensor], Tensor]
    observed_summary: Tensor
    reference: Callable[[int, bool], Reference]
    lr: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """The number of parameters D."""
        return len(self.names)


# ----------------------------------------------------------------------------- normal


class NormalInverseGamma(Distribution):
    r"""Prior of (mu, sigma): :math:`\sigma^2 \sim \mathrm{InvGamma}(a, b)`,
    :math:`\mu \mid \sigma \sim N(m, \sigma^2 / \kappa)`, as a density over (mu, sigma).

    :math:`\log p(\mu, \sigma) = \log N(\mu; m, \sigma^2/\kappa)
    + \log \mathrm{IG}(\sigma^2; a, b) + \log 2\sigma` (the last term: sigma^2 -> sigma).

    Example:
        >>> prior = NormalInverseGamma(0.0, 1.0, 3.0, 2.0)
        >>> theta = prior.sample((4000,))
        >>> theta.shape, bool((theta[:, 1] > 0).all())
        (torch.Size([4000, 2]), True)
        >>> round(float((theta[:, 1] ** 2).mean()), 1)      # E sigma^2 = b / (a - 1) = 1
        1.0
    """

    arg_constraints: dict[str, constraints.Constraint] = {}  # noqa: RUF012
    has_rsample = False

    def __init__(self, m: float, kappa: float, a: float, b: float):
        self.m, self.kappa, self.a, self.b = float(m), float(kappa), float(a), float(b)
        super().__init__(event_shape=torch.Size([2]), validate_args=False)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, 1)  # sigma > 0 via supports

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        shape = torch.Size(sample_shape)
        precision = torch.distributions.Gamma(self.a, self.b).sample(shape)  # 1 / sigma^2
        sigma = precision.rsqrt()
        mu = self.m + sigma / math.sqrt(self.kappa) * torch.randn(shape)
        return torch.stack((mu, sigma), -1)

    def log_prob(self, value: Tensor) -> Tensor:
        mu, sigma = value[..., 0], value[..., 1]
        var = sigma**2
        safe = torch.where(sigma > 0, var, torch.ones_like(var))
        log_ig = (
            self.a * math.log(self.b)
            - math.lgamma(self.a)
            - (self.a + 1) * safe.log()
            - self.b / safe
        )
        log_n = (
            -0.5 * self.kappa * (mu - self.m) ** 2 / safe
            - 0.5 * (safe / self.kappa).log()
            - 0.5 * math.log(2 * math.pi)
        )
        value = log_n + log_ig + math.log(2.0) + 0.5 * safe.log()
        return torch.where(sigma > 0, value, -math.inf)

    def posterior(self, y: Tensor) -> NormalInverseGamma:
        """The conjugate posterior given draws y (n,)."""
        n, mean = y.numel(), float(y.mean())
        kappa = self.kappa + n
        m = (self.kappa * self.m + n * mean) / kappa
        a = self.a + n / 2
        b = (
            self.b
            + 0.5 * float(((y - mean) ** 2).sum())
            + self.kappa * n * (mean - self.m) ** 2 / (2 * kappa)
        )
        return NormalInverseGamma(m, kappa, a, b)


def _summaries(x: Tensor) -> Tensor:
    """Mean and sd of each series: (B, T) -> (B, 2)."""
    return torch.stack((x.mean(-1), x.std(-1)), -1)


def normal() -> Task:
    """20 draws of N(1, 0.5^2); NIG(m=0, kappa=0.1, a=2, b=1) prior; exact posterior."""
    n = 20
    model = NormalDraws(n)
    with seeded(101):
        (y,) = model.run_and_observe(torch.tensor([1.0, 0.5]))
    prior = NormalInverseGamma(0.0, 0.1, 2.0, 1.0)
    post = prior.posterior(y)

    def reference(size: int, quick: bool) -> Reference:
        with seeded(1):
            return Reference(post.sample((size,)), "exact (conjugate)")

    def simulate(theta: Tensor) -> Tensor:
        with torch.no_grad():
            return _summaries(model.run_and_observe(theta)[0])

    return Task(
        name="normal",
        summary="20 draws of N(mu, sigma^2), Normal-inverse-gamma prior, exact likelihood",
        tests="a correlated two-parameter posterior with a positive, skewed scale; exact answer",
        names=["mu", "sigma"],
        prior=prior,
        supports=[constraints.real, constraints.positive],
        loss=NegativeLogLikelihood(model),
        data=y,
        w=1.0,
        simulate=simulate,
        observed_summary=_summaries(y[None])[0],
        reference=reference,
        lr=0.02,
    )


# ------------------------------------------------------------------------ random walk


class AveragedLoss:
    """The mean of ``repeats`` independent evaluations of a simulated loss: (B, D) -> (B,).

    Estimates :math:`\\bar l(\\theta) = E[l(\\theta, y)]` over the simulator's noise with
    standard error sd(l) / sqrt(repeats).

    Example:
        >>> def noisy(theta, y):
        ...     return theta[:, 0] + torch.randn(len(theta))
        >>> noisy.batched = True
        >>> _ = torch.manual_seed(0)
        >>> AveragedLoss(noisy, 10_000)(torch.zeros(2, 1), None).abs().max() < 0.05
        tensor(True)
    """

    batched = True

    def __init__(self, loss: Any, repeats: int):
        self.loss, self.repeats = loss, repeats

    def __call__(self, theta: Tensor, data: Any) -> Tensor:
        values = self.loss(theta.repeat_interleave(self.repeats, 0), data)
        return values.reshape(theta.shape[0], self.repeats).mean(1)


def random_walk() -> Task:
    """100 steps at logit p = 0.5; N(0, 1) prior; energy distance, w = 5; IS reference.

    w = 5: the averaged loss rises by about 5 from its minimum over 0.3 in logit p, so the
    posterior sd is about 0.2, and the simulation noise of one loss (sd about 3 to 8) stays
    comparable to w rather than swamping it. The reference averages 8 simulations per draw
    (loss sd / w about 0.2 after averaging; the bias this leaves in the log-weights,
    var / (2 w^2) = 0.02, varies little with theta)."""
    model = RandomWalk(100)
    with seeded(102):
        (y,) = model.run_and_observe(torch.tensor([0.5]))
    prior = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(1), torch.ones(1)), 1
    )
    loss = EnergyDistanceLoss(model, y)
    w = 5.0
    repeats = 8

    def reference(size: int, quick: bool) -> Reference:
        n = 500 if quick else 6000
        weighted = importance_sampling(
            AveragedLoss(loss, repeats), prior, y, n, w=w, batch_size=500, seed=3, min_ess=0
        )
        generator = torch.Generator().manual_seed(4)
        return Reference(
            weighted.resample(size, generator),
            "importance sampling from the prior",
            ess=weighted.ess,
            note=f"{n} prior draws, loss averaged over {repeats} simulations each",
        )

    def simulate(theta: Tensor) -> Tensor:
        with torch.no_grad():
            x = model.run_and_observe(theta)[0][..., 0]
            return torch.stack((x[:, -1], x.mean(-1), x.std(-1)), -1)

    return Task(
        name="random_walk",
        summary="random walk (100 steps), logit p, energy distance between positions, w = 5",
        tests="discrete randomness (straight-through Bernoulli steps) and a simulated loss",
        names=["logit_p"],
        prior=prior,
        supports=[constraints.real],
        loss=loss,
        data=y,
        w=w,
        simulate=simulate,
        observed_summary=simulate_observed(y),
        reference=reference,
        lr=0.02,
    )


def simulate_observed(y: Tensor) -> Tensor:
    """The random walk's NPE summaries of an observed path (T + 1, 1): (3,)."""
    x = y[:, 0]
    return torch.stack((x[-1], x.mean(), x.std()))


# ----------------------------------------------------------------------- Brock-Hommes


def _package_text(name: str) -> np.ndarray:
    path = resources.files("gradcal.bench") / "data" / "brock_hommes_wavy" / name
    with resources.as_file(path) as file:
        return np.loadtxt(file)


def brock_hommes() -> Task:
    """Brock-Hommes wavy (beta = 120), uniform box prior, exact likelihood, stored reference."""
    model = BrockHommesBeliefs.wavy()
    y = torch.tensor(_package_text("obs.txt"), dtype=torch.get_default_dtype())
    stored = torch.tensor(_package_text("posterior_samples.txt"), dtype=torch.get_default_dtype())
    low = torch.tensor([0.0, 0.0, 0.0, -1.0])
    prior = torch.distributions.Independent(torch.distributions.Uniform(low, low + 1), 1)

    def reference(size: int, quick: bool) -> Reference:
        return Reference(
            stored[:size],
            "stored exact-likelihood draws (sbi4abm)",
            note=f"{stored.shape[0]} draws published with sbi4abm",
        )

    def simulate(theta: Tensor) -> Tensor:
        with torch.no_grad():
            x = model.run_and_observe(theta)[0]
            return torch.where(torch.isfinite(x), x, 0.0).clamp(-10, 10)

    return Task(
        name="brock_hommes",
        summary="Brock-Hommes (H = 4, beta = 120), 97 prices, (g2, b2, g3, b3), exact likelihood",
        tests="a chaotic skeleton, a box prior, a posterior far narrower than the prior",
        names=["g2", "b2", "g3", "b3"],
        prior=prior,
        supports=[constraints.interval(float(lo), float(lo) + 1.0) for lo in low],
        loss=NegativeLogLikelihood(model),
        data=y,
        w=1.0,
        simulate=simulate,
        observed_summary=y,
        reference=reference,
        lr=0.02,
    )


# ---------------------------------------------------------------------------- bimodal


class FoldedMean:
    r"""Draws :math:`x_t \sim N((|\theta_1|, \theta_2), \sigma^2 I_2)`, t = 1..T, and their
    exact negative log-likelihood (a batched loss): theta (B, 2), y (T, 2) -> (B,).

    Example:
        >>> model = FoldedMean(5)
        >>> y = model.simulate(torch.tensor([[1.0, 0.0]]))[0]
        >>> bool(torch.allclose(model(torch.tensor([[1.0, 0.0]]), y),
        ...                     model(torch.tensor([[-1.0, 0.0]]), y)))
        True
    """

    batched = True
    exact = True

    def __init__(self, n: int, sigma: float = 1.0):
        self.n, self.sigma = n, sigma

    def mean(self, theta: Tensor) -> Tensor:
        """(|theta_1|, theta_2): (B, 2)."""
        return torch.stack((theta[:, 0].abs(), theta[:, 1]), -1)

    def simulate(self, theta: Tensor) -> Tensor:
        """T draws per row: (B, T, 2)."""
        mean = self.mean(theta)[:, None]
        return mean + self.sigma * torch.randn(theta.shape[0], self.n, 2, dtype=theta.dtype)

    def __call__(self, theta: Tensor, y: Tensor) -> Tensor:
        z = (y.to(theta)[None] - self.mean(theta)[:, None]) / self.sigma
        return (0.5 * z**2 + math.log(self.sigma) + 0.5 * math.log(2 * math.pi)).sum((-2, -1))


def bimodal() -> Task:
    r"""FoldedMean with T = 10, truth (1.5, 0.5), prior N(0, 2^2 I): two modes at
    :math:`\theta_1 \approx \pm 1.5`, each with sd about 0.3."""
    n, prior_sd = 10, 2.0
    model = FoldedMean(n)
    with seeded(104):
        y = model.simulate(torch.tensor([[1.5, 0.5]]))[0]
    prior = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(2), prior_sd * torch.ones(2)), 1
    )
    # Per coordinate: N(0, s0^2) prior, mean of n draws with variance 1/n: Gaussian posterior
    # N(mean_n, var_n) of |theta_1| (on theta_1 > 0, mirrored) and of theta_2.
    var_n = 1.0 / (1.0 / prior_sd**2 + n)
    mean_n = var_n * n * y.mean(0)

    def reference(size: int, quick: bool) -> Reference:
        generator = torch.Generator().manual_seed(5)
        sd = math.sqrt(var_n)
        # |theta_1|: N(mean_n[0], var_n) truncated to (0, inf), by the inverse CDF
        normal01 = torch.distributions.Normal(0.0, 1.0)
        low = normal01.cdf(torch.tensor(-float(mean_n[0]) / sd))
        u = low + (1 - low) * torch.rand(size, generator=generator)
        folded = mean_n[0] + sd * normal01.icdf(u.clamp(1e-12, 1 - 1e-12))
        sign = torch.where(torch.rand(size, generator=generator) < 0.5, -1.0, 1.0)
        second = mean_n[1] + sd * torch.randn(size, generator=generator)
        return Reference(torch.stack((sign * folded, second), -1), "exact (two mirrored modes)")

    def simulate(theta: Tensor) -> Tensor:
        with torch.no_grad():
            return model.simulate(theta).mean(1)

    return Task(
        name="bimodal",
        summary="10 draws of N((|theta1|, theta2), I), N(0, 4 I) prior, exact likelihood",
        tests="multimodality: two modes about nine posterior sd apart, equal mass",
        names=["theta1", "theta2"],
        prior=prior,
        supports=[constraints.real, constraints.real],
        loss=model,
        data=y,
        w=1.0,
        simulate=simulate,
        observed_summary=y.mean(0),
        reference=reference,
        lr=0.02,
    )


TASKS: dict[str, Callable[[], Task]] = {
    "normal": normal,
    "random_walk": random_walk,
    "brock_hommes": brock_hommes,
    "bimodal": bimodal,
}


def make_task(name: str) -> Task:
    """The task called ``name`` (one of :data:`TASKS`), built afresh (deterministic)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}.")
    return TASKS[name]()
