"""The gradcal command end to end, through subprocesses, on tiny configurations."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

TINY = """
[run]
name = "tiny"
seed = 0

[model]
name = "{model}"
options = {options}

[data]
{data}

[loss]
kind = "{loss}"

[method]
kind = "{method}"
family = "diagonal"
epochs = {epochs}
samples_per_epoch = 4
n_samples_regularisation = 64
posterior_samples = 100
starts = 3
chains = 2
samples = 30
warmup = 10

[[parameters]]
name = "mu"
prior = {{ kind = "normal", loc = 0.0, scale = 2.0 }}
truth = 1.0

[[parameters]]
name = "sigma"
prior = {{ kind = "lognormal", loc = 0.0, scale = 0.5 }}
truth = 0.8
"""


def _write(folder: Path, name: str = "config.toml", **fields) -> Path:
    values = {
        "model": "Normal",
        "options": "{ n_timesteps = 40 }",
        "data": "simulate = true",
        "loss": "mmd",
        "method": "vi",
        "epochs": 4,
    } | fields
    path = folder / name
    path.write_text(TINY.format(**values))
    return path


def _keys_by_table(toml: str) -> dict[str, list[str]]:
    """The keys under each [table] header of a flat TOML text (no TOML reader needed)."""
    tables: dict[str, list[str]] = {}
    current = None
    for line in toml.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = tables.setdefault(line.strip("[]"), [])
        elif "=" in line and current is not None:
            current.append(line.split("=", 1)[0].strip())
    return tables


def _gradcal(*args, cwd, check=False, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "gradcal.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("method", ["vi", "smd", "mcmc"])
def test_run_writes_every_file_and_a_report(tmp_path, method):
    config = _write(tmp_path, method=method, loss="nll" if method == "mcmc" else "mmd")
    result = _gradcal("run", config, "--out", tmp_path / "out", cwd=tmp_path, check=True)
    out = tmp_path / "out"
    assert f"report: {out / 'report.html'}" in result.stdout
    expected = {
        "config.toml",
        "posterior_samples.csv",
        "posterior_samples.pt",
        "summary.csv",
        "predictive.pt",
        "diagnostics.json",
        "report.html",
    }
    expected |= {"history.csv"} if method != "mcmc" else {"chains.pt"}
    expected |= {"checkpoints"} if method == "vi" else set()
    assert expected <= {p.name for p in out.iterdir()}
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["parameter"] for r in rows] == ["mu", "sigma"]
    assert rows[0]["truth"] == "1"
    if method == "mcmc":
        assert rows[0]["rhat"] and rows[0]["ess"]
    if method == "vi":
        assert rows[0]["khat"]
        assert 0.0 < float(rows[0]["is_ess_fraction"]) <= 1.0 and not rows[1]["is_ess_fraction"]
        diagnostics = json.loads((out / "diagnostics.json").read_text())
        assert diagnostics["ess_fraction"] == pytest.approx(float(rows[0]["is_ess_fraction"]))
    with open(out / "posterior_samples.csv") as f:
        assert next(csv.reader(f)) == ["mu", "sigma"]
    html = (out / "report.html").read_text()
    assert "<table" in html and "log" not in html[:0]
    assert html.count("data:image/png;base64,") >= 2
    assert "days" not in html[:0]
    # the resolved configuration has every default filled in and is valid again
    assert _gradcal("check", out / "config.toml", cwd=tmp_path).returncode == 0
    # ... and lists only the keys its method and loss read
    written = _keys_by_table((out / "config.toml").read_text())
    reads = {  # keys that only this kind reads
        "vi": {"family", "samples_per_epoch", "posterior_samples"},
        "smd": {"starts"},
        "mcmc": {"kernel", "chains", "samples", "warmup"},
    }
    shared = {"vi": {"w", "epochs", "learning_rate"}, "smd": {"epochs", "learning_rate"}}
    assert shared.get(method, {"w"}) <= set(written["method"])
    others = set().union(*reads.values()) - reads[method]
    assert reads[method] <= set(written["method"])
    assert not others & set(written["method"]), others & set(written["method"])
    assert "transforms" not in written["method"]  # family "diagonal" is no flow
    assert "n_leapfrog" not in written["method"]  # only HMC reads it
    if method == "mcmc":  # an NLL loss has no kernel
        assert set(written["loss"]) == {"kind"}
    else:
        assert {"kernel", "window"} <= set(written["loss"]) and "function" not in written["loss"]


def test_check_reports_each_class_of_error_with_exit_code_2(tmp_path):
    config = _write(tmp_path, data='file = "missing.csv"\ncolumns = ["x"]')
    text = (
        config.read_text()
        .replace("[run]", "[run]\nsed = 3")
        .replace('kind = "mmd"', 'kind = "mmd"\nwindow = "two"')
    )
    config.write_text(text)
    result = _gradcal("check", config, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert any("run.sed: unknown key (did you mean 'seed'?)" in line for line in lines)
    assert any("loss.window: must be an integer" in line for line in lines)
    assert any("data.file: no such file" in line for line in lines)
    wrong_dimension = _write(tmp_path, "dim.toml", model="RandomWalk")
    result = _gradcal("check", wrong_dimension, cwd=tmp_path)
    assert result.returncode == 2
    assert "parameters: the model takes 1 parameter(s) but 2 are given" in result.stderr
    bad_prior = _write(tmp_path, "prior.toml")
    bad_prior.write_text(bad_prior.read_text().replace('kind = "normal"', 'kind = "normall"'))
    result = _gradcal("check", bad_prior, cwd=tmp_path)
    assert "did you mean 'normal'?" in result.stderr and result.returncode == 2
    ranges = _write(tmp_path, "ranges.toml", method="smd")
    ranges.write_text(
        ranges.read_text()
        .replace("starts = 3", "starts = 0")
        .replace(
            'kind = "normal", loc = 0.0, scale = 2.0', 'kind = "uniform", low = 3.0, high = 1.0'
        )
    )
    result = _gradcal("check", ranges, cwd=tmp_path)
    assert "method.starts: must be >= 1" in result.stderr
    assert "a uniform prior needs low < high" in result.stderr
    assert _gradcal("check", _write(tmp_path, "ok.toml"), cwd=tmp_path).returncode == 0
    assert _gradcal("run", tmp_path / "nope.toml", cwd=tmp_path).returncode == 2


def _deliver_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so Python raises
    KeyboardInterrupt on it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_resume_continues_an_interrupted_run(tmp_path):
    slow = textwrap.dedent(
        """
        import time
        import torch
        from gradcal.models import Normal

        class SlowNormal(Normal):
            batched = True  # its step passes batches through

            def step(self, params, x):
                time.sleep(0.002)
                return super().step(params, x)
        """
    )
    (tmp_path / "slowmodels.py").write_text(slow)
    config = _write(tmp_path, model="slowmodels:SlowNormal", epochs=400)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradcal.cli", "run", str(config), "--out", str(out)],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        # a suite started in the background of a script runs with SIGINT ignored, and the
        # child would inherit that; Ctrl-C at a terminal is what this test stands for
        preexec_fn=_deliver_sigint,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "checkpoints" / "last.pt").exists():
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert f"gradcal run {config} --out {out} --resume" in stderr
    done = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    assert 0 < done < 400
    assert (out / "report.html").exists()  # a report of the partial run
    _gradcal("run", config, "--out", out, "--resume", cwd=tmp_path, check=True, timeout=600)
    with open(out / "history.csv") as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    assert epochs == list(range(len(epochs))) and len(epochs) > done


def test_user_model_and_loss_by_import_path(tmp_path):
    (tmp_path / "mine.py").write_text(
        SILENT.format(name="Shifted", noise="params[:, 1:]")
        + textwrap.dedent(
            """
            def squared_mean_gap(theta, y):
                return (theta[0] - y.mean()) ** 2 + (theta[1] - 1.0) ** 2
            """
        )
    )
    config = _write(tmp_path, model="mine:Shifted", options="{ n_timesteps = 30 }")
    _gradcal("run", config, "--out", tmp_path / "a", cwd=tmp_path, check=True)
    custom = _write(tmp_path, "custom.toml", model="mine:Shifted", options="{ n_timesteps = 30 }")
    custom.write_text(
        custom.read_text().replace(
            'kind = "mmd"', 'kind = "custom"\nfunction = "mine:squared_mean_gap"'
        )
    )
    _gradcal("run", custom, "--out", tmp_path / "b", cwd=tmp_path, check=True)


def test_data_from_a_csv_file(tmp_path):
    torch.manual_seed(0)
    values = (torch.randn(40) * 0.8 + 1.0).tolist()
    (tmp_path / "obs.csv").write_text(
        "day,x\n" + "".join(f"{i},{v}\n" for i, v in enumerate(values))
    )
    config = _write(
        # the configuration's Normal (NormalDraws) observes its n_timesteps draws: 40 values
        tmp_path,
        data='file = "obs.csv"\ncolumns = ["x"]',
        options="{ n_timesteps = 40 }",
    )
    _gradcal("run", config, "--out", tmp_path / "out", cwd=tmp_path, check=True)
    predictive = torch.load(tmp_path / "out" / "predictive.pt", weights_only=True)
    assert torch.allclose(predictive["observed"][0], torch.tensor(values))
    # the outputs carry the names of their columns, in the files and on the page
    assert predictive["names"] == ["x"]
    diagnostics = json.loads((tmp_path / "out" / "diagnostics.json").read_text())
    assert list(diagnostics["ppc"]) == ["x"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "output 0" not in page and "<td>x</td>" in page


def test_models_help_report_and_failures(tmp_path):
    listing = _gradcal("models", cwd=tmp_path, check=True).stdout
    for name in ("RandomWalk", "RamaCont", "BrockHommes", "SIR", "Normal"):
        assert name in listing
    for command in ("demo", "run", "check", "report", "models"):
        assert "examples:" in _gradcal(command, "--help", cwd=tmp_path, check=True).stdout
    assert _gradcal("report", tmp_path / "missing", cwd=tmp_path).returncode == 2
    (tmp_path / "partial").mkdir()
    _write(tmp_path / "partial", "config.toml")
    assert _gradcal("report", tmp_path / "partial", cwd=tmp_path, check=True).returncode == 0
    broken = _write(
        tmp_path,
        "broken.toml",
        model="RamaCont",
        options="{ n_agents = 10, n_timesteps = 5, s = 0.1, sigmoid_k = -1.0 }",
    )
    failed = _gradcal("check", broken, cwd=tmp_path)
    assert failed.returncode == 2 and "sigmoid_k" in failed.stderr


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_demo_contains_the_truth_and_says_the_fit_can_be_used(tmp_path, seed):
    # Each seed simulates its own data set and runs its own VI stream. A correct 90 %
    # interval misses a truth 1 time in 10 per parameter, so 2 parameters on 3 seeds could
    # fail by chance; the demo's w = 0.01 gives intervals that are wide for the loss's noise
    # (measured on these seeds: every truth inside, see the README), so a miss here means the
    # settings no longer work, not bad luck.
    out = tmp_path / "demo"
    _gradcal("demo", "--seed", seed, "--out", out, cwd=tmp_path, check=True, timeout=1800)
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["parameter"] for row in rows] == ["log10_sigma", "log10_eta"]  # gammas held
    for row in rows:
        assert float(row["q05"]) <= float(row["truth"]) <= float(row["q95"]), row
    khat = json.loads((out / "diagnostics.json").read_text())["khat"]
    page = (out / "report.html").read_text()
    top = page.split("<section>")[0]
    # k-hat from 4000 draws measured 0.31, 0.17, 0.19 on seeds 0-2 (the README): well below
    # 0.5, so every seed must read "the fit can be used"
    assert khat < 0.5 and "verdict-trust" in top
    assert "<td>returns</td>" in page  # the output carries its name


# --- bad input stops check and run before anything is trained or written ------------------


def _main(capsys, *args):
    """The command in this process (cheap: no interpreter start); (exit code, stderr)."""
    from gradcal.cli import main

    capsys.readouterr()
    code = main(["-q", *map(str, args)])
    return code, capsys.readouterr().err


def _csv_data(folder: Path, values, name="obs.csv") -> str:
    (folder / name).write_text("day,x\n" + "".join(f"{i},{v}\n" for i, v in enumerate(values)))
    return f'file = "{name}"\ncolumns = ["x"]'


BAD_INPUTS = {
    "text cell": (
        lambda d: _write(d, data=_csv_data(d, [1.0] * 10 + ["abc"] + [1.0] * 29)),
        "config error: data.file: obs.csv, row 12, column 'x': 'abc' is not a number",
    ),
    "blank cell": (
        lambda d: _write(d, data=_csv_data(d, [1.0] * 39 + [""])),
        "config error: data.file: obs.csv, row 41, column 'x': blank",
    ),
    "NaN cell": (
        lambda d: _write(d, data=_csv_data(d, ["nan"] + [1.0] * 39)),
        "config error: data.file: obs.csv, row 2, column 'x': 'nan' is not a finite number",
    ),
    "header only": (
        lambda d: _write(d, data=_csv_data(d, [])),
        "config error: data.file: obs.csv has no data rows (only a header?)",
    ),
    "too short": (
        lambda d: _write(d, data=_csv_data(d, [1.0])),
        "config error: data.file: obs.csv has 1 row; at least 2 are needed",
    ),
    "length": (  # 41 rows for Normal(n_timesteps = 40) (NormalDraws), which outputs 40
        lambda d: _write(d, data=_csv_data(d, [1.0] * 41)),
        "config error: data.file: obs.csv has 41 rows but NormalDraws with n_timesteps = 40 "
        "outputs 40 (n_timesteps); set model.options.n_timesteps = 41",
    ),
    "negative scale": (
        lambda d: (
            _write(d, options="{ n_timesteps = 40 }")
            .read_text()
            .replace("scale = 2.0", "scale = -2.0")
        ),
        "config error: parameters[0].prior.scale: must be > 0 (the scale of a normal prior), "
        "got -2.0",
    ),
    "zero scale": (
        lambda d: _write(d).read_text().replace("scale = 0.5", "scale = 0.0"),
        "config error: parameters[1].prior.scale: must be > 0 (the scale of a lognormal "
        "prior), got 0.0",
    ),
    "model is a string": (
        lambda d: (
            'model = "Normal"\n'
            + _write(d)
            .read_text()
            .replace('[model]\nname = "Normal"\noptions = { n_timesteps = 40 }', "")
        ),
        "config error: model: must be a table ([model] or model = { ... }), got 'Normal'",
    ),
    "list of the wrong type": (
        lambda d: _write(d).read_text().replace("[method]", '[method]\nhidden_features = ["a"]'),
        "config error: method.hidden_features: must be a list of integers, got ['a']",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_stops_check_and_run_with_one_line_and_exit_code_2(tmp_path, capsys, case):
    make, line = BAD_INPUTS[case]
    made = make(tmp_path)
    config = tmp_path / "config.toml"
    if isinstance(made, str):
        config.write_text(made)
    for command in ("check", "run"):
        out = tmp_path / "out"
        code, err = _main(capsys, command, config, *(["--out", out] if command == "run" else []))
        assert code == 2, err
        assert line in err.splitlines(), err
        assert not out.exists()  # run never started training, wrote nothing


SILENT = """
import torch
from gradcal.models import Model

class {name}(Model):  # declares no observed_lengths: outputs n_timesteps + 1 values
    batched = True
    n_params = 2
    history_length = 1

    def __init__(self, n_timesteps):
        super().__init__()
        self.n_timesteps = n_timesteps

    def initialize(self, params):
        return params[:, :1] * 0

    def step(self, params, x):
        return params[:, :1] + {noise} * torch.randn_like(params[:, :1])

    def observe(self, x):
        return [x]
"""


def test_run_checks_a_user_models_length_with_one_simulation(tmp_path, capsys):
    (tmp_path / "silent_model.py").write_text(SILENT.format(name="Silent", noise="params[:, 1:]"))
    config = _write(tmp_path, model="silent_model:Silent", data=_csv_data(tmp_path, [1.0] * 40))
    code, err = _main(capsys, "check", config)  # check does not simulate
    assert code == 0, err
    code, err = _main(capsys, "run", config, "--out", tmp_path / "out")
    assert code == 2, err
    assert (
        "config error: data.file: obs.csv has 40 rows but Silent with n_timesteps = 40 outputs "
        "41 (n_timesteps + 1); set model.options.n_timesteps = 39"
    ) in err.splitlines()
    assert not (tmp_path / "out").exists()


def test_a_run_whose_every_draw_fails_stops_at_the_first_epoch(tmp_path, capsys):
    (tmp_path / "nan_model.py").write_text(SILENT.format(name="Broken", noise="torch.nan"))
    config = _write(tmp_path, model="nan_model:Broken", epochs=50)
    code, err = _main(capsys, "run", config, "--out", tmp_path / "out")
    assert code == 1
    err = " ".join(err.split())
    assert "every draw failed (NaN or infinite loss) in 1 consecutive epoch(s), up to" in err
    assert "from the first epoch on: the simulator returns NaN" in err
    with open(tmp_path / "out" / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 1


# --- run folders never lose work -----------------------------------------------------------


def _events(out: Path) -> list[Path]:
    return sorted((out / "tensorboard").glob("events.out.tfevents.*"))


def test_a_folder_holding_a_run_is_refused_unless_overwrite(tmp_path, capsys):
    config, out = _write(tmp_path, epochs=2), tmp_path / "out"
    assert _main(capsys, "run", config, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert len(_events(out)) == 1
    code, err = _main(capsys, "run", config, "--out", out)
    assert code == 2
    assert f"config error: {out} already holds a run (config.toml, checkpoints" in err
    assert "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # the same from the launcher's side, before any process starts
    assert _main(capsys, "run", config, "--out", out, "--nproc", 2)[0] == 2
    (out / "notes.txt").write_text("mine")  # not the run's: kept
    assert _main(capsys, "run", config, "--out", out, "--overwrite")[0] == 0
    assert len(_events(out)) == 1  # the first run's TensorBoard events are gone
    assert (out / "notes.txt").read_text() == "mine"
    with open(out / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_resume_needs_a_checkpoint_and_a_vi_run(tmp_path, capsys):
    config, out = _write(tmp_path, epochs=2), tmp_path / "out"
    code, err = _main(capsys, "run", config, "--out", out, "--resume")
    assert code == 2
    assert f"config error: --resume: {out} holds no checkpoint (checkpoints/last.pt)" in err
    assert not out.exists()  # no silent fresh start
    smd = _write(tmp_path, "smd.toml", method="smd", epochs=2)
    code, err = _main(capsys, "run", smd, "--out", out, "--resume")
    assert code == 2 and "--resume: only VI runs continue from a checkpoint" in err
    code, err = _main(capsys, "run", config, "--out", out, "--resume", "--overwrite")
    assert code == 2 and "give one of them, not both" in err
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "report.html").write_text("an earlier demo")
    code, err = _main(capsys, "demo", "--out", demo)
    assert code == 2 and "already holds a run (report.html)" in err


def test_overwrite_never_removes_the_configuration_being_run(tmp_path, capsys):
    config = _write(tmp_path, epochs=2)  # tmp_path/config.toml
    text = config.read_text()
    code, err = _main(capsys, "run", config, "--out", tmp_path)
    assert code == 2 and "already holds a run (config.toml)" in err
    code, err = _main(capsys, "run", config, "--out", tmp_path, "--overwrite")
    assert code == 2 and "is the configuration being run; choose another --out" in err
    assert config.read_text() == text


def test_ctrl_c_while_writing_the_outputs_is_resumed_by_writing_them(
    tmp_path, capsys, monkeypatch
):
    import gradcal.runs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    config, out = _write(tmp_path, epochs=3), tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(gradcal.runs, "write_outputs", interrupted)
        code, err = _main(capsys, "run", config, "--out", out)
    assert code == 130
    assert "interrupted while writing the outputs" in err
    assert f"gradcal run {config} --out {out} --resume" in err
    assert not (out / "summary.csv").exists()
    assert _main(capsys, "run", config, "--out", out, "--resume")[0] == 0
    assert (out / "summary.csv").exists() and (out / "report.html").exists()
    with open(out / "history.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2]


# ---- torch threads (issue 29): the choice, not its timing ----


def test_thread_choice_default_rule():
    from gradcal.cli import DEMO_CONFIG, PARALLEL_WORK, choose_threads, step_work
    from gradcal.config import checked, loads_toml

    demo = checked(loads_toml(DEMO_CONFIG), Path.cwd(), None, None)
    assert step_work(demo) == 20 * 1000  # 20 draws of 1000 agents
    assert choose_threads(None, {}, step_work(demo), cores=2)[0] == 1
    assert choose_threads(None, {}, PARALLEL_WORK - 1, cores=8)[0] == 1
    assert choose_threads(None, {}, PARALLEL_WORK, cores=8)[0] == 8
    million = {"model": {"options": {"n_agents": 1_000_000}}, "method": {"kind": "vi"}}
    assert choose_threads(None, {}, step_work(million), cores=4)[0] == 4  # 10 draws
    sir = {"model": {"options": {"graph": {"n": 10_000}}}, "method": {"kind": "mcmc"}}
    assert step_work(sir) == 8 * 10_000  # 8 chains on 10,000 nodes
    assert choose_threads(None, {"OMP_NUM_THREADS": ""}, 0, cores=2)[0] == 1  # empty: unset


def test_thread_choice_honours_environment_and_option():
    from gradcal.cli import PARALLEL_WORK, choose_threads

    assert choose_threads(None, {"OMP_NUM_THREADS": "3"}, 10, cores=2) == (3, "OMP_NUM_THREADS=3")
    assert choose_threads(None, {"OMP_NUM_THREADS": "1"}, PARALLEL_WORK, cores=8)[0] == 1
    assert choose_threads("2", {"OMP_NUM_THREADS": "1"}, 10, cores=8) == (2, "--threads 2")
    assert choose_threads("5", {}, PARALLEL_WORK, cores=8)[0] == 5


def test_set_threads_sets_torch_and_logs(caplog):
    import argparse
    import logging

    from gradcal.cli import set_threads

    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="gradcal"):
            assert set_threads(argparse.Namespace(threads="2"), 0) == 2
        assert torch.get_num_threads() == 2
        assert "torch threads: 2 (--threads 2" in caplog.text
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "argv, env, name",
    [
        (["--threads", "0"], {}, "--threads"),
        (["--threads", "two"], {}, "--threads"),
        (["--threads", "-1"], {}, "--threads"),
        ([], {"OMP_NUM_THREADS": "x"}, "OMP_NUM_THREADS"),
    ],
)
def test_bad_thread_count_is_one_line_and_exit_2(tmp_path, argv, env, name):
    config = _write(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "gradcal.cli", "run", str(config), "--out", "o", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        timeout=120,
    )
    assert result.returncode == 2
    # libgomp adds a line of its own about a bad OMP_NUM_THREADS; gradcal's is one line
    lines = [x for x in result.stderr.splitlines() if x.strip() and not x.startswith("libgomp:")]
    assert len(lines) == 1 and name in lines[0] and "positive integer" in lines[0], lines
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_run_logs_its_thread_choice(tmp_path):
    config = _write(tmp_path, epochs=1)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # a plain shell
    result = subprocess.run(
        [sys.executable, "-m", "gradcal.cli", "-v", "run", str(config), "--out", "o"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch threads: 1 (one step is 4 elements" in result.stderr  # 4 draws, no agents


def test_kl_draws_default_for_runs_and_blackbirds_default_for_vi(tmp_path):
    """A run's VI takes KL_DRAWS Monte Carlo KL draws (chosen by measurement, see
    gradcal.config.KL_DRAWS); a BlackBIRDS-style VI(...) keeps BlackBIRDS' 10,000."""
    import inspect

    from gradcal.config import KL_DRAWS, checked, read_toml
    from gradcal.infer.vi import VI

    text = _write(tmp_path).read_text().replace("n_samples_regularisation = 64\n", "")
    (tmp_path / "config.toml").write_text(text)
    config = checked(read_toml(tmp_path / "config.toml"), tmp_path, None, None)
    assert config["method"]["n_samples_regularisation"] == KL_DRAWS == 1000
    default = inspect.signature(VI).parameters["n_samples_regularisation"].default
    assert default == 10_000
