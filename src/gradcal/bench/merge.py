"""Merge benchmark parts run by separate processes (or machines) into one benchmark.

Run the grid in parts, one process per method (or per task, seed, budget), each into its
own folder, then merge them::

    gradcal bench --out part-a --methods is mala &
    gradcal bench --out part-b --methods vi-reverse-gauss vi-reverse-flow &
    wait
    gradcal bench --merge part-a part-b --out merged

:func:`merge_bench` writes ``results.csv`` (every row once per task x method x budget x
seed), ``references.csv`` (one row per task), ``settings.json`` (budgets and seeds the
union of the parts'; the other settings must agree) and ``bench.html``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradcal.bench.runner import COLUMNS, OUTPUT_FILES

__all__ = ["merge_bench", "merge_rows", "read_part"]

_KEY = ("task", "method", "budget", "seed")
_COMPARED = ("mode", "n_draws", "reference_draws", "c2st_folds", "c2st_epochs")


def read_part(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a part: a ``results.csv`` or a benchmark folder holding one.

    Raises ValueError (one line naming the file) when it is missing or its columns are not
    :data:`~gradcal.bench.runner.COLUMNS`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.csv"
    if not path.is_file():
        raise ValueError(f"--merge: {path} does not exist.")
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        header = reader.fieldnames or []
        if list(header) != COLUMNS:
            raise ValueError(
                f"--merge: {path} has columns {','.join(header) or '(none)'}; "
                f"expected {','.join(COLUMNS)}."
            )
        return list(reader)


def merge_rows(parts: Sequence[list[dict[str, str]]]) -> list[dict[str, str]]:
    """One row per task x method x budget x seed: the first ``ok`` row, else the first.

    Example:
        >>> a = [{"task": "t", "method": "m", "budget": "60", "seed": "0", "status": "failed"}]
        >>> b = [{"task": "t", "method": "m", "budget": "60", "seed": "0", "status": "ok"},
        ...      {"task": "t", "method": "m", "budget": "60", "seed": "1", "status": "ok"}]
        >>> [(r["seed"], r["status"]) for r in merge_rows([a, b])]
        [('0', 'ok'), ('1', 'ok')]
    """
    merged: dict[tuple[str, ...], dict[str, str]] = {}
    for rows in parts:
        for row in rows:
            key = tuple(row[k] for k in _KEY)
            if key not in merged or (merged[key]["status"] != "ok" and row["status"] == "ok"):
                merged[key] = row
    return list(merged.values())


def _settings(parts: Sequence[Path]) -> dict[str, Any] | None:
    """settings.json of the merged benchmark, or None when no part has one."""
    infos = [
        (p, json.loads((p / "settings.json").read_text()))
        for p in parts
        if (p / "settings.json").is_file()
    ]
    if not infos:
        return None
    first_path, first = infos[0]
    for path, info in infos[1:]:
        for key in _COMPARED:
            if info["settings"].get(key) != first["settings"].get(key):
                raise ValueError(
                    f"--merge: {path} has {key} = {info['settings'].get(key)!r}, "
                    f"{first_path} has {first['settings'].get(key)!r}; merge like parts only."
                )
    settings = dict(first["settings"])
    settings["budgets"] = sorted({b for _, i in infos for b in i["settings"]["budgets"]})
    settings["seeds"] = max(i["settings"]["seeds"] for _, i in infos)
    return {
        "settings": settings,
        "machine": first["machine"],
        # a part that is itself a merge contributes its own parts
        "parts": [
            part
            for p, i in infos
            for part in i.get(
                "parts", [{"folder": str(p), "machine": i["machine"], "runs": i.get("runs", [])}]
            )
        ],
    }


def _references(parts: Sequence[Path]) -> tuple[list[str], list[list[str]]] | None:
    """references.csv of the parts: one row per task (the first part's)."""
    header: list[str] | None = None
    rows: dict[str, list[str]] = {}
    for part in parts:
        path = part / "references.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as file:
            reader = csv.reader(file)
            header = next(reader)
            for row in reader:
                rows.setdefault(row[0], row)
    return None if header is None else (header, list(rows.values()))


def merge_bench(
    out: str | os.PathLike[str],
    parts: Sequence[str | os.PathLike[str]],
    *,
    overwrite: bool = False,
) -> Path:
    """Merge benchmark folders (or bare ``results.csv`` files) into the folder ``out``.

    Returns the path of ``bench.html`` when the parts hold their ``settings.json`` (the
    page needs it), else of the merged ``results.csv``. Refuses (ValueError, one line) an
    occupied ``out`` unless ``overwrite``, ``out`` among the parts, fewer than two parts,
    a part with other columns, and parts with other mode, scored draws or C2ST settings.
    """
    out = Path(out)
    paths = [Path(p) for p in parts]
    if len(paths) < 2:
        raise ValueError(f"--merge: give at least two parts, got {len(paths)}.")
    if any(p.resolve() in (out.resolve(), (out / "results.csv").resolve()) for p in paths):
        raise ValueError(f"--merge: the output {out} cannot also be a part.")
    rows = merge_rows([read_part(p) for p in paths])
    folders = [p if p.is_dir() else p.parent for p in paths]
    info = _settings(folders)
    references = _references(folders)
    found = [name for name in OUTPUT_FILES if (out / name).exists()]
    if found and not overwrite:
        raise ValueError(
            f"{out} already holds a benchmark ({', '.join(found)}); "
            "replace it with --overwrite or choose another --out."
        )
    for name in found:
        (out / name).unlink()
    if (out / "plots").is_dir():
        shutil.rmtree(out / "plots")
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if references is not None:
        with (out / "references.csv").open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(references[0])
            writer.writerows(references[1])
    if info is None:
        return out / "results.csv"
    (out / "settings.json").write_text(json.dumps(info, indent=2))
    from gradcal.bench.html import write_page

    return write_page(out)
