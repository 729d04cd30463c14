"""Rama Cont reads its last step's thresholds and return without indexing into the step.

The reference is the formulation before the shortcut: ``x[:, -1, 0]`` in ``step`` and
``x[:, :, 2, 0]`` in ``observe``. Values and gradients must be equal bit for bit.
"""

import math

import pytest
import torch

from gradcal.losses import MMDLoss
from gradcal.models import RamaCont
from gradcal.models.model import accepts_one_draw, accepts_one_history
from gradcal.simulate import simulate_and_observe_model


class IndexingRamaCont(RamaCont):
    """RamaCont reading every step by indexing, as before the shortcut."""

    batched = True  # (a subclass overriding step is otherwise taken for a single-draw one)

    @accepts_one_draw
    def step(self, params, x):
        scales = 10.0 ** params[:, 2:] if self.log10_params else params[:, 2:]
        sigma, eta = scales[:, 0:1], scales[:, 1:2]
        nu = x[:, -1, 0]
        eps = sigma * torch.randn_like(sigma)
        r = self._returns(eps, nu, eta)
        return self._state(self._new_thresholds(nu, r), eps, r)

    @accepts_one_history
    def observe(self, x):
        return [x[:, :, 2, 0]]


THETA = torch.tensor([0.0, math.log10(0.5), 0.0, math.log10(0.7)])


def _run(cls, n_agents, options, dtype=torch.float32):
    """Returns and d(MMD loss + sum of squared returns)/d theta for 6 nearby draws."""
    model = cls(n_agents, 30, s=0.1, sigmoid_k=5.0, log10_params=True)
    torch.manual_seed(3)
    y = model.run_and_observe(THETA.to(dtype))[0].detach()
    theta = (THETA.to(dtype) + 0.02 * torch.arange(6, dtype=dtype)[:, None]).requires_grad_()
    torch.manual_seed(4)
    (returns,) = simulate_and_observe_model(model, theta, **options)
    loss = MMDLoss(model, y)
    torch.manual_seed(5)
    total = returns.square().sum() + loss(theta, [y]).sum()
    total.backward()
    return returns.detach(), theta.grad


# 1000 agents x 6 draws take the sparse (scatter) reset path (>= 4096 thresholds), 20 the
# dense one.
@pytest.mark.parametrize("n_agents", [20, 1000])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"gradient_horizon": 4},
        {"checkpoint_every": 7},
        {"checkpoint_every": 5, "gradient_horizon": 3},
    ],
    ids=["plain", "horizon", "checkpointed", "both"],
)
def test_same_values_and_gradients_as_indexing_the_step(n_agents, options):
    fast = _run(RamaCont, n_agents, options)
    reference = _run(IndexingRamaCont, n_agents, options)
    assert reference[1].abs().sum() > 0
    assert torch.equal(fast[0], reference[0])
    assert torch.equal(fast[1], reference[1])


def test_same_in_float64():
    fast = _run(RamaCont, 50, {}, torch.float64)
    reference = _run(IndexingRamaCont, 50, {}, torch.float64)
    assert torch.equal(fast[0], reference[0]) and torch.equal(fast[1], reference[1])


def test_a_step_changed_in_place_is_read_by_indexing():
    model = RamaCont(10, 3, s=0.1, sigmoid_k=5.0)
    params = torch.tensor([[1.0, 0.5, 1.0, 0.7]])
    x = model.initialize(params)
    x[:, -1, 0] = 7.0  # a user's edit of the thresholds
    assert model._parts(x) is None
    torch.manual_seed(0)
    new = model.step(params, x)
    assert torch.equal(model.observe(new)[0], new[:, :, 2, 0])
    assert model._parts(x.detach()) is None  # a detached step carries nothing


def test_the_time_loop_reads_the_parts_at_every_step(monkeypatch):
    """Without this the equality tests above could pass with the shortcut never taken."""
    read = RamaCont._parts
    hits = []

    def counting(x):
        parts = read(x)
        hits.append(parts is not None)
        return parts

    monkeypatch.setattr(RamaCont, "_parts", staticmethod(counting))
    model = RamaCont(20, 30, s=0.1, sigmoid_k=5.0, log10_params=True)
    simulate_and_observe_model(model, THETA.expand(3, 4).clone().requires_grad_())
    assert sum(hits) == 2 * 30 + 1  # each step's step and observe, and the first observe
