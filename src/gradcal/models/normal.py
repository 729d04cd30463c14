"""Independent Gaussian draws: the simplest model, for tests and conjugate checks."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradcal.models.model import Model, accepts_one_draw, accepts_one_history

__all__ = ["Normal", "NormalDraws"]


class Normal(Model):
    r"""I.i.d. draws $x_t \sim N(\mu, \sigma^2)$, $t = 1, \dots, T$, after
    $x_0 = 0$.

    Parameters, in order: $(\mu, \sigma)$. A non-positive $\sigma$ gives NaN
    outputs for that draw (the inference engine drops such draws).

    Arguments:
        n_timesteps: number of draws T.

    Shapes (BlackBIRDS' layout): ``params`` (2,) or (B, 2); the history and the single
    output (T + 1, 1) for one draw, (B, T + 1, 1) for B draws, starting with the initial
    state $x_0 = 0$ (observed too, as in BlackBIRDS). As in BlackBIRDS, the values
    have torch's default dtype whatever the dtype of ``params``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> (x,) = Normal(1000).run_and_observe(torch.tensor([2.0, 0.5]))
        >>> x.shape, x[0].item(), abs(x[1:].mean().item() - 2.0) < 0.1
        (torch.Size([1001, 1]), 0.0, True)
    """

    batched = True
    history_length = 1
    n_params = 2
    state_ndim = 1

    def __init__(self, n_timesteps: int):
        super().__init__()
        self.n_timesteps = n_timesteps

    @accepts_one_draw
    def initialize(self, params: Tensor) -> Tensor:
        """x_0 = 0: (B, 1, 1)."""
        return params.new_zeros(params.shape[0], 1, 1, dtype=torch.get_default_dtype())

    @accepts_one_draw
    def step(self, params: Tensor, x: Tensor) -> Tensor:
        """One draw per row: (B, 1, 1)."""
        mu, sigma = params[:, 0:1], params[:, 1:2]
        sigma = torch.where(sigma > 0, sigma, torch.nan)
        return (mu + sigma * torch.randn_like(mu))[:, None].to(x.dtype)

    def observed_lengths(self) -> list[int]:
        """T + 1 values, x_0 = 0 (the start) to x_T."""
        return [self.n_timesteps + 1]

    @accepts_one_history
    def observe(self, x: Tensor) -> list[Tensor]:
        """The values themselves: [(B, T, 1)]."""
        return [x]

    def log_likelihood(self, params: Tensor, x: Tensor) -> Tensor:
        r"""$\sum_{t \ge 1} \log N(x_t; \mu, \sigma^2)$ of an observed output.

        ``x`` is either the output as :meth:`run_and_observe` returns it, (T + 1, 1) or
        (B, T + 1, 1), whose first entry (the initial state 0, not a draw) is skipped; or
        the draws alone, (T,) or (B, T).

        Returns a 0-d tensor for (2,) parameters and one series, else (B,).
        """
        self.check_params(params)
        if not isinstance(x, Tensor) or x.ndim not in (1, 2, 3):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"Normal.log_likelihood: `x` must be (T + 1, 1), (B, T + 1, 1), (T,) or "
                f"(B, T), got {got}."
            )
        if x.ndim == 3 or (x.ndim == 2 and x.shape[-1] == 1):
            x = x[..., 1:, 0]
        mu, sigma = params[..., 0:1], params[..., 1:2]
        z = (x.to(params) - mu) / sigma
        return (-0.5 * z**2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)


class NormalDraws(Normal):
    r"""The T draws $x_1, \dots, x_T \sim N(\mu, \sigma^2)$ alone: :class:`Normal`
    without BlackBIRDS' initial $x_0 = 0$ and trailing axis (gradcal's configuration
    name ``"Normal"``, whose data are T numbers).

    Shapes: the output (T,) for one draw, (B, T) for B draws; the history (T, 1) or
    (B, T, 1) (the initial history is empty).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> (x,) = NormalDraws(1000).run_and_observe(torch.tensor([2.0, 0.5]))
        >>> x.shape, abs(x.mean().item() - 2.0) < 0.1
        (torch.Size([1000]), True)
    """

    @accepts_one_draw
    def initialize(self, params: Tensor) -> Tensor:
        """An empty history: (B, 0, 1)."""
        return params.new_zeros(params.shape[0], 0, 1, dtype=torch.get_default_dtype())

    def observed_lengths(self) -> list[int]:
        """T draws (no initial value)."""
        return [self.n_timesteps]

    @accepts_one_history
    def observe(self, x: Tensor) -> list[Tensor]:
        """The draws without the trailing axis: [(B, T)]."""
        return [x[..., 0]]
