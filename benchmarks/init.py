"""Where should q start: at the family's default or at the prior's moments?

``python benchmarks/init.py [--seeds 5] [--reference-epochs 2000] [--out FILE]`` (the
figures in docs/where-q-starts.md: ``--seeds 3 --reference-epochs 800``) fits two small
problems with ``method.init = "family"`` (N(0, 1) in the unconstrained space) and ``"prior"`` (the
prior's mean and sd there) for seeds 0..S-1 and 20 and 100 epochs, and reports per fit the
report's verdict, the importance-sampling ESS per draw, the width of q's central 90 %
interval over the prior's (largest over parameters) and the energy distance from q to a
long-run reference (``--reference-epochs`` of 20 draws, patience off; two references, one from each
start, whose distance to each other is the floor):

- ``user-ar1``: a newcomer's own AR(1) x_t = phi x_{t-1} + sigma e_t (x_0 = 0, T = 100,
  data simulated once at phi 0.6, sigma 0.4 with seed 2027), priors phi ~ N(0.5, 0.2),
  sigma ~ LogNormal(-1, 0.3), MMD of lag-2 windows, family "diagonal", w = 0.05, 10 draws
  per epoch (issue 23);
- ``normal``: the built-in ``Normal`` model (T = 50 draws at mu 1, sigma 0.8, seed 2027),
  its exact negative log-likelihood, w = 1, priors mu ~ N(0, 2), sigma ~ LogNormal(0, 0.5),
  the default family "nsf", 10 draws per epoch.

Distances are energy distances between 2000 draws of q and of the reference, both in
coordinates standardised by the reference's sd.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import tempfile
from pathlib import Path
from statistics import median

import numpy as np
import torch

import gradcal
from gradcal.diagnostics.distances import energy_distance_samples
from gradcal.report import width_ratios

USER_AR1 = (Path(__file__).parents[1] / "examples" / "user_ar1.py").read_text()


def problem(name: str, folder: Path) -> dict:
    """The configuration of a problem, its data written into ``folder`` once."""
    if name == "user-ar1":
        (folder / "user_ar1.py").write_text(USER_AR1)
        sys.path.insert(0, str(folder))
        from user_ar1 import MyAR1

        model, truth = MyAR1(100), torch.tensor([0.6, 0.4])
        config = {
            "model": {"name": "user_ar1:MyAR1", "options": {"n_timesteps": 100}},
            "parameters": [
                {"name": "phi", "prior": {"kind": "normal", "loc": 0.5, "scale": 0.2}},
                {"name": "sigma", "prior": {"kind": "lognormal", "loc": -1.0, "scale": 0.3}},
            ],
            "loss": {"kind": "mmd", "window": 2},
            "method": {"kind": "vi", "family": "diagonal", "w": 0.05},
        }
    else:
        model, truth = gradcal.models.normal.NormalDraws(50), torch.tensor([1.0, 0.8])
        config = {
            "model": {"name": "Normal", "options": {"n_timesteps": 50}},
            "parameters": [
                {"name": "mu", "prior": {"kind": "normal", "loc": 0.0, "scale": 2.0}},
                {"name": "sigma", "prior": {"kind": "lognormal", "loc": 0.0, "scale": 0.5}},
            ],
            "loss": {"kind": "nll"},
            "method": {"kind": "vi", "family": "nsf", "w": 1.0},
        }
    torch.manual_seed(2027)
    with torch.no_grad():
        (y,) = model.run_and_observe(truth)
    np.savetxt(folder / f"{name}.csv", y.reshape(-1).numpy(), header="y", comments="")
    config["data"] = {"file": f"{name}.csv", "columns": ["y"]}
    config["method"] |= {"samples_per_epoch": 10, "posterior_samples": 2000}
    return config


def fit(config: dict, folder: Path, seed: int, init: str, epochs: int, **method) -> dict:
    config = {**config, "run": {"seed": seed}}
    config["method"] = {**config["method"], "init": init, "epochs": epochs, **method}
    out = folder / f"run-{init}-{epochs}-{seed}"
    run = gradcal.calibrate(config, out, base=folder, overwrite=True, progress=False)
    page = (out / "report.html").read_text(encoding="utf-8")
    prior = run.prior.sample((4000,))
    return {
        "samples": run.sample(2000, seed=1),
        "verdict": re.search(r'class="verdict verdict-(\w+)"', page).group(1),
        "ess": run.diagnostics["ess_fraction"],
        "wide": max(width_ratios(run.samples, prior, run.names).values()),
    }


def distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    sd = reference.std(0)
    return float(energy_distance_samples(samples / sd, reference / sd))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--problems", nargs="+", default=["user-ar1", "normal"])
    parser.add_argument("--out", default="init.csv")
    parser.add_argument("--reference-epochs", type=int, default=2000)
    parser.add_argument("--epochs", type=int, nargs="+", default=[20, 100])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.problems:
            config = problem(name, folder)
            refs = {
                init: fit(
                    config,
                    folder,
                    999,
                    init,
                    args.reference_epochs,
                    samples_per_epoch=20,
                    patience=args.reference_epochs,
                )
                for init in ("family", "prior")
            }
            reference = refs["prior"]["samples"]
            floor = distance(refs["family"]["samples"], reference)
            print(f"{name}: reference floor (the two long runs) {floor:.4f}", flush=True)
            for epochs in args.epochs:
                for init in ("family", "prior"):
                    for seed in range(args.seeds):
                        r = fit(config, folder, seed, init, epochs)
                        row = {
                            "problem": name,
                            "epochs": epochs,
                            "init": init,
                            "seed": seed,
                            "verdict": r["verdict"],
                            "ess_fraction": round(r["ess"], 4),
                            "width_over_prior": round(r["wide"], 3),
                            "distance": round(distance(r["samples"], reference), 4),
                            "floor": round(floor, 4),
                        }
                        rows.append(row)
                        print(row, flush=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for name in args.problems:
        for epochs in args.epochs:
            for init in ("family", "prior"):
                sel = [
                    r
                    for r in rows
                    if (r["problem"], r["epochs"], r["init"]) == (name, epochs, init)
                ]
                trust = sum(r["verdict"] == "trust" for r in sel)
                print(
                    f"{name:9s} {epochs:4d} epochs init={init:6s}: median distance "
                    f"{median(r['distance'] for r in sel):.3f}, median ESS "
                    f"{median(r['ess_fraction'] for r in sel):.3f}, median width/prior "
                    f"{median(r['width_over_prior'] for r in sel):.2f}, verdicts "
                    + ",".join(r["verdict"] for r in sel)
                    + f" ({trust} trust)"
                )


if __name__ == "__main__":
    main()
