"""Kernels: the median heuristic, mixtures, and numerics."""

import math

import pytest
import torch

from gradcal.kernels import GaussianKernel, LaplaceKernel, median_distance, squared_distances


def test_squared_distances_match_a_direct_computation():
    a, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    expected = torch.tensor([[((ai - bj) ** 2).sum().item() for bj in b] for ai in a])
    torch.testing.assert_close(squared_distances(a, b), expected.double())


def test_squared_distances_do_not_cancel_or_overflow_to_nan():
    a = torch.tensor([[1e20], [1e20 + 1e13]])
    d2 = squared_distances(a, a)
    assert torch.isfinite(d2).all() and d2[0, 1] > 0
    assert not torch.isnan(squared_distances(torch.tensor([[3e38]]), torch.tensor([[-3e38]])))


def test_median_heuristic_value_and_bandwidths():
    y = torch.tensor([[0.0], [1.0], [3.0], [7.0]])  # distances 1, 2, 3, 4, 6, 7: median 3.5
    assert median_distance(y).item() == pytest.approx(3.5)
    k = GaussianKernel().fitted(y)
    assert k.bandwidth.item() == pytest.approx(3.5 / math.sqrt(2))
    # exp(-d^2 / m^2): BlackBIRDS' form
    assert k(torch.tensor(3.5**2)).item() == pytest.approx(math.exp(-1.0))
    assert LaplaceKernel().fitted(y).bandwidth.item() == pytest.approx(3.5)


def test_median_heuristic_of_constant_or_tied_data_stays_positive():
    assert median_distance(torch.zeros(10, 1)).item() == 1.0
    tied = torch.tensor([[0.0]] * 8 + [[2.0]])  # most pairs tie at 0: mean of non-zero ones
    assert median_distance(tied).item() == pytest.approx(2.0)


def test_mixture_is_the_mean_of_its_components():
    d2 = torch.rand(6)
    mix = GaussianKernel(bandwidth=[0.5, 2.0])
    expected = (GaussianKernel(bandwidth=0.5)(d2) + GaussianKernel(bandwidth=2.0)(d2)) / 2
    torch.testing.assert_close(mix(d2), expected)
    scaled = GaussianKernel(scales=(0.5, 1.0, 2.0)).fitted(torch.randn(50, 1))
    assert scaled.bandwidth.shape == (3,)


def test_kernel_validation():
    with pytest.raises(ValueError, match="bandwidth"):
        GaussianKernel(bandwidth=-1.0)
    with pytest.raises(ValueError, match="scales"):
        GaussianKernel(scales=())
    with pytest.raises(ValueError, match="fitted"):
        GaussianKernel()(torch.ones(1))
