"""The Brock & Hommes (1998) asset-pricing model with heterogeneous beliefs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradcal.models.model import Model, accepts_one_draw, accepts_one_history
from gradcal.relax import soft_maximum, soft_minimum

__all__ = ["FREE", "BrockHommes", "BrockHommesBeliefs", "belief_mean"]

_N_LAGS = 3  # x_{t-1}, x_{t-2}, x_{t-3} enter the step
FREE = "free"  # a belief coefficient that is a parameter (as None), as TOML can write it


def belief_mean(beta: Tensor, g: Tensor, b: Tensor, R: Tensor | float, lags: Tensor) -> Tensor:
    r"""Conditional mean of Brock & Hommes' price deviation given three lags.

    $$
    \frac{1}{R} \sum_h n_h (g_h x_{t-1} + b_h), \quad
    n = \mathrm{softmax}_h\big(\beta (x_{t-1} - R x_{t-2})
    (g_h x_{t-3} + b_h - R x_{t-2})\big).
    $$

    Arguments:
        beta: intensity of choice, a number or (B, 1, 1).
        g, b: trend coefficients and biases, (B, 1, H).
        R: gross risk-free rate 1 + r, a number or (B, 1, 1).
        lags: (B, T, 3) = (x_{t-1}, x_{t-2}, x_{t-3}), most recent first.

    Returns:
        (B, T).

    Example:
        >>> g, b = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[0.0, 0.5]]])
        >>> belief_mean(1.0, g, b, 1.0, torch.zeros(1, 1, 3))
        tensor([[0.2500]])
    """
    x1, x2, x3 = lags[..., 0:1], lags[..., 1:2], lags[..., 2:3]
    profit = (x1 - R * x2) * (g * x3 + b - R * x2)
    fractions = torch.softmax(beta * profit, dim=-1)
    return (fractions * (g * x1 + b)).sum(-1) / (R if isinstance(R, float) else R[..., 0])


class BrockHommes(Model):
    r"""Brock & Hommes (1998) with four belief types, every coefficient a parameter.

    BlackBIRDS' model (same parameters, clamping and layout):

    $$
    x_t = \frac{1}{R} \Big(\sum_{h=1}^4 n_{h,t} (g_h x_{t-1} + b_h) + \sigma e_t\Big),
    \quad e_t \sim N(0, 1), \quad R = 1 + r,
    $$

    with the fractions $n_{h,t}$ of :func:`belief_mean` and $x_0 = x_1 = x_2 = 0$.
    The trend coefficients are squeezed softly into [1e-3, 1]:
    $g \leftarrow \mathrm{softmax}_2(\mathrm{softmin}_2(g, 1), 10^{-3})$ (hardness 2).

    Parameters, in order (11): $\log\beta, g_1, \dots, g_4, b_1, \dots, b_4,
    \log\sigma, \log r$. For a model with fixed $\beta, \sigma, r$ and some fixed
    belief coefficients, with an exact likelihood, see :class:`BrockHommesBeliefs`.

    Arguments:
        n_timesteps: number of simulated steps T.
        device: where the model's tensors live (tensors of a run follow ``params``).

    As in BlackBIRDS, the series has torch's default dtype whatever the dtype of ``params``.

    Shapes: ``params`` (11,) or (B, 11); history (T + 3, 1) for one draw, (B, T + 3, 1)
    for B; the single output, the whole series with the three initial zeros, (T + 3,) or
    (B, T + 3).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> theta = torch.tensor([4.8, 0, 0.9, 0.9, 1.01, 0, 0.2, -0.2, 0, -3.2, -4.6])
        >>> BrockHommes(100).run_and_observe(theta)[0].shape
        torch.Size([103])
    """

    batched = True
    history_length = _N_LAGS
    n_params = 11
    state_ndim = 1

    def __init__(self, n_timesteps: int = 100, device: torch.device | str = "cpu"):
        super().__init__()
        self.n_timesteps = n_timesteps
        self.device = device

    @accepts_one_draw
    def initialize(self, params: Tensor) -> Tensor:
        """The three initial zeros: (B, 3, 1)."""
        return params.new_zeros(params.shape[0], _N_LAGS, 1, dtype=torch.get_default_dtype())

    @accepts_one_draw
    def step(self, params: Tensor, x: Tensor) -> Tensor:
        """x_t from the history (B, T, 1), T >= 3: (B, 1, 1)."""
        beta = torch.exp(params[:, 0:1, None])
        g = params[:, None, 1:5]
        b = params[:, None, 5:9]
        sigma = torch.exp(params[:, 9:10])
        R = 1.0 + torch.exp(params[:, 10:11, None])
        g = soft_maximum(soft_minimum(g, 1.0, 2.0), 1e-3, 2.0)
        lags = x[:, -_N_LAGS:, 0].flip(-1)[:, None, :]  # (B, 1, 3), most recent first
        mean = belief_mean(beta, g, b, R, lags)
        x_t = mean + sigma * torch.randn_like(sigma) / R[..., 0]
        return x_t[:, None].to(x.dtype)

    def observed_lengths(self) -> list[int]:
        """T + 3 prices: the three initial zeros, then x_3 to x_{T+2}."""
        return [self.n_timesteps + 3]

    @accepts_one_history
    def observe(self, x: Tensor) -> list[Tensor]:
        """The series, initial zeros included: [(B, T)]."""
        return [x.flatten(1)]


class BrockHommesBeliefs(Model):
    r"""Brock & Hommes (1998) with H belief types (deviations from the fundamental price).

    $$
    x_t = \frac{1}{R} \sum_h n_{h,t} (g_h x_{t-1} + b_h) + \frac{\sigma}{R} e_t,
    \quad e_t \sim N(0, 1),
    $$

    $$
    n_{h,t} = \mathrm{softmax}_h(\beta U_{h,t}), \quad
    U_{h,t} = (x_{t-1} - R x_{t-2}) (g_h x_{t-3} + b_h - R x_{t-2}),
    $$

    with $R = 1 + r$ and $x_0 = x_1 = x_2 = 0$. Each trend coefficient
    $g_h$ and bias $b_h$ is fixed (a number) or free (``None``, or ``"free"``,
    which a TOML configuration can write); the free ones are the parameters, ordered by
    belief type, $g_h$ before $b_h$.
    The transition is Gaussian, so :meth:`log_likelihood` is exact.

    Arguments:
        n_timesteps: number of simulated values; the output is $x_3, \dots, x_{T+2}$.
        g: the H trend coefficients, ``None`` or ``"free"`` marking free ones.
        b: the H biases, ``None`` or ``"free"`` marking free ones.
        beta: intensity of choice.
        sigma: noise scale.
        r: risk-free rate.

    Shapes: ``params`` (D,) or (B, D) with D the number of ``None`` entries; history
    (T + 3,) or (B, T + 3); the single output (T,) or (B, T): the three initial zeros are
    not observed (a stretch of history of three or more steps given to :meth:`observe` is
    taken to start with them, which is what :meth:`run` returns).

    This is gradcal's configurable version (the ``BrockHommes`` model of ``gradcal run``
    configurations); BlackBIRDS' 11-parameter model is :class:`BrockHommes`.

    References:
        W. A. Brock, C. H. Hommes (1998). Heterogeneous beliefs and routes to chaos in a
        simple asset pricing model. https://doi.org/10.1016/S0165-1889(98)00011-6

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = BrockHommesBeliefs.wavy()
        >>> model.n_params, model.run_and_observe(model.true_params)[0].shape
        (4, torch.Size([97]))
        >>> BrockHommesBeliefs(50, b=(0.0, "free", "free", 0.0), g=(0, -0.7, 0.5, 1.01)).n_params
        2
    """

    batched = True
    history_length = _N_LAGS
    state_ndim = 0

    def __init__(
        self,
        n_timesteps: int = 97,
        g: Sequence[float | str | None] = (0.0, None, None, 1.01),
        b: Sequence[float | str | None] = (0.0, None, None, 0.0),
        beta: float = 120.0,
        sigma: float = 0.04,
        r: float = 0.01,
    ):
        super().__init__()
        if len(g) != len(b) or len(g) < 1:
            raise ValueError(
                f"BrockHommesBeliefs: `g` and `b` must have the same length H >= 1, "
                f"got {len(g)} and {len(b)}."
            )
        if sigma <= 0:
            raise ValueError(f"BrockHommesBeliefs: `sigma` must be > 0, got {sigma}.")
        self.n_timesteps = n_timesteps
        self.beta, self.sigma, self.R = beta, sigma, 1.0 + r
        fixed, select = self._coefficient_maps(g, b)
        self.n_params = select.shape[0]
        self.register_buffer("fixed", fixed)  # (2, H): fixed g and b, zero where free
        self.register_buffer("select", select)  # (D, 2, H): params -> free coefficients
        self.register_buffer("true_params", None)  # set by the ready-made configurations

    @staticmethod
    def _coefficient_maps(
        g: Sequence[float | str | None], b: Sequence[float | str | None]
    ) -> tuple[Tensor, Tensor]:
        h = len(g)
        # float64 so that float64 runs see the coefficients exactly (1.01 is not a float32)
        fixed = torch.zeros(2, h, dtype=torch.float64)
        free = []
        for i in range(h):
            for row, value in ((0, g[i]), (1, b[i])):
                if value is None or value == FREE:
                    free.append((row, i))
                elif isinstance(value, int | float) and not isinstance(value, bool):
                    fixed[row, i] = float(value)
                else:
                    raise ValueError(
                        f"BrockHommesBeliefs: `{'gb'[row]}` entries must be numbers, None or "
                        f"{FREE!r}, got {value!r}."
                    )
        select = torch.zeros(len(free), 2, h, dtype=torch.float64)
        for d, (row, i) in enumerate(free):
            select[d, row, i] = 1.0
        return fixed, select

    @classmethod
    def wavy(cls, n_timesteps: int = 97) -> BrockHommesBeliefs:
        """The ``brock_hommes_wavy`` set-up: beta = 120, theta = (g2, b2, g3, b3).

        Its ``true_params`` are (0.9, 0.2, 0.9, -0.2); prior box [0,1]^3 x [-1,0].
        """
        model = cls(n_timesteps, beta=120.0)
        model.true_params = torch.tensor([0.9, 0.2, 0.9, -0.2])
        return model

    @classmethod
    def noisy(cls, n_timesteps: int = 97) -> BrockHommesBeliefs:
        """The ``brock_hommes_noisy`` set-up: beta = 10, truth (-0.7, -0.4, 0.5, 0.3)."""
        model = cls(n_timesteps, beta=10.0)
        model.true_params = torch.tensor([-0.7, -0.4, 0.5, 0.3])
        return model

    def coefficients(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """Trend coefficients g and biases b, each (B, 1, H), from ``params`` (B, D)."""
        coef = self.fixed.to(params) + torch.einsum("bd,dkh->bkh", params, self.select.to(params))
        return coef[:, 0:1], coef[:, 1:2]

    def _mean(self, g: Tensor, b: Tensor, lags: Tensor) -> Tensor:
        """Conditional mean of x_t from lags (B, T, 3) = (x_{t-1}, x_{t-2}, x_{t-3})."""
        return belief_mean(float(self.beta), g, b, float(self.R), lags)

    @accepts_one_draw
    def initialize(self, params: Tensor) -> Tensor:
        """The three initial zeros: (B, 3)."""
        return params.new_zeros(params.shape[0], _N_LAGS)

    @accepts_one_draw
    def step(self, params: Tensor, x: Tensor) -> Tensor:
        """x_t from the history (B, T), T >= 3: (B, 1)."""
        g, b = self.coefficients(params)
        lags = x.flip(-1)[:, None, :_N_LAGS]  # (B, 1, 3), most recent first
        mean = self._mean(g, b, lags)
        return mean + (self.sigma / self.R) * torch.randn_like(mean)

    def observed_lengths(self) -> list[int]:
        """T prices, x_3 to x_{T+2} (the three zero lags are not observed)."""
        return [self.n_timesteps]

    @accepts_one_history
    def observe(self, x: Tensor) -> list[Tensor]:
        """The series without the three initial zeros: [(B, T)].

        The time loop passes the initial history (three steps) and then one step at a
        time; a stretch of three or more steps is taken to start at the initial zeros.
        """
        return [x[:, _N_LAGS:] if x.shape[1] >= _N_LAGS else x]

    def log_likelihood(self, params: Tensor, x: Tensor) -> Tensor:
        r"""Exact $\log p(x_3, \dots, x_{T+2} \mid \theta)$ given $x_0=x_1=x_2=0$.

        Arguments:
            params: (D,) or (B, D).
            x: the observed series (T,), or (B, T) with one series per draw.

        Returns:
            A 0-d tensor for (D,) parameters, else (B,).
        """
        self.check_params(params)
        single = params.ndim == 1
        p = params[None] if single else params
        if (
            not isinstance(x, Tensor)
            or x.ndim not in (1, 2)
            or (x.ndim == 2 and x.shape[0] != p.shape[0])
        ):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"BrockHommesBeliefs.log_likelihood: `x` must be (T,) or ({p.shape[0]}, T), "
                f"got {got}."
            )
        series = x.to(p).expand(p.shape[0], x.shape[-1])
        full = torch.cat((series.new_zeros(series.shape[0], _N_LAGS), series), dim=-1)
        t = series.shape[-1]
        lags = torch.stack([full[:, _N_LAGS - j : _N_LAGS - j + t] for j in (1, 2, 3)], dim=-1)
        g, b = self.coefficients(p)
        scale = self.sigma / self.R
        z = (series - self._mean(g, b, lags)) / scale
        ll = (-0.5 * z**2 - math.log(scale) - 0.5 * math.log(2 * math.pi)).sum(-1)
        return ll[0] if single else ll
