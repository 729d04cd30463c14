r"""The signature kernel of paths, by its Goursat PDE, in plain torch (forward and reverse mode).

For paths x: [0, 1] -> R^d and y: [0, 1] -> R^d the signature kernel
$k_{sig}(x, y) = \langle S(x), S(y) \rangle$ solves (Salvi et al. 2021)

$$
\frac{\partial^2 K}{\partial s\,\partial t} = \langle \dot x_s, \dot y_t \rangle K,
\qquad K(0, \cdot) = K(\cdot, 0) = 1,\qquad k_{sig}(x, y) = K(1, 1),
$$

with $\langle \dot x_s, \dot y_t \rangle$ replaced by the second difference of a static
kernel $\kappa$ over each cell of the grid: for a linear $\kappa$ it is
$\langle \Delta x_i, \Delta y_j \rangle$, for an RBF
$\kappa(x_{i+1}, y_{j+1}) - \kappa(x_{i+1}, y_j) - \kappa(x_i, y_{j+1}) + \kappa(x_i, y_j)$.
Each cell is cut into $2^r \times 2^r$ (dyadic order r) and advanced by the explicit
second-order scheme

$$
K_{i+1,j+1} = (K_{i+1,j} + K_{i,j+1})(1 + M/2 + M^2/12) - K_{i,j}(1 - M^2/12).
$$

Why not pysiglib: its kernels are ``torch.autograd.Function`` objects with a custom backward
and no forward-mode rule (nor ``setup_context``), so :func:`torch.func.jvp` and
:func:`torch.func.vmap` refuse them, and gradcal's forward-mode gradients and its
``vmap``-based Jacobians need both. The solver here is plain tensor algebra: every cell of one
anti-diagonal of the grid is computed at once, for every pair of paths at once, so the
Python loop has only (number of anti-diagonals) steps.

Shapes: a path is (L, d); batches of paths are (..., L, d).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "TRANSFORMS",
    "StaticKernel",
    "basepoint",
    "lead_lag",
    "pairs_mean",
    "signature_gram",
    "signature_kernel",
    "signature_mmd",
    "sub_paths",
    "time_augment",
    "transform_paths",
    "truncated_signature",
]

TRANSFORMS = ("time", "lead_lag", "basepoint")


def time_augment(paths: Tensor) -> Tensor:
    """Add time as a first channel, from 0 to 1: (..., L, d) -> (..., L, d + 1).

    Example:
        >>> time_augment(torch.tensor([[5.0], [7.0], [6.0]])).tolist()
        [[0.0, 5.0], [0.5, 7.0], [1.0, 6.0]]
    """
    length = paths.shape[-2]
    t = torch.linspace(0.0, 1.0, length, dtype=paths.dtype, device=paths.device)
    t = t.reshape(length, 1).expand(*paths.shape[:-1], 1)
    return torch.cat([t, paths], dim=-1)


def lead_lag(paths: Tensor) -> Tensor:
    """The lead-lag transform: (..., L, d) -> (..., 2L - 1, 2d), lead then lag channels.

    The lead moves first, then the lag catches up, so the signature's level-2 areas hold
    the quadratic variation (volatility) of the path.

    Example:
        >>> lead_lag(torch.tensor([[1.0], [2.0]])).tolist()
        [[1.0, 1.0], [2.0, 1.0], [2.0, 2.0]]
    """
    repeated = paths.repeat_interleave(2, dim=-2)  # x0 x0 x1 x1 ...
    lead, lag = repeated[..., 1:, :], repeated[..., :-1, :]
    return torch.cat([lead, lag], dim=-1)


def basepoint(paths: Tensor) -> Tensor:
    """Start every path at the origin: (..., L, d) -> (..., L + 1, d).

    Without it the signature cannot see where a path starts (it depends on increments).

    Example:
        >>> basepoint(torch.tensor([[3.0], [4.0]])).tolist()
        [[0.0], [3.0], [4.0]]
    """
    zero = paths.new_zeros((*paths.shape[:-2], 1, paths.shape[-1]))
    return torch.cat([zero, paths], dim=-2)


def transform_paths(
    paths: Tensor, transforms: Sequence[str], scale: float | Tensor = 1.0
) -> Tensor:
    """Scale paths (..., L, d), then apply ``transforms`` in the order lead-lag, time,
    basepoint, whatever order they are listed in.

    Scaling comes first so that the time channel stays in [0, 1]; time is added after the
    lead-lag (time itself is not lead-lagged) and the basepoint last (the origin of all
    channels). Unknown names raise ValueError.

    Example:
        >>> transform_paths(torch.tensor([[1.0], [2.0]]), ["basepoint", "time"]).tolist()
        [[0.0, 0.0], [0.0, 1.0], [1.0, 2.0]]
    """
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise ValueError(f"`transforms`: unknown {unknown[0]!r}; known: {', '.join(TRANSFORMS)}.")
    paths = paths * scale
    if "lead_lag" in transforms:
        paths = lead_lag(paths)
    if "time" in transforms:
        paths = time_augment(paths)
    if "basepoint" in transforms:
        paths = basepoint(paths)
    return paths


def sub_paths(series: Tensor, window: int, stride: int = 1) -> Tensor:
    """Sliding windows of a series as a sample of paths: (..., T, d) -> (..., n, window, d).

    n = (T - window) // stride + 1 windows start at 0, stride, 2 stride, ...

    Example:
        >>> sub_paths(torch.arange(5.0)[:, None], 3, 2)[..., 0].tolist()
        [[0.0, 1.0, 2.0], [2.0, 3.0, 4.0]]
    """
    if not 2 <= window <= series.shape[-2]:
        raise ValueError(f"`window` must lie in [2, {series.shape[-2]}], got {window}.")
    if stride < 1:
        raise ValueError(f"`stride` must be >= 1, got {stride}.")
    return series.unfold(-2, window, stride).transpose(-1, -2)


class StaticKernel:
    """The static kernel on path points that the signature kernel lifts.

    ``"linear"``: $\\langle a, b \\rangle$ (the plain signature kernel).
    ``"rbf"``: $\\exp(-\\|a - b\\|^2 / (2 h^2))$, h = ``bandwidth`` (> 0).
    """

    def __init__(self, name: str = "linear", bandwidth: float | Tensor | None = None):
        if name not in ("linear", "rbf"):
            raise ValueError(f"`static_kernel` must be 'linear' or 'rbf', got {name!r}.")
        if bandwidth is not None and not float(bandwidth) > 0:
            raise ValueError(f"`bandwidth` must be > 0, got {float(bandwidth)}.")
        if name == "rbf" and bandwidth is None:
            raise ValueError("the rbf static kernel needs a `bandwidth`.")
        self.name, self.bandwidth = name, bandwidth

    def increments(self, x: Tensor, y: Tensor) -> Tensor:
        """Second differences over the grid's cells: x (..., A+1, d), y (..., B+1, d) ->
        (..., A, B)."""
        if self.name == "linear":
            dx, dy = x[..., 1:, :] - x[..., :-1, :], y[..., 1:, :] - y[..., :-1, :]
            return dx @ dy.transpose(-1, -2)
        h = torch.as_tensor(self.bandwidth, dtype=x.dtype, device=x.device)
        d2 = ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1)
        g = torch.exp(-d2 / (2.0 * h**2))
        return g[..., 1:, 1:] - g[..., 1:, :-1] - g[..., :-1, 1:] + g[..., :-1, :-1]

    def __repr__(self) -> str:
        return f"StaticKernel({self.name!r}, bandwidth={self.bandwidth})"


def _skew_indices(a: int, b: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Row and column indices of anti-diagonal p = i + j at row i, and which are in range:
    each (a, a + b - 1)."""
    i = torch.arange(a, device=device)[:, None]
    p = torch.arange(a + b - 1, device=device)[None, :]
    j = p - i
    valid = (j >= 0) & (j < b)
    return i.expand_as(j), j.clamp(0, b - 1), valid


def _solve(m: Tensor) -> Tensor:
    """K(A, B) of the Goursat scheme from cell increments m (..., A, B), by anti-diagonals.

    The diagonal vector holds K[i, p - i] for i = 0..A; cells outside the grid get
    coefficient 0, the boundary K[i, 0] = 1 a constant 1.
    """
    a, b = m.shape[-2], m.shape[-1]
    rows, cols, valid = _skew_indices(a, b, m.device)
    # diagonal-major layout, so that each step reads one contiguous slice:
    # skew[p, ..., i] = m[..., i, p - i]
    skew = m[..., rows.T, cols.T].movedim(-2, 0).contiguous()
    m2 = skew * skew / 12.0
    zero = skew.new_zeros(())
    valid = valid.T.reshape(a + b - 1, *([1] * (m.ndim - 2)), a)
    grow = torch.where(valid, 1.0 + 0.5 * skew + m2, zero)
    shrink = torch.where(valid, m2 - 1.0, zero)  # minus the coefficient of K[i, j]
    # the boundary K[i + 1, 0] = 1 sits on diagonal p + 2 at the row i = p + 1 (j = -1)
    diagonal = torch.arange(a + b - 1, device=m.device)[:, None]
    one = (diagonal - torch.arange(a, device=m.device)[None, :] == -1).to(m.dtype)
    batch = m.shape[:-2]
    prev2 = m.new_ones((*batch, a + 1))  # diagonal 0: only K[0, 0] = 1 matters
    prev1 = m.new_ones((*batch, a + 1))  # diagonal 1: K[0, 1] = K[1, 0] = 1
    for p in range(a + b - 1):  # cells (i + 1, j + 1) with i + j = p: diagonal p + 2
        inner = torch.addcmul(one[p], prev1[..., 1:] + prev1[..., :-1], grow[p])
        inner = torch.addcmul(inner, prev2[..., :-1], shrink[p])
        # K[0, p + 2] = 1 in front; the boundary K[p + 2, 0] = 1 came through ``one``
        prev2, prev1 = prev1, torch.nn.functional.pad(inner, (1, 0), value=1.0)
    return prev1[..., a]


def _refine(m: Tensor, order: int) -> Tensor:
    """Each cell split into 2^order x 2^order cells of increment m / 4^order."""
    if order == 0:
        return m
    k = 2**order
    return m.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1) / (k * k)


def signature_kernel(
    x: Tensor,
    y: Tensor,
    static_kernel: StaticKernel | None = None,
    dyadic_order: int = 0,
) -> Tensor:
    r"""Signature kernel of paths x (..., Lx, d) and y (..., Ly, d), broadcast: (...,).

    Arguments:
        x, y: paths; leading axes broadcast (pairs of paths).
        static_kernel: :class:`StaticKernel` (default linear).
        dyadic_order: each grid cell is refined into 2^r x 2^r (the error falls like 4^-r).

    Two straight lines with increments u and v (linear static kernel) give
    $\sum_k \langle u, v\rangle^k / (k!)^2$:

    Example:
        >>> x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        >>> round(signature_kernel(x, 0.5 * x, dyadic_order=6).item(), 4)  # I0(2 sqrt(.5))
        1.5661
    """
    if x.shape[-2] < 2 or y.shape[-2] < 2:
        raise ValueError("paths need at least 2 points each.")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"paths of dimension {x.shape[-1]} and {y.shape[-1]} do not match.")
    if isinstance(dyadic_order, bool) or not isinstance(dyadic_order, int) or dyadic_order < 0:
        raise ValueError(f"`dyadic_order` must be an int >= 0, got {dyadic_order!r}.")
    kernel = static_kernel or StaticKernel()
    batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    x = x.expand(*batch, *x.shape[-2:])
    y = y.expand(*batch, *y.shape[-2:])
    return _solve(_refine(kernel.increments(x, y), dyadic_order))


def _recomputed(f: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """f(*args) with its intermediates recomputed in the backward pass (plain under
    torch.func transforms, whose saved-tensor hooks checkpoint cannot use)."""
    try:
        return checkpoint(f, *args, use_reentrant=False)
    except RuntimeError as error:
        if "saved tensor hooks" not in str(error):
            raise
        return f(*args)


def signature_gram(
    x: Tensor,
    y: Tensor,
    static_kernel: StaticKernel | None = None,
    dyadic_order: int = 0,
    chunk_size: int | None = None,
) -> Tensor:
    """Gram matrix of samples x (..., n, L, d) and y (..., m, L', d): (..., n, m).

    ``chunk_size`` solves that many rows of x at a time; under autograd each block is
    recomputed in the backward pass, so memory is O(chunk_size * m * L * L').
    """

    def block(rows: Tensor) -> Tensor:
        return signature_kernel(
            rows[..., :, None, :, :], y[..., None, :, :, :], static_kernel, dyadic_order
        )

    n = x.shape[-3]
    if chunk_size is None or n <= chunk_size:
        return block(x)
    grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    blocks = [x[..., s : s + chunk_size, :, :] for s in range(0, n, chunk_size)]
    return torch.cat([_recomputed(block, b) if grad else block(b) for b in blocks], dim=-2)


def pairs_mean(gram: Tensor, exclude_diagonal: bool, mask: Tensor | None = None) -> Tensor:
    """Mean of a Gram matrix (..., n, m) over the pairs in ``mask`` (n, m) if given, else
    over all pairs, or the pairs i != j with ``exclude_diagonal``: (...,)."""
    n = gram.shape[-2]
    if mask is not None:
        return (gram * mask.to(gram.dtype)).sum((-1, -2)) / mask.sum()
    if not exclude_diagonal:
        return gram.mean((-1, -2))
    diagonal = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (gram.sum((-1, -2)) - diagonal) / (n * (n - 1))


def signature_mmd(
    x: Tensor,
    y: Tensor,
    static_kernel: StaticKernel | None = None,
    dyadic_order: int = 0,
    *,
    estimator: str = "unbiased",
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    observed_term: Tensor | None = None,
) -> Tensor:
    r"""Squared MMD of the signature kernel between samples of paths, batched over draws.

    $$
    \mathrm{MMD}^2 = E\,k(x, x') + E\,k(y, y') - 2\,E\,k(x, y)
    $$

    Arguments:
        x: simulated paths (..., n, L, d); leading axes are draws.
        y: observed paths (m, L', d).
        static_kernel, dyadic_order: as :func:`signature_kernel`.
        estimator: ``"unbiased"`` (pairs i != j in the x-x and y-y terms, needs n, m >= 2)
            or ``"biased"`` (all pairs).
        mask: (n, n) boolean, with ``"unbiased"`` and n = m: the pairs (a, b) that enter
            all three terms (e.g. sub-paths that do not overlap in time, which are nearly
            independent for a mixing process), so each term averages the same pairs.
        chunk_size: rows of each Gram matrix solved at a time (see :func:`signature_gram`).
        observed_term: the y-y term if already known (it depends on y only).

    Returns:
        MMD^2 with the draws' shape.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.randn(20, 6, 1, generator=g).cumsum(-2) * 0.3
        >>> same = torch.randn(20, 6, 1, generator=g).cumsum(-2) * 0.3
        >>> drift = same + torch.linspace(0, 1, 6)[:, None]
        >>> bool(signature_mmd(same, y) < 0.1 < signature_mmd(drift, y))
        True
    """
    if estimator not in ("unbiased", "biased"):
        raise ValueError(f"`estimator` must be 'unbiased' or 'biased', got {estimator!r}.")
    unbiased = estimator == "unbiased"
    n, m = x.shape[-3], y.shape[-3]
    if mask is not None and (not unbiased or mask.shape != (n, m) or n != m):
        raise ValueError(f"`mask` must be ({n}, {n}) with the unbiased estimator and n = m.")
    if mask is not None and not mask.any():
        raise ValueError("`mask` selects no pair of paths: use more paths or 'biased'.")
    if unbiased and mask is None and min(n, m) < 2:
        raise ValueError(
            f"the unbiased MMD needs at least 2 paths on each side, got {n} and {m}: "
            "use estimator 'biased' or more paths."
        )
    kxx = pairs_mean(signature_gram(x, x, static_kernel, dyadic_order, chunk_size), unbiased, mask)
    kxy = pairs_mean(signature_gram(x, y, static_kernel, dyadic_order, chunk_size), False, mask)
    if observed_term is None:
        with torch.no_grad():
            gyy = signature_gram(y, y, static_kernel, dyadic_order, chunk_size)
            observed_term = pairs_mean(gyy, unbiased, mask)
    return kxx - 2.0 * kxy + observed_term


def truncated_signature(path: Tensor, depth: int) -> list[Tensor]:
    r"""Levels 1..depth of the signature of a piecewise-linear path (L, d), by Chen's identity.

    Level k is a tensor (d,)*k. A reference for tests and small paths, not fast: the
    signature of one segment with increment $\Delta$ is
    $(\Delta^{\otimes k} / k!)_k$, and Chen's identity multiplies the segments'.

    Example:
        >>> [t.tolist() for t in truncated_signature(torch.tensor([[0.0], [2.0]]), 2)]
        [[2.0], [[2.0]]]
    """
    d = path.shape[-1]
    levels = [path.new_zeros((d,) * k) for k in range(1, depth + 1)]
    for delta in path[1:] - path[:-1]:
        segment = []
        power = path.new_ones(())
        for k in range(1, depth + 1):
            power = torch.tensordot(power, delta, dims=0) if k > 1 else delta.clone()
            segment.append(power / math.factorial(k))
        new = []
        for k in range(1, depth + 1):  # (S * seg)_k = S_k + seg_k + sum_{a+b=k} S_a (x) seg_b
            total = levels[k - 1] + segment[k - 1]
            for j in range(1, k):
                total = total + torch.tensordot(levels[j - 1], segment[k - j - 1], dims=0)
            new.append(total)
        levels = new
    return levels
