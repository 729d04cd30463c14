"""The built-in models at BlackBIRDS 1.3's import paths: names, signatures, layouts.

Written from BlackBIRDS' documented API and the behaviour of its source: for one draw each
model returns BlackBIRDS' shapes and dtypes; for B draws the same with a leading B axis;
``observe(run(theta))`` equals ``run_and_observe(theta)`` under the same seed; a user
subclass written for one draw receives one draw.
"""

import inspect
import math

import networkx
import pytest
import torch
from matplotlib.figure import Figure
from stats import Z_MAX, z_proportion

from gradcal.gradients import BatchedLoss
from gradcal.losses import MMDLoss
from gradcal.models.brock_hommes import BrockHommes
from gradcal.models.model import Model
from gradcal.models.normal import Normal
from gradcal.models.rama_cont import RamaCont
from gradcal.models.random_walk import RandomWalk
from gradcal.models.sir import SIR
from gradcal.posterior_estimators import TrainableGaussian
from gradcal.simulate import batch_of_draws, run_model, simulate_and_observe_model

N_NODES, N_AGENTS, T = 40, 30, 6
BH_THETA = [math.log(120), 0.0, 0.9, 0.9, 1.01, 0.0, 0.2, -0.2, 0.0, math.log(0.04), 0.0]


def _graph():
    return networkx.watts_strogatz_graph(N_NODES, 4, 0.1, seed=0)


# name -> (model factory, one draw, history shape for one draw, output shapes for one draw)
CASES = {
    "random_walk": (lambda: RandomWalk(T), torch.tensor(0.3), (T + 1, 1), [(T + 1, 1)]),
    "normal": (lambda: Normal(T), torch.tensor([1.0, 2.0]), (T + 1, 1), [(T + 1, 1)]),
    "brock_hommes": (lambda: BrockHommes(T), torch.tensor(BH_THETA), (T + 3, 1), [(T + 3,)]),
    "rama_cont": (
        lambda: RamaCont(N_AGENTS, T, s=0.1, sigmoid_k=5.0),
        torch.tensor([0.0, 1.0, 0.5, 0.2]),
        (T + 1, 3, N_AGENTS),
        [(T + 1,)],
    ),
    "sir": (
        lambda: SIR(_graph(), T),
        torch.tensor([-1.0, -0.5, -1.0]),
        (T + 1, 3, N_NODES),
        [(T + 1,), (T + 1,)],
    ),
}


def test_every_name_is_importable_at_blackbirds_paths():
    from gradcal.models.rama_cont import RamaCont as RC
    from gradcal.models.sir import SIR as S

    for method in ("compute_order_soft", "compute_order_hard", "compute_order"):
        assert list(inspect.signature(getattr(RC, method)).parameters) == [
            "self",
            "epsilon_t",
            "nu_t",
        ]
    assert list(inspect.signature(RC.compute_returns).parameters) == ["self", "order", "eta"]
    assert list(inspect.signature(RC.compute_new_nu_t).parameters) == [
        "self",
        "nu_t",
        "s",
        "returns",
    ]
    signature = inspect.signature(S.sample_bernoulli_gs)
    assert list(signature.parameters) == ["self", "probs", "tau"]
    assert signature.parameters["tau"].default == 0.1
    assert list(inspect.signature(Model.detach_gradient_horizon).parameters) == [
        "self",
        "time_series",
        "gradient_horizon",
    ]


def test_constructors_take_blackbirds_arguments_and_keep_its_attribute_names():
    def params(cls):
        signature = inspect.signature(cls.__init__).parameters
        return {k: v.default for k, v in signature.items() if v.kind is v.POSITIONAL_OR_KEYWORD}

    empty = inspect.Parameter.empty
    assert params(SIR) == {"self": empty, "graph": empty, "n_timesteps": empty, "device": "cpu"}
    assert params(BrockHommes) == {"self": empty, "n_timesteps": 100, "device": "cpu"}
    assert params(RandomWalk) == {"self": empty, "n_timesteps": empty, "tau_softmax": 0.1}
    assert params(Normal) == {"self": empty, "n_timesteps": empty}
    rc_params = params(RamaCont)
    assert list(rc_params)[:5] == ["self", "n_agents", "n_timesteps", "s", "sigmoid_k"]

    sir = SIR(_graph(), n_timesteps=T, device="cpu")
    assert sir.n_timesteps == T
    bh = BrockHommes()
    assert (bh.n_timesteps, bh.device) == (100, "cpu")
    rw = RandomWalk(T)
    assert (rw.n_timesteps, rw.tau_softmax) == (T, 0.1)
    rc = RamaCont(n_agents=N_AGENTS, n_timesteps=T, s=0.1, sigmoid_k=5.0)
    assert (rc.n_agents, rc.n_timesteps, rc.s, rc.sigmoid_k) == (N_AGENTS, T, 0.1, 5.0)


@pytest.mark.parametrize("name", list(CASES))
def test_shapes_and_dtypes_for_one_draw_and_for_b_draws(name):
    factory, theta, history, outputs = CASES[name]
    model = factory()
    x = model.run(theta)
    assert x.shape == history and x.dtype == torch.float32
    observed = model.run_and_observe(theta)
    assert [tuple(y.shape) for y in observed] == outputs
    assert all(y.dtype == torch.float32 for y in observed)
    # initialize and step on their own, as BlackBIRDS users call them
    x0 = model.initialize(theta)
    assert x0.shape[1:] == history[1:]
    assert model.step(theta, x0).shape == (1, *history[1:])

    # as in BlackBIRDS: SIR, Normal and Brock-Hommes stay in the default dtype for float64
    # parameters; the random walk and Rama Cont follow the parameters
    expected = torch.float64 if name in ("random_walk", "rama_cont") else torch.float32
    assert model.run(theta.double()).dtype == expected
    assert all(y.dtype == expected for y in model.run_and_observe(theta.double()))

    batch = theta.reshape(-1).expand(4, -1)
    assert model.run(batch).shape == (4, *history)
    assert [tuple(y.shape) for y in model.run_and_observe(batch)] == [(4, *s) for s in outputs]
    assert model.initialize(batch).shape == (4, *x0.shape)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("batch", [None, 3])
def test_observe_of_run_equals_run_and_observe_under_the_same_seed(name, batch):
    factory, theta, _, _ = CASES[name]
    model = factory()
    params = theta if batch is None else theta.reshape(-1).expand(batch, -1)
    torch.manual_seed(5)
    separately = model.observe(model.run(params))
    torch.manual_seed(5)
    together = model.run_and_observe(params)
    assert len(separately) == len(together)
    for a, b in zip(separately, together, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the outputs are not degenerate (the old SIR bug gave all-ones series)
    assert any(y.std() > 0 for y in together)


def _shapes(outputs):
    return [tuple(y.shape) for y in outputs]


@pytest.mark.parametrize("name", list(CASES))
def test_one_draw_of_q_as_1_by_d_keeps_blackbirds_one_draw_layout(name):
    """BlackBIRDS' notebooks plot ``rw.run_and_observe(q.sample(1)[0])[0]`` and
    ``rw.observe(rw.run(q.sample(1)[0]))[0]``: one draw taken as a (1, D) tensor gives the
    one-draw layout (no batch axis), the same numbers as the (D,) draw."""
    factory, theta, history, outputs = CASES[name]
    model = factory()
    q = TrainableGaussian(theta.reshape(-1).tolist(), 1e-6)  # BlackBIRDS' family
    with torch.no_grad():
        draw = q.sample(1)[0]
    assert draw.ndim == 2 and draw.shape[0] == 1
    torch.manual_seed(3)
    together = model.run_and_observe(draw)
    torch.manual_seed(3)
    history_of_run = model.run(draw)
    separately = model.observe(history_of_run)
    torch.manual_seed(3)
    as_vector = model.run_and_observe(draw[0])
    assert tuple(history_of_run.shape) == history
    for got in (together, separately):
        assert _shapes(got) == outputs
        for a, b in zip(got, as_vector, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the notebooks' last cell: matplotlib takes at most 2-D arrays
    Figure().subplots().plot(together[0].numpy())
    # a batch of one, where it is meant as one
    assert _shapes(model.run_and_observe(draw, batch=True)) == [(1, *s) for s in outputs]
    assert model.run(draw, batch=True).shape == (1, *history)
    with batch_of_draws():
        assert _shapes(model.run_and_observe(draw)) == [(1, *s) for s in outputs]
        assert _shapes(simulate_and_observe_model(model, draw)) == [(1, *s) for s in outputs]
    assert _shapes(simulate_and_observe_model(model, draw)) == outputs
    assert tuple(run_model(model, draw).shape) == history


def test_batch_argument_is_checked():
    model = RandomWalk(T)
    with pytest.raises(ValueError, match=r"batch=True.*\(B, D\)"):
        model.run_and_observe(torch.zeros(1), batch=True)
    with pytest.raises(ValueError, match=r"batch=False.*one draw"):
        model.run_and_observe(torch.zeros(2, 1), batch=False)
    with pytest.raises(TypeError, match="batch"):
        model.run_and_observe(torch.zeros(1, 1), batch="yes")
    assert model.run_and_observe(torch.zeros(1, 1), batch=False)[0].shape == (T + 1, 1)


def test_a_batched_loss_with_one_draw_still_sees_a_batch_of_one():
    """gradcal's engine calls a loss written for (B, D) with B = 1 at times (one chain of
    MCMC, one start of SMD): inside it, (1, D) stays a batch."""
    model = Normal(T)

    def loss(theta, y):
        (x,) = model.run_and_observe(theta)
        assert x.shape == (theta.shape[0], T + 1, 1)
        return (x[:, 1:, 0] - y).square().mean(-1)

    loss.batched = True
    y = torch.zeros(T)
    assert BatchedLoss(loss)(torch.tensor([[0.0, 1.0]]), y).shape == (1,)
    assert MMDLoss(model, y)(torch.tensor([[0.0, 1.0]])).shape == (1,)
    assert MMDLoss(model, y)(torch.tensor([0.0, 1.0])).shape == ()


@pytest.mark.parametrize("name", list(CASES))
def test_a_user_subclass_written_for_one_draw_receives_one_draw(name):
    factory, theta, history, outputs = CASES[name]
    parent = type(factory())
    seen = []

    class OneDraw(parent):
        def step(self, params, x):
            seen.append((params.shape, x.shape[1:]))
            # BlackBIRDS style: index the draw's parameters one by one
            return super().step(torch.stack([params[i] for i in range(len(params))]), x)

    model = factory()
    model.__class__ = OneDraw
    assert not OneDraw.batched
    d = theta.reshape(-1).shape[0]
    observed = model.run_and_observe(theta.reshape(-1).expand(2, -1))
    assert [tuple(y.shape) for y in observed] == [(2, *s) for s in outputs]
    assert len(seen) == 2 * T
    assert all(p == (d,) and rest == history[1:] for p, rest in seen)


def test_a_subclass_declaring_batched_keeps_the_batch():
    seen = []

    class Batched(RandomWalk):
        batched = True

        def step(self, params, x):
            seen.append(params.shape)
            return super().step(params, x)

    Batched(3).run_and_observe(torch.zeros(5, 1))
    assert seen == [(5, 1)] * 3


def test_brock_hommes_notebook_subclass_with_its_own_parameter_vector():
    # BlackBIRDS' Brock-Hommes notebook: four free parameters written into the 11-vector.
    fixed = BH_THETA

    class CustomBrockHommes(BrockHommes):
        def step(self, params, x):
            expanded = torch.tensor(fixed)
            expanded[2], expanded[3], expanded[6], expanded[7] = params
            return super().step(expanded, x)

    model = CustomBrockHommes(20)
    theta = torch.tensor([0.9, 0.9, 0.2, -0.2], requires_grad=True)
    torch.manual_seed(0)
    data = model.observe(model.run(theta))
    torch.manual_seed(0)
    assert torch.equal(data[0], model.run_and_observe(theta)[0])
    assert data[0].shape == (23,) and (data[0][:3] == 0).all()
    data[0].sum().backward()
    assert torch.isfinite(theta.grad).all() and (theta.grad != 0).any()
    assert model.run_and_observe(theta.detach().expand(3, -1))[0].shape == (3, 23)


def test_brock_hommes_step_is_blackbirds_formula():
    # sigma = exp(-40): the step is its conditional mean; check it against the equation.
    model = BrockHommes(1)
    theta = torch.tensor(
        [math.log(10), 0.3, 0.5, 2.0, -1.0, 0.1, -0.2, 0.3, 0.0, -40.0, math.log(0.5)],
        dtype=torch.float64,
    )
    x = torch.tensor([[0.2], [-0.1], [0.4]])  # x_{t-3}, x_{t-2}, x_{t-1}
    beta, b, R = 10.0, torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64), 1.5
    g = torch.tensor([0.3, 0.5, 2.0, -1.0], dtype=torch.float64)

    def soft_max(a, c, k):
        return torch.log(torch.exp(k * a) + torch.exp(k * torch.as_tensor(c))) / k

    g = soft_max(-soft_max(-g, -1.0, 2.0), 1e-3, 2.0)  # squeezed into [1e-3, 1] softly
    x1, x2, x3 = 0.4, -0.1, 0.2
    n = torch.softmax(beta * (x1 - R * x2) * (g * x3 + b - R * x2), 0)
    expected = (n * (g * x1 + b)).sum() / R
    step = model.step(theta, x)
    assert step.shape == (1, 1) and step.dtype == torch.float32
    assert step.item() == pytest.approx(expected.item(), abs=1e-6)


def test_rama_cont_helpers_follow_blackbirds_definitions():
    rc = RamaCont(n_agents=4, n_timesteps=1, s=0.1, sigmoid_k=3.0)
    nu = torch.tensor([0.5, 1.0, 2.0, 0.1])
    eps = torch.tensor(1.5, requires_grad=True)
    hard = rc.compute_order_hard(eps, nu)
    assert hard.tolist() == [1.0, 1.0, 0.0, 1.0] and hard.dtype == torch.float32
    soft = rc.compute_order_soft(eps, nu)
    expected = torch.sigmoid(3.0 * (eps - nu)) - torch.sigmoid(3.0 * (-nu - eps))
    torch.testing.assert_close(soft, expected)
    order = rc.compute_order(eps, nu)
    assert order.tolist() == hard.tolist()
    (grad,) = torch.autograd.grad(order.sum(), eps)
    (soft_grad,) = torch.autograd.grad(expected.sum(), eps)
    torch.testing.assert_close(grad, soft_grad)
    assert rc.compute_order_hard(torch.tensor(-1.5), nu).tolist() == [-1.0, -1.0, 0.0, -1.0]
    r = rc.compute_returns(torch.tensor([1.0, -1.0, 1.0, 1.0]), 0.5)
    assert r.shape == () and r.item() == pytest.approx(2 / (4 * 0.5))
    batched = rc.compute_returns(torch.ones(3, 4), torch.full((3, 1), 0.5))
    assert batched.shape == (3, 1)


@pytest.mark.parametrize("n", [2_000, 20_000])  # dense draws, then scattered positions
def test_rama_cont_new_thresholds_reset_to_the_return_with_probability_s(n):
    rc = RamaCont(n_agents=n, n_timesteps=1, s=0.1, sigmoid_k=5.0)
    nu = torch.rand(n) + 5.0
    new = rc.compute_new_nu_t(nu, torch.tensor(0.1), torch.tensor(-2.0))
    assert new.shape == nu.shape
    reset = new == 2.0
    assert ((new == nu) | reset).all()
    assert abs(z_proportion(reset, 0.1)) < Z_MAX
    batched = rc.compute_new_nu_t(nu.expand(3, -1), 0.1, torch.tensor([1.0, 2.0, 3.0]))
    assert batched.shape == (3, n)
    assert ((batched == nu) | (batched == torch.tensor([[1.0], [2.0], [3.0]]))).all()


def test_rama_cont_initial_thresholds_are_lognormal_and_the_first_return_zero():
    rc = RamaCont(n_agents=20_000, n_timesteps=1, s=0.1, sigmoid_k=5.0)
    x = rc.initialize(torch.tensor([0.0, 0.5, 0.5, 0.2]))
    assert x.shape == (1, 3, 20_000)
    assert (x[0, 1:] == 0).all()  # no signal, zero return
    log_nu = x[0, 0].log()
    # mean of 20,000 N(0, 0.5^2) draws: sd 0.5 / sqrt(20,000) = 0.0035
    assert abs(log_nu.mean().item()) < Z_MAX * 0.5 / 20_000**0.5


def test_rama_cont_subclass_overriding_a_helper_is_used_by_the_step():
    class NoTrading(RamaCont):
        def compute_returns(self, order, eta):
            assert order.shape == (50,) and eta.shape == ()  # BlackBIRDS' shapes
            return 0.0 * order.sum()

    (returns,) = NoTrading(50, 5, 0.1, 5.0).run_and_observe(torch.tensor([0.0, 1.0, 1.0, 0.2]))
    assert returns.shape == (6,) and (returns == 0).all()
    (returns,) = RamaCont(50, 5, 0.1, 5.0).run_and_observe(torch.tensor([0.0, 1.0, 1.0, 0.2]))
    assert (returns != 0).any()


def test_sir_counts_at_most_five_infected_neighbours_as_blackbirds():
    # a susceptible centre with 8 infected leaves: infected with 1 - (1 - beta)^5, not ^8
    model = SIR(networkx.star_graph(8), 1)
    draws, beta = 50_000, 0.1
    state = torch.zeros(draws, 1, 3, 9)
    state[:, 0, 1, 0] = 1.0
    state[:, 0, 0, 1:] = 1.0
    log10 = torch.tensor([-1.0, math.log10(beta), -6.0]).expand(draws, -1)
    capped = 10 ** (-torch.log(torch.exp(-2.0 * log10[0, 1]) + 1) / 2.0)  # hardness 2
    p = 1 - (1 - capped.item()) ** 5
    new = model.step(log10, state)
    hits = new[:, 0, 0, 0] == 1
    assert abs(z_proportion(hits, p)) < Z_MAX
    assert abs(z_proportion(hits, 1 - (1 - capped.item()) ** 8)) > Z_MAX


def test_sir_sample_bernoulli_gs_is_exact_and_differentiable():
    model = SIR(_graph(), 1)
    probs = torch.full((40_000,), 0.3, requires_grad=True)
    draws = model.sample_bernoulli_gs(probs)
    assert draws.shape == (40_000,) and set(draws.unique().tolist()) <= {0.0, 1.0}
    assert abs(z_proportion(draws, 0.3)) < Z_MAX
    draws.sum().backward()
    assert torch.isfinite(probs.grad).all() and (probs.grad != 0).any()


def test_detach_gradient_horizon_keeps_values_and_the_last_steps_gradients():
    theta = torch.tensor(2.0, requires_grad=True)
    history = theta * torch.ones(6, 1)
    cut = RandomWalk(5).detach_gradient_horizon(history, 2)
    torch.testing.assert_close(cut, history)
    (grad,) = torch.autograd.grad(cut[:4].sum(), theta, retain_graph=True)
    assert grad.item() == 0.0
    (grad,) = torch.autograd.grad(cut.sum(), theta)
    assert grad.item() == 2.0  # only the last two steps reach theta
    history = theta * torch.ones(6, 1)
    none = RandomWalk(5).detach_gradient_horizon(history, 0)
    (grad,) = torch.autograd.grad(none.sum(), theta, allow_unused=True)
    assert grad is None or grad.item() == 0.0


@pytest.mark.slow
def test_sir_message_passing_counts_infected_neighbours_of_susceptible_nodes():
    pytest.importorskip("torch_geometric")
    from gradcal.models.sir import SIRMessagePassing

    graph = networkx.path_graph(4)  # 0 - 1 - 2 - 3
    model = SIR(graph, 1)
    infected = torch.tensor([1.0, 0.0, 1.0, 0.0])
    susceptible = torch.tensor([0.0, 1.0, 0.0, 1.0])
    mp = SIRMessagePassing(aggr="add", node_dim=-1)
    counts = mp(model.graph.edge_index, infected, susceptible)
    assert counts.tolist() == [0.0, 2.0, 0.0, 1.0]
    assert model.graph.num_nodes == 4
    assert isinstance(model.mp, SIRMessagePassing)
