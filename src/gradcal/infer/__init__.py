"""Inference drivers: GVI (and its objectives), simulated minimum distance, gradient MCMC,
reference posteriors, and the choice of w."""

from gradcal.infer.annealing import GeometricAnnealing
from gradcal.infer.convergence import effective_sample_size, ess_bulk, ess_tail, rhat, split_rhat
from gradcal.infer.mcmc import HMC, MALA, MCMC
from gradcal.infer.objectives import (
    ForwardKL,
    ImportanceWeighted,
    Renyi,
    ReverseKL,
    importance_ess,
    make_objective,
)
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
    "ForwardKL",
    "GeometricAnnealing",
    "ImportanceSamples",
    "ImportanceWeighted",
    "RejectionSamples",
    "Renyi",
    "ReverseKL",
    "WeightCalibration",
    "WeightChoice",
    "choose_w",
    "effective_sample_size",
    "ess_bulk",
    "ess_tail",
    "importance_ess",
    "importance_sampling",
    "make_objective",
    "rejection_abc",
    "rhat",
    "split_rhat",
]
