"""R-hat and effective sample sizes (gradcal.infer.convergence) against ArviZ and by property.

Before issue 11 `MCMC.rhat()` was the classic split R-hat while the report judged it with
the 1.01 threshold of the rank-normalised statistic; chains of equal means and different
scales passed as mixed.
"""

import pytest
import torch

from gradcal.infer.convergence import (
    effective_sample_size,
    ess_bulk,
    ess_tail,
    rank_normalise,
    rhat,
    split_chains,
    split_rhat,
)


def _deterministic_chains():
    """Three chains of 20 draws with a trend, a chain offset and a wiggle: (3, 20)."""
    s = torch.arange(20, dtype=torch.float64)
    c = torch.arange(3, dtype=torch.float64)[:, None]
    return torch.sin(1.3 * s + c) + 0.05 * c * s + 0.3 * torch.cos(0.7 * s * s)


# Values computed with ArviZ 0.23.4 (az.rhat(method="rank"/"split"),
# az.ess(method="bulk"/"tail"/"mean")) on the chains above; an independent implementation.
EXPECTED = {
    rhat: 1.1496347935388245,
    split_rhat: 1.1735268973182786,
    ess_bulk: 34.04142659106766,
    ess_tail: 27.63561924257929,
    effective_sample_size: 32.81686511581922,
}


@pytest.mark.parametrize("statistic", list(EXPECTED), ids=lambda f: f.__name__)
def test_exact_values(statistic):
    x = _deterministic_chains()
    assert statistic(x).item() == pytest.approx(EXPECTED[statistic], rel=1e-12)
    # (C, S, D) gives one value per parameter, the same as each (C, S) slice
    both = statistic(torch.stack((x, 2 * x + 1), -1))
    assert both.shape == (2,)
    assert both[0].item() == pytest.approx(EXPECTED[statistic], rel=1e-12)
    if statistic is not split_rhat and statistic is not effective_sample_size:
        # ranks are invariant to increasing maps
        assert both[1].item() == pytest.approx(EXPECTED[statistic], rel=1e-12)


def _ar1(phi, chains, draws, generator):
    noise = torch.randn(chains, draws, generator=generator, dtype=torch.float64)
    x = torch.zeros(chains, draws, dtype=torch.float64)
    for t in range(1, draws):
        x[:, t] = phi * x[:, t - 1] + noise[:, t]
    return x


def _cases():
    g = torch.Generator().manual_seed(0)
    return {
        "iid": torch.randn(4, 250, generator=g, dtype=torch.float64),
        "autocorrelated": _ar1(0.9, 4, 301, g),
        "shifted": _ar1(0.5, 3, 200, g) + torch.tensor([0.0, 0.0, 1.0])[:, None],
        "scaled": torch.randn(4, 250, generator=g, dtype=torch.float64)
        * torch.tensor([1.0, 1.0, 1.0, 3.0])[:, None],
        "ties": torch.randint(0, 5, (4, 101), generator=g).double(),
        "two short chains": _ar1(0.7, 2, 51, g),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_against_arviz(case):
    az = pytest.importorskip("arviz")
    x = _cases()[case]
    a = x.numpy()
    pairs = [
        (rhat, az.rhat(a, method="rank")),
        (split_rhat, az.rhat(a, method="split")),
        (ess_bulk, az.ess(a, method="bulk")),
        (ess_tail, az.ess(a, method="tail")),
        (effective_sample_size, az.ess(a, method="mean")),
    ]
    for ours, theirs in pairs:
        assert ours(x).item() == pytest.approx(float(theirs), rel=1e-10), ours.__name__


def test_rank_normalise_and_split():
    z = rank_normalise(torch.tensor([[3.0, 1.0, 2.0, 2.0]]))
    n = 4
    expected = torch.special.ndtri((torch.tensor([4.0, 1.0, 2.5, 2.5]) - 0.375) / (n + 0.25))
    torch.testing.assert_close(z[0], expected.double())
    x = torch.arange(7.0)[None]
    assert split_chains(x).tolist() == [[0.0, 1.0, 2.0], [4.0, 5.0, 6.0]]


def test_rank_rhat_flags_chains_of_different_scale():
    # Same mean, one chain three times wider: the classic statistic sees nothing (its
    # expected value is 1 here), the folded (tail) part of the rank-normalised one does.
    # 4 x 1000 draws: the tail R-hat is about 1.15 (sd of its null distribution ~0.002).
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([1.0, 1.0, 1.0, 3.0])[:, None]
    x = torch.randn(4, 1000, generator=g, dtype=torch.float64) * scales
    assert split_rhat(x) < 1.01
    assert rhat(x) > 1.05
    mixed = torch.randn(4, 1000, generator=g, dtype=torch.float64)
    assert rhat(mixed) < 1.01


def test_mcmc_reports_the_rank_normalised_statistics():
    from gradcal.infer.mcmc import MALA, MCMC

    prior = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1
    )

    def loss(theta, y):
        return 0.5 * ((theta - y) ** 2).sum(-1)

    loss.batched = True
    mcmc = MCMC(MALA(prior, loss), num_samples=40, progress_bar=False)
    mcmc.run(torch.zeros(4, 2), torch.ones(2), warmup=20, seed=0, scale=0.3)
    chains = mcmc.chains
    torch.testing.assert_close(mcmc.rhat(), rhat(chains))
    torch.testing.assert_close(mcmc.ess_bulk(), ess_bulk(chains))
    torch.testing.assert_close(mcmc.ess_tail(), ess_tail(chains))
    torch.testing.assert_close(mcmc.ess(), effective_sample_size(chains))


def test_input_checks():
    with pytest.raises(ValueError, match="at least 4 samples"):
        rhat(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(C, S, D\) or \(C, S\)"):
        ess_bulk(torch.zeros(5))
