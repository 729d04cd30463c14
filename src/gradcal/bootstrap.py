r"""Resampled and simulated data sets, and a loss that scores each draw against its own data set.

A collection of B data sets is held *stacked*: one tensor (B, T, *event), or a list of such,
one per model output, like the observed data with a leading data-set axis.

- :func:`block_bootstrap`: the moving-block bootstrap of an observed series (block length 1:
  the ordinary i.i.d. bootstrap).
- :func:`simulated_datasets`: B data sets simulated from the model at given parameters (the
  parametric bootstrap).
- :class:`PerDatasetLoss`: theta (B, D) -> (B,), row b scored against data set b and averaged
  over ``repeats`` simulations, with one batched simulation for gradcal's loss builders; so
  B fits (one per data set) run as one batched optimisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradcal.gradients import BatchedLoss
from gradcal.simulate import simulate_and_observe_model

__all__ = [
    "PerDatasetLoss",
    "block_bootstrap",
    "dataset",
    "n_datasets",
    "repeat_dataset",
    "simulated_datasets",
]


def _outputs(data: Any, name: str = "data") -> list[Tensor]:
    outputs = [data] if isinstance(data, Tensor) else data
    if not isinstance(outputs, list | tuple) or not outputs:
        raise TypeError(f"`{name}` must be a tensor or a non-empty list of tensors.")
    if not all(isinstance(o, Tensor) and o.ndim >= 1 for o in outputs):
        raise TypeError(f"`{name}` must hold tensors with a leading time axis.")
    return list(outputs)


def _like(data: Any, outputs: list[Tensor]) -> Any:
    return outputs[0] if isinstance(data, Tensor) else outputs


def dataset(stacked: Any, index: int) -> Any:
    """Data set ``index`` of a stack: (T, *event) (or a list of such).

    Example:
        >>> dataset(torch.arange(6.0).reshape(2, 3), 1)
        tensor([3., 4., 5.])
    """
    return _like(stacked, [o[index] for o in _outputs(stacked, "stacked")])


def n_datasets(stacked: Any) -> int:
    """The number B of data sets in a stack."""
    return _outputs(stacked, "stacked")[0].shape[0]


def repeat_dataset(data: Any, n: int) -> Any:
    """``n`` copies of one data set as a stack (a view, no copy): (n, T, *event)."""
    return _like(data, [o.expand(n, *o.shape) for o in _outputs(data)])


def block_bootstrap(
    data: Any,
    n: int,
    block_length: int | None = None,
    generator: torch.Generator | None = None,
) -> Any:
    r"""``n`` moving-block bootstrap copies of an observed series, stacked: (n, T, *event).

    Each copy joins ceil(T / l) blocks of l consecutive time steps, whose starts are drawn
    uniformly from 0..T - l, and keeps the first T steps. Block length 1 is the ordinary
    bootstrap of i.i.d. data; the default l = round(T^(1/3)) keeps the short-range
    dependence of a time series. Outputs of a list are resampled at the same times.

    Arguments:
        data: observed series (T, *event) or a list of such with the same T.
        n: the number of copies.
        block_length: l (1 <= l <= T); None: round(T^(1/3)).
        generator: the random stream (default: torch's global one).

    Example:
        >>> y = torch.arange(10.0)
        >>> g = torch.Generator().manual_seed(0)
        >>> copies = block_bootstrap(y, 3, block_length=5, generator=g)
        >>> copies.shape, bool(((copies[:, 1:5] - copies[:, 0:4]) == 1).all())
        (torch.Size([3, 10]), True)
    """
    outputs = _outputs(data)
    t = outputs[0].shape[0]
    if any(o.shape[0] != t for o in outputs):
        raise ValueError("`data`: every output must have the same number of time steps.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an int >= 1, got {n!r}.")
    length = max(1, round(t ** (1 / 3))) if block_length is None else block_length
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= t:
        raise ValueError(
            f"`block_length` must be an int in 1..{t} (the series length), got {length!r}."
        )
    blocks = math.ceil(t / length)
    starts = torch.randint(0, t - length + 1, (n, blocks), generator=generator)
    index = (starts[..., None] + torch.arange(length)).reshape(n, -1)[:, :t]
    return _like(data, [o[index.to(o.device)] for o in outputs])


def simulated_datasets(
    model: Any, theta: Tensor, like: Any, gradient_horizon: int | None = None
) -> Any:
    """Data sets simulated from ``model`` at each row of theta (B, D), shaped like ``like``.

    Each output (B, T_out, ...) is reshaped to (B, *shape of the observed output) when the
    sizes agree (e.g. a (T, 1) output against (T,) data).

    Example:
        >>> from gradcal.models import RandomWalk
        >>> simulated_datasets(RandomWalk(5), torch.zeros(4, 1), torch.zeros(6)).shape
        torch.Size([4, 6])
    """
    observed = _outputs(like, "like")
    with torch.no_grad():
        simulated = simulate_and_observe_model(
            model, theta, gradient_horizon, batch=theta.ndim == 2
        )
    if len(simulated) != len(observed):
        raise ValueError(
            f"the model observes {len(simulated)} output(s) but the data hold {len(observed)}."
        )
    out = []
    for x, obs in zip(simulated, observed, strict=True):
        if x.shape[1:] != obs.shape:
            if x[0].numel() != obs.numel():
                raise ValueError(
                    f"a simulated output {tuple(x.shape[1:])} does not match the data "
                    f"{tuple(obs.shape)}."
                )
            x = x.reshape(x.shape[0], *obs.shape)
        out.append(x.to(obs.dtype))
    return _like(like, out)


class PerDatasetLoss:
    r"""The loss of row b of theta against data set b, averaged over simulations.

    $$
    L_b(\theta_b) = \frac{1}{R} \sum_{r=1}^R l(\theta_b, y_b; \varepsilon_{br})
    $$

    For gradcal's loss builders (which have ``model`` and ``compare``) the B x R simulations
    are one batched call and only the comparisons run per data set; any other loss is
    called once per data set with its R copies of theta_b as one batch of draws.

    Arguments:
        loss: ``loss(theta, data)`` as for :class:`gradcal.infer.VI`.
        datasets: B data sets, stacked (see :func:`block_bootstrap`).
        repeats: R, the simulations averaged per row (1 for an exact loss).

    Attributes:
        simulations: the simulations run so far (rows times repeats).

    Example:
        >>> def loss(theta, y):                       # a batched exact loss
        ...     return ((y - theta) ** 2).sum(-1)
        >>> loss.batched = True
        >>> rows = PerDatasetLoss(loss, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> rows(torch.tensor([[1.0], [1.0]]))
        tensor([2., 0.])
    """

    def __init__(self, loss: Any, datasets: Any, repeats: int = 1):
        if not callable(loss):
            raise TypeError(f"`loss` must be callable, got {type(loss).__name__}.")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"`repeats` must be an int >= 1, got {repeats!r}.")
        self.loss, self.datasets, self.repeats = loss, datasets, repeats
        self.n = n_datasets(datasets)
        self.simulated = callable(getattr(loss, "compare", None)) and hasattr(loss, "model")
        self.batched = BatchedLoss(loss)
        self.simulations = 0

    def __call__(self, theta: Tensor) -> Tensor:
        """theta (B, D) -> (B,): NaN where every simulation of a row failed."""
        if theta.ndim != 2 or theta.shape[0] != self.n:
            raise ValueError(
                f"`theta` must be ({self.n}, D), one row per data set, got {tuple(theta.shape)}."
            )
        r = self.repeats
        rows = theta.repeat_interleave(r, 0)
        if not getattr(self.loss, "exact", False):
            self.simulations += rows.shape[0]
        if self.simulated:
            outputs = simulate_and_observe_model(
                self.loss.model, rows, self.loss.gradient_horizon, batch=True
            )
            parts = [
                self.loss.compare(
                    [x[b * r : (b + 1) * r] for x in outputs], dataset(self.datasets, b)
                )
                for b in range(self.n)
            ]
        else:
            parts = [
                self.batched(rows[b * r : (b + 1) * r], dataset(self.datasets, b))
                for b in range(self.n)
            ]
        values = torch.stack(parts)  # (B, R)
        finite = torch.isfinite(values)
        total = torch.where(finite, values, 0.0).sum(1)
        count = finite.sum(1)
        return torch.where(count > 0, total / count.clamp(min=1), torch.nan)
