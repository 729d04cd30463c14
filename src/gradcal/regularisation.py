r"""The regularisation term of GVI: KL(q || prior), closed form when known, else Monte Carlo.

KL is taken in the space where the prior is defined: a :class:`Constrained` family's
``log_q`` is already a density there. The GVI objective multiplies it by w.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import Tensor
from torch.distributions import Distribution

from gradcal.posterior_estimators import as_family

__all__ = [
    "compute_regularisation_loss",
    "kl_divergence",
    "kl_estimate",
    "monte_carlo_kl",
    "prior_log_prob",
]


def _without_validation(d: Distribution) -> Distribution:
    """A shallow copy of ``d`` (and of the distributions inside it) that skips validation."""
    d = copy.copy(d)
    d._validate_args = False
    for name, value in vars(d).items():
        if isinstance(value, Distribution):
            setattr(d, name, _without_validation(value))
    return d


def prior_log_prob(prior: Distribution, theta: Tensor) -> Tensor:
    """log prior(theta) for theta (n, D): (n,), -inf outside the support (no exception).

    A prior with a batch shape (D,) and no event shape (``Normal(zeros(D), ones(D))``) is
    read as D independent coordinates.
    """
    prior = _without_validation(prior)
    lp = prior.log_prob(theta)
    inside = prior.support.check(theta)
    if lp.ndim == theta.ndim:
        lp, inside = lp.sum(-1), inside.all(-1)
    elif inside.ndim == theta.ndim:
        inside = inside.all(-1)
    return torch.where(inside, lp, -torch.inf)


def _prior_dim(prior: Distribution) -> int:
    """The number D of parameters a prior is over (event shape, else batch shape)."""
    if prior.event_shape:
        return prior.event_shape[-1]
    return prior.batch_shape[-1] if prior.batch_shape else 1


def _analytic(q: Any, prior: Distribution) -> Tensor | None:
    try:
        kl = torch.distributions.kl_divergence(q.distribution(), prior)
    except NotImplementedError:
        return None
    return kl.sum() if kl.ndim else kl  # a batch-(D,) pair: independent coordinates


def kl_divergence(
    q: Any,
    prior: Distribution,
    method: Literal["auto", "analytic", "monte_carlo"] = "auto",
    n_samples: int = 10_000,
) -> Tensor:
    r"""KL(q || prior) as a differentiable 0-d tensor.

    Arguments:
        q: a variational family (anything :func:`~gradcal.posterior_estimators.as_family`
            takes).
        prior: a torch distribution over theta (D,).
        method: ``"analytic"`` (a registered closed form, else ``ValueError``),
            ``"monte_carlo"`` (:math:`\frac1n \sum_i \log q(\theta_i) - \log \pi(\theta_i)`,
            reparameterised; draws where a term is not finite are dropped, see
            :func:`monte_carlo_kl`), or ``"auto"`` (analytic when registered).
        n_samples: draws for the Monte Carlo estimate.

    Example:
        >>> from gradcal.posterior_estimators import DiagonalGaussian
        >>> prior = torch.distributions.Independent(
        ...     torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
        >>> round(kl_divergence(DiagonalGaussian(torch.ones(2)), prior).item(), 4)  # |mu|^2/2
        1.0
    """
    return kl_estimate(q, prior, method, n_samples)[0]


def kl_estimate(
    q: Any,
    prior: Distribution,
    method: Literal["auto", "analytic", "monte_carlo"] = "auto",
    n_samples: int = 10_000,
) -> tuple[Tensor, int]:
    """:func:`kl_divergence` and the number of Monte Carlo draws it dropped (0 in closed form).

    Example:
        >>> prior = torch.distributions.Independent(
        ...     torch.distributions.Uniform(torch.zeros(1), torch.ones(1)), 1)
        >>> q = torch.distributions.Independent(
        ...     torch.distributions.Uniform(torch.zeros(1), torch.ones(1)), 1)
        >>> kl, dropped = kl_estimate(q, prior, "monte_carlo", 10)
        >>> kl.item(), dropped
        (0.0, 0)
    """
    if method not in ("auto", "analytic", "monte_carlo"):
        raise ValueError(f"`method` must be 'auto', 'analytic' or 'monte_carlo', got {method!r}.")
    q = as_family(q)
    if q.dim != _prior_dim(prior):
        raise ValueError(
            f"the prior is over {_prior_dim(prior)} parameter(s) but q draws {q.dim}."
        )
    if method != "monte_carlo":
        kl = _analytic(q, prior)
        if kl is not None:
            return kl, 0
        if method == "analytic":
            raise ValueError(
                f"no closed-form KL is registered between {type(q).__name__} and "
                f"{type(prior).__name__}: use method='monte_carlo'."
            )
    return monte_carlo_kl(q, prior, n_samples)


def monte_carlo_kl(q: Any, prior: Distribution, n_samples: int = 10_000) -> tuple[Tensor, int]:
    r"""The Monte Carlo KL(q || prior) over the draws where it is finite, and the number dropped.

    :math:`\frac1m \sum_{i \in K} \log q(\theta_i) - \log \pi(\theta_i)` over the set K
    (of size m) of the n reparameterised draws whose log q and log prior are finite. A draw
    can land on a bound of the prior's support when a constrained family's map saturates
    in floating point (an affine sigmoid beyond |u| of about 17 in float32), where
    log prior is -inf; such draws are dropped and counted, as failed simulations are. With
    no finite draw the result is NaN.

    Example:
        >>> from gradcal.posterior_estimators import DiagonalGaussian
        >>> prior = torch.distributions.Independent(
        ...     torch.distributions.Normal(torch.zeros(1), torch.ones(1)), 1)
        >>> kl, dropped = monte_carlo_kl(DiagonalGaussian(torch.zeros(1)), prior, 100)
        >>> round(kl.item(), 6), dropped     # q = prior: every term is 0
        (0.0, 0)
    """
    q = as_family(q)
    theta, log_q = q.sample(n_samples)
    with torch.no_grad():
        ok = torch.isfinite(log_q) & torch.isfinite(prior_log_prob(prior, theta))
    # The prior is evaluated again on the kept draws only, so that no gradient of it at a
    # bound (inf times a zero weight) can turn the gradient into NaN.
    kept = theta[ok]
    kl = (log_q[ok] - prior_log_prob(prior, kept)).mean()
    return kl, int((~ok).sum())


def compute_regularisation_loss(posterior_estimator: Any, prior: Distribution, n_samples: int):
    """BlackBIRDS' name: the Monte Carlo estimate of KL(posterior_estimator || prior)."""
    return kl_divergence(posterior_estimator, prior, "monte_carlo", n_samples)
