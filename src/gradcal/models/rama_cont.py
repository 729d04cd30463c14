"""The Cont (2005) threshold model of volatility clustering."""

from __future__ import annotations

import torch
from torch import Tensor

from gradcal.models.model import Model
from gradcal.relax import bernoulli_mask, bernoulli_positions

__all__ = ["RamaCont"]


class RamaCont(Model):
    r"""Threshold traders reacting to a common signal (Cont 2005).

    N agents hold thresholds :math:`\nu_i(0) \sim \mathrm{LogNormal}(\gamma_0, \gamma_1)`.
    At each step a common signal :math:`\epsilon_t \sim N(0, \sigma^2)` arrives, agent i
    orders :math:`\rho_i = 1[\epsilon_t > \nu_i] - 1[\epsilon_t < -\nu_i]` (straight-through
    with sigmoids of steepness ``sigmoid_k``), the return is
    :math:`r_t = \sum_i \rho_i / (N \eta)`, and each agent resets its threshold to
    :math:`|r_t|` with probability ``s``
    (an exact Bernoulli draw: ``s`` is fixed, so a relaxation would add nothing).

    BlackBIRDS' built-in version draws a separate signal for every agent; here, as in
    Cont (2005), all agents see the same :math:`\epsilon_t`, which is what makes their
    orders herd and volatility cluster.

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
        if sigmoid_k <= 0:
            raise ValueError(f"RamaCont: `sigmoid_k` must be > 0, got {sigmoid_k}.")
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
        hard = torch.sign(eps) * (nu < eps.abs()).sum(-1, keepdim=True)  # float: promoted
        # soft = sum_i sigmoid(k(eps - nu_i)) - sigmoid(-k(eps + nu_i)), up to the constant
        # -N that the straight-through difference cancels.
        k_eps, k_nu = self.sigmoid_k * eps, self.sigmoid_k * nu
        soft = (torch.sigmoid(k_eps - k_nu) + torch.sigmoid(k_eps + k_nu)).sum(-1, keepdim=True)
        return (hard + (soft - soft.detach())) / (self.n_agents * eta)

    def initialize(self, params: Tensor) -> Tensor:
        gamma_0, gamma_1, _, eta = self._natural(params)
        z = torch.randn(params.shape[0], self.n_agents, dtype=params.dtype, device=params.device)
        # exp(50) ~ 5e21 is an infinite threshold for any return; the cap keeps overflowing
        # draws (large gamma_1) finite, so their gradients are zero instead of NaN.
        nu = torch.exp((gamma_0 + gamma_1 * z).clamp(max=50.0))
        r = self._returns(torch.zeros_like(eta), nu, eta)
        return torch.cat((nu, r), dim=-1)[:, None, :]

    def step(self, params: Tensor, x: Tensor) -> Tensor:
        scales = 10.0 ** params[:, 2:] if self.log10_params else params[:, 2:]
        sigma, eta = scales.unbind(-1)
        sigma, eta = sigma[:, None], eta[:, None]
        # (B, N + 1): thresholds, then the last return. A reshape (free in the backward pass)
        # where the history is the one step the model needs.
        state = x.reshape(x.shape[0], -1) if x.shape[1] == 1 else x[:, -1]
        nu = state[:, :-1]
        eps = sigma * torch.randn_like(sigma)
        r = self._returns(eps, nu, eta)
        return torch.cat((self._reset(state, r), r), dim=-1)[:, None, :]

    def _reset(self, state: Tensor, r: Tensor) -> Tensor:
        """Thresholds (B, N) after each agent resets to |r| with probability s."""
        b, n = state.shape[0], self.n_agents
        if self.s in (0.0, 1.0) or self.s > 0.25 or b * n < 4096:  # dense draws are cheaper
            reset = bernoulli_mask((b, n), self.s, dtype=r.dtype, device=r.device)
            return torch.lerp(state[:, :-1], r.abs().expand(-1, n), reset)
        # Write |r| straight at the resetting agents; index n (the return's column, dropped
        # afterwards) absorbs the unused tail of the positions.
        idx = bernoulli_positions(b, n, self.s, device=r.device)
        return state.scatter(1, idx, r.abs().expand(-1, idx.shape[1]))[:, :-1]

    def observed_lengths(self) -> list[int]:
        """T + 1 returns, r_0 (the initial one) to r_T."""
        return [self.n_timesteps + 1]

    def observe(self, x: Tensor) -> list[Tensor]:
        return [x[..., -1]]
