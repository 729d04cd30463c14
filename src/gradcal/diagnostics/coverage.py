"""Coverage and simulation-based calibration of a calibration routine."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradcal.diagnostics._checks import (
    check_int,
    check_seed,
    device_of,
)
from gradcal.rng import seeded
from gradcal.simulate import batch_of_draws

__all__ = ["Coverage", "coverage"]

logger = logging.getLogger("gradcal")


@dataclass(frozen=True)
class Coverage:
    """Result of :func:`coverage` over N data sets, L levels and D coordinates.

    Attributes:
        levels: nominal levels (L,).
        coverage: fraction of data sets whose true theta lies in the central interval (L, D).
        std_error: binomial standard error of ``coverage`` if the calibration were exact,
            sqrt(level (1 - level) / N) (L, 1).
        hits: whether each true theta was inside, (N, L, D) booleans.
        ranks: SBC ranks (N, D): how many of the S posterior draws lie below the true
            theta; uniform on {0, ..., S} for a calibrated routine.
        n_draws: S, the posterior draws per data set.
        theta: the true parameters (N, D).
    """

    levels: Tensor
    coverage: Tensor
    std_error: Tensor
    hits: Tensor
    ranks: Tensor
    n_draws: int
    theta: Tensor

    @property
    def z(self) -> Tensor:
        """(coverage - level) / std_error (L, D): beyond about +-3, miscalibrated."""
        return (self.coverage - self.levels[:, None]) / self.std_error

    def __str__(self) -> str:
        lines = []
        for i, level in enumerate(self.levels.tolist()):
            cells = ", ".join(f"{c:.3f}" for c in self.coverage[i].tolist())
            lines.append(
                f"level {level:.2f}: coverage [{cells}] (± {float(self.std_error[i, 0]):.3f})"
            )
        return "\n".join(lines)


def _prior_draws(prior: Any, n: int) -> Tensor:
    if not callable(getattr(prior, "sample", None)):
        raise TypeError(
            f"`prior` must be a torch distribution (with sample), got {type(prior).__name__}."
        )
    theta = prior.sample((n,))
    if theta.ndim == 1:
        theta = theta[:, None]
    if theta.ndim != 2:
        raise ValueError(
            f"`prior` must be over vectors theta (D,); its samples have shape "
            f"{tuple(theta.shape[1:])}."
        )
    return theta


def coverage(
    model_or_simulator: Any,
    prior: torch.distributions.Distribution,
    calibrate: Callable[[Any], Tensor],
    n_datasets: int = 100,
    levels: Sequence[float] = (0.5, 0.8, 0.95),
    seed: int | None = 0,
) -> Coverage:
    r"""Coverage of credible intervals and SBC ranks of a calibration routine.

    For data sets i = 1..N: draw $\theta^*_i \sim \pi$, simulate data
    $y_i$ at it, run ``calibrate(y_i)`` for posterior draws (S, D), and record per
    coordinate whether $\theta^*_i$ lies in the central interval of each level
    (quantiles (1 - level) / 2 and (1 + level) / 2 of the draws) and its rank among the
    draws (Talts et al., 2018). An exact posterior covers $\theta^*$ with
    probability equal to the level and gives uniform ranks; overconfident posteriors
    cover less and pile ranks up at 0 and S.

    Intervals from S draws cover a little less than their level even for the exact
    posterior (about level (S - 1) / (S + 1)); use S >> 1 / (1 - level).

    Arguments:
        model_or_simulator: a :class:`~gradcal.models.model.Model`, simulated at all
            $\theta^*$ in one batched call, each data set being the list of outputs
            ``run_and_observe`` returns for one draw; or a callable theta (D,) -> data.
        prior: distribution of $\theta^*$ over (D,) (``sample`` is all that is used).
        calibrate: data -> posterior draws (S, D); S must be the same for every data set.
        n_datasets: N.
        levels: nominal levels in (0, 1).
        seed: the prior draws, simulations and ``calibrate`` run in a forked random stream
            seeded with it (the caller's stream is untouched); None uses the global stream.

    Returns:
        A :class:`Coverage` (``print`` gives a table; ``.z`` the z-scores).

    References:
        Talts, Betancourt, Simpson, Vehtari & Gelman (2018), Validating Bayesian inference
        algorithms with simulation-based calibration. https://arxiv.org/abs/1804.06788

    Example:
        >>> prior = torch.distributions.Normal(torch.zeros(1), torch.ones(1))
        >>> def simulate(theta):                        # y ~ N(theta, 1)
        ...     return theta + torch.randn(1)
        >>> def calibrate(y):                           # exact posterior N(y / 2, 1 / 2)
        ...     return y / 2 + torch.randn(1000, 1) / 2**0.5
        >>> result = coverage(simulate, prior, calibrate, n_datasets=300)
        >>> bool((result.z.abs() < 4.5).all())
        True
    """
    if not callable(calibrate):
        raise TypeError(f"`calibrate` must be callable, got {type(calibrate).__name__}.")
    is_model = callable(getattr(model_or_simulator, "run_and_observe", None))
    if not is_model and not callable(model_or_simulator):
        raise TypeError(
            "`model_or_simulator` must be a gradcal Model or a callable theta (D,) -> data, "
            f"got {type(model_or_simulator).__name__}."
        )
    check_int(n_datasets, "n_datasets", 1)
    check_seed(seed)
    level_t = torch.as_tensor(levels, dtype=torch.float64).reshape(-1)
    if level_t.numel() == 0 or not ((level_t > 0) & (level_t < 1)).all():
        raise ValueError(f"`levels` must be a non-empty sequence in (0, 1), got {levels!r}.")
    device = device_of(prior, model_or_simulator) if is_model else device_of(prior)
    with seeded(seed, device), torch.no_grad():
        theta = _prior_draws(prior, n_datasets)
        if is_model:
            with batch_of_draws():  # (B, D), B = 1 included
                outputs = model_or_simulator.run_and_observe(theta)
            outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
            datasets: Any = ([o[i] for o in outputs] for i in range(n_datasets))
        else:
            datasets = (model_or_simulator(t) for t in theta)
        hits, ranks, n_draws = [], [], None
        for i, y in enumerate(datasets):
            draws = calibrate(y)
            if not isinstance(draws, Tensor) or draws.ndim not in (1, 2):
                shape = tuple(draws.shape) if isinstance(draws, Tensor) else type(draws).__name__
                raise ValueError(f"`calibrate` must return draws (S, D), got {shape}.")
            draws = draws[:, None] if draws.ndim == 1 else draws
            if draws.shape[1] != theta.shape[1] or (n_draws or draws.shape[0]) != draws.shape[0]:
                raise ValueError(
                    f"`calibrate` must return draws (S, {theta.shape[1]}) with the same S for "
                    f"every data set; data set {i} gave {tuple(draws.shape)}"
                    + (f", earlier ones S = {n_draws}." if n_draws else ".")
                )
            if not torch.isfinite(draws).all():
                raise ValueError(f"`calibrate` returned non-finite draws for data set {i}.")
            n_draws = draws.shape[0]
            draws, truth = draws.to(torch.float64), theta[i].to(draws.device, torch.float64)
            q = torch.cat(((1 - level_t) / 2, (1 + level_t) / 2)).to(draws.device)
            lo, hi = torch.quantile(draws, q, dim=0).chunk(2)  # (L, D) each
            hits.append(((lo <= truth) & (truth <= hi)).cpu())
            ranks.append((draws < truth).sum(0).cpu())
    hits_t = torch.stack(hits)
    std_error = (level_t * (1 - level_t) / n_datasets).sqrt()[:, None]
    result = Coverage(
        levels=level_t,
        coverage=hits_t.double().mean(0),
        std_error=std_error,
        hits=hits_t,
        ranks=torch.stack(ranks),
        n_draws=int(n_draws),
        theta=theta,
    )
    logger.info("coverage over %d data sets:\n%s", n_datasets, result)
    return result
