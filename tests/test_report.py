"""report.html: one self-contained page per run folder, complete or interrupted."""

import builtins
import importlib.util
import json
from html import escape
from pathlib import Path

import pytest
import torch

from gradcal.diagnostics import read_ess_fraction, read_khat
from gradcal.report import assess, loss_trend, width_ratios, write_report

IMAGE = "data:image/png;base64,"
figures = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="figures need matplotlib"
)
SUMMARY = (
    "parameter,mean,std,q05,q50,q95,truth,rhat,ess,khat\n"
    "a,1.234567,0.0123456,1.2,1.23,1.26,1.25,{rhat_a},{ess_a},{khat}\n"
    "b,-0.5,0.25,-0.9,-0.5,-0.1,,{rhat_b},{ess_b},{khat}\n"
)


def make_run(folder: Path, kind: str, name: str | None = "demo run") -> Path:
    """A fake run folder of method ``kind`` with small tensors (D = 2, two outputs)."""
    folder.mkdir(parents=True, exist_ok=True)
    run = f'[run]\nname = "{name}"\n\n' if name else ""
    (folder / "config.toml").write_text(f'{run}[method]\nkind = "{kind}"\nepochs = 3\n')
    samples = torch.randn(300, 2) * 0.1 + torch.tensor([1.2, -0.5])
    posterior = {"samples": samples, "names": ["a", "b"]}
    if kind == "vi":
        posterior |= {"prior_samples": torch.randn(300, 2), "truth": [1.25, None]}
    torch.save(posterior, folder / "posterior_samples.pt")
    mcmc = kind == "mcmc"
    (folder / "summary.csv").write_text(
        SUMMARY.format(
            rhat_a="1.002" if mcmc else "",
            rhat_b="1.08" if mcmc else "",
            ess_a="812.3" if mcmc else "",
            ess_b="37.2" if mcmc else "",
            khat="0.42" if kind == "vi" else "",
        )
    )
    if kind == "vi":
        lines = [f"{e},{5 / (e + 1) + 0.5},{5 / (e + 1)},0.5,0" for e in range(6)]
        (folder / "history.csv").write_text(
            "epoch,total,loss,regularisation,dropped\n" + "\n".join(lines) + "\n"
        )
    elif kind == "smd":
        lines = [f"{e},{4 / (e + 1)}" for e in range(6)]
        (folder / "history.csv").write_text("epoch,loss\n" + "\n".join(lines) + "\n")
    else:
        chains = torch.randn(2, 50, 2).cumsum(1) * 0.01
        torch.save({"chains": chains, "names": ["a", "b"]}, folder / "chains.pt")
    torch.save(
        {
            "simulated": [torch.randn(40, 20), torch.randn(40, 15).cumsum(1)],
            "observed": [torch.randn(20), torch.randn(15).cumsum(0)],
            "names": ["x", "y"],
        },
        folder / "predictive.pt",
    )
    diagnostics = {
        "ppc": {
            "x": {"std": {"observed": 1.01234, "quantile": 0.55, "p_value": 0.9}},
            "y": {"mean": {"observed": 3.5, "quantile": 0.99, "p_value": 0.02}},
        },
        "notes": ["1 of 300 draws failed and were redrawn"],
    }
    if kind == "vi":
        diagnostics["khat"] = 0.42
    if mcmc:
        diagnostics |= {"rhat": [1.002, 1.08], "ess": [812.3, 37.2]}
    (folder / "diagnostics.json").write_text(json.dumps(diagnostics))
    return folder


def files_under(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """An empty working directory, to check that nothing is written into it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield cwd
    assert not any(cwd.iterdir())


def check_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page


# --- complete runs ------------------------------------------------------------------------


@figures
@pytest.mark.parametrize(
    ("kind", "images"),
    [("vi", 3), ("smd", 3), ("mcmc", 3)],  # corner + loss + bands; MCMC: traces, no loss
)
def test_complete_run(tmp_path, elsewhere, kind, images):
    folder = make_run(tmp_path / "run", kind)
    before = files_under(folder)

    path = write_report(folder)

    assert path == folder / "report.html" and path.is_file()
    assert files_under(folder) == before | {Path("report.html")}
    page = path.read_text(encoding="utf-8")
    check_self_contained(page)
    assert page.count(IMAGE) == images
    assert "<title>demo run</title>" in page and f"method: {kind}" in page
    # summary values to 4 significant digits
    for value in ("1.235", "0.01235", "-0.5", "1.25"):
        assert f'<td class="num">{value}</td>' in page
    assert "1.234567" not in page
    # configuration, collapsible
    assert "<details>" in page and "epochs = 3" in page
    # posterior predictive check and notes
    assert "the model rarely reproduces this feature of the data" in page
    assert page.count("the model rarely reproduces") == 1
    assert "1 of 300 draws failed and were redrawn" in page
    assert "missing" not in page.split("</h1>")[1].split("<section>")[0]  # no status line
    if kind == "vi":
        assert escape(read_khat(0.42)) in page
    else:
        assert "k-hat" not in page
    if kind == "mcmc":
        assert "Traces" in page and "<h2>Loss</h2>" not in page
        assert "the chains of b (R-hat 1.08) have not mixed: run longer" in page
        assert "smallest bulk effective sample size 37 (b)" in page
    else:
        assert "<h2>Loss</h2>" in page and "Traces" not in page


@figures
def test_chains_that_agree_and_a_bad_khat(tmp_path):
    folder = make_run(tmp_path / "run", "mcmc", name=None)
    data = json.loads((folder / "diagnostics.json").read_text())
    data |= {"rhat": [1.001, 1.004], "khat": 0.9}
    (folder / "diagnostics.json").write_text(json.dumps(data))
    page = write_report(str(folder)).read_text(encoding="utf-8")
    assert "<title>run</title>" in page  # no [run] name: the folder's name
    assert "(largest 1.004): the chains agree" in page
    assert escape(read_khat(0.9)) in page


@figures
def test_the_importance_sampling_ess_stands_next_to_khat(tmp_path):
    folder = make_run(tmp_path / "run", "vi")
    data = json.loads((folder / "diagnostics.json").read_text())
    (folder / "diagnostics.json").write_text(json.dumps(data | {"ess_fraction": 0.04}))
    page = write_report(str(folder)).read_text(encoding="utf-8")
    khat_at = page.index(escape(read_khat(0.42)))
    ess_at = page.index(escape(read_ess_fraction(0.04)))
    assert "q misses mass" in read_ess_fraction(0.04)
    assert 0 < ess_at - khat_at < 300  # the next reading in the same list
    assert "k-hat 0.42 &lt; 0.5: q fits the posterior well (importance-sampling ESS 4.0 %" in page
    verdict = assess({"khat": 0.3, "ess_fraction": 0.62}, method={"kind": "vi"})
    assert verdict.findings[0].text.endswith("(importance-sampling ESS 62.0 % of the draws)")


@figures
def test_plotting_warnings_go_on_the_page(tmp_path):
    folder = make_run(tmp_path / "run", "smd")
    posterior = torch.load(folder / "posterior_samples.pt", weights_only=True)
    posterior["samples"][:3, 0] = torch.nan
    torch.save(posterior, folder / "posterior_samples.pt")
    page = write_report(folder).read_text(encoding="utf-8")
    assert "left out 3 of 300 draws" in page and page.count(IMAGE) == 3


@figures
def test_text_from_the_files_is_escaped(tmp_path):
    folder = make_run(tmp_path / "run", "smd", name="<i>run</i> & co")
    posterior = torch.load(folder / "posterior_samples.pt", weights_only=True)
    posterior["names"] = ["<b>a</b>", "b"]
    torch.save(posterior, folder / "posterior_samples.pt")
    summary = (folder / "summary.csv").read_text().replace("\na,", "\n<b>a</b>,")
    (folder / "summary.csv").write_text(summary)
    page = write_report(folder).read_text(encoding="utf-8")
    assert "<b>" not in page and "<i>" not in page
    assert "&lt;b&gt;a&lt;/b&gt;" in page and "&lt;i&gt;run&lt;/i&gt; &amp; co" in page


# --- interrupted and damaged runs ---------------------------------------------------------


def test_only_a_configuration(tmp_path, elsewhere):
    folder = tmp_path / "stopped"
    folder.mkdir()
    (folder / "config.toml").write_text('[method]\nkind = "vi"\n')
    page = write_report(folder).read_text(encoding="utf-8")
    assert files_under(folder) == {Path("config.toml"), Path("report.html")}
    check_self_contained(page)
    assert IMAGE not in page
    assert "<title>stopped</title>" in page
    assert "no posterior samples yet: the run stopped before its first epoch finished" in page
    assert "no summary table yet" in page and "no loss history yet" in page
    assert "no diagnostics yet" in page and "no posterior predictive simulations yet" in page
    assert "This run looks incomplete" in page
    assert 'kind = "vi"' not in page and "kind = &quot;vi&quot;" in page


def test_mcmc_without_chains_says_so_and_does_not_ask_for_a_history(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.toml").write_text('[method]\nkind = "mcmc"\n')
    page = write_report(folder).read_text(encoding="utf-8")
    assert "no chains yet" in page and "history" not in page


def test_empty_folder(tmp_path):
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "no configuration: config.toml is missing" in page and "method: unknown" in page


@figures
def test_a_damaged_file_is_named_and_the_rest_is_shown(tmp_path):
    folder = make_run(tmp_path / "run", "vi")
    (folder / "posterior_samples.pt").write_bytes(b"half a file")
    (folder / "diagnostics.json").write_text('{"khat": 0.4')
    page = write_report(folder).read_text(encoding="utf-8")
    assert "could not read posterior_samples.pt" in page
    assert "could not read diagnostics.json" in page
    assert page.count(IMAGE) == 2  # loss curve and predictive bands still drawn
    assert '<td class="num">1.235</td>' in page


def test_a_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="must be an existing folder"):
        write_report(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_without_matplotlib_the_page_has_the_tables(tmp_path, monkeypatch):
    folder = make_run(tmp_path / "run", "vi")
    real_import = builtins.__import__

    def fake_import(module, *args, **kwargs):
        if module == "matplotlib" or module.startswith("matplotlib."):
            raise ImportError(f"No module named {module!r}")
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    page = write_report(folder).read_text(encoding="utf-8")
    assert IMAGE not in page
    assert "pip install &#x27;gradcal[plot]&#x27;" in page
    assert '<td class="num">1.235</td>' in page


# --- the verdict --------------------------------------------------------------------------

VI_METHOD = {"kind": "vi", "family": "nsf", "epochs": 250, "samples_per_epoch": 10}
MCMC_METHOD = {"kind": "mcmc", "samples": 500, "warmup": 300}
GOOD_PPC = {"returns": {"std": {"p_value": 0.6}, "acf1": {"p_value": 0.3}}}
INSIDE = [{"parameter": "a", "q05": "0.1", "q95": "0.9", "truth": "0.5"}]


def test_verdict_trusts_a_fit_whose_diagnostics_are_all_good():
    verdict = assess({"khat": 0.3, "ppc": GOOD_PPC}, INSIDE, VI_METHOD)
    assert verdict.level == "trust" and verdict.headline.startswith("The fit can be used")
    assert [f.level for f in verdict.findings] == ["ok"] * 3
    chains = {"rhat": [1.001, 1.005], "ess": [900.0, 450.0], "ppc": GOOD_PPC}
    assert assess(chains, INSIDE, MCMC_METHOD, ["a", "b"]).level == "trust"


@pytest.mark.parametrize(
    ("diagnostics", "intervals", "method", "level", "says", "advice"),
    [
        (
            {"khat": 0.9},
            (),
            VI_METHOD,
            "bad",
            "k-hat 0.90",
            [
                "method.epochs (now 250)",
                "method.samples_per_epoch (now 10)",
                'method.family = "full_rank"',
                '"mcmc"',
            ],
        ),
        (
            {"khat": 0.6},
            (),
            VI_METHOD,
            "caution",
            "central intervals are usable",
            ["method.epochs"],
        ),
        ({"khat": float("nan")}, (), VI_METHOD, "caution", "could not be computed", ['"mcmc"']),
        (
            {"rhat": [1.002, 1.2]},
            (),
            MCMC_METHOD,
            "bad",
            "b (1.2)",
            ["method.warmup (now 300)", "method.samples (now 500)"],
        ),
        ({"ess": [900.0, 40.0]}, (), MCMC_METHOD, "bad", "40 (b)", ["method.samples"]),
        ({"ess": [900.0, 250.0]}, (), MCMC_METHOD, "caution", "250 (b)", ["method.samples"]),
        (
            {"ppc": {"returns": {"abs_acf1": {"p_value": 0.004}}}},
            (),
            VI_METHOD,
            "bad",
            "abs_acf1 of returns",
            ["loss.window", "method.epochs"],
        ),
        (
            {"ppc": {"returns": {"std": {"p_value": 0.03}}}},
            (),
            VI_METHOD,
            "caution",
            "std of returns",
            ["predictive bands"],
        ),
        (
            {},
            [{"parameter": "a", "q05": 1, "q95": 2, "truth": 0, "q005": 0.5, "q995": 2.5}],
            VI_METHOD,
            "bad",
            "outside the central 99 %",
            ["larger w", "method.epochs"],
        ),
        (
            {},
            [{"parameter": "a", "q05": 1, "q95": 2, "truth": 0.8, "q005": 0.5, "q995": 2.5}],
            VI_METHOD,
            "caution",
            "outside the 90 % interval",
            ["larger w"],
        ),
        (
            {},
            [{"parameter": "a", "q05": 1, "q95": 2, "truth": 0.8}],
            MCMC_METHOD,
            "caution",
            "a (truth 0.8, 90 % interval 1 to 2)",
            ["method.samples"],
        ),
        ({}, (), {"kind": "smd"}, "caution", "point estimate", ['"vi" or "mcmc"']),
        (
            {"ppc": None, "notes": ["posterior predictive check skipped: lengths differ"]},
            (),
            VI_METHOD,
            "caution",
            "no posterior predictive check",
            ["as long as"],
        ),
    ],
)
def test_each_diagnostic_moves_the_verdict_with_its_advice(
    diagnostics, intervals, method, level, says, advice
):
    # Start from a fit that every other diagnostic calls good, so that the one under test
    # alone decides the verdict.
    good = {"ppc": GOOD_PPC} | ({"khat": 0.3} if method["kind"] == "vi" else {})
    verdict = assess(good | diagnostics, intervals or INSIDE, method, ["a", "b"])
    assert verdict.level == level
    worst = verdict.findings[0]  # worst first
    assert worst.level == level and says in worst.text, worst.text
    for words in advice:
        assert words in worst.advice, (words, worst.advice)
    headline = {"bad": "Do not trust", "caution": "Use with care"}[level]
    assert verdict.headline.startswith(headline)


def test_no_diagnostics_no_verdict():
    assert assess(None).level == "unknown"
    assert assess({}, (), {"kind": "vi"}).level == "unknown"


def test_an_exact_likelihood_needs_no_simulator_noise_caveat():
    noisy = assess({"khat": 0.9}, method=VI_METHOD).findings[0].advice
    exact = assess({"khat": 0.9}, method=VI_METHOD, exact_loss=True).findings[0].advice
    assert "simulator noise" in noisy and "simulator noise" not in exact


@figures
def test_the_verdict_opens_the_page(tmp_path):
    # make_run's MCMC chains of b have R-hat 1.08: do not trust, and say why at the top.
    page = write_report(make_run(tmp_path / "run", "mcmc")).read_text(encoding="utf-8")
    top = page.split("<section>")[0]
    assert 'class="verdict verdict-bad"' in top and "Do not trust this fit yet" in top
    assert "R-hat &gt;= 1.01 for b (1.08)" in top and "method.warmup" in top
    # VI with k-hat 0.42, the truth of a inside its interval, p-value 0.02 on y: caution
    page = write_report(make_run(tmp_path / "vi", "vi")).read_text(encoding="utf-8")
    top = page.split("<section>")[0]
    assert 'class="verdict verdict-caution"' in top and "mean of y is unusual" in top


@figures
def test_predictive_table_has_no_empty_column(tmp_path):
    page = write_report(make_run(tmp_path / "run", "vi")).read_text(encoding="utf-8")
    table = page.split("<h3>Posterior predictive check</h3>")[1].split("</table>")[0]
    assert "<th></th>" not in table and "<th>reading</th>" in table
    assert "<td></td>" not in table  # every row says how it reads
    assert "like the simulations" in table


@figures
@pytest.mark.parametrize(
    ("loss_table", "explained"),
    [
        ("", True),
        ('kind = "mmd"\nestimator = "biased"', False),
        ('kind = "energy"', True),
        ('kind = "mse"', False),
    ],
)
def test_a_negative_loss_is_explained(tmp_path, loss_table, explained):
    folder = make_run(tmp_path / "run", "vi")
    config = folder / "config.toml"
    config.write_text(config.read_text() + f"\n[loss]\n{loss_table}\n")
    lines = [f"{e},{0.05 / (e + 1) - 0.01},{0.05 / (e + 1) - 0.012},0.002,0" for e in range(6)]
    (folder / "history.csv").write_text(
        "epoch,total,loss,regularisation,dropped\n" + "\n".join(lines) + "\n"
    )
    page = write_report(folder).read_text(encoding="utf-8")
    loss = page.split("<h2>Loss</h2>")[1].split("</section>")[0]
    assert ("goes below zero" in loss) is explained
    if explained:
        assert "unbiased" in loss and "expectation" in loss and "never negative" in loss
    # a loss that stays positive needs no note
    positive = [f"{e},{0.05 / (e + 1)},{0.04 / (e + 1)},0.01,0" for e in range(6)]
    (folder / "history.csv").write_text(
        "epoch,total,loss,regularisation,dropped\n" + "\n".join(positive) + "\n"
    )
    assert "goes below zero" not in write_report(folder).read_text(encoding="utf-8")


@figures
def test_summary_drops_columns_empty_in_every_row(tmp_path):
    vi = write_report(make_run(tmp_path / "vi", "vi")).read_text(encoding="utf-8")
    summary = vi.split("<h2>Summary</h2>")[1].split("</table>")[0]
    assert "<th>rhat</th>" not in summary and "<th>ess</th>" not in summary
    assert "<th>khat</th>" in summary and "<th>truth</th>" in summary
    mcmc = write_report(make_run(tmp_path / "mcmc", "mcmc")).read_text(encoding="utf-8")
    summary = mcmc.split("<h2>Summary</h2>")[1].split("</table>")[0]
    assert "<th>rhat</th>" in summary and "<th>khat</th>" not in summary


# --- an over-dispersed, unconverged fit (issue 23, item 3) ----------------------------------

USER_AR1 = (Path(__file__).parents[1] / "examples" / "user_ar1.py").read_text()


def user_ar1_config(**method: object) -> dict:
    """A newcomer's own AR(1): 20 epochs of 10 draws are far too few for q to move."""
    return {
        "run": {"seed": 0},
        "model": {"name": "user_ar1:MyAR1", "options": {"n_timesteps": 100}},
        "parameters": [
            {"name": "phi", "prior": {"kind": "normal", "loc": 0.5, "scale": 0.2}, "truth": 0.6},
            {
                "name": "sigma",
                "prior": {"kind": "lognormal", "loc": -1.0, "scale": 0.3},
                "truth": 0.4,
            },
        ],
        "data": {"simulate": True},
        "loss": {"kind": "mmd", "window": 2},
        "method": {
            "kind": "vi",
            "family": "diagonal",
            "w": 0.05,
            "samples_per_epoch": 10,
            "epochs": 20,
            **method,
        },
    }


def test_an_over_dispersed_unconverged_fit_is_not_called_usable(tmp_path):
    # q starts at the family's default N(0, 1) in the unconstrained space and 20 epochs of
    # 10 draws leave it there: its sd is several times the prior's, k-hat is small (an
    # over-dispersed q has bounded weights) and the importance-sampling ESS is a few % of
    # the draws. The verdict must not call this usable.
    import gradcal

    (tmp_path / "user_ar1.py").write_text(USER_AR1)
    config = user_ar1_config(init="family")
    with pytest.warns(gradcal.GradcalWarning) as caught:  # not only in gradcal's log
        run = gradcal.calibrate(config, tmp_path / "run", base=tmp_path, progress=False)
    # the mass warning of runs.py (logged only, before) and the report's verdict, each
    # pointing at this file rather than inside gradcal
    here = [str(w.message) for w in caught if w.filename == __file__]
    assert any(m.startswith("q misses part of the posterior") for m in here), here
    assert any(m.startswith("Do not trust this fit yet") for m in here), here
    wide = run.summary.row("phi")["std"] / 0.2  # the prior's sd of phi
    assert wide > 2 and run.diagnostics["ess_fraction"] < 0.1  # the fit is as described
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    top = page.split("<section>")[0]
    assert "The fit can be used" not in top
    assert 'class="verdict verdict-bad"' in top, top
    assert "wider than the prior" in top and "importance-sampling ESS" in top


def test_a_small_ess_fraction_is_bad_even_with_a_small_khat():
    # The figures of the fit above: k-hat 0.01 (an over-dispersed q has bounded weights),
    # importance-sampling ESS 5.8 % of the draws.
    verdict = assess({"khat": 0.01, "ess_fraction": 0.058, "ppc": GOOD_PPC}, INSIDE, VI_METHOD)
    assert verdict.level == "bad" and verdict.headline.startswith("Do not trust")
    worst = verdict.findings[0]
    assert "importance-sampling ESS 5.8 % of the draws < 10 %" in worst.text, worst.text
    assert "much wider than the posterior" in worst.text and "method.epochs" in worst.advice
    fine = assess({"khat": 0.01, "ess_fraction": 0.4, "ppc": GOOD_PPC}, INSIDE, VI_METHOD)
    assert fine.level == "trust"


def test_q_wider_than_the_prior_is_bad():
    good = {"khat": 0.01, "ess_fraction": 0.5, "ppc": GOOD_PPC}
    verdict = assess(good, INSIDE, VI_METHOD, widths={"phi": 4.3, "sigma": 0.4})
    assert verdict.level == "bad"
    worst = verdict.findings[0]
    assert "q is wider than the prior for phi (4.3 times)" in worst.text, worst.text
    assert "sigma" not in worst.text and 'method.init = "prior"' in worst.advice
    assert assess(good, INSIDE, VI_METHOD, widths={"phi": 1.2}).level == "trust"


def test_width_ratios_reads_quantiles_so_far_draws_do_not_decide():
    # Standard normal draws against a prior three times as wide, then one far draw of q:
    # the 5-95 % interval of 4000 draws moves by about 1 % (its Monte Carlo sd), an sd
    # would have doubled.
    g = torch.Generator().manual_seed(0)
    q, prior = torch.randn(4000, 1, generator=g), 3 * torch.randn(4000, 1, generator=g)
    ratio = width_ratios(q, prior, ["a"])["a"]
    assert abs(ratio - 1 / 3) < 0.03  # about 4 Monte Carlo sds of the ratio
    q[0] = 1e3
    assert abs(width_ratios(q, prior, ["a"])["a"] - ratio) < 0.01


def _noisy(n: int, slope: float, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (1.0 + slope * torch.arange(n) + 0.1 * torch.randn(n, generator=g)).tolist()


def test_a_loss_still_falling_at_the_end_is_caution():
    # The last half of 100 epochs falls by 0.25 (half a noise sd per 10 epochs): the
    # Mann-Kendall z is about -6, far past the one-sided 1 % point -2.33.
    history = _noisy(100, -0.005, seed=1)
    verdict = assess({"khat": 0.3, "ppc": GOOD_PPC}, INSIDE, VI_METHOD, history=history)
    assert verdict.level == "caution"
    assert "still falling over the last 50 epochs" in verdict.findings[0].text
    assert "method.epochs" in verdict.findings[0].advice
    # without a trend: no finding (a flat series is flagged at 1 % of seeds)
    flat = assess({"khat": 0.3, "ppc": GOOD_PPC}, INSIDE, VI_METHOD, history=_noisy(100, 0, 1))
    assert flat.level == "trust", flat.findings
    # too few epochs to tell
    few = assess({"khat": 0.3, "ppc": GOOD_PPC}, INSIDE, VI_METHOD, history=_noisy(6, 0, 1))
    assert few.level == "caution" and "only 6 epoch(s)" in few.findings[0].text


def test_the_trend_test_is_not_fooled_by_one_wild_epoch():
    # A flat history whose tail starts with one huge total: first against last would call
    # it falling, the rank test does not (one value moves z by about 0.4 at 50 epochs).
    history = _noisy(100, 0, seed=2)
    history[50] = 100.0
    assert history[50] > history[-1]  # a single comparison says "falling"
    assert loss_trend(history[50:]) > -2.326
    verdict = assess({"khat": 0.3, "ppc": GOOD_PPC}, INSIDE, VI_METHOD, history=history)
    assert verdict.level == "trust", verdict.findings


def test_a_do_not_trust_verdict_reaches_a_python_user(tmp_path):
    # gradcal's logger has only a NullHandler: the verdict must come as a warning, at the
    # caller's line (make_run's MCMC chains of b have R-hat 1.08: do not trust).
    import gradcal

    folder = make_run(tmp_path / "run", "mcmc")
    with pytest.warns(gradcal.GradcalWarning, match="Do not trust this fit yet") as caught:
        write_report(folder)
    assert [w.filename for w in caught] == [__file__]
    assert "R-hat >= 1.01 for b (1.08)" in str(caught[0].message)
