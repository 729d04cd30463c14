"""KL(q || prior): closed forms against Monte Carlo, and the constrained space."""

import math

import pytest
import torch
from edge_family import EdgeFamily, edge_noise
from stats import Z_MAX, z_mean
from torch.distributions import Independent, MultivariateNormal, Normal, Uniform

from gradcal.gradients import BatchedLoss, PathwiseReverse
from gradcal.posterior_estimators import Constrained, DiagonalGaussian, FullRankGaussian
from gradcal.regularisation import (
    compute_regularisation_loss,
    kl_divergence,
    kl_from_draws,
    log_q_on_kept,
    prior_log_prob,
)


@pytest.mark.parametrize(
    "family,prior",
    [
        (
            DiagonalGaussian(torch.tensor([0.3, -0.5]), torch.tensor([0.5, 2.0])),
            Independent(Normal(torch.zeros(2), torch.ones(2)), 1),
        ),
        (
            FullRankGaussian(torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 0.0], [0.8, 0.6]])),
            MultivariateNormal(torch.zeros(2), torch.eye(2) * 2.0),
        ),
    ],
)
def test_closed_form_kl_matches_monte_carlo(family, prior):
    analytic = kl_divergence(family, prior, "analytic")
    with torch.no_grad():
        theta, log_q = family.sample(200_000)
        terms = log_q - prior_log_prob(prior, theta)
    assert abs(z_mean(terms, analytic.item())) < Z_MAX
    mc = kl_divergence(family, prior, "monte_carlo", n_samples=1000)
    assert mc.requires_grad


def test_auto_falls_back_to_monte_carlo_and_analytic_refuses():
    prior = Independent(Uniform(torch.zeros(2), torch.ones(2)), 1)
    family = Constrained(DiagonalGaussian(torch.zeros(2)), prior)
    kl = kl_divergence(family, prior)
    assert torch.isfinite(kl) and kl > 0
    with pytest.raises(ValueError, match="monte_carlo"):
        kl_divergence(family, prior, "analytic")
    with pytest.raises(ValueError, match="method"):
        kl_divergence(family, prior, "exact")


def test_kl_is_invariant_under_the_bijection():
    # q_u = N(0, 1) pushed through exp is LogNormal(0, 1); against a LogNormal(1, 2) prior
    # the KL equals KL(N(0, 1) || N(1, 2)) in the unconstrained space.
    family = Constrained(
        DiagonalGaussian(torch.zeros(1)), torch.distributions.constraints.positive
    )
    prior = torch.distributions.LogNormal(torch.ones(1), 2 * torch.ones(1))
    expected = torch.distributions.kl_divergence(Normal(0.0, 1.0), Normal(1.0, 2.0))
    with torch.no_grad():
        theta, log_q = family.sample(200_000)
        terms = log_q - prior_log_prob(prior, theta)
    assert abs(z_mean(terms, expected.item())) < Z_MAX


def test_prior_log_prob_outside_the_support_is_minus_infinity():
    prior = Independent(Uniform(torch.zeros(2), torch.ones(2)), 1)
    lp = prior_log_prob(prior, torch.tensor([[0.5, 0.5], [2.0, 0.5]]))
    assert lp[0] == 0 and lp[1] == -torch.inf
    per_coordinate = Normal(torch.zeros(3), torch.ones(3))  # batch (3,), no event shape
    assert prior_log_prob(per_coordinate, torch.zeros(4, 3)).shape == (4,)


def test_blackbirds_regularisation_name():
    family = DiagonalGaussian(torch.ones(2))
    prior = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    value = compute_regularisation_loss(family, prior, 100_000)
    assert value.item() == pytest.approx(1.0, abs=0.05)


def test_prior_log_prob_is_minus_infinity_outside_any_support_even_when_validating():
    from torch.distributions import Gamma, LogNormal

    torch.distributions.Distribution.set_default_validate_args(True)
    try:
        box = Independent(Uniform(torch.zeros(2), torch.ones(2)), 1)
        assert prior_log_prob(box, torch.tensor([[2.0, 0.5]]))[0] == -torch.inf
        for prior in (
            Gamma(torch.ones(1), torch.ones(1)),
            LogNormal(torch.zeros(1), torch.ones(1)),
        ):
            assert prior_log_prob(prior, torch.tensor([[-1.0]]))[0] == -torch.inf
    finally:
        torch.distributions.Distribution.set_default_validate_args(False)


def test_kl_checks_dimensions():
    with pytest.raises(ValueError, match="prior is over 3"):
        kl_divergence(
            DiagonalGaussian(torch.zeros(2)), Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
        )


@pytest.mark.parametrize("sticking_the_landing", [False, True])
def test_monte_carlo_kl_with_a_draw_of_infinite_log_q_has_a_finite_gradient(
    sticking_the_landing,
):
    """EdgeFamily's first draw lies on the edge of its support (log q = -inf, an infinite
    derivative): the Monte Carlo KL drops it, and its gradient is finite and the one of the
    mean of log q - log prior over the 49 kept draws alone (with sticking-the-landing, log q
    at fixed parameters)."""
    u = edge_noise(50)
    q = EdgeFamily(u)
    prior = Independent(Normal(torch.zeros(1), 10 * torch.ones(1)), 1)
    kl, dropped = kl_from_draws(q, prior, *q.sample(50), sticking_the_landing)
    kl.backward()
    got = q.grads()
    assert dropped == 1
    assert torch.isfinite(got).all(), got
    theta = q.draw(u[1:])
    if sticking_the_landing:
        log_q = EdgeFamily.density(theta, q.loc.detach(), q.scale.detach())
    else:
        log_q = q.log_prob(theta)
    expected = (log_q - prior.log_prob(theta)).mean()
    expected.backward()
    assert kl.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(got, q.grads(), rtol=1e-5, atol=1e-6)


def test_log_q_on_kept_drops_a_kept_draw_whose_log_prob_is_not_finite():
    """Draw 1, dropped by the caller, has log q = -inf from sampling, so log q is evaluated
    again on the kept draws; there log_prob is -inf on the kept edge draw 0 (finite from
    sampling): that draw is dropped too (the mask narrowed), and the gradient is the one of
    log q on the draws kept in the end (2 and 3)."""
    u = edge_noise(4)
    q = EdgeFamily(u)
    theta = q.draw(u)
    sampled = torch.tensor([0.0, -math.inf, 0.0, 0.0]) + q.loc  # log q with a graph
    log_q, keep = log_q_on_kept(q, theta, sampled, torch.tensor([True, False, True, True]))
    assert keep.tolist() == [False, False, True, True]
    log_q.sum().backward()
    got = q.grads()
    assert torch.isfinite(got).all(), got
    q.log_prob(q.draw(u[2:])).sum().backward()
    torch.testing.assert_close(got, q.grads())


def test_log_q_on_kept_keeps_the_sampled_values_when_the_dropped_draws_are_finite():
    """Every dropped draw's log q finite: sampling's own log q of the kept draws is returned
    (no log_prob, which for a wide Constrained family in float32 misses it by up to 3.8
    nats on 1.4 % of draws, measured over 10 000 draws of sd 6 mapped onto (0, 1))."""
    u = edge_noise(4)
    q = EdgeFamily(u)
    sampled = torch.tensor([0.5, 1.0, 2.0, 3.0])
    keep = torch.tensor([True, False, True, True])
    log_q, kept = log_q_on_kept(q, q.draw(u), sampled, keep)
    assert kept.tolist() == keep.tolist() and log_q.tolist() == [0.5, 2.0, 3.0]


def test_a_loss_draw_on_the_edge_leaves_the_kl_draws_gradient_finite():
    """VI's loss draws and Monte Carlo KL draws come from one call of ``sample`` (split
    afterwards). EdgeFamily's first draw, a loss draw, lies on the edge of the support
    (log q = -inf, an infinite derivative); the KL draws are all inside. The KL's gradient
    must be finite and the one of the mean of log q - log prior over the KL draws alone."""
    u = edge_noise(40)
    q = EdgeFamily(u)
    prior = Independent(Normal(torch.zeros(1), 10 * torch.ones(1)), 1)
    epoch = PathwiseReverse().surrogate(q, BatchedLoss(lambda t, d: t.sum()), None, 10, 30)
    kl, dropped = kl_from_draws(q, prior, *epoch.extra)
    kl.backward()
    got = q.grads()
    assert dropped == 0
    assert torch.isfinite(got).all(), got
    theta = q.draw(u[10:])
    expected = (q.log_prob(theta) - prior.log_prob(theta)).mean()
    expected.backward()
    torch.testing.assert_close(got, q.grads(), rtol=1e-5, atol=1e-6)
