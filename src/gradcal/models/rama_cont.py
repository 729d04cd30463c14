"""The Cont (2005) threshold model of volatility clustering."""

from __future__ import annotations

import torch
from torch import Tensor

from gradcal.models.model import SINGLE_DRAW_HOOKS, Model, accepts_one_draw, accepts_one_history
from gradcal.relax import bernoulli_mask, bernoulli_positions, threshold_order_sum

_HELPERS = ("compute_order_soft", "compute_order_hard", "compute_order", "compute_returns")
_PARTS = "_gradcal_rama_cont_parts"  # attribute of a step: (its version, nu, r)

__all__ = ["RamaCont"]


class RamaCont(Model):
    r"""Threshold traders reacting to a common signal (Cont 2005).

    N agents hold thresholds $\nu_i(0) \sim \mathrm{LogNormal}(\gamma_0, \gamma_1)$.
    At each step a common signal $\epsilon_t \sim N(0, \sigma^2)$ arrives, agent i
    orders $\rho_i = 1[\epsilon_t > \nu_i] - 1[\epsilon_t < -\nu_i]$ (straight-through
    with sigmoids of steepness ``sigmoid_k``), the return is
    $r_t = \sum_i \rho_i / (N \eta)$, and each agent resets its threshold to
    $|r_t|$ with probability ``s``
    (an exact Bernoulli draw: ``s`` is fixed, so a relaxation would add nothing).

    As in Cont (2005) and in BlackBIRDS 1.3's built-in model, all agents see the same
    $\epsilon_t$, which is what makes their orders herd and volatility cluster.

    The pieces of a step are BlackBIRDS' methods :meth:`compute_order` (with
    :meth:`compute_order_soft`, :meth:`compute_order_hard`), :meth:`compute_returns` and
    :meth:`compute_new_nu_t`; they broadcast over leading draw axes. Unless a subclass
    overrides them, the step sums the straight-through orders over agents in one pass
    (same value and gradient, fewer operations).

    Parameters, in order: $(\gamma_0, \gamma_1, \sigma, \eta)$, or their base-10
    logarithms when ``log10_params=True`` (the BlackBIRDS tutorial's convention).

    Arguments:
        n_agents: number of agents N.
        n_timesteps: number of steps T.
        s: probability that an agent updates its threshold at a step.
        sigmoid_k: steepness of the sigmoids behind the straight-through orders.
        log10_params: read parameters as $\log_{10}$ values.

    Shapes (BlackBIRDS' layout): ``params`` (4,) or (B, 4); history (T + 1, 3, N) for one
    draw, (B, T + 1, 3, N) for B, holding per step the thresholds $\nu$, the signal
    and the return (the last two repeated over agents); the single output, the returns
    $r_0 = 0, r_1, \dots, r_T$, (T + 1,) or (B, T + 1).

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
    state_ndim = 2
    single_draw_hooks = (*SINGLE_DRAW_HOOKS, *_HELPERS, "compute_new_nu_t")

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

    def compute_order_soft(self, epsilon_t: Tensor, nu_t: Tensor) -> Tensor:
        r"""Soft orders $\sigma(k(\epsilon - \nu)) - \sigma(k(-\nu - \epsilon))$,
        broadcast over ``epsilon_t`` and ``nu_t``."""
        k = self.sigmoid_k
        return torch.sigmoid(k * (epsilon_t - nu_t)) - torch.sigmoid(k * (-nu_t - epsilon_t))

    def compute_order_hard(self, epsilon_t: Tensor, nu_t: Tensor) -> Tensor:
        r"""Orders $1[\epsilon > \nu] - 1[\epsilon < -\nu]$ as floats (float32
        unless an input is float64)."""
        dtype = torch.promote_types(torch.result_type(epsilon_t, nu_t), torch.float32)
        return (epsilon_t > nu_t).to(dtype) - (epsilon_t < -nu_t).to(dtype)

    def compute_order(self, epsilon_t: Tensor, nu_t: Tensor) -> Tensor:
        """Straight-through orders: the hard value with the soft orders' gradient.

        Example:
            >>> model = RamaCont(n_agents=3, n_timesteps=1, s=0.1, sigmoid_k=5.0)
            >>> model.compute_order(torch.tensor(1.0), torch.tensor([0.5, 2.0, 0.1]))
            tensor([1., 0., 1.])
        """
        soft = self.compute_order_soft(epsilon_t, nu_t)
        return self.compute_order_hard(epsilon_t, nu_t) + (soft - soft.detach())

    def compute_returns(self, order: Tensor, eta: Tensor | float) -> Tensor:
        r"""Return $\sum_i \rho_i / (N \eta)$ of the orders (..., N).

        A 0-d tensor for orders (N,); (B, 1) for orders (B, N) and ``eta`` (B, 1).
        """
        return order.sum(-1, keepdim=order.ndim > 1) / (self.n_agents * eta)

    def compute_new_nu_t(self, nu_t: Tensor, s: Tensor | float, returns: Tensor) -> Tensor:
        r"""Thresholds after each agent resets to $|r_t|$ with probability ``s``.

        $\nu' = |r| q + (1 - q) \nu$ with exact Bernoulli(s) draws q. ``nu_t`` is (N,)
        or (B, N); ``returns`` is a number, 0-d, (B,) or (B, 1).
        """
        r = torch.as_tensor(returns)
        if r.ndim == nu_t.ndim - 1 and r.ndim > 0:
            r = r[..., None]
        dtype = torch.promote_types(r.dtype, nu_t.dtype)
        dtype = dtype if dtype.is_floating_point else torch.get_default_dtype()
        p = float(s)
        nu = nu_t.reshape(-1, nu_t.shape[-1]).to(dtype)
        r = r.to(dtype).abs().reshape(-1, 1).expand(nu.shape[0], 1)
        b, n = nu.shape
        if p in (0.0, 1.0) or p > 0.25 or b * n < 4096:  # dense draws are cheaper
            reset = bernoulli_mask((b, n), p, dtype=dtype, device=nu.device)
            new = r * reset + (1 - reset) * nu
        else:
            # Write |r| straight at the resetting agents; column n (dropped afterwards)
            # absorbs the unused tail of the positions.
            idx = bernoulli_positions(b, n, p, device=nu.device)
            padded = torch.cat((nu, r), dim=-1)
            new = padded.scatter(1, idx, r.expand(-1, idx.shape[1]))[:, :-1]
        return new.reshape(nu_t.shape)

    def _returns(self, eps: Tensor, nu: Tensor, eta: Tensor) -> Tensor:
        r"""Return $r = \sum_i \rho_i / (N \eta)$: (B, 1), from eps (B, 1), nu (B, N).

        Uses the model's own :meth:`compute_order` and :meth:`compute_returns` when a
        subclass overrides one of them; otherwise the straight-through sum is formed after
        summing over agents (same value and gradient, fewer operations on (B, N) tensors).
        """
        if self._overrides(*_HELPERS):  # a subclass's helpers see BlackBIRDS' shapes
            return torch.stack(
                [
                    torch.as_tensor(self.compute_returns(self.compute_order(e, n), h)).reshape(1)
                    for e, n, h in zip(eps[:, 0], nu, eta[:, 0], strict=True)
                ]
            ).to(nu)
        # No reverse gradient wanted (plain simulation, or forward mode, which runs under
        # no_grad): the soft orders are formed only for a tangent, if one is asked for.
        if not torch.is_grad_enabled():
            # thresholds are lognormal draws or |r_t|: never negative
            order = threshold_order_sum(eps, nu, self.sigmoid_k, nonnegative=True)
            return order / (self.n_agents * eta)
        # Thresholds are never negative, so at most one of eps > nu, eps < -nu holds.
        hard = torch.sign(eps) * (nu < eps.abs()).sum(-1, keepdim=True)  # float: promoted
        # soft = sum_i sigmoid(k(eps - nu_i)) - sigmoid(-k(eps + nu_i)), up to the constant
        # -N that the straight-through difference cancels. Formed here rather than in
        # threshold_order_sum's backward: the backward then reuses the two sigmoids (faster in
        # forward + backward, measured).
        k_eps, k_nu = self.sigmoid_k * eps, self.sigmoid_k * nu
        soft = (torch.sigmoid(k_eps - k_nu) + torch.sigmoid(k_eps + k_nu)).sum(-1, keepdim=True)
        return (hard + (soft - soft.detach())) / (self.n_agents * eta)

    def _overrides(self, *methods: str) -> bool:
        """Whether this model's class overrides one of RamaCont's ``methods``."""
        return any(getattr(type(self), m) is not getattr(RamaCont, m) for m in methods)

    def _new_thresholds(self, nu: Tensor, r: Tensor) -> Tensor:
        """:meth:`compute_new_nu_t` for nu (B, N), r (B, 1); one draw at a time (as
        BlackBIRDS calls it) when a subclass overrides it."""
        if not self._overrides("compute_new_nu_t"):
            return self.compute_new_nu_t(nu, self.s, r)
        return torch.stack(
            [self.compute_new_nu_t(n, self.s, q[0]) for n, q in zip(nu, r, strict=True)]
        ).to(nu)

    def _state(self, nu: Tensor, eps: Tensor, r: Tensor) -> Tensor:
        """One step of history (B, 1, 3, N) from nu (B, N), eps and r (B, 1).

        The step keeps ``nu`` and ``r`` as they were computed, for :meth:`_parts`.
        """
        n = self.n_agents
        x = torch.stack((nu, eps.expand(-1, n), r.expand(-1, n)), dim=1)[:, None]
        setattr(x, _PARTS, (x._version, nu, r))
        return x

    @staticmethod
    def _parts(x: Tensor) -> tuple[Tensor, Tensor] | None:
        """The thresholds (B, N) and return (B, 1) that :meth:`_state` built the step ``x``
        from, or None when ``x`` is not such a step or was changed in place since.

        Reading them equals reading ``x[:, -1, 0]`` and ``x[:, :, 2, 0]`` in value and
        gradient, but the gradient skips the backward of indexing into ``x``, which fills a
        zero tensor of x's size (B, 1, 3, N) per read. A step that was detached (gradient
        horizon), copied, joined with other steps or batched by vmap is a new tensor
        without them, and is read by indexing.
        """
        parts = getattr(x, _PARTS, None)
        if parts is None or parts[0] != x._version:
            return None
        _, nu, r = parts
        return (nu, r) if nu.dtype == r.dtype == x.dtype else None

    @accepts_one_draw
    def initialize(self, params: Tensor) -> Tensor:
        """Thresholds from the log-normal, no signal, zero return: (B, 1, 3, N)."""
        gamma_0, gamma_1, _, eta = self._natural(params)
        z = torch.randn(params.shape[0], self.n_agents, dtype=params.dtype, device=params.device)
        # exp(50) ~ 5e21 is an infinite threshold for any return; the cap keeps overflowing
        # draws (large gamma_1) finite, so their gradients are zero instead of NaN.
        nu = torch.exp((gamma_0 + gamma_1 * z).clamp(max=50.0))
        eps = torch.zeros_like(eta)
        return self._state(nu, eps, self._returns(eps, nu, eta))

    @accepts_one_draw
    def step(self, params: Tensor, x: Tensor) -> Tensor:
        """The next step from the history (B, T, 3, N): (B, 1, 3, N)."""
        scales = 10.0 ** params[:, 2:] if self.log10_params else params[:, 2:]
        sigma, eta = scales[:, 0:1], scales[:, 1:2]
        parts = self._parts(x)
        nu = x[:, -1, 0] if parts is None else parts[0]
        eps = sigma * torch.randn_like(sigma)
        r = self._returns(eps, nu, eta)
        return self._state(self._new_thresholds(nu, r), eps, r)

    def observed_lengths(self) -> list[int]:
        """T + 1 returns, r_0 (the initial one) to r_T."""
        return [self.n_timesteps + 1]

    @accepts_one_history
    def observe(self, x: Tensor) -> list[Tensor]:
        """The returns: [(B, T)]."""
        parts = self._parts(x)
        return [x[:, :, 2, 0] if parts is None else parts[1]]
