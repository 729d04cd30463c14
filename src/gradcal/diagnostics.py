r"""Checks of a calibration: sample distances, C2ST, PSIS k-hat, predictive checks, coverage.

Everything here runs without gradients and returns plain numbers or small result objects:

- how far apart two sample sets are (:func:`energy_distance_samples`, :func:`mmd_samples`
  against the noise floor :func:`split_half_floor`, and the classifier test :func:`c2st`);
- whether a variational approximation is good enough to trust (:func:`psis_khat`,
  :func:`vi_khat`, read by :func:`read_khat`);
- whether the calibrated model reproduces the data (:func:`posterior_predictive`);
- whether a calibration routine is calibrated over many synthetic data sets
  (:func:`coverage`, with simulation-based calibration ranks).
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradcal.discrepancies import energy_distance, mmd
from gradcal.kernels import GaussianKernel
from gradcal.rng import seeded

__all__ = [
    "DEFAULT_SUMMARIES",
    "Coverage",
    "NoiseFloor",
    "PredictiveCheck",
    "SummaryCheck",
    "autocorrelation",
    "c2st",
    "coverage",
    "energy_distance_samples",
    "mmd_samples",
    "posterior_predictive",
    "psis_khat",
    "read_khat",
    "split_half_floor",
    "vi_khat",
]

logger = logging.getLogger("gradcal")


# ----------------------------------------------------------------------------- validation


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}.")
    return value


def _check_seed(seed: Any, optional: bool = True) -> None:
    if seed is None and optional:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int{' or None' if optional else ''}, got {seed!r}.")


def _samples(x: Any, name: str, min_points: int = 2) -> Tensor:
    """A detached floating sample (n, D) from (n, D) or (n,) (read as D = 1)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a tensor of shape (n, D), got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must have a floating-point dtype, got {x.dtype}.")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"`{name}` must have shape (n, D), got {tuple(x.shape)}.")
    if x.shape[0] < min_points:
        raise ValueError(
            f"`{name}` must hold at least {min_points} points (n, D), got {tuple(x.shape)}."
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return x.detach()


def _pair(a: Any, b: Any, min_points: int = 2) -> tuple[Tensor, Tensor]:
    a, b = _samples(a, "a", min_points), _samples(b, "b", min_points)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"`a` (n, D) and `b` (m, D) must have the same D, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}."
        )
    return a, b.to(a)


def _standardised(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """a and b divided coordinate-wise by the (unbiased) std of b; a zero std counts as 1."""
    scale = b.std(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return a / scale, b / scale


def _device_of(*objects: Any) -> torch.device:
    """The first CUDA device among the tensors of modules and distributions, else the CPU."""
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            tensors = [*obj.parameters(), *obj.buffers()]
        else:  # a distribution: its parameter tensors, also inside Independent & co.
            tensors, stack = [], [obj]
            while stack:
                for value in getattr(stack.pop(), "__dict__", {}).values():
                    if isinstance(value, Tensor):
                        tensors.append(value)
                    elif isinstance(value, torch.distributions.Distribution):
                        stack.append(value)
        for t in tensors:
            if t.device.type == "cuda":
                return t.device
    return torch.device("cpu")


# ----------------------------------------------------------------------- sample distances


def energy_distance_samples(
    a: Tensor, b: Tensor, *, standardize: bool = True, chunk_size: int | None = 1024
) -> float:
    r"""Energy distance between sample sets a (n, D) and b (m, D).

    :math:`2 E\|a - b\| - E\|a - a'\| - E\|b - b'\|` (U-statistics, unbiased, zero in
    expectation iff the distributions agree), computed by
    :func:`gradcal.discrepancies.energy_distance`.

    Arguments:
        a: a sample (n, D), e.g. draws from an approximate posterior; (n,) means D = 1.
        b: the reference sample (m, D).
        standardize: divide every coordinate of both samples by the standard deviation of
            b first, so that parameters on different scales count alike.
        chunk_size: rows of the distance matrices formed at a time (memory).

    Example:
        >>> b = torch.randn(500, 2)
        >>> a = torch.randn(500, 2)
        >>> energy_distance_samples(a, b) < 0.05 < energy_distance_samples(a + 1, b)
        True
    """
    a, b = _pair(a, b)
    if standardize:
        a, b = _standardised(a, b)
    with torch.no_grad():
        return float(energy_distance(a, b, chunk_size=chunk_size))


def mmd_samples(
    a: Tensor, b: Tensor, *, standardize: bool = True, chunk_size: int | None = 1024
) -> float:
    r"""Unbiased squared MMD between sample sets a (n, D) and b (m, D), Gaussian kernel.

    :math:`E k(a, a') + E k(b, b') - 2 E k(a, b)` with
    :math:`k = \exp(-\|x - x'\|^2 / h^2)`, h the median distance of the pooled
    (standardised) samples (:class:`~gradcal.kernels.GaussianKernel`,
    :func:`gradcal.discrepancies.mmd`). Can be slightly negative; compare it with
    :func:`split_half_floor`.

    Arguments:
        a: a sample (n, D); (n,) means D = 1.
        b: the reference sample (m, D).
        standardize: divide every coordinate of both samples by the standard deviation of b.
        chunk_size: rows of the kernel matrices formed at a time (memory).

    Example:
        >>> b = torch.randn(500, 2)
        >>> mmd_samples(torch.randn(500, 2), b) < 0.01 < mmd_samples(b + 1, b)
        True
    """
    a, b = _pair(a, b)
    if standardize:
        a, b = _standardised(a, b)
    with torch.no_grad():
        kernel = GaussianKernel().fitted(torch.cat((a, b)))
        return float(mmd(a, b, kernel, estimator="unbiased", chunk_size=chunk_size))


class NoiseFloor(NamedTuple):
    """Mean and standard deviation of the MMD between random halves of one sample."""

    mean: float
    std: float


def split_half_floor(samples: Tensor, n_splits: int = 20, seed: int = 0) -> NoiseFloor:
    r"""The noise floor of :func:`mmd_samples`: MMD between random halves of one sample.

    The sample (n, D) is split ``n_splits`` times at random into two halves of n // 2
    points; the mean and standard deviation of :func:`mmd_samples` between the halves show
    how large an MMD two sets of n // 2 draws from the same distribution give. An MMD of two
    sets of n points well above ``mean + 3 std`` means the distributions differ (sets of n
    points are less noisy than halves, so the comparison is conservative).

    Arguments:
        samples: (n, D) with n >= 4; (n,) means D = 1.
        n_splits: number of random splits (>= 2).
        seed: seed of the splits (the global random stream is not used).

    Example:
        >>> floor = split_half_floor(torch.randn(400, 2), n_splits=5)
        >>> abs(floor.mean) < 3 * floor.std
        True
    """
    x = _samples(samples, "samples", min_points=4)
    _check_int(n_splits, "n_splits", 2)
    _check_seed(seed, optional=False)
    generator = torch.Generator().manual_seed(seed)
    half = x.shape[0] // 2
    values = []
    for _ in range(n_splits):
        perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
        values.append(mmd_samples(x[perm[:half]], x[perm[half : 2 * half]]))
    v = torch.tensor(values, dtype=torch.float64)
    return NoiseFloor(float(v.mean()), float(v.std()))


# --------------------------------------------------------------------------------- C2ST


def _mlp_init(sizes: Sequence[int], generator: torch.Generator, like: Tensor) -> list[Tensor]:
    """Weights and biases of an MLP, uniform on +-1/sqrt(fan_in) (torch's Linear default)."""
    params = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        bound = 1.0 / math.sqrt(fan_in)
        for shape in ((fan_in, fan_out), (fan_out,)):
            p = (torch.rand(shape, generator=generator, dtype=like.dtype) * 2 - 1) * bound
            params.append(p.to(like.device).requires_grad_())
    return params


def _mlp(params: list[Tensor], x: Tensor) -> Tensor:
    """Logits (n,) of an MLP with ReLU hidden layers."""
    for i in range(0, len(params) - 2, 2):
        x = torch.relu(torch.addmm(params[i + 1], x, params[i]))
    return torch.addmm(params[-1], x, params[-2])[:, 0]


def _fit_and_score(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    generator: torch.Generator,
    hidden: int,
    epochs: int,
    batch_size: int,
    lr: float,
) -> int:
    """Train a fresh classifier on one fold; the number of correct test predictions."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-12)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    params = _mlp_init((x_train.shape[1], hidden, hidden, 1), generator, x_train)
    optimiser = torch.optim.Adam(params, lr=lr)
    n = x_train.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator).to(x_train.device)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                _mlp(params, x_train[idx]), y_train[idx]
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        return int(((_mlp(params, x_test) > 0).to(y_test) == y_test).sum())


def c2st(
    a: Tensor,
    b: Tensor,
    folds: int = 5,
    seed: int = 0,
    hidden: int = 64,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 3e-3,
) -> float:
    r"""Classifier two-sample test: cross-validated accuracy of telling a (n, D) from b (m, D).

    A small MLP (two hidden ReLU layers) learns to label points of a as 1 and of b as 0;
    the accuracy on held-out points estimates :math:`\tfrac12 + \tfrac12 \mathrm{TV}(p_a,
    p_b)` at best: 0.5 means indistinguishable, 1 means disjoint (Lopez-Paz & Oquab, 2017).
    Classes are balanced by using min(n, m) random points of each; folds are stratified, so
    every test fold holds as many points of a as of b and guessing scores exactly 0.5;
    inputs are standardised by the training fold. Under equal distributions the accuracy
    has standard deviation at most :math:`0.5 / \sqrt{2 \min(n, m)}`.

    Runs in float32 unless the inputs are float64; deterministic given ``seed`` (its own
    :class:`torch.Generator`; the global random stream is not touched).

    Arguments:
        a: first sample (n, D); (n,) means D = 1.
        b: second sample (m, D).
        folds: number of cross-validation folds (>= 2).
        seed: seed of the subsampling, folds, initialisation and mini-batches.
        hidden: width of the two hidden layers.
        epochs: passes over each training fold.
        batch_size: mini-batch size.
        lr: Adam's learning rate.

    Returns:
        The accuracy over all held-out predictions, in [0, 1].

    References:
        Lopez-Paz & Oquab (2017), Revisiting classifier two-sample tests, ICLR.
        https://arxiv.org/abs/1610.06545

    Example:
        >>> a, b = torch.randn(300, 2), torch.randn(300, 2) + 3.0
        >>> c2st(a, b) > 0.95
        True
    """
    a, b = _pair(a, b)
    _check_int(folds, "folds", 2)
    _check_seed(seed, optional=False)
    _check_int(hidden, "hidden", 1)
    _check_int(epochs, "epochs", 1)
    _check_int(batch_size, "batch_size", 1)
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr!r}.")
    n = min(a.shape[0], b.shape[0])
    if n < folds:
        raise ValueError(
            f"`folds` ({folds}) exceeds the smaller sample size ({n}): each fold needs a "
            "point of each sample."
        )
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = a.to(dtype), b.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    a = a[torch.randperm(a.shape[0], generator=generator)[:n].to(a.device)]
    b = b[torch.randperm(b.shape[0], generator=generator)[:n].to(b.device)]
    x = torch.cat((a, b))
    y = torch.cat((a.new_ones(n), a.new_zeros(n)))
    fold = (torch.arange(n) % folds).to(a.device)
    fold = torch.cat((fold, fold))  # a's i-th and b's i-th (both shuffled) share a fold
    correct = 0
    with torch.enable_grad():
        for f in range(folds):
            test = fold == f
            correct += _fit_and_score(
                x[~test], y[~test], x[test], y[test], generator, hidden, epochs, batch_size, lr
            )
    return correct / (2 * n)


# --------------------------------------------------------------------------- PSIS k-hat


def _gpd_fit(x: Tensor) -> tuple[float, float]:
    """Zhang & Stephens (2009) estimate of a generalised Pareto's (k, sigma) from sorted x > 0.

    The shape k is returned with the weakly informative prior of Vehtari et al. (2024):
    (M k + 10 * 0.5) / (M + 10), which pulls noisy estimates from small tails towards 0.5.
    """
    n = x.numel()
    m = 30 + int(math.sqrt(n))
    j = torch.arange(1, m + 1, dtype=x.dtype, device=x.device)
    b = (1 - torch.sqrt(m / (j - 0.5))) / (3 * x[int(n / 4 + 0.5) - 1]) + 1 / x[-1]
    k = torch.log1p(-b[:, None] * x).mean(1)
    profile = n * (torch.log(-b / k) - k - 1)  # profile log-likelihood of b
    weights = torch.softmax(profile, 0)
    keep = weights >= 10 * torch.finfo(x.dtype).eps
    weights, b = weights[keep] / weights[keep].sum(), b[keep]
    b_post = (b * weights).sum()
    k_post = torch.log1p(-b_post * x).mean()
    sigma = -k_post / b_post
    return float((n * k_post + 10 * 0.5) / (n + 10)), float(sigma)


def _gpd_quantiles(p: Tensor, k: float, sigma: float) -> Tensor:
    """Quantiles of a generalised Pareto with shape k and scale sigma (location 0)."""
    if abs(k) < torch.finfo(p.dtype).eps:
        return -sigma * torch.log1p(-p)
    return sigma * torch.expm1(-k * torch.log1p(-p)) / k


def psis_khat(log_weights: Tensor) -> tuple[float, Tensor]:
    r"""Pareto-smoothed importance sampling: the tail shape k-hat and smoothed log weights.

    A generalised Pareto distribution is fitted to the M = ceil(min(n / 5, 3 sqrt(n)))
    largest importance weights :math:`w_i = p(\theta_i) / q(\theta_i)` (Zhang & Stephens'
    empirical-Bayes estimator, with the weakly informative prior on k of Vehtari et al.).
    The weights have finite moments of order below 1/k: a finite variance for k < 0.5 and a
    finite mean for k < 1; importance-sampling estimates are reliable for k-hat < 0.7
    (:func:`read_khat`). The M largest weights are replaced by the fitted
    distribution's expected order statistics (never above the largest raw weight).

    Arguments:
        log_weights: unnormalised log importance weights (n,), n >= 21; -inf marks a zero
            weight. Values are shifted by their maximum first, so any constant is fine.

    Returns:
        ``(k_hat, smoothed_log_weights)``: a float (-inf when the weights above the cut-off
        are all equal, e.g. q = p up to rounding: bounded weights, nothing to smooth; inf
        when fewer than 5 values lie above the cut-off because of ties, with a warning) and
        the smoothed, normalised log weights (n,)
        (logsumexp 0), in the input's order, dtype and device.

    References:
        Vehtari, Simpson, Gelman, Yao & Gabry (2024), Pareto smoothed importance sampling,
        JMLR 25(72). https://arxiv.org/abs/1507.02646
        Zhang & Stephens (2009), A new and efficient estimation method for the generalized
        Pareto distribution, Technometrics 51(3).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> k, lw = psis_khat(-0.7 * torch.rand(4000).log())   # Pareto ratios, k = 0.7
        >>> round(k, 1), round(float(lw.logsumexp(0)), 6)
        (0.7, 0.0)
    """
    if not isinstance(log_weights, Tensor):
        raise TypeError(
            f"`log_weights` must be a tensor of shape (n,), got {type(log_weights).__name__}."
        )
    if log_weights.ndim != 1 or not log_weights.is_floating_point():
        raise ValueError(
            f"`log_weights` must be a floating tensor of shape (n,), got {log_weights.dtype} "
            f"{tuple(log_weights.shape)}."
        )
    n = log_weights.shape[0]
    if n < 21:
        raise ValueError(
            f"`log_weights` must hold at least 21 values (a tail of 5 to fit), got {n}."
        )
    if torch.isnan(log_weights).any() or (log_weights == math.inf).any():
        raise ValueError("`log_weights` contains NaN or +inf.")
    if (log_weights == -math.inf).all():
        raise ValueError("`log_weights` are all -inf: every weight is zero.")
    x = log_weights.detach().to(torch.float64)
    x = x - x.max()
    tail_size = math.ceil(min(0.2 * n, 3 * math.sqrt(n)))
    order = torch.argsort(x)
    cutoff = max(float(x[order[-tail_size - 1]]), math.log(torch.finfo(torch.float64).tiny))
    tail = order[x[order] > cutoff]  # ascending
    if tail.numel() == 0 or x[tail[0]] == x[tail[-1]]:  # an atom at the top: bounded
        k_hat = -math.inf
    elif tail.numel() < 5:
        warnings.warn(
            f"psis_khat: only {tail.numel()} distinct weights above the cut-off (ties); "
            "k-hat is set to inf.",
            RuntimeWarning,
            stacklevel=2,
        )
        k_hat = math.inf
    else:
        k_hat, sigma = _gpd_fit(torch.exp(x[tail]) - math.exp(cutoff))
        p = (torch.arange(tail.numel(), dtype=x.dtype, device=x.device) + 0.5) / tail.numel()
        smoothed = torch.log(_gpd_quantiles(p, k_hat, sigma) + math.exp(cutoff))
        x = x.clone()
        x[tail] = smoothed.clamp_max(0.0)  # never above the largest raw weight
    return k_hat, (x - torch.logsumexp(x, 0)).to(log_weights)


def vi_khat(
    family: Any,
    log_target: Callable[[Tensor], Tensor],
    n_samples: int = 4000,
    seed: int | None = 0,
) -> float:
    r"""PSIS k-hat of a fitted variational family q against an unnormalised target p.

    Draws :math:`\theta_i \sim q` and computes k-hat of the importance ratios
    :math:`\log w_i = \log p(\theta_i) - \log q(\theta_i)` (Yao et al., 2018): below 0.7 the
    approximation is usable, above it q misses the target's tails (:func:`read_khat`).
    For a GVI fit the target is the generalised posterior
    :math:`-l(\theta, y) / w + \log \pi(\theta)`.

    Arguments:
        family: an object with ``sample(n) -> (theta (n, D), log_q (n,))`` (every gradcal
            family, or :func:`~gradcal.posterior_estimators.as_family` of a distribution).
        log_target: theta (n, D) -> unnormalised log density (n,); -inf outside the support.
        n_samples: number of draws (>= 21; thousands for a stable k-hat).
        seed: seed of the draws, run in a forked random stream (the caller's stream is not
            touched); None draws from the global stream.

    References:
        Yao, Vehtari, Simpson & Gelman (2018), Yes, but did it work?: Evaluating variational
        inference, ICML. https://arxiv.org/abs/1802.02538

    Example:
        >>> from gradcal.posterior_estimators import DiagonalGaussian
        >>> target = torch.distributions.Normal(0.0, 1.0)
        >>> def log_target(theta):
        ...     return target.log_prob(theta).sum(-1)
        >>> vi_khat(DiagonalGaussian(torch.zeros(2), 1.2), log_target) < 0.5   # wider q
        True
        >>> vi_khat(DiagonalGaussian(torch.zeros(2), 0.4), log_target) > 0.7   # too narrow
        True
    """
    if not callable(getattr(family, "sample", None)):
        raise TypeError(
            f"`family` must have a method sample(n) -> (theta, log_q); "
            f"{type(family).__name__} has none."
        )
    if not callable(log_target):
        raise TypeError(f"`log_target` must be callable, got {type(log_target).__name__}.")
    _check_int(n_samples, "n_samples", 21)
    _check_seed(seed)
    device = _device_of(family) if isinstance(family, torch.nn.Module) else torch.device("cpu")
    with seeded(seed, device), torch.no_grad():
        drawn = family.sample(n_samples)
        if not (isinstance(drawn, tuple | list) and len(drawn) == 2):
            raise TypeError("`family.sample(n)` must return a pair (theta (n, D), log_q (n,)).")
        theta, log_q = drawn
        if theta.ndim == 1:
            theta = theta[:, None]
        if theta.shape[0] != n_samples or log_q.shape != (n_samples,):
            raise ValueError(
                f"`family.sample({n_samples})` must return theta ({n_samples}, D) and log_q "
                f"({n_samples},), got {tuple(theta.shape)} and {tuple(log_q.shape)}."
            )
        log_p = log_target(theta)
        if not isinstance(log_p, Tensor) or log_p.shape != (n_samples,):
            shape = tuple(log_p.shape) if isinstance(log_p, Tensor) else type(log_p).__name__
            raise ValueError(f"`log_target` must return shape ({n_samples},), got {shape}.")
        log_w = (log_p - log_q).to(torch.float64)
    if (log_w == math.inf).any():
        raise ValueError("log_target(theta) - log_q is +inf for some draws: check `log_target`.")
    log_w = torch.where(torch.isnan(log_w), -math.inf, log_w)  # e.g. -inf - -inf
    return psis_khat(log_w)[0]


def read_khat(k: float) -> str:
    """The plain-words reading of a PSIS k-hat, with the usual thresholds 0.5 and 0.7.

    Example:
        >>> read_khat(0.4)
        'k-hat 0.40: the approximation is trustworthy'
        >>> read_khat(0.9)
        "k-hat 0.90: not trustworthy: the approximation misses the posterior's tails"
    """
    if isinstance(k, Tensor) and k.numel() == 1:
        k = float(k)
    if isinstance(k, bool) or not isinstance(k, int | float):
        raise TypeError(f"`k` must be a number, got {type(k).__name__}.")
    if math.isnan(k):
        raise ValueError("`k` is NaN.")
    if k < 0.5:
        verdict = "the approximation is trustworthy"
    elif k < 0.7:
        verdict = "good enough for most summaries (means, central intervals), not for tails"
    else:
        verdict = "not trustworthy: the approximation misses the posterior's tails"
    return f"k-hat {k:.2f}: {verdict}"


# --------------------------------------------------------------- posterior predictive


def autocorrelation(series: Tensor, lag: int = 1) -> Tensor:
    r"""Sample autocorrelation at ``lag`` of series (..., T): (...,).

    :math:`\sum_t (x_t - \bar x)(x_{t+L} - \bar x) / \sum_t (x_t - \bar x)^2`; NaN for a
    constant series.

    Example:
        >>> autocorrelation(torch.tensor([1.0, -1.0, 1.0, -1.0])).item()
        -0.75
    """
    if lag < 1 or lag >= series.shape[-1]:
        raise ValueError(f"`lag` must lie in [1, T - 1] = [1, {series.shape[-1] - 1}], got {lag}.")
    c = series - series.mean(-1, keepdim=True)
    return (c[..., lag:] * c[..., :-lag]).sum(-1) / (c**2).sum(-1)


def _mean(series: Tensor) -> Tensor:
    return series.mean(-1)


def _std(series: Tensor) -> Tensor:
    return series.std(-1)


def _acf1(series: Tensor) -> Tensor:
    return autocorrelation(series, 1)


def _abs_acf1(series: Tensor) -> Tensor:
    return autocorrelation(series.abs(), 1)


DEFAULT_SUMMARIES: Mapping[str, Callable[[Tensor], Tensor]] = MappingProxyType(
    {"mean": _mean, "std": _std, "acf1": _acf1, "abs_acf1": _abs_acf1}
)
"""The summaries of :func:`posterior_predictive`: series (..., T) -> (...,) each."""


@dataclass(frozen=True)
class SummaryCheck:
    """One summary of one output: simulated values (B, *f) and the observed value (*f).

    ``f`` are the output's feature axes (none for a scalar series).
    """

    simulated: Tensor
    observed: Tensor

    @property
    def quantile(self) -> Tensor:
        """Where the data falls: the fraction of finite simulated values <= observed (*f).

        NaN where the observed summary is not finite.
        """
        finite = torch.isfinite(self.simulated)
        below = (finite & (self.simulated <= self.observed)).sum(0) / finite.sum(0)
        return torch.where(torch.isfinite(self.observed), below, torch.nan)

    @property
    def p_value(self) -> Tensor:
        """Two-sided posterior predictive p-value, 2 min(P(sim <= obs), P(sim >= obs)) (*f)."""
        finite = torch.isfinite(self.simulated)
        above = (finite & (self.simulated >= self.observed)).sum(0) / finite.sum(0)
        return (2 * torch.minimum(self.quantile, above)).clamp_max(1.0)


@dataclass(frozen=True)
class PredictiveCheck:
    """Result of :func:`posterior_predictive`.

    ``checks[i][name]`` is the :class:`SummaryCheck` of summary ``name`` on output i
    (also ``result[i][name]``); ``simulated`` holds the simulated outputs (B, T, ...).
    """

    simulated: list[Tensor]
    checks: list[dict[str, SummaryCheck]]

    def __getitem__(self, index: int) -> dict[str, SummaryCheck]:
        return self.checks[index]

    def __len__(self) -> int:
        return len(self.checks)

    def __str__(self) -> str:
        lines = []
        for i, checks in enumerate(self.checks):
            lines.append(f"output {i}")
            for name, check in checks.items():
                obs, q = check.observed.reshape(-1), check.quantile.reshape(-1)
                sim = check.simulated.reshape(check.simulated.shape[0], -1)
                for j in range(obs.numel()):
                    s = sim[:, j][torch.isfinite(sim[:, j])]
                    label = name if obs.numel() == 1 else f"{name}[{j}]"
                    lines.append(
                        f"  {label:<12} observed {float(obs[j]):>10.4g}   simulated "
                        f"{float(s.mean()):>10.4g} ± {float(s.std()):<10.4g} "
                        f"quantile {float(q[j]):.2f}"
                    )
        return "\n".join(lines)


def _as_outputs(data: Any) -> list[Tensor]:
    if isinstance(data, Tensor):
        return [data]
    if isinstance(data, list | tuple) and data and all(isinstance(d, Tensor) for d in data):
        return list(data)
    raise TypeError(
        f"`data` must be a tensor or a non-empty list of tensors (T, ...), "
        f"got {type(data).__name__}."
    )


def _check_summaries(summaries: Any) -> Mapping[str, Callable[[Tensor], Tensor]]:
    if summaries is None:
        return DEFAULT_SUMMARIES
    if not isinstance(summaries, Mapping) or not summaries:
        raise TypeError(
            "`summaries` must be a non-empty dict name -> callable (series (..., T) -> (...)), "
            f"got {type(summaries).__name__}."
        )
    for name, f in summaries.items():
        if not isinstance(name, str) or not callable(f):
            raise TypeError(f"`summaries` must map str names to callables; got {name!r}: {f!r}.")
    return summaries


def _summary(f: Callable[[Tensor], Tensor], name: str, series: Tensor) -> Tensor:
    value = f(series)
    if not isinstance(value, Tensor) or value.shape != series.shape[:-1]:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"summary {name!r} must map series {tuple(series.shape)} (..., T) to "
            f"{tuple(series.shape[:-1])} (...), got {got}."
        )
    return value


def posterior_predictive(
    model: Any,
    theta: Tensor,
    data: Tensor | Sequence[Tensor],
    summaries: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    gradient_horizon: int | None = None,
    seed: int | None = None,
) -> PredictiveCheck:
    r"""Posterior predictive check: summaries of simulations at posterior draws vs the data.

    For every draw :math:`\theta_b` the model is run once (no gradients); each summary s is
    computed on every simulated series and on the observed one, and the check reports where
    s(y) falls among the :math:`s(y^{rep}_b)`: the quantile
    :math:`\frac1B \sum_b 1[s(y^{rep}_b) \le s(y)]` and the two-sided p-value. Quantiles
    near 0 or 1 mean the calibrated model does not reproduce that feature of the data.

    The default summaries are the mean, standard deviation, lag-1 autocorrelation and
    lag-1 autocorrelation of absolute values of each series (for prices or levels, pass
    summaries of their increments instead, e.g. ``lambda x: x.diff(dim=-1).std(-1)``).

    Arguments:
        model: a :class:`~gradcal.models.model.Model` (``run_and_observe(theta)`` returns
            a list of outputs (B, T, ...)).
        theta: posterior draws (B, D).
        data: the observed outputs, a tensor or the list ``observe`` gives, each (T, ...),
            the shape of one simulated output without its draw axis.
        summaries: name -> callable mapping series (..., T) to (...); time is moved to the
            last axis first, so an output (B, T, f) gives summaries (B, f).
        gradient_horizon: passed to ``run_and_observe`` (values do not depend on it).
        seed: seed of the simulations in a forked random stream; None uses the global one.

    Returns:
        A :class:`PredictiveCheck`; ``result[i]["std"].quantile`` is the quantile of the
        data's standard deviation for output i. ``print(result)`` gives a table.

    Example:
        >>> from gradcal.models import Normal
        >>> model = Normal(200)
        >>> (y,) = model.run_and_observe(torch.tensor([0.0, 3.0]))
        >>> good = posterior_predictive(model, torch.tensor([[0.0, 3.0]]).repeat(100, 1), y)
        >>> bad = posterior_predictive(model, torch.tensor([[0.0, 1.0]]).repeat(100, 1), y)
        >>> 0.01 < float(good[0]["std"].quantile) < 0.99, float(bad[0]["std"].quantile)
        (True, 1.0)
    """
    if not callable(getattr(model, "run_and_observe", None)):
        raise TypeError(
            f"`model` must be a gradcal Model (with run_and_observe), got {type(model).__name__}."
        )
    if not isinstance(theta, Tensor) or not theta.is_floating_point():
        raise TypeError(f"`theta` must be a floating tensor (B, D), got {type(theta).__name__}.")
    if theta.ndim != 2 or theta.shape[0] < 1:
        raise ValueError(f"`theta` must have shape (B, D), got {tuple(theta.shape)}.")
    _check_seed(seed)
    observed = _as_outputs(data)
    summaries = _check_summaries(summaries)
    with seeded(seed, theta.device), torch.no_grad():
        simulated = model.run_and_observe(theta.detach(), gradient_horizon)
    simulated = [simulated] if isinstance(simulated, Tensor) else list(simulated)
    if len(simulated) != len(observed):
        raise ValueError(
            f"`data` holds {len(observed)} output(s) but the model returns {len(simulated)}."
        )
    checks = []
    for i, (sim, obs) in enumerate(zip(simulated, observed, strict=True)):
        if sim.ndim < 2 or obs.shape != sim.shape[1:]:
            raise ValueError(
                f"`data[{i}]` must have the shape of one simulated output (T, ...) = "
                f"{tuple(sim.shape[1:])}, got {tuple(obs.shape)}."
            )
        obs = obs.detach().to(sim)
        sim_series, obs_series = sim.movedim(1, -1), obs.movedim(0, -1)
        checks.append(
            {
                name: SummaryCheck(
                    _summary(f, name, sim_series), _summary(f, name, obs_series[None])[0]
                )
                for name, f in summaries.items()
            }
        )
    return PredictiveCheck(simulated, checks)


# ------------------------------------------------------------------- coverage and SBC


@dataclass(frozen=True)
class Coverage:
    """Result of :func:`coverage` over N data sets, L levels and D coordinates.

    Attributes:
        levels: nominal levels (L,).
        coverage: fraction of data sets whose true theta lies in the central interval (L, D).
        std_error: binomial standard error of ``coverage`` if the calibration were exact,
            sqrt(level (1 - level) / N) (L, 1).
        hits: whether each true theta was inside, (N, L, D) booleans.
        ranks: SBC ranks (N, D): how many of the S posterior draws lie below the true
            theta; uniform on {0, ..., S} for a calibrated routine.
        n_draws: S, the posterior draws per data set.
        theta: the true parameters (N, D).
    """

    levels: Tensor
    coverage: Tensor
    std_error: Tensor
    hits: Tensor
    ranks: Tensor
    n_draws: int
    theta: Tensor

    @property
    def z(self) -> Tensor:
        """(coverage - level) / std_error (L, D): beyond about +-3, miscalibrated."""
        return (self.coverage - self.levels[:, None]) / self.std_error

    def __str__(self) -> str:
        lines = []
        for i, level in enumerate(self.levels.tolist()):
            cells = ", ".join(f"{c:.3f}" for c in self.coverage[i].tolist())
            lines.append(
                f"level {level:.2f}: coverage [{cells}] (± {float(self.std_error[i, 0]):.3f})"
            )
        return "\n".join(lines)


def _prior_draws(prior: Any, n: int) -> Tensor:
    if not callable(getattr(prior, "sample", None)):
        raise TypeError(
            f"`prior` must be a torch distribution (with sample), got {type(prior).__name__}."
        )
    theta = prior.sample((n,))
    if theta.ndim == 1:
        theta = theta[:, None]
    if theta.ndim != 2:
        raise ValueError(
            f"`prior` must be over vectors theta (D,); its samples have shape "
            f"{tuple(theta.shape[1:])}."
        )
    return theta


def coverage(
    model_or_simulator: Any,
    prior: torch.distributions.Distribution,
    calibrate: Callable[[Any], Tensor],
    n_datasets: int = 100,
    levels: Sequence[float] = (0.5, 0.8, 0.95),
    seed: int | None = 0,
) -> Coverage:
    r"""Coverage of credible intervals and SBC ranks of a calibration routine.

    For data sets i = 1..N: draw :math:`\theta^*_i \sim \pi`, simulate data
    :math:`y_i` at it, run ``calibrate(y_i)`` for posterior draws (S, D), and record per
    coordinate whether :math:`\theta^*_i` lies in the central interval of each level
    (quantiles (1 - level) / 2 and (1 + level) / 2 of the draws) and its rank among the
    draws (Talts et al., 2018). An exact posterior covers :math:`\theta^*` with
    probability equal to the level and gives uniform ranks; overconfident posteriors
    cover less and pile ranks up at 0 and S.

    Intervals from S draws cover a little less than their level even for the exact
    posterior (about level (S - 1) / (S + 1)); use S >> 1 / (1 - level).

    Arguments:
        model_or_simulator: a :class:`~gradcal.models.model.Model`, simulated at all
            :math:`\theta^*` in one batched call, each data set being the list of outputs
            ``run_and_observe`` returns for one draw; or a callable theta (D,) -> data.
        prior: distribution of :math:`\theta^*` over (D,) (``sample`` is all that is used).
        calibrate: data -> posterior draws (S, D); S must be the same for every data set.
        n_datasets: N.
        levels: nominal levels in (0, 1).
        seed: the prior draws, simulations and ``calibrate`` run in a forked random stream
            seeded with it (the caller's stream is untouched); None uses the global stream.

    Returns:
        A :class:`Coverage` (``print`` gives a table; ``.z`` the z-scores).

    References:
        Talts, Betancourt, Simpson, Vehtari & Gelman (2018), Validating Bayesian inference
        algorithms with simulation-based calibration. https://arxiv.org/abs/1804.06788

    Example:
        >>> prior = torch.distributions.Normal(torch.zeros(1), torch.ones(1))
        >>> def simulate(theta):                        # y ~ N(theta, 1)
        ...     return theta + torch.randn(1)
        >>> def calibrate(y):                           # exact posterior N(y / 2, 1 / 2)
        ...     return y / 2 + torch.randn(1000, 1) / 2**0.5
        >>> result = coverage(simulate, prior, calibrate, n_datasets=300)
        >>> bool((result.z.abs() < 4.5).all())
        True
    """
    if not callable(calibrate):
        raise TypeError(f"`calibrate` must be callable, got {type(calibrate).__name__}.")
    is_model = callable(getattr(model_or_simulator, "run_and_observe", None))
    if not is_model and not callable(model_or_simulator):
        raise TypeError(
            "`model_or_simulator` must be a gradcal Model or a callable theta (D,) -> data, "
            f"got {type(model_or_simulator).__name__}."
        )
    _check_int(n_datasets, "n_datasets", 1)
    _check_seed(seed)
    level_t = torch.as_tensor(levels, dtype=torch.float64).reshape(-1)
    if level_t.numel() == 0 or not ((level_t > 0) & (level_t < 1)).all():
        raise ValueError(f"`levels` must be a non-empty sequence in (0, 1), got {levels!r}.")
    device = _device_of(prior, model_or_simulator) if is_model else _device_of(prior)
    with seeded(seed, device), torch.no_grad():
        theta = _prior_draws(prior, n_datasets)
        if is_model:
            outputs = model_or_simulator.run_and_observe(theta)
            outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
            datasets: Any = ([o[i] for o in outputs] for i in range(n_datasets))
        else:
            datasets = (model_or_simulator(t) for t in theta)
        hits, ranks, n_draws = [], [], None
        for i, y in enumerate(datasets):
            draws = calibrate(y)
            if not isinstance(draws, Tensor) or draws.ndim not in (1, 2):
                shape = tuple(draws.shape) if isinstance(draws, Tensor) else type(draws).__name__
                raise ValueError(f"`calibrate` must return draws (S, D), got {shape}.")
            draws = draws[:, None] if draws.ndim == 1 else draws
            if draws.shape[1] != theta.shape[1] or (n_draws or draws.shape[0]) != draws.shape[0]:
                raise ValueError(
                    f"`calibrate` must return draws (S, {theta.shape[1]}) with the same S for "
                    f"every data set; data set {i} gave {tuple(draws.shape)}"
                    + (f", earlier ones S = {n_draws}." if n_draws else ".")
                )
            if not torch.isfinite(draws).all():
                raise ValueError(f"`calibrate` returned non-finite draws for data set {i}.")
            n_draws = draws.shape[0]
            draws, truth = draws.to(torch.float64), theta[i].to(draws.device, torch.float64)
            q = torch.cat(((1 - level_t) / 2, (1 + level_t) / 2)).to(draws.device)
            lo, hi = torch.quantile(draws, q, dim=0).chunk(2)  # (L, D) each
            hits.append(((lo <= truth) & (truth <= hi)).cpu())
            ranks.append((draws < truth).sum(0).cpu())
    hits_t = torch.stack(hits)
    std_error = (level_t * (1 - level_t) / n_datasets).sqrt()[:, None]
    result = Coverage(
        levels=level_t,
        coverage=hits_t.double().mean(0),
        std_error=std_error,
        hits=hits_t,
        ranks=torch.stack(ranks),
        n_draws=int(n_draws),
        theta=theta,
    )
    logger.info("coverage over %d data sets:\n%s", n_datasets, result)
    return result
