r"""The time loop: run a :class:`~gradcal.models.model.Model`, observe it, cut gradients.

The gradient horizon k implements truncated backpropagation through time: every k steps
the retained history is detached, so no gradient path crosses more than k transitions.
``k = 0`` leaves only each step's direct dependence on the parameters; ``None`` keeps the
full graph. Values are never changed by the horizon, only gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradcal.compat.simulate import compute_loss  # BlackBIRDS' helper, at its path
from gradcal.models.model import Model

__all__ = ["compute_loss", "run_model", "simulate_and_observe_model"]

logger = logging.getLogger("gradcal")


def _check_horizon(gradient_horizon: Any) -> None:
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


def _detach_now(t: int, horizon: int | None) -> bool:
    if horizon is None:
        return False
    return horizon == 0 or (t > 0 and t % horizon == 0)


def _time_loop(
    model: Model, params: Tensor, horizon: int | None, record: Callable[[Any], Any]
) -> list[Any]:
    """Run the model in its native layout and return ``record`` of every new stretch."""
    axis = getattr(model, "time_axis", 0)
    trim = getattr(model, "trim_time_series", lambda x: x)
    detach = getattr(model, "detach", lambda x: x.detach() if isinstance(x, Tensor) else x)
    # An overridden trim_time_series decides itself what the next step reads.
    own_trim = getattr(type(model), "trim_time_series", None) is Model.trim_time_series
    markov = own_trim and getattr(model, "history_length", None) == 1
    state = model.initialize(params)
    records = [record(state)]
    for t in range(model.n_timesteps):
        state = trim(state)
        if _detach_now(t, horizon):
            state = detach(state)
        x = model(params, state)
        records.append(record(x))
        if markov:  # the next step reads x alone: skip a copy trim would discard
            state = x
        elif state is not None:
            state = torch.cat((state, x), dim=axis)
    return records


def _run(model: Model, params: Tensor, horizon: int | None, observe: bool) -> Any:
    """Dispatch on (D,) / (B, D) and the model's layout; ``observe`` picks the result."""
    _check_model(model)
    _check_horizon(horizon)
    if isinstance(params, Tensor) and params.ndim == 0 and getattr(model, "n_params", 0) == 1:
        params = params.reshape(1)  # a 0-d tensor is one draw of a one-parameter model
    Model.check_params(model, params)  # also for duck-typed models
    batched_model = getattr(model, "batched", False)
    record = (lambda x: _as_list(model.observe(x))) if observe else (lambda x: x)
    axis = 1 if batched_model else 0

    if params.ndim == 2 and not batched_model:
        logger.debug(
            "%s is a single-draw model: running %d draws one by one.",
            type(model).__name__,
            params.shape[0],
        )
        runs = [_run(model, p, horizon, observe) for p in params]
        if observe:
            return [torch.stack(parts) for parts in zip(*runs, strict=True)]
        return torch.stack(runs)

    native = params[None] if (batched_model and params.ndim == 1) else params
    records = _time_loop(model, native, horizon, record)
    if observe:
        result = [torch.cat(parts, dim=axis) for parts in zip(*records, strict=True)]
    else:
        result = torch.cat(records, dim=axis) if records[0] is not None else None
    if batched_model and params.ndim == 1:
        result = [r[0] for r in result] if observe else result[0]
    return result


def simulate_and_observe_model(
    model: Model, params: Tensor, gradient_horizon: int | None = None
) -> list[Tensor]:
    r"""Run ``model`` at ``params`` and return its observed outputs.

    Arguments:
        model: a :class:`~gradcal.models.model.Model`.
        params: (D,) for one draw or (B, D) for B draws.
        gradient_horizon: None (full gradient through time), 0 (none), or k: the history is
            detached every k steps.

    Returns:
        The list ``observe`` defines, concatenated over time: each entry (T_out, ...) for
        one draw and (B, T_out, ...) for B draws.

    Example:
        >>> from gradcal.models import RandomWalk
        >>> _ = torch.manual_seed(0)
        >>> (x,) = simulate_and_observe_model(RandomWalk(5), torch.zeros(8, 1))
        >>> x.shape
        torch.Size([8, 6, 1])
    """
    return _run(model, params, gradient_horizon, observe=True)


def run_model(model: Model, params: Tensor, gradient_horizon: int | None = None) -> Any:
    """Run ``model`` at ``params`` and return the whole history (initial state included).

    Shapes are (T + 1, ...) for one draw and (B, T + 1, ...) for (B, D) parameters when
    the initial history is one step long.
    """
    return _run(model, params, gradient_horizon, observe=False)
