"""Posterior predictive checks: does the calibrated model reproduce the data?"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from gradcal.bootstrap import PerDatasetLoss, repeat_dataset, simulated_datasets
from gradcal.diagnostics._checks import (
    check_seed,
)
from gradcal.rng import seeded
from gradcal.simulate import batch_of_draws

__all__ = [
    "DEFAULT_SUMMARIES",
    "LossCheck",
    "PredictiveCheck",
    "SummaryCheck",
    "autocorrelation",
    "loss_check",
    "posterior_predictive",
]


def autocorrelation(series: Tensor, lag: int = 1) -> Tensor:
    r"""Sample autocorrelation at ``lag`` of series (..., T): (...,).

    $\sum_t (x_t - \bar x)(x_{t+L} - \bar x) / \sum_t (x_t - \bar x)^2$; NaN for a
    constant series.

    Example:
        >>> autocorrelation(torch.tensor([1.0, -1.0, 1.0, -1.0])).item()
        -0.75
    """
    if lag < 1 or lag >= series.shape[-1]:
        raise ValueError(f"`lag` must lie in [1, T - 1] = [1, {series.shape[-1] - 1}], got {lag}.")
    c = series - series.mean(-1, keepdim=True)
    return (c[..., lag:] * c[..., :-lag]).sum(-1) / (c**2).sum(-1)


def _mean(series: Tensor) -> Tensor:
    return series.mean(-1)


def _std(series: Tensor) -> Tensor:
    return series.std(-1)


def _acf1(series: Tensor) -> Tensor:
    return autocorrelation(series, 1)


def _abs_acf1(series: Tensor) -> Tensor:
    return autocorrelation(series.abs(), 1)


DEFAULT_SUMMARIES: Mapping[str, Callable[[Tensor], Tensor]] = MappingProxyType(
    {"mean": _mean, "std": _std, "acf1": _acf1, "abs_acf1": _abs_acf1}
)
"""The summaries of :func:`posterior_predictive`: series (..., T) -> (...,) each."""


@dataclass(frozen=True)
class SummaryCheck:
    """One summary of one output: simulated values (B, *f) and the observed value (*f).

    ``f`` are the output's feature axes (none for a scalar series).
    """

    simulated: Tensor
    observed: Tensor

    @property
    def quantile(self) -> Tensor:
        """Where the data falls: the fraction of finite simulated values <= observed (*f).

        NaN where the observed summary is not finite.
        """
        finite = torch.isfinite(self.simulated)
        below = (finite & (self.simulated <= self.observed)).sum(0) / finite.sum(0)
        return torch.where(torch.isfinite(self.observed), below, torch.nan)

    @property
    def p_value(self) -> Tensor:
        """Two-sided posterior predictive p-value, 2 min(P(sim <= obs), P(sim >= obs)) (*f)."""
        finite = torch.isfinite(self.simulated)
        above = (finite & (self.simulated >= self.observed)).sum(0) / finite.sum(0)
        return (2 * torch.minimum(self.quantile, above)).clamp_max(1.0)


@dataclass(frozen=True)
class PredictiveCheck:
    """Result of :func:`posterior_predictive`.

    ``checks[i][name]`` is the :class:`SummaryCheck` of summary ``name`` on output i
    (also ``result[i][name]``); ``simulated`` holds the simulated outputs (B, T, ...).
    """

    simulated: list[Tensor]
    checks: list[dict[str, SummaryCheck]]

    def __getitem__(self, index: int) -> dict[str, SummaryCheck]:
        return self.checks[index]

    def __len__(self) -> int:
        return len(self.checks)

    def __str__(self) -> str:
        lines = []
        for i, checks in enumerate(self.checks):
            lines.append(f"output {i}")
            for name, check in checks.items():
                obs, q = check.observed.reshape(-1), check.quantile.reshape(-1)
                sim = check.simulated.reshape(check.simulated.shape[0], -1)
                for j in range(obs.numel()):
                    s = sim[:, j][torch.isfinite(sim[:, j])]
                    label = name if obs.numel() == 1 else f"{name}[{j}]"
                    lines.append(
                        f"  {label:<12} observed {float(obs[j]):>10.4g}   simulated "
                        f"{float(s.mean()):>10.4g} ± {float(s.std()):<10.4g} "
                        f"quantile {float(q[j]):.2f}"
                    )
        return "\n".join(lines)


def _as_outputs(data: Any) -> list[Tensor]:
    if isinstance(data, Tensor):
        return [data]
    if isinstance(data, list | tuple) and data and all(isinstance(d, Tensor) for d in data):
        return list(data)
    raise TypeError(
        f"`data` must be a tensor or a non-empty list of tensors (T, ...), "
        f"got {type(data).__name__}."
    )


def _check_summaries(summaries: Any) -> Mapping[str, Callable[[Tensor], Tensor]]:
    if summaries is None:
        return DEFAULT_SUMMARIES
    if not isinstance(summaries, Mapping) or not summaries:
        raise TypeError(
            "`summaries` must be a non-empty dict name -> callable (series (..., T) -> (...)), "
            f"got {type(summaries).__name__}."
        )
    for name, f in summaries.items():
        if not isinstance(name, str) or not callable(f):
            raise TypeError(f"`summaries` must map str names to callables; got {name!r}: {f!r}.")
    return summaries


def _summary(f: Callable[[Tensor], Tensor], name: str, series: Tensor) -> Tensor:
    value = f(series)
    if not isinstance(value, Tensor) or value.shape != series.shape[:-1]:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"summary {name!r} must map series {tuple(series.shape)} (..., T) to "
            f"{tuple(series.shape[:-1])} (...), got {got}."
        )
    return value


def posterior_predictive(
    model: Any,
    theta: Tensor,
    data: Tensor | Sequence[Tensor],
    summaries: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    gradient_horizon: int | None = None,
    seed: int | None = None,
) -> PredictiveCheck:
    r"""Posterior predictive check: summaries of simulations at posterior draws vs the data.

    For every draw $\theta_b$ the model is run once (no gradients); each summary s is
    computed on every simulated series and on the observed one, and the check reports where
    s(y) falls among the $s(y^{rep}_b)$: the quantile
    $\frac1B \sum_b 1[s(y^{rep}_b) \le s(y)]$ and the two-sided p-value. Quantiles
    near 0 or 1 mean the calibrated model does not reproduce that feature of the data.

    The default summaries are the mean, standard deviation, lag-1 autocorrelation and
    lag-1 autocorrelation of absolute values of each series (for prices or levels, pass
    summaries of their increments instead, e.g. ``lambda x: x.diff(dim=-1).std(-1)``).

    Arguments:
        model: a :class:`~gradcal.models.model.Model` (``run_and_observe(theta)`` returns
            a list of outputs (B, T, ...)).
        theta: posterior draws (B, D).
        data: the observed outputs, a tensor or the list ``observe`` gives, each (T, ...),
            the shape of one simulated output without its draw axis.
        summaries: name -> callable mapping series (..., T) to (...); time is moved to the
            last axis first, so an output (B, T, f) gives summaries (B, f).
        gradient_horizon: passed to ``run_and_observe`` (values do not depend on it).
        seed: seed of the simulations in a forked random stream; None uses the global one.

    Returns:
        A :class:`PredictiveCheck`; ``result[i]["std"].quantile`` is the quantile of the
        data's standard deviation for output i. ``print(result)`` gives a table.

    Example:
        >>> from gradcal.models import Normal
        >>> model = Normal(200)
        >>> (y,) = model.run_and_observe(torch.tensor([0.0, 3.0]))
        >>> good = posterior_predictive(model, torch.tensor([[0.0, 3.0]]).repeat(100, 1), y)
        >>> bad = posterior_predictive(model, torch.tensor([[0.0, 1.0]]).repeat(100, 1), y)
        >>> 0.01 < float(good[0]["std"].quantile) < 0.99, float(bad[0]["std"].quantile)
        (True, 1.0)
    """
    if not callable(getattr(model, "run_and_observe", None)):
        raise TypeError(
            f"`model` must be a gradcal Model (with run_and_observe), got {type(model).__name__}."
        )
    if not isinstance(theta, Tensor) or not theta.is_floating_point():
        raise TypeError(f"`theta` must be a floating tensor (B, D), got {type(theta).__name__}.")
    if theta.ndim != 2 or theta.shape[0] < 1:
        raise ValueError(f"`theta` must have shape (B, D), got {tuple(theta.shape)}.")
    check_seed(seed)
    observed = _as_outputs(data)
    summaries = _check_summaries(summaries)
    with seeded(seed, theta.device), torch.no_grad(), batch_of_draws():  # B = 1 included
        simulated = model.run_and_observe(theta.detach(), gradient_horizon)
    simulated = [simulated] if isinstance(simulated, Tensor) else list(simulated)
    if len(simulated) != len(observed):
        raise ValueError(
            f"`data` holds {len(observed)} output(s) but the model returns {len(simulated)}."
        )
    # a (B, T, 1) output (BlackBIRDS' layout) is compared with (T,) data as (B, T)
    simulated = [
        s[..., 0] if s.ndim == o.ndim + 2 and s.shape[-1] == 1 else s
        for s, o in zip(simulated, observed, strict=True)
    ]
    checks = []
    for i, (sim, obs) in enumerate(zip(simulated, observed, strict=True)):
        if sim.ndim < 2 or obs.shape != sim.shape[1:]:
            raise ValueError(
                f"`data[{i}]` must have the shape of one simulated output (T, ...) = "
                f"{tuple(sim.shape[1:])}, got {tuple(obs.shape)}."
            )
        obs = obs.detach().to(sim)
        sim_series, obs_series = sim.movedim(1, -1), obs.movedim(0, -1)
        checks.append(
            {
                name: SummaryCheck(
                    _summary(f, name, sim_series), _summary(f, name, obs_series[None])[0]
                )
                for name, f in summaries.items()
            }
        )
    return PredictiveCheck(simulated, checks)


@dataclass(frozen=True)
class LossCheck:
    """The observed loss against its distribution under the fitted model.

    Attributes:
        observed: l(theta_i, y) at each posterior draw theta_i: (n,).
        replicated: l(theta_i, y_rep_i), y_rep_i simulated from the model at theta_i: (n,).
        p_value: the fraction of draws with replicated >= observed; small means the data
            are farther from the model, as the loss sees them, than the model's own data
            ever are: the model cannot reproduce the data (it is misspecified).
    """

    observed: Tensor
    replicated: Tensor
    p_value: float

    def reading(self, alpha: float = 0.01) -> str:
        """The check in plain words.

        Example:
            >>> LossCheck(torch.ones(4), torch.zeros(4), 0.0).reading()[:35]
            'the model cannot reproduce the data'
        """
        quantile = float((self.replicated < self.observed.median()).double().mean())
        if self.p_value < alpha:
            return (
                "the model cannot reproduce the data: the observed loss (median "
                f"{float(self.observed.median()):.4g}) is larger than in "
                f"{100 * quantile:.0f}% of data sets simulated from the fitted model "
                f"(p-value {self.p_value:.2g}). The posterior then describes the pseudo-true "
                "parameter, the best fit the model can give under this loss, and only a "
                'calibrated w (w = "calibrate", with an MMD or energy-distance loss, which '
                "stay robust to such misfit) gives intervals with their nominal coverage."
            )
        return (
            f"the observed loss is typical of data simulated from the fitted model "
            f"(p-value {self.p_value:.2g}): no sign of misspecification in the loss."
        )


def loss_check(loss: Any, draws: Tensor, data: Any, seed: int | None = 0) -> LossCheck:
    r"""Posterior predictive check of the loss itself.

    For each posterior draw theta_i (n, D): the observed loss l(theta_i, y) and the loss
    l(theta_i, y_rep_i) of a data set simulated from the model at theta_i; the p-value is
    $\#\{i: l(\theta_i, y^{rep}_i) \ge l(\theta_i, y)\} / n$. ``loss`` must have a
    ``model`` to simulate data from (every gradcal loss builder has one).

    Example:
        >>> from gradcal.losses import EnergyDistanceLoss
        >>> from gradcal.models import Normal
        >>> y = torch.cat([torch.zeros(1), 3 * torch.rand(100)])   # uniform, not normal
        >>> draws = torch.tensor([[0.0, 1.0]]).expand(50, 2)
        >>> check = loss_check(EnergyDistanceLoss(Normal(100)), draws, y)
        >>> check.p_value < 0.05
        True
    """
    if not hasattr(loss, "model"):
        raise TypeError(
            "`loss` must have a `model` to simulate data from (a gradcal loss builder)."
        )
    if not isinstance(draws, Tensor) or draws.ndim != 2:
        raise ValueError("`draws` must be posterior draws (n, D).")
    check_seed(seed)
    with seeded(seed), torch.no_grad():
        replicas = simulated_datasets(
            loss.model, draws, data, getattr(loss, "gradient_horizon", None)
        )
        n = draws.shape[0]
        observed = PerDatasetLoss(loss, repeat_dataset(data, n))(draws)
        replicated = PerDatasetLoss(loss, replicas)(draws)
    ok = torch.isfinite(observed) & torch.isfinite(replicated)
    p = float((replicated[ok] >= observed[ok]).double().mean()) if ok.any() else float("nan")
    return LossCheck(observed, replicated, p)
