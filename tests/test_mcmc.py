"""Gradient MCMC: exact targets, batched chains, adaptation, R-hat and ESS."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from infer_helpers import gaussian_nll, mmd_to_reference, normal_prior
from stats import Z_MAX

from gradcal import VI
from gradcal.infer.mcmc import HMC, MALA, MCMC, effective_sample_size, split_rhat
from gradcal.losses import NegativeLogLikelihood
from gradcal.models import BrockHommesBeliefs
from gradcal.posterior_estimators import DiagonalGaussian

DATA = Path(__file__).parent / "data" / "brock_hommes_wavy"


def _check_moments(draws, ess, mean, sd):
    """Sample mean within Z_MAX Monte Carlo standard errors (sd / sqrt(ESS)) of the truth;
    sample sd within Z_MAX standard errors of a variance estimate, sd^2 sqrt(2 / ESS)."""
    for k in range(draws.shape[-1]):
        assert abs(draws[:, k].mean() - mean[k]) < Z_MAX * sd[k] / math.sqrt(ess[k])
        assert abs(draws[:, k].var() - sd[k] ** 2) < Z_MAX * sd[k] ** 2 * math.sqrt(2 / ess[k])


@pytest.mark.parametrize("kernel_cls", [MALA, HMC])
@pytest.mark.parametrize("w", [1.0, 2.0])
def test_normal_normal_conjugate_generalised_posterior(kernel_cls, w):
    y = torch.randn(20, dtype=torch.float64) + 1.0
    prior = torch.distributions.Independent(
        torch.distributions.Normal(
            torch.zeros(1, dtype=torch.float64), 2 * torch.ones(1, dtype=torch.float64)
        ),
        1,
    )
    # exp(-NLL / w) is the likelihood to the power 1/w: precision 1/4 + 20/w
    precision = 0.25 + 20.0 / w
    mean, sd = (y.sum() / w) / precision, precision**-0.5
    kernel = kernel_cls(prior, gaussian_nll(1.0), w=w)
    mcmc = MCMC(kernel, num_samples=1500, progress_bar=False)
    mcmc.run(torch.zeros(8, 1, dtype=torch.float64), y, warmup=300, seed=1)
    draws = mcmc.samples.reshape(-1, 1)
    assert (mcmc.rhat() < 1.05).all()
    _check_moments(draws, mcmc.ess(), [mean.item()], [sd])


def test_the_mcmc_target_is_the_vi_optimum():
    y = torch.randn(15) + 0.5
    w = 3.0
    prior = normal_prior(0.0, 1.0)
    q = DiagonalGaussian(torch.zeros(1))
    optimizer = torch.optim.Adam(q.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 500)
    VI(
        gaussian_nll(1.0),
        prior,
        q,
        w=w,
        n_samples_per_epoch=50,
        optimizer=optimizer,
        scheduler=scheduler,
        progress_bar=False,
        seed=0,
    ).run(y, 500, 500)
    mcmc = MCMC(MALA(prior, gaussian_nll(1.0), w=w), num_samples=2000, progress_bar=False)
    mcmc.run(torch.zeros(8, 1), y, warmup=300, seed=0)
    draws = mcmc.samples.reshape(-1)
    ess = mcmc.ess()[0].item()
    # Both target prior x likelihood^(1/w), Gaussian here, so the VI optimum is exact.
    assert abs(draws.mean() - q.loc.item()) < Z_MAX * q.scale.item() / math.sqrt(ess) + 0.02
    assert abs(draws.std() / q.scale.item() - 1) < 0.1


@pytest.mark.parametrize("kernel_cls", [MALA, HMC])
def test_correlated_gaussian(kernel_cls):
    cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    precision = torch.linalg.inv(cov)

    def loss(theta, y):
        return 0.5 * ((theta @ precision) * theta).sum(-1)

    loss.batched = True
    prior = torch.distributions.Independent(
        torch.distributions.Normal(
            torch.zeros(2, dtype=torch.float64), 1e3 * torch.ones(2, dtype=torch.float64)
        ),
        1,
    )
    mcmc = MCMC(kernel_cls(prior, loss), num_samples=2000, progress_bar=False)
    mcmc.run(
        torch.zeros(8, 2, dtype=torch.float64), None, warmup=500, adapt_covariance="dense", seed=2
    )
    draws = mcmc.samples.reshape(-1, 2)
    ess = mcmc.ess()
    _check_moments(draws, ess, [0.0, 0.0], [1.0, 1.0])
    correlation = torch.corrcoef(draws.T)[0, 1]
    # s.e. of a correlation: (1 - r^2) / sqrt(n) with n the smaller ESS
    assert abs(correlation - 0.9) < Z_MAX * (1 - 0.81) / math.sqrt(ess.min()) + 0.01
    assert mcmc.covariance.shape == (2, 2)  # the dense preconditioner was estimated


def test_brock_hommes_wavy_matches_the_reference_posterior():
    obs = torch.tensor(np.loadtxt(DATA / "obs.txt"))
    reference = torch.tensor(np.loadtxt(DATA / "posterior_samples.txt"))
    low = torch.tensor([0.0, 0, 0, -1], dtype=torch.float64)
    prior = torch.distributions.Independent(torch.distributions.Uniform(low, low + 1), 1)
    kernel = MALA(prior, NegativeLogLikelihood(BrockHommesBeliefs.wavy()))
    mcmc = MCMC(kernel, num_samples=1500, progress_bar=False)
    start = torch.tensor([0.9, 0.2, 0.9, -0.2], dtype=torch.float64).expand(16, -1)
    mcmc.run(start, obs, warmup=1000, seed=0)
    assert (mcmc.rhat() < 1.05).all()
    draws = mcmc.samples.reshape(-1, 4)
    draws = draws[torch.randperm(draws.shape[0])[:1000]]
    distance, floor = mmd_to_reference(draws, reference)
    print(f"MALA on Brock-Hommes wavy: MMD {distance:.2e}, split-half floor {floor:.2e}")
    assert distance < 3 * floor


def test_nan_loss_at_a_proposal_is_rejected():
    def loss(theta, y):
        value = 0.5 * (theta**2).sum(-1)
        return torch.where(theta[:, 0] > 0.5, torch.nan, value)

    loss.batched = True
    mcmc = MCMC(MALA(normal_prior(0.0, 10.0), loss), num_samples=500, progress_bar=False)
    mcmc.run(torch.zeros(4, 1), None, scale=0.5, seed=0)
    assert (mcmc.samples <= 0.5).all()
    assert (mcmc.acceptance_rate > 0).all()


def test_blackbirds_runner_signature_and_single_chain():
    prior = normal_prior(0.0, 1.0, 2)
    kernel = MALA(prior, gaussian_nll(1.0), w=1.0, gradient_clipping_norm=10.0)
    samples = MCMC(kernel, num_samples=50, progress_bar=False).run(
        torch.zeros(2), torch.ones(2), seed=0, scale=0.1, covariance=torch.eye(2)
    )
    assert (
        len(samples) == 51 and samples[0].shape == (2,) and torch.equal(samples[0], torch.zeros(2))
    )
    state, accepted = kernel.step(torch.zeros(2), torch.ones(2), scale=0.1)
    assert state.shape == (2,) and isinstance(accepted, bool)


def test_step_size_adaptation_reaches_the_target_acceptance():
    prior = normal_prior(0.0, 1.0, 5)
    mcmc = MCMC(MALA(prior, gaussian_nll(0.1)), num_samples=1000, progress_bar=False)
    mcmc.run(torch.zeros(16, 5), torch.zeros(5), warmup=600, seed=0)
    assert 0.45 < mcmc.acceptance_rate.mean() < 0.7  # target 0.574


def test_seed_leaves_the_global_stream_alone_and_repeats():
    runs = []
    for _ in range(2):
        state = torch.get_rng_state()
        mcmc = MCMC(HMC(normal_prior(0.0, 1.0), gaussian_nll(1.0)), 20, progress_bar=False)
        mcmc.run(torch.zeros(2, 1), torch.ones(3), seed=5, scale=0.2)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append(mcmc.samples)
    assert torch.equal(runs[0], runs[1])


def _ar1(phi, chains, n, generator):
    x = torch.zeros(chains, n, dtype=torch.float64)
    noise = torch.randn(chains, n, generator=generator, dtype=torch.float64)
    x[:, 0] = noise[:, 0] / math.sqrt(1 - phi**2)
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + noise[:, t]
    return x


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_ess_of_ar1_chains(phi):
    # tau = (1 + phi) / (1 - phi) exactly for AR(1); the estimator's spread over repeated
    # chains sets the tolerance (measured over 20 replicates, relative sd < 6 % here).
    g = torch.Generator().manual_seed(0)
    estimates = torch.stack([effective_sample_size(_ar1(phi, 4, 4000, g)) for _ in range(20)])
    expected = 4 * 4000 * (1 - phi) / (1 + phi)
    se = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - expected) < Z_MAX * se + 0.05 * expected


def test_rhat_flags_chains_that_disagree():
    g = torch.Generator().manual_seed(1)
    mixed = _ar1(0.5, 4, 2000, g)
    assert split_rhat(mixed) < 1.01
    # One chain of four shifted by 3 (2.6 sds): between-half variance ~1.9 against a
    # within variance ~1.33 gives R-hat ~ sqrt(1 + 1.9 / 1.33) ~ 1.56.
    shifted = mixed + torch.tensor([0.0, 0.0, 0.0, 3.0], dtype=torch.float64)[:, None]
    assert split_rhat(shifted) > 1.3
    trending = mixed + torch.linspace(0, 3, 2000, dtype=torch.float64)
    assert split_rhat(trending) > 1.1


def test_bad_arguments():
    with pytest.raises(ValueError, match="`w`"):
        MALA(normal_prior(0.0, 1.0), gaussian_nll(1.0), w=0.0)
    with pytest.raises(ValueError, match="n_leapfrog"):
        HMC(normal_prior(0.0, 1.0), gaussian_nll(1.0), n_leapfrog=0)
    with pytest.raises(ValueError, match="initial_state"):
        MCMC(MALA(normal_prior(0.0, 1.0), gaussian_nll(1.0)), 5).run(torch.zeros(1, 1, 1), None)
    with pytest.raises(ValueError, match="adapt_covariance"):
        MCMC(MALA(normal_prior(0.0, 1.0), gaussian_nll(1.0)), 5).run(
            torch.zeros(1), None, adapt_covariance="full"
        )
