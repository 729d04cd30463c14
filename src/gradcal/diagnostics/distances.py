"""How far apart two sample sets are: energy distance, MMD, its noise floor, C2ST."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from gradcal.diagnostics._checks import (
    as_pair,
    as_samples,
    check_int,
    check_seed,
    standardised,
)
from gradcal.discrepancies import energy_distance, mmd
from gradcal.kernels import GaussianKernel

__all__ = [
    "NoiseFloor",
    "c2st",
    "energy_distance_samples",
    "mmd_samples",
    "split_half_floor",
]


def energy_distance_samples(
    a: Tensor, b: Tensor, *, standardize: bool = True, chunk_size: int | None = 1024
) -> float:
    r"""Energy distance between sample sets a (n, D) and b (m, D).

    $2 E\|a - b\| - E\|a - a'\| - E\|b - b'\|$ (U-statistics, unbiased, zero in
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
    a, b = as_pair(a, b)
    if standardize:
        a, b = standardised(a, b)
    with torch.no_grad():
        return float(energy_distance(a, b, chunk_size=chunk_size))


def mmd_samples(
    a: Tensor, b: Tensor, *, standardize: bool = True, chunk_size: int | None = 1024
) -> float:
    r"""Unbiased squared MMD between sample sets a (n, D) and b (m, D), Gaussian kernel.

    $E k(a, a') + E k(b, b') - 2 E k(a, b)$ with
    $k = \exp(-\|x - x'\|^2 / h^2)$, h the median distance of the pooled
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
    a, b = as_pair(a, b)
    if standardize:
        a, b = standardised(a, b)
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
    x = as_samples(samples, "samples", min_points=4)
    check_int(n_splits, "n_splits", 2)
    check_seed(seed, optional=False)
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
    the accuracy on held-out points estimates $\tfrac12 + \tfrac12 \mathrm{TV}(p_a,
    p_b)$ at best: 0.5 means indistinguishable, 1 means disjoint (Lopez-Paz & Oquab, 2017).
    Classes are balanced by using min(n, m) random points of each; folds are stratified, so
    every test fold holds as many points of a as of b and guessing scores exactly 0.5;
    inputs are standardised by the training fold. Under equal distributions the accuracy
    has standard deviation at most $0.5 / \sqrt{2 \min(n, m)}$.

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
    a, b = as_pair(a, b)
    check_int(folds, "folds", 2)
    check_seed(seed, optional=False)
    check_int(hidden, "hidden", 1)
    check_int(epochs, "epochs", 1)
    check_int(batch_size, "batch_size", 1)
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
