"""Regression tests for the bugs a code review found (issue 11), one block per bug.

Each test failed on the code before its fix; the module docstring of each block says how.
"""

import math

import pytest
import torch
import torch.distributed as dist

import gradcal.distributed as gdist
from gradcal import rng
from gradcal.infer.mcmc import MALA, MCMC
from gradcal.infer.vi import VI
from gradcal.posterior_estimators import Constrained, DiagonalGaussian, DistributionFamily


def _normal_prior(d=2):
    return torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(d), torch.ones(d)), 1
    )


def _quadratic(theta, y):
    return 0.5 * ((theta - y) ** 2).sum(-1)


_quadratic.batched = True


# --- NCCL: every collective's tensor must be on a device the backend serves ----------------
# Before the fix init_distributed chose plain "nccl" with CUDA, and the loss totals and the
# MCMC warm-up reduced CPU float64 tensors: every multi-GPU run raised at its first epoch.

# What each torch backend can reduce (torch.distributed's documentation); written out here
# rather than taken from gradcal, so the test judges the library from outside.
_SERVES = {"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}, "mpi": {"cpu", "cuda"}}


def _served(backend):
    if ":" in backend:
        return {part.split(":")[0] for part in backend.split(",")}
    return _SERVES[backend]


@pytest.fixture
def gpu_launch(monkeypatch):
    """A 2-rank torchrun environment on a machine that reports CUDA: the backend chosen."""
    chosen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.setdefault("dev", device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def init(backend, **kwargs):
        chosen["backend"] = backend

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    context = gdist.init_distributed()
    # the faked group is not initialised for torch.distributed: VI's launcher check must not
    # take this process for one started alone
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    return chosen, context


@pytest.fixture
def recorded(monkeypatch):
    """Collectives of a one-rank 'group' that record the device of each tensor they get."""
    devices = []
    monkeypatch.setattr(gdist, "_active", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, **kw: devices.append(t.device))
    monkeypatch.setattr(dist, "broadcast", lambda t, src=0, **kw: devices.append(t.device))

    def gather(out, obj, **kwargs):
        out[0] = obj

    monkeypatch.setattr(dist, "all_gather_object", gather)
    return devices


def test_backend_with_cuda_serves_cpu_collectives(gpu_launch):
    chosen, context = gpu_launch
    assert chosen["backend"] == context.backend
    assert "cpu" in _served(context.backend) and "cuda" in _served(context.backend)
    assert chosen["dev"] == 0  # each rank on the GPU of its local rank


def test_explicit_nccl_is_given_a_cpu_backend(monkeypatch):
    assert gdist.choose_backend("nccl", cuda=True) == "cpu:gloo,cuda:nccl"
    assert gdist.choose_backend("gloo", cuda=True) == "gloo"


@pytest.mark.parametrize("method", ["pathwise", "score"])
def test_vi_collectives_on_devices_the_backend_serves(gpu_launch, recorded, method):
    _, context = gpu_launch
    q = DiagonalGaussian(torch.zeros(2))
    vi = VI(
        _quadratic,
        _normal_prior(),
        q,
        n_samples_per_epoch=4,
        gradient_estimation_method=method,
        progress_bar=False,
        seed=0,
    )
    vi.run(torch.ones(2), n_epochs=2)
    assert recorded, "no collective ran"
    assert {d.type for d in recorded} <= _served(context.backend), recorded


def test_mcmc_warmup_collectives_on_devices_the_backend_serves(gpu_launch, recorded):
    _, context = gpu_launch
    mcmc = MCMC(MALA(_normal_prior(), _quadratic), num_samples=3, progress_bar=False)
    mcmc.run(torch.zeros(2, 2), torch.ones(2), warmup=4)
    assert recorded, "no collective ran"
    assert {d.type for d in recorded} <= _served(context.backend), recorded


# --- seeded: the caller's CUDA generators are left as they were ----------------------------
# Before the fix seeded(seed) without a device forked only the CPU generator and called
# torch.manual_seed, which reseeds every CUDA device: the caller's CUDA stream was changed.


class _FakeCuda:
    """Two CUDA generators, as far as torch.manual_seed and gradcal.rng touch them."""

    def __init__(self, initialised=True):
        self.states = [torch.tensor([11]), torch.tensor([22])]
        self.initialised = initialised
        self.calls = 0

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "is_initialized", lambda: self.initialised)
        monkeypatch.setattr(cuda, "device_count", lambda: 2)
        monkeypatch.setattr(cuda, "get_rng_state", self.get)
        monkeypatch.setattr(cuda, "set_rng_state", self.set)
        monkeypatch.setattr(cuda, "manual_seed_all", self.seed_all)
        monkeypatch.setattr(cuda, "manual_seed", lambda seed: self.set(torch.tensor([seed]), 0))

    def get(self, device="cuda"):
        self.calls += 1
        return self.states[torch.device("cuda", device).index or 0].clone()

    def set(self, state, device="cuda"):
        self.calls += 1
        self.states[torch.device("cuda", device).index or 0] = state.clone()

    def seed_all(self, seed):
        self.calls += 1
        self.states = [torch.tensor([seed]), torch.tensor([seed])]


def test_seeded_restores_every_cuda_generator(monkeypatch):
    fake = _FakeCuda()
    fake.install(monkeypatch)
    inside = []
    with rng.seeded(5):  # as infer/reference.py and runs.py call it: no device
        inside.append([s.item() for s in fake.states])
    assert inside == [[5, 5]]  # the block's CUDA draws are seeded too
    assert [s.item() for s in fake.states] == [11, 22]


def test_seeded_leaves_an_unused_cuda_alone(monkeypatch):
    fake = _FakeCuda(initialised=False)
    fake.install(monkeypatch)
    with rng.seeded(5):
        pass
    assert fake.calls == 0 and [s.item() for s in fake.states] == [11, 22]


def test_reference_passes_its_device_to_seeded(monkeypatch):
    import gradcal.infer.reference as reference

    devices = []
    real = reference.seeded

    def recording(seed, device=None):
        devices.append(device)
        return real(seed, device)

    monkeypatch.setattr(reference, "seeded", recording)
    reference.importance_sampling(_quadratic, _normal_prior(), torch.ones(2), 10, seed=1)
    reference.rejection_abc(_quadratic, _normal_prior(), torch.ones(2), 10, seed=1)
    assert devices == [torch.device("cpu")] * 2


# --- VI(device=...) moves the prior; .to() of an instance family moves its leaves ----------
# Before the fix the prior stayed on the CPU (the analytic KL raised "Tensor on device cpu is
# not on the expected device"), and DistributionFamily(instance).to() moved copies of the
# leaves into its state dict while sampling and the optimiser kept the old ones.


def test_vi_device_moves_the_prior():
    # "meta" stands in for a GPU: mixing it with CPU tensors raises as CUDA does.
    vi = VI(_quadratic, _normal_prior(), DiagonalGaussian(torch.zeros(2)), device="meta")
    kl = vi.regularisation()
    assert kl.device.type == "meta"
    constrained = Constrained(
        DiagonalGaussian(torch.zeros(1)), torch.distributions.constraints.positive
    )
    prior = torch.distributions.Independent(
        torch.distributions.LogNormal(torch.zeros(1), torch.ones(1)), 1
    )
    vi = VI(_quadratic, prior, constrained, device="meta")
    from gradcal.priors import distribution_device

    assert distribution_device(vi.prior).type == "meta"  # as the Monte Carlo KL needs
    assert distribution_device(prior).type == "cpu"  # the user's prior is not changed


def test_distribution_family_instance_follows_to():
    loc = torch.zeros(2, requires_grad=True)
    q = DistributionFamily(torch.distributions.Normal(loc, torch.ones(2)))
    optimiser = torch.optim.SGD(q.parameters(), lr=0.1)
    q.double()
    theta, log_q = q.sample(5)
    assert theta.dtype == log_q.dtype == torch.float64
    (theta.sum() + log_q.sum()).backward()
    optimiser.step()
    assert loc.dtype == torch.float64 and not torch.equal(loc, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(q.state_dict()["leaf0"], loc.detach())  # the trained leaf, not a copy
    assert [p is loc for p in q.parameters()] == [True]


def test_distribution_family_instance_to_another_device():
    loc = torch.zeros(2, requires_grad=True)
    q = DistributionFamily(torch.distributions.Normal(loc, torch.ones(2)))
    q.to("meta")
    assert loc.device.type == "meta" and q.sample(3)[0].device.type == "meta"
    assert [p is loc for p in q.parameters()] == [True]


# --- non-finite log q: the score estimator and the Monte Carlo KL drop and count ---------
# Before the fix the score estimator dropped draws on a non-finite loss only: a draw on the
# bound of a constrained support (exp(u) + 1 == 1 in float32 for u < -17) had log q = NaN
# and q's gradient became NaN. The Monte Carlo KL was inf whenever a draw hit a bound of a
# uniform prior, so no epoch's total was ever finite.


def _saturating_family():
    # 10 sd wide: about 4 % of the draws have u < -17, where 1 + exp(u) rounds to 1.
    return Constrained(
        DiagonalGaussian(torch.zeros(1), 10.0), torch.distributions.constraints.greater_than(1.0)
    )


def test_score_drops_draws_with_non_finite_log_q():
    from gradcal.gradients import BatchedLoss, Score

    q = _saturating_family()
    y = torch.tensor([3.0])
    with rng.seeded(1):
        theta = q.sample(400)[0].detach()
    bad = ~torch.isfinite(q.log_prob(theta))
    assert bad.sum() > 0  # the set-up does produce such draws
    with rng.seeded(1):
        estimate = Score()(q, BatchedLoss(_quadratic), y, 400)
    assert estimate.n_dropped == int(bad.sum()) and estimate.n_valid == 400 - int(bad.sum())
    grads = [p.grad.clone() for p in q.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    # The same gradient by hand over the kept draws, leave-one-out baseline among them.
    for p in q.parameters():
        p.grad = None
    kept = theta[~bad]
    losses = _quadratic(kept, y)
    m = len(kept)
    advantage = losses - (losses.sum() - losses) / (m - 1)
    ((advantage * q.log_prob(kept)).sum() / m).backward()
    for g, p in zip(grads, q.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_monte_carlo_kl_drops_draws_on_the_prior_bound():
    from gradcal.regularisation import kl_divergence, monte_carlo_kl

    # q spreads past the interval's ends: in float32 many draws are exactly 3.0, outside
    # Uniform(2, 3)'s half-open support [2, 3), where log prior = -inf.
    q = Constrained(
        DiagonalGaussian(torch.zeros(1), 40.0), torch.distributions.constraints.interval(2.0, 3.0)
    )
    prior = torch.distributions.Independent(
        torch.distributions.Uniform(torch.tensor([2.0]), torch.tensor([3.0])), 1
    )
    with rng.seeded(2):
        theta = q.sample(500)[0]
    on_bound = int((theta == 3.0).sum())
    assert on_bound > 0
    with rng.seeded(2):
        kl, dropped = monte_carlo_kl(q, prior, 500)
    assert dropped == on_bound and math.isfinite(kl.item())
    kl.backward()
    assert all(torch.isfinite(p.grad).all() for p in q.parameters())
    with rng.seeded(2):
        assert torch.equal(kl_divergence(q, prior, "monte_carlo", 500), kl.detach())


def test_vi_with_a_uniform_prior_records_kl_drops_and_a_best_state():
    q = Constrained(
        DiagonalGaussian(torch.zeros(1), 40.0), torch.distributions.constraints.interval(2.0, 3.0)
    )
    prior = torch.distributions.Independent(
        torch.distributions.Uniform(torch.tensor([2.0]), torch.tensor([3.0])), 1
    )
    vi = VI(
        _quadratic,
        prior,
        q,
        n_samples_per_epoch=8,
        n_samples_regularisation=200,
        progress_bar=False,
        seed=0,
    )
    vi.run(torch.tensor([2.5]), n_epochs=3)
    assert all(math.isfinite(t) for t in vi.losses_hist["total"])
    assert sum(vi.losses_hist["dropped_kl"]) > 0
    assert vi.best_estimator_state_dict is not None


# --- MCMC: the cached log target belongs to the data it was computed for ----------------
# Before the fix the cache was keyed on the state only: a kernel reused with new data and
# the same start accepted or rejected its first proposal against the old data's target.


@pytest.mark.parametrize("edit", ["new tensor", "in place"])
def test_kernel_cache_is_keyed_on_the_data(edit):
    kernel = MALA(_normal_prior(1), _quadratic)
    start = torch.zeros(3, 1)
    old = torch.tensor([0.0])
    kernel.step(start, old, scale=0.1)  # caches the target at ... the accepted states
    kernel.initialise_chain(start, old)  # ... and now at `start` for the old data
    if edit == "new tensor":
        new = torch.tensor([50.0])
    else:
        new = old
        new.fill_(50.0)
    with rng.seeded(3):
        kernel.step(start, new, scale=0.1)
    used = kernel.last_accept_prob.clone()
    fresh = MALA(_normal_prior(1), _quadratic)
    with rng.seeded(3):
        fresh.step(start, new, scale=0.1)
    torch.testing.assert_close(used, fresh.last_accept_prob)


def test_kernel_cache_still_saves_the_evaluation(monkeypatch):
    def loss(theta, data):
        return _quadratic(theta, data[0])

    loss.batched = True
    kernel = MALA(_normal_prior(1), loss)
    calls = []
    real = kernel.log_density_and_grad
    monkeypatch.setattr(kernel, "log_density_and_grad", lambda t, d: calls.append(1) or real(t, d))
    y = torch.tensor([1.0])
    state = torch.zeros(2, 1)
    for _ in range(3):
        state, _ = kernel.step(state, [y], scale=0.1)  # a new list of the same tensor
    assert len(calls) == 1 + 3  # the start once, then one proposal per step


# --- losses: the observed-data cache cannot be fooled by a reused id ----------------------
# Before the fix the cache key was (id(y), y._version): float64 data compared with float32
# simulations is converted, so nothing kept y alive; a new tensor allocated at the freed
# address (CPython reuses it at once) got the old data's points and a wrong loss.


def test_observed_cache_survives_id_reuse():
    from gradcal.losses import MMDLoss
    from gradcal.models import Normal

    loss = MMDLoss(Normal(50), torch.randn(50))
    theta = torch.tensor([[0.0, 1.0]])
    old = torch.randn(50, dtype=torch.float64)
    loss(theta, old)
    old_id = id(old)
    del old
    # New data until one lands at the freed address (CPython reuses it within a few
    # allocations when nothing holds the old tensor); all are kept, so none is freed.
    held = []
    for k in range(2000):
        held.append(torch.full((50,), 3.0 + k, dtype=torch.float64))
        if id(held[-1]) == old_id:
            break
    new = held[-1]
    with rng.seeded(1):
        cached = loss(theta, new)
    loss._cache.clear()
    with rng.seeded(1):
        uncached = loss(theta, new)
    torch.testing.assert_close(cached, uncached)  # the new data's points, not the old's
    assert id(new) != old_id  # with the fix the old tensor is held: its id stays taken


# --- Python 3.10: one TOML reader, with the tomli backport declared ----------------------
# Before the fix cli.py imported tomllib (3.11+) unconditionally, so `gradcal` could not even
# start on Python 3.10, which pyproject.toml allows; report.py silently read no config there.

_AS_ON_310 = """
import sys, tomllib
sys.modules["tomli"] = tomllib      # the backport has the same interface
sys.modules["tomllib"] = None       # `import tomllib` raises ImportError, as on 3.10
sys.version_info = (3, 10, 12, "final", 0)
from gradcal.cli import main
from gradcal.report import _read_toml
from pathlib import Path
print(_read_toml(Path(sys.argv[1]))[1]["run"]["seed"])
sys.exit(main(["check", sys.argv[1]]))
"""


def test_cli_and_report_read_toml_as_on_python_310(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    config = Path(__file__).parents[1] / "examples" / "sp500" / "config.toml"
    result = subprocess.run(
        [sys.executable, "-c", _AS_ON_310, str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0].strip().isdigit()


def test_tomli_is_declared_for_python_310():
    from pathlib import Path

    from gradcal.config import loads_toml

    project = loads_toml((Path(__file__).parents[1] / "pyproject.toml").read_text())
    deps = [d.replace(" ", "") for d in project["project"]["dependencies"]]
    assert any(d.startswith("tomli") and "python_version<'3.11'" in d for d in deps), deps
    assert not any("corner" in d for d in project["project"]["optional-dependencies"]["plot"])


def test_toml_errors_name_the_file(tmp_path):
    from gradcal.config import ConfigError, loads_toml, read_toml

    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        read_toml(bad)
    with pytest.raises(ConfigError, match=r"missing.toml: no such file"):
        read_toml(tmp_path / "missing.toml")
    assert loads_toml("a = 1") == {"a": 1}


# --- docs and packaging ------------------------------------------------------------------


def test_every_module_declares_all():
    import importlib
    import pkgutil

    import gradcal

    missing = []
    for info in pkgutil.walk_packages(gradcal.__path__, "gradcal."):
        if info.name.endswith("conftest"):
            continue
        module = importlib.import_module(info.name)
        if not hasattr(module, "__all__"):
            missing.append(info.name)
    assert not missing, missing


def test_architecture_modules_table_is_one_table():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    section = text.split("## Modules (src/gradcal/)")[1].split("\n## ")[0]
    lines = section.strip().splitlines()
    table = [i for i, line in enumerate(lines) if line.startswith("|")]
    assert table == list(range(table[0], table[-1] + 1)), "a blank line splits the table"
    for module in ("gradients.py", "infer/vi.py", "distributed.py", "checkpoint.py"):
        assert any(f"`{module}`" in lines[i] for i in table), module


def test_cpu_launch_keeps_gloo_and_no_gpu(monkeypatch):
    """Without CUDA: plain gloo, and no CUDA call (a CPU build of torch has none)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_gpu(device):
        raise AssertionError("set_device called on a machine without CUDA")

    monkeypatch.setattr(torch.cuda, "set_device", no_gpu)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    chosen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: chosen.update(b=backend))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    assert gdist.init_distributed().backend == chosen["b"] == "gloo"
