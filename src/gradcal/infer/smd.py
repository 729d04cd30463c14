r"""Simulated minimum distance: the point estimate $\arg\min_\theta l(\theta, y)$.

BlackBIRDS' ``SMD``: the optimiser holds the parameter tensor theta being fitted, and each
epoch evaluates ``loss(theta, data)``, backpropagates through the simulator and steps. A
parameter tensor of shape (K, D) holds K starting points, fitted at once as one batch of
draws (:class:`gradcal.gradients.BatchedLoss`); each start keeps its own loss history and
best value, and the best start gives the estimate. One epoch, top to bottom in
:meth:`SMD.step`: evaluate the K losses, take their gradients, drop the starts whose loss or
gradient is not finite, clip each start's gradient, record the best values, step.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from gradcal.checkpoint import save_checkpoint
from gradcal.distributed import reduce_epoch, shard
from gradcal.gradients import BatchedLoss, Batching, check_scalar_loss
from gradcal.rng import seeded
from gradcal.simulate import check_gradient_horizon

__all__ = ["SMD"]

logger = logging.getLogger("gradcal")

_FILE_SUFFIXES = (".pt", ".pth")


def _int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    return value


def _to_device(data: Any, device: torch.device) -> Any:
    """Tensors (alone or in a list/tuple) follow the parameters; anything else is passed on."""
    if isinstance(data, Tensor):
        return data.to(device)
    if isinstance(data, list | tuple) and all(isinstance(d, Tensor) for d in data):
        return [d.to(device) for d in data]
    return data


def _fitted_tensor(optimizer: Any) -> Tensor:
    """The one parameter tensor an optimiser holds, checked."""
    groups = getattr(optimizer, "param_groups", None)
    if not callable(getattr(optimizer, "step", None)) or not isinstance(groups, list):
        raise TypeError(
            f"`optimizer` must be a torch optimiser (e.g. torch.optim.Adam([theta])), got "
            f"{type(optimizer).__name__}."
        )
    params = [p for group in groups for p in group.get("params", [])]
    if not params:
        raise ValueError(
            "`optimizer` holds no parameters: build it over the tensor to fit, e.g. "
            "torch.optim.Adam([theta]) with theta = torch.zeros(D, requires_grad=True)."
        )
    if len(params) > 1:
        raise ValueError(
            f"`optimizer` holds {len(params)} parameter tensors; SMD fits one: theta (D,), or "
            "(K, D) for K starting points."
        )
    theta = params[0]
    if not isinstance(theta, Tensor) or not theta.is_floating_point() or not theta.requires_grad:
        raise ValueError(
            "the optimiser's parameter must be a floating-point tensor with requires_grad=True."
        )
    return theta


def _save_path(parameters_save_dir: str | os.PathLike) -> Path:
    path = Path(parameters_save_dir)
    return path if path.suffix in _FILE_SUFFIXES else path / "best_parameters.pt"


class SMD:
    r"""Simulated minimum distance: minimise a loss over the parameters by gradient descent.

    $$
    \hat\theta = \arg\min_\theta\, l(\theta, y), \qquad
    \theta_k \leftarrow \mathrm{opt}\big(\theta_k, \mathrm{clip}(\nabla l(\theta_k, y))\big)
    $$

    Arguments (BlackBIRDS' signature, same order and defaults):
        loss: ``loss(theta, data)``: a scalar for one point theta (D,); for K starting
            points a loss with ``batched = True`` (every gradcal loss builder) gets theta
            (K, D) in one call and returns (K,), a single-point loss is vmapped (or looped).
        optimizer: a torch optimiser holding exactly one tensor with ``requires_grad``:
            theta (D,) (one start, as in BlackBIRDS) or (K, D) (K starts, one row each).
            Optimisers whose ``step`` needs a closure (LBFGS) are not supported.
        gradient_horizon: kept for BlackBIRDS compatibility, where it is not used either:
            the horizon is the loss builder's own (``MSELoss(model, gradient_horizon=...)``).
        progress_bar: show a tqdm bar.

    New arguments (keyword only):
        gradient_clipping_norm: clip each start's gradient to this Euclidean norm.
        batching: how a single-point loss is batched over starts (``"auto"``, ``"native"``,
            ``"vmap"``, ``"loop"``; see :class:`gradcal.gradients.BatchedLoss`).
        multi_start: read a (K, D) tensor as K starts (default). False: the tensor, of any
            shape, is one point handed whole to the loss (BlackBIRDS' behaviour).
        seed: run on a private random stream seeded with this (``torch.random.fork_rng``;
            the caller's stream is left as it was).
        max_failed_epochs: raise after this many consecutive epochs in which every start's
            loss or gradient was NaN or infinite.

    A start whose loss or gradient is NaN or infinite in an epoch is not updated in that
    epoch: its row of theta and its rows of the optimiser's per-element state (Adam's
    moments, momentum buffers) are put back after the step; shared scalar state (Adam's
    step count) still advances. The other starts are stepped as usual.

    After :meth:`run`:
        ``best_parameters`` (D,) and ``best_loss``: the lowest finite loss seen at any start
        and the parameters at which it was evaluated; ``best_start``: that start's index.
        ``start_best_parameters`` (K, D) and ``start_best_loss`` (K,): the same per start.
        ``losses`` (K, epochs): every start's loss at every epoch (NaN/inf where it failed).
        ``loss``: BlackBIRDS' list of per-epoch losses; with K starts, each entry is the
        lowest finite loss over the starts in that epoch (NaN if all failed), so
        ``best_loss == min(loss)``. The optimiser's tensor holds the last iterate.
        The run stops early after ``max_epochs_without_improvement`` epochs in which no start
        lowered its own best loss.

    Example:
        >>> def loss(theta, y):                 # sum of squares, minimised at mean(y)
        ...     return ((y - theta) ** 2).sum()
        >>> y = torch.tensor([1.0, 2.0, 3.0])
        >>> theta = torch.tensor([[-5.0], [9.0]], requires_grad=True)   # two starts
        >>> smd = SMD(loss, torch.optim.Adam([theta], lr=0.1))
        >>> estimate, value = smd.run(y, n_epochs=500)
        >>> round(estimate.item(), 2), round(value, 2), smd.losses.shape[0]   # (K, epochs)
        (2.0, 2.0, 2)
    """

    def __init__(
        self,
        loss: Callable[[Tensor, Any], Tensor],
        optimizer: torch.optim.Optimizer,
        gradient_horizon: int | None = None,
        progress_bar: bool = False,
        *,
        gradient_clipping_norm: float = math.inf,
        batching: Batching = "auto",
        multi_start: bool = True,
        seed: int | None = None,
        max_failed_epochs: int = 10,
    ):
        if not callable(loss):
            raise TypeError(f"`loss` must be callable, got {type(loss).__name__}.")
        check_gradient_horizon(gradient_horizon)
        theta = _fitted_tensor(optimizer)
        if multi_start and theta.ndim not in (1, 2):
            raise ValueError(
                f"the fitted tensor has shape {tuple(theta.shape)}: with multi_start=True it "
                "must be (D,) or (K, D); pass multi_start=False to fit it as one point."
            )
        if not isinstance(gradient_clipping_norm, int | float) or not gradient_clipping_norm > 0:
            raise ValueError(
                f"`gradient_clipping_norm` must be a number > 0, got {gradient_clipping_norm!r}."
            )
        self.loss_fn = loss
        self.optimizer = optimizer
        self.gradient_horizon = gradient_horizon
        self.progress_bar = progress_bar
        self.gradient_clipping_norm = float(gradient_clipping_norm)
        self.batched_loss = BatchedLoss(loss, batching)
        self.multi_start = multi_start and theta.ndim == 2
        self.seed = seed
        self.max_failed_epochs = _int_at_least("max_failed_epochs", max_failed_epochs, 1)
        self._theta = theta
        self.n_starts = theta.shape[0] if self.multi_start else 1
        self._reset()

    # --- one epoch ------------------------------------------------------------------------

    def _evaluate(self, data: Any, start: int, count: int) -> Tensor:
        """The loss of starts ``start .. start + count``: (count,)."""
        if count == 0:  # more ranks than starts
            return self._theta.new_zeros(0)
        if self.multi_start:
            return self.batched_loss(self._theta[start : start + count], data)
        return check_scalar_loss(self.loss_fn(self._theta, data)).reshape(1)

    def step(self, data: Any) -> tuple[Tensor, Tensor]:
        """Gradients of one epoch into theta (not yet applied).

        Returns the losses (K,) at the current theta and which starts are usable (K,) bool:
        finite loss and gradient. Unusable starts get a zero gradient; each start's gradient
        is clipped to ``gradient_clipping_norm``.
        """
        self.optimizer.zero_grad()
        theta, k = self._theta, self.n_starts
        start, count = shard(k) if self.multi_start else (0, k)
        rows, local, error = torch.zeros_like(theta).reshape(k, -1), None, None
        try:  # under torchrun: this rank's starts
            rows, local = self._rows_and_losses(data, start, count)
        except Exception as caught:  # reported to every rank before any other collective
            if not self.multi_start:
                raise
            error = caught
        if local is None:
            local = torch.zeros(k, dtype=rows.dtype, device=rows.device)
        losses = local
        if self.multi_start:  # ranks own disjoint starts: add their rows up
            both = reduce_epoch(torch.cat((rows.reshape(-1), local)), error)
            rows, losses = both[: rows.numel()].reshape(rows.shape), both[rows.numel() :]
        finite = torch.isfinite(losses)
        ok = finite & torch.isfinite(rows).all(-1)
        rows = torch.where(ok[:, None], rows, 0.0)
        if math.isfinite(self.gradient_clipping_norm):
            norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
            rows = rows * (self.gradient_clipping_norm / (norms + 1e-6)).clamp(max=1.0)
        theta.grad = rows.reshape(theta.shape).detach()
        return losses.detach(), ok

    def _rows_and_losses(self, data: Any, start: int, count: int) -> tuple[Tensor, Tensor]:
        """This rank's starts ``start : start + count``: the gradient rows (K, D), zero
        elsewhere and where the loss is not finite, and the losses (K,), zero elsewhere."""
        theta, k = self._theta, self.n_starts
        losses = self._evaluate(data, start, count)
        finite = torch.isfinite(losses.detach())
        total = torch.where(finite, losses, 0.0).sum()
        if total.requires_grad:
            grad = torch.autograd.grad(total, theta, allow_unused=True)[0]
        elif finite.any():
            raise TypeError(
                "`loss(theta, data)` returned a value without a gradient with respect to "
                "theta: SMD needs a loss differentiable in the parameters."
            )
        else:
            grad = None
        rows = torch.zeros_like(theta) if grad is None else grad
        local = torch.zeros(k, dtype=losses.dtype, device=losses.device)
        local[start : start + count] = losses.detach()
        return rows.reshape(k, -1), local

    def _apply(self, ok: Tensor) -> None:
        """Step the optimiser for the usable starts only."""
        if bool(ok.all()):
            self.optimizer.step()
            return
        if not bool(ok.any()):
            return
        theta, bad = self._theta, ~ok
        state = self.optimizer.state.get(theta, {})
        saved = {
            key: value[bad].clone()
            for key, value in state.items()
            if isinstance(value, Tensor) and value.shape == theta.shape
        }
        saved_theta = theta.detach()[bad].clone()
        self.optimizer.step()
        with torch.no_grad():
            theta[bad] = saved_theta
            for key, value in saved.items():
                state[key][bad] = value

    # --- bookkeeping ----------------------------------------------------------------------

    def _reset(self) -> None:
        rows = self._theta.detach().reshape(self.n_starts, -1).clone()
        self.loss: list[float] = []
        self._history: list[Tensor] = []
        self._start_best = rows
        self.start_best_loss = torch.full((self.n_starts,), math.inf, dtype=rows.dtype)
        self.best_loss = math.inf
        self.best_start = 0
        self._stall = self._failed = 0

    def _shape(self, row: Tensor) -> Tensor:
        return row if self.multi_start else row.reshape(self._theta.shape)

    @property
    def start_best_parameters(self) -> Tensor:
        """The best parameters of every start: (K, D) (for one start: (1, D))."""
        return self._start_best if self.multi_start else self._start_best.reshape(1, -1)

    @property
    def best_parameters(self) -> Tensor:
        """The parameters with the lowest loss seen: (D,) (theta's shape when not multi-start)."""
        return self._shape(self._start_best[self.best_start])

    @property
    def losses(self) -> Tensor:
        """Loss of every start at every epoch: (K, epochs)."""
        if not self._history:
            return torch.empty(self.n_starts, 0, dtype=self._start_best.dtype)
        return torch.stack(self._history, 1)

    def _record(self, losses: Tensor) -> bool:
        """Track the histories and best values; True when the overall best improved."""
        losses = losses.to(self._start_best.dtype).cpu()
        finite = torch.isfinite(losses)
        self._history.append(losses)
        lowest = torch.where(finite, losses, math.inf).min()
        self.loss.append(float(lowest) if math.isfinite(lowest) else math.nan)
        improved = finite & (losses < self.start_best_loss)
        if improved.any():
            self._stall = 0
            rows = self._theta.detach().reshape(self.n_starts, -1).to(self._start_best)
            mask = improved.to(rows.device)
            self._start_best[mask] = rows[mask]
            self.start_best_loss[improved] = losses[improved]
        else:
            self._stall += 1
        best = int(torch.argmin(self.start_best_loss))
        if float(self.start_best_loss[best]) < self.best_loss:
            self.best_loss, self.best_start = float(self.start_best_loss[best]), best
            return True
        return False

    def _check_failures(self, ok: Tensor) -> None:
        self._failed = 0 if bool(ok.any()) else self._failed + 1
        if self._failed >= self.max_failed_epochs:
            raise RuntimeError(
                f"the loss (or its gradient) was NaN or infinite at every start in "
                f"{self._failed} consecutive epochs: check the simulator and the loss at the "
                "current parameters, or lower the learning rate."
            )

    # --- the loop -------------------------------------------------------------------------

    def run(
        self,
        data: Any,
        n_epochs: int = 1000,
        max_epochs_without_improvement: int = 100,
        parameters_save_dir: str | os.PathLike | None = None,
    ) -> tuple[Tensor, float]:
        """Optimise for up to ``n_epochs`` epochs; return the best parameters (D,) and loss.

        Arguments:
            data: the observed data handed to ``loss(theta, data)`` (tensors are moved to
                theta's device).
            n_epochs: the most epochs to run (0: none; the first start is returned with an
                infinite loss, as when no epoch gave a finite loss).
            max_epochs_without_improvement: stop after this many epochs in which no start
                lowered its own best loss.
            parameters_save_dir: where to keep the best parameters, rewritten atomically at
                each improvement: a file path ending in ``.pt``/``.pth`` (BlackBIRDS passes
                ``"best_parameters.pt"``), or a folder that gets ``best_parameters.pt``.
                The file holds the best parameters (D,) as one tensor, as BlackBIRDS'
                (``torch.load(path)``); nothing is written without it.
        """
        _int_at_least("n_epochs", n_epochs, 0)
        patience = max_epochs_without_improvement
        _int_at_least("max_epochs_without_improvement", patience, 1)
        path = None if parameters_save_dir is None else _save_path(parameters_save_dir)
        data = _to_device(data, self._theta.device)
        self._reset()
        with seeded(self.seed, self._theta.device):
            bar = tqdm(range(n_epochs), disable=not self.progress_bar, desc="SMD")
            for _ in bar:
                losses, ok = self.step(data)
                improved = self._record(losses)
                self._check_failures(ok)
                if improved and path is not None:
                    self._save(path)
                if self.progress_bar:
                    bar.set_postfix(
                        loss=f"{self.loss[-1]:.4g}",
                        best=f"{self.best_loss:.4g}",
                        stall=self._stall,
                        failed=int((~ok).sum()),
                    )
                if self._stall >= patience:
                    logger.info("SMD: stopping early, no improvement for %d epochs", patience)
                    break
                self._apply(ok)
            bar.close()
        return self.best_parameters.clone(), self.best_loss

    def _save(self, path: Path) -> None:
        save_checkpoint(path, self.best_parameters.clone())
