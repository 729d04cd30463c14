"""Simulators: the :class:`Model` contract and natively batched built-in models."""

from gradcal.models.ar1 import AR1
from gradcal.models.brock_hommes import BrockHommes, BrockHommesBeliefs
from gradcal.models.fixed import FixedParameters, fix_parameters
from gradcal.models.model import Model
from gradcal.models.normal import Normal, NormalDraws
from gradcal.models.rama_cont import RamaCont
from gradcal.models.random_walk import RandomWalk
from gradcal.models.sir import SIR

__all__ = [
    "AR1",
    "SIR",
    "BrockHommes",
    "BrockHommesBeliefs",
    "FixedParameters",
    "Model",
    "Normal",
    "NormalDraws",
    "RamaCont",
    "RandomWalk",
    "fix_parameters",
]
