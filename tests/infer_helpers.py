"""Small shared pieces of the inference tests."""

import math

import numpy as np
import torch
from scipy.optimize import root


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


def loss_on_grid(loss, data, grid, n_sims: int, n_groups: int):
    """Per-group mean loss and mean pathwise gradient at each point of a 1-D grid.

    ``n_sims`` simulations per point (one per draw, as VI makes them), cut into ``n_groups``
    independent groups: returns two float64 tensors (n_groups, len(grid)), the group means of
    l(theta, y) and of dl/dtheta (the simulator's own, e.g. straight-through, gradient).
    """
    per_group = n_sims // n_groups
    values, grads = [], []
    for point in grid:
        theta = point.reshape(1, 1).repeat(n_sims, 1).requires_grad_()
        losses = loss(theta, data)
        (grad,) = torch.autograd.grad(losses.sum(), theta)
        values.append(losses.detach().double().reshape(n_groups, per_group).mean(1))
        grads.append(grad[:, 0].double().reshape(n_groups, per_group).mean(1))
    return torch.stack(values, 1), torch.stack(grads, 1)


def stationary_gaussian(grid, values, grads, prior_loc, prior_scale, w, kind, start):
    """(mu, sigma) of the 1-D Gaussian q at which VI's expected gradient vanishes.

    The objective is F(q) = E_q[L(theta)] + w KL(q || N(prior_loc, prior_scale^2)), with
    E_q a quadrature over the grid (weights N(grid; mu, sigma), normalised; the grid spans
    many sigma at a spacing well under sigma). ``kind="score"``: the stationary point of F
    itself, from the grid's mean loss ``values`` (the score estimator is unbiased for F);
    ``kind="pathwise"``: where E_q[g(mu + sigma eps) (1, eps)] + w grad KL = 0 with ``grads``
    the simulator's mean gradient, the fixed point of pathwise VI (which differs from F's
    optimum by the bias of a straight-through gradient).
    """
    grid, values, grads = grid.double(), values.double(), grads.double()

    def equations(p):
        mu, sigma = float(p[0]), math.exp(float(p[1]))
        pdf = torch.exp(-0.5 * ((grid - mu) / sigma) ** 2)
        pdf = pdf / pdf.sum()
        eps = (grid - mu) / sigma
        kl_mu = (mu - prior_loc) / prior_scale**2
        kl_sigma = sigma / prior_scale**2 - 1 / sigma
        if kind == "score":  # dF/dmu, dF/dsigma by differentiating the normalised weights
            centred = values - (pdf * values).sum()
            d_mu = (pdf * centred * eps).sum() / sigma
            d_sigma = (pdf * centred * eps**2).sum() / sigma
        else:
            d_mu = (pdf * grads).sum()
            d_sigma = (pdf * grads * eps).sum()
        return np.array([float(d_mu) + w * kl_mu, (float(d_sigma) + w * kl_sigma) * sigma])

    solution = root(equations, [start[0], math.log(start[1])], method="hybr", tol=1e-12)
    if not solution.success:
        raise RuntimeError(f"stationary_gaussian did not converge: {solution.message}")
    return float(solution.x[0]), math.exp(float(solution.x[1]))


def jackknife(estimate, values, grads):
    """Estimate from all groups and its jackknife standard errors over the groups (axis 0)."""
    full = torch.tensor(estimate(values.mean(0), grads.mean(0)), dtype=torch.float64)
    g = values.shape[0]
    leave_out = torch.tensor(
        [
            estimate(
                torch.cat([values[:i], values[i + 1 :]]).mean(0),
                torch.cat([grads[:i], grads[i + 1 :]]).mean(0),
            )
            for i in range(g)
        ],
        dtype=torch.float64,
    )
    se = ((g - 1) / g * ((leave_out - leave_out.mean(0)) ** 2).sum(0)).sqrt()
    return full, se
