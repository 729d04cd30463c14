"""config.check: data files, data lengths, priors and structural mistakes, one line each."""

import copy
import math

import numpy as np
import pytest
import torch

from gradcal.config import _SCHEMA, check, read_data
from gradcal.priors import marginal

BASE = {
    "run": {"seed": 0},
    "model": {"name": "Normal", "options": {"n_timesteps": 5}},
    "data": {"file": "obs.csv", "columns": ["x"]},
    "loss": {"kind": "mmd"},
    "method": {"kind": "vi"},
    "parameters": [
        {"name": "mu", "prior": {"kind": "normal", "loc": 0.0, "scale": 2.0}},
        {"name": "sigma", "prior": {"kind": "lognormal", "loc": 0.0, "scale": 0.5}},
    ],
}


def _config(**changes):
    config = copy.deepcopy(BASE)
    for path, value in changes.items():
        *tables, key = path.split("__")
        target = config
        for t in tables:
            target = target[int(t)] if t.isdigit() else target[t]
        target[key] = value
    return config


def _csv(folder, cells, name="obs.csv"):
    (folder / name).write_text("t,x\n" + "".join(f"{i},{c}\n" for i, c in enumerate(cells)))


@pytest.mark.parametrize(
    ("cell", "problem"),
    [
        ("abc", "'abc' is not a number"),
        ("", "blank"),
        ("nan", "'nan' is not a finite number"),
        ("-inf", "'-inf' is not a finite number"),
    ],
)
def test_a_bad_csv_cell_is_one_line_naming_file_row_and_column(tmp_path, cell, problem):
    _csv(tmp_path, ["1.0", "2.0", cell, "3.0", "4.0"])
    # header = row 1, so the third value sits on row 4 as a spreadsheet shows it
    assert check(_config(), tmp_path) == [f"data.file: obs.csv, row 4, column 'x': {problem}"]


def test_many_bad_cells_are_still_one_line_per_column(tmp_path):
    (tmp_path / "obs.csv").write_text("t,x\n0,a\n1,b\n2\n3,4\n4,5\n")  # row 4 lacks its cell
    assert check(_config(), tmp_path) == [
        "data.file: obs.csv, row 2, column 'x': 'a' is not a number "
        "(2 more bad cell(s) in this column)"
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "obs.csv is empty (expected a header row)"),
        ("t,x\n", "obs.csv has no data rows (only a header?)"),
        ("t,x\n0,1.0\n", "obs.csv has 1 row; at least 2 are needed"),
    ],
)
def test_empty_header_only_and_one_row_files(tmp_path, text, problem):
    (tmp_path / "obs.csv").write_text(text)
    assert check(_config(), tmp_path) == [f"data.file: {problem}"]


def test_npy_files_name_the_bad_element(tmp_path):
    values = np.ones((5, 2))
    values[3, 1] = np.nan
    np.save(tmp_path / "obs.npy", values)
    config = _config(data__file="obs.npy", data__columns=[1])
    assert check(config, tmp_path) == [
        "data.file: obs.npy, row 3, column 1: nan is not a finite number"
    ]
    np.save(tmp_path / "obs.npy", np.ones((5, 2, 2)))
    assert "expected (T,) or (T, columns)" in check(config, tmp_path)[0]
    np.save(tmp_path / "obs.npy", np.array(["a", "b"]))
    assert check(config, tmp_path) == ["data.file: obs.npy holds <U1 values, not numbers"]
    np.save(tmp_path / "obs.npy", np.ones((5, 2)))
    assert check(config, tmp_path) == []
    assert check(_config(data__file="obs.npy", data__columns=[2]), tmp_path) == [
        "data.columns: [2] out of range for obs.npy (2 column(s))"
    ]


def test_read_data_returns_the_columns(tmp_path):
    _csv(tmp_path, ["1.5", " 2.5 ", "-3e-2"])
    (x,) = read_data({"file": "obs.csv", "columns": ["x"]}, tmp_path)
    assert torch.equal(x, torch.tensor([1.5, 2.5, -0.03]))


# Each built-in model's rule (documented in the README) relating rows and n_timesteps:
# the simulated output's length, checked here against a real simulation.
LENGTH_RULES = [
    ("RandomWalk", {}, 1, 1),  # positions x_0..x_T: T + 1
    ("RamaCont", {"n_agents": 20}, 4, 1),  # returns r_0..r_T: T + 1
    ("BrockHommes", {}, 4, 0),  # prices x_3..x_{T+2}: T
    ("Normal", {}, 2, 0),  # T draws
]


@pytest.mark.parametrize(("name", "options", "n_params", "offset"), LENGTH_RULES)
def test_data_length_must_match_what_the_model_outputs(tmp_path, name, options, n_params, offset):
    from gradcal.config import BUILTIN_MODELS

    n = 12
    model = BUILTIN_MODELS[name].cls(
        **{**BUILTIN_MODELS[name].options, **options, "n_timesteps": n}
    )
    params = {"BrockHommes": torch.tensor([0.9, 0.2, 0.9, -0.2])}.get(name, torch.zeros(n_params))
    (simulated,) = model.run_and_observe(params)
    assert simulated.shape[0] == n + offset  # the rule is the code's
    parameters = [
        {"name": f"p{i}", "prior": {"kind": "normal", "loc": 0.0, "scale": 1.0}}
        for i in range(n_params)
    ]
    config = _config(model__name=name, model__options={**options, "n_timesteps": n})
    config["parameters"] = parameters
    _csv(tmp_path, ["0.5"] * (n + offset))
    assert check(config, tmp_path) == []
    _csv(tmp_path, ["0.5"] * (n + offset + 1))  # e.g. 201 rows with n_timesteps = 200
    rule = {0: "(n_timesteps)", 1: "(n_timesteps + 1)"}[offset]
    assert check(config, tmp_path) == [
        f"data.file: obs.csv has {n + offset + 1} rows but {BUILTIN_MODELS[name].cls.__name__} "
        f"with n_timesteps = {n} "
        f"outputs {n + offset} {rule}; set model.options.n_timesteps = {n + 1}"
    ]


def test_sir_needs_two_columns_of_t_plus_one_rows(tmp_path):
    graph = {"kind": "watts_strogatz", "n": 20, "k": 4, "p": 0.1, "seed": 0}
    parameters = [
        {"name": f"p{i}", "prior": {"kind": "normal", "loc": -1.0, "scale": 0.1}} for i in range(3)
    ]
    config = _config(
        model__name="SIR", model__options={"n_timesteps": 6, "graph": graph}, data__columns=None
    )
    config["parameters"] = parameters
    del config["data"]["columns"]
    (tmp_path / "obs.csv").write_text("i,r\n" + "1,0\n" * 7)
    assert check(config, tmp_path) == []
    (tmp_path / "obs.csv").write_text("i\n" + "1\n" * 7)
    assert check(config, tmp_path) == [
        "data.columns: 1 column(s) for SIR's 2 output(s); give one column per output"
    ]
    (tmp_path / "obs.csv").write_text("i,r\n" + "1,0\n" * 6)
    assert check(config, tmp_path) == [
        "data.file: obs.csv, column 1, has 6 rows but SIR with n_timesteps = 6 outputs 7 "
        "(n_timesteps + 1); set model.options.n_timesteps = 5",
        "data.file: obs.csv, column 2, has 6 rows but SIR with n_timesteps = 6 outputs 7 "
        "(n_timesteps + 1); set model.options.n_timesteps = 5",
    ]


def test_the_loss_window_must_fit_the_data(tmp_path):
    _csv(tmp_path, ["1.0"] * 5)
    assert check(_config(loss__window=6), tmp_path) == [
        "loss.window: must lie in [1, 5] (the length of the data), got 6"
    ]
    assert check(_config(loss__window=5), tmp_path) == []


@pytest.mark.parametrize(
    ("kind", "key", "value", "problem"),
    [
        ("normal", "scale", -1.0, "must be > 0 (the scale of a normal prior), got -1.0"),
        ("normal", "scale", 0.0, "must be > 0 (the scale of a normal prior), got 0.0"),
        ("lognormal", "scale", 0, "must be > 0 (the scale of a lognormal prior), got 0"),
        ("halfnormal", "scale", -2.0, "must be > 0 (the scale of a halfnormal prior), got -2.0"),
        ("laplace", "scale", -0.5, "must be > 0 (the scale of a laplace prior), got -0.5"),
        ("gamma", "rate", -1.0, "must be > 0 (the rate of a gamma prior), got -1.0"),
        (
            "gamma",
            "concentration",
            0.0,
            "must be > 0 (the concentration of a gamma prior), got 0.0",
        ),
        ("beta", "concentration0", -3, "must be > 0 (the concentration0 of a beta prior), got -3"),
        ("normal", "loc", math.nan, "must be a finite number, got nan"),
        ("uniform", "high", math.inf, "must be a finite number, got inf"),
    ],
)
def test_invalid_prior_parameters_name_the_key(tmp_path, kind, key, value, problem):
    _csv(tmp_path, ["1.0"] * 5)
    valid = {
        "normal": {"loc": 0.0, "scale": 1.0},
        "lognormal": {"loc": 0.0, "scale": 1.0},
        "halfnormal": {"scale": 1.0},
        "laplace": {"loc": 0.0, "scale": 1.0},
        "gamma": {"concentration": 2.0, "rate": 1.0},
        "beta": {"concentration1": 2.0, "concentration0": 2.0},
        "uniform": {"low": 0.0, "high": 1.0},
    }[kind]
    prior = {"kind": kind, **valid, key: value}
    assert check(_config(parameters__0__prior=prior), tmp_path) == [
        f"parameters[0].prior.{key}: {problem}"
    ]
    with pytest.raises(ValueError, match=key):
        marginal(kind, **{k: v for k, v in prior.items() if k != "kind"})


def test_truth_and_simulation_point_must_lie_inside_the_prior(tmp_path):
    _csv(tmp_path, ["1.0"] * 5)
    config = _config()
    config["parameters"][1]["truth"] = -0.5
    assert check(config, tmp_path) == [
        "parameters[1].truth: -0.5 lies outside the lognormal prior's support (> 0.0)"
    ]
    config = _config(data={"simulate": True, "at": [0.0, -1.0]})
    assert check(config, tmp_path) == [
        "data.at[1]: -1.0 lies outside the lognormal prior's support (> 0.0)"
    ]


def _wrong_shapes():
    """(path, value) pairs putting a table where a value belongs, a value where a table
    belongs, and lists of the wrong type, for every key of the schema."""
    for table, schema in _SCHEMA.items():
        yield table, "x"  # model = "x" instead of a [model] table
        yield table, [1, 2]
        for key, (types, _) in schema.items():
            types = types if isinstance(types, tuple) else (types,)
            if dict not in types:
                yield f"{table}__{key}", {"a": 1}  # a table where a value belongs
            if list in types:
                yield f"{table}__{key}", [{"a": 1}]
            else:
                yield f"{table}__{key}", ["x"]
    yield "parameters", {"name": "mu"}  # [parameters] instead of [[parameters]]
    yield "parameters", 3
    yield "parameters", ["mu"]
    yield "parameters__0__prior", "normal"
    yield "parameters__0__prior__scale", {"a": 1}
    yield "parameters__0__name", ["mu"]


@pytest.mark.parametrize(("path", "value"), list(_wrong_shapes()))
def test_every_structural_mistake_is_one_line_naming_the_key(tmp_path, path, value):
    _csv(tmp_path, ["1.0"] * 5)
    problems = check(_config(**{path: value}), tmp_path)
    key = path.replace("__", ".")
    key = key.replace("parameters.0", "parameters[0]")
    assert problems, f"{path} = {value!r} passed"
    assert any(p.startswith(key) for p in problems), problems
    assert all(p.count("\n") == 0 for p in problems)


def test_loss_checkpoint_every_must_be_at_least_one(tmp_path):
    _csv(tmp_path, ["1.0"] * 5)
    assert check(_config(loss__checkpoint_every=0), tmp_path) == [
        "loss.checkpoint_every: must be >= 1, got 0"
    ]
    assert check(_config(loss__checkpoint_every=2), tmp_path) == []
