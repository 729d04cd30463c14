"""Posteriors with exact samples for the VI objectives: bimodal, banana, heavy-tailed.

Each target is a generalised posterior exp(-l(theta) / w) prior(theta) with w = 1, a
batched loss l (B, 2) -> (B,) (the "simulator" is the loss itself), a prior, and
``exact(n, seed)`` drawing n independent samples of the posterior exactly (a
one-dimensional inverse CDF on a fine grid, a conjugate conditional, or rejection).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

Normal = torch.distributions.Normal


def _independent_normal(loc, scale):
    loc, scale = torch.as_tensor(loc), torch.as_tensor(scale)
    return torch.distributions.Independent(Normal(loc, scale), 1)


def _grid_sample(log_density: Callable, lo: float, hi: float, n: int, gen) -> torch.Tensor:
    """n draws of a 1-D density known up to a constant on [lo, hi]: inverse CDF of the
    piecewise-constant density on 200 001 cells (cell width (hi - lo) / 2e5), uniform
    within a cell."""
    edges = torch.linspace(lo, hi, 200_002, dtype=torch.float64)
    mids = 0.5 * (edges[1:] + edges[:-1])
    p = torch.softmax(log_density(mids), 0)
    cells = torch.multinomial(p, n, replacement=True, generator=gen)
    width = edges[1] - edges[0]
    return edges[cells] + width * torch.rand(n, generator=gen, dtype=torch.float64)


@dataclass
class Target:
    name: str
    loss: Callable
    prior: torch.distributions.Distribution
    exact: Callable[[int, int], torch.Tensor]


# --- bimodal: l symmetric in theta_1, the prior breaks the symmetry --------------------

BIMODAL_SIGMA, BIMODAL_SHIFT = 0.3, 0.25


def _bimodal_loss(theta, data=None):
    return (theta[:, 0] ** 2 - 1.0) ** 2 / (2 * BIMODAL_SIGMA**2)


def _bimodal_log_theta1(t):  # theta_1's posterior up to a constant
    return -((t**2 - 1.0) ** 2) / (2 * BIMODAL_SIGMA**2) + Normal(BIMODAL_SHIFT, 1.0).log_prob(t)


def bimodal_weight_of_positive_mode() -> float:
    """P(theta_1 > 0) under the posterior, by quadrature on the grid (exact to ~1e-6)."""
    t = torch.linspace(-4, 4, 400_001, dtype=torch.float64)
    p = torch.softmax(_bimodal_log_theta1(t), 0)
    return float(p[t > 0].sum())


def _bimodal_exact(n, seed):
    gen = torch.Generator().manual_seed(seed)
    t1 = _grid_sample(_bimodal_log_theta1, -4.0, 4.0, n, gen)
    t2 = torch.randn(n, generator=gen, dtype=torch.float64)  # l ignores theta_2: its prior
    return torch.stack([t1, t2], -1).float()


# --- banana: theta_2 near theta_1^2 ------------------------------------------------------

BANANA_S, BANANA_PRIOR = 0.5, 1.5


def _banana_loss(theta, data=None):
    return (theta[:, 1] - theta[:, 0] ** 2) ** 2 / (2 * BANANA_S**2)


def _banana_exact(n, seed):
    gen = torch.Generator().manual_seed(seed)
    v = BANANA_PRIOR**2

    def log_t1(t):  # integrate theta_2 out: N(t^2; 0, v + s^2) N(t; 0, v)
        return Normal(0.0, (v + BANANA_S**2) ** 0.5).log_prob(t**2) + Normal(0.0, v**0.5).log_prob(
            t
        )

    t1 = _grid_sample(log_t1, -8.0, 8.0, n, gen)
    precision = 1 / BANANA_S**2 + 1 / v  # theta_2 | theta_1: a Gaussian product
    mean = t1**2 / BANANA_S**2 / precision
    t2 = mean + precision**-0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    return torch.stack([t1, t2], -1).float()


# --- heavy-tailed: a Student t (3 dof) likelihood per coordinate, a wide prior -----------

HEAVY_DOF, HEAVY_PRIOR = 3.0, 10.0  # the dof must stay 3: chi-square by 3 normals


def _heavy_loss(theta, data=None):
    nu = HEAVY_DOF
    return ((nu + 1) / 2 * torch.log1p(theta**2 / nu)).sum(-1)


def _heavy_exact(n, seed):
    """Rejection: t draws accepted with probability exp(-theta^2 / (2 * 10^2)) per coordinate."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    while sum(len(o) for o in out) < n:
        z = torch.randn(4 * n, generator=gen, dtype=torch.float64)
        chi2 = (torch.randn(3, 4 * n, generator=gen, dtype=torch.float64) ** 2).sum(0)  # 3 dof
        t = z / (chi2 / HEAVY_DOF).sqrt()
        keep = torch.rand(4 * n, generator=gen, dtype=torch.float64) < torch.exp(
            -(t**2) / (2 * HEAVY_PRIOR**2)
        )
        out.append(t[keep])
    flat = torch.cat(out)[: 2 * n]
    return flat.reshape(n, 2).float()


def _batched(f):
    f.batched = True
    return f


TARGETS = {
    "bimodal": Target(
        "bimodal",
        _batched(_bimodal_loss),
        _independent_normal([BIMODAL_SHIFT, 0.0], [1.0, 1.0]),
        _bimodal_exact,
    ),
    "banana": Target(
        "banana",
        _batched(_banana_loss),
        _independent_normal([0.0, 0.0], [BANANA_PRIOR] * 2),
        _banana_exact,
    ),
    "heavy": Target(
        "heavy",
        _batched(_heavy_loss),
        _independent_normal([0.0, 0.0], [HEAVY_PRIOR] * 2),
        _heavy_exact,
    ),
}
