r"""Gradient MCMC: MALA and HMC kernels, a runner with warm-up adaptation.

Every kernel targets the generalised posterior of the VI convention,

$$
\pi_w(\theta \mid y) \propto \pi(\theta) \exp(-l(\theta, y) / w),
$$

whose best approximation in a family is what :class:`~gradcal.infer.vi.VI` fits (with
l the negative log-likelihood and w = 1, the Bayesian posterior). BlackBIRDS' MALA used
$\exp(-l + w \log \pi)$ instead; gradcal keeps one convention everywhere.

Chains are a batch axis: a state (C, D) is C chains, advanced by one batched simulation
per gradient evaluation. A proposal whose loss or prior density is not finite is rejected.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from gradcal.distributed import (
    all_gather_objects,
    is_main,
    rank,
    reduce_epoch,
    shard,
    world_size,
)
from gradcal.gradients import BatchedLoss, Batching, loss_and_gradient
from gradcal.infer.convergence import (
    effective_sample_size,
    ess_bulk,
    ess_tail,
    rhat,
    split_rhat,
)
from gradcal.infer.weight import WeightChoice, choose_w_once, resolve_w
from gradcal.regularisation import check_prior, prior_dim, prior_log_prob
from gradcal.rng import seeded

# R-hat and ESS live in gradcal.infer.convergence; re-exported at their former path.
__all__ = [
    "HMC",
    "MALA",
    "MCMC",
    "effective_sample_size",
    "ess_bulk",
    "ess_tail",
    "rhat",
    "split_rhat",
]


class _Kernel:
    """Shared pieces: the log target and its gradient for a batch of chains."""

    default_target_accept = 0.65

    def __init__(
        self,
        prior: torch.distributions.Distribution,
        loss: Any,
        w: float = 1.0,
        gradient_clipping_norm: float = math.inf,
        diff_mode: str = "reverse",
        jacobian_chunk_size: int | None = None,
        gradient_horizon: int | None = None,
        device: str | torch.device = "cpu",
        batching: Batching = "auto",
    ):
        check_prior(prior)
        w, self.calibration = resolve_w(w, allow_zero=False)
        self.weight_choice: WeightChoice | None = None
        if diff_mode not in ("reverse", "forward"):
            raise ValueError(f"`diff_mode` must be 'reverse' or 'forward', got {diff_mode!r}.")
        self.prior, self.w = prior, w
        self.loss = BatchedLoss(loss, batching)
        self.gradient_clipping_norm = gradient_clipping_norm
        self.diff_mode, self.jacobian_chunk_size = diff_mode, jacobian_chunk_size
        self.gradient_horizon, self.device = gradient_horizon, device  # BlackBIRDS' arguments
        self.dim = prior_dim(prior)
        # (state, data key, log target, gradient) of the current chains
        self._cache: tuple[Tensor, Any, Tensor, Tensor] | None = None
        self.last_accept_prob: Tensor | None = None

    def reset(self) -> None:
        """Forget the cached target of the current state (a new run or new data)."""
        self._cache, self.last_accept_prob = None, None

    def choose_w(self, data: Any) -> None:
        """For ``w="calibrate"``: choose w from ``data`` (once; kept in ``weight_choice``)."""
        if self.calibration is not None and self.weight_choice is None:
            self.weight_choice = choose_w_once(self.calibration, self.loss.loss, self.prior, data)
            self.w = self.weight_choice.w

    def initialise_chain(self, state: Tensor, data: Any) -> None:
        """Evaluate the target at ``state`` (C, D) and remember it (BlackBIRDS' name)."""
        log_density, grad = self.log_density_and_grad(state, data)
        self._cache = (state.detach(), _data_key(data), log_density, grad)

    def _current(self, state: Tensor, data: Any) -> tuple[Tensor, Tensor]:
        """The cached log target and gradient at ``state``, evaluated again unless they
        were computed at this state for these data (the same objects, unmodified)."""
        if (
            self._cache is None
            or not torch.equal(self._cache[0], state.detach())
            or not _same_data(self._cache[1], data)
        ):
            self.initialise_chain(state, data)
        return self._cache[2], self._cache[3]

    def _begin(
        self, current_state: Tensor, data: Any, covariance: Tensor | None
    ) -> tuple[bool, Tensor, Tensor, Tensor, Tensor]:
        """(one chain?, state (C, D), Cholesky factor of C, log target (C,), gradient)."""
        single = current_state.ndim == 1
        state = current_state[None] if single else current_state
        chol = _chol(covariance, state.shape[-1], state)
        return (single, state, chol, *self._current(state, data))

    def _metropolis(
        self,
        state: Tensor,
        proposal: Tensor,
        log_alpha: Tensor,
        current: tuple[Tensor, Tensor],
        proposed: tuple[Tensor, Tensor],
        single: bool,
    ) -> tuple[Tensor, Tensor | bool]:
        """Accept each chain's proposal with probability exp(log_alpha); cache the target.

        ``current`` and ``proposed`` are (log target (C,), gradient (C, D)) pairs.
        """
        log_alpha = torch.where(torch.isfinite(log_alpha), log_alpha, -math.inf)
        self.last_accept_prob = log_alpha.clamp(max=0.0).exp()
        accept = torch.log(torch.rand_like(log_alpha)) < log_alpha
        new_state = torch.where(accept[:, None], proposal, state)
        self._cache = (
            new_state.detach(),
            self._cache[1] if self._cache is not None else None,
            torch.where(accept, proposed[0], current[0]),
            torch.where(accept[:, None], proposed[1], current[1]),
        )
        if single:
            return new_state[0], bool(accept[0])
        return new_state, accept

    def log_density_and_grad(self, theta: Tensor, data: Any) -> tuple[Tensor, Tensor]:
        r"""$\log \pi(\theta) - l(\theta)/w$ (C,) and its gradient (C, D).

        Non-finite values become -inf with a zero gradient (the proposal is rejected).
        """
        losses, loss_grad = loss_and_gradient(
            self.loss, theta, data, self.diff_mode, self.jacobian_chunk_size
        )
        leaf = theta.detach().requires_grad_()
        log_prior = prior_log_prob(self.prior, leaf)
        finite_prior = torch.where(torch.isfinite(log_prior), log_prior, 0.0)
        prior_grad = None
        if finite_prior.requires_grad:  # a flat prior has no graph
            (prior_grad,) = torch.autograd.grad(finite_prior.sum(), leaf, allow_unused=True)
        prior_grad = torch.zeros_like(leaf) if prior_grad is None else prior_grad
        log_density = log_prior.detach() - losses / self.w
        grad = prior_grad - loss_grad / self.w
        if math.isfinite(self.gradient_clipping_norm):
            norm = grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            grad = grad * (self.gradient_clipping_norm / norm).clamp(max=1.0)
        ok = torch.isfinite(log_density) & torch.isfinite(grad).all(-1)
        log_density = torch.where(ok, log_density, -math.inf)
        return log_density, torch.where(ok[:, None], grad, 0.0)


def _data_key(data: Any) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    """What identifies the data a target was evaluated for: references to the data's parts
    (held, so their ids cannot be reused) and the version counters of its tensors (so an
    in-place edit counts as new data). A list of the same tensors is the same data."""
    parts = tuple(data) if isinstance(data, list | tuple) else (data,)
    return parts, tuple(t._version for t in parts if isinstance(t, Tensor))


def _same_data(key: tuple[tuple[Any, ...], tuple[int, ...]] | None, data: Any) -> bool:
    if key is None:
        return False
    parts, versions = _data_key(data)
    return (
        len(parts) == len(key[0])
        and all(a is b for a, b in zip(parts, key[0], strict=True))
        and versions == key[1]
    )


def _chol(covariance: Tensor | None, dim: int, like: Tensor) -> Tensor:
    if covariance is None:
        return torch.eye(dim, dtype=like.dtype, device=like.device)
    c = torch.as_tensor(covariance, dtype=like.dtype, device=like.device)
    if c.ndim == 1:
        return torch.diag(c.sqrt())
    return torch.linalg.cholesky(c)


def _gaussian_log_kernel(x: Tensor, mean: Tensor, chol: Tensor, scale: float) -> Tensor:
    """log N(x; mean, 2 scale L L^T) up to a constant shared by forward and reverse moves."""
    z = torch.linalg.solve_triangular(chol, (x - mean).T, upper=False).T
    return -0.25 * (z**2).sum(-1) / scale


class MALA(_Kernel):
    r"""Metropolis-adjusted Langevin kernel for a batch of chains.

    Proposal $\theta' \sim N(\theta + h C \nabla \log \pi_w(\theta), 2 h C)$ with step
    ``scale`` h and preconditioner ``covariance`` C (BlackBIRDS' parameterisation), then a
    Metropolis-Hastings correction.

    Arguments:
        prior, loss, w: the target $\pi(\theta) \exp(-l(\theta, y)/w)$; ``w`` may be
            ``"calibrate"`` or a :class:`~gradcal.infer.weight.WeightCalibration`: chosen
            from the data at the start of :meth:`MCMC.run` (kept in ``weight_choice``).
        gradient_clipping_norm: clip each chain's gradient of the log target.
        diff_mode, jacobian_chunk_size: reverse or forward mode for the loss gradient.
        gradient_horizon, device: accepted for BlackBIRDS compatibility (the loss carries
            its own horizon; tensors follow the state).
        batching: how a single-draw loss is batched over chains.

    Example:
        >>> prior = torch.distributions.Independent(
        ...     torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
        >>> def loss(theta, y):
        ...     return 0.5 * ((theta - y) ** 2).sum(-1)
        >>> loss.batched = True
        >>> state, accepted = MALA(prior, loss).step(torch.zeros(4, 2), torch.ones(2), scale=0.1)
        >>> state.shape, accepted.shape
        (torch.Size([4, 2]), torch.Size([4]))
    """

    default_target_accept = 0.574

    def __init__(self, *args: Any, discretisation_method: str = "e-m", **kwargs: Any):
        super().__init__(*args, **kwargs)
        if discretisation_method != "e-m":
            raise ValueError(
                "`discretisation_method` must be 'e-m' (Euler-Maruyama), got "
                f"{discretisation_method!r}."
            )
        self.discretisation_method = discretisation_method

    def step(
        self,
        current_state: Tensor,
        data: Any,
        scale: float = 1.0,
        covariance: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | bool]:
        """One MALA step from ``current_state`` (D,) or (C, D): (new state, accepted)."""
        single, state, chol, log_p, grad = self._begin(current_state, data, covariance)
        mean = state + scale * grad @ (chol @ chol.T).T
        proposal = mean + math.sqrt(2 * scale) * torch.randn_like(state) @ chol.T
        new_log_p, new_grad = self.log_density_and_grad(proposal, data)
        reverse_mean = proposal + scale * new_grad @ (chol @ chol.T).T
        log_alpha = (
            new_log_p
            + _gaussian_log_kernel(state, reverse_mean, chol, scale)
            - log_p
            - _gaussian_log_kernel(proposal, mean, chol, scale)
        )
        return self._metropolis(
            state, proposal, log_alpha, (log_p, grad), (new_log_p, new_grad), single
        )


class HMC(_Kernel):
    r"""Hamiltonian Monte Carlo kernel (leapfrog) for a batch of chains.

    Momentum $p \sim N(0, C^{-1})$, ``n_leapfrog`` leapfrog steps of size ``scale``
    with inverse mass matrix ``covariance`` C, then a Metropolis correction on the
    Hamiltonian. Each leapfrog step costs one batched loss and gradient evaluation. The
    other arguments are :class:`MALA`'s.

    Arguments:
        n_leapfrog: leapfrog steps per proposal.

    Example:
        >>> prior = torch.distributions.Independent(
        ...     torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
        >>> def loss(theta, y):
        ...     return 0.5 * ((theta - y) ** 2).sum(-1)
        >>> loss.batched = True
        >>> HMC(prior, loss, n_leapfrog=5).step(torch.zeros(3, 2), torch.ones(2), 0.2)[0].shape
        torch.Size([3, 2])
    """

    default_target_accept = 0.8

    def __init__(self, *args: Any, n_leapfrog: int = 10, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if n_leapfrog < 1:
            raise ValueError(f"`n_leapfrog` must be >= 1, got {n_leapfrog}.")
        self.n_leapfrog = n_leapfrog

    def step(
        self,
        current_state: Tensor,
        data: Any,
        scale: float = 0.1,
        covariance: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | bool]:
        """One HMC transition from ``current_state`` (D,) or (C, D): (new state, accepted)."""
        single, state, chol, log_p, grad = self._begin(current_state, data, covariance)
        inverse_mass = chol @ chol.T
        # p ~ N(0, C^-1): p = L^-T z with C = L L^T
        z = torch.randn_like(state)
        momentum = torch.linalg.solve_triangular(chol.T, z.T, upper=True).T
        kinetic = 0.5 * (z**2).sum(-1)
        position, p, new_log_p, new_grad = state, momentum + 0.5 * scale * grad, log_p, grad
        for i in range(self.n_leapfrog):
            position = position + scale * p @ inverse_mass.T
            new_log_p, new_grad = self.log_density_and_grad(position, data)
            p = p + (scale if i < self.n_leapfrog - 1 else 0.5 * scale) * new_grad
        new_kinetic = 0.5 * (p * (p @ inverse_mass.T)).sum(-1)
        log_alpha = new_log_p - new_kinetic - (log_p - kinetic)
        return self._metropolis(
            state, position, log_alpha, (log_p, grad), (new_log_p, new_grad), single
        )


class _DualAveraging:
    """Hoffman & Gelman (2014) step-size adaptation towards a target acceptance rate."""

    def __init__(self, step_size: float, target: float):
        self.mu, self.target = math.log(10 * step_size), target
        self.h_bar, self.log_bar, self.t = 0.0, 0.0, 0
        self.log_step = math.log(step_size)

    def update(self, accept_prob: float) -> float:
        self.t += 1
        eta = 1.0 / (self.t + 10)
        self.h_bar = (1 - eta) * self.h_bar + eta * (self.target - accept_prob)
        self.log_step = self.mu - math.sqrt(self.t) / 0.05 * self.h_bar
        weight = self.t**-0.75
        self.log_bar = weight * self.log_step + (1 - weight) * self.log_bar
        return math.exp(self.log_step)

    @property
    def final(self) -> float:
        return math.exp(self.log_bar)


def _estimate_covariance(samples: Tensor, kind: str) -> Tensor:
    """Regularised (co)variance of warm-up draws (n, D), shrunk towards 1e-3 I (Stan's rule)."""
    n = samples.shape[0]
    centred = samples - samples.mean(0)
    cov = centred.T @ centred / max(n - 1, 1)
    cov = (n / (n + 5.0)) * cov + 1e-3 * (5.0 / (n + 5.0)) * torch.eye(
        cov.shape[0], dtype=cov.dtype, device=cov.device
    )
    return cov.diagonal().clone() if kind == "diag" else cov


def _windows(warmup: int) -> list[int]:
    """Iterations (within warm-up) at which the preconditioner is re-estimated."""
    start, end = int(0.15 * warmup), warmup - int(0.1 * warmup)
    ends, size, at = [], 25, start
    while at + size < end:
        nxt = at + size
        if nxt + 2 * size > end:  # stretch the last window to the end of the slow phase
            nxt = end
        ends.append(nxt)
        at, size = nxt, size * 2
    return ends


class MCMC:
    """Runs a kernel: BlackBIRDS' runner, plus batched chains and warm-up adaptation.

    Arguments:
        kernel: :class:`MALA`, :class:`HMC` or any object with ``step(state, data, **kw)``.
        num_samples: draws kept per chain after warm-up.
        progress_bar, progress_info: a tqdm bar, with the acceptance rate.

    After :meth:`run`: ``samples`` (num_samples, C, D) (``chains``: (C, S, D)),
    ``acceptance_rate`` (C,),
    ``step_size`` and ``covariance`` (as adapted), :meth:`rhat`, :meth:`ess`,
    :meth:`ess_bulk` and :meth:`ess_tail`.
    """

    def __init__(
        self,
        kernel: Any,
        num_samples: int = 100_000,
        progress_bar: bool = True,
        progress_info: bool = True,
    ):
        if num_samples < 1:
            raise ValueError(f"`num_samples` must be >= 1, got {num_samples}.")
        self.kernel, self.num_samples = kernel, num_samples
        self.progress_bar, self.progress_info = progress_bar, progress_info
        self.samples: Tensor | None = None
        self.acceptance_rate: Tensor | None = None

    def reset(self) -> None:
        """Forget the last run: its draws, acceptance rates and the kernel's cached target.

        BlackBIRDS' name; :meth:`run` calls it first, so a run with new data never reuses
        the target of the old data at an equal starting state.
        """
        self.samples, self.acceptance_rate = None, None
        if callable(getattr(self.kernel, "reset", None)):
            self.kernel.reset()

    def run(
        self,
        initial_state: Tensor,
        data: Any,
        *args: Any,
        seed: int | None = 0,
        T: int = 1,
        warmup: int = 0,
        target_accept: float | None = None,
        adapt_covariance: str | None = "diag",
        scale: float | None = None,
        covariance: Tensor | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """Run the chains; returns the list of states, as BlackBIRDS does.

        Arguments:
            initial_state: (D,) for one chain or (C, D) for C chains.
            data: passed to the loss.
            seed: a private random stream (the global one is untouched); None: global.
            T: progress-bar refresh interval.
            warmup: adaptation steps before the ``num_samples`` kept ones. During warm-up
                the step size is tuned by dual averaging to ``target_accept`` (default
                0.574 for MALA, 0.8 for HMC) and the preconditioner ``covariance`` is
                estimated from the chains' draws in doubling windows (``adapt_covariance``
                ``"diag"``, ``"dense"`` or None).
            scale, covariance: initial step size and preconditioner (kernel arguments).

        Returns:
            Without warm-up, BlackBIRDS' list ``[initial_state, s_1, ..., s_n]``; with
            warm-up, the ``num_samples`` post-warm-up states. Each state has the shape of
            ``initial_state``; ``self.samples`` stacks them as (n, C, D).
        """
        if not isinstance(initial_state, Tensor) or initial_state.ndim not in (1, 2):
            raise ValueError("`initial_state` must be a tensor (D,) or (C, D) for C chains.")
        if adapt_covariance not in ("diag", "dense", None):
            raise ValueError(
                f"`adapt_covariance` must be 'diag', 'dense' or None, got {adapt_covariance!r}."
            )
        target = target_accept or getattr(self.kernel, "default_target_accept", 0.65)
        step = scale if scale is not None else (1e-2 if warmup else 1.0)
        single = initial_state.ndim == 1
        state = initial_state[None] if single else initial_state
        start, count = shard(state.shape[0])  # under torchrun: this rank's chains
        if count == 0:
            raise ValueError(
                f"{state.shape[0]} chain(s) cannot be shared by {world_size()} ranks."
            )
        self.reset()
        if callable(getattr(self.kernel, "choose_w", None)):  # w="calibrate"
            self.kernel.choose_w(data)
        stream = None if seed is None else seed + rank()
        with seeded(stream, state.device):
            kept, accepted = self._chain(
                state[start : start + count],
                data,
                args,
                kwargs,
                T,
                warmup,
                target,
                adapt_covariance,
                step,
                covariance,
            )
        self.samples = _gather_chains(torch.stack(kept))  # (n, C, D), every rank's chains
        self.acceptance_rate = _gather_chains(accepted[None])[0] / self.num_samples
        kept = list(self.samples)
        states = [s[0] if single else s for s in kept]
        return [initial_state, *states] if warmup == 0 else states

    def _chain(self, state, data, args, kwargs, T, warmup, target, adapt, step, covariance):
        adapter = _DualAveraging(step, target) if warmup else None
        windows, window_start = _windows(warmup), int(0.15 * warmup)
        collected: list[Tensor] = []
        kept, accepted = [], torch.zeros(state.shape[0])
        total = warmup + self.num_samples
        bar = tqdm(range(total), disable=not (self.progress_bar and is_main()), desc="MCMC")
        error = None
        for t in bar:
            try:
                state, accept = self.kernel.step(
                    state, data, *args, scale=step, covariance=covariance, **kwargs
                )
                accept = torch.as_tensor(accept).reshape(-1).float().cpu()
            except Exception as caught:  # every rank hears of it at the next collective
                error = caught
            if t < warmup:
                prob = torch.zeros(1) if error is not None else accept
                if error is None and getattr(self.kernel, "last_accept_prob", None) is not None:
                    prob = self.kernel.last_accept_prob.detach().cpu().double()
                # one step size for every chain of every rank: the mean over all of them
                count = torch.tensor(float(prob.numel()), dtype=torch.float64)
                both = reduce_epoch(torch.stack((prob.sum().double(), count)), error)
                step = adapter.update(float(both[0] / both[1]))
                if adapt and window_start <= t:
                    collected.append(state.detach())
                if adapt and t + 1 in windows:
                    pooled = torch.cat(
                        [torch.cat(c) for c in all_gather_objects([c.cpu() for c in collected])]
                    ).to(state)
                    covariance = _estimate_covariance(pooled, adapt)
                    collected = []
                    adapter = _DualAveraging(step, target)
                if t + 1 == warmup:
                    step = adapter.final
            elif error is not None:  # no collective until the end: join the ranks there
                break
            else:
                kept.append(state.detach())
                accepted += accept
            if self.progress_info and self.progress_bar and t % T == 0:
                rate = accepted.mean().item() / max(len(kept), 1)
                bar.set_postfix(accept=f"{rate:.2f}", step=f"{step:.3g}")
        reduce_epoch(torch.zeros(1), error)  # a rank that failed while sampling stops all
        self.step_size, self.covariance = step, covariance
        return kept, accepted

    @property
    def chains(self) -> Tensor:
        """The kept draws as (C, S, D), the layout of R-hat, ESS and trace plots."""
        return self.samples.transpose(0, 1)

    def rhat(self) -> Tensor:
        """Rank-normalised split R-hat of each parameter over the kept draws: (D,)
        (:func:`~gradcal.infer.convergence.rhat`; 1.01 or more: not mixed)."""
        return rhat(self.chains)

    def ess(self) -> Tensor:
        """Effective sample size for the mean of each parameter over all chains: (D,)."""
        return effective_sample_size(self.chains)

    def ess_bulk(self) -> Tensor:
        """Bulk effective sample size of each parameter (rank-normalised split chains): (D,)."""
        return ess_bulk(self.chains)

    def ess_tail(self) -> Tensor:
        """Tail effective sample size of each parameter (5 % and 95 % quantiles): (D,)."""
        return ess_tail(self.chains)


def _gather_chains(x: Tensor) -> Tensor:
    """Concatenate every rank's chains along axis 1 (x itself in one process)."""
    parts = all_gather_objects(x.detach().cpu())
    return torch.cat(parts, 1).to(x) if len(parts) > 1 else x
