r"""Differentiable surrogates of discrete randomness.

Agent-based models are full of coin flips and thresholds whose derivative is zero almost
everywhere. Each function here keeps the discrete value a simulator needs where it can,
and supplies a useful gradient. Every function is elementwise, so any leading batch axes
(draws, agents) pass through unchanged, and every function works under reverse mode,
forward mode (:func:`torch.func.jvp`) and :func:`torch.func.vmap`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "bernoulli_mask",
    "bernoulli_positions",
    "check_hardness",
    "relaxed_bernoulli",
    "relaxed_categorical",
    "soft_maximum",
    "soft_minimum",
    "straight_through_sign",
    "straight_through_threshold",
    "threshold_order_sum",
]


def _straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """The value of ``hard`` with the gradient of ``soft``."""
    return hard + (soft - soft.detach())


def _probs_to_logits(probs: Tensor) -> Tensor:
    # Clamping keeps log(0) out of the graph: at p = 0 or 1 the clamp's zero gradient
    # replaces an infinite one, so a certain event gives a zero, not NaN, gradient.
    info = torch.finfo(probs.dtype)
    p = probs.clamp(info.tiny, 1.0 - info.eps)
    return torch.log(p) - torch.log1p(-p)


def relaxed_bernoulli(
    logits: Tensor | None = None,
    *,
    probs: Tensor | None = None,
    tau: float = 0.1,
    hard: bool = True,
) -> Tensor:
    r"""Bernoulli draws made differentiable by the Gumbel-softmax (binary Concrete) trick.

    The soft sample is $\sigma((\ell + L) / \tau)$ with logistic noise
    $L = \log(1 - u) - \log u$; the hard sample is $1[\ell + L > 0]$, that is
    $1[u < p]$: Bernoulli($p = \sigma(\ell)$) up to the resolution of the
    uniform draws ($2^{-24}$ in float32).

    Trade-off: ``hard=True`` (straight-through) returns exact 0/1 values with the soft
    sample's gradient, so the forward pass is unbiased but the gradient is biased;
    ``hard=False`` returns values in (0, 1) whose mean differs from p unless p = 1/2,
    with lower gradient variance as ``tau`` grows and less bias as it shrinks.

    Arguments:
        logits: log-odds $\ell$, any shape. Give either ``logits`` or ``probs``.
        probs: success probabilities in [0, 1], any shape.
        tau: temperature > 0 of the relaxation.
        hard: return exact 0/1 values with a straight-through gradient.

    Returns:
        A tensor of the same shape as ``logits`` (or ``probs``).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x = relaxed_bernoulli(probs=torch.full((4,), 0.5))
        >>> sorted(set(x.tolist())) <= [0.0, 1.0]
        True
    """
    if (logits is None) == (probs is None):
        raise ValueError("relaxed_bernoulli: give exactly one of `logits` or `probs`.")
    if tau <= 0:
        raise ValueError(f"relaxed_bernoulli: `tau` must be > 0, got {tau}.")
    if probs is not None and hard:
        # Same value and gradient as below, without forming the soft sample forward.
        return _StraightThroughBernoulli.apply(probs, torch.rand_like(probs), float(tau))
    if logits is None:
        logits = _probs_to_logits(probs)
    u = torch.rand_like(logits)
    tiny = torch.finfo(logits.dtype).tiny
    # Logistic noise log(1 - u) - log(u): then logit + noise > 0 exactly when u < p, which
    # is how the hard value is decided for given probabilities (exact at p = 0 and p = 1).
    noisy = logits + (torch.log1p(-u) - torch.log(u.clamp(min=tiny)))
    soft = torch.sigmoid(noisy / tau)
    if not hard:
        return soft
    up = (u < probs) if probs is not None else (noisy > 0)
    return _straight_through(up.to(soft.dtype), soft)


def _soft_slope(probs: Tensor, u: Tensor, tau: float) -> Tensor:
    r"""d soft / d probs of the binary Concrete sample $\sigma((\ell + L) / \tau)$.

    With $\ell$ the logit of p clamped as in :func:`_probs_to_logits` (zero slope
    outside the clamp and at a NaN p, as the composite's reverse-mode gradient) and
    $L = \log(1 - u) - \log u$: $s (1 - s) / \tau \cdot (1 / p + 1 / (1 - p))$.
    """
    info = torch.finfo(probs.dtype)
    p = probs.clamp(info.tiny, 1.0 - info.eps)
    noise = torch.log1p(-u) - torch.log(u.clamp(min=info.tiny))
    soft = torch.sigmoid((torch.log(p) - torch.log1p(-p) + noise) / tau)
    slope = soft * (1.0 - soft) / tau * (1.0 / p + 1.0 / (1.0 - p))
    inside = (probs >= info.tiny) & (probs <= 1.0 - info.eps)
    return torch.where(inside, slope, 0.0)


class _StraightThroughBernoulli(torch.autograd.Function):
    """1[u < p] forward; the gradient of the binary Concrete sample backward (and forward).

    The composite ``hard + (soft - soft.detach())`` forms the soft sample (about a dozen
    passes over the draws) in the forward pass only for its gradient; here the forward pass
    is one comparison and the slope is formed when a gradient asks for it. Works under
    reverse mode, :func:`torch.func.jvp` and :func:`torch.func.vmap`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(probs: Tensor, u: Tensor, tau: float) -> Tensor:
        # A NaN probability gives NaN, as the soft sample does (a failed draw stays visible).
        return torch.where(torch.isnan(probs), probs, (u < probs).to(probs.dtype))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, float], output: Tensor) -> None:
        probs, u, tau = inputs
        ctx.save_for_backward(probs, u)
        ctx.save_for_forward(probs, u)
        ctx.tau = tau

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        probs, u = ctx.saved_tensors
        return grad * _soft_slope(probs, u, ctx.tau), None, None

    @staticmethod
    def jvp(ctx: Any, probs_tangent: Tensor, u_tangent: Any, tau_tangent: Any) -> Tensor:
        probs, u = ctx.saved_tensors
        return probs_tangent * _soft_slope(probs, u, ctx.tau)


def relaxed_categorical(
    logits: Tensor,
    *,
    tau: float = 0.1,
    hard: bool = True,
    dim: int = -1,
) -> Tensor:
    r"""Categorical draws as (relaxed) one-hot vectors by the Gumbel-softmax trick.

    Soft sample $\mathrm{softmax}((\ell + G) / \tau)$ with Gumbel noise
    $G = -\log(-\log u)$; the hard sample is the one-hot vector of its argmax, which
    is exactly Categorical($\mathrm{softmax}(\ell)$).

    Trade-off: as for :func:`relaxed_bernoulli`, ``hard=True`` gives exact one-hot values
    and a biased straight-through gradient; small ``tau`` lowers bias and raises variance.

    Arguments:
        logits: unnormalised log-probabilities, categories along ``dim``.
        tau: temperature > 0.
        hard: return exact one-hot vectors with a straight-through gradient.
        dim: the axis of categories.

    Returns:
        A tensor of the same shape as ``logits`` whose slices along ``dim`` sum to one.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> y = relaxed_categorical(torch.zeros(5, 3))
        >>> y.sum(-1).tolist()
        [1.0, 1.0, 1.0, 1.0, 1.0]
    """
    if tau <= 0:
        raise ValueError(f"relaxed_categorical: `tau` must be > 0, got {tau}.")
    if logits.shape[dim] == 2:
        return _relaxed_two_categories(logits, tau, hard, dim)
    info = torch.finfo(logits.dtype)
    u = torch.rand_like(logits).clamp(info.tiny, 1.0 - info.eps)
    noisy = logits - torch.log(-torch.log(u))
    soft = torch.softmax(noisy / tau, dim=dim)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter(dim, noisy.argmax(dim, keepdim=True), 1.0)
    return _straight_through(one_hot, soft)


def _relaxed_two_categories(logits: Tensor, tau: float, hard: bool, dim: int) -> Tensor:
    """:func:`relaxed_categorical` for two categories, as a binary draw (same law).

    The difference of two Gumbel variables is logistic, and a softmax over two entries is
    the sigmoid of their difference; this avoids a softmax and an argmax over an axis of
    length two, which are slow (above all under vmap).
    """
    first, second = logits.unbind(dim)
    first = relaxed_bernoulli(first - second, tau=tau, hard=hard)
    return torch.stack((first, 1.0 - first), dim=dim)


def straight_through_threshold(
    x: Tensor, threshold: float | Tensor = 0.0, k: float = 1.0
) -> Tensor:
    r"""The step $1[x > c]$ forward, the gradient of $\sigma(k (x - c))$ backward.

    Trade-off: the value is exact; the gradient is that of a sigmoid of steepness ``k``,
    biased (it sees a threshold that is not there) and sharper, so noisier across draws,
    as ``k`` grows.

    Example:
        >>> x = torch.tensor([-1.0, 2.0], requires_grad=True)
        >>> y = straight_through_threshold(x, k=2.0)
        >>> y.tolist()
        [0.0, 1.0]
    """
    z = x - threshold
    return _straight_through((z > 0).to(x.dtype), torch.sigmoid(k * z))


def straight_through_sign(x: Tensor, k: float = 1.0) -> Tensor:
    r"""The sign of ``x`` forward, the gradient of $\tanh(k x / 2)$ backward.

    Trade-off: as for :func:`straight_through_threshold`; ``tanh(k x / 2)`` equals
    $\sigma(k x) - \sigma(-k x)$, the soft buy-minus-sell order of threshold traders.

    Example:
        >>> straight_through_sign(torch.tensor([-3.0, 0.0, 0.5])).tolist()
        [-1.0, 0.0, 1.0]
    """
    return _straight_through(torch.sign(x), torch.tanh(0.5 * k * x))


def _order_slopes(eps: Tensor, nu: Tensor, k: float, scale: Tensor) -> tuple[Tensor, Tensor]:
    r"""``scale`` times $k \sigma'(k(\epsilon - \nu_i))$ and
    $k \sigma'(k(\epsilon + \nu_i))$: (B, N) each from eps, scale (B, 1), nu (B, N),
    the slopes of the two soft orders (each slope one fused pass over the sigmoid)."""
    k_eps, k_nu, k_scale = k * eps, k * nu, (k * scale).expand_as(nu)
    below = torch.ops.aten.sigmoid_backward(k_scale, torch.sigmoid(k_eps - k_nu))
    above = torch.ops.aten.sigmoid_backward(k_scale, torch.sigmoid(k_eps + k_nu))
    return below, above


class _ThresholdOrderSum(torch.autograd.Function):
    r"""The straight-through sum of threshold orders: (B, 1) from eps (B, 1), nu (B, N).

    Value: $\sum_i 1[\epsilon > \nu_i] - 1[\epsilon < -\nu_i]$
    $= \#\{i : \nu_i < \epsilon\} - \#\{i : \nu_i < -\epsilon\}$ for any thresholds
    (with $\nu_i < 0$ both orders can fire). Gradient: that of the soft orders' sum
    $S = \sum_i \sigma(k(\epsilon - \nu_i)) + \sigma(k(\epsilon + \nu_i)) - 1$:
    $\partial S / \partial \epsilon = \sum_i k\sigma'_- + k\sigma'_+$,
    $\partial S / \partial \nu_i = k\sigma'_+ - k\sigma'_-$, formed in ``backward``
    and ``jvp`` only (see :func:`threshold_order_sum`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(eps: Tensor, nu: Tensor, k: float, nonnegative: bool) -> Tensor:
        if nonnegative:  # at most one order fires: one comparison per agent
            return torch.sign(eps) * (nu < eps.abs()).sum(-1, keepdim=True, dtype=eps.dtype)
        buys = (nu < eps).sum(-1, keepdim=True, dtype=eps.dtype)
        return buys - (nu < -eps).sum(-1, keepdim=True, dtype=eps.dtype)

    @staticmethod
    def setup_context(
        ctx: Any, inputs: tuple[Tensor, Tensor, float, bool], output: Tensor
    ) -> None:
        eps, nu, k, _ = inputs
        ctx.save_for_backward(eps, nu)
        ctx.save_for_forward(eps, nu)
        ctx.k = k

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        eps, nu = ctx.saved_tensors
        below, above = _order_slopes(eps, nu, ctx.k, grad)
        return (
            below.sum(-1, keepdim=True) + above.sum(-1, keepdim=True),
            above - below,
            None,
            None,
        )

    @staticmethod
    def jvp(ctx: Any, eps_tangent: Tensor | None, nu_tangent: Tensor | None, *_: Any) -> Tensor:
        eps, nu = ctx.saved_tensors
        below, above = _order_slopes(eps, nu, ctx.k, torch.ones_like(eps))
        tangent = torch.zeros_like(eps)
        if eps_tangent is not None:
            tangent = tangent + eps_tangent * (below + above).sum(-1, keepdim=True)
        if nu_tangent is not None:
            tangent = tangent + (nu_tangent * (above - below)).sum(-1, keepdim=True)
        return tangent


def check_hardness(k: Any, name: str = "k") -> float:
    """``k`` as a float, or a clear error: a real number > 0 and finite, or a one-element
    tensor that wants no gradient (a tensor that does would silently get none).

    Example:
        >>> check_hardness(torch.tensor(5.0))
        5.0
    """
    if isinstance(k, Tensor):
        if k.requires_grad:
            raise TypeError(
                f"`{name}` is a tensor that requires grad, but no gradient flows to it here; "
                f"pass a float (or `{name}.detach()`)."
            )
        if k.numel() != 1:
            raise ValueError(
                f"`{name}` must be one number > 0, got a tensor of shape {tuple(k.shape)}."
            )
        k = k.item()
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"`{name}` must be a number > 0, got {type(k).__name__}.")
    if not (math.isfinite(k) and k > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {k}.")
    return float(k)


def threshold_order_sum(
    signal: Tensor, thresholds: Tensor, k: float, *, nonnegative: bool = False
) -> Tensor:
    r"""Net orders of threshold traders with the gradient of the soft orders.

    Value $\sum_i 1[\epsilon > \nu_i] - 1[\epsilon < -\nu_i]$; gradient that of
    $\sum_i \sigma(k(\epsilon - \nu_i)) - \sigma(-k(\epsilon + \nu_i))$.

    ``signal`` (..., 1) and ``thresholds`` (..., N) give (..., 1); the value is exact for
    any thresholds (a negative one can make both orders fire, or neither).
    ``nonnegative=True`` is the caller's promise that every threshold is >= 0 (not checked:
    a check would synchronise a GPU every step): at most one order fires, so one comparison
    per agent gives the value (:class:`~gradcal.models.RamaCont`, whose thresholds are
    lognormal or |r_t|, measured 9 % faster over the demo). ``k`` is a
    number > 0 (no gradient flows to it: a tensor that requires grad is refused). The soft
    orders (two sigmoids per agent) are formed only when a gradient asks for them, so a
    simulation without gradients pays two comparisons and two sums per agent. Same value
    and gradient as summing :func:`straight_through_sign`-style orders
    ``hard + (soft - soft.detach())`` (up to rounding); works under reverse mode (also
    twice), :func:`torch.func.jvp` and :func:`torch.func.vmap`. With a reverse-mode
    gradient wanted, that composite is as fast or faster in forward + backward (its
    backward reuses the forward's sigmoids, this one forms them again), so
    :class:`~gradcal.models.RamaCont` uses this function only under ``torch.no_grad()``.

    Example:
        >>> eps = torch.tensor([[0.5]], requires_grad=True)
        >>> threshold_order_sum(eps, torch.tensor([[0.1, 0.2, 0.9]]), k=5.0).item()
        2.0
    """
    return _ThresholdOrderSum.apply(signal, thresholds, check_hardness(k), bool(nonnegative))


def soft_maximum(a: Tensor, b: Tensor | float, k: float) -> Tensor:
    r"""Smooth maximum $\log(e^{k a} + e^{k b}) / k$, always above the maximum.

    Trade-off: the gap to the true maximum is at most $\log(2) / k$; larger ``k``
    is closer to the maximum with a gradient that switches more abruptly.

    Example:
        >>> round(soft_maximum(torch.tensor(0.0), 10.0, 2.0).item(), 4)
        10.0
    """
    if k <= 0:
        raise ValueError(f"soft_maximum: the hardness `k` must be > 0, got {k}.")
    b = torch.as_tensor(b, dtype=a.dtype, device=a.device)
    return torch.logaddexp(k * a, k * b) / k


def soft_minimum(a: Tensor, b: Tensor | float, k: float) -> Tensor:
    r"""Smooth minimum $-\log(e^{-k a} + e^{-k b}) / k$, always below the minimum.

    Trade-off: as :func:`soft_maximum`.

    Example:
        >>> round(soft_minimum(torch.tensor(1.0), 10.0, 2.0).item(), 4)
        1.0
    """
    return -soft_maximum(-a, -torch.as_tensor(b, dtype=a.dtype, device=a.device), k)


def bernoulli_positions(b: int, n: int, p: float, *, device: torch.device | str) -> Tensor:
    r"""Where i.i.d. Bernoulli(``p``) successes fall in each of b rows of n trials.

    Returns (b, m) long indices, increasing along each row, of the successes; the unused
    tail of each row holds ``n`` (one past the last trial), so
    ``torch.zeros(b, n + 1).scatter(1, idx, 1.0)[:, :n]`` is the 0/1 mask and
    ``x.scatter(1, idx, values)`` writes values at the successes of a (b, n + 1) tensor.
    Successes are placed by geometric gaps $\lfloor \log u / \log(1 - p) \rfloor + 1$,
    about $n p$ uniforms a row instead of n: random numbers dominate the cost of large
    agent populations. m is set by Bernstein's inequality so that more successes than m
    have probability below $2^{-64}$, under the resolution of the random numbers, so
    there is no data-dependent check (or device synchronisation); works under vmap.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> idx = bernoulli_positions(2, 10, 0.2, device="cpu")
        >>> bool((idx.diff(dim=-1) >= 0).all() and (idx <= 10).all())
        True
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"bernoulli_positions: `p` must lie in (0, 1), got {p}.")
    # float64 keeps the cumulative positions exact whatever the model's dtype.
    u = torch.rand(b, _n_gaps(n, p), dtype=torch.float64, device=device)
    gaps = torch.floor(torch.log1p(-u) / math.log1p(-p)) + 1.0  # Geometric(p) >= 1
    return (gaps.cumsum(-1) - 1.0).clamp(max=n).long()


def _n_gaps(n: int, p: float) -> int:
    """Gaps enough for n trials except with probability < 2^-64 (Bernstein's inequality).

    More than np + t successes among n trials has probability below
    exp(-t^2 / (2 (np(1-p) + t/3))); t solves this for 2^-64.
    """
    log_bound = 64 * math.log(2.0)
    var = n * p * (1 - p)
    t = log_bound / 3 + math.sqrt(log_bound**2 / 9 + 2 * log_bound * var)
    return min(n, math.ceil(n * p + t) + 1)


def bernoulli_mask(
    shape: tuple[int, int], p: float, *, dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    r"""Exact i.i.d. Bernoulli(``p``) draws of a constant ``p`` as 0/1 values, (B, N).

    For a fixed probability no relaxation is needed: the straight-through draw would equal
    its hard value with a zero gradient. Small ``p`` on large shapes goes through
    :func:`bernoulli_positions`; works under :func:`torch.func.vmap`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> m = bernoulli_mask((200, 1000), 0.1, dtype=torch.float32, device="cpu")
        >>> abs(m.mean().item() - 0.1) < 0.003
        True
    """
    b, n = shape
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"bernoulli_mask: `p` must lie in [0, 1], got {p}.")
    if p in (0.0, 1.0) or p > 0.25 or b * n < 4096:
        return (torch.rand(b, n, device=device) < p).to(dtype)
    mask = torch.zeros(b, n + 1, dtype=dtype, device=device)
    return mask.scatter(1, bernoulli_positions(b, n, p, device=device), 1.0)[:, :n]
