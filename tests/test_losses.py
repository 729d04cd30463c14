"""Loss builders: shapes, agreement with the discrepancies, every model in forward mode."""

import math

import networkx
import pytest
import torch
from torch.func import jvp

from gradcal.discrepancies import energy_distance, mmd, mse
from gradcal.kernels import GaussianKernel, LaplaceKernel
from gradcal.losses import (
    EnergyDistanceLoss,
    MMDLoss,
    MSELoss,
    NegativeLogLikelihood,
    SingleOutput_SimulateAndMMD,
    SingleOutput_SimulateAndMSELoss,
    UnivariateMMDLoss,
)
from gradcal.models import SIR, BrockHommesBeliefs, Normal, RamaCont, RandomWalk

MODELS = {
    "random_walk": (lambda: RandomWalk(15), [0.4]),
    "rama_cont": (
        lambda: RamaCont(50, 15, s=0.1, sigmoid_k=5.0, log10_params=True),
        [0.0, math.log10(0.5), 0.0, math.log10(0.7)],
    ),
    "brock_hommes": (lambda: BrockHommesBeliefs.wavy(20), [0.9, 0.2, 0.9, -0.2]),
    "sir": (
        lambda: SIR(networkx.watts_strogatz_graph(60, 4, 0.1, seed=0), 12),
        [-1.0, -0.5, -0.8],
    ),
    "normal": (lambda: Normal(15), [1.0, 2.0]),
}
LOSSES = {
    "mmd": lambda m, y: MMDLoss(m, y),
    "mmd_lags": lambda m, y: MMDLoss(m, y, LaplaceKernel(), window=2, increments=True),
    "mmd_linear_chunked": lambda m, y: MMDLoss(m, y, estimator="linear", chunk_size=4),
    "energy": lambda m, y: EnergyDistanceLoss(m, y, window=3, chunk_size=5),
    "mse": lambda m, y: MSELoss(m, y),
    "nll": lambda m, y: NegativeLogLikelihood(m),
}
PAIRS = [
    (mn, ln)
    for mn in MODELS
    for ln in LOSSES
    if ln != "nll" or hasattr(MODELS[mn][0](), "log_likelihood")
]


def _setup(model_name, loss_name, dtype=torch.float64):
    factory, theta = MODELS[model_name]
    model = factory()
    theta = torch.tensor(theta, dtype=dtype)
    observed = [y.detach() for y in model.run_and_observe(theta)]
    y = observed[0] if len(observed) == 1 else observed
    return model, theta, y, LOSSES[loss_name](model, y)


@pytest.mark.parametrize("model_name,loss_name", PAIRS)
def test_losses_are_batched_and_forward_mode_safe(model_name, loss_name):
    _, theta, y, loss = _setup(model_name, loss_name)
    params = theta.expand(3, -1).clone()
    assert loss(params, y).shape == (3,)
    assert loss(theta, y).shape == ()
    tangent = torch.randn_like(params)
    torch.manual_seed(1)
    value, directional = jvp(lambda p: loss(p, y).sum(), (params,), (tangent,))
    torch.manual_seed(1)
    leaf = params.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(leaf, y).sum(), leaf)
    assert torch.isfinite(value) and torch.isfinite(directional)
    torch.testing.assert_close(directional, (grad * tangent).sum().to(directional.dtype))


def test_mmd_loss_equals_mmd_of_the_simulation():
    model = RamaCont(100, 30, 0.1, 5.0)
    theta = torch.tensor([[1.0, 0.5, 1.0, 0.7], [1.0, 0.5, 2.0, 0.7]])
    y = model.run_and_observe(theta[0])[0]
    torch.manual_seed(3)
    value = MMDLoss(model, y)(theta, y)
    torch.manual_seed(3)
    (x,) = model.run_and_observe(theta)
    torch.testing.assert_close(value, mmd(x, y, GaussianKernel().fitted(y[:, None])))


def test_energy_and_mse_losses_equal_their_discrepancies():
    model = Normal(39)  # x_0 = 0, then 39 draws: (40, 1)
    theta, y = torch.tensor([[0.0, 1.0], [2.0, 1.0]]), torch.randn(40)
    for loss, f in ((EnergyDistanceLoss(model, y), energy_distance), (MSELoss(model), mse)):
        torch.manual_seed(5)
        value = loss(theta, y)
        torch.manual_seed(5)
        torch.testing.assert_close(value, f(model.run_and_observe(theta)[0][..., 0], y))


def test_several_outputs_sum_their_terms():
    model = SIR(networkx.watts_strogatz_graph(80, 4, 0.1, seed=1), 10)
    theta = torch.tensor([-1.0, -0.5, -0.8])
    y = [o.detach() for o in model.run_and_observe(theta)]
    torch.manual_seed(2)
    total = MMDLoss(model, y)(theta.expand(2, -1), y)
    torch.manual_seed(2)
    infected, recovered = model.run_and_observe(theta.expand(2, -1))
    expected = mmd(infected, y[0]) + mmd(recovered, y[1])
    torch.testing.assert_close(total, expected)


def test_a_failed_draw_gives_nan_for_that_draw_only():
    y = torch.randn(20)
    for loss in (MMDLoss(Normal(19), y), EnergyDistanceLoss(Normal(19), y), MSELoss(Normal(19))):
        value = loss(torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 1.0]]), y)
        assert torch.isnan(value[1]) and torch.isfinite(value[[0, 2]]).all()


def test_constant_observed_series_keeps_losses_finite():
    model, y = RandomWalk(10), torch.zeros(11)
    for loss in (MMDLoss(model, y), EnergyDistanceLoss(model, y)):
        theta = torch.tensor([[0.0], [3.0]], requires_grad=True)
        value = loss(theta, y)
        (g,) = torch.autograd.grad(value.sum(), theta)
        assert torch.isfinite(value).all() and torch.isfinite(g).all()


def test_mismatched_data_is_reported_with_both_shapes():
    model = Normal(9)  # outputs (10, 1)
    with pytest.raises(ValueError, match=r"\(10, 1\).*\(10, 2\)"):
        MMDLoss(model, torch.zeros(10, 2))(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(10,\).*\(12,\)"):
        MSELoss(model)(torch.tensor([0.0, 1.0]), torch.zeros(12))
    with pytest.raises(ValueError, match="observes 1 output"):
        MMDLoss(model, [torch.zeros(10), torch.zeros(10)])(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="`y` must be a tensor or a list"):
        MMDLoss(model, "data")
    with pytest.raises(TypeError, match="log_likelihood"):
        NegativeLogLikelihood(RamaCont(10, 10, 0.1, 5.0))
    with pytest.raises(ValueError, match="no observed data"):
        MSELoss(model)(torch.tensor([0.0, 1.0]))


def test_new_data_at_call_time_is_used():
    model, y = Normal(30), torch.randn(30)
    loss = EnergyDistanceLoss(model, y)
    theta = torch.tensor([0.0, 1.0])
    torch.manual_seed(0)
    a = loss(theta, y)
    torch.manual_seed(0)
    b = loss(theta, y + 5.0)
    assert b > a + 1.0


def test_negative_log_likelihood_is_minus_the_models_log_likelihood():
    model = BrockHommesBeliefs.wavy()
    y = model.run_and_observe(model.true_params)[0]
    theta = torch.tensor([[0.9, 0.2, 0.9, -0.2], [0.5, 0.5, 0.5, -0.5]])
    torch.testing.assert_close(
        NegativeLogLikelihood(model)(theta, y), -model.log_likelihood(theta, y)
    )


def test_blackbirds_names_are_the_same_losses():
    model, y = Normal(24), torch.randn(25)  # x_0 = 0 and 24 draws
    theta = torch.tensor([0.5, 1.0])
    values = []
    for loss in (
        SingleOutput_SimulateAndMMD(y, model),
        SingleOutput_SimulateAndMMD(model=model, y=y),
        MMDLoss(model, y),
    ):
        torch.manual_seed(9)
        values.append(loss(theta, y))
    assert values[0] == values[1] == values[2]
    torch.manual_seed(9)
    a = SingleOutput_SimulateAndMSELoss(model, gradient_horizon=0)(theta, y)
    torch.manual_seed(9)
    assert a == MSELoss(model)(theta, y)
    x = torch.randn(4, 25)
    torch.testing.assert_close(UnivariateMMDLoss(y)(x), mmd(x, y))
    with pytest.raises(ValueError, match="univariate"):
        UnivariateMMDLoss(torch.zeros(5, 2))


def test_failed_draws_do_not_poison_the_gradient_of_the_others():
    y = torch.randn(20)
    for loss in (MMDLoss(Normal(19), y), EnergyDistanceLoss(Normal(19), y), MSELoss(Normal(19))):
        theta = torch.tensor([[0.0, 1.0], [0.0, -1.0]], requires_grad=True)
        value = loss(theta, y)
        value[0].backward()
        assert torch.isfinite(theta.grad).all()


def test_losses_under_func_grad_and_vmap_with_chunks():
    y = torch.randn(40, dtype=torch.float64)
    loss = MMDLoss(Normal(40), y, chunk_size=8)
    theta = torch.tensor([0.3, 1.0], dtype=torch.float64)
    torch.manual_seed(0)
    g = torch.func.grad(lambda t: loss(t, y))(theta)
    torch.manual_seed(0)
    leaf = theta.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(leaf, y), leaf)
    torch.testing.assert_close(g, expected)
    values = torch.func.vmap(lambda t: loss(t, y), randomness="different")(theta.expand(3, 2))
    assert values.shape == (3,) and torch.isfinite(values).all()


def test_in_place_change_of_the_data_is_seen():
    model, y = Normal(30), torch.randn(30)
    loss = EnergyDistanceLoss(model, y)
    theta = torch.tensor([0.0, 1.0])
    torch.manual_seed(0)
    before = loss(theta, y)
    y.add_(5.0)
    torch.manual_seed(0)
    assert loss(theta, y) > before + 1.0


def test_bad_estimator_and_too_few_points():
    with pytest.raises(ValueError, match="estimator"):
        MMDLoss(Normal(5), torch.zeros(5), estimator="quadratic")
    with pytest.raises(ValueError, match="at least 2 points"):
        MMDLoss(Normal(0), torch.zeros(5))(torch.tensor([0.0, 1.0]))
