"""Choosing w (infer/weight.py), the bootstrap pieces (bootstrap.py) and the loss check.

The known answers used here: for the unit-variance Gaussian negative log-likelihood
l(theta, y) = sum_i (y_i - theta)^2 / 2 (Hessian n), the bootstrap variance of the mean is
Var(y) / n for i.i.d. data, so the calibrated w is Var(y): 1 when the model is right, 4 for
data of sd 2; for AR(1) data (phi = 0.5, unit innovations) the long-run variance is
1 / (1 - phi)^2 = 4 while the marginal variance is 4/3, which only a block bootstrap sees.
"""

import importlib.util
import math
import pathlib
import warnings

import pytest
import torch

from gradcal.bootstrap import PerDatasetLoss, block_bootstrap, repeat_dataset
from gradcal.config import check
from gradcal.diagnostics import loss_check
from gradcal.infer import MALA, MCMC, VI
from gradcal.infer.weight import (
    WeightCalibration,
    chi2_quantile,
    gradient_differences_hessian,
    information_matching,
    resolve_w,
)
from gradcal.losses import EnergyDistanceLoss
from gradcal.models import Normal
from gradcal.posterior_estimators import DiagonalGaussian
from gradcal.report import assess


def _benchmark():
    """benchmarks/choose_w.py: the six-parameter walkers and the exact expected losses."""
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "choose_w.py"
    spec = importlib.util.spec_from_file_location("choose_w_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weight_warnings(record):
    return [str(w.message) for w in record if str(w.message).startswith("choosing w")]


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


def test_a_loss_blind_to_the_data_is_an_error_not_w_zero(monkeypatch):
    # curvature 50 at theta = 1 whatever the data: the point estimate and the Hessian are
    # fine, every bootstrap refit is exactly theta_hat, so the bootstrap shows no spread
    # (information matching w = 0) and the guard on w must stop before any coverage is
    # computed (it was evaluated at w = 0 first, issue 24 item 4)
    y = torch.randn(50, generator=torch.Generator().manual_seed(7))

    def no_coverage(*args):
        raise AssertionError("the coverage function was built with w_info = 0")

    monkeypatch.setattr(WeightCalibration, "_coverage_function", no_coverage)

    def blind(theta, data):
        return 25.0 * ((theta - 1.0) ** 2).sum(-1) + 0.0 * data.sum(-1)

    blind.batched = True
    blind.exact = True
    with pytest.raises(RuntimeError, match=r"the bootstrap gives w = 0\.0 .* do not vary"):
        WeightCalibration(resample="iid", n_bootstrap=40).choose(blind, PRIOR, y)


# --- curvature of simulated losses (issue 23 item 4) ---------------------------------------


def test_energy_distance_on_the_normal_model_has_the_expected_losss_curvature():
    """The energy distance is piecewise linear in the simulated values: autograd's Hessian
    of a simulation is 0 ("no finite curvature" before). The curvature must be that of the
    expected loss (exact: benchmarks/choose_w.py, Gaussian integrals). Measured
    (``choose_w.py curvature``): the relative Frobenius error of the 64-simulation second
    differences has sd 0.014 and bias under 0.01 at steps 0.1-0.3, 0.04 at 1.0 (this test's
    step is 0.05 prior sds = 0.5): 0.12 is over 5 sd above the bias."""
    bench = _benchmark()
    y = torch.cat(
        [torch.zeros(1), 1.0 + 2.0 * torch.randn(100, generator=torch.Generator().manual_seed(1))]
    )
    prior = torch.distributions.Normal(torch.zeros(2), 10.0 * torch.ones(2))
    options = WeightCalibration(
        resample="iid", n_bootstrap=40, fit_epochs=100, repeats=4, newton_steps=10
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        choice = options.choose(EnergyDistanceLoss(Normal(100)), prior, y)
    exact = torch.autograd.functional.hessian(
        lambda t: bench.normal_expected_loss(t, y), choice.estimate.double()
    )
    error = torch.linalg.norm(choice.hessian.double() - exact) / torch.linalg.norm(exact)
    assert float(error) < 0.12
    assert not _weight_warnings(record)
    # well specified: GPC and information matching agree up to the bootstrap's noise (the
    # 0.9 quantile of B = 40 draws and a 2 x 2 covariance: relative sd ~0.25; a factor
    # 2.5 is over 3 sd)
    assert 0.4 < choice.w / choice.w_information < 2.5


def test_a_w_that_reaches_no_coverage_is_a_warning_a_python_user_sees():
    # a prior N(0, 0.01^2) against data of mean 3: every Laplace set is pulled to the prior
    # and misses theta_hat whatever w, so the choice "of largest coverage" is wrong
    y = 3.0 + torch.randn(50, generator=torch.Generator().manual_seed(4))
    prior = torch.distributions.Normal(torch.zeros(1), 0.01 * torch.ones(1))
    with pytest.warns(UserWarning, match="no w reaches coverage 0.90"):
        WeightCalibration(resample="iid", n_bootstrap=40).choose(gaussian_nll, prior, y)


def test_a_hessian_made_positive_definite_is_a_warning():
    # the loss ignores theta_2: its Hessian is singular (by autograd and by differences),
    # which is said, and then the bootstrap shows no spread there: the choice stops
    y = torch.randn(50, generator=torch.Generator().manual_seed(4))

    def first_only(theta, data):
        return gaussian_nll(theta[..., :1], data) + 0.0 * theta[..., 1]

    first_only.batched, first_only.exact = True, True
    prior = torch.distributions.Normal(torch.zeros(2), 10.0 * torch.ones(2))
    with (
        pytest.warns(UserWarning, match="not positive definite"),
        pytest.raises(RuntimeError, match="choosing w failed"),
    ):
        WeightCalibration(resample="iid", n_bootstrap=40).choose(first_only, prior, y)


def test_the_curvature_estimate_of_six_parameter_walkers_is_the_expected_losss():
    """The estimate ``choose`` uses for a simulated loss (gradient differences with common
    random numbers, 64 simulations, steps 0.05 prior sds) against the exact Hessian of the
    walkers' expected energy distance; autograd's is hundreds of times too large. Tolerance
    as in the test below."""
    bench = _benchmark()
    loss, y = bench.walker_problem(0, 100, walkers=3)
    rows = PerDatasetLoss(loss, repeat_dataset(y, 1), 64)
    steps = 0.05 * 2.0 * torch.ones(6)  # WeightCalibration's default step, prior sd 2
    estimate = gradient_differences_hessian(lambda t: rows(t[None])[0], bench.WALKER_TRUTH, steps)
    exact = torch.autograd.functional.hessian(
        lambda t: bench.walker_expected_loss(t, y, 3), bench.WALKER_TRUTH.double()
    )
    error = torch.linalg.norm(estimate.double() - exact) / torch.linalg.norm(exact)
    assert float(error) < 0.15


def test_six_parameter_walkers_get_the_curvature_of_their_expected_loss():
    """Six groups of Bernoulli walkers (straight-through steps) with the energy distance:
    autograd's Hessian of the simulations is hundreds of times the expected loss's
    (``choose_w.py curvature``: relative error 786, eigenvalues 55-356 against 0.21-0.33),
    so the Newton refits barely moved and w came out far too small. Fast version (T = 100,
    3 walkers a group, the fit started at the truth, B = 20; with 3 walkers autograd's
    Hessian was 3567 times off, with 2 or 4 it happens to be right): the Hessian must be
    the exact expected loss's up to its Monte Carlo error (gradient differences measured
    over 8 seeds at these settings: relative Frobenius error mean 0.053, sd 0.018; 0.15 is
    over 5 sd above), and information matching and GPC must agree within the noise of
    B = 20 (a factor 4)."""
    bench = _benchmark()
    loss, y = bench.walker_problem(0, 100, walkers=3)
    options = WeightCalibration(
        n_bootstrap=20, repeats=4, newton_steps=10, fit_epochs=20, starts=1,
        init=bench.WALKER_TRUTH,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        choice = options.choose(loss, bench.WALKER_PRIOR, y)
    exact = torch.autograd.functional.hessian(
        lambda t: bench.walker_expected_loss(t, y, 3), choice.estimate.double()
    )
    error = torch.linalg.norm(choice.hessian.double() - exact) / torch.linalg.norm(exact)
    assert float(error) < 0.15
    assert not [m for m in _weight_warnings(record) if "no w reaches" in m]
    assert 0.25 < choice.w / choice.w_information < 4.0


# --- failed bootstrap refits (issue 24 item 3) ---------------------------------------------


def test_bootstrap_rows_whose_loss_fails_are_left_out_not_kept_as_perfect_fits():
    """A loss that is NaN on about 31% of the bootstrap data sets (those whose first value
    exceeds 1, for data of sd 2). Before: those rows got a zero gradient, stayed at
    theta_hat and counted, shrinking the bootstrap variance by ~0.69 (w too small). Now they
    are left out (with a warning), so w is that of the remaining ~138 of the same 200 data
    sets: the relative difference of the variance of a 69% subset and of the whole has sd
    sqrt(2 (1/138 - 1/200)) = 0.067 (3 sd: 0.2; the shrinkage, 0.31, is 4.6 sd); of the 0.9
    quantile (GPC's w; relative sd 0.15 at B = 200) 0.15 sqrt(200/138 - 1) = 0.10 (3 sd)."""
    y = 2.0 * torch.randn(400, generator=torch.Generator().manual_seed(12))
    y[0] = 0.0  # the observed data set itself does not fail

    def fails_on_some(theta, data):
        return gaussian_nll(theta, data) + torch.where(data[..., 0] > 1.0, torch.nan, 0.0)

    fails_on_some.batched, fails_on_some.exact = True, True
    options = WeightCalibration(resample="iid", n_bootstrap=200)
    plain = options.choose(gaussian_nll, PRIOR, y)
    with pytest.warns(UserWarning, match=r"\d+ of 200 bootstrap fits failed"):
        failing = options.choose(fails_on_some, PRIOR, y)
    assert 100 < failing.bootstrap_estimates.shape[0] < 170
    assert abs(failing.w_information / plain.w_information - 1) < 0.2
    assert abs(failing.w / plain.w - 1) < 0.3


# --- the prior's support (issue 24 item 4) -------------------------------------------------


def test_fits_stay_in_a_bounded_priors_support():
    """Prior Gamma(2, 10) on theta > 0 (mode 0.1, near the bound 0); data of mean 0.095 and
    sd 1, n = 50, so the bootstrap means fall below 0 about a quarter of the time. Before:
    the point fit and the Newton refits ran in theta unconstrained, 45 of 200 refits ended
    at theta <= 0 where the prior's terms were set to 0. Now the point fit runs in u = log
    theta and a Newton step that would leave the support is halved: every estimate is
    inside (those whose data pull them out end at the bound), and the Hessian is the
    loss's, n = 50. (The bootstrap then piles up at the bound and no Laplace set reaches
    90%: a warning says so; not asserted, it is this extreme example's, not the property.)"""
    prior = torch.distributions.Gamma(torch.tensor([2.0]), torch.tensor([10.0]))
    y = 0.25 + torch.randn(50, generator=torch.Generator().manual_seed(15))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        choice = WeightCalibration(resample="iid", n_bootstrap=200).choose(gaussian_nll, prior, y)
    assert float(choice.estimate) > 0 and bool((choice.bootstrap_estimates > 0).all())
    assert torch.allclose(choice.estimate, y.mean(), rtol=1e-3)
    assert torch.allclose(choice.hessian, torch.tensor([[50.0]]), rtol=1e-3)
    assert math.isfinite(choice.w) and choice.w > 0


# --- more than one dimension (issue 24 item 11) --------------------------------------------


def gaussian_nll_2d(theta, y):
    """sum_i |y_i - theta|^2 / 2: theta (B, 2), y (n, 2) -> (B,)."""
    return 0.5 * ((y[None] - theta[:, None]) ** 2).sum((-1, -2))


gaussian_nll_2d.batched = True
gaussian_nll_2d.exact = True
PRIOR_2D = torch.distributions.Normal(torch.zeros(2), 100.0 * torch.ones(2))


def test_two_locations_give_the_hand_computed_w():
    """Two locations, unit-variance model, data of sds (2, 1), n = 400: H = n I and the
    bootstrap covariance of the mean is diag(v) / n (v the data's variances), so
    w_info = tr(H) / tr(Sigma^-1) = 2 / (1 / v_1 + 1 / v_2) (1.6 for v = (4, 1)): relative
    sd of its bootstrap estimate sqrt(2 / B) sqrt(0.2^2 + 0.8^2) = 0.058 at B = 400, 4 sd
    allowed. The joint region's w is the 0.9 quantile of n |theta*_b - theta_hat|^2 over
    chi2_2(0.9) (prior 100 sds wide: its terms shift that by under 1e-4): computed here
    from the choice's own bootstrap estimates, so only the prior's terms separate them."""
    y = torch.randn(400, 2, generator=torch.Generator().manual_seed(13)) * torch.tensor([2.0, 1.0])
    choice = WeightCalibration(resample="iid", n_bootstrap=400).choose(
        gaussian_nll_2d, PRIOR_2D, y
    )
    v = y.var(0, unbiased=False)
    assert torch.allclose(choice.hessian, 400.0 * torch.eye(2))
    assert abs(choice.w_information / float(2 / (1 / v).sum()) - 1) < 0.23
    gaps = 400.0 * ((choice.bootstrap_estimates - choice.estimate) ** 2).sum(-1)
    expected = float(torch.quantile(gaps.double(), 0.9)) / chi2_quantile(0.9, 2)
    assert abs(choice.w / expected - 1) < 0.02


@pytest.mark.slow
def test_the_joint_region_covers_at_the_nominal_rate_in_two_dimensions():
    """100 replicated data sets (n = 50, sds (2, 1), truth (1, -1)), w calibrated for the
    joint region: the exact pi_w is Gaussian (precision n / w I plus the prior's), and its
    90% region (chi2_2(0.9) radius) must hold the truth 84-96 times (binomial sd 3: 2 sd)."""
    generator = torch.Generator().manual_seed(14)
    truth, n, covered = torch.tensor([1.0, -1.0]), 50, 0
    radius = chi2_quantile(0.9, 2)
    for r in range(100):
        y = truth + torch.randn(n, 2, generator=generator) * torch.tensor([2.0, 1.0])
        options = WeightCalibration(resample="iid", n_bootstrap=200, seed=r)
        w = options.choose(gaussian_nll_2d, PRIOR_2D, y).w
        precision = n / w + 1 / 100**2
        mean = y.sum(0) / w / precision
        covered += float(((mean - truth) ** 2).sum() * precision) <= radius
    assert 84 <= covered <= 96
