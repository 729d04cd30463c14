"""Gradient MCMC: exact targets, batched chains, adaptation, R-hat and ESS."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from infer_helpers import gaussian_nll, normal_prior
from stats import Z_MAX, batch_means_ess, batch_means_relative_se, posterior_mismatch

from gradcal import VI
from gradcal.infer.mcmc import HMC, MALA, MCMC, effective_sample_size, split_rhat
from gradcal.losses import NegativeLogLikelihood
from gradcal.models import BrockHommesBeliefs
from gradcal.posterior_estimators import DiagonalGaussian

DATA = Path(__file__).parent / "data" / "brock_hommes_wavy"


def _cross_checked_ess(chains, ess):
    """The smaller of gradcal's ESS and an independent batch-means ESS (tests/stats.py),
    after checking that they agree. With 10 batches a chain (batches ~10 autocorrelation
    times long or more here) the batch-means estimate has a relative standard error
    sqrt(2 / (10 C - 1)) (16 % for C = 8, 6.5 % for C = 48), so their log ratio must stay
    within Z_MAX of it: a factor 2.05 for C = 8, 1.34 for C = 48; an ESS off by 4x fails
    either way. gradcal caps its ESS at C S log10(C S) (Stan's cap, reached by HMC's
    antithetic chains): there it is a lower bound, and only its excess is checked.
    Taking the smaller estimate keeps the tolerances from being too tight; the two-sided
    check keeps them from being too loose."""
    independent = batch_means_ess(chains, n_batches=10)
    bound = Z_MAX * batch_means_relative_se(chains.shape[0], n_batches=10)
    n = chains.shape[0] * chains.shape[1]
    for k in range(chains.shape[-1]):
        log_ratio = math.log(float(ess[k] / independent[k]))
        capped = float(ess[k]) >= 0.999 * n * math.log10(n)
        assert log_ratio < bound if capped else abs(log_ratio) < bound, (
            float(ess[k]),
            float(independent[k]),
        )
    return torch.minimum(ess, independent)


def _check_moments(chains, ess, mean, sd):
    """Sample mean within Z_MAX Monte Carlo standard errors (sd / sqrt(ESS)) of the truth;
    sample variance within Z_MAX standard errors of a variance estimate, sd^2 sqrt(2 / ESS'),
    with ESS' that of the squared deviations (HMC's draws are antithetic for the mean, not
    for the variance). Each ESS is cross-checked against batch means (_cross_checked_ess).
    With the ESS of these runs (mean: ~7000 or more; squares: a few thousand) the mean test
    detects a bias of about 0.05 posterior sd and the variance test an error of ~10-20 %."""
    ess = _cross_checked_ess(chains, ess)
    squares = (chains - chains.mean((0, 1))) ** 2
    ess_square = _cross_checked_ess(squares, effective_sample_size(squares))
    draws = chains.reshape(-1, chains.shape[-1])
    for k in range(draws.shape[-1]):
        assert abs(draws[:, k].mean() - mean[k]) < Z_MAX * sd[k] / math.sqrt(ess[k])
        tolerance = Z_MAX * sd[k] ** 2 * math.sqrt(2 / ess_square[k])
        assert abs(draws[:, k].var() - sd[k] ** 2) < tolerance
    return ess


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
    assert (mcmc.rhat() < 1.05).all()
    print(f"ESS {mcmc.ess().tolist()}, batch means {batch_means_ess(mcmc.chains).tolist()}")
    _check_moments(mcmc.chains, mcmc.ess(), [mean.item()], [sd])


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
    ess = _cross_checked_ess(mcmc.chains, mcmc.ess())[0].item()
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
    print(f"ESS {mcmc.ess().tolist()}, batch means {batch_means_ess(mcmc.chains).tolist()}")
    ess = _check_moments(mcmc.chains, mcmc.ess(), [0.0, 0.0], [1.0, 1.0])
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
    # 48 chains in one batch cost little more than 16 and triple the ESS (to >= 2000, the
    # size at which tests/test_posterior_checks.py shows the checks' power).
    start = torch.tensor([0.9, 0.2, 0.9, -0.2], dtype=torch.float64).expand(48, -1)
    mcmc.run(start, obs, warmup=1000, seed=0)
    assert (mcmc.rhat() < 1.05).all()
    chains = mcmc.chains
    n_eff = _cross_checked_ess(chains, mcmc.ess())
    squares = (chains - chains.mean((0, 1))) ** 2
    n_eff_square = _cross_checked_ess(squares, effective_sample_size(squares))
    print(f"MALA on Brock-Hommes wavy: ESS {n_eff.tolist()}, of squares {n_eff_square.tolist()}")
    assert (n_eff >= 2000).all()
    # Means and log sds against the 1000 reference draws with standard errors from both
    # samples (8 |z| < 3.84: family-wise level 1e-3), and an MMD permutation test on 1000
    # draws at p > 1e-3 (tests/stats.py). Power: a 0.2 sd shift or a 15 % scale error of any
    # one coordinate is rejected with probability 0.9 to 0.98 at ESS >= 2000 (normal
    # approximation; >= 0.85 measured in tests/test_posterior_checks.py); here the
    # reference moved on every coordinate at once must be rejected (expected |z| >= 5).
    draws = chains.reshape(-1, 4)
    assert posterior_mismatch(draws, reference, n_eff, n_eff_square) == []
    mean, sd = reference.mean(0), reference.std(0)
    for moved in (
        reference + 0.2 * sd,
        mean + 1.15 * (reference - mean),
        mean + 0.85 * (reference - mean),
    ):
        assert posterior_mismatch(draws, moved, n_eff, n_eff_square, mmd=False)


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
    chains = [_ar1(phi, 4, 4000, g) for _ in range(20)]
    estimates = torch.stack([effective_sample_size(x) for x in chains])
    expected = 4 * 4000 * (1 - phi) / (1 + phi)
    se = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - expected) < Z_MAX * se + 0.05 * expected
    # The tests' independent batch-means ESS (25 batches of L = 160): its expectation is
    # known for AR(1): a batch mean has variance (s^2 / L) (tau - 2 phi (1 - phi^L) /
    # (L (1 - phi)^2)), a 6 % shortfall at phi = 0.9. Relative sd of one estimate ~14 %
    # (sqrt(2 / 99)), 3 % for the mean of 20: a 10 % error of the estimator fails.
    batch = torch.stack([batch_means_ess(x) for x in chains])
    length, tau = 4000 // 25, (1 + phi) / (1 - phi)
    shortfall = 2 * phi * (1 - phi**length) / (length * (1 - phi) ** 2)
    expected_batch = 4 * 4000 / (tau - shortfall)
    se_batch = batch.std() / math.sqrt(len(batch))
    assert abs(batch.mean() - expected_batch) < Z_MAX * se_batch


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


def test_mcmc_on_a_rank_other_than_0_takes_rank_0s_choice_of_w(monkeypatch):
    """``w = "calibrate"`` under torchrun, as rank 1 sees it (is_main False; the broadcast
    hands over what rank 0 sent): the kernel never calls the loss to choose w and runs at
    rank 0's w, so every rank's chains sample one target; rank 0's error stops it too."""
    import gradcal.infer.weight as weight_module
    from gradcal.infer.weight import WeightCalibration, weight_choice_state

    y = torch.randn(20, generator=torch.Generator().manual_seed(5)) + 2.0
    calls = []

    def loss(theta, data):
        calls.append(theta.shape)
        return gaussian_nll(1.0)(theta, data)

    loss.batched, loss.exact = True, True
    prior = normal_prior(0.0, 10.0)
    chosen = WeightCalibration(resample="iid").choose(loss, prior, y)
    calls.clear()
    sent = [(weight_choice_state(chosen), None)]
    monkeypatch.setattr(weight_module, "is_main", lambda: False)
    monkeypatch.setattr(weight_module, "broadcast_object", lambda obj, src=0: sent[0])
    kernel = MALA(prior, loss, w="calibrate")
    MCMC(kernel, num_samples=3, progress_bar=False).run(torch.zeros(1), y, seed=0, scale=0.1)
    assert kernel.w == chosen.w
    assert len(calls) <= 4  # the chain's own evaluations only (choosing w takes hundreds)
    sent[0] = (None, "RuntimeError: choosing w failed: the bootstrap gives w = nan")
    kernel = MALA(prior, loss, w="calibrate")
    with pytest.raises(RuntimeError, match="choosing w failed on rank 0"):
        MCMC(kernel, num_samples=3, progress_bar=False).run(torch.zeros(1), y, seed=0)
