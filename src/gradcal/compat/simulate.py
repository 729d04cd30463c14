"""BlackBIRDS' ``simulate.compute_loss``: one loss over paired observed and simulated outputs.

gradcal's losses (:mod:`gradcal.losses`) compare batches of draws and give a failed draw a
NaN loss; this is BlackBIRDS' per-draw helper, re-exported at
``gradcal.simulate.compute_loss``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gradcal.problems import GradcalWarning

__all__ = ["compute_loss"]


def compute_loss(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    observed_outputs: Sequence[Tensor],
    simulated_outputs: Sequence[Tensor],
) -> tuple[Tensor, Tensor]:
    r"""Sum ``loss_fn(simulated, observed)`` over the pairs of outputs, skipping NaN ones.

    $L = \sum_k \ell(s_k, o_k)$ over the outputs k whose simulation has no NaN; a
    skipped output raises a ``UserWarning``. The value is returned twice (BlackBIRDS' form
    for a Jacobian with ``has_aux=True``).

    Arguments:
        loss_fn: ``loss_fn(simulated, observed) -> tensor``, e.g. ``torch.nn.MSELoss()``.
        observed_outputs: the data, one tensor per model output.
        simulated_outputs: the simulation, one tensor per output, each of the shape of its
            observed counterpart.

    Returns:
        ``(loss, loss)``; ``(nan, nan)`` when every simulated output has a NaN.

    Raises:
        ValueError: different numbers of outputs, or a pair of different shapes.

    Example:
        >>> mse = torch.nn.MSELoss()
        >>> y = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
        >>> compute_loss(mse, y, [torch.tensor([1.0, 4.0]), torch.tensor([3.0])])
        (tensor(2.), tensor(2.))
    """
    if len(observed_outputs) != len(simulated_outputs):
        raise ValueError(
            f"compute_loss: {len(observed_outputs)} observed output(s) but "
            f"{len(simulated_outputs)} simulated output(s); they must pair up."
        )
    loss: Tensor | None = None
    pairs = zip(observed_outputs, simulated_outputs, strict=True)
    for k, (observed, simulated) in enumerate(pairs):
        if observed.shape != simulated.shape:
            raise ValueError(
                f"compute_loss: output {k} is observed with shape {tuple(observed.shape)} "
                f"but simulated with shape {tuple(simulated.shape)}."
            )
        if torch.isnan(simulated).any():
            warnings.warn(
                f"compute_loss: simulated output {k} contains NaN; it is left out of the loss.",
                GradcalWarning,
                stacklevel=2,
            )
            continue
        term = loss_fn(simulated, observed)
        loss = term if loss is None else loss + term
    if loss is None:
        nan = torch.tensor(torch.nan)
        return nan, nan.clone()
    return loss, loss
