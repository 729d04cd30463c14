"""Tests of the time loop: layouts, the gradient horizon and input validation."""

import pytest
import torch

from gradcal.models import Model, RandomWalk
from gradcal.simulate import run_model, simulate_and_observe_model


class BlackBirdsRandomWalk(Model):
    """A single-draw model written as in the BlackBIRDS tutorial (time on axis 0)."""

    def __init__(self, n_timesteps):
        super().__init__()
        self.n_timesteps = n_timesteps

    def initialize(self, params):
        return torch.zeros(1).reshape(1, 1)

    def trim_time_series(self, x):
        return x[-1:]

    def step(self, params, x):
        p = torch.sigmoid(params)
        logits = torch.vstack((p, 1 - p)).log()
        step = torch.nn.functional.gumbel_softmax(logits, dim=0, tau=0.1, hard=True)
        return (x[-1] + step[0] - step[1]).reshape(1, 1)

    def observe(self, x):
        return [x]


class LinearRecursion(Model):
    """x_{t+1} = a x_t + theta, deterministic: gradients through time are known exactly."""

    batched = True
    n_params = 1
    history_length = 1

    def __init__(self, n_timesteps, a):
        super().__init__()
        self.n_timesteps, self.a = n_timesteps, a

    def initialize(self, params):
        return torch.zeros_like(params)

    def step(self, params, x):
        return self.a * x[:, -1:] + params

    def observe(self, x):
        return [x]


def test_blackbirds_style_model_runs_unchanged():
    model = BlackBirdsRandomWalk(10)
    (x,) = model.run_and_observe(torch.tensor([0.3]))
    assert x.shape == (11, 1)
    assert set(x.diff(dim=0).abs().flatten().tolist()) == {1.0}
    (xb,) = simulate_and_observe_model(model, torch.zeros(4, 1))
    assert xb.shape == (4, 11, 1)
    assert model.run(torch.tensor([0.3])).shape == (11, 1)


def test_single_draw_and_batched_shapes_of_builtin_model():
    model = RandomWalk(7)
    assert model.run_and_observe(torch.zeros(1))[0].shape == (8, 1)
    assert model.run_and_observe(torch.zeros(5, 1))[0].shape == (5, 8, 1)
    assert run_model(model, torch.zeros(5, 1)).shape == (5, 8, 1)


@pytest.mark.parametrize("horizon", [None, 0, 1, 3, 4])
def test_gradient_horizon_truncates_paths_to_at_most_k_transitions(horizon):
    a, n = 0.9, 10
    theta = torch.tensor([[0.5]], requires_grad=True)
    (x,) = simulate_and_observe_model(LinearRecursion(n, a), theta, horizon, batch=True)
    expected = []  # d x_{t+1} / d theta = sum_{j=0}^{t-d} a^j, d the last detach before step t
    for t in range(n):
        if horizon is None:
            d = 0
        elif horizon == 0:
            d = t
        else:
            d = (t // horizon) * horizon
        expected.append(sum(a**j for j in range(t - d + 1)))
    for t in range(n):
        (g,) = torch.autograd.grad(x[0, t + 1], theta, retain_graph=True)
        assert g.item() == pytest.approx(expected[t])


def test_gradient_horizon_changes_gradients_not_values():
    model = RandomWalk(30)
    grads, values = [], []
    for horizon in (None, 0):
        theta = torch.tensor([0.2], requires_grad=True)
        torch.manual_seed(5)
        (x,) = model.run_and_observe(theta, gradient_horizon=horizon)
        x.sum().backward()
        grads.append(theta.grad.item())
        values.append(x.detach())
    assert torch.equal(values[0], values[1])
    assert grads[0] != pytest.approx(grads[1])


@pytest.mark.parametrize(
    "params,error,match",
    [
        ([0.1], TypeError, r"`params` must be a torch.Tensor of shape \(1,\)"),
        (torch.tensor([1]), TypeError, "floating-point"),
        (torch.zeros(2), ValueError, r"\(B, 1\) for B draws, got \(2,\)"),
        (torch.zeros(3, 2), ValueError, r"got \(3, 2\)"),
        (torch.zeros(2, 2, 1), ValueError, r"got \(2, 2, 1\)"),
        (torch.zeros(0, 1), ValueError, r"got \(0, 1\)"),
    ],
)
def test_bad_params_are_rejected_with_expected_shape(params, error, match):
    with pytest.raises(error, match=match):
        RandomWalk(3).run_and_observe(params)


@pytest.mark.parametrize("horizon,error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_gradient_horizon(horizon, error):
    with pytest.raises(error, match="gradient_horizon"):
        simulate_and_observe_model(RandomWalk(3), torch.zeros(1), horizon)


def test_bad_model_and_bad_observe_are_reported():
    with pytest.raises(TypeError, match=r"`model`.*lacks initialize, step, observe"):
        simulate_and_observe_model(object(), torch.zeros(1))

    class NoList(LinearRecursion):
        def observe(self, x):
            return {"x": x}

    with pytest.raises(TypeError, match="list of tensors"):
        NoList(2, 0.5).run_and_observe(torch.zeros(1))
    with pytest.raises(ValueError, match="n_timesteps"):
        LinearRecursion(-1, 0.5).run_and_observe(torch.zeros(1))
