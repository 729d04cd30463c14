"""The benchmark page: a table per task and accuracy against simulations and wall time.

:func:`write_page` reads ``settings.json``, ``results.csv`` and ``references.csv`` from a
benchmark folder and writes ``bench.html`` (the run report's style, self-contained) and,
when matplotlib is installed (``pip install 'gradcal[plot]'``), ``plots/<task>.png``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import statistics
from collections import defaultdict
from html import escape
from pathlib import Path
from typing import Any

from gradcal.bench.methods import METHODS
from gradcal.bench.runner import read_results
from gradcal.bench.tasks import make_task
from gradcal.report import CSS

__all__ = ["FIGURES", "aggregate", "write_page"]

# CSV column, heading, digits
FIGURES = (
    ("c2st", "C2ST", 3),
    ("mmd", "MMD²", 3),
    ("mean_error", "mean error (sd)", 3),
    ("cov50", "cov 50 %", 2),
    ("cov90", "cov 90 %", 2),
    ("sims", "simulations", 6),
    ("wall_s", "wall s", 3),
    ("peak_mib", "peak MiB", 3),
)


def _float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def aggregate(rows: list[dict[str, str]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Mean and sd over seeds of every figure, per (task, method, budget); failed runs are
    counted (``failed``) and left out of the means.

    Example:
        >>> rows = [{"task": "t", "method": "m", "budget": "10", "status": "ok", "c2st": c}
        ...         for c in ("0.6", "0.8")]
        >>> cell = aggregate(rows)[("t", "m", 10)]
        >>> round(cell["c2st"][0], 3), cell["n"], cell["failed"]
        (0.7, 2, 0)
    """
    groups: dict[tuple[str, str, int], list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["method"], int(row["budget"]))].append(row)
    result = {}
    for key, group in groups.items():
        ok = [r for r in group if r.get("status") == "ok"]
        cell: dict[str, Any] = {"n": len(ok), "failed": len(group) - len(ok)}
        for name, _, _ in FIGURES:
            values = [v for v in (_float(r.get(name, "")) for r in ok) if math.isfinite(v)]
            mean = statistics.fmean(values) if values else math.nan
            sd = statistics.stdev(values) if len(values) > 1 else math.nan
            cell[name] = (mean, sd)
        result[key] = cell
    return result


def _cell(mean: float, sd: float, digits: int) -> str:
    if not math.isfinite(mean):
        return ""
    text = f"{mean:.{digits}g}"
    return text + (f" ± {sd:.2g}" if math.isfinite(sd) else "")


def _task_table(task: str, cells: dict[tuple[str, str, int], dict[str, Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in ("method", "budget", "runs")) + "".join(
        f"<th>{escape(h)}</th>" for _, h, _ in FIGURES
    )
    body = []
    for (t, method, budget), cell in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if t != task:
            continue
        runs = f"{cell['n']}" + (f" ({cell['failed']} failed)" if cell["failed"] else "")
        tds = [escape(method), f'<td class="num">{budget}</td>', escape(runs)]
        tds = [f"<td>{tds[0]}</td>", tds[1], f"<td>{tds[2]}</td>"]
        for name, _, digits in FIGURES:
            tds.append(f'<td class="num">{escape(_cell(*cell[name], digits))}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _plot(task: str, cells: dict[tuple[str, str, int], dict[str, Any]], path: Path) -> bool:
    """C2ST and mean error against simulations and wall time; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    methods = sorted({m for (t, m, _) in cells if t == task})
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharey="row")
    markers = "osv^<>Dph*xP+"
    for i, method in enumerate(methods):
        points = sorted((b, c) for (t, m, b), c in cells.items() if t == task and m == method)
        for row, figure in enumerate(("c2st", "mean_error")):
            for col, x_name in enumerate(("sims", "wall_s")):
                xs = [c[x_name][0] for _, c in points]
                ys = [c[figure][0] for _, c in points]
                pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x * y)]
                if pairs:
                    axes[row, col].plot(
                        *zip(*pairs, strict=True),
                        color=plt.cm.tab20(i % 20),  # one colour per method in every panel
                        marker=markers[i % len(markers)],
                        label=method,
                        linestyle="-" if method.startswith("vi") else "--",
                    )
    for row, label in enumerate(("C2ST (0.5 = same as reference)", "mean error (reference sd)")):
        for col, x_label in enumerate(("simulator draws", "wall time (s)")):
            ax = axes[row, col]
            ax.set_xscale("log")
            ax.set_xlabel(x_label)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        if row == 1:
            axes[row, 0].set_yscale("log")
    # The budgets as plain ticks (a log axis over one or two decades labels its minor
    # ticks too, and they overlap).
    budgets = sorted({b for (t, _, b) in cells if t == task})
    for ax in axes[:, 0]:
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
    axes[0, 0].axhline(0.5, color="k", lw=0.8)
    axes[0, 1].axhline(0.5, color="k", lw=0.8)
    axes[1, 1].legend(fontsize=8, loc="best")  # every method has a mean error (SMD too)
    fig.suptitle(task)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _references(folder: Path) -> dict[str, dict[str, str]]:
    import csv

    path = folder / "references.csv"
    if not path.exists():
        return {}
    with path.open(newline="") as file:
        return {row["task"]: row for row in csv.DictReader(file)}


def _runs_text(runs: list[dict[str, Any]]) -> str:
    """Each invocation of a benchmark: start to end, load averages, rows run.

    Example:
        >>> _runs_text([{"started": "a", "ended": "b", "load_average_at_start": [1.0],
        ...              "load_average_at_end": [2.0], "rows": 3}])
        'a to b (load average 1.0 to 2.0, 3 rows)'
    """
    return "; ".join(
        f"{r['started']} to {r['ended']} (load average {r['load_average_at_start'][0]} to "
        f"{r['load_average_at_end'][0]}, {r['rows']} rows)"
        for r in runs
    )


def _parts_line(info: dict[str, Any]) -> list[str]:
    """A paragraph with when the benchmark ran (each invocation, resumes included) or, for
    a merged one, each part's folder and runs; none for a folder from an older version."""
    if info.get("parts"):
        described = []
        for part in info["parts"]:
            when = _runs_text(part.get("runs", [])) or part.get("machine", {}).get("date", "?")
            described.append(f"{part.get('folder', '?')}: {when}")
        text = f"Merged from {len(info['parts'])} part(s): " + "; ".join(described) + "."
    elif info.get("runs"):
        text = f"Run {_runs_text(info['runs'])}."
    else:
        return []
    return [f'<p class="meta">{escape(text)}</p>']


def write_page(folder: str | os.PathLike[str]) -> Path:
    """Write ``bench.html`` (and ``plots/``) for the benchmark in ``folder``; its path."""
    folder = Path(folder)
    info = json.loads((folder / "settings.json").read_text())
    rows = read_results(folder / "results.csv")
    cells = aggregate(rows)
    references = _references(folder)
    settings, machine = info["settings"], info["machine"]
    parts = [
        "<h1>gradcal benchmark</h1>",
        f'<p class="meta">{escape(machine["date"])}; {escape(str(machine["cpus"]))} CPUs '
        f"({escape(machine['processor'])}), torch {escape(machine['torch'])} with "
        f"{machine['torch_threads']} thread(s); load average at start "
        f"{escape(str(machine['load_average_at_start']))}; mode {escape(settings['mode'])}, "
        f"budgets {escape(str(settings['budgets']))} simulator draws, "
        f"{settings['seeds']} seed(s), {settings['n_draws']} draws scored per run.</p>",
        *_parts_line(info),
        "<p>C2ST: accuracy of a classifier telling the method's draws from the reference's "
        "(0.5: indistinguishable, 1: disjoint). MMD²: against the reference's noise floor "
        "(n reference-posterior draws against the m reference draws). Mean error: the "
        "largest over the parameters of |mean - reference mean| / reference sd (SMD: its "
        "point). cov: fraction of the draws inside the "
        "reference's central 50 % / 90 % intervals (0.5 / 0.9 when they agree). Mean ± sd "
        "over seeds.</p>",
        "<h2>Methods</h2><ul>"
        + "".join(
            f"<li><b>{escape(name)}</b>: {escape(m.summary)}</li>" for name, m in METHODS.items()
        )
        + "</ul>",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        spec = make_task(task)
        ref = references.get(task, {})
        ref_line = (
            f"Reference: {ref.get('kind', '?')}, {ref.get('draws', '?')} draws"
            + (f", ESS {ref['ess']}" if ref.get("ess") else "")
            + (f" ({ref['note']})" if ref.get("note") else "")
            + f"; MMD² noise floor {ref.get('mmd_floor', '?')} ± {ref.get('mmd_floor_sd', '?')}."
        )
        parts.append(f"<h2>{escape(task)}</h2>")
        parts.append(f"<p>{escape(spec.summary)}. Tests: {escape(spec.tests)}.</p>")
        parts.append(f"<p>{escape(ref_line)}</p>")
        parts.append(_task_table(task, cells))
        png = folder / "plots" / f"{task}.png"
        if _plot(task, cells, png):
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(f'<img alt="{escape(task)}" src="data:image/png;base64,{data}">')
        else:
            parts.append(
                '<p class="missing">no plots: matplotlib is not installed '
                "(pip install 'gradcal[plot]')</p>"
            )
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        parts.append("<h2>Failed runs</h2><ul>")
        parts += [
            f"<li>{escape(r['task'])} / {escape(r['method'])} / {r['budget']} / seed "
            f"{r['seed']}: {escape(r['status'])}</li>"
            for r in failed
        ]
        parts.append("</ul>")
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>gradcal benchmark</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )
    path = folder / "bench.html"
    path.write_text(page, encoding="utf-8")
    return path
