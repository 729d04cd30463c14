"""Reference posteriors: importance sampling and rejection ABC on conjugate Normal means."""

import math
import warnings

import pytest
import torch
from infer_helpers import gaussian_nll, normal_prior
from stats import Z_MAX

from gradcal.infer.reference import importance_sampling, rejection_abc
from gradcal.models import Normal

N_OBS = 10


def _conjugate(y, w=1.0):
    """Posterior mean and sd of theta: prior N(0, 1), y_i ~ N(theta, 1), likelihood^(1/w)."""
    precision = 1.0 + y.numel() / w
    return float(y.sum()) / w / precision, precision**-0.5


def _weighted_mean(s):
    return float((s.weights * s.theta[:, 0]).sum())


# --- importance sampling --------------------------------------------------------------


def test_importance_sampling_posterior_mean_within_monte_carlo_error():
    y = 0.8 + torch.randn(N_OBS)
    mean, sd = _conjugate(y)
    s = importance_sampling(gaussian_nll(1.0), normal_prior(0.0, 1.0), y, 100_000)
    # Monte Carlo error of a self-normalised importance estimate: sd / sqrt(ESS).
    assert abs(_weighted_mean(s) - mean) < Z_MAX * sd / s.ess**0.5
    weighted_sd = float((s.weights * (s.theta[:, 0] - _weighted_mean(s)) ** 2).sum()) ** 0.5
    # sd of a normal from n draws has standard error sd / sqrt(2 n); n = ESS here.
    assert abs(weighted_sd - sd) < Z_MAX * sd / (2 * s.ess) ** 0.5
    # Resampling gives draws of the same law (multinomial: tolerance from ESS and m draws).
    draws = s.resample(20_000)[:, 0]
    assert abs(float(draws.mean()) - mean) < Z_MAX * sd * (1 / s.ess + 1 / 20_000) ** 0.5


def test_importance_sampling_weight_divides_the_loss():
    y = 0.8 + torch.randn(N_OBS)
    mean, sd = _conjugate(y, w=3.0)  # exp(-l / 3): a likelihood with 3 times the variance
    s = importance_sampling(gaussian_nll(1.0), normal_prior(0.0, 1.0), y, 100_000, w=3.0)
    assert abs(_weighted_mean(s) - mean) < Z_MAX * sd / s.ess**0.5


def test_importance_sampling_with_a_proposal_gives_the_same_answer():
    y = 0.8 + torch.randn(N_OBS)
    mean, sd = _conjugate(y)
    loss, prior = gaussian_nll(1.0), normal_prior(0.0, 1.0)
    from_prior = importance_sampling(loss, prior, y, 100_000)
    proposal = normal_prior(float(y.mean()), 0.6)  # wider than the posterior (sd 0.30)
    from_proposal = importance_sampling(loss, prior, y, 20_000, proposal=proposal)
    # A proposal close to the posterior keeps most of its draws effective.
    assert from_proposal.ess > 0.5 * 20_000
    se_prior, se_proposal = sd / from_prior.ess**0.5, sd / from_proposal.ess**0.5
    assert abs(_weighted_mean(from_proposal) - mean) < Z_MAX * se_proposal
    # Same target from two independent estimates: their difference within both errors.
    difference = _weighted_mean(from_proposal) - _weighted_mean(from_prior)
    assert abs(difference) < Z_MAX * math.hypot(se_prior, se_proposal)


def test_importance_sampling_warns_on_low_ess_only():
    y = 0.8 + torch.randn(200)  # posterior sd 0.07 against a prior sd of 1
    loss, prior = gaussian_nll(1.0), normal_prior(0.0, 1.0)
    with pytest.warns(UserWarning, match="effective sample size"):
        s = importance_sampling(loss, prior, y, 200)
    assert s.ess < 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importance_sampling(loss, prior, y[:N_OBS], 20_000)


def test_importance_sampling_gives_failed_draws_no_weight():
    def loss(theta, y):  # the simulator "fails" for theta > 1
        out = gaussian_nll(1.0)(theta, y)
        return torch.where(theta[:, 0] > 1.0, torch.nan, out)

    loss.batched = True
    s = importance_sampling(loss, normal_prior(0.0, 1.0), torch.zeros(N_OBS), 5_000)
    failed = s.theta[:, 0] > 1.0
    assert failed.any() and (s.weights[failed] == 0).all()
    assert torch.isclose(s.weights.sum(), torch.tensor(1.0))


# --- rejection ABC --------------------------------------------------------------------


def _mean_distance(n):
    """|mean(x) - mean(y)| for x simulated by gradcal's Normal model at (theta, 1)."""
    model = Normal(n)

    def loss(theta, y):
        (x,) = model.run_and_observe(torch.cat([theta, torch.ones_like(theta)], -1))
        return (x[..., 1:, 0].mean(-1) - y.mean()).abs()  # the draws after x_0 = 0

    loss.batched = True
    return loss


def _abc_target_moments(y, epsilon):
    """Mean and sd of prior(theta) P(|xbar - ybar| <= epsilon | theta), by quadrature."""
    theta = torch.linspace(-6.0, 6.0, 200_001, dtype=torch.float64)
    root_n, ybar = y.numel() ** 0.5, float(y.mean())
    normal = torch.distributions.Normal(0.0, 1.0)
    window = normal.cdf((ybar + epsilon - theta) * root_n) - normal.cdf(
        (ybar - epsilon - theta) * root_n
    )
    density = normal.log_prob(theta).exp() * window
    density = density / density.sum()
    mean = float((density * theta).sum())
    return mean, float((density * (theta - mean) ** 2).sum()) ** 0.5


def test_rejection_abc_approaches_the_conjugate_posterior():
    y = 0.8 + torch.randn(N_OBS)
    mean, sd = _conjugate(y)  # mean(y) is sufficient: ABC on it targets this as eps -> 0
    result = rejection_abc(
        _mean_distance(N_OBS), normal_prior(0.0, 1.0), y, 4_000_000, 0.005, batch_size=400_000
    )
    m = result.theta.shape[0]
    assert 20_000 <= m < 20_050  # 0.5 % of the draws, more only on tied float32 losses
    draws = result.theta[:, 0]
    se_mean, se_sd = sd / m**0.5, sd / (2 * m) ** 0.5  # sd / sqrt(2 m): sd of a normal
    # The finite threshold (about 0.01, against a posterior sd of 0.30) moves the exact
    # ABC target (by quadrature) by a small fraction of the Monte Carlo error (at most a
    # tenth over 40 seeds); the tolerance is the Monte Carlo error plus that computed bias.
    abc_mean, abc_sd = _abc_target_moments(y, result.threshold)
    bias_mean, bias_sd = abs(abc_mean - mean), abs(abc_sd - sd)
    assert bias_mean < 0.25 * se_mean and bias_sd < 0.25 * se_sd
    assert abs(float(draws.mean()) - mean) < Z_MAX * se_mean + bias_mean
    assert abs(float(draws.std()) - sd) < Z_MAX * se_sd + bias_sd


def test_rejection_abc_keeps_the_lowest_losses():
    def loss(theta, y):
        out = (theta[:, 0] - y).abs()
        return torch.where(theta[:, 0] > 2.0, torch.nan, out)  # failed simulations

    loss.batched = True
    result = rejection_abc(loss, normal_prior(0.0, 1.0), torch.tensor(0.3), 10_001, 0.05, 999)
    k = math.ceil(0.05 * 10_001)
    failed = torch.isnan(result.losses)
    assert failed.any() and not result.accepted[failed].any()
    assert int(result.accepted.sum()) == result.theta.shape[0] == k
    assert result.threshold == float(torch.sort(result.losses[~failed]).values[k - 1])
    assert (result.losses[result.accepted] <= result.threshold).all()
    assert (result.losses[~result.accepted & ~failed] > result.threshold).all()
    assert result.acceptance_rate == pytest.approx(k / 10_001)
    # The accepted draws are exactly those with these losses.
    torch.testing.assert_close((result.theta[:, 0] - 0.3).abs(), result.losses[result.accepted])


def test_rejection_abc_single_draw_loss_quantile_one_and_failures():
    def loss(theta, y):  # one draw (D,) -> scalar, vmapped; NaN for theta > 0
        out = (theta[0] - y).abs()
        return torch.where(theta[0] > 0.0, torch.nan, out)

    prior = normal_prior(0.0, 1.0)
    with pytest.warns(UserWarning, match="finite loss"):
        result = rejection_abc(loss, prior, torch.tensor(0.0), 2_000, quantile=1.0)
    # Everything finite is accepted; the threshold is the largest finite loss.
    assert result.accepted.equal(torch.isfinite(result.losses))
    assert (result.theta <= 0).all()
    assert result.threshold == float(result.losses[result.accepted].max())


def test_rejection_abc_seed():
    loss, prior, y = _mean_distance(N_OBS), normal_prior(0.0, 1.0), torch.zeros(N_OBS)
    state = torch.get_rng_state()
    a = rejection_abc(loss, prior, y, 5_000, 0.1, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = rejection_abc(loss, prior, y, 5_000, 0.1, seed=3)
    assert torch.equal(a.theta, b.theta) and a.threshold == b.threshold


@pytest.mark.parametrize("quantile", [0.0, -0.1, 1.5, float("nan"), True])
def test_rejection_abc_rejects_quantiles_outside_0_1(quantile):
    with pytest.raises(ValueError, match="quantile"):
        rejection_abc(_mean_distance(3), normal_prior(0.0, 1.0), torch.zeros(3), 100, quantile)


def test_rejection_abc_bad_arguments():
    loss, prior, y = _mean_distance(3), normal_prior(0.0, 1.0), torch.zeros(3)
    with pytest.raises(ValueError, match="n_samples"):
        rejection_abc(loss, prior, y, 0)
    with pytest.raises(ValueError, match="batch_size"):
        rejection_abc(loss, prior, y, 100, batch_size=0)
    with pytest.raises(TypeError, match="prior"):
        rejection_abc(loss, "prior", y, 100)
    with pytest.raises(ValueError, match="batching"):
        rejection_abc(loss, prior, y, 100, batching="threads")
