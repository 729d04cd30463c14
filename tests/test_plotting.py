"""Plotting: files only when asked, axes per panel, shape errors, the missing-matplotlib error."""

import builtins
import subprocess
import sys

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from gradcal.plotting import corner_plot, loss_history, predictive_bands, trace_plot  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HISTORY = {
    "total": [5.0, 3.0, 2.0, 2.0, 2.5],
    "loss": [4.0, 2.5, 1.8, 1.9, 2.3],
    "regularisation": [1.0, 0.5, 0.2, 0.1, 0.2],
    "dropped": [0, 0, 1, 0, 0],
}

# name -> (call with **kwargs, number of axes of the figure)
CALLS = {
    "corner": (
        lambda **kw: corner_plot(
            torch.randn(500, 3), prior_samples=2 * torch.randn(400, 3), truth=torch.zeros(3), **kw
        ),
        9,
    ),
    "loss": (lambda **kw: loss_history(HISTORY, **kw), 1),
    "bands": (
        lambda **kw: predictive_bands(
            [torch.randn(50, 30).cumsum(1), np.random.rand(40, 20)],
            observed=[torch.randn(30).cumsum(0), np.random.rand(20)],
            **kw,
        ),
        2,
    ),
    "trace": (lambda **kw: trace_plot(torch.randn(3, 200, 4), warmup=50, **kw), 4),
}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.mark.parametrize("name", CALLS)
def test_saves_png_and_returns_the_figure(name, tmp_path):
    call, n_axes = CALLS[name]
    path = tmp_path / f"{name}.png"
    fig = call(path=path)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == n_axes
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    plt.close(fig)


@pytest.mark.parametrize("name", CALLS)
def test_writes_nothing_without_path(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fig = CALLS[name][0]()
    assert isinstance(fig, Figure)
    assert list(tmp_path.iterdir()) == []
    plt.close(fig)


def test_path_as_string_and_other_format(tmp_path):
    path = tmp_path / "trace.svg"
    plt.close(trace_plot(np.random.rand(2, 10, 1), path=str(path)))
    assert path.read_text().lstrip().startswith("<?xml")


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, gradcal.plotting; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", CALLS)
def test_missing_matplotlib_says_how_to_install(name, monkeypatch):
    real_import = builtins.__import__

    def fake_import(module, *args, **kwargs):
        if module == "matplotlib" or module.startswith("matplotlib."):
            raise ImportError(f"No module named {module!r}")
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'gradcal\[plot\]'"):
        CALLS[name][0]()


# --- bad inputs ---------------------------------------------------------------------------

BAD = [
    (lambda: corner_plot(torch.randn(10)), r"`samples` must have shape \(n, D\), got \(10,\)"),
    (lambda: corner_plot(torch.randn(0, 2)), r"`samples` must have shape \(n, D\)"),
    (
        lambda: corner_plot(torch.randn(10, 2), prior_samples=torch.randn(10, 3)),
        r"`prior_samples` must have shape \(m, 2\)",
    ),
    (lambda: corner_plot(torch.randn(10, 2), truth=[0.0]), r"`truth` must have shape \(2,\)"),
    (lambda: corner_plot(torch.randn(10, 2), names=["a"]), r"`names` must hold one label"),
    (lambda: corner_plot(torch.randn(10, 2), bins=0), r"`bins` must be an int >= 1"),
    (
        lambda: corner_plot(torch.full((5, 2), float("nan"))),
        r"`samples` has no draw whose values are all finite",
    ),
    (lambda: loss_history([]), r"`losses_hist` must be a non-empty list"),
    (lambda: loss_history(np.zeros((3, 2))), r"`losses_hist` must be a non-empty list"),
    (lambda: loss_history({"dropped": [0, 1]}), r"`losses_hist` must have at least one of"),
    (
        lambda: loss_history({"total": [1.0, 2.0], "loss": [1.0]}),
        r"one value per epoch each",
    ),
    (lambda: loss_history([1.0, 2.0], log_scale="yes"), r"`log_scale` must be"),
    (lambda: predictive_bands(torch.randn(10)), r"`simulated` must have shape \(B, T\)"),
    (lambda: predictive_bands([]), r"`simulated` must be \(B, T\) or a non-empty list"),
    (
        lambda: predictive_bands([torch.randn(4, 5), torch.randn(4, 5, 2)]),
        r"`simulated\[1\]` must have shape \(B, T\), got \(4, 5, 2\)",
    ),
    (
        lambda: predictive_bands(torch.randn(4, 5), observed=torch.randn(6)),
        r"`observed` must have shape \(5,\)",
    ),
    (
        lambda: predictive_bands([torch.randn(4, 5)], observed=torch.randn(5)),
        r"`observed` must be a list with one \(T,\) series per output",
    ),
    (
        lambda: predictive_bands(torch.randn(4, 5), time=np.arange(4)),
        r"`time` must have shape \(5,\)",
    ),
    (
        lambda: predictive_bands(torch.randn(4, 5), quantiles=(0.1, 1.5)),
        r"`quantiles` must be distinct levels in \[0, 1\]",
    ),
    (
        lambda: predictive_bands(torch.randn(4, 5), quantiles=(0.5, 0.5)),
        r"`quantiles` must be distinct",
    ),
    (lambda: predictive_bands(torch.randn(4, 5), names=["a", "b"]), r"one label per output"),
    (lambda: trace_plot(torch.randn(100, 2)), r"`chains` must have shape \(C, S, D\)"),
    (lambda: trace_plot(torch.randn(2, 10, 1), warmup=11), r"`warmup` must be an int in"),
    (lambda: trace_plot(torch.randn(2, 10, 2), names=["a"]), r"`names` must hold one label"),
]


@pytest.mark.parametrize(("call", "match"), BAD)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_non_numeric_input_raises_type_error():
    with pytest.raises(TypeError, match="`chains` must be a tensor or an array of real numbers"):
        trace_plot([[["a"]]])


# --- what each figure shows ---------------------------------------------------------------


def test_corner_plot_layout_and_legend():
    samples = torch.randn(300, 2, requires_grad=True)  # detached for plotting
    fig = corner_plot(samples, prior_samples=np.random.randn(300, 2), truth=[0.0, 1.0])
    axes = np.array(fig.axes).reshape(2, 2)
    assert not axes[0, 1].axison  # upper triangle switched off
    assert all(ax.axison for ax in (axes[0, 0], axes[1, 0], axes[1, 1]))
    legend = [t.get_text() for t in axes[0, 1].get_legend().get_texts()]
    assert legend == ["posterior", "prior", "truth"]
    # The true value is inside each view, as are the posterior draws' central ranges.
    assert axes[1, 0].get_ylim()[0] < 1.0 < axes[1, 0].get_ylim()[1]
    assert axes[1, 1].get_xlim()[0] < 1.0 < axes[1, 1].get_xlim()[1]


def test_corner_plot_one_parameter():
    fig = corner_plot(np.random.randn(100, 1), names=["mu"])
    assert len(fig.axes) == 1
    assert fig.axes[0].get_xlabel() == "mu"


def test_corner_plot_warns_about_non_finite_draws():
    samples = torch.randn(50, 2)
    samples[:3, 1] = float("nan")
    with pytest.warns(UserWarning, match="left out 3 of 50 draws of `samples`"):
        corner_plot(samples)


def test_corner_plot_constant_draws():
    plt.close(corner_plot(torch.ones(20, 2), truth=torch.ones(2)))  # no zero-width range


def test_loss_history_marks_the_first_best_total():
    fig = loss_history(HISTORY)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["total", "loss", "regularisation", "best epoch 2: 2"]
    assert ax.get_yscale() == "linear"


def test_loss_history_list_and_scales():
    decaying = torch.tensor([1e3, 1e2, 10.0, float("nan"), 1.0])
    ax = loss_history(decaying).axes[0]
    assert ax.get_yscale() == "log"  # positive, over three decades
    assert "best epoch 4: 1" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert loss_history([torch.tensor(2.0), torch.tensor(1.0)]).axes[0].get_yscale() == "linear"
    assert loss_history([-1.0, 0.0, 3.0], log_scale=True).axes[0].get_yscale() == "symlog"
    assert loss_history([1e3, 1.0], log_scale=False).axes[0].get_yscale() == "linear"


def test_predictive_bands_quantiles_skip_failed_draws():
    simulated = torch.randn(101, 8)
    simulated[0] = float("nan")
    with pytest.warns(UserWarning, match="1 of 101 draws of `simulated`"):
        fig = predictive_bands(simulated, observed=torch.zeros(8), time=np.arange(8) / 2)
    ax = fig.axes[0]
    median = next(line for line in ax.get_lines() if line.get_label() == "median")
    np.testing.assert_allclose(median.get_ydata(), np.median(simulated[1:].numpy(), 0))
    np.testing.assert_allclose(median.get_xdata(), np.arange(8) / 2)
    assert len(ax.collections) == 2  # the 5-95% and 25-75% bands
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["5% to 95%", "25% to 75%", "median", "observed"]


def test_predictive_bands_per_output_times_and_names():
    fig = predictive_bands(
        [torch.randn(10, 5), torch.randn(10, 7)],
        observed=[None, torch.zeros(7)],
        quantiles=(0.9, 0.1),
        time=[np.arange(5), np.arange(7) + 10],
        names=["S", "R"],
    )
    assert [ax.get_ylabel() for ax in fig.axes] == ["S", "R"]
    assert len(fig.axes[0].get_lines()) == 0  # one band, no median, no observed series
    assert fig.axes[1].get_lines()[0].get_xdata()[0] == 10


def test_trace_plot_one_line_per_chain_and_warmup_shading():
    fig = trace_plot(np.random.randn(3, 40, 2), names=["a", "b"], warmup=10)
    for ax, name in zip(fig.axes, ["a", "b"], strict=True):
        assert len(ax.get_lines()) == 3
        assert len(ax.patches) == 1  # the shaded warm-up
        assert ax.get_ylabel() == name
    assert fig.axes[-1].get_xlabel() == "step"
    assert len(trace_plot(np.random.randn(1, 40, 1)).axes[0].patches) == 0


def test_loss_history_scale_follows_the_loss_not_a_tiny_regularisation():
    # The regularisation w KL starts near 1e-12 (q = prior); the loss spans 0.2 to 0.1.
    # Reading the scale off every series chose a log axis from 1e-12 up, which squeezed
    # the loss into the top tenth of the plot.
    epochs = np.arange(50)
    loss = 0.1 + 0.1 * np.exp(-epochs / 10)
    reg = np.concatenate([[1e-12], np.full(49, 5e-3)])
    ax = loss_history({"total": loss + reg, "loss": loss, "regularisation": reg}).axes[0]
    assert ax.get_yscale() == "linear"
    plt.close("all")
    # A loss over three decades still gets a log axis, spanning the loss, not 1e-12.
    loss = 1e3 * np.exp(-epochs / 5) + 0.5
    ax = loss_history({"total": loss + reg, "loss": loss, "regularisation": reg}).axes[0]
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert 0.1 < low < 0.5 and high > 1e3
    plt.close("all")
