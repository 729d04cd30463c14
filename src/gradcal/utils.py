"""Small helpers kept at BlackBIRDS' import paths (``gradcal.utils.soft_minimum``)."""

from gradcal.relax import soft_maximum, soft_minimum

__all__ = ["soft_maximum", "soft_minimum"]
