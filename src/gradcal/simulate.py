r"""The time loop: run a :class:`~gradcal.models.model.Model`, observe it, cut gradients.

The gradient horizon k implements truncated backpropagation through time: every k steps
the retained history is detached, so no gradient path crosses more than k transitions.
``k = 0`` leaves only each step's direct dependence on the parameters; ``None`` keeps the
full graph. Values are never changed by the horizon, only gradients.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from gradcal.compat.simulate import compute_loss  # BlackBIRDS' helper, at its path
from gradcal.history import LazyHistory, append_step, materialise
from gradcal.models.model import Model

__all__ = [
    "batch_of_draws",
    "check_checkpoint_every",
    "check_gradient_horizon",
    "compute_loss",
    "run_model",
    "simulate_and_observe_model",
]

logger = logging.getLogger("gradcal")

_IN_BATCH_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "gradcal_in_batch_call", default=False
)


@contextlib.contextmanager
def batch_of_draws() -> Iterator[None]:
    """Within the block, parameters (1, D) given to a simulation are a batch of one draw.

    Outside it (the default), a (1, D) tensor is one draw, as BlackBIRDS' users pass
    ``q.sample(1)[0]``: ``run_and_observe`` then returns the one-draw layout. gradcal's
    engine runs every batched loss inside this block, so a loss written for (B, D) sees
    (1, ...) outputs when a call happens to have one draw. See :func:`simulate_and_observe_model`.

    Example:
        >>> from gradcal.models import RandomWalk
        >>> model = RandomWalk(3)
        >>> model.run_and_observe(torch.zeros(1, 1))[0].shape
        torch.Size([4, 1])
        >>> with batch_of_draws():
        ...     model.run_and_observe(torch.zeros(1, 1))[0].shape
        torch.Size([1, 4, 1])
    """
    token = _IN_BATCH_CALL.set(True)
    try:
        yield
    finally:
        _IN_BATCH_CALL.reset(token)


def _one_draw_rows(params: Any, batch: Any) -> Any:
    """``params`` with a (1, D) single draw read as (D,), by the rule of ``batch``.

    ``batch=None``: (1, D) is one draw (BlackBIRDS' layout) unless inside
    :func:`batch_of_draws`; ``True``: 2-D params are always a batch; ``False``: one draw.
    """
    if batch is not None and not isinstance(batch, bool):
        raise TypeError(f"`batch` must be None, True or False, got {batch!r}.")
    if not isinstance(params, Tensor):
        return params
    if batch is True and params.ndim != 2:
        raise ValueError(
            f"`batch=True` needs `params` of shape (B, D), got {tuple(params.shape)}."
        )
    if batch is False and params.ndim == 2 and params.shape[0] != 1:
        raise ValueError(
            f"`batch=False` needs one draw, (D,) or (1, D), got {tuple(params.shape)}."
        )
    one = batch is False or (batch is None and not _IN_BATCH_CALL.get())
    if one and params.ndim == 2 and params.shape[0] == 1:
        return params[0]
    return params


def check_gradient_horizon(gradient_horizon: Any) -> None:
    """Raise unless ``gradient_horizon`` is None or an int >= 0 (a public boundary check)."""
    if gradient_horizon is None:
        return
    if isinstance(gradient_horizon, bool) or not isinstance(gradient_horizon, int):
        raise TypeError(
            f"`gradient_horizon` must be None or an int >= 0, got {gradient_horizon!r}."
        )
    if gradient_horizon < 0:
        raise ValueError(f"`gradient_horizon` must be None or >= 0, got {gradient_horizon}.")


def _check_model(model: Any) -> None:
    if not isinstance(model, Model):
        missing = [m for m in ("initialize", "step", "observe") if not hasattr(model, m)]
        if missing:
            raise TypeError(
                f"`model` must be a gradcal.models.model.Model (or implement initialize, "
                f"step and observe); {type(model).__name__} lacks {', '.join(missing)}."
            )
    n = getattr(model, "n_timesteps", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"`model.n_timesteps` must be an int >= 0, got {n!r}.")


def _as_list(outputs: Any) -> list[Tensor]:
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, list | tuple) and all(isinstance(o, Tensor) for o in outputs):
        return list(outputs)
    raise TypeError(
        f"`model.observe` must return a list of tensors, got {type(outputs).__name__}."
    )


def _own_outputs(outputs: Any, x: Any) -> list[Tensor]:
    """``observe``'s outputs, each a tensor of its own rather than a view into the step ``x``.

    A view such as ``x[:, :, 2, 0]`` (one number per draw) would keep the whole step's state
    (B, 1, 3, N) alive until the end of the run: T states in memory even where the
    gradient (forward mode, checkpointing, no gradient) needs none of them.
    """
    return [
        o.clone() if o is not x and (o._base is not None or not o.is_contiguous()) else o
        for o in _as_list(outputs)
    ]


def _detach_now(t: int, horizon: int | None) -> bool:
    if horizon is None:
        return False
    return horizon == 0 or (t > 0 and t % horizon == 0)


def check_checkpoint_every(checkpoint_every: Any) -> None:
    """Raise unless ``checkpoint_every`` is None or an int >= 1 (a public boundary check)."""
    if checkpoint_every is None:
        return
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
        raise TypeError(
            f"`checkpoint_every` must be None or an int >= 1, got {checkpoint_every!r}."
        )
    if checkpoint_every < 1:
        raise ValueError(f"`checkpoint_every` must be None or >= 1, got {checkpoint_every}.")


class _Stepper:
    """One model's loop body: trim, cut gradients at the horizon, step, record, append."""

    def __init__(self, model: Model, horizon: int | None, record: Callable[[Any], Any]):
        self.model, self.horizon, self.record = model, horizon, record
        self.axis = getattr(model, "time_axis", 0)
        self.trim = getattr(model, "trim_time_series", lambda x: x)
        self.detach = getattr(
            model, "detach", lambda x: x.detach() if isinstance(x, Tensor) else x
        )
        # An overridden trim_time_series decides itself what the next step reads.
        own_trim = getattr(type(model), "trim_time_series", None) is Model.trim_time_series
        history_length = getattr(model, "history_length", None)
        self.markov = own_trim and history_length == 1
        # A single-draw history grows as a LazyHistory (no copy of it at every step) unless
        # the model's own default trim would cut it, or the model asks for real tensors.
        self.lazy = (
            self.axis == 0
            and getattr(model, "lazy_history", True)
            and not (own_trim and history_length is not None)
        )

    def __call__(self, params: Tensor, state: Any, t: int) -> tuple[Any, Any]:
        """Step t: the new history and the record of the new step."""
        state = self.trim(state)
        if _detach_now(t, self.horizon):
            state = self.detach(materialise(state))
        x = self.model(params, state)
        if self.markov:  # the next step reads x alone: skip a copy trim would discard
            state = x
        elif state is not None:
            state = self.append(state, x)
        return state, self.record(x)

    def append(self, state: Any, x: Any) -> Any:
        """The history followed by the step ``x`` (a LazyHistory where allowed)."""
        lazy_ok = isinstance(state, Tensor | LazyHistory) and isinstance(x, Tensor)
        if self.lazy and lazy_ok:
            return append_step(state, x)
        return torch.cat((materialise(state), x), dim=self.axis)

    def segment(self, params: Tensor, state: Any, start: int, stop: int) -> tuple[Any, Any]:
        """Steps start..stop-1: the history after them and their records joined in time.

        Joining makes the records fresh tensors: a record that is a view of a step's state
        (``x[:, :, 2, 0]``) would otherwise keep every recomputable state alive.
        """
        records = []
        for t in range(start, stop):
            state, rec = self(params, state, t)
            records.append(rec)
        return materialise(state), _join(records, self.axis)


def _join(records: list[Any], axis: int) -> Any:
    """Records of consecutive stretches joined along time (list-of-outputs or tensors)."""
    if isinstance(records[0], list):
        return [torch.cat(parts, dim=axis) for parts in zip(*records, strict=True)]
    return torch.cat(records, dim=axis) if records[0] is not None else None


def _inside_transform() -> bool:
    """Whether a torch.func transform (vmap, jvp, grad) is running this code.

    :func:`torch.utils.checkpoint.checkpoint` cannot recompute a stretch that ran under
    vmap (the backward pass runs outside it), so the time loop runs plainly there.
    """
    inside = torch._C._functorch.maybe_current_level() is not None
    if inside:
        logger.debug("checkpoint_every is ignored under a torch.func transform.")
    return inside


def _time_loop(
    model: Model,
    params: Tensor,
    horizon: int | None,
    record: Callable[[Any], Any],
    checkpoint_every: int | None = None,
) -> list[Any]:
    """Run the model in its native layout and return ``record`` of every new stretch.

    With ``checkpoint_every = k`` each stretch of k steps runs under
    :func:`torch.utils.checkpoint.checkpoint` (non-reentrant, random streams preserved):
    the forward pass keeps only the history entering each stretch and the stretch's
    records; the backward pass recomputes one stretch at a time from the same random
    numbers, so values and gradients are those of the plain loop. Under a torch.func
    transform (a single-draw loss batched by vmap) the loop runs plainly.
    """
    stepper = _Stepper(model, horizon, record)
    state = model.initialize(params)
    records = [record(state)]
    n = model.n_timesteps
    if checkpoint_every is None or not torch.is_grad_enabled() or _inside_transform():
        for t in range(n):
            state, rec = stepper(params, state, t)
            records.append(rec)
        return records
    for start in range(0, n, checkpoint_every):
        stop = min(start + checkpoint_every, n)
        state, rec = torch.utils.checkpoint.checkpoint(
            stepper.segment, params, state, start, stop, use_reentrant=False
        )
        records.append(rec)
    return records


def _run(
    model: Model,
    params: Tensor,
    horizon: int | None,
    observe: bool,
    checkpoint_every: int | None = None,
    batch: bool | None = None,
) -> Any:
    """Dispatch on (D,) / (B, D) and the model's layout; ``observe`` picks the result."""
    _check_model(model)
    check_gradient_horizon(horizon)
    check_checkpoint_every(checkpoint_every)
    params = _one_draw_rows(params, batch)
    if isinstance(params, Tensor) and params.ndim == 0 and getattr(model, "n_params", 0) == 1:
        params = params.reshape(1)  # a 0-d tensor is one draw of a one-parameter model
    Model.check_params(model, params)  # also for duck-typed models
    batched_model = getattr(model, "batched", False)
    record = (lambda x: _own_outputs(model.observe(x), x)) if observe else (lambda x: x)
    axis = 1 if batched_model else 0

    if params.ndim == 2 and not batched_model:
        logger.debug(
            "%s is a single-draw model: running %d draws one by one.",
            type(model).__name__,
            params.shape[0],
        )
        runs = [_run(model, p, horizon, observe, checkpoint_every) for p in params]
        if observe:
            return [torch.stack(parts) for parts in zip(*runs, strict=True)]
        return torch.stack(runs)

    native = params[None] if (batched_model and params.ndim == 1) else params
    result = _join(_time_loop(model, native, horizon, record, checkpoint_every), axis)
    if batched_model and params.ndim == 1:
        result = [r[0] for r in result] if observe else result[0]
    return result


def simulate_and_observe_model(
    model: Model,
    params: Tensor,
    gradient_horizon: int | None = None,
    checkpoint_every: int | None = None,
    *,
    batch: bool | None = None,
) -> list[Tensor]:
    r"""Run ``model`` at ``params`` and return its observed outputs.

    One draw or a batch: (D,) (or 0-d for one parameter) is one draw; (B, D) with B >= 2 is
    B draws. (1, D) is one draw by default, BlackBIRDS' layout for ``q.sample(1)[0]``, so
    its outputs have no batch axis; it is a batch of one with ``batch=True`` and inside
    :func:`batch_of_draws` (where gradcal's engine calls every batched loss).

    Arguments:
        model: a :class:`~gradcal.models.model.Model`.
        params: (D,) for one draw or (B, D) for B draws.
        gradient_horizon: None (full gradient through time), 0 (none), or k: the history is
            detached every k steps.
        checkpoint_every: None (keep the whole graph through time) or k >= 1: checkpointed
            reverse mode. Only the history entering every k-th step is stored; in the
            backward pass each stretch of k steps is recomputed with the same random numbers
            (the CPU stream and that of the device of ``params`` are saved and restored), so
            values and gradients equal the plain ones while the memory of the graph grows
            like T / k + k instead of T (k near sqrt(T) is the least). Costs one more
            forward pass. The model's ``step`` must be a function of its arguments and the
            random streams only (no state kept on the model between steps). Ignored when
            gradients are off (forward mode, ``torch.no_grad``) and under torch.func
            transforms (a single-draw loss batched with vmap): values and gradients are the
            same, only the memory is not bounded there.
        batch: None (the rule above), True (``params`` (B, D) is a batch, also for B = 1)
            or False (one draw: (D,) or (1, D)).

    Returns:
        The list ``observe`` defines, concatenated over time: each entry (T_out, ...) for
        one draw and (B, T_out, ...) for B draws.

    Example:
        >>> from gradcal.models import RandomWalk
        >>> _ = torch.manual_seed(0)
        >>> (x,) = simulate_and_observe_model(RandomWalk(5), torch.zeros(8, 1))
        >>> x.shape
        torch.Size([8, 6, 1])
        >>> simulate_and_observe_model(RandomWalk(5), torch.zeros(1, 1))[0].shape
        torch.Size([6, 1])
        >>> simulate_and_observe_model(RandomWalk(5), torch.zeros(1, 1), batch=True)[0].shape
        torch.Size([1, 6, 1])
    """
    return _run(model, params, gradient_horizon, True, checkpoint_every, batch)


def run_model(
    model: Model,
    params: Tensor,
    gradient_horizon: int | None = None,
    *,
    batch: bool | None = None,
) -> Any:
    """Run ``model`` at ``params`` and return the whole history (initial state included).

    Shapes are (T + 1, ...) for one draw and (B, T + 1, ...) for (B, D) parameters when
    the initial history is one step long; one draw or a batch (``batch``, (1, D)) as in
    :func:`simulate_and_observe_model`.
    """
    return _run(model, params, gradient_horizon, observe=False, batch=batch)
