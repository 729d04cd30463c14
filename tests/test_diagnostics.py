"""Diagnostics: sample distances, C2ST, PSIS k-hat, posterior predictive checks, coverage."""

import math

import pytest
import torch
from stats import Z_MAX, z_mean, z_proportion

from gradcal.diagnostics import (
    DEFAULT_SUMMARIES,
    autocorrelation,
    c2st,
    coverage,
    energy_distance_samples,
    mmd_samples,
    posterior_predictive,
    psis_khat,
    read_khat,
    split_half_floor,
    vi_importance,
    vi_khat,
)
from gradcal.models import Model, Normal
from gradcal.posterior_estimators import DiagonalGaussian


class GaussianMeans(Model):
    """y_t ~ N(theta, noise^2 I_D), t = 1..T; batched, one output (B, T, D)."""

    batched = True
    history_length = 1

    def __init__(self, n_timesteps: int, dim: int, noise: float):
        super().__init__()
        self.n_timesteps, self.n_params, self.noise = n_timesteps, dim, noise

    def initialize(self, params):
        return params.new_zeros(params.shape[0], 0, params.shape[1])

    def step(self, params, x):
        return (params + self.noise * torch.randn_like(params))[:, None]

    def observe(self, x):
        return [x]


def _standard_normal_prior(dim: int):
    return torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(dim), torch.ones(dim)), 1
    )


# ----------------------------------------------------------------------- sample distances


def _cdist(x, y):
    """Exact pairwise distances (torch.cdist's matrix-product shortcut loses digits)."""
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def _scaled_pair(dtype=torch.float64):
    scales = torch.tensor([1.0, 10.0, 0.01], dtype=dtype)
    a = torch.randn(60, 3, dtype=dtype) * scales + 0.3
    b = torch.randn(80, 3, dtype=dtype) * scales * 1.5
    return a, b


def test_energy_distance_samples_is_the_u_statistic_on_coordinates_scaled_by_b():
    a, b = _scaled_pair()
    s = b.std(0)
    sa, sb = a / s, b / s
    n, m = len(a), len(b)
    direct = (
        2 * _cdist(sa, sb).mean()
        - _cdist(sa, sa).sum() / (n * (n - 1))
        - _cdist(sb, sb).sum() / (m * (m - 1))
    )
    assert energy_distance_samples(a, b) == pytest.approx(float(direct), rel=1e-9)
    raw = (
        2 * _cdist(a, b).mean()
        - _cdist(a, a).sum() / (n * (n - 1))
        - _cdist(b, b).sum() / (m * (m - 1))
    )
    assert energy_distance_samples(a, b, standardize=False) == pytest.approx(float(raw), rel=1e-9)


def test_mmd_samples_is_the_unbiased_gaussian_mmd_with_the_pooled_median_bandwidth():
    a, b = _scaled_pair()
    s = b.std(0)
    sa, sb = a / s, b / s
    pooled = torch.cat((sa, sb))
    i, j = torch.triu_indices(len(pooled), len(pooled), offset=1)
    median = _cdist(pooled, pooled)[i, j].quantile(0.5)

    def k(x, y):
        return torch.exp(-(_cdist(x, y) ** 2) / median**2)

    n, m = len(a), len(b)
    direct = (
        (k(sa, sa).sum() - n) / (n * (n - 1))
        + (k(sb, sb).sum() - m) / (m * (m - 1))
        - 2 * k(sa, sb).mean()
    )
    assert mmd_samples(a, b) == pytest.approx(float(direct), rel=1e-9)


@pytest.mark.parametrize("distance", [mmd_samples, energy_distance_samples])
def test_standardised_distances_ignore_the_units_of_each_coordinate(distance):
    a, b = _scaled_pair()
    units = torch.tensor([3.0, 0.001, 70.0], dtype=torch.float64)
    assert distance(a * units, b * units) == pytest.approx(distance(a, b), rel=1e-9)
    assert distance(a * units, b * units, standardize=False) != pytest.approx(
        distance(a, b, standardize=False), rel=1e-3
    )


def test_mmd_against_the_split_half_noise_floor():
    n_splits = 20
    a, b = torch.randn(600, 4), torch.randn(600, 4)
    floor = split_half_floor(torch.cat((a, b)), n_splits=n_splits)
    # Given the sample, the splits are independent and the MMD between halves averages to
    # zero over all splits (every pair is as often within as across halves): the mean of
    # n_splits values is 0 within Z_MAX standard errors std / sqrt(n_splits).
    assert abs(floor.mean) < Z_MAX * floor.std / math.sqrt(n_splits)
    assert floor.std > 0
    # Equal distributions: the unbiased MMD of sets twice the halves' size is centred at 0
    # and less noisy than the floor, so Z_MAX floor standard deviations bound it.
    assert abs(mmd_samples(a, b)) < Z_MAX * floor.std
    # A shift of half a standard deviation in one coordinate stands out of the floor.
    shifted = b + torch.tensor([0.5, 0.0, 0.0, 0.0])
    assert mmd_samples(a, shifted) > floor.mean + Z_MAX * floor.std


def test_split_half_floor_is_deterministic_given_seed():
    x = torch.randn(200, 2)
    state = torch.get_rng_state()
    assert split_half_floor(x, 5, seed=3) == split_half_floor(x, 5, seed=3)
    assert split_half_floor(x, 5, seed=3) != split_half_floor(x, 5, seed=4)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    ("a", "b", "error", "match"),
    [
        ([[0.0]], torch.zeros(5, 1), TypeError, "`a` must be a tensor"),
        (torch.zeros(5, 2), torch.zeros(5, 3), ValueError, "same D"),
        (torch.zeros(5, 2, 1), torch.zeros(5, 2), ValueError, r"`a` must have shape \(n, D\)"),
        (torch.zeros(5, 2), torch.zeros(1, 2), ValueError, "at least 2 points"),
        (torch.zeros(5, 2, dtype=torch.long), torch.zeros(5, 2), TypeError, "floating"),
        (torch.full((5, 2), math.nan), torch.zeros(5, 2), ValueError, "NaN"),
    ],
)
def test_distances_validate_their_inputs(a, b, error, match):
    for f in (mmd_samples, energy_distance_samples, c2st):
        with pytest.raises(error, match=match):
            f(a, b)


# --------------------------------------------------------------------------------- C2ST


def test_c2st_is_at_chance_for_equal_distributions():
    n = 1000
    acc = c2st(torch.randn(n, 4), torch.randn(n, 4))
    # Test folds are balanced and the features carry no information about the labels, so
    # the 2n held-out predictions are correct with probability 1/2 each: sd <= 0.5/sqrt(2n).
    assert abs(acc - 0.5) < Z_MAX * 0.5 / math.sqrt(2 * n)


def test_c2st_reaches_the_bayes_accuracy_of_a_nonlinear_problem():
    n = 1000
    a, b = torch.randn(n, 4), 1.5 * torch.randn(n, 4)  # equal means: no linear boundary
    normal = torch.distributions.Normal(0.0, 1.0)

    def log_ratio(x):
        return (normal.log_prob(x) - normal.log_prob(x / 1.5) + math.log(1.5)).sum(-1)

    # The Bayes classifier's accuracy on the same points: an unbiased estimate of the best
    # accuracy any classifier can have.
    bayes = float(((log_ratio(a) > 0).sum() + (log_ratio(b) <= 0).sum()) / (2 * n))
    acc = c2st(a, b)
    # Upper bound: binomial Monte Carlo error of two accuracies on 2n points each.
    se = math.sqrt(2 * bayes * (1 - bayes) / (2 * n))
    assert acc < bayes + Z_MAX * se
    # Lower bound: not Monte Carlo error but the learning shortfall of a small MLP trained
    # on 1600 points (0.00-0.02 in trials with several seeds); 0.05 leaves room.
    assert acc > bayes - 0.05


def test_c2st_is_deterministic_balances_classes_and_leaves_the_global_stream_alone():
    a, b = torch.randn(300, 2) + 0.5, torch.randn(900, 2)
    state = torch.get_rng_state()
    first = c2st(a, b, seed=1, epochs=5)
    assert torch.equal(state, torch.get_rng_state())
    assert first == c2st(a, b, seed=1, epochs=5)
    # 2 * 300 held-out predictions: accuracy is a multiple of 1/600.
    assert (first * 600) == pytest.approx(round(first * 600), abs=1e-9)
    assert c2st(a.double(), b.double(), seed=1, epochs=5) == pytest.approx(first, abs=0.05)


def test_c2st_separates_disjoint_samples():
    assert c2st(torch.randn(200, 3), torch.randn(200, 3) + 10.0, epochs=10) > 0.99


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"folds": 1}, ValueError, "`folds`"),
        ({"folds": 11}, ValueError, "`folds`"),
        ({"seed": None}, TypeError, "`seed`"),
        ({"epochs": 0}, ValueError, "`epochs`"),
        ({"hidden": 2.5}, TypeError, "`hidden`"),
        ({"lr": -1.0}, ValueError, "`lr`"),
    ],
)
def test_c2st_validates_its_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        c2st(torch.randn(10, 2), torch.randn(12, 2), **kwargs)


# --------------------------------------------------------------------------- PSIS k-hat


def _tail_size(n):
    return math.ceil(min(0.2 * n, 3 * math.sqrt(n)))


def _with_prior(k, n):
    """The expected k-hat for true shape k: Vehtari et al.'s prior adds 10 pseudo-tail
    points at k = 0.5, giving (M k + 5) / (M + 10)."""
    m = _tail_size(n)
    return (m * k + 5) / (m + 10)


@pytest.mark.parametrize("k", [0.2, 0.5, 0.9])
def test_psis_khat_recovers_the_shape_of_pareto_importance_ratios(k):
    n, repeats = 10_000, 100
    g = torch.Generator().manual_seed(int(k * 10))
    # Ratios w = U^(-k) are Pareto with tail index 1/k: above any threshold, exactly a
    # generalised Pareto distribution of shape k.
    khats = torch.tensor(
        [
            psis_khat(-k * torch.rand(n, generator=g, dtype=torch.float64).log())[0]
            for _ in range(repeats)
        ]
    )
    # Tolerance: Z_MAX standard errors of the mean of the repeats (sd about 0.07-0.11 each,
    # M = 300 tail points). The estimator's own small-sample bias, measured with 400
    # repeats, is at most 0.01, under 1.5 of these standard errors.
    assert abs(z_mean(khats, _with_prior(k, n))) < Z_MAX


def _weyl(n):
    """The deterministic equidistributed sequence frac(i (sqrt(5) - 1) / 2), i = 1..n."""
    return torch.remainder(torch.arange(1, n + 1, dtype=torch.float64) * (5**0.5 - 1) / 2, 1.0)


# ArviZ 0.22 `psislw(log_weights)` on the same inputs (computed once, outside this project):
# k-hat, and the smoothed log weights of the two largest raw weights and of the first one.
ARVIZ = {
    "pareto": (0.6057070511810173, -2.907096846548532, -3.395200936542853, -6.949276177042641),
    "lognormal": (
        0.6325425061602725,
        -2.900795642618115,
        -3.180939080424698,
        -8.936422276819316,
    ),
    "mixed": (0.8859249359464191, -3.6581650284783462, -4.101534982601482, -4.674326640314912),
}


@pytest.mark.parametrize("case", sorted(ARVIZ))
def test_psis_khat_agrees_with_arviz(case):
    log_w = {
        "pareto": lambda: -0.7 * _weyl(500).log(),
        "lognormal": lambda: 2.0 * 2**0.5 * torch.erfinv(2 * _weyl(2000) - 1),
        "mixed": lambda: torch.log(_weyl(100) ** -0.3 + _weyl(100)),
    }[case]()
    k_hat, smoothed = psis_khat(log_w)
    top = torch.argsort(log_w)[-2:]
    got = (k_hat, float(smoothed[top[1]]), float(smoothed[top[0]]), float(smoothed[0]))
    assert got == pytest.approx(ARVIZ[case], rel=1e-9)


@pytest.mark.parametrize(
    ("k", "sigma", "log_tol"),
    [(-0.3, 1.0, 0.06), (0.2, 0.5, 0.06), (0.7, 3.0, 0.06), (1.2, 1.0, 0.2)],
)
def test_psis_khat_fits_an_exact_generalised_pareto_tail(k, sigma, log_tol):
    n = 10_000
    m = _tail_size(n)
    p = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    gpd = sigma * torch.expm1(-k * torch.log1p(-p)) / k  # quantiles of GPD(k, sigma)
    body = torch.linspace(0.01, 1.0, n - m, dtype=torch.float64).log()  # cut-off at log 1
    log_w = torch.cat((body, torch.log1p(gpd)))[torch.randperm(n)]
    k_hat, smoothed = psis_khat(log_w)
    # No Monte Carlo error: the tail is the exact quantile set, which the Zhang-Stephens
    # estimate reproduces to within 0.01 (its discretisation error at M = 300).
    assert k_hat == pytest.approx(_with_prior(k, n), abs=0.02)
    # Smoothing replaces the tail by quantiles of the fit, close to what was there already;
    # the prior's pull on k moves the largest weights by up to 5 % for k <= 0.7 and 17 % for
    # k = 1.2 (the body only shifts by the normalising constant).
    shift = smoothed[log_w < 0] - log_w[log_w < 0]
    assert torch.allclose(shift, shift[0].expand_as(shift), atol=1e-12)
    assert torch.allclose(smoothed - shift[0], log_w, atol=log_tol, rtol=0)


def test_psis_smoothing_keeps_the_body_the_order_and_the_largest_weight():
    log_w = 2.0 * torch.randn(2000, dtype=torch.float64)  # log-normal ratios, k-hat ~ 0.7
    k_hat, smoothed = psis_khat(log_w)
    assert math.isfinite(k_hat)
    assert float(smoothed.logsumexp(0)) == pytest.approx(0.0, abs=1e-12)
    order = torch.argsort(log_w)
    assert (smoothed[order].diff() >= -1e-12).all()  # monotone in the raw weights
    body = order[: 2000 - _tail_size(2000)]
    offset = smoothed[body] - log_w[body]
    assert torch.allclose(offset, offset[0].expand_as(offset), atol=1e-12)  # body untouched
    assert float((smoothed - offset[0]).max()) <= float(log_w.max()) + 1e-12
    tail = order[2000 - _tail_size(2000) :]
    assert not torch.allclose(smoothed[tail] - offset[0], log_w[tail])  # the tail is smoothed


def test_psis_khat_of_constant_weights_is_minus_infinity():
    k_hat, smoothed = psis_khat(torch.full((100,), 3.0))
    assert k_hat == -math.inf
    assert torch.allclose(smoothed, torch.full((100,), -math.log(100)))
    assert "trustworthy" in read_khat(k_hat) and "not" not in read_khat(k_hat)


def test_psis_khat_warns_when_ties_leave_too_small_a_tail():
    log_w = torch.cat((torch.zeros(80), torch.ones(30), torch.tensor([2.0, 3.0, 4.0])))
    with pytest.warns(RuntimeWarning, match="distinct weights"):
        assert psis_khat(log_w)[0] == math.inf


def test_psis_khat_accepts_zero_weights():
    log_w = torch.randn(1000, dtype=torch.float64)
    log_w[:10] = -math.inf
    k_hat, smoothed = psis_khat(log_w)
    assert math.isfinite(k_hat) and (smoothed[:10] == -math.inf).all()


@pytest.mark.parametrize(
    ("log_w", "error", "match"),
    [
        ([0.0] * 30, TypeError, "must be a tensor"),
        (torch.zeros(30, 2), ValueError, r"shape \(n,\)"),
        (torch.zeros(20), ValueError, "at least 21"),
        (torch.tensor([math.nan] + [0.0] * 29), ValueError, "NaN"),
        (torch.tensor([math.inf] + [0.0] * 29), ValueError, r"\+inf"),
        (torch.full((30,), -math.inf), ValueError, "all -inf"),
    ],
)
def test_psis_khat_validates_its_input(log_w, error, match):
    with pytest.raises(error, match=match):
        psis_khat(log_w)


def _log_standard_normal(theta):
    return torch.distributions.Normal(0.0, 1.0).log_prob(theta).sum(-1) + 4.0  # unnormalised


def test_vi_khat_flags_a_too_narrow_gaussian():
    # q = N(0, s^2 I), p = N(0, I): w ∝ exp(|theta|^2 (1/s^2 - 1) / 2) has tail index
    # 1 / (1 - s^2), so k = 1 - s^2 = 0.75 for s = 0.5 (Yao et al. 2018).
    family = DiagonalGaussian(torch.zeros(2), 0.5)
    khats = torch.tensor([vi_khat(family, _log_standard_normal, seed=s) for s in range(20)])
    # Tolerance: Z_MAX standard errors of the mean of 20 seeds (sd about 0.14 each).
    assert abs(z_mean(khats, _with_prior(0.75, 4000))) < Z_MAX
    assert float(khats.mean()) > 0.7
    assert "not trustworthy" in read_khat(float(khats.mean()))


def test_vi_khat_of_a_wider_gaussian_is_well_below_one_half():
    # q wider than p: bounded weights; near their maximum P(w > w_max - e) ∝ e^(D/2), so the
    # generalised Pareto shape is k = -2/D = -1 for D = 2.
    family = DiagonalGaussian(torch.zeros(2), 1.2)
    khats = torch.tensor([vi_khat(family, _log_standard_normal, seed=s) for s in range(10)])
    # Tolerance: Z_MAX standard errors of the mean of 10 seeds (sd about 0.07 each).
    assert abs(z_mean(khats, _with_prior(-1.0, 4000))) < Z_MAX
    assert (khats < 0.5).all()


def test_vi_khat_of_the_target_itself():
    family = DiagonalGaussian(torch.zeros(2), 1.0)
    state = torch.get_rng_state()
    k_hat = vi_khat(family, lambda theta: family.log_prob(theta) + 2.0, seed=5)
    assert k_hat < 0.0
    assert torch.equal(state, torch.get_rng_state())


def test_vi_khat_takes_any_object_with_the_sample_protocol():
    class Sampler:
        def sample(self, n):
            theta = 0.5 * torch.randn(n, 1)
            return theta, torch.distributions.Normal(0.0, 0.5).log_prob(theta).sum(-1)

    with torch.random.fork_rng():
        torch.manual_seed(3)
        theta, log_q = Sampler().sample(4000)
    expected = psis_khat((_log_standard_normal(theta) - log_q).double())[0]
    assert vi_khat(Sampler(), _log_standard_normal, seed=3) == expected

    check = vi_importance(Sampler(), _log_standard_normal, seed=3)
    assert check.khat == expected  # the same draws as vi_khat
    weights = (_log_standard_normal(theta) - log_q).double()
    by_hand = float(weights.logsumexp(0).mul(2).exp() / (2 * weights).logsumexp(0).exp()) / 4000
    assert check.ess_fraction == pytest.approx(by_hand, rel=1e-9)
    assert 0.0 < check.ess_fraction < 1.0  # q = N(0, 0.5^2) is too narrow for N(0, 1)

    class Broken:
        def sample(self, n):
            return torch.randn(n, 1)

    with pytest.raises(TypeError, match="must return a pair"):
        vi_khat(Broken(), _log_standard_normal)
    with pytest.raises(TypeError, match="`family`"):
        vi_khat(object(), _log_standard_normal)
    with pytest.raises(ValueError, match="`log_target` must return shape"):
        vi_khat(Sampler(), lambda theta: theta)
    with pytest.raises(ValueError, match="`n_samples`"):
        vi_khat(Sampler(), _log_standard_normal, n_samples=10)
    with pytest.raises(ValueError, match=r"\+inf"):
        vi_khat(Sampler(), lambda theta: torch.full((theta.shape[0],), math.inf))


@pytest.mark.parametrize(
    ("k", "reading"),
    [
        (0.4, "k-hat 0.40: the approximation is trustworthy"),
        (0.499, "k-hat 0.50: the approximation is trustworthy"),
        (0.5, "k-hat 0.50: good enough for most summaries"),
        (0.69, "k-hat 0.69: good enough for most summaries"),
        (0.7, "k-hat 0.70: not trustworthy: the approximation misses the posterior's tails"),
        (math.inf, "k-hat inf: not trustworthy"),
        (torch.tensor(-0.2), "k-hat -0.20: the approximation is trustworthy"),
    ],
)
def test_read_khat_uses_the_standard_thresholds(k, reading):
    assert read_khat(k).startswith(reading)


def test_read_khat_rejects_non_numbers():
    with pytest.raises(ValueError, match="NaN"):
        read_khat(math.nan)
    with pytest.raises(TypeError, match="`k`"):
        read_khat("0.3")


# --------------------------------------------------------------- posterior predictive


def test_autocorrelation_of_an_ar1_series():
    phi, n = 0.6, 20_000
    noise = torch.randn(n, dtype=torch.float64)
    x = torch.empty(n, dtype=torch.float64)
    x[0] = noise[0]
    for t in range(1, n):
        x[t] = phi * x[t - 1] + noise[t]
    # The lag-1 sample autocorrelation of an AR(1) has sd sqrt((1 - phi^2) / n) (Bartlett).
    assert abs(float(autocorrelation(x)) - phi) < Z_MAX * math.sqrt((1 - phi**2) / n)
    assert torch.isnan(autocorrelation(torch.ones(5)))
    with pytest.raises(ValueError, match="`lag`"):
        autocorrelation(x[:3], lag=3)


def test_posterior_predictive_summaries_and_quantiles_are_those_of_the_simulations():
    model = Normal(50)
    theta = torch.tensor([[0.0, 1.0], [1.0, 2.0], [0.5, 0.5]]).repeat(10, 1)
    y = model.run_and_observe(torch.tensor([0.4, 1.1]))[0][:, 0]  # (T + 1, 1) -> (T + 1,)
    result = posterior_predictive(model, theta, y, seed=7)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        sim = model.run_and_observe(theta)[0][..., 0]
    assert torch.equal(result.simulated[0], sim)
    for name, f in {
        "mean": lambda x: x.mean(-1),
        "std": lambda x: x.std(-1),
        "acf1": autocorrelation,
        "abs_acf1": lambda x: autocorrelation(x.abs()),
    }.items():
        check = result[0][name]
        assert torch.allclose(check.simulated, f(sim))
        assert torch.allclose(check.observed, f(y))
        below = (f(sim) <= f(y)).double().mean()
        assert float(check.quantile) == pytest.approx(float(below))
        assert float(check.p_value) == pytest.approx(min(1.0, 2 * min(below, 1 - below)))
    assert set(result[0]) == set(DEFAULT_SUMMARIES)
    assert "quantile" in str(result)


def test_posterior_predictive_quantile_is_uniform_under_the_true_model():
    model, truth, draws = Normal(30), torch.tensor([1.0, 2.0]), 99
    quantiles = []
    for _ in range(200):
        y = model.run_and_observe(truth)[0]
        check = posterior_predictive(model, truth.repeat(draws, 1), y)[0]["std"]
        quantiles.append(float(check.quantile))
    # y and the simulations are exchangeable: the quantile is uniform on {0, ..., 99} / 99,
    # mean 1/2; Z_MAX standard errors of the mean of 200 data sets.
    assert abs(z_mean(torch.tensor(quantiles), 0.5)) < Z_MAX
    # A model with a third of the data's spread never reaches the data's std.
    y = model.run_and_observe(torch.tensor([1.0, 6.0]))[0]
    wrong = posterior_predictive(model, truth.repeat(draws, 1), y)[0]["std"]
    assert float(wrong.quantile) == 1.0 and float(wrong.p_value) == 0.0


def test_posterior_predictive_with_feature_axes_and_own_summaries():
    model = GaussianMeans(40, dim=3, noise=1.0)
    y = model.run_and_observe(torch.zeros(3))
    summaries = {"max": lambda x: x.amax(-1), "first": lambda x: x[..., 0]}
    result = posterior_predictive(model, torch.zeros(25, 3), y, summaries=summaries)
    assert len(result) == 1 and set(result[0]) == {"max", "first"}
    check = result[0]["max"]
    assert check.simulated.shape == (25, 3) and check.observed.shape == (3,)
    assert check.quantile.shape == (3,) and check.p_value.shape == (3,)
    assert torch.equal(check.observed, y[0].amax(0))
    assert "max[2]" in str(result)


def test_posterior_predictive_ignores_failed_draws_in_quantiles():
    model = Normal(20)
    y = model.run_and_observe(torch.tensor([0.0, 1.0]))[0][:, 0]
    theta = torch.tensor([[0.0, 1.0]] * 9 + [[0.0, -1.0]])  # sigma < 0: a NaN draw
    check = posterior_predictive(model, theta, y)[0]["mean"]
    assert torch.isnan(check.simulated[-1])
    assert float(check.quantile) * 9 == pytest.approx(round(float(check.quantile) * 9))
    nan_data = posterior_predictive(model, theta, torch.full((21,), math.nan))[0]["mean"]
    assert torch.isnan(nan_data.quantile) and torch.isnan(nan_data.p_value)


@pytest.mark.parametrize(
    ("theta", "data", "summaries", "error", "match"),
    [
        (torch.zeros(3), torch.zeros(21), None, ValueError, r"`theta` must have shape \(B, D\)"),
        ([[0.0, 1.0]], torch.zeros(21), None, TypeError, "`theta`"),
        (torch.ones(3, 2), torch.zeros(22), None, ValueError, r"`data\[0\]`"),
        (torch.ones(3, 2), [torch.zeros(21)] * 2, None, ValueError, "2 output"),
        (torch.ones(3, 2), "y", None, TypeError, "`data`"),
        (torch.ones(3, 2), torch.zeros(21), {"id": lambda x: x}, ValueError, "summary 'id'"),
        (torch.ones(3, 2), torch.zeros(21), {"f": 3}, TypeError, "`summaries`"),
    ],
)
def test_posterior_predictive_validates_its_inputs(theta, data, summaries, error, match):
    with pytest.raises(error, match=match):
        posterior_predictive(Normal(20), theta, data, summaries=summaries)
    with pytest.raises(TypeError, match="`model`"):
        posterior_predictive(object(), torch.ones(3, 2), torch.zeros(20))


# ------------------------------------------------------------------- coverage and SBC

T, NOISE, DIM = 5, 2.0, 2


def _posterior_sampler(n_draws: int, overconfidence: float = 1.0):
    """Exact N(0, I) prior x N(theta, NOISE^2 I) likelihood posterior, sd scaled down."""
    precision = 1.0 + T / NOISE**2

    def calibrate(data):
        y = data[0] if isinstance(data, list) else data  # (T, DIM)
        mean = y.sum(0) / NOISE**2 / precision
        sd = precision**-0.5 / overconfidence
        return mean + sd * torch.randn(n_draws, DIM)

    return calibrate


def test_coverage_of_the_exact_posterior_matches_the_nominal_levels():
    n_datasets, n_draws = 1000, 1000
    model = GaussianMeans(T, DIM, NOISE)
    result = coverage(model, _standard_normal_prior(DIM), _posterior_sampler(n_draws), n_datasets)
    assert result.coverage.shape == (3, DIM) and result.hits.shape == (n_datasets, 3, DIM)
    assert result.ranks.shape == (n_datasets, DIM) and result.n_draws == n_draws
    # Binomial Monte Carlo error over 1000 data sets, Z_MAX standard errors (tests/stats.py).
    # Intervals from S = 1000 draws cover about level * (S - 1) / (S + 1): a bias below
    # 0.002, under 0.3 standard errors.
    for i, level in enumerate(result.levels.tolist()):
        for d in range(DIM):
            assert abs(z_proportion(result.hits[:, i, d], level)) < Z_MAX
    assert (result.z.abs() < Z_MAX).all()
    # SBC: ranks uniform on {0, ..., S}: mean S/2, and 102 of the 1001 values lie in the
    # outer 5 % on each side.
    u = result.ranks.double() / n_draws
    for d in range(DIM):
        assert abs(z_mean(u[:, d], 0.5)) < Z_MAX
        extreme = (result.ranks[:, d] <= 50) | (result.ranks[:, d] >= 950)
        assert abs(z_proportion(extreme, 102 / 1001)) < Z_MAX
    assert "level 0.95" in str(result)


def test_coverage_of_an_overconfident_posterior_is_clearly_below_nominal():
    n_datasets = 300
    prior = _standard_normal_prior(DIM)

    def simulate(theta):  # a plain callable simulator: data (T, DIM)
        return theta + NOISE * torch.randn(T, DIM)

    result = coverage(simulate, prior, _posterior_sampler(500, overconfidence=2.0), n_datasets)
    # Intervals half as wide as they should be cover P(|Z| < z_level / 2): 0.26, 0.48, 0.67
    # for levels 0.5, 0.8, 0.95, 8 to 22 standard errors below nominal.
    assert (result.z < -Z_MAX).all()
    normal = torch.distributions.Normal(0.0, 1.0)
    for i, level in enumerate(result.levels.tolist()):
        half_width = float(normal.icdf(torch.tensor((1 + level) / 2))) / 2
        expected = 2 * float(normal.cdf(torch.tensor(half_width))) - 1
        for d in range(DIM):  # binomial Monte Carlo error around the expected coverage
            assert abs(z_proportion(result.hits[:, i, d], expected)) < Z_MAX
    extreme = (result.ranks <= 25) | (result.ranks >= 475)
    assert float(extreme.double().mean()) > 0.3  # 0.1 if calibrated


def test_coverage_is_deterministic_given_seed():
    prior = _standard_normal_prior(DIM)
    model = GaussianMeans(T, DIM, NOISE)
    state = torch.get_rng_state()
    first = coverage(model, prior, _posterior_sampler(50), n_datasets=20, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    again = coverage(model, prior, _posterior_sampler(50), n_datasets=20, seed=3)
    assert torch.equal(first.ranks, again.ranks) and torch.equal(first.theta, again.theta)


def test_coverage_validates_its_inputs():
    prior, model = _standard_normal_prior(DIM), GaussianMeans(T, DIM, NOISE)
    good = _posterior_sampler(50)
    with pytest.raises(ValueError, match="`levels`"):
        coverage(model, prior, good, 5, levels=(0.5, 1.0))
    with pytest.raises(ValueError, match="`n_datasets`"):
        coverage(model, prior, good, 0)
    with pytest.raises(TypeError, match="`calibrate`"):
        coverage(model, prior, "posterior", 5)
    with pytest.raises(TypeError, match="`model_or_simulator`"):
        coverage(3, prior, good, 5)
    with pytest.raises(ValueError, match=r"draws \(S, 2\)"):
        coverage(model, prior, lambda y: torch.randn(50, 3), 5)
    sizes = iter([50, 60])
    with pytest.raises(ValueError, match="same S"):
        coverage(model, prior, lambda y: torch.randn(next(sizes), DIM), 2)
    with pytest.raises(ValueError, match="non-finite"):
        coverage(model, prior, lambda y: torch.full((50, DIM), math.nan), 2)
