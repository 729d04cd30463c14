"""Run the benchmark: every task x method x budget x seed, one CSV row each, then the page.

The output folder holds ``settings.json`` (mode, budgets, seeds, machine, and under ``runs``
each invocation's start, end, load averages and rows), ``results.csv``
(one row per task x method x budget x seed, appended as each finishes, so an interrupted
run continues with ``resume=True``), ``references.csv`` (how each reference was made, its
ESS and MMD noise floor) and ``bench.html``. A folder that already holds a benchmark is
refused unless ``resume`` (skip the rows already there) or ``overwrite`` (start again).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gradcal.bench.methods import METHODS, CountingLoss, Method
from gradcal.bench.metrics import Cost, Scores, measure_cost, reference_floor, run_isolated, score
from gradcal.bench.tasks import TASKS, Reference, make_task

__all__ = [
    "COLUMNS",
    "MODES",
    "OUTPUT_FILES",
    "Settings",
    "read_results",
    "run_bench",
    "settings_for",
]

logger = logging.getLogger("gradcal")

COLUMNS = [
    "task",
    "method",
    "budget",
    "seed",
    "status",
    "sims",
    "wall_s",
    "peak_mib",
    "c2st",
    "mmd",
    "mean_error",
    "cov50",
    "cov90",
]
OUTPUT_FILES = ("settings.json", "results.csv", "references.csv", "bench.html")


@dataclass(frozen=True)
class Settings:
    """Budgets (simulator draws per run), seeds, draws scored per run, reference draws, and
    the C2ST classifier's folds and epochs (the quick mode trains it briefly)."""

    mode: str
    budgets: tuple[int, ...]
    seeds: int
    n_draws: int
    reference_draws: int
    c2st_folds: int = 5
    c2st_epochs: int = 30


MODES = {
    "quick": Settings("quick", (60,), 1, 100, 200, c2st_folds=2, c2st_epochs=10),
    "full": Settings("full", (250, 1000, 4000), 3, 500, 1000),
}


def settings_for(
    mode: str, seeds: int | None = None, budgets: Sequence[int] | None = None
) -> Settings:
    """The settings of ``mode`` (``"quick"`` or ``"full"``), with ``seeds`` and ``budgets``
    (simulator draws per run, each >= 20) if given.

    Example:
        >>> settings_for("full", seeds=2, budgets=[500, 1000]).budgets
        (500, 1000)
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {', '.join(MODES)}, got {mode!r}.")
    base = MODES[mode]
    if seeds is None:
        seeds = base.seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"`seeds` must be an int >= 1, got {seeds!r}.")
    budgets = base.budgets if budgets is None else tuple(budgets)
    if not budgets or any(
        isinstance(b, bool) or not isinstance(b, int) or b < 20 for b in budgets
    ):
        raise ValueError(f"`budgets` must be ints >= 20, got {list(budgets)!r}.")
    return replace(base, budgets=tuple(sorted(set(budgets))), seeds=seeds)


def _names(given: Sequence[str] | None, known: dict[str, Any], what: str) -> list[str]:
    if given is None:
        return list(known)
    unknown = [name for name in given if name not in known]
    if unknown or not given:
        raise ValueError(
            f"`{what}`: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
            f"choose from {', '.join(known)}."
        )
    return list(dict.fromkeys(given))


def read_results(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a ``results.csv`` as dictionaries of strings (none if it is absent)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def _now() -> str:
    """The time now, to the minute, in UTC."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _load() -> list[float]:
    """The 1, 5 and 15 minute load averages (NaN where the platform has none)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return [round(x, 2) for x in load]


def _machine() -> dict[str, Any]:
    return {
        "date": _now(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_at_start": _load(),
    }


def _record_run(out: Path, started: str, load: list[float], rows: int) -> None:
    """Append this invocation (start, end, load averages, rows run) to ``runs`` in
    settings.json, so that a benchmark's folder says how long it took, resumes included."""
    info = json.loads((out / "settings.json").read_text())
    info.setdefault("runs", []).append(
        {
            "started": started,
            "ended": _now(),
            "load_average_at_start": load,
            "load_average_at_end": _load(),
            "rows": rows,
        }
    )
    (out / "settings.json").write_text(json.dumps(info, indent=2))


def _prepare(out: Path, settings: Settings, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ValueError("give `resume` or `overwrite`, not both.")
    found = [name for name in OUTPUT_FILES if (out / name).exists()]
    if found and not (resume or overwrite):
        raise ValueError(
            f"{out} already holds a benchmark ({', '.join(found)}); continue it with "
            "--resume, replace it with --overwrite, or choose another --out."
        )
    if resume and (out / "settings.json").exists():
        saved = json.loads((out / "settings.json").read_text())
        if saved.get("settings") != json.loads(json.dumps(asdict(settings))):
            raise ValueError(
                f"--resume: {out} holds a benchmark with other settings "
                f"({saved.get('settings')}); resume with the same mode and seeds."
            )
    if overwrite:
        for name in found:
            (out / name).unlink()
        if (out / "references").is_dir():
            shutil.rmtree(out / "references")


def _reference(task_name: str, settings: Settings, out: Path) -> tuple[Reference, Any]:
    """The task's reference (cached in ``out/references``) and its MMD noise floor."""
    path = out / "references" / f"{task_name}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        reference = Reference(saved["samples"], saved["kind"], saved["ess"], saved["note"])
    else:
        reference = make_task(task_name).reference(
            settings.reference_draws, settings.mode == "quick"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(asdict(reference), path)
    return reference, reference_floor(reference.samples, settings.n_draws)


def _row(
    task: str, method: str, budget: int, seed: int, status: str, sims: int, cost: Any, s: Scores
) -> dict[str, Any]:
    figures = asdict(s)
    return {
        "task": task,
        "method": method,
        "budget": budget,
        "seed": seed,
        "status": status,
        "sims": sims,
        "wall_s": f"{cost.wall_s:.4g}",
        "peak_mib": f"{cost.peak_mib:.4g}",
        **{k: f"{v:.5g}" for k, v in figures.items()},
    }


def _one(
    task_name: str, method: Method, budget: int, seed: int, settings: Settings, ref: Any
) -> dict[str, Any]:
    """One cell's row: the method's set-up (imports) untimed, then the method timed and its
    peak memory taken, then the scores (run in a child process of its own by run_bench)."""
    task = make_task(task_name)
    loss = CountingLoss(task.loss)
    cost = Cost()
    try:
        method.prepare()
        with measure_cost() as cost:
            output = method.run(task, loss, budget, settings.n_draws, seed)
        scores = score(
            output.samples,
            output.point,
            ref,
            seed=seed,
            folds=settings.c2st_folds,
            epochs=settings.c2st_epochs,
        )
        status = "ok"
    except Exception as error:  # a failed run is a result: recorded, the others go on
        scores, status = Scores(), f"failed: {type(error).__name__}: {error}"[:300]
    return _row(task_name, method.name, budget, seed, status, loss.draws, cost, scores)


def _cell(
    task: str, method: str, budget: int, seed: int, settings: Settings, ref: Any
) -> dict[str, Any]:
    """:func:`_one` in a fresh child process (its peak memory is its own); a child that
    dies gives a failed row."""
    try:
        row = run_isolated(_one, task, METHODS[method], budget, seed, settings, ref)
    except RuntimeError as error:
        status = f"failed: the cell's process: {error}"[:300]
        row = _row(task, method, budget, seed, status, 0, Cost(), Scores())
    if row["status"] != "ok":
        logger.warning("bench: %s / %s %s", task, method, row["status"])
    return row


def run_bench(
    out: str | os.PathLike[str],
    mode: str = "quick",
    *,
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    seeds: int | None = None,
    budgets: Sequence[int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> Path:
    """Run the benchmark into the folder ``out``; returns the path of ``bench.html``.

    Arguments:
        out: the output folder (created).
        mode: ``"quick"`` (one seed, 60 draws a run, small reference; about a minute on
            two cores) or ``"full"`` (three seeds, budgets 250, 1000 and 4000).
        tasks, methods: subsets by name (default: all; a method whose package is missing
            is skipped with a log line).
        seeds: the number of seeds (seeds 0..seeds-1), overriding the mode's.
        budgets: simulator draws per run, overriding the mode's.
        resume: keep the rows already in ``results.csv`` and run only the missing ones.
        overwrite: remove an earlier benchmark in ``out`` first.
    """
    started, load = _now(), _load()
    settings = settings_for(mode, seeds, budgets)
    task_names = _names(tasks, TASKS, "tasks")
    method_names = _names(methods, METHODS, "methods")
    out = Path(out)
    _prepare(out, settings, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "settings.json").exists():
        info = {"settings": asdict(settings), "machine": _machine()}
        (out / "settings.json").write_text(json.dumps(info, indent=2))
    results = out / "results.csv"
    done = {(r["task"], r["method"], r["budget"], r["seed"]) for r in read_results(results)}
    runnable = []
    for name in method_names:
        reason = METHODS[name].unavailable()
        if reason:
            logger.warning("bench: skipping %s: %s", name, reason)
        else:
            runnable.append(name)
    references = {name: _reference(name, settings, out) for name in task_names}
    _write_references(out / "references.csv", references)
    new_file = not results.exists()
    # Budget and seed outermost: an interrupted run has every task and method at the
    # smaller budgets and first seeds.
    grid = [
        (task, method, budget, seed)
        for budget in settings.budgets
        for seed in range(settings.seeds)
        for task in task_names
        for method in runnable
        if (task, method, str(budget), str(seed)) not in done
    ]
    with results.open("a", newline="") as file:
        writer = csv.DictWriter(file, COLUMNS)
        if new_file:
            writer.writeheader()
        for task, method, budget, seed in grid:
            row = _cell(task, method, budget, seed, settings, references[task][0].samples)
            writer.writerow(row)
            file.flush()
            logger.info("bench: %s", row)
    _record_run(out, started, load, len(grid))
    from gradcal.bench.html import write_page

    return write_page(out)


def _write_references(path: Path, references: dict[str, tuple[Reference, Any]]) -> None:
    """references.csv: the rows already there, updated with ``references``."""
    header = ["task", "kind", "draws", "ess", "mmd_floor", "mmd_floor_sd", "note"]
    rows = {r["task"]: [r[k] for k in header] for r in read_results(path)}
    for name, (ref, floor) in references.items():
        ess = "" if ref.ess is None else f"{ref.ess:.1f}"
        rows[name] = [
            name,
            ref.kind,
            ref.samples.shape[0],
            ess,
            f"{floor.mean:.4g}",
            f"{floor.std:.4g}",
            ref.note,
        ]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows.values())
