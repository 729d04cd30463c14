"""Properties every built-in model must have: batching, gradients, NaN, dtype, forward mode."""

import contextlib
import math

import networkx
import pytest
import torch
from stats import Z_MAX, z_two_sample
from torch.func import jvp

from gradcal.models import SIR, BrockHommes, BrockHommesBeliefs, Normal, RamaCont, RandomWalk

CASES = {
    "random_walk": (lambda: RandomWalk(20), [0.4]),
    "rama_cont": (
        lambda: RamaCont(200, 30, s=0.1, sigmoid_k=5.0, log10_params=True),
        [0.0, math.log10(0.5), 0.0, math.log10(0.7)],
    ),
    "brock_hommes": (lambda: BrockHommesBeliefs.wavy(40), [0.9, 0.2, 0.9, -0.2]),
    "brock_hommes_11": (
        lambda: BrockHommes(40),
        [math.log(120), 0.1, 0.9, 0.9, 0.99, 0.05, 0.2, -0.2, 0.1, math.log(0.04), math.log(0.01)],
    ),
    "sir": (
        lambda: SIR(networkx.watts_strogatz_graph(200, 6, 0.1, seed=0), 20),
        [-1.3, -0.7, -0.8],
    ),
    "normal": (lambda: Normal(20), [1.0, 2.0]),
}
TEMPORAL = [k for k in CASES if k != "normal"]  # normal draws have no time dependence
# As in BlackBIRDS, these keep their states in torch's default dtype, whatever the params'.
DEFAULT_DTYPE = {"sir", "normal", "brock_hommes_11"}


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _case(name, dtype=torch.float32):
    factory, theta = CASES[name]
    return factory(), torch.tensor(theta, dtype=dtype)


def _summaries(outputs):
    """Per-draw summaries (B, S): mean level, mean square and mean |increment|."""
    stats = []
    for y in outputs:
        y = y.reshape(y.shape[0], -1)  # (B, T) or (B, T, 1) -> (B, T)
        stats += [y.mean(-1), (y**2).mean(-1), y.diff(dim=-1).abs().mean(-1)]
    return torch.stack(stats, -1)


@pytest.mark.parametrize("name", list(CASES))
def test_batched_run_matches_loop_of_single_draws(name):
    model, theta = _case(name)
    n = 300
    batched = _summaries(model.run_and_observe(theta.expand(n, -1)))
    looped = torch.stack(
        [_summaries([y[None] for y in model.run_and_observe(theta)])[0] for _ in range(n)]
    )
    assert batched.shape == looped.shape
    for s in range(batched.shape[1]):
        if batched[:, s].var() + looped[:, s].var() == 0:
            assert torch.equal(batched[:, s], looped[:, s])
            continue
        assert abs(z_two_sample(batched[:, s], looped[:, s])) < Z_MAX, s


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_gain_the_batch_axis(name):
    model, theta = _case(name)
    single = model.run_and_observe(theta)
    batched = model.run_and_observe(theta.expand(3, -1))
    assert [tuple(y.shape) for y in batched] == [(3, *y.shape) for y in single]


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_are_finite_and_nonzero_for_every_parameter(name):
    model, theta = _case(name)
    params = theta.expand(8, -1).clone().requires_grad_()
    loss = sum((y**2).mean() for y in model.run_and_observe(params))
    loss.backward()
    assert torch.isfinite(params.grad).all()
    assert (params.grad.abs().sum(0) > 0).all()


@pytest.mark.parametrize("name", list(CASES))
@default_dtype(torch.float64)
def test_forward_mode_equals_reverse_mode_under_the_same_noise(name):
    model, theta = _case(name, torch.float64)
    params = theta.expand(3, -1).clone()

    def loss(p):
        return sum((y**2).mean() for y in model.run_and_observe(p))

    tangent = torch.randn_like(params)
    torch.manual_seed(11)
    _, directional = jvp(loss, (params,), (tangent,))
    torch.manual_seed(11)
    (grad,) = torch.autograd.grad(loss(params.requires_grad_()), params)
    torch.testing.assert_close(directional, (grad * tangent).sum())


@pytest.mark.parametrize("name", list(CASES))
def test_single_draw_runs_batch_under_vmap(name):
    model, theta = _case(name)

    def summaries(p):
        return _summaries([y[None] for y in model.run_and_observe(p)])[0]

    vmapped = torch.func.vmap(summaries, randomness="different")(theta.expand(300, -1))
    batched = _summaries(model.run_and_observe(theta.expand(300, -1)))
    for s in range(batched.shape[1]):
        if batched[:, s].var() + vmapped[:, s].var() > 0:
            assert abs(z_two_sample(batched[:, s], vmapped[:, s])) < Z_MAX, s


@pytest.mark.parametrize("name", ["brock_hommes", "brock_hommes_11", "normal"])
@default_dtype(torch.float64)
def test_pathwise_gradient_matches_finite_differences(name):
    # Smooth models: with the noise fixed by the seed the loss is differentiable in theta.
    model, theta = _case(name, torch.float64)

    def loss(p):
        torch.manual_seed(7)
        return sum((y**2).mean() for y in model.run_and_observe(p))

    leaf = theta.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(leaf), leaf)
    for i in range(theta.shape[0]):
        e = torch.zeros_like(theta)
        e[i] = 1e-6
        fd = (loss(theta + e) - loss(theta - e)) / 2e-6
        assert grad[i].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("name", TEMPORAL)
@default_dtype(torch.float64)
def test_gradient_horizon_zero_keeps_values_and_changes_gradients(name):
    model, theta = _case(name, torch.float64)
    grads, values = [], []
    for horizon in (None, 0):
        params = theta.expand(4, -1).clone().requires_grad_()
        torch.manual_seed(2)
        outputs = model.run_and_observe(params, gradient_horizon=horizon)
        sum((y**2).mean() for y in outputs).backward()
        grads.append(params.grad)
        values.append(torch.cat([y.detach() for y in outputs], -1))
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("name", list(CASES))
def test_nan_parameters_give_nan_outputs_for_that_draw_only(name):
    model, theta = _case(name)
    params = theta.expand(3, -1).clone()
    params[1, 0] = torch.nan
    outputs = model.run_and_observe(params)
    for y in outputs:
        assert torch.isfinite(y[[0, 2]]).all()
    assert any(torch.isnan(y[1]).any() for y in outputs)


@pytest.mark.parametrize("name", list(CASES))
def test_dtype_follows_params_or_the_default_dtype(name):
    model, theta = _case(name, torch.float64)
    expected = torch.float32 if name in DEFAULT_DTYPE else torch.float64
    assert all(y.dtype == expected for y in model.run_and_observe(theta))
    with default_dtype(torch.float64):
        model, theta = _case(name, torch.float64)
        assert all(y.dtype == torch.float64 for y in model.run_and_observe(theta))


@pytest.mark.parametrize("name", list(CASES))
def test_wrong_parameter_dimension_names_the_expected_shape(name):
    model, theta = _case(name)
    d = theta.shape[0]
    with pytest.raises(ValueError, match=rf"`params` must have shape \({d},\).*\(B, {d}\)"):
        model.run_and_observe(torch.zeros(2, d + 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CASES))
def test_runs_on_cuda(name):
    model, theta = _case(name)
    model = model.to("cuda")
    outputs = model.run_and_observe(theta.cuda().expand(4, -1))
    assert all(y.is_cuda and torch.isfinite(y).all() for y in outputs)
