"""Effective samples per second of MALA and HMC, one chain versus 16 batched chains.

    OMP_NUM_THREADS=1 python benchmarks/mcmc.py [--samples 2000] [--warmup 500]

Target: the exact Brock-Hommes ``brock_hommes_wavy`` posterior (tests/data), uniform prior
box. Each configuration adapts its step size and a diagonal preconditioner during warm-up,
then keeps ``--samples`` draws per chain. Reported: seconds of the sampling phase, the
smallest ESS over the four parameters (all chains together), ESS per second, the largest
split R-hat, and the speed-up of 16 batched chains over one chain in ESS per second.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from gradcal.infer.mcmc import HMC, MALA, MCMC
from gradcal.losses import NegativeLogLikelihood
from gradcal.models import BrockHommesBeliefs

DATA = Path(__file__).parents[1] / "tests" / "data" / "brock_hommes_wavy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=500)
    args = parser.parse_args()
    obs = torch.tensor(np.loadtxt(DATA / "obs.txt"))
    low = torch.tensor([0.0, 0.0, 0.0, -1.0], dtype=torch.float64)
    prior = torch.distributions.Independent(torch.distributions.Uniform(low, low + 1), 1)
    loss = NegativeLogLikelihood(BrockHommesBeliefs.wavy())
    start = torch.tensor([0.9, 0.2, 0.9, -0.2], dtype=torch.float64)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.warmup} warm-up + {args.samples} draws per chain"
    )
    print(f"{'kernel':<6} {'chains':>6} {'seconds':>8} {'min ESS':>8} {'ESS/s':>8} {'R-hat':>6}")
    for name, kernel in (("MALA", MALA(prior, loss)), ("HMC", HMC(prior, loss, n_leapfrog=10))):
        per_second = {}
        for chains in (1, 16):
            mcmc = MCMC(kernel, num_samples=args.samples, progress_bar=False)
            warm = MCMC(kernel, num_samples=1, progress_bar=False)
            warm.run(start.expand(chains, -1).clone(), obs, warmup=args.warmup, seed=0)
            began = time.perf_counter()
            mcmc.run(
                warm.samples[-1], obs, scale=warm.step_size, covariance=warm.covariance, seed=1
            )
            seconds = time.perf_counter() - began
            ess = mcmc.ess().min().item()
            per_second[chains] = ess / seconds
            print(
                f"{name:<6} {chains:>6} {seconds:>8.2f} {ess:>8.0f} {ess / seconds:>8.1f} "
                f"{mcmc.rhat().max().item():>6.3f}"
            )
        print(
            f"{name}: 16 batched chains give {per_second[16] / per_second[1]:.1f}x the ESS/s "
            "of one chain"
        )


if __name__ == "__main__":
    main()
