r"""The regularisation term of GVI: KL(q || prior), closed form when known, else Monte Carlo.

KL is taken in the space where the prior is defined: a :class:`Constrained` family's
``log_q`` is already a density there. The GVI objective multiplies it by w.

A prior is a :class:`torch.distributions.Distribution` or, as in BlackBIRDS, any object with
``log_prob(theta)`` and ``sample`` (a gradcal family such as ``TrainableGaussian`` works).
Support checks and closed forms need a torch distribution (or a family's
``distribution()``); for other objects ``log_prob`` is taken as given.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from torch import Tensor
from torch.distributions import Distribution

from gradcal.posterior_estimators import as_family, log_prob_stopped

__all__ = [
    "check_prior",
    "closed_form_kl",
    "compute_regularisation_loss",
    "kl_divergence",
    "kl_estimate",
    "kl_from_draws",
    "log_q_on_kept",
    "monte_carlo_kl",
    "prior_dim",
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


def check_prior(prior: Any) -> None:
    """Raise ``TypeError`` unless ``prior`` is a torch distribution or has ``log_prob`` and
    ``sample`` (BlackBIRDS' duck typing)."""
    if isinstance(prior, Distribution):
        return
    missing = [m for m in ("log_prob", "sample") if not callable(getattr(prior, m, None))]
    if missing:
        raise TypeError(
            f"`prior` must be a torch.distributions.Distribution or have log_prob(theta) and "
            f"sample; {type(prior).__name__} lacks {' and '.join(missing)}."
        )


def prior_log_prob(prior: Any, theta: Tensor) -> Tensor:
    """log prior(theta) for theta (n, D): (n,), -inf outside the support (no exception).

    A prior with a batch shape (D,) and no event shape (``Normal(zeros(D), ones(D))``) is
    read as D independent coordinates. A prior that is not a torch distribution gives its
    own ``log_prob`` (summed over the last axis if it returns one value per coordinate).

    Example:
        >>> from gradcal.posterior_estimators import TrainableGaussian
        >>> prior_log_prob(TrainableGaussian([0.0, 0.0], 1.0), torch.zeros(3, 2)).shape
        torch.Size([3])
    """
    if not isinstance(prior, Distribution):
        lp = prior.log_prob(theta)
        return lp.sum(-1) if lp.ndim == theta.ndim else lp
    prior = _without_validation(prior)
    lp = prior.log_prob(theta)
    inside = prior.support.check(theta)
    if lp.ndim == theta.ndim:
        lp, inside = lp.sum(-1), inside.all(-1)
    elif inside.ndim == theta.ndim:
        inside = inside.all(-1)
    return torch.where(inside, lp, -torch.inf)


def prior_dim(prior: Any) -> int | None:
    """The number D of parameters a prior is over, None when it cannot be read.

    A torch distribution: its event shape, else its batch shape (independent coordinates),
    else 1. Another object: its ``dim`` (gradcal families) or ``event_shape``; otherwise
    None (nothing is sampled to find out).

    Example:
        >>> prior_dim(torch.distributions.Normal(torch.zeros(3), 1.0))
        3
    """
    shape_owner = prior if isinstance(prior, Distribution) else None
    if shape_owner is None:
        dim = getattr(prior, "dim", None)
        if isinstance(dim, int) and not isinstance(dim, bool):
            return dim
        if not isinstance(getattr(prior, "event_shape", None), torch.Size):
            return None
        shape_owner = prior
    if shape_owner.event_shape:
        return shape_owner.event_shape[-1]
    batch = getattr(shape_owner, "batch_shape", torch.Size())
    return batch[-1] if batch else 1


def closed_form_kl(q: Any, prior: Any) -> Tensor | None:
    """KL(q || prior) in closed form, differentiable, or None when none is registered.

    ``q`` is a family (:func:`~gradcal.posterior_estimators.as_family` is applied); a prior
    that is a gradcal family is read through its ``distribution()``; a batch-(D,) pair of
    independent coordinates gives the sum over them.

    Example:
        >>> from gradcal.posterior_estimators import DiagonalGaussian
        >>> prior = torch.distributions.Independent(
        ...     torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
        >>> round(closed_form_kl(DiagonalGaussian(torch.ones(2)), prior).item(), 4)
        1.0
        >>> closed_form_kl(DiagonalGaussian(torch.ones(2)), object()) is None
        True
    """
    q = as_family(q)
    if not isinstance(prior, Distribution):
        if not callable(getattr(prior, "distribution", None)):
            return None
        prior = prior.distribution()  # a gradcal family used as the prior
    try:
        kl = torch.distributions.kl_divergence(q.distribution(), prior)
    except NotImplementedError:
        return None
    return kl.sum() if kl.ndim else kl  # a batch-(D,) pair: independent coordinates


def kl_divergence(
    q: Any,
    prior: Any,
    method: Literal["auto", "analytic", "monte_carlo"] = "auto",
    n_samples: int = 10_000,
) -> Tensor:
    r"""KL(q || prior) as a differentiable 0-d tensor.

    Arguments:
        q: a variational family (anything :func:`~gradcal.posterior_estimators.as_family`
            takes).
        prior: a torch distribution over theta (D,), or any object with ``log_prob``
            and ``sample`` (then Monte Carlo unless it is a gradcal family).
        method: ``"analytic"`` (a registered closed form, else ``ValueError``),
            ``"monte_carlo"`` ($\frac1n \sum_i \log q(\theta_i) - \log \pi(\theta_i)$,
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
    sticking_the_landing: bool = False,
) -> tuple[Tensor, int]:
    """:func:`kl_divergence` and the number of Monte Carlo draws it dropped (0 in closed form).

    ``sticking_the_landing``: see :func:`monte_carlo_kl` (no effect on a closed form).

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
    check_prior(prior)
    q = as_family(q)
    d = prior_dim(prior)
    if d is not None and q.dim != d:
        raise ValueError(f"the prior is over {d} parameter(s) but q draws {q.dim}.")
    if method != "monte_carlo":
        kl = closed_form_kl(q, prior)
        if kl is not None:
            return kl, 0
        if method == "analytic":
            raise ValueError(
                f"no closed-form KL is registered between {type(q).__name__} and "
                f"{type(prior).__name__}: use method='monte_carlo'."
            )
    return monte_carlo_kl(q, prior, n_samples, sticking_the_landing)


def monte_carlo_kl(
    q: Any, prior: Distribution, n_samples: int = 10_000, sticking_the_landing: bool = False
) -> tuple[Tensor, int]:
    r"""The Monte Carlo KL(q || prior) over the draws where it is finite, and the number dropped.

    $\frac1m \sum_{i \in K} \log q(\theta_i) - \log \pi(\theta_i)$ over the set K
    (of size m) of the n reparameterised draws whose log q and log prior are finite. A draw
    can land on a bound of the prior's support when a constrained family's map saturates
    in floating point (an affine sigmoid beyond |u| of about 17 in float32), where
    log prior is -inf; such draws are dropped and counted, as failed simulations are. With
    no finite draw the result is NaN.

    With ``sticking_the_landing`` log q is taken at q's parameters held fixed
    (:func:`~gradcal.posterior_estimators.log_prob_stopped`): the same value, and a gradient
    without the score term $\nabla_\phi \log q_\phi(\theta)$, whose mean is zero
    (Roeder, Wu & Duvenaud 2017, Sticking the landing); its variance vanishes as q
    approaches the prior. q needs ``log_prob``.

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
    return kl_from_draws(q, prior, theta, log_q, sticking_the_landing)


def kl_from_draws(
    q: Any, prior: Any, theta: Tensor, log_q: Tensor, sticking_the_landing: bool = False
) -> tuple[Tensor, int]:
    r"""The Monte Carlo KL(q || prior) over given reparameterised draws of q, and the number
    dropped (see :func:`monte_carlo_kl`, which draws them).

    Arguments:
        q: the family the draws come from (its ``log_prob`` is used when a draw is
            dropped or with ``sticking_the_landing``: see :func:`log_q_on_kept`).
        prior: the prior (``log_prob``).
        theta: (m, D) draws of q, with their graph into q's parameters.
        log_q: (m,) log q at the draws, with its graph.
        sticking_the_landing: take log q at q's parameters held fixed.

    Example:
        >>> from gradcal.posterior_estimators import DiagonalGaussian
        >>> q = DiagonalGaussian(torch.zeros(1))
        >>> prior = torch.distributions.Normal(torch.zeros(1), torch.ones(1))
        >>> kl, dropped = kl_from_draws(q, prior, *q.sample(50))
        >>> round(kl.item(), 6), dropped     # q = prior: every term is 0
        (0.0, 0)
    """
    theta = theta[:, None] if theta.ndim == 1 else theta
    log_prior = prior_log_prob(prior, theta)
    with torch.no_grad():
        ok = torch.isfinite(log_q) & torch.isfinite(log_prior)
    log_q_kept, ok = log_q_on_kept(q, theta, log_q, ok, sticking_the_landing)
    n_ok = int(ok.sum())
    if n_ok == 0:  # nothing to average: NaN, without a gradient to apply
        return torch.full((), math.nan, dtype=log_q.dtype, device=log_q.device), len(ok)
    # The prior is evaluated again on the kept draws only, so that no gradient of it at a
    # bound (inf times a zero weight) can turn the gradient into NaN.
    log_prior_kept = log_prior if n_ok == len(ok) else prior_log_prob(prior, theta[ok])
    kl = (log_q_kept - log_prior_kept).mean()
    return kl, len(ok) - n_ok


def log_q_on_kept(
    q: Any, theta: Tensor, log_q: Tensor, keep: Tensor, stopped: bool = False
) -> tuple[Tensor, Tensor]:
    r"""log q at the kept draws (m,), its graph built on those draws alone, and the mask.

    Dropping a draw after building log q over all draws does not drop its gradient: the
    draw still sends a zero upstream gradient through its local derivative, and where that
    is not finite (log q = -inf at the edge of a bounded support: d log x / dx = inf at
    x = 0) 0 * inf = NaN reaches q's parameters. So when a dropped draw's log q is not
    finite, log q is evaluated again on ``theta[keep]`` only (pathwise: theta keeps its
    graph to q) by ``q.log_prob``; with ``stopped`` always, by
    :func:`~gradcal.posterior_estimators.log_prob_stopped`. A kept draw where that value is
    not finite is dropped too, the mask narrowed. Otherwise (every dropped draw's log q
    finite) ``log_q[keep]`` is returned: sampling's own values, which a log_prob that
    inverts a transform can miss by nats in float32 (a wide :class:`Constrained` family near
    its bounds). A family without ``log_prob`` (``NotImplementedError``) also gets
    ``log_q[keep]``, NaN-safe only when the dropped draws' log q has finite derivatives.

    Arguments:
        q: the family the draws come from.
        theta: (n, D) draws of q, with their graph into q's parameters.
        log_q: (n,) log q at the draws, with its graph (from sampling).
        keep: (n,) bool, the draws kept so far.
        stopped: log q at q's parameters held fixed.

    Returns:
        log q (m,) at the m draws of the returned mask (n,), m <= keep.sum().

    Example:
        >>> from gradcal.posterior_estimators import DiagonalGaussian
        >>> q = DiagonalGaussian(torch.zeros(1))
        >>> theta, log_q = q.sample(3)
        >>> kept, keep = log_q_on_kept(q, theta, log_q, torch.tensor([True, False, True]))
        >>> kept.shape, keep.tolist()
        (torch.Size([2]), [True, False, True])
    """
    if not stopped and not bool((~keep & ~torch.isfinite(log_q.detach())).any()):
        return (log_q if bool(keep.all()) else log_q[keep]), keep
    if not bool(keep.any()):
        return log_q[keep], keep
    try:
        kept = log_prob_stopped(q, theta[keep]) if stopped else q.log_prob(theta[keep])
    except NotImplementedError:
        if stopped:
            raise
        return log_q[keep], keep
    finite = torch.isfinite(kept.detach())
    if bool(finite.all()):
        return kept, keep
    keep = keep.clone()
    keep[keep.clone()] = finite
    return log_q_on_kept(q, theta, log_q, keep, stopped)


def compute_regularisation_loss(posterior_estimator: Any, prior: Any, n_samples: int) -> Tensor:
    r"""BlackBIRDS' name: the Monte Carlo estimate of KL(posterior_estimator || prior).

    $\frac1n \sum_i \log q(\theta_i) - \log \pi(\theta_i)$ over n reparameterised
    draws of q; ``prior`` may be any object with ``log_prob`` and ``sample``.

    Example:
        >>> from gradcal.posterior_estimators import TrainableGaussian
        >>> q = TrainableGaussian([0.0], 1.0)
        >>> compute_regularisation_loss(q, TrainableGaussian([0.0], 1.0), 100).item()
        0.0
    """
    return kl_divergence(posterior_estimator, prior, "monte_carlo", n_samples)
