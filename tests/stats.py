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
