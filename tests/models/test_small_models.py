"""Random walk, Rama Cont and Normal: model-specific checks."""

import math

import pytest
import torch
from stats import Z_MAX, z_mean, z_two_sample

from gradcal.models import Model, Normal, RamaCont, RandomWalk


def test_random_walk_final_position_has_mean_t_times_2p_minus_1():
    p, n = 0.7, 50
    (x,) = RandomWalk(n).run_and_observe(torch.logit(torch.tensor([p])).expand(4000, -1))
    assert abs(z_mean(x[:, -1], n * (2 * p - 1))) < Z_MAX


def test_random_walk_log_likelihood_counts_steps():
    x = torch.tensor([0.0, 1.0, 2.0, 1.0, 2.0])
    logit = torch.tensor([0.3])
    p = torch.sigmoid(logit).item()
    expected = 3 * math.log(p) + math.log(1 - p)
    assert RandomWalk(4).log_likelihood(logit, x).item() == pytest.approx(expected, rel=1e-6)
    batched = RandomWalk(4).log_likelihood(torch.tensor([[0.3], [0.3]]), x)
    assert batched.shape == (2,)


def test_rama_cont_log10_parameters_are_the_same_model():
    theta = torch.tensor([1.0, 0.5, 1.0, 0.7])
    torch.manual_seed(4)
    (a,) = RamaCont(100, 20, 0.1, 5.0).run_and_observe(theta)
    torch.manual_seed(4)
    (b,) = RamaCont(100, 20, 0.1, 5.0, log10_params=True).run_and_observe(theta.log10())
    torch.testing.assert_close(a, b)


def test_rama_cont_returns_are_multiples_of_one_over_n_eta_starting_at_zero():
    n, eta = 100, 0.7
    (r,) = RamaCont(n, 50, 0.1, 5.0).run_and_observe(torch.tensor([1.0, 0.5, 1.0, eta]))
    assert r[0] == 0
    orders = r * n * eta
    torch.testing.assert_close(orders, orders.round(), atol=1e-4, rtol=0)
    assert (orders.abs() <= n).all()


def test_rama_cont_validates_its_configuration():
    with pytest.raises(ValueError, match="`s`"):
        RamaCont(10, 10, s=1.5, sigmoid_k=5.0)
    with pytest.raises(ValueError, match="`n_agents`"):
        RamaCont(0, 10, s=0.1, sigmoid_k=5.0)


def test_normal_moments_and_log_likelihood():
    mu, sigma = 1.5, 0.3
    (observed,) = Normal(10_000).run_and_observe(torch.tensor([mu, sigma]))
    assert observed.shape == (10_001, 1) and observed[0].item() == 0.0  # x_0 = 0 first
    x = observed[1:, 0]
    assert abs(z_mean(x, mu)) < Z_MAX
    # Var of a sample variance of normal data: 2 sigma^4 / (n - 1).
    assert abs(x.var() - sigma**2) < Z_MAX * (2 * sigma**4 / (x.numel() - 1)) ** 0.5
    expected = torch.distributions.Normal(mu, sigma).log_prob(x).sum()
    torch.testing.assert_close(
        Normal(10_000).log_likelihood(torch.tensor([mu, sigma]), observed), expected
    )


def test_normal_with_non_positive_scale_gives_nan():
    (x,) = Normal(5).run_and_observe(torch.tensor([[0.0, -1.0], [0.0, 1.0]]))
    assert torch.isnan(x[0, 1:]).all() and torch.isfinite(x[1]).all()


class SingleDrawRamaCont(Model):
    """Rama Cont for one draw, agent by agent, written the BlackBIRDS way (time on axis 0)."""

    def __init__(self, n_agents, n_timesteps, s, sigmoid_k):
        super().__init__()
        self.n_agents, self.n_timesteps, self.s, self.k = n_agents, n_timesteps, s, sigmoid_k

    def _orders(self, eps, nu):
        soft = torch.sigmoid(self.k * (eps - nu)) - torch.sigmoid(self.k * (-nu - eps))
        hard = (eps > nu).to(nu.dtype) - (eps < -nu).to(nu.dtype)
        return hard + soft - soft.detach()

    def initialize(self, params):
        theta = 10**params
        nu = torch.distributions.LogNormal(theta[0], theta[1]).rsample((self.n_agents,))
        r = self._orders(torch.zeros(self.n_agents), nu).sum() / (self.n_agents * theta[3])
        return torch.cat((nu, r.reshape(1))).reshape(1, -1)

    def step(self, params, x):
        theta = 10**params
        eps = torch.distributions.Normal(0, theta[2]).rsample()
        nu = x[-1, :-1]
        r = self._orders(eps, nu).sum() / (self.n_agents * theta[3])
        probs = torch.stack((torch.full_like(nu, self.s), torch.full_like(nu, 1 - self.s)), -1)
        q = torch.nn.functional.gumbel_softmax(probs.log(), tau=0.1, hard=True)[:, 0]
        nu = r.abs() * q + (1 - q) * nu
        return torch.cat((nu, r.reshape(1))).reshape(1, -1)

    def observe(self, x):
        return [x[:, -1]]

    def trim_time_series(self, x):
        return x[-1:]


def test_rama_cont_matches_an_independent_single_draw_implementation():
    theta = torch.tensor([0.0, math.log10(0.5), 0.0, math.log10(0.7)])
    n = 200
    ours = RamaCont(100, 30, 0.1, 5.0, log10_params=True).run_and_observe(theta.expand(n, -1))[0]
    tutorial = SingleDrawRamaCont(100, 30, 0.1, 5.0)
    theirs = torch.stack([tutorial.run_and_observe(theta)[0] for _ in range(n)])
    for stat in (
        lambda r: r.abs().mean(-1),
        lambda r: (r**2).mean(-1),
        lambda r: (r[:, 1:] * r[:, :-1]).mean(-1),
    ):
        assert abs(z_two_sample(stat(ours), stat(theirs))) < Z_MAX


def test_rama_cont_summed_orders_equal_per_agent_straight_through_orders():
    model = RamaCont(500, 1, 0.1, 3.0)
    nu = torch.rand(4, 500, dtype=torch.float64).requires_grad_()
    eps = torch.randn(4, 1, dtype=torch.float64).requires_grad_()
    eta = torch.full((4, 1), 0.7, dtype=torch.float64)
    reference = SingleDrawRamaCont(500, 1, 0.1, 3.0)._orders(eps, nu).sum(-1, keepdim=True)
    reference = reference / (500 * eta)
    ours = model._returns(eps, nu, eta)
    torch.testing.assert_close(ours, reference)
    g_ours = torch.autograd.grad(ours.sum(), (nu, eps))
    g_ref = torch.autograd.grad(reference.sum(), (nu, eps))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b)
