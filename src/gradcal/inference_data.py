"""A run as ArviZ's ``InferenceData``, for ArviZ's plots and summaries (extra ``arviz``).

Written for ArviZ 0.x (tested with 0.23; the extra pins ``arviz<1``): ArviZ 1.x replaces
``InferenceData`` with xarray's ``DataTree`` and needs Python >= 3.12.

Groups and dimensions (every parameter is one variable, named as in the configuration):

- ``posterior``: MCMC's draws with their chain axis, (chain, draw) = (C, S); VI's saved
  draws as one chain, (1, N); SMD's estimate as one chain of one draw, (1, 1).
- ``sample_stats``: MCMC: ``acceptance_rate`` (chain) and the adapted ``step_size``; VI:
  ``log_q`` (chain, draw), the fitted family's log density at each draw; SMD: none.
- ``observed_data``: one variable per model output, (time, ...).
- ``posterior_predictive``: ``predictive`` new simulations at posterior draws, one chain,
  (1, predictive, time, ...), same variable names as ``observed_data``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gradcal.results import Run

__all__ = ["output_names", "to_inference_data"]


def _arviz() -> Any:
    try:
        import arviz
    except ImportError as error:
        raise ImportError("to_inference_data needs ArviZ: pip install 'gradcal[arviz]'") from error
    if int(arviz.__version__.split(".")[0]) >= 1:
        raise ImportError(
            f"to_inference_data is written for ArviZ 0.x (InferenceData); ArviZ "
            f"{arviz.__version__} is installed: pip install 'arviz<1'"
        )
    return arviz


def output_names(run: Run) -> list[str]:
    """Names of the model's outputs: the data's ``columns`` when the configuration names
    one per output, else ``y`` (one output) or ``y_0, y_1, ...``."""
    columns = run.config["data"].get("columns")
    n = len(run.data)
    if columns and len(columns) == n and all(isinstance(c, str) for c in columns):
        return list(columns)
    return ["y"] if n == 1 else [f"y_{i}" for i in range(n)]


def _variables(values: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """(chain, draw, D) -> one (chain, draw) array per parameter."""
    array = values.detach().cpu().double().numpy()
    return {name: (("chain", "draw"), array[..., i]) for i, name in enumerate(names)}


def _series(name: str, value: torch.Tensor, leading: tuple[str, ...]) -> tuple[Any, Any]:
    array = value.detach().cpu().double().numpy()
    extra = array.ndim - len(leading)
    dims = (*leading, f"{name}_time", *(f"{name}_dim_{k}" for k in range(1, extra)))
    return dims, array


def to_inference_data(run: Run, predictive: int | None = 200, seed: int | None = 0) -> Any:
    """``arviz.InferenceData`` of a :class:`~gradcal.results.Run` (see the module's groups).

    Arguments:
        run: from :func:`gradcal.results.load_run` or :func:`gradcal.results.calibrate`.
        predictive: number of posterior-predictive simulations (None or 0: no
            ``posterior_predictive`` group).
        seed: random stream of the predictive draws.

    Example (needs ArviZ): ``az.summary(to_inference_data(run))``,
    ``az.plot_trace(run.to_inference_data())``.
    """
    az = _arviz()
    import xarray

    groups: dict[str, Any] = {}
    if run.method == "mcmc":
        draws = run.chains  # (C, S, D)
    elif run.method == "vi":
        draws = run.samples[None]  # one chain
    else:
        draws = run.posterior.estimate[None, None]
    coords = {"chain": range(draws.shape[0]), "draw": range(draws.shape[1])}
    groups["posterior"] = xarray.Dataset(_variables(draws, run.names), coords=coords)
    if run.method == "mcmc" and run.sample_stats:
        stats: dict[str, Any] = {}
        if "acceptance_rate" in run.sample_stats:
            rate = torch.as_tensor(run.sample_stats["acceptance_rate"]).double().numpy()
            stats["acceptance_rate"] = (("chain",), rate)
        if "step_size" in run.sample_stats:
            stats["step_size"] = ((), float(run.sample_stats["step_size"]))
        groups["sample_stats"] = xarray.Dataset(stats, coords={"chain": coords["chain"]})
    elif run.method == "vi":
        log_q = run.log_prob(run.samples.to(torch.get_default_dtype()))
        groups["sample_stats"] = xarray.Dataset(
            {"log_q": (("chain", "draw"), log_q[None].double().numpy())}, coords=coords
        )
    names = output_names(run)
    groups["observed_data"] = xarray.Dataset(
        {n: _series(n, y, ()) for n, y in zip(names, run.data, strict=True)}
    )
    if predictive:
        simulated = run.predictive(predictive, seed=seed)
        groups["posterior_predictive"] = xarray.Dataset(
            {
                n: _series(n, y[None], ("chain", "draw"))
                for n, y in zip(names, simulated, strict=True)
            },
            coords={"chain": [0], "draw": range(predictive)},
        )
    return az.InferenceData(**groups)
