r"""Choosing the weight w of a generalised posterior so that its credible sets mean what they say.

The target is $\pi_w(\theta \mid y) \propto \exp(-l(\theta, y) / w)\, \pi(\theta)$ (w
multiplies the KL in VI; a "learning rate" eta multiplying the loss elsewhere is 1 / w). With a
loss that is not the log-likelihood of a well-specified model, w sets the width of every
interval. Two choices, both from a bootstrap of the data:

- **generalised posterior calibration** (GPC; Syring and Martin, Biometrika 2019): w such
  that the level-alpha credible sets of the bootstrap data sets y*_b contain the point
  estimate theta_hat(y) a fraction alpha of the time, the bootstrap's estimate of their
  frequentist coverage;
- **information matching** (Lyddon, Holmes and Walker, Biometrika 2019): w such that the
  generalised posterior's covariance w H^{-1} matches the bootstrap (sandwich) covariance
  Sigma of the point estimate: w = tr(H) / tr(Sigma^{-1}) (in one dimension w = H Sigma).

How :meth:`WeightCalibration.choose` spends its budget, top to bottom:

1. theta_hat = argmin_theta L(theta, y), L the expected loss (over the simulator's noise):
   ``starts`` starting points fitted as one batch with Adam, one simulation per epoch and a
   learning rate decayed to 0; the best start by the loss averaged over simulations.
2. H, the Hessian of L at theta_hat, L averaged over at least 64 simulations (autograd;
   finite differences with common random numbers if the simulator cannot be differentiated
   twice).
3. B bootstrap data sets (moving blocks, or simulated from the model at theta_hat), and the
   B minimisers theta*_b as one batched optimisation: Newton steps with H from theta_hat.
4. Per candidate w, the Laplace approximation of each pi_w(. | y*_b): precision
   H / w + P_b (P_b the prior's), mean one Newton step from theta*_b; the coverage c(w) is
   the fraction of these sets holding theta_hat. c is computed for hundreds of w at no
   simulation cost, and w is the smallest with c(w) >= level.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from gradcal.bootstrap import (
    PerDatasetLoss,
    block_bootstrap,
    repeat_dataset,
    simulated_datasets,
)
from gradcal.regularisation import prior_log_prob
from gradcal.rng import seeded

__all__ = [
    "CALIBRATE",
    "RESAMPLE",
    "WeightCalibration",
    "WeightChoice",
    "chi2_quantile",
    "choose_w",
    "information_matching",
    "resolve_w",
]

logger = logging.getLogger("gradcal")

CALIBRATE = "calibrate"  # the value of ``w`` that asks for a calibrated weight
_METHODS = ("bootstrap", "information")
RESAMPLE = ("block", "iid", "parametric")  # the ways of resampling the data
_REGIONS = ("joint", "marginal")


def chi2_quantile(level: float, dof: int) -> float:
    """The ``level`` quantile of the chi-square distribution with ``dof`` degrees of freedom.

    Bisection on the regularised incomplete gamma function (no scipy needed).

    Example:
        >>> round(chi2_quantile(0.9, 1), 4), round(chi2_quantile(0.95, 2), 4)
        (2.7055, 5.9915)
    """
    low, high = 0.0, 10.0 * dof + 100.0
    half = torch.tensor(dof / 2.0, dtype=torch.float64)
    for _ in range(200):
        mid = 0.5 * (low + high)
        if (
            float(torch.special.gammainc(half, torch.tensor(mid / 2.0, dtype=torch.float64)))
            < level
        ):
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


@dataclass
class WeightChoice:
    """The chosen w and how it was reached.

    Attributes:
        w: the chosen weight (multiplying KL(q || prior); 1 / w is the learning rate).
        coverage: the bootstrap estimate of the coverage of level-``level`` credible sets at w.
        coverage_error: its Monte Carlo standard error, sqrt(c (1 - c) / B).
        level: the nominal level.
        w_information: the information-matching choice tr(H) / tr(Sigma^{-1}).
        method, resample, region: as asked.
        estimate: theta_hat (D,); hessian: H (D, D); bootstrap_estimates: (B, D).
        noise_ratio: the largest, over coordinates, ratio of the sd of theta_hat refitted
            on the same data to the bootstrap sd: the simulation and optimisation noise in
            the bootstrap spread (small is good; above 0.3 it inflates w noticeably).
        fits, simulations, seconds: the cost: point-estimate fits, simulated series
            (draws times repeats; 0 for an exact loss) and wall-clock seconds.
        curve: (w values, coverages) at which c(w) was evaluated.
    """

    w: float
    coverage: float
    coverage_error: float
    level: float
    w_information: float
    method: str
    resample: str
    region: str
    estimate: Tensor
    hessian: Tensor
    bootstrap_estimates: Tensor
    noise_ratio: float
    fits: int
    simulations: int
    seconds: float
    curve: tuple[Tensor, Tensor] = field(repr=False)

    def summary(self) -> str:
        """One line: the chosen w, its coverage estimate and the cost.

        Example:
            >>> c = WeightChoice(0.5, 0.9, 0.03, 0.9, 0.48, "bootstrap", "iid", "joint",
            ...     torch.zeros(1), torch.eye(1), torch.zeros(100, 1), 0.1, 101, 0, 1.5,
            ...     (torch.ones(1), torch.ones(1)))
            >>> c.summary()[:62]
            'w = 0.5 (bootstrap, iid): estimated coverage of 90% sets 0.900'
        """
        return (
            f"w = {self.w:.4g} ({self.method}, {self.resample}): estimated coverage of "
            f"{100 * self.level:.0f}% sets {self.coverage:.3f} +- {self.coverage_error:.3f} "
            f"over {self.bootstrap_estimates.shape[0]} bootstrap data sets; information "
            f"matching w = {self.w_information:.4g}; cost {self.fits} fits, "
            f"{self.simulations} simulations, {self.seconds:.1f} s"
        )

    def as_dict(self) -> dict[str, Any]:
        """The figures as plain numbers (for a run's diagnostics file)."""
        return {
            "w": self.w,
            "coverage": self.coverage,
            "coverage_error": self.coverage_error,
            "level": self.level,
            "w_information": self.w_information,
            "method": self.method,
            "resample": self.resample,
            "region": self.region,
            "n_bootstrap": int(self.bootstrap_estimates.shape[0]),
            "noise_ratio": self.noise_ratio,
            "fits": self.fits,
            "simulations": self.simulations,
            "seconds": self.seconds,
        }


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")


@dataclass(frozen=True)
class WeightCalibration:
    r"""Options of the choice of w; :meth:`choose` runs it. ``VI(w=WeightCalibration(...))``.

    Arguments:
        level: nominal level alpha of the credible sets (0 < alpha < 1).
        method: ``"bootstrap"`` (GPC: the smallest w whose bootstrap coverage reaches alpha)
            or ``"information"`` (information matching; coverage still reported).
        resample: ``"block"`` (moving-block bootstrap of the observed series, block length
            ``block_length``), ``"iid"`` (block length 1) or ``"parametric"`` (data sets
            simulated from the model at theta_hat; needs a loss with a ``model``; it does
            not see misspecification, so it gives about the model's own w).
        n_bootstrap: B, bootstrap data sets.
        block_length: for ``"block"``; None: round(T^(1/3)).
        region: ``"joint"`` (the ellipsoidal credible region of the Laplace approximation,
            as in Syring and Martin) or ``"marginal"`` (every coordinate's equal-tailed
            interval reaches alpha).
        repeats: simulations averaged per loss evaluation (None: 1 for a loss with
            ``exact = True``, else 8). More repeats: less simulation noise in theta*_b.
        starts: starting points of the fit of theta_hat (the first at ``init``).
        fit_epochs: Adam epochs of that fit (learning rate decayed to 0, in units of the
            prior's sd).
        newton_steps: steps of the bootstrap fits (the iterates of the second half are
            averaged for a simulated loss).
        init: starting point (D,) of the fit; None: the prior's mean.
        seed: seed of a private random stream.

    Example:
        >>> def loss(theta, y):          # Gaussian negative log-likelihood, known scale 1
        ...     return 0.5 * ((y - theta) ** 2).sum(-1)
        >>> loss.batched, loss.exact = True, True
        >>> prior = torch.distributions.Normal(torch.zeros(1), 10.0 * torch.ones(1))
        >>> y = torch.randn(200, generator=torch.Generator().manual_seed(1))
        >>> choice = WeightCalibration(resample="iid", n_bootstrap=200).choose(loss, prior, y)
        >>> 0.7 < choice.w < 1.4, 0.8 < choice.w_information < 1.25   # well specified: w ~ 1
        (True, True)
    """

    level: float = 0.9
    method: Literal["bootstrap", "information"] = "bootstrap"
    resample: Literal["block", "iid", "parametric"] = "block"
    n_bootstrap: int = 100
    block_length: int | None = None
    region: Literal["joint", "marginal"] = "joint"
    repeats: int | None = None
    starts: int = 4
    fit_epochs: int = 300
    newton_steps: int = 20
    init: Tensor | None = None
    seed: int | None = 0

    def __post_init__(self) -> None:
        if not isinstance(self.level, int | float) or not 0 < self.level < 1:
            raise ValueError(f"`level` must be a number in (0, 1), got {self.level!r}.")
        for name, value, allowed in (
            ("method", self.method, _METHODS),
            ("resample", self.resample, RESAMPLE),
            ("region", self.region, _REGIONS),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
        _check_int("n_bootstrap", self.n_bootstrap, 10)
        _check_int("starts", self.starts, 1)
        _check_int("fit_epochs", self.fit_epochs, 0)
        _check_int("newton_steps", self.newton_steps, 1)
        if self.block_length is not None:
            _check_int("block_length", self.block_length, 1)
        if self.repeats is not None:
            _check_int("repeats", self.repeats, 1)
        if self.init is not None and (not isinstance(self.init, Tensor) or self.init.ndim != 1):
            raise ValueError("`init` must be a tensor (D,) or None.")

    # --- the steps ------------------------------------------------------------------------

    def choose(self, loss: Any, prior: Any, data: Any) -> WeightChoice:
        """Choose w for ``loss`` (as for :class:`~gradcal.infer.VI`), ``prior`` and ``data``."""
        if self.resample == "parametric" and not hasattr(loss, "model"):
            raise ValueError(
                "resample='parametric' needs a loss with a `model` to simulate from (a gradcal "
                "loss builder); use 'block' or 'iid' for this loss."
            )
        started = time.perf_counter()
        exact = bool(getattr(loss, "exact", False))
        repeats = self.repeats or (1 if exact else 8)
        with seeded(self.seed):
            centre, scale = _prior_location(prior, self.init)
            theta_hat, fit_sims = self._fit_point(loss, prior, data, centre, scale, repeats)
            hessian, h_sims = _hessian(
                loss, data, theta_hat, scale, _hessian_repeats(repeats, exact), exact
            )
            datasets = self._datasets(loss, data, theta_hat)
            estimates, boot_sims = self._bootstrap_fits(
                loss, data, datasets, theta_hat, hessian, repeats, exact
            )
        theta_hat, noise, boot = (
            estimates[0],
            estimates[1 : _NOISE_ROWS + 1],
            estimates[_NOISE_ROWS + 1 :],
        )
        boot = _finite_fits(boot, theta_hat)
        w_info = information_matching(hessian, boot)
        coverage_at = self._coverage_function(prior, theta_hat, hessian, boot)
        ws = w_info * torch.logspace(-4, 4, 401, dtype=torch.float64)
        cover = torch.stack([coverage_at(w) for w in ws])
        w = (
            w_info
            if self.method == "information"
            else _smallest_reaching(ws, cover, coverage_at, self.level)
        )
        if not (math.isfinite(w) and w > 0):
            cause = (
                "the bootstrap estimates do not vary in some direction: the loss does not "
                "depend on the data there"
                if w_info == 0
                else "the loss may not identify every parameter (a flat or non-convex loss "
                "at the point estimate)"
            )
            raise RuntimeError(
                f"choosing w failed: the bootstrap gives w = {w} (information matching "
                f"{w_info}); {cause}: set `w` to a number instead."
            )
        c = float(coverage_at(w))
        spread = boot.std(0)
        noise_ratio = float((noise.std(0) / spread.clamp(min=1e-300)).max()) if not exact else 0.0
        if noise_ratio > 0.3:
            logger.warning(
                "choosing w: simulation noise in the bootstrap fits is %.2f of their spread; "
                "raise `repeats` for a less inflated w.",
                noise_ratio,
            )
        return WeightChoice(
            w=float(w),
            coverage=c,
            coverage_error=math.sqrt(max(c * (1 - c), 1e-12) / boot.shape[0]),
            level=float(self.level),
            w_information=float(w_info),
            method=self.method,
            resample=self.resample,
            region=self.region,
            estimate=theta_hat,
            hessian=hessian,
            bootstrap_estimates=boot,
            noise_ratio=noise_ratio,
            fits=self.starts + _NOISE_ROWS + 1 + self.n_bootstrap,
            simulations=fit_sims + h_sims + boot_sims,
            seconds=time.perf_counter() - started,
            curve=(ws, cover),
        )

    def _fit_point(
        self, loss: Any, prior: Any, data: Any, centre: Tensor, scale: Tensor, repeats: int
    ) -> tuple[Tensor, int]:
        """theta_hat: ``starts`` starts fitted as one batch (Adam, decaying rate); (D,)."""
        k = self.starts
        starts = (
            torch.cat([centre[None], prior.sample((k - 1,)).reshape(k - 1, -1).to(centre)])
            if k > 1
            else centre[None]
        )
        rows = PerDatasetLoss(loss, repeat_dataset(data, k))  # one simulation per epoch
        u = ((starts - centre) / scale).detach().requires_grad_()
        optimiser = torch.optim.Adam([u], lr=0.05)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda e: 0.5 * (1 + math.cos(math.pi * e / max(self.fit_epochs, 1)))
        )
        for _ in range(self.fit_epochs):
            optimiser.zero_grad()
            values = rows(centre + scale * u)
            torch.where(torch.isfinite(values), values, 0.0).sum().backward()
            optimiser.step()
            schedule.step()
        with torch.no_grad():
            theta = centre + scale * u.detach()
            final = PerDatasetLoss(loss, repeat_dataset(data, k), 4 * repeats)
            values = final(theta)
        best = int(torch.argmin(torch.where(torch.isfinite(values), values, math.inf)))
        return theta[best], rows.simulations + final.simulations

    def _datasets(self, loss: Any, data: Any, theta_hat: Tensor) -> Any:
        b = self.n_bootstrap
        if self.resample == "parametric":
            rows = theta_hat.expand(b, -1).contiguous()
            return simulated_datasets(
                loss.model, rows, data, getattr(loss, "gradient_horizon", None)
            )
        length = 1 if self.resample == "iid" else self.block_length
        return block_bootstrap(data, b, length)

    def _bootstrap_fits(
        self,
        loss: Any,
        data: Any,
        datasets: Any,
        theta_hat: Tensor,
        hessian: Tensor,
        repeats: int,
        exact: bool,
    ) -> tuple[Tensor, int]:
        """Minimisers for [y, y copies (noise), y*_1..y*_B] as one batch of Newton steps."""
        stacked = _concat(repeat_dataset(data, _NOISE_ROWS + 1), datasets)
        rows = PerDatasetLoss(loss, stacked, repeats)
        n = _NOISE_ROWS + 1 + self.n_bootstrap
        theta = theta_hat.expand(n, -1).clone()
        inverse = torch.linalg.inv(hessian).to(theta)
        step = 1.0 if exact else 0.5
        kept, total = [], self.newton_steps
        for i in range(total):
            point = theta.detach().requires_grad_()
            values = rows(point)
            (grad,) = torch.autograd.grad(
                torch.where(torch.isfinite(values), values, 0.0).sum(), point
            )
            delta = grad @ inverse.T
            # a step longer than 3 sds of the Laplace approximation (w = 1) is shortened
            length = torch.sqrt((delta @ hessian.to(theta) * delta).sum(-1).clamp(min=0))
            delta = delta * (3.0 / length.clamp(min=3.0))[:, None]
            theta = (theta - step * delta).detach()
            if exact or i >= total // 2:
                kept.append(theta)
        estimate = theta if exact else torch.stack(kept).mean(0)
        return estimate, rows.simulations

    def _coverage_function(
        self, prior: Any, theta_hat: Tensor, hessian: Tensor, boot: Tensor
    ) -> Any:
        """c(w): the fraction of bootstrap Laplace credible sets holding theta_hat."""
        grads, precisions = _prior_terms(prior, boot)
        h = hessian.to(torch.float64)
        target, boot = theta_hat.to(torch.float64), boot.to(torch.float64)
        d = boot.shape[1]
        if self.region == "joint":
            radius = chi2_quantile(self.level, d)
        else:
            z = float(
                torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + self.level / 2))
            )

        def coverage(w: Tensor | float) -> Tensor:
            precision = h / float(w) + precisions  # (B, D, D)
            mean = boot - torch.linalg.solve(precision, grads[..., None])[..., 0]
            gap = target - mean
            if self.region == "joint":
                distance = (gap * (precision @ gap[..., None])[..., 0]).sum(-1)
                return (distance <= radius).double().mean()
            sd = torch.linalg.inv(precision).diagonal(dim1=-2, dim2=-1).sqrt()
            return (gap.abs() <= z * sd).double().mean(0).min()

        return coverage


_NOISE_ROWS = 8  # refits of theta_hat on the observed data: the noise of the bootstrap fits


def _concat(a: Any, b: Any) -> Any:
    if isinstance(a, Tensor):
        return torch.cat([a, b.to(a)])
    return [torch.cat([x, y.to(x)]) for x, y in zip(a, b, strict=True)]


def _prior_location(prior: Any, init: Tensor | None) -> tuple[Tensor, Tensor]:
    """The start (the prior's mean or ``init``) and the prior's sd per coordinate: (D,), (D,)."""
    draws = prior.sample((2000,))
    draws = draws.reshape(2000, -1).to(torch.get_default_dtype())
    scale = draws.std(0)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, 1.0)
    if init is not None:
        return init.to(draws).reshape(-1), scale
    try:
        mean = prior.mean.reshape(-1).to(draws)
    except (AttributeError, NotImplementedError):
        mean = draws.mean(0)
    mean = torch.where(torch.isfinite(mean), mean, draws.median(0).values)
    return mean, scale


def _hessian_repeats(repeats: int, exact: bool) -> int:
    """Simulations averaged in the Hessian: its error enters every interval of pi_w."""
    return 1 if exact else max(64, 4 * repeats)


def _hessian(
    loss: Any, data: Any, theta: Tensor, scale: Tensor, repeats: int, exact: bool
) -> tuple[Tensor, int]:
    """The Hessian (D, D) of the loss averaged over ``repeats`` simulations, made positive
    definite (eigenvalues at least 1e-8 of the largest)."""
    rows = PerDatasetLoss(loss, repeat_dataset(data, 1), repeats)

    def mean_loss(t: Tensor) -> Tensor:
        return rows(t[None])[0]

    try:
        h = torch.autograd.functional.hessian(mean_loss, theta.detach())
        if not torch.isfinite(h).all():
            raise RuntimeError("the Hessian is not finite")
    except RuntimeError as error:
        logger.info("choosing w: no second derivative (%s); finite differences instead.", error)
        h = _hessian_differences(rows, theta, scale)
    h = 0.5 * (h + h.T)
    if not (torch.isfinite(h).all() and bool(h.abs().max() > 0)):
        raise RuntimeError(
            "choosing w failed: the loss has no finite curvature at the point estimate "
            f"{theta.tolist()} (Hessian {h.tolist()}): set `w` to a number instead."
        )
    values, vectors = torch.linalg.eigh(h)
    if bool((values <= 0).any()):
        logger.warning(
            "choosing w: the loss's Hessian at the point estimate is not positive definite "
            "(eigenvalues %s); the flat directions are set by the prior.",
            values.tolist(),
        )
    values = values.abs().clamp(min=1e-8 * float(values.abs().max()))
    return (vectors * values) @ vectors.T, rows.simulations


def _hessian_differences(rows: PerDatasetLoss, theta: Tensor, scale: Tensor) -> Tensor:
    """Central differences of the gradient, with the same random numbers on both sides."""
    d = theta.shape[0]
    columns = []
    for j in range(d):
        h = 1e-2 * float(scale[j])
        grads = []
        for sign in (1.0, -1.0):
            with torch.random.fork_rng():
                torch.manual_seed(1234 + j)
                point = (
                    theta.detach() + sign * h * torch.eye(d, dtype=theta.dtype)[j]
                ).requires_grad_()
                (g,) = torch.autograd.grad(rows(point[None])[0], point)
            grads.append(g)
        columns.append((grads[0] - grads[1]) / (2 * h))
    return torch.stack(columns, 1)


def _prior_terms(prior: Any, points: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient (B, D) and Hessian (B, D, D) of -log prior at each row (0 where not finite)."""
    points = points.to(torch.float64)

    def negative_log_prior(t: Tensor) -> Tensor:
        return -prior_log_prob(prior, t[None].to(torch.get_default_dtype()))[0].to(torch.float64)

    grads, hessians = [], []
    for row in points:
        g = torch.autograd.functional.jacobian(negative_log_prior, row)
        h = torch.autograd.functional.hessian(negative_log_prior, row)
        ok = bool(torch.isfinite(g).all() and torch.isfinite(h).all())
        grads.append(g if ok else torch.zeros_like(row))
        hessians.append(h if ok else torch.zeros(row.shape[0], row.shape[0], dtype=row.dtype))
    return torch.stack(grads), torch.stack(hessians)


def _finite_fits(boot: Tensor, theta_hat: Tensor) -> Tensor:
    """The bootstrap estimates (B, D) whose fit ended finite; an error when too few did."""
    finite = torch.isfinite(boot).all(-1)
    if not torch.isfinite(theta_hat).all() or int(finite.sum()) < max(10, boot.shape[0] // 2):
        raise RuntimeError(
            f"choosing w failed: {int((~finite).sum())} of {boot.shape[0]} bootstrap fits "
            f"(and the point estimate: {theta_hat.tolist()}) ended at NaN or infinite "
            "parameters, where the simulator or the loss fails: set `w` to a number instead."
        )
    if not bool(finite.all()):
        logger.warning(
            "choosing w: %d of %d bootstrap fits ended at NaN or infinite parameters and "
            "were left out.",
            int((~finite).sum()),
            boot.shape[0],
        )
    return boot[finite]


def information_matching(hessian: Tensor, estimates: Tensor) -> float:
    r"""Lyddon, Holmes and Walker's w: tr(H) / tr(Sigma^{-1}), Sigma the covariance of the
    bootstrap estimates (B, D); in one dimension w = H Sigma.

    It matches the Fisher information of the generalised posterior, H / w, to that of the
    bootstrap, Sigma^{-1}, in trace. Estimates that do not vary in some direction (a loss
    blind to the data there) have infinite information: w = 0.

    Example:
        >>> est = torch.tensor([[-1.0], [1.0], [-1.0], [1.0]])        # variance 4/3
        >>> round(information_matching(torch.tensor([[3.0]]), est), 6)
        4.0
        >>> information_matching(torch.tensor([[3.0]]), torch.ones(4, 1))
        0.0
    """
    sigma = torch.atleast_2d(torch.cov(estimates.T.to(torch.float64)))
    inverse, singular = torch.linalg.inv_ex(sigma)
    if bool(singular) or not torch.isfinite(inverse).all():
        return 0.0 if bool(torch.isfinite(sigma).all()) else math.nan
    return float(torch.trace(hessian.to(torch.float64)) / torch.trace(inverse))


def _smallest_reaching(ws: Tensor, cover: Tensor, coverage_at: Any, level: float) -> float:
    """The smallest w with c(w) >= level: the grid, then bisection in log w."""
    reached = (cover >= level).nonzero()
    if len(reached) == 0:
        logger.warning(
            "choosing w: no w reaches coverage %.2f (largest %.3f): the prior bounds the sets; "
            "taking the w of largest coverage.",
            level,
            float(cover.max()),
        )
        return float(ws[int(torch.argmax(cover))])
    i = int(reached[0])
    if i == 0:
        logger.warning("choosing w: coverage %.2f is reached at the smallest w tried.", level)
        return float(ws[0])
    low, high = math.log(float(ws[i - 1])), math.log(float(ws[i]))
    for _ in range(40):
        mid = 0.5 * (low + high)
        if float(coverage_at(math.exp(mid))) >= level:
            high = mid
        else:
            low = mid
    return math.exp(high)


def choose_w(loss: Any, prior: Any, data: Any, **options: Any) -> WeightChoice:
    """Choose w: ``WeightCalibration(**options).choose(loss, prior, data)``."""
    return WeightCalibration(**options).choose(loss, prior, data)


def resolve_w(w: Any, allow_zero: bool = True) -> tuple[float, WeightCalibration | None]:
    """Validate a ``w`` argument: a number >= 0 (> 0 unless ``allow_zero``), ``"calibrate"``
    or a :class:`WeightCalibration`.

    Returns (w, None) for a number and (NaN, the calibration) otherwise; the caller chooses
    w when it has the data.

    Example:
        >>> resolve_w(0.5)
        (0.5, None)
        >>> resolve_w("calibrate")[1].level
        0.9
    """
    if isinstance(w, WeightCalibration):
        return math.nan, w
    if isinstance(w, str) and w == CALIBRATE:
        return math.nan, WeightCalibration()
    number = isinstance(w, int | float) and not isinstance(w, bool)
    if not number or not (w >= 0 if allow_zero else w > 0):
        sign = ">=" if allow_zero else ">"
        raise ValueError(
            f'`w` must be a number {sign} 0, "calibrate" or a WeightCalibration, got {w!r}.'
        )
    return float(w), None
