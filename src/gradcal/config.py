"""Calibration runs described by TOML: the schema, its checks, defaults, and the objects.

A configuration has the tables ``[run]``, ``[model]``, ``[[parameters]]``, ``[data]``,
``[loss]`` and ``[method]`` (see ``examples/*.toml``). :func:`check` reports every problem
as one line naming the key's path, without simulating; :func:`resolve` fills in every
default; :func:`build` turns a resolved configuration into a model, prior, data and loss.
"""

from __future__ import annotations

import csv
import difflib
import importlib
import inspect
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradcal import models
from gradcal.kernels import GaussianKernel, LaplaceKernel
from gradcal.losses import EnergyDistanceLoss, MMDLoss, MSELoss, NegativeLogLikelihood
from gradcal.priors import PRIOR_KINDS, Product, marginal
from gradcal.rng import seeded

__all__ = [
    "BUILTIN_MODELS",
    "Built",
    "ConfigError",
    "build",
    "check",
    "dumps",
    "loads_toml",
    "read_toml",
    "relevant",
    "resolve",
]


@dataclass(frozen=True)
class _BuiltinModel:
    cls: type
    parameters: tuple[str, ...]
    summary: str
    options: dict[str, Any]


BUILTIN_MODELS: dict[str, _BuiltinModel] = {
    "RandomWalk": _BuiltinModel(
        models.RandomWalk,
        ("logit_p",),
        "steps of +1/-1, up with probability p",
        {"n_timesteps": 100},
    ),
    "RamaCont": _BuiltinModel(
        models.RamaCont,
        ("gamma_0", "gamma_1", "sigma", "eta"),
        "Cont (2005) threshold traders: volatility clustering in returns",
        {"n_agents": 1000, "n_timesteps": 100, "s": 0.1, "sigmoid_k": 5.0, "log10_params": True},
    ),
    "BrockHommes": _BuiltinModel(
        models.BrockHommesBeliefs,
        ("g2", "b2", "g3", "b3"),
        "Brock & Hommes (1998) heterogeneous beliefs (exact likelihood)",
        {"n_timesteps": 97, "beta": 120.0},
    ),
    "SIR": _BuiltinModel(
        models.SIR,
        ("log10_f", "log10_beta", "log10_gamma"),
        "SIR epidemic on a contact graph (graph = {kind, n, k, p, seed})",
        {
            "n_timesteps": 100,
            "graph": {"kind": "watts_strogatz", "n": 1000, "k": 10, "p": 0.1, "seed": 0},
        },
    ),
    "Normal": _BuiltinModel(
        models.Normal, ("mu", "sigma"), "i.i.d. Gaussian draws", {"n_timesteps": 100}
    ),
}

# key -> (type or tuple of types, default or _REQUIRED); a dict value is a sub-table
_REQUIRED = object()
_SCHEMA: dict[str, Any] = {
    "run": {"name": (str, "gradcal-run"), "seed": (int, 0), "device": (str, "cpu")},
    "model": {"name": (str, _REQUIRED), "options": (dict, {})},
    "data": {
        "file": (str, None),
        "columns": (list, None),
        "simulate": (bool, False),
        "at": (list, None),
    },
    "loss": {
        "kind": (str, "mmd"),
        "function": (str, None),
        "kernel": (str, "gaussian"),
        "bandwidth": ((int, float), None),
        "scales": (list, None),
        "window": (int, 1),
        "increments": (bool, False),
        "estimator": (str, "unbiased"),
        "gradient_horizon": (int, None),
        "chunk_size": (int, None),
    },
    "method": {
        "kind": (str, "vi"),
        # vi
        "family": (str, "nsf"),
        "transforms": (int, 3),
        "hidden_features": (list, [64, 64]),
        "estimator": (str, "pathwise"),
        "w": ((int, float), 1.0),
        "samples_per_epoch": (int, 10),
        "epochs": (int, 300),
        "patience": (int, 100),
        "learning_rate": ((int, float), 1e-2),
        "gradient_clipping_norm": ((int, float), 10.0),
        "n_samples_regularisation": (int, 1000),
        "posterior_samples": (int, 2000),
        # smd
        "starts": (int, 8),
        # mcmc
        "kernel": (str, "mala"),
        "chains": (int, 8),
        "samples": (int, 1000),
        "warmup": (int, 500),
        "n_leapfrog": (int, 10),
    },
}
# The [method] and [loss] keys each kind reads; the run folder's config.toml lists only these.
_METHOD_KEYS = {
    "vi": (
        "family",
        "transforms",
        "hidden_features",
        "estimator",
        "w",
        "samples_per_epoch",
        "epochs",
        "patience",
        "learning_rate",
        "gradient_clipping_norm",
        "n_samples_regularisation",
        "posterior_samples",
    ),
    "smd": ("starts", "epochs", "patience", "learning_rate", "gradient_clipping_norm"),
    "mcmc": ("kernel", "w", "chains", "samples", "warmup", "n_leapfrog"),
}
_FLOW_KEYS = ("transforms", "hidden_features")  # VI with family "nsf" or "maf" only
_SAMPLE_LOSS_KEYS = ("window", "increments", "gradient_horizon", "chunk_size")
_LOSS_KEYS = {
    "mmd": ("kernel", "bandwidth", "scales", "estimator", *_SAMPLE_LOSS_KEYS),
    "energy": _SAMPLE_LOSS_KEYS,
    "mse": ("gradient_horizon",),
    "nll": (),
    "custom": ("function",),
}
_PARAMETER_KEYS = {
    "name": (str, _REQUIRED),
    "prior": (dict, _REQUIRED),
    "truth": ((int, float), None),
}
_CHOICES = {
    ("loss", "kind"): ("mmd", "energy", "mse", "nll", "custom"),
    ("loss", "kernel"): ("gaussian", "laplace"),
    ("loss", "estimator"): ("unbiased", "biased", "linear"),
    ("method", "kind"): ("vi", "smd", "mcmc"),
    ("method", "family"): ("nsf", "maf", "diagonal", "full_rank"),
    ("method", "estimator"): ("pathwise", "forward", "score"),
    ("method", "kernel"): ("mala", "hmc"),
}


class ConfigError(ValueError):
    """A configuration with problems; ``problems`` lists one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def loads_toml(text: str, source: str = "<text>") -> dict[str, Any]:
    """Parse TOML text (tomllib on Python >= 3.11, the ``tomli`` backport before).

    A syntax error raises :class:`ConfigError` with one line naming ``source``.

    Example:
        >>> loads_toml('[run]\\nseed = 3')
        {'run': {'seed': 3}}
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the backport, a declared dependency on Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{source}: not valid TOML ({error})"]) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or a syntax error raises :class:`ConfigError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: not valid TOML (not UTF-8 text: {error})"]) from None
    return loads_toml(text, str(path))


def _unknown(key: str, known: Any, path: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{path}{key}: unknown key{hint}"


def _type_name(types: Any) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(
        {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "true/false",
            "list": "a list",
            "dict": "a table",
        }[t.__name__]
        for t in types
    )


def _check_table(table: Any, schema: dict[str, Any], path: str, problems: list[str]) -> None:
    if not isinstance(table, dict):
        problems.append(f"{path.rstrip('.')}: must be a table")
        return
    for key, value in table.items():
        if key not in schema:
            problems.append(_unknown(key, schema, path))
            continue
        types, _ = schema[key]
        if (
            isinstance(value, bool)
            and bool not in (types if isinstance(types, tuple) else (types,))
        ) or not isinstance(value, types):
            problems.append(f"{path}{key}: must be {_type_name(types)}, got {value!r}")
    for key, (_, default) in schema.items():
        if default is _REQUIRED and key not in table:
            problems.append(f"{path}{key}: missing (required)")


def _import(target: str, path: str, problems: list[str], base: Path) -> Any:
    if ":" not in target:
        problems.append(f"{path}: {target!r} must read 'package.module:Name'")
        return None
    module, name = target.split(":", 1)
    for folder in (str(base), str(Path.cwd())):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        problems.append(f"{path}: cannot import {target!r} ({error})")
        return None


def _model_class(config: dict[str, Any], problems: list[str], base: Path) -> Any:
    name = config.get("model", {}).get("name")
    if not isinstance(name, str):
        return None
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name].cls
    if ":" not in name:
        close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(
            f"model.name: unknown model {name!r}{hint}; built-in: "
            f"{', '.join(BUILTIN_MODELS)}, or 'package.module:Class'"
        )
        return None
    return _import(name, "model.name", problems, base)


def _check_parameters(config: dict[str, Any], problems: list[str]) -> None:
    parameters = config.get("parameters")
    if not isinstance(parameters, list) or not parameters:
        problems.append("parameters: missing: give one [[parameters]] table per parameter")
        return
    for i, p in enumerate(parameters):
        path = f"parameters[{i}]."
        _check_table(p, _PARAMETER_KEYS, path, problems)
        prior = p.get("prior") if isinstance(p, dict) else None
        if not isinstance(prior, dict):
            continue
        kind = prior.get("kind")
        if kind not in PRIOR_KINDS:
            close = difflib.get_close_matches(str(kind), list(PRIOR_KINDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"{path}prior.kind: unknown prior {kind!r}{hint}; known: {', '.join(PRIOR_KINDS)}"
            )
            continue
        expected = PRIOR_KINDS[kind][1]
        for key, value in prior.items():
            if key == "kind":
                continue
            if key not in expected:
                problems.append(_unknown(key, expected, f"{path}prior."))
            elif isinstance(value, bool) or not isinstance(value, int | float):
                problems.append(f"{path}prior.{key}: must be a number, got {value!r}")
        for key in expected:
            if key not in prior:
                problems.append(
                    f"{path}prior.{key}: missing (a {kind} prior needs {', '.join(expected)})"
                )
        if not any(q.startswith(path + "prior") for q in problems):
            try:
                marginal(kind, **{k: v for k, v in prior.items() if k != "kind"})
            except ValueError as error:
                problems.append(f"{path}prior: {error}")


def _check_data(config: dict[str, Any], problems: list[str], base: Path) -> None:
    data = config.get("data")
    if not isinstance(data, dict):
        problems.append("data: missing: give a file or simulate = true")
        return
    if data.get("simulate") and data.get("file"):
        problems.append("data: give either file or simulate = true, not both")
    elif not data.get("simulate") and not data.get("file"):
        problems.append("data: give a file (with columns) or simulate = true")
    if isinstance(data.get("file"), str):
        file = base / data["file"]
        if not file.exists():
            problems.append(f"data.file: no such file {str(file)!r}")
        elif file.suffix.lower() not in (".csv", ".npy", ".parquet"):
            problems.append(
                f"data.file: {file.suffix!r} files are not read; use .csv, .npy or .parquet"
            )
    if data.get("simulate"):
        at = data.get("at")
        truths = [p.get("truth") for p in config.get("parameters", []) if isinstance(p, dict)]
        if at is None and any(t is None for t in truths):
            problems.append(
                "data.at: missing: simulate = true needs data.at or a truth for every parameter"
            )


_AT_LEAST_ONE = (
    "samples_per_epoch",
    "epochs",
    "posterior_samples",
    "starts",
    "chains",
    "samples",
    "n_leapfrog",
    "n_samples_regularisation",
    "transforms",
)


def _check_ranges(config: dict[str, Any], problems: list[str]) -> None:
    method = config.get("method") if isinstance(config.get("method"), dict) else {}
    for key in _AT_LEAST_ONE:
        value = method.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            problems.append(f"method.{key}: must be >= 1, got {value}")
    for key in ("w", "learning_rate"):
        value = method.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
            problems.append(f"method.{key}: must be > 0, got {value}")
    device = config.get("run", {}).get("device") if isinstance(config.get("run"), dict) else None
    if isinstance(device, str):
        try:
            torch.device(device)
        except RuntimeError:
            problems.append(f"run.device: {device!r} is not a torch device (e.g. 'cpu', 'cuda')")
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    at, parameters = data.get("at"), config.get("parameters")
    if isinstance(at, list) and isinstance(parameters, list) and len(at) != len(parameters):
        problems.append(f"data.at: {len(at)} value(s) for {len(parameters)} parameter(s)")
    columns, file = data.get("columns"), data.get("file")
    if isinstance(columns, list) and isinstance(file, str):
        kind = int if file.lower().endswith(".npy") else str
        if not all(isinstance(c, kind) and not isinstance(c, bool) for c in columns):
            what = "column indices (integers)" if kind is int else "column names (strings)"
            problems.append(f"data.columns: must be {what} for {Path(file).suffix} files")
    loss = config.get("loss") if isinstance(config.get("loss"), dict) else {}
    if loss.get("function") and loss.get("kind", "mmd") != "custom":
        problems.append('loss.function: only used with kind = "custom"')


def check(config: dict[str, Any], base: str | Path = ".") -> list[str]:
    """Every problem of a configuration, one line each with the key's path; [] when fine.

    Checks unknown keys (suggesting the closest known one), types, choices, required keys,
    files, importable user code, and that the number of parameters matches the model. Builds
    the model (cheap) but never simulates.
    """
    base = Path(base)
    problems: list[str] = []
    known = {**_SCHEMA, "parameters": None}
    for key in config:
        if key not in known:
            problems.append(_unknown(key, known, ""))
    for table, schema in _SCHEMA.items():
        if table in config:
            _check_table(config[table], schema, f"{table}.", problems)
        elif any(d is _REQUIRED for _, d in schema.values()):
            problems.append(f"{table}: missing table [{table}]")
    for (table, key), choices in _CHOICES.items():
        value = config.get(table, {}).get(key) if isinstance(config.get(table), dict) else None
        if isinstance(value, str) and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{table}.{key}: {value!r} is not one of {', '.join(choices)}{hint}")
    _check_parameters(config, problems)
    _check_data(config, problems, base)
    _check_ranges(config, problems)
    loss = config.get("loss", {}) if isinstance(config.get("loss"), dict) else {}
    if loss.get("kind") == "custom":
        if not loss.get("function"):
            problems.append(
                "loss.function: missing: a custom loss names 'package.module:function'"
            )
        else:
            _import(loss["function"], "loss.function", problems, base)
    cls = _model_class(config, problems, base)
    if problems:
        return problems
    if cls is not None:
        try:
            model = _make_model(cls, _model_options(config["model"]), config["model"]["name"])
        except (TypeError, ValueError) as error:
            return [f"model.options: {error}"]
        n = getattr(model, "n_params", None)
        if n is not None and n != len(config["parameters"]):
            problems.append(
                f"parameters: the model takes {n} parameter(s) but "
                f"{len(config['parameters'])} are given"
            )
        if loss.get("kind") == "nll" and not hasattr(model, "log_likelihood"):
            problems.append(
                f"loss.kind: 'nll' needs a model with log_likelihood; "
                f"{type(model).__name__} has none"
            )
    return problems


def resolve(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration with every default filled in (raises :class:`ConfigError`)."""
    resolved: dict[str, Any] = {}
    for table, schema in _SCHEMA.items():
        given = dict(config.get(table, {}))
        resolved[table] = {k: given.get(k, d) for k, (_, d) in schema.items()}
        if table == "model":
            resolved[table]["options"] = _model_options(given)
    resolved["parameters"] = [dict(p) for p in config["parameters"]]
    return resolved


def relevant(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration without the [method] and [loss] keys its kinds do not read.

    A resolved configuration holds every key of every method; a VI run does not read
    ``chains`` or ``warmup``, an NLL loss no ``kernel``, an HMC run alone ``n_leapfrog``.

    Example:
        >>> config = {"method": {"kind": "vi", "family": "diagonal", "w": 1.0, "chains": 8,
        ...                      "transforms": 3}, "loss": {"kind": "nll", "kernel": "gaussian"}}
        >>> relevant(config)
        {'method': {'kind': 'vi', 'family': 'diagonal', 'w': 1.0}, 'loss': {'kind': 'nll'}}
    """
    out = dict(config)
    method = config.get("method")
    if isinstance(method, dict) and method.get("kind") in _METHOD_KEYS:
        kind = method["kind"]
        keep = set(_METHOD_KEYS[kind]) | {"kind"}
        if kind == "vi" and method.get("family") not in ("nsf", "maf"):
            keep -= set(_FLOW_KEYS)
        if kind == "mcmc" and method.get("kernel") != "hmc":
            keep.discard("n_leapfrog")
        out["method"] = {k: v for k, v in method.items() if k in keep}
    loss = config.get("loss")
    if isinstance(loss, dict) and loss.get("kind") in _LOSS_KEYS:
        keep = set(_LOSS_KEYS[loss["kind"]]) | {"kind"}
        out["loss"] = {k: v for k, v in loss.items() if k in keep}
    return out


def dumps(config: dict[str, Any]) -> str:
    """TOML text of a resolved configuration (None values and keys its method and loss kinds
    do not read are left out, see :func:`relevant`)."""
    config = relevant(config)

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return (
                "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items() if x is not None) + "}"
            )
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines = []
    for table in ("run", "model", "data", "loss", "method"):
        lines.append(f"[{table}]")
        lines += [f"{k} = {value(v)}" for k, v in config[table].items() if v is not None]
        lines.append("")
    for p in config["parameters"]:
        lines.append("[[parameters]]")
        lines += [f"{k} = {value(v)}" for k, v in p.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def _model_options(model: dict[str, Any]) -> dict[str, Any]:
    """The model's keyword arguments: a built-in model's defaults, then the given ones."""
    defaults = BUILTIN_MODELS[model["name"]].options if model.get("name") in BUILTIN_MODELS else {}
    return {**defaults, **model.get("options", {})}


def _make_model(cls: Any, options: dict[str, Any], name: str) -> Any:
    options = dict(options)
    if isinstance(options.get("graph"), dict):  # a graph described by a table
        import networkx

        spec = dict(options.pop("graph"))
        kind = spec.pop("kind", "watts_strogatz")
        makers = {
            "watts_strogatz": networkx.watts_strogatz_graph,
            "erdos_renyi": networkx.erdos_renyi_graph,
            "barabasi_albert": networkx.barabasi_albert_graph,
        }
        if kind not in makers:
            raise ValueError(f"graph kind {kind!r} is not one of {', '.join(makers)}")
        options["graph"] = makers[kind](**spec)
    if inspect.isclass(cls):
        return cls(**options)
    raise TypeError(f"{name!r} is not a class")


@dataclass
class Built:
    """Everything a run needs, made from a resolved configuration."""

    model: Any
    prior: Product
    names: list[str]
    truth: list[float | None]
    data: list[torch.Tensor]
    loss: Any

    @property
    def observed(self) -> torch.Tensor | list[torch.Tensor]:
        """The data as a loss receives it: one tensor for one output, else the list."""
        return self.data[0] if len(self.data) == 1 else self.data


def _read_data(data: dict[str, Any], base: Path) -> list[torch.Tensor]:
    file = base / data["file"]
    columns = data.get("columns")
    if file.suffix.lower() == ".npy":
        array = np.load(file)
        array = array[:, None] if array.ndim == 1 else array
        series = [array[:, i] for i in range(array.shape[1])]
    elif file.suffix.lower() == ".parquet":
        import pandas

        frame = pandas.read_parquet(file)
        series = [frame[c].to_numpy() for c in (columns or frame.columns)]
        columns = None
    else:
        with open(file, newline="") as f:
            reader = csv.DictReader(f)
            names = reader.fieldnames or []
            use = columns or list(names)
            missing = [c for c in use if c not in names]
            if missing:
                raise ConfigError([f"data.columns: {missing} not in {file.name} (has {names})"])
            rows = list(reader)
        series = [np.array([float(r[c]) for r in rows]) for c in use]
        columns = None
    if columns is not None and file.suffix.lower() == ".npy":
        series = [series[i] for i in columns]
    return [torch.tensor(s, dtype=torch.get_default_dtype()) for s in series]


def build(config: dict[str, Any], base: str | Path = ".") -> Built:
    """Model, prior, data and loss from a resolved configuration (simulates only for
    ``data.simulate``)."""
    base = Path(base)
    problems: list[str] = []
    cls = _model_class(config, problems, base)
    if problems:
        raise ConfigError(problems)
    model = _make_model(cls, config["model"]["options"], config["model"]["name"])
    params = config["parameters"]
    prior = Product(
        [
            marginal(p["prior"]["kind"], **{k: v for k, v in p["prior"].items() if k != "kind"})
            for p in params
        ]
    )
    names, truth = [p["name"] for p in params], [p.get("truth") for p in params]
    data_cfg = config["data"]
    if data_cfg["simulate"]:
        at = torch.tensor(
            data_cfg["at"] if data_cfg["at"] is not None else truth,
            dtype=torch.get_default_dtype(),
        )
        with seeded(config["run"]["seed"] + 1, torch.device(config["run"]["device"])):
            data = [y.detach() for y in model.run_and_observe(at)]
    else:
        data = _read_data(data_cfg, base)
    return Built(model, prior, names, truth, data, _make_loss(config["loss"], model, data, base))


def _make_loss(cfg: dict[str, Any], model: Any, data: list[torch.Tensor], base: Path) -> Any:
    kind = cfg["kind"]
    if kind == "custom":
        problems: list[str] = []
        loss = _import(cfg["function"], "loss.function", problems, base)
        if problems:
            raise ConfigError(problems)
        return loss
    if kind == "nll":
        return NegativeLogLikelihood(model)
    if kind == "mse":
        return MSELoss(model, data, cfg["gradient_horizon"])
    options = {
        "window": cfg["window"],
        "increments": cfg["increments"],
        "chunk_size": cfg["chunk_size"],
    }
    if kind == "energy":
        return EnergyDistanceLoss(model, data, cfg["gradient_horizon"], **options)
    kernel_cls = GaussianKernel if cfg["kernel"] == "gaussian" else LaplaceKernel
    kernel = (
        kernel_cls(bandwidth=cfg["bandwidth"])
        if cfg["bandwidth"] is not None
        else kernel_cls(scales=tuple(cfg["scales"] or (1.0,)))
    )
    return MMDLoss(
        model, data, kernel, cfg["gradient_horizon"], estimator=cfg["estimator"], **options
    )
