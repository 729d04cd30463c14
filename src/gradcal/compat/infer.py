r"""BlackBIRDS' free functions of ``infer.vi``: one epoch's loss and gradient, piece by piece.

gradcal's :class:`~gradcal.infer.vi.VI` runs its estimators (:mod:`gradcal.gradients`)
itself; these functions keep BlackBIRDS' signatures and return values for scripts that
call them directly, and are re-exported at ``gradcal.infer.vi``. The per-draw losses and
gradients come from gradcal's :class:`~gradcal.gradients.BatchedLoss` and
:func:`~gradcal.gradients.loss_and_gradient` (one batched call, vmap or a loop; reverse or
forward mode).

Several processes (``torchrun``, or ``mpirun``/``srun`` after importing
:mod:`gradcal.mpi_setup`) work as in BlackBIRDS under MPI: rank 0 draws the parameters,
every rank evaluates its share of them, and rank 0 gathers the results, returns them and
receives the gradient; the other ranks return BlackBIRDS' placeholders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradcal.distributed import all_gather_objects, is_main, shard, world_size
from gradcal.gradients import BatchedLoss, loss_and_gradient
from gradcal.posterior_estimators import as_family

__all__ = [
    "compute_and_differentiate_loss",
    "compute_and_differentiate_loss_score",
    "compute_loss_and_jacobian_pathwise",
]


def _family(posterior_estimator: Any) -> Any:
    """The estimator in gradcal's family protocol (:func:`as_family`): draws (n, D) and log q
    (n,) also for a user's class that returns (n, 1), as BlackBIRDS accepts; torch
    distributions and zuko flows (whose ``sample`` returns draws only) are wrapped."""
    return as_family(posterior_estimator)


def _draw(family: Any, n: int) -> Tensor | None:
    """n draws (n, D) on rank 0, with their graph; None on the other ranks."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n_samples` must be an int >= 1, got {n!r}.")
    if not is_main():
        return None
    out = family.sample(n)
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise TypeError(
            f"`posterior_estimator.sample(n)` must return (theta, log_q), "
            f"got {type(out).__name__}."
        )
    theta = out[0]
    return theta[:, None] if theta.ndim == 1 else theta


def _rank_share(theta: Tensor | None) -> tuple[Tensor, int]:
    """Every rank's copy of rank 0's draws (detached) and where this rank's share starts."""
    draws = all_gather_objects(None if theta is None else theta.detach().cpu())[0]
    start, count = shard(draws.shape[0])
    return draws[start : start + count], start


def _gather(local: Any) -> list[Any]:
    """Rank 0: every rank's ``local`` in rank order; a single process: ``[local]``."""
    return all_gather_objects(local) if world_size() > 1 else [local]


def _check_diff_mode(diff_mode: str) -> None:
    if diff_mode not in ("reverse", "forward"):
        raise ValueError(f"`diff_mode` must be 'reverse' or 'forward', got {diff_mode!r}.")


def compute_loss_and_jacobian_pathwise(
    loss_fn: Callable[[Tensor, Any], Tensor],
    posterior_estimator: Any,
    n_samples: int,
    observed_outputs: Any,
    diff_mode: str = "reverse",
    jacobian_chunk_size: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor, list[Tensor]]:
    r"""Draw n parameters and compute each one's loss and loss gradient (pathwise pieces).

    The reparameterised gradient of $E_q[l(\theta, y)]$ is
    $\frac1n \sum_i J_i^\top \partial\theta_i/\partial\phi$ with
    $J_i = \nabla_\theta l(\theta_i, y)$: this returns the draws and the $J_i$;
    :func:`compute_and_differentiate_loss` backpropagates them. Draws whose loss or
    gradient is NaN or infinite are left out.

    Arguments:
        loss_fn: ``loss_fn(theta, observed_outputs)``, a scalar for one draw theta (D,)
            (or batched, with ``loss_fn.batched = True``).
        posterior_estimator: q with ``sample(n) -> (theta (n, D), log_q (n,))``.
        n_samples: number of draws n.
        observed_outputs: the data handed to ``loss_fn``.
        diff_mode: ``"reverse"`` or ``"forward"`` (per-draw forward mode, the same noise
            for every parameter axis).
        jacobian_chunk_size: forward mode: parameter axes pushed through at once (None: all).
        device: where the simulator runs.

    Returns:
        On rank 0 (a single process is rank 0): ``(parameters (m, D), loss, jacobians)``:
        the kept draws with their graph to q, the mean of their losses (0-d tensor, NaN
        when m = 0) and a list of m gradients (D,). Other ranks: ``([], 0.0, [])``.

    Example:
        >>> from gradcal.posterior_estimators import TrainableGaussian
        >>> q = TrainableGaussian([1.0, 2.0], 0.01)
        >>> sq = lambda theta, y: ((theta - y) ** 2).sum()
        >>> theta, loss, jac = compute_loss_and_jacobian_pathwise(sq, q, 4, torch.zeros(2))
        >>> theta.shape, loss.shape, len(jac), jac[0].shape
        (torch.Size([4, 2]), torch.Size([]), 4, torch.Size([2]))
    """
    _check_diff_mode(diff_mode)
    theta = _draw(_family(posterior_estimator), n_samples)
    share, start = _rank_share(theta)
    if share.shape[0]:
        losses, grads = loss_and_gradient(
            BatchedLoss(loss_fn),
            share.to(device),
            observed_outputs,
            diff_mode,
            jacobian_chunk_size,
        )
    else:  # more ranks than draws
        losses, grads = share[:, 0], share
    keep = torch.isfinite(losses) & torch.isfinite(grads).all(-1)
    local = (keep.nonzero()[:, 0] + start, losses[keep].cpu(), grads[keep].cpu())
    parts = _gather(local)
    if theta is None:
        return [], 0.0, []
    index = torch.cat([p[0] for p in parts]).to(theta.device)
    kept_losses = torch.cat([p[1] for p in parts]).to(theta.device)
    jacobians = [g.to(theta.device) for p in parts for g in p[2]]
    loss = kept_losses.mean() if len(index) else torch.tensor(torch.nan, device=theta.device)
    return theta[index], loss, jacobians


def compute_and_differentiate_loss_score(
    loss_fn: Callable[[Tensor, Any], Tensor],
    posterior_estimator: Any,
    n_samples: int,
    observed_outputs: Any,
    device: str | torch.device = "cpu",
    *,
    score_baseline: str | None = "leave_one_out",
) -> Tensor | None:
    r"""Score-function gradient of $E_q[l]$, backpropagated into q; returns the mean loss.

    $\frac1m \sum_i (l_i - b_i) \nabla_\phi \log q(\theta_i)$ over the m draws with a
    finite loss; the simulator runs without gradients. ``b_i`` is the mean loss of the other
    draws (``score_baseline="leave_one_out"``, gradcal's VI estimator: the same expectation,
    lower variance) or 0 (``score_baseline=None``, BlackBIRDS' plain estimator).

    Arguments:
        loss_fn, posterior_estimator, n_samples, observed_outputs, device: as in
            :func:`compute_loss_and_jacobian_pathwise`; q also needs ``log_prob``.
        score_baseline: ``"leave_one_out"`` or None.

    Returns:
        The mean loss over the kept draws (0-d tensor, NaN when none is finite) on rank 0;
        None on the other ranks.

    Example:
        >>> from gradcal.posterior_estimators import TrainableGaussian
        >>> q = TrainableGaussian([1.0], 0.01)
        >>> loss = compute_and_differentiate_loss_score(
        ...     lambda t, y: (t - y).square().sum(), q, 8, torch.zeros(1))
        >>> loss.shape, q.mu.grad.shape
        (torch.Size([]), torch.Size([1]))
    """
    if score_baseline not in ("leave_one_out", None):
        raise ValueError(
            f"`score_baseline` must be 'leave_one_out' or None, got {score_baseline!r}."
        )
    family = _family(posterior_estimator)
    with torch.no_grad():
        theta = _draw(family, n_samples)
        share, start = _rank_share(theta)
        losses = (
            BatchedLoss(loss_fn)(share.to(device), observed_outputs).detach()
            if share.shape[0]
            else share[:, 0]
        )
    keep = torch.isfinite(losses)
    parts = _gather((keep.nonzero()[:, 0] + start, losses[keep].cpu()))
    if theta is None:
        return None
    index = torch.cat([p[0] for p in parts]).to(theta.device)
    kept = torch.cat([p[1] for p in parts]).to(theta.device)
    m = len(index)
    if m == 0:
        return torch.tensor(torch.nan, device=theta.device)
    weights = kept
    if score_baseline == "leave_one_out" and m > 1:
        weights = kept - (kept.sum() - kept) / (m - 1)
    log_q = family.log_prob(theta[index].detach())
    ((weights * log_q.reshape(m)).sum() / m).backward()
    return kept.mean()


def compute_and_differentiate_loss(
    loss_fn: Callable[[Tensor, Any], Tensor],
    posterior_estimator: Any,
    n_samples: int,
    observed_outputs: Any,
    diff_mode: str = "reverse",
    gradient_estimation_method: str = "pathwise",
    jacobian_chunk_size: int | None = None,
    device: str | torch.device = "cpu",
) -> Tensor | float | None:
    r"""One epoch's estimate of $\nabla_\phi E_q[l(\theta, y)]$, accumulated into q's
    ``.grad``; returns the mean loss over the kept draws.

    ``"pathwise"``: :func:`compute_loss_and_jacobian_pathwise`, then the surrogate
    $\frac1m \sum_i \langle J_i, \theta_i \rangle$ is backpropagated (its gradient is
    the reparameterised gradient). ``"score"``: :func:`compute_and_differentiate_loss_score`.
    Arguments as there.

    Returns:
        The mean loss (0-d tensor) on rank 0; on other ranks 0.0 (pathwise) or None (score),
        as BlackBIRDS.

    Example:
        >>> from gradcal.posterior_estimators import TrainableGaussian
        >>> q = TrainableGaussian([1.0], 1e-3)
        >>> loss = compute_and_differentiate_loss(
        ...     lambda t, y: (t - y).square().sum(), q, 8, torch.zeros(1))
        >>> round(q.mu.grad.item(), 1)      # d/dmu E[(theta - 0)^2] = 2 mu
        2.0
    """
    if gradient_estimation_method == "score":
        return compute_and_differentiate_loss_score(
            loss_fn, posterior_estimator, n_samples, observed_outputs, device
        )
    if gradient_estimation_method != "pathwise":
        raise ValueError(
            "`gradient_estimation_method` must be 'pathwise' or 'score', "
            f"got {gradient_estimation_method!r}."
        )
    parameters, loss, jacobians = compute_loss_and_jacobian_pathwise(
        loss_fn,
        posterior_estimator,
        n_samples,
        observed_outputs,
        diff_mode,
        jacobian_chunk_size,
        device,
    )
    if jacobians:
        grads = torch.stack(jacobians).to(parameters.dtype)
        ((grads * parameters).sum() / len(jacobians)).backward()
    return loss
