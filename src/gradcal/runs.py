"""Run a configured calibration and write its run folder: samples, summary, history, report."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from gradcal.config import OBJECTIVE_OPTIONS, Built, ConfigError, build, dumps, length_problems
from gradcal.diagnostics import loss_check, posterior_predictive, vi_importance
from gradcal.distributed import is_main
from gradcal.infer.annealing import GeometricAnnealing
from gradcal.infer.mcmc import HMC, MALA, MCMC
from gradcal.infer.objectives import Objective, make_objective, mass_warning
from gradcal.infer.smd import SMD
from gradcal.infer.vi import VI
from gradcal.infer.weight import CALIBRATE, WeightCalibration, WeightChoice
from gradcal.posterior_estimators import (
    Constrained,
    DiagonalGaussian,
    Flow,
    FlowMixture,
    FullRankGaussian,
    GaussianMixture,
)
from gradcal.priors import distribution_device
from gradcal.problems import warn_problem
from gradcal.regularisation import prior_log_prob
from gradcal.rng import seeded

__all__ = [
    "KHAT_SIMULATIONS",
    "PRIOR_START_DRAWS",
    "RUN_FILES",
    "RUN_INFO",
    "RunInterrupted",
    "check_simulated_lengths",
    "make_annealing_from",
    "make_family",
    "make_objective_from",
    "make_scheduler",
    "output_names",
    "prepare_run_dir",
    "prior_start",
    "run_calibration",
    "write_outputs",
]

logger = logging.getLogger("gradcal")

RUN_INFO = "run.json"  # where the configuration's folder (relative paths start there) is kept


KHAT_SIMULATIONS = 8
"""Simulations averaged per draw in the k-hat of a VI fit with a stochastic simulator.

The target of VI is exp(-E l(theta, y) / w) prior(theta); one simulation per draw adds
noise of sd(l) / w to every log weight, which alone raises k-hat (for the demo's MMD,
sd(l) ~ 0.005 and w = 0.01: 0.5 nats, and k-hat 0.77 with one simulation, 0.62 with 4).
Averaging R simulations divides that noise by sqrt(R)."""
KHAT_CHUNK = 250  # draws simulated at once for k-hat: bounds the memory of long series


# what a run writes into its folder (and all that --overwrite removes)
RUN_FILES = (
    "config.toml",
    "checkpoints",
    "tensorboard",
    "history.csv",
    "posterior_samples.csv",
    "posterior_samples.pt",
    "summary.csv",
    "chains.pt",
    "predictive.pt",
    "diagnostics.json",
    "report.html",
)


class RunInterrupted(Exception):
    """The run was stopped (Ctrl-C); its last state is in the run folder.

    ``during`` is ``"calibration"`` or ``"outputs"`` (Ctrl-C after the calibration, while
    its outputs were being written: they may be incomplete; the checkpoint is not).
    """

    def __init__(self, during: str = "calibration"):
        self.during = during
        super().__init__(f"interrupted during the {during}")


def prepare_run_dir(
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    method: str = "vi",
    config_file: str | Path | None = None,
) -> None:
    """Make ``run_dir`` ready for a run without losing an earlier one; raise ConfigError.

    A folder that holds any of :data:`RUN_FILES` holds a run: it is refused unless
    ``overwrite`` (those files and folders are removed first, nothing else) or ``resume``
    (which needs ``checkpoints/last.pt`` and a VI run). ``config_file`` is the configuration
    being run: a folder that holds it as its ``config.toml`` is never overwritten.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ConfigError(["--resume and --overwrite: give one of them, not both"])
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume:
        if method != "vi":
            raise ConfigError(
                [
                    f"--resume: only VI runs continue from a checkpoint (method.kind = "
                    f"{method!r}); run again with --overwrite"
                ]
            )
        if not (run_dir / "checkpoints" / "last.pt").exists():
            raise ConfigError(
                [
                    f"--resume: {run_dir} holds no checkpoint (checkpoints/last.pt) to continue "
                    "from; run without --resume to start a new run"
                ]
            )
        return
    if not found:
        return
    if not overwrite:
        raise ConfigError(
            [
                f"{run_dir} already holds a run ({', '.join(found)}); continue it with --resume, "
                "replace it with --overwrite, or choose another folder with --out"
            ]
        )
    saved = run_dir / "config.toml"
    if config_file is not None and saved.exists() and saved.samefile(config_file):
        raise ConfigError(
            [f"--overwrite: {saved} is the configuration being run; choose another --out"]
        )
    for name in found:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    logger.info("removed the earlier run in %s: %s", run_dir, ", ".join(found))


def check_simulated_lengths(built: Built, config: dict[str, Any]) -> None:
    """For a model that does not declare ``observed_lengths``, simulate one prior draw and
    compare its outputs' lengths with the data's (raises ConfigError)."""
    model = built.model
    declared = getattr(model, "observed_lengths", None)
    if config["data"]["simulate"] or (declared is not None and declared() is not None):
        return  # simulated data fits by construction; declared lengths were checked
    with seeded(config["run"]["seed"]), torch.no_grad():
        outputs = model.run_and_observe(built.prior.sample())
    lengths = [o.shape[0] for o in outputs]  # one draw: (T_out, ...) in either layout
    source = Path(config["data"]["file"]).name
    problems = length_problems(model, lengths, built.data, source)
    if problems:
        raise ConfigError(problems)


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _device(config: dict[str, Any]) -> torch.device:
    """The device of the run (``[run] device``)."""
    return torch.device(config["run"]["device"])


PRIOR_START_DRAWS = 4000  # prior draws behind q's start under method.init = "prior"


def prior_start(prior: Any, supports: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior's mean and sd per parameter in the unconstrained space of q, (D,) each.

    u = T^-1(theta) for ``PRIOR_START_DRAWS`` prior draws (a private stream, seed 0, so
    that a run's start does not depend on its seed), T the map onto the supports that
    :class:`~gradcal.posterior_estimators.Constrained` uses; draws that T^-1 sends to
    infinity (on a bound, in floating point) are left out. A normal or lognormal marginal
    (T the identity or exp) gives its loc and scale exactly.

    Example:
        >>> from gradcal.priors import Product, marginal
        >>> prior = Product([marginal("normal", loc=0.5, scale=0.2),
        ...                  marginal("lognormal", loc=-1.0, scale=0.3)])
        >>> loc, scale = prior_start(prior, prior.supports)
        >>> [round(v, 6) for v in loc.tolist()], [round(v, 6) for v in scale.tolist()]
        ([0.5, -1.0], [0.2, 0.3])
        >>> prior = Product([marginal("uniform", low=0.0, high=1.0)])  # logit: sd pi / sqrt 3
        >>> [round(v, 1) for v in prior_start(prior, prior.supports)[1].tolist()]
        [1.8]
    """
    transform = Constrained(DiagonalGaussian(torch.zeros(len(supports))), supports).transform
    with seeded(0), torch.no_grad():
        u = transform.inv(prior.sample((PRIOR_START_DRAWS,)))
    finite = torch.isfinite(u)
    u = torch.where(finite, u, torch.nan)
    loc = u.nanmean(0)
    scale = ((u - loc).square().nansum(0) / (finite.sum(0) - 1)).sqrt().clamp_min(1e-6)
    # exact where the unconstrained law is a known normal: a normal prior (identity map) or
    # a lognormal one (log); a standard normal prior then starts q exactly at N(0, 1)
    for j, m in enumerate(getattr(prior, "marginals", ())):
        if type(m) in (torch.distributions.Normal, torch.distributions.LogNormal):
            base = m if isinstance(m, torch.distributions.Normal) else m.base_dist
            loc[j], scale[j] = float(base.loc), float(base.scale)
    return loc, scale


def make_family(method: dict[str, Any], built: Built) -> Any:
    """The family ``[method]`` names: an unconstrained family mapped onto the prior's support
    (VI fits it; :func:`gradcal.results.load_run` rebuilds it). It starts at the prior's mean
    and sd in the unconstrained space (``init = "prior"``, the default, :func:`prior_start`;
    a mixture's components are spread over it) or at N(0, 1) there (``init = "family"``,
    the default before: after 20 epochs of 10 draws it left q 9 times wider than the prior,
    see docs/where-q-starts.md)."""
    d = len(built.names)
    kind = method["family"]
    loc, scale = torch.zeros(d), torch.ones(d)
    if method.get("init", "prior") == "prior":
        loc, scale = prior_start(built.prior, built.prior.supports)
    if kind in ("nsf", "maf"):
        base = Flow(
            d,
            kind,
            transforms=method["transforms"],
            hidden_features=method["hidden_features"],
            loc=loc,
            scale=scale,
        )
    elif kind == "diagonal":
        base = DiagonalGaussian(loc, scale)
    elif kind == "mixture":  # means spread over the prior's unconstrained scale
        spread = GaussianMixture.spread(d, method["components"], 1.0, seed=0)
        base = GaussianMixture(loc + scale * spread.loc.detach(), scale * spread.scale.detach())
    elif kind == "flow_mixture":  # a mixture of C NSFs sharing one transform
        base = FlowMixture(
            d,
            method["components"],
            transforms=method["transforms"],
            hidden_features=method["hidden_features"],
            loc=loc,
            scale=scale,
        )
    else:
        base = FullRankGaussian(loc, scale)
    return Constrained(base, built.prior.supports)


def make_objective_from(method: dict[str, Any]) -> Objective:
    """VI's objective as ``[method]`` names it, with the options that objective reads."""
    name = method["objective"]
    return make_objective(name, **{k: method[k] for k in OBJECTIVE_OPTIONS[name]})


def make_annealing_from(method: dict[str, Any]) -> GeometricAnnealing | None:
    """The annealing of w ``[method]`` asks for: over ``anneal_epochs`` epochs from
    ``anneal_start`` (default 100 times w) down to w; None without annealing epochs."""
    if not method["anneal_epochs"]:
        return None
    start = method["anneal_start"] or 100.0 * method["w"]
    return GeometricAnnealing(start, method["anneal_epochs"])


def make_scheduler(optimizer: torch.optim.Optimizer, method: dict[str, Any]) -> Any:
    """The learning-rate schedule ``[method]`` asks for: None for "constant"; for "cosine",
    lr_t = lr_min + (lr - lr_min) (1 + cos(pi t / epochs)) / 2 with lr_min = lr / 100.

    Example:
        >>> opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> schedule = make_scheduler(opt, {"learning_rate_schedule": "cosine", "epochs": 4,
        ...                                 "learning_rate": 0.1})
        >>> for _ in range(4):
        ...     opt.step(); schedule.step()
        >>> round(opt.param_groups[0]["lr"], 6)
        0.001
    """
    if method["learning_rate_schedule"] == "constant":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=method["epochs"], eta_min=method["learning_rate"] / 100
    )


def _run_vi(
    config: dict[str, Any], built: Built, run_dir: Path, resume: bool, progress: bool
) -> dict[str, Any]:
    method = config["method"]
    with seeded(config["run"]["seed"], _device(config)):  # a flow's initial weights
        q = make_family(method, built)
    estimator = method["estimator"]
    optimizer = torch.optim.Adam(q.parameters(), lr=method["learning_rate"])
    vi = VI(
        built.loss,
        built.prior,
        q,
        w=weight_option(method, config["run"]["seed"]),
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, method),
        stopping=method["stopping"],
        gradient_clipping_norm=method["gradient_clipping_norm"],
        n_samples_per_epoch=method["samples_per_epoch"],
        n_samples_regularisation=method["n_samples_regularisation"],
        diff_mode="forward" if estimator == "forward" else "reverse",
        gradient_estimation_method="score" if estimator == "score" else "pathwise",
        objective=make_objective_from(method),
        anneal=make_annealing_from(method),
        progress_bar=progress,
        seed=config["run"]["seed"],
        checkpoint_dir=run_dir / "checkpoints",
        resume=resume,
        max_failed_epochs=1,  # a run stops at the first epoch in which every draw fails
        log_tensorboard=_has_tensorboard(),
        tensorboard_log_dir=str(run_dir / "tensorboard"),
    )
    try:
        vi.run(built.observed, method["epochs"], method["patience"])
    except KeyboardInterrupt as error:
        raise RunInterrupted from error
    finally:
        if is_main():
            _write_history(run_dir, vi.losses_hist)
    if vi.best_estimator_state_dict is not None:
        q.load_state_dict(vi.best_estimator_state_dict)
    if not is_main():  # every rank holds the same q; rank 0 summarises it
        return {}
    with seeded(config["run"]["seed"], _device(config)), torch.no_grad():
        samples = q.sample(method["posterior_samples"])[0]
    batched = vi.batched_loss
    repeats = 1 if getattr(built.loss, "exact", False) else KHAT_SIMULATIONS

    def log_target(theta: torch.Tensor) -> torch.Tensor:
        # -mean_r l_r(theta) / w + log prior, in chunks of draws to bound memory
        with torch.no_grad():
            loss = torch.cat(
                [
                    torch.stack([batched(chunk, built.observed) for _ in range(repeats)]).mean(0)
                    for chunk in theta.split(KHAT_CHUNK)
                ]
            )
            return prior_log_prob(built.prior, theta) - loss / vi.w

    khat, ess_fraction = vi_importance(
        # every posterior draw: k-hat from 1000 draws of one fitted q measured 0.28 to 0.72
        # over draw seeds on the demo, from 4000 draws 0.27 and 0.28
        q,
        log_target,
        n_samples=method["posterior_samples"],
        seed=config["run"]["seed"],
    )
    result = {
        "samples": samples,
        "khat": khat,
        "ess_fraction": ess_fraction,  # importance-sampling ESS per draw, same draws
        **_weight_result(vi.weight_choice),
    }
    warning = mass_warning(khat, ess_fraction, objective=method["objective"])
    if warning is not None:  # in the log now, in the report's notes later
        warn_problem(warning)  # reaches a Python user too
        result["mass_warning"] = warning
    return result


def weight_option(method: dict[str, Any], seed: int) -> Any:
    """``method.w`` as VI and MCMC take it: a number, or the options of w = "calibrate"."""
    if method["w"] == CALIBRATE:
        return WeightCalibration(resample=method["w_resample"], seed=seed)
    return method["w"]


def _weight_result(choice: WeightChoice | None) -> dict[str, Any]:
    return {} if choice is None else {"weight": choice.as_dict()}


def _run_smd(
    config: dict[str, Any], built: Built, run_dir: Path, progress: bool
) -> dict[str, Any]:
    method = config["method"]
    with seeded(config["run"]["seed"], _device(config)):
        starts = built.prior.sample((method["starts"],))
    theta = starts.clone().requires_grad_()
    smd = SMD(
        built.loss,
        torch.optim.Adam([theta], lr=method["learning_rate"]),
        progress_bar=progress,
        gradient_clipping_norm=method["gradient_clipping_norm"],
        seed=config["run"]["seed"],
    )
    try:
        estimate, _ = smd.run(built.observed, method["epochs"], method["patience"])
    except KeyboardInterrupt as error:
        raise RunInterrupted from error
    finally:
        if is_main():
            _write_history(run_dir, {"loss": list(smd.loss)})
    return {"samples": estimate.detach()[None]}


def _run_mcmc(
    config: dict[str, Any], built: Built, run_dir: Path, progress: bool
) -> dict[str, Any]:
    method = config["method"]
    kernel_cls = HMC if method["kernel"] == "hmc" else MALA
    options = {"n_leapfrog": method["n_leapfrog"]} if method["kernel"] == "hmc" else {}
    w = weight_option(method, config["run"]["seed"])
    kernel = kernel_cls(built.prior, built.loss, w=w, **options)
    with seeded(config["run"]["seed"], _device(config)):
        start = built.prior.sample((method["chains"],))
    mcmc = MCMC(kernel, num_samples=method["samples"], progress_bar=progress)
    try:
        mcmc.run(start, built.observed, warmup=method["warmup"], seed=config["run"]["seed"])
    except KeyboardInterrupt as error:
        raise RunInterrupted from error
    if is_main():
        torch.save(
            {
                "chains": mcmc.chains,
                "names": built.names,
                "acceptance_rate": mcmc.acceptance_rate,
                "step_size": float(mcmc.step_size),
            },
            run_dir / "chains.pt",
        )
    return {
        "samples": mcmc.samples.reshape(-1, len(built.names)),
        "rhat": mcmc.rhat().tolist(),  # rank-normalised split R-hat
        "ess": mcmc.ess_bulk().tolist(),
        "ess_tail": mcmc.ess_tail().tolist(),
        **_weight_result(kernel.weight_choice),
    }


def _write_history(run_dir: Path, history: dict[str, list[float]]) -> None:
    keys = ["total", "loss", "regularisation", "dropped", "ess", "w", "smoothed"]
    keys = [k for k in keys if k in history]
    if not keys or not history[keys[0]]:
        return
    with open(run_dir / "history.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", *keys])
        for i, row in enumerate(zip(*(history[k] for k in keys), strict=True)):
            writer.writerow([i, *row])


def _cell(value: float | None) -> str:
    return (
        "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"
    )


def output_names(config: dict[str, Any], n_outputs: int) -> list[str]:
    """The names of the model's outputs: ``data.columns`` when it names each, else
    "output 0", "output 1", ...

    Example:
        >>> output_names({"data": {"columns": ["return"]}}, 1), output_names({"data": {}}, 2)
        (['return'], ['output 0', 'output 1'])
    """
    columns = config.get("data", {}).get("columns")
    if isinstance(columns, list) and len(columns) == n_outputs:
        return [str(c) for c in columns]
    return [f"output {i}" for i in range(n_outputs)]


def write_outputs(
    run_dir: Path,
    built: Built,
    result: dict[str, Any],
    seed: int,
    outputs: list[str] | None = None,
) -> None:
    """posterior_samples.csv/.pt, summary.csv, predictive.pt and diagnostics.json.

    ``outputs`` names the model's outputs in predictive.pt and the predictive check
    ("output 0", ... when None).
    """
    samples = result["samples"].detach().cpu().float()
    with seeded(seed, distribution_device(built.prior)):
        prior_samples = built.prior.sample((2000,))
    truth = [None if t is None else float(t) for t in built.truth]
    torch.save(
        {"samples": samples, "names": built.names, "prior_samples": prior_samples, "truth": truth},
        run_dir / "posterior_samples.pt",
    )
    with open(run_dir / "posterior_samples.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(built.names)
        writer.writerows(samples.tolist())
    quantiles = torch.quantile(samples, torch.tensor([0.05, 0.5, 0.95]), dim=0)
    std = samples.std(0) if samples.shape[0] > 1 else torch.full((samples.shape[1],), math.nan)
    with open(run_dir / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "parameter",
                "mean",
                "std",
                "q05",
                "q50",
                "q95",
                "truth",
                "rhat",
                "ess",
                "khat",
                "is_ess_fraction",
            ]
        )
        for i, name in enumerate(built.names):
            writer.writerow(
                [
                    name,
                    _cell(samples[:, i].mean().item()),
                    _cell(std[i].item()),
                    *(_cell(quantiles[k, i].item()) for k in range(3)),
                    _cell(truth[i]),
                    _cell(result["rhat"][i]) if "rhat" in result else "",
                    _cell(result["ess"][i]) if "ess" in result else "",
                    _cell(result.get("khat")) if i == 0 else "",
                    _cell(result.get("ess_fraction")) if i == 0 else "",
                ]
            )
    diagnostics: dict[str, Any] = {
        k: result[k]
        for k in ("khat", "ess_fraction", "rhat", "ess", "ess_tail", "weight")
        if k in result
    }
    notes = diagnostics.setdefault("notes", [])
    if result.get("mass_warning"):
        notes.append(result["mass_warning"])
    if "khat" in result and not getattr(built.loss, "exact", False):
        notes.append(
            f"k-hat compares q with exp(-loss / w) x prior, the loss averaged over "
            f"{KHAT_SIMULATIONS} simulations per draw; the simulator's remaining noise still "
            "raises k-hat a little, so read it as an upper bound on the approximation error."
        )
    try:
        _predictive(run_dir, built, samples, seed, diagnostics, outputs)
    except ValueError as error:  # e.g. data and simulations of different lengths
        notes.append(f"posterior predictive check skipped: {error}")
    try:
        diagnostics["loss_check"] = _loss_check(built, samples, seed)
    except (TypeError, ValueError) as error:  # a loss without a model, lengths that differ
        notes.append(f"loss check skipped: {error}")
    (run_dir / "diagnostics.json").write_text(json.dumps(diagnostics, indent=2))


def _loss_check(built: Built, samples: torch.Tensor, seed: int) -> dict[str, Any]:
    """The observed loss against the loss of data simulated at up to 100 posterior draws."""
    generator = torch.Generator().manual_seed(seed)
    draws = samples[torch.randperm(samples.shape[0], generator=generator)[:100]]
    check = loss_check(built.loss, draws, built.observed, seed=seed)
    return {
        "p_value": check.p_value,
        "observed_median": float(check.observed.nanmedian()),
        "replicated_median": float(check.replicated.nanmedian()),
        "replicated_q95": float(check.replicated.nanquantile(0.95)),
        "draws": int(draws.shape[0]),
        "reading": check.reading(),
    }


def _series(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """``x`` without its last axis when it has ``ndim`` axes and the last is of length one."""
    return x[..., 0] if x.ndim == ndim and x.shape[-1] == 1 else x


def _predictive(
    run_dir: Path,
    built: Built,
    samples: torch.Tensor,
    seed: int,
    diagnostics: dict[str, Any],
    outputs: list[str] | None = None,
) -> None:
    """Simulate at up to 200 posterior draws; save them and the check's summaries."""
    generator = torch.Generator().manual_seed(seed)
    draws = samples[torch.randperm(samples.shape[0], generator=generator)[:200]]
    check = posterior_predictive(built.model, draws, built.data, seed=seed)
    names = outputs or [f"output {i}" for i in range(len(built.data))]
    torch.save(
        {
            # series as (B, T) and (T,): a trailing axis of one (BlackBIRDS' layout) dropped
            "simulated": [_series(s.float(), 3) for s in check.simulated],
            "observed": [_series(y.float(), 2) for y in built.data],
            "names": names,
        },
        run_dir / "predictive.pt",
    )
    diagnostics["ppc"] = {
        names[i]: {
            name: {
                "observed": c.observed.reshape(-1)[0].item(),
                "quantile": c.quantile.reshape(-1)[0].item(),
                "p_value": c.p_value.reshape(-1)[0].item(),
            }
            for name, c in checks.items()
        }
        for i, checks in enumerate(check.checks)
    }


def run_calibration(
    config: dict[str, Any],
    run_dir: str | Path,
    base: str | Path = ".",
    resume: bool = False,
    progress: bool = True,
    report: bool = True,
) -> Path:
    """Run a resolved configuration; write the run folder; return the report's path (the
    folder's when ``report=False`` leaves the report out)."""
    from gradcal.report import write_report

    run_dir = Path(run_dir)
    started = time.perf_counter()
    built = build(config, base)
    check_simulated_lengths(built, config)  # before anything is written
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(dumps(config))
        info = {"base": str(Path(base).resolve())}
        (run_dir / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    method = config["method"]["kind"]
    if method == "vi":
        result = _run_vi(config, built, run_dir, resume, progress)
    elif method == "smd":
        result = _run_smd(config, built, run_dir, progress)
    else:
        result = _run_mcmc(config, built, run_dir, progress)
    logger.info("calibration finished in %.1f s", time.perf_counter() - started)
    if not is_main():  # under torchrun only rank 0 writes files
        return run_dir / "report.html"
    try:
        outputs = output_names(config, len(built.data))
        write_outputs(run_dir, built, result, config["run"]["seed"], outputs)
        return write_report(run_dir) if report else run_dir
    except KeyboardInterrupt as error:
        raise RunInterrupted("outputs") from error
