"""The ``Model`` contract every simulator follows: ``initialize``, ``step``, ``observe``."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradcal.compat.models import detach_gradient_horizon
from gradcal.history import materialise

__all__ = ["Model", "accepts_one_draw", "accepts_one_history"]

#: Methods whose override by a subclass defined outside gradcal makes it a single-draw model.
SINGLE_DRAW_HOOKS = ("initialize", "step", "observe", "trim_time_series")


def accepts_one_draw(method: Callable[..., Any]) -> Callable[..., Any]:
    """Let a batched model's ``initialize``/``step`` also take one draw.

    The method is written for ``params`` (B, D) and histories (B, T, ...). Called with
    ``params`` of shape (D,) (or 0-d for a one-parameter model) and a single-draw history
    (T, ...), it runs as a batch of one and returns the result without the batch axis.

    Example:
        >>> from gradcal.models import RandomWalk
        >>> RandomWalk(3).initialize(torch.tensor(0.0)).shape
        torch.Size([1, 1])
    """

    @functools.wraps(method)
    def wrapper(self: Model, params: Tensor, *args: Any) -> Any:
        if isinstance(params, Tensor) and params.ndim == 2:
            return method(self, params, *args)
        params = torch.as_tensor(params).reshape(1, -1)
        args = tuple(materialise(args))  # a single-draw LazyHistory as the tensor it stands for
        args = tuple(a[None] if isinstance(a, Tensor) else a for a in args)
        return method(self, params, *args)[0]

    return wrapper


def accepts_one_history(method: Callable[..., list[Tensor]]) -> Callable[..., list[Tensor]]:
    """Let a batched model's ``observe`` also take one draw's history.

    A history with ``state_ndim + 1`` axes (time, then one step's state) is one draw's;
    with one more axis it is a batch. Outputs lose the batch axis for one draw.
    """

    @functools.wraps(method)
    def wrapper(self: Model, x: Tensor) -> list[Tensor]:
        if isinstance(x, Tensor) and x.ndim == self.state_ndim + 1:
            return [o[0] for o in method(self, x[None])]
        return method(self, x)

    return wrapper


class Model(torch.nn.Module, ABC):
    r"""Base class of discrete-time stochastic simulators.

    A subclass sets ``n_timesteps`` and implements four methods; the time loop lives in
    :func:`gradcal.simulate.simulate_and_observe_model`.

    - ``initialize(params) -> x``: the initial history, time along the time axis.
    - ``step(params, x) -> x_t``: the next time step (time axis of length one) from the
      history ``x`` that ``trim_time_series`` kept.
    - ``observe(x) -> list[Tensor]``: the observed outputs of a stretch of history; the
      framework concatenates them along the time axis over the run.
    - ``trim_time_series(x) -> x``: the part of the history the next step needs. The
      default keeps the last ``history_length`` steps, or everything when that is None
      (which costs memory and time on long runs). Markov models set ``history_length = 1``,
      which also lets the time loop skip appending to a history it would discard.
      A single-draw model's history that ``trim_time_series`` keeps whole grows without a
      copy at every step: ``step`` receives a :class:`~gradcal.history.LazyHistory`, which
      reads rows (``x[-1]``, ``x[-k:]``) from the step that holds them and behaves as the
      joined tensor for anything else; set ``lazy_history = False`` for a real tensor.

    Two layouts exist, chosen by the class attribute ``batched``:

    - ``batched = False`` (the BlackBIRDS convention, the default): ``params`` is one
      draw of shape (D,), the history has time on axis 0. Batches of draws are run draw by
      draw by the framework.
    - ``batched = True`` (all built-in models): ``initialize``, ``step`` receive ``params``
      of shape (B, D) and the history carries the draws on axis 0 and time on axis 1;
      B draws cost one vectorised simulation. The public entry points still accept (D,).
      Built-in models decorate their methods with :func:`accepts_one_draw` and
      :func:`accepts_one_history`, so each of them also takes one draw in BlackBIRDS'
      single-draw layout (``state_ndim`` is the number of axes of one step of one draw).

    A subclass defined outside gradcal that overrides one of ``initialize``, ``step``,
    ``observe``, ``trim_time_series`` (or a model's own ``single_draw_hooks``) without
    declaring ``batched`` itself is a single-draw model (``batched = False``, and
    ``n_params = None`` unless it declares it): its methods receive one draw, whatever its
    parent does, as a subclass written for BlackBIRDS expects.

    NaN parameters are not an error: the draw's outputs come out NaN (the inference
    engine drops such draws) and other draws in the batch are unaffected.

    ``n_params`` (optional) is the number D of parameters; when set, inputs are checked
    against it. Being an :class:`torch.nn.Module`, a model moves with ``.to(device)``;
    tensors a model creates during a run follow the device and dtype of ``params``.

    Example:
        >>> class Drift(Model):
        ...     batched = True
        ...     n_params = 1
        ...     def __init__(self, n_timesteps):
        ...         super().__init__()
        ...         self.n_timesteps = n_timesteps
        ...     def initialize(self, params):          # params: (B, 1)
        ...         return torch.zeros_like(params)    # (B, T=1)
        ...     def step(self, params, x):
        ...         return x[:, -1:] + params + torch.randn_like(params)
        ...     def observe(self, x):
        ...         return [x]
        ...     history_length = 1                    # step reads x[:, -1:] only
        >>> Drift(10).run_and_observe(torch.zeros(3, 1))[0].shape
        torch.Size([3, 11])
    """

    batched: bool = False
    n_params: int | None = None
    history_length: int | None = None
    lazy_history: bool = True
    state_ndim: int = 1
    single_draw_hooks: tuple[str, ...] = SINGLE_DRAW_HOOKS
    n_timesteps: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__.split(".")[0] == "gradcal" or "batched" in cls.__dict__:
            return
        if cls.batched and any(hook in cls.__dict__ for hook in cls.single_draw_hooks):
            cls.batched = False
            if "n_params" not in cls.__dict__:
                cls.n_params = None

    #: BlackBIRDS' ``Model.detach_gradient_horizon(time_series, gradient_horizon)``.
    detach_gradient_horizon = detach_gradient_horizon

    @abstractmethod
    def initialize(self, params: Tensor) -> Any:
        """The initial history; see the class docstring for its layout."""

    @abstractmethod
    def step(self, params: Tensor, x: Any) -> Any:
        """One time step computed from the trimmed history ``x``."""

    @abstractmethod
    def observe(self, x: Any) -> list[Tensor]:
        """Observed outputs of the stretch of history ``x``."""

    def observed_lengths(self) -> list[int] | None:
        """How many time steps each output of a run has (one entry per output of ``observe``),
        or None when the model does not say.

        The time loop concatenates ``observe(initialize(params))`` and ``observe`` of each of
        the ``n_timesteps`` new steps, so a model whose initial history is one step long and
        whose ``observe`` returns it unchanged outputs ``n_timesteps + 1`` values. Declaring
        this lets ``gradcal check`` compare a data file's length with the model's without
        simulating; otherwise ``gradcal run`` finds it out with one simulation.
        """
        return None

    def trim_time_series(self, x: Any) -> Any:
        """The last ``history_length`` steps of the history (all when it is None)."""
        if self.history_length is None or not isinstance(x, Tensor):
            return x
        if x.shape[self.time_axis] <= self.history_length:
            return x  # nothing to cut: the step itself, not a view of it
        return x.narrow(
            self.time_axis,
            -min(self.history_length, x.shape[self.time_axis]),
            min(self.history_length, x.shape[self.time_axis]),
        )

    def detach(self, x: Any) -> Any:
        """Cut gradients through the history ``x``; used by the gradient horizon.

        Override when a model keeps state outside the history tensor.
        """
        return x.detach() if isinstance(x, Tensor) else x

    def forward(self, params: Tensor, x: Any) -> Any:
        return self.step(params, x)

    @property
    def time_axis(self) -> int:
        """The axis of time in the history and outputs: 1 for batched models, else 0."""
        return 1 if self.batched else 0

    def check_params(self, params: Any) -> None:
        """Raise ``TypeError``/``ValueError`` unless ``params`` is (D,) or (B, D) floats."""
        name = type(self).__name__
        n_params = getattr(self, "n_params", None)
        d = "D" if n_params is None else str(n_params)
        expected = f"({d},) for one draw or (B, {d}) for B draws"
        if not isinstance(params, Tensor):
            raise TypeError(
                f"{name}: `params` must be a torch.Tensor of shape {expected}, "
                f"got {type(params).__name__}."
            )
        if not params.is_floating_point():
            raise TypeError(
                f"{name}: `params` must have a floating-point dtype, got {params.dtype}."
            )
        if params.ndim not in (1, 2) or params.shape[0] == 0:
            raise ValueError(
                f"{name}: `params` must have shape {expected}, got {tuple(params.shape)}."
            )
        if n_params is not None and params.shape[-1] != n_params:
            raise ValueError(
                f"{name}: `params` must have shape {expected}, got {tuple(params.shape)}."
            )

    def run(
        self, params: Tensor, gradient_horizon: int | None = None, *, batch: bool | None = None
    ) -> Any:
        """The whole history: (T + 1, ...) for one draw, (B, T + 1, ...) for (B, D).

        (1, D) is one draw (BlackBIRDS' ``q.sample(1)[0]``) unless ``batch=True``; see
        :func:`gradcal.simulate.simulate_and_observe_model`.
        """
        from gradcal.simulate import run_model

        return run_model(self, params, gradient_horizon, batch=batch)

    def run_and_observe(
        self, params: Tensor, gradient_horizon: int | None = None, *, batch: bool | None = None
    ) -> list[Tensor]:
        """Observed outputs of one run, each (T_out, ...) or (B, T_out, ...).

        (1, D) is one draw (BlackBIRDS' ``q.sample(1)[0]``) unless ``batch=True``; see
        :func:`gradcal.simulate.simulate_and_observe_model`.
        """
        from gradcal.simulate import simulate_and_observe_model

        return simulate_and_observe_model(self, params, gradient_horizon, batch=batch)
