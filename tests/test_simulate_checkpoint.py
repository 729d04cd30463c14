"""Checkpointed reverse mode through time: same values and gradients, less stored graph."""

import math
import weakref

import networkx
import pytest
import torch

from gradcal.gradients import BatchedLoss, loss_and_gradient
from gradcal.losses import MMDLoss, MSELoss
from gradcal.models import SIR, Model, RamaCont
from gradcal.simulate import simulate_and_observe_model


class NoisyWalk(Model):
    """A single-draw model (BlackBIRDS layout, whole history kept) with noise every step."""

    n_params = 1

    def __init__(self, n_timesteps):
        super().__init__()
        self.n_timesteps = n_timesteps

    def initialize(self, params):
        return torch.zeros(1, 1) * params

    def step(self, params, x):
        return torch.tanh(x[-1:] * params + params + torch.randn(1, 1))

    def observe(self, x):
        return [x]


def _rama_cont():
    model = RamaCont(64, 40, s=0.1, sigmoid_k=5.0, log10_params=True)
    theta = torch.tensor([0.0, math.log10(0.5), 0.0, math.log10(0.7)]).repeat(5, 1)
    return model, theta + 0.01 * torch.arange(5.0)[:, None]


def _sir():
    model = SIR(networkx.watts_strogatz_graph(200, 10, 0.1, seed=0), 25)
    return model, torch.tensor([-1.5, -0.5, -1.0]).repeat(4, 1)


def _outputs_and_gradient(model, theta, **options):
    """Outputs, d(sum of squared outputs)/d theta and the caller's stream after backward."""
    torch.manual_seed(1)
    leaf = theta.clone().requires_grad_()
    outputs = simulate_and_observe_model(model, leaf, **options)
    sum(o.square().sum() for o in outputs).backward()
    return [o.detach() for o in outputs], leaf.grad, torch.get_rng_state()


@pytest.mark.parametrize("make", [_rama_cont, _sir], ids=["rama_cont", "sir"])
@pytest.mark.parametrize("horizon", [None, 4])
@pytest.mark.parametrize("every", [1, 3, 7, 100])
def test_checkpointed_gradients_equal_plain_ones_exactly(make, horizon, every):
    model, theta = make()
    plain = _outputs_and_gradient(model, theta, gradient_horizon=horizon)
    checkpointed = _outputs_and_gradient(
        model, theta, gradient_horizon=horizon, checkpoint_every=every
    )
    assert all(torch.equal(a, b) for a, b in zip(plain[0], checkpointed[0], strict=True))
    assert plain[1].abs().sum() > 0  # a gradient that can differ
    assert torch.equal(plain[1], checkpointed[1])  # bit for bit: same noise recomputed
    assert torch.equal(plain[2], checkpointed[2])  # recomputation leaves the stream alone


def test_checkpointed_single_draw_model_run_draw_by_draw_and_under_vmap():
    model, theta = NoisyWalk(20), torch.tensor([[0.3], [0.5], [0.7]])
    plain = _outputs_and_gradient(model, theta)
    checkpointed = _outputs_and_gradient(model, theta, checkpoint_every=6)
    assert torch.equal(plain[0][0], checkpointed[0][0])
    assert torch.equal(plain[1], checkpointed[1])

    # A single-draw loss batched by vmap: checkpointing cannot recompute under vmap, so the
    # loop runs plainly there; the result must not change.
    def loss_with(every):
        def loss(t, y):
            (x,) = simulate_and_observe_model(model, t, checkpoint_every=every)
            return (x[:, 0] - y).square().mean()

        return loss

    results = []
    for every in (None, 6):
        torch.manual_seed(0)
        results.append(loss_and_gradient(BatchedLoss(loss_with(every), "vmap"), theta, 0.0))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_losses_pass_checkpoint_every_and_forward_mode_ignores_it():
    model, theta = _rama_cont()
    torch.manual_seed(2)
    (y,) = model.run_and_observe(theta[0])
    for make_loss in (
        lambda every: MMDLoss(model, y, checkpoint_every=every),
        lambda every: MSELoss(model, y, checkpoint_every=every),
    ):
        for mode in ("reverse", "forward"):
            results = []
            for every in (None, 5):
                torch.manual_seed(3)
                results.append(loss_and_gradient(BatchedLoss(make_loss(every)), theta, y, mode))
            assert torch.equal(results[0][0], results[1][0])
            assert torch.equal(results[0][1], results[1][1])


def _saved_bytes_outside_checkpoints(model, theta, every):
    """Bytes the autograd graph stores for the backward pass, outside checkpointed stretches.

    torch.utils.checkpoint installs its own saved-tensor hooks inside a stretch, which take
    precedence over this outer one, so what a stretch would have stored is not counted.
    """
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    leaf = theta.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        simulate_and_observe_model(model, leaf, checkpoint_every=every)
    return total


def test_checkpointing_stores_only_the_history_entering_each_stretch():
    model, theta = _rama_cont()
    one = theta.shape[0] * model.n_agents * 4  # bytes of one (B, N) float32 tensor
    # Plain reverse mode keeps more than four (B, N) tensors for each of the 40 steps.
    assert _saved_bytes_outside_checkpoints(model, theta, None) > 4 * 40 * one
    for every in (4, 8, 20):
        # Checkpointed: one history entry (B, 1, 3, N) per stretch of `every` steps, plus
        # what initialize saves (a few (B, N) tensors and the (B, 4) parameters).
        stored = _saved_bytes_outside_checkpoints(model, theta, every)
        assert stored < (3 * math.ceil(40 / every) + 6) * one


@pytest.mark.parametrize("every,error", [(0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_checkpoint_every(every, error):
    model, theta = _rama_cont()
    with pytest.raises(error, match="checkpoint_every"):
        simulate_and_observe_model(model, theta, checkpoint_every=every)
    with pytest.raises(error, match="checkpoint_every"):
        MSELoss(model, torch.zeros(41), checkpoint_every=every)


class TrackedRamaCont(RamaCont):
    """Rama Cont counting how many earlier states are still in memory at each step."""

    batched = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.states, self.most_alive = [], 0

    def step(self, params, x):
        alive = sum(ref() is not None for ref in self.states)
        self.most_alive = max(self.most_alive, alive)
        state = super().step(params, x)
        self.states.append(weakref.ref(state if state._base is None else state._base))
        return state


@pytest.mark.parametrize("grad", [False, True])
def test_outputs_do_not_keep_the_states_alive(grad):
    # observe returns x[:, :, 2, 0], a view of the (B, 1, 3, N) state: kept as is, it would
    # hold every state of the run in memory until the end, whatever the gradient needs.
    model = TrackedRamaCont(64, 20, s=0.1, sigmoid_k=5.0, log10_params=True)
    _, theta = _rama_cont()
    with torch.set_grad_enabled(grad):
        outputs = simulate_and_observe_model(model, theta.requires_grad_(grad), checkpoint_every=5)
    assert outputs[0].shape == (5, 21)
    # Without gradients: the state the step reads, and the one before at most. Checkpointed:
    # at most the states of one stretch of 5 steps (the plain graph would keep all 20).
    assert model.most_alive <= (5 if grad else 2)
