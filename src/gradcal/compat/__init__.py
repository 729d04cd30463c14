"""BlackBIRDS 1.3 compatibility: every shim that exists only so that a script written for
BlackBIRDS' public API runs on gradcal with its imports renamed.

Each shim lives in a module of this package and is re-exported, with one import line, at
the path BlackBIRDS users import it from:

- ``compat/infer.py``: ``compute_loss_and_jacobian_pathwise``,
  ``compute_and_differentiate_loss`` and ``compute_and_differentiate_loss_score``
  (re-exported by :mod:`gradcal.infer.vi`);
- ``compat/simulate.py``: ``compute_loss`` (re-exported by :mod:`gradcal.simulate`);
- ``compat/models.py``: ``detach_gradient_horizon`` (``Model.detach_gradient_horizon``),
  ``SIRMessagePassing`` and the torch_geometric graph of ``SIR`` (built on first use).

The one-draw/B-draw layout adapters of the built-in models are gradcal's own
(:func:`gradcal.models.model.accepts_one_draw`), not shims. This package imports nothing
from :mod:`gradcal.models` (the models import it). ``docs/migrating-from-blackbirds.md``
lists the deliberate differences.
"""

__all__: list[str] = []
