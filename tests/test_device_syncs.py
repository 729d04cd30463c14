"""GPU readiness checked on the CPU: no operation that waits for the device in the time loop.

On CUDA, an operation whose result the host must read (``.item()``, ``bool(t)``,
``float(t)``, ``t.tolist()``; ``nonzero``/``masked_select`` and friends, whose output shape
depends on the data) stops the host until the GPU catches up. Every such operation
reaches torch's dispatcher as one of the operators below, on any device, so counting them
on the CPU finds them before a GPU does.
"""

import math

import networkx
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gradcal.losses import MMDLoss
from gradcal.models import SIR, BrockHommesBeliefs, RamaCont, RandomWalk
from gradcal.simulate import simulate_and_observe_model

SYNCING = {
    "_local_scalar_dense",  # .item(), bool(t), float(t), int(t), .tolist()
    "nonzero",
    "nonzero_static",
    "masked_select",
    "unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "repeat_interleave",
    "equal",
    "is_nonzero",
}


class SyncCounter(TorchDispatchMode):
    """Counts the operators that make the host wait for the device, by name."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


class StepCounter:
    """Wraps a model's ``step`` so that only operators inside it are counted."""

    def __init__(self, model, counter):
        self.step, self.counter = model.step, counter

    def __call__(self, params, x):
        with self.counter:
            return self.step(params, x)


CASES = {
    "random_walk": (lambda: RandomWalk(30), [0.3]),
    "rama_cont": (
        lambda: RamaCont(5000, 30, s=0.1, sigmoid_k=5.0, log10_params=True),
        [0.0, math.log10(0.5), 0.0, math.log10(0.7)],
    ),
    "sir": (
        lambda: SIR(networkx.watts_strogatz_graph(300, 10, 0.1, seed=0), 30),
        [-1.5, -0.5, -1.0],
    ),
    "brock_hommes": (BrockHommesBeliefs.wavy, None),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("every", [None, 10])
def test_no_host_device_synchronisation_in_the_time_loop(name, every):
    make, truth = CASES[name]
    model = make()
    torch.manual_seed(0)
    truth = model.true_params if truth is None else torch.tensor(truth)
    theta = truth.repeat(4, 1).requires_grad_()
    counter = SyncCounter()
    model.step = StepCounter(model, counter)  # counts inside step, forward and recompute
    outputs = simulate_and_observe_model(model, theta, checkpoint_every=every)
    with counter:  # the backward pass too (it recomputes checkpointed stretches)
        sum(o.square().sum() for o in outputs).backward()
    assert counter.seen == []
    assert theta.grad.abs().sum() > 0


def test_the_counter_sees_a_synchronisation():
    # The test above must be able to fail: an .item() in step is counted.
    model = RandomWalk(5)
    counter = SyncCounter()
    original = model.step

    def step(params, x):
        with counter:
            float(params.sum())
            return original(params, x)

    model.step = step
    simulate_and_observe_model(model, torch.zeros(2, 1))
    assert counter.seen == ["_local_scalar_dense"] * 5


def test_no_synchronisation_in_an_mmd_loss_backward():
    model = RamaCont(2000, 20, s=0.1, sigmoid_k=5.0, log10_params=True)
    truth = torch.tensor([0.0, math.log10(0.5), 0.0, math.log10(0.7)])
    torch.manual_seed(0)
    with torch.no_grad():
        (y,) = model.run_and_observe(truth)
    loss = MMDLoss(model, y, checkpoint_every=5)
    loss(truth.repeat(2, 1), y)  # caches the data's constant term (once per data tensor)
    theta = truth.repeat(4, 1).requires_grad_()
    counter = SyncCounter()
    with counter:
        loss(theta, y).sum().backward()
    assert counter.seen == []
