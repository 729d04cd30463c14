"""MMD, energy distance and MSE against direct formulas, batching, unbiasedness, numerics."""

import pytest
import torch
from stats import Z_MAX, z_mean
from torch.func import jvp

from gradcal.discrepancies import energy_distance, increments, lag_embedding, mmd, mse
from gradcal.kernels import GaussianKernel, LaplaceKernel


def _direct_mmd(x, y, k, unbiased):
    n, m = len(x), len(y)
    kxx = sum(
        k(((x[i] - x[j]) ** 2).sum()) for i in range(n) for j in range(n) if i != j or not unbiased
    )
    kyy = sum(
        k(((y[i] - y[j]) ** 2).sum()) for i in range(m) for j in range(m) if i != j or not unbiased
    )
    kxy = sum(k(((x[i] - y[j]) ** 2).sum()) for i in range(n) for j in range(m))
    nx = n * (n - 1) if unbiased else n * n
    ny = m * (m - 1) if unbiased else m * m
    return kxx / nx + kyy / ny - 2 * kxy / (n * m)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("d", [1, 3])
def test_mmd_matches_the_direct_double_sum(unbiased, d):
    x, y = torch.randn(7, d, dtype=torch.float64), torch.randn(9, d, dtype=torch.float64) + 0.5
    k = GaussianKernel(bandwidth=0.8)
    value = mmd(x, y, k, estimator="unbiased" if unbiased else "biased")
    torch.testing.assert_close(value, _direct_mmd(x, y, k, unbiased))


def test_linear_mmd_matches_the_pair_formula():
    x, y = torch.randn(8, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    k = LaplaceKernel(bandwidth=1.0)

    def kk(a, b):
        return k((a - b) ** 2)

    pairs = [
        kk(x[2 * i], x[2 * i + 1])
        + kk(y[2 * i], y[2 * i + 1])
        - kk(x[2 * i], y[2 * i + 1])
        - kk(x[2 * i + 1], y[2 * i])
        for i in range(4)
    ]
    torch.testing.assert_close(mmd(x, y, k, estimator="linear"), sum(pairs) / 4)


@pytest.mark.parametrize("estimator", ["unbiased", "linear"])
def test_unbiased_estimators_average_zero_under_the_null(estimator):
    # Unbiased over both samples: y is redrawn with x for every replicate.
    x, y = torch.randn(400, 50), torch.randn(400, 50)
    k = GaussianKernel(bandwidth=1.0)
    values = torch.stack(
        [mmd(xi, yi, k, estimator=estimator) for xi, yi in zip(x, y, strict=True)]
    )
    assert abs(z_mean(values, 0.0)) < Z_MAX
    biased = torch.stack([mmd(xi, yi, k, estimator="biased") for xi, yi in zip(x, y, strict=True)])
    assert (biased > 0).all() and abs(z_mean(biased, 0.0)) > Z_MAX


def test_mmd_and_energy_are_batched_over_leading_axes():
    x, y = torch.randn(2, 3, 40), torch.randn(30)
    for f in (mmd, energy_distance):
        batched = f(x, y)
        assert batched.shape == (2, 3)
        torch.testing.assert_close(batched[1, 2], f(x[1, 2], y))


def test_energy_distance_matches_the_direct_formula():
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    dist = torch.cdist  # reverse mode only: fine for a reference value
    exy = dist(x, y).mean()
    exx = dist(x, x).sum() / (6 * 5)
    eyy = dist(y, y).sum() / (5 * 4)
    torch.testing.assert_close(energy_distance(x, y), 2 * exy - exx - eyy)


def test_energy_distance_is_unbiased_under_the_null():
    x, y = torch.randn(400, 50), torch.randn(400, 50)
    values = torch.stack([energy_distance(xi, yi) for xi, yi in zip(x, y, strict=True)])
    assert abs(z_mean(values, 0.0)) < Z_MAX


@pytest.mark.parametrize("f", [mmd, energy_distance])
def test_chunked_equals_unchunked_in_value_and_gradient(f):
    x = torch.randn(2, 37, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(29, 2, dtype=torch.float64)
    full, chunked = f(x, y), f(x, y, chunk_size=8)
    torch.testing.assert_close(full, chunked)
    (g_full,) = torch.autograd.grad(full.sum(), x)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), x)
    torch.testing.assert_close(g_full, g_chunked)


@pytest.mark.parametrize(
    "f",
    [
        lambda x, y: mmd(x, y),
        lambda x, y: mmd(x, y, LaplaceKernel(), estimator="linear"),
        lambda x, y: energy_distance(x, y),
        lambda x, y: mse(x, y),
        lambda x, y: mmd(
            lag_embedding(increments(x[:, :, None]), 3), lag_embedding(increments(y[:, None]), 3)
        ),
    ],
)
def test_forward_mode_matches_reverse_mode(f):
    x, y = torch.randn(3, 20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    v = torch.randn_like(x)
    _, tangent = jvp(lambda x: f(x, y).sum(), (x,), (v,))
    (grad,) = torch.autograd.grad(f(x.requires_grad_(), y).sum(), x)
    torch.testing.assert_close(tangent, (grad * v).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_and_extreme_series_give_finite_values_and_gradients(dtype):
    y = torch.zeros(50, dtype=dtype)
    for x in (torch.zeros(2, 50, dtype=dtype), torch.full((2, 50), 1e30, dtype=dtype)):
        x = x.requires_grad_()
        for value in (
            mmd(x, y),
            energy_distance(x, y),
            mse(x, y) if dtype == torch.float64 else mmd(x, y),
        ):
            assert torch.isfinite(value).all()
            (g,) = torch.autograd.grad(value.sum(), x)
            assert torch.isfinite(g).all()


def test_lag_embedding_and_increments():
    x = torch.arange(5.0)[:, None]
    assert lag_embedding(x, 3).tolist() == [[0.0, 1.0, 2.0], [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]]
    two = torch.stack([torch.arange(3.0), 10 + torch.arange(3.0)], -1)  # (T=3, d=2)
    assert lag_embedding(two, 2).tolist() == [[0.0, 10.0, 1.0, 11.0], [1.0, 11.0, 2.0, 12.0]]
    assert increments(torch.tensor([[1.0], [4.0], [2.0]])).flatten().tolist() == [3.0, -2.0]
    with pytest.raises(ValueError, match="window"):
        lag_embedding(x, 6)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 7, 2\).*\(9, 3\)"):
        mmd(torch.zeros(4, 7, 2), torch.zeros(9, 3))
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(6,\)"):
        mse(torch.zeros(2, 5), torch.zeros(6))
    with pytest.raises(ValueError, match="estimator"):
        mmd(torch.zeros(5), torch.zeros(5), estimator="quadratic")
    with pytest.raises(ValueError, match="at least 2 points"):
        mmd(torch.zeros(1), torch.zeros(5))
