"""Hold some of a model's parameters at fixed values and calibrate the others."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gradcal.models.model import Model

__all__ = ["FixedParameters", "fix_parameters"]


class FixedParameters(Model):
    r"""A model seen through its free parameters, the others held at fixed values.

    ``FixedParameters(model, {i: v, ...})`` takes parameters (F,) or (B, F), F = D minus
    the number of fixed ones, and runs ``model`` on the full vector (D,) or (B, D) with
    value v at index i and the free parameters, in order, at the other indices. Use it
    when the data carry no information on a parameter (the posterior would equal the
    prior there) or when its value is known: the calibration then has fewer dimensions.
    Gradients reach the free parameters only; the simulation, its random numbers and its
    outputs are the wrapped model's.

    Arguments:
        model: the simulator; its ``n_params`` (when it declares one) is D.
        fixed: index (0-based, in the model's parameter order) -> value.

    Shapes: ``params`` (F,) or (B, F); histories and outputs are ``model``'s.

    Example:
        >>> from gradcal.models import RamaCont
        >>> _ = torch.manual_seed(0)
        >>> cont = RamaCont(n_agents=100, n_timesteps=20, s=0.1, sigmoid_k=5.0,
        ...                 log10_params=True)
        >>> model = FixedParameters(cont, {0: 0.0, 1: -0.3})   # gamma_0, gamma_1 known
        >>> model.n_params, model.full(torch.tensor([[0.1, 0.2]]))
        (2, tensor([[ 0.0000, -0.3000,  0.1000,  0.2000]]))
        >>> model.run_and_observe(torch.zeros(8, 2))[0].shape
        torch.Size([8, 21])
    """

    def __init__(self, model: Model, fixed: Mapping[int, float]):
        super().__init__()
        if not isinstance(fixed, Mapping) or not fixed:
            raise ValueError("FixedParameters: `fixed` must map at least one index to a value.")
        n_params = getattr(model, "n_params", None)
        size = n_params if n_params is not None else max(fixed) + 1
        for i, v in fixed.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size:
                raise ValueError(
                    f"FixedParameters: index {i!r} is not a parameter index in [0, {size})."
                )
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise TypeError(f"FixedParameters: the value at index {i} must be a number.")
        self.model = model
        self.fixed = {int(i): float(v) for i, v in sorted(fixed.items())}
        self.n_params = None if n_params is None else n_params - len(self.fixed)
        self.batched = getattr(model, "batched", False)
        self.history_length = getattr(model, "history_length", None)
        self.state_ndim = getattr(model, "state_ndim", 1)
        self.lazy_history = getattr(model, "lazy_history", True)
        self._layouts: dict[int, tuple[Tensor, Tensor]] = {}
        self.n_timesteps = model.n_timesteps

    def full(self, params: Tensor) -> Tensor:
        """The model's parameter vector: (..., F) -> (..., D), fixed values inserted.

        The free parameters fill the indices not in ``fixed`` in order (a model without
        ``n_params`` takes every index beyond the largest fixed one as free).
        """
        params = torch.as_tensor(params)
        if params.ndim == 0:
            params = params.reshape(1)
        values, order = self._layout(params.shape[-1] + len(self.fixed))
        values = values.to(dtype=params.dtype, device=params.device)
        joined = torch.cat((params, values.expand(*params.shape[:-1], -1)), dim=-1)
        return joined.index_select(-1, order.to(params.device))

    def _layout(self, d: int) -> tuple[Tensor, Tensor]:
        """The fixed values (float64) and the permutation that puts [free, fixed] in the
        model's order, for D = d parameters: built once per d, not at every step."""
        if d not in self._layouts:
            free = [i for i in range(d) if i not in self.fixed]
            order = torch.tensor(free + list(self.fixed)).argsort()
            values = torch.tensor(list(self.fixed.values()), dtype=torch.float64)
            self._layouts[d] = (values, order)
        return self._layouts[d]

    def initialize(self, params: Tensor) -> Any:
        return self.model.initialize(self.full(params))

    def step(self, params: Tensor, x: Any) -> Any:
        return self.model.step(self.full(params), x)

    def observe(self, x: Any) -> list[Tensor]:
        return self.model.observe(x)

    def observed_lengths(self) -> list[int] | None:
        return self.model.observed_lengths()

    def detach(self, x: Any) -> Any:
        return self.model.detach(x)

    @property
    def time_axis(self) -> int:
        return getattr(self.model, "time_axis", 1 if self.batched else 0)

    def log_likelihood(self, params: Tensor, y: Any) -> Tensor:
        """The wrapped model's ``log_likelihood`` at the full parameter vector."""
        return self.model.log_likelihood(self.full(params), y)


class _FixedParametersOwnTrim(FixedParameters):
    """:class:`FixedParameters` of a model whose ``trim_time_series`` is its own."""

    def trim_time_series(self, x: Any) -> Any:
        return self.model.trim_time_series(x)


def fix_parameters(model: Model, fixed: Mapping[int, float]) -> FixedParameters:
    """:class:`FixedParameters` of ``model``, keeping the model's own history trimming.

    Example:
        >>> from gradcal.models import RandomWalk
        >>> fix_parameters(RandomWalk(5), {0: 0.5}).full(torch.tensor([])).tolist()
        [0.5]
    """
    own = getattr(type(model), "trim_time_series", None) is not Model.trim_time_series
    return (_FixedParametersOwnTrim if own else FixedParameters)(model, fixed)
