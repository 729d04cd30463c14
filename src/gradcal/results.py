"""Finished runs in Python: :func:`load_run` reads a run folder, :func:`calibrate` runs one.

Both return a :class:`Run`: the resolved configuration, the fitted posterior (rebuilt from
the run's checkpoint), the saved draws, the summary and loss history as :class:`Table`\\ s,
the diagnostics, and :meth:`Run.predictive` for new posterior-predictive simulations.

What the posterior is depends on the method (``run.posterior``):

- VI: :class:`FittedFamily`, the fitted family q. ``sample(n)`` draws from q,
  ``log_prob(theta)`` is log q(theta) in the parameters' own space.
- MCMC: :class:`PosteriorDraws`, the kept draws of every chain. ``sample(n)`` picks n of
  them uniformly at random with replacement; ``log_prob`` raises (draws have no density).
- SMD: :class:`PointEstimate`, the estimate. ``sample(n)`` repeats it n times (a point
  mass); ``log_prob`` raises.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradcal.checkpoint import load_checkpoint
from gradcal.config import Built, ConfigError, build, checked, resolve
from gradcal.rng import seeded
from gradcal.runs import RUN_INFO, make_family, run_calibration
from gradcal.simulate import batch_of_draws

__all__ = [
    "FittedFamily",
    "PointEstimate",
    "PosteriorDraws",
    "Run",
    "Table",
    "calibrate",
    "load_run",
]


def _toml_load(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)


# --- tables -------------------------------------------------------------------------------


def _parse(cell: str) -> Any:
    if cell == "":
        return math.nan
    try:
        return int(cell)
    except ValueError:
        return float(cell)


class Table:
    """A small table of named columns (no pandas needed): a run's summary or history.

    ``table["mean"]`` is a column (a list), ``table.columns`` the names, ``len(table)`` the
    number of rows, ``table.row("mu")`` the row whose first cell is ``"mu"`` as a dict,
    iteration gives the rows as dicts, and ``table.to_pandas()`` a ``pandas.DataFrame``.
    Numbers are floats or ints; an empty cell is NaN.

    Example:
        >>> t = Table({"parameter": ["a", "b"], "mean": [1.0, 2.5]})
        >>> t["mean"], t.row("b")["mean"], len(t)
        ([1.0, 2.5], 2.5, 2)
        >>> print(t)
        parameter  mean
        a             1
        b           2.5
    """

    def __init__(self, columns: Mapping[str, list[Any]]):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"every column must have the same length, got {sorted(lengths)}")
        self._columns = {str(k): list(v) for k, v in columns.items()}

    @classmethod
    def from_csv(cls, path: str | Path) -> Table:
        """Read a CSV with a header line; a column of numbers becomes numbers."""
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f) if row]
        if not rows:
            raise ValueError(f"{path}: empty file, expected a header line")
        header, body = rows[0], rows[1:]
        columns: dict[str, list[Any]] = {}
        for i, name in enumerate(header):
            cells = [row[i] if i < len(row) else "" for row in body]
            try:
                columns[name] = [_parse(c) for c in cells]
            except ValueError:  # text: keep the strings
                columns[name] = cells
        return cls(columns)

    @property
    def columns(self) -> list[str]:
        """The column names, in order."""
        return list(self._columns)

    def __getitem__(self, name: str) -> list[Any]:
        if name not in self._columns:
            raise KeyError(f"no column {name!r}; the columns are {self.columns}")
        return self._columns[name]

    def __len__(self) -> int:
        return len(next(iter(self._columns.values()), []))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield {k: v[i] for k, v in self._columns.items()}

    def row(self, key: Any) -> dict[str, Any]:
        """The row whose first column equals ``key`` (e.g. a parameter's name)."""
        first = self.columns[0]
        for row in self:
            if row[first] == key:
                return row
        raise KeyError(f"no row with {first} = {key!r}; there are {self._columns[first]}")

    def to_pandas(self) -> Any:
        """The table as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas
        except ImportError as error:
            raise ImportError("Table.to_pandas needs pandas: pip install pandas") from error
        return pandas.DataFrame(self._columns)

    def _cells(self) -> list[list[str]]:
        def text(x: Any) -> str:
            return f"{x:.4g}" if isinstance(x, float) else str(x)

        return [self.columns] + [[text(v) for v in row.values()] for row in self]

    def __repr__(self) -> str:
        cells = self._cells()
        widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
        lines = []
        for r, row in enumerate(cells):
            parts = [
                c.ljust(w) if r == 0 or not _numeric(c) else c.rjust(w)
                for c, w in zip(row, widths, strict=True)
            ]
            lines.append("  ".join(parts).rstrip())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cells = self._cells()
        head = "".join(f"<th>{escape(c)}</th>" for c in cells[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in cells[1:]
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- posteriors ---------------------------------------------------------------------------


class FittedFamily:
    """VI's posterior: the fitted family q, rebuilt from the run's best checkpoint.

    ``sample(n)`` gives n draws of q, (n, D); ``log_prob(theta)`` gives log q(theta), (n,),
    a density in the parameters' own space (the prior's), Jacobian of the map onto the
    prior's support included. ``family`` is the torch module itself.
    """

    method = "vi"

    def __init__(self, family: Any):
        self.family = family

    def sample(self, n: int, seed: int | None = None) -> Tensor:
        """n draws of q, (n, D); ``seed`` gives a private stream."""
        _check_n(n)
        with seeded(seed), torch.no_grad():
            return self.family.sample(n)[0]

    def log_prob(self, theta: Tensor) -> Tensor:
        """log q(theta) for theta (n, D) or (D,): (n,) or 0-d."""
        theta = torch.as_tensor(theta, dtype=torch.get_default_dtype())
        with torch.no_grad():
            if theta.ndim == 1:
                return self.family.log_prob(theta[None])[0]
            return self.family.log_prob(theta)


class PosteriorDraws:
    """MCMC's posterior: the kept draws of every chain (after warm-up).

    ``sample(n)`` picks n draws uniformly at random, with replacement, from all chains
    pooled, (n, D). ``log_prob`` raises: a set of draws has no density (fit a density to
    ``draws``, or run VI, if you need one). ``draws`` is (C * S, D), ``chains`` (C, S, D).
    """

    method = "mcmc"

    def __init__(self, chains: Tensor):
        self.chains = chains
        self.draws = chains.reshape(-1, chains.shape[-1])

    def sample(self, n: int, seed: int | None = None) -> Tensor:
        """n draws picked uniformly with replacement from the pooled chains, (n, D)."""
        _check_n(n)
        with seeded(seed):
            index = torch.randint(self.draws.shape[0], (n,))
        return self.draws[index]

    def log_prob(self, theta: Tensor) -> Tensor:
        """Not defined for MCMC draws: raises NotImplementedError."""
        raise NotImplementedError(
            "log_prob is not defined for an MCMC run: its posterior is a set of draws, with "
            "no density; use run.posterior.draws (or a VI run for a density)."
        )


class PointEstimate:
    """SMD's result: one parameter vector, the best start's estimate.

    ``sample(n)`` repeats the estimate n times, (n, D): a point mass, so that
    :meth:`Run.predictive` gives the plug-in predictive. ``log_prob`` raises: a point
    estimate has no density. ``estimate`` is (D,).
    """

    method = "smd"

    def __init__(self, estimate: Tensor):
        self.estimate = estimate

    def sample(self, n: int, seed: int | None = None) -> Tensor:
        """The estimate repeated n times, (n, D) (``seed`` is accepted and not needed)."""
        _check_n(n)
        return self.estimate.expand(n, -1).clone()

    def log_prob(self, theta: Tensor) -> Tensor:
        """Not defined for a point estimate: raises NotImplementedError."""
        raise NotImplementedError(
            "log_prob is not defined for an SMD run: its result is a point estimate "
            "(run.posterior.estimate), with no density."
        )


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an int >= 1, got {n!r}")


# --- runs ---------------------------------------------------------------------------------


@dataclass
class Run:
    """A finished (or interrupted) calibration, read back into Python.

    Attributes:
        path: the run folder (None for :func:`calibrate` without ``out``).
        config: the resolved configuration (every default filled in).
        names: parameter names, D of them; ``truth``: their true values or None.
        model, prior: the simulator and the prior, built from ``config``.
        data: the observed data, one tensor per model output.
        posterior: :class:`FittedFamily` (VI), :class:`PosteriorDraws` (MCMC) or
            :class:`PointEstimate` (SMD); see the module's description.
        samples: the posterior draws the run saved (posterior_samples.pt), (N, D).
        chains: MCMC's kept draws (C, S, D); None for VI and SMD.
        summary: mean, std, 5/50/95 % quantiles, truth, R-hat/ESS (MCMC), k-hat (VI).
        history: the loss per epoch (VI: total, loss, regularisation, dropped; SMD: loss);
            None for MCMC.
        diagnostics: diagnostics.json (k-hat, R-hat, ESS, posterior predictive checks).
        sample_stats: MCMC's ``acceptance_rate`` (C,) and ``step_size``; empty otherwise.
        finished: False for an interrupted VI run: the posterior is the best state its
            checkpoint holds, ``samples`` are fresh draws of it, ``summary`` is None.
    """

    path: Path | None
    config: dict[str, Any]
    names: list[str]
    truth: list[float | None]
    model: Any
    prior: Any
    data: list[Tensor]
    posterior: FittedFamily | PosteriorDraws | PointEstimate
    samples: Tensor
    summary: Table | None
    history: Table | None
    diagnostics: dict[str, Any]
    chains: Tensor | None = None
    sample_stats: dict[str, Any] = field(default_factory=dict)
    finished: bool = True

    @property
    def method(self) -> str:
        """``"vi"``, ``"mcmc"`` or ``"smd"``."""
        return self.config["method"]["kind"]

    def sample(self, n: int, seed: int | None = None) -> Tensor:
        """``self.posterior.sample(n, seed)``: (n, D)."""
        return self.posterior.sample(n, seed)

    def log_prob(self, theta: Tensor) -> Tensor:
        """``self.posterior.log_prob(theta)`` (VI only)."""
        return self.posterior.log_prob(theta)

    def predictive(self, n: int, seed: int | None = None) -> list[Tensor]:
        """Simulate the model at n posterior draws: one tensor (n, T, ...) per output.

        Draws come from ``posterior.sample(n)``; each is simulated once (one batched
        simulation), so this is the posterior predictive y_rep ~ p(y | theta), theta ~ q.
        """
        theta = self.sample(n, seed)
        with seeded(seed), torch.no_grad(), batch_of_draws():  # n = 1 too: (1, T, ...)
            return [y.detach() for y in self.model.run_and_observe(theta)]

    def to_inference_data(self, predictive: int | None = 200, seed: int | None = 0) -> Any:
        """This run as ArviZ's InferenceData (needs arviz); see
        :func:`gradcal.inference_data.to_inference_data`."""
        from gradcal.inference_data import to_inference_data

        return to_inference_data(self, predictive=predictive, seed=seed)

    def __repr__(self) -> str:
        where = "in memory" if self.path is None else str(self.path)
        return (
            f"Run({self.method}, {len(self.names)} parameters {self.names}, "
            f"{self.samples.shape[0]} draws, {where})"
        )


def _read_optional(path: Path, reader: Any) -> Any:
    return reader(path) if path.is_file() else None


def _base_of(folder: Path, base: str | Path | None) -> Path:
    if base is not None:
        return Path(base)
    info = folder / RUN_INFO
    if info.is_file():
        return Path(json.loads(info.read_text(encoding="utf-8"))["base"])
    return Path.cwd()


def _fitted_family(config: dict[str, Any], built: Built, folder: Path) -> FittedFamily:
    """The VI family with the best state of ``checkpoints/`` (weights_only loading)."""
    best, last = folder / "checkpoints" / "best.pt", folder / "checkpoints" / "last.pt"
    checkpoint = best if best.is_file() else last
    if not checkpoint.is_file():
        raise ValueError(
            f"load_run: {folder}: a VI run folder needs checkpoints/best.pt; none found"
        )
    state = load_checkpoint(checkpoint, map_location="cpu")
    family = make_family(config["method"], built)
    family.load_state_dict(
        state["best_state"] if state["best_state"] is not None else state["family"]
    )
    family.eval()
    return FittedFamily(family)


def load_run(path: str | Path, base: str | Path | None = None) -> Run:
    """Read a run folder written by ``gradcal run`` or :func:`calibrate` into a :class:`Run`.

    The configuration is ``config.toml``; the model, prior and data are rebuilt from it
    (relative paths start at the configuration's folder, which the run recorded in
    ``run.json``; ``base`` overrides it). A VI posterior is the family rebuilt from
    ``checkpoints/best.pt`` (``torch.load(weights_only=True)``); MCMC's draws come from
    ``chains.pt``, SMD's estimate from ``posterior_samples.pt``. An interrupted VI run loads
    too (``finished`` is False): its posterior is the best state of its checkpoint.

    Arguments:
        path: the run folder.
        base: the folder a relative ``data.file`` or ``"package.module:Class"`` is found
            from, when the configuration has moved since the run.

    Raises:
        ValueError: ``path`` is not a run folder, or a file the method needs is missing.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"load_run: {path}: no such run folder")
    if not (folder / "config.toml").is_file():
        raise ValueError(f"load_run: {path}: not a run folder (no config.toml)")
    try:
        config = resolve(_toml_load(folder / "config.toml"))
    except (ValueError, KeyError, TypeError) as error:  # damaged or hand-edited
        raise ValueError(
            f"load_run: {folder / 'config.toml'} is not a complete configuration ({error!r})"
        ) from error
    try:
        built = build(config, _base_of(folder, base))
    except (ConfigError, OSError) as error:
        raise ValueError(
            f"load_run: cannot rebuild the run's model and data ({error}); if the "
            "configuration's folder has moved, pass base=<that folder>"
        ) from error
    saved_path = folder / "posterior_samples.pt"
    finished = saved_path.is_file()
    method = config["method"]["kind"]
    if not finished and method != "vi":
        raise ValueError(
            f"load_run: {path}: no posterior_samples.pt (the run did not finish; resume it)"
        )
    chains, stats = None, {}
    posterior: FittedFamily | PosteriorDraws | PointEstimate
    if finished:
        samples = load_checkpoint(saved_path, map_location="cpu")["samples"]
    if method == "vi":
        posterior = _fitted_family(config, built, folder)
        if not finished:  # interrupted: draws of the best state so far
            samples = posterior.sample(
                config["method"]["posterior_samples"], config["run"]["seed"]
            )
    elif method == "mcmc":
        if not (folder / "chains.pt").is_file():
            raise ValueError(f"load_run: {path}: an MCMC run folder needs chains.pt")
        stored = load_checkpoint(folder / "chains.pt", map_location="cpu")
        chains = stored["chains"].to(torch.get_default_dtype())
        stats = {k: stored[k] for k in ("acceptance_rate", "step_size") if k in stored}
        posterior = PosteriorDraws(chains)
    else:
        posterior = PointEstimate(samples[0].to(torch.get_default_dtype()))
    diagnostics = _read_optional(
        folder / "diagnostics.json", lambda p: json.loads(p.read_text(encoding="utf-8"))
    )
    return Run(
        path=folder,
        config=config,
        names=built.names,
        truth=built.truth,
        model=built.model,
        prior=built.prior,
        data=built.data,
        posterior=posterior,
        samples=samples,
        summary=_read_optional(folder / "summary.csv", Table.from_csv) if finished else None,
        history=_read_optional(folder / "history.csv", Table.from_csv),
        diagnostics=diagnostics or {},
        chains=chains,
        sample_stats=stats,
        finished=finished,
    )


def _configuration(
    config: Mapping[str, Any] | str | Path, base: str | Path | None
) -> tuple[dict[str, Any], Path]:
    if isinstance(config, str | Path):
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"calibrate: {config}: no such configuration file")
        try:
            raw = _toml_load(path)
        except ValueError as error:  # tomllib.TOMLDecodeError is a ValueError
            raise ConfigError([f"{config}: not valid TOML ({error})"]) from None
        return raw, Path(base) if base is not None else path.parent
    if isinstance(config, Mapping):
        return dict(config), Path(base) if base is not None else Path.cwd()
    raise TypeError(
        f"calibrate: `config` must be a dict (the TOML's tables) or a path to a TOML file, "
        f"got {type(config).__name__}"
    )


def _claim(out: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that holds anything, unless asked to replace a run."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / "config.toml").is_file():
        raise ValueError(f"calibrate: out={out} is a non-empty folder that holds no run")
    if not overwrite:
        raise ValueError(
            f"calibrate: out={out} already holds a run; pass overwrite=True to replace it"
        )
    shutil.rmtree(out)


def calibrate(
    config: Mapping[str, Any] | str | Path,
    out: str | Path | None = None,
    *,
    base: str | Path | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Run:
    """Run the calibration a configuration describes, from Python; return the :class:`Run`.

    The same run as ``gradcal run``: checked first (every problem in one
    :class:`~gradcal.config.ConfigError`, a ValueError), then VI, SMD or MCMC as
    ``[method]`` says, then the summary, diagnostics and report. Nothing is left on disk
    unless ``out`` is given: without it the run works in a temporary folder, read back
    into memory and deleted.

    Arguments:
        config: a dict shaped like the TOML file (``{"model": {...}, "parameters": [...],
            ...}``) or the path of a TOML file.
        out: the run folder to write (a folder that already holds a run is refused unless
            ``overwrite=True``, which deletes it first).
        base: where relative paths (``data.file``, ``"package.module:Class"``) start;
            default the TOML file's folder, or the working directory for a dict.
        seed: overrides ``[run] seed``.
        progress: show progress bars.

    Example:
        >>> run = calibrate({
        ...     "model": {"name": "Normal", "options": {"n_timesteps": 30}},
        ...     "data": {"simulate": True},
        ...     "loss": {"kind": "nll"},
        ...     "method": {"kind": "smd", "epochs": 20, "starts": 2},
        ...     "parameters": [
        ...         {"name": "mu", "prior": {"kind": "normal", "loc": 0.0, "scale": 1.0},
        ...          "truth": 0.5},
        ...         {"name": "sigma", "prior": {"kind": "lognormal", "loc": 0.0, "scale": 0.5},
        ...          "truth": 1.0},
        ...     ],
        ... }, progress=False)
        >>> run.method, run.sample(3).shape, run.path is None
        ('smd', torch.Size([3, 2]), True)
    """
    raw, base_dir = _configuration(config, base)
    resolved = checked(raw, base_dir, seed)
    with torch.device(resolved["run"]["device"]):
        if out is None:
            with tempfile.TemporaryDirectory(prefix="gradcal-") as tmp:
                run_calibration(resolved, tmp, base_dir, progress=progress, report=False)
                run = load_run(tmp, base=base_dir)
            run.path = None
            return run
        folder = Path(out)
        _claim(folder, overwrite)
        run_calibration(resolved, folder, base_dir, progress=progress)
        return load_run(folder, base=base_dir)
