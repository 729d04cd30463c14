"""Tests of gradcal.relax: exact hard values, correct frequencies, useful gradients."""

import math
from functools import partial

import pytest
import torch
from stats import Z_MAX, z_proportion
from torch.func import jvp

from gradcal import utils
from gradcal.models import RamaCont
from gradcal.relax import (
    bernoulli_mask,
    relaxed_bernoulli,
    relaxed_categorical,
    soft_maximum,
    soft_minimum,
    straight_through_sign,
    straight_through_threshold,
    threshold_order_sum,
)


@pytest.mark.parametrize("p", [0.02, 0.3, 0.5, 0.9])
def test_hard_bernoulli_is_exact_with_mean_p(p):
    x = relaxed_bernoulli(probs=torch.full((200_000,), p), tau=0.5)
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert abs(z_proportion(x, p)) < Z_MAX


def test_bernoulli_logits_and_probs_agree():
    logit = torch.tensor(0.7)
    torch.manual_seed(1)
    a = relaxed_bernoulli(logit.expand(1000), tau=0.3)
    torch.manual_seed(1)
    b = relaxed_bernoulli(probs=torch.sigmoid(logit).expand(1000), tau=0.3)
    assert torch.equal(a, b)


def test_soft_bernoulli_lies_in_unit_interval_and_is_biased_away_from_half():
    x = relaxed_bernoulli(probs=torch.full((100_000,), 0.2), tau=1.0, hard=False)
    assert ((x > 0) & (x < 1)).all()
    # At tau = 1 the soft sample's mean is P(L + L' > -logit(p)), not p: the documented bias.
    assert abs(z_proportion(x, 0.2)) > Z_MAX


def test_bernoulli_gradient_is_finite_and_positive():
    logits = torch.linspace(-3, 3, 50, requires_grad=True)
    relaxed_bernoulli(logits, tau=0.5).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad > 0).all()


def test_hard_bernoulli_is_exact_at_the_edges_of_the_unit_interval():
    n = 2_000_000
    assert relaxed_bernoulli(probs=torch.ones(n)).all()
    assert not relaxed_bernoulli(probs=torch.zeros(n)).any()


def test_bernoulli_certain_events_have_zero_not_nan_gradient():
    probs = torch.tensor([0.0, 1.0, 0.5], requires_grad=True)
    x = relaxed_bernoulli(probs=probs)
    assert x[0] == 0 and x[1] == 1
    x.sum().backward()
    assert torch.isfinite(probs.grad).all()


def test_bernoulli_rejects_bad_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        relaxed_bernoulli()
    with pytest.raises(ValueError, match="tau"):
        relaxed_bernoulli(torch.zeros(2), tau=0.0)


def test_hard_categorical_is_one_hot_with_softmax_frequencies():
    logits = torch.tensor([0.0, 1.0, -1.0, 0.5])
    y = relaxed_categorical(logits.expand(100_000, 4), tau=0.5)
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert (y.sum(-1) == 1).all()
    probs = torch.softmax(logits, -1)
    for k in range(4):
        assert abs(z_proportion(y[:, k], float(probs[k]))) < Z_MAX


def test_categorical_rows_are_one_hot_even_with_many_tied_categories():
    y = relaxed_categorical(torch.zeros(20_000, 1000))
    assert (y.sum(-1) == 1).all()


def test_categorical_gradient_favours_own_category():
    logits = torch.zeros(2000, 3, requires_grad=True)
    relaxed_categorical(logits, tau=1.0)[:, 0].sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[:, 0].sum() > 0
    assert (logits.grad[:, 1:].sum(0) < 0).all()


def test_categorical_soft_rows_sum_to_one():
    y = relaxed_categorical(torch.randn(10, 5), hard=False, tau=2.0)
    torch.testing.assert_close(y.sum(-1), torch.ones(10))
    assert ((y > 0) & (y < 1)).all()


def test_threshold_value_and_sigmoid_gradient():
    x = torch.tensor([-1.0, 0.2, 3.0], requires_grad=True)
    y = straight_through_threshold(x, threshold=0.5, k=2.0)
    assert y.tolist() == [0.0, 0.0, 1.0]
    y.sum().backward()
    s = torch.sigmoid(2.0 * (x.detach() - 0.5))
    torch.testing.assert_close(x.grad, 2.0 * s * (1 - s))


def test_sign_value_and_tanh_gradient():
    x = torch.tensor([-2.0, 0.0, 0.3], requires_grad=True)
    y = straight_through_sign(x, k=3.0)
    assert y.tolist() == [-1.0, 0.0, 1.0]
    y.sum().backward()
    torch.testing.assert_close(x.grad, 1.5 * (1 - torch.tanh(1.5 * x.detach()) ** 2))
    assert (x.grad > 0).all()


def test_soft_extrema_bound_the_true_ones():
    a, b, k = torch.randn(1000), torch.randn(1000), 4.0
    hi, lo = soft_maximum(a, b, k), soft_minimum(a, b, k)
    assert (hi >= torch.maximum(a, b)).all()
    assert (hi <= torch.maximum(a, b) + math.log(2) / k + 1e-6).all()
    assert (lo <= torch.minimum(a, b)).all()
    assert (lo >= torch.minimum(a, b) - math.log(2) / k - 1e-6).all()


def test_soft_extrema_are_stable_and_at_blackbirds_path():
    a = torch.tensor([1000.0, -1000.0], requires_grad=True)
    out = utils.soft_maximum(a, 0.0, 2.0) + utils.soft_minimum(a, 0.0, 2.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(a.grad).all()


@pytest.mark.parametrize(
    "f",
    [
        lambda x: relaxed_bernoulli(x),
        lambda x: relaxed_bernoulli(probs=torch.sigmoid(x), hard=False),
        lambda x: relaxed_categorical(x),
        lambda x: straight_through_threshold(x),
        lambda x: straight_through_sign(x),
        lambda x: soft_minimum(x, 0.0, 2.0),
    ],
)
def test_forward_mode_matches_reverse_mode(f):
    x, v = torch.randn(20, 3), torch.randn(20, 3)
    torch.manual_seed(3)
    _, tangent = jvp(lambda x: f(x).sum(), (x,), (v,))
    torch.manual_seed(3)
    x = x.requires_grad_()
    (grad,) = torch.autograd.grad(f(x).sum(), x)
    torch.testing.assert_close(tangent, (grad * v).sum())


@pytest.mark.parametrize("shape,p", [((300, 1000), 0.05), ((300, 1000), 0.5), ((30, 200), 0.1)])
def test_bernoulli_mask_frequency_and_independence(shape, p):
    m = bernoulli_mask(shape, p, dtype=torch.float64, device="cpu")
    assert m.shape == shape and set(m.unique().tolist()) <= {0.0, 1.0}
    assert abs(z_proportion(m, p)) < Z_MAX
    if shape[0] > 100:  # row sums are Binomial(n, p): their variance is n p (1 - p)
        row = m.sum(-1)
        expected = shape[1] * p * (1 - p)
        se = expected * (2 / (shape[0] - 1)) ** 0.5  # s.e. of a sample variance, ~normal data
        assert abs(row.var() - expected) < Z_MAX * se


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bernoulli_mask_is_exact_in_low_precision(dtype):
    m = bernoulli_mask((100, 1000), 0.1, dtype=dtype, device="cpu")
    assert m.dtype == dtype
    assert abs(z_proportion(m.float(), 0.1)) < Z_MAX


def test_bernoulli_mask_under_vmap():
    def draw(x):
        return x + bernoulli_mask((1, 5000), 0.1, dtype=x.dtype, device=x.device)[0]

    m = torch.func.vmap(draw, randomness="different")(torch.zeros(20, 5000))
    assert abs(z_proportion(m, 0.1)) < Z_MAX
    assert not torch.equal(m[0], m[1])


def test_bernoulli_mask_edge_probabilities():
    assert bernoulli_mask((100, 100), 0.0, dtype=torch.float32, device="cpu").sum() == 0
    assert bernoulli_mask((100, 100), 1.0, dtype=torch.float32, device="cpu").all()
    with pytest.raises(ValueError, match="`k`"):
        soft_maximum(torch.zeros(1), 0.0, 0.0)
    with pytest.raises(ValueError, match="`p`"):
        bernoulli_mask((2, 2), 1.5, dtype=torch.float32, device="cpu")


def _composite_bernoulli(probs, tau):
    """The straight-through binary Concrete draw written out (the formulation it replaces)."""
    info = torch.finfo(probs.dtype)
    p = probs.clamp(info.tiny, 1.0 - info.eps)
    u = torch.rand_like(probs)
    noisy = torch.log(p) - torch.log1p(-p) + (torch.log1p(-u) - torch.log(u.clamp(min=info.tiny)))
    soft = torch.sigmoid(noisy / tau)
    return (u < probs).to(soft.dtype) + (soft - soft.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_bernoulli_has_the_composite_value_and_gradient(dtype):
    # Edge probabilities included: 0 and 1 (zero slope, outside the clamp), tiny, NaN.
    edges = torch.tensor([0.0, 1.0, 1e-30, 0.5, math.nan], dtype=dtype)
    probs = torch.cat((torch.rand(2000, dtype=dtype), edges))
    weights = torch.randn_like(probs)
    results = []
    for draw in (relaxed_bernoulli, None):
        leaf = probs.clone().requires_grad_()
        torch.manual_seed(4)
        x = relaxed_bernoulli(probs=leaf, tau=0.3) if draw else _composite_bernoulli(leaf, 0.3)
        (weights * x).sum().backward()
        # forward mode, same noise
        torch.manual_seed(4)
        fn = (
            (lambda p: relaxed_bernoulli(probs=p, tau=0.3))
            if draw
            else (lambda p: _composite_bernoulli(p, 0.3))
        )
        _, tangent = jvp(fn, (probs,), (weights,))
        results.append((x.detach(), leaf.grad, tangent))
    (x1, g1, t1), (x2, g2, t2) = results
    # the same draws: the value is exact (NaN for a NaN probability, as before)
    torch.testing.assert_close(x1, x2, rtol=0.0, atol=0.0, equal_nan=True)
    assert torch.isnan(x1[-1])
    assert g1.abs().sum() > 0 and g1[-1] == g2[-1] == 0  # NaN p: zero, as clamp gives
    # the same formula evaluated in another order: equal up to a few ulps (torch's own jvp of
    # the composite is NaN at a NaN p, its reverse mode 0: the NaN entry is left out there)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(g1, g2, rtol=tol, atol=0.0)
    torch.testing.assert_close(t1, g1, rtol=tol, atol=0.0)  # elementwise: jvp = gradient
    torch.testing.assert_close(t1[:-1], t2[:-1], rtol=tol, atol=0.0)


def test_fused_bernoulli_under_vmap_of_jvp():
    probs = torch.rand(3, 50)
    torch.manual_seed(0)
    grads = torch.func.vmap(
        lambda t: jvp(lambda p: relaxed_bernoulli(probs=p).sum(), (probs,), (t,))[1],
        randomness="same",
    )(torch.ones(2, 3, 50))
    assert grads.shape == (2,) and torch.equal(grads[0], grads[1]) and grads[0] > 0


def _composite_order_sum(eps, nu, k):
    hard = ((eps > nu).to(nu.dtype) - (eps < -nu).to(nu.dtype)).sum(-1, keepdim=True)
    soft = (torch.sigmoid(k * (eps - nu)) - torch.sigmoid(-k * (eps + nu))).sum(-1, keepdim=True)
    return hard + (soft - soft.detach())


def _order_inputs(dtype=torch.float64):
    generator = torch.Generator().manual_seed(7)
    eps = torch.randn(6, 1, dtype=dtype, generator=generator)
    nu = torch.rand(6, 40, dtype=dtype, generator=generator) * 2.0  # thresholds >= 0
    return eps, nu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_order_sum_has_the_composite_value_and_gradients(dtype):
    eps, nu = _order_inputs(dtype)
    weights = torch.randn(6, 1, dtype=dtype, generator=torch.Generator().manual_seed(8))
    grads = []
    for f in (threshold_order_sum, _composite_order_sum):
        e, n = eps.clone().requires_grad_(), nu.clone().requires_grad_()
        value = f(e, n, 5.0)
        grads.append((value.detach(), *torch.autograd.grad((weights * value).sum(), (e, n))))
    (v1, ge1, gn1), (v2, ge2, gn2) = grads
    assert torch.equal(v1, v2)  # the exact net orders
    assert ge1.abs().min() > 0 and gn1.abs().max() > 0  # the slopes are not empty
    tol = 1e-5 if dtype == torch.float32 else 1e-12  # the same formula in another order
    torch.testing.assert_close(ge1, ge2, rtol=tol, atol=tol)
    torch.testing.assert_close(gn1, gn2, rtol=tol, atol=tol)


def test_order_sum_forward_mode_vmap_and_second_derivative():
    eps, nu = _order_inputs()
    tangents = (torch.randn_like(eps), torch.randn_like(nu))
    outs = [
        jvp(lambda e, n, f=f: f(e, n, 5.0), (eps, nu), tangents)[1]
        for f in (threshold_order_sum, _composite_order_sum)
    ]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    # each input alone: a tangent of eps only, of nu only
    for t in ((tangents[0], torch.zeros_like(nu)), (torch.zeros_like(eps), tangents[1])):
        a = jvp(lambda e, n: threshold_order_sum(e, n, 5.0), (eps, nu), t)[1]
        b = jvp(lambda e, n: _composite_order_sum(e, n, 5.0), (eps, nu), t)[1]
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    jac = [
        torch.func.vmap(torch.func.jacrev(lambda e, n, f=f: f(e, n, 5.0), argnums=(0, 1)))(
            eps[:, None], nu[:, None]
        )
        for f in (threshold_order_sum, _composite_order_sum)
    ]
    for a, b in zip(*jac, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    hessians = [
        # squared: the upstream gradient 2 f depends on eps, so its term must come through
        torch.autograd.functional.hessian(lambda e, f=f: (f(e, nu, 5.0) ** 2).sum(), eps)
        for f in (threshold_order_sum, _composite_order_sum)
    ]
    assert hessians[0].abs().max() > 0
    torch.testing.assert_close(hessians[0], hessians[1], rtol=1e-12, atol=1e-12)


def test_rama_cont_runs_the_same_with_and_without_gradients():
    model = RamaCont(200, 30, s=0.1, sigmoid_k=5.0, log10_params=True)
    theta = torch.log10(torch.tensor([1.0, 0.5, 1.0, 0.7])).expand(3, 4).clone()
    torch.manual_seed(3)
    with torch.no_grad():  # threshold_order_sum
        quiet = model.run_and_observe(theta)[0]
    torch.manual_seed(3)
    loud = model.run_and_observe(theta.requires_grad_())[0]  # the composite
    assert torch.equal(quiet, loud.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_order_sum_is_the_definition_for_negative_thresholds_too(dtype):
    """Sum_i 1[eps > nu_i] - 1[eps < -nu_i] for any thresholds: with nu_i < 0 both orders
    can fire (or neither), which the composite (the definition) counts exactly."""
    generator = torch.Generator().manual_seed(11)
    eps = torch.randn(6, 1, dtype=dtype, generator=generator)
    nu = torch.randn(6, 40, dtype=dtype, generator=generator)  # about half negative
    eps[0], nu[0, :3] = 0.5, torch.tensor([-0.5, 0.5, -0.7])  # ties and a double order
    weights = torch.randn(6, 1, dtype=dtype, generator=generator)
    results = []
    for f in (threshold_order_sum, _composite_order_sum):
        e, n = eps.clone().requires_grad_(), nu.clone().requires_grad_()
        value = f(e, n, 5.0)
        results.append((value.detach(), *torch.autograd.grad((weights * value).sum(), (e, n))))
    (v1, ge1, gn1), (v2, ge2, gn2) = results
    assert torch.equal(v1, v2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12  # the same formula in another order
    torch.testing.assert_close(ge1, ge2, rtol=tol, atol=tol)
    torch.testing.assert_close(gn1, gn2, rtol=tol, atol=tol)


def test_order_sum_refuses_a_hardness_it_cannot_use():
    eps, nu = _order_inputs()
    # a tensor k that wants a gradient would silently get none
    with pytest.raises(TypeError, match="`k`"):
        threshold_order_sum(eps, nu, torch.tensor(5.0, dtype=torch.float64, requires_grad=True))
    for bad in (0.0, -1.0, math.nan, math.inf, torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="`k`"):
            threshold_order_sum(eps, nu, bad)
    for bad in (True, "5", None):
        with pytest.raises(TypeError, match="`k`"):
            threshold_order_sum(eps, nu, bad)
    # a number as a tensor without a gradient is that number
    same = threshold_order_sum(eps.requires_grad_(), nu, torch.tensor(5.0))
    (g1,) = torch.autograd.grad(same.sum(), eps)
    (g2,) = torch.autograd.grad(threshold_order_sum(eps, nu, 5.0).sum(), eps)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_order_sum_with_the_nonnegative_promise_is_the_definition(dtype):
    """``nonnegative=True`` (one comparison per agent) gives the definition's value and
    gradients on thresholds >= 0, ties with the signal and a zero signal included."""
    generator = torch.Generator().manual_seed(12)
    eps = torch.randn(6, 1, dtype=dtype, generator=generator)
    nu = torch.rand(6, 40, dtype=dtype, generator=generator)
    eps[0], nu[0, :2] = 0.5, torch.tensor([0.5, 0.0])  # a tie and a zero threshold
    eps[1], eps[2] = 0.0, -0.5
    nu[2, :1] = 0.5
    weights = torch.randn(6, 1, dtype=dtype, generator=generator)
    results = []
    for f in (partial(threshold_order_sum, nonnegative=True), _composite_order_sum):
        e, n = eps.clone().requires_grad_(), nu.clone().requires_grad_()
        value = f(e, n, 5.0)
        results.append((value.detach(), *torch.autograd.grad((weights * value).sum(), (e, n))))
    (v1, ge1, gn1), (v2, ge2, gn2) = results
    assert torch.equal(v1, v2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ge1, ge2, rtol=tol, atol=tol)
    torch.testing.assert_close(gn1, gn2, rtol=tol, atol=tol)
