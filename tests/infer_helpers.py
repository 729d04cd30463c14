"""Small shared pieces of the inference tests."""

import torch


def gaussian_nll(scale: float):
    """Batched loss: -log N(y; theta, scale^2) summed over y, for theta (B, 1) or (1,)."""

    def loss(theta, y):
        return -torch.distributions.Normal(theta, scale).log_prob(y).sum(-1)

    loss.batched = True
    return loss


def normal_prior(loc: float, scale: float, dim: int = 1):
    return torch.distributions.Independent(
        torch.distributions.Normal(torch.full((dim,), loc), torch.full((dim,), scale)), 1
    )


def mmd_to_reference(draws, reference, n_splits=20):
    """MMD between draws and reference samples (n, D), both standardised by the reference's
    sds, and the noise floor: the sd of the MMD between random halves of the reference
    (half-size samples, so noisier than a full-size comparison)."""
    import numpy as np

    from gradcal.discrepancies import mmd
    from gradcal.kernels import GaussianKernel

    scale = reference.std(0)
    kernel = GaussianKernel().fitted(reference / scale)
    distance = mmd(draws / scale, reference / scale, kernel).item()
    half = reference.shape[0] // 2
    splits = [torch.randperm(reference.shape[0]) for _ in range(n_splits)]
    floor = np.std(
        [
            mmd(reference[p[:half]] / scale, reference[p[half:]] / scale, kernel).item()
            for p in splits
        ]
    )
    return distance, float(floor)
