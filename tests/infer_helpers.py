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
