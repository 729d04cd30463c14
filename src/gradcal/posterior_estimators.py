r"""Variational families q_phi: Gaussians, normalising flows, constrained supports, adapters.

The protocol every family follows, and the engine relies on:

- ``sample(n) -> (theta, log_q)``: theta (n, D) reparameterised, so gradients flow to the
  family's parameters; ``log_q`` (n,) is $\log q(\theta)$ with its full graph (BlackBIRDS'
  tuple convention).
- ``log_prob(theta) -> (n,)`` for theta (n, D) (needed by the score-function estimator).

A user's object may return log q as (n,) or (n, 1) (BlackBIRDS' tutorial family does the
latter); :func:`as_family` puts it into (n,) once, at the boundary.

Any object with these methods works; :func:`as_family` wraps a
:class:`torch.distributions.Distribution`, a zuko flow, a normflows ``NormalizingFlow`` or
a user object in one call.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import zuko
from torch import Tensor
from torch.distributions import Distribution, Transform, biject_to, constraints
from torch.distributions.transforms import AffineTransform, StackTransform

from gradcal.priors import map_tensors
from gradcal.rng import seeded

__all__ = [
    "Constrained",
    "DiagonalGaussian",
    "DistributionFamily",
    "Family",
    "Flow",
    "FlowMixture",
    "FullRankGaussian",
    "GaussianMixture",
    "TrainableGaussian",
    "as_family",
    "log_prob_stopped",
]


def _check_n(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an int >= 1, got {n!r}.")


def _check_theta(theta: Any, dim: int, owner: str) -> None:
    if not isinstance(theta, Tensor):
        raise TypeError(
            f"{owner}: `theta` must be a tensor (n, {dim}), got {type(theta).__name__}."
        )
    if theta.ndim < 1 or theta.shape[-1] != dim:
        raise ValueError(f"{owner}: `theta` must have shape (n, {dim}), got {tuple(theta.shape)}.")


def _vector(value: Any, dim: int | None, name: str) -> Tensor:
    """A float tensor (D,) from a number, list or tensor (broadcast to ``dim`` if given)."""
    t = torch.as_tensor(value).detach().clone()
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if dim is not None:
        t = t.expand(dim).clone() if t.ndim == 0 else t
        if t.shape != (dim,):
            raise ValueError(
                f"`{name}` must be a number or have shape ({dim},), got {tuple(t.shape)}."
            )
    elif t.ndim != 1:
        raise ValueError(f"`{name}` must have shape (D,), got {tuple(t.shape)}.")
    return t


def _inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


class Family(torch.nn.Module, ABC):
    """Base class of variational families over R^D: subclasses give :meth:`distribution`."""

    dim: int

    @abstractmethod
    def distribution(self) -> Distribution:
        """q_phi as a torch distribution with event shape (D,)."""

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """Reparameterised draws theta (n, D) and their log-density log_q (n,)."""
        _check_n(n)
        q = self.distribution()
        if hasattr(q, "rsample_and_log_prob"):
            return q.rsample_and_log_prob((n,))
        theta = q.rsample((n,))
        return theta, q.log_prob(theta)

    def log_prob(self, theta: Tensor) -> Tensor:
        """log q(theta) for theta (n, D): (n,)."""
        _check_theta(theta, self.dim, type(self).__name__)
        return self.distribution().log_prob(theta)

    def forward(self) -> Distribution:
        return self.distribution()


class DiagonalGaussian(Family):
    r"""Gaussian with diagonal covariance: $N(\mu, \mathrm{diag}(s^2))$, s by softplus.

    Arguments:
        loc: initial mean (D,).
        scale: initial standard deviations, a number or (D,).

    Example:
        >>> q = DiagonalGaussian(torch.zeros(3), 0.5)
        >>> theta, log_q = q.sample(10)
        >>> theta.shape, log_q.shape
        (torch.Size([10, 3]), torch.Size([10]))
    """

    def __init__(self, loc: Tensor | Sequence[float], scale: float | Tensor = 1.0):
        super().__init__()
        loc = _vector(loc, None, "loc")
        self.dim = loc.shape[0]
        self.loc = torch.nn.Parameter(loc)
        scale = _vector(scale, self.dim, "scale")
        if (scale <= 0).any():
            raise ValueError(f"`scale` must be > 0, got {scale}.")
        self.raw_scale = torch.nn.Parameter(_inverse_softplus(scale))

    @property
    def scale(self) -> Tensor:
        return torch.nn.functional.softplus(self.raw_scale)

    def distribution(self) -> Distribution:
        return torch.distributions.Independent(torch.distributions.Normal(self.loc, self.scale), 1)


class FullRankGaussian(Family):
    r"""Gaussian $N(\mu, L L^\top)$ with a Cholesky factor L, positive diagonal by softplus.

    Arguments:
        loc: initial mean (D,).
        scale: initial standard deviations (a number or (D,), independent start) or an
            initial lower-triangular factor (D, D).

    Example:
        >>> q = FullRankGaussian(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.9, 0.5]]))
        >>> torch.round(q.distribution().covariance_matrix, decimals=2)
        tensor([[1.0000, 0.9000],
                [0.9000, 1.0600]], grad_fn=<RoundBackward1>)
    """

    def __init__(self, loc: Tensor | Sequence[float], scale: float | Tensor = 1.0):
        super().__init__()
        loc = _vector(loc, None, "loc")
        self.dim = d = loc.shape[0]
        self.loc = torch.nn.Parameter(loc)
        scale = torch.as_tensor(scale, dtype=loc.dtype)
        tril = scale if scale.ndim == 2 else torch.diag(_vector(scale, d, "scale"))
        if tril.shape != (d, d):
            raise ValueError(
                f"`scale` must be a number, ({d},) or ({d}, {d}), got {tuple(tril.shape)}."
            )
        if (tril.diagonal() <= 0).any():
            raise ValueError("`scale` must have a positive diagonal.")
        if not torch.equal(tril, torch.tril(tril)):
            raise ValueError("`scale` as a matrix must be lower triangular (a Cholesky factor).")
        self.raw_diag = torch.nn.Parameter(_inverse_softplus(tril.diagonal().clone()))
        self.off_diagonal = torch.nn.Parameter(torch.tril(tril, -1).clone())

    @property
    def scale_tril(self) -> Tensor:
        return torch.tril(self.off_diagonal, -1) + torch.diag_embed(
            torch.nn.functional.softplus(self.raw_diag)
        )

    def distribution(self) -> Distribution:
        return torch.distributions.MultivariateNormal(self.loc, scale_tril=self.scale_tril)


class GaussianMixture(Family):
    r"""Mixture of C diagonal Gaussians with learnable weights: q = sum_c pi_c N(mu_c, diag s_c^2).

    Draws are fully reparameterised, weights included, by the distributional transform
    (Graves 2016): a draw is made ancestrally (a component, then its Gaussian), and its
    gradient is that of the inverse of the map theta -> u, u_d = F_d(theta_d | theta_<d),
    the conditional mixture CDF of coordinate d given the earlier ones (implicit
    differentiation, D one-dimensional mixture CDFs per draw):
    $\partial\theta_d/\partial\phi = -(\partial F_d/\partial\phi) / q_d(\theta_d \mid
    \theta_{<d})$ along the earlier coordinates' own paths. The value of theta is the
    ancestral draw itself. Weights are a softmax of ``logits``; scales a softplus.

    Arguments:
        loc: initial component means (C, D).
        scale: initial standard deviations: a number, (D,) or (C, D).
        weights: initial mixture weights (C,) (positive; normalised), default equal.

    References:
        A. Graves (2016). Stochastic backpropagation through mixture density distributions.
        https://arxiv.org/abs/1607.05690

    Example:
        >>> q = GaussianMixture(torch.tensor([[-2.0], [2.0]]), 0.5, weights=[0.3, 0.7])
        >>> theta, log_q = q.sample(4000)
        >>> round(float((theta > 0).float().mean()), 1)
        0.7
    """

    def __init__(
        self,
        loc: Tensor,
        scale: float | Tensor = 1.0,
        weights: Sequence[float] | Tensor | None = None,
    ):
        super().__init__()
        loc = torch.as_tensor(loc).detach().clone()
        if not loc.is_floating_point():
            loc = loc.to(torch.get_default_dtype())
        if loc.ndim != 2 or loc.shape[0] < 1 or loc.shape[1] < 1:
            raise ValueError(f"`loc` must have shape (C, D), got {tuple(loc.shape)}.")
        c, self.dim = loc.shape
        scale = torch.as_tensor(scale, dtype=loc.dtype).expand(c, self.dim).clone()
        if not bool((scale > 0).all()):
            raise ValueError("`scale` must be > 0.")
        w = torch.ones(c) if weights is None else torch.as_tensor(weights, dtype=loc.dtype)
        if w.shape != (c,) or not bool((w > 0).all()):
            raise ValueError(f"`weights` must be {c} positive numbers, got {w.tolist()}.")
        self.loc = torch.nn.Parameter(loc)
        self.raw_scale = torch.nn.Parameter(_inverse_softplus(scale))
        self.logits = torch.nn.Parameter((w / w.sum()).log().to(loc.dtype))

    @classmethod
    def spread(
        cls, dim: int, components: int, scale: float = 1.0, seed: int = 0
    ) -> GaussianMixture:
        """C components with means drawn from N(0, scale^2 I) (a private seeded stream),
        each of standard deviation scale / 2, equal weights: a start that covers the prior
        of an unconstrained parameter of scale ``scale``.

        Example:
            >>> GaussianMixture.spread(3, 4).loc.shape
            torch.Size([4, 3])
        """
        for name, value in (("dim", dim), ("components", components)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        gen = torch.Generator().manual_seed(seed)
        return cls(scale * torch.randn(components, dim, generator=gen), scale / 2)

    @property
    def scale(self) -> Tensor:
        return torch.nn.functional.softplus(self.raw_scale)

    @property
    def weights(self) -> Tensor:
        """The mixture weights (C,)."""
        return torch.softmax(self.logits, 0)

    def distribution(self) -> Distribution:
        components = torch.distributions.Independent(
            torch.distributions.Normal(self.loc, self.scale), 1
        )
        return torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=self.logits), components
        )

    def _reparameterise(self, theta: Tensor) -> Tensor:
        """theta (n, D) drawn without graph -> the same values with implicit gradients."""
        loc, scale = self.loc, self.scale
        log_weight = torch.log_softmax(self.logits, 0).expand(theta.shape[0], -1)  # (n, C)
        out = []
        for d in range(self.dim):
            x = theta[:, d : d + 1]  # (n, 1), no graph
            z = (x - loc[:, d]) / scale[:, d]  # (n, C)
            weight = torch.softmax(log_weight, -1)
            cdf = (weight * torch.special.ndtr(z)).sum(-1)
            density = weight * torch.exp(-0.5 * z**2) / (scale[:, d] * math.sqrt(2 * math.pi))
            density = density.sum(-1).detach().clamp_min(torch.finfo(theta.dtype).tiny)
            out.append(x[:, 0] - (cdf - cdf.detach()) / density)
            # the next coordinate's weights, along this coordinate's path
            z_path = (out[-1][:, None] - loc[:, d]) / scale[:, d]
            log_weight = log_weight - 0.5 * z_path**2 - scale[:, d].log()
        return torch.stack(out, -1)

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        _check_n(n)
        with torch.no_grad():
            theta = self.distribution().sample((n,))
        theta = self._reparameterise(theta)
        return theta, self.distribution().log_prob(theta)


class TrainableGaussian(Family):
    r"""BlackBIRDS' Gaussian with a trainable mean and a trainable covariance matrix.

    $N(\mu, \Sigma)$ with ``mu`` (D,) and ``sigma`` (D, D) both ``nn.Parameter``\ s;
    ``sigma`` is the covariance matrix itself, started at ``sigma * I``. So the initial
    standard deviation of each coordinate is $\sqrt{\texttt{sigma}}$ (``sigma=0.1``
    means sd 0.32): BlackBIRDS 1.3's code does this (its docstring calls ``sigma`` a
    standard deviation), and scripts were tuned on the code. Before use, the diagonal is
    clamped at 1e-3 (:meth:`clamp_sigma`). For a positive definite parameterisation use
    :class:`FullRankGaussian`.

    Arguments:
        mu: initial mean, a sequence, array or tensor (D,).
        sigma: the initial covariance is ``sigma`` times the identity.
        device: where the parameters live.

    Example:
        >>> q = TrainableGaussian([0.0, 1.0], 0.25)
        >>> q.sigma.shape, q.distribution().stddev
        (torch.Size([2, 2]), tensor([0.5000, 0.5000], grad_fn=<SqrtBackward0>))
        >>> q.sample(5)[0].shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        mu: Sequence[float] | Tensor = (0.0,),
        sigma: float = 1.0,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        mu = torch.as_tensor(mu).detach().clone().to(device)
        if not mu.is_floating_point():
            mu = mu.to(torch.get_default_dtype())
        if mu.ndim != 1 or mu.numel() == 0:
            raise ValueError(f"`mu` must have shape (D,) with D >= 1, got {tuple(mu.shape)}.")
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma > 0:
            raise ValueError(f"`sigma` must be a number > 0, got {sigma!r}.")
        self.dim = mu.shape[0]
        self.mu = torch.nn.Parameter(mu)
        self.sigma = torch.nn.Parameter(
            sigma * torch.eye(self.dim, dtype=mu.dtype, device=mu.device)
        )

    @property
    def loc(self) -> Tensor:
        """The mean ``mu`` (the name other gradcal families use)."""
        return self.mu

    def clamp_sigma(self) -> Tensor:
        """The covariance used: ``sigma`` with its diagonal clamped at 1e-3 (D, D)."""
        diagonal = torch.diagonal(self.sigma)
        return self.sigma + torch.diag_embed(diagonal.clamp(min=1e-3) - diagonal)

    def distribution(self) -> Distribution:
        return torch.distributions.MultivariateNormal(self.mu, self.clamp_sigma())

    def __call__(self, x: Any = None) -> TrainableGaussian:
        """BlackBIRDS' call convention: the module itself."""
        return self


def _zero_last_layers(flow: torch.nn.Module) -> None:
    """Zero what produces each transform's parameters: MAF and NSF then start at the identity.

    That is the output layer of every hypernetwork, or, for one feature (no network), the
    transform's own parameters ``phi``.
    """
    with torch.no_grad():
        for module in flow.modules():
            hyper = getattr(module, "hyper", None)
            if hyper is not None:
                last = [m for m in hyper.modules() if isinstance(m, torch.nn.Linear)][-1]
                last.weight.zero_()
                last.bias.zero_()
            phi = getattr(module, "phi", None)
            if isinstance(phi, torch.nn.ParameterList):
                for p in phi:
                    p.zero_()


def _zuko_flow(
    kind: str, dim: int, transforms: int, hidden_features: Sequence[int], **kwargs: Any
) -> torch.nn.Module:
    """A zuko NSF or MAF on ``dim`` features whose last layers start at zero (the
    identity map on the base distribution)."""
    builders = {"nsf": zuko.flows.NSF, "maf": zuko.flows.MAF}
    if kind not in builders:
        raise ValueError(f"`kind` must be one of {sorted(builders)}, got {kind!r}.")
    flow = builders[kind](
        features=dim, transforms=transforms, hidden_features=tuple(hidden_features), **kwargs
    )
    _zero_last_layers(flow)
    return flow


def _loc_and_scale(module: torch.nn.Module, loc: Any, scale: Any, dim: int) -> None:
    """Register ``loc`` and ``scale`` (> 0), each a number or a (dim,) vector, as buffers."""
    scale = _vector(scale, dim, "scale")
    if (scale <= 0).any():
        raise ValueError(f"`scale` must be > 0, got {scale}.")
    module.register_buffer("loc", _vector(loc, dim, "loc"))
    module.register_buffer("scale", scale)


class Flow(Family):
    r"""Normalising flow (zuko) followed by a fixed affine map: theta = loc + scale * f(z).

    The flow's transforms start at the identity (zeroed output layers), so training starts
    from $N(\mathrm{loc}, \mathrm{diag}(\mathrm{scale}^2))$: give the prior's location
    and scale.

    Arguments:
        dim: number of parameters D.
        kind: ``"nsf"`` (neural spline flow) or ``"maf"`` (masked affine autoregressive).
        transforms: number of flow transforms.
        hidden_features: hidden layer sizes of each transform's network.
        loc, scale: location and scale, numbers or (D,).
        kwargs: passed on to :class:`zuko.flows.NSF` / :class:`zuko.flows.MAF`.

    References:
        C. Durkan et al. (2019). Neural spline flows. https://arxiv.org/abs/1906.04032

    Example:
        >>> q = Flow(2, loc=torch.tensor([1.0, -1.0]), scale=0.1)
        >>> theta, log_q = q.sample(1000)
        >>> torch.allclose(theta.mean(0), torch.tensor([1.0, -1.0]), atol=0.03)
        True
    """

    def __init__(
        self,
        dim: int,
        kind: str = "nsf",
        transforms: int = 3,
        hidden_features: Sequence[int] = (64, 64),
        loc: float | Tensor = 0.0,
        scale: float | Tensor = 1.0,
        **kwargs: Any,
    ):
        super().__init__()
        if dim < 1:
            raise ValueError(f"`dim` must be >= 1, got {dim}.")
        self.dim = dim
        self.flow = _zuko_flow(kind, dim, transforms, hidden_features, **kwargs)
        _loc_and_scale(self, loc, scale, dim)

    def distribution(self) -> Distribution:
        return torch.distributions.TransformedDistribution(
            self.flow(), AffineTransform(self.loc, self.scale, event_dim=1)
        )

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        _check_n(n)
        z, log_qz = self.flow().rsample_and_log_prob((n,))
        return self.loc + self.scale * z, log_qz - self.scale.log().sum()

    def log_prob(self, theta: Tensor) -> Tensor:
        _check_theta(theta, self.dim, "Flow")
        z = (theta - self.loc) / self.scale
        return self.flow().log_prob(z) - self.scale.log().sum()


class FlowMixture(Family):
    r"""Mixture of C normalising flows with learnable weights, the flows sharing one transform.

    $q(\theta) = \sum_c \pi_c\, q_c(\theta)$, $q_c = (A \circ T)_\#
    N(\mu_c, \mathrm{diag}\, s_c^2)$: a draw is $\theta = \mathrm{loc} +
    \mathrm{scale} \cdot T(z)$ with z from a :class:`GaussianMixture` (weights
    $\pi$ by softmax, means, scales) and T a zuko flow (NSF or MAF) shared by every
    component. Each component is a flow; the mixture moves mass between modes through its
    weights while T bends every component. The discrete choice of component is handled as
    :class:`GaussianMixture` handles it (the distributional transform of Graves 2016: z is
    reparameterised in full, weights included), and T is differentiable, so the pathwise
    estimators reach every parameter; ``log_prob`` inverts T (for the score estimator and
    forward KL). $\log q(\theta) = \log q_z(z) - \log|\det \partial T/\partial z|
    - \sum_d \log \mathrm{scale}_d$. T starts at the identity, so training starts from
    the Gaussian mixture ``GaussianMixture.spread(dim, components, spread, seed)`` mapped
    by loc + scale z.

    Arguments:
        dim: number of parameters D.
        components: number of components C.
        kind: ``"nsf"`` (neural spline flow) or ``"maf"`` (masked affine autoregressive).
        transforms: number of flow transforms in T.
        hidden_features: hidden layer sizes of each transform's network.
        loc, scale: the fixed affine map after T, numbers or (D,) (give the prior's
            location and scale).
        spread: the scale over which the initial component means are drawn (in z).
        seed: seed of the initial component means and the flow's initial weights (private
            streams: the global random stream is not touched).
        kwargs: passed on to :class:`zuko.flows.NSF` / :class:`zuko.flows.MAF`.

    Example:
        >>> q = FlowMixture(2, components=3, transforms=1, hidden_features=(8,))
        >>> theta, log_q = q.sample(5)
        >>> theta.shape, q.weights.shape
        (torch.Size([5, 2]), torch.Size([3]))
        >>> torch.allclose(q.log_prob(theta), log_q, atol=1e-4)
        True
    """

    def __init__(
        self,
        dim: int,
        components: int = 4,
        kind: str = "nsf",
        transforms: int = 3,
        hidden_features: Sequence[int] = (64, 64),
        loc: float | Tensor = 0.0,
        scale: float | Tensor = 1.0,
        spread: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"`dim` must be an int >= 1, got {dim!r}.")
        if isinstance(spread, bool) or not isinstance(spread, int | float) or not spread > 0:
            raise ValueError(f"`spread` must be a number > 0, got {spread!r}.")
        self.dim = dim
        self.mixture = GaussianMixture.spread(dim, components, float(spread), seed)
        with torch.random.fork_rng(devices=[]):  # the flow's initial weights from `seed`
            torch.manual_seed(seed)
            self.flow = _zuko_flow(kind, dim, transforms, hidden_features, **kwargs)
        _loc_and_scale(self, loc, scale, dim)

    @property
    def weights(self) -> Tensor:
        """The mixture weights (C,)."""
        return self.mixture.weights

    def _transform(self) -> Transform:
        return torch.distributions.transforms.ComposeTransform(
            [self.flow.transform(), AffineTransform(self.loc, self.scale, event_dim=1)]
        )

    def distribution(self) -> Distribution:
        return torch.distributions.TransformedDistribution(
            self.mixture.distribution(), self._transform()
        )

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        _check_n(n)
        z, log_qz = self.mixture.sample(n)
        x, ladj = self.flow.transform().call_and_ladj(z)
        return self.loc + self.scale * x, log_qz - ladj - self.scale.log().sum()

    def log_prob(self, theta: Tensor) -> Tensor:
        _check_theta(theta, self.dim, "FlowMixture")
        x = (theta - self.loc) / self.scale
        transform = self.flow.transform()
        z = transform.inv(x)
        ladj = transform.log_abs_det_jacobian(z, x)
        return self.mixture.log_prob(z) - ladj - self.scale.log().sum()


class _CoordinateTransform(StackTransform):
    """One transform per coordinate of the last axis, with the log-Jacobian summed over it.

    torch's StackTransform declares event dimension 1 but returns per-coordinate
    log-Jacobians, which TransformedDistribution cannot use.
    """

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return super().log_abs_det_jacobian(x, y).sum(-1)


def _bijection(support: Any, dim: int) -> Transform:
    """The map from R^D onto a support: a constraint, one constraint per axis, or a prior's."""
    if isinstance(support, Distribution):
        support = support.support
    if isinstance(support, Sequence) and not isinstance(support, str):
        if len(support) != dim:
            raise ValueError(
                f"`support` must give {dim} constraints, one per parameter, got {len(support)}."
            )
        return _CoordinateTransform([biject_to(c) for c in support], dim=-1)
    if isinstance(support, constraints.Constraint):
        return biject_to(support)
    raise TypeError(
        "`support` must be a torch constraint, a list of them (one per parameter) or a prior "
        f"distribution, got {type(support).__name__}."
    )


def _map_transform_tensors(
    transform: Transform, fn: Callable[[Tensor], Tensor], seen: set[int] | None = None
) -> None:
    """Apply ``fn`` to every tensor held by a (composed, stacked) torch transform."""
    seen = set() if seen is None else seen
    if id(transform) in seen:
        return
    seen.add(id(transform))
    for name, value in list(vars(transform).items()):
        if name == "_inv":  # a (weak) reference back to the inverse: not a part
            continue
        if isinstance(value, Tensor):
            setattr(transform, name, fn(value))
        elif isinstance(value, Transform):
            _map_transform_tensors(value, fn, seen)
        elif isinstance(value, list | tuple):
            for part in value:
                if isinstance(part, Transform):
                    _map_transform_tensors(part, fn, seen)


class Constrained(Family):
    r"""A family on a constrained space: theta = T(u) with u from an unconstrained family.

    T is :func:`torch.distributions.biject_to` of the support (positive: exp; an interval:
    an affine sigmoid), and
    $\log q(\theta) = \log q_u(u) - \log|\det \partial T / \partial u|$.
    ``log_q`` is a density in the constrained space, the space of the prior, so
    E_q[log q - log prior] is KL(q || prior) there (equal, by invariance under bijections,
    to the KL between the unconstrained pair).

    Arguments:
        base: an unconstrained family over R^D (anything :func:`as_family` takes).
        support: a constraint, a list of D constraints, or the prior (its ``support``).

    Example:
        >>> from torch.distributions import constraints
        >>> q = Constrained(DiagonalGaussian(torch.zeros(2)), [constraints.positive,
        ...                                                     constraints.interval(0, 1)])
        >>> theta, _ = q.sample(100)
        >>> bool((theta[:, 0] > 0).all() and ((theta[:, 1] > 0) & (theta[:, 1] < 1)).all())
        True
    """

    def __init__(self, base: Any, support: Any):
        super().__init__()
        self.base = as_family(base)
        self.dim = _family_dim(self.base)
        self.transform = _bijection(support, self.dim)

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> Constrained:
        # The bijection's tensors (an interval's bounds) follow .to(), .double(), .cuda().
        super()._apply(fn, *args, **kwargs)
        _map_transform_tensors(self.transform, fn)
        return self

    def _log_det(self, u: Tensor, theta: Tensor) -> Tensor:
        ladj = self.transform.log_abs_det_jacobian(u, theta)
        return ladj.sum(-1) if ladj.ndim == theta.ndim else ladj

    def distribution(self) -> Distribution:
        return torch.distributions.TransformedDistribution(
            self.base.distribution(), self.transform
        )

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        u, log_qu = self.base.sample(n)
        theta = self.transform(u)
        return theta, log_qu - self._log_det(u, theta)

    def log_prob(self, theta: Tensor) -> Tensor:
        _check_theta(theta, self.dim, "Constrained")
        u = self.transform.inv(theta)
        return self.base.log_prob(u) - self._log_det(u, theta)


def _trainable_leaves(obj: Any, seen: set[int] | None = None) -> Iterator[Tensor]:
    """Leaf tensors requiring grad held by a distribution (recursing into nested
    distributions and transforms)."""
    seen = set() if seen is None else seen
    values = list(vars(obj).values())
    for value in values:
        if isinstance(value, list | tuple):
            values.extend(v for v in value if isinstance(v, Distribution | Transform))
            continue
        if isinstance(value, Tensor) and id(value) not in seen:
            seen.add(id(value))
            if value.requires_grad and not value.is_leaf:
                raise ValueError(
                    f"{type(obj).__name__} precomputes its parameters when built, so it cannot "
                    "be trained as an instance: pass DistributionFamily(its class, **params)."
                )
            if value.requires_grad:
                yield value
        elif isinstance(value, Distribution | Transform):
            yield from _trainable_leaves(value, seen)


def _convert_in_place(leaf: Tensor, fn: Callable[[Tensor], Tensor]) -> None:
    """Give ``leaf`` the converted value ``fn(leaf)`` while it stays the same Python object
    (as :class:`torch.nn.Module` does for its parameters); its gradient follows."""
    grad, leaf.grad = leaf.grad, None
    new = fn(leaf.data)
    if torch._has_compatible_shallow_copy_type(leaf, new):
        leaf.data = new
    else:  # e.g. to another kind of device: swap the whole tensor
        torch.utils.swap_tensors(leaf, new.requires_grad_(leaf.requires_grad))
    if grad is not None:
        leaf.grad = fn(grad)


class DistributionFamily(Family):
    """A torch distribution as a family, built each call from trainable parameters.

    Either ``DistributionFamily(factory, **params)`` (params become ``nn.Parameter``s and
    ``factory(**params)`` must return a distribution with event shape (D,) or a scalar one;
    the parameters are unconstrained, so map them to the support in the factory, e.g.
    ``lambda log_a, log_b: Beta(log_a.exp(), log_b.exp())``), or
    ``DistributionFamily(distribution)``, an instance whose trainable tensors are leaves it
    reads at sampling time (e.g. ``Normal(loc, scale)`` with ``loc.requires_grad``). On
    ``.to()``/``.double()`` an instance's leaves are converted in place (they stay the
    tensors an optimiser holds) and its other tensors are replaced by converted copies.

    Example:
        >>> q = DistributionFamily(torch.distributions.Normal, loc=torch.zeros(2),
        ...                        scale=torch.ones(2))
        >>> q.sample(4)[0].shape, len(list(q.parameters()))
        (torch.Size([4, 2]), 2)
    """

    def __init__(self, distribution: Distribution | Callable[..., Distribution], **params: Tensor):
        super().__init__()
        if isinstance(distribution, Distribution):
            if params:
                raise ValueError("give either a distribution instance or a factory with params.")
            self._instance = distribution
            self._leaves = list(_trainable_leaves(distribution))
            for i, leaf in enumerate(self._leaves):  # in the state dict, loaded in place
                self.register_buffer(f"leaf{i}", leaf)
        elif callable(distribution):
            self._instance = None
            self._factory = distribution
            self._params = torch.nn.ParameterDict(
                {
                    k: torch.nn.Parameter(torch.as_tensor(v, dtype=torch.get_default_dtype()))
                    for k, v in params.items()
                }
            )
        else:
            raise TypeError(
                f"expected a distribution or a factory, got {type(distribution).__name__}."
            )
        q = self._raw()
        if q.event_shape == () and q.batch_shape == ():
            self.dim = 1
        elif q.event_shape == ():
            self.dim = q.batch_shape[-1]
        else:
            self.dim = q.event_shape[-1]
        if not q.has_rsample:
            raise ValueError(f"{type(q).__name__} has no rsample: pathwise gradients need one.")

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> Any:
        super()._apply(fn, *args, **kwargs)
        if self._instance is None:
            return self
        keep = {id(leaf) for leaf in self._leaves}
        with torch.no_grad():
            for i, leaf in enumerate(self._leaves):
                _convert_in_place(leaf, fn)  # the optimiser keeps holding the same leaf
                self._buffers[f"leaf{i}"] = leaf  # not the copy super()._apply made
        self._instance = map_tensors(self._instance, lambda t: t if id(t) in keep else fn(t))
        return self

    def _raw(self) -> Distribution:
        if self._instance is None:
            return self._factory(**self._params)
        # An instance reads its leaves through the buffers ``leaf{i}``: when one is swapped
        # (torch.func.functional_call, as log_prob_stopped does), a copy with the swap.
        swapped = {
            id(leaf): self._buffers[f"leaf{i}"]
            for i, leaf in enumerate(self._leaves)
            if self._buffers[f"leaf{i}"] is not leaf
        }
        if not swapped:
            return self._instance
        return map_tensors(self._instance, lambda t: swapped.get(id(t), t))

    def distribution(self) -> Distribution:
        q = self._raw()
        if q.event_shape == () and q.batch_shape != ():
            return torch.distributions.Independent(q, 1)
        return q

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        _check_n(n)
        q = self.distribution()
        theta = q.rsample((n,))
        log_q = q.log_prob(theta)
        return (theta[:, None], log_q) if theta.ndim == 1 else (theta, log_q)

    def log_prob(self, theta: Tensor) -> Tensor:
        _check_theta(theta, self.dim, "DistributionFamily")
        q = self.distribution()
        return q.log_prob(theta[..., 0] if q.event_shape == () else theta)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ):
        yield from super().named_parameters(prefix, recurse, remove_duplicate)
        if self._instance is not None:
            for i, leaf in enumerate(self._leaves):
                yield f"{prefix}{'.' if prefix else ''}leaf{i}", leaf


class ZukoFamily(Family):
    """A zuko flow (``zuko.flows.Flow`` or any ``LazyDistribution``) as a family."""

    def __init__(self, flow: zuko.flows.LazyDistribution):
        super().__init__()
        self.flow = flow
        self.dim = flow().event_shape[-1]

    def distribution(self) -> Distribution:
        return self.flow()


def _per_draw(value: Any, batch: torch.Size, owner: str) -> Tensor:
    """A family's log q as one value per draw, shape ``batch`` (``(n,)`` for n draws).

    Accepted: ``batch`` itself; ``batch + (1,)`` (a ``Normal`` with batch shape (1,), as
    BlackBIRDS' tutorial family returns, (n, 1)); any shape holding a single value when
    there is a single draw (0-d for n = 1). Anything else is a ValueError: (n, k) with k > 1
    (several values per draw: per-coordinate densities must be summed by the family, other
    things cannot be guessed), (1, n) for n > 1 (transposed, or one value per coordinate of
    one draw: ambiguous) and extra axes.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{owner} must return a tensor of log q, got {type(value).__name__}.")
    if value.shape == batch:
        return value
    if value.shape == (*batch, 1):
        return value[..., 0]
    if batch.numel() == 1 and value.numel() == 1:
        return value.reshape(batch)
    want = ", ".join(str(b) for b in batch)
    raise ValueError(
        f"{owner} must return log_q ({want},) or ({want}, 1), one value per draw, "
        f"got {tuple(value.shape)}; for independent coordinates sum their log-densities "
        "over the last axis (.sum(-1))."
    )


class _ProtocolAdapter(Family):
    """An object with ``sample(n) -> (theta, log_q)`` (normflows, user classes), checked.

    Its per-draw outputs come back in the gradcal protocol's shapes: theta (n, D) (a 1-D
    theta is read as (n, 1)) and log q (n,) from both ``sample`` and ``log_prob``, also when
    the object gives (n, 1) (see :func:`_per_draw` for what is accepted).
    """

    def __init__(self, obj: Any):
        super().__init__()
        if isinstance(obj, torch.nn.Module):
            self.inner = obj
        else:
            self._inner = obj
        self.dim = _sampled_dim(obj)

    @property
    def _obj(self) -> Any:
        return self.inner if "inner" in self._modules else self._inner

    def distribution(self) -> Distribution:
        raise NotImplementedError(f"{type(self._obj).__name__} is not a torch distribution.")

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        _check_n(n)
        return _checked_sample(self._obj, n)

    def log_prob(self, theta: Tensor) -> Tensor:
        if not callable(getattr(self._obj, "log_prob", None)):
            raise NotImplementedError(
                f"{type(self._obj).__name__} has no log_prob(theta); the score-function "
                "estimator and analytic diagnostics need one."
            )
        _check_theta(theta, self.dim, type(self._obj).__name__)
        owner = f"{type(self._obj).__name__}.log_prob(theta)"
        return _per_draw(self._obj.log_prob(theta), theta.shape[:-1], owner)


def _checked_sample(obj: Any, n: int) -> tuple[Tensor, Tensor]:
    """``obj.sample(n)`` as theta (n, D) and log q (n,), or a clear error."""
    name = type(obj).__name__
    out = obj.sample(n)
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise TypeError(
            f"{name}.sample(n) must return a pair (theta, log_q), got {type(out).__name__}."
        )
    theta, log_q = out
    if not isinstance(theta, Tensor):
        raise TypeError(f"{name}.sample(n) must return theta as a tensor (n, D).")
    if theta.ndim == 1:
        theta = theta[:, None]
    if theta.ndim != 2 or theta.shape[0] != n:
        raise ValueError(
            f"{name}.sample({n}) must return theta ({n}, D), got {tuple(theta.shape)}."
        )
    return theta, _per_draw(log_q, torch.Size([n]), f"{name}.sample({n})")


def _sampled_dim(obj: Any) -> int:
    """D of an object's draws, from two draws on a private random stream (the caller's
    stream is not advanced)."""
    params = list(obj.parameters()) if isinstance(obj, torch.nn.Module) else []
    device = params[0].device if params else None
    with seeded(0, device), torch.no_grad():
        out = obj.sample(2)  # checked when the adapter's sample is called
    theta = out[0] if isinstance(out, tuple | list) and out else out
    return 1 if not isinstance(theta, Tensor) or theta.ndim < 2 else theta.shape[-1]


def _family_dim(family: Any) -> int:
    return family.dim if hasattr(family, "dim") else _sampled_dim(family)


def as_family(obj: Any) -> Family:
    """Wrap anything that can serve as a variational family into the protocol.

    Accepts a :class:`Family` (returned as is), a torch distribution with ``rsample``, a
    zuko ``LazyDistribution`` (flow), or any object with ``sample(n) -> (theta, log_q)``
    such as a normflows ``NormalizingFlow`` or a user's own class. This is the one place a
    user's family enters gradcal (VI, the KL, the gradient estimators, PSIS and the
    BlackBIRDS functions all call it), so its per-draw outputs are put in the protocol's
    shapes here: theta (n, D) and log q (n,) from ``sample`` and from ``log_prob``. A log q
    of shape (n, 1), as BlackBIRDS' tutorial family gives (a ``Normal`` with batch shape
    (1,)), is read as (n,); a shape that is not one value per draw, such as (n, 2) or
    (1, n) for n > 1, is a ValueError naming the method (sum per-coordinate densities in
    the family itself). The adapter learns D from two draws on a private random stream.

    Example:
        >>> loc = torch.zeros(2, requires_grad=True)
        >>> q = as_family(torch.distributions.Normal(loc, torch.ones(2)))
        >>> q.sample(3)[0].shape, [p is loc for p in q.parameters()]
        (torch.Size([3, 2]), [True])
    """
    if isinstance(obj, Family):
        return obj
    if isinstance(obj, zuko.flows.LazyDistribution):
        return ZukoFamily(obj)
    if isinstance(obj, Distribution):
        return DistributionFamily(obj)
    if callable(getattr(obj, "sample", None)):
        return _ProtocolAdapter(obj)
    raise TypeError(
        f"cannot use {type(obj).__name__} as a variational family: it needs "
        "sample(n) -> (theta, log_q) (and log_prob(theta) for the score estimator)."
    )


class _LogProb(torch.nn.Module):
    """``family.log_prob`` as a module's forward, for :func:`torch.func.functional_call`."""

    def __init__(self, family: Any):
        super().__init__()
        self.family = family

    def forward(self, theta: Tensor) -> Tensor:
        return self.family.log_prob(theta)


def log_prob_stopped(family: Any, theta: Tensor) -> Tensor:
    r"""log q(theta) (n,) with the family's parameters held fixed: gradients reach theta only.

    $\log q_{\bar\phi}(\theta)$ with $\bar\phi$ = stop-gradient(phi), the
    piece that sticking-the-landing and doubly-reparameterised gradients use: the score
    $\nabla_\phi \log q_\phi(\theta)$ at fixed theta (mean zero) is left out, while
    theta = theta(phi, eps) still carries its path to phi. The module's parameters and
    buffers are swapped for detached copies with :func:`torch.func.functional_call` (a
    :class:`DistributionFamily` built from an instance reads its trainable leaves through
    buffers, so they are held fixed too). An object that is no torch module (nor a torch
    distribution) has nothing to swap: its own ``log_prob`` is returned, score term included.
    That is still unbiased for sticking-the-landing, whose score term is not reweighted,
    but not for DReG: the objectives check with ``log_prob_stopped(family,
    theta.detach()).requires_grad`` and use the plain reparameterised gradient instead.

    Example:
        >>> q = DiagonalGaussian(torch.zeros(1))
        >>> lp = log_prob_stopped(q, torch.ones(3, 1))
        >>> lp.requires_grad, round(lp[0].item(), 4)       # no path to q's parameters
        (False, -1.4189)
    """
    if not isinstance(family, torch.nn.Module | Distribution):
        if not callable(getattr(family, "log_prob", None)):
            raise NotImplementedError(
                f"{type(family).__name__} has no log_prob(theta); log q at fixed parameters "
                "needs one."
            )
        return family.log_prob(theta)  # nothing to swap (and no draw made to wrap it)
    family = as_family(family)
    held = {f"family.{k}": v.detach() for k, v in family.named_buffers()}
    held.update({f"family.{k}": v.detach() for k, v in family.named_parameters()})
    return torch.func.functional_call(_LogProb(family), held, (theta,), strict=False)
