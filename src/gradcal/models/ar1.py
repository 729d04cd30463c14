"""A stationary Gaussian AR(1) process: the simplest time-series model with a known answer."""

from __future__ import annotations

import torch
from torch import Tensor

from gradcal.models.model import Model, accepts_one_draw, accepts_one_history

__all__ = ["AR1"]


class AR1(Model):
    r"""$x_t = \phi x_{t-1} + \sigma \varepsilon_t$, $\varepsilon_t \sim N(0, 1)$,
    started in the stationary law $x_0 \sim N(0, \sigma^2 / (1 - \phi^2))$.

    Parameters, in order: $(\phi, \sigma)$. A draw with $|\phi| \ge 1$ or
    $\sigma \le 0$ gives NaN outputs (the inference engine drops it).

    Arguments:
        n_timesteps: number of steps T.

    Shapes: ``params`` (2,) or (B, 2); the single output (T + 1, 1) for one draw,
    (B, T + 1, 1) for B draws (x_0 included: it is a draw of the stationary law).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> (x,) = AR1(5000).run_and_observe(torch.tensor([0.5, 1.0]))
        >>> x.shape, abs(x.var().item() - 4 / 3) < 0.15      # sigma^2 / (1 - phi^2)
        (torch.Size([5001, 1]), True)
    """

    batched = True
    history_length = 1
    n_params = 2
    state_ndim = 1

    def __init__(self, n_timesteps: int):
        super().__init__()
        self.n_timesteps = n_timesteps

    @staticmethod
    def _checked(params: Tensor) -> tuple[Tensor, Tensor]:
        phi, sigma = params[:, 0:1], params[:, 1:2]
        ok = (phi.abs() < 1) & (sigma > 0)
        return torch.where(ok, phi, torch.nan), torch.where(ok, sigma, torch.nan)

    @accepts_one_draw
    def initialize(self, params: Tensor) -> Tensor:
        """x_0 from the stationary law: (B, 1, 1)."""
        phi, sigma = self._checked(params)
        sd = sigma / torch.sqrt(1 - phi**2)
        return (sd * torch.randn_like(sd))[:, None]

    @accepts_one_draw
    def step(self, params: Tensor, x: Tensor) -> Tensor:
        """x_t from the history (B, 1, 1): (B, 1, 1)."""
        phi, sigma = self._checked(params)
        return (phi * x[:, -1] + sigma * torch.randn_like(sigma))[:, None]

    def observed_lengths(self) -> list[int]:
        """T + 1 values, x_0 to x_T."""
        return [self.n_timesteps + 1]

    @accepts_one_history
    def observe(self, x: Tensor) -> list[Tensor]:
        """The values themselves: [(B, T, 1)]."""
        return [x]
