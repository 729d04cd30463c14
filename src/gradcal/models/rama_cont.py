"""The Cont (2005) threshold model of volatility clustering."""

from __future__ import annotations

import torch
from torch import Tensor

from gradcal.models.model import Model
from gradcal.relax import bernoulli_mask

__all__ = ["RamaCont"]


class RamaCont(Model):
    r"""Threshold traders reacting to a common signal (Cont 2005), as in BlackBIRDS.

    N agents hold thresholds :math:`\nu_i(0) \sim \mathrm{LogNormal}(\gamma_0, \gamma_1)`.
    At each step a common signal :math:`\epsilon_t \sim N(0, \sigma^2)` arrives, agent i
    orders :math:`\rho_i = 1[\epsilon_t > \nu_i] - 1[\epsilon_t < -\nu_i]` (straight-through
    with sigmoids of steepness ``sigmoid_k``), the return is
    :math:`r_t = \sum_i \rho_i / (N \eta)`, and each agent resets its threshold to
    :math:`|r_t|` with probability ``s``
    (an exact Bernoulli draw: ``s`` is fixed, so a relaxation would add nothing).

    Parameters, in order: :math:`(\gamma_0, \gamma_1, \sigma, \eta)`, or their base-10
    logarithms when ``log10_params=True`` (the BlackBIRDS tutorial's convention).

    Arguments:
        n_agents: number of agents N.
        n_timesteps: number of steps T.
        s: probability that an agent updates its threshold at a step.
        sigmoid_k: steepness of the sigmoids behind the straight-through orders.
        log10_params: read parameters as :math:`\log_{10}` values.

    Shapes: ``params`` (B, 4); history (B, T + 1, N + 1) holding the thresholds and the
    return; the single output, the returns :math:`r_0 = 0, r_1, \dots, r_T`, (B, T + 1).

    References:
        R. Cont (2005). Volatility clustering in financial markets: empirical facts and
        agent-based models. https://doi.org/10.1007/978-3-540-34625-8_10

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = RamaCont(n_agents=1000, n_timesteps=100, s=0.1, sigmoid_k=5.0,
        ...                  log10_params=True)
        >>> theta = torch.log10(torch.tensor([1.0, 0.5, 1.0, 0.7]))
        >>> model.run_and_observe(theta.expand(8, 4))[0].shape
        torch.Size([8, 101])
    """

    batched = True
    history_length = 1
    n_params = 4

    def __init__(
        self,
        n_agents: int,
        n_timesteps: int,
        s: float,
        sigmoid_k: float,
        log10_params: bool = False,
    ):
        super().__init__()
        if n_agents < 1:
            raise ValueError(f"RamaCont: `n_agents` must be >= 1, got {n_agents}.")
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"RamaCont: `s` must lie in [0, 1], got {s}.")
        self.n_agents = n_agents
        self.n_timesteps = n_timesteps
        self.s = s
        self.sigmoid_k = sigmoid_k
        self.log10_params = log10_params

    def _natural(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        p = 10.0**params if self.log10_params else params
        return p[:, 0:1], p[:, 1:2], p[:, 2:3], p[:, 3:4]

    def _returns(self, eps: Tensor, nu: Tensor, eta: Tensor) -> Tensor:
        r"""Return :math:`r = \sum_i \rho_i / (N \eta)`: (B, 1), from eps (B, 1), nu (B, N).

        The straight-through sum is formed after summing over agents (same value and
        gradient as summing straight-through orders, fewer operations on (B, N) tensors).
        """
        # Thresholds are never negative, so at most one of eps > nu, eps < -nu holds.
        hard = torch.sign(eps) * (nu < eps.abs()).sum(-1, keepdim=True)
        # soft = sum_i sigmoid(k(eps - nu_i)) - sigmoid(-k(eps + nu_i)), up to the constant
        # -N that the straight-through difference cancels.
        k_eps, k_nu = self.sigmoid_k * eps, self.sigmoid_k * nu
        soft = (torch.sigmoid(k_eps - k_nu) + torch.sigmoid(k_eps + k_nu)).sum(-1, keepdim=True)
        return (hard.to(soft.dtype) + (soft - soft.detach())) / (self.n_agents * eta)

    def initialize(self, params: Tensor) -> Tensor:
        gamma_0, gamma_1, _, eta = self._natural(params)
        z = torch.randn(params.shape[0], self.n_agents, dtype=params.dtype, device=params.device)
        nu = torch.exp(gamma_0 + gamma_1 * z)
        r = self._returns(torch.zeros_like(eta), nu, eta)
        return torch.cat((nu, r), dim=-1)[:, None, :]

    def step(self, params: Tensor, x: Tensor) -> Tensor:
        _, _, sigma, eta = self._natural(params)
        nu = x[:, -1, :-1]
        eps = sigma * torch.randn_like(sigma)
        r = self._returns(eps, nu, eta)
        reset = bernoulli_mask(nu.shape, self.s, dtype=nu.dtype, device=nu.device)
        nu = nu + reset * (r.abs() - nu)
        return torch.cat((nu, r), dim=-1)[:, None, :]

    def observe(self, x: Tensor) -> list[Tensor]:
        return [x[..., -1]]
