"""SIR on a graph: exact compartments, the infection and recovery probabilities."""

import networkx
import pytest
import torch
from stats import Z_MAX, z_proportion

from gradcal.models import SIR
from gradcal.relax import soft_minimum


def test_every_node_is_in_exactly_one_compartment_and_recovery_only_grows():
    graph = networkx.watts_strogatz_graph(300, 6, 0.2, seed=1)
    model = SIR(graph, 30)
    history = model.run(torch.tensor([-1.0, -0.6, -0.9]).expand(5, -1))
    assert history.shape == (5, 31, 3, 300)
    assert set(history.unique().tolist()) <= {0.0, 1.0}
    assert (history.sum(2) == 1).all()
    infected, recovered = model.run_and_observe(torch.tensor([-1.0, -0.6, -0.9]))
    assert (recovered.diff() >= 0).all()
    assert (infected == infected.round()).all()


def test_initial_infections_have_frequency_f():
    model = SIR(networkx.empty_graph(1000), 0)
    f = 0.05
    (infected, _) = model.run_and_observe(torch.tensor([f, 0.5, 0.5]).log10().expand(200, -1))
    # BlackBIRDS' soft cap below log10 = 0 (hardness 2) moves log10(0.05) by 1e-3.
    f = 10 ** soft_minimum(torch.tensor(f).log10(), 0.0, 2.0).item()
    hits = infected[:, 0] / 1000
    assert abs(float((hits.mean() - f) / (f * (1 - f) / 200_000) ** 0.5)) < Z_MAX
    # With hardness 20 the frequency is 0.05 itself (the cap moves it by 1e-13).
    model = SIR(networkx.empty_graph(1000), 0, cap_hardness=20.0)
    (infected, _) = model.run_and_observe(torch.tensor([0.05, 0.5, 0.5]).log10().expand(200, -1))
    hits = infected[:, 0] / 1000
    assert abs(float((hits.mean() - 0.05) / (0.05 * 0.95 / 200_000) ** 0.5)) < Z_MAX


@pytest.mark.parametrize("n_infected", [1, 3])
def test_infection_probability_is_one_minus_escape_to_the_power_of_contacts(n_infected):
    graph = networkx.star_graph(4)  # node 0 is the centre, 1..4 the leaves
    model = SIR(graph, 1)
    draws = 100_000
    state = torch.zeros(draws, 1, 3, 5)
    state[:, 0, 1, 0] = 1.0  # susceptible centre
    state[:, 0, 0, 1 : 1 + n_infected] = 1.0
    state[:, 0, 1, 1 + n_infected :] = 1.0
    params = torch.tensor([-1.0, -0.7, -0.5]).expand(draws, -1)
    beta, gamma = model._probabilities(params)[0, 1:].tolist()
    new = model.step(params, state)
    assert abs(z_proportion(new[:, 0, 0, 0], 1 - (1 - beta) ** n_infected)) < Z_MAX
    recovered = new[:, 0, 2, 1 : 1 + n_infected].flatten()
    assert abs(z_proportion(recovered, gamma)) < Z_MAX


def test_graph_is_validated():
    with pytest.raises(ValueError, match="`graph` must have at least one node"):
        SIR(networkx.Graph(), 5)
    with pytest.raises(TypeError, match="`graph` must be a networkx graph"):
        SIR([(0, 1)], 5)


def test_graph_follows_the_device_of_params():
    model = SIR(networkx.path_graph(5), 3)
    infected, _ = model.run_and_observe(torch.zeros(2, 3, device="meta") - 1.0)
    assert infected.device.type == "meta"


def test_node_labels_need_not_be_integers():
    graph = networkx.relabel_nodes(networkx.path_graph(4), {i: f"n{i}" for i in range(4)})
    model = SIR(graph, 3)
    assert model.edge_index.shape == (2, 6)
    assert model.run_and_observe(torch.tensor([-0.5, -0.3, -1.0]))[0].shape == (4,)
