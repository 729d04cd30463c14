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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gradcal import plotting
from gradcal.config import loads_toml
from gradcal.diagnostics import read_ess_fraction, read_khat
from gradcal.diagnostics.psis import ESS_MISSES_MASS, KHAT_BAD, KHAT_GOOD
from gradcal.problems import warn_problem

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "CSS",
    "REPORT_NAME",
    "WIDER_THAN_PRIOR",
    "Finding",
    "Verdict",
    "assess",
    "loss_trend",
    "weight_reading",
    "width_ratios",
    "write_report",
]

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
_ESS_OK, _ESS_POOR = 400, 100  # bulk ESS: 400 for reliable R-hat and intervals (ibid.)
# q's central 90 % interval wider than the prior's by this factor: q has not learnt from the
# data. From 2000 prior draws and 4000 of q the widths carry a few % of Monte Carlo error,
# and a posterior wider than its prior is rare (the data narrow it), so 1.5 is no noise.
WIDER_THAN_PRIOR = 1.5
# The loss is still falling when a Mann-Kendall test over the last _TREND_TAIL of the epochs
# (at least _TREND_MIN_EPOCHS of them) finds a downward trend at one-sided level 1 %.
_TREND_TAIL = 0.5
_TREND_MIN_EPOCHS = 10
_TREND_Z = 2.326  # the standard normal's 99 % quantile
_PPC_ALPHA = 0.05  # a predictive p-value below this: the data are unusual for the model
_PPC_SEVERE = 0.01  # ... and below this: the model does not reproduce the feature
_LEVELS = ("ok", "caution", "bad")  # a finding's levels, from good to bad
_MAX_PIXELS = 1600  # longest side of an embedded figure

# The page style, shared with the benchmark page (gradcal.bench.html).
CSS = """
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
.verdict { padding: 0.6rem 1rem; border-left: 6px solid; margin: 1rem 0; }
.verdict p.headline { font-size: 1.15rem; font-weight: 600; margin: 0.2rem 0; }
.verdict ul { margin: 0.3rem 0; padding-left: 1.3rem; }
.verdict-trust { background: #eaf6ec; border-color: #2e8b3d; }
.verdict-caution { background: #fff6e0; border-color: #e0a400; }
.verdict-bad { background: #fdecec; border-color: #d33; }
.verdict-unknown { background: #f2f2f2; border-color: #888; }
.advice { color: #444; }
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
    # columns empty in every row (R-hat and ESS of a VI run, truth when none is given) go
    keep = [
        j
        for j in range(len(header))
        if j == 0 or any(j < len(row) and row[j].strip() for row in body)
    ]
    cells = [
        [
            (row[j], "") if j == 0 else (_number(row[j] if j < len(row) else ""), "num")
            for j in keep
        ]
        for row in body
    ]
    return _table([header[j] for j in keep], cells)


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


def _negative_loss_note(columns: dict[str, list[float]], loss: Mapping[str, Any]) -> str:
    """Why a loss below zero is no bug, for the estimators that can go there."""
    values = [v for key in ("loss", "total") for v in columns.get(key, []) if math.isfinite(v)]
    if not values or min(values) >= 0:
        return ""
    kind, estimator = loss.get("kind", "mmd"), loss.get("estimator", "unbiased")
    if kind == "mmd" and estimator in ("unbiased", "linear"):
        what = (
            f'the estimator of the squared MMD (loss.estimator = "{estimator}") is unbiased: its '
            "expectation, the squared MMD, is never negative, but a single estimate scatters "
            "around it"
        )
    elif kind == "energy":
        what = (
            "the energy distance is estimated by an unbiased estimator (pairs i != j): its "
            "expectation is never negative, but a single estimate scatters around it"
        )
    else:
        return ""
    return _para(
        f"The loss goes below zero (lowest {min(values):.3g}): {what}, so values near or "
        "below zero mean that the simulations are as close to the data as the estimator can "
        "tell. The regularisation is w KL(q || prior), the total their sum."
    )


def _history_section(
    rows: list[list[str]] | None, run: _Run, loss: Mapping[str, Any] | None = None
) -> str:
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
    figure = _figure(lambda: plotting.loss_history(columns), "loss curve")
    return figure + _negative_loss_note(columns, loss or {})


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
            if p < _PPC_ALPHA:
                reading = ("the model rarely reproduces this feature of the data", "flag")
            elif math.isnan(p):
                reading = ("could not be computed", "")
            else:
                reading = ("like the simulations", "")
            rows.append(
                [
                    (str(output), ""),
                    (str(summary), ""),
                    (_number(check.get("observed")), "num"),
                    (_number(check.get("quantile"), 2), "num"),
                    (_number(check.get("p_value"), 2), "num"),
                    reading,
                ]
            )
    header = ["output", "summary", "observed", "quantile among simulations", "p-value", "reading"]
    return _table(header, rows)


def weight_reading(weight: Mapping[str, Any]) -> str:
    """A calibrated w in words: the value, its estimated coverage and its cost.

    Example:
        >>> weight_reading({"w": 0.002, "coverage": 0.9, "coverage_error": 0.03, "level": 0.9,
        ...     "w_information": 0.0018, "resample": "block", "n_bootstrap": 100,
        ...     "fits": 113, "simulations": 20000, "seconds": 31.0})[:52]
        'w = 0.002 was chosen so that 90% credible sets cover'
    """
    level = 100 * _float(weight.get("level"))
    return (
        f"w = {_number(weight.get('w'))} was chosen so that {level:.0f}% credible sets cover "
        f"the parameter about {level:.0f}% of the time: at this w their estimated coverage is "
        f"{_number(weight.get('coverage'), 3)} +- {_number(weight.get('coverage_error'), 2)} "
        f"({weight.get('resample')} bootstrap, {weight.get('n_bootstrap')} data sets; the "
        f"information-matching w is {_number(weight.get('w_information'))}). Cost: "
        f"{weight.get('fits')} point-estimate fits, {weight.get('simulations')} simulations, "
        f"{_number(weight.get('seconds'), 3)} s."
    )


def _loss_check_table(check: Mapping[str, Any]) -> str:
    p = _float(check.get("p_value"))
    flag = "flag" if p < _PPC_SEVERE else ""
    rows = [
        [
            (_number(check.get("observed_median")), "num"),
            (_number(check.get("replicated_median")), "num"),
            (_number(check.get("replicated_q95")), "num"),
            (_number(p, 2), "num"),
        ]
    ]
    header = [
        "observed loss (median over draws)",
        "loss of simulated data (median)",
        "(95th percentile)",
        "p-value",
    ]
    return _table(header, rows) + _para(str(check.get("reading", "")), flag or None)


def _loss_check_finding(check: Mapping[str, Any], weight: Any) -> Finding | None:
    p = _float(check.get("p_value"))
    if math.isnan(p):
        return None
    if p >= _PPC_SEVERE:
        return Finding(
            "ok", f"loss check: the observed loss is typical of the model's (p {p:.2g})"
        )
    advice = (
        "w was calibrated, so the intervals aim at the pseudo-true parameter with their "
        "nominal coverage; improve the model if that parameter is not what you need"
        if weight
        else 'set method.w = "calibrate" (with an MMD or energy-distance loss) so that the '
        "intervals keep their nominal coverage despite the misfit, or improve the model"
    )
    return Finding(
        "caution",
        f"the model cannot reproduce the data: the observed loss is larger than the model's "
        f"own data give (loss check p-value {p:.2g}); the model is misspecified",
        advice,
    )


def _diagnostics_section(diagnostics: dict[str, Any] | None, names: list[str], run: _Run) -> str:
    if diagnostics is None:
        return run.note("diagnostics.json")
    readings = []
    if diagnostics.get("khat") is not None:
        khat = _float(diagnostics["khat"])
        readings.append(
            read_khat(khat) if not math.isnan(khat) else "k-hat could not be computed (NaN)"
        )
    if diagnostics.get("ess_fraction") is not None:  # next to k-hat, from the same draws
        readings.append(read_ess_fraction(_float(diagnostics["ess_fraction"])))
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
    if diagnostics.get("weight"):
        parts.append("<h3>Choice of w</h3>" + _para(weight_reading(diagnostics["weight"])))
    if diagnostics.get("loss_check"):
        parts.append("<h3>Loss check</h3>" + _loss_check_table(diagnostics["loss_check"]))
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


# --- the verdict --------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One diagnostic read in words: ``level`` is "ok", "caution" or "bad"; ``advice`` says
    what to do next (empty when nothing needs doing)."""

    level: str
    text: str
    advice: str = ""


@dataclass(frozen=True)
class Verdict:
    """The report's answer to "can I use this fit?".

    ``level``: "trust" (every diagnostic is good), "caution", "bad" (do not trust) or
    "unknown" (no diagnostic to judge by); ``headline`` says it in one sentence and
    ``findings`` give the reasons, worst first.
    """

    level: str
    headline: str
    findings: tuple[Finding, ...]


_HEADLINES = {
    "trust": "The fit can be used: every diagnostic below is good.",
    "caution": "Use with care: the fit is usable for some purposes; see the notes below.",
    "bad": "Do not trust this fit yet: at least one diagnostic says it is wrong.",
    "unknown": "No verdict: the run left no diagnostics to judge it by.",
}


def _vi_advice(method: Mapping[str, Any]) -> str:
    epochs, draws = method.get("epochs"), method.get("samples_per_epoch")
    family = method.get("family")
    other = "full_rank" if family in ("nsf", "maf") else "nsf"
    now = lambda value: f" (now {value})" if value is not None else ""  # noqa: E731
    return (
        f"train longer (method.epochs{now(epochs)}), use more draws per epoch "
        f"(method.samples_per_epoch{now(draws)}), try another family (method.family = "
        f'"{other}"), or compare with method.kind = "mcmc"'
    )


def _khat_finding(khat: float, method: Mapping[str, Any], exact: bool) -> Finding:
    if math.isnan(khat):
        return Finding(
            "caution",
            "k-hat could not be computed, so nothing checks how well q fits the posterior",
            'compare with method.kind = "mcmc"',
        )
    noisy = (
        ""
        if exact
        else " (the simulator noise left in the loss raises k-hat a little: a larger w "
        "makes that noise matter less)"
    )
    if khat < KHAT_GOOD:
        return Finding("ok", f"k-hat {khat:.2f} < {KHAT_GOOD}: q fits the posterior well")
    if khat < KHAT_BAD:
        return Finding(
            "caution",
            f"k-hat {khat:.2f} lies between {KHAT_GOOD} and {KHAT_BAD}: means and central "
            "intervals are usable, tail probabilities are not",
            "for tails, " + _vi_advice(method) + noisy,
        )
    covering = ""
    if method.get("objective", "reverse_kl") == "reverse_kl":
        covering = (
            "reverse KL is mode-seeking, so q may sit on one mode only: refit with a "
            'mass-covering objective (method.objective = "renyi" or "forward_kl") and a '
            'family that holds several modes (method.family = "mixture" or '
            '"flow_mixture"); or '
        )
    return Finding(
        "bad",
        f"k-hat {khat:.2f} >= {KHAT_BAD}: q misses part of the posterior (a tail, or a "
        "whole mode), so its intervals cannot be relied on",
        covering + _vi_advice(method) + noisy,
    )


def _mcmc_advice(method: Mapping[str, Any]) -> str:
    samples, warmup = method.get("samples"), method.get("warmup")
    now = lambda value: f" (now {value})" if value is not None else ""  # noqa: E731
    return (
        f"run longer: more warm-up (method.warmup{now(warmup)}) and more draws "
        f"(method.samples{now(samples)}), or more chains (method.chains)"
    )


def _chain_findings(
    rhat: Sequence[Any] | None,
    ess: Sequence[Any] | None,
    names: Sequence[str],
    method: Mapping[str, Any],
) -> list[Finding]:
    findings = []

    def named(values: Sequence[Any]) -> list[tuple[str, float]]:
        labels = (
            list(names)
            if len(names) == len(values)
            else [f"theta_{j}" for j in range(len(values))]
        )
        return [(n, _float(v)) for n, v in zip(labels, values, strict=True)]

    if rhat:
        bad = [(n, r) for n, r in named(rhat) if not r < _RHAT_OK]
        if bad:
            listed = ", ".join(f"{n} ({_number(r)})" for n, r in bad)
            findings.append(
                Finding(
                    "bad",
                    f"R-hat >= {_RHAT_OK} for {listed}: the chains have not mixed, they do "
                    "not yet sample one posterior",
                    _mcmc_advice(method),
                )
            )
        else:
            largest = max(r for _, r in named(rhat))
            findings.append(Finding("ok", f"every R-hat < {_RHAT_OK} (largest {largest:.3f})"))
    if ess:
        finite = [(e, n) for n, e in named(ess) if math.isfinite(e)]
        if not finite:
            findings.append(
                Finding(
                    "caution",
                    "the effective sample size could not be computed",
                    _mcmc_advice(method),
                )
            )
        else:
            smallest, name = min(finite)
            text = f"smallest effective sample size {round(smallest)} ({name})"
            if smallest < _ESS_POOR:
                findings.append(
                    Finding(
                        "bad",
                        f"{text} < {_ESS_POOR}: too few independent draws for intervals",
                        _mcmc_advice(method),
                    )
                )
            elif smallest < _ESS_OK:
                findings.append(
                    Finding(
                        "caution",
                        f"{text} < {_ESS_OK}: means are usable, interval ends are noisy",
                        _mcmc_advice(method),
                    )
                )
            else:
                findings.append(Finding("ok", f"{text} >= {_ESS_OK}"))
    return findings


def _ppc_findings(ppc: Mapping[str, Any], method: Mapping[str, Any]) -> list[Finding]:
    worst: list[tuple[float, str, str]] = []
    count = 0
    for output, summaries in ppc.items():
        for summary, check in (summaries or {}).items():
            p = _float((check or {}).get("p_value"))
            count += 1
            if p < _PPC_ALPHA:
                worst.append((p, str(output), str(summary)))
    if count == 0:
        return []
    if not worst:
        return [
            Finding(
                "ok",
                f"posterior predictive check: the data look like the calibrated model's "
                f"simulations in all {count} summaries (every p-value >= {_PPC_ALPHA})",
            )
        ]
    findings = []
    for p, output, summary in sorted(worst):
        level = "bad" if p < _PPC_SEVERE else "caution"
        findings.append(
            Finding(
                level,
                f"posterior predictive check: the {summary} of {output} is unusual for the "
                f"calibrated model (p-value {p:.2g})",
                "the model may not reproduce this feature of the data (misspecified), or "
                "the fit has not converged: look at the predictive bands, "
                + (_vi_advice(method) if method.get("kind", "vi") == "vi" else "run longer")
                + ", or choose a loss that sees this feature (e.g. loss.window for "
                "dependence between time steps)",
            )
        )
    return findings


def _truth_findings(
    intervals: Sequence[Mapping[str, Any]], method: Mapping[str, Any]
) -> list[Finding]:
    outside_90, outside_99, inside, checked = [], [], [], 0
    for row in intervals:
        truth = _float(row.get("truth"))
        low, high = _float(row.get("q05")), _float(row.get("q95"))
        if not (math.isfinite(truth) and math.isfinite(low) and math.isfinite(high)):
            continue
        checked += 1
        name = str(row.get("parameter", "?"))
        if low <= truth <= high:
            inside.append(name)
            continue
        wide = (_float(row.get("q005")), _float(row.get("q995")))
        if all(math.isfinite(w) for w in wide) and not wide[0] <= truth <= wide[1]:
            outside_99.append(
                f"{name} (truth {_number(truth)}, 90 % interval "
                f"{_number(low, 3)} to {_number(high, 3)})"
            )
        else:
            outside_90.append(
                f"{name} (truth {_number(truth)}, 90 % interval "
                f"{_number(low, 3)} to {_number(high, 3)})"
            )
    if checked == 0:
        return []
    if method.get("kind") == "vi":
        advice = "widen the posterior with a larger w, " + _vi_advice(method)
    elif method.get("kind") == "mcmc":
        advice = "use a larger w if the loss is not a likelihood, or " + _mcmc_advice(method)
    else:
        advice = 'use method.kind = "vi" or "mcmc" for a posterior with intervals'
    findings = []
    if outside_99:
        findings.append(
            Finding(
                "bad",
                "the true value lies outside the central 99 % of the posterior for "
                + "; ".join(outside_99)
                + ": the posterior is too narrow or off target",
                advice,
            )
        )
    if outside_90:
        findings.append(
            Finding(
                "caution",
                "the true value lies outside the 90 % interval for "
                + "; ".join(outside_90)
                + ": a correct posterior misses about 1 true value in 10; more often means "
                "the posterior is too narrow",
                advice,
            )
        )
    if not findings:
        findings.append(
            Finding(
                "ok",
                f"the true value lies inside the 90 % interval of all {checked} "
                "parameters with a known truth",
            )
        )
    return findings


def width_ratios(
    samples: torch.Tensor, prior_samples: torch.Tensor, names: Sequence[str]
) -> dict[str, float]:
    """Per parameter, the width of q's central 90 % interval over the prior's.

    Quantiles rather than sds, so that a heavy-tailed prior or q (a lognormal) does not
    decide the reading by a few far draws.

    Arguments:
        samples: draws of q (N, D).
        prior_samples: draws of the prior (M, D).
        names: the D parameter names.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> r = width_ratios(3 * torch.randn(4000, 1, generator=g),
        ...                  torch.randn(4000, 1, generator=g), ["a"])
        >>> 2.8 < r["a"] < 3.2
        True
    """
    levels = torch.tensor([0.05, 0.95], dtype=torch.float64)

    def widths(x: torch.Tensor) -> torch.Tensor:
        q = torch.nanquantile(torch.as_tensor(x, dtype=torch.float64), levels, dim=0)
        return q[1] - q[0]

    ratio = widths(samples) / widths(prior_samples)
    return {str(n): float(r) for n, r in zip(names, ratio, strict=True)}


def loss_trend(values: Sequence[float]) -> float:
    r"""Mann-Kendall z of a series: negative when it falls, about N(0, 1) without a trend.

    $S = \sum_{i<j} \mathrm{sign}(x_j - x_i)$, $\mathrm{Var}\,S = n(n-1)(2n+5)/18$
    (no ties), $z = (S - \mathrm{sign}\,S) / \sqrt{\mathrm{Var}\,S}$. It uses ranks
    only, so a few wild epochs (a draw with a huge loss) cannot make or hide a trend.
    Non-finite values are left out; NaN for fewer than 3 values.

    Example:
        >>> loss_trend([5.0, 4.0, 4.5, 3.0, 2.0, 2.5, 1.0]) < -2
        True
        >>> abs(loss_trend([1.0, 2.0, 1.0, 2.0, 1.0, 2.0])) < 1
        True
    """
    x = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float64)
    n = x.numel()
    if n < 3:
        return math.nan
    s = float(torch.sign(x[None, :] - x[:, None]).triu(1).sum())
    var = n * (n - 1) * (2 * n + 5) / 18
    return (s - math.copysign(1.0, s) * (s != 0)) / math.sqrt(var)


def _trend_finding(history: Sequence[float], method: Mapping[str, Any]) -> Finding | None:
    """Is the loss still falling over the last part of the epochs?"""
    n = len(history)
    if n < _TREND_MIN_EPOCHS:
        return Finding(
            "caution",
            f"only {n} epoch(s): too few to tell whether the loss has settled",
            _vi_advice(method),
        )
    tail = list(history[n - max(_TREND_MIN_EPOCHS, math.ceil(_TREND_TAIL * n)) :])
    z = loss_trend(tail)
    if not z < -_TREND_Z:
        return None
    return Finding(
        "caution",
        f"the loss is still falling over the last {len(tail)} epochs (Mann-Kendall trend "
        f"test z = {z:.1f}): the fit has not converged",
        "train longer (method.epochs"
        + (f", now {method['epochs']})" if "epochs" in method else ")"),
    )


def _width_finding(ratios: Mapping[str, float], method: Mapping[str, Any]) -> Finding | None:
    wide = {n: r for n, r in ratios.items() if r > WIDER_THAN_PRIOR}
    if not wide:
        return None
    listed = ", ".join(f"{n} ({r:.1f} times)" for n, r in wide.items())
    start = (
        "" if method.get("init") == "prior" else 'start q at the prior (method.init = "prior"), '
    )
    return Finding(
        "bad",
        f"q is wider than the prior for {listed} (central 90 % intervals): q has not learnt "
        "from the data, it has not moved from its start",
        start + _vi_advice(method),
    )


def _ess_finding(fraction: float, method: Mapping[str, Any]) -> Finding | None:
    if not fraction < ESS_MISSES_MASS:  # NaN too: k-hat's finding says it
        return None
    return Finding(
        "bad",
        f"importance-sampling ESS {100 * fraction:.1f} % of the draws < "
        f"{100 * ESS_MISSES_MASS:.0f} %: q and the posterior differ a lot (q misses mass, or "
        "is much wider than the posterior, which k-hat cannot see), so its intervals are not "
        "the posterior's",
        _vi_advice(method),
    )


def assess(
    diagnostics: Mapping[str, Any] | None,
    intervals: Sequence[Mapping[str, Any]] = (),
    method: Mapping[str, Any] | None = None,
    names: Sequence[str] = (),
    exact_loss: bool = False,
    history: Sequence[float] | None = None,
    widths: Mapping[str, float] | None = None,
) -> Verdict:
    r"""Read a run's diagnostics into one verdict with what to do next.

    Each diagnostic gives a :class:`Finding` ("ok", "caution" or "bad"); the verdict is the
    worst of them ("trust" when all are "ok", "unknown" when there are none):

    - PSIS k-hat (VI): < 0.5 ok, < 0.7 caution (means and central intervals only), else bad;
    - importance-sampling ESS (VI) below 10 % of the draws: bad. k-hat sees a q whose tails
      are too light; an over-dispersed q gives bounded weights and a small k-hat, and only
      the ESS shows it;
    - q's central 90 % interval more than 1.5 times the prior's for a parameter (VI,
      ``widths``): bad, q has not learnt from the data;
    - the loss still falling (VI, ``history``): a Mann-Kendall test over the last half of
      the epochs (at least 10) finds a downward trend at one-sided level 1 %: caution; fewer
      than 10 epochs: caution;
    - R-hat (MCMC): any >= 1.01 bad; smallest ESS < 100 bad, < 400 caution;
    - posterior predictive p-values: < 0.01 bad, < 0.05 caution;
    - a given truth outside the 90 % interval: caution (a correct posterior misses about 1
      in 10), outside the central 99 % (when ``q005``/``q995`` are given): bad;
    - SMD: a point estimate, caution (no uncertainty); a skipped predictive check: caution;
    - the loss check (observed loss against the model's own data): p < 0.01 caution, the
      model is misspecified; a calibrated w: ok, with its estimated coverage.

    Arguments:
        diagnostics: the contents of ``diagnostics.json`` (``khat`` and ``ess_fraction``,
            the importance-sampling ESS per draw, quoted beside it; ``rhat``, ``ess``,
            ``ppc``, ``notes``), or None when the run left none.
        intervals: one mapping per parameter with ``parameter``, ``q05``, ``q95``,
            ``truth`` and optionally ``q005``, ``q995`` (numbers or strings; blanks skip).
        method: the ``[method]`` table (``kind`` and the settings the advice quotes).
        names: parameter names, for R-hat and ESS.
        exact_loss: the loss is an exact negative log-likelihood (k-hat has no simulator
            noise then).
        history: the objective's total per epoch (VI; under annealing of w only the epochs
            at the final w), or None.
        widths: per parameter, q's central 90 % interval over the prior's
            (:func:`width_ratios`), or None.

    Example:
        >>> verdict = assess({"khat": 0.9}, method={"kind": "vi", "epochs": 250})
        >>> verdict.level, "mass-covering objective" in verdict.findings[0].advice
        ('bad', True)
        >>> assess({"khat": 0.3}, [{"parameter": "a", "q05": 0, "q95": 1, "truth": 0.5}]).level
        'trust'
    """
    method = dict(method or {})
    kind = method.get("kind")
    if diagnostics is None:
        return Verdict("unknown", _HEADLINES["unknown"], ())
    findings: list[Finding] = []
    if kind == "smd":
        findings.append(
            Finding(
                "caution",
                "SMD gives a point estimate: there is no posterior, so no uncertainty",
                'for intervals use method.kind = "vi" or "mcmc"',
            )
        )
    if diagnostics.get("khat") is not None:
        finding = _khat_finding(_float(diagnostics["khat"]), method, exact_loss)
        if diagnostics.get("ess_fraction") is not None:  # the ESS beside k-hat
            ess = _float(diagnostics["ess_fraction"])
            text = f"{finding.text} (importance-sampling ESS {100 * ess:.1f} % of the draws)"
            finding = Finding(finding.level, text, finding.advice)
        findings.append(finding)
    if kind in (None, "vi"):
        extra = [
            _ess_finding(_float(diagnostics.get("ess_fraction")), method),
            _width_finding(widths or {}, method),
            _trend_finding(history, method) if history is not None else None,
        ]
        findings += [f for f in extra if f is not None]
    findings += _chain_findings(diagnostics.get("rhat"), diagnostics.get("ess"), names, method)
    if diagnostics.get("ppc"):
        findings += _ppc_findings(diagnostics["ppc"], method)
    elif any("predictive check skipped" in str(n) for n in diagnostics.get("notes", ())):
        findings.append(
            Finding(
                "caution",
                "no posterior predictive check: the simulations could not be compared with "
                "the data (see the notes)",
                "make the data as long as the model's output (see the notes)",
            )
        )
    if diagnostics.get("weight"):
        findings.append(Finding("ok", weight_reading(diagnostics["weight"])))
    if diagnostics.get("loss_check"):
        finding = _loss_check_finding(diagnostics["loss_check"], diagnostics.get("weight"))
        findings += [finding] if finding is not None else []
    findings += _truth_findings(intervals, method)
    if not findings:
        return Verdict("unknown", _HEADLINES["unknown"], ())
    findings.sort(key=lambda f: -_LEVELS.index(f.level))
    worst = findings[0].level
    level = "trust" if worst == "ok" else worst
    return Verdict(level, _HEADLINES[level], tuple(findings))


def _verdict_box(verdict: Verdict) -> str:
    items = "".join(
        f"<li><strong>{escape(f.level)}</strong>: {escape(f.text)}"
        + (f'<br><span class="advice">next: {escape(f.advice)}</span>' if f.advice else "")
        + "</li>"
        for f in verdict.findings
    )
    listed = f"<ul>{items}</ul>" if items else ""
    return (
        f'<div class="verdict verdict-{verdict.level}"><p class="headline">'
        f"{escape(verdict.headline)}</p>{listed}</div>"
    )


# --- the page -----------------------------------------------------------------------------


def _intervals(
    summary: list[list[str]] | None, posterior: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """summary.csv's rows as mappings, with the central 99 % interval from the samples."""
    if summary is None:
        return []
    header, body = summary[0], summary[1:]
    rows = [dict(zip(header, row, strict=False)) for row in body]
    if posterior is not None and posterior.get("names") is not None:
        samples = torch.as_tensor(posterior["samples"], dtype=torch.float64)
        names = [str(n) for n in posterior["names"]]
        if samples.ndim == 2 and samples.shape[1] == len(names) and samples.shape[0] > 1:
            wide = torch.nanquantile(samples, torch.tensor([0.005, 0.995], dtype=torch.float64), 0)
            for row in rows:
                if row.get("parameter") in names:
                    j = names.index(row["parameter"])
                    row["q005"], row["q995"] = wide[0, j].item(), wide[1, j].item()
    return rows


def _totals(history: list[list[str]] | None) -> list[float] | None:
    """history.csv's ``total`` per epoch, under annealing only the epochs at the final w."""
    if history is None or "total" not in history[0] or len(history) < 2:
        return None
    header, body = history[0], history[1:]
    column = [_float(row[header.index("total")]) for row in body]
    if "w" in header:
        w = [_float(row[header.index("w")]) for row in body]
        column = [c for c, v in zip(column, w, strict=True) if v == w[-1]]
    return column


def _widths(posterior: dict[str, Any] | None) -> dict[str, float] | None:
    """q's central 90 % interval over the prior's, from posterior_samples.pt."""
    if posterior is None or posterior.get("prior_samples") is None:
        return None
    samples, prior = posterior["samples"], posterior["prior_samples"]
    names = posterior.get("names") or [f"theta_{j}" for j in range(samples.shape[-1])]
    if (
        samples.ndim != 2
        or prior.shape[-1:] != samples.shape[-1:]
        or len(names) != samples.shape[1]
    ):
        return None
    return width_ratios(samples, prior.reshape(-1, samples.shape[1]), names)


def _section(title: str, body: str) -> str:
    return f"<section><h2>{escape(title)}</h2>{body}</section>"


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    r"""Write ``report.html`` into a run folder, from the files the run left there.

    The page holds, in order: the run's name (``[run] name`` of ``config.toml``, else the
    folder's name), its method (``[method] kind``), when the report was written, the
    summary table, the corner plot (with prior draws and true values when saved), the loss
    curve (VI, SMD), the posterior predictive bands, the traces (MCMC), the diagnostics read
    in plain words, and the configuration. A verdict of "do not trust" is also issued as a
    :class:`~gradcal.problems.GradcalWarning` naming the worst finding. Images are embedded
    as base64 PNG and the CSS is inline, so the file needs nothing else to open. A file that
    is missing or cannot be read (an interrupted run) is named on the page instead of its
    section; this never raises for that. Any earlier ``report.html`` is replaced; nothing
    else is written.

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

    verdict = assess(
        diagnostics,
        _intervals(summary, posterior),
        {"kind": method, **settings.get("method", {})},
        names,
        exact_loss=settings.get("loss", {}).get("kind") == "nll",
        history=_totals(history) if method == "vi" else None,
        widths=_widths(posterior) if method == "vi" else None,
    )
    if verdict.level == "bad":  # a Python user who never opens the page hears it too
        warn_problem(f"{verdict.headline} {verdict.findings[0].text} (see {folder / REPORT_NAME})")
    sections = [
        _section("Summary", _summary_section(summary, run)),
        _section("Posterior", _corner_section(posterior, run)),
    ]
    if method != "mcmc":
        sections.append(_section("Loss", _history_section(history, run, settings.get("loss", {}))))
    sections.append(_section("Posterior predictive", _predictive_section(predictive, run)))
    if method == "mcmc":
        sections.append(_section("Traces", _trace_section(chains, run)))
    sections.append(_section("Diagnostics", _diagnostics_section(diagnostics, names, run)))
    sections.append(_section("Configuration", _config_section(config, run)))

    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(str(title))}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{escape(str(title))}</h1>\n<p class=meta>{escape(meta)}</p>\n{status}\n"
        f"{_verdict_box(verdict)}\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )
    path = folder / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path
