r"""Gradient-free reference posteriors, to check gradient-based answers against.

Importance sampling targets the generalised posterior
:math:`\pi_w(\theta \mid y) \propto \exp(-l(\theta, y) / w)\, \pi(\theta)` (the VI
convention) with draws from the prior or a proposal, batched over draws.
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

from gradcal.gradients import BatchedLoss, Batching
from gradcal.regularisation import prior_log_prob

__all__ = ["ImportanceSamples", "importance_sampling"]

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
        r"""Kish's effective sample size :math:`(\sum w)^2 / \sum w^2`."""
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
) -> ImportanceSamples:
    r"""Importance sampling of :math:`\exp(-l(\theta, y)/w)\,\pi(\theta)`.

    Weights are :math:`\exp(-l/w)\,\pi(\theta)/g(\theta)` for draws from the proposal g (the
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
    with torch.no_grad():
        for start in range(0, n_samples, batch_size):
            theta = source.sample((min(batch_size, n_samples - start),))
            theta = theta[:, None] if theta.ndim == 1 else theta
            losses = batched(theta, data)
            log_w = -losses / w
            if proposal is not None:
                log_w = log_w + prior_log_prob(prior, theta) - prior_log_prob(proposal, theta)
            thetas.append(theta)
            log_weights.append(torch.where(torch.isfinite(log_w), log_w, -math.inf))
    result = ImportanceSamples(torch.cat(thetas), torch.cat(log_weights))
    if result.ess < min_ess:
        warnings.warn(
            f"importance sampling: effective sample size {result.ess:.1f} of {n_samples} "
            "draws; the reference is unreliable (use more draws or a closer proposal).",
            stacklevel=2,
        )
    logger.info("importance sampling: ESS %.1f of %d draws", result.ess, n_samples)
    return result
