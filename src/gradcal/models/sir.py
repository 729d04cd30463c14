"""An SIR epidemic on a contact graph, with differentiable infections and recoveries."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradcal.compat import models as compat_models
from gradcal.models.model import SINGLE_DRAW_HOOKS, Model, accepts_one_draw, accepts_one_history
from gradcal.relax import relaxed_bernoulli, soft_minimum

# SIRMessagePassing is importable from here too (built on first use, see __getattr__)
__all__ = ["SIR"]


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
    r"""Susceptible-infected-recovered dynamics on a contact graph (BlackBIRDS' model).

    A susceptible node with $n$ infected neighbours (counted up to
    ``max_infected_neighbours``) is infected with probability $1 - (1 - \beta)^n$; an
    infected node recovers with probability $\gamma$; initially each node is
    infected with probability $f$. All three coin flips are straight-through
    Gumbel-softmax draws (:meth:`sample_bernoulli_gs`), so states stay exactly 0/1.
    Neighbour counts are one ``index_add`` over the edge list for all draws at once.

    Parameters, in order: $\log_{10}(f, \beta, \gamma)$, softly capped below 0
    (probabilities at most one) by :func:`gradcal.relax.soft_minimum` with hardness
    ``cap_hardness``. The defaults are BlackBIRDS' (hardness 2, at most 5 neighbours);
    hardness 2 moves interior values noticeably (log10 beta = -1 becomes -1.06), a
    hardness of 20 moves values below -0.3 by less than 2e-4, and
    ``max_infected_neighbours=float("inf")`` counts every neighbour.

    Arguments:
        graph: a networkx graph (undirected; nodes of any label).
        n_timesteps: number of steps T.
        device: where the model's tensors live (tensors of a run follow ``params``).
        tau_softmax: temperature of the Gumbel-softmax draws.
        cap_hardness: hardness of the soft cap of the log10 parameters at 0.
        max_infected_neighbours: infected neighbours counted at most.

    The states and outputs have torch's default dtype whatever the dtype of ``params``
    (as in BlackBIRDS); gradients reach ``params`` in its own dtype.

    Shapes: ``params`` (3,) or (B, 3); history (T + 1, 3, N) for one draw, (B, T + 1, 3, N)
    for B, holding the infected, susceptible and recovered indicators; outputs: infected and
    recovered counts, each (T + 1,) or (B, T + 1).

    BlackBIRDS' attributes ``graph`` (a torch_geometric ``Data``) and ``mp`` (a
    :class:`SIRMessagePassing`) are built on first use and need torch_geometric.

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
    state_ndim = 2
    single_draw_hooks = (*SINGLE_DRAW_HOOKS, "sample_bernoulli_gs")

    def __init__(
        self,
        graph: Any,
        n_timesteps: int,
        device: torch.device | str = "cpu",
        *,
        tau_softmax: float = 0.1,
        cap_hardness: float = 2.0,
        max_infected_neighbours: float = 5.0,
    ):
        super().__init__()
        if cap_hardness <= 0:
            raise ValueError(f"SIR: `cap_hardness` must be > 0, got {cap_hardness}.")
        if max_infected_neighbours < 0:
            raise ValueError(
                f"SIR: `max_infected_neighbours` must be >= 0, got {max_infected_neighbours}."
            )
        edge_index, self.n_nodes = _edge_index(graph)
        self.register_buffer("edge_index", edge_index.to(device))
        self.n_timesteps = n_timesteps
        self.device = device
        self.tau_softmax = tau_softmax
        self.cap_hardness = cap_hardness
        self.max_infected_neighbours = max_infected_neighbours
        self._networkx_graph = graph

    @property
    def graph(self) -> Any:
        """BlackBIRDS' ``graph``: the contact graph as a torch_geometric ``Data``."""
        if "_torch_geometric_graph" not in self.__dict__:
            self.__dict__["_torch_geometric_graph"] = compat_models.torch_geometric_graph(
                self._networkx_graph, self.edge_index.device
            )
        return self.__dict__["_torch_geometric_graph"]

    @property
    def mp(self) -> Any:
        """BlackBIRDS' ``mp``: ``SIRMessagePassing(aggr="add", node_dim=-1)``."""
        if "_message_passing" not in self.__dict__:
            self.__dict__["_message_passing"] = compat_models.SIRMessagePassing(
                aggr="add", node_dim=-1
            )
        return self.__dict__["_message_passing"]

    def sample_bernoulli_gs(self, probs: Tensor, tau: float = 0.1) -> Tensor:
        """Bernoulli(``probs``) draws, exactly 0/1, differentiable by the straight-through
        Gumbel-softmax; same shape as ``probs`` (BlackBIRDS takes (n,)).

        Example:
            >>> _ = torch.manual_seed(0)
            >>> SIR.sample_bernoulli_gs(None, torch.tensor([0.0, 1.0]))
            tensor([0., 1.])
        """
        return relaxed_bernoulli(probs=probs, tau=tau, hard=True)

    def _probabilities(self, params: Tensor) -> Tensor:
        """(f, beta, gamma), each (B, 1), from log10 values capped softly below zero."""
        capped = soft_minimum(params, 0.0, self.cap_hardness)
        return (10.0**capped).clamp(max=1.0 - torch.finfo(params.dtype).eps)

    def _infected_neighbours(self, infected: Tensor) -> Tensor:
        """Number of infected neighbours of every node: (B, N) -> (B, N)."""
        src, dst = self.edge_index.to(infected.device)
        return torch.zeros_like(infected).index_add(1, dst, infected[:, src])

    @accepts_one_draw
    def initialize(self, params: Tensor) -> Tensor:
        """Initial infections: (B, 1, 3, N)."""
        f = self._probabilities(params)[:, 0:1]
        infected = self.sample_bernoulli_gs(f.expand(-1, self.n_nodes), self.tau_softmax)
        infected = infected.to(torch.get_default_dtype())  # BlackBIRDS' states: default dtype
        state = torch.stack((infected, 1.0 - infected, torch.zeros_like(infected)), dim=1)
        return state[:, None]

    @accepts_one_draw
    def step(self, params: Tensor, x: Tensor) -> Tensor:
        """The next state from the history (B, T, 3, N): (B, 1, 3, N)."""
        prob = self._probabilities(params)
        beta, gamma = prob[:, 1:2], prob[:, 2:3]
        infected, susceptible, recovered = x[:, -1].unbind(1)
        n = self._infected_neighbours(infected).clamp(max=self.max_infected_neighbours)
        p_infection = -torch.expm1(n * torch.log1p(-beta)) * susceptible
        new_infected = self.sample_bernoulli_gs(p_infection, self.tau_softmax)
        new_recovered = self.sample_bernoulli_gs(gamma * infected, self.tau_softmax)
        state = torch.stack(
            (
                infected + new_infected - new_recovered,
                susceptible - new_infected,
                recovered + new_recovered,
            ),
            dim=1,
        )
        return state[:, None].to(x.dtype)

    def observed_lengths(self) -> list[int]:
        """T + 1 infected and T + 1 recovered counts, at t = 0, ..., T."""
        return [self.n_timesteps + 1, self.n_timesteps + 1]

    @accepts_one_history
    def observe(self, x: Tensor) -> list[Tensor]:
        """Infected and recovered counts: [(B, T), (B, T)]."""
        return [x[:, :, 0].sum(-1), x[:, :, 2].sum(-1)]


# BlackBIRDS' SIRMessagePassing lives in gradcal.compat.models; it is built on first use
# because it subclasses torch_geometric's MessagePassing, whose import takes seconds.
def __getattr__(name: str) -> Any:
    if name == "SIRMessagePassing":
        return compat_models.SIRMessagePassing
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
