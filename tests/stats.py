"""Helpers for statistical assertions with tolerances from the Monte Carlo error."""

import torch

# |z| above this has probability about 1e-5 under the null: a failure means a real error,
# not bad luck, yet a 2 % relative bias on a 1e4-sample mean is still caught.
Z_MAX = 4.5


def z_two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    """z statistic of the difference of the means of two independent samples (n,)."""
    se = (a.var() / a.numel() + b.var() / b.numel()).sqrt()
    return float((a.mean() - b.mean()) / se)


def z_mean(x: torch.Tensor, mean: float) -> float:
    """z statistic of the sample mean of ``x`` (n,) against a known ``mean``."""
    return float((x.mean() - mean) / (x.std() / x.numel() ** 0.5))


def z_proportion(hits: torch.Tensor, p: float) -> float:
    """z statistic of the frequency of 0/1 ``hits`` against the probability ``p``."""
    n = hits.numel()
    return float((hits.float().mean() - p) / (p * (1 - p) / n) ** 0.5)


def batch_means_ess(chains: torch.Tensor, n_batches: int = 25) -> torch.Tensor:
    """Effective sample size of chains (C, S, D) (or (C, S)) by batch means: (D,) (or 0-d).

    Independent of gradcal's (Geyer) estimator: each chain is cut into ``n_batches``
    consecutive batches of length L = S // n_batches; for L much longer than the
    autocorrelation time the batch means are nearly independent, so
    Var(grand mean) ~ s_b^2 / (C n_batches) with s_b^2 the variance of all C n_batches batch
    means about the grand mean (between-chain differences count against the chains), and
    ESS = s^2 / Var(grand mean). Its relative standard error is about
    sqrt(2 / (C n_batches - 1)) (chi-square with C n_batches - 1 degrees of freedom).
    """
    x = chains if chains.ndim == 3 else chains[..., None]
    x = x.double()
    c, s, d = x.shape
    length = s // n_batches
    x = x[:, s - length * n_batches :]  # drop the oldest remainder
    means = x.reshape(c, n_batches, length, d).mean(2).reshape(c * n_batches, d)
    var_of_mean = means.var(0) / (c * n_batches)
    ess = x.reshape(-1, d).var(0) / var_of_mean
    return ess if chains.ndim == 3 else ess[0]


def batch_means_relative_se(n_chains: int, n_batches: int = 25) -> float:
    """Relative standard error of :func:`batch_means_ess` (chi-square, C n_batches - 1 dof)."""
    return (2.0 / (n_chains * n_batches - 1)) ** 0.5


def critical_z(alpha: float, n_tests: int) -> float:
    """Two-sided Bonferroni critical value: under the null, P(any of ``n_tests`` |z| above
    it) <= ``alpha``. E.g. critical_z(1e-3, 8) = 3.84."""
    tail = torch.tensor(alpha / (2 * n_tests), dtype=torch.float64)
    return float(-torch.special.ndtri(tail))


def _kurtosis(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(0)
    return (centred**4).mean(0) / centred.var(0, unbiased=False) ** 2


def moment_z(
    draws: torch.Tensor,
    reference: torch.Tensor,
    n_eff: torch.Tensor | None = None,
    n_eff_square: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """z statistics (D,) of the differences of the means and of the log sds of two samples
    (n, D) and (m, D), each with its standard error at the sizes compared:
    Var(mean) = s^2 / n and Var(log s) = (kurtosis - 1) / (4 n) (delta method; 1 / (2 n)
    for a Gaussian). ``n_eff``, ``n_eff_square``: effective sizes of the draws for the mean
    and for the squared deviations (correlated draws, e.g. MCMC); n by default. The
    reference is taken as independent draws."""
    n = torch.full(draws.shape[1:], float(draws.shape[0]), dtype=torch.float64)
    n_eff = n if n_eff is None else n_eff.double()
    n_eff_square = n if n_eff_square is None else n_eff_square.double()
    m = reference.shape[0]
    x, y = draws.double(), reference.double()
    se_mean = (x.var(0) / n_eff + y.var(0) / m).sqrt()
    z_mean = (x.mean(0) - y.mean(0)) / se_mean
    se_log_sd = ((_kurtosis(x) - 1) / (4 * n_eff_square) + (_kurtosis(y) - 1) / (4 * m)).sqrt()
    z_log_sd = (x.std(0).log() - y.std(0).log()) / se_log_sd
    return z_mean, z_log_sd


def mmd_permutation_test(
    x: torch.Tensor, y: torch.Tensor, n_permutations: int = 999, seed: int = 0
) -> tuple[float, float]:
    """Two-sample MMD test with its null distribution from permutations of the pooled
    sample at the sizes compared: (MMD^2, p-value). Both samples are standardised by y's
    sds; Gaussian kernel with the median-heuristic bandwidth of the pooled sample; the
    biased (V-statistic) MMD^2 = s^T K s with s = (1/n, ..., -1/m, ...). Exact level under
    exchangeability (independent draws from one law); the p-value's resolution is
    1 / (n_permutations + 1)."""
    scale = y.std(0)
    pooled = torch.cat((x, y)).double() / scale.double()
    d2 = (pooled[:, None, :] - pooled[None, :, :]).pow(2).sum(-1)
    bandwidth2 = d2[torch.triu_indices(len(pooled), len(pooled), 1).unbind()].median()
    kernel = torch.exp(-d2 / (2 * bandwidth2)).float()
    signs = torch.cat((torch.full((len(x),), 1.0 / len(x)), torch.full((len(y),), -1.0 / len(y))))
    g = torch.Generator().manual_seed(seed)
    columns = [signs] + [
        signs[torch.randperm(len(signs), generator=g)] for _ in range(n_permutations)
    ]
    s = torch.stack(columns, 1)
    stats = ((kernel @ s) * s).sum(0)
    p_value = float((stats[1:] >= stats[0]).sum() + 1) / (n_permutations + 1)
    return float(stats[0]), p_value


# The Brock-Hommes posterior checks: 8 moment z statistics (4 means, 4 log sds) at a
# family-wise false-alarm rate of 1e-3, and the MMD permutation test at p > 1e-3.
POSTERIOR_ALPHA = 1e-3


def posterior_mismatch(
    draws: torch.Tensor,
    reference: torch.Tensor,
    n_eff: torch.Tensor | None = None,
    n_eff_square: torch.Tensor | None = None,
    mmd: bool = True,
) -> list[str]:
    """Why ``draws`` (n, D) do not look like ``reference`` (m, D): an empty list when the
    means, the log sds (each |z| below the Bonferroni value for 2 D statistics at
    POSTERIOR_ALPHA) and the MMD permutation test (p > POSTERIOR_ALPHA, on m of the draws)
    all agree. Under the null the whole check fails with probability <= 2 POSTERIOR_ALPHA;
    its power is shown in tests/test_posterior_checks.py."""
    z_mean, z_log_sd = moment_z(draws, reference, n_eff, n_eff_square)
    limit = critical_z(POSTERIOR_ALPHA, 2 * draws.shape[1])
    problems = [f"mean {k}: z = {z:.2f}" for k, z in enumerate(z_mean.tolist()) if abs(z) > limit]
    problems += [f"sd {k}: z = {z:.2f}" for k, z in enumerate(z_log_sd.tolist()) if abs(z) > limit]
    if mmd:  # as many draws as reference points (a random subset): a 2m x 2m kernel
        pick = torch.randperm(draws.shape[0], generator=torch.Generator().manual_seed(0))
        statistic, p_value = mmd_permutation_test(draws[pick[: reference.shape[0]]], reference)
        if p_value <= POSTERIOR_ALPHA:
            problems.append(f"MMD^2 {statistic:.2e}: permutation p = {p_value:.4f}")
    return problems
