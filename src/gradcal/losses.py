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

import math
from collections.abc import Sequence
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
from gradcal.kernels import GaussianKernel, Kernel, LaplaceKernel, median_distance
from gradcal.models.model import Model
from gradcal.signature import (
    TRANSFORMS,
    StaticKernel,
    pairs_mean,
    signature_gram,
    signature_mmd,
    sub_paths,
    transform_paths,
)
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
    "SignatureMMDLoss",
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
            self.model,
            theta,
            self.gradient_horizon,
            self.checkpoint_every,
            batch=theta.ndim == 2,  # (1, D) is a batch of one here: compare's lead axis
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
        self._cache: dict[int, tuple[tuple, Tensor, Tensor, Tensor | None]] = {}

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


def check_signature_options(
    static_kernel: str,
    bandwidth: float | None,
    transforms: Any,
    scale: float | None,
    dyadic_order: int,
    path_window: int | None,
    stride: int | None,
    estimator: str | None,
) -> None:
    """Raise ValueError (one line, naming the argument) for a bad signature-loss option."""
    if static_kernel not in ("linear", "rbf"):
        raise ValueError(f"`static_kernel` must be 'linear' or 'rbf', got {static_kernel!r}.")
    if bandwidth is not None and not bandwidth > 0:
        raise ValueError(f"`bandwidth` must be > 0, got {bandwidth}.")
    if isinstance(transforms, str) or not isinstance(transforms, list | tuple):
        raise TypeError(f"`transforms` must be a list of names, got {transforms!r}.")
    for name in transforms:
        if name not in TRANSFORMS:
            raise ValueError(
                f"`transforms`: unknown transformation {name!r}; known: {', '.join(TRANSFORMS)}."
            )
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"`scale` must be a finite number > 0, got {scale}.")
    if isinstance(dyadic_order, bool) or not isinstance(dyadic_order, int) or dyadic_order < 0:
        raise ValueError(f"`dyadic_order` must be an integer >= 0, got {dyadic_order!r}.")
    if path_window is not None and path_window < 2:
        raise ValueError(f"`path_window` must be >= 2, got {path_window}.")
    if stride is not None and stride < 1:
        raise ValueError(f"`stride` must be >= 1, got {stride}.")
    if estimator not in (None, "unbiased", "biased"):
        raise ValueError(f"`estimator` must be 'unbiased' or 'biased', got {estimator!r}.")


def default_path_window(length: int) -> int:
    """The default sub-path length for one observed series of ``length`` points: T // 8,
    at least 2 (about 15 half-overlapping sub-paths, see docs/signature-kernel.md).

    Example:
        >>> default_path_window(100), default_path_window(5)
        (12, 2)
    """
    return max(2, length // 8)


class SignatureMMDLoss(_SimulationLoss):
    r"""Squared MMD with the signature kernel between simulated and observed paths, per output.

    The sample of paths: with ``panel=False`` (default) an output (T, *event) is one
    d-dimensional series, cut into sub-paths of ``path_window`` points every ``stride``
    steps (default: T // 8 points, half-overlapping); with
    ``panel=True`` an output (T, N, *event) holds N series (repeated epidemics, a panel),
    each one path of the sample (also cut into sub-paths if ``path_window`` is given).
    Simulated outputs are cut in the same way, so each draw gives a sample of paths.

    Each path is scaled, transformed (``transforms``: ``"time"``, ``"lead_lag"``,
    ``"basepoint"``), and the MMD of :func:`gradcal.signature.signature_mmd` is taken.
    With ``scale=None`` the paths are divided by the median, over the observed sample, of
    $\max_t \|x_t - x_0\|$ (a path's extent), so a typical path has extent 1 at any
    length and the kernel, hence the loss and ``w``, keep their size across series lengths.
    With ``static_kernel="rbf"`` (the default) and no ``bandwidth``, the bandwidth is half
    the median distance between the points of the observed (scaled, transformed) paths
    (half: measured, it gave a two-sample test about 3 times the power of the full median
    and of the linear static kernel, see docs/signature-kernel.md).

    Arguments:
        model: the simulator.
        y: observed data (T, *event) or a list of such, one per output.
        gradient_horizon, checkpoint_every: see
            :func:`gradcal.simulate.simulate_and_observe_model`.
        static_kernel: ``"rbf"`` (default) or ``"linear"``.
        bandwidth: the rbf bandwidth (> 0), after scaling.
        transforms: path transformations, applied in the order lead-lag, time, basepoint.
        scale: multiply the paths by this (> 0); None: the extent heuristic above.
        dyadic_order: refine each PDE cell into 2^r x 2^r (accuracy against time).
        path_window: sub-path length (>= 2); None: T // 8 for one series, the whole
            series for a panel.
        stride: steps between sub-paths (default: half the window).
        panel: the output's first event axis indexes N series.
        increments: take the paths of increments x_t - x_{t-1} instead of values.
        simulations: independent simulations per draw (>= 2: the x-x term pairs paths of
            different simulations only, so it is unbiased for any process, stationary or
            not, and the loss is the signature-kernel score, minimised in expectation at
            the truth; 1: one simulation, the x-x term pairs sub-paths of it that do not
            overlap, which is right only for a mixing, stationary series).
        estimator: with one simulation, ``"unbiased"``: every term averages the same pairs
            of paths, leaving
            out two sub-paths of one series that overlap in time (nearly independent
            pairs for a mixing process, so the loss is about 0 in expectation at the
            truth); the default whenever such pairs exist. ``"biased"``: all pairs (the
            only choice for one whole series a side: the squared kernel distance). With
            several simulations it only sets the (constant) y-y term.
        chunk_size: rows of each Gram matrix solved at a time.

    Example:
        >>> from gradcal.models import RandomWalk
        >>> y = RandomWalk(64).run_and_observe(torch.tensor([0.5]))[0]
        >>> loss = SignatureMMDLoss(RandomWalk(64), y)
        >>> loss(torch.tensor([[0.5], [0.9]]), y).shape
        torch.Size([2])
    """

    def __init__(
        self,
        model: Model,
        y: Any,
        gradient_horizon: int | None = None,
        *,
        static_kernel: str = "rbf",
        bandwidth: float | None = None,
        transforms: Sequence[str] = ("time",),
        scale: float | None = None,
        dyadic_order: int = 0,
        path_window: int | None = None,
        stride: int | None = None,
        panel: bool = False,
        increments: bool = False,
        estimator: str | None = None,
        simulations: int = 2,
        chunk_size: int | None = None,
        checkpoint_every: int | None = None,
    ):
        super().__init__(model, y, gradient_horizon, checkpoint_every)
        if isinstance(simulations, bool) or not isinstance(simulations, int) or simulations < 1:
            raise ValueError(f"`simulations` must be an integer >= 1, got {simulations!r}.")
        self.simulations = simulations
        if y is None:
            raise ValueError("SignatureMMDLoss needs the observed data `y` to fit its scale.")
        check_signature_options(
            static_kernel,
            bandwidth,
            list(transforms) if isinstance(transforms, tuple) else transforms,
            scale,
            dyadic_order,
            path_window,
            stride,
            estimator,
        )
        self.transforms, self.dyadic_order = tuple(transforms), dyadic_order
        self.path_window, self.stride, self.panel = path_window, stride, panel
        self.increments, self.estimator, self.chunk_size = increments, estimator, chunk_size
        self._cache: dict[int, tuple[tuple, Tensor, Tensor, Tensor | None]] = {}
        self.scales: list[float] = []
        self.kernels: list[StaticKernel] = []
        for obs in self._y:
            paths = self._paths(obs.detach())
            extent = (paths - paths[..., :1, :]).norm(dim=-1).amax(-1)
            s = float(scale) if scale is not None else _positive_median(extent)
            self.scales.append(s)
            h = bandwidth
            if static_kernel == "rbf" and h is None:
                points = self._transformed(paths, s).flatten(0, -2)
                h = 0.5 * float(median_distance(points))
            self.kernels.append(StaticKernel(static_kernel, h))
            if estimator == "unbiased" and not bool(self.pair_mask(obs).any()):
                raise ValueError(
                    "`estimator`: 'unbiased' needs two paths that do not overlap in time (a "
                    "shorter `path_window`, or several series with `panel`); or use 'biased' "
                    "(with `simulations` >= 2 still the signature-kernel score, up to a constant)."
                )

    def _paths(self, series: Tensor, lead: int = 0) -> Tensor:
        """Output (*lead, T, *event) -> sample of paths (*lead, n, L, d)."""
        event = series.shape[lead + 1 :]
        if self.panel:
            if len(event) == 0:
                raise ValueError(
                    f"`panel=True` needs outputs (T, N, ...), got shape {tuple(series.shape)}."
                )
            x = series.reshape(*series.shape[: lead + 2], -1)  # (*lead, T, N, d)
            x = x.movedim(lead, lead + 1)  # (*lead, N, T, d)
        else:
            x = series.reshape(*series.shape[: lead + 1], -1)[..., None, :, :]  # (*lead, 1, T, d)
        if self.increments:
            x = x[..., 1:, :] - x[..., :-1, :]
        length = x.shape[-2]
        window = self.path_window
        if window is None and not self.panel:
            window = default_path_window(length)
        if window is not None:
            if window > length:
                raise ValueError(f"`path_window` ({window}) exceeds the series length ({length}).")
            x = sub_paths(x, window, self._stride(window)).flatten(-4, -3)  # (*lead, N n, L, d)
        return x

    def _stride(self, window: int) -> int:
        return self.stride if self.stride is not None else max(1, window // 2)

    def pair_mask(self, y: Tensor) -> Tensor:
        """Which pairs of the sample of paths of output y (T, *event) enter the unbiased MMD:
        (n, n), False for two sub-paths of the same series that overlap in time (the
        diagonal included), True otherwise."""
        series = y.shape[1:2].numel() if self.panel else 1
        length = y.shape[0] - (1 if self.increments else 0)
        window = self.path_window
        if window is None and not self.panel:
            window = default_path_window(length)
        if window is None:
            starts, window = torch.zeros(1, dtype=torch.long), length
        else:
            starts = torch.arange(0, length - window + 1, self._stride(window))
        which = torch.arange(series).repeat_interleave(starts.numel())
        starts = starts.repeat(series)
        overlap = (starts[:, None] - starts[None, :]).abs() < window
        return ~(overlap & (which[:, None] == which[None, :]))

    def _transformed(self, paths: Tensor, scale: float) -> Tensor:
        return transform_paths(paths, self.transforms, scale)

    def _estimator(self, any_pair: bool | Tensor) -> str:
        if self.estimator is not None:
            return self.estimator
        return "unbiased" if bool(any_pair) else "biased"

    def _observed_paths(self, index: int, y: Tensor, like: Tensor, estimator: str):
        """Observed transformed paths and E k(y, y') (cached per data tensor, dtype, device
        and estimator: constants of the data)."""
        key = (y, y._version, like.dtype, like.device, estimator)
        cached = self._cache.get(index)
        if cached is not None and cached[0][0] is y and cached[0][1:] == key[1:]:
            return cached[1], cached[2], cached[3]
        with torch.no_grad():
            paths = self._transformed(
                self._paths(y.to(dtype=like.dtype, device=like.device)), self.scales[index]
            )
            gram = signature_gram(
                paths, paths, self.kernels[index], self.dyadic_order, self.chunk_size
            )
            mask = self.pair_mask(y).to(paths.device) if estimator == "unbiased" else None
            constant = pairs_mean(gram, estimator == "unbiased", mask)
        self._cache[index] = (key, paths, constant, mask)
        return paths, constant, mask

    def __call__(self, theta: Tensor, y: Any = None) -> Tensor:
        if self.simulations == 1:
            return super().__call__(theta, y)
        r, lead = self.simulations, theta.ndim - 1
        repeated = theta.expand(r, *theta.shape).reshape(-1, theta.shape[-1])
        simulated = simulate_and_observe_model(
            self.model, repeated, self.gradient_horizon, self.checkpoint_every
        )
        # (r * B, T, ...) -> (*lead, r, T, ...): the simulations of one draw side by side
        simulated = [
            x.reshape(r, *theta.shape[:-1], *x.shape[1:]).movedim(0, lead) for x in simulated
        ]
        return self.compare_simulations(simulated, y, lead)

    def compare_simulations(self, simulated: list[Tensor], y: Any = None, lead: int = 1):
        """The loss of several simulations per draw: outputs (*lead, R, T, *event), R >= 2.

        The x-x term averages k over pairs of paths from different simulations, the x-y
        term over all pairs. A draw with any simulation not finite gets NaN.
        """
        observed = self._observed(y)
        if len(simulated) != len(observed):
            raise ValueError(
                f"the model observes {len(simulated)} output(s) but `y` holds {len(observed)}."
            )
        total = 0.0
        for i, (x, obs) in enumerate(zip(simulated, observed, strict=True)):
            if x.ndim == lead + 1 + obs.ndim + 1 and x.shape[-1] == 1:
                x = x[..., 0]
            finite = _finite_draws(x, obs.ndim + 1)
            mask = finite.reshape(*finite.shape, *([1] * (obs.ndim + 1)))
            term = self._term_simulations(i, torch.where(mask, x, 0.0), obs, lead)
            total = total + torch.where(finite, term, torch.nan)
        return total

    def _term_simulations(self, index: int, x: Tensor, y: Tensor, lead: int) -> Tensor:
        if x.ndim != lead + 1 + y.ndim or x.shape[lead + 2 :] != y.shape[1:]:
            raise ValueError(
                f"simulated output of shape {tuple(x.shape)} does not match observed "
                f"{tuple(y.shape)}."
            )
        paths = self._transformed(self._paths(x, lead + 1), self.scales[index])
        estimator = self._estimator(self.pair_mask(y).any())
        observed, constant, _ = self._observed_paths(index, y, x, estimator)
        kernel, order, chunk = self.kernels[index], self.dyadic_order, self.chunk_size
        r = paths.shape[-4]
        cross = [
            signature_gram(
                paths[..., a, :, :, :], paths[..., b, :, :, :], kernel, order, chunk
            ).mean((-1, -2))
            for a in range(r)
            for b in range(a + 1, r)
        ]
        kxx = torch.stack(cross, -1).mean(-1)
        flat = paths.flatten(-4, -3)  # (*lead, R n, L, d)
        kxy = signature_gram(flat, observed, kernel, order, chunk).mean((-1, -2))
        return kxx - 2.0 * kxy + constant

    def observed_term(self, index: int, y: Tensor) -> Tensor:
        """E k(y, y') of output ``index``'s observed sample y (T, *event): a constant of the
        loss, its size that of the kernel."""
        estimator = self._estimator(self.pair_mask(y).any())
        return self._observed_paths(index, y, y, estimator)[1]

    def _term(self, index: int, x: Tensor, y: Tensor) -> Tensor:
        if x.ndim < y.ndim or x.shape[x.ndim - y.ndim + 1 :] != y.shape[1:]:
            raise ValueError(
                f"simulated output of shape {tuple(x.shape)} does not match observed "
                f"{tuple(y.shape)}."
            )
        lead = x.ndim - y.ndim
        simulated = self._transformed(self._paths(x, lead), self.scales[index])
        n_observed = self._paths(y).shape[-3]
        if simulated.shape[-3] != n_observed:
            raise ValueError(
                f"the simulation gives {simulated.shape[-3]} paths but the data "
                f"{n_observed}: simulate series of the data's length."
            )
        estimator = self._estimator(self.pair_mask(y).any())
        observed, constant, mask = self._observed_paths(index, y, x, estimator)
        return signature_mmd(
            simulated,
            observed,
            self.kernels[index],
            self.dyadic_order,
            estimator=estimator,
            mask=mask,
            chunk_size=self.chunk_size,
            observed_term=constant,
        )


def _positive_median(values: Tensor) -> float:
    """1 / the median of positive values (1 if none is positive): the extent scale."""
    positive = values[values > 0]
    return 1.0 / float(positive.median()) if positive.numel() else 1.0


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
