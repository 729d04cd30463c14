"""A random walk with differentiable +1/-1 steps."""

from __future__ import annotations

import torch
from torch import Tensor

from gradcal.models.model import Model, accepts_one_draw, accepts_one_history
from gradcal.relax import relaxed_bernoulli

__all__ = ["RandomWalk"]


class RandomWalk(Model):
    r"""Random walk $X_t = X_{t-1} + 2\eta_t - 1$, $\eta_t \sim \mathrm{Bernoulli}(p)$.

    The single parameter is $\mathrm{logit}(p)$. Steps are drawn by the
    straight-through Gumbel-softmax (:func:`gradcal.relax.relaxed_bernoulli`), so they are
    exactly +1 or -1 and differentiable in p. The walk starts at $X_0 = 0$.

    Arguments:
        n_timesteps: number of steps T.
        tau_softmax: temperature of the Gumbel-softmax relaxation.

    Shapes (BlackBIRDS' layout): ``params`` a 0-d logit or (1,) for one draw, (B, 1) for
    B draws; the history and the single output (T + 1, 1) for one draw, (B, T + 1, 1) for B.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> (x,) = RandomWalk(100).run_and_observe(torch.tensor(0.0))
        >>> x.shape, set(x.diff(dim=0).abs().flatten().tolist())
        (torch.Size([101, 1]), {1.0})
    """

    batched = True
    history_length = 1
    n_params = 1
    state_ndim = 1

    def __init__(self, n_timesteps: int, tau_softmax: float = 0.1):
        super().__init__()
        self.n_timesteps = n_timesteps
        self.tau_softmax = tau_softmax

    @accepts_one_draw
    def initialize(self, params: Tensor) -> Tensor:
        """X_0 = 0: (B, 1, 1)."""
        return params.new_zeros(params.shape[0], 1, 1)

    @accepts_one_draw
    def step(self, params: Tensor, x: Tensor) -> Tensor:
        """X_t from the history (B, T, 1): (B, 1, 1)."""
        up = relaxed_bernoulli(params, tau=self.tau_softmax, hard=True)
        return (x[:, -1] + 2.0 * up - 1.0)[:, None]

    def observed_lengths(self) -> list[int]:
        """T + 1 positions, x_0 (the start) to x_T."""
        return [self.n_timesteps + 1]

    @accepts_one_history
    def observe(self, x: Tensor) -> list[Tensor]:
        """The positions themselves: [(B, T, 1)]."""
        return [x]

    def log_likelihood(self, params: Tensor, x: Tensor) -> Tensor:
        r"""Exact $\log p(x \mid \mathrm{logit}\, p)$ of a path of ±1 increments.

        Arguments:
            params: (D,) = (1,) or (B, 1).
            x: the observed path (T + 1, 1) (as observed) or (T + 1,), starting at 0.

        Returns:
            A 0-d tensor for (1,) parameters, (B,) for (B, 1).
        """
        self.check_params(params)
        if isinstance(x, Tensor) and x.ndim == 2 and x.shape[-1] == 1:
            x = x[:, 0]
        if not isinstance(x, Tensor) or x.ndim != 1:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"RandomWalk.log_likelihood: `x` must be (T + 1, 1), got {got}.")
        up = (x.diff() > 0).to(params.dtype)
        logit = params[..., :1]
        ll = up * torch.nn.functional.logsigmoid(logit) + (
            1 - up
        ) * torch.nn.functional.logsigmoid(-logit)
        return ll.sum(-1)
