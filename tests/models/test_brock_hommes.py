"""Brock-Hommes: the exact likelihood against a direct evaluation and the reference data."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from stats import Z_MAX, z_mean

from gradcal.models import BrockHommesBeliefs

DATA = Path(__file__).parents[1] / "data" / "brock_hommes_wavy"


def _direct_log_likelihood(theta, x, beta=120.0, sigma=0.04, r=0.01):
    """Term by term, in float64 numpy, exactly as the reference README writes the model."""
    g = np.array([0.0, theta[0], theta[2], 1.01])
    b = np.array([0.0, theta[1], theta[3], 0.0])
    big_r = 1 + r
    full = np.concatenate([np.zeros(3), x])
    total = 0.0
    for t in range(3, len(full)):
        u = (full[t - 1] - big_r * full[t - 2]) * (g * full[t - 3] + b - big_r * full[t - 2])
        w = np.exp(beta * u - np.max(beta * u))
        n = w / w.sum()
        mean = (n * (g * full[t - 1] + b)).sum() / big_r
        scale = sigma / big_r
        total += -0.5 * ((full[t] - mean) / scale) ** 2 - math.log(scale * math.sqrt(2 * math.pi))
    return total


@pytest.fixture(scope="module")
def obs():
    return torch.tensor(np.loadtxt(DATA / "obs.txt"), dtype=torch.float64)


@pytest.fixture(scope="module")
def reference():
    return torch.tensor(np.loadtxt(DATA / "posterior_samples.txt"), dtype=torch.float64)


def test_log_likelihood_matches_direct_evaluation(obs):
    model = BrockHommesBeliefs.wavy()
    thetas = torch.tensor(
        [[0.9, 0.2, 0.9, -0.2], [0.5, 0.7, 0.1, -0.9], [0.95, 0.19, 0.9, -0.2]],
        dtype=torch.float64,
    )
    batched = model.log_likelihood(thetas, obs)
    for theta, ll in zip(thetas, batched, strict=True):
        expected = _direct_log_likelihood(theta.numpy(), obs.numpy())
        assert ll.item() == pytest.approx(expected, rel=1e-10)
        assert model.log_likelihood(theta, obs).item() == pytest.approx(expected, rel=1e-10)


def test_likelihood_peaks_near_the_reference_posterior(obs, reference):
    model = BrockHommesBeliefs.wavy()
    theta = model.true_params.double().clone().requires_grad_()
    optimizer = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = -model.log_likelihood(theta, obs)
        loss.backward()
        return loss

    optimizer.step(closure)
    mean, std = reference.mean(0), reference.std(0)
    # Under a flat prior the posterior mode is the likelihood peak; with 97 observations it
    # lies well within three posterior standard deviations of the posterior mean.
    assert ((theta.detach() - mean).abs() < 3 * std).all(), (theta, mean, std)


def test_simulations_are_consistent_with_the_likelihood():
    model = BrockHommesBeliefs.wavy()
    theta = model.true_params.double()
    (x,) = model.run_and_observe(theta.expand(400, -1))
    ll = model.log_likelihood(theta.expand(400, -1), x)
    # E[log N(x_t; mean_t, s^2)] = -1/2 - log(s) - log(2 pi)/2 per step if the simulator
    # draws from the density the likelihood evaluates.
    scale = 0.04 / 1.01
    expected = x.shape[-1] * (-0.5 - math.log(scale) - 0.5 * math.log(2 * math.pi))
    assert abs(z_mean(ll, expected)) < Z_MAX


def test_output_is_the_observed_stretch():
    model = BrockHommesBeliefs.wavy()
    torch.manual_seed(3)
    (x,) = model.run_and_observe(model.true_params)
    assert x.shape == (97,)
    torch.manual_seed(3)
    history = model.run(model.true_params)
    assert history.shape == (100,) and (history[:3] == 0).all()
    torch.testing.assert_close(history[3:], x)


def test_free_and_fixed_coefficients_are_configurable():
    model = BrockHommesBeliefs(n_timesteps=10, g=(0.0, None), b=(0.0, 0.1), beta=5.0)
    assert model.n_params == 1
    g, b = model.coefficients(torch.tensor([[0.7]]))
    assert g.flatten().tolist() == pytest.approx([0.0, 0.7])
    assert b.flatten().tolist() == pytest.approx([0.0, 0.1])
    assert model.run_and_observe(torch.tensor([0.7]))[0].shape == (10,)
    # "free" (what a TOML file can write) is None; the parameters keep g before b per type
    text = BrockHommesBeliefs(n_timesteps=10, g=(0.0, "free"), b=(0.0, "free"), beta=5.0)
    g, b = text.coefficients(torch.tensor([[0.7, -0.2]]))
    assert g.flatten().tolist() == pytest.approx([0.0, 0.7])
    assert b.flatten().tolist() == pytest.approx([0.0, -0.2])


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="same length"):
        BrockHommesBeliefs(g=(0.0, None), b=(0.0,))
    with pytest.raises(ValueError, match="sigma"):
        BrockHommesBeliefs(sigma=0.0)
    with pytest.raises(ValueError, match="`b` entries must be numbers, None or 'free'"):
        BrockHommesBeliefs(g=(0.0, None), b=(0.0, "fre"))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        BrockHommesBeliefs.wavy().log_likelihood(torch.zeros(3), torch.zeros(97))


def test_module_moves_with_dtype():
    model = BrockHommesBeliefs.wavy().float()
    assert model.fixed.dtype == torch.float32
    assert model.run_and_observe(model.true_params.double())[0].dtype == torch.float64
