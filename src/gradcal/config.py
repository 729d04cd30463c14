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
from gradcal.infer.weight import CALIBRATE, RESAMPLE
from gradcal.kernels import GaussianKernel, LaplaceKernel
from gradcal.losses import (
    EnergyDistanceLoss,
    MMDLoss,
    MSELoss,
    NegativeLogLikelihood,
    SignatureMMDLoss,
)
from gradcal.models.fixed import fix_parameters
from gradcal.priors import PRIOR_KINDS, Product, marginal, marginal_problems
from gradcal.rng import seeded
from gradcal.signature import TRANSFORMS as SIGNATURE_TRANSFORMS

__all__ = [
    "BUILTIN_MODELS",
    "KL_DRAWS",
    "OBJECTIVE_OPTIONS",
    "Built",
    "ConfigError",
    "build",
    "check",
    "checked",
    "dumps",
    "is_fixed",
    "length_problems",
    "loads_toml",
    "read_data",
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
        models.NormalDraws, ("mu", "sigma"), "i.i.d. Gaussian draws", {"n_timesteps": 100}
    ),
    "AR1": _BuiltinModel(
        models.AR1, ("phi", "sigma"), "stationary Gaussian AR(1)", {"n_timesteps": 100}
    ),
}

#: Monte Carlo draws of KL(q || prior) in a run's VI when no closed form exists
#: (``method.n_samples_regularisation``). Chosen by the Monte Carlo error of the KL's
#: gradient against that of the loss term (20 draws), for an NSF flow near the posterior
#: (measured 2026-12-08, docs/calibrating-generalised-variational-inference.md): with 1000
#: draws the KL gradient's sd is 0.07 (Normal model, exact likelihood) and 0.22 (the demo's
#: Rama Cont, MMD, w = 0.01) of the loss gradient's, adding 0.3 % and 2.3 % to the sd of the
#: whole gradient, at 60 ms of CPU against 380 ms for BlackBIRDS' 10,000.
KL_DRAWS = 1000

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
        "checkpoint_every": (int, None),
        # signature
        "static_kernel": (str, "rbf"),
        "transforms": (list, ["time"]),
        "scale": ((int, float), None),
        "dyadic_order": (int, 0),
        "path_window": (int, None),
        "stride": (int, None),
        "panel": (bool, False),
        "simulations": (int, 2),
    },
    "method": {
        "kind": (str, "vi"),
        # vi
        "family": (str, "nsf"),
        "transforms": (int, 3),
        "hidden_features": (list, [64, 64]),
        "components": (int, 4),
        "init": (str, "prior"),  # where q starts: the prior's moments, or "family": N(0, 1)
        "estimator": (str, "pathwise"),
        "objective": (str, "reverse_kl"),
        "k": (int, 8),
        "alpha": ((int, float), 0.5),
        "doubly_reparameterised": (bool, True),
        "sticking_the_landing": (bool, False),
        "w": ((int, float, str), 1.0),  # or "calibrate"
        "w_resample": (str, "block"),  # how w = "calibrate" resamples the data
        "anneal_epochs": (int, 0),
        "anneal_start": ((int, float), None),
        "samples_per_epoch": (int, 10),
        "epochs": (int, 300),
        "patience": (int, 100),
        "learning_rate": ((int, float), 1e-2),
        "learning_rate_schedule": (str, "constant"),  # or "cosine": down to 1 % at the end
        "stopping": (str, "smoothed"),  # or "blackbirds": the best single epoch's q
        "gradient_clipping_norm": ((int, float), 10.0),
        "n_samples_regularisation": (int, KL_DRAWS),  # VI(...) keeps BlackBIRDS' 10,000
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
# VI's objective and the options each objective reads (gradcal.infer.objectives)
OBJECTIVE_OPTIONS = {
    "reverse_kl": ("sticking_the_landing",),
    "importance_weighted": ("k", "doubly_reparameterised"),
    "renyi": ("alpha", "k", "doubly_reparameterised"),
    "forward_kl": (),
}
_OBJECTIVE_KEYS = ("objective", "k", "alpha", "doubly_reparameterised", "sticking_the_landing")
# The [method] and [loss] keys each kind reads; the run folder's config.toml lists only these.
_METHOD_KEYS = {
    "vi": (
        "family",
        "transforms",
        "hidden_features",
        "components",
        "init",
        "estimator",
        *_OBJECTIVE_KEYS,
        "w",
        "anneal_epochs",
        "anneal_start",
        "w_resample",
        "samples_per_epoch",
        "epochs",
        "patience",
        "learning_rate",
        "learning_rate_schedule",
        "stopping",
        "gradient_clipping_norm",
        "n_samples_regularisation",
        "posterior_samples",
    ),
    "smd": ("starts", "epochs", "patience", "learning_rate", "gradient_clipping_norm"),
    "mcmc": ("kernel", "w", "w_resample", "chains", "samples", "warmup", "n_leapfrog"),
}
_FLOW_KEYS = ("transforms", "hidden_features")  # VI with family "nsf", "maf", "flow_mixture"
_SAMPLE_LOSS_KEYS = ("window", "increments", "gradient_horizon", "chunk_size", "checkpoint_every")
_LOSS_KEYS = {
    "mmd": ("kernel", "bandwidth", "scales", "estimator", *_SAMPLE_LOSS_KEYS),
    "energy": _SAMPLE_LOSS_KEYS,
    "signature": (
        "static_kernel",
        "bandwidth",
        "transforms",
        "scale",
        "dyadic_order",
        "path_window",
        "stride",
        "panel",
        "simulations",
        "increments",
        "estimator",
        "gradient_horizon",
        "chunk_size",
        "checkpoint_every",
    ),
    "mse": ("gradient_horizon", "checkpoint_every"),
    "nll": (),
    "custom": ("function",),
}
_PARAMETER_KEYS = {
    "name": (str, _REQUIRED),
    "prior": (dict, None),
    "value": ((int, float), None),  # a fixed parameter: no prior, not calibrated
    "truth": ((int, float), None),
}
# lists whose items have a type: (table, key) -> (item type(s), what to say)
_LIST_ITEMS = {
    ("data", "at"): ((int, float), "numbers"),
    ("loss", "scales"): ((int, float), "numbers"),
    ("loss", "transforms"): (str, "strings"),
    ("method", "hidden_features"): (int, "integers"),
}
_CHOICES = {
    ("loss", "kind"): ("mmd", "energy", "signature", "mse", "nll", "custom"),
    ("loss", "static_kernel"): ("linear", "rbf"),
    ("loss", "kernel"): ("gaussian", "laplace"),
    ("loss", "estimator"): ("unbiased", "biased", "linear"),
    ("method", "kind"): ("vi", "smd", "mcmc"),
    ("method", "family"): ("nsf", "maf", "diagonal", "full_rank", "mixture", "flow_mixture"),
    ("method", "init"): ("prior", "family"),
    ("method", "estimator"): ("pathwise", "forward", "score"),
    ("method", "objective"): tuple(OBJECTIVE_OPTIONS),
    ("method", "kernel"): ("mala", "hmc"),
    ("method", "learning_rate_schedule"): ("constant", "cosine"),
    ("method", "stopping"): ("smoothed", "blackbirds"),
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
        name = path.rstrip(".")
        how = "" if "[" in name else f" ([{name}] or {name} = {{ ... }})"
        problems.append(f"{name}: must be a table{how}, got {_describe(table)}")
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
        elif isinstance(value, list) and (path.rstrip("."), key) in _LIST_ITEMS:
            item, what = _LIST_ITEMS[(path.rstrip("."), key)]
            if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                problems.append(f"{path}{key}: must be a list of {what}, got {value!r}")
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
    model = config.get("model")
    name = model.get("name") if isinstance(model, dict) else None
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
    if parameters is None or parameters == []:
        problems.append("parameters: missing: give one [[parameters]] table per parameter")
        return
    if not isinstance(parameters, list):
        problems.append(
            f"parameters: must be an array of tables, one [[parameters]] per parameter, "
            f"got {_describe(parameters)}"
        )
        return
    if all(isinstance(p, dict) and is_fixed(p) for p in parameters):
        problems.append("parameters: every parameter has a fixed value; give one a prior")
    for i, p in enumerate(parameters):
        path = f"parameters[{i}]."
        _check_table(p, _PARAMETER_KEYS, path, problems)
        if not isinstance(p, dict) or _fixed_problems(p, path, problems):
            continue
        prior = p.get("prior")
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
        for key in prior:
            if key != "kind" and key not in expected:
                problems.append(_unknown(key, expected, f"{path}prior."))
        for key in expected:
            if key not in prior:
                problems.append(
                    f"{path}prior.{key}: missing (a {kind} prior needs {', '.join(expected)})"
                )
        if any(q.startswith(path + "prior") for q in problems):
            continue
        arguments = {k: v for k, v in prior.items() if k != "kind"}
        found = marginal_problems(kind, arguments)
        problems += [f"{path}prior{'.' + key if key else ''}: {what}" for key, what in found]
        truth = p.get("truth")
        if not found and isinstance(truth, int | float) and not isinstance(truth, bool):
            problems += _support_problems(truth, kind, arguments, f"{path}truth")


def is_fixed(parameter: dict[str, Any]) -> bool:
    """Whether a ``[[parameters]]`` table holds its parameter at a ``value`` (no prior).

    Example:
        >>> is_fixed({"name": "a", "value": 1.0}), is_fixed({"name": "a", "prior": {}})
        (True, False)
    """
    return parameter.get("value") is not None and parameter.get("prior") is None


def _fixed_problems(p: dict[str, Any], path: str, problems: list[str]) -> bool:
    """Problems of a table's prior/value choice; True when the prior needs no checks."""
    prior, value = p.get("prior"), p.get("value")
    if prior is not None and value is not None:
        problems.append(
            f"{path}value: give either a prior (the parameter is calibrated) or a value "
            "(it is held fixed), not both"
        )
        return True
    if prior is None and value is None:
        problems.append(
            f"{path}prior: missing: give a prior table, or a value to hold the parameter fixed"
        )
        return True
    if value is not None:
        if isinstance(value, int | float) and not math.isfinite(value):
            problems.append(f"{path}value: must be a finite number, got {value}")
        return True
    return False


def _describe(value: Any) -> str:
    """A value as the TOML reader gave it, for messages: ``a table``, ``'x'``, ..."""
    return "a table" if isinstance(value, dict) else repr(value)


def _support_problems(value: float, kind: str, arguments: dict[str, Any], key: str) -> list[str]:
    """One line when ``value`` is not finite or lies outside the prior's support."""
    if not math.isfinite(value):
        return [f"{key}: must be a finite number, got {value!r}"]
    prior = marginal(kind, **arguments)
    if not bool(prior.support.check(torch.tensor(float(value)))):
        where = _support_text(prior)
        return [f"{key}: {value!r} lies outside the {kind} prior's support ({where})"]
    return []


def _support_text(prior: Any) -> str:
    """A one-dimensional support in words: ``> 0.0``, ``between 0.0 and 1.0``."""
    low = getattr(prior.support, "lower_bound", None)
    high = getattr(prior.support, "upper_bound", None)
    if low is not None and high is not None:
        return f"between {float(low)} and {float(high)}"
    return f"> {float(low)}" if low is not None else str(prior.support)


def _check_data(config: dict[str, Any], problems: list[str], base: Path) -> None:
    data = config.get("data")
    if data is None:
        problems.append("data: missing: give a file or simulate = true")
    if not isinstance(data, dict):
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
        parameters = config.get("parameters")
        parameters = parameters if isinstance(parameters, list) else []
        truths = [p.get("truth", p.get("value")) for p in parameters if isinstance(p, dict)]
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
    "components",
)


def _check_objective(method: dict[str, Any], problems: list[str]) -> None:
    """VI's objective against its options and the estimator (gradcal.infer.objectives)."""
    if method.get("kind", "vi") != "vi":
        return
    objective = method.get("objective", "reverse_kl")
    alpha, k = method.get("alpha"), method.get("k")
    epochs, start = method.get("anneal_epochs"), method.get("anneal_start")
    if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs < 0:
        problems.append(f"method.anneal_epochs: must be >= 0, got {epochs}")
    if isinstance(start, int | float) and not isinstance(start, bool) and not start > 0:
        problems.append(f"method.anneal_start: must be > 0, got {start}")
    if method.get("w") == CALIBRATE and start is None and isinstance(epochs, int) and epochs > 0:
        problems.append(
            f'method.anneal_start: needed with w = "{CALIBRATE}" and anneal_epochs > 0 (its '
            "default, 100 w, is unknown before w is chosen): give a number"
        )
    if isinstance(alpha, int | float) and not isinstance(alpha, bool) and not 0 < alpha < 1:
        problems.append(f"method.alpha: must lie in (0, 1), got {alpha}")
    if isinstance(k, int) and not isinstance(k, bool) and k < 1:
        problems.append(f"method.k: must be >= 1, got {k}")
    n = method.get("samples_per_epoch", 10)
    if objective in ("importance_weighted", "renyi"):
        k = 8 if k is None else k
        if isinstance(n, int) and isinstance(k, int) and k >= 1 and n % k:
            problems.append(
                f"method.samples_per_epoch: must be a multiple of method.k ({k}) for "
                f"objective {objective!r}, got {n}"
            )


def _check_ranges(config: dict[str, Any], problems: list[str]) -> None:
    method = config.get("method") if isinstance(config.get("method"), dict) else {}
    for key in _AT_LEAST_ONE:
        value = method.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            problems.append(f"method.{key}: must be >= 1, got {value}")
    for key in ("w", "learning_rate"):
        value = method.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and not value > 0:
            problems.append(f"method.{key}: must be > 0, got {value}")
    _check_objective(method, problems)
    if isinstance(method.get("w"), str) and method["w"] != CALIBRATE:
        problems.append(f'method.w: must be a number > 0 or "{CALIBRATE}", got {method["w"]!r}')
    resample = method.get("w_resample")
    if isinstance(resample, str) and resample not in RESAMPLE:
        problems.append(
            f"method.w_resample: must be one of {', '.join(RESAMPLE)}, got {resample!r}"
        )
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
    every = loss.get("checkpoint_every")
    if isinstance(every, int) and not isinstance(every, bool) and every < 1:
        problems.append(f"loss.checkpoint_every: must be >= 1, got {every}")
    _check_signature(loss, problems)


def _check_signature(loss: dict[str, Any], problems: list[str]) -> None:
    """The signature loss's options (and the bandwidth of any loss): ranges and names."""

    def number(key: str) -> bool:
        value = loss.get(key)
        return isinstance(value, int | float) and not isinstance(value, bool)

    for key in ("bandwidth", "scale"):
        if number(key) and not (math.isfinite(loss[key]) and loss[key] > 0):
            problems.append(f"loss.{key}: must be a finite number > 0, got {loss[key]}")
    for key, least in (("dyadic_order", 0), ("path_window", 2), ("stride", 1), ("simulations", 1)):
        if number(key) and loss[key] < least:
            problems.append(f"loss.{key}: must be >= {least}, got {loss[key]}")
    transforms = loss.get("transforms")
    if isinstance(transforms, list):
        for name in transforms:
            if isinstance(name, str) and name not in SIGNATURE_TRANSFORMS:
                close = difflib.get_close_matches(name, SIGNATURE_TRANSFORMS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(
                    f"loss.transforms: unknown transformation {name!r}{hint}; known: "
                    f"{', '.join(SIGNATURE_TRANSFORMS)}"
                )
    if loss.get("kind") == "signature" and loss.get("estimator") == "linear":
        problems.append("loss.estimator: the signature loss takes 'unbiased' or 'biased'")


def check(config: dict[str, Any], base: str | Path = ".") -> list[str]:
    """Every problem of a configuration, one line each with the key's path; [] when fine.

    Checks unknown keys (suggesting the closest known one), types (a table where a value
    belongs and the reverse, lists of the wrong type), choices, required keys, the priors'
    parameters (positive scales, finite values, truths inside the support), importable user
    code, that the number of parameters matches the model, and the data file: every cell a
    finite number, at least two rows, one column per model output, as many rows as the model
    outputs (``Model.observed_lengths``). Builds the model and reads the data (cheap) but
    never simulates.
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
    _check_at(config, problems)
    data = None
    if not config["data"].get("simulate"):
        try:
            data = read_data(config["data"], base)
        except ConfigError as error:
            problems += error.problems
    if cls is not None:
        try:
            model = _make_model(cls, _model_options(config["model"]), config["model"]["name"])
        except (TypeError, ValueError) as error:
            return [*problems, f"model.options: {error}"]
        except Exception as error:  # the user's constructor: any error is the options'
            return [*problems, f"model.options: {type(error).__name__}: {error}"]
        lengths = model.observed_lengths() if hasattr(model, "observed_lengths") else None
        if data is not None and lengths is not None:
            problems += length_problems(model, lengths, data, Path(config["data"]["file"]).name)
        shortest = min(len(d) for d in data) if data is not None else min(lengths or [0]) or None
        window = loss.get("window", 1)
        if shortest is not None and isinstance(window, int) and not 1 <= window <= shortest:
            problems.append(
                f"loss.window: must lie in [1, {shortest}] (the length of the "
                f"{'data' if data is not None else 'simulated series'}), got {window}"
            )
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


def _check_at(config: dict[str, Any], problems: list[str]) -> None:
    """Each value of ``data.at`` is finite and inside its parameter's prior."""
    at = config["data"].get("at")
    if not isinstance(at, list) or len(at) != len(config["parameters"]):
        return
    for i, (value, p) in enumerate(zip(at, config["parameters"], strict=True)):
        if is_fixed(p):
            continue
        arguments = {k: v for k, v in p["prior"].items() if k != "kind"}
        problems += _support_problems(value, p["prior"]["kind"], arguments, f"data.at[{i}]")


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
        if kind == "vi" and method.get("family") not in ("nsf", "maf", "flow_mixture"):
            keep -= set(_FLOW_KEYS)
        if kind == "vi" and method.get("family") not in ("mixture", "flow_mixture"):
            keep.discard("components")
        if kind == "vi" and not method.get("anneal_epochs"):
            keep.discard("anneal_start")
        if kind == "vi":
            options = OBJECTIVE_OPTIONS.get(method.get("objective", "reverse_kl"), ())
            keep -= set(_OBJECTIVE_KEYS[1:]) - set(options)
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


def _cell_problem(cell: Any) -> str | None:
    """Why a data cell is not a finite number, or None when it is one."""
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        return "blank"
    try:
        value = float(cell.strip() if isinstance(cell, str) else cell)
    except (TypeError, ValueError):
        return f"{cell!r} is not a number"
    return None if math.isfinite(value) else f"{cell!r} is not a finite number"


def _column(
    cells: list[Any], where: Any, file: str, column: str, out: list[np.ndarray]
) -> str | None:
    """Append one column's cells as floats to ``out``; else a line naming its first bad cell.

    ``where(i)`` names the i-th cell's row.
    """
    bad = [i for i, cell in enumerate(cells) if _cell_problem(cell) is not None]
    if not bad:
        out.append(np.array([float(c) for c in cells], dtype=np.float64))
        return None
    more = f" ({len(bad) - 1} more bad cell(s) in this column)" if len(bad) > 1 else ""
    return (
        f"data.file: {file}, {where(bad[0])}, column {column}: "
        f"{_cell_problem(cells[bad[0]])}{more}"
    )


def _read_csv(file: Path, columns: list[str] | None) -> tuple[list[str], list[list[Any]], Any]:
    """Column names, their cells, and how to name the i-th cell's row (spreadsheet rows)."""
    with open(file, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ConfigError([f"data.file: {file.name} is empty (expected a header row)"])
        rows, lines = [], []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank lines
            rows.append(row)
            lines.append(reader.line_num)
    use = columns or list(header)
    missing = [c for c in use if c not in header]
    if missing:
        raise ConfigError([f"data.columns: {missing} not in {file.name} (has {header})"])
    index = [header.index(c) for c in use]
    cells = [[row[i] if i < len(row) else None for row in rows] for i in index]
    return use, cells, lambda i: f"row {lines[i]}"


def _read_npy(file: Path, columns: list[int] | None) -> tuple[list[str], list[Any], Any]:
    array = np.load(file, allow_pickle=False)
    if array.ndim not in (1, 2):
        raise ConfigError(
            [
                f"data.file: {file.name} holds an array of shape {array.shape}; expected (T,) "
                "or (T, columns)"
            ]
        )
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ConfigError([f"data.file: {file.name} holds {array.dtype} values, not numbers"])
    array = array[:, None] if array.ndim == 1 else array
    use = list(range(array.shape[1])) if columns is None else list(columns)
    outside = [c for c in use if not -array.shape[1] <= c < array.shape[1]]
    if outside:
        raise ConfigError(
            [f"data.columns: {outside} out of range for {file.name} ({array.shape[1]} column(s))"]
        )
    return [str(c) for c in use], [array[:, c].tolist() for c in use], lambda i: f"row {i}"


def _read_parquet(file: Path, columns: list[str] | None) -> tuple[list[str], list[Any], Any]:
    import pandas

    frame = pandas.read_parquet(file)
    use = list(columns or frame.columns)
    missing = [c for c in use if c not in frame.columns]
    if missing:
        raise ConfigError(
            [f"data.columns: {missing} not in {file.name} (has {list(frame.columns)})"]
        )
    return [str(c) for c in use], [frame[c].tolist() for c in use], lambda i: f"row {i}"


def read_data(data: dict[str, Any], base: str | Path = ".") -> list[torch.Tensor]:
    """The observed series of a ``[data]`` table with a file: one (T,) tensor per column.

    Raises :class:`ConfigError` with one line per problem: an empty or header-only file, a
    blank, text, NaN or infinite cell (naming the file, its row and its column: spreadsheet
    rows for CSV, where the header is row 1; 0-based rows for NPY and Parquet), fewer than
    two values, or columns that are not there.
    """
    file = Path(base) / data["file"]
    columns = data.get("columns")
    suffix = file.suffix.lower()
    reader = {".npy": _read_npy, ".parquet": _read_parquet}.get(suffix, _read_csv)
    try:
        names, cells, where = reader(file, columns)
    except ConfigError:
        raise
    except (OSError, ValueError) as error:
        raise ConfigError([f"data.file: cannot read {file.name} ({error})"]) from None
    length = len(cells[0]) if cells else 0
    if length == 0:
        raise ConfigError([f"data.file: {file.name} has no data rows (only a header?)"])
    if length < 2:
        raise ConfigError([f"data.file: {file.name} has {length} row; at least 2 are needed"])
    series: list[np.ndarray] = []
    quote = suffix not in (".npy",)
    problems = [
        line
        for name, column in zip(names, cells, strict=True)
        if (line := _column(column, where, file.name, repr(name) if quote else name, series))
    ]
    if problems:
        raise ConfigError(problems)
    return [torch.tensor(s, dtype=torch.get_default_dtype()) for s in series]


def length_problems(
    model: Any, lengths: list[int], data: list[torch.Tensor], source: str = "the data"
) -> list[str]:
    r"""Lines saying where the data's columns disagree with the model's outputs.

    ``lengths`` holds the number of time steps of each output of a run of ``model`` (see
    :meth:`gradcal.models.model.Model.observed_lengths`); ``source`` names the data.
    The rule: every column has exactly as many rows as its output has time steps.

    Example:
        >>> from gradcal.models import RandomWalk
        >>> for line in length_problems(RandomWalk(200), [201], [torch.zeros(200)], "w.csv"):
        ...     print(line.replace(" but", "\nbut").replace("; ", ";\n"))
        data.file: w.csv has 200 rows
        but RandomWalk with n_timesteps = 200 outputs 201 (n_timesteps + 1);
        set model.options.n_timesteps = 199
    """
    name, n = type(model).__name__, getattr(model, "n_timesteps", None)
    if len(data) != len(lengths):
        return [
            f"data.columns: {len(data)} column(s) for {name}'s {len(lengths)} output(s); "
            "give one column per output"
        ]
    problems = []
    for i, (have, want) in enumerate(zip((len(d) for d in data), lengths, strict=True)):
        if have == want:
            continue
        which = f"{source}, column {i + 1}," if len(data) > 1 else source
        rule, fix = "", ""
        if isinstance(n, int):
            offset = want - n
            rule = " (n_timesteps" + (f" {'+-'[offset < 0]} {abs(offset)})" if offset else ")")
            if have - offset >= 0:
                fix = f"; set model.options.n_timesteps = {have - offset}"
        problems.append(
            f"data.file: {which} has {have} rows but {name} with n_timesteps = {n} outputs "
            f"{want}{rule}{fix}"
        )
    return problems


def build(config: dict[str, Any], base: str | Path = ".") -> Built:
    """Model, prior, data and loss from a resolved configuration (simulates only for
    ``data.simulate``)."""
    base = Path(base)
    problems: list[str] = []
    cls = _model_class(config, problems, base)
    if problems:
        raise ConfigError(problems)
    model = _make_model(cls, config["model"]["options"], config["model"]["name"])
    every = config["parameters"]
    fixed = {i: p["value"] for i, p in enumerate(every) if is_fixed(p)}
    params = [p for p in every if not is_fixed(p)]
    prior = Product(
        [
            marginal(p["prior"]["kind"], **{k: v for k, v in p["prior"].items() if k != "kind"})
            for p in params
        ]
    )
    names, truth = [p["name"] for p in params], [p.get("truth") for p in params]
    data_cfg = config["data"]
    if data_cfg["simulate"]:  # the full model, at every parameter (fixed ones included)
        at = torch.tensor(
            data_cfg["at"]
            if data_cfg["at"] is not None
            else [p.get("truth", p.get("value")) for p in every],
            dtype=torch.get_default_dtype(),
        )
        with seeded(config["run"]["seed"] + 1, torch.device(config["run"]["device"])):
            data = [y.detach() for y in model.run_and_observe(at)]
    else:
        data = read_data(data_cfg, base)
    if fixed:
        model = fix_parameters(model, fixed)
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
        return MSELoss(
            model, data, cfg["gradient_horizon"], checkpoint_every=cfg["checkpoint_every"]
        )
    options = {
        "window": cfg["window"],
        "increments": cfg["increments"],
        "chunk_size": cfg["chunk_size"],
        "checkpoint_every": cfg["checkpoint_every"],
    }
    if kind == "energy":
        return EnergyDistanceLoss(model, data, cfg["gradient_horizon"], **options)
    if kind == "signature":
        try:
            return SignatureMMDLoss(
                model,
                data,
                cfg["gradient_horizon"],
                static_kernel=cfg["static_kernel"],
                bandwidth=cfg["bandwidth"],
                transforms=tuple(cfg["transforms"]),
                scale=cfg["scale"],
                dyadic_order=cfg["dyadic_order"],
                path_window=cfg["path_window"],
                stride=cfg["stride"],
                panel=cfg["panel"],
                increments=cfg["increments"],
                estimator=cfg["estimator"],
                simulations=cfg["simulations"],
                chunk_size=cfg["chunk_size"],
                checkpoint_every=cfg["checkpoint_every"],
            )
        except ValueError as error:  # options that only the data can rule out
            raise ConfigError([f"loss: {error}"]) from None
    kernel_cls = GaussianKernel if cfg["kernel"] == "gaussian" else LaplaceKernel
    kernel = (
        kernel_cls(bandwidth=cfg["bandwidth"])
        if cfg["bandwidth"] is not None
        else kernel_cls(scales=tuple(cfg["scales"] or (1.0,)))
    )
    return MMDLoss(
        model, data, kernel, cfg["gradient_horizon"], estimator=cfg["estimator"], **options
    )


def checked(
    raw: dict[str, Any], base: Path, seed: int | None = None, device: str | None = None
) -> dict[str, Any]:
    """``raw`` checked (:class:`ConfigError` listing every problem) and resolved, with the
    seed and device overridden where given: what ``gradcal run`` and
    :func:`gradcal.results.calibrate` run.
    """
    problems = check(raw, base)
    if problems:
        raise ConfigError(problems)
    config = resolve(raw)
    if seed is not None:
        config["run"]["seed"] = seed
    if device is not None:
        config["run"]["device"] = device
    return config
