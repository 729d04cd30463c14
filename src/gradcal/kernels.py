r"""Kernels and distances between point sets, safe in forward and reverse mode.

Points are (..., n, d): leading axes are batch axes (draws), n points of dimension d.
Squared distances are summed feature by feature from exact differences, never by
$|a|^2 + |b|^2 - 2 a \cdot b$ (which cancels and turns ``inf - inf`` into NaN) and
never by :func:`torch.cdist` (which has no forward-mode derivative in torch 2.13).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "GaussianKernel",
    "Kernel",
    "LaplaceKernel",
    "distances",
    "median_distance",
    "safe_sqrt",
    "squared_distances",
]


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    r"""Pairwise $\|a_i - b_j\|^2$ of points a (..., n, d) and b (..., m, d): (..., n, m).

    Example:
        >>> squared_distances(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]))
        tensor([[25.]])
    """
    total = (a[..., :, None, 0] - b[..., None, :, 0]) ** 2
    for k in range(1, a.shape[-1]):
        total = total + (a[..., :, None, k] - b[..., None, :, k]) ** 2
    return total


def distances(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise Euclidean distances (..., n, m); |a_i - b_j| directly for d = 1 (no overflow
    of the square), else the safe square root of :func:`squared_distances`."""
    if a.shape[-1] == 1:
        return (a[..., :, None, 0] - b[..., None, :, 0]).abs()
    return safe_sqrt(squared_distances(a, b))


def safe_sqrt(x: Tensor) -> Tensor:
    """Square root whose gradient at 0 is 0 instead of infinite (so no NaN reaches theta)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)


def median_distance(points: Tensor, max_points: int = 1000) -> Tensor:
    r"""Median of the pairwise distances $\|y_i - y_j\|$, i < j, of points (n, d).

    At most ``max_points`` evenly spaced points are used (the median of a large sample
    barely moves). When the median is zero (a constant series, or mostly ties), the mean
    of the non-zero distances is used, and 1 when every distance is zero, so kernels built
    on it stay finite.

    Example:
        >>> median_distance(torch.tensor([[0.0], [1.0], [3.0]]))
        tensor(2.)
    """
    if points.shape[0] > max_points:
        idx = torch.linspace(0, points.shape[0] - 1, max_points, device=points.device).long()
        points = points[idx]
    with torch.no_grad():
        d2 = squared_distances(points, points)
        i, j = torch.triu_indices(*d2.shape, offset=1, device=d2.device)
        d = d2[i, j].sqrt()
        if d.numel() == 0:
            return torch.ones((), dtype=points.dtype, device=points.device)
        med = torch.quantile(d, 0.5)
        if med > 0:
            return med
        nonzero = d[d > 0]
        return nonzero.mean() if nonzero.numel() else torch.ones_like(med)


class Kernel:
    """A translation-invariant kernel k(a, b) = f(||a - b||^2) with bandwidths.

    ``bandwidth=None`` means "fit by the median heuristic from the observed data": call
    :meth:`fitted` (the losses do) to get a copy with the bandwidths set. Several
    bandwidths give the mean of the kernels, a mixture robust to a poor single choice.
    """

    def __init__(
        self,
        bandwidth: float | Sequence[float] | Tensor | None = None,
        scales: Sequence[float] = (1.0,),
    ):
        if bandwidth is not None:
            bandwidth = torch.as_tensor(bandwidth, dtype=torch.float64).reshape(-1)
            if (bandwidth <= 0).any():
                raise ValueError(
                    f"{type(self).__name__}: `bandwidth` must be > 0, got {bandwidth}."
                )
        if len(scales) == 0 or any(s <= 0 for s in scales):
            raise ValueError(f"{type(self).__name__}: `scales` must be positive, got {scales}.")
        if bandwidth is not None and tuple(scales) != (1.0,):
            raise ValueError(
                f"{type(self).__name__}: `scales` multiply the median heuristic; with a given "
                "`bandwidth` list the bandwidths themselves instead."
            )
        self.bandwidth = bandwidth
        self.scales = tuple(float(s) for s in scales)

    def _heuristic(self, median: Tensor) -> Tensor:
        """Bandwidth matching the median distance."""
        return median

    def fitted(self, points: Tensor) -> Kernel:
        """This kernel, with bandwidths from the median heuristic if none were given."""
        if self.bandwidth is not None:
            return self
        h = self._heuristic(median_distance(points)).double()
        return type(self)(bandwidth=h * torch.tensor(self.scales, dtype=torch.float64))

    def _profile(self, d2: Tensor, h: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, d2: Tensor) -> Tensor:
        """Kernel values from squared distances (any shape)."""
        if self.bandwidth is None:
            raise ValueError(f"{type(self).__name__} has no bandwidth: call `.fitted(y)` first.")
        h = self.bandwidth.to(d2)
        if h.numel() == 1:
            return self._profile(d2, h[0])
        return sum(self._profile(d2, hk) for hk in h) / h.numel()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bandwidth={self.bandwidth}, scales={self.scales})"


class GaussianKernel(Kernel):
    r"""Gaussian kernel $\exp(-\|a - b\|^2 / (2 h^2))$.

    The median heuristic sets $h^2 = m^2 / 2$ with m the median distance of the
    observed points, so that $k = \exp(-d^2 / m^2)$, BlackBIRDS' form (BlackBIRDS
    takes the median over the whole distance matrix, zero diagonal included, which gives a
    slightly smaller m; here it is over distinct pairs).
    ``scales`` multiplies that h, e.g. ``scales=(0.5, 1, 2)`` for a mixture.

    Example:
        >>> k = GaussianKernel().fitted(torch.tensor([[0.0], [1.0], [3.0]]))
        >>> round(k(torch.tensor(4.0)).item(), 4)   # exp(-4 / 2^2)
        0.3679
    """

    def _heuristic(self, median: Tensor) -> Tensor:
        return median / math.sqrt(2.0)

    def _profile(self, d2: Tensor, h: Tensor) -> Tensor:
        return torch.exp(-d2 / (2.0 * h**2))


class LaplaceKernel(Kernel):
    r"""Laplace (exponential) kernel $\exp(-\|a - b\| / h)$, h the median distance.

    Heavier tails than the Gaussian: keeps a gradient for simulations far from the data.

    Example:
        >>> round(LaplaceKernel(bandwidth=2.0)(torch.tensor(4.0)).item(), 4)   # exp(-2 / 2)
        0.3679
    """

    def _profile(self, d2: Tensor, h: Tensor) -> Tensor:
        return torch.exp(-safe_sqrt(d2) / h)
