r"""Gradient-free reference posteriors, to check gradient-based answers against.

Importance sampling targets the generalised posterior
$\pi_w(\theta \mid y) \propto \exp(-l(\theta, y) / w)\, \pi(\theta)$ (the VI
convention) with draws from the prior or a proposal, batched over draws. Rejection ABC
keeps the prior draws whose loss (a distance) falls below a quantile of all the losses.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradcal.distributed import all_gather_objects, rank, shard, world_size
from gradcal.gradients import BatchedLoss, Batching
from gradcal.priors import distribution_device
from gradcal.problems import GradcalWarning
from gradcal.regularisation import prior_log_prob
from gradcal.rng import seeded

__all__ = ["ImportanceSamples", "RejectionSamples", "importance_sampling", "rejection_abc"]

logger = logging.getLogger("gradcal")


@dataclass
class ImportanceSamples:
    """Weighted draws: theta (n, D), log_weights (n,) (unnormalised), and their ESS."""

    theta: Tensor
    log_weights: Tensor

    @property
    def weights(self) -> Tensor:
        """Normalised weights (n,)."""
        return torch.softmax(self.log_weights, 0)

    @property
    def ess(self) -> float:
        r"""Kish's effective sample size $(\sum w)^2 / \sum w^2$."""
        w = self.weights
        return float(1.0 / (w**2).sum()) if torch.isfinite(w).all() else 0.0

    def resample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws (n, D) from the weighted sample, multinomially with replacement."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.theta[idx]


def importance_sampling(
    loss: Callable[[Tensor, Any], Tensor],
    prior: torch.distributions.Distribution,
    data: Any,
    n_samples: int,
    w: float = 1.0,
    proposal: torch.distributions.Distribution | None = None,
    batch_size: int = 1000,
    batching: Batching = "auto",
    min_ess: float = 100.0,
    seed: int | None = None,
) -> ImportanceSamples:
    r"""Importance sampling of $\exp(-l(\theta, y)/w)\,\pi(\theta)$.

    Weights are $\exp(-l/w)\,\pi(\theta)/g(\theta)$ for draws from the proposal g (the
    prior by default, when the ratio is 1). Draws with a non-finite loss get weight zero.
    A warning is issued when the effective sample size falls below ``min_ess``.

    Arguments:
        loss: ``loss(theta, data)`` as for :class:`~gradcal.infer.vi.VI`.
        prior: the prior distribution.
        data: observed data.
        n_samples: number of draws.
        w: the weight of the generalised posterior.
        proposal: draws come from here when given (must cover the posterior).
        batch_size: draws simulated per batched call.
        batching: how the loss is batched (:class:`~gradcal.gradients.BatchedLoss`).
        min_ess: warn below this effective sample size.
        seed: draw from a private random stream seeded with this (the caller's is left as
            it was); None uses the global stream.

    Example:
        >>> prior = torch.distributions.Independent(
        ...     torch.distributions.Normal(torch.zeros(1), torch.ones(1)), 1)
        >>> def loss(theta, y):           # Gaussian likelihood of y = 1 with unit noise
        ...     return 0.5 * ((theta - y) ** 2).sum(-1)
        >>> loss.batched = True
        >>> s = importance_sampling(loss, prior, torch.tensor([1.0]), 20_000)
        >>> round(float((s.weights[:, None] * s.theta).sum()), 1)   # posterior mean 1/2
        0.5
    """
    if w <= 0:
        raise ValueError(f"`w` must be > 0, got {w}.")
    source = proposal or prior
    batched = BatchedLoss(loss, batching)
    thetas, log_weights = [], []
    if n_samples < world_size():  # the same test on every rank: all raise together
        raise ValueError(f"`n_samples` ({n_samples}) must be at least the number of ranks.")
    n_local = shard(n_samples)[1]  # under torchrun: this rank's share of the draws
    stream = None if seed is None else seed + rank()
    with seeded(stream, distribution_device(source)), torch.no_grad():
        for start in range(0, n_local, batch_size):
            theta = source.sample((min(batch_size, n_local - start),))
            theta = theta[:, None] if theta.ndim == 1 else theta
            losses = batched(theta, data)
            log_w = -losses / w
            if proposal is not None:
                log_w = log_w + prior_log_prob(prior, theta) - prior_log_prob(proposal, theta)
            thetas.append(theta)
            log_weights.append(torch.where(torch.isfinite(log_w), log_w, -math.inf))
    theta, log_w = torch.cat(thetas), torch.cat(log_weights)
    if world_size() > 1:  # every rank gets every rank's draws
        parts = all_gather_objects((theta.cpu(), log_w.cpu()))
        theta = torch.cat([p[0] for p in parts]).to(theta)
        log_w = torch.cat([p[1] for p in parts]).to(log_w)
    result = ImportanceSamples(theta, log_w)
    if result.ess < min_ess:
        warnings.warn(
            f"importance sampling: effective sample size {result.ess:.1f} of {n_samples} "
            "draws; the reference is unreliable (use more draws or a closer proposal).",
            GradcalWarning,
            stacklevel=2,
        )
    logger.info("importance sampling: ESS %.1f of %d draws", result.ess, n_samples)
    return result


# --- rejection ABC --------------------------------------------------------------------


@dataclass
class RejectionSamples:
    """Rejection ABC's output.

    theta (m, D): the accepted prior draws; threshold: the largest accepted loss;
    losses (n,): the loss of every draw (NaN/inf where the simulation failed);
    accepted (n,): which draws were kept.
    """

    theta: Tensor
    threshold: float
    losses: Tensor
    accepted: Tensor

    @property
    def acceptance_rate(self) -> float:
        """The fraction of the draws that were accepted."""
        return float(self.accepted.float().mean()) if self.accepted.numel() else 0.0


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
    return value


def rejection_abc(
    loss: Callable[[Tensor, Any], Tensor],
    prior: torch.distributions.Distribution,
    data: Any,
    n_samples: int,
    quantile: float = 0.01,
    batch_size: int = 1000,
    batching: Batching = "auto",
    *,
    seed: int | None = None,
) -> RejectionSamples:
    r"""Rejection ABC: keep the prior draws with the lowest losses.

    Draws $\theta_i \sim \pi$, i = 1..n, and accepts
    $\{\theta_i : l(\theta_i, y) \le \epsilon\}$ where $\epsilon$ is the
    ``quantile`` of the n losses (the $\lceil q n \rceil$-th smallest, so that
    $\lceil q n \rceil$ draws are kept, more on ties). The accepted draws sample
    $\pi(\theta \mid l(\theta, y) \le \epsilon)$, which tends to the posterior
    given the summary in the loss as $\epsilon \to 0$. A draw whose loss is NaN or
    infinite counts as the worst loss and is never accepted (with a warning when this leaves
    fewer than $\lceil q n \rceil$ accepted).

    Arguments:
        loss: ``loss(theta, data)``, a distance, as for :class:`~gradcal.infer.vi.VI`.
        prior: the prior distribution.
        data: observed data.
        n_samples: number n of prior draws.
        quantile: the fraction q in (0, 1] of the draws to accept.
        batch_size: draws simulated per batched call.
        batching: how the loss is batched (:class:`~gradcal.gradients.BatchedLoss`).
        seed: draw from a private random stream seeded with this (the caller's is left as
            it was).

    Returns:
        :class:`RejectionSamples`: accepted theta (m, D), the threshold, all n losses (n,)
        and the acceptance mask (n,).

    Example:
        >>> prior = torch.distributions.Independent(
        ...     torch.distributions.Normal(torch.zeros(1), torch.ones(1)), 1)
        >>> def loss(theta, y):           # |theta + noise - y|: y = 1 observed, unit noise
        ...     return (theta[:, 0] + torch.randn(len(theta)) - y).abs()
        >>> loss.batched = True
        >>> s = rejection_abc(loss, prior, torch.tensor(1.0), 100_000, quantile=0.02)
        >>> s.theta.shape, round(float(s.theta.mean()), 1)     # posterior mean 1/2
        (torch.Size([2000, 1]), 0.5)
    """
    _positive_int("n_samples", n_samples)
    _positive_int("batch_size", batch_size)
    if isinstance(quantile, bool) or not isinstance(quantile, int | float):
        raise ValueError(f"`quantile` must be a number in (0, 1], got {quantile!r}.")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"`quantile` must be in (0, 1], got {quantile}.")
    if not isinstance(prior, torch.distributions.Distribution):
        raise TypeError(
            f"`prior` must be a torch.distributions.Distribution, got {type(prior).__name__}."
        )
    batched = BatchedLoss(loss, batching)
    thetas, all_losses = [], []
    with seeded(seed, distribution_device(prior)), torch.no_grad():
        for start in range(0, n_samples, batch_size):
            theta = prior.sample((min(batch_size, n_samples - start),))
            theta = theta[:, None] if theta.ndim == 1 else theta
            thetas.append(theta)
            all_losses.append(batched(theta, data).detach().reshape(-1))
    theta, losses = torch.cat(thetas), torch.cat(all_losses)
    ranked = torch.where(torch.isfinite(losses), losses, math.inf)
    k = min(n_samples, math.ceil(quantile * n_samples - 1e-9))
    threshold = float(torch.kthvalue(ranked.cpu(), k).values)
    accepted = torch.isfinite(ranked) & (ranked <= threshold)
    n_accepted = int(accepted.sum())
    if n_accepted < k:
        warnings.warn(
            f"rejection ABC: only {n_accepted} of the {k} draws to accept have a finite loss "
            f"({int((~torch.isfinite(losses)).sum())} of {n_samples} failed).",
            GradcalWarning,
            stacklevel=2,
        )
    if not math.isfinite(threshold):
        finite = ranked[torch.isfinite(ranked)]
        threshold = float(finite.max()) if finite.numel() else math.inf
    logger.info(
        "rejection ABC: accepted %d of %d draws, threshold %.4g", n_accepted, n_samples, threshold
    )
    return RejectionSamples(theta[accepted], threshold, losses, accepted)
