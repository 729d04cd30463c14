"""Figures of a calibration: pairwise posterior plots, loss histories, predictive bands, traces.

matplotlib is an optional dependency (``pip install 'gradcal[plot]'``), imported only when a
function is called; nothing here selects a backend or calls ``plt.show()``. Every function
returns the :class:`matplotlib.figure.Figure` (created through pyplot, so close it with
``plt.close(fig)`` when making many) and writes a file only when given ``path=``, in the format
its extension names. Inputs may be torch tensors (detached and moved to the CPU), numpy arrays
or nested lists of numbers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from numpy.typing import ArrayLike

__all__ = ["corner_plot", "loss_history", "predictive_bands", "trace_plot"]

_POSTERIOR, _PRIOR, _TRUTH = "C0", "0.55", "C3"
_LOSS_KEYS = ("total", "loss", "regularisation")
# Probability mass inside the 1- and 2-sigma ellipses of a 2-D Gaussian: 1 - exp(-k^2 / 2).
_HDR_MASSES = (0.3935, 0.8647)


def _pyplot() -> Any:
    """matplotlib.pyplot, or an ImportError that says how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "gradcal.plotting needs matplotlib, which is not installed: "
            "pip install 'gradcal[plot]'."
        ) from error
    return plt


def _as_array(x: Any, name: str) -> np.ndarray:
    """A float64 numpy copy of a tensor, an array or a (nested) list of numbers."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"`{name}` must hold real numbers, got dtype {x.dtype}.")
        return x.detach().cpu().to(torch.float64).numpy()
    if isinstance(x, list | tuple) and any(isinstance(v, torch.Tensor) for v in x):
        x = [_as_array(v, name) for v in x]  # e.g. a list of 0-d loss tensors
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`{name}` must be a tensor or an array of real numbers, got {type(x).__name__}."
        ) from error


def _array(x: Any, name: str, expected: str, ndim: int) -> np.ndarray:
    """``x`` as an array with ``ndim`` axes, none empty, else a ValueError naming ``expected``."""
    array = _as_array(x, name)
    if array.ndim != ndim or 0 in array.shape:
        raise ValueError(f"`{name}` must have shape {expected}, got {tuple(array.shape)}.")
    return array


def _names(names: Any, d: int, default: list[str], what: str) -> list[str]:
    """``d`` labels: ``default`` for None, else one string per ``what``."""
    if names is None:
        return default
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if len(names) != d:
        raise ValueError(f"`names` must hold one label per {what} ({d}), got {len(names)}.")
    return [str(n) for n in names]


def _theta_names(d: int) -> list[str]:
    return [rf"$\theta_{{{i}}}$" for i in range(d)]


def _finish(fig: Figure, path: str | os.PathLike[str] | None) -> Figure:
    if path is not None:
        fig.savefig(os.fspath(path), bbox_inches="tight")
    return fig


# --- corner_plot --------------------------------------------------------------------------


def _finite_rows(x: np.ndarray, name: str) -> np.ndarray:
    """The rows of ``x`` without NaN or infinity; warns how many were dropped."""
    keep = np.isfinite(x).all(axis=1)
    if not keep.any():
        raise ValueError(f"`{name}` has no draw whose values are all finite.")
    if not keep.all():
        warnings.warn(
            f"corner_plot: left out {int((~keep).sum())} of {len(x)} draws of `{name}` "
            "with NaN or infinite values.",
            stacklevel=3,
        )
    return x[keep]


def _central_range(x: np.ndarray) -> tuple[float, float]:
    """The central 99% of the draws ``x`` (n,), widened when it is a single point."""
    lo, hi = (float(v) for v in np.quantile(x, [0.005, 0.995]))
    if hi > lo:
        return lo, hi
    half = 0.1 * abs(lo) or 0.5
    return lo - half, hi + half


def _density(x: np.ndarray, bins: int, span: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Histogram density of ``x`` over ``span``, normalised by all draws, inside or not."""
    counts, edges = np.histogram(x, bins=bins, range=span)
    return counts / (len(x) * (edges[1] - edges[0])), edges


def _smooth(h: np.ndarray) -> np.ndarray:
    """One pass of the (1, 2, 1) / 4 filter along each axis of a 2-D histogram."""
    kernel = np.array([0.25, 0.5, 0.25])
    for axis in (0, 1):
        h = np.apply_along_axis(np.convolve, axis, h, kernel, mode="same")
    return h


def _hdr_contour(ax: Axes, x: np.ndarray, y: np.ndarray, bins: int, spans: list) -> None:
    """Contours of the smallest regions holding 39% and 86% of the draws (1 and 2 sigma)."""
    h, xe, ye = np.histogram2d(x, y, bins=bins, range=spans)
    h = _smooth(h)
    flat = np.sort(h.ravel())[::-1]
    mass = np.cumsum(flat)
    if mass[-1] <= 0:
        return
    mass /= mass[-1]
    index = np.minimum(np.searchsorted(mass, sorted(_HDR_MASSES, reverse=True)), flat.size - 1)
    levels = flat[index]
    if not (levels[0] > 0 and np.all(np.diff(levels) > 0)):
        return  # too few draws for distinct levels: the scatter alone shows them
    xc, yc = (xe[1:] + xe[:-1]) / 2, (ye[1:] + ye[:-1]) / 2
    ax.contour(xc, yc, h.T, levels=levels, colors=_POSTERIOR, linewidths=1.0)


def corner_plot(
    samples: torch.Tensor | ArrayLike,
    prior_samples: torch.Tensor | ArrayLike | None = None,
    truth: torch.Tensor | ArrayLike | None = None,
    names: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    bins: int = 40,
) -> Figure:
    r"""Pairwise plot of posterior draws, with prior draws and true values overlaid.

    A D x D grid: the diagonal holds histograms (densities) of each parameter, the lower
    triangle the draws of each pair as points with the contours of the smallest regions
    holding 39% and 86% of the posterior draws (the 1- and 2-sigma ellipses of a Gaussian),
    and the upper triangle is left blank (its axes are switched off, so ``fig.axes`` has
    D^2 entries). Each axis spans the central 99% of every set of draws and the true value;
    leave out ``prior_samples`` to zoom on the posterior. Draws with a NaN or infinite
    coordinate are left out with a warning. Plain matplotlib; ``corner`` is not needed.

    Arguments:
        samples: posterior draws, (n, D).
        prior_samples: prior draws, (m, D), drawn in grey.
        truth: the true parameters, (D,), marked by red lines; a NaN entry is not marked.
        names: one label per parameter (default theta_0, ..., theta_{D-1}).
        path: where to save the figure (format from the extension); nothing is written
            without it.
        bins: histogram bins on the diagonal; the contours come from a (smoothed) 2-D
            histogram with min(bins, max(8, sqrt(n) / 3)) bins per axis.

    Returns:
        The figure.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> posterior = 0.1 * torch.randn(2000, 2) + torch.tensor([1.0, -1.0])
        >>> fig = corner_plot(posterior, prior_samples=torch.randn(2000, 2),
        ...                   truth=torch.tensor([1.0, -1.0]), names=["a", "b"])
        >>> len(fig.axes)                  # D x D
        4
        >>> plt.close(fig)
    """
    plt = _pyplot()
    post = _array(samples, "samples", "(n, D)", 2)
    d = post.shape[1]
    prior = None
    if prior_samples is not None:
        prior = _array(prior_samples, "prior_samples", f"(m, {d})", 2)
        if prior.shape[1] != d:
            raise ValueError(
                f"`prior_samples` must have shape (m, {d}) like `samples` (n, D) = {post.shape}, "
                f"got {prior.shape}."
            )
    true = None
    if truth is not None:
        true = _as_array(truth, "truth")
        if true.shape != (d,):
            raise ValueError(f"`truth` must have shape ({d},), got {true.shape}.")
    labels = _names(names, d, _theta_names(d), "parameter")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"`bins` must be an int >= 1, got {bins!r}.")

    post = _finite_rows(post, "samples")
    sets = [(post, _POSTERIOR, "posterior")]
    if prior is not None:
        sets.append((_finite_rows(prior, "prior_samples"), _PRIOR, "prior"))
    spans = [[_central_range(s[:, j]) for s, _, _ in sets] for j in range(d)]  # [j][set]
    views = []
    for j in range(d):
        ends = [v for span in spans[j] for v in span]
        if true is not None and np.isfinite(true[j]):
            ends.append(float(true[j]))
        lo, hi = min(ends), max(ends)
        views.append((lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)))

    # About 9 draws a cell on average for the contours (grid^2 ~ n / 9), within [8, bins].
    grid = min(bins, max(8, int(np.sqrt(len(post)) / 3)))
    size = 1.8 * d + 0.8
    fig, axes = plt.subplots(d, d, figsize=(size, size), squeeze=False)
    margin = 0.75 / size
    fig.subplots_adjust(left=margin, bottom=margin, right=0.98, top=0.98, wspace=0.06, hspace=0.06)
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.set_axis_off()
                continue
            if i == j:
                for k, (s, colour, label) in enumerate(sets):
                    density, edges = _density(s[:, j], bins, spans[j][k])
                    ax.stairs(density, edges, color=colour, label=label, linewidth=1.2)
                    if k == 0:
                        ax.stairs(density, edges, color=colour, alpha=0.25, fill=True)
                ax.set_yticks([])
                ax.set_ylim(bottom=0)
            else:
                for s, colour, _ in reversed(sets):  # posterior on top
                    ax.scatter(
                        s[:, j], s[:, i], s=2, color=colour, alpha=0.25, lw=0, rasterized=True
                    )
                _hdr_contour(ax, post[:, j], post[:, i], grid, [spans[j][0], spans[i][0]])
                ax.set_ylim(views[i])
                if true is not None and np.isfinite(true[[i, j]]).all():
                    ax.plot(true[j], true[i], "s", color=_TRUTH, markersize=4)
                if true is not None and np.isfinite(true[i]):
                    ax.axhline(true[i], color=_TRUTH, linewidth=1.0)
            if true is not None and np.isfinite(true[j]):
                ax.axvline(true[j], color=_TRUTH, linewidth=1.0, label="truth")
            ax.set_xlim(views[j])
            ax.tick_params(labelsize=8)
            if i == d - 1:
                ax.set_xlabel(labels[j])
                ax.tick_params(axis="x", labelrotation=45)
            else:
                ax.tick_params(labelbottom=False)
            if j == 0 and i > 0:
                ax.set_ylabel(labels[i])
            elif i != j:
                ax.tick_params(labelleft=False)
    if len(sets) > 1 or true is not None:
        handles, legend_labels = axes[0, 0].get_legend_handles_labels()
        target = axes[0, d - 1]
        target.legend(handles, legend_labels, loc="upper right", fontsize="small", frameon=False)
    return _finish(fig, path)


# --- loss_history -------------------------------------------------------------------------


def _loss_series(losses_hist: Any) -> dict[str, np.ndarray]:
    """{name: (E,)} from VI.losses_hist (a dict of lists) or one list of losses."""
    if isinstance(losses_hist, Mapping):
        keys = [k for k in _LOSS_KEYS if k in losses_hist]
        if not keys:
            raise ValueError(
                f"`losses_hist` must have at least one of the keys {_LOSS_KEYS} "
                f"(as VI.losses_hist has), got keys {sorted(map(str, losses_hist))}."
            )
        series = {k: _as_array(losses_hist[k], f"losses_hist[{k!r}]") for k in keys}
    else:
        series = {"loss": _as_array(losses_hist, "losses_hist")}
    lengths = set()
    for key, values in series.items():
        where = "losses_hist" if len(series) == 1 and key == "loss" else f"losses_hist[{key!r}]"
        if values.ndim != 1 or values.size == 0:
            raise ValueError(
                f"`{where}` must be a non-empty list of one value per epoch (E,), "
                f"got shape {values.shape}."
            )
        lengths.add(values.size)
    if len(lengths) > 1:
        sizes = {k: v.size for k, v in series.items()}
        raise ValueError(f"`losses_hist` entries must have one value per epoch each, got {sizes}.")
    return series


def loss_history(
    losses_hist: Mapping[str, Sequence[float]] | Sequence[float] | torch.Tensor | np.ndarray,
    path: str | os.PathLike[str] | None = None,
    log_scale: bool | Literal["auto"] = "auto",
) -> Figure:
    r"""The loss per epoch, with the best epoch marked.

    From :attr:`VI.losses_hist <gradcal.infer.vi.VI>` the total, the loss and the
    regularisation (w KL) are drawn (``dropped`` is not); the best epoch is the first with
    the lowest total, the one whose state ``VI`` keeps as ``best_estimator_state_dict``.
    A plain list (E,), such as a loss history of SMD, is drawn as one line. Epochs count
    from 0; NaN values leave gaps.

    Arguments:
        losses_hist: a dict with some of the keys ``total``, ``loss``, ``regularisation``,
            each a list (E,), or one list, array or tensor (E,).
        path: where to save the figure; nothing is written without it.
        log_scale: True or False, or ``"auto"``: logarithmic when every value of the total
            and the loss (of the regularisation alone when it is all there is) is positive
            and they span more than two decades; the axis then spans those values, and
            smaller regularisation values fall below it. True with values <= 0 gives a
            symmetric log scale.

    Returns:
        The figure (one axes).

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> hist = {"total": [5.0, 3.0, 2.0, 2.5], "loss": [4.0, 2.5, 1.8, 2.3],
        ...         "regularisation": [1.0, 0.5, 0.2, 0.2], "dropped": [0, 0, 0, 0]}
        >>> fig = loss_history(hist)
        >>> fig.axes[0].get_xlabel(), fig.axes[0].get_yscale()
        ('epoch', 'linear')
        >>> plt.close(fig)
    """
    plt = _pyplot()
    series = _loss_series(losses_hist)
    if log_scale not in ("auto", True, False):
        raise ValueError(f"`log_scale` must be True, False or 'auto', got {log_scale!r}.")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    for key, values in series.items():
        ax.plot(np.arange(values.size), values, label=key, linewidth=1.2)
    key = "total" if "total" in series else next(iter(series))
    values = series[key]
    finite = np.isfinite(values)
    if finite.any():
        best = int(np.argmin(np.where(finite, values, np.inf)))
        ax.axvline(best, color="0.4", linestyle="--", linewidth=1.0)
        ax.plot(best, values[best], "o", color="k", label=f"best epoch {best}: {values[best]:.4g}")

    # The scale follows the total and the loss: the regularisation w KL starts near 0 (q
    # starts at the prior), and its first values (1e-12, say) would stretch a log axis over
    # ten decades and flatten the curves that matter; below the axis it is clipped.
    headline = [v for k, v in series.items() if k != "regularisation"] or list(series.values())
    every = np.concatenate(headline)
    every = every[np.isfinite(every)]
    positive = every.size > 0 and every.min() > 0
    if log_scale == "auto":
        log_scale = bool(positive and every.max() / every.min() > 100)
    if log_scale and positive:
        ax.set_yscale("log")
        low, high = every.min(), max(every.max(), *(np.nanmax(v) for v in series.values()))
        ax.set_ylim(low / 1.5, high * 1.5)
    elif log_scale:
        nonzero = np.abs(every[every != 0])
        ax.set_yscale("symlog", linthresh=float(nonzero.min()) if nonzero.size else 1.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    return _finish(fig, path)


# --- predictive_bands ---------------------------------------------------------------------


def _percent(q: float) -> str:
    return f"{100 * q:.3g}%"


def predictive_bands(
    simulated: torch.Tensor | ArrayLike | Sequence[torch.Tensor | ArrayLike],
    observed: torch.Tensor | ArrayLike | Sequence[Any] | None = None,
    quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
    time: torch.Tensor | ArrayLike | Sequence[Any] | None = None,
    path: str | os.PathLike[str] | None = None,
    names: str | Sequence[str] | None = None,
) -> Figure:
    r"""Posterior predictive bands of simulated series against the observed series.

    At each time the quantiles of the B simulated values are taken; the lowest and highest
    quantiles bound the outer band, the next pair the next band, and so on; an unpaired
    middle quantile (the median by default) is drawn as a line. A model with several
    outputs (``run_and_observe`` returns a list) gets one panel per output. Non-finite
    simulated values (failed draws) are left out of the quantiles, with a warning.

    Arguments:
        simulated: simulated series (B, T) (B draws, for instance
            ``model.run_and_observe(q.sample(B)[0])[0]``), or a list or tuple of such, one
            per output (each with its own B and T).
        observed: the observed series (T,), or a list with one (T,) (or None) per output.
        quantiles: levels in [0, 1], distinct (sorted here).
        time: the times (T,) of every panel, or a list with one (T,) per output
            (default 0, ..., T - 1).
        path: where to save the figure; nothing is written without it.
        names: one label per output (a string for a single output).

    Returns:
        The figure, one axes per output.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from gradcal.models import RandomWalk
        >>> model = RandomWalk(50)
        >>> simulated = model.run_and_observe(torch.full((200, 1), 0.3))[0][..., 0]  # (200, 51)
        >>> observed = model.run_and_observe(torch.tensor([0.3]))[0][:, 0]          # (51,)
        >>> fig = predictive_bands(simulated, observed, names="x")
        >>> len(fig.axes)
        1
        >>> plt.close(fig)
    """
    plt = _pyplot()
    multi = isinstance(simulated, list | tuple)
    if multi and not simulated:
        raise ValueError("`simulated` must be (B, T) or a non-empty list of (B, T), got [].")
    raw = list(simulated) if multi else [simulated]
    k = len(raw)

    def label(name: str, i: int) -> str:
        return f"{name}[{i}]" if multi else name

    sims = [_array(s, label("simulated", i), "(B, T)", 2) for i, s in enumerate(raw)]

    if observed is None:
        obs: list[Any] = [None] * k
    elif multi:
        if not isinstance(observed, list | tuple) or len(observed) != k:
            raise ValueError(
                f"`observed` must be a list with one (T,) series per output ({k}) when "
                f"`simulated` is a list, got {type(observed).__name__}"
                + (f" of length {len(observed)}." if isinstance(observed, list | tuple) else ".")
            )
        obs = list(observed)
    else:
        obs = [observed]
    for i, (sim, o) in enumerate(zip(sims, obs, strict=True)):
        if o is not None:
            o = obs[i] = _as_array(o, label("observed", i))
            if o.shape != (sim.shape[1],):
                raise ValueError(
                    f"`{label('observed', i)}` must have shape ({sim.shape[1]},) to match "
                    f"`{label('simulated', i)}` (B, T) = {sim.shape}, got {o.shape}."
                )

    levels = _as_array(quantiles, "quantiles")
    if (
        levels.ndim != 1
        or levels.size == 0
        or not np.all((levels >= 0) & (levels <= 1))
        or np.unique(levels).size != levels.size
    ):
        raise ValueError(
            f"`quantiles` must be distinct levels in [0, 1], shape (Q,), got {quantiles!r}."
        )
    levels = np.sort(levels)

    per_output = (
        multi
        and isinstance(time, list | tuple)
        and len(time) == k
        and all(np.ndim(t) == 1 for t in time)
    )
    times = []
    for i, sim in enumerate(sims):
        if time is None:
            times.append(np.arange(sim.shape[1]))
            continue
        t = _as_array(time[i], f"time[{i}]") if per_output else _as_array(time, "time")
        if t.shape != (sim.shape[1],):
            where = f"time[{i}]" if per_output else "time"
            raise ValueError(
                f"`{where}` must have shape ({sim.shape[1]},) to match "
                f"`{label('simulated', i)}` (B, T) = {sim.shape}, got {t.shape}."
            )
        times.append(t)
    labels = _names(names, k, [f"output {i}" for i in range(k)] if multi else [""], "output")

    fig, axes = plt.subplots(
        k, 1, figsize=(7.0, 2.6 * k + 0.6), squeeze=False, constrained_layout=True
    )
    pairs = levels.size // 2
    for i, (sim, o, t, name) in enumerate(zip(sims, obs, times, labels, strict=True)):
        ax = axes[i, 0]
        finite = np.isfinite(sim)
        if not finite.all():
            bad = int((~finite.all(axis=1)).sum())
            warnings.warn(
                f"predictive_bands: {bad} of {sim.shape[0]} draws of "
                f"`{label('simulated', i)}` have NaN or infinite values; the quantiles at "
                "each time use the finite ones.",
                stacklevel=2,
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN times give NaN
            q = np.nanquantile(np.where(finite, sim, np.nan), levels, axis=0)  # (Q, T)
        for p in range(pairs):
            ax.fill_between(
                t,
                q[p],
                q[-1 - p],
                color=_POSTERIOR,
                alpha=0.22,
                linewidth=0,
                label=f"{_percent(levels[p])} to {_percent(levels[-1 - p])}",
            )
        if levels.size % 2:
            middle = levels[pairs]
            ax.plot(
                t,
                q[pairs],
                color=_POSTERIOR,
                linewidth=1.2,
                label="median" if middle == 0.5 else f"{_percent(middle)} quantile",
            )
        if o is not None:
            ax.plot(t, o, color="k", linewidth=1.2, label="observed")
        if name:
            ax.set_ylabel(name)
        if i == 0:
            ax.legend(fontsize="small", loc="best")
    axes[-1, 0].set_xlabel("time")
    return _finish(fig, path)


# --- trace_plot ---------------------------------------------------------------------------


def trace_plot(
    chains: torch.Tensor | ArrayLike,
    names: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    warmup: int | None = None,
) -> Figure:
    r"""MCMC traces: each parameter's value against the step, one line per chain.

    Arguments:
        chains: draws (C, S, D): C chains of S steps over D parameters.
        names: one label per parameter (default theta_0, ..., theta_{D-1}).
        path: where to save the figure; nothing is written without it.
        warmup: the number of initial steps that are warm-up (0 <= warmup <= S); that
            stretch is shaded.

    Returns:
        The figure, one axes (row) per parameter, sharing the step axis.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> chains = torch.randn(4, 300, 2).cumsum(1)      # (C, S, D)
        >>> fig = trace_plot(chains, names=["a", "b"], warmup=100)
        >>> len(fig.axes)
        2
        >>> plt.close(fig)
    """
    plt = _pyplot()
    x = _array(chains, "chains", "(C, S, D)", 3)
    n_chains, n_steps, d = x.shape
    labels = _names(names, d, _theta_names(d), "parameter")
    if warmup is not None and (
        isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= n_steps
    ):
        raise ValueError(
            f"`warmup` must be an int in [0, S] = [0, {n_steps}] for `chains` (C, S, D) = "
            f"{x.shape}, got {warmup!r}."
        )
    fig, axes = plt.subplots(
        d, 1, figsize=(7.0, 1.7 * d + 0.7), sharex=True, squeeze=False, constrained_layout=True
    )
    steps = np.arange(n_steps)
    for j in range(d):
        ax = axes[j, 0]
        if warmup:
            ax.axvspan(0, warmup, color="0.88", linewidth=0, zorder=0, label="warm-up")
        for c in range(n_chains):
            ax.plot(
                steps, x[c, :, j], color=f"C{c % 10}", linewidth=0.7, alpha=0.8, label=f"chain {c}"
            )
        ax.set_ylabel(labels[j])
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].set_xlim(0, max(n_steps - 1, 1))
    if n_chains <= 10 and (n_chains > 1 or warmup):
        axes[0, 0].legend(fontsize="small", loc="upper right", ncol=min(n_chains + 1, 6))
    return _finish(fig, path)
