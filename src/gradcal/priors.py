"""Priors over parameter vectors: a product of one-dimensional marginals, named by kind."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, Transform, constraints

__all__ = [
    "PRIOR_KINDS",
    "Product",
    "distribution_device",
    "distribution_to",
    "map_tensors",
    "marginal",
    "marginal_problems",
]

# kind -> (torch distribution, its keyword arguments in order)
PRIOR_KINDS: dict[str, tuple[type[Distribution], tuple[str, ...]]] = {
    "normal": (torch.distributions.Normal, ("loc", "scale")),
    "uniform": (torch.distributions.Uniform, ("low", "high")),
    "lognormal": (torch.distributions.LogNormal, ("loc", "scale")),
    "halfnormal": (torch.distributions.HalfNormal, ("scale",)),
    "gamma": (torch.distributions.Gamma, ("concentration", "rate")),
    "beta": (torch.distributions.Beta, ("concentration1", "concentration0")),
    "laplace": (torch.distributions.Laplace, ("loc", "scale")),
}


# arguments that must be > 0 (every other argument must be finite)
_POSITIVE = ("scale", "rate", "concentration", "concentration1", "concentration0")


def marginal_problems(kind: str, arguments: dict[str, Any]) -> list[tuple[str, str]]:
    """What is wrong with the arguments of a named prior: ``[(key, problem), ...]``.

    A key of ``""`` is about the prior as a whole. Checks the names, that every value is a
    finite number, that scales, rates and concentrations are > 0, and low < high.

    Example:
        >>> marginal_problems("normal", {"loc": 0.0, "scale": -1.0})
        [('scale', 'must be > 0 (the scale of a normal prior), got -1.0')]
    """
    if kind not in PRIOR_KINDS:
        return [("kind", f"unknown prior kind {kind!r}; known: {', '.join(PRIOR_KINDS)}")]
    names = PRIOR_KINDS[kind][1]
    if set(arguments) != set(names):
        return [("", f"a {kind} prior takes {', '.join(names)}, got {', '.join(arguments)}")]
    problems = []
    for key in names:
        value = arguments[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append((key, f"must be a number, got {value!r}"))
        elif not math.isfinite(value):
            problems.append((key, f"must be a finite number, got {value!r}"))
        elif key in _POSITIVE and value <= 0:
            problems.append((key, f"must be > 0 (the {key} of a {kind} prior), got {value!r}"))
    if kind == "uniform" and not problems and not arguments["low"] < arguments["high"]:
        low, high = arguments["low"], arguments["high"]
        problems.append(("", f"a uniform prior needs low < high, got {low} and {high}"))
    return problems


def marginal(kind: str, **arguments: float) -> Distribution:
    """A one-dimensional prior of a named kind, e.g. ``marginal("uniform", low=0, high=1)``.

    Raises ``ValueError`` naming the argument when :func:`marginal_problems` finds one.

    Example:
        >>> marginal("lognormal", loc=0.0, scale=0.5).support
        GreaterThan(lower_bound=0.0)
    """
    problems = marginal_problems(kind, arguments)
    if problems:
        key, problem = problems[0]
        raise ValueError(f"{key + ': ' if key else ''}{problem}.")
    cls, names = PRIOR_KINDS[kind]
    return cls(**{k: torch.tensor(float(arguments[k])) for k in names})


_SCALAR = torch.Size()


class _ProductSupport(constraints.Constraint):
    """Each coordinate in its marginal's support."""

    event_dim = 1

    def __init__(self, parts: Sequence[constraints.Constraint]):
        self.parts = list(parts)
        super().__init__()

    def check(self, value: Tensor) -> Tensor:
        return torch.stack([c.check(value[..., i]) for i, c in enumerate(self.parts)], -1).all(-1)


class Product(Distribution):
    r"""Independent coordinates with their own one-dimensional priors: event shape (D,).

    $\log \pi(\theta) = \sum_i \log \pi_i(\theta_i)$. ``supports`` lists the marginal
    supports (what :class:`~gradcal.posterior_estimators.Constrained` maps onto).

    Example:
        >>> prior = Product([marginal("normal", loc=0, scale=1),
        ...                  marginal("uniform", low=0, high=2)])
        >>> prior.sample((5,)).shape, prior.log_prob(torch.tensor([[0.0, 1.0]])).shape
        (torch.Size([5, 2]), torch.Size([1]))
    """

    arg_constraints: dict[str, Any] = {}  # noqa: RUF012 (torch's class attribute)
    has_rsample = True

    def __init__(self, marginals: Sequence[Distribution], validate_args: bool | None = False):
        if not marginals or any(m.batch_shape or m.event_shape for m in marginals):
            raise ValueError("`marginals` must be a non-empty list of scalar distributions.")
        self.marginals = list(marginals)
        super().__init__(torch.Size(), torch.Size([len(marginals)]), validate_args=validate_args)

    @property
    def supports(self) -> list[constraints.Constraint]:
        return [m.support for m in self.marginals]

    @property
    def support(self) -> constraints.Constraint:
        return _ProductSupport(self.supports)

    @property
    def mean(self) -> Tensor:
        return torch.stack([m.mean for m in self.marginals])

    @property
    def stddev(self) -> Tensor:
        return torch.stack([m.stddev for m in self.marginals])

    def sample(self, sample_shape: torch.Size = _SCALAR) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def rsample(self, sample_shape: torch.Size = _SCALAR) -> Tensor:
        shape = torch.Size(sample_shape)
        return torch.stack(
            [m.rsample(shape) if m.has_rsample else m.sample(shape) for m in self.marginals], -1
        )

    def log_prob(self, value: Tensor) -> Tensor:
        parts = []
        for i, m in enumerate(self.marginals):
            x = value[..., i]
            inside = m.support.check(x)
            safe = torch.where(inside, x, m.mean.to(x).expand_as(x))
            parts.append(torch.where(inside, m.log_prob(safe), -torch.inf))
        return torch.stack(parts, -1).sum(-1)


def _parts(obj: Any) -> Iterator[tuple[str, Any]]:
    """The attributes of a distribution or transform that may hold tensors."""
    for name, value in vars(obj).items():
        if name != "_inv":  # a transform's (weak) reference to its inverse: not a part
            yield name, value


def _mapped(value: Any, fn: Any, memo: dict[int, Any]) -> Any:
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, Tensor):
        out = fn(value)
    elif isinstance(value, Distribution | Transform):
        out = copy.copy(value)
        memo[id(value)] = out
        for name, part in _parts(value):
            setattr(out, name, _mapped(part, fn, memo))
        if isinstance(out, Transform):
            out._inv = None  # rebuilt on demand from the moved copy
    elif isinstance(value, list | tuple):
        out = type(value)(_mapped(v, fn, memo) for v in value)
    else:
        return value
    memo[id(value)] = out
    return out


def map_tensors(d: Distribution, fn: Callable[[Tensor], Tensor]) -> Distribution:
    """A copy of ``d`` (and of the distributions and transforms it holds) with ``fn``
    applied to every tensor; a tensor held twice is mapped once. ``d`` is not changed.

    Example:
        >>> d = map_tensors(marginal("normal", loc=0, scale=1), lambda t: t + 1)
        >>> d.loc.item(), d.scale.item()
        (1.0, 2.0)
    """
    return _mapped(d, fn, {})


def distribution_to(
    d: Distribution, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Distribution:
    """A copy of ``d`` with every tensor it holds (also inside the distributions and
    transforms it is built from, e.g. a :class:`Product`'s marginals) on ``device`` and, for
    floating-point tensors, of ``dtype``. ``d`` itself is not changed.

    Example:
        >>> prior = Product([marginal("uniform", low=0, high=2)])
        >>> distribution_to(prior, dtype=torch.float64).sample((3,)).dtype
        torch.float64
    """

    def fn(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

    return map_tensors(d, fn)


def distribution_device(d: Distribution) -> torch.device:
    """The device of the first tensor ``d`` holds (the CPU when it holds none).

    Example:
        >>> distribution_device(marginal("normal", loc=0, scale=1))
        device(type='cpu')
    """
    todo: list[Any] = [d]
    seen: set[int] = set()
    while todo:
        obj = todo.pop(0)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            return obj.device
        if isinstance(obj, Distribution | Transform):
            todo.extend(v for _, v in _parts(obj))
        elif isinstance(obj, list | tuple):
            todo.extend(obj)
    return torch.device("cpu")
