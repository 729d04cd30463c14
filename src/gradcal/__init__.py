"""gradcal: gradient-assisted calibration of differentiable simulators."""

import logging

from gradcal import models, relax
from gradcal.infer import VI
from gradcal.models import Model
from gradcal.problems import GradcalWarning
from gradcal.results import Run, calibrate, load_run
from gradcal.simulate import run_model, simulate_and_observe_model

__all__ = [
    "VI",
    "GradcalWarning",
    "Model",
    "Run",
    "calibrate",
    "load_run",
    "models",
    "relax",
    "run_model",
    "simulate_and_observe_model",
]
__version__ = "0.1.0"

logging.getLogger("gradcal").addHandler(logging.NullHandler())
