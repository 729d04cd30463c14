r"""Generalised variational inference: fit q_phi by minimising E_q[l(theta, y)] + w KL(q || prior).

The optimum approximates the generalised posterior
$\pi_w(\theta \mid y) \propto \exp(-l(\theta, y) / w)\, \pi(\theta)$; w multiplies the KL
term (BlackBIRDS' convention). With $l = -\log p(y \mid \theta)$ and w = 1 this is
ordinary Bayesian VI. One epoch, top to bottom in :meth:`VI.step`: draw
``n_samples_per_epoch`` parameters from q, simulate and score them (one batched call where
possible), backpropagate the chosen gradient estimator's surrogate and w times the KL into
q, clip, and step the optimiser.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from gradcal.checkpoint import load_checkpoint, save_checkpoint
from gradcal.compat.infer import (  # BlackBIRDS' free functions, at BlackBIRDS' path
    compute_and_differentiate_loss,
    compute_and_differentiate_loss_score,
    compute_loss_and_jacobian_pathwise,
)
from gradcal.diagnostics.psis import psis_khat
from gradcal.distributed import (
    all_gather_objects,
    all_reduce_sum,
    broadcast_module,
    is_main,
    launched_without_process_group,
    rank,
    sum_gradients,
    world_size,
)
from gradcal.gradients import BatchedLoss, Batching, EpochEstimate, make_estimator
from gradcal.infer.annealing import GeometricAnnealing
from gradcal.infer.objectives import (
    Objective,
    importance_ess,
    make_objective,
    mass_warning,
)
from gradcal.infer.weight import (
    WeightChoice,
    choose_w_once,
    resolve_w,
    weight_choice_from_state,
    weight_choice_state,
)
from gradcal.posterior_estimators import as_family
from gradcal.priors import distribution_device, distribution_to
from gradcal.problems import GradcalWarning, warn_problem
from gradcal.regularisation import (
    check_prior,
    closed_form_kl,
    compute_regularisation_loss,  # BlackBIRDS' path
    kl_divergence,
    kl_estimate,
    kl_from_draws,
    prior_dim,
    prior_log_prob,
)
from gradcal.rng import get_rng_state, seeded, set_rng_state

__all__ = [
    "VI",
    "compute_and_differentiate_loss",
    "compute_and_differentiate_loss_score",
    "compute_loss_and_jacobian_pathwise",
    "compute_regularisation_loss",
]

logger = logging.getLogger("gradcal")

_KL_METHODS = ("auto", "analytic", "monte_carlo")
_STOPPING_RULES = ("blackbirds", "smoothed")


def _check_data(data: Any, device: torch.device) -> Any:
    if isinstance(data, Tensor):
        return data.to(device)
    if isinstance(data, list | tuple) and data and all(isinstance(d, Tensor) for d in data):
        return [d.to(device) for d in data]
    raise TypeError(
        f"`data` must be a tensor or a non-empty list of tensors, got {type(data).__name__}."
    )


def _family_device(family: Any) -> torch.device:
    params = list(family.parameters()) if hasattr(family, "parameters") else []
    return params[0].device if params else torch.device("cpu")


def _check_regularisation(reg: float, epoch: int) -> None:
    """Stop at the first epoch whose w * KL(q || prior) is NaN: its gradient would make q NaN.

    Example:
        >>> try:
        ...     _check_regularisation(float("nan"), 3)
        ... except RuntimeError as error:
        ...     print(str(error)[:46])
        epoch 3: the KL term w * KL(q || prior) is NaN
    """
    if math.isnan(reg):
        raise RuntimeError(
            f"epoch {epoch}: the KL term w * KL(q || prior) is NaN: the prior's "
            "log-density is NaN at q's draws (a prior parameter that is zero, negative or NaN, "
            "or a prior whose support q leaves) or q's parameters became NaN (lower the "
            "learning rate or set gradient_clipping_norm)."
        )


class VI:
    r"""Generalised variational inference with gradients through the simulator.

    Arguments (BlackBIRDS' signature, same defaults and meaning):
        loss: ``loss(theta, data)``: a scalar for one draw theta (D,), or, for a loss with
            ``batched = True`` (every gradcal loss builder), (B,) for theta (B, D).
        prior: a :class:`torch.distributions.Distribution` over theta (D,), or any object
            with ``log_prob(theta)`` and ``sample`` (e.g. a ``TrainableGaussian``).
        posterior_estimator: the family q: a gradcal family, a normflows flow, a zuko flow,
            a torch distribution with ``rsample``, or any object whose ``sample(n)``
            returns (theta (n, D), log_q (n,)) (``log_prob`` is needed only by the score
            estimator).
        w: weight of KL(q || prior); the target is proportional to exp(-l / w) prior.
            ``"calibrate"`` (or a :class:`~gradcal.infer.weight.WeightCalibration` with
            its options): chosen from the data at the start of :meth:`run` so that credible
            sets reach their nominal coverage; the choice is kept in ``weight_choice``.
        initialize_estimator_to_prior: first fit q to the prior (minimise the KL).
        initialization_lr: learning rate of that fit.
        gradient_clipping_norm: clip the gradient norm of q's parameters at this value.
        optimizer: a torch optimiser over q's parameters (default Adam, lr 1e-3).
        n_samples_per_epoch: draws B per epoch.
        n_samples_regularisation: draws of the Monte Carlo KL when no closed form exists.
        diff_mode: ``"reverse"`` or ``"forward"`` (pathwise estimator only).
        gradient_estimation_method: ``"pathwise"`` or ``"score"``.
        jacobian_chunk_size: forward mode: tangent directions pushed through at once.
        device: where q lives: a family on the CPU is moved there; data and (a copy of)
            the prior follow q.
        progress_bar, progress_info: show a tqdm bar, with loss figures.
        log_tensorboard, tensorboard_log_dir: write TensorBoard scalars (``tensorboard``
            extra; torch's default folder ``runs/`` when no folder is given).

    New arguments (keyword only):
        seed: seed of a private random stream (the global one is left as it was); the same
            seed gives the same run.
        batching: ``"auto"``, ``"native"``, ``"vmap"`` or ``"loop"`` (see
            :class:`gradcal.gradients.BatchedLoss`).
        score_baseline: ``"leave_one_out"`` or None (score estimator).
        kl: ``"auto"`` (closed form where registered), ``"analytic"`` or ``"monte_carlo"``.
        checkpoint_dir: write ``last.pt`` every epoch and ``best.pt`` on improvement,
            atomically; nothing is written without it.
        resume: continue from ``checkpoint_dir/last.pt`` if it exists.
        max_failed_epochs: stop with an error after this many consecutive epochs in which
            every draw failed (NaN or infinite loss).
        scheduler: an optional learning-rate scheduler, stepped after each epoch.
        stopping: the early-stopping and best-state rule (see :meth:`run`):
            ``"blackbirds"`` (BlackBIRDS' rule, the default) compares each epoch's total;
            ``"smoothed"`` compares an exponential moving average of the totals.
        smoothing_window: span N of that average (weight 2 / (N + 1) on the newest
            epoch; noise sd shrinks about sqrt(N)-fold, the average lags about N / 2
            epochs): keep it well below the patience. Used by ``"smoothed"`` only.
        objective: the divergence minimised (:mod:`gradcal.infer.objectives`):
            ``"reverse_kl"`` (the default, BlackBIRDS' objective), ``"importance_weighted"``,
            ``"renyi"``, ``"forward_kl"``, or an objective instance with its options
            (``Renyi(alpha=0.2, k=8)``). The last three need w > 0, fold the KL term into
            the objective (``regularisation`` in the history is then the total minus the
            mean loss) and add ``ess`` (importance-sampling effective sample size) to the
            history.
        anneal: a :class:`~gradcal.infer.annealing.GeometricAnnealing` schedule: w starts
            broad and falls to ``w`` (``w`` is then added to the history); its epochs are
            not compared for the best state or the patience.

    After :meth:`run`: ``losses_hist`` (keys ``total``, ``loss``, ``regularisation``,
    ``dropped`` (draws of the loss dropped), ``dropped_kl`` (Monte Carlo KL draws dropped),
    and ``smoothed`` under the smoothed rule; one value per epoch), ``best_loss`` and
    ``best_estimator_state_dict``. q itself holds the last state.

    Example:
        >>> from gradcal.losses import NegativeLogLikelihood
        >>> from gradcal.models import Normal
        >>> from gradcal.posterior_estimators import DiagonalGaussian
        >>> class KnownScale(Normal):          # unknown mean, known scale 1
        ...     n_params = 1
        ...     def log_likelihood(self, params, x):
        ...         return torch.distributions.Normal(params, 1.0).log_prob(x).sum(-1)
        >>> y = torch.randn(20) + 2.0
        >>> prior = torch.distributions.Independent(
        ...     torch.distributions.Normal(torch.zeros(1), 10 * torch.ones(1)), 1)
        >>> q = DiagonalGaussian(torch.zeros(1))
        >>> vi = VI(NegativeLogLikelihood(KnownScale(20)), prior, q, n_samples_per_epoch=20,
        ...         optimizer=torch.optim.Adam(q.parameters(), lr=0.05), progress_bar=False,
        ...         seed=0)
        >>> vi.run(y, n_epochs=300, max_epochs_without_improvement=300)
        >>> abs(q.loc.item() - y.mean().item()) < 0.1      # posterior mean ~ sample mean
        True
    """

    def __init__(
        self,
        loss: Callable[[Tensor, Any], Tensor],
        prior: torch.distributions.Distribution,
        posterior_estimator: Any,
        w: float = 1.0,
        initialize_estimator_to_prior: bool = False,
        initialization_lr: float = 1e-3,
        gradient_clipping_norm: float = math.inf,
        optimizer: torch.optim.Optimizer | None = None,
        n_samples_per_epoch: int = 10,
        n_samples_regularisation: int = 10_000,
        diff_mode: str = "reverse",
        gradient_estimation_method: str = "pathwise",
        jacobian_chunk_size: int | None = None,
        device: str | torch.device = "cpu",
        progress_bar: bool = True,
        progress_info: bool = True,
        log_tensorboard: bool = False,
        tensorboard_log_dir: str | None = None,
        *,
        seed: int | None = None,
        batching: Batching = "auto",
        score_baseline: Literal["leave_one_out"] | None = "leave_one_out",
        kl: Literal["auto", "analytic", "monte_carlo"] = "auto",
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        max_failed_epochs: int = 10,
        scheduler: Any = None,
        stopping: Literal["blackbirds", "smoothed"] = "blackbirds",
        smoothing_window: int = 20,
        objective: str | Objective = "reverse_kl",
        anneal: GeometricAnnealing | None = None,
    ):
        check_prior(prior)
        w, self.calibration = resolve_w(w)  # "calibrate": chosen at the start of run()
        self.weight_choice: WeightChoice | None = None
        for name, value in (
            ("n_samples_per_epoch", n_samples_per_epoch),
            ("n_samples_regularisation", n_samples_regularisation),
            ("max_failed_epochs", max_failed_epochs),
            ("smoothing_window", smoothing_window),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        if kl not in _KL_METHODS:
            raise ValueError(f"`kl` must be one of {_KL_METHODS}, got {kl!r}.")
        if stopping not in _STOPPING_RULES:
            raise ValueError(f"`stopping` must be one of {_STOPPING_RULES}, got {stopping!r}.")
        if resume and checkpoint_dir is None:
            raise ValueError("`resume=True` needs a `checkpoint_dir` to resume from.")
        self.estimator = make_estimator(
            gradient_estimation_method, diff_mode, jacobian_chunk_size, score_baseline
        )
        self.objective = make_objective(objective)
        self.objective.check(gradient_estimation_method, diff_mode)
        if anneal is not None and not isinstance(anneal, GeometricAnnealing):
            raise TypeError(
                f"`anneal` must be a GeometricAnnealing or None, got {type(anneal).__name__}."
            )
        calibrated = self.calibration is not None  # w > 0 once chosen
        if anneal is not None and not (calibrated or w > 0):
            raise ValueError(f"`anneal` needs a target `w` > 0, got {w!r}.")
        self.anneal = anneal
        if not self.objective.uses_kl_term and not (calibrated or w > 0):
            raise ValueError(f"objective {self.objective.name!r} needs `w` > 0, got {w!r}.")
        self.batched_loss = BatchedLoss(loss, batching)
        self.loss, self.prior, self.posterior_estimator = loss, prior, posterior_estimator
        self.family = as_family(posterior_estimator)
        # State dicts are the user's own object's where it is a module (so that
        # posterior_estimator.load_state_dict(vi.best_estimator_state_dict) works).
        self._module = (
            posterior_estimator
            if isinstance(posterior_estimator, torch.nn.Module)
            else self.family
        )
        d = prior_dim(prior)
        if d is not None and self.family.dim != d:
            raise ValueError(
                f"the prior is over {d} parameter(s) but the posterior estimator draws "
                f"{self.family.dim}."
            )
        if isinstance(self.family, torch.nn.Module) and _family_device(self.family).type == "cpu":
            self.family.to(device)
        self.w, self.kl, self.seed = w, kl, seed
        self.initialize_estimator_to_prior = initialize_estimator_to_prior
        self.initialization_lr = initialization_lr
        self.gradient_clipping_norm = gradient_clipping_norm
        self.optimizer = optimizer or torch.optim.Adam(self.family.parameters(), lr=1e-3)
        self.scheduler = scheduler
        self.n_samples_per_epoch = n_samples_per_epoch
        self.n_samples_regularisation = n_samples_regularisation
        self.diff_mode, self.gradient_estimation_method = diff_mode, gradient_estimation_method
        self.jacobian_chunk_size = jacobian_chunk_size
        self.device = _family_device(self.family)
        if distribution_device(prior) != self.device:  # the KL needs the prior beside q
            self.prior = distribution_to(prior, self.device)
        self.progress_bar, self.progress_info = progress_bar, progress_info
        self.log_tensorboard, self.tensorboard_log_dir = log_tensorboard, tensorboard_log_dir
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.resume, self.max_failed_epochs = resume, max_failed_epochs
        self.stopping, self.smoothing_window = stopping, smoothing_window
        self._reset_history()

    # --- one epoch ------------------------------------------------------------------------

    def regularisation(self) -> Tensor:
        """w * KL(q || prior), differentiable (0 when w = 0), on fresh draws of q.

        ``kl_dropped`` keeps how many Monte Carlo draws of the KL were dropped (non-finite
        log q or log prior, e.g. a draw on a bound of the prior's support).
        """
        self.kl_dropped = 0
        if self.w == 0.0:
            return torch.zeros((), device=self.device)
        kl, self.kl_dropped = kl_estimate(
            self.family,
            self.prior,
            self.kl,
            self.n_samples_regularisation,
            getattr(self.objective, "sticking_the_landing", False),
        )
        return self.current_w * kl

    def _closed_form_or_draws(self) -> tuple[Tensor | None, int]:
        """This epoch's w * KL when no Monte Carlo draw is needed (w = 0, or a closed form
        under ``kl`` "auto" or "analytic"), else None; and the KL draws to ask for."""
        if self.w == 0.0:
            return torch.zeros((), device=self.device), 0
        if self.kl != "monte_carlo":
            kl = closed_form_kl(self.family, self.prior)
            if kl is not None:
                return self.current_w * kl, 0
            if self.kl == "analytic":  # kl_estimate names the missing closed form
                kl_estimate(self.family, self.prior, "analytic")
        return None, self.n_samples_regularisation

    @property
    def current_w(self) -> float:
        """The weight w of this epoch: ``w``, or the annealing schedule's value."""
        return self.w if self.anneal is None else self.anneal.w_at(self._epoch, self.w)

    def step(self, data: Any) -> tuple[float, float, float, EpochEstimate]:
        """Gradients of one epoch into q (not yet applied): (total, loss, regularisation, info).

        The loss draws and the Monte Carlo KL draws come from one call of q's ``sample``
        (independent draws, split), and the estimator's surrogate and w * KL go back
        through q in one backward pass.
        """
        self.optimizer.zero_grad()
        if not self.objective.uses_kl_term:
            return self._weighted_step(data)
        self.kl_dropped = 0
        regularisation, kl_draws = self._closed_form_or_draws()
        epoch = self.estimator.surrogate(
            self.family, self.batched_loss, data, self.n_samples_per_epoch, kl_draws
        )
        if regularisation is None:  # Monte Carlo, on the extra draws
            kl, self.kl_dropped = kl_from_draws(
                self.family,
                self.prior,
                *epoch.extra,
                getattr(self.objective, "sticking_the_landing", False),
            )
            regularisation = self.current_w * kl
        # Every rank estimates w * KL on its own draws; the mean over ranks is the estimate.
        regularisation = regularisation / world_size()
        surrogate = regularisation if epoch.value is None else epoch.value + regularisation
        if surrogate.requires_grad:
            surrogate.backward()
        sum_gradients(self.family.parameters())  # the same gradient on every rank
        if math.isfinite(self.gradient_clipping_norm):
            torch.nn.utils.clip_grad_norm_(self.family.parameters(), self.gradient_clipping_norm)
        reg_and_dropped = torch.stack(
            (regularisation.detach().double().cpu(), torch.tensor(float(self.kl_dropped)).double())
        )
        reg, kl_dropped = (float(x) for x in all_reduce_sum(reg_and_dropped))
        self.kl_dropped = int(kl_dropped)  # over every rank's draws
        estimate = epoch.estimate
        return estimate.loss + reg, estimate.loss, reg, estimate

    def _weighted_step(self, data: Any) -> tuple[float, float, float, EpochEstimate]:
        """An epoch of an objective that holds its own prior term (not reverse KL)."""
        self.kl_dropped = 0
        estimate = self.objective(
            self.family,
            self.batched_loss,
            data,
            self.n_samples_per_epoch,
            self.prior,
            self.current_w,
            self.estimator,
        )
        sum_gradients(self.family.parameters())
        if math.isfinite(self.gradient_clipping_norm):
            torch.nn.utils.clip_grad_norm_(self.family.parameters(), self.gradient_clipping_norm)
        return estimate.total, estimate.loss, estimate.total - estimate.loss, estimate

    def initialize_estimator(
        self,
        max_epochs_without_improvement: int = 50,
        atol: float = 1e-2,
        max_epochs: int = 10_000,
    ) -> None:
        """Fit q to the prior: minimise KL(q || prior) with Adam at ``initialization_lr``."""
        optimizer = torch.optim.Adam(self.family.parameters(), lr=self.initialization_lr)
        best, stall = math.inf, 0
        for _ in range(max_epochs):
            optimizer.zero_grad()
            kl = kl_divergence(self.family, self.prior, self.kl, self.n_samples_regularisation)
            kl.backward()
            optimizer.step()
            value = float(kl.detach())
            best, stall = (value, 0) if value < best else (best, stall + 1)
            if stall >= max_epochs_without_improvement or abs(value) < atol:
                break

    # --- the loop -------------------------------------------------------------------------

    @property
    def best_loss(self) -> Tensor:
        """The lowest total (or smoothed total) so far, as a 0-d float64 tensor, as in
        BlackBIRDS (``vi.best_loss.item()``); ``inf`` before the first epoch."""
        return torch.tensor(self._best_value, dtype=torch.float64)

    @best_loss.setter
    def best_loss(self, value: float | Tensor) -> None:
        self._best_value = float(value)

    def _reset_history(self) -> None:
        self.losses_hist: dict[str, list[float]] = defaultdict(list)
        self.best_loss = math.inf  # a float inside; read back as a 0-d tensor (BlackBIRDS)
        self.best_estimator_state_dict: dict[str, Tensor] | None = None
        self._epoch = self._stall = self._failed = 0
        self.kl_dropped = 0
        self._ema, self._ema_count = 0.0, 0  # the smoothed rule's running average

    def _state(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "family": self._module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": all_gather_objects(get_rng_state()),  # one state per rank
            "history": dict(self.losses_hist),
            "best_loss": self._best_value,
            "best_state": self.best_estimator_state_dict,
            "stall": self._stall,
            "failed": self._failed,
            "ema": [self._ema, self._ema_count],
            "batching": self.batched_loss.mode,
            "w": self.w,  # the target w (annealing's schedule runs from the epoch)
            "weight_choice": (
                None if self.weight_choice is None else weight_choice_state(self.weight_choice)
            ),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self._module.load_state_dict(state["family"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        states = state["rng"]
        if len(states) == world_size():
            set_rng_state(states[rank()])
        else:  # another number of ranks: a fresh stream per rank (not bit-identical)
            torch.manual_seed((self.seed or 0) + 7919 * state["epoch"] + rank())
        self.losses_hist = defaultdict(list, state["history"])
        self.best_loss, self.best_estimator_state_dict = state["best_loss"], state["best_state"]
        self._epoch, self._stall, self._failed = state["epoch"], state["stall"], state["failed"]
        self._ema, self._ema_count = state.get("ema", (0.0, 0))
        self.batched_loss.mode = state["batching"]

    def _tensorboard(self) -> Any:
        if not self.log_tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "log_tensorboard=True needs the tensorboard package: "
                "pip install 'gradcal[tensorboard]'."
            ) from error
        # a resumed run drops the events written after its checkpoint, so none repeat
        return SummaryWriter(log_dir=self.tensorboard_log_dir, purge_step=self._epoch or None)

    def criterion(self, total: float) -> float:
        """The figure compared with ``best_loss`` for an epoch whose total is ``total``.

        ``"blackbirds"``: the total itself. ``"smoothed"``: the bias-corrected exponential
        moving average m_t / (1 - beta^t), m_t = beta m_(t-1) + (1 - beta) total_t,
        beta = 1 - 2 / (smoothing_window + 1); a non-finite total leaves it unchanged and
        counts as no improvement (NaN). Call once per epoch: it updates the average.

        Example:
            >>> q = torch.distributions.Normal(torch.zeros(1, requires_grad=True), 1.0)
            >>> prior = torch.distributions.Normal(torch.zeros(1), 1.0)
            >>> vi = VI(lambda t, y: t.sum(), prior, q, stopping="smoothed", smoothing_window=3)
            >>> [round(vi.criterion(total), 3) for total in (4.0, 2.0, 2.0)]  # beta = 1/2
            [4.0, 2.667, 2.286]
        """
        if self.stopping == "blackbirds":
            return total
        if not math.isfinite(total):
            return math.nan
        beta = 1.0 - 2.0 / (self.smoothing_window + 1)
        self._ema = beta * self._ema + (1.0 - beta) * total
        self._ema_count += 1
        return self._ema / (1.0 - beta**self._ema_count)

    def _record(self, total: float, loss: float, reg: float, dropped: int) -> bool:
        """Append to the history and track the best state; True when the criterion improved.

        Called after the epoch's optimiser step: the state kept as the best is q after the
        step taken from the epoch that set the record (BlackBIRDS' convention).
        """
        for key, value in (
            ("total", total),
            ("loss", loss),
            ("regularisation", reg),
            ("dropped", dropped),
            ("dropped_kl", self.kl_dropped),
        ):
            self.losses_hist[key].append(value)
        if self.anneal is not None:
            self.losses_hist["w"].append(self.current_w)
            if self.anneal.active(self._epoch):  # totals at another w: not compared
                return False
        value = self.criterion(total)
        if self.stopping != "blackbirds":
            self.losses_hist[self.stopping].append(value)
        if value < self._best_value:
            self.best_loss, self._stall = value, 0
            self.best_estimator_state_dict = copy.deepcopy(self._module.state_dict())
            return True
        self._stall += 1
        return False

    def run(self, data: Any, n_epochs: int, max_epochs_without_improvement: int = 20) -> None:
        """Train for up to ``n_epochs`` epochs, stopping after ``max_epochs_without_improvement``
        epochs in a row without a new lowest criterion.

        Every epoch (BlackBIRDS' order): estimate the total at the current q, take the
        optimiser step, then compare the criterion (the total, or its moving average under
        ``stopping="smoothed"``) with ``best_loss``. On a new lowest value q *after* that step
        is copied into ``best_estimator_state_dict``. The stopping epoch takes its step too,
        so a run of E epochs takes E optimiser steps, and q is left in its last state (load
        ``best_estimator_state_dict`` for the best one). A resumed run that had already
        stopped takes no further epoch.

        Arguments:
            data: the observed data handed to ``loss(theta, data)``: a tensor or a list of
                tensors, one per output of the model.
            n_epochs: total epochs, counting those of a resumed run.
            max_epochs_without_improvement: patience of the early stopping.
        """
        alone = launched_without_process_group()
        if alone is not None:
            raise RuntimeError(f"VI.run: {alone}.")
        data = _check_data(data, self.device)
        if isinstance(n_epochs, bool) or not isinstance(n_epochs, int) or n_epochs < 0:
            raise ValueError(f"`n_epochs` must be an int >= 0, got {n_epochs!r}.")
        if self.n_samples_per_epoch < world_size():  # every rank needs a draw
            raise ValueError(
                f"`n_samples_per_epoch` ({self.n_samples_per_epoch}) must be at least the "
                f"number of ranks ({world_size()})."
            )
        resumed = self._checkpoint_to_resume()
        self._set_w(data, resumed)
        seed = None if self.seed is None and world_size() == 1 else (self.seed or 0) + rank()
        with seeded(seed, self.device):
            self._start(resumed)
            broadcast_module(self._module)  # after any fit to the prior: one q everywhere
            writer = self._tensorboard() if is_main() else None
            try:
                self._loop(data, n_epochs, max_epochs_without_improvement, writer)
            finally:
                if writer is not None:
                    writer.close()
        self._warn_if_mass_missed()

    def _warn_if_mass_missed(self, last: int = 10) -> None:
        """Warn in words when the ESS of the last epochs shows that q misses mass."""
        ess = [e for e in self.losses_hist.get("ess", [])[-last:] if math.isfinite(e)]
        if not ess:
            return
        fraction = sum(ess) / len(ess) / self.n_samples_per_epoch
        message = mass_warning(ess_fraction=fraction, objective=self.objective.name)
        if message is not None and is_main():
            warnings.warn(f"VI: {message}", GradcalWarning, stacklevel=3)

    def mass_check(self, data: Any, n_samples: int = 1000, seed: int | None = 0) -> dict:
        """PSIS k-hat and the IS effective sample size of q against the generalised posterior
        exp(-l / w) prior, from ``n_samples`` fresh draws of q (one simulation each), with a
        warning in words when they show that q misses mass (:func:`mass_warning`).

        Returns ``{"khat": float, "ess_fraction": float, "warning": str | None}``.
        """
        if not self.w > 0:
            raise ValueError(f"`mass_check` needs w > 0, got {self.w!r}.")
        data = _check_data(data, self.device)
        with seeded(seed, self.device), torch.no_grad():
            theta, log_q = self.family.sample(n_samples)
            theta = theta[:, None] if theta.ndim == 1 else theta
            log_p = prior_log_prob(self.prior, theta) - self.batched_loss(theta, data) / self.w
            log_w = torch.nan_to_num((log_p - log_q).double(), nan=-math.inf)
        khat = psis_khat(log_w)[0]
        fraction = importance_ess(log_w) / n_samples
        message = mass_warning(khat, fraction, self.objective.name)
        if message is not None and is_main():
            warnings.warn(f"VI: {message}", GradcalWarning, stacklevel=2)
        return {"khat": khat, "ess_fraction": fraction, "warning": message}

    def _checkpoint_to_resume(self) -> dict[str, Any] | None:
        """The state in ``checkpoint_dir/last.pt`` when resuming and it exists, else None."""
        last = None if self.checkpoint_dir is None else self.checkpoint_dir / "last.pt"
        if self.resume and last is not None and last.exists():
            return load_checkpoint(last, map_location=self.device)
        return None

    def _set_w(self, data: Any, resumed: dict[str, Any] | None) -> None:
        """Settle w before the first epoch: a number is kept; ``"calibrate"`` takes the
        checkpoint's choice when resuming one that holds it, else chooses once, on rank 0,
        and gives every rank that choice. Warns when the checkpoint was written at another w.
        """
        saved = None if resumed is None else resumed.get("weight_choice")
        if self.calibration is not None and saved is not None:
            self.weight_choice = weight_choice_from_state(saved)
            self.w = self.weight_choice.w
            logger.info("w from the checkpoint: %s", self.weight_choice.summary())
        elif self.calibration is not None and self.weight_choice is None:
            self.weight_choice = choose_w_once(self.calibration, self.loss, self.prior, data)
            self.w = self.weight_choice.w
            logger.info("choosing w: %s", self.weight_choice.summary())
        written_at = None if resumed is None else resumed.get("w")
        if written_at is not None and written_at != self.w and is_main():
            warn_problem(
                f"VI: the checkpoint was written at w = {written_at:.6g} but this run "
                f"continues at w = {self.w:.6g}: its epochs target two different posteriors "
                "and the best state compares totals at two w."
            )

    def _start(self, resumed: dict[str, Any] | None) -> None:
        if resumed is not None:
            self._restore(resumed)
            where = self.checkpoint_dir / "last.pt" if self.checkpoint_dir else None
            logger.info("resumed from %s at epoch %d", where, self._epoch)
            return
        self._reset_history()
        if self.initialize_estimator_to_prior:
            self.initialize_estimator()

    def _loop(self, data: Any, n_epochs: int, patience: int, writer: Any) -> None:
        bar = tqdm(
            range(self._epoch, n_epochs),
            initial=self._epoch,
            total=n_epochs,
            disable=not (self.progress_bar and is_main()),
            desc="VI",
        )
        stopped = self._epoch > 0 and self._stall >= patience  # resumed, had stopped already
        for epoch in [] if stopped else bar:
            total, loss, reg, estimate = self.step(data)
            if estimate.n_valid:
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
            improved = self._record(total, loss, reg, estimate.n_dropped)
            if not self.objective.uses_kl_term:
                self.losses_hist["ess"].append(getattr(estimate, "ess", math.nan))
            if self.objective.uses_kl_term:  # the others hold no separate KL term
                _check_regularisation(reg, epoch)
            self._check_failures(estimate, epoch)
            if writer is not None:
                for key in ("total", "loss", "regularisation", "dropped"):
                    writer.add_scalar(f"Loss/{key}", self.losses_hist[key][-1], epoch)
            if self.progress_info:
                bar.set_postfix(
                    loss=f"{loss:.4g}",
                    reg=f"{reg:.4g}",
                    total=f"{total:.4g}",
                    best=f"{self._best_value:.4g}",
                    stall=self._stall,
                    dropped=estimate.n_dropped,
                )
            self._epoch = epoch + 1
            self._save(improved)
            if self._stall >= patience:
                logger.info("stopping early: no improvement for %d epochs", patience)
                break
        bar.close()

    def _check_failures(self, estimate: EpochEstimate, epoch: int) -> None:
        self._failed = 0 if estimate.n_valid else self._failed + 1
        if self._failed >= self.max_failed_epochs:
            cause = (
                "from the first epoch on: the simulator returns NaN or infinite values at the "
                "family's first draws (near the prior), or the loss cannot compare them with "
                "the data (NaN in the data, a series too short for its window)"
                if self._failed > epoch
                else "after training went well: q moved to parameters where the simulator "
                "fails; lower the learning rate or gradient_clipping_norm, or narrow the prior"
            )
            raise RuntimeError(
                f"every draw failed (NaN or infinite loss) in {self._failed} consecutive "
                f"epoch(s), up to epoch {epoch}, {cause}."
            )

    def _save(self, improved: bool) -> None:
        if self.checkpoint_dir is None:
            return
        state = self._state()  # a collective: every rank takes part
        if not is_main():
            return
        save_checkpoint(self.checkpoint_dir / "last.pt", state)
        if improved:
            save_checkpoint(self.checkpoint_dir / "best.pt", state)
