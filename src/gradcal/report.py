"""One self-contained HTML page describing a calibration run, from the files in its folder.

:func:`write_report` reads what a run leaves in its folder (``config.toml``,
``posterior_samples.pt``, ``summary.csv``, ``history.csv``, ``predictive.pt``, ``chains.pt``,
``diagnostics.json``) and writes ``report.html`` next to them: tables, figures embedded as
base64 PNG data URIs, inline CSS, no scripts and no external resources, so the file can be
mailed or archived on its own. A run that stopped early gets a page all the same, saying
plainly which parts are missing.

Figures need matplotlib (``pip install 'gradcal[plot]'``); without it the page holds the
tables and says so. No backend is selected here: figures are rendered with
``fig.savefig(buffer, format="png")``, which works on any backend, and closed.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import warnings
from collections.abc import Callable
from datetime import datetime
from html import escape
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gradcal import plotting
from gradcal.config import loads_toml
from gradcal.diagnostics import read_khat

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["REPORT_NAME", "write_report"]

REPORT_NAME = "report.html"

# What each absent file means, in the words the page uses.
_MISSING = {
    "config.toml": "no configuration: config.toml is missing",
    "posterior_samples.pt": (
        "no posterior samples yet: the run stopped before its first epoch finished"
    ),
    "summary.csv": "no summary table yet: the run stopped before it summarised the posterior",
    "history.csv": "no loss history yet: the run stopped before its first epoch finished",
    "predictive.pt": (
        "no posterior predictive simulations yet: the run stopped before its predictive check"
    ),
    "chains.pt": "no chains yet: the run stopped before it saved its first draws",
    "diagnostics.json": "no diagnostics yet: the run stopped before it checked the posterior",
}
_RHAT_OK = 1.01  # R-hat below this for every parameter: the chains agree (Vehtari et al. 2021)
_PPC_ALPHA = 0.05
_MAX_PIXELS = 1600  # longest side of an embedded figure

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.92rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: 0.5rem 0; }
.missing { color: #7a4b00; background: #fff6e0; border-left: 4px solid #e0a400;
           padding: 0.4rem 0.8rem; }
.problem { color: #8a1010; background: #fdecec; border-left: 4px solid #d33;
           padding: 0.4rem 0.8rem; }
.flag { color: #8a1010; font-weight: 600; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.88rem; }
summary { cursor: pointer; font-weight: 600; }
"""


class _Run:
    """The files of one run folder, read once; absent or unreadable ones are noted."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.absent: dict[str, str] = {}  # file name -> what the page says about it
        self.unreadable: list[str] = []

    def read(self, name: str, reader: Callable[[Path], Any]) -> Any:
        path = self.folder / name
        if not path.is_file():
            self.absent[name] = _MISSING[name]
            return None
        try:
            return reader(path)
        except Exception as error:  # a half-written file must not stop the report
            message = f"could not read {name}: {type(error).__name__}: {error}"
            self.absent[name] = message
            self.unreadable.append(name)
            return None

    def note(self, name: str) -> str:
        """The paragraph that says why ``name`` is not shown."""
        kind = "problem" if name in self.unreadable else "missing"
        return _para(self.absent[name], kind)


# --- readers ------------------------------------------------------------------------------


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    return text, loads_toml(text, path.name)


def _read_pt(keys: tuple[str, ...]) -> Callable[[Path], dict[str, Any]]:
    def read(path: Path) -> dict[str, Any]:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or any(k not in data for k in keys):
            raise ValueError(f"expected a dict with keys {list(keys)}, got {type(data).__name__}")
        return data

    return read


def _read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        raise ValueError("the file is empty")
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


# --- HTML pieces --------------------------------------------------------------------------


def _para(text: str, kind: str | None = None) -> str:
    cls = f' class="{kind}"' if kind else ""
    return f"<p{cls}>{escape(text)}</p>"


def _number(x: Any, digits: int = 4) -> str:
    """``x`` to ``digits`` significant digits; '' for None or an empty cell."""
    if x is None or (isinstance(x, str) and not x.strip()):
        return ""
    try:
        return f"{float(x):.{digits}g}"
    except (TypeError, ValueError):
        return str(x)


def _float(x: Any) -> float:
    """``x`` as a float, NaN for None or anything that is not a number."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _table(header: list[str], rows: list[list[tuple[str, str]]]) -> str:
    """An HTML table; each cell is (text, CSS class), the class '' for none."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{cls}">{escape(text)}</td>' if cls else f"<td>{escape(text)}</td>"
            for text, cls in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(draw: Callable[[], Figure], what: str) -> str:
    """``draw()`` rendered as an embedded PNG, or a paragraph saying why it is not."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return _para(
            f"no {what}: figures need matplotlib, which is not installed: "
            "pip install 'gradcal[plot]'",
            "missing",
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with plt.ioff():
                fig = draw()
        except Exception as error:
            return _para(f"could not draw the {what}: {type(error).__name__}: {error}", "problem")
        try:
            buffer = BytesIO()
            dpi = min(100.0, _MAX_PIXELS / max(fig.get_size_inches()))
            fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        finally:
            plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    notes = ""
    for w in caught:  # the plotting warnings (left-out draws) go on the page, others on
        if w.category is UserWarning:
            notes += _para(str(w.message), "missing")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return f'<img alt="{escape(what)}" src="data:image/png;base64,{data}">{notes}'


# --- sections -----------------------------------------------------------------------------


def _summary_section(rows: list[list[str]] | None, run: _Run) -> str:
    if rows is None:
        return run.note("summary.csv")
    header, body = rows[0], rows[1:]
    cells = [
        [(cell, "") if j == 0 else (_number(cell), "num") for j, cell in enumerate(row)]
        for row in body
    ]
    return _table(header, cells)


def _corner_section(posterior: dict[str, Any] | None, run: _Run) -> str:
    if posterior is None:
        return run.note("posterior_samples.pt")
    truth = posterior.get("truth")
    if truth is not None:
        truth = [math.nan if t is None else float(t) for t in truth]
        if all(math.isnan(t) for t in truth):
            truth = None
    return _figure(
        lambda: plotting.corner_plot(
            posterior["samples"],
            prior_samples=posterior.get("prior_samples"),
            truth=truth,
            names=posterior.get("names"),
        ),
        "corner plot of the posterior",
    )


def _history_section(rows: list[list[str]] | None, run: _Run) -> str:
    if rows is None:
        return run.note("history.csv")
    header, body = rows[0], rows[1:]
    if not body:
        return _para("no loss history yet: history.csv has no epoch in it", "missing")
    columns = {
        key: [_float(row[j]) if j < len(row) else math.nan for row in body]
        for j, key in enumerate(header)
        if key in ("total", "loss", "regularisation")
    }
    return _figure(lambda: plotting.loss_history(columns), "loss curve")


def _predictive_section(predictive: dict[str, Any] | None, run: _Run) -> str:
    if predictive is None:
        return run.note("predictive.pt")
    return _figure(
        lambda: plotting.predictive_bands(
            list(predictive["simulated"]),
            list(predictive["observed"]),
            names=predictive.get("names"),
        ),
        "posterior predictive bands",
    )


def _trace_section(chains: dict[str, Any] | None, run: _Run) -> str:
    if chains is None:
        return run.note("chains.pt")
    return _figure(
        lambda: plotting.trace_plot(chains["chains"], names=chains.get("names")),
        "trace plot of the chains",
    )


def _rhat_reading(rhat: list[Any], names: list[str]) -> str:
    values = [_float(r) for r in rhat]
    names = names if len(names) == len(values) else [f"theta_{j}" for j in range(len(values))]
    bad = [(n, r) for n, r in zip(names, values, strict=True) if not r < _RHAT_OK]
    if not bad:
        return (
            f"every rank-normalised R-hat is below {_RHAT_OK} (largest {max(values):.3f}): "
            "the chains agree"
        )
    listed = ", ".join(f"{n} (R-hat {_number(r)})" for n, r in bad)
    return f"the chains of {listed} have not mixed: run longer"


def _ess_reading(ess: list[Any], names: list[str], kind: str = "bulk") -> str:
    values = [_float(e) for e in ess]
    names = names if len(names) == len(values) else [f"theta_{j}" for j in range(len(values))]
    finite = [(e, n) for e, n in zip(values, names, strict=True) if math.isfinite(e)]
    if not finite:
        return f"{kind} effective sample size could not be computed"
    smallest, name = min(finite)
    return f"smallest {kind} effective sample size {round(smallest)} ({name})"


def _ppc_table(ppc: dict[str, Any]) -> str:
    rows = []
    for output, summaries in ppc.items():
        for summary, check in (summaries or {}).items():
            check = check or {}
            p = _float(check.get("p_value"))
            flag = "the model rarely reproduces this feature of the data" if p < _PPC_ALPHA else ""
            rows.append(
                [
                    (str(output), ""),
                    (str(summary), ""),
                    (_number(check.get("observed")), "num"),
                    (_number(check.get("quantile"), 2), "num"),
                    (_number(check.get("p_value"), 2), "num"),
                    (flag, "flag"),
                ]
            )
    header = ["output", "summary", "observed", "quantile among simulations", "p-value", ""]
    return _table(header, rows)


def _diagnostics_section(diagnostics: dict[str, Any] | None, names: list[str], run: _Run) -> str:
    if diagnostics is None:
        return run.note("diagnostics.json")
    readings = []
    if diagnostics.get("khat") is not None:
        khat = _float(diagnostics["khat"])
        readings.append(
            read_khat(khat) if not math.isnan(khat) else "k-hat could not be computed (NaN)"
        )
    if diagnostics.get("rhat"):
        readings.append(_rhat_reading(list(diagnostics["rhat"]), names))
    if diagnostics.get("ess"):
        readings.append(_ess_reading(list(diagnostics["ess"]), names))
    if diagnostics.get("ess_tail"):
        readings.append(_ess_reading(list(diagnostics["ess_tail"]), names, "tail"))
    parts = []
    if readings:
        parts.append("<ul>" + "".join(f"<li>{escape(r)}</li>" for r in readings) + "</ul>")
    if diagnostics.get("ppc"):
        parts.append("<h3>Posterior predictive check</h3>" + _ppc_table(diagnostics["ppc"]))
    if diagnostics.get("notes"):
        notes = "".join(f"<li>{escape(str(n))}</li>" for n in diagnostics["notes"])
        parts.append(f"<h3>Notes</h3><ul>{notes}</ul>")
    return "".join(parts) or _para("diagnostics.json holds no diagnostics.")


def _config_section(config: tuple[str, dict[str, Any]] | None, run: _Run) -> str:
    if config is None:
        return run.note("config.toml")
    return (
        "<details><summary>config.toml (the resolved configuration)</summary>"
        f"<pre>{escape(config[0])}</pre></details>"
    )


# --- the page -----------------------------------------------------------------------------


def _section(title: str, body: str) -> str:
    return f"<section><h2>{escape(title)}</h2>{body}</section>"


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    r"""Write ``report.html`` into a run folder, from the files the run left there.

    The page holds, in order: the run's name (``[run] name`` of ``config.toml``, else the
    folder's name), its method (``[method] kind``), when the report was written, the
    summary table, the corner plot (with prior draws and true values when saved), the loss
    curve (VI, SMD), the posterior predictive bands, the traces (MCMC), the diagnostics read
    in plain words, and the configuration. Images are embedded as base64 PNG and the CSS is
    inline, so the file needs nothing else to open. A file that is missing or cannot be read
    (an interrupted run) is named on the page instead of its section; this never raises for
    that. Any earlier ``report.html`` is replaced; nothing else is written.

    Arguments:
        run_dir: the run folder.

    Returns:
        The path of ``report.html``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = (Path(folder) / "config.toml").write_text('[method]\nkind = "vi"\n')
        ...     page = write_report(folder).read_text()
        >>> "no posterior samples yet" in page
        True
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"`run_dir` must be an existing folder, got {str(run_dir)!r}.")
    run = _Run(folder)
    config = run.read("config.toml", _read_toml)
    settings = config[1] if config else {}
    posterior = run.read("posterior_samples.pt", _read_pt(("samples",)))
    summary = run.read("summary.csv", _read_csv)
    predictive = run.read("predictive.pt", _read_pt(("simulated", "observed")))
    diagnostics = run.read("diagnostics.json", _read_json)

    method = settings.get("method", {}).get("kind")
    has_chains = (folder / "chains.pt").is_file()
    if method is None and has_chains:
        method = "mcmc"
    chains = run.read("chains.pt", _read_pt(("chains",))) if method == "mcmc" else None
    history = run.read("history.csv", _read_csv) if method != "mcmc" else None

    names: list[str] = []
    for source in (chains, posterior):
        if source is not None and source.get("names") is not None:
            names = [str(n) for n in source["names"]]
            break
    if not names and summary is not None:
        names = [row[0] for row in summary[1:]]

    title = settings.get("run", {}).get("name") or folder.resolve().name
    written = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    meta = f"method: {method or 'unknown'} · report written {written}"
    status = ""
    if run.absent:
        missing = [n for n in run.absent if n not in run.unreadable]
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if run.unreadable:
            parts.append("unreadable " + ", ".join(run.unreadable))
        status = _para(
            "This run looks incomplete or damaged: " + "; ".join(parts) + ".",
            "problem" if run.unreadable else "missing",
        )

    sections = [
        _section("Summary", _summary_section(summary, run)),
        _section("Posterior", _corner_section(posterior, run)),
    ]
    if method != "mcmc":
        sections.append(_section("Loss", _history_section(history, run)))
    sections.append(_section("Posterior predictive", _predictive_section(predictive, run)))
    if method == "mcmc":
        sections.append(_section("Traces", _trace_section(chains, run)))
    sections.append(_section("Diagnostics", _diagnostics_section(diagnostics, names, run)))
    sections.append(_section("Configuration", _config_section(config, run)))

    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(str(title))}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{escape(str(title))}</h1>\n<p class=meta>{escape(meta)}</p>\n{status}\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )
    path = folder / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path
