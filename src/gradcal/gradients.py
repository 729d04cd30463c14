r"""Gradient estimators of E_q[l(theta, y)] and the batching of losses over draws.

Each estimator is a small class with two methods. ``surrogate(family, loss, data, n,
extra)`` draws n parameters from the family (and ``extra`` more in the same call, handed
back with their graph for a Monte Carlo KL), evaluates the loss and returns an
:class:`EpochSurrogate`: a 0-d surrogate whose gradient with respect to the family's
parameters is the estimator's, and the :class:`EpochEstimate`. ``__call__(family, loss,
data, n)`` backpropagates that surrogate (``.grad`` accumulates) and returns the estimate.
The VI driver (:mod:`gradcal.infer.vi`) adds the KL term to the surrogate, backpropagates
both in one pass and steps the optimiser.

- :class:`PathwiseReverse`: reparameterised draws, one backward pass through loss,
  simulator and family.
- :class:`PathwiseForward`: per-draw gradients by forward mode (:func:`torch.func.jvp`
  along the D parameter axes, the same noise for every axis), then the surrogate
  $\sum_i \langle \nabla l_i, \theta_i \rangle / B$ through the family. Memory does not
  grow with the number of simulated time steps.
- :class:`Score`: the score-function (REINFORCE) estimator
  $\frac1B \sum_i (l_i - b_i) \nabla \log q(\theta_i)$ with the leave-one-out
  baseline $b_i = \frac{1}{B-1} \sum_{j \ne i} l_j$ (unbiased; no simulator gradient).

Draws whose loss (or, for pathwise estimators, whose gradient; for the score estimator,
whose log q) is NaN or infinite are dropped from the average and counted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from gradcal.distributed import reduce_epoch, shard
from gradcal.posterior_estimators import as_family
from gradcal.relax import relaxed_categorical
from gradcal.simulate import batch_of_draws

__all__ = [
    "BatchedLoss",
    "EpochEstimate",
    "EpochSurrogate",
    "PathwiseForward",
    "PathwiseReverse",
    "Score",
    "check_scalar_loss",
    "loss_and_gradient",
    "make_estimator",
]

logger = logging.getLogger("gradcal")

Batching = Literal["auto", "native", "vmap", "loop"]


@dataclass
class EpochEstimate:
    """What one gradient estimate saw: the mean loss over the kept draws and the drops."""

    loss: float
    n_valid: int
    n_dropped: int


@dataclass
class EpochSurrogate:
    """An estimator's epoch before its backward pass.

    ``value``: 0-d, with a graph into the family's parameters, whose gradient is the
    estimator's gradient (None when no draw was kept: nothing to backpropagate).
    ``estimate``: the :class:`EpochEstimate`. ``extra``: the ``extra`` draws asked for,
    (theta (m, D), log_q (m,)) with their graph, drawn in the same call as the estimator's
    own and independent of them (None when none were asked for).
    """

    value: Tensor | None
    estimate: EpochEstimate
    extra: tuple[Tensor, Tensor] | None = None

    def backward(self) -> EpochEstimate:
        """Backpropagate ``value`` into the family (``.grad`` accumulates); the estimate."""
        if self.value is not None and self.value.requires_grad:
            self.value.backward()
        return self.estimate


# --- batching -------------------------------------------------------------------------


def _standard_normal(shape: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.randn(shape, dtype=dtype, device=device)


def _gumbel_softmax(
    logits: Tensor, tau: float = 1.0, hard: bool = False, eps: float = 1e-10, dim: int = -1
) -> Tensor:
    return relaxed_categorical(logits, tau=tau, hard=hard, dim=dim)


@contextlib.contextmanager
def vmap_safe_sampling() -> Iterator[None]:
    """Make torch's common samplers usable under ``vmap(randomness="different")``.

    ``torch.distributions`` draws normals in place into a fresh, unbatched tensor, and
    ``torch.nn.functional.gumbel_softmax`` draws its noise the same way; under vmap both
    fail. For the duration of the block they are replaced by out-of-place samplers of the
    same distributions (``torch.randn``; :func:`gradcal.relax.relaxed_categorical`), and
    argument validation, which branches on tensor values, is switched off. Everything is
    restored on exit.
    """
    modules = [
        m
        for m in (
            torch.distributions.normal,
            torch.distributions.multivariate_normal,
            torch.distributions.lowrank_multivariate_normal,
            torch.distributions.studentT,
        )
        if hasattr(m, "_standard_normal")
    ]
    saved = [m._standard_normal for m in modules]
    saved_gumbel = torch.nn.functional.gumbel_softmax
    saved_validate = torch.distributions.Distribution._validate_args
    try:
        for m in modules:
            m._standard_normal = _standard_normal
        torch.nn.functional.gumbel_softmax = _gumbel_softmax
        torch.distributions.Distribution.set_default_validate_args(False)
        yield
    finally:
        for m, f in zip(modules, saved, strict=True):
            m._standard_normal = f
        torch.nn.functional.gumbel_softmax = saved_gumbel
        torch.distributions.Distribution.set_default_validate_args(saved_validate)


def check_scalar_loss(value: Any) -> Tensor:
    """``value`` as a 0-d tensor: a one-draw loss must return one number (else ValueError)."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"`loss(theta, data)` must return a scalar for one draw theta (D,), got {shape}."
        )
    return value.reshape(())


class BatchedLoss:
    """A loss evaluated on B draws at once: theta (B, D) -> (B,).

    Arguments:
        loss: ``loss(theta, data)``. A loss with ``batched = True`` (all gradcal loss
            builders) receives all draws in one call; otherwise it is written for one draw
            (D,) -> scalar, the BlackBIRDS convention.
        batching: ``"native"`` (one call), ``"vmap"`` (:func:`torch.func.vmap` with
            ``randomness="different"``), ``"loop"`` (draw by draw) or ``"auto"`` (native
            for batched losses, else vmap if it works on the first call, else the loop;
            one log line says which and why).
    """

    def __init__(self, loss: Callable[[Tensor, Any], Tensor], batching: Batching = "auto"):
        if batching not in ("auto", "native", "vmap", "loop"):
            raise ValueError(
                f"`batching` must be 'auto', 'native', 'vmap' or 'loop', got {batching!r}."
            )
        if not callable(loss):
            raise TypeError(f"`loss` must be callable, got {type(loss).__name__}.")
        self.loss = loss
        if batching == "auto" and getattr(loss, "batched", False):
            batching = "native"
            logger.info("batching: the loss declares itself batched; all draws in one call.")
        self.mode = batching

    def _native(self, theta: Tensor, data: Any) -> Tensor:
        with batch_of_draws():  # theta (1, D) is a batch of one here, not one draw
            out = self.loss(theta, data)
        if not isinstance(out, Tensor) or out.shape != theta.shape[:1]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"a batched loss must return ({theta.shape[0]},) for theta "
                f"{tuple(theta.shape)}, got {got}."
            )
        return out

    def _vmap(self, theta: Tensor, data: Any) -> Tensor:
        def one(t: Tensor) -> Tensor:
            return check_scalar_loss(self.loss(t, data))

        with vmap_safe_sampling():
            return torch.func.vmap(one, randomness="different")(theta)

    def _loop(self, theta: Tensor, data: Any) -> Tensor:
        return torch.stack([check_scalar_loss(self.loss(t, data)) for t in theta])

    def resolve(self, theta: Tensor, data: Any) -> None:
        """Settle ``"auto"`` on a first batch of draws, outside any other transform."""
        if self.mode == "auto":
            with torch.no_grad():
                self(theta.detach(), data)

    def __call__(self, theta: Tensor, data: Any) -> Tensor:
        if self.mode == "native":
            return self._native(theta, data)
        if self.mode == "vmap":
            return self._vmap(theta, data)
        if self.mode == "loop":
            return self._loop(theta, data)
        # auto, single-draw loss: check the contract on one draw, then try vmap once.
        check_scalar_loss(self.loss(theta[0], data))
        try:
            out = self._vmap(theta, data)
        except Exception as error:  # any failure of the transform: fall back, say why
            self.mode = "loop"
            reason = str(error).strip().splitlines()[0][:200]
            logger.info(
                "batching: vmap failed on this loss (%s); running draws one by one.", reason
            )
            return self._loop(theta, data)
        self.mode = "vmap"
        logger.info("batching: single-draw loss batched with torch.func.vmap.")
        return out


# --- estimators -----------------------------------------------------------------------


def _sample(family: Any, n: int, extra: int = 0) -> tuple[Tensor, Tensor, tuple | None]:
    """n + extra draws in one call of ``family.sample``, split: (theta (n, D), log_q (n,),
    (theta (extra, D), log_q (extra,)) or None)."""
    q = as_family(family)
    theta, log_q = q.sample(n + extra)
    if not extra:
        return theta, log_q, None
    more = log_q[n:]
    if not bool(torch.isfinite(log_q[:n].detach()).all()):
        # A loss draw's log q is not finite (a draw on the edge of a bounded support): the
        # joint graph would send 0 * inf = NaN into the extra draws' gradient, so their
        # log q is evaluated again on their own draws.
        with contextlib.suppress(NotImplementedError):
            more = q.log_prob(theta[n:])
    return theta[:n], log_q[:n], (theta[n:], more)


def _surrogate_through_family(theta: Tensor, grad: Tensor, valid: Tensor, n_valid: int) -> Tensor:
    """sum_i <grad_i, theta_i> / n_valid over the kept draws: its gradient into q is the
    pathwise gradient of the mean loss.

    ``n_valid`` counts the kept draws of every rank, so summing the ranks' gradients gives
    the gradient of the mean over all of them.
    """
    g = torch.where(valid[:, None], grad, 0.0).detach()
    return (g * theta).sum() / n_valid


def _finite_rows(
    values: Tensor, grad: Tensor | None = None, log_q: Tensor | None = None
) -> Tensor:
    """The kept draws (n,): finite loss, and finite gradient (n, D) and log q (n,) if given.

    Every argument is per draw; a log q of another shape is an error here rather than a
    mask broadcast to (n, n).
    """
    ok = torch.isfinite(values)
    if grad is not None:
        ok = ok & torch.isfinite(grad).all(-1)
    if log_q is not None:
        if log_q.shape != values.shape:
            raise ValueError(
                f"log q must be one value per draw, {tuple(values.shape)}, got "
                f"{tuple(log_q.shape)} (pass the family through as_family)."
            )
        ok = ok & torch.isfinite(log_q)
    return ok


def _totals(losses: Tensor | None, valid: Tensor | None, error: BaseException | None) -> Tensor:
    """(kept draws, sum of their losses, dropped draws) over all ranks, as float64.

    Every rank reports whether its share failed; if any did, every rank raises here (the
    failing one its own error), so no rank waits for the others in a later collective.
    """
    local = torch.zeros(3, dtype=torch.float64)
    if error is None and valid is not None and losses is not None:
        local[0] = float(valid.sum())
        local[1] = float(losses[valid].sum()) if bool(valid.any()) else 0.0
        local[2] = float(valid.numel() - valid.sum())
    return reduce_epoch(local, error)


def _estimate(totals: Tensor) -> EpochEstimate:
    n_valid, loss_sum, dropped = (float(t) for t in totals)
    mean = loss_sum / n_valid if n_valid else float("nan")
    return EpochEstimate(mean, int(n_valid), int(dropped))


def loss_and_gradient(
    loss: BatchedLoss,
    theta: Tensor,
    data: Any,
    diff_mode: str = "reverse",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-draw losses (B,) and their gradients with respect to the draws (B, D).

    Reverse mode: one backward pass over the summed finite losses. Forward mode: one
    :func:`torch.func.jvp` per parameter axis under ``vmap(randomness="same")``, so every
    axis sees the same noise and nothing is stored for a backward pass; draws are
    independent, so tangent k yields dl_i/dtheta_ik for every i. ``chunk_size`` bounds how
    many axes go through at once. The results carry no graph.
    """
    primal = theta.detach()
    if diff_mode == "reverse":
        leaf = primal.requires_grad_()
        losses = loss(leaf, data)
        finite = torch.where(torch.isfinite(losses), losses, 0.0).sum()
        grad = (
            torch.autograd.grad(finite, leaf, allow_unused=True)[0]
            if finite.requires_grad
            else None
        )
        return losses.detach(), torch.zeros_like(leaf) if grad is None else grad
    if diff_mode != "forward":
        raise ValueError(f"`diff_mode` must be 'reverse' or 'forward', got {diff_mode!r}.")
    loss.resolve(primal, data)
    d = primal.shape[-1]
    tangents = torch.eye(d, dtype=primal.dtype, device=primal.device)[:, None, :]
    tangents = tangents.expand(d, primal.shape[0], d)

    def directional(tangent: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.jvp(lambda t: loss(t, data), (primal,), (tangent,))

    with torch.no_grad():
        values, columns = torch.func.vmap(directional, randomness="same", chunk_size=chunk_size)(
            tangents
        )
    return values[0], columns.T


class PathwiseReverse:
    """Reparameterised draws and one reverse-mode pass through loss and simulator.

    The gradient with respect to the draws is formed first, so that a draw whose loss or
    gradient is not finite is dropped before anything reaches the family's parameters.
    """

    diff_mode = "reverse"
    chunk_size: int | None = None

    def surrogate(
        self, family: Any, loss: BatchedLoss, data: Any, n: int, extra: int = 0
    ) -> EpochSurrogate:
        """This rank's share of the n draws (and ``extra`` more), the loss and its surrogate."""
        theta = losses = valid = grad = error = more = None
        try:  # this rank's share of the n draws
            theta, _, more = _sample(family, shard(n)[1], extra)
            losses, grad = loss_and_gradient(loss, theta, data, self.diff_mode, self.chunk_size)
            valid = _finite_rows(losses, grad)
        except Exception as caught:  # reported to every rank by _totals
            error = caught
        totals = _totals(losses, valid, error)
        value = None
        if totals[0] > 0 and bool(valid.any()):
            value = _surrogate_through_family(theta, grad, valid, int(totals[0]))
        return EpochSurrogate(value, _estimate(totals), more)

    def __call__(self, family: Any, loss: BatchedLoss, data: Any, n: int) -> EpochEstimate:
        """Backpropagate the surrogate of n draws into the family; the estimate."""
        return self.surrogate(family, loss, data, n).backward()


class PathwiseForward(PathwiseReverse):
    """Per-draw gradients by forward-mode differentiation, memory flat in time steps.

    Arguments:
        chunk_size: how many of the D tangent directions are pushed through the simulator
            at once (None: all D); lower it to bound memory.
    """

    diff_mode = "forward"

    def __init__(self, chunk_size: int | None = None):
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"`jacobian_chunk_size` must be None or >= 1, got {chunk_size}.")
        self.chunk_size = chunk_size


class Score:
    """Score-function estimator with an optional leave-one-out baseline.

    The simulator is run without gradients; the family needs ``log_prob``.

    Arguments:
        baseline: ``"leave_one_out"`` (default; unbiased, lower variance) or None.
    """

    def __init__(self, baseline: Literal["leave_one_out"] | None = "leave_one_out"):
        if baseline not in ("leave_one_out", None):
            raise ValueError(
                f"`score_baseline` must be 'leave_one_out' or None, got {baseline!r}."
            )
        self.baseline = baseline

    def surrogate(
        self, family: Any, loss: BatchedLoss, data: Any, n: int, extra: int = 0
    ) -> EpochSurrogate:
        """This rank's share of the n draws (and ``extra`` more), the loss and its surrogate."""
        theta = losses = valid = error = more = None
        family = as_family(family)  # log q (n,) whatever the user's class returns
        try:
            with torch.set_grad_enabled(extra > 0):  # only the extra draws keep a graph
                theta, _, more = _sample(family, shard(n)[1], extra)
            with torch.no_grad():
                theta = theta.detach()
                losses = loss(theta, data)
                # log q(theta) is not finite for a draw on a bound of the support (a
                # constrained map saturated in floating point): dropped, as a failed draw.
                valid = _finite_rows(losses, log_q=family.log_prob(theta))
        except Exception as caught:
            error = caught
        totals = _totals(losses, valid, error)
        m, total = int(totals[0]), float(totals[1])
        if m == 0 or not bool(valid.any()):
            return EpochSurrogate(None, _estimate(totals), more)
        kept = losses[valid]
        if self.baseline == "leave_one_out" and m > 1:
            kept = kept - (total - kept) / (m - 1)  # the other draws, on every rank
        log_q = family.log_prob(theta[valid])
        return EpochSurrogate((kept * log_q).sum() / m, _estimate(totals), more)

    def __call__(self, family: Any, loss: BatchedLoss, data: Any, n: int) -> EpochEstimate:
        """Backpropagate the surrogate of n draws into the family; the estimate."""
        return self.surrogate(family, loss, data, n).backward()


def make_estimator(
    method: str,
    diff_mode: str = "reverse",
    jacobian_chunk_size: int | None = None,
    score_baseline: Literal["leave_one_out"] | None = "leave_one_out",
) -> PathwiseReverse | PathwiseForward | Score:
    """The estimator for BlackBIRDS' ``gradient_estimation_method`` and ``diff_mode``."""
    if method == "pathwise":
        if diff_mode == "reverse":
            return PathwiseReverse()
        if diff_mode == "forward":
            return PathwiseForward(jacobian_chunk_size)
        raise ValueError(f"`diff_mode` must be 'reverse' or 'forward', got {diff_mode!r}.")
    if method == "score":
        return Score(score_baseline)
    raise ValueError(
        f"`gradient_estimation_method` must be 'pathwise' or 'score', got {method!r}."
    )
