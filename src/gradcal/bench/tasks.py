r"""Benchmark tasks: observed data, a prior, a loss, a weight w and a reference posterior.

Every task defines the generalised posterior of the VI convention,
$\pi_w(\theta \mid y) \propto \exp(-\bar l(\theta, y) / w)\, \pi(\theta)$, with
$\bar l$ the loss (its expectation over the simulator's randomness when the loss is
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
- ``rama_cont``: Cont's threshold model, 50 agents, 100 steps, (log10 sigma, log10 eta)
  free (gamma_0, gamma_1 held fixed: they only set the first thresholds), MMD loss between
  returns. Tests: discrete agent decisions (straight-through orders, exact Bernoulli
  resets) through a long horizon, a ridge (sigma / eta sets the return scale).
- ``sir``: SIR on a 40-node small-world graph, 30 steps, (log10 beta, log10 gamma) free,
  MMD loss on the infected and recovered counts. Tests: discrete randomness on a graph
  (straight-through Gumbel-softmax infections), a very noisy simulated loss.

The Rama Cont and SIR references are importance samples from the prior with each draw's
loss averaged over 32 simulations, stored as package data (``bench/data/<task>/``) with
their convergence evidence (ESS, and the agreement of two independent halves), and
regenerated deterministically by :func:`simulated_reference`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from gradcal.infer.reference import ImportanceSamples, importance_sampling
from gradcal.losses import EnergyDistanceLoss, MMDLoss, NegativeLogLikelihood
from gradcal.models import SIR, BrockHommesBeliefs, NormalDraws, RamaCont, RandomWalk
from gradcal.models.fixed import FixedParameters
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
    "rama_cont",
    "random_walk",
    "simulated_reference",
    "sir",
    "stored_reference",
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
    r"""Prior of (mu, sigma): $\sigma^2 \sim \mathrm{InvGamma}(a, b)$,
    $\mu \mid \sigma \sim N(m, \sigma^2 / \kappa)$, as a density over (mu, sigma).

    $\log p(\mu, \sigma) = \log N(\mu; m, \sigma^2/\kappa)
    + \log \mathrm{IG}(\sigma^2; a, b) + \log 2\sigma$ (the last term: sigma^2 -> sigma).

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

    Estimates $\\bar l(\\theta) = E[l(\\theta, y)]$ over the simulator's noise with
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


def _package_text(name: str, folder: str = "brock_hommes_wavy") -> np.ndarray:
    path = resources.files("gradcal.bench") / "data" / folder / name
    with resources.as_file(path) as file:
        return np.loadtxt(file, ndmin=2) if folder != "brock_hommes_wavy" else np.loadtxt(file)


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
    r"""Draws $x_t \sim N((|\theta_1|, \theta_2), \sigma^2 I_2)$, t = 1..T, and their
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
    $\theta_1 \approx \pm 1.5$, each with sd about 0.3."""
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


# ------------------------------------------------- simulated references (Rama Cont, SIR)

REPEATS = 32  # simulations averaged per importance-sampling draw of a simulated reference


def simulated_reference(
    task: Task, n: int, size: int, seed: int, batch_size: int = 250
) -> tuple[Tensor, dict[str, Any]]:
    """An importance-sampling reference of a task with a simulated loss, and its evidence.

    Two independent halves of n / 2 prior draws each (seeds ``seed`` and ``seed + 1``),
    each draw's loss averaged over :data:`REPEATS` simulations; ``size`` draws (size, D)
    resampled from the pooled weights (seed ``seed + 2``). The evidence: the pooled and
    per-half ESS, the weighted means and sds, and ``half_gap``, the largest difference of
    the two halves' means in pooled sd, to be compared with its Monte Carlo scale
    ``half_gap_scale`` = sqrt(1 / ESS_1 + 1 / ESS_2) (a gap of a few scales or less: the
    halves agree). Deterministic given the seeds (same torch build).

    Example:
        >>> task = normal()                      # any task works; the exact one is cheap
        >>> draws, evidence = simulated_reference(task, 400, 50, seed=0)
        >>> draws.shape, evidence["n"], evidence["ess"] > 10
        (torch.Size([50, 2]), 400, True)
    """
    if n < 2 or size < 1:
        raise ValueError(f"`n` must be >= 2 and `size` >= 1, got n={n}, size={size}.")
    loss = AveragedLoss(task.loss, REPEATS if task.extra.get("simulated") else 1)
    halves = [
        importance_sampling(
            loss,
            task.prior,
            task.data,
            n // 2,
            w=task.w,
            batch_size=batch_size,
            seed=seed + k,
            min_ess=0,
        )
        for k in range(2)
    ]
    theta = torch.cat([h.theta for h in halves])
    log_w = torch.cat([h.log_weights for h in halves])
    pooled = ImportanceSamples(theta, log_w)
    weights = pooled.weights[:, None]
    mean = (weights * theta).sum(0)
    sd = ((weights * (theta - mean) ** 2).sum(0)).sqrt()
    means = [(h.weights[:, None] * h.theta).sum(0) for h in halves]
    evidence = {
        "n": 2 * (n // 2),
        "repeats": loss.repeats,
        "w": task.w,
        "seed": seed,
        "ess": round(pooled.ess, 1),
        "ess_halves": [round(h.ess, 1) for h in halves],
        "mean": [round(float(x), 4) for x in mean],
        "sd": [round(float(x), 4) for x in sd],
        "half_gap": round(float(((means[0] - means[1]).abs() / sd).max()), 3),
        "half_gap_scale": round(math.sqrt(sum(1 / max(h.ess, 1e-9) for h in halves)), 3),
    }
    generator = torch.Generator().manual_seed(seed + 2)
    return pooled.resample(size, generator), evidence


def stored_reference(folder: str) -> tuple[Tensor, dict[str, Any]]:
    """The stored reference draws (n, D) of ``bench/data/<folder>/`` and their evidence."""
    samples = torch.tensor(_package_text("reference.txt", folder), dtype=torch.get_default_dtype())
    path = resources.files("gradcal.bench") / "data" / folder / "evidence.json"
    return samples, json.loads(path.read_text())


def _stored(folder: str) -> Callable[[int, bool], Reference]:
    def reference(size: int, quick: bool) -> Reference:
        samples, evidence = stored_reference(folder)
        return Reference(
            samples[:size],
            "importance sampling from the prior (stored)",
            ess=evidence["ess"],
            note=(
                f"{evidence['n']} prior draws, loss averaged over {evidence['repeats']} "
                f"simulations; halves' ESS {evidence['ess_halves']}, mean gap "
                f"{evidence['half_gap']} sd (MC scale {evidence['half_gap_scale']})"
            ),
        )

    return reference


def _normal_prior(loc: list[float], scale: list[float]) -> Distribution:
    return torch.distributions.Independent(
        torch.distributions.Normal(torch.tensor(loc), torch.tensor(scale)), 1
    )


def _cont_summaries(r: Tensor) -> Tensor:
    """NPE summaries of returns (B, T): sd, mean |r|, max |r|, lag-1 autocorrelation of
    |r|: (B, 4)."""
    a = r.abs()
    c = a - a.mean(-1, keepdim=True)
    acf = (c[:, 1:] * c[:, :-1]).mean(-1) / (c.pow(2).mean(-1) + 1e-12)
    return torch.stack((r.std(-1), a.mean(-1), a.amax(-1), acf), -1)


def rama_cont() -> Task:
    """Cont's model, 50 agents, 100 steps, (log10 sigma, log10 eta) free; MMD, w = 0.01.

    gamma_0 = 1 and gamma_1 = 0.5 (log10 0 and log10 0.5) are held fixed: they set only the
    first thresholds, which the resets overwrite, so the data carry almost nothing on them.
    Truth (log10 1, log10 0.7), prior N(0, 0.3^2) on each. One simulated MMD has sd about
    0.015 near the truth; averaged over 32 simulations, sd / w is about 0.27.
    """
    model = FixedParameters(
        RamaCont(n_agents=50, n_timesteps=100, s=0.1, sigmoid_k=5.0, log10_params=True),
        {0: 0.0, 1: math.log10(0.5)},
    )
    with seeded(105):
        (y,) = model.run_and_observe(torch.tensor([0.0, math.log10(0.7)]))
    loss = MMDLoss(model, y)

    def simulate(theta: Tensor) -> Tensor:
        with torch.no_grad():
            return _cont_summaries(model.run_and_observe(theta)[0][:, 1:])

    return Task(
        name="rama_cont",
        summary="Cont's threshold model, 50 agents, 100 steps, (log10 sigma, log10 eta), "
        "MMD between returns, w = 0.01",
        tests="discrete agent decisions through a long horizon (100 straight-through steps), "
        "a ridge, a noisy simulated loss",
        names=["log10_sigma", "log10_eta"],
        prior=_normal_prior([0.0, 0.0], [0.3, 0.3]),
        supports=[constraints.real, constraints.real],
        loss=loss,
        data=y,
        w=0.01,
        simulate=simulate,
        observed_summary=_cont_summaries(y[None, 1:])[0],
        reference=_stored("rama_cont"),
        lr=0.02,
        extra={"simulated": True},
    )


def sir() -> Task:
    """SIR on a 40-node Watts-Strogatz graph (k = 4, p = 0.1), 30 steps; MMD, w = 0.2.

    log10 f = -1 is held fixed (about 4 nodes infected at first); (log10 beta, log10 gamma)
    are free, truth (-0.7, -1), prior N((-1, -1), 0.4^2 I). The soft cap of the log10
    parameters at 0 has hardness 20 (it moves values below -0.3 by less than 2e-4). One
    simulated MMD has sd 0.1 to 0.6; averaged over 32 simulations, sd / w is about 0.35.
    """
    import networkx

    graph = networkx.watts_strogatz_graph(40, 4, 0.1, seed=0)
    model = FixedParameters(SIR(graph, 30, cap_hardness=20.0), {0: -1.0})
    with seeded(106):
        y = model.run_and_observe(torch.tensor([-0.7, -1.0]))
    loss = MMDLoss(model, y)

    def simulate(theta: Tensor) -> Tensor:
        with torch.no_grad():
            infected, recovered = model.run_and_observe(theta)
            return torch.cat((infected, recovered), -1) / 40.0

    return Task(
        name="sir",
        summary="SIR on a 40-node small-world graph, 30 steps, (log10 beta, log10 gamma), "
        "MMD on infected and recovered counts, w = 0.2",
        tests="discrete randomness on a graph (straight-through Gumbel-softmax infections), "
        "a very noisy simulated loss",
        names=["log10_beta", "log10_gamma"],
        prior=_normal_prior([-1.0, -1.0], [0.4, 0.4]),
        supports=[constraints.real, constraints.real],
        loss=loss,
        data=y,
        w=0.2,
        simulate=simulate,
        observed_summary=torch.cat(y) / 40.0,
        reference=_stored("sir"),
        lr=0.02,
        extra={"simulated": True},
    )


TASKS: dict[str, Callable[[], Task]] = {
    "normal": normal,
    "random_walk": random_walk,
    "brock_hommes": brock_hommes,
    "bimodal": bimodal,
    "rama_cont": rama_cont,
    "sir": sir,
}


def make_task(name: str) -> Task:
    """The task called ``name`` (one of :data:`TASKS`), built afresh (deterministic)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}.")
    return TASKS[name]()
