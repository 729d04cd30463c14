"""BlackBIRDS 1.3's inference API at its import paths, with its signatures and return values.

Written from BlackBIRDS' documented API and the behaviour of its source: names, argument
lists, what each function returns, the prior's duck typing, TrainableGaussian's covariance
semantics, jacfwd with chunks, compute_loss's NaN handling, MCMC.reset.
"""

import importlib
import inspect
import math
import warnings

import pytest
import torch
from stats import Z_MAX

from gradcal.jacfwd import jacfwd
from gradcal.posterior_estimators import TrainableGaussian
from gradcal.simulate import compute_loss

# --- every name at its path ----------------------------------------------------------------

NAMES = [
    ("gradcal.jacfwd", "jacfwd"),
    ("gradcal.mpi_setup", "mpi_comm"),
    ("gradcal.mpi_setup", "mpi_rank"),
    ("gradcal.mpi_setup", "mpi_size"),
    ("gradcal.simulate", "compute_loss"),
    ("gradcal.simulate", "simulate_and_observe_model"),
    ("gradcal.infer.vi", "VI"),
    ("gradcal.infer.vi", "compute_regularisation_loss"),
    ("gradcal.infer.vi", "compute_loss_and_jacobian_pathwise"),
    ("gradcal.infer.vi", "compute_and_differentiate_loss"),
    ("gradcal.infer.vi", "compute_and_differentiate_loss_score"),
    ("gradcal.infer.mcmc", "MCMC"),
    ("gradcal.infer.mcmc", "MALA"),
    ("gradcal.infer", "SMD"),
    ("gradcal.posterior_estimators", "TrainableGaussian"),
]


@pytest.mark.parametrize("module,name", NAMES)
def test_name_is_importable_at_blackbirds_path(module, name):
    assert hasattr(importlib.import_module(module), name)
    assert name in importlib.import_module(module).__all__


# BlackBIRDS' positional arguments and defaults, in order (gradcal may add keyword-only ones).
SIGNATURES = [
    ("gradcal.jacfwd", "jacfwd", [("func", None), ("argnums", 0), ("has_aux", False)]),
    (
        "gradcal.simulate",
        "compute_loss",
        [("loss_fn", None), ("observed_outputs", None), ("simulated_outputs", None)],
    ),
    (
        "gradcal.infer.vi",
        "compute_regularisation_loss",
        [("posterior_estimator", None), ("prior", None), ("n_samples", None)],
    ),
    (
        "gradcal.infer.vi",
        "compute_loss_and_jacobian_pathwise",
        [
            ("loss_fn", None),
            ("posterior_estimator", None),
            ("n_samples", None),
            ("observed_outputs", None),
            ("diff_mode", "reverse"),
            ("jacobian_chunk_size", None),
            ("device", "cpu"),
        ],
    ),
    (
        "gradcal.infer.vi",
        "compute_and_differentiate_loss",
        [
            ("loss_fn", None),
            ("posterior_estimator", None),
            ("n_samples", None),
            ("observed_outputs", None),
            ("diff_mode", "reverse"),
            ("gradient_estimation_method", "pathwise"),
            ("jacobian_chunk_size", None),
            ("device", "cpu"),
        ],
    ),
    (
        "gradcal.infer.vi",
        "compute_and_differentiate_loss_score",
        [
            ("loss_fn", None),
            ("posterior_estimator", None),
            ("n_samples", None),
            ("observed_outputs", None),
            ("device", "cpu"),
        ],
    ),
]


@pytest.mark.parametrize("module,name,expected", SIGNATURES)
def test_positional_arguments_and_defaults_are_blackbirds(module, name, expected):
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    positional = [
        (p.name, None if p.default is inspect.Parameter.empty else p.default)
        for p in parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    assert positional == expected


def test_jacfwd_keyword_only_arguments():
    parameters = inspect.signature(jacfwd).parameters
    assert parameters["randomness"].kind is inspect.Parameter.KEYWORD_ONLY
    assert parameters["randomness"].default == "error"
    assert parameters["chunk_size"].default is None


def test_mpi_setup_in_one_process_is_blackbirds_fallback():
    from gradcal import mpi_setup

    assert (mpi_setup.mpi_comm, mpi_setup.mpi_rank, mpi_setup.mpi_size) == (None, 0, 1)


# --- compute_loss ------------------------------------------------------------------------------


def test_compute_loss_sums_over_outputs_and_returns_it_twice():
    mse = torch.nn.MSELoss()
    observed = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])]
    simulated = [torch.tensor([1.0, 4.0], requires_grad=True), torch.tensor([3.0, 4.0, 8.0])]
    first, second = compute_loss(mse, observed, simulated)
    assert first is second
    assert first.item() == pytest.approx(4.0 / 2 + 9.0 / 3)
    first.backward()
    torch.testing.assert_close(simulated[0].grad, torch.tensor([0.0, 2.0]))


def test_compute_loss_skips_nan_outputs_with_a_warning():
    mse = torch.nn.MSELoss()
    observed = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    with pytest.warns(UserWarning, match="output 1 contains NaN"):
        loss, _ = compute_loss(mse, observed, [torch.tensor([1.0, 3.0]), torch.tensor([math.nan])])
    assert loss.item() == pytest.approx(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = compute_loss(mse, observed, [torch.full((2,), math.nan), torch.tensor([math.nan])])
    assert all(isinstance(v, torch.Tensor) and torch.isnan(v) for v in both)


def test_compute_loss_rejects_unpaired_outputs():
    mse = torch.nn.MSELoss()
    with pytest.raises(ValueError, match=r"1 observed output.*2 simulated"):
        compute_loss(mse, [torch.zeros(2)], [torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ValueError, match=r"output 0 is observed with shape \(3,\).*\(2,\)"):
        compute_loss(mse, [torch.zeros(3)], [torch.zeros(2)])


# --- the vi free functions ---------------------------------------------------------------------

ROWS = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.0], [3.0, 1.0]])


class FixedDraws(torch.nn.Module):
    """q with theta_i = p * c_i for fixed rows c_i and log q(theta) = p * sum(theta)."""

    def __init__(self, p=1.5):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor(p))

    def sample(self, n):
        theta = self.p * ROWS[:n]
        return theta, self.log_prob(theta.detach())

    def log_prob(self, theta):
        return self.p * theta.sum(-1)


def squared(theta, y):
    """l(theta, y) = |theta - y|^2: gradient 2 (theta - y); NaN where theta_0 < -1."""
    return torch.where(theta[0] < -1, math.nan, ((theta - y) ** 2).sum())


Y = torch.tensor([0.5, 0.5])


@pytest.mark.parametrize("diff_mode,chunk", [("reverse", None), ("forward", None), ("forward", 1)])
def test_pathwise_pieces_are_draws_mean_loss_and_per_draw_gradients(diff_mode, chunk):
    from gradcal.infer.vi import compute_loss_and_jacobian_pathwise

    q = FixedDraws()
    theta, loss, jacobians = compute_loss_and_jacobian_pathwise(
        squared, q, 4, Y, diff_mode=diff_mode, jacobian_chunk_size=chunk
    )
    kept = 1.5 * ROWS[[0, 1, 3]]  # row 2 has theta_0 = -3: NaN loss, left out
    torch.testing.assert_close(theta.detach(), kept)
    assert theta.requires_grad  # the graph to q is kept
    assert isinstance(loss, torch.Tensor) and loss.shape == ()
    torch.testing.assert_close(loss, ((kept - Y) ** 2).sum(-1).mean())
    assert isinstance(jacobians, list) and len(jacobians) == 3
    for jacobian, row in zip(jacobians, kept, strict=True):
        torch.testing.assert_close(jacobian, 2 * (row - Y))


def test_pathwise_gradient_reaches_the_estimator():
    from gradcal.infer.vi import compute_and_differentiate_loss

    q = FixedDraws()
    loss = compute_and_differentiate_loss(squared, q, 4, Y)
    kept_rows = ROWS[[0, 1, 3]]
    # d/dp mean_i |p c_i - y|^2 = mean_i 2 <p c_i - y, c_i>
    expected = (2 * ((1.5 * kept_rows - Y) * kept_rows).sum(-1)).mean()
    torch.testing.assert_close(q.p.grad, expected)
    torch.testing.assert_close(loss, ((1.5 * kept_rows - Y) ** 2).sum(-1).mean())


@pytest.mark.parametrize("baseline", ["leave_one_out", None])
def test_score_gradient_and_returned_loss(baseline):
    from gradcal.infer.vi import (
        compute_and_differentiate_loss,
        compute_and_differentiate_loss_score,
    )

    q = FixedDraws()
    if baseline is None:
        loss = compute_and_differentiate_loss_score(squared, q, 4, Y, score_baseline=None)
    else:  # the default, also through the dispatcher
        loss = compute_and_differentiate_loss(squared, q, 4, Y, gradient_estimation_method="score")
    kept = 1.5 * ROWS[[0, 1, 3]]
    losses = ((kept - Y) ** 2).sum(-1)
    weights = losses if baseline is None else losses - (losses.sum() - losses) / 2
    # grad_p log q(theta) = sum(theta) for theta held fixed
    expected = (weights * kept.sum(-1)).mean()
    torch.testing.assert_close(q.p.grad, expected)
    torch.testing.assert_close(loss, losses.mean())


def test_unknown_method_and_mode_are_rejected():
    from gradcal.infer.vi import compute_and_differentiate_loss

    with pytest.raises(ValueError, match="gradient_estimation_method"):
        compute_and_differentiate_loss(squared, FixedDraws(), 2, Y, gradient_estimation_method="x")
    with pytest.raises(ValueError, match="diff_mode"):
        compute_and_differentiate_loss(squared, FixedDraws(), 2, Y, diff_mode="sideways")


# --- the prior: any object with log_prob and sample --------------------------------------------


class DuckPrior:
    """A standard normal over R^2 with only log_prob and sample (no torch Distribution)."""

    def log_prob(self, theta):
        return torch.distributions.Normal(0.0, 1.0).log_prob(theta).sum(-1)

    def sample(self, n):
        return torch.randn(n, 2)


def test_regularisation_against_a_trainable_gaussian_prior():
    from gradcal.infer.vi import compute_regularisation_loss

    same = compute_regularisation_loss(TrainableGaussian([0.0], 1.0), TrainableGaussian([0.0]), 10)
    assert same.item() == 0.0
    n = 100_000
    kl = compute_regularisation_loss(TrainableGaussian([0.0], 1.0), TrainableGaussian([1.0]), n)
    # terms log q - log p = 1/2 - theta have sd 1: standard error 1/sqrt(n) = 0.0032
    assert abs(kl.item() - 0.5) / (1 / math.sqrt(n)) < Z_MAX


def test_a_duck_typed_prior_with_per_coordinate_log_prob_is_summed():
    from gradcal.regularisation import prior_log_prob

    class PerCoordinate(DuckPrior):
        def log_prob(self, theta):  # (n, D): one value per coordinate
            return torch.distributions.Normal(0.0, 1.0).log_prob(theta)

    theta = torch.randn(5, 2)
    torch.testing.assert_close(prior_log_prob(PerCoordinate(), theta), DuckPrior().log_prob(theta))


def test_regularisation_against_a_duck_typed_prior():
    from gradcal.infer.vi import compute_regularisation_loss

    n = 100_000
    q = TrainableGaussian([1.0, 0.0], 1.0)
    kl = compute_regularisation_loss(q, DuckPrior(), n)
    # KL(N((1,0), I) || N(0, I)) = 1/2; terms 1/2 - theta_0 have sd 1: SE 0.0032
    assert abs(kl.item() - 0.5) / (1 / math.sqrt(n)) < Z_MAX


@pytest.mark.parametrize("prior", [TrainableGaussian([0.0, 0.0], 1.0), DuckPrior()])
def test_vi_accepts_a_prior_with_log_prob_and_sample(prior):
    from gradcal.infer.vi import VI

    q = TrainableGaussian([3.0, 3.0], 1.0)
    q.sigma.requires_grad = False
    vi = VI(
        lambda theta, y: torch.zeros(()) * theta.sum(),
        prior,
        q,
        w=1.0,
        optimizer=torch.optim.Adam(q.parameters(), lr=0.1),
        n_samples_regularisation=2000,
        progress_bar=False,
        seed=0,
    )
    vi.run(torch.zeros(1), n_epochs=150, max_epochs_without_improvement=150)
    # only the KL term: q's mean is pulled from (3, 3) to the prior's (0, 0)
    assert q.mu.detach().abs().max() < 0.5


def test_a_prior_without_log_prob_is_a_clear_error():
    from gradcal.infer.vi import VI

    class NoLogProb:
        def sample(self, n):
            return torch.zeros(n, 1)

    with pytest.raises(TypeError, match=r"`prior`.*NoLogProb lacks log_prob"):
        VI(lambda t, y: t.sum(), NoLogProb(), TrainableGaussian([0.0]), progress_bar=False)


# --- TrainableGaussian -------------------------------------------------------------------------


def test_trainable_gaussian_parameters_are_mu_and_a_covariance_matrix():
    q = TrainableGaussian([1.0, 2.0, 3.0], 0.1)
    assert isinstance(q.mu, torch.nn.Parameter) and isinstance(q.sigma, torch.nn.Parameter)
    assert dict(q.named_parameters()).keys() == {"mu", "sigma"}
    torch.testing.assert_close(q.sigma.detach(), 0.1 * torch.eye(3))
    assert q() is q  # BlackBIRDS' call convention
    n = 20_000
    theta, log_q = q.sample(n)
    assert theta.shape == (n, 3) and log_q.shape == (n,)
    # sigma is the covariance: sd sqrt(0.1) = 0.316 (not 0.1). The sd of n normal draws has
    # standard error sd / sqrt(2 n) = 0.0016.
    sd = theta.detach().std(0)
    assert ((sd - math.sqrt(0.1)).abs() / (math.sqrt(0.1) / math.sqrt(2 * n))).max() < Z_MAX
    reference = torch.distributions.MultivariateNormal(
        torch.tensor([1.0, 2.0, 3.0]), 0.1 * torch.eye(3)
    )
    torch.testing.assert_close(q.log_prob(theta[:5]), reference.log_prob(theta[:5]))
    assert q.log_prob(torch.tensor([1.0, 2.0, 3.0])).shape == ()  # one point (D,)


def test_trainable_gaussian_clamps_the_diagonal_only():
    q = TrainableGaussian([0.0, 0.0], 1.0)
    with torch.no_grad():
        q.sigma.copy_(torch.tensor([[-1.0, 0.2], [0.2, 2.0]]))
    torch.testing.assert_close(q.clamp_sigma(), torch.tensor([[1e-3, 0.2], [0.2, 2.0]]))


def test_trainable_gaussian_with_frozen_sigma_trains_only_mu():
    q = TrainableGaussian([0.0], 1.0)
    q.sigma.requires_grad = False
    optimizer = torch.optim.Adam(q.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        theta, _ = q.sample(10)
        ((theta - 2.0) ** 2).mean().backward()
        optimizer.step()
    assert q.mu.item() > 0.3 and q.sigma.item() == 1.0


# --- jacfwd ------------------------------------------------------------------------------------


def _f(x, y):
    return torch.stack([(x * y.sin()).sum(), (x**2).prod(), x[0] * y[-1]])


@pytest.mark.parametrize("chunk", [None, 1, 2, 100])
def test_jacfwd_matches_jacrev_with_and_without_chunks(chunk):
    x, y = torch.randn(3), torch.randn(3)
    for argnums in (0, 1, (0, 1)):
        forward = jacfwd(_f, argnums, chunk_size=chunk)(x, y)
        reverse = torch.func.jacrev(_f, argnums)(x, y)
        torch.testing.assert_close(forward, reverse)
    matrix = torch.randn(2, 3)
    g = lambda m: (m.exp() @ torch.arange(3.0)).sin()  # noqa: E731  (2, 3) -> (2,)
    torch.testing.assert_close(
        jacfwd(g, chunk_size=chunk)(matrix), torch.func.jacrev(g)(matrix)
    )  # (2, 2, 3)


def test_jacfwd_aux_and_randomness():
    x = torch.randn(4)
    jacobian, aux = jacfwd(lambda t: (t.sin(), t.sum()), has_aux=True, chunk_size=3)(x)
    torch.testing.assert_close(jacobian, torch.diag(x.cos()))
    torch.testing.assert_close(aux, x.sum())

    def noisy(t):
        return t * torch.randn(())

    with pytest.raises(RuntimeError):
        jacfwd(noisy)(x)  # randomness="error" by default, as torch.func.jacfwd
    jacobian = jacfwd(noisy, randomness="same", chunk_size=1)(x)
    # one realisation: every direction, in every chunk, sees the same draw
    torch.testing.assert_close(jacobian, jacobian[0, 0] * torch.eye(4))


def test_jacfwd_rejects_bad_arguments():
    with pytest.raises(ValueError, match="chunk_size"):
        jacfwd(torch.sin, chunk_size=0)
    with pytest.raises(ValueError, match="randomness"):
        jacfwd(torch.sin, randomness="maybe")
    with pytest.raises(TypeError, match="argument 0"):
        jacfwd(torch.sin)(torch.arange(3))


# --- MCMC.reset --------------------------------------------------------------------------------


def test_mcmc_reset_forgets_the_run_and_the_cached_target():
    from gradcal.infer.mcmc import MALA, MCMC

    seen = []

    def nll(theta, y):
        seen.append((theta.detach().clone(), y))
        return 0.5 * ((theta - y) ** 2).sum()

    kernel = MALA(torch.distributions.Normal(0.0, 10.0), nll, w=1.0, batching="loop")
    mcmc = MCMC(kernel, num_samples=3, progress_bar=False)
    first, second = torch.tensor([1.0]), torch.tensor([-1.0])
    states = mcmc.run(torch.tensor([0.25]), first)
    assert mcmc.samples is not None
    mcmc.reset()
    assert mcmc.samples is None and mcmc.acceptance_rate is None
    seen.clear()
    end = states[-1]  # the kernel last evaluated the target here, with the first data
    mcmc.run(end, second)
    # the new data's target is evaluated at the starting state, not taken from a cache
    assert any(y is second and torch.equal(t.reshape(end.shape), end) for t, y in seen)
