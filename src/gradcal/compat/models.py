"""BlackBIRDS 1.3's model helpers that gradcal's own time loop does not use.

- :func:`detach_gradient_horizon`: BlackBIRDS' ``Model.detach_gradient_horizon``
  (re-exported as a method of :class:`gradcal.models.model.Model`).
- ``SIRMessagePassing``: BlackBIRDS' ``torch_geometric`` message passing of infected
  neighbours (re-exported at ``gradcal.models.sir``). It subclasses
  ``torch_geometric.nn.conv.MessagePassing``, so it is built on first use: importing
  torch_geometric takes seconds and gradcal's own SIR does not need it.
- :func:`torch_geometric_graph`: BlackBIRDS' ``SIR.graph``, the contact graph as a
  ``torch_geometric`` ``Data`` object, also built on first use.

This module imports nothing from the rest of gradcal, so the models can re-export it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

# SIRMessagePassing is made by the module __getattr__ on first use
__all__ = ["SIRMessagePassing", "detach_gradient_horizon", "torch_geometric_graph"]  # noqa: F822


def detach_gradient_horizon(self: Any, time_series: Tensor, gradient_horizon: int) -> Tensor:
    r"""Detach all but the last ``gradient_horizon`` steps of a single-draw history.

    ``time_series`` is one draw's history, time on axis 0; values are unchanged, the
    steps before the last ``gradient_horizon`` no longer carry gradients (0 detaches all;
    a horizon at least the length of the history keeps all).

    Example:
        >>> x = torch.ones(5, 1, requires_grad=True)
        >>> y = detach_gradient_horizon(None, x * 2, 2)
        >>> y.sum().backward()
        >>> x.grad.flatten().tolist()
        [0.0, 0.0, 0.0, 2.0, 2.0]
    """
    if isinstance(gradient_horizon, bool) or not isinstance(gradient_horizon, int):
        raise TypeError(f"`gradient_horizon` must be an int >= 0, got {gradient_horizon!r}.")
    if gradient_horizon < 0:
        raise ValueError(f"`gradient_horizon` must be >= 0, got {gradient_horizon}.")
    cut = max(len(time_series) - gradient_horizon, 0)
    return torch.cat((time_series[:cut].detach(), time_series[cut:]))


def _import_torch_geometric() -> Any:
    try:
        import torch_geometric
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "BlackBIRDS' SIRMessagePassing and SIR.graph need torch_geometric "
            "(pip install torch_geometric); gradcal's SIR itself does not."
        ) from error
    return torch_geometric


@functools.cache
def _sir_message_passing() -> type:
    torch_geometric = _import_torch_geometric()

    class SIRMessagePassing(torch_geometric.nn.conv.MessagePassing):
        """Per node i: the sum over its neighbours j of ``infected[j] * susceptible[i]``.

        Build it as BlackBIRDS does, ``SIRMessagePassing(aggr="add", node_dim=-1)``;
        ``forward(edge_index (2, E), infected (N,), susceptible (N,)) -> (N,)``.
        """

        def forward(self, edge_index: Tensor, infected: Tensor, susceptible: Tensor) -> Tensor:
            return self.propagate(edge_index, x=infected, y=susceptible)

        def message(self, x_j: Tensor, y_i: Tensor) -> Tensor:
            return x_j * y_i

    SIRMessagePassing.__module__ = "gradcal.models.sir"
    return SIRMessagePassing


def torch_geometric_graph(graph: Any, device: torch.device | str = "cpu") -> Any:
    """A networkx graph as the ``torch_geometric`` ``Data`` object BlackBIRDS' SIR holds."""
    torch_geometric = _import_torch_geometric()
    return torch_geometric.utils.convert.from_networkx(graph).to(device)


def __getattr__(name: str) -> Any:
    if name == "SIRMessagePassing":
        return _sir_message_passing()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
