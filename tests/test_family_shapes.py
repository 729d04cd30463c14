"""A user family whose log densities come as (n, 1), as BlackBIRDS' tutorial writes one.

The seed tutorial ("Bayesian inference for differentiable ABMs with VI") defines its own
Gaussian family: an ``nn.Module`` with ``mu`` (1,) and ``sigma`` (1,), whose ``sample(n)``
and ``log_prob(theta)`` return the log density of a ``Normal`` with batch shape (1,), i.e.
shape (n, 1). BlackBIRDS accepts it; gradcal must too, with every gradient estimator, every
objective, the Monte Carlo KL, PSIS and ``VI.mass_check``. Shapes that cannot be one value
per draw are a clear error at the boundary (:func:`gradcal.posterior_estimators.as_family`).
"""

from __future__ import annotations

import pytest
import torch

from gradcal.diagnostics import vi_importance, vi_khat
from gradcal.gradients import BatchedLoss, make_estimator
from gradcal.infer.vi import VI
from gradcal.posterior_estimators import as_family, log_prob_stopped
from gradcal.regularisation import compute_regularisation_loss, kl_divergence


class ColumnGaussian(torch.nn.Module):
    """The tutorial's family interface: log q of shape (n, 1) from sample and log_prob."""

    def __init__(self):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.zeros(1))
        self.sigma = torch.nn.Parameter(torch.ones(1))

    def _normal(self):
        return torch.distributions.Normal(self.mu, torch.clamp(self.sigma**2, 1e-2, 1e6))

    def sample(self, n):
        dist = self._normal()
        theta = dist.rsample((n,))  # (n, 1)
        return theta, dist.log_prob(theta)  # (n, 1)

    def log_prob(self, theta):
        return self._normal().log_prob(theta)  # (n, 1)


class ShapedLogProb(ColumnGaussian):
    """A family whose log q comes back in a given (wrong) shape."""

    def __init__(self, shape_of):
        super().__init__()
        self.shape_of = shape_of

    def sample(self, n):
        theta, log_q = super().sample(n)
        return theta, self.shape_of(log_q)

    def log_prob(self, theta):
        return self.shape_of(super().log_prob(theta))


def squared(theta, y):
    """A scalar loss of one draw theta (1,)."""
    return (theta - y).square().sum()


PRIOR = torch.distributions.Normal(torch.tensor(2.0), torch.tensor(1.0))
DATA = torch.tensor(1.0)

ESTIMATORS = {
    "pathwise_reverse": {"gradient_estimation_method": "pathwise", "diff_mode": "reverse"},
    "pathwise_forward": {"gradient_estimation_method": "pathwise", "diff_mode": "forward"},
    "score": {"gradient_estimation_method": "score"},
}
OBJECTIVES = {
    "reverse_kl_monte_carlo": {"kl": "monte_carlo"},
    "reverse_kl_sticking_the_landing": {
        "kl": "monte_carlo",
        "objective": "reverse_kl",
        "objective_options": {"sticking_the_landing": True},
    },
    "importance_weighted": {"objective": "importance_weighted"},
    "renyi": {"objective": "renyi"},
    "forward_kl": {"objective": "forward_kl"},
}


def _vi(estimator: str, objective: str, **extra) -> VI:
    options = dict(OBJECTIVES[objective])
    objective_options = options.pop("objective_options", None)
    if objective_options is not None:
        from gradcal.infer.objectives import make_objective

        options["objective"] = make_objective(options["objective"], **objective_options)
    q = ColumnGaussian()
    return VI(
        squared,
        posterior_estimator=q,
        prior=PRIOR,
        optimizer=torch.optim.Adam(q.parameters(), lr=5e-2),
        w=1.0,
        n_samples_per_epoch=16,  # a multiple of the weighted objectives' K = 8
        progress_bar=False,
        seed=0,
        **ESTIMATORS[estimator],
        **options,
        **extra,
    )


def test_the_seed_tutorials_score_section_runs():
    """The issue's reproduction: the tutorial's class, a scalar loss, score, 30 draws."""
    torch.manual_seed(0)
    q = ColumnGaussian()
    vi = VI(
        squared,
        posterior_estimator=q,
        prior=PRIOR,
        optimizer=torch.optim.Adam(q.parameters(), lr=5e-3),
        w=1,
        n_samples_per_epoch=30,
        gradient_estimation_method="score",
        progress_bar=False,
    )
    vi.run(DATA, n_epochs=5, max_epochs_without_improvement=100)
    assert len(vi.losses_hist["total"]) == 5
    assert all(torch.isfinite(torch.tensor(vi.losses_hist["total"])))
    assert q.mu.grad is not None and torch.isfinite(q.mu.grad).all()


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_estimator_and_objective_accepts_an_n_by_1_log_q(estimator, objective):
    vi = _vi(estimator, objective)
    vi.run(DATA, n_epochs=5, max_epochs_without_improvement=100)
    losses = torch.tensor(vi.losses_hist["total"])
    assert losses.shape == (5,) and torch.isfinite(losses).all()
    # the fit moved q's parameters, so gradients reached them every epoch
    q = vi.posterior_estimator
    assert torch.isfinite(q.mu).all() and torch.isfinite(q.sigma).all()
    assert float(q.mu.detach().abs().sum()) > 0


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_mass_check_accepts_an_n_by_1_log_q(estimator):
    vi = _vi(estimator, "reverse_kl_monte_carlo")
    check = vi.mass_check(DATA, n_samples=200)
    assert 0 < check["ess_fraction"] <= 1
    assert check["khat"] == check["khat"]  # not NaN


def test_adapted_log_q_is_one_value_per_draw_and_matches_the_family():
    q = ColumnGaussian()
    family = as_family(q)
    theta, log_q = family.sample(7)
    assert theta.shape == (7, 1) and log_q.shape == (7,)
    torch.testing.assert_close(family.log_prob(theta), q.log_prob(theta)[:, 0])
    torch.testing.assert_close(log_q, family.log_prob(theta))
    stopped = log_prob_stopped(q, theta.detach())
    assert stopped.shape == (7,) and not stopped.requires_grad


def test_monte_carlo_kl_and_psis_accept_an_n_by_1_log_q():
    q = ColumnGaussian()
    kl = kl_divergence(q, PRIOR, "monte_carlo", 4000)
    # KL(N(0, 1) || N(2, 1)) = 2; the Monte Carlo sd of the mean of log q - log p over 4000
    # draws is sd(2 - 2 theta) / sqrt(4000) = 2 / 63 = 0.032: 5 sd is 0.16
    assert abs(float(kl.detach()) - 2.0) < 0.16
    assert compute_regularisation_loss(q, PRIOR, 10).shape == ()

    def log_target(theta):
        return PRIOR.log_prob(theta[:, 0])

    khat = vi_khat(q, log_target, 500)
    assert khat == khat  # a number, not NaN
    check = vi_importance(q, log_target, 500)
    assert 0 < check.ess_fraction <= 1


def test_log_q_of_one_draw_may_be_0_d():
    """n = 1: a 0-d log q is one value for the one draw."""
    family = as_family(ShapedLogProb(lambda t: t.reshape(()) if t.numel() == 1 else t))
    theta, log_q = family.sample(1)
    assert log_q.shape == (1,) and family.log_prob(theta).shape == (1,)


@pytest.mark.parametrize(
    "shape_of,what",
    [
        (lambda t: t.expand(-1, 2), "(n, 2)"),  # two values per draw: which one is log q?
        (lambda t: t.T, "(1, n)"),  # transposed: not the draws on axis 0
        (lambda t: t[:1, 0], "(1,)"),  # one value for n draws
        (lambda t: t[..., None], "(n, 1, 1)"),
    ],
)
def test_a_log_q_that_is_not_one_value_per_draw_is_a_clear_error(shape_of, what):
    with pytest.raises(ValueError, match=r"one value per draw"):
        as_family(ShapedLogProb(shape_of)).sample(5)
    family = as_family(ShapedLogProb(lambda t: t))  # sample fine, log_prob checked alone
    family._obj.shape_of = shape_of
    with pytest.raises(ValueError, match=r"log_prob\(theta\).*one value per draw"):
        family.log_prob(torch.zeros(5, 1))


def test_a_log_q_that_is_not_a_tensor_is_a_type_error():
    with pytest.raises(TypeError, match="log_prob"):
        as_family(ShapedLogProb(lambda t: t.tolist())).log_prob(torch.zeros(3, 1))


@pytest.mark.parametrize("method", ["pathwise", "score"])
def test_the_estimators_called_directly_take_the_users_family(method):
    """``make_estimator(...)(family, ...)`` with the user's object itself (not adapted)."""
    torch.manual_seed(0)
    q = ColumnGaussian()
    estimate = make_estimator(method)(q, BatchedLoss(squared), DATA, 12)
    assert estimate.n_valid == 12 and estimate.n_dropped == 0
    assert torch.isfinite(q.mu.grad).all() and float(q.mu.grad.abs()) > 0


def test_adapting_a_family_leaves_the_callers_random_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert as_family(ColumnGaussian()).dim == 1
    torch.testing.assert_close(torch.rand(3), expected)
