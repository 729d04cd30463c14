"""Inference drivers: GVI, simulated minimum distance, gradient MCMC, reference posteriors,
and the choice of w."""

from gradcal.infer.convergence import effective_sample_size, ess_bulk, ess_tail, rhat, split_rhat
from gradcal.infer.mcmc import HMC, MALA, MCMC
from gradcal.infer.reference import (
    ImportanceSamples,
    RejectionSamples,
    importance_sampling,
    rejection_abc,
)
from gradcal.infer.smd import SMD
from gradcal.infer.vi import VI
from gradcal.infer.weight import WeightCalibration, WeightChoice, choose_w

__all__ = [
    "HMC",
    "MALA",
    "MCMC",
    "SMD",
    "VI",
    "ImportanceSamples",
    "RejectionSamples",
    "WeightCalibration",
    "WeightChoice",
    "choose_w",
    "effective_sample_size",
    "ess_bulk",
    "ess_tail",
    "importance_sampling",
    "rejection_abc",
    "rhat",
    "split_rhat",
]
