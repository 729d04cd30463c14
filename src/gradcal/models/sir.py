"""An SIR epidemic on a contact graph, with differentiable infections and recoveries."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradcal.models.model import Model
from gradcal.relax import relaxed_bernoulli, soft_minimum

__all__ = ["SIR"]

_CAP_HARDNESS = 20.0


def _edge_index(graph: Any) -> tuple[Tensor, int]:
    """Both directions of every edge as (2, 2E) node indices, and the number of nodes."""
    if not (hasattr(graph, "nodes") and hasattr(graph, "edges")):
        raise TypeError(f"SIR: `graph` must be a networkx graph, got {type(graph).__name__}.")
    index = {node: i for i, node in enumerate(graph.nodes)}
    if not index:
        raise ValueError("SIR: `graph` must have at least one node, got an empty graph.")
    pairs = [(index[u], index[v]) for u, v in graph.edges]
    edges = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T
    return torch.cat((edges, edges.flip(0)), dim=1), len(index)


class SIR(Model):
    r"""Susceptible-infected-recovered dynamics on a contact graph.

    A susceptible node with :math:`n` infected neighbours is infected with probability
    :math:`1 - (1 - \beta)^n`; an infected node recovers with probability :math:`\gamma`;
    initially each node is infected with probability :math:`f`. All three coin flips are
    straight-through Gumbel-softmax draws, so states stay exactly 0/1. Neighbour counts are
    one ``index_add`` over the edge list for all draws at once.

    Parameters, in order: :math:`\log_{10}(f, \beta, \gamma)`, softly capped below 0
    (probabilities at most one) by :func:`gradcal.relax.soft_minimum` with hardness 20,
    which moves values below -0.3 (probabilities below one half) by less than 2e-4 and
    keeps a gradient above 0.

    Arguments:
        graph: a networkx graph (undirected; nodes of any label).
        n_timesteps: number of steps T.
        tau_softmax: temperature of the Gumbel-softmax draws.

    Shapes: ``params`` (B, 3); history (B, T + 1, 3, N) with the infected, susceptible and
    recovered indicators; outputs: infected and recovered counts, each (B, T + 1).

    Example:
        >>> import networkx
        >>> _ = torch.manual_seed(0)
        >>> model = SIR(networkx.watts_strogatz_graph(100, 4, 0.1, seed=0), n_timesteps=20)
        >>> infected, recovered = model.run_and_observe(torch.tensor([-1.0, -0.5, -1.0]))
        >>> bool((infected + recovered <= 100).all()), infected.shape
        (True, torch.Size([21]))
    """

    batched = True
    history_length = 1
    n_params = 3

    def __init__(self, graph: Any, n_timesteps: int, tau_softmax: float = 0.1):
        super().__init__()
        edge_index, self.n_nodes = _edge_index(graph)
        self.register_buffer("edge_index", edge_index)
        self.n_timesteps = n_timesteps
        self.tau_softmax = tau_softmax

    def _probabilities(self, params: Tensor) -> Tensor:
        """(f, beta, gamma), each (B, 1), from log10 values capped softly below zero."""
        capped = soft_minimum(params, 0.0, _CAP_HARDNESS)
        return (10.0**capped).clamp(max=1.0 - torch.finfo(params.dtype).eps)

    def _infected_neighbours(self, infected: Tensor) -> Tensor:
        """Number of infected neighbours of every node: (B, N) -> (B, N)."""
        src, dst = self.edge_index.to(infected.device)
        return torch.zeros_like(infected).index_add(1, dst, infected[:, src])

    def initialize(self, params: Tensor) -> Tensor:
        f = self._probabilities(params)[:, 0:1]
        infected = relaxed_bernoulli(
            probs=f.expand(-1, self.n_nodes), tau=self.tau_softmax, hard=True
        )
        state = torch.stack((infected, 1.0 - infected, torch.zeros_like(infected)), dim=1)
        return state[:, None]

    def step(self, params: Tensor, x: Tensor) -> Tensor:
        prob = self._probabilities(params)
        beta, gamma = prob[:, 1:2], prob[:, 2:3]
        infected, susceptible, recovered = x[:, -1].unbind(1)
        n = self._infected_neighbours(infected)
        p_infection = -torch.expm1(n * torch.log1p(-beta)) * susceptible
        new_infected = relaxed_bernoulli(probs=p_infection, tau=self.tau_softmax, hard=True)
        new_recovered = relaxed_bernoulli(probs=gamma * infected, tau=self.tau_softmax, hard=True)
        state = torch.stack(
            (
                infected + new_infected - new_recovered,
                susceptible - new_infected,
                recovered + new_recovered,
            ),
            dim=1,
        )
        return state[:, None]

    def observed_lengths(self) -> list[int]:
        """T + 1 infected and T + 1 recovered counts, at t = 0, ..., T."""
        return [self.n_timesteps + 1, self.n_timesteps + 1]

    def observe(self, x: Tensor) -> list[Tensor]:
        return [x[:, :, 0].sum(-1), x[:, :, 2].sum(-1)]
