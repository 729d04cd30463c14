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

No fit leaves the prior's support: the first fit runs in the unconstrained coordinates
u = T^{-1}(theta), T the map from R^D onto the support that the constrained families use
(:func:`torch.distributions.biject_to`: exp onto (0, inf), an affine sigmoid onto an
interval; the identity where the support is all of R^D), and a Newton step of a bootstrap
refit that would leave the support is halved until it does not. The Laplace sets are
taken in theta, where the posterior is reported.

0. theta_hat = argmin_theta L(theta, y), L the expected loss (over the simulator's noise):
   ``starts`` starting points fitted as one batch with Adam, one simulation per epoch and a
   learning rate decayed to 0; the best start by the loss averaged over simulations.
1. H, the Hessian of L at theta_hat. For an exact loss (``loss.exact``) autograd's Hessian
   when it is finite and positive definite. Otherwise, and always for a simulated loss,
   central second differences of L averaged over at least 64 simulations with common
   random numbers (the same seed at every point), steps ``curvature_step`` prior sds: a
   simulated loss may be piecewise linear in the simulated values (the energy distance),
   its draws piecewise constant in theta (Bernoulli agents), or its gradient a biased
   surrogate (straight-through), and autograd's Hessian of one simulation is then zero,
   indefinite or wrong, while differences of the averaged loss see the curvature of L
   itself (docs/choosing-w.md, "The curvature").
2. B bootstrap data sets (moving blocks, or simulated from the model at theta_hat), and the
   B minimisers theta*_b as one batched optimisation: Newton steps with H from theta_hat.
   A refit whose loss was not finite at some step is counted as failed, not kept.
3. Per candidate w, the Laplace approximation of each pi_w(. | y*_b): precision
   H / w + P_b (P_b the prior's), mean one Newton step from theta*_b; the coverage c(w) is
   the fraction of these sets holding theta_hat. c is computed for hundreds of w at no
   simulation cost, and w is the smallest with c(w) >= level.

A result that may be wrong (coverage not reached, noisy refits, refits left out, a Hessian
made positive definite) is said by :func:`~gradcal.problems.warn_problem` (a
``GradcalWarning``, a ``UserWarning``), so a Python user sees it; a result that is surely
wrong stops with ``RuntimeError("choosing w failed: ...")``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.distributions import Distribution, Transform, biject_to, constraints
from torch.distributions.transforms import StackTransform

from gradcal.bootstrap import (
    PerDatasetLoss,
    block_bootstrap,
    repeat_dataset,
    simulated_datasets,
)
from gradcal.distributed import broadcast_object, is_main
from gradcal.problems import warn_problem
from gradcal.regularisation import prior_log_prob
from gradcal.rng import seeded

__all__ = [
    "CALIBRATE",
    "RESAMPLE",
    "WeightCalibration",
    "WeightChoice",
    "chi2_quantile",
    "choose_w",
    "choose_w_once",
    "gradient_differences_hessian",
    "information_matching",
    "loss_differences_hessian",
    "resolve_w",
    "support_transform",
    "weight_choice_from_state",
    "weight_choice_state",
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
        estimate: theta_hat (D,); hessian: H (D, D); bootstrap_estimates: (B, D), failed
            refits left out.
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
        curvature_step: the steps of the second differences that estimate the curvature
            of a simulated loss, in prior sds (of the unconstrained coordinates).

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
    curvature_step: float = 0.05

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
        step = self.curvature_step
        if isinstance(step, bool) or not isinstance(step, int | float) or not 0 < step <= 1:
            raise ValueError(f"`curvature_step` must be a number in (0, 1], got {step!r}.")
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
            centre, scale, bijection = _prior_location(prior, self.init)
            u_hat, fit_sims = self._fit_point(loss, prior, data, centre, scale, bijection, repeats)
            theta_hat = bijection(u_hat[None])[0].detach()
            identity = torch.distributions.transforms.identity_transform
            hessian, h_sims = _hessian(
                PerDatasetLoss(loss, repeat_dataset(data, 1), _hessian_repeats(repeats, exact)),
                identity,
                theta_hat,
                self.curvature_step * _prior_sd(prior, theta_hat),
                exact,
            )
            datasets = self._datasets(loss, data, theta_hat)
            estimates, failed, boot_sims = self._bootstrap_fits(
                loss, data, datasets, theta_hat, hessian, bijection, repeats, exact
            )
        theta_hat, noise = estimates[0], estimates[1 : _NOISE_ROWS + 1]
        boot = _finite_fits(estimates[_NOISE_ROWS + 1 :], failed[_NOISE_ROWS + 1 :], theta_hat)
        w_info = information_matching(hessian, boot)
        if not (math.isfinite(w_info) and w_info > 0):
            _failed_w(w_info, w_info)
        coverage_at = self._coverage_function(prior, theta_hat, hessian, boot)
        ws = w_info * torch.logspace(-4, 4, 401, dtype=torch.float64)
        cover = torch.stack([coverage_at(w) for w in ws])
        w = (
            w_info
            if self.method == "information"
            else _smallest_reaching(ws, cover, coverage_at, self.level)
        )
        if not (math.isfinite(w) and w > 0):
            _failed_w(w, w_info)
        c = float(coverage_at(w))
        spread = boot.std(0)
        noise_ratio = float((noise.std(0) / spread.clamp(min=1e-300)).max()) if not exact else 0.0
        if noise_ratio > 0.3:
            _warn(
                f"simulation noise in the bootstrap fits is {noise_ratio:.2f} of their spread, "
                "which inflates w: raise `repeats` for a less inflated w."
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
        self,
        loss: Any,
        prior: Any,
        data: Any,
        centre: Tensor,
        scale: Tensor,
        bijection: Transform,
        repeats: int,
    ) -> tuple[Tensor, int]:
        """u_hat = T^{-1}(theta_hat): ``starts`` starts fitted as one batch (Adam, decaying
        rate) in the unconstrained coordinates; (D,)."""
        k = self.starts
        starts = centre[None]
        if k > 1:
            draws = _unconstrained(bijection, prior.sample((k - 1,)).reshape(k - 1, -1), centre)
            starts = torch.cat([starts, draws])
        rows = PerDatasetLoss(loss, repeat_dataset(data, k))  # one simulation per epoch
        z = ((starts - centre) / scale).detach().requires_grad_()
        optimiser = torch.optim.Adam([z], lr=0.05)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda e: 0.5 * (1 + math.cos(math.pi * e / max(self.fit_epochs, 1)))
        )
        for _ in range(self.fit_epochs):
            optimiser.zero_grad()
            values = rows(bijection(centre + scale * z))
            torch.where(torch.isfinite(values), values, 0.0).sum().backward()
            optimiser.step()
            schedule.step()
        with torch.no_grad():
            u = centre + scale * z.detach()
            final = PerDatasetLoss(loss, repeat_dataset(data, k), 4 * repeats)
            values = final(bijection(u))
        best = int(torch.argmin(torch.where(torch.isfinite(values), values, math.inf)))
        return u[best], rows.simulations + final.simulations

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
        bijection: Transform,
        repeats: int,
        exact: bool,
    ) -> tuple[Tensor, Tensor, int]:
        """Minimisers (n, D) for [y, y copies (noise), y*_1..y*_B] as one batch of Newton
        steps, kept inside the prior's support (a step that leaves it is halved until it
        does not), and which rows failed (n,): a row whose loss was not finite at some step
        got no Newton step there (its gradient is set to 0), so it did not fit."""
        stacked = _concat(repeat_dataset(data, _NOISE_ROWS + 1), datasets)
        rows = PerDatasetLoss(loss, stacked, repeats)
        n = _NOISE_ROWS + 1 + self.n_bootstrap
        theta = theta_hat.expand(n, -1).clone()
        failed = torch.zeros(n, dtype=torch.bool)
        inverse = torch.linalg.inv(hessian).to(theta)
        step = 1.0 if exact else 0.5
        kept, total = [], self.newton_steps
        for i in range(total):
            point = theta.detach().requires_grad_()
            values = rows(point)
            finite = torch.isfinite(values)
            (grad,) = torch.autograd.grad(torch.where(finite, values, 0.0).sum(), point)
            failed |= ~finite.cpu() | ~torch.isfinite(grad).all(-1).cpu()
            delta = grad @ inverse.T
            # a step longer than 3 sds of the Laplace approximation (w = 1) is shortened
            length = torch.sqrt((delta @ hessian.to(theta) * delta).sum(-1).clamp(min=0))
            delta = step * delta * (3.0 / length.clamp(min=3.0))[:, None]
            theta = _inside(bijection, theta.detach(), delta.detach())
            if exact or i >= total // 2:
                kept.append(theta)
        estimate = theta if exact else torch.stack(kept).mean(0)
        return estimate, failed, rows.simulations

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


def _warn(message: str) -> None:
    """Say that a choice of w may be wrong: a :class:`~gradcal.problems.GradcalWarning` at the
    user's line, and the log."""
    warn_problem(f"choosing w: {message}")


def _failed_w(w: float, w_info: float) -> None:
    """Stop: no positive finite w (information matching ``w_info``)."""
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


def _concat(a: Any, b: Any) -> Any:
    if isinstance(a, Tensor):
        return torch.cat([a, b.to(a)])
    return [torch.cat([x, y.to(x)]) for x, y in zip(a, b, strict=True)]


def support_transform(prior: Any, dim: int) -> Transform:
    """T: R^D -> the prior's support, coordinate by coordinate (torch's ``biject_to``).

    A :class:`~gradcal.priors.Product` maps each coordinate onto its marginal's support; a
    torch distribution onto its ``support``; a prior that is not a torch distribution (or
    whose support torch cannot map) is taken as unconstrained: the identity.

    Example:
        >>> prior = torch.distributions.Uniform(torch.zeros(2), torch.ones(2))
        >>> t = support_transform(prior, 2)
        >>> t(torch.zeros(1, 2))
        tensor([[0.5000, 0.5000]])
    """
    parts = getattr(prior, "supports", None)
    try:
        if isinstance(parts, list | tuple) and len(parts) == dim:
            return StackTransform([biject_to(c) for c in parts], dim=-1)
        if isinstance(prior, Distribution):
            support = prior.support
            if isinstance(support, constraints.independent):
                support = support.base_constraint
            return biject_to(support)
    except NotImplementedError:
        pass
    return torch.distributions.transforms.identity_transform


def _unconstrained(bijection: Transform, theta: Tensor, fallback: Tensor) -> Tensor:
    """u = T^{-1}(theta) (n, D), rows not finite there (a draw on a bound) set to ``fallback``."""
    u = bijection.inv(theta.to(fallback))
    return torch.where(torch.isfinite(u).all(-1, keepdim=True), u, fallback)


def _prior_location(prior: Any, init: Tensor | None) -> tuple[Tensor, Tensor, Transform]:
    """The start (the prior's mean or ``init``) and the prior's sd per coordinate, both in
    the unconstrained coordinates u = T^{-1}(theta), and T: (D,), (D,), T."""
    draws = prior.sample((2000,))
    draws = draws.reshape(2000, -1).to(torch.get_default_dtype())
    bijection = support_transform(prior, draws.shape[1])
    if init is not None:
        mean = init.to(draws).reshape(-1)
    else:
        try:
            mean = prior.mean.reshape(-1).to(draws)
        except (AttributeError, NotImplementedError):
            mean = draws.mean(0)
        mean = torch.where(torch.isfinite(mean), mean, draws.median(0).values)
    u = bijection.inv(draws)
    if u.shape != draws.shape:  # a support of another dimension (a simplex): not mapped
        bijection = torch.distributions.transforms.identity_transform
        u = draws
    u = u[torch.isfinite(u).all(-1)]
    centre = bijection.inv(mean[None])[0]
    if init is None or not torch.isfinite(centre).all():
        centre = torch.where(torch.isfinite(centre), centre, u.median(0).values)
    scale = u.std(0)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, 1.0)
    return centre, scale, bijection


def _prior_sd(prior: Any, like: Tensor) -> Tensor:
    """The prior's sd per coordinate (D,), 1 where it cannot be read."""
    draws = prior.sample((2000,)).reshape(2000, -1).to(like)
    sd = draws.std(0)
    return torch.where(torch.isfinite(sd) & (sd > 0), sd, 1.0)


def _inside(bijection: Transform, theta: Tensor, delta: Tensor, halvings: int = 40) -> Tensor:
    """theta - delta (n, D), each row's step halved until it stays inside the support (where
    T^{-1} is finite); a row that cannot move stays."""
    for _ in range(halvings):
        moved = theta - delta
        ok = torch.isfinite(bijection.inv(moved)).all(-1)
        if bool(ok.all()):
            return moved
        delta = torch.where(ok[:, None], delta, 0.5 * delta)
    moved = theta - delta
    return torch.where(torch.isfinite(bijection.inv(moved)).all(-1, keepdim=True), moved, theta)


def _hessian_repeats(repeats: int, exact: bool) -> int:
    """Simulations averaged in the Hessian: its error enters every interval of pi_w."""
    return 1 if exact else max(64, 4 * repeats)


def _hessian(
    rows: PerDatasetLoss, bijection: Transform, u: Tensor, steps: Tensor, exact: bool
) -> tuple[Tensor, int]:
    """The Hessian (D, D) in u of the loss averaged over ``rows.repeats`` simulations, made
    positive definite (eigenvalues at least 1e-8 of the largest).

    An exact loss: autograd's Hessian when it is finite and positive definite. Otherwise
    (a simulated loss always): :func:`loss_differences_hessian` of the averaged loss with
    common random numbers, steps ``steps`` (D,).
    """

    def mean_loss(v: Tensor) -> Tensor:
        return rows(bijection(v[None]))[0]

    h = None
    if exact:
        try:
            h = torch.autograd.functional.hessian(mean_loss, u.detach())
        except RuntimeError as error:  # no second derivative
            logger.info("choosing w: no autograd Hessian (%s); finite differences.", error)
        if h is not None and not _positive_definite(h):
            logger.info("choosing w: autograd's Hessian %s is not positive definite.", h.tolist())
            h = None
    if h is None:
        try:
            h = gradient_differences_hessian(mean_loss, u.detach(), steps)
            if not bool(torch.isfinite(h).all()):
                raise RuntimeError("a gradient that is not finite")
        except RuntimeError as error:  # no gradient: differences of the loss itself
            logger.info("choosing w: no gradient differences (%s); loss differences.", error)
            with torch.no_grad():
                h = loss_differences_hessian(mean_loss, u.detach(), steps)
    h = 0.5 * (h + h.T)
    if not (torch.isfinite(h).all() and bool(h.abs().max() > 0)):
        raise RuntimeError(
            "choosing w failed: the loss has no finite curvature at the point estimate "
            f"{bijection(u[None])[0].tolist()} (Hessian {h.tolist()}): set `w` to a number "
            "instead."
        )
    values, vectors = torch.linalg.eigh(h)
    if bool((values <= 0).any()):
        _warn(
            "the loss's Hessian at the point estimate is not positive definite (eigenvalues "
            f"{[round(v, 6) for v in values.tolist()]}); its flat or concave directions are "
            "given a small curvature and set by the prior, so w may be meaningless there."
        )
    values = values.abs().clamp(min=1e-8 * float(values.abs().max()))
    return (vectors * values) @ vectors.T, rows.simulations


def _positive_definite(h: Tensor) -> bool:
    if not bool(torch.isfinite(h).all()):
        return False
    return bool((torch.linalg.eigvalsh(0.5 * (h + h.T)) > 0).all())


def _common_stream_and_steps(u: Tensor, steps: Tensor) -> tuple[int, Tensor]:
    """One seed for every point of a difference scheme (drawn from the current stream: common
    random numbers) and the (D, D) matrix whose row j is the step h_j e_j."""
    seed = int(torch.randint(0, 2**62, ()))
    return seed, torch.eye(u.shape[0], dtype=u.dtype, device=u.device) * steps.to(u)[:, None]


def gradient_differences_hessian(loss: Any, u: Tensor, steps: Tensor) -> Tensor:
    r"""Central differences of autograd's gradient of a noisy loss with common random
    numbers: (D, D), symmetrised.

    Every point is evaluated on the same random stream (one seed, drawn from the current
    stream), so the simulation noise cancels in the differences:
    $H_{:, j} = (\nabla L(u + h_j e_j) - \nabla L(u - h_j e_j)) / (2 h_j)$, 2 D
    gradients. ``loss`` maps (D,) to a 0-d tensor.

    Example:
        >>> h = gradient_differences_hessian(lambda v: v[0] ** 2 + 3 * v[0] * v[1],
        ...                                  torch.zeros(2), torch.full((2,), 0.1))
        >>> [[round(x, 4) for x in row] for row in h.tolist()]
        [[2.0, 3.0], [3.0, 0.0]]
    """
    d = u.shape[0]
    seed, eye = _common_stream_and_steps(u, steps)

    def gradient(v: Tensor) -> Tensor:
        point = v.detach().requires_grad_()
        with seeded(seed), torch.enable_grad():
            (g,) = torch.autograd.grad(loss(point), point)
        return g.double()

    step = steps.to(device=u.device, dtype=torch.float64)
    h = torch.stack(
        [(gradient(u + eye[j]) - gradient(u - eye[j])) / (2 * step[j]) for j in range(d)], 1
    )
    return (0.5 * (h + h.T)).to(u.dtype)


def loss_differences_hessian(loss: Any, u: Tensor, steps: Tensor) -> Tensor:
    r"""Central second differences of a noisy loss with common random numbers: (D, D).

    Every point is evaluated on the same random stream (one seed, drawn from the current
    stream), so the simulation noise cancels in the differences. With
    $L_{\pm i} = L(u \pm h_i e_i)$ and $L_{\pm\pm ij} = L(u \pm h_i e_i
    \pm h_j e_j)$, 1 + D + D^2 points in all:

    $$
    H_{ii} = (L_{+i} - 2 L_0 + L_{-i}) / h_i^2, \quad
    H_{ij} = (L_{++ij} + L_{--ij} - L_{+i} - L_{-i} - L_{+j} - L_{-j} + 2 L_0) / (2 h_i h_j),
    $$

    both exact for a quadratic. ``loss`` maps (D,) to a 0-d tensor.

    Example:
        >>> h = loss_differences_hessian(lambda v: v[0] ** 2 + 3 * v[0] * v[1],
        ...                              torch.zeros(2), torch.full((2,), 0.1))
        >>> [[round(x, 4) for x in row] for row in h.tolist()]
        [[2.0, 3.0], [3.0, 0.0]]
    """
    d = u.shape[0]
    seed, eye = _common_stream_and_steps(u, steps)

    def at(v: Tensor) -> float:
        with seeded(seed):
            return float(loss(v).double())

    centre = at(u)
    plus = [at(u + eye[i]) for i in range(d)]
    minus = [at(u - eye[i]) for i in range(d)]
    h = torch.zeros(d, d, dtype=torch.float64)
    step = steps.to(torch.float64)
    for i in range(d):
        h[i, i] = (plus[i] - 2 * centre + minus[i]) / step[i] ** 2
        for j in range(i):
            both = at(u + eye[i] + eye[j]) + at(u - eye[i] - eye[j])
            edges = plus[i] + minus[i] + plus[j] + minus[j]
            h[i, j] = h[j, i] = (both - edges + 2 * centre) / (2 * step[i] * step[j])
    return h.to(u.dtype)


def _prior_terms(prior: Any, points: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient (B, D) and Hessian (B, D, D) of -log prior at each row of ``points`` (B, D)
    (0 where not finite)."""
    points = points.to(torch.float64)
    dtype = torch.get_default_dtype()

    def negative_log_prior(v: Tensor) -> Tensor:
        return -prior_log_prob(prior, v.to(dtype)).to(torch.float64)  # (B,)

    # rows are independent: one backward pass gives every row's gradient, D more the Hessians
    with torch.enable_grad():
        v = points.detach().requires_grad_()
        total = negative_log_prior(v).sum()
        grads = None
        if total.requires_grad:
            (grads,) = torch.autograd.grad(total, v, create_graph=True, allow_unused=True)
        grads = torch.zeros_like(points) if grads is None else grads
        columns = [
            torch.autograd.grad(grads[:, k].sum(), v, retain_graph=True, allow_unused=True)[0]
            if grads.requires_grad
            else None
            for k in range(points.shape[1])
        ]
    hessians = torch.stack(
        [c if c is not None else torch.zeros_like(points) for c in columns], -1
    ).detach()
    grads = grads.detach()
    ok = torch.isfinite(grads).all(-1) & torch.isfinite(hessians).all((-1, -2))
    return (
        torch.where(ok[:, None], grads, 0.0),
        torch.where(ok[:, None, None], hessians, 0.0),
    )


def _finite_fits(boot: Tensor, failed: Tensor, u_hat: Tensor) -> Tensor:
    """The bootstrap estimates (B, D) whose fit did not fail (a loss not finite at some step,
    or parameters not finite at the end); an error when too few are left."""
    ok = torch.isfinite(boot).all(-1) & ~failed.to(boot.device)
    if not torch.isfinite(u_hat).all() or int(ok.sum()) < max(10, boot.shape[0] // 2):
        raise RuntimeError(
            f"choosing w failed: {int((~ok).sum())} of {boot.shape[0]} bootstrap fits "
            f"(and the point estimate: {u_hat.tolist()}) "
            "ended at NaN or infinite parameters or met a loss that is not finite, where the "
            "simulator or the loss fails: set `w` to a number instead."
        )
    if not bool(ok.all()):
        _warn(
            f"{int((~ok).sum())} of {boot.shape[0]} bootstrap fits failed (a loss that is not "
            "finite, or parameters that are not) and were left out; if the loss fails on "
            "data sets that differ in kind from the rest, w is biased."
        )
    return boot[ok]


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
        _warn(
            f"no w reaches coverage {level:.2f} (largest {float(cover.max()):.3f}): the prior "
            "bounds the sets or the curvature is wrong; taking the w of largest coverage, "
            "whose intervals do not have their nominal coverage."
        )
        return float(ws[int(torch.argmax(cover))])
    i = int(reached[0])
    if i == 0:
        _warn(f"coverage {level:.2f} is reached at the smallest w tried; w may be too large.")
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


def weight_choice_state(choice: WeightChoice) -> dict[str, Any]:
    """A :class:`WeightChoice` as a checkpoint holds it: its fields, tensors on the CPU
    (loadable with ``weights_only=True``); :func:`weight_choice_from_state` reverses it."""
    state = {f.name: getattr(choice, f.name) for f in dataclasses.fields(choice)}
    for name, value in state.items():
        if isinstance(value, Tensor):
            state[name] = value.detach().cpu()
        elif isinstance(value, tuple):
            state[name] = tuple(v.detach().cpu() for v in value)
    return state


def weight_choice_from_state(state: dict[str, Any]) -> WeightChoice:
    """The :class:`WeightChoice` that :func:`weight_choice_state` wrote.

    Example:
        >>> c = WeightChoice(0.5, 0.9, 0.03, 0.9, 0.48, "bootstrap", "iid", "joint",
        ...     torch.zeros(1), torch.eye(1), torch.zeros(100, 1), 0.1, 101, 0, 1.5,
        ...     (torch.ones(1), torch.ones(1)))
        >>> weight_choice_from_state(weight_choice_state(c)).summary() == c.summary()
        True
    """
    return WeightChoice(**{**state, "curve": tuple(state["curve"])})


def choose_w_once(
    calibration: WeightCalibration, loss: Any, prior: Any, data: Any
) -> WeightChoice:
    """Choose w on rank 0 alone and broadcast the choice, so every rank runs at one w (in
    one process: ``calibration.choose``). What VI and MCMC do for ``w = "calibrate"``.

    An error on rank 0 is raised there and, naming it, on every other rank, so no rank
    waits for the others in a collective.
    """
    choice, error = None, None
    if is_main():
        try:
            choice = weight_choice_state(calibration.choose(loss, prior, data))
        except Exception as caught:  # re-raised below, after the other ranks hear of it
            error = caught
    message = None if error is None else f"{type(error).__name__}: {error}"
    choice, message = broadcast_object((choice, message))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"choosing w failed on rank 0: {message}")
    return weight_choice_from_state(choice)
