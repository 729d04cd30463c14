"""Simulated minimum distance: recovery, multi-start, failures, clipping, files, errors."""

import math

import pytest
import torch
from stats import Z_MAX

from gradcal.checkpoint import load_checkpoint
from gradcal.infer.smd import SMD
from gradcal.losses import NegativeLogLikelihood
from gradcal.models import Normal


def _tilted_double_well(theta, y=None):
    """(x^2 - 1)^2 + 0.3 x, batched (K, 1) -> (K,): minima near -1.07 (lower) and 0.93."""
    x = theta[..., 0]
    return (x**2 - 1) ** 2 + 0.3 * x


_tilted_double_well.batched = True


def _grid_minimum(lo, hi):
    """The minimiser and minimum of the double well on [lo, hi] by a 1e-6 grid."""
    x = torch.linspace(lo, hi, 2_000_001, dtype=torch.float64)
    f = _tilted_double_well(x[:, None])
    i = int(f.argmin())
    return float(x[i]), float(f[i])


def _quadratic(theta, y):
    """Batched squared distance to y: (K, D) -> (K,)."""
    return ((theta - y) ** 2).sum(-1)


_quadratic.batched = True


# --- recovery -------------------------------------------------------------------------


def test_recovers_normal_mean_and_scale_by_maximum_likelihood():
    n, mu, sigma = 200, 1.5, 2.0
    y = mu + sigma * torch.randn(n)
    theta = torch.tensor([0.0, 1.0], requires_grad=True)
    smd = SMD(NegativeLogLikelihood(Normal(n)), torch.optim.Adam([theta], lr=0.05))
    estimate, value = smd.run(y, n_epochs=3000, max_epochs_without_improvement=200)
    se = float(y.std()) / n**0.5  # standard error of the mean from the data
    # The NLL is deterministic and its minimiser is exactly (mean(y), sd(y) with 1/n): the
    # optimiser must get there to a small fraction of the statistical error...
    assert abs(float(estimate[0]) - float(y.mean())) < 0.02 * se
    assert abs(float(estimate[1]) - float(y.std(unbiased=False))) < 0.02 * se
    # ...which places the estimate within Monte Carlo error of the true mean.
    assert abs(float(estimate[0]) - mu) < Z_MAX * se
    assert value == pytest.approx(
        float(-torch.distributions.Normal(estimate[0], estimate[1]).log_prob(y).sum()), rel=1e-5
    )
    assert smd.best_loss == value == min(smd.loss)


def test_recovers_normal_mean_with_a_simulated_single_draw_loss():
    # A BlackBIRDS-style loss for one draw (D,) that simulates n unit-variance normals and
    # compares the simulated and observed means; four starts are batched through vmap.
    n = 400
    y = 1.5 + torch.randn(n)

    def loss(theta, data):
        x = theta[0] + torch.randn(n)
        return (x.mean() - data.mean()) ** 2

    theta = torch.tensor([[-3.0], [0.0], [4.0], [8.0]], requires_grad=True)
    smd = SMD(loss, torch.optim.Adam([theta], lr=0.05), seed=1)
    estimate, _ = smd.run(y, n_epochs=800, max_epochs_without_improvement=800)
    assert smd.batched_loss.mode == "vmap"
    # At the best epoch mean(x) ~ mean(y), mean(x) = theta + N(0, 1/n) noise: the estimate
    # is within Z_MAX simulation standard errors (1/sqrt(n)) of mean(y).
    assert abs(float(estimate) - float(y.mean())) < Z_MAX / n**0.5
    # Every start ended near the data, not only the best one.
    assert torch.allclose(smd.start_best_parameters[:, 0], y.mean(), atol=Z_MAX / n**0.5)


# --- multi-start ----------------------------------------------------------------------


def test_multi_start_keeps_the_start_with_the_lower_minimum():
    calls = []

    def loss(theta, y):
        calls.append(tuple(theta.shape))
        return _tilted_double_well(theta)

    loss.batched = True
    # The first start sits in the basin of the higher minimum, the second in the lower one's.
    theta = torch.tensor([[1.5], [-1.5]], requires_grad=True)
    smd = SMD(loss, torch.optim.Adam([theta], lr=0.01))
    estimate, value = smd.run(None, n_epochs=3000, max_epochs_without_improvement=100)
    x_low, f_low = _grid_minimum(-2.0, 0.0)
    x_high, f_high = _grid_minimum(0.0, 2.0)
    assert smd.best_start == 1
    assert float(estimate) == pytest.approx(x_low, abs=1e-3)
    assert value == pytest.approx(f_low, abs=1e-5)
    # Each start found its own minimum: they were optimised independently.
    assert float(smd.start_best_parameters[0, 0]) == pytest.approx(x_high, abs=1e-3)
    assert float(smd.start_best_loss[0]) == pytest.approx(f_high, abs=1e-5)
    # One batched call per epoch with all K starts.
    assert set(calls) == {(2, 1)} and len(calls) == smd.losses.shape[1]
    assert smd.losses.shape[0] == 2
    # `loss` holds the lowest loss over the starts in each epoch.
    assert smd.loss == pytest.approx(smd.losses.min(0).values.tolist())


@pytest.mark.parametrize("kind", ["batched", "single_draw_vmap", "single_draw_loop"])
def test_multi_start_equals_separate_single_start_runs(kind):
    def single(theta, y):  # (D,) -> scalar
        return _tilted_double_well(theta[None])[0]

    def single_not_vmappable(theta, y):  # float() breaks vmap: the loop is used
        return _tilted_double_well(theta[None])[0] + 0.0 * float(theta.detach().sum())

    loss = {
        "batched": _tilted_double_well,
        "single_draw_vmap": single,
        "single_draw_loop": single_not_vmappable,
    }[kind]
    starts = torch.tensor([[1.5], [-1.5], [0.2]])
    theta = starts.clone().requires_grad_()
    smd = SMD(loss, torch.optim.Adam([theta], lr=0.02), gradient_clipping_norm=0.5)
    smd.run(None, n_epochs=150, max_epochs_without_improvement=150)
    assert smd.batched_loss.mode == {"batched": "native"}.get(kind, kind.split("_")[-1])
    for k in range(3):
        alone = starts[k].clone().requires_grad_()
        one = SMD(loss if kind != "batched" else single, torch.optim.Adam([alone], lr=0.02))
        one.gradient_clipping_norm = 0.5
        one.run(None, n_epochs=150, max_epochs_without_improvement=150)
        # Adam is elementwise: batching the starts must not change any trajectory.
        torch.testing.assert_close(smd.losses[k], one.losses[0])
        torch.testing.assert_close(theta[k].detach(), alone.detach())


def _failing_second_start(seen):
    """Squared distance (K, 2) -> (K,), NaN for the second start in epochs 2, 3 and 4."""

    def loss(theta, y):
        seen.append(theta.detach().clone())
        out = ((theta - y) ** 2).sum(-1)
        if 3 <= len(seen) <= 5:
            out = torch.where(torch.arange(len(out)) == 1, torch.nan, out)
        return out

    loss.batched = True
    return loss


def test_nan_at_one_start_skips_only_that_start():
    seen = []
    loss = _failing_second_start(seen)
    starts = torch.tensor([[0.0, 0.0], [4.0, -1.0]])
    theta = starts.clone().requires_grad_()
    smd = SMD(loss, torch.optim.Adam([theta], lr=0.1))
    smd.run(torch.tensor([2.0, 1.0]), n_epochs=20, max_epochs_without_improvement=20)
    # The failing start is not moved in its failing epochs, momentum notwithstanding
    # (without the restore, Adam's first moment would keep it moving).
    assert torch.equal(seen[2][1], seen[3][1]) and torch.equal(seen[2][1], seen[5][1])
    assert not torch.equal(seen[1][1], seen[2][1])
    assert torch.isnan(smd.losses[1, 2:5]).all() and torch.isfinite(smd.losses[0]).all()
    assert all(math.isfinite(v) for v in smd.loss)
    # The healthy start's trajectory is exactly that of a run on its own.
    alone = starts[:1].clone().requires_grad_()
    one = SMD(_quadratic, torch.optim.Adam([alone], lr=0.1))
    one.run(torch.tensor([2.0, 1.0]), n_epochs=20, max_epochs_without_improvement=20)
    torch.testing.assert_close(smd.losses[0], one.losses[0])
    torch.testing.assert_close(theta[0].detach(), alone[0].detach())


def test_failing_start_keeps_its_optimiser_moments():
    y, starts = torch.tensor([2.0, 1.0]), torch.tensor([[0.0, 0.0], [4.0, -1.0]])
    runs = {}
    for n_epochs, loss in ((2, _quadratic), (5, _failing_second_start([]))):
        theta = starts.clone().requires_grad_()
        optimizer = torch.optim.Adam([theta], lr=0.1)
        SMD(loss, optimizer).run(y, n_epochs=n_epochs)
        runs[n_epochs] = optimizer.state[theta]
    # Two clean steps, then three failing ones: the second start's Adam moments are those
    # after the two clean steps (they would decay by beta^3 if zero gradients were applied).
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(runs[5][key][1], runs[2][key][1])
        assert not torch.equal(runs[5][key][0], runs[2][key][0])


def test_start_failing_in_the_first_epoch_recovers():
    def loss(theta, y):
        out = ((theta - y) ** 2).sum(-1)
        if not calls:  # NaN loss with a NaN gradient at the second start, first epoch only
            out = out + torch.stack([theta[0, 0] * 0, theta[1, 0].sqrt() * 0 + torch.nan])
        calls.append(1)
        return out

    calls = []
    loss.batched = True
    theta = torch.tensor([[0.0, 0.0], [-4.0, -1.0]], requires_grad=True)
    smd = SMD(loss, torch.optim.Adam([theta], lr=0.1))
    smd.run(torch.tensor([2.0, 1.0]), n_epochs=300, max_epochs_without_improvement=300)
    # Nothing of the failed epoch reached the optimiser's fresh state for that start.
    assert torch.isnan(smd.losses[1, 0]) and torch.isfinite(smd.losses[:, 1:]).all()
    assert float(smd.start_best_loss[1]) < 1e-3


def test_every_start_failing_raises_after_max_failed_epochs():
    def loss(theta, y):
        return theta.sum(-1) * torch.nan

    loss.batched = True
    theta = torch.zeros(2, 1, requires_grad=True)
    smd = SMD(loss, torch.optim.SGD([theta], lr=0.1), max_failed_epochs=3)
    with pytest.raises(RuntimeError, match="3 consecutive epochs"):
        smd.run(None, n_epochs=10)
    assert smd.losses.shape == (2, 3)
    assert torch.equal(theta.detach(), torch.zeros(2, 1))


def test_gradient_clipping_is_per_start():
    def loss(theta, y):
        return 0.5 * (theta**2).sum(-1)  # gradient = theta

    loss.batched = True
    theta = torch.tensor([[10.0, 0.0], [0.01, 0.0]], requires_grad=True)
    smd = SMD(loss, torch.optim.SGD([theta], lr=1.0), gradient_clipping_norm=0.1)
    smd.run(None, n_epochs=1)
    # One SGD step: the first start's gradient (norm 10) is cut to norm 0.1, the second's
    # (norm 0.01) is untouched; a global clip would have shrunk the second one too.
    expected = torch.tensor([[10.0 - 0.1 * 10 / (10 + 1e-6), 0.0], [0.0, 0.0]])
    torch.testing.assert_close(theta.detach(), expected)


def test_seed_gives_the_same_run_and_leaves_the_global_stream_alone():
    y = torch.randn(50)
    model = Normal(50)

    def loss(theta, data):
        (x,) = model.run_and_observe(torch.stack([theta[0], torch.ones_like(theta[0])]))
        return (x.mean() - data.mean()) ** 2

    runs = []
    for _ in range(2):
        theta = torch.tensor([2.0], requires_grad=True)
        state = torch.get_rng_state()
        smd = SMD(loss, torch.optim.Adam([theta], lr=0.05), seed=7)
        smd.run(y, n_epochs=30, max_epochs_without_improvement=30)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append(smd.loss)
    assert runs[0] == runs[1]


# --- BlackBIRDS compatibility, files ----------------------------------------------------


def test_blackbirds_signature_positionally():
    seen = []

    def loss(theta, y):
        seen.append(theta)
        return ((theta - y) ** 2).sum()

    theta = torch.tensor([0.0, 0.0], requires_grad=True)
    y = torch.tensor([1.0, -2.0])
    smd = SMD(loss, torch.optim.Adam([theta], lr=0.05), None, False)
    smd.run(y, 2000, 50, None)
    assert seen[0] is theta  # the optimiser's own tensor, as in BlackBIRDS
    assert isinstance(smd.loss, list) and all(isinstance(v, float) for v in smd.loss)
    assert 0 < len(smd.loss) <= 2000
    assert smd.best_parameters.shape == (2,)
    torch.testing.assert_close(smd.best_parameters, y, atol=2e-3, rtol=0)


def test_one_point_of_any_shape_without_multi_start():
    target = torch.arange(6.0).reshape(2, 3)
    shapes = []

    def loss(theta, y):
        shapes.append(tuple(theta.shape))
        return ((theta - y) ** 2).sum()

    theta = torch.zeros(2, 3, requires_grad=True)
    smd = SMD(loss, torch.optim.Adam([theta], lr=0.1), multi_start=False)
    estimate, _ = smd.run(target, n_epochs=500)
    assert set(shapes) == {(2, 3)} and smd.losses.shape[0] == 1
    torch.testing.assert_close(estimate, target, atol=1e-2, rtol=0)


def test_no_file_without_parameters_save_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    theta = torch.zeros(1, requires_grad=True)
    SMD(_quadratic, torch.optim.Adam([theta], lr=0.1)).run(torch.ones(1), n_epochs=20)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["out", "best.pt"])
def test_best_parameters_file_with_parameters_save_dir(tmp_path, name):
    theta = torch.tensor([[3.0], [-1.0]], requires_grad=True)
    smd = SMD(_quadratic, torch.optim.Adam([theta], lr=0.1))
    smd.run(torch.ones(1), n_epochs=40, parameters_save_dir=tmp_path / name)
    path = tmp_path / name if name.endswith(".pt") else tmp_path / name / "best_parameters.pt"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    saved = load_checkpoint(path)  # BlackBIRDS' file: the best parameters as one tensor
    assert torch.equal(saved, smd.best_parameters) and smd.best_start == 1


def test_zero_epochs_returns_the_first_start():
    theta = torch.tensor([[3.0], [-1.0]], requires_grad=True)
    estimate, value = SMD(_quadratic, torch.optim.Adam([theta])).run(torch.ones(1), 0)
    assert torch.equal(estimate, torch.tensor([3.0])) and value == math.inf


# --- errors ---------------------------------------------------------------------------


def test_bad_optimizers_raise():
    theta = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="optimiser"):
        SMD(_quadratic, [theta])
    empty = torch.optim.SGD([theta], lr=0.1)
    empty.param_groups[0]["params"] = []
    with pytest.raises(ValueError, match="holds no parameters"):
        SMD(_quadratic, empty)
    two = torch.optim.SGD([theta, torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="2 parameter tensors"):
        SMD(_quadratic, two)
    with pytest.raises(ValueError, match="requires_grad"):
        SMD(_quadratic, torch.optim.SGD([torch.zeros(2)], lr=0.1))
    cube = torch.zeros(2, 2, 2, requires_grad=True)
    with pytest.raises(ValueError, match="multi_start=False"):
        SMD(_quadratic, torch.optim.SGD([cube], lr=0.1))


def test_bad_arguments_raise():
    theta = torch.zeros(2, requires_grad=True)
    smd = SMD(_quadratic, torch.optim.SGD([theta], lr=0.1))
    with pytest.raises(ValueError, match="n_epochs"):
        smd.run(torch.ones(2), n_epochs=-1)
    with pytest.raises(ValueError, match="max_epochs_without_improvement"):
        smd.run(torch.ones(2), max_epochs_without_improvement=0)
    with pytest.raises(ValueError, match="gradient_clipping_norm"):
        SMD(_quadratic, torch.optim.SGD([theta], lr=0.1), gradient_clipping_norm=0.0)
    with pytest.raises(ValueError, match="gradient_horizon"):
        SMD(_quadratic, torch.optim.SGD([theta], lr=0.1), -1)
    with pytest.raises(TypeError, match="callable"):
        SMD("loss", torch.optim.SGD([theta], lr=0.1))


def test_bad_losses_raise():
    theta = torch.zeros(2, requires_grad=True)
    vector = SMD(lambda t, y: t * 2, torch.optim.SGD([theta], lr=0.1))
    with pytest.raises(ValueError, match="scalar"):
        vector.run(None, n_epochs=1)
    constant = SMD(lambda t, y: torch.tensor(1.0), torch.optim.SGD([theta], lr=0.1))
    with pytest.raises(TypeError, match="without a gradient"):
        constant.run(None, n_epochs=1)
