"""Variational families: the protocol, gradients, bijections, adapters and validation."""

import normflows as nf
import pytest
import torch
import zuko
from stats import Z_MAX, z_mean
from torch.distributions import constraints

from gradcal.posterior_estimators import (
    Constrained,
    DiagonalGaussian,
    DistributionFamily,
    Flow,
    FlowMixture,
    FullRankGaussian,
    TrainableGaussian,
    as_family,
)


def _normflows_coupling(dim=2):
    flows = []
    for _ in range(4):
        net = nf.nets.MLP([dim // 2 if dim > 1 else 1, 16, 2 * (dim - dim // 2)], init_zeros=True)
        flows += [nf.flows.AffineCouplingBlock(net), nf.flows.Permute(dim, mode="swap")]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(dim), flows)


FAMILIES = {
    "diagonal": lambda: DiagonalGaussian(torch.tensor([0.5, -1.0, 2.0]), 0.7),
    "full_rank": lambda: FullRankGaussian(
        torch.zeros(3), torch.tensor([[1.0, 0, 0], [0.5, 1, 0], [0.1, -0.3, 2]])
    ),
    "trainable_gaussian": lambda: TrainableGaussian([0.0, 1.0], 0.5),
    "flow_nsf": lambda: Flow(3, "nsf", transforms=2, hidden_features=(16,), loc=1.0, scale=0.5),
    "flow_maf": lambda: Flow(2, "maf", transforms=2, hidden_features=(16, 16)),
    "flow_mixture": lambda: FlowMixture(2, 3, transforms=1, hidden_features=(16,), loc=0.5),
    "constrained": lambda: Constrained(
        DiagonalGaussian(torch.zeros(3)),
        [constraints.positive, constraints.interval(-2.0, 3.0), constraints.real],
    ),
    "constrained_by_prior": lambda: Constrained(
        Flow(2, transforms=1, hidden_features=(8,)),
        torch.distributions.Independent(
            torch.distributions.Uniform(torch.zeros(2), torch.ones(2)), 1
        ),
    ),
    "distribution_factory": lambda: DistributionFamily(
        torch.distributions.Normal, loc=torch.zeros(2), scale=torch.ones(2)
    ),
    "distribution_instance": lambda: as_family(
        torch.distributions.Normal(
            torch.zeros(2, requires_grad=True), torch.ones(2, requires_grad=True)
        )
    ),
    "zuko": lambda: as_family(zuko.flows.NSF(2, transforms=1, hidden_features=(8,))),
    "normflows": lambda: as_family(_normflows_coupling()),
}


def _perturb(family):
    """One optimiser step, so that zero-initialised output layers pass gradients on."""
    optimizer = torch.optim.SGD(family.parameters(), lr=0.05)
    theta, log_q = family.sample(64)
    (theta.sin().mean() + log_q.mean()).backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_log_prob_equals_the_log_q_returned_by_sample(name):
    family = FAMILIES[name]()
    _perturb(family)
    theta, log_q = family.sample(50)
    assert theta.ndim == 2 and log_q.shape == (50,)
    torch.testing.assert_close(family.log_prob(theta), log_q, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradients_reach_every_parameter(name):
    family = FAMILIES[name]()
    _perturb(family)
    params = list(family.parameters())
    assert params
    theta, log_q = family.sample(128)
    (theta.sin().sum() + log_q.sum()).backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0


def test_flow_starts_at_the_given_location_and_scale():
    loc, scale = torch.tensor([3.0, -2.0]), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        theta, _ = Flow(2, loc=loc, scale=scale).sample(20_000)
    for i in range(2):
        assert abs(z_mean(theta[:, i], loc[i].item())) < Z_MAX
        # the sample variance of normal data has standard error var * sqrt(2 / (n - 1))
        se = scale[i] ** 2 * (2 / 19_999) ** 0.5
        assert abs(theta[:, i].var() - scale[i] ** 2) < Z_MAX * se


def test_constrained_log_determinant_matches_the_numerical_jacobian():
    family = Constrained(
        DiagonalGaussian(torch.zeros(3, dtype=torch.float64)),
        [constraints.positive, constraints.interval(-2.0, 3.0), constraints.greater_than(1.0)],
    )
    u = torch.randn(3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(family.transform, u)
    expected = torch.linalg.slogdet(jac).logabsdet
    torch.testing.assert_close(family._log_det(u, family.transform(u)), expected)


def test_constrained_draws_stay_in_the_support_and_density_integrates_to_one():
    family = Constrained(
        DiagonalGaussian(torch.tensor([0.0]), 1.0), constraints.interval(0.0, 1.0)
    )
    theta, _ = family.sample(1000)
    assert ((theta > 0) & (theta < 1)).all()
    grid = torch.linspace(1e-4, 1 - 1e-4, 20_001)[:, None]
    integral = torch.trapezoid(family.log_prob(grid).exp(), grid[:, 0])
    assert integral.item() == pytest.approx(1.0, abs=1e-3)


def test_trainable_gaussian_keeps_blackbirds_constructor():
    q = TrainableGaussian(mu=[1.0, 2.0], sigma=0.3, device="cpu")
    # BlackBIRDS' code: sigma * I is the initial covariance, so the sd is sqrt(0.3)
    torch.testing.assert_close(q.distribution().covariance_matrix, 0.3 * torch.eye(2))
    torch.testing.assert_close(q.mu.detach(), torch.tensor([1.0, 2.0]))


def test_beta_family_by_factory_and_a_clear_error_for_a_built_instance():
    family = DistributionFamily(
        torch.distributions.Beta,
        concentration1=torch.tensor(2.0),
        concentration0=torch.tensor(3.0),
    )
    theta, log_q = family.sample(10)
    assert theta.shape == (10, 1) and ((theta > 0) & (theta < 1)).all()
    torch.testing.assert_close(family.log_prob(theta), log_q)
    a = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(ValueError, match="DistributionFamily"):
        as_family(torch.distributions.Beta(a, torch.tensor(3.0)))


def test_user_object_with_only_sample_is_adapted_and_checked():
    class OnlySample(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = torch.nn.Parameter(torch.zeros(2))

        def sample(self, n):
            eps = torch.randn(n, 2)
            return self.loc + eps, -0.5 * (eps**2).sum(-1)

    family = as_family(OnlySample())
    assert family.dim == 2 and len(list(family.parameters())) == 1
    with pytest.raises(NotImplementedError, match="log_prob"):
        family.log_prob(torch.zeros(1, 2))

    class Broken:
        def sample(self, n):
            return torch.zeros(n, 2), torch.zeros(n + 1)

    with pytest.raises(ValueError, match=r"log_q \(3,\)"):
        as_family(Broken()).sample(3)
    with pytest.raises(TypeError, match="variational family"):
        as_family(object())


def test_wrong_dimensions_are_rejected():
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        DiagonalGaussian(torch.zeros(3)).log_prob(torch.zeros(5, 2))
    with pytest.raises(ValueError, match="`n`"):
        DiagonalGaussian(torch.zeros(3)).sample(0)
    with pytest.raises(ValueError, match=r"`loc` must have shape \(D,\)"):
        DiagonalGaussian(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"`scale` must be a number or have shape \(3,\)"):
        DiagonalGaussian(torch.zeros(3), torch.ones(2))
    with pytest.raises(ValueError, match="`kind`"):
        Flow(2, kind="glow")
    with pytest.raises(ValueError, match="3 constraints"):
        Constrained(DiagonalGaussian(torch.zeros(3)), [constraints.positive])


@pytest.mark.parametrize("kind", ["nsf", "maf"])
@pytest.mark.parametrize("dim", [1, 3])
def test_flow_density_is_exactly_the_affine_gaussian_at_start(kind, dim):
    loc, scale = torch.linspace(-1, 1, dim), torch.linspace(0.5, 2, dim)
    q = Flow(dim, kind, loc=loc, scale=scale)
    theta = torch.randn(50, dim) * 3
    expected = torch.distributions.Normal(loc, scale).log_prob(theta).sum(-1)
    torch.testing.assert_close(q.log_prob(theta), expected, rtol=1e-5, atol=1e-5)


def test_constrained_distribution_and_device_moves():
    prior = torch.distributions.Independent(
        torch.distributions.Uniform(torch.tensor([0.0, -1.0]), torch.tensor([1.0, 0.0])), 1
    )
    for support in ([constraints.positive, constraints.interval(-1.0, 0.0)], prior):
        q = Constrained(DiagonalGaussian(torch.zeros(2)), support)
        theta, log_q = q.sample(20)
        torch.testing.assert_close(q.distribution().log_prob(theta), log_q)
        q = q.double()
        theta, log_q = q.sample(5)
        assert theta.dtype == log_q.dtype == torch.float64
        assert q.to("meta").sample(3)[0].device.type == "meta"


def test_float64_locations_are_kept():
    q = DiagonalGaussian(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert q.loc.dtype == torch.float64


def test_a_full_rank_scale_must_be_lower_triangular():
    with pytest.raises(ValueError, match="lower triangular"):
        FullRankGaussian(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))


def test_gaussian_mixture_gradients_are_unbiased_weights_included():
    """The implicit (distributional-transform) gradients of E_q[f] match the closed-form
    gradient of E_q[f] = sum_c pi_c E_c[f] for f with first, second and cross moments, for
    every parameter (means, scales, the weights' logits): z-test of 200 estimates of 500
    draws, |z| < critical_z(1e-3, 15) = 4.1 (Bonferroni over 15 parameters)."""
    from stats import critical_z

    from gradcal.posterior_estimators import GaussianMixture

    q = GaussianMixture(
        torch.tensor([[-1.0, 0.5], [2.0, -1.0], [0.3, 0.3]]),
        torch.tensor([[0.5, 1.0], [0.8, 0.3], [1.2, 0.7]]),
        weights=[0.2, 0.5, 0.3],
    )

    def grads():
        return torch.cat([p.grad.flatten().clone() for p in q.parameters()])

    w, m, s = q.weights[:, None], q.loc, q.scale
    exact = (w * (m + m**2 + s**2)).sum() + 2 * (q.weights * m[:, 0] * m[:, 1]).sum()
    q.zero_grad()
    exact.backward()
    expected = grads()
    torch.manual_seed(0)
    estimates = []
    for _ in range(200):
        q.zero_grad()
        theta, _ = q.sample(500)
        ((theta + theta**2).sum(-1) + 2 * theta[:, 0] * theta[:, 1]).mean().backward()
        estimates.append(grads())
    estimates = torch.stack(estimates)
    z = (estimates.mean(0) - expected) / (estimates.std(0) / 200**0.5)
    assert z.abs().max() < critical_z(1e-3, 15), z


def test_gaussian_mixture_density_and_checks():
    from gradcal.posterior_estimators import GaussianMixture

    q = GaussianMixture.spread(2, 3, scale=2.0)
    theta, log_q = q.sample(7)
    torch.testing.assert_close(log_q, q.log_prob(theta.detach()))
    with pytest.raises(ValueError, match="`loc` must have shape"):
        GaussianMixture(torch.zeros(3))
    with pytest.raises(ValueError, match="`weights` must be 2 positive"):
        GaussianMixture(torch.zeros(2, 1), weights=[1.0, 0.0])


def test_flow_mixture_pathwise_gradients_are_unbiased_weights_included():
    """Through a bent shared transform (two SGD steps away from the identity), the pathwise
    gradient of E_q[f] (draws reparameterised, weights by the distributional transform)
    and the score-function gradient E_q[(f - b) grad log q] (log q by inverting the flow;
    b a constant from other draws) have the same mean for every parameter of the mixture
    (means, scales, logits): z-test of 200 estimates of 100 draws each (standard error from
    both samples' variances), |z| < critical_z(1e-3, 15) = 4.1 (Bonferroni over the 15
    parameters), in float64."""
    from stats import critical_z

    torch.manual_seed(0)
    q = FlowMixture(2, 3, transforms=1, hidden_features=(16,), spread=1.5).double()
    with torch.no_grad():
        q.mixture.logits.copy_(torch.tensor([0.3, -0.4, 0.1]))
    for _ in range(2):
        _perturb(q)
    params = list(q.mixture.parameters())

    def f(theta):
        return theta[:, 0].sin() + theta[:, 1] ** 2 + theta[:, 0] * theta[:, 1]

    def gradient(value):
        return torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])

    with torch.no_grad():
        baseline = f(q.sample(2000)[0]).mean()
    m, path, score = 200, [], []
    for _ in range(m):  # m estimates of 100 draws each, by either estimator
        path.append(gradient(f(q.sample(100)[0]).mean()))
        with torch.no_grad():
            fixed = q.sample(100)[0]
        score.append(gradient(((f(fixed) - baseline) * q.log_prob(fixed)).mean()))
    path, score = torch.stack(path), torch.stack(score)
    z = (path.mean(0) - score.mean(0)) / (path.var(0) / m + score.var(0) / m).sqrt()
    assert path.shape[1] == 15 and z.abs().max() < critical_z(1e-3, 15), z
    assert (path[:, -3:].abs() > 0).all()  # the logits get a pathwise gradient


def test_flow_mixture_checks():
    with pytest.raises(ValueError, match="`kind` must be one of"):
        FlowMixture(2, kind="real_nvp")
    with pytest.raises(ValueError, match="`spread` must be a number > 0"):
        FlowMixture(2, spread=0.0)
    with pytest.raises(ValueError, match="`theta` must have shape"):
        FlowMixture(2, transforms=1, hidden_features=(4,)).log_prob(torch.zeros(3, 1))
