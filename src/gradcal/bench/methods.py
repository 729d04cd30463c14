"""Benchmark methods: each one small class that turns (task, simulation budget, seed) into
posterior draws (or, for SMD, a point).

A method spends at most about ``sims`` simulator draws (theta values at which the loss is
evaluated; a gradient pass through a draw counts once), counted by :class:`CountingLoss`:

- ``vi-<estimator>-<family>``: :class:`~gradcal.infer.vi.VI` with the pathwise reverse,
  pathwise forward or score estimator and a diagonal Gaussian or a neural spline flow mapped
  onto the prior's support; 10 draws an epoch, sims / 10 epochs, no early stopping.
- ``mala``, ``hmc``: :class:`~gradcal.infer.mcmc.MCMC` with 8 chains started at prior draws,
  half the steps warm-up (step size and diagonal preconditioner adapted); HMC takes 5 leapfrog
  steps (5 draws) a transition.
- ``smd``: :class:`~gradcal.infer.smd.SMD` with 4 starts at prior draws (a point).
- ``is``: importance sampling from the prior
  (:func:`~gradcal.infer.reference.importance_sampling`).
- ``npe``: sbi's neural posterior estimation on sims prior simulations (summaries from the
  task), only when the ``sbi`` package is installed (``pip install 'gradcal[bench]'``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradcal.bench.tasks import Task
from gradcal.infer.mcmc import HMC, MALA, MCMC
from gradcal.infer.reference import importance_sampling
from gradcal.infer.smd import SMD
from gradcal.infer.vi import VI
from gradcal.posterior_estimators import Constrained, DiagonalGaussian, Flow
from gradcal.rng import seeded

__all__ = [
    "METHODS",
    "CountingLoss",
    "ImportanceSampling",
    "MCMCMethod",
    "Method",
    "MethodOutput",
    "NeuralPosteriorEstimation",
    "SMDMethod",
    "VIMethod",
    "make_method",
]

logger = logging.getLogger("gradcal")


class CountingLoss:
    """A batched loss that counts the draws it is evaluated at (``draws``).

    Example:
        >>> def loss(theta, y):
        ...     return theta.sum(-1)
        >>> loss.batched = True
        >>> counted = CountingLoss(loss)
        >>> _ = counted(torch.zeros(5, 2), None); _ = counted(torch.zeros(3, 2), None)
        >>> counted.draws
        8
    """

    batched = True

    def __init__(self, loss: Any):
        self.loss, self.draws = loss, 0
        self.exact = getattr(loss, "exact", False)

    def __call__(self, theta: Tensor, data: Any) -> Tensor:
        self.draws += theta.shape[0] if theta.ndim > 1 else 1
        return self.loss(theta, data)


@dataclass
class MethodOutput:
    """Posterior draws (n, D), or for a point method the point (D,) in ``point``."""

    samples: Tensor | None = None
    point: Tensor | None = None


class Method(ABC):
    """One calibration method: ``run(task, loss, sims, n_draws, seed)``."""

    name: str
    summary: str
    point = False  # True: returns a point, scored on its error only

    def unavailable(self) -> str | None:
        """Why this method cannot run here (a missing package), or None."""
        return None

    def prepare(self) -> None:  # noqa: B027 (most methods need none)
        """Set-up that is not the method's cost (imports): run before the timer starts."""

    @abstractmethod
    def run(
        self, task: Task, loss: CountingLoss, sims: int, n_draws: int, seed: int
    ) -> MethodOutput:
        """Calibrate ``task`` with at most about ``sims`` draws of ``loss``."""


class VIMethod(Method):
    """Generalised VI with one gradient estimator and one family."""

    samples_per_epoch = 10

    def __init__(self, estimator: str, family: str):
        self.estimator, self.family = estimator, family
        self.name = f"vi-{estimator}-{family}"
        kind = "diagonal Gaussian" if family == "gauss" else "neural spline flow"
        self.summary = f"VI, {estimator} gradient, {kind}"

    def make_family(self, task: Task) -> Constrained:
        """The family on the prior's support, N(0, I) (the flow: at the identity) before it."""
        d = task.dim
        if self.family == "gauss":
            base: Any = DiagonalGaussian(torch.zeros(d), 1.0)
        else:
            base = Flow(d, "nsf", transforms=2, hidden_features=(32, 32))
        return Constrained(base, task.supports)

    def run(
        self, task: Task, loss: CountingLoss, sims: int, n_draws: int, seed: int
    ) -> MethodOutput:
        with seeded(seed):
            q = self.make_family(task)
        epochs = max(1, sims // self.samples_per_epoch)
        vi = VI(
            loss,
            task.prior,
            q,
            w=task.w,
            optimizer=torch.optim.Adam(q.parameters(), lr=task.lr),
            gradient_clipping_norm=10.0,
            n_samples_per_epoch=self.samples_per_epoch,
            n_samples_regularisation=100,
            diff_mode="forward" if self.estimator == "forward" else "reverse",
            gradient_estimation_method="score" if self.estimator == "score" else "pathwise",
            progress_bar=False,
            seed=seed,
        )
        vi.run(task.data, epochs, max_epochs_without_improvement=epochs)
        if vi.best_estimator_state_dict is not None:
            q.load_state_dict(vi.best_estimator_state_dict)
        with seeded(seed + 1), torch.no_grad():
            return MethodOutput(samples=q.sample(n_draws)[0])


class MCMCMethod(Method):
    """MALA or HMC chains with warm-up adaptation."""

    chains = 8
    n_leapfrog = 5

    def __init__(self, kernel: str):
        self.kernel, self.name = kernel, kernel
        self.summary = "MALA" if kernel == "mala" else f"HMC, {self.n_leapfrog} leapfrog steps"

    def run(
        self, task: Task, loss: CountingLoss, sims: int, n_draws: int, seed: int
    ) -> MethodOutput:
        if self.kernel == "mala":
            kernel: Any = MALA(task.prior, loss, w=task.w)
            cost = 1
        else:
            kernel = HMC(task.prior, loss, w=task.w, n_leapfrog=self.n_leapfrog)
            cost = self.n_leapfrog
        steps = max(2, (sims - self.chains) // (self.chains * cost))
        warmup = steps // 2
        with seeded(seed):
            start = task.prior.sample((self.chains,)).reshape(self.chains, task.dim)
        mcmc = MCMC(kernel, num_samples=steps - warmup, progress_bar=False)
        mcmc.run(start, task.data, warmup=warmup, seed=seed)
        draws = mcmc.samples.reshape(-1, task.dim)  # (steps, C, D) -> time-major rows
        keep = torch.linspace(0, draws.shape[0] - 1, min(n_draws, draws.shape[0])).long()
        return MethodOutput(samples=draws[keep])


class SMDMethod(Method):
    """Simulated minimum distance from 4 prior draws; the best start's point."""

    name, point, starts = "smd", True, 4
    summary = "SMD (point estimate), 4 starts"

    def run(
        self, task: Task, loss: CountingLoss, sims: int, n_draws: int, seed: int
    ) -> MethodOutput:
        with seeded(seed):
            theta = task.prior.sample((self.starts,)).reshape(self.starts, task.dim)
        theta = theta.clone().requires_grad_()
        epochs = max(1, sims // self.starts)
        smd = SMD(loss, torch.optim.Adam([theta], lr=task.lr), progress_bar=False, seed=seed)
        best, _ = smd.run(task.data, n_epochs=epochs, max_epochs_without_improvement=epochs)
        return MethodOutput(point=best.detach())


class ImportanceSampling(Method):
    """Importance sampling from the prior, resampled to n_draws."""

    name, summary = "is", "importance sampling from the prior"

    def run(
        self, task: Task, loss: CountingLoss, sims: int, n_draws: int, seed: int
    ) -> MethodOutput:
        weighted = importance_sampling(
            loss, task.prior, task.data, sims, w=task.w, batch_size=500, seed=seed, min_ess=0
        )
        generator = torch.Generator().manual_seed(seed)
        return MethodOutput(samples=weighted.resample(n_draws, generator))


class _NoTracker:
    """sbi's training tracker protocol, recording nothing (its default writes TensorBoard
    logs into ``sbi-logs/`` of the working directory)."""

    log_dir = None

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        """Drop one figure."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Drop figures."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Drop the hyperparameters."""

    def add_figure(self, name: str, figure: Any, step: int | None = None) -> None:
        """Drop a figure."""

    def flush(self) -> None:
        """Nothing to write."""


class NeuralPosteriorEstimation(Method):
    """sbi's NPE trained on ``sims`` prior simulations of the task's summaries."""

    name, summary = "npe", "sbi NPE (gradient-free), task summaries"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("sbi") is None:
            return "the sbi package (>= 0.27) is not installed (pip install 'gradcal[bench]')"
        return None

    def prepare(self) -> None:
        """Import sbi (seconds, and memory that is not NPE's) before the timer starts."""
        import sbi.inference  # noqa: F401

    def run(
        self, task: Task, loss: CountingLoss, sims: int, n_draws: int, seed: int
    ) -> MethodOutput:
        from sbi.inference import NPE  # imported by prepare: a lookup here

        chatter = io.StringIO()  # sbi prints its training summary; it goes to the log
        with seeded(seed), contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sbi's advice on z-scoring and priors
            theta = task.prior.sample((sims,)).reshape(sims, task.dim)
            x = task.simulate(theta)
            loss.draws += sims
            keep = torch.isfinite(x).all(-1)
            inference = NPE(prior=task.prior, show_progress_bars=False, tracker=_NoTracker())
            inference.append_simulations(theta[keep].float(), x[keep].float())
            density = inference.train(show_train_summary=False, max_num_epochs=200)
            posterior = inference.build_posterior(density)
            samples = posterior.sample(
                (n_draws,), x=task.observed_summary.float(), show_progress_bars=False
            )
        logger.debug("sbi: %s", chatter.getvalue().strip())
        return MethodOutput(samples=samples.to(torch.get_default_dtype()))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        *(VIMethod(e, f) for e in ("reverse", "forward", "score") for f in ("gauss", "flow")),
        MCMCMethod("mala"),
        MCMCMethod("hmc"),
        SMDMethod(),
        ImportanceSampling(),
        NeuralPosteriorEstimation(),
    )
}


def make_method(name: str) -> Method:
    """The method called ``name`` (one of :data:`METHODS`)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}.")
    return METHODS[name]
