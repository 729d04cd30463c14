"""The lazy single-draw history: the same numbers and gradients as the joined history."""

import sys
from pathlib import Path

import pytest
import torch

from gradcal.gradients import vmap_safe_sampling
from gradcal.history import LazyHistory, append_step
from gradcal.models import Model
from gradcal.simulate import simulate_and_observe_model

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from blackbirds_rama_cont import LogModel  # the seed tutorial's own model


def _pieces():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(k, 3, 4, generator=gen) for k in (2, 1, 1, 3, 1)]


INDICES = [
    -1, 0, 3, -8, 7, (-1, 0), (-1, 0, slice(None)), (-2, ..., 1), (-1, torch.tensor([0, 2])),
    slice(-1, None), slice(-3, None), slice(-5, -1), slice(2, 6), slice(None), slice(0, 8, 2),
    slice(5, 2), (slice(-2, None), 1), None, ..., torch.tensor([0, -1]), (slice(None), 0),
]  # fmt: skip


@pytest.mark.parametrize("index", INDICES, ids=[repr(i) for i in INDICES])
def test_every_index_reads_what_the_joined_history_holds(index):
    pieces = _pieces()
    lazy, joined = LazyHistory(pieces), torch.cat(pieces)
    assert torch.equal(lazy[index], joined[index])


def test_reads_give_the_joined_history_gradients_and_other_uses_see_it_whole():
    pieces = [p.requires_grad_() for p in _pieces()]
    lazy = LazyHistory(pieces)
    uses = [lambda h: h[-1, 0] * 2, lambda h: h[-4:].sin(), lambda h: torch.vstack((h, h[-1:]))]
    uses += [lambda h: h.mean(0) + len(h) + h.shape[0], lambda h: (h * h).exp()]
    for use in uses:
        got = torch.autograd.grad(use(lazy).sum(), pieces, materialize_grads=True)
        want = torch.autograd.grad(use(torch.cat(pieces)).sum(), pieces)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


def test_append_joins_at_once_what_cat_would_promote_or_refuse():
    assert isinstance(append_step(torch.zeros(1, 2), torch.ones(1, 2)), LazyHistory)
    promoted = append_step(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.float64))
    assert isinstance(promoted, torch.Tensor) and promoted.dtype == torch.float64
    with pytest.raises(RuntimeError):
        append_step(torch.zeros(1, 2), torch.ones(1, 3))


class _Reader(Model):
    """A single-draw model whose step reads its whole history in several ways."""

    n_timesteps = 12

    def initialize(self, params):
        return params.reshape(1, 2) * torch.ones(2, 2)

    def step(self, params, x):
        first, recent = x[0], x[-3:].mean(0)
        scale = torch.randn(()) * 0.1 + len(x) / 10
        return (params * recent + first * scale + x.std(0)).reshape(1, 2)

    def observe(self, x):
        return [x[:, 0]]

    def trim_time_series(self, x):
        return x


class _EagerReader(_Reader):
    lazy_history = False


class _EagerLogModel(LogModel):
    lazy_history = False


def _run(model, theta, mode, **options):
    def one(t):
        return simulate_and_observe_model(model, t, **options)[0]

    torch.manual_seed(5)
    if mode == "vmap":
        with vmap_safe_sampling():
            out = torch.func.vmap(one, randomness="different")(theta)
    else:
        out = torch.stack([one(t) for t in theta])
    (grad,) = torch.autograd.grad((out * torch.linspace(0, 1, out.shape[-1])).sum(), theta)
    return out, grad


CASES = {
    "tutorial": lambda lazy: (LogModel if lazy else _EagerLogModel)(
        n_agents=50, n_timesteps=15, s=0.1, sigmoid_k=5.0
    ),
    "reader": lambda lazy: (_Reader if lazy else _EagerReader)(),
}
THETA = {
    "tutorial": [[0.0, -0.3, 0.0, -0.15], [0.1, -0.2, -0.1, -0.1]],
    "reader": [[0.3, -0.2], [0.5, 0.1]],
}


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("options", [{}, {"gradient_horizon": 4}, {"checkpoint_every": 5}])
@pytest.mark.parametrize("case", list(CASES))
def test_a_lazy_history_computes_what_the_joined_one_does(case, options, mode):
    """Same seed: the same outputs and the same gradients, bit for bit."""
    theta = torch.tensor(THETA[case], requires_grad=True)
    lazy_out, lazy_grad = _run(CASES[case](True), theta, mode, **options)
    out, grad = _run(CASES[case](False), theta, mode, **options)
    assert torch.equal(lazy_out, out) and torch.equal(lazy_grad, grad)
    assert lazy_grad.abs().sum() > 0


def test_the_step_of_a_whole_history_model_receives_a_lazy_history():
    seen = []

    class Spy(_Reader):
        def step(self, params, x):
            seen.append(type(x).__name__)
            return super().step(params, x)

    simulate_and_observe_model(Spy(), torch.tensor([0.3, -0.2]))
    assert seen[0] == "Tensor" and set(seen[1:]) == {"LazyHistory"}


class _Counted(torch.Tensor):
    """A tensor that counts every torch operation on it (a shape read included)."""

    ops = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        _Counted.ops += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def _piece_work(n_steps):
    """Torch operations on the pieces over a run of ``n_steps`` appends and reads."""
    h = torch.zeros(1, 2).as_subclass(_Counted)
    _Counted.ops = 0
    for _ in range(n_steps):
        h = append_step(h, torch.ones(1, 2).as_subclass(_Counted))
        _ = h[-1], h[-1, 0], h[-3:], len(h), h.shape, h.size(0)
    return _Counted.ops


def test_reading_the_last_rows_costs_the_same_at_every_step():
    """A run of T steps that reads its last rows does O(T) work on the pieces, not O(T^2)."""
    short, long = _piece_work(200), _piece_work(400)
    assert long <= 2.1 * short, (short, long)  # quadratic work would give 4x


class _Writer(Model):
    """A single-draw model that writes into its history in place: into its last state, into
    a window spanning several steps, and through a read of the last row, then reads it."""

    n_timesteps = 10

    def __init__(self, sigmoid=False):
        super().__init__()
        self.sigmoid = sigmoid

    def initialize(self, params):
        return params.reshape(1, 2) * torch.ones(2, 2)

    def step(self, params, x):
        x[-1].mul_(0.9)  # the last state, in place
        x[-3:, 1].add_(params[1] * 0.1)  # a window spanning several steps
        x[-1:, 0] -= 0.05  # through a slice
        recent = x[-2:].mean(0) + x[-1] * params[0] + torch.randn(2) * 0.1
        return (recent.sigmoid() if self.sigmoid else recent).reshape(1, 2)

    def observe(self, x):
        return [x[:, 0]]  # a view of the step's output

    def trim_time_series(self, x):
        return x


class _EagerWriter(_Writer):
    lazy_history = False


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("options", [{}, {"gradient_horizon": 4}])
@pytest.mark.parametrize("sigmoid", [False, True], ids=["linear", "sigmoid"])
def test_a_model_writing_into_its_history_computes_what_it_does_on_the_joined_one(
    sigmoid, options, mode
):
    """Writes through reads of the history persist in it as in the joined tensor, and never
    reach the recorded outputs (the step's own tensors): same outputs and gradients, bit for
    bit. ``sigmoid``: the step's output is one whose backward needs it unchanged. (Not with
    ``checkpoint_every``: a write into the history entering a checkpointed stretch is
    refused by autograd there, joined or not.)"""
    theta = torch.tensor([[0.3, -0.2], [0.5, 0.1]], requires_grad=True)
    lazy_out, lazy_grad = _run(_Writer(sigmoid), theta, mode, **options)
    out, grad = _run(_EagerWriter(sigmoid), theta, mode, **options)
    assert torch.equal(lazy_out, out) and torch.equal(lazy_grad, grad)
    assert lazy_grad.abs().sum() > 0


def test_writes_through_any_read_persist_as_in_the_joined_history():
    pieces = _pieces()
    lazy, joined = append_step(pieces[0], pieces[1]), torch.cat(pieces[:2])
    for p in pieces[2:]:
        lazy, joined = append_step(lazy, p), torch.cat((joined, p))
    for h in (lazy, joined):
        h[-1].mul_(2.0)  # one step's rows
        h[-5:-1, 0].add_(1.0)  # rows of several steps
        h[-2:][:, 1] = 7.0  # through a slice spanning two steps
        h[0, 0, 0] = -1.0
    assert torch.equal(lazy.full(), joined)
    # the appended tensors themselves are untouched: the history holds its own rows
    assert all(torch.equal(p, q) for p, q in zip(pieces, _pieces(), strict=True))


def test_a_write_through_a_view_the_history_no_longer_follows_is_refused():
    """A view read before a read that joins its rows with others is no longer the
    history's: a later write through it (or into the joined rows, which it would then miss)
    raises rather than computing something the joined history would not."""
    for write in (lambda last, window: last.mul_(2.0), lambda last, window: window.mul_(2.0)):
        h = LazyHistory(_pieces())
        last = h[-1]
        window = h[-3:]  # joins the last steps: `last` is left behind
        write(last, window)
        with pytest.raises(RuntimeError, match="lazy_history = False"):
            h[-1]
    h = LazyHistory(_pieces())  # a write through a view that died first is fine
    h[-1].mul_(2.0)
    h[-3:].add_(1.0)
    assert torch.equal(h[-1], _pieces()[-1][-1] * 2.0 + 1.0)
