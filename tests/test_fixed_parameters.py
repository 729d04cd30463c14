"""Parameters held at values: FixedParameters runs the full model; configs take ``value``;
VI's learning-rate schedule and stopping rule from the config."""

import copy
import csv

import pytest
import torch

from gradcal.cli import main
from gradcal.config import build, check, dumps, resolve
from gradcal.models import Model, Normal, RamaCont
from gradcal.models.fixed import FixedParameters, fix_parameters
from gradcal.results import calibrate


def test_outputs_and_gradients_are_the_full_models_at_the_full_vector():
    model = RamaCont(n_agents=50, n_timesteps=10, s=0.1, sigmoid_k=5.0, log10_params=True)
    wrapped = FixedParameters(model, {0: 0.1, 2: -0.2})
    free = torch.tensor([[-0.3, 0.05], [0.2, -0.1]], requires_grad=True)
    full = torch.tensor([[0.1, -0.3, -0.2, 0.05], [0.1, 0.2, -0.2, -0.1]], requires_grad=True)
    torch.manual_seed(3)
    ours = wrapped.run_and_observe(free)[0]
    torch.manual_seed(3)
    theirs = model.run_and_observe(full)[0]
    assert torch.equal(ours, theirs)
    (g_free,) = torch.autograd.grad(ours[:, -5:].square().sum(), free)
    (g_full,) = torch.autograd.grad(theirs[:, -5:].square().sum(), full)
    assert g_free.abs().sum() > 0
    assert torch.equal(g_free, g_full[:, [1, 3]])


class _Walk(Model):
    """A single-draw model whose trim keeps the whole history (as BlackBIRDS' tutorial)."""

    n_params = 2
    history_length = 1  # what its own trim ignores: a default trim would change the outputs

    def __init__(self):
        super().__init__()
        self.n_timesteps = 6

    def initialize(self, params):
        return torch.zeros(1)

    def step(self, params, x):
        return x[-1:] + params[0] + params[1] * torch.randn(1) + 0.1 * x.sum() / len(x)

    def observe(self, x):
        return [x]

    def trim_time_series(self, x):
        return x


def test_a_single_draw_model_keeps_its_own_history_trimming():
    model = _Walk()
    wrapped = fix_parameters(model, {1: 0.5})
    torch.manual_seed(0)
    ours = wrapped.run_and_observe(torch.tensor([[0.3], [-0.2]]))[0]
    torch.manual_seed(0)
    theirs = model.run_and_observe(torch.tensor([[0.3, 0.5], [-0.2, 0.5]]))[0]
    assert torch.equal(ours, theirs)


def test_the_wrapper_keeps_the_models_choice_of_a_real_history_tensor():
    class _EagerWalk(_Walk):
        lazy_history = False  # its step needs isinstance(x, torch.Tensor)

    assert fix_parameters(_Walk(), {1: 0.5}).lazy_history is True
    assert fix_parameters(_EagerWalk(), {1: 0.5}).lazy_history is False


def test_the_log_likelihood_is_the_full_models():
    model = Normal(n_timesteps=5)
    y = torch.tensor([0.0, 0.3, -1.2, 0.5, 2.0, 0.1])[:, None]
    wrapped = FixedParameters(model, {1: 1.5})
    expected = model.log_likelihood(torch.tensor([0.2, 1.5]), y)
    assert torch.equal(wrapped.log_likelihood(torch.tensor([0.2]), y), expected)


@pytest.mark.parametrize(
    ("fixed", "message"),
    [({}, "at least one"), ({4: 1.0}, "index 4"), ({0: "a"}, "must be a number")],
)
def test_bad_fixed_values_are_refused(fixed, message):
    with pytest.raises((ValueError, TypeError), match=message):
        FixedParameters(Normal(n_timesteps=3), fixed)


CONFIG = {
    "run": {"seed": 0},
    "model": {"name": "Normal", "options": {"n_timesteps": 40}},
    "data": {"simulate": True},
    "loss": {"kind": "nll"},
    "method": {"kind": "smd", "epochs": 150, "starts": 2, "learning_rate": 0.05},
    "parameters": [
        {"name": "mu", "prior": {"kind": "normal", "loc": 0.0, "scale": 2.0}, "truth": 0.7},
        {"name": "sigma", "value": 0.5},
    ],
}


def _config(**parameter_changes):
    config = copy.deepcopy(CONFIG)
    for i, table in parameter_changes.items():
        config["parameters"][int(i[1:])] = table
    return config


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        (
            {"name": "sigma", "value": 0.5, "prior": {"kind": "normal", "loc": 0, "scale": 1}},
            "parameters[1].value: give either a prior",
        ),
        ({"name": "sigma", "truth": 0.5}, "parameters[1].prior: missing: give a prior table"),
        ({"name": "sigma", "value": float("inf")}, "parameters[1].value: must be a finite"),
        ({"name": "sigma", "value": "big"}, "parameters[1].value: must be"),
    ],
)
def test_a_fixed_parameter_table_is_checked_in_one_line(tmp_path, table, problem):
    problems = check(_config(p1=table), tmp_path)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_every_parameter_fixed_is_refused(tmp_path):
    config = _config(p0={"name": "mu", "value": 0.7})
    assert check(config, tmp_path) == [
        "parameters: every parameter has a fixed value; give one a prior"
    ]


def test_gradcal_check_exits_2_on_a_bad_fixed_parameter(tmp_path, capsys):
    config = resolve(_config(p1={"name": "sigma", "truth": 0.5}))
    (tmp_path / "c.toml").write_text(dumps(config))
    assert main(["-q", "check", str(tmp_path / "c.toml")]) == 2
    assert "parameters[1].prior: missing" in capsys.readouterr().err


def test_a_fixed_parameter_is_simulated_but_not_calibrated(tmp_path):
    built = build(resolve(CONFIG), tmp_path)
    assert built.names == ["mu"] and built.model.n_params == 1
    assert built.prior.sample((3,)).shape == (3, 1)
    # data simulated at (mu, sigma) = (0.7, 0.5): its sd is sigma's, not the prior's
    assert abs(float(built.data[0][1:].std()) - 0.5) < 0.5 * 0.25  # sd of a 40-draw sd: 11 %
    run = calibrate(CONFIG, progress=False)
    assert run.sample(5).shape == (5, 1) and run.names == ["mu"]
    # SMD's estimate of mu is the sample mean, within 3 standard errors (0.5 / sqrt(40))
    assert abs(float(run.sample(1)[0, 0]) - 0.7) < 3 * 0.5 / 40**0.5


def _vi_run(tmp_path, **method):
    config = copy.deepcopy(CONFIG)
    config["method"] = {
        "kind": "vi",
        "family": "diagonal",
        "epochs": 8,
        "patience": 100,
        "samples_per_epoch": 4,
        "n_samples_regularisation": 16,
        "posterior_samples": 50,
        "learning_rate": 0.1,
        **method,
    }
    calibrate(config, out=tmp_path / "run", progress=False)
    return tmp_path / "run"


def test_the_cosine_schedule_ends_at_a_hundredth_of_the_learning_rate(tmp_path):
    folder = _vi_run(tmp_path, learning_rate_schedule="cosine")
    state = torch.load(folder / "checkpoints" / "last.pt", weights_only=False)
    assert state["scheduler"]["_last_lr"] == pytest.approx([0.001])
    folder = _vi_run(tmp_path / "constant")
    state = torch.load(folder / "checkpoints" / "last.pt", weights_only=False)
    assert state["scheduler"] is None


@pytest.mark.parametrize("stopping", ["smoothed", "blackbirds"])
def test_the_stopping_rule_reaches_vi(tmp_path, stopping):
    folder = _vi_run(tmp_path, stopping=stopping)
    with open(folder / "history.csv") as f:
        header = next(csv.reader(f))
    assert ("smoothed" in header) == (stopping == "smoothed")


def test_a_seeded_flow_run_is_reproducible(tmp_path):
    # the flow's initial weights and the saved posterior draws come from the run's seed,
    # not from whatever the global random stream holds when the run starts
    config = copy.deepcopy(CONFIG)
    config["method"] = {
        "kind": "vi",
        "family": "nsf",
        "transforms": 1,
        "hidden_features": [8],
        "epochs": 3,
        "samples_per_epoch": 4,
        "n_samples_regularisation": 16,
        "posterior_samples": 30,
    }
    config["parameters"][1] = {  # two dimensions: a one-dimensional flow has no hidden weights
        "name": "sigma",
        "prior": {"kind": "lognormal", "loc": 0.0, "scale": 0.5},
        "truth": 0.5,
    }
    first = calibrate(config, progress=False)
    torch.rand(7)  # the global stream moves on between the runs
    second = calibrate(config, progress=False)
    assert first.history["total"] == second.history["total"]
    assert torch.equal(first.samples, second.samples)
