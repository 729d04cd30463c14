"""The posterior-accuracy checks of tests/stats.py: their level and power at the sizes the
Brock-Hommes tests compare (4 parameters, 1000 reference draws)."""

import pytest
import torch
from stats import critical_z, mmd_permutation_test, moment_z, posterior_mismatch

REPLICATES = 400


def _rejection_rate(n_draws, shift=0.0, scale=1.0, generator=None):
    """How often the moment checks reject N(0, I) draws (n_draws, 4) against a reference
    (1000, 4) whose first coordinate is scaled by ``scale`` and shifted by ``shift`` sds."""
    rejected = 0
    for _ in range(REPLICATES):
        draws = torch.randn(n_draws, 4, generator=generator, dtype=torch.float64)
        reference = torch.randn(1000, 4, generator=generator, dtype=torch.float64)
        reference[:, 0] = scale * reference[:, 0] + shift
        rejected += bool(posterior_mismatch(draws, reference, mmd=False))
    return rejected / REPLICATES


@pytest.mark.parametrize("n_draws", [2000, 10_000])
def test_moment_checks_have_their_level_and_reject_shifts_and_scale_errors(n_draws):
    # Sizes: 1000 reference draws against the MALA test's smallest accepted effective
    # size (2000) and the VI test's 10000 draws. Level: each of the 8 |z| is compared with
    # critical_z(1e-3, 8) = 3.84, so the family-wise false-alarm rate is <= 1e-3: at most 3
    # of 400 null replicates may reject (P(>= 4) ~ 8e-4 at that rate).
    # Power on one coordinate (the others unchanged), from the normal approximation:
    # a 0.2 sd shift has z = 0.2 / sqrt(1 / n + 1 / 1000) = 5.2 (n = 2000) to 6.0 (10000),
    # rejected with probability 0.91 to 0.99; a 15 % scale error, log(1.15) /
    # sqrt(1 / (2 n) + 1 / 2000) = 5.1 to 5.9, probability 0.90 to 0.98 (0.85: higher).
    # The measured rate over 400 replicates (s.e. <= 0.015) must be >= 0.85.
    assert critical_z(1e-3, 8) == pytest.approx(3.84, abs=0.01)
    g = torch.Generator().manual_seed(0)
    assert _rejection_rate(n_draws, generator=g) <= 3 / REPLICATES
    for shift, scale in ((0.2, 1.0), (-0.2, 1.0), (0.0, 1.15), (0.0, 0.85)):
        rate = _rejection_rate(n_draws, shift, scale, generator=g)
        assert rate >= 0.85, (shift, scale, rate)


def test_moment_z_uses_the_effective_sizes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    y = torch.randn(1000, 2, generator=g, dtype=torch.float64) + 0.1
    z_iid, _ = moment_z(x, y)
    z_corr, _ = moment_z(x, y, n_eff=torch.tensor([400.0, 400.0]))
    # se of the difference: sqrt(1/4000 + 1/1000) = 0.035 vs sqrt(1/400 + 1/1000) = 0.059
    assert (z_corr.abs() < z_iid.abs()).all()
    assert torch.allclose(
        z_iid / z_corr, torch.tensor(0.059 / 0.035, dtype=torch.float64), rtol=0.05
    )


def test_mmd_permutation_test_rejects_another_law_and_keeps_its_level():
    # 500 against 500 draws: the same law gives a p-value uniform on {1/1000, ...}; a shift
    # of 0.5 sd in both coordinates (z ~ 7.9 for each mean alone) puts the statistic above
    # every permuted one, p = 1 / 1000, the smallest value.
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(500, 2, generator=g, dtype=torch.float64) for _ in range(2))
    _, p_same = mmd_permutation_test(a, b)
    _, p_shifted = mmd_permutation_test(a + 0.5, b)
    assert p_same > 1e-3
    assert p_shifted == pytest.approx(1e-3)
