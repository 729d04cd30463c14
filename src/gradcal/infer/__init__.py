"""Inference drivers: generalised variational inference (more to come)."""

from gradcal.infer.vi import VI

__all__ = ["VI"]
