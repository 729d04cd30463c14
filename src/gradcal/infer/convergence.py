r"""Convergence diagnostics of MCMC chains: R-hat and effective sample sizes.

All functions take chains (C, S, D) (or (C, S) for one parameter) and return (D,) (or a
0-d tensor), in float64.

- :func:`rhat`: the rank-normalised split R-hat of Vehtari et al. (2021), the larger of
  the bulk R-hat (split R-hat of the rank-normalised draws) and the tail R-hat (the same of
  the draws folded about their median). Values of 1.01 and above mean the chains have not
  mixed; that threshold belongs to this statistic.
- :func:`split_rhat`: the classic split R-hat (Gelman et al. 2013), without ranks.
- :func:`ess_bulk`, :func:`ess_tail`: effective sample sizes of the rank-normalised split
  chains, and of the indicators of the 5 % and 95 % quantiles (the smaller of the two).
- :func:`effective_sample_size`: the effective sample size for the mean (Stan's
  multi-chain estimator on the split chains).

The autocorrelation sum follows Geyer's initial positive and monotone sequences as the
Stan reference manual describes them.

References:
    A. Vehtari, A. Gelman, D. Simpson, B. Carpenter, P.-C. Bürkner (2021).
    Rank-normalization, folding, and localization: an improved R-hat for assessing
    convergence of MCMC. Bayesian Analysis 16(2). https://arxiv.org/abs/1903.08008
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "effective_sample_size",
    "ess_bulk",
    "ess_tail",
    "rank_normalise",
    "rhat",
    "split_chains",
    "split_rhat",
]


def _as_chains(chains: Tensor, min_chains: int = 1) -> Tensor:
    """Check chains (C, S, D) or (C, S) and return them as float64 (C, S, D)."""
    if not isinstance(chains, Tensor) or chains.ndim not in (2, 3):
        shape = tuple(chains.shape) if isinstance(chains, Tensor) else type(chains).__name__
        raise ValueError(f"`chains` must be a tensor (C, S, D) or (C, S), got {shape}.")
    x = chains if chains.ndim == 3 else chains[..., None]
    if x.shape[1] < 4:
        raise ValueError(f"`chains` needs at least 4 samples per chain, got {x.shape[1]}.")
    if x.shape[0] < min_chains:
        raise ValueError(f"`chains` needs at least {min_chains} chains, got {x.shape[0]}.")
    return x.detach().double()


def _per_parameter(chains: Tensor, fn, min_chains: int = 1) -> Tensor:
    x = _as_chains(chains, min_chains)
    out = torch.stack(
        [torch.as_tensor(fn(x[..., k]), dtype=torch.float64) for k in range(x.shape[-1])]
    )
    return out if chains.ndim == 3 else out[0]


def split_chains(x: Tensor) -> Tensor:
    """Each chain cut into its first and last halves (the middle draw of an odd length is
    left out): (C, S, ...) -> (2C, S // 2, ...).

    Example:
        >>> split_chains(torch.arange(10.0).reshape(2, 5))
        tensor([[0., 1.],
                [5., 6.],
                [3., 4.],
                [8., 9.]])
    """
    half = x.shape[1] // 2
    return torch.cat((x[:, :half], x[:, x.shape[1] - half :]), 0)


def rank_normalise(x: Tensor) -> Tensor:
    r"""Normal scores of the pooled draws: $z = \Phi^{-1}((r - 3/8) / (N + 1/4))$ with r
    the rank of each draw among all N (ties get their average rank; Blom's offsets).

    Example:
        >>> rank_normalise(torch.tensor([[3.0, 1.0], [2.0, 2.0]])).round(decimals=3)
        tensor([[ 1.0490, -1.0490],
                [ 0.0000,  0.0000]], dtype=torch.float64)
    """
    flat = x.reshape(-1).double()
    n = flat.numel()
    values, order = torch.sort(flat)
    _, counts = torch.unique_consecutive(values, return_counts=True)
    ends = torch.cumsum(counts, 0).double()  # rank of the last draw of each tie group
    average = ends - (counts.double() - 1) / 2  # its group's average rank
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(average, counts)
    return torch.special.ndtri((ranks - 0.375) / (n + 0.25)).reshape(x.shape)


def _classic_rhat(x: Tensor) -> float:
    """Potential scale reduction of chains (M, N): sqrt(((N-1)/N W + B/N) / W)."""
    n = x.shape[1]
    within = x.var(1).mean()
    between_over_n = x.mean(1).var()
    return float((((n - 1) / n) * within + between_over_n) / within) ** 0.5


def _ess(x: Tensor) -> float:
    """Effective sample size of chains (M, N) as they are (no split, no ranks).

    Stan's estimator: autocorrelations combine within-chain autocovariances and the
    between-chain variance; tau = -1 + 2 sum_t rho_t over Geyer's initial positive
    sequence of pair sums, made monotone; ESS = M N / tau.
    """
    m, n = x.shape
    if float(x.max() - x.min()) < 1e-15:  # constant draws: every draw counts
        return float(m * n)
    centred = x - x.mean(1, keepdim=True)
    f = torch.fft.rfft(centred, n=2 * n)
    acov = torch.fft.irfft(f * f.conj(), n=2 * n)[:, :n] / n  # (M, N), biased
    mean_var = float(acov[:, 0].mean()) * n / (n - 1)
    var_plus = mean_var * (n - 1) / n + (float(x.mean(1).var()) if m > 1 else 0.0)
    rho = (1.0 - (mean_var - acov.mean(0)) / var_plus).tolist()
    kept = [0.0] * n
    kept[0], kept[1] = 1.0, rho[1]
    even, odd, t = 1.0, rho[1], 1
    while t < n - 3 and even + odd > 0.0:  # initial positive sequence of pairs
        even, odd = rho[t + 1], rho[t + 2]
        if even + odd >= 0:
            kept[t + 1], kept[t + 2] = even, odd
        t += 2
    last = t - 2
    if even > 0:  # the first element of the first negative pair still counts
        kept[last + 1] = even
    t = 1
    while t <= last - 2:  # initial monotone sequence
        if kept[t + 1] + kept[t + 2] > kept[t - 1] + kept[t]:
            kept[t + 1] = kept[t + 2] = (kept[t - 1] + kept[t]) / 2.0
        t += 2
    tau = -1.0 + 2.0 * sum(kept[: last + 1]) + sum(kept[last + 1 : last + 2])
    tau = max(tau, 1.0 / math.log10(m * n))
    return m * n / tau


def rhat(chains: Tensor) -> Tensor:
    r"""Rank-normalised split R-hat (Vehtari et al. 2021) of chains (C, S, D): (D,).

    $\max(\hat R_{\rm bulk}, \hat R_{\rm tail})$: the split R-hat of the
    rank-normalised split chains, and of the split chains folded about their median
    $|x - \mathrm{med}(x)|$, then rank-normalised. It detects chains that differ in
    location, in scale or in their tails, and is 1.01 or more when they have not mixed.

    Example:
        >>> bool(rhat(torch.randn(4, 1000)) < 1.01)
        True
        >>> wide = torch.cat((torch.randn(2, 1000), 3 * torch.randn(2, 1000)))
        >>> bool(rhat(wide) > 1.01)          # the same mean, different scales
        True
    """

    def one(x: Tensor) -> float:
        split = split_chains(x)
        bulk = _classic_rhat(rank_normalise(split))
        median = torch.quantile(split.reshape(-1), 0.5)  # the mean of the middle two
        tail = _classic_rhat(rank_normalise((split - median).abs()))
        return max(bulk, tail)

    return _per_parameter(chains, one, min_chains=1)


def split_rhat(chains: Tensor) -> Tensor:
    r"""Classic split R-hat of chains (C, S, D) (or (C, S)): (D,) (or 0-d).

    Each chain is cut in two halves; with W the mean within-half variance and B/n the
    variance of the half means, $\hat R = \sqrt{((n-1)/n\, W + B/n) / W}$. Prefer
    :func:`rhat`, whose threshold of 1.01 this statistic does not share.

    Example:
        >>> split_rhat(torch.randn(4, 1000)).item() < 1.01
        True
    """
    return _per_parameter(chains, lambda x: _classic_rhat(split_chains(x)))


def ess_bulk(chains: Tensor) -> Tensor:
    """Bulk effective sample size: the ESS of the rank-normalised split chains: (D,).

    Example:
        >>> 3000 < ess_bulk(torch.randn(4, 1000)).item() < 5000
        True
    """
    return _per_parameter(chains, lambda x: _ess(rank_normalise(split_chains(x))))


def ess_tail(chains: Tensor) -> Tensor:
    """Tail effective sample size: the smaller ESS of the split chains' indicators
    1[x <= q] of the 5 % and 95 % quantiles q of all draws: (D,).

    Example:
        >>> 2000 < ess_tail(torch.randn(4, 1000)).item() < 6000
        True
    """

    def one(x: Tensor) -> float:
        q = torch.quantile(x.reshape(-1), torch.tensor([0.05, 0.95], dtype=x.dtype))
        return min(_ess(split_chains((x <= qk).double())) for qk in q)

    return _per_parameter(chains, one)


def effective_sample_size(chains: Tensor) -> Tensor:
    r"""Effective sample size for the mean of chains (C, S, D) (or (C, S)): (D,) (or 0-d).

    Stan's estimator on the split chains (:func:`split_chains`, so a drift within a chain
    lowers it): the autocorrelation $\hat\rho_t$
    combines the within-chain autocovariances with the between-chain variance, and
    $\hat\tau = -1 + 2 \sum_t \hat\rho_t$ runs over Geyer's initial positive and
    monotone sequence of pair sums; $\mathrm{ESS} = C S / \hat\tau$.

    Example:
        >>> chains = torch.randn(4, 1000)
        >>> 3000 < effective_sample_size(chains).item() < 5000
        True
    """
    return _per_parameter(chains, lambda x: _ess(split_chains(x)))
