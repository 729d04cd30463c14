"""Choosing w (infer/weight.py), the bootstrap pieces (bootstrap.py) and the loss check.

The known answers used here: for the unit-variance Gaussian negative log-likelihood
l(theta, y) = sum_i (y_i - theta)^2 / 2 (Hessian n), the bootstrap variance of the mean is
Var(y) / n for i.i.d. data, so the calibrated w is Var(y): 1 when the model is right, 4 for
data of sd 2; for AR(1) data (phi = 0.5, unit innovations) the long-run variance is
1 / (1 - phi)^2 = 4 while the marginal variance is 4/3, which only a block bootstrap sees.
"""

import math

import pytest
import torch

from gradcal.bootstrap import PerDatasetLoss, block_bootstrap, repeat_dataset
from gradcal.config import check
from gradcal.diagnostics import loss_check
from gradcal.infer import MALA, MCMC, VI
from gradcal.infer.weight import (
    WeightCalibration,
    chi2_quantile,
    information_matching,
    resolve_w,
)
from gradcal.losses import EnergyDistanceLoss
from gradcal.models import Normal
from gradcal.posterior_estimators import DiagonalGaussian
from gradcal.report import assess


def gaussian_nll(theta, y):
    """sum_i (y_i - theta)^2 / 2: theta (B, 1), y (n,) -> (B,)."""
    return 0.5 * ((y - theta) ** 2).sum(-1)


gaussian_nll.batched = True
gaussian_nll.exact = True

PRIOR = torch.distributions.Normal(torch.zeros(1), 100.0 * torch.ones(1))


def _ar1(n, phi, generator):
    noise = torch.randn(n + 100, generator=generator)
    x = torch.zeros(n + 100)
    for t in range(1, n + 100):
        x[t] = phi * x[t - 1] + noise[t]
    return x[100:]


# --- bootstrap pieces ----------------------------------------------------------------------


def test_block_bootstrap_keeps_blocks_and_validates():
    y = torch.arange(100.0)
    copies = block_bootstrap(y, 50, block_length=10, generator=torch.Generator().manual_seed(0))
    assert copies.shape == (50, 100)
    steps = copies.diff(dim=1)
    # inside each block of 10 the series runs on by 1; joins are at multiples of 10
    inside = torch.ones(99, dtype=torch.bool)
    inside[9::10] = False
    assert bool((steps[:, inside] == 1).all())
    assert not bool((steps[:, ~inside] == 1).all())  # blocks start at random places
    pair = block_bootstrap([y, -y], 3, block_length=5)
    assert torch.equal(pair[0], -pair[1])  # outputs resampled at the same times
    with pytest.raises(ValueError, match="block_length"):
        block_bootstrap(y, 3, block_length=101)
    with pytest.raises(ValueError, match="`n`"):
        block_bootstrap(y, 0)


def test_per_dataset_loss_scores_each_row_against_its_own_data():
    datasets = torch.stack([torch.zeros(5), torch.ones(5), 2 * torch.ones(5)])
    rows = PerDatasetLoss(gaussian_nll, datasets)
    values = rows(torch.tensor([[0.0], [0.0], [2.0]]))
    assert torch.allclose(values, torch.tensor([0.0, 2.5, 0.0]))
    with pytest.raises(ValueError, match="one row per data set"):
        rows(torch.zeros(2, 1))


def test_per_dataset_loss_of_a_simulator_matches_the_loss_itself():
    """One batched simulation compared per data set equals the loss called per data set
    with the same noise (the same seed and shapes give the same simulations)."""
    y = torch.cat([torch.zeros(1), torch.randn(30, generator=torch.Generator().manual_seed(1))])
    loss = EnergyDistanceLoss(Normal(30))
    datasets = torch.stack([y, y + 1.0])
    theta = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    rows = theta.repeat_interleave(2, 0)  # 2 simulations per data set
    torch.manual_seed(3)
    together = PerDatasetLoss(loss, datasets, repeats=2)(theta)
    torch.manual_seed(3)
    against_first = loss(rows, y)
    torch.manual_seed(3)
    against_second = loss(rows, y + 1.0)
    expected = torch.stack([against_first[:2].mean(), against_second[2:].mean()])
    assert torch.allclose(together, expected)
    assert not torch.allclose(against_first[2:].mean(), against_second[2:].mean())


def test_information_matching_and_chi2():
    h = torch.diag(torch.tensor([2.0, 8.0]))
    est = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor(
        [1.0, 0.5]
    )
    sigma = torch.cov(est.T)
    expected = 10.0 / float(torch.trace(torch.linalg.inv(sigma)))
    assert math.isclose(information_matching(h, est), expected, rel_tol=1e-6)  # float32 cov
    assert math.isclose(chi2_quantile(0.9, 2), -2 * math.log(0.1), rel_tol=1e-6)


def test_resolve_w_validates():
    assert resolve_w(0.0) == (0.0, None)
    assert math.isnan(resolve_w("calibrate")[0])
    for bad in ("calibrated", -1.0, True, None):
        with pytest.raises(ValueError, match="`w` must be"):
            resolve_w(bad)
    with pytest.raises(ValueError, match="> 0"):
        resolve_w(0.0, allow_zero=False)
    with pytest.raises(ValueError, match="`level`"):
        WeightCalibration(level=1.5)
    with pytest.raises(ValueError, match="`resample`"):
        WeightCalibration(resample="wild")


# --- the choice of w: known answers ---------------------------------------------------------


def test_well_specified_normal_gives_w_near_one():
    # n = 400, B = 400: sd of the bootstrap variance ~ sqrt(2 / 400) = 0.07 and of Var(y)
    # ~ sqrt(2 / 400) = 0.07, so w_info = 1 +- 0.1 (1 sd); the 0.9 quantile of B = 400 chi2_1
    # draws adds 0.107 relative sd (binomial error at the quantile / density): 4 sd bounds.
    y = torch.randn(400, generator=torch.Generator().manual_seed(5))
    choice = WeightCalibration(resample="iid", n_bootstrap=400).choose(gaussian_nll, PRIOR, y)
    assert abs(choice.w_information - 1.0) < 0.4
    assert abs(choice.w - 1.0) < 0.55
    assert abs(choice.coverage - 0.9) <= 3 * choice.coverage_error + 1 / 400
    assert torch.allclose(choice.estimate, y.mean(), atol=1e-4)
    assert torch.allclose(choice.hessian, torch.tensor([[400.0]]))
    assert choice.simulations == 0 and choice.fits == 4 + 9 + 400


def test_misspecified_scale_gives_w_near_the_variance_ratio():
    # data of sd 2 under a unit-variance likelihood: w = Var(y) = 4 (same relative errors)
    y = 2 * torch.randn(400, generator=torch.Generator().manual_seed(6))
    choice = WeightCalibration(resample="iid", n_bootstrap=400).choose(gaussian_nll, PRIOR, y)
    assert abs(choice.w_information / 4.0 - 1.0) < 0.4
    assert abs(choice.w / 4.0 - 1.0) < 0.55
    marginal = WeightCalibration(resample="iid", n_bootstrap=400, region="marginal")
    assert math.isclose(marginal.choose(gaussian_nll, PRIOR, y).w, choice.w, rel_tol=0.05)


def test_block_bootstrap_sees_dependence_that_the_iid_bootstrap_misses():
    # AR(1), phi = 0.5, n = 2000: long-run variance 4, marginal 4/3. The block bootstrap
    # (l = 13) is biased low by about sum_k 2 k rho_k / l = 4 / 13 of 4 (~3.7 expected); its
    # sd with n / l = 154 blocks is ~0.1 relative. The iid bootstrap gives ~4/3 +- 0.15.
    y = _ar1(2000, 0.5, torch.Generator().manual_seed(7))
    block = WeightCalibration(resample="block", n_bootstrap=200, method="information")
    iid = WeightCalibration(resample="iid", n_bootstrap=200, method="information")
    w_block = block.choose(gaussian_nll, PRIOR, y).w
    w_iid = iid.choose(gaussian_nll, PRIOR, y).w
    assert 2.5 < w_block < 5.0
    assert 0.9 < w_iid < 1.8


# --- the drivers and the run configuration ----------------------------------------------------


def test_vi_and_mcmc_calibrate_w_from_the_data():
    y = 2 * torch.randn(200, generator=torch.Generator().manual_seed(8))
    q = DiagonalGaussian(torch.zeros(1))
    options = WeightCalibration(resample="iid", n_bootstrap=100, fit_epochs=100)
    optimizer = torch.optim.Adam(q.parameters(), lr=0.05)
    vi = VI(
        gaussian_nll,
        PRIOR,
        q,
        w=options,
        n_samples_per_epoch=20,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.01, 600),
        progress_bar=False,
        seed=0,
    )
    assert math.isnan(vi.w)
    vi.run(y, n_epochs=600, max_epochs_without_improvement=600)
    # w ~ Var(y) = 4: the bootstrap errors of test_misspecified_scale at B = 100, n = 200
    assert vi.w == vi.weight_choice.w and 2.0 < vi.w < 7.0
    # q (last state, the step size decayed) has the generalised posterior's sd sqrt(w / n)
    # up to its Monte Carlo error (4000 draws: 1.1% of the sd) and the optimiser's jitter
    with torch.no_grad():
        sd = float(q.sample(4000)[0].std())
    assert abs(sd / math.sqrt(vi.w / 200) - 1) < 0.1
    kernel = MALA(PRIOR, gaussian_nll, w=options)
    MCMC(kernel, num_samples=5, progress_bar=False).run(torch.zeros(2, 1), y)
    assert kernel.w == kernel.weight_choice.w
    with pytest.raises(ValueError, match="`w` must be"):
        MALA(PRIOR, gaussian_nll, w=0.0)


def test_config_accepts_w_calibrate_only():
    base = {
        "model": {"name": "Normal", "options": {"n_timesteps": 5}},
        "data": {"at": [0.0, 1.0]},
        "method": {"kind": "vi", "w": "calibrate", "w_resample": "iid"},
        "parameters": [
            {"name": "mu", "prior": {"kind": "normal", "loc": 0.0, "scale": 2.0}},
            {"name": "sigma", "prior": {"kind": "lognormal", "loc": 0.0, "scale": 0.5}},
        ],
    }
    assert not [p for p in check(base) if p.startswith("method")]
    base["method"].update(w="calibrated", w_resample="wild")
    problems = [p for p in check(base) if p.startswith("method")]
    assert any(p.startswith('method.w: must be a number > 0 or "calibrate"') for p in problems)
    assert any(p.startswith("method.w_resample: must be one of") for p in problems)
    # annealing's default start, 100 w, does not exist before w is chosen: ask for one
    base["method"].update(w="calibrate", w_resample="block", anneal_epochs=10)
    problems = [p for p in check(base) if p.startswith("method")]
    assert problems == [p for p in problems if p.startswith("method.anneal_start: needed")]
    assert len(problems) == 1
    base["method"]["anneal_start"] = 1.0
    assert not [p for p in check(base) if p.startswith("method")]


# --- the loss check and the report -------------------------------------------------------------


def test_loss_check_flags_a_misspecified_model_only():
    generator = torch.Generator().manual_seed(9)
    loss = EnergyDistanceLoss(Normal(100))
    draws = torch.tensor([[0.0, 1.0]]).expand(60, 2)
    right = torch.cat([torch.zeros(1), torch.randn(100, generator=generator)])
    # a bimodal sample with the same mean and sd as N(0, 1): the model cannot make it
    signs = torch.randint(0, 2, (100,), generator=generator) * 2.0 - 1.0
    wrong = torch.cat(
        [torch.zeros(1), signs * (0.95 + 0.05 * torch.randn(100, generator=generator))]
    )
    good, bad = loss_check(loss, draws, right), loss_check(loss, draws, wrong)
    # under the model the p-value is uniform: P(p < 0.01) = 0.01 for the good data
    assert good.p_value > 0.01 and "no sign of misspecification" in good.reading()
    assert bad.p_value < 0.01 and bad.reading().startswith("the model cannot reproduce")
    assert good.observed.shape == good.replicated.shape == (60,)


def test_report_reads_the_weight_and_the_loss_check():
    weight = {"w": 0.002, "coverage": 0.9, "coverage_error": 0.03, "level": 0.9,
              "w_information": 0.0018, "resample": "block", "n_bootstrap": 100,
              "fits": 113, "simulations": 2000, "seconds": 3.0}  # fmt: skip
    misfit = {"p_value": 0.0, "observed_median": 0.1, "replicated_median": 0.01}
    verdict = assess({"weight": weight, "loss_check": misfit}, method={"kind": "vi"})
    texts = [f.text for f in verdict.findings]
    assert any("misspecified" in t for t in texts)
    assert any("estimated coverage is 0.9 +- 0.03" in t for t in texts)
    assert verdict.level == "caution"
    fine = assess({"loss_check": {"p_value": 0.4}}, method={"kind": "vi"})
    assert fine.level == "trust"


def test_repeat_dataset_is_a_view():
    y = torch.arange(3.0)
    assert repeat_dataset(y, 4).shape == (4, 3) and repeat_dataset(y, 4).data_ptr() == y.data_ptr()


@pytest.mark.slow
def test_calibrated_intervals_cover_at_the_nominal_rate_over_replicates():
    """100 replicated Normal-location data sets (n = 50, the well-specified NLL): the
    calibrated w is near 1 and the 90% intervals of pi_w cover the true mean 85-95% of the
    time (binomial MC error sqrt(0.9 0.1 / 100) = 0.03: the band is +-1.7 of it)."""
    generator = torch.Generator().manual_seed(11)
    prior = torch.distributions.Normal(torch.zeros(1), 10.0 * torch.ones(1))
    z, n, covered, ws = 1.6448536269514722, 50, 0, []
    for r in range(100):
        y = 1.0 + torch.randn(n, generator=generator)
        w = (
            WeightCalibration(resample="iid", n_bootstrap=200, seed=r)
            .choose(gaussian_nll, prior, y)
            .w
        )
        precision = n / w + 1 / 100  # the exact generalised posterior is Gaussian here
        covered += abs(float(y.sum() / w / precision) - 1.0) <= z / math.sqrt(precision)
        ws.append(w)
    # the median of w over replicates: sd of one w ~ 0.2 (n = 50), of the median ~0.025
    assert 0.9 < float(torch.tensor(ws).median()) < 1.1
    assert 85 <= covered <= 95


def test_a_loss_that_fails_away_from_its_start_is_an_error_not_a_nan_w():
    # the loss is NaN beyond |theta| > 0.5 while the data's mean is 3: every fit runs into
    # the failing region, so no w can be chosen; VI must not go on with w = NaN
    y = 3.0 + torch.randn(50, generator=torch.Generator().manual_seed(7))

    def failing(theta, data):
        value = gaussian_nll(theta, data)
        return torch.where(theta[..., 0].abs() < 0.5, value, torch.nan)

    failing.batched = True
    failing.exact = True
    with pytest.raises(RuntimeError, match="choosing w failed"):
        WeightCalibration(resample="iid", n_bootstrap=40).choose(failing, PRIOR, y)


def test_bootstrap_refits_that_end_at_nan_are_an_error_naming_them():
    # finite on the observed data (no ties), so the point estimate and its Hessian are fine;
    # NaN in value and gradient on every i.i.d. bootstrap data set (each has tied values), so
    # every bootstrap refit ends at NaN: the refit guard, not the curvature guard, must stop
    y = torch.randn(50, generator=torch.Generator().manual_seed(7))

    def fails_on_ties(theta, data):
        ties = (data.sort(-1).values.diff(dim=-1) == 0).any(-1)
        return gaussian_nll(theta, data) + torch.where(ties, torch.nan, 0.0) * theta[..., 0]

    fails_on_ties.batched = True
    fails_on_ties.exact = True
    with pytest.raises(RuntimeError, match=r"40 of 40 bootstrap fits .* ended at NaN"):
        WeightCalibration(resample="iid", n_bootstrap=40).choose(fails_on_ties, PRIOR, y)


def test_a_loss_blind_to_the_data_is_an_error_not_w_zero():
    # curvature 50 at theta = 1 whatever the data: the point estimate and the Hessian are
    # fine, every bootstrap refit is exactly theta_hat, so the bootstrap shows no spread
    # (information matching w = 0) and the final guard on w must stop
    y = torch.randn(50, generator=torch.Generator().manual_seed(7))

    def blind(theta, data):
        return 25.0 * ((theta - 1.0) ** 2).sum(-1) + 0.0 * data.sum(-1)

    blind.batched = True
    blind.exact = True
    with pytest.raises(RuntimeError, match=r"the bootstrap gives w = 0\.0 .* do not vary"):
        WeightCalibration(resample="iid", n_bootstrap=40).choose(blind, PRIOR, y)
