"""Independent Gaussian draws: the simplest model, for tests and conjugate checks."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradcal.models.model import Model

__all__ = ["Normal"]


class Normal(Model):
    r"""I.i.d. draws :math:`x_t \sim N(\mu, \sigma^2)`, :math:`t = 1, \dots, T`.

    Parameters, in order: :math:`(\mu, \sigma)`. A non-positive :math:`\sigma` gives NaN
    outputs for that draw (the inference engine drops such draws).

    Arguments:
        n_timesteps: number of draws T.

    Shapes: ``params`` (B, 2); the single output (B, T) (no initial value is observed).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> (x,) = Normal(1000).run_and_observe(torch.tensor([2.0, 0.5]))
        >>> x.shape, abs(x.mean().item() - 2.0) < 0.1
        (torch.Size([1000]), True)
    """

    batched = True
    history_length = 1
    n_params = 2

    def __init__(self, n_timesteps: int):
        super().__init__()
        self.n_timesteps = n_timesteps

    def initialize(self, params: Tensor) -> Tensor:
        return params.new_zeros(params.shape[0], 0)

    def step(self, params: Tensor, x: Tensor) -> Tensor:
        mu, sigma = params[:, 0:1], params[:, 1:2]
        sigma = torch.where(sigma > 0, sigma, torch.nan)
        return mu + sigma * torch.randn_like(mu)

    def observed_lengths(self) -> list[int]:
        """T draws (no initial value is observed)."""
        return [self.n_timesteps]

    def observe(self, x: Tensor) -> list[Tensor]:
        return [x]

    def log_likelihood(self, params: Tensor, x: Tensor) -> Tensor:
        r""":math:`\sum_t \log N(x_t; \mu, \sigma^2)` for ``x`` (T,) or (B, T).

        Returns a 0-d tensor for (2,) parameters and x (T,), else (B,).
        """
        self.check_params(params)
        mu, sigma = params[..., 0:1], params[..., 1:2]
        z = (x.to(params) - mu) / sigma
        return (-0.5 * z**2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)
