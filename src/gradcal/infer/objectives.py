r"""VI objectives: which divergence between q and the generalised posterior VI minimises.

The target is the generalised posterior $p(\theta) \propto \tilde p(\theta) =
\exp(-l(\theta, y) / w)\, \pi(\theta)$, and every draw theta_i of q carries the log
importance weight $\log w_i = -l_i / w + \log \pi(\theta_i) - \log q(\theta_i)$.
Each objective is a small class; values are reported in the loss's units (times w), so
that reverse KL's total is BlackBIRDS' $E_q[l] + w\,\mathrm{KL}(q \| \pi)$.

- :class:`ReverseKL` (default): $E_q[l] + w\,\mathrm{KL}(q \| \pi)
  = w\,\mathrm{KL}(q \| p) - w \log Z$. Mode-seeking. VI forms it from the gradient
  estimator and its KL term (today's behaviour); ``sticking_the_landing=True`` drops the
  zero-mean score term from the Monte Carlo KL (Roeder et al. 2017).
- :class:`ImportanceWeighted`: $-w\, E[\log \frac1K \sum_k w_k]$ over groups of K
  draws (Burda et al. 2016); K = 1 is reverse KL, larger K covers more mass.
- :class:`Renyi`: $-\frac{w}{1-\alpha} E[\log \frac1K \sum_k w_k^{1-\alpha}]$, alpha in
  (0, 1) (Li & Turner 2016); alpha -> 1 is reverse KL, small alpha is mass-covering.
- :class:`ForwardKL`: $w\,\mathrm{KL}(p \| q)$ by self-normalised importance sampling
  from q; its gradient $-\sum_i \hat w_i \nabla_\phi \log q_\phi(\theta_i)$ needs no
  simulator gradient. Mass-covering.

The weighted objectives (all but reverse KL) log the importance-sampling effective sample
size $(\sum_i w_i)^2 / \sum_i w_i^2$ of each epoch's draws (``ess`` in the history).
``doubly_reparameterised=True`` (the default) gives :class:`ImportanceWeighted` and
:class:`Renyi` the DReG estimator of Tucker et al. (2019): log q at fixed parameters, and
per-draw weights $\hat w_k(\alpha + (1 - \alpha)\hat w_k)$ (alpha = 0 for
importance-weighted), $\hat w = \mathrm{softmax}((1-\alpha)\log w)$ within a group.
A family whose parameters log q cannot hold fixed (an object that is no torch module) would
make DReG biased (the score term weighted by theta-dependent weights): such a family gets the
plain reparameterised gradient, with a warning. A dropped draw never enters q's gradient:
log q is evaluated again on the kept draws only (see
:func:`~gradcal.regularisation.log_q_on_kept`).

Supported gradient estimators: every objective works with all three (pathwise reverse and
forward mode, score). With the score estimator the simulator is run without gradients and
the importance-weighted and Renyi bounds take the score-function gradient of the bound
$f = \frac1c \log \frac1K \sum_k w_k^c$ (c = 1 - alpha; c = 1 importance-weighted)
of each group, $\sum_k (f - f_{-k}) \nabla_\phi \log q(\theta_k) - \sum_k \hat w_k
\nabla_\phi \log q(\theta_k)$, with VIMCO's leave-one-out control variate (Mnih & Rezende
2016): $f_{-k}$ is f with $\log w_k$ replaced by the mean of the group's other
log weights, which does not depend on $\theta_k$, so the estimate stays unbiased. A
group with one kept draw (every group when K = 1) takes the mean of the other groups'
bounds as its baseline instead; ``score_baseline=None`` uses no control variate. DReG
(``doubly_reparameterised``) shapes the pathwise gradient only and is ignored by the score
estimator. Forward KL never differentiates the simulator (it runs it without gradients),
so it works with any of them and the choice makes no difference.

References:
    Burda, Grosse & Salakhutdinov (2016), Importance weighted autoencoders, ICLR.
    Li & Turner (2016), Renyi divergence variational inference, NeurIPS.
    Mnih & Rezende (2016), Variational inference for Monte Carlo objectives, ICML.
    Roeder, Wu & Duvenaud (2017), Sticking the landing, NeurIPS.
    Tucker, Lawson, Gu & Maddison (2019), Doubly reparameterized gradient estimators for
    Monte Carlo objectives, ICLR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradcal.diagnostics.psis import ESS_MISSES_MASS, KHAT_BAD, importance_ess
from gradcal.distributed import (
    all_gather_objects,
    all_reduce_sum,
    reduce_epoch,
    shard,
    world_size,
)
from gradcal.gradients import (
    BatchedLoss,
    EpochEstimate,
    PathwiseReverse,
    Score,
    loss_and_gradient,
)
from gradcal.posterior_estimators import log_prob_stopped
from gradcal.problems import warn_problem
from gradcal.regularisation import log_q_on_kept, prior_log_prob

__all__ = [
    "ESS_MISSES_MASS",
    "OBJECTIVES",
    "ForwardKL",
    "ImportanceWeighted",
    "Objective",
    "ObjectiveEstimate",
    "Renyi",
    "ReverseKL",
    "WeightedObjective",
    "importance_ess",
    "make_objective",
    "mass_warning",
]

KHAT_MISSES_MASS = KHAT_BAD  # PSIS k-hat at and above which q misses mass (one definition)


@dataclass
class ObjectiveEstimate(EpochEstimate):
    """An epoch of a weighted objective: the mean loss and drops, its value and the IS ESS.

    ``total`` is the objective's estimate in the loss's units (see each class); ``ess`` is
    the effective sample size of the epoch's kept draws as importance samples of the target.
    """

    total: float = math.nan
    ess: float = math.nan


class ReverseKL:
    """Reverse KL, today's objective: E_q[l] + w KL(q || prior), with any gradient estimator.

    VI forms it from the estimator's surrogate and its own KL term (closed form where
    registered, else Monte Carlo).

    Arguments:
        sticking_the_landing: in the Monte Carlo KL, take log q at fixed parameters, so the
            score term $\\nabla_\\phi \\log q_\\phi(\\theta)$ (mean zero) is left out
            (Roeder et al. 2017): unbiased, and its variance vanishes as q approaches the
            target. No effect on a closed-form KL.
    """

    name: ClassVar[str] = "reverse_kl"
    uses_kl_term: ClassVar[bool] = True

    def __init__(self, sticking_the_landing: bool = False):
        if not isinstance(sticking_the_landing, bool):
            raise TypeError(
                f"`sticking_the_landing` must be True or False, got {sticking_the_landing!r}."
            )
        self.sticking_the_landing = sticking_the_landing

    def check(self, method: str, diff_mode: str) -> None:
        """Every estimator works with reverse KL."""

    def __repr__(self) -> str:
        return f"ReverseKL(sticking_the_landing={self.sticking_the_landing})"


@dataclass
class _Draws:
    """One rank's draws of an epoch: losses (n,), kept mask (n,), log weights (n,) with graph
    (-inf where dropped) and, for forward KL and the score estimator, log q at the stopped
    draws (n,) (0 where dropped); ``baseline`` is the score estimator's control variate
    ("leave_one_out" or None), ``score`` whether the draws are for it, ``stopped`` whether
    the log weights' log q holds q's parameters fixed (DReG)."""

    losses: Tensor | None = None
    valid: Tensor | None = None
    log_w: Tensor | None = None
    log_q: Tensor | None = None
    score: bool = False
    baseline: str | None = None
    stopped: bool = False


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
    return value


class WeightedObjective:
    """Base of the objectives built on per-draw log importance weights (all but reverse KL).

    Subclasses give :meth:`surrogate`; :meth:`__call__` draws, simulates, drops failed
    draws (non-finite loss, gradient, log q or log prior), reduces over ranks, backpropagates
    the surrogate into the family (``.grad`` accumulates) and returns an
    :class:`ObjectiveEstimate`.
    """

    name: ClassVar[str]
    uses_kl_term: ClassVar[bool] = False
    needs_simulator_gradient: ClassVar[bool] = True
    group_size: int = 1  # draws per term (K)
    stopped_log_q: bool = False  # log q at fixed parameters (DReG)

    def check(self, method: str, diff_mode: str) -> None:
        """Every estimator works: pathwise (reverse or forward mode) or score."""

    def surrogate(
        self, log_w: Tensor, valid: Tensor, stopped: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        """(this rank's sum of term surrogates to backpropagate, sum of term values).

        ``log_w`` (T, K) with graph, -inf where dropped; ``valid`` (T, K); ``stopped``:
        whether log_w's log q holds q's parameters fixed (DReG's surrogate), by default
        ``self.stopped_log_q``.
        """
        raise NotImplementedError

    def score_surrogate(
        self,
        log_w: Tensor,
        log_q: Tensor,
        valid: Tensor,
        baseline: Tensor | None,
        leave_one_out: bool = True,
    ) -> Tensor:
        """The score estimator's surrogate (sum over this rank's terms) to backpropagate.

        ``log_w`` (T, K) with graph through log q only (draws held fixed), -inf where
        dropped; ``log_q`` (T, K) with graph, any finite value where dropped; ``valid``
        (T, K); ``baseline`` (T,): the control variate of a term with a single kept draw
        (the other terms' mean) or None; ``leave_one_out``: use control variates at all.
        """
        raise NotImplementedError

    # --- the epoch ---------------------------------------------------------------------

    def _draws(
        self,
        family: Any,
        loss: BatchedLoss,
        data: Any,
        m: int,
        prior: Any,
        w: float,
        estimator: Any,
    ) -> _Draws:
        if not self.needs_simulator_gradient:
            with torch.no_grad():
                theta, _ = family.sample(m)
                theta = theta[:, None] if theta.ndim == 1 else theta
                losses = loss(theta, data)
                log_prior = prior_log_prob(prior, theta)
            log_q = family.log_prob(theta)  # at the stopped draws: the forward-KL gradient
            valid = torch.isfinite(losses) & torch.isfinite(log_prior) & torch.isfinite(log_q)
            log_w = torch.where(valid, -losses / w + log_prior - log_q.detach(), -math.inf)
            if not bool(valid.all()):  # the graph on the kept draws only (no 0 * inf)
                kept_log_q = family.log_prob(theta[valid])
                index = (valid.nonzero()[:, 0],)
                log_q = torch.zeros_like(losses).index_put(index, kept_log_q.to(losses.dtype))
            return _Draws(losses, valid, log_w, log_q)
        if isinstance(estimator, Score):
            return self._score_draws(family, loss, data, m, prior, w, estimator.baseline)
        theta, log_q = family.sample(m)
        theta = theta[:, None] if theta.ndim == 1 else theta
        diff_mode = getattr(estimator, "diff_mode", "reverse")
        chunk = getattr(estimator, "chunk_size", None)
        losses, grad = loss_and_gradient(loss, theta, data, diff_mode, chunk)
        with torch.no_grad():
            log_prior = prior_log_prob(prior, theta)
        valid = (
            torch.isfinite(losses)
            & torch.isfinite(grad).all(-1)
            & torch.isfinite(log_prior)
            & torch.isfinite(log_q.detach())
        )
        stopped = self.stopped_log_q and bool(valid.any()) and self._holds_fixed(family, theta)
        # log q on the kept draws only: no dropped draw's 0 * inf reaches q's gradient
        log_q_kept, valid = log_q_on_kept(family, theta, log_q, valid, stopped)
        kept = theta[valid]
        # value l_i, gradient (dl/dtheta_i) dtheta_i/dphi: the simulator's pathwise gradient
        path_loss = losses[valid] + (grad[valid] * (kept - kept.detach())).sum(-1)
        kept_log_w = -path_loss / w + prior_log_prob(prior, kept) - log_q_kept
        log_w = torch.full_like(losses, -math.inf)
        log_w = log_w.index_put((valid.nonzero()[:, 0],), kept_log_w.to(log_w.dtype))
        return _Draws(losses, valid, log_w, stopped=stopped)

    def _holds_fixed(self, family: Any, theta: Tensor) -> bool:
        """Whether log q at fixed parameters really holds every trainable tensor of
        ``family`` fixed: evaluated at one detached draw of theta (n, D) it must carry no
        graph. If not (a family that is no torch module), DReG's weights would multiply the
        score term, whose weighted mean is not zero: warn, and use the plain gradient."""
        with torch.enable_grad():
            held = not log_prob_stopped(family, theta[:1].detach()).requires_grad
        if not held:
            name = type(family).__name__
            named = "" if name.startswith("_") else f" ({name})"  # not an internal adapter
            warn_problem(
                f"the variational family{named} cannot hold its parameters fixed in "
                "log_prob (they are not torch module parameters or buffers), so the "
                f"doubly-reparameterised gradient would be biased: objective {self.name!r} "
                "uses the plain reparameterised gradient instead (unbiased, without DReG's "
                "variance reduction). Make the family a torch.nn.Module holding its tensors "
                "as parameters, or pass doubly_reparameterised=False to silence this."
            )
        return held

    def _score_draws(
        self,
        family: Any,
        loss: BatchedLoss,
        data: Any,
        m: int,
        prior: Any,
        w: float,
        baseline: str | None,
    ) -> _Draws:
        """Draws held fixed, the simulator run without gradients; log q with its graph."""
        with torch.no_grad():
            theta, _ = family.sample(m)
            theta = theta[:, None] if theta.ndim == 1 else theta
            losses = loss(theta, data)
            log_prior = prior_log_prob(prior, theta)
            valid = (
                torch.isfinite(losses)
                & torch.isfinite(log_prior)
                & torch.isfinite(family.log_prob(theta))
            )
        index = (valid.nonzero()[:, 0],)
        kept_log_q = family.log_prob(theta[valid])  # graph only on kept draws
        log_q = torch.zeros_like(losses).index_put(index, kept_log_q.to(losses.dtype))
        kept_log_w = -losses[valid] / w + log_prior[valid] - kept_log_q
        log_w = torch.full_like(losses, -math.inf).index_put(index, kept_log_w.to(losses.dtype))
        return _Draws(losses, valid, log_w, log_q, score=True, baseline=baseline)

    def __call__(
        self,
        family: Any,
        loss: BatchedLoss,
        data: Any,
        n: int,
        prior: Any,
        w: float,
        estimator: Any = None,
    ) -> ObjectiveEstimate:
        """One epoch: gradients of the objective (times w) into the family; the estimate.

        Arguments:
            family: the variational family (the gradcal protocol).
            loss: the batched loss, theta (B, D) -> (B,).
            data: the observed data.
            n: draws of this epoch over all ranks (a multiple of K times the ranks).
            prior: the prior (``log_prob``).
            w: the weight w > 0 of the target exp(-l / w) prior.
            estimator: the pathwise estimator (its ``diff_mode`` and ``chunk_size``).
        """
        if not w > 0:
            raise ValueError(f"objective {self.name!r} needs `w` > 0, got {w!r}.")
        k, ranks = self.group_size, world_size()
        if n % (k * ranks):
            raise ValueError(
                f"`n_samples_per_epoch` ({n}) must be a multiple of k ({k}) times the number "
                f"of ranks ({ranks}) for objective {self.name!r}."
            )
        estimator = PathwiseReverse() if estimator is None else estimator
        draws, error = _Draws(), None
        try:
            draws = self._draws(family, loss, data, shard(n)[1], prior, w, estimator)
        except Exception as caught:  # reported to every rank before any other collective
            error = caught
        local = torch.zeros(3, dtype=torch.float64)
        if error is None:
            valid = draws.valid
            local[0] = float(valid.sum())
            local[1] = float(draws.losses[valid].sum()) if bool(valid.any()) else 0.0
            local[2] = float((~valid).sum())
        totals = reduce_epoch(local, error)
        n_valid, loss_sum, dropped = int(totals[0]), float(totals[1]), int(totals[2])
        mean_loss = loss_sum / n_valid if n_valid else math.nan
        if n_valid == 0:
            return ObjectiveEstimate(mean_loss, 0, dropped)
        # every rank's kept log weights (B floats): the ESS and forward KL's normaliser
        kept = draws.log_w.detach()[draws.valid].double().cpu()
        all_log_w = torch.cat(all_gather_objects(kept))
        total = self._backward(draws, all_log_w, w)
        return ObjectiveEstimate(
            mean_loss, n_valid, dropped, total=total, ess=importance_ess(all_log_w)
        )

    def _backward(self, draws: _Draws, all_log_w: Tensor, w: float) -> float:
        """Backpropagate -w * (mean term) over all ranks' terms; the objective's value."""
        k = self.group_size
        log_w = draws.log_w.reshape(-1, k)
        valid = draws.valid.reshape(-1, k)
        has = valid.any(-1)
        local = torch.zeros(2, dtype=torch.float64)
        surrogate = values = None
        if bool(has.any()):
            values = self.term_values(log_w[has].detach(), valid[has])
            local[0], local[1] = float(has.sum()), float(values.sum())
        n_terms, value_sum = (float(x) for x in all_reduce_sum(local))
        if values is not None and draws.score:
            # a term's baseline: the mean of every other term, on every rank
            others = (value_sum - values) / (n_terms - 1) if n_terms > 1 else None
            surrogate = self.score_surrogate(
                log_w[has],
                draws.log_q.reshape(-1, k)[has],
                valid[has],
                None if others is None else others.to(log_w.dtype),
                draws.baseline == "leave_one_out",
            )
        elif values is not None:
            surrogate, _ = self.surrogate(log_w[has], valid[has], draws.stopped)
        if surrogate is not None and surrogate.requires_grad:
            (-w * surrogate / n_terms).backward()
        return -w * value_sum / n_terms

    def term_values(self, log_w: Tensor, valid: Tensor) -> Tensor:
        """Each term's value (T,) from log weights (T, K) (-inf where dropped), no graph."""
        raise NotImplementedError


def _group_log_mean(log_w: Tensor, valid: Tensor) -> Tensor:
    """log of the mean of exp(log_w) over each row's kept entries: (T,)."""
    return torch.logsumexp(log_w, -1) - valid.sum(-1).to(log_w.dtype).log()


def _leave_one_out_bounds(log_w: Tensor, valid: Tensor, c: float) -> Tensor:
    r"""VIMCO's $f_{-k}$ (T, K): the group bound $\frac1c \log \frac1n \sum_j
    w_j^c$ over its n kept draws with $\log w_k$ replaced by the mean of the other kept
    log weights (no graph; entries of dropped draws or of groups with one kept draw are
    meaningless).

    Example:
        >>> lw = torch.log(torch.tensor([[1.0, 4.0]]))
        >>> _leave_one_out_bounds(lw, torch.ones(1, 2, dtype=torch.bool), 1.0).exp()
        tensor([[4., 1.]])
    """
    k = log_w.shape[-1]
    finite = torch.where(valid, log_w, 0.0)
    n = valid.sum(-1, keepdim=True).to(log_w.dtype)
    others = (finite.sum(-1, keepdim=True) - finite) / (n - 1).clamp_min(1.0)  # (T, K)
    eye = torch.eye(k, dtype=torch.bool, device=log_w.device)
    replaced = torch.where(eye, others[..., None], log_w[:, None, :])  # (T, K, K)
    return (torch.logsumexp(c * replaced, -1) - n.log()) / c


class ImportanceWeighted(WeightedObjective):
    r"""Importance-weighted bound: minimise $-w\,E[\log \frac1K \sum_{k=1}^K w_k]$.

    The B draws of an epoch form B / K groups of K; the bound tightens towards log Z as K
    grows and the optimal q spreads to cover the target's mass. K = 1 is reverse KL.

    Arguments:
        k: draws per group K (n_samples_per_epoch must be a multiple of K).
        doubly_reparameterised: the DReG gradient (Tucker et al. 2019): lower variance,
            same expectation. A family whose parameters cannot be held fixed (no torch
            module) gets the plain reparameterised gradient instead, with a warning.

    Example:
        >>> objective = ImportanceWeighted(k=4)
        >>> objective.name, objective.group_size
        ('importance_weighted', 4)
    """

    name: ClassVar[str] = "importance_weighted"

    def __init__(self, k: int = 8, doubly_reparameterised: bool = True):
        self.group_size = _check_positive_int(k, "k")
        self.stopped_log_q = bool(doubly_reparameterised)

    @property
    def exponent(self) -> float:
        """1 - alpha of the group weights softmax((1 - alpha) log w): 1 here."""
        return 1.0

    def term_values(self, log_w: Tensor, valid: Tensor) -> Tensor:
        c = self.exponent
        return (_group_log_mean(c * log_w, valid) / c).detach().double()

    def score_surrogate(
        self,
        log_w: Tensor,
        log_q: Tensor,
        valid: Tensor,
        baseline: Tensor | None,
        leave_one_out: bool = True,
    ) -> Tensor:
        c = self.exponent
        bound = _group_log_mean(c * log_w, valid) / c  # (T,), graph through log q at fixed draws
        f = bound.detach()
        signal = f[:, None].expand_as(log_w)
        if leave_one_out:
            n_kept = valid.sum(-1)
            signal = f[:, None] - _leave_one_out_bounds(log_w.detach(), valid, c)
            single = (n_kept == 1)[:, None]
            fallback = f[:, None] - (0.0 if baseline is None else baseline[:, None])
            signal = torch.where(single, fallback, signal)
        kept_log_q = torch.where(valid, log_q, 0.0)
        return (torch.where(valid, signal, 0.0) * kept_log_q).sum() + bound.sum()

    def surrogate(
        self, log_w: Tensor, valid: Tensor, stopped: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        c = self.exponent
        value = (_group_log_mean(c * log_w, valid) / c).sum().detach()
        if not (self.stopped_log_q if stopped is None else stopped):
            return (_group_log_mean(c * log_w, valid) / c).sum(), value
        weights = torch.softmax(c * log_w.detach(), -1)
        coefficient = weights * ((1 - c) + c * weights)  # alpha + (1 - alpha) w_hat
        finite = torch.where(valid, log_w, 0.0)
        return (coefficient * finite).sum(), value

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(k={self.group_size}, "
            f"doubly_reparameterised={self.stopped_log_q})"
        )


class Renyi(ImportanceWeighted):
    r"""Renyi bound: minimise $-\frac{w}{1-\alpha} E[\log \frac1K \sum_k w_k^{1-\alpha}]$.

    For alpha in (0, 1) the bound lies between the importance-weighted bound (alpha = 0)
    and reverse KL (alpha -> 1); small alpha covers more mass (Li & Turner 2016).

    Arguments:
        alpha: in (0, 1).
        k: draws per group K (n_samples_per_epoch must be a multiple of K).
        doubly_reparameterised: the DReG gradient, weights
            $\hat w_k(\alpha + (1-\alpha)\hat w_k)$.

    Example:
        >>> Renyi(alpha=0.5, k=4).exponent
        0.5
    """

    name: ClassVar[str] = "renyi"

    def __init__(self, alpha: float = 0.5, k: int = 8, doubly_reparameterised: bool = True):
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
            raise ValueError(f"`alpha` must be a number in (0, 1), got {alpha!r}.")
        super().__init__(k, doubly_reparameterised)
        self.alpha = float(alpha)

    @property
    def exponent(self) -> float:
        return 1.0 - self.alpha

    def __repr__(self) -> str:
        return (
            f"Renyi(alpha={self.alpha}, k={self.group_size}, "
            f"doubly_reparameterised={self.stopped_log_q})"
        )


class ForwardKL(WeightedObjective):
    r"""Forward KL(p || q) by self-normalised importance sampling from q.

    With $\hat w_i = w_i / \sum_j w_j$ over all B draws of an epoch, the gradient is
    $-\sum_i \hat w_i \nabla_\phi \log q_\phi(\theta_i)$ at the draws held fixed, so
    the simulator is run without gradients. The reported total is w times
    $\sum_i \hat w_i \log(B \hat w_i)$, the SNIS estimate of KL(p || q) (>= 0, 0 when
    every weight is equal). The family needs ``log_prob``. Reliable once the ESS is not
    tiny: start from a broad q (near the prior) or anneal w.

    Example:
        >>> ForwardKL().needs_simulator_gradient
        False
    """

    name: ClassVar[str] = "forward_kl"
    needs_simulator_gradient: ClassVar[bool] = False

    def check(self, method: str, diff_mode: str) -> None:
        """Any estimator: the simulator is never differentiated."""

    def _backward(self, draws: _Draws, all_log_w: Tensor, w: float) -> float:
        log_norm = torch.logsumexp(all_log_w, 0)
        weights = torch.exp(draws.log_w.detach().double() - log_norm).to(draws.log_q.dtype)
        valid = draws.valid
        if bool(valid.any()):
            (-w * (weights[valid] * draws.log_q[valid]).sum()).backward()
        normalised = all_log_w - log_norm
        return w * float((normalised.exp() * (normalised + math.log(all_log_w.numel()))).sum())

    def __repr__(self) -> str:
        return "ForwardKL()"


Objective = ReverseKL | WeightedObjective

OBJECTIVES: dict[str, type] = {
    "reverse_kl": ReverseKL,
    "importance_weighted": ImportanceWeighted,
    "renyi": Renyi,
    "forward_kl": ForwardKL,
}


def make_objective(objective: str | Objective = "reverse_kl", **options: Any) -> Objective:
    """The objective named ``objective`` (a key of :data:`OBJECTIVES`) built with ``options``,
    or an objective instance as is.

    Example:
        >>> make_objective("renyi", alpha=0.3, k=4)
        Renyi(alpha=0.3, k=4, doubly_reparameterised=True)
    """
    if isinstance(objective, ReverseKL | WeightedObjective):
        if options:
            raise ValueError("give options only with an objective's name, not an instance.")
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(
            f"`objective` must be one of {sorted(OBJECTIVES)} or an objective instance, "
            f"got {objective!r}."
        )
    try:
        return OBJECTIVES[objective](**options)
    except TypeError as error:  # an option this objective does not take
        raise ValueError(f"objective {objective!r}: {error}") from None


def mass_warning(
    khat: float | None = None, ess_fraction: float | None = None, objective: str = "reverse_kl"
) -> str | None:
    """A plain-words warning when k-hat or the IS effective sample size shows that q misses
    mass of the posterior, with what to try; None when neither does.

    q misses mass when PSIS k-hat >= 0.7 (the importance weights p / q have no finite
    variance) or when the ESS is below a tenth of the draws: a region of the posterior,
    often a whole mode, where q puts almost nothing.

    Arguments:
        khat: PSIS k-hat of q against the generalised posterior (None: not known).
        ess_fraction: importance-sampling ESS divided by the number of draws (None: not known).
        objective: the objective that was fitted (the advice depends on it).

    Example:
        >>> print(mass_warning(khat=0.3))
        None
        >>> mass_warning(khat=0.9)[:40]
        'q misses part of the posterior (k-hat 0.'
    """
    found = []
    if khat is not None and math.isfinite(khat) and khat >= KHAT_MISSES_MASS:
        found.append(f"k-hat {khat:.2f} >= {KHAT_MISSES_MASS}")
    elif khat is not None and khat == math.inf:
        found.append("k-hat is infinite")
    if ess_fraction is not None and ess_fraction < ESS_MISSES_MASS:
        found.append(
            f"importance-sampling ESS {100 * ess_fraction:.1f} % of the draws < "
            f"{100 * ESS_MISSES_MASS:.0f} %"
        )
    if not found:
        return None
    if objective == "reverse_kl":
        advice = (
            "reverse KL is mode-seeking and may have settled on one mode: refit with a "
            "mass-covering objective (objective 'renyi' with alpha 0.2 to 0.5, or "
            "'forward_kl'), a family that holds several modes (GaussianMixture or "
            "FlowMixture, family 'mixture' or 'flow_mixture'), or an annealed w"
        )
    else:
        advice = (
            "train longer or with more draws per epoch, use a family that holds several "
            "modes (GaussianMixture or FlowMixture, family 'mixture' or 'flow_mixture') "
            "or anneal w from a broad start; a smaller alpha (renyi) covers more mass"
        )
    return (
        f"q misses part of the posterior ({'; '.join(found)}): a mode or a tail that q "
        f"does not cover, so its intervals and probabilities cannot be relied on; {advice}."
    )
