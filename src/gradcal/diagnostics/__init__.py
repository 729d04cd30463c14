r"""Checks of a calibration: sample distances, C2ST, PSIS k-hat, predictive checks, coverage.

Everything here runs without gradients and returns plain numbers or small result objects:

- how far apart two sample sets are (:func:`energy_distance_samples`, :func:`mmd_samples`
  against the noise floor :func:`split_half_floor`, and the classifier test :func:`c2st`);
- whether a variational approximation is good enough to trust (:func:`psis_khat`,
  :func:`vi_khat`, read by :func:`read_khat`; :func:`vi_importance` adds the
  importance-sampling ESS);
- whether the calibrated model reproduces the data (:func:`posterior_predictive`, and
  :func:`loss_check` for the loss itself);
- whether a calibration routine is calibrated over many synthetic data sets
  (:func:`coverage`, with simulation-based calibration ranks).
"""

from gradcal.diagnostics.coverage import Coverage, coverage
from gradcal.diagnostics.distances import (
    NoiseFloor,
    c2st,
    energy_distance_samples,
    mmd_samples,
    split_half_floor,
)
from gradcal.diagnostics.predictive import (
    DEFAULT_SUMMARIES,
    LossCheck,
    PredictiveCheck,
    SummaryCheck,
    autocorrelation,
    loss_check,
    posterior_predictive,
)
from gradcal.diagnostics.psis import (
    VIImportance,
    importance_ess,
    psis_khat,
    read_ess_fraction,
    read_khat,
    vi_importance,
    vi_khat,
)

__all__ = [
    "DEFAULT_SUMMARIES",
    "Coverage",
    "LossCheck",
    "NoiseFloor",
    "PredictiveCheck",
    "SummaryCheck",
    "VIImportance",
    "autocorrelation",
    "c2st",
    "coverage",
    "energy_distance_samples",
    "importance_ess",
    "loss_check",
    "mmd_samples",
    "posterior_predictive",
    "psis_khat",
    "read_ess_fraction",
    "read_khat",
    "split_half_floor",
    "vi_importance",
    "vi_khat",
]
