"""load_run, calibrate and the ArviZ export, on small Normal-model runs of each method."""

import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import gradcal
from gradcal.checkpoint import load_checkpoint
from gradcal.config import ConfigError
from gradcal.results import PointEstimate, PosteriorDraws, Table, calibrate, load_run

T = 40  # observations of N(mu, sigma^2)
CONFIG = {
    "run": {"name": "tiny", "seed": 0},
    "model": {"name": "Normal", "options": {"n_timesteps": T}},
    "data": {"simulate": True},
    "loss": {"kind": "nll"},
    "method": {
        "kind": "vi",
        "family": "diagonal",
        "w": 1.0,
        "epochs": 150,
        "patience": 150,
        "learning_rate": 0.05,
        "samples_per_epoch": 8,
        "n_samples_regularisation": 64,
        "posterior_samples": 1000,
    },
    "parameters": [
        {"name": "mu", "prior": {"kind": "normal", "loc": 0.0, "scale": 2.0}, "truth": 1.0},
        {
            "name": "sigma",
            "prior": {"kind": "lognormal", "loc": 0.0, "scale": 0.5},
            "truth": 0.8,
        },
    ],
}
METHODS = {
    "vi": CONFIG["method"],
    "smd": {"kind": "smd", "epochs": 150, "starts": 2, "learning_rate": 0.05},
    "mcmc": {"kind": "mcmc", "chains": 3, "samples": 60, "warmup": 40},
}


def _config(method: str) -> dict:
    config = copy.deepcopy(CONFIG)
    config["method"] = dict(METHODS[method])
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run folder per method, written by calibrate(out=...)."""
    root = tmp_path_factory.mktemp("runs")
    return {m: calibrate(_config(m), root / m, progress=False) for m in METHODS}


def test_vi_posterior_is_the_checkpoints_family(runs):
    run = runs["vi"]
    loaded = load_run(run.path)
    best = load_checkpoint(run.path / "checkpoints" / "best.pt")["best_state"]
    state = loaded.posterior.family.state_dict()
    assert state.keys() == best.keys()
    assert all(torch.equal(state[k], best[k]) for k in best)
    # The rebuilt q against the draws the run saved from its own q: means agree within
    # Monte Carlo error. The posterior sd of mu is ~0.8/sqrt(40) = 0.13; the difference of
    # two means of 4000 and 1000 draws has sd 0.13 * sqrt(1/4000 + 1/1000) = 0.0046, so
    # 0.03 is > 6 sd. A family left at its initial state (mean 0) is 1 away.
    draws = loaded.sample(4000, seed=1)
    assert draws.shape == (4000, 2)
    assert torch.allclose(draws.mean(0), loaded.samples.mean(0), atol=0.03)
    assert abs(draws[:, 0].mean().item() - 1.0) < 0.4  # near the truth (data noise 0.13)
    theta = loaded.samples[:5]
    assert loaded.log_prob(theta).shape == (5,)
    assert loaded.log_prob(theta[0]).shape == ()
    assert torch.allclose(loaded.log_prob(theta)[0], loaded.log_prob(theta[0]))
    assert torch.equal(loaded.sample(3, seed=7), loaded.sample(3, seed=7))


def test_vi_log_prob_is_a_normalised_density(runs):
    """exp(log_prob) integrates to 1 over (mu, sigma) (trapezoid rule on a 400 x 400 grid
    spanning +-8 sd of the draws, error < 1e-3): the Jacobian of sigma = exp(u) is in.
    Without it the integral is E_q[sigma], here about 0.9."""
    run = runs["vi"]
    draws = run.sample(4000, seed=2)
    m, s = draws[:, 0].mean().item(), draws[:, 0].std().item()
    log_sigma = draws[:, 1].log()
    ml, sl = log_sigma.mean().item(), log_sigma.std().item()
    mu = torch.linspace(m - 8 * s, m + 8 * s, 400)
    sigma = torch.exp(torch.linspace(ml - 8 * sl, ml + 8 * sl, 400))
    grid = torch.stack(torch.meshgrid(mu, sigma, indexing="ij"), -1).reshape(-1, 2)
    density = run.log_prob(grid).exp().reshape(400, 400).double()
    total = torch.trapezoid(torch.trapezoid(density, sigma.double(), dim=1), mu.double())
    assert abs(total.item() - 1.0) < 1e-3, total.item()
    assert abs(draws[:, 1].mean().item() - 1.0) > 0.02  # the check above can tell


def test_run_object_holds_config_summary_history_and_data(runs):
    run = runs["vi"]
    assert run.method == "vi" and run.names == ["mu", "sigma"] and run.truth == [1.0, 0.8]
    assert run.config["method"]["posterior_samples"] == 1000  # resolved: defaults filled in
    assert run.config["loss"]["kernel"] == "gaussian"
    assert run.summary.columns[:6] == ["parameter", "mean", "std", "q05", "q50", "q95"]
    assert run.summary["parameter"] == ["mu", "sigma"]
    assert run.summary.row("mu")["mean"] == pytest.approx(run.samples[:, 0].mean().item(), 1e-4)
    assert math.isnan(run.summary.row("mu")["rhat"])  # empty cell
    assert run.history.columns == [
        "epoch",
        "total",
        "loss",
        "regularisation",
        "dropped",
        "smoothed",  # the moving average behind the default stopping rule
    ]
    assert run.history["epoch"][:3] == [0, 1, 2] and len(run.history) == 150
    assert len(run.data) == 1 and run.data[0].shape == (T,)
    assert "khat" in run.diagnostics
    assert "vi" in repr(run) and "mu" in repr(run.summary)


def test_predictive_simulates_at_posterior_draws(runs):
    run = runs["smd"]
    (y,) = run.predictive(200, seed=0)
    assert y.shape == (200, T)
    mu, sigma = run.posterior.estimate.tolist()
    # 8000 values of N(mu, sigma^2): the mean's sd is sigma / sqrt(8000) ~ 0.009; 0.05 > 5 sd
    assert abs(y.mean().item() - mu) < 0.05
    assert abs(y.std().item() - sigma) < 0.05
    assert torch.equal(run.predictive(3, seed=4)[0], run.predictive(3, seed=4)[0])


def test_smd_is_a_point_estimate(runs):
    run = runs["smd"]
    assert isinstance(run.posterior, PointEstimate)
    assert torch.allclose(run.posterior.estimate, run.samples[0])
    draws = run.sample(5)
    assert draws.shape == (5, 2) and (draws == run.posterior.estimate).all()
    assert abs(run.posterior.estimate[0].item() - 1.0) < 0.4
    with pytest.raises(NotImplementedError, match="point estimate"):
        run.log_prob(draws)
    assert run.history.columns == ["epoch", "loss"]


def test_mcmc_keeps_its_chains(runs):
    run = runs["mcmc"]
    stored = torch.load(run.path / "chains.pt", weights_only=True)
    assert isinstance(run.posterior, PosteriorDraws)
    assert run.chains.shape == (3, 60, 2)
    assert torch.equal(run.chains, stored["chains"].to(run.chains.dtype))
    draws = run.sample(50, seed=0)
    pooled = run.chains.reshape(-1, 2)
    assert all(((pooled == d).all(1)).any() for d in draws)  # every draw is a kept one
    with pytest.raises(NotImplementedError, match="MCMC"):
        run.log_prob(draws)
    assert run.sample_stats["acceptance_rate"].shape == (3,)
    assert run.history is None and run.summary["rhat"][0] > 0


def test_calibrate_without_out_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    config = _config("smd") | {"method": {"kind": "smd", "epochs": 5, "starts": 1}}
    run = gradcal.calibrate(config, progress=False)
    assert run.path is None and run.sample(2).shape == (2, 2)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["tmp"]


def test_calibrate_from_a_toml_file_and_the_out_folder_rules(tmp_path):
    path = tmp_path / "conf" / "c.toml"
    path.parent.mkdir()
    path.write_text(
        '[model]\nname = "Normal"\noptions = { n_timesteps = 20 }\n[data]\nsimulate = true\n'
        '[loss]\nkind = "nll"\n[method]\nkind = "smd"\nepochs = 3\nstarts = 1\n'
        '[[parameters]]\nname = "mu"\nprior = { kind = "normal", loc = 0.0, scale = 1.0 }\n'
        "truth = 0.5\n"
        '[[parameters]]\nname = "sigma"\nprior = { kind = "lognormal", loc = 0.0, scale = 0.5 }'
        "\ntruth = 1.0\n"
    )
    out = tmp_path / "out"
    run = calibrate(path, out, progress=False, seed=3)
    assert run.path == out and (out / "report.html").is_file()
    assert run.config["run"]["seed"] == 3
    assert load_run(out).config == run.config
    with pytest.raises(ValueError, match="already holds a run; pass overwrite=True"):
        calibrate(path, out, progress=False)
    (out / "marker").write_text("old")
    calibrate(path, out, progress=False, overwrite=True)
    assert not (out / "marker").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty folder that holds no run"):
        calibrate(path, other, progress=False, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"


def test_calibrate_rejects_bad_input():
    bad = copy.deepcopy(CONFIG)
    bad["method"]["epochz"] = 3
    with pytest.raises(ConfigError, match="epochz"):
        calibrate(bad, progress=False)
    with pytest.raises(TypeError, match="`config` must be a dict"):
        calibrate(3, progress=False)
    with pytest.raises(ValueError, match="no such configuration file"):
        calibrate("missing.toml", progress=False)


def test_load_run_errors(tmp_path, runs):
    with pytest.raises(ValueError, match="no such run folder"):
        load_run(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"not a run folder \(no config.toml\)"):
        load_run(tmp_path)
    (tmp_path / "config.toml").write_text('[method]\nkind = "vi"\n')
    with pytest.raises(ValueError, match="is not a complete configuration"):
        load_run(tmp_path)
    damaged = tmp_path / "mcmc"
    shutil.copytree(runs["mcmc"].path, damaged)
    (damaged / "chains.pt").unlink()
    with pytest.raises(ValueError, match=r"an MCMC run folder needs chains\.pt"):
        load_run(damaged)
    (damaged / "posterior_samples.pt").unlink()
    with pytest.raises(ValueError, match="the run did not finish"):
        load_run(damaged)


def test_load_run_finds_data_files_from_the_configs_folder(tmp_path, monkeypatch):
    conf = tmp_path / "project"
    conf.mkdir()
    (conf / "data.csv").write_text("y\n" + "\n".join(str(0.1 * i) for i in range(T)) + "\n")
    config = _config("smd")
    config["data"] = {"file": "data.csv", "columns": ["y"]}
    config["method"]["epochs"] = 3
    calibrate(config, tmp_path / "run", base=conf, progress=False)
    monkeypatch.chdir(tmp_path)  # elsewhere: the run recorded the configuration's folder
    run = load_run(tmp_path / "run")
    assert torch.allclose(run.data[0], 0.1 * torch.arange(T, dtype=run.data[0].dtype))
    (conf / "data.csv").rename(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="pass base="):
        load_run(tmp_path / "run")
    assert load_run(tmp_path / "run", base=tmp_path).data[0].shape == (T,)


def test_table_reads_csv_and_converts(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("name,x,y\na,1,2.5\nb,,3\n")
    table = Table.from_csv(path)
    assert table["name"] == ["a", "b"] and table["x"][0] == 1 and math.isnan(table["x"][1])
    assert list(table)[1]["y"] == 3
    with pytest.raises(KeyError, match="no column 'z'"):
        table["z"]
    with pytest.raises(KeyError, match="no row with name = 'c'"):
        table.row("c")
    with pytest.raises(ValueError, match="same length"):
        Table({"a": [1], "b": [1, 2]})
    assert "<table>" in table._repr_html_()
    pandas = pytest.importorskip("pandas")
    frame = table.to_pandas()
    assert isinstance(frame, pandas.DataFrame) and list(frame.columns) == ["name", "x", "y"]


# --- ArviZ ---------------------------------------------------------------------------------


def test_arviz_export_of_mcmc_keeps_the_chain_axis(runs):
    az = pytest.importorskip("arviz")
    run = runs["mcmc"]
    idata = run.to_inference_data(predictive=20)
    assert isinstance(idata, az.InferenceData)
    posterior = idata.posterior
    assert dict(posterior.sizes) == {"chain": 3, "draw": 60}
    for d, name in enumerate(run.names):
        assert torch.allclose(
            torch.from_numpy(posterior[name].values), run.chains[..., d].double()
        )
    rate = idata.sample_stats["acceptance_rate"].values
    assert rate.shape == (3,)
    assert torch.allclose(torch.from_numpy(rate), run.sample_stats["acceptance_rate"].double())
    assert idata.posterior_predictive["y"].shape == (1, 20, T)
    assert torch.allclose(torch.from_numpy(idata.observed_data["y"].values), run.data[0].double())
    summary = az.summary(idata)  # ArviZ's own diagnostics run on the export
    assert list(summary.index) == run.names and (summary["r_hat"] > 0).all()


def test_arviz_export_of_vi_and_smd(runs):
    az = pytest.importorskip("arviz")
    run = runs["vi"]
    idata = az.convert_to_inference_data(run.to_inference_data(predictive=10, seed=1))
    assert dict(idata.posterior.sizes) == {"chain": 1, "draw": 1000}
    assert torch.allclose(
        torch.from_numpy(idata.posterior["mu"].values[0]), run.samples[:, 0].double()
    )
    log_q = torch.from_numpy(idata.sample_stats["log_q"].values[0])
    assert torch.allclose(log_q, run.log_prob(run.samples).double(), atol=1e-5)
    assert idata.posterior_predictive["y"].shape == (1, 10, T)
    assert "posterior_predictive" not in run.to_inference_data(predictive=None).groups()
    smd = runs["smd"].to_inference_data(predictive=5)
    assert dict(smd.posterior.sizes) == {"chain": 1, "draw": 1}
    assert "sample_stats" not in smd.groups()


def test_arviz_missing_gives_an_install_hint(runs, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_arviz(name, *args, **kwargs):
        if name == "arviz":
            raise ImportError("no arviz")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_arviz)
    with pytest.raises(ImportError, match=r"pip install 'gradcal\[arviz\]'"):
        runs["smd"].to_inference_data()


def test_run_folder_of_the_command_line_loads(tmp_path):
    """A folder written by `gradcal run` (the CLI path) loads the same way."""
    from gradcal.cli import main

    path = tmp_path / "c.toml"
    path.write_text(
        '[model]\nname = "Normal"\noptions = { n_timesteps = 20 }\n[data]\nsimulate = true\n'
        '[loss]\nkind = "nll"\n[method]\nkind = "vi"\nfamily = "diagonal"\nepochs = 3\n'
        "samples_per_epoch = 4\nn_samples_regularisation = 16\nposterior_samples = 50\n"
        '[[parameters]]\nname = "mu"\nprior = { kind = "normal", loc = 0.0, scale = 1.0 }\n'
        "truth = 0.5\n"
        '[[parameters]]\nname = "sigma"\nprior = { kind = "lognormal", loc = 0.0, scale = 0.5 }\n'
        "truth = 1.0\n"
    )
    assert main(["-q", "run", str(path), "--out", str(tmp_path / "r")]) == 0
    run = load_run(tmp_path / "r")
    assert run.samples.shape == (50, 2) and run.sample(2).shape == (2, 2)
    assert os.path.isfile(Path(run.path) / "report.html")


def test_an_interrupted_vi_run_loads_from_its_checkpoint(runs, tmp_path):
    """A VI run stopped before its outputs were written: the checkpoint is enough."""
    folder = tmp_path / "stopped"
    shutil.copytree(runs["vi"].path, folder)
    for name in ("posterior_samples.pt", "posterior_samples.csv", "summary.csv"):
        (folder / name).unlink()
    run = load_run(folder)
    assert not run.finished and run.summary is None and runs["vi"].finished
    assert run.samples.shape == (1000, 2)
    # fresh draws of the same q: the means agree within Monte Carlo error (sd of the
    # difference of two means of 1000 draws ~ 0.13 * sqrt(2 / 1000) = 0.006)
    assert torch.allclose(run.samples.mean(0), runs["vi"].samples.mean(0), atol=0.04)
    (folder / "checkpoints" / "best.pt").unlink()
    (folder / "checkpoints" / "last.pt").unlink()
    with pytest.raises(ValueError, match=r"needs checkpoints/best\.pt"):
        load_run(folder)


@pytest.mark.parametrize("w", [0.3, 3.0])
def test_vi_khat_and_is_ess_target_the_generalised_posterior_at_w(tmp_path, w):
    """The run's k-hat and IS ESS compare q with exp(-l / w) prior. At w = 1 that equals
    exp(-l w) prior, so this runs at w != 1 and recomputes both by hand from the run's own
    q (its best checkpoint), draws (same seed, same count) and data: log weights
    -l / w + log prior - log q, l the Gaussian negative log-likelihood written out here.
    The same numbers in float64 up to float32 rounding of theta and log q."""
    from gradcal.diagnostics.psis import psis_khat
    from gradcal.rng import seeded

    config = _config("vi")
    config["method"] |= {"w": w, "epochs": 40, "patience": 40, "posterior_samples": 500}
    run = calibrate(config, tmp_path / "run", progress=False)
    with seeded(config["run"]["seed"]), torch.no_grad():
        theta, log_q = run.posterior.family.sample(500)
    theta, log_q, y = theta.double(), log_q.double(), run.data[0].double()
    mu, sigma = theta[:, 0], theta[:, 1]
    nll = -torch.distributions.Normal(mu[:, None], sigma[:, None]).log_prob(y).sum(-1)
    log_prior = torch.distributions.Normal(0.0, 2.0).log_prob(mu) + torch.distributions.LogNormal(
        0.0, 0.5
    ).log_prob(sigma)
    log_w = -nll / w + log_prior - log_q
    ess_fraction = float(log_w.logsumexp(0).mul(2).sub((2 * log_w).logsumexp(0)).exp()) / 500
    khat = psis_khat(log_w)[0]
    written = json.loads((run.path / "diagnostics.json").read_text())
    assert written["ess_fraction"] == pytest.approx(ess_fraction, rel=1e-4)
    assert written["khat"] == pytest.approx(khat, abs=1e-3)
