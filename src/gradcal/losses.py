r"""Losses l(theta, y): simulate the model at theta and compare with the observed data.

A loss builder binds a model, the observed data and a gradient horizon and is called as
``loss(theta, y)``: theta (D,) gives a 0-d tensor, theta (B, D) gives (B,) from one batched
simulation. Builders declare ``batched = True`` so the inference engine hands them all
draws at once. Observed data is one tensor (T, *event) or a list of them, one per output
of the model's ``observe``; the loss is the sum over outputs. A draw whose simulation is
not finite gets a NaN loss (the engine drops it) instead of an exception.

The discrepancies themselves (:func:`mmd`, :func:`energy_distance`, :func:`mse`) and the
kernels are re-exported here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradcal.discrepancies import (
    Estimator,
    as_points,
    check_sample_sizes,
    energy_distance,
    energy_observed_term,
    energy_simulated_terms,
    increments,
    lag_embedding,
    mmd,
    mmd_observed_term,
    mmd_simulated_terms,
    mse,
)
from gradcal.kernels import GaussianKernel, Kernel, LaplaceKernel
from gradcal.models.model import Model
from gradcal.simulate import (
    check_checkpoint_every,
    check_gradient_horizon,
    simulate_and_observe_model,
)

__all__ = [
    "EnergyDistanceLoss",
    "GaussianKernel",
    "LaplaceKernel",
    "MMDLoss",
    "MSELoss",
    "NegativeLogLikelihood",
    "SingleOutput_SimulateAndMMD",
    "SingleOutput_SimulateAndMSELoss",
    "UnivariateMMDLoss",
    "energy_distance",
    "increments",
    "lag_embedding",
    "mmd",
    "mse",
]


def _as_outputs(y: Any, name: str = "y") -> list[Tensor]:
    """Observed data as a list of floating tensors, one per model output."""
    outputs = [y] if isinstance(y, Tensor) else y
    if not isinstance(outputs, list | tuple) or not all(isinstance(o, Tensor) for o in outputs):
        raise TypeError(f"`{name}` must be a tensor or a list of tensors, got {type(y).__name__}.")
    if len(outputs) == 0:
        raise ValueError(f"`{name}` must hold at least one output.")
    if not all(o.is_floating_point() for o in outputs):
        raise TypeError(f"`{name}` must hold floating-point tensors.")
    return list(outputs)


def _finite_draws(x: Tensor, event_ndim: int) -> Tensor:
    """Which draws of a simulated output (..., *event) hold only finite values: (...,)."""
    return torch.isfinite(x).flatten(x.ndim - event_ndim).all(-1)


class _SimulationLoss:
    """Shared machinery: simulate at theta, match outputs to data, sum per-output terms."""

    batched = True

    def __init__(
        self,
        model: Model,
        y: Any,
        gradient_horizon: int | None,
        checkpoint_every: int | None = None,
    ):
        if not all(hasattr(model, m) for m in ("initialize", "step", "observe")):
            raise TypeError(f"`model` must be a gradcal Model, got {type(model).__name__}.")
        check_gradient_horizon(gradient_horizon)
        check_checkpoint_every(checkpoint_every)
        self.model = model
        self.gradient_horizon = gradient_horizon
        self.checkpoint_every = checkpoint_every
        self._y = None if y is None else _as_outputs(y)

    def _observed(self, y: Any) -> list[Tensor]:
        if y is None:
            if self._y is None:
                raise ValueError("no observed data: pass `y` to the loss or its constructor.")
            return self._y
        return _as_outputs(y)

    def _term(self, index: int, x: Tensor, y: Tensor) -> Tensor:
        """The loss of output ``index``: simulated x (..., T, *event), observed y (T, *event)."""
        raise NotImplementedError

    def __call__(self, theta: Tensor, y: Any = None) -> Tensor:
        simulated = simulate_and_observe_model(
            self.model, theta, self.gradient_horizon, self.checkpoint_every
        )
        return self.compare(simulated, y, theta.ndim - 1)

    def compare(self, simulated: list[Tensor], y: Any = None, lead: int = 1) -> Tensor:
        """The loss of simulated outputs against data, without simulating.

        Arguments:
            simulated: the model's outputs, each (*lead, T, *event) (``lead`` draw axes).
            y: observed data (T, *event) or a list of such (default: the constructor's).
            lead: the number of draw axes in front of each output (1 for B draws).

        Returns the loss per draw, shape ``lead`` axes (0-d for one draw); NaN for a draw
        whose simulation is not finite. ``loss(theta, y)`` is
        ``compare(simulate_and_observe_model(model, theta), y, theta.ndim - 1)``.
        """
        observed = self._observed(y)
        if len(simulated) != len(observed):
            raise ValueError(
                f"the model observes {len(simulated)} output(s) but `y` holds {len(observed)}."
            )
        total = 0.0
        for i, (x, obs) in enumerate(zip(simulated, observed, strict=True)):
            if x.ndim == lead + obs.ndim + 1 and x.shape[-1] == 1:
                x = x[..., 0]  # a (T, 1) output (BlackBIRDS' layout) against (T,) data
            if x.ndim < obs.ndim or x.shape[x.ndim - obs.ndim + 1 :] != obs.shape[1:]:
                self._term(i, x, obs)  # raises, naming both shapes
            finite = _finite_draws(x, obs.ndim)
            # Zero the failed draws before comparing, so that no NaN reaches the gradient of
            # the others; their loss is NaN afterwards.
            mask = finite.reshape(*finite.shape, *([1] * obs.ndim))
            term = self._term(i, torch.where(mask, x, 0.0), obs)
            total = total + torch.where(finite, term, torch.nan)
        return total


class _SampleLoss(_SimulationLoss):
    """Losses between point clouds made from series: optional increments and lag windows."""

    def __init__(
        self,
        model: Model,
        y: Any,
        gradient_horizon: int | None,
        window: int,
        use_increments: bool,
        chunk_size: int | None,
        checkpoint_every: int | None,
    ):
        super().__init__(model, y, gradient_horizon, checkpoint_every)
        if window < 1:
            raise ValueError(f"`window` must be >= 1, got {window}.")
        self.window, self.increments, self.chunk_size = window, use_increments, chunk_size
        # per output: (the data tensor itself, its version, dtype, device), points, constant
        self._cache: dict[int, tuple[tuple, Tensor, Tensor]] = {}

    def _points(self, series: Tensor) -> Tensor:
        """(..., T, d) points -> increments and lag windows, as configured."""
        if self.increments:
            series = increments(series)
        return lag_embedding(series, self.window)

    def _observed_points(self, index: int, y: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """Observed points and their constant term in the dtype and device of ``like``.

        Cached per data tensor (identity and in-place version), dtype and device. The key
        holds the tensor itself, so a freed tensor's id cannot be reused by new data.
        """
        key = (y, y._version, like.dtype, like.device)
        cached = self._cache.get(index)
        if cached is not None and cached[0][0] is y and cached[0][1:] == key[1:]:
            return cached[1], cached[2]
        with torch.no_grad():  # constants of the data: no graph, no transform wrappers
            points = self._points(as_points(y, y)[1].to(dtype=like.dtype, device=like.device))
            constant = self._observed_term(index, points)
        self._cache[index] = (key, points, constant)
        return points, constant

    def _observed_term(self, index: int, points: Tensor) -> Tensor:
        """The part of the discrepancy that depends on the observed points only."""
        raise NotImplementedError

    def _simulated_points(self, x: Tensor, y: Tensor) -> Tensor:
        return self._points(as_points(x, y)[0])


class MMDLoss(_SampleLoss):
    r"""Squared MMD between the simulated and the observed sample, per output.

    Arguments:
        model: the simulator.
        y: observed data (T, *event) or a list of such, one per output; also fixes the
            kernel bandwidth by the median heuristic (unless ``kernel`` has one).
        kernel: :class:`GaussianKernel` (default), :class:`LaplaceKernel`, a mixture
            (``GaussianKernel(scales=(0.5, 1, 2))``) or a given bandwidth.
        gradient_horizon: see :func:`gradcal.simulate.simulate_and_observe_model`.
        window: compare lag windows of this length (1: single values).
        increments: compare increments x_t - x_{t-1} instead of values.
        estimator: ``"unbiased"``, ``"biased"`` or ``"linear"`` (see :func:`mmd`).
        chunk_size: block size for the kernel matrices of long series.
        checkpoint_every: checkpointed reverse mode through time, every k steps (see
            :func:`gradcal.simulate.simulate_and_observe_model`): same values and
            gradients, memory of the simulation's graph like T / k + k instead of T.

    Example:
        >>> from gradcal.models import Normal
        >>> y = torch.randn(200) * 0.5 + 1.0
        >>> loss = MMDLoss(Normal(200), y)
        >>> loss(torch.tensor([[1.0, 0.5], [3.0, 0.5]]), y).shape
        torch.Size([2])
    """

    def __init__(
        self,
        model: Model,
        y: Any,
        kernel: Kernel | None = None,
        gradient_horizon: int | None = None,
        *,
        window: int = 1,
        increments: bool = False,
        estimator: Estimator = "unbiased",
        chunk_size: int | None = None,
        checkpoint_every: int | None = None,
    ):
        super().__init__(
            model, y, gradient_horizon, window, increments, chunk_size, checkpoint_every
        )
        if y is None:
            raise ValueError("MMDLoss needs the observed data `y` to fit its kernel.")
        if estimator not in ("unbiased", "biased", "linear"):
            raise ValueError(
                f"`estimator` must be 'unbiased', 'biased' or 'linear', got {estimator!r}."
            )
        self.kernel = kernel or GaussianKernel()
        self.estimator = estimator
        self._kernels = [self.kernel.fitted(self._points(as_points(o, o)[1])) for o in self._y]

    def _observed_term(self, index: int, points: Tensor) -> Tensor:
        if self.estimator == "linear":
            return points.new_zeros(())
        return mmd_observed_term(self._kernels[index], points, self.estimator, self.chunk_size)

    def _term(self, index: int, x: Tensor, y: Tensor) -> Tensor:
        points, constant = self._observed_points(index, y, x)
        xp, kernel = self._simulated_points(x, y), self._kernels[index]
        check_sample_sizes(self.estimator, xp.shape[-2], points.shape[-2])
        if self.estimator == "linear":
            return mmd(xp, points, kernel, estimator="linear")
        return mmd_simulated_terms(kernel, xp, points, self.estimator, self.chunk_size) + constant


class EnergyDistanceLoss(_SampleLoss):
    """Energy distance between the simulated and the observed sample, per output.

    No bandwidth to choose. Arguments as :class:`MMDLoss` (``y`` may also be given only at
    call time).

    Example:
        >>> from gradcal.models import Normal
        >>> y = torch.randn(200)
        >>> EnergyDistanceLoss(Normal(200), y)(torch.tensor([0.0, 1.0]), y).shape
        torch.Size([])
    """

    def __init__(
        self,
        model: Model,
        y: Any = None,
        gradient_horizon: int | None = None,
        *,
        window: int = 1,
        increments: bool = False,
        chunk_size: int | None = None,
        checkpoint_every: int | None = None,
    ):
        super().__init__(
            model, y, gradient_horizon, window, increments, chunk_size, checkpoint_every
        )

    def _observed_term(self, index: int, points: Tensor) -> Tensor:
        return energy_observed_term(points, self.chunk_size)

    def _term(self, index: int, x: Tensor, y: Tensor) -> Tensor:
        points, constant = self._observed_points(index, y, x)
        xp = self._simulated_points(x, y)
        check_sample_sizes("energy", xp.shape[-2], points.shape[-2])
        return energy_simulated_terms(xp, points, self.chunk_size) + constant


class MSELoss(_SimulationLoss):
    """Mean squared error between simulated and observed series of the same length.

    Example:
        >>> from gradcal.models import RandomWalk
        >>> y = torch.arange(11.0)
        >>> MSELoss(RandomWalk(10))(torch.tensor([[20.0]]), y).tolist()   # always up
        [0.0]
    """

    def __init__(
        self,
        model: Model,
        y: Any = None,
        gradient_horizon: int | None = None,
        *,
        checkpoint_every: int | None = None,
    ):
        super().__init__(model, y, gradient_horizon, checkpoint_every)

    def _term(self, index: int, x: Tensor, y: Tensor) -> Tensor:
        return mse(x, y.to(x.dtype))


class NegativeLogLikelihood:
    r"""$-\log p(y \mid \theta)$ from a model's exact ``log_likelihood(params, y)``.

    With w = 1 the generalised posterior is the ordinary Bayesian posterior.

    Example:
        >>> from gradcal.models import Normal
        >>> nll = NegativeLogLikelihood(Normal(3))
        >>> round(nll(torch.tensor([0.0, 1.0]), torch.zeros(3)).item(), 4)   # 3 log(2 pi)/2
        2.7568
    """

    batched = True
    exact = True  # a deterministic function of theta (no simulation noise)

    def __init__(self, model: Any):
        if not callable(getattr(model, "log_likelihood", None)):
            raise TypeError(
                f"`model` must provide log_likelihood(params, y); {type(model).__name__} does not."
            )
        self.model = model

    def __call__(self, theta: Tensor, y: Any) -> Tensor:
        observed = _as_outputs(y)
        return -self.model.log_likelihood(theta, observed[0] if len(observed) == 1 else observed)


class SingleOutput_SimulateAndMMD(MMDLoss):
    """BlackBIRDS' name for :class:`MMDLoss` with its argument order ``(y, model, ...)``."""

    def __init__(self, y: Tensor, model: Model, gradient_horizon: int | None = None):
        super().__init__(model, y, gradient_horizon=gradient_horizon)


class SingleOutput_SimulateAndMSELoss(MSELoss):
    """BlackBIRDS' name for :class:`MSELoss`: ``(model, gradient_horizon=None)``."""

    def __init__(self, model: Model, gradient_horizon: int | None = None):
        super().__init__(model, None, gradient_horizon)


class UnivariateMMDLoss:
    """BlackBIRDS' MMD against a fixed univariate series y, called as ``loss(x)``.

    ``x`` is one simulated series (T,) or a batch (B, T); the kernel bandwidth comes from y.

    Example:
        >>> y = torch.randn(100)
        >>> UnivariateMMDLoss(y)(torch.randn(4, 100)).shape
        torch.Size([4])
    """

    def __init__(self, y: Tensor):
        if not isinstance(y, Tensor) or (y.ndim != 1 and not (y.ndim == 2 and y.shape[1] == 1)):
            raise ValueError(
                f"`y` must be one univariate series (T,) or (T, 1), got "
                f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}."
            )
        self.y = y.reshape(-1)
        self.kernel = GaussianKernel().fitted(self.y[:, None])

    def __call__(self, x: Tensor) -> Tensor:
        return mmd(x, self.y.to(x.dtype), self.kernel)
