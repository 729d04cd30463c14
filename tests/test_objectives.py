"""VI objectives (gradcal.infer.objectives): values, gradients, estimators, NaN handling."""

import math
import warnings

import pytest
import torch
from edge_family import EdgeFamily, edge_noise
from infer_helpers import gaussian_nll, normal_prior
from stats import Z_MAX

from gradcal.gradients import BatchedLoss, PathwiseForward, Score
from gradcal.infer.objectives import (
    ForwardKL,
    ImportanceWeighted,
    Renyi,
    ReverseKL,
    importance_ess,
    make_objective,
)
from gradcal.infer.vi import VI
from gradcal.posterior_estimators import DiagonalGaussian
from gradcal.regularisation import kl_estimate

Y = torch.randn(20, generator=torch.Generator().manual_seed(5)) + 2.0
PRIOR = normal_prior(0.0, 10.0)
LOSS = gaussian_nll(1.0)  # conjugate: the posterior is N(sum y / 20.01, 1 / 20.01)
POST_MEAN, POST_SD = float(Y.sum() / 20.01), 20.01**-0.5


def _grads(q):
    return torch.cat([p.grad.flatten().clone() for p in q.parameters()])


def _bound_by_hand(q, objective, n, seed):
    """-(bound) and its gradient written out with plain autograd on the same draws."""
    torch.manual_seed(seed)
    q.zero_grad()
    theta, log_q = q.sample(n)
    log_w = -LOSS(theta, Y) + PRIOR.log_prob(theta) - log_q
    c = 1.0 - getattr(objective, "alpha", 0.0)
    k = objective.group_size
    groups = (c * log_w).reshape(-1, k)
    bound = ((torch.logsumexp(groups, -1) - math.log(k)) / c).mean()
    (-bound).backward()
    return -float(bound.detach()), _grads(q)


@pytest.mark.parametrize(
    "objective",
    [
        ImportanceWeighted(k=4, doubly_reparameterised=False),
        ImportanceWeighted(k=1, doubly_reparameterised=False),
        Renyi(alpha=0.3, k=4, doubly_reparameterised=False),
    ],
    ids=repr,
)
def test_bound_value_and_gradient_match_autograd(objective):
    q = DiagonalGaussian(torch.tensor([1.5]), 0.6)
    torch.manual_seed(3)
    q.zero_grad()
    estimate = objective(q, BatchedLoss(LOSS), Y, 16, PRIOR, 1.0)
    got = _grads(q)
    value, expected = _bound_by_hand(q, objective, 16, 3)
    assert estimate.total == pytest.approx(value, rel=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert estimate.n_valid == 16 and estimate.n_dropped == 0
    assert 1.0 <= estimate.ess <= 16.0


def test_w_scales_the_target_and_the_value():
    """With w = 2 the target is exp(-l / 2) prior and the value is in the loss's units."""
    objective = ImportanceWeighted(k=1, doubly_reparameterised=False)
    q = DiagonalGaussian(torch.tensor([1.5]), 0.6)
    torch.manual_seed(0)
    q.zero_grad()
    estimate = objective(q, BatchedLoss(LOSS), Y, 8, PRIOR, 2.0)
    got = _grads(q)
    torch.manual_seed(0)
    q.zero_grad()
    theta, log_q = q.sample(8)
    expected = (LOSS(theta, Y) + 2.0 * (log_q - PRIOR.log_prob(theta))).mean()
    expected.backward()  # K = 1: reverse KL's E_q[l] + w KL, on the same draws
    assert estimate.total == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.testing.assert_close(got, _grads(q), rtol=1e-4, atol=1e-5)


def test_forward_mode_gives_the_reverse_mode_gradient():
    q = DiagonalGaussian(torch.tensor([1.5]), 0.6)
    grads = []
    for estimator in (None, PathwiseForward()):
        torch.manual_seed(4)
        q.zero_grad()
        Renyi(0.5, k=4)(q, BatchedLoss(LOSS), Y, 16, PRIOR, 1.0, estimator)
        grads.append(_grads(q))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_forward_kl_is_self_normalised_importance_sampling():
    q = DiagonalGaussian(torch.tensor([1.5]), 0.6)
    torch.manual_seed(2)
    q.zero_grad()
    estimate = ForwardKL()(q, BatchedLoss(LOSS), Y, 32, PRIOR, 1.0)
    got = _grads(q)
    torch.manual_seed(2)
    q.zero_grad()
    with torch.no_grad():
        theta, _ = q.sample(32)
    log_q = q.log_prob(theta)
    log_w = -LOSS(theta, Y) + PRIOR.log_prob(theta) - log_q.detach()
    weights = torch.softmax(log_w, 0)
    (-(weights * log_q).sum()).backward()
    torch.testing.assert_close(got, _grads(q), rtol=1e-4, atol=1e-6)
    kl = float((weights * (weights * 32).log()).sum())  # KL(w_hat || uniform) >= 0
    assert estimate.total == pytest.approx(kl, rel=1e-4)
    assert estimate.ess == pytest.approx(float(1 / (weights**2).sum()), rel=1e-4)


def test_failed_draws_are_dropped_and_counted():
    """A NaN loss drops its draw: the group's mean runs over its kept draws only."""

    def loss(theta, y):
        out = LOSS(theta, y)
        return torch.where(theta[:, 0] > 1.5, torch.nan, out)

    loss.batched = True
    objective = ImportanceWeighted(k=4, doubly_reparameterised=False)
    q = DiagonalGaussian(torch.tensor([1.5]), 0.6)
    torch.manual_seed(6)
    q.zero_grad()
    estimate = objective(q, BatchedLoss(loss), Y, 16, PRIOR, 1.0)
    got = _grads(q)
    torch.manual_seed(6)
    q.zero_grad()
    theta, log_q = q.sample(16)
    keep = theta[:, 0] <= 1.5
    log_w = (-LOSS(theta, Y) + PRIOR.log_prob(theta) - log_q).reshape(4, 4)
    keep = keep.reshape(4, 4)
    terms = [
        torch.logsumexp(row[k], 0) - math.log(int(k.sum()))
        for row, k in zip(log_w, keep, strict=True)
        if k.any()
    ]
    value = -torch.stack(terms).sum() / len(terms)
    value.backward()
    assert estimate.total == pytest.approx(float(value.detach()), rel=1e-5)
    assert estimate.n_dropped == int((~keep).sum()) > 0
    assert estimate.n_valid == int(keep.sum())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _grads(q), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "objective",
    [
        ImportanceWeighted(k=4, doubly_reparameterised=False),
        Renyi(alpha=0.5, k=4, doubly_reparameterised=False),
        ImportanceWeighted(k=4),
        Renyi(alpha=0.5, k=4),
    ],
    ids=repr,
)
def test_a_draw_with_infinite_log_q_leaves_the_bound_gradient_finite(objective):
    """EdgeFamily's first draw lies on the edge of its support: log q = -inf there, with an
    infinite derivative. It is dropped, and the gradient is finite and the one of the bound
    over the 7 kept draws alone (its group's mean runs over its 3 kept draws), as if the
    dropped draw had never been made (DReG: log q at fixed parameters, weights
    w_hat (alpha + (1 - alpha) w_hat) over the kept draws)."""
    u = edge_noise(8)
    q = EdgeFamily(u)
    estimate = objective(q, BatchedLoss(LOSS), Y, 8, PRIOR, 1.0)
    got = q.grads()
    assert estimate.n_dropped == 1 and estimate.n_valid == 7
    assert torch.isfinite(got).all(), got
    c = 1.0 - getattr(objective, "alpha", 0.0)
    keep = (torch.arange(8) > 0).reshape(2, 4)
    theta = q.draw(u).reshape(2, 4)
    terms = []
    for row, kept in zip(theta, keep, strict=True):
        draws = row[kept][:, None]
        if objective.stopped_log_q:
            log_q = EdgeFamily.density(draws, q.loc.detach(), q.scale.detach())
        else:
            log_q = q.log_prob(draws)
        log_w = -LOSS(draws, Y) + PRIOR.log_prob(draws) - log_q
        if objective.stopped_log_q:
            weights = torch.softmax(c * log_w.detach(), 0)
            terms.append((weights * ((1 - c) + c * weights) * log_w).sum())
        else:
            terms.append((torch.logsumexp(c * log_w, 0) - math.log(len(draws))) / c)
    (-torch.stack(terms).sum() / 2).backward()
    torch.testing.assert_close(got, q.grads(), rtol=1e-4, atol=1e-5)


def test_forward_kl_with_a_draw_of_infinite_log_q_has_a_finite_gradient():
    """Forward KL with EdgeFamily's edge draw (log q = -inf, infinite derivative): dropped,
    and the gradient -sum_i w_hat_i grad log q(theta_i) over the 7 kept draws alone."""
    u = edge_noise(8)
    q = EdgeFamily(u)
    estimate = ForwardKL()(q, BatchedLoss(LOSS), Y, 8, PRIOR, 1.0)
    got = q.grads()
    assert estimate.n_dropped == 1 and estimate.n_valid == 7
    assert torch.isfinite(got).all(), got
    theta = q.draw(u[1:]).detach()
    log_q = q.log_prob(theta)
    log_w = -LOSS(theta, Y) + PRIOR.log_prob(theta) - log_q.detach()
    (-(torch.softmax(log_w, 0) * log_q).sum()).backward()
    torch.testing.assert_close(got, q.grads(), rtol=1e-4, atol=1e-6)


def test_bad_choices_are_refused():
    q = DiagonalGaussian(torch.zeros(1))
    with pytest.raises(ValueError, match="needs `w` > 0"):
        VI(LOSS, PRIOR, q, objective="forward_kl", w=0.0)
    with pytest.raises(ValueError, match="`objective` must be one of"):
        VI(LOSS, PRIOR, q, objective="kl")
    with pytest.raises(ValueError, match="`alpha` must be a number in"):
        Renyi(alpha=1.0)
    with pytest.raises(ValueError, match="`k` must be an int"):
        ImportanceWeighted(k=0)
    with pytest.raises(ValueError, match="objective 'renyi': "):
        make_objective("renyi", beta=2)
    with pytest.raises(ValueError, match="must be a multiple of k"):
        ImportanceWeighted(k=3)(q, BatchedLoss(LOSS), Y, 10, PRIOR, 1.0)
    # every objective takes the score estimator
    for objective in ("forward_kl", ReverseKL(), "renyi", "importance_weighted"):
        VI(LOSS, PRIOR, q, objective=objective, gradient_estimation_method="score")


def test_effective_sample_size():
    assert importance_ess(torch.tensor([0.0, 0.0, -math.inf])) == pytest.approx(2.0)
    assert importance_ess(torch.log(torch.tensor([1.0, 3.0]))) == pytest.approx(1.6)


@pytest.mark.parametrize("objective", [Renyi(0.5, k=4), ForwardKL()], ids=repr)
def test_vi_recovers_a_conjugate_posterior(objective):
    """The family holds the posterior: every objective's optimum is the posterior itself.

    From N(1, 0.5^2), 200 epochs of 32 draws at lr 0.05 leave an optimiser noise of a few
    hundredths in the mean and sd of the last q (measured: within 0.02); 0.06 / 0.05 are
    about 3 times that.
    """
    q = DiagonalGaussian(torch.ones(1), 0.5)
    vi = VI(
        LOSS,
        PRIOR,
        q,
        n_samples_per_epoch=32,
        optimizer=torch.optim.Adam(q.parameters(), lr=0.05),
        progress_bar=False,
        seed=0,
        objective=objective,
        kl="monte_carlo",
        n_samples_regularisation=64,
    )
    vi.run(Y, n_epochs=200, max_epochs_without_improvement=200)
    print(q.loc.item() - POST_MEAN, q.scale.item() - POST_SD)
    assert abs(q.loc.item() - POST_MEAN) < 0.06
    assert abs(q.scale.item() - POST_SD) < 0.05
    if objective.uses_kl_term:
        assert "ess" not in vi.losses_hist
    else:
        assert len(vi.losses_hist["ess"]) == 200
        assert vi.losses_hist["ess"][-1] > 16  # q ~ target: most of 32 draws count


# --- variance-reduced estimators: unbiased, and the variance they save ----------------


def _per_group_gradients(objective, n_groups, seed):
    """Gradients (n_groups, 2) in (loc, scale) of one group's bound each, for a 1-D Gaussian
    q = N(2, 0.5^2) on the conjugate target, computed in float64 with one parameter copy per
    group (so one backward pass gives every group's own gradient). The log weights and the
    stopped log q are formed as the objective forms them."""
    gen = torch.Generator().manual_seed(seed)
    k = objective.group_size
    loc = torch.full((n_groups, 1), 2.0, dtype=torch.float64, requires_grad=True)
    scale = torch.full((n_groups, 1), 0.5, dtype=torch.float64, requires_grad=True)
    theta = loc + scale * torch.randn(n_groups, k, generator=gen, dtype=torch.float64)
    loss = -torch.distributions.Normal(theta[..., None], 1.0).log_prob(Y.double()).sum(-1)
    stopped = objective.stopped_log_q
    q = torch.distributions.Normal(
        loc.detach() if stopped else loc, scale.detach() if stopped else scale
    )
    log_w = -loss + torch.distributions.Normal(0.0, 10.0).log_prob(theta) - q.log_prob(theta)
    surrogate, _ = objective.surrogate(log_w, torch.ones_like(log_w, dtype=torch.bool))
    surrogate.backward()
    return torch.cat([loc.grad, scale.grad], 1)


@pytest.mark.parametrize(
    "kind",
    [ImportanceWeighted, lambda **kw: Renyi(alpha=0.5, **kw)],
    ids=["importance_weighted", "renyi"],
)
def test_dreg_is_unbiased_and_lowers_the_variance(kind):
    """DReG and the plain reparameterised gradient have the same mean (z-test of 40 000
    groups each, |z| < Z_MAX = 4.5); DReG's variance is lower. Measured at 200 000 groups:
    variance ratios 29 and 35 (importance-weighted, K = 8) and 4.8 and 4.9 (Renyi,
    alpha = 0.5); the bound 2 is far below both, and a variance ratio from 40 000 draws has
    a relative error of about 1 % for a Gaussian, several % for these heavier tails."""
    n = 40_000
    plain = _per_group_gradients(kind(k=8, doubly_reparameterised=False), n, 0)
    dreg = _per_group_gradients(kind(k=8, doubly_reparameterised=True), n, 1)
    z = (plain.mean(0) - dreg.mean(0)) / (plain.var(0) / n + dreg.var(0) / n).sqrt()
    assert z.abs().max() < Z_MAX, z
    assert (plain.var(0) / dreg.var(0) > 2.0).all()


def test_dreg_inside_the_objective_matches_its_formula():
    """The objective's own DReG gradient on its own draws: weights w_hat^2 for the
    importance-weighted bound, log q at fixed parameters."""
    q = DiagonalGaussian(torch.tensor([1.5]), 0.6)
    objective = ImportanceWeighted(k=4)
    torch.manual_seed(8)
    q.zero_grad()
    objective(q, BatchedLoss(LOSS), Y, 8, PRIOR, 1.0)
    got = _grads(q)
    torch.manual_seed(8)
    q.zero_grad()
    theta, _ = q.sample(8)
    fixed = torch.distributions.Normal(q.loc.detach(), q.scale.detach())
    log_w = (-LOSS(theta, Y) + PRIOR.log_prob(theta) - fixed.log_prob(theta).sum(-1)).reshape(2, 4)
    weights = torch.softmax(log_w.detach(), -1)
    (-(weights**2 * log_w).sum() / 2).backward()
    torch.testing.assert_close(got, _grads(q), rtol=1e-4, atol=1e-6)


class _PlainFamily:
    """A family that is no torch module: q = N(loc, scale^2) over one parameter, its two
    tensors held as plain attributes (nothing can swap them for detached copies)."""

    def __init__(self, loc=2.0, scale=0.5):
        self.loc = torch.tensor([loc], requires_grad=True)
        self.scale = torch.tensor([scale], requires_grad=True)

    def parameters(self):
        return [self.loc, self.scale]

    def _q(self):
        return torch.distributions.Normal(self.loc, self.scale)

    def sample(self, n):
        theta = self._q().rsample((n,))
        return theta, self._q().log_prob(theta).sum(-1)

    def log_prob(self, theta):
        return self._q().log_prob(theta).sum(-1)


def _instance_family(loc=2.0, scale=0.5):
    """A DistributionFamily built from a torch.distributions instance: its tensors are
    leaves with requires_grad, not module parameters."""
    from gradcal.posterior_estimators import DistributionFamily

    loc = torch.tensor([loc], requires_grad=True)
    scale = torch.tensor([scale], requires_grad=True)
    return DistributionFamily(torch.distributions.Normal(loc, scale))


def _objective_gradients(family, objective, repeats, groups, seed):
    """(repeats, 2) gradients in (loc, scale): one objective call of ``groups`` groups each."""
    torch.manual_seed(seed)
    params = list(family.parameters())
    out = []
    for _ in range(repeats):
        for p in params:
            p.grad = None
        objective(family, BatchedLoss(LOSS), Y, groups * objective.group_size, PRIOR, 1.0)
        out.append(torch.cat([p.grad.flatten() for p in params]))
    return torch.stack(out).double()


@pytest.mark.filterwarnings("ignore:.*cannot hold its parameters fixed")
@pytest.mark.parametrize(
    "make_family", [_instance_family, _PlainFamily], ids=["instance", "plain"]
)
@pytest.mark.parametrize(
    "kind",
    [ImportanceWeighted, lambda **kw: Renyi(alpha=0.5, **kw)],
    ids=["importance_weighted", "renyi"],
)
def test_dreg_is_unbiased_with_a_family_whose_tensors_are_not_module_parameters(kind, make_family):
    """A family whose tensors log_prob_stopped cannot swap as module parameters (a
    DistributionFamily from an instance, an object that is no module): the default (DReG)
    gradient has the mean of the plain reparameterised one. z-test of the mean gradient of
    50 objective calls of 100 groups of K = 8 each against 50 plain ones (another seed),
    the standard error from the spread of each side's 50 call gradients: |z| < Z_MAX = 4.5.
    Before the fix the score term came back weighted by theta-dependent DReG weights:
    measured |z| of 13 to 63 at 100 calls of 250 groups (mean gradients (0.057, -0.124)
    against the plain (-0.087, 0.222) for the importance-weighted bound)."""
    repeats, groups = 50, 100
    plain = _objective_gradients(
        make_family(), kind(k=8, doubly_reparameterised=False), repeats, groups, 0
    )
    dreg = _objective_gradients(make_family(), kind(k=8), repeats, groups, 1)
    z = (plain.mean(0) - dreg.mean(0)) / (plain.var(0) / repeats + dreg.var(0) / repeats).sqrt()
    assert z.abs().max() < Z_MAX, z


def test_dreg_holds_an_instance_familys_tensors_fixed():
    """A DistributionFamily from an instance gets DReG itself, not a fallback: on the same
    draws its gradient is the one of the same family built from a factory (whose tensors
    are module parameters), and differs from the plain reparameterised gradient."""
    from gradcal.posterior_estimators import DistributionFamily

    factory = DistributionFamily(
        torch.distributions.Normal, loc=torch.tensor([2.0]), scale=torch.tensor([0.5])
    )
    instance = _instance_family()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning for a family that can be held
        got = _objective_gradients(instance, ImportanceWeighted(k=8), 1, 4, 3)
    expected = _objective_gradients(factory, ImportanceWeighted(k=8), 1, 4, 3)
    plain = _objective_gradients(
        _instance_family(), ImportanceWeighted(k=8, doubly_reparameterised=False), 1, 4, 3
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert (got - plain).abs().max() > 1e-3


def test_dreg_falls_back_to_the_plain_gradient_in_words_for_a_family_it_cannot_hold():
    """An object that is no module: the DReG objective warns that it uses the plain
    reparameterised gradient, and on the same draws gives exactly that gradient."""
    with pytest.warns(UserWarning, match="cannot hold its parameters fixed.*plain"):
        got = _objective_gradients(_PlainFamily(), Renyi(0.5, k=8), 1, 4, 3)
    plain = _objective_gradients(
        _PlainFamily(), Renyi(0.5, k=8, doubly_reparameterised=False), 1, 4, 3
    )
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-8)


def _per_group_score_gradients(objective, n_groups, seed, leave_one_out=True):
    """As :func:`_per_group_gradients`, for the score estimator: the draws held fixed, log q
    with its graph, the objective's own score surrogate; a group with one draw (K = 1) takes
    the mean of the other groups' bounds as its baseline, as the objective does."""
    gen = torch.Generator().manual_seed(seed)
    k = objective.group_size
    loc = torch.full((n_groups, 1), 2.0, dtype=torch.float64, requires_grad=True)
    scale = torch.full((n_groups, 1), 0.5, dtype=torch.float64, requires_grad=True)
    theta = (loc + scale * torch.randn(n_groups, k, generator=gen, dtype=torch.float64)).detach()
    loss = -torch.distributions.Normal(theta[..., None], 1.0).log_prob(Y.double()).sum(-1)
    log_q = torch.distributions.Normal(loc, scale).log_prob(theta)
    log_w = -loss + torch.distributions.Normal(0.0, 10.0).log_prob(theta) - log_q
    valid = torch.ones_like(log_w, dtype=torch.bool)
    values = objective.term_values(log_w.detach(), valid)
    baseline = (values.sum() - values) / (n_groups - 1)
    objective.score_surrogate(log_w, log_q, valid, baseline, leave_one_out).backward()
    return torch.cat([loc.grad, scale.grad], 1)


@pytest.mark.parametrize(
    "objective",
    [
        ImportanceWeighted(k=8),
        Renyi(alpha=0.5, k=8),
        ImportanceWeighted(k=1),  # one draw per group: the other groups' mean as baseline
    ],
    ids=repr,
)
def test_score_gradient_is_unbiased_for_its_bound(objective):
    """The score-function gradient with VIMCO's leave-one-out control variates has the
    mean of the pathwise (DReG) gradient of the same bound: z-test of 20 000 groups each,
    |z| < Z_MAX = 4.5 (the standard error from both samples' variances). Measured at
    40 000 score groups against 200 000 plain reparameterised ones: |z| < 1.5; the control
    variates cut the score gradient's variance about 3e5-fold for K = 8 (it is then below
    the plain reparameterised gradient's) and 35-fold for K = 1."""
    n = 20_000
    reference = _per_group_gradients(objective, n, 0)
    score = _per_group_score_gradients(objective, n, 1)
    z = (reference.mean(0) - score.mean(0)) / (reference.var(0) / n + score.var(0) / n).sqrt()
    assert z.abs().max() < Z_MAX, z
    plain = _per_group_score_gradients(objective, n, 1, leave_one_out=False)
    assert (plain.var(0) / score.var(0) > 10.0).all()


def _vimco_by_hand(log_w, c):
    """VIMCO's learning signals f - f_{-k} (T, K), written with a loop over k."""
    k = log_w.shape[1]
    f = (torch.logsumexp(c * log_w, -1) - math.log(k)) / c
    signals = []
    for j in range(k):
        others = torch.cat([log_w[:, :j], log_w[:, j + 1 :]], 1)
        swapped = torch.cat([log_w[:, :j], others.mean(1, keepdim=True), log_w[:, j + 1 :]], 1)
        signals.append(f - (torch.logsumexp(c * swapped, -1) - math.log(k)) / c)
    return torch.stack(signals, 1), f


@pytest.mark.parametrize("objective", [ImportanceWeighted(k=4), Renyi(0.3, k=4)], ids=repr)
def test_score_estimator_in_the_objective_matches_vimco_by_hand(objective):
    """Inside the objective, on its own draws: gradient of
    sum_k (f - f_{-k}) log q(theta_k) + f, f the bound at fixed draws, per group."""
    q = DiagonalGaussian(torch.tensor([1.5]), 0.6)
    torch.manual_seed(9)
    q.zero_grad()
    estimate = objective(q, BatchedLoss(LOSS), Y, 16, PRIOR, 1.0, Score())
    got = _grads(q)
    torch.manual_seed(9)
    q.zero_grad()
    with torch.no_grad():
        theta, _ = q.sample(16)
    log_q = q.log_prob(theta)
    log_w = (-LOSS(theta, Y) + PRIOR.log_prob(theta) - log_q).reshape(4, 4)
    c = 1.0 - getattr(objective, "alpha", 0.0)
    signals, f = _vimco_by_hand(log_w.detach(), c)
    bound = (torch.logsumexp(c * log_w, -1) - math.log(4)) / c
    (-((signals * log_q.reshape(4, 4)).sum() + bound.sum()) / 4).backward()
    torch.testing.assert_close(got, _grads(q), rtol=1e-4, atol=1e-5)
    assert estimate.total == pytest.approx(-float(f.mean()), rel=1e-5)


def test_score_estimator_drops_failed_draws():
    def loss(theta, y):
        return torch.where(theta[:, 0] > 1.5, torch.nan, LOSS(theta, y))

    loss.batched = True
    q = DiagonalGaussian(torch.tensor([1.5]), 0.6)
    torch.manual_seed(6)
    q.zero_grad()
    estimate = Renyi(0.5, k=4)(q, BatchedLoss(loss), Y, 16, PRIOR, 1.0, Score())
    assert estimate.n_dropped > 0 and estimate.n_valid + estimate.n_dropped == 16
    assert torch.isfinite(_grads(q)).all() and _grads(q).abs().sum() > 0
    assert math.isfinite(estimate.total) and 1.0 <= estimate.ess <= estimate.n_valid


@pytest.mark.parametrize(
    "objective", [ImportanceWeighted(k=4), Renyi(0.5, k=4), ForwardKL()], ids=repr
)
def test_vi_with_the_score_estimator_recovers_a_conjugate_posterior(objective):
    """Score estimator, no simulator gradient: from N(1, 1), 400 epochs of 32 draws at
    lr 0.02 reach the posterior N(2.03, 0.22^2). Measured over seeds 1 to 8: the last q's
    mean within 0.065 (sd at most 0.032 per objective) and sd within 0.048 (sd at most
    0.014); the bounds 0.12 and 0.06 are about 4 of those sds, far below the start's
    errors (1.03 and 0.78)."""
    q = DiagonalGaussian(torch.ones(1), 1.0)
    vi = VI(
        LOSS,
        PRIOR,
        q,
        n_samples_per_epoch=32,
        optimizer=torch.optim.Adam(q.parameters(), lr=0.02),
        progress_bar=False,
        seed=0,
        objective=objective,
        gradient_estimation_method="score",
    )
    vi.run(Y, n_epochs=400, max_epochs_without_improvement=400)
    assert abs(q.loc.item() - POST_MEAN) < 0.12
    assert abs(q.scale.item() - POST_SD) < 0.06


def test_sticking_the_landing_is_unbiased_and_vanishes_at_the_optimum():
    """The STL Monte Carlo KL gradient has the closed-form KL gradient as its mean (z-test
    over 400 estimates of 200 draws, |z| < Z_MAX); at q = prior its variance is exactly 0
    while the plain estimator's is not (the score term is all noise there)."""
    prior = normal_prior(0.0, 1.0)
    q = DiagonalGaussian(torch.tensor([0.7]), 0.4)
    q.zero_grad()
    kl_estimate(q, prior, "analytic")[0].backward()
    exact = _grads(q)
    torch.manual_seed(0)
    grads = []
    for _ in range(400):
        q.zero_grad()
        kl_estimate(q, prior, "monte_carlo", 200, sticking_the_landing=True)[0].backward()
        grads.append(_grads(q))
    grads = torch.stack(grads)
    z = (grads.mean(0) - exact) / (grads.std(0) / 400**0.5)
    assert z.abs().max() < Z_MAX, z
    at_prior = DiagonalGaussian(torch.zeros(1), 1.0)
    spreads = []
    for stl in (True, False):
        draws = []
        for _ in range(20):
            at_prior.zero_grad()
            kl_estimate(at_prior, prior, "monte_carlo", 50, sticking_the_landing=stl)[0].backward()
            draws.append(_grads(at_prior))
        spreads.append(torch.stack(draws).std(0))
    assert spreads[0].max() < 1e-6 < spreads[1].min()


# --- the TOML configuration ----------------------------------------------------------


def _vi_config(tmp_path, **method):
    (tmp_path / "obs.csv").write_text("x\n" + "\n".join(["1.0"] * 5) + "\n")
    return {
        "run": {"seed": 0},
        "model": {"name": "Normal", "options": {"n_timesteps": 5}},
        "data": {"file": "obs.csv", "columns": ["x"]},
        "loss": {"kind": "mmd"},
        "method": {"kind": "vi", **method},
        "parameters": [
            {"name": "mu", "prior": {"kind": "normal", "loc": 0.0, "scale": 2.0}},
            {"name": "sigma", "prior": {"kind": "lognormal", "loc": 0.0, "scale": 0.5}},
        ],
    }


def test_config_objective_problems_are_one_line_each(tmp_path):
    from gradcal.config import check

    assert (
        check(
            _vi_config(tmp_path, objective="renyi", alpha=0.2, k=5, samples_per_epoch=20), tmp_path
        )
        == []
    )
    problems = check(
        _vi_config(tmp_path, objective="renyi", alpha=1.5, estimator="score", k=8), tmp_path
    )
    assert any(p.startswith("method.alpha: must lie in (0, 1)") for p in problems), problems
    assert not any(p.startswith("method.estimator") for p in problems)  # score is fine
    assert any(p.startswith("method.samples_per_epoch: must be a multiple") for p in problems)
    problems = check(_vi_config(tmp_path, objective="forward"), tmp_path)
    assert problems == [
        "method.objective: 'forward' is not one of reverse_kl, importance_weighted, renyi, "
        "forward_kl (did you mean 'forward_kl'?)"
    ]


def test_config_builds_a_flow_mixture_with_its_options(tmp_path):
    from gradcal.config import build, check, relevant, resolve
    from gradcal.posterior_estimators import FlowMixture
    from gradcal.runs import make_family

    raw = _vi_config(
        tmp_path, family="flow_mixture", components=3, transforms=1, hidden_features=[8]
    )
    assert check(raw, tmp_path) == []
    config = resolve(raw)
    kept = relevant(config)["method"]
    assert {"components", "transforms", "hidden_features"} <= set(kept)
    q = make_family(config["method"], build(config, tmp_path))
    assert isinstance(q.base, FlowMixture) and q.base.weights.shape == (3,)
    assert len(q.base.flow.transform().transforms) == 1
    assert q.sample(4)[0].shape == (4, 2)


def test_config_builds_the_objective_and_keeps_only_its_options(tmp_path):
    from gradcal.config import relevant, resolve
    from gradcal.runs import make_objective_from

    config = resolve(_vi_config(tmp_path, objective="renyi", alpha=0.25, k=4))
    assert repr(make_objective_from(config["method"])) == repr(Renyi(0.25, k=4))
    kept = relevant(config)["method"]
    assert {"alpha", "k", "doubly_reparameterised"} <= set(kept)
    assert "sticking_the_landing" not in kept
    default = resolve(_vi_config(tmp_path))
    assert repr(make_objective_from(default["method"])) == repr(ReverseKL())
    assert "alpha" not in relevant(default)["method"]


# --- annealing of w, and the warning when q misses mass ------------------------------


def test_annealing_schedule_and_its_epochs_in_vi():
    from gradcal.infer.annealing import GeometricAnnealing

    schedule = GeometricAnnealing(start=8.0, epochs=3)
    assert [schedule.w_at(t, 1.0) for t in range(5)] == pytest.approx([8.0, 4.0, 2.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="`start` must be a number > 0"):
        GeometricAnnealing(0.0, 3)
    with pytest.raises(ValueError, match="`epochs` must be an int >= 1"):
        GeometricAnnealing(2.0, 0)
    q = DiagonalGaussian(torch.ones(1), 0.5)
    with pytest.raises(TypeError, match="`anneal` must be a GeometricAnnealing"):
        VI(LOSS, PRIOR, q, anneal=3)
    seen = []

    class Recording(Renyi):
        def __call__(self, family, loss, data, n, prior, w, estimator=None):
            seen.append(w)  # the w each epoch's objective is given
            return super().__call__(family, loss, data, n, prior, w, estimator)

    vi = VI(
        LOSS,
        PRIOR,
        q,
        w=2.0,
        n_samples_per_epoch=8,
        progress_bar=False,
        seed=0,
        objective=Recording(0.5, k=4),
        anneal=GeometricAnnealing(start=0.25, epochs=3),
    )
    vi.run(Y, n_epochs=5, max_epochs_without_improvement=1)
    assert seen == pytest.approx([0.25, 0.5, 1.0, 2.0, 2.0])
    assert vi.losses_hist["w"] == pytest.approx(seen)
    # Annealing epochs neither set a best state nor count against the patience (1 here).
    # Their totals, -w log E_q[...] at a smaller w, rise epoch by epoch and lie below those
    # at the target w, so comparing them would stop the run at epoch 1 and keep epoch 0.
    assert len(vi.losses_hist["total"]) == 5
    assert vi.best_loss.item() == min(vi.losses_hist["total"][3:])


def test_vi_warns_in_words_when_the_ess_shows_missed_mass():
    # q sits 4.5 posterior sds away: its 64 draws see only the posterior's far tail, where
    # the weights vary by many nats (measured: IS ESS about 2 %, k-hat > 1)
    q = DiagonalGaussian(torch.tensor([POST_MEAN + 1.0]), 0.3)
    vi = VI(
        LOSS,
        PRIOR,
        q,
        n_samples_per_epoch=64,
        optimizer=torch.optim.SGD(q.parameters(), lr=0.0),
        progress_bar=False,
        seed=0,
        objective="forward_kl",
    )
    with pytest.warns(UserWarning, match="q misses part of the posterior .*ESS"):
        vi.run(Y, n_epochs=2)
    with pytest.warns(UserWarning, match="k-hat .* >= 0.7.*smaller alpha"):
        VI(LOSS, PRIOR, q, objective="renyi").mass_check(Y, 200)
    with pytest.warns(UserWarning, match="reverse KL is mode-seeking"):
        check = VI(LOSS, PRIOR, q).mass_check(Y, 200)
    assert check["khat"] >= 0.7 and check["ess_fraction"] < 0.1
    wide = DiagonalGaussian(torch.tensor([POST_MEAN]), 1.5 * POST_SD)
    check = VI(LOSS, PRIOR, wide).mass_check(Y, 1000)
    assert check["warning"] is None and check["khat"] < 0.7 and check["ess_fraction"] > 0.5


# --- evidence on a posterior with exact samples -------------------------------------


def _fit_bimodal(objective, family, epochs=300):
    from objective_targets import TARGETS

    target = TARGETS["bimodal"]
    vi = VI(
        target.loss,
        target.prior,
        family,
        n_samples_per_epoch=64,
        optimizer=torch.optim.Adam(family.parameters(), lr=0.02),
        progress_bar=False,
        seed=0,
        objective=objective,
        kl="monte_carlo",
        n_samples_regularisation=64,
    )
    vi.run(torch.zeros(1), epochs, epochs)
    with torch.no_grad():
        return family.sample(4000)[0], target


def test_bimodal_exact_sampler_has_the_quadrature_mode_weight():
    """The grid sampler's share of theta_1 > 0 against quadrature: z-test of 20 000 draws."""
    from objective_targets import TARGETS, bimodal_weight_of_positive_mode
    from stats import z_proportion

    draws = TARGETS["bimodal"].exact(20_000, 0)
    assert abs(z_proportion(draws[:, 0] > 0, bimodal_weight_of_positive_mode())) < Z_MAX


def test_forward_kl_with_a_mixture_finds_both_modes_with_their_weights():
    """Bimodal target (modes at theta_1 = +-1, weights 0.614 / 0.386): forward KL with a
    4-component GaussianMixture puts the right weight on each mode and is hard to tell from
    exact samples. Goals of the issue: weight within 0.05 (the weight of 4000 draws of q has
    sd 0.008) and C2ST <= 0.60 (sd at most 0.5 / sqrt(2 * 2000) = 0.008 under equal
    distributions). Measured by benchmarks/objectives.py with these settings: C2ST 0.52,
    weight 0.607; reverse KL with a diagonal Gaussian gives C2ST 0.84, with a flow 0.81."""
    from objective_targets import bimodal_weight_of_positive_mode

    from gradcal.diagnostics import c2st
    from gradcal.posterior_estimators import GaussianMixture

    draws, target = _fit_bimodal("forward_kl", GaussianMixture.spread(2, 4, 1.5, seed=0))
    weight = float((draws[:, 0] > 0).float().mean())
    assert abs(weight - bimodal_weight_of_positive_mode()) < 0.05
    assert c2st(draws[:2000], target.exact(2000, 1), epochs=20) <= 0.60


def test_forward_kl_with_a_flow_mixture_finds_both_modes_with_their_weights():
    """The same bimodal target and settings with a FlowMixture (4 components sharing one
    spline transform of 16-16 hidden units): the learnt weights put the right mass on each
    mode (within 0.05; the weight of 4000 draws has sd 0.008) and C2ST <= 0.60 (sd <= 0.008
    under equal distributions). Measured: weight 0.627 (truth 0.614), C2ST 0.53; with the
    weights frozen at 1/4 each the same fit gives weight 0.498 (the shared transform alone does
    not move the mass)."""
    from objective_targets import bimodal_weight_of_positive_mode

    from gradcal.diagnostics import c2st
    from gradcal.posterior_estimators import FlowMixture

    q = FlowMixture(2, 4, transforms=1, hidden_features=(16, 16), spread=1.5)
    draws, target = _fit_bimodal("forward_kl", q)
    weight = float((draws[:, 0] > 0).float().mean())
    assert abs(weight - bimodal_weight_of_positive_mode()) < 0.05
    assert c2st(draws[:2000], target.exact(2000, 1), epochs=20) <= 0.60


def test_the_report_suggests_a_mass_covering_objective_after_reverse_kl():
    from gradcal.report import assess

    def advice(objective):
        method = {"kind": "vi", "objective": objective, "epochs": 100}
        return " ".join(f.advice for f in assess({"khat": 0.9}, method=method).findings)

    assert 'method.objective = "renyi" or "forward_kl"' in advice("reverse_kl")
    assert "mass-covering" not in advice("renyi")
    calm = assess({"khat": 0.3}, method={"kind": "vi", "objective": "reverse_kl"})
    assert "mass-covering" not in " ".join(f.advice for f in calm.findings)


def _fit_flow(target, objective, epochs=300):
    from gradcal.posterior_estimators import Flow

    q = Flow(2, scale=2.0)
    vi = VI(
        target.loss,
        target.prior,
        q,
        n_samples_per_epoch=64,
        optimizer=torch.optim.Adam(q.parameters(), lr=3e-3),
        progress_bar=False,
        seed=0,
        objective=objective,
        kl="monte_carlo",
        n_samples_regularisation=64,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mass warning: C2ST is what is checked here
        vi.run(torch.zeros(1), epochs, epochs)
    with torch.no_grad():
        return q.sample(2000)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bimodal", "banana", "heavy"])
def test_forward_kl_flow_matches_exact_posteriors_where_reverse_kl_does_not(name):
    """A neural spline flow fitted by forward KL against exact samples: C2ST <= 0.60 on
    each target (sd of C2ST under equal distributions <= 0.008 at 2000 draws a side); on
    the bimodal target also the mode weight within 0.05 (sd of the weight of 2000 draws
    0.011) and, for contrast, reverse KL with the same flow and settings collapsed onto one
    mode (less than 5 % of its draws on the other). A collapse onto the heavier mode has a
    C2ST of about 0.5 + 0.386 / 2 = 0.69, onto the lighter one about 0.81, so C2ST alone
    would depend on which mode reverse KL finds. Measured by benchmarks/objectives.py: see
    docs/objectives.md."""
    from objective_targets import TARGETS, bimodal_weight_of_positive_mode

    from gradcal.diagnostics import c2st

    target = TARGETS[name]
    exact = target.exact(2000, 1)
    draws = _fit_flow(target, "forward_kl")
    assert c2st(draws, exact) <= 0.60
    if name == "bimodal":
        weight = float((draws[:, 0] > 0).float().mean())
        assert abs(weight - bimodal_weight_of_positive_mode()) < 0.05
        collapsed = float((_fit_flow(target, "reverse_kl")[:, 0] > 0).float().mean())
        assert min(collapsed, 1.0 - collapsed) < 0.05


# --- a classical posterior with an exact likelihood through the simulator ------------


def _fit_brock_hommes(objective, epochs=1500):
    """1000 draws of q after VI on Brock-Hommes wavy (exact likelihood through the
    simulator), the settings of ``benchmarks/objectives.py --brock-hommes``."""
    from pathlib import Path

    import numpy as np

    from gradcal.losses import NegativeLogLikelihood
    from gradcal.models import BrockHommesBeliefs
    from gradcal.posterior_estimators import Constrained, Flow

    data = Path(__file__).parent / "data" / "brock_hommes_wavy"
    obs = torch.tensor(np.loadtxt(data / "obs.txt"), dtype=torch.float32)
    low, high = torch.tensor([0.0, 0, 0, -1]), torch.tensor([1.0, 1, 1, 0])
    prior = torch.distributions.Independent(torch.distributions.Uniform(low, high), 1)
    torch.manual_seed(0)  # the flow's initial weights
    q = Constrained(Flow(4, transforms=3, hidden_features=(32, 32)), prior)
    optimizer = torch.optim.Adam(q.parameters(), lr=0.01)
    vi = VI(
        NegativeLogLikelihood(BrockHommesBeliefs.wavy()),
        prior,
        q,
        n_samples_per_epoch=64,
        n_samples_regularisation=256,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs),
        progress_bar=False,
        seed=0,
        objective=objective,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mass warning: C2ST is what is checked here
        vi.run(obs, epochs, epochs)
    with torch.no_grad():
        return q.sample(1000)[0]


@pytest.fixture(scope="module")
def brock_hommes_reference():
    """The 1000 exact-likelihood reference draws and reverse KL's C2ST against them."""
    from pathlib import Path

    import numpy as np

    from gradcal.diagnostics import c2st

    path = Path(__file__).parent / "data" / "brock_hommes_wavy" / "posterior_samples.txt"
    reference = torch.tensor(np.loadtxt(path)).float()
    return reference, c2st(_fit_brock_hommes(ReverseKL(sticking_the_landing=True)), reference)


@pytest.mark.slow  # about 2 minutes per objective on one core, plus reverse KL's once
@pytest.mark.parametrize(
    "objective",
    [ImportanceWeighted(k=8), Renyi(0.5, k=8), Renyi(0.2, k=8), ForwardKL()],
    ids=repr,
)
def test_new_objectives_are_no_worse_than_reverse_kl_on_brock_hommes(
    objective, brock_hommes_reference
):
    """Brock-Hommes wavy (four parameters, exact likelihood through the simulator path):
    each objective's flow is as hard to tell from the 1000 reference draws as reverse KL's.
    C2ST of 1000 draws a side has sd at most 0.5 / sqrt(2000) = 0.011, a difference of two
    independent ones at most 0.016: the margin 0.05 is about 3 of those. Measured
    (benchmarks/objectives.py --brock-hommes, 1500 epochs): C2ST reverse KL 0.553,
    importance-weighted 0.558, Renyi 0.5 0.535, Renyi 0.2 0.548, forward KL 0.540 (squared
    MMD 5.7e-4, 3.8e-3, 5.5e-4, 4.8e-4, 7.3e-4; the reference's split-half floor 1e-3)."""
    from gradcal.diagnostics import c2st

    reference, reverse_kl = brock_hommes_reference
    score = c2st(_fit_brock_hommes(objective), reference)
    assert score <= reverse_kl + 0.05, (score, reverse_kl)
    assert score <= 0.60
