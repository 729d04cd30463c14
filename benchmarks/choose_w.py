"""Does a calibrated w give intervals that mean what they say? Coverage over replicated data.

The studies (``python benchmarks/choose_w.py STUDY [--replicates N]``):

- ``normal``: well specified. y_i ~ N(1, 1), n = 50, loss the negative log-likelihood with
  known scale, prior N(0, 10^2). Calibration (i.i.d. bootstrap) should give w ~ 1, and 90%
  intervals of pi_w should cover the true mean ~90% of the time (pi_w exact: Gaussian).
- ``normal-vi``: the same data sets, the intervals VI itself reports at the calibrated w
  (``VI(w=WeightCalibration(...))``, a Gaussian q; its best state, its last state, and the
  best state of a fit with ``stopping="smoothed"``).
- ``ar1``: misspecified. Data from x_t = 0.5 x_{t-1} + e_t with contaminated noise
  e_t ~ 0.9 N(0, 1) + 0.1 N(0, 5^2) (T = 60); model the Gaussian AR(1) (phi, sigma), loss
  the MMD of lag-2 windows (Gaussian kernel, fixed bandwidth 1.5). The target is the
  pseudo-true parameter, the minimiser of the expected loss, computed here in closed form
  (Gaussian integrals) with the data's law by a Monte Carlo of 1.2 x 10^6 windows. Intervals
  at the calibrated w (moving-block bootstrap), at w = 1 and at BlackBIRDS' tutorial w = 0.001.
  ``--region marginal`` (default) calibrates w for the marginal intervals and scores them;
  ``--region joint`` calibrates w for the joint 90% region (``WeightCalibration``'s
  default) and scores the Laplace ellipse (theta* - theta_hat)' (w H^-1)^-1 (.) <= chi2_2(0.9),
  the exact pi_w's 90% highest-density region and both constructions' marginal intervals.
  ``--first``/``--replicates`` split the data sets (seeds 2027 + r, the same for both).
- ``exact``: for the ar1 replicates of the logs given (``--logs``), the coverage of the
  exact pi_w's central 90% intervals and of its 90% highest-density region (the expected
  loss in closed form on a grid, no Laplace or variational approximation) at each
  calibrated w, at w = 1 and at w = 0.001.
- ``cost``: one calibration against one Gaussian VI fit of the same problem, side by side.
- ``brock-hommes``: the same for ``examples/brock_hommes/config.toml`` (VI with the
  example's settings), and the share of each step of the calibration in a profiled run.
- ``curvature``: the Hessian of the expected energy distance at the truth estimated from
  64 simulations by autograd, by differences of the gradient and by second differences of
  the loss (common random numbers), against its exact value, on ``Normal(100)`` and on six
  groups of Bernoulli walkers (``GroupWalkers``); ``--replicates`` seeds.
- ``walkers``: coverage of the walkers' true logits by the Laplace approximation of pi_w at
  the calibrated w (each logit's 90% interval, the joint 90% region) over replicated data
  sets, with a reduced budget; and the simulations each calibration cost.

In ``ar1`` the intervals are those of the Laplace approximation of pi_w at the point
estimate (precision H / w + prior's, the construction the calibration itself uses), and
in ``exact`` those of the exact pi_w; neither is a VI fit. ``--vi K`` also
fits Gaussian VI at the chosen w for the first K replicates and prints its sds beside them.
Monte Carlo error of a coverage p over R replicates: sqrt(p (1 - p) / R) (0.03 at R = 100,
0.042 at R = 50, 0.021 at R = 200 for p = 0.9).
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

import torch

from gradcal.bootstrap import PerDatasetLoss, repeat_dataset
from gradcal.infer import VI
from gradcal.infer.weight import WeightCalibration, chi2_quantile
from gradcal.losses import EnergyDistanceLoss, GaussianKernel, MMDLoss
from gradcal.models import AR1, Model, Normal
from gradcal.posterior_estimators import DiagonalGaussian, FullRankGaussian
from gradcal.relax import relaxed_bernoulli
from gradcal.rng import seeded

LEVEL = 0.9
Z = 1.6448536269514722  # the 0.95 quantile of N(0, 1): 90% equal-tailed intervals


# --- a six-parameter agent-based model: groups of Bernoulli walkers -----------------------


class GroupWalkers(Model):
    r"""G groups of N walkers; walker i of group g steps +1 with probability sigmoid(l_g),
    else -1 (straight-through Gumbel-softmax, :func:`gradcal.relax.relaxed_bernoulli`).

    Parameters: the G logits l_g. Observed: each group's mean position, (B, T + 1, G); the
    energy distance of its increments (``increments=True``) compares the per-step group
    means, i.i.d. over time with mean 2 sigmoid(l_g) - 1.
    """

    batched = True
    history_length = 1

    def __init__(self, n_timesteps: int = 200, groups: int = 6, walkers: int = 5):
        super().__init__()
        self.n_timesteps, self.groups, self.walkers = n_timesteps, groups, walkers
        self.n_params = groups

    def initialize(self, params: torch.Tensor) -> torch.Tensor:
        return params.new_zeros(params.shape[0], 1, self.groups)

    def step(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        logits = params[:, None, :].expand(-1, self.walkers, -1)
        up = relaxed_bernoulli(logits, tau=0.1, hard=True)
        return x[:, -1:] + (2.0 * up - 1.0).mean(1, keepdim=True)

    def observe(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]


WALKER_TRUTH = torch.tensor([-1.0, -0.5, 0.0, 0.3, 0.6, 1.0])
WALKER_PRIOR = torch.distributions.Normal(torch.zeros(6), 2.0 * torch.ones(6))


def walker_problem(
    seed: int, n_timesteps: int = 200, walkers: int = 5
) -> tuple[EnergyDistanceLoss, torch.Tensor]:
    """The loss and one observed series (T + 1, 6) simulated at ``WALKER_TRUTH``."""
    model = GroupWalkers(n_timesteps, walkers=walkers)
    with seeded(seed):
        (y,) = model.run_and_observe(WALKER_TRUTH)
    return EnergyDistanceLoss(model, increments=True), y


def walker_expected_loss(logits: torch.Tensor, y: torch.Tensor, walkers: int) -> torch.Tensor:
    """The expected energy distance of ``GroupWalkers``' increments, exactly (float64).

    A group's increment is (2K - N) / N, K ~ Binomial(N, sigmoid(l_g)), independently over
    groups and steps: E||D - y_t|| sums over the (N + 1)^G lattice, E||D - D'|| over the
    (2N + 1)^G lattice of differences. Up to the data's own term.
    """
    n, g = walkers, logits.shape[0]
    k = torch.arange(n + 1, dtype=torch.float64)
    p = torch.sigmoid(logits.double())[:, None]
    pmf = torch.exp(
        torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64))
        - torch.lgamma(k + 1)
        - torch.lgamma(n - k + 1)
        + k * torch.log(p)
        + (n - k) * torch.log1p(-p)
    )  # (G, N + 1)
    values = (2 * k - n) / n
    grid = torch.cartesian_prod(*[values] * g)  # (L, G)
    index = torch.cartesian_prod(*[torch.arange(n + 1)] * g)
    prob = pmf[torch.arange(g), index].prod(-1)
    steps = y.double().diff(dim=0)  # (T, G)
    exy = (prob[:, None] * torch.cdist(grid, steps)).sum(0).mean()
    outer = pmf[:, :, None] * pmf[:, None, :]  # (G, N + 1, N + 1): P(K = a, K' = b)
    diff_pmf = torch.stack([outer.diagonal(-d, 1, 2).sum(-1) for d in range(-n, n + 1)], 1)
    offsets = 2 * torch.arange(-n, n + 1, dtype=torch.float64) / n
    grid2 = torch.cartesian_prod(*[offsets] * g)
    index2 = torch.cartesian_prod(*[torch.arange(2 * n + 1)] * g)
    prob2 = diff_pmf[torch.arange(g), index2].prod(-1)
    exx = (prob2 * grid2.norm(dim=-1)).sum()
    return 2 * exy - exx


def normal_expected_loss(theta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The expected energy distance of ``Normal(n)`` (the sample 0, X_1..X_n, X_i ~
    N(mu, sigma^2)) to the observed points y (n + 1,), exactly, up to the data's term.

    E|X - a| = sigma (2 phi(z) + z (2 Phi(z) - 1)), z = (mu - a) / sigma; E|X - X'| =
    2 sigma / sqrt(pi); the within-sample mean leaves out the diagonal.
    """
    mu, sigma = theta.double()[0], theta.double()[1]
    y = y.double().reshape(-1)
    n, m = y.shape[0] - 1, y.shape[0]
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)

    def to(a: torch.Tensor) -> torch.Tensor:
        z = (mu - a) / sigma
        return sigma * (2 * normal.log_prob(z).exp() + z * (2 * normal.cdf(z) - 1))

    exy = (y.abs().sum() + n * to(y).sum()) / (m * m)
    exx = (
        2 * n * to(torch.zeros(1, dtype=torch.float64))[0]
        + n * (n - 1) * 2 * sigma / math.sqrt(math.pi)
    ) / (m * (m - 1))
    return 2 * exy - exx


def curvature_study(seeds: int, repeats: int = 64) -> None:
    """The curvature of the expected energy distance at the truth, estimated from R
    simulations by autograd, by differences of the gradient and by second differences of
    the averaged loss (both with common random numbers), against its exact value."""
    from gradcal.infer.weight import (  # not in older gradcal
        gradient_differences_hessian,
        loss_differences_hessian,
    )

    problems = []
    y_normal = torch.cat(
        [torch.zeros(1), 1.0 + 2.0 * torch.randn(100, generator=torch.Generator().manual_seed(1))]
    )
    problems.append(
        (
            "Normal(100)",
            EnergyDistanceLoss(Normal(100)),
            y_normal,
            torch.tensor([1.0, 2.0]),
            lambda t: normal_expected_loss(t, y_normal),
            (0.02, 0.1, 0.3, 1.0),
        )
    )
    walker_loss, y_walk = walker_problem(0, 200)
    problems.append(
        (
            "GroupWalkers (6 logits)",
            walker_loss,
            y_walk,
            WALKER_TRUTH.clone(),
            lambda t: walker_expected_loss(t, y_walk, 5),
            (0.02, 0.1, 0.3),
        )
    )
    for name, loss, y, theta, exact_loss, steps in problems:
        exact = torch.autograd.functional.hessian(exact_loss, theta.double())
        rows = PerDatasetLoss(loss, repeat_dataset(y, 1), repeats)

        def mean_loss(t, rows=rows):
            return rows(t[None])[0]

        print(
            f"{name}: exact Hessian eigenvalues "
            f"{[round(v, 4) for v in torch.linalg.eigvalsh(exact).tolist()]}",
            flush=True,
        )
        methods = {
            "autograd": lambda t=theta, f=mean_loss: torch.autograd.functional.hessian(f, t)
        }
        for h in steps:
            step = torch.full_like(theta, h)
            methods[f"gradient differences, h = {h}"] = lambda step=step, t=theta, f=mean_loss: (
                gradient_differences_hessian(f, t, step)
            )
            methods[f"loss differences, h = {h}"] = lambda step=step, t=theta, f=mean_loss: (
                loss_differences_hessian(f, t, step)
            )
        for label, method in methods.items():
            estimates, started = [], time.perf_counter()
            for seed in range(seeds):
                with seeded(seed):
                    estimates.append(method().double())
            seconds = (time.perf_counter() - started) / seeds
            h = torch.stack(estimates)
            norm = float(torch.linalg.norm(exact))
            error = torch.linalg.norm(h - exact, dim=(1, 2)) / norm
            bias = float(torch.linalg.norm(h.mean(0) - exact)) / norm
            spread = float(torch.linalg.norm(h.std(0))) / norm
            print(
                f"  {label}: relative error {float(error.mean()):.3f} (bias {bias:.3f}, "
                f"sd {spread:.3f}), {seconds:.2f} s each",
                flush=True,
            )


WALKER_CHEAP = {"n_bootstrap": 40, "repeats": 4, "newton_steps": 10, "fit_epochs": 60}


def walkers_study(replicates: int, first: int = 0, n_timesteps: int = 100) -> None:
    """Coverage of WALKER_TRUTH by the Laplace approximation of pi_w at the calibrated w
    (precision H / w plus the prior's, at theta_hat): each logit's 90% interval and the
    joint 90% region (chi2_6 radius), over replicated data sets (seed 5000 + r); the
    calibration's simulations and seconds. Reduced budget ``WALKER_CHEAP``, T = 100."""
    radius = chi2_quantile(LEVEL, 6)
    hits, joint, ratios, sims = torch.zeros(6), 0, [], []
    for r in range(first, first + replicates):
        loss, y = walker_problem(5000 + r, n_timesteps)
        options = WeightCalibration(seed=r, **WALKER_CHEAP)
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            choice = options.choose(loss, WALKER_PRIOR, y)
        seconds = time.perf_counter() - started
        precision = choice.hessian.double() / choice.w + torch.eye(6, dtype=torch.float64) / 4
        gap = (WALKER_TRUTH - choice.estimate).double()
        sd = torch.linalg.inv(precision).diagonal().sqrt()
        hit = gap.abs() <= Z * sd
        inside = float(gap @ precision @ gap) <= radius
        hits += hit.double()
        joint += inside
        ratios.append(choice.w / choice.w_information)
        sims.append(choice.simulations)
        said = [str(w.message)[:60] for w in record if "choosing w" in str(w.message)]
        print(
            f"replicate {r}: w {choice.w:.4g} (information {choice.w_information:.4g}), "
            f"marginal hits {hit.int().tolist()}, joint {int(inside)}, "
            f"{choice.simulations} simulations, {seconds:.0f} s, warnings {said}",
            flush=True,
        )
    n = replicates
    pooled = float(hits.sum()) / (6 * n)
    print(
        f"coverage over {n}: marginal per logit {[round(h / n, 2) for h in hits.tolist()]}, "
        f"pooled {pooled:.3f} +- {math.sqrt(pooled * (1 - pooled) / (6 * n)):.3f}; joint "
        f"{joint / n:.3f} +- {math.sqrt(max(joint / n * (1 - joint / n), 1e-12) / n):.3f}; "
        f"median w / w_info {sorted(ratios)[n // 2]:.3g}; simulations per calibration "
        f"{sorted(sims)[n // 2]}",
        flush=True,
    )


# --- the well-specified Normal location --------------------------------------------------


def normal_nll(theta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log N(y; theta, 1) summed over y (n,), up to a constant: theta (B, 1) -> (B,)."""
    return 0.5 * ((y - theta) ** 2).sum(-1)


normal_nll.batched = True
normal_nll.exact = True


def normal_study(replicates: int, n: int = 50) -> None:
    prior = torch.distributions.Normal(torch.zeros(1), 10.0 * torch.ones(1))
    generator = torch.Generator().manual_seed(2026)
    ws, covered, seconds = [], [], []
    for r in range(replicates):
        y = 1.0 + torch.randn(n, generator=generator)
        choice = WeightCalibration(resample="iid", n_bootstrap=200, seed=r).choose(
            normal_nll, prior, y
        )
        w = choice.w
        precision = n / w + 1 / 100  # the exact generalised posterior is Gaussian here
        mean = y.sum() / w / precision
        covered.append(abs(float(mean) - 1.0) <= Z / math.sqrt(precision))
        ws.append(w)
        seconds.append(choice.seconds)
    ws_t = torch.tensor(ws)
    p = sum(covered) / replicates
    print(f"normal: w per replicate {[round(w, 3) for w in ws]}")
    print(
        f"normal (n={n}, {replicates} replicates): w median {ws_t.median():.3f}, "
        f"quartiles {ws_t.quantile(0.25):.3f}-{ws_t.quantile(0.75):.3f}; coverage of 90% "
        f"intervals {p:.3f} +- {math.sqrt(p * (1 - p) / replicates):.3f}; "
        f"{sum(seconds) / replicates:.2f} s per calibration"
    )


def _vi_normal(prior, w, epochs: int, seed: int, stopping: str = "blackbirds") -> VI:
    q = DiagonalGaussian(torch.zeros(1))
    optimizer = torch.optim.Adam(q.parameters(), lr=0.05)
    return VI(
        normal_nll,
        prior,
        q,
        w=w,
        n_samples_per_epoch=20,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.01, epochs),
        progress_bar=False,
        seed=seed,
        stopping=stopping,
    )


def normal_vi_study(replicates: int, n: int = 50, epochs: int = 600) -> None:
    """The intervals VI reports at the calibrated w: ``VI(w=WeightCalibration(...))`` with a
    Gaussian q per replicate (w chosen inside ``VI.run``), the intervals the 5% and 95%
    quantiles of 4000 draws of q.

    Three states of q are scored: the best one under the default rule (lowest total of an
    epoch: what ``gradcal run`` reports), the last one (the learning rate decayed 100-fold
    by then), and the best one under ``stopping="smoothed"`` (a second fit at the same w).
    Step size and draws as in tests/test_weight.py; the data sets are ``normal``'s.
    """
    prior = torch.distributions.Normal(torch.zeros(1), 10.0 * torch.ones(1))
    generator = torch.Generator().manual_seed(2026)  # the data sets of ``normal_study``
    states = ("best", "last", "smoothed")
    hits = {state: [] for state in states}
    ratios = {state: [] for state in states}
    ws, started = [], time.perf_counter()
    for r in range(replicates):
        y = 1.0 + torch.randn(n, generator=generator)
        calibration = WeightCalibration(resample="iid", n_bootstrap=200, seed=r)
        vi = _vi_normal(prior, calibration, epochs, r)
        vi.run(y, n_epochs=epochs, max_epochs_without_improvement=epochs)
        smoothed = _vi_normal(prior, vi.w, epochs, r, stopping="smoothed")
        smoothed.run(y, n_epochs=epochs, max_epochs_without_improvement=epochs)
        exact_sd = 1 / math.sqrt(n / vi.w + 1 / 100)
        for state in ("last", "best", "smoothed"):  # the last state before loading the best
            q = (smoothed if state == "smoothed" else vi).posterior_estimator
            if state != "last":
                fit = smoothed if state == "smoothed" else vi
                q.load_state_dict(fit.best_estimator_state_dict)
            with torch.no_grad():
                draws = q.sample(4000)[0][:, 0]
            low, high = draws.quantile(torch.tensor([0.05, 0.95], dtype=draws.dtype)).tolist()
            hits[state].append(low <= 1.0 <= high)
            ratios[state].append(float(draws.std()) / exact_sd)
        ws.append(vi.w)
    seconds = (time.perf_counter() - started) / replicates
    ws_t = torch.tensor(ws)
    print(
        f"normal, VI at the calibrated w (n={n}, {replicates} replicates, {epochs} epochs x 20 "
        f"draws, load {os.getloadavg()[0]:.1f}): w median {ws_t.median():.3f}; "
        f"{seconds:.2f} s per calibration and two fits"
    )
    for state in states:
        p = sum(hits[state]) / replicates
        ratio = torch.tensor(ratios[state])
        print(
            f"  {state:>8} state of q: coverage of its 90% intervals {p:.3f} +- "
            f"{math.sqrt(p * (1 - p) / replicates):.3f}; its sd / the exact pi_w's sd: median "
            f"{ratio.median():.3f}, quartiles {ratio.quantile(0.25):.3f}-"
            f"{ratio.quantile(0.75):.3f}"
        )


# --- the misspecified AR(1) ---------------------------------------------------------------

PHI, T, BANDWIDTH, CONTAMINATION, WIDE = 0.5, 60, 1.5, 0.1, 5.0


def contaminated_ar1(
    n: int, generator: torch.Generator, burn_in: int = 100, series: int = 1
) -> torch.Tensor:
    """x_0..x_n of the data process, started at 0 and run ``burn_in`` steps first:
    (n + 1,), or (series, n + 1) independent series when ``series`` > 1."""
    steps = n + burn_in + 1
    noise = torch.randn(series, steps, generator=generator, dtype=torch.float64)
    wide = torch.rand(series, steps, generator=generator, dtype=torch.float64) < CONTAMINATION
    noise = torch.where(wide, WIDE * noise, noise)
    x = torch.zeros(series, steps, dtype=torch.float64)
    for t in range(1, steps):
        x[:, t] = PHI * x[:, t - 1] + noise[:, t]
    x = x[:, burn_in:]
    return x[0] if series == 1 else x


def _window_cov(phi: torch.Tensor, sigma: torch.Tensor, lag: torch.Tensor) -> torch.Tensor:
    """Cov of the lag-2 windows (x_i, x_i+1) and (x_j, x_j+1), j = i + lag: phi, sigma
    (G, 1), lag (L,) -> (G, L, 2, 2)."""
    s2 = (sigma**2 / (1 - phi**2))[..., None, None]
    a = phi ** lag.abs()
    b = phi ** (lag + 1).abs()
    c = phi ** (lag - 1).abs()
    return s2 * torch.stack([torch.stack([a, b], -1), torch.stack([c, a], -1)], -2)


def expected_loss(theta: torch.Tensor, data_windows: torch.Tensor, n: int) -> torch.Tensor:
    """E over simulations of the unbiased MMD^2 loss, up to the data-only term: theta (2,)
    -> 0-d, or (G, 2) -> (G,).

    Within-simulation pairs of windows i != j at lag d are jointly Gaussian:
    E k = det(I + V_d / h^2)^(-1/2), V_d = Var(X_i - X_j); averaged with weights (n - d).
    Cross term: E_X k(X, y) = det(I + S / h^2)^(-1/2) exp(-y' (S + h^2 I)^(-1) y / 2),
    averaged over the data windows (their law by Monte Carlo, or one data set's own).
    """
    one = theta.ndim == 1
    theta = theta.reshape(-1, 2)
    phi, sigma = theta[:, 0:1], theta[:, 1:2]  # (G, 1)
    h2 = BANDWIDTH**2
    eye = torch.eye(2, dtype=theta.dtype)
    lags = torch.arange(1, n, dtype=theta.dtype)
    zero = _window_cov(phi, sigma, torch.zeros(1, dtype=theta.dtype))[:, 0]  # (G, 2, 2)
    cross = _window_cov(phi, sigma, lags)  # (G, L, 2, 2)
    v = 2 * zero[:, None] - cross - cross.transpose(-1, -2)
    within = torch.linalg.det(eye + v / h2) ** -0.5  # (G, L)
    weights = (n - lags) / (n * (n - 1) / 2)
    kxx = (weights * within).sum(-1)
    inverse = torch.linalg.inv(zero + h2 * eye)  # (G, 2, 2)
    quad = torch.einsum("wi,gij,wj->gw", data_windows, inverse, data_windows)
    kxy = torch.linalg.det(eye + zero / h2) ** -0.5 * torch.exp(-0.5 * quad).mean(-1)
    out = kxx - 2 * kxy
    return out[0] if one else out


def pseudo_true(windows: int = 1_200_000) -> torch.Tensor:
    """argmin of the expected loss over (phi, sigma), by Newton's method in float64."""
    series = contaminated_ar1(T, torch.Generator().manual_seed(99), series=windows // T)
    data_windows = torch.stack([series[:, :-1], series[:, 1:]], -1).reshape(-1, 2)
    theta = torch.tensor([0.5, 1.4], dtype=torch.float64)
    for _ in range(8):  # Newton from near the answer: quadratic convergence
        grad = torch.autograd.functional.jacobian(
            lambda t: expected_loss(t, data_windows, T), theta
        )
        hess = torch.autograd.functional.hessian(
            lambda t: expected_loss(t, data_windows, T), theta
        )
        theta = theta - torch.linalg.solve(hess, grad)
    print(f"pseudo-true (phi, sigma) = {theta.tolist()}, |gradient| {grad.norm():.2e}", flush=True)
    return theta


# the study's budget per replicate (a 2-core machine shared by five sessions)
CHEAP = {"n_bootstrap": 40, "repeats": 4, "newton_steps": 10, "fit_epochs": 60, "starts": 2}


def ar1_problem(y: torch.Tensor) -> tuple[MMDLoss, torch.distributions.Distribution]:
    loss = MMDLoss(AR1(T), y, kernel=GaussianKernel(bandwidth=BANDWIDTH), window=2)
    prior = torch.distributions.Independent(
        torch.distributions.Uniform(torch.tensor([-0.99, 0.05]), torch.tensor([0.99, 5.0])), 1
    )
    return loss, prior


def ar1_study(replicates: int, n_vi: int, first: int = 0, region: str = "marginal") -> None:
    """Coverage over replicates ``first``.. of the data sets seeded 2027 + r.

    ``region="marginal"``: w calibrated for the marginal 90% intervals; scored, the
    Laplace intervals of phi and sigma. ``region="joint"`` (``WeightCalibration``'s
    default): w calibrated for the joint 90% region; scored, per w, whether the pseudo-true
    theta* lies in the Laplace region (theta* - mean)' Sigma^-1 (theta* - mean) <=
    chi2_2(0.9) (mean theta_hat, Sigma = w H^-1: the prior is flat), in the exact pi_w's 90%
    highest-density region (``exact_regions``), and in both constructions' marginal
    intervals. Data sets and calibration seeds are the same for both regions.
    """
    target = pseudo_true().float()
    names = ("calibrated", "w = 1", "w = 0.001")
    compared = {name: [] for name in names}
    exact = {name: [] for name in names}
    edges = {name: [] for name in names}  # the exact grids' mass on their edge
    radius = chi2_quantile(LEVEL, 2)
    ws, seconds, sims = [], [], []
    for r in range(first, first + replicates):
        y = contaminated_ar1(T, torch.Generator().manual_seed(2027 + r)).float()
        loss, prior = ar1_problem(y)
        calibration = WeightCalibration(resample="block", region=region, seed=r, **CHEAP)
        choice = calibration.choose(loss, prior, y)
        ws.append(choice.w)
        seconds.append(choice.seconds)
        sims.append(choice.simulations)
        sd1 = torch.linalg.inv(choice.hessian).diagonal().sqrt()  # the w = 1 sds
        gap = choice.estimate - target
        distance1 = float(
            gap.double() @ choice.hessian.double() @ gap.double()
        )  # the w = 1 Mahalanobis distance
        for name, w in zip(names, (choice.w, 1.0, 1e-3), strict=True):
            half = Z * sd1 * math.sqrt(w)
            hits = (gap.abs() <= half).tolist()
            if region == "joint":
                hits.append(distance1 / w <= radius)
                intervals, joint, edge = exact_regions(y, w, target, exact_half(w), target)
                edges[name].append(edge)
                marginal = [
                    lo <= float(t) <= hi for (lo, hi), t in zip(intervals, target, strict=True)
                ]
                exact[name].append([*marginal, joint])
            compared[name].append(hits)
        if r - first < n_vi:
            _vi_check(loss, prior, y, choice)
        done = torch.tensor(compared["calibrated"], dtype=torch.float64).mean(0).tolist()
        extra = ""
        if region == "joint":
            extra = f", exact {exact['calibrated'][-1]} (edge mass {edges['calibrated'][-1]:.1e})"
        print(
            f"  replicate {r}: w {choice.w:.4g} (info {choice.w_information:.4g}), "
            f"covered {compared['calibrated'][-1]}{extra}, w=1 {compared['w = 1'][-1]}, "
            f"w=0.001 {compared['w = 0.001'][-1]}; coverage so far {done}, "
            f"noise {choice.noise_ratio:.2f}, {choice.seconds:.0f} s, "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    ws_t = torch.tensor(ws)
    print(
        f"ar1, region={region} (replicates {first}-{first + replicates - 1}, {CHEAP}): "
        f"w median {ws_t.median():.4g}, quartiles {ws_t.quantile(0.25):.4g}-"
        f"{ws_t.quantile(0.75):.4g}; {sum(seconds) / replicates:.0f} s and "
        f"{sum(sims) / replicates:.0f} simulated series per calibration"
    )
    scored = [("Laplace", compared)] + ([("exact pi_w", exact)] if region == "joint" else [])
    for label, table in scored:
        for name, rows in table.items():
            p = torch.tensor(rows, dtype=torch.float64).mean(0)
            err = (p * (1 - p) / replicates).sqrt()
            parts = [f"{q:.3f} +- {e:.3f}" for q, e in zip(p.tolist(), err.tolist(), strict=True)]
            head = "(phi, sigma, joint)" if region == "joint" else "(phi, sigma)"
            print(f"  {label}, {name:>10}: coverage of 90% sets {head} = ({', '.join(parts)})")


def _ar1_vi(loss, prior, q, w: float) -> VI:
    """The Gaussian VI both AR(1) comparisons fit: 10 draws an epoch, Adam at 5e-3."""
    return VI(
        loss,
        prior,
        q,
        w=w,
        n_samples_per_epoch=10,
        optimizer=torch.optim.Adam(q.parameters(), lr=5e-3),
        progress_bar=False,
        seed=0,
    )


def _vi_check(loss, prior, y, choice) -> None:
    """Gaussian VI at the chosen w: its sds beside the Laplace ones."""
    q = FullRankGaussian(choice.estimate.clone(), 0.05)
    vi = _ar1_vi(loss, prior, q, choice.w)
    vi.run(y, n_epochs=1000, max_epochs_without_improvement=200)
    q.load_state_dict(vi.best_estimator_state_dict)
    with torch.no_grad():
        draws = q.sample(4000)[0]
    laplace = (choice.w * torch.linalg.inv(choice.hessian)).diagonal().sqrt()
    print(f"    VI sds {draws.std(0).tolist()} vs Laplace {laplace.tolist()}")


def cost_study(n_bootstrap: int) -> None:
    """One calibration and one VI fit of the same AR(1) problem, side by side."""
    y = contaminated_ar1(T, torch.Generator().manual_seed(5)).float()
    loss, prior = ar1_problem(y)
    started = time.perf_counter()
    choice = WeightCalibration(resample="block", n_bootstrap=n_bootstrap).choose(loss, prior, y)
    calibrate = time.perf_counter() - started
    q = FullRankGaussian(torch.tensor([0.0, 1.0]), 0.1)
    vi = _ar1_vi(loss, prior, q, choice.w)
    started = time.perf_counter()
    vi.run(y, n_epochs=1000, max_epochs_without_improvement=1000)
    fit = time.perf_counter() - started
    print(
        f"cost (load {os.getloadavg()[0]:.1f}): calibration {calibrate:.1f} s "
        f"({choice.simulations} simulated series), one VI fit of 1000 epochs x 10 draws "
        f"{fit:.1f} s (10000 series): ratio {calibrate / fit:.2f}; {choice.summary()}"
    )


BROCK_HOMMES = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "examples", "brock_hommes", "config.toml"
)
STAGES = {  # the steps of WeightCalibration.choose, by the function that runs each
    "point estimate (Adam, 4 starts)": "_fit_point",
    "Hessian (64 simulations)": "_hessian",
    "bootstrap Newton fits": "_bootstrap_fits",
    "coverage curve c(w)": "_coverage_function",
}


def brock_hommes_cost(path: str = BROCK_HOMMES) -> None:
    """The example's calibration against one VI fit with its settings, side by side, and
    the share of each step of the calibration in a second, profiled calibration."""
    import cProfile
    import pstats

    from gradcal.config import build, checked, read_toml
    from gradcal.runs import make_family, make_objective_from, weight_option

    config = checked(read_toml(path), os.path.dirname(path))
    built, method = build(config, os.path.dirname(path)), config["method"]
    calibration = weight_option(method, config["run"]["seed"])
    started = time.perf_counter()
    choice = calibration.choose(built.loss, built.prior, built.observed)
    calibrate = time.perf_counter() - started
    profile = cProfile.Profile()  # a second, profiled calibration: the share of each step
    profile.enable()
    calibration.choose(built.loss, built.prior, built.observed)
    profile.disable()
    stats = pstats.Stats(profile).stats
    stages = {
        stage: sum(v[3] for k, v in stats.items() if k[2] == name)
        for stage, name in STAGES.items()
    }
    profiled = sum(stages.values())
    q = make_family(method, built)
    vi = VI(
        built.loss,
        built.prior,
        q,
        w=choice.w,
        optimizer=torch.optim.Adam(q.parameters(), lr=method["learning_rate"]),
        gradient_clipping_norm=method["gradient_clipping_norm"],
        n_samples_per_epoch=method["samples_per_epoch"],
        n_samples_regularisation=method["n_samples_regularisation"],
        objective=make_objective_from(method),
        progress_bar=False,
        seed=config["run"]["seed"],
    )
    started = time.perf_counter()
    vi.run(built.observed, method["epochs"], method["patience"])
    fit = time.perf_counter() - started
    print(
        f"Brock-Hommes example (load {os.getloadavg()[0]:.1f}): calibration {calibrate:.1f} s "
        f"({choice.simulations} simulated series; {choice.summary()}), one VI fit of "
        f"{method['epochs']} epochs x {method['samples_per_epoch']} draws {fit:.1f} s "
        f"({method['epochs'] * method['samples_per_epoch']} series): ratio {calibrate / fit:.2f}"
    )
    print(
        "  calibration by step (share of a profiled run): "
        + "; ".join(f"{stage} {100 * t / profiled:.0f}%" for stage, t in stages.items())
    )


GRID = 121  # points per axis of the exact pi_w's grid


def exact_grid(y: torch.Tensor, w: float, around: torch.Tensor, half: torch.Tensor):
    """The exact pi_w (uniform prior) on a GRID x GRID grid: phis (GRID,), sigmas (GRID,), the
    normalised cell masses (GRID, GRID), and the log density (up to the same constant) as a
    function of theta (2,) -> 0-d.

    The expected loss over simulations is computed in closed form for this data set (the
    cross term averaged over its own windows), so this is the posterior VI aims at, with no
    Laplace or variational approximation. The grid spans ``around`` +- ``half`` (clipped
    to the prior's box).
    """
    windows = torch.stack([y[:-1], y[1:]], -1).double()
    lows = torch.maximum(around - half, torch.tensor([-0.99, 0.05])).double()
    highs = torch.minimum(around + half, torch.tensor([0.99, 5.0])).double()
    phis = torch.linspace(float(lows[0]), float(highs[0]), GRID, dtype=torch.float64)
    sigmas = torch.linspace(float(lows[1]), float(highs[1]), GRID, dtype=torch.float64)
    grid = torch.cartesian_prod(phis, sigmas)  # (GRID * GRID, 2), sigma fastest
    loss = torch.cat([expected_loss(g, windows, T) for g in grid.split(2000)]).reshape(GRID, GRID)
    least = loss.min()

    def log_density(theta: torch.Tensor) -> torch.Tensor:
        return -(expected_loss(theta.double(), windows, T) - least) / w

    post = torch.exp(-(loss - least) / w)
    return phis, sigmas, post / post.sum(), log_density


def exact_regions(
    y: torch.Tensor, w: float, around: torch.Tensor, half: torch.Tensor, point: torch.Tensor
) -> tuple[list[tuple[float, float]], bool, float]:
    """The exact pi_w's central 90% intervals for (phi, sigma), whether ``point`` (2,) lies
    in its 90% highest-density region, and the mass on the grid's edge.

    The region is {theta: pi_w(theta) >= c}, c the density at which the grid's cells,
    taken from the densest down, first hold 90% of the mass; the density at ``point`` is
    computed exactly (the closed-form expected loss there), not read off the grid.
    """
    phis, sigmas, post, log_density = exact_grid(y, w, around, half)
    out = []
    for marginal, values in ((post.sum(1), phis), (post.sum(0), sigmas)):
        cdf = marginal.cumsum(0)
        lo = values[int(torch.searchsorted(cdf, torch.tensor(0.05, dtype=cdf.dtype)))]
        hi = values[
            min(int(torch.searchsorted(cdf, torch.tensor(0.95, dtype=cdf.dtype))), GRID - 1)
        ]
        out.append((float(lo), float(hi)))
    masses = post.reshape(-1).sort(descending=True).values
    cut = int(torch.searchsorted(masses.cumsum(0), torch.tensor(LEVEL, dtype=masses.dtype)))
    threshold = masses[min(cut, masses.numel() - 1)]  # a cell mass: density x cell area
    peak = post.max()  # exp(log_density) is 1 at the grid's best cell, whose mass is peak
    covered = bool(torch.exp(log_density(point)) * peak >= threshold)
    edge = float(post[0].sum() + post[-1].sum() + post[:, 0].sum() + post[:, -1].sum())
    return out, covered, edge


def exact_intervals(y: torch.Tensor, w: float, around: torch.Tensor, half: torch.Tensor):
    """Central 90% intervals of the exact pi_w (see ``exact_grid``) and the edge's mass."""
    out, _, edge = exact_regions(y, w, around, half, around)
    return out, edge


def exact_half(w: float) -> torch.Tensor:
    """The grid's half-width: several sds of pi_w, which grow as sqrt(w) (the whole prior
    box for w > 0.05)."""
    if w > 0.05:
        return torch.tensor([2.0, 5.0])
    return torch.tensor([1.0, 1.5]) * math.sqrt(w / 0.004)


def exact_study(log_paths: list[str]) -> None:
    """Coverage of the exact pi_w's intervals at each replicate's calibrated w (from logs)."""
    import re

    target = pseudo_true()
    rows = []
    for path in log_paths:
        with open(path) as lines:
            for line in lines:
                m = re.match(r"\s+replicate (\d+): w ([0-9.e-]+)", line)
                if m:
                    rows.append((int(m.group(1)), float(m.group(2))))
    counts = {"calibrated": [], "w = 1": [], "w = 0.001": []}
    for r, w_cal in rows:
        y = contaminated_ar1(T, torch.Generator().manual_seed(2027 + r)).float()
        for name, w in (("calibrated", w_cal), ("w = 1", 1.0), ("w = 0.001", 1e-3)):
            intervals, joint, edge = exact_regions(y, w, target.float(), exact_half(w), target)
            hit = [lo <= float(t) <= hi for (lo, hi), t in zip(intervals, target, strict=True)]
            counts[name].append([*hit, joint])
            if name == "calibrated":
                print(
                    f"  replicate {r}: w {w:.4g}, exact intervals {intervals}, {hit}, "
                    f"in the 90% HPD region {joint}, mass on the grid's edge {edge:.1e}",
                    flush=True,
                )
    for name, hits in counts.items():
        p = torch.tensor(hits, dtype=torch.float64).mean(0)
        err = (p * (1 - p) / len(hits)).sqrt()
        print(
            f"  exact pi_w, {name:>10}: coverage (phi, sigma, joint HPD) = "
            f"({p[0]:.3f} +- {err[0]:.3f}, {p[1]:.3f} +- {err[1]:.3f}, "
            f"{p[2]:.3f} +- {err[2]:.3f}) over {len(hits)}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "study",
        choices=(
            "normal",
            "normal-vi",
            "ar1",
            "exact",
            "cost",
            "brock-hommes",
            "curvature",
            "walkers",
            "all",
        ),
        default="all",
    )
    parser.add_argument("--logs", nargs="*", default=[], help="ar1 logs read by 'exact'")
    parser.add_argument("--replicates", type=int, default=None)
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--vi", type=int, default=0, help="replicates also fitted by VI")
    parser.add_argument("--first", type=int, default=0, help="index of the first replicate")
    parser.add_argument(
        "--region",
        choices=("marginal", "joint"),
        default="marginal",
        help="ar1: the region w is calibrated for and scored by",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()}", flush=True)
    if args.study in ("normal", "all"):
        normal_study(args.replicates or 100)
    if args.study in ("normal-vi", "all"):
        normal_vi_study(args.replicates or 100)
    if args.study in ("ar1", "all"):
        ar1_study(args.replicates or 50, args.vi, args.first, args.region)
    if args.study == "curvature":
        curvature_study(args.replicates or 10)
    if args.study == "walkers":
        walkers_study(args.replicates or 20, args.first)
    if args.study == "exact":
        exact_study(args.logs)
    if args.study in ("cost", "all"):
        cost_study(args.bootstrap)
    if args.study in ("brock-hommes", "all"):
        brock_hommes_cost()
