r"""Discrepancies between a simulated and an observed sample: MMD, energy distance, MSE.

Every function is batched over the leading axes of the simulated sample ``x`` (draws) and
returns one value per draw. The observed sample ``y`` has no batch axis; its shape fixes
the shape of one point: ``y`` (m,) holds m scalars, ``y`` (m, d) m points of dimension d,
and ``x`` is then (..., n) or (..., n, d).

Time series: an i.i.d. discrepancy on the values of a series ignores their order. Compare
:func:`increments` for a series with a trend or unit root (prices, random walks), and
:func:`lag_embedding` windows (x_t, ..., x_{t+L-1}) when temporal structure carries the
information (autocorrelation, volatility clustering: use it on returns or increments).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from gradcal.kernels import GaussianKernel, Kernel, distances, squared_distances

__all__ = [
    "as_points",
    "check_sample_sizes",
    "energy_distance",
    "increments",
    "lag_embedding",
    "mmd",
    "mse",
]

Estimator = Literal["unbiased", "biased", "linear"]


def as_points(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten ``x`` (..., n, *event) and ``y`` (m, *event) to points (..., n, d), (m, d)."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError("`x` and `y` must be tensors.")
    if y.ndim == 0:
        raise ValueError("`y` must have at least one axis (m,) of observations, got a scalar.")
    event = y.shape[1:]
    if x.ndim < y.ndim or x.shape[x.ndim - len(event) :] != event:
        raise ValueError(
            f"simulated `x` of shape {tuple(x.shape)} does not match observed `y` of shape "
            f"{tuple(y.shape)}: x must be (..., n{', ' if event else ''}"
            f"{', '.join(map(str, event))})."
        )
    d = int(torch.tensor(event).prod()) if event else 1
    return x.reshape(*x.shape[: x.ndim - len(event)], d), y.reshape(y.shape[0], d)


def increments(points: Tensor) -> Tensor:
    """Differences along time: (..., T, d) -> (..., T - 1, d).

    Example:
        >>> increments(torch.tensor([[1.0], [3.0], [6.0]])).flatten().tolist()
        [2.0, 3.0]
    """
    return points[..., 1:, :] - points[..., :-1, :]


def lag_embedding(points: Tensor, window: int) -> Tensor:
    """Windows of ``window`` consecutive points: (..., T, d) -> (..., T - L + 1, L * d).

    Example:
        >>> lag_embedding(torch.arange(4.0)[:, None], 2).tolist()
        [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]
    """
    if window < 1 or window > points.shape[-2]:
        raise ValueError(f"`window` must lie in [1, {points.shape[-2]}], got {window}.")
    if window == 1:
        return points
    windows = points.unfold(-2, window, 1)  # (..., T - L + 1, d, L)
    return windows.transpose(-1, -2).reshape(*windows.shape[:-2], -1)


def _recomputed(f: Callable[[Tensor], Tensor], rows: Tensor) -> Tensor:
    """f(rows), its intermediates recomputed in the backward pass instead of stored.

    torch.func transforms do not support the checkpoint's saved-tensor hooks; there the
    block is computed plainly (their memory is the transform's business).
    """
    try:
        return checkpoint(f, rows, use_reentrant=False)
    except RuntimeError as error:
        if "saved tensor hooks" not in str(error):
            raise
        return f(rows)


def _pair_mean(
    f: Callable[[Tensor], Tensor],
    a: Tensor,
    b: Tensor,
    exclude_diagonal: bool,
    chunk_size: int | None,
    pairwise: Callable[[Tensor, Tensor], Tensor] = squared_distances,
) -> Tensor:
    """Mean of f(pairwise(a, b)_ij) over pairs (i, j), i != j if ``exclude_diagonal``: (...,).

    ``pairwise`` is the squared distance by default (kernels), or the distance.

    With ``chunk_size`` the n x m matrix is formed in blocks of rows; under autograd each
    block is recomputed in the backward pass, so memory is O(chunk_size * m), not O(n m).
    """
    n, m = a.shape[-2], b.shape[-2]

    def block_sum(rows: Tensor) -> Tensor:
        return f(pairwise(rows, b)).sum((-1, -2))

    if chunk_size is None or n <= chunk_size:
        total = block_sum(a)
    else:
        blocks = [a[..., s : s + chunk_size, :] for s in range(0, n, chunk_size)]
        grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
        total = sum(_recomputed(block_sum, rows) if grad else block_sum(rows) for rows in blocks)
    if not exclude_diagonal:
        return total / (n * m)
    return (total - n * f(a.new_zeros(()))) / (n * (n - 1))


def check_sample_sizes(estimator: str, n: int, m: int) -> None:
    """Raise unless ``estimator`` (an MMD estimator or ``"energy"``) can use n and m points."""
    if estimator not in ("unbiased", "biased", "linear", "energy"):
        raise ValueError(
            f"`estimator` must be 'unbiased', 'biased' or 'linear', got {estimator!r}."
        )
    if estimator != "biased" and min(n, m) < 2:
        what = "energy distance" if estimator == "energy" else f"{estimator} MMD"
        raise ValueError(f"the {what} needs at least 2 points on each side, got {n} and {m}.")


def _linear_mmd(kernel: Kernel, x: Tensor, y: Tensor) -> Tensor:
    """Gretton et al. (2012) linear-time MMD^2 on disjoint pairs of points: O(n) memory."""
    k = min(x.shape[-2], y.shape[-2]) // 2
    x1, x2 = x[..., 0 : 2 * k : 2, :], x[..., 1 : 2 * k : 2, :]
    y1, y2 = y[0 : 2 * k : 2], y[1 : 2 * k : 2]

    def kern(a: Tensor, b: Tensor) -> Tensor:
        return kernel(((a - b) ** 2).sum(-1))

    return (kern(x1, x2) + kern(y1, y2) - kern(x1, y2) - kern(x2, y1)).mean(-1)


def mmd_observed_term(kernel: Kernel, y: Tensor, estimator: Estimator, chunk_size: int | None):
    """The part of MMD^2 that involves only the observed points y (m, d): a constant."""
    return _pair_mean(kernel, y, y, estimator == "unbiased", chunk_size)


def mmd_simulated_terms(
    kernel: Kernel, x: Tensor, y: Tensor, estimator: Estimator, chunk_size: int | None
) -> Tensor:
    """E k(x, x') - 2 E k(x, y): the part of MMD^2 that depends on x (..., n, d)."""
    kxx = _pair_mean(kernel, x, x, estimator == "unbiased", chunk_size)
    return kxx - 2.0 * _pair_mean(kernel, x, y, False, chunk_size)


def mmd(
    x: Tensor,
    y: Tensor,
    kernel: Kernel | None = None,
    *,
    estimator: Estimator = "unbiased",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Squared maximum mean discrepancy between samples x (..., n[, d]) and y (m[, d]).

    $$
    \mathrm{MMD}^2 = E\,k(x, x') + E\,k(y, y') - 2\,E\,k(x, y)
    $$

    Arguments:
        x: simulated sample, leading axes are batch axes.
        y: observed sample.
        kernel: a :class:`~gradcal.kernels.Kernel`; default Gaussian, bandwidth by the
            median heuristic on ``y``.
        estimator: ``"unbiased"`` (U-statistic, pairs i != j; can be slightly negative),
            ``"biased"`` (V-statistic, >= 0) or ``"linear"`` (disjoint pairs, O(n) time and
            memory, higher variance).
        chunk_size: form the kernel matrices in blocks of this many rows (memory
            O(chunk_size * m), also in the backward pass).

    Returns:
        MMD^2 with the batch shape of ``x``.

    Example:
        >>> y = torch.randn(500)
        >>> same, shifted = mmd(torch.randn(500), y), mmd(torch.randn(500) + 1, y)
        >>> bool(same < 0.01 < shifted)
        True
    """
    xp, yp = as_points(x, y)
    check_sample_sizes(estimator, xp.shape[-2], yp.shape[-2])
    kernel = (kernel or GaussianKernel()).fitted(yp)
    if estimator == "linear":
        return _linear_mmd(kernel, xp, yp)
    return mmd_simulated_terms(kernel, xp, yp, estimator, chunk_size) + mmd_observed_term(
        kernel, yp, estimator, chunk_size
    )


def energy_distance(x: Tensor, y: Tensor, *, chunk_size: int | None = None) -> Tensor:
    r"""Energy distance $2 E\|x - y\| - E\|x - x'\| - E\|y - y'\|$ (U-statistics).

    Needs no bandwidth; zero in expectation iff the distributions agree.

    Arguments:
        x: simulated sample (..., n[, d]).
        y: observed sample (m[, d]).
        chunk_size: as for :func:`mmd`.

    Returns:
        The energy distance with the batch shape of ``x``.

    Example:
        >>> y = torch.randn(500)
        >>> bool(energy_distance(torch.randn(500), y) < 0.05 < energy_distance(y + 1, y))
        True
    """
    xp, yp = as_points(x, y)
    check_sample_sizes("energy", xp.shape[-2], yp.shape[-2])
    return energy_observed_term(yp, chunk_size) + energy_simulated_terms(xp, yp, chunk_size)


def _identity(t: Tensor) -> Tensor:
    return t


def energy_observed_term(y: Tensor, chunk_size: int | None) -> Tensor:
    """-E||y - y'||: the constant part of the energy distance, from y (m, d)."""
    return -_pair_mean(_identity, y, y, True, chunk_size, distances)


def energy_simulated_terms(x: Tensor, y: Tensor, chunk_size: int | None) -> Tensor:
    """2 E||x - y|| - E||x - x'||: the part of the energy distance that depends on x."""
    exy = _pair_mean(_identity, x, y, False, chunk_size, distances)
    return 2.0 * exy - _pair_mean(_identity, x, x, True, chunk_size, distances)


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error over the axes of ``y``: x (..., *y.shape) -> (...,).

    Example:
        >>> mse(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([1.0, 4.0])).tolist()
        [2.0, 8.5]
    """
    if x.shape[x.ndim - y.ndim :] != y.shape:
        raise ValueError(
            f"simulated `x` of shape {tuple(x.shape)} does not match observed `y` of shape "
            f"{tuple(y.shape)}: x must be (..., {', '.join(map(str, y.shape))})."
        )
    return ((x - y) ** 2).mean(tuple(range(x.ndim - y.ndim, x.ndim)))
