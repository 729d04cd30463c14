"""The signature kernel (gradcal.signature) and the signature-kernel MMD loss."""

import math

import pytest
import torch
from stats import Z_MAX, z_mean
from test_cli import _gradcal, _write
from test_losses import MODELS

from gradcal.discrepancies import mmd
from gradcal.kernels import median_distance
from gradcal.losses import SignatureMMDLoss
from gradcal.models import RandomWalk
from gradcal.signature import (
    StaticKernel,
    lead_lag,
    signature_gram,
    signature_kernel,
    signature_mmd,
    sub_paths,
    transform_paths,
    truncated_signature,
)

D = torch.float64


def _walks(n: int, steps: int, dim: int, seed: int, sd: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    start = torch.zeros(n, 1, dim, dtype=D)
    return torch.cat([start, torch.randn(n, steps, dim, generator=g, dtype=D) * sd], 1).cumsum(1)


def test_two_straight_lines_give_the_bessel_series():
    # x(s) = s u, y(t) = t v: d2K/dsdt = <u, v> K, so K(1, 1) = sum_k <u, v>^k / (k!)^2.
    # The explicit scheme's error is O(4^-r) (measured for c = 1.42: 3.9e-4 at r = 4, 6.8e-6
    # at r = 7, a factor 4 a step), so one Richardson step leaves O(8^-r): below 1e-6.
    u = torch.tensor([1.0, -0.5, 0.8], dtype=D)
    for v in (torch.tensor([0.3, -0.8, 0.9], dtype=D), torch.tensor([-1.0, 0.2, -0.4], dtype=D)):
        c = float(u @ v)
        exact = sum(c**k / math.factorial(k) ** 2 for k in range(40))
        x, y = torch.stack([0 * u, u]), torch.stack([0 * v, v])
        coarse, fine = (signature_kernel(x, y, dyadic_order=r).item() for r in (6, 7))
        assert fine == pytest.approx(exact, abs=1e-5)
        assert (4 * fine - coarse) / 3 == pytest.approx(exact, abs=1e-6)


def test_the_kernel_equals_the_inner_product_of_truncated_signatures():
    # Chen's identity gives the signature levels exactly; level 12 of these short paths is
    # below 1e-12, and dyadic order 5 leaves a PDE error of about 1e-7 (measured 4e-7 at r=4)
    x, y = _walks(1, 6, 2, seed=1)[0], _walks(1, 4, 2, seed=2)[0]
    levels_x, levels_y = truncated_signature(x, 12), truncated_signature(y, 12)
    reference = 1.0 + sum(float((a * b).sum()) for a, b in zip(levels_x, levels_y, strict=True))
    assert signature_kernel(x, y, dyadic_order=5).item() == pytest.approx(reference, abs=2e-6)
    # and the RBF static kernel converges to its own finer solution
    rbf = StaticKernel("rbf", bandwidth=0.7)
    fine = signature_kernel(x, y, rbf, dyadic_order=6).item()
    assert signature_kernel(x, y, rbf, dyadic_order=4).item() == pytest.approx(fine, abs=1e-5)


def test_pysiglib_agrees_where_installed():
    pysiglib = pytest.importorskip("pysiglib.torch_api")
    x, y = _walks(3, 9, 2, seed=3), _walks(3, 7, 2, seed=4)
    ours = signature_kernel(x, y, dyadic_order=2)
    torch.testing.assert_close(ours, pysiglib.sig_kernel(x, y, dyadic_order=2))


def test_the_gram_matrix_is_symmetric_and_positive_semidefinite():
    paths = transform_paths(_walks(14, 8, 1, seed=5), ("time", "lead_lag"))
    for kernel in (StaticKernel(), StaticKernel("rbf", bandwidth=0.5)):
        gram = signature_gram(paths, paths, kernel, dyadic_order=1)
        torch.testing.assert_close(gram, gram.T, rtol=1e-12, atol=1e-12)
        eigenvalues = torch.linalg.eigvalsh(gram)
        # the discretised kernel is an inner product only up to the scheme's O(4^-r) error
        assert eigenvalues.min() > -1e-6 * eigenvalues.max()


def test_transforms_and_sub_paths():
    x = torch.tensor([[1.0], [3.0], [2.0]])
    assert lead_lag(x)[:, 0].tolist() == [1.0, 3.0, 3.0, 2.0, 2.0]
    assert lead_lag(x)[:, 1].tolist() == [1.0, 1.0, 3.0, 3.0, 2.0]
    out = transform_paths(x, ("basepoint", "time"), scale=2.0)
    assert out.tolist() == [[0.0, 0.0], [0.0, 2.0], [0.5, 6.0], [1.0, 4.0]]
    assert sub_paths(torch.arange(7.0)[:, None], 3, 2).shape == (3, 3, 1)
    with pytest.raises(ValueError, match="unknown 'leadlag'"):
        transform_paths(x, ("leadlag",))


def _swapped_volatility(n: int, seed: int, swap: bool) -> torch.Tensor:
    """Random walks of 12 steps, sd 0.3 for 6 steps then sd 1.2 (or the reverse order)."""
    g = torch.Generator().manual_seed(seed)
    sd = torch.tensor([0.3] * 6 + [1.2] * 6, dtype=D)
    sd = sd.flip(0) if swap else sd
    steps = torch.randn(n, 12, generator=g, dtype=D) * sd
    return torch.cat([torch.zeros(n, 1, dtype=D), steps], 1).cumsum(1)[..., None]


def _permutation_p(gram: torch.Tensor, n: int, permutations: int, g) -> float:
    """p-value of the unbiased MMD^2 from a pooled Gram matrix (2n, 2n), by permutations."""

    def statistic(index: torch.Tensor) -> torch.Tensor:
        k = gram[index][:, index]
        a, b, ab = k[:n, :n], k[n:, n:], k[:n, n:]
        off = (a.sum() - a.diagonal().sum() + b.sum() - b.diagonal().sum()) / (n * (n - 1))
        return off - 2 * ab.mean()

    observed = statistic(torch.arange(2 * n))
    null = torch.stack(
        [statistic(torch.randperm(2 * n, generator=g)) for _ in range(permutations)]
    )
    return float((null >= observed).sum() + 1) / (permutations + 1)


def test_zero_in_expectation_and_power_where_a_windowed_mmd_is_blind():
    # Two processes whose increments have the same marginal law (half sd 0.3, half sd 1.2)
    # but in the opposite order: an MMD on single increments cannot tell them apart, the
    # signature kernel of time-augmented paths can. Sizes: 16 paths a side, 30 replications;
    # the loss's default static kernel (rbf, half the median distance) on paths scaled
    # by 0.3 (about the extent heuristic's 1 / median max|x_t - x_0| here).
    n, reps, permutations = 16, 30, 99
    g = torch.Generator().manual_seed(11)
    null_values, sig_hits, window_hits = [], 0, 0
    for r in range(reps):
        a = _swapped_volatility(n, seed=100 + r, swap=False)
        b = _swapped_volatility(n, seed=200 + r, swap=True)
        same = _swapped_volatility(n, seed=300 + r, swap=False)
        paths = transform_paths(torch.cat([a, b]), ("time",), scale=0.3)
        rbf = StaticKernel("rbf", 0.5 * float(median_distance(paths[n:].flatten(0, -2))))
        null_values.append(
            signature_mmd(paths[:n], transform_paths(same, ("time",), scale=0.3), rbf).item()
        )
        gram = signature_gram(paths, paths, rbf)
        sig_hits += _permutation_p(gram, n, permutations, g) <= 0.05
        steps = torch.cat([a, b]).diff(dim=1).reshape(2 * n, -1)  # the increments' law
        window_gram = torch.exp(-((steps.reshape(-1, 1) - steps.reshape(1, -1)) ** 2))
        pooled = window_gram.reshape(2 * n, 12, 2 * n, 12).mean((1, 3))  # mean embedding
        window_hits += _permutation_p(pooled, n, permutations, g) <= 0.05
    # E MMD^2_u = 0 under the null: the mean of 30 replications within Z_MAX of their SE
    assert abs(z_mean(torch.tensor(null_values), 0.0)) < Z_MAX
    # power: a test at level 0.05 rejects at most ~ 0.05 + Z_MAX sd of a binomial(30, .05)
    # (<= 6 of 30) when blind; the signature test must reject in at least 20 of 30
    # (measured power 0.9 on 10 other replications; at a true power of 0.9, 20 of 30 lies
    # 4.3 binomial sds below the mean). The linear static kernel has power about 0.1 here.
    assert window_hits <= 6
    assert sig_hits >= 20
    # and on these sizes the single-increment MMD itself barely moves, unlike the signature
    assert mmd(a.diff(dim=1).flatten(), b.diff(dim=1).flatten()).item() < 0.05


def _loss_and_simulation(**options):
    model = RandomWalk(40)
    torch.manual_seed(0)
    y = model.run_and_observe(torch.tensor([0.4], dtype=D))[0].detach()
    loss = SignatureMMDLoss(model, y, **options)
    return model, y, loss


def test_reverse_mode_equals_forward_mode_and_finite_differences():
    _, y, loss = _loss_and_simulation(transforms=("time", "lead_lag"), path_window=10)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(3, 41, 1, generator=g, dtype=D).cumsum(1) * 0.5
    drift = torch.linspace(0, 1, 41, dtype=D)[:, None]

    def f(theta: torch.Tensor) -> torch.Tensor:  # a deterministic "simulator" of theta (3,)
        return loss.compare([base + theta[:, None, None] * drift], y, lead=1)

    theta = torch.tensor([0.2, -0.5, 1.0], dtype=D)
    leaf = theta.clone().requires_grad_()
    (grad,) = torch.autograd.grad(f(leaf).sum(), leaf)
    _, forward = torch.func.jvp(lambda t: f(t).sum(), (theta,), (torch.ones_like(theta),))
    torch.testing.assert_close(forward, grad.sum(), rtol=1e-10, atol=1e-12)
    jacobian = torch.func.jacfwd(f)(theta)
    torch.testing.assert_close(jacobian.diagonal(), grad, rtol=1e-10, atol=1e-12)
    eps = 1e-6
    step = torch.eye(3, dtype=D) * eps
    fd = torch.stack([(f(theta + step[i]) - f(theta - step[i]))[i] / (2 * eps) for i in range(3)])
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-7)


def test_forward_mode_through_a_model():
    _, y, loss = _loss_and_simulation()
    theta = torch.tensor([[0.3], [0.6]], dtype=D)
    tangent = torch.tensor([[1.0], [-2.0]], dtype=D)
    torch.manual_seed(1)
    _, directional = torch.func.jvp(lambda p: loss(p, y).sum(), (theta,), (tangent,))
    torch.manual_seed(1)
    leaf = theta.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(leaf, y).sum(), leaf)
    assert torch.isfinite(directional)
    torch.testing.assert_close(directional, (grad * tangent).sum().to(directional.dtype))


def test_batched_equals_a_loop_and_chunks_change_nothing():
    _, y, loss = _loss_and_simulation(static_kernel="rbf", transforms=("time", "basepoint"))
    _, _, chunked = _loss_and_simulation(
        static_kernel="rbf", transforms=("time", "basepoint"), chunk_size=3
    )
    x = _walks(4, 40, 1, seed=7, sd=0.4).requires_grad_()
    batched = loss.compare([x], y, lead=1)
    loop = torch.stack([loss.compare([x[b]], y, lead=0) for b in range(4)])
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-12)
    (g1,) = torch.autograd.grad(batched.sum(), x)
    in_chunks = chunked.compare([x], y, lead=1)
    (g2,) = torch.autograd.grad(in_chunks.sum(), x)
    torch.testing.assert_close(in_chunks, batched, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-12)


def test_overlapping_sub_paths_are_left_out_and_panels_are_samples():
    _, y, loss = _loss_and_simulation(path_window=10, stride=5)  # T = 41: 7 sub-paths
    mask = loss.pair_mask(y)
    assert mask.shape == (7, 7) and not mask.diagonal().any()
    assert not mask[0, 1] and mask[0, 2] and mask[2, 0]  # starts 0 and 5 overlap, 0, 10 not
    # a panel: 6 series (T, 6), each a whole path; pairs of different series only
    panel = _walks(6, 20, 1, seed=8)[..., 0].T  # (21, 6)
    loss = SignatureMMDLoss(RandomWalk(20), panel, panel=True)
    assert torch.equal(loss.pair_mask(panel), ~torch.eye(6, dtype=torch.bool))
    other = _walks(6, 20, 1, seed=9)[..., 0].T
    assert loss.compare([other], panel, lead=0).shape == ()


def test_bad_options_raise_one_line():
    model = RandomWalk(20)
    y = torch.zeros(21)
    cases = [
        ({"bandwidth": -1.0, "static_kernel": "rbf"}, "`bandwidth` must be > 0"),
        ({"transforms": ("time", "leadlag")}, "unknown transformation 'leadlag'"),
        ({"dyadic_order": -1}, "`dyadic_order` must be an integer >= 0"),
        ({"path_window": 1}, "`path_window` must be >= 2"),
        ({"static_kernel": "cosine"}, "`static_kernel` must be 'linear' or 'rbf'"),
        ({"path_window": 21, "estimator": "unbiased"}, "'unbiased' needs two paths"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            SignatureMMDLoss(model, y, **options)


def _observed_term(steps: int, scale: float | None) -> float:
    """E k(y, y') of the loss's observed sub-paths of a random walk of ``steps`` steps."""
    model = RandomWalk(steps)
    torch.manual_seed(12)
    y = model.run_and_observe(torch.tensor([0.4], dtype=D))[0].detach()
    loss = SignatureMMDLoss(model, y, static_kernel="linear", scale=scale)
    return loss.observed_term(0, y).item()


def test_the_kernel_keeps_its_size_across_series_lengths():
    # the extent scaling keeps the kernel (so the loss, so w) at the same size when the
    # series and its sub-paths (T // 8 points) grow. Measured E k(y, y'), linear static
    # kernel, T = 40, 160, 640: scaled 3.2, 3.8, 4.5; unscaled 25, 9.5e4, 1e24.
    assert 0.5 < _observed_term(640, None) / _observed_term(40, None) < 2
    assert _observed_term(160, 1.0) / _observed_term(40, 1.0) > 100


def _signature_config(tmp_path):
    config = _write(tmp_path, loss="signature", epochs=2)
    text = config.read_text().replace(
        'kind = "signature"', 'kind = "signature"\ntransforms = ["time", "lead_lag"]'
    )
    config.write_text(text)
    return config


def test_toml_check(tmp_path):
    assert _gradcal("check", _signature_config(tmp_path), cwd=tmp_path).returncode == 0


@pytest.mark.slow  # about 50 s on a loaded 2-core machine: a whole run, report included
def test_toml_short_run(tmp_path):
    config = _signature_config(tmp_path)
    _gradcal("run", config, "--out", tmp_path / "out", cwd=tmp_path, check=True)
    assert (tmp_path / "out" / "summary.csv").exists()
    written = (tmp_path / "out" / "config.toml").read_text()
    assert 'kind = "signature"' in written and "dyadic_order" in written
    assert "window" not in written.replace("path_window", "")


@pytest.mark.parametrize(
    "option,message",
    [
        ("bandwidth = -0.5", "loss.bandwidth: must be a finite number > 0, got -0.5"),
        ('transforms = ["time", "leadlag"]', "loss.transforms: unknown transformation 'leadlag'"),
    ],
)
def test_bad_toml_options_exit_2_with_one_line(tmp_path, option, message):
    config = _write(tmp_path, loss="signature")
    config.write_text(
        config.read_text().replace('kind = "signature"', f'kind = "signature"\n{option}')
    )
    result = _gradcal("check", config, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize("model_name", ["random_walk", "rama_cont", "brock_hommes", "sir"])
def test_the_default_works_on_every_built_in_model(model_name):
    # finite, batched, and forward mode equal to reverse mode, at the defaults
    factory, theta = MODELS[model_name]
    model = factory()
    theta = torch.tensor(theta, dtype=D)
    observed = [y.detach() for y in model.run_and_observe(theta)]
    y = observed[0] if len(observed) == 1 else observed
    loss = SignatureMMDLoss(model, y)
    params = theta.expand(3, -1).clone()
    tangent = torch.randn(params.shape, generator=torch.Generator().manual_seed(0), dtype=D)
    torch.manual_seed(1)
    value, directional = torch.func.jvp(lambda p: loss(p, y).sum(), (params,), (tangent,))
    torch.manual_seed(1)
    leaf = params.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(leaf, y).sum(), leaf)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    torch.testing.assert_close(directional, (grad * tangent).sum().to(directional.dtype))


def test_several_simulations_pair_only_independent_paths():
    # simulations = 2: the x-x term averages k over pairs of sub-paths from different
    # simulations (independent, so unbiased for any process), the x-y term over all pairs
    _, y, loss = _loss_and_simulation(path_window=10, stride=5)
    x = _walks(6, 40, 1, seed=14, sd=0.4).reshape(3, 2, 41, 1)  # 3 draws, 2 simulations
    value = loss.compare_simulations([x], y, lead=1)
    kernel, scale = loss.kernels[0], loss.scales[0]
    paths = transform_paths(sub_paths(x, 10, 5), loss.transforms, scale)  # (3, 2, 7, 10, 2)
    observed = transform_paths(sub_paths(y, 10, 5), loss.transforms, scale)
    kxx = signature_gram(paths[:, 0], paths[:, 1], kernel).mean((-1, -2))
    kxy = signature_gram(paths.flatten(1, 2), observed, kernel).mean((-1, -2))
    expected = kxx - 2 * kxy + loss.observed_term(0, y)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    loop = torch.stack([loss.compare_simulations([x[b]], y, lead=0) for b in range(3)])
    torch.testing.assert_close(value, loop, rtol=1e-12, atol=1e-12)


def test_an_option_the_data_rules_out_exits_2_with_one_line(tmp_path):
    # the whole series as one path leaves no pair for the unbiased y-y term
    config = _write(tmp_path, loss="signature")
    config.write_text(
        config.read_text().replace('kind = "signature"', 'kind = "signature"\npath_window = 40')
    )
    result = _gradcal("run", config, "--out", tmp_path / "out", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "loss: `estimator`: 'unbiased' needs two paths" in lines[0]
