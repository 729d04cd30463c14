r"""An annealing schedule for w: start from a broad target, end at the target w.

The generalised posterior $\propto \exp(-l/w)\,\pi$ is flatter for a larger w; fitting
first at a large w lets q spread over every region of low loss before the target
sharpens, which helps any family (and mass-covering objectives most) find all the modes.
"""

from __future__ import annotations

import math

__all__ = ["GeometricAnnealing"]


class GeometricAnnealing:
    r"""w falls geometrically from ``start`` to the target w over ``epochs`` epochs.

    $w_t = w_0 (w / w_0)^{t / T}$ for epochs t = 0, ..., T - 1, then the target w.
    While annealing, VI records the epochs (with ``w`` in the history) but neither tracks a
    best state nor counts them against the patience: totals at different w are not
    comparable.

    Arguments:
        start: w at the first epoch (> 0; larger than the target for a broad start).
        epochs: T, epochs of annealing (>= 1).

    Example:
        >>> schedule = GeometricAnnealing(start=100.0, epochs=2)
        >>> [schedule.w_at(t, target=1.0) for t in range(3)]
        [100.0, 10.0, 1.0]
    """

    def __init__(self, start: float, epochs: int):
        if isinstance(start, bool) or not isinstance(start, int | float) or not start > 0:
            raise ValueError(f"`start` must be a number > 0, got {start!r}.")
        if not math.isfinite(start):
            raise ValueError(f"`start` must be finite, got {start!r}.")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"`epochs` must be an int >= 1, got {epochs!r}.")
        self.start, self.epochs = float(start), epochs

    def active(self, epoch: int) -> bool:
        """Whether ``epoch`` (from 0) is still an annealing epoch."""
        return epoch < self.epochs

    def w_at(self, epoch: int, target: float) -> float:
        """w at ``epoch`` (from 0) for the target weight ``target``."""
        if not self.active(epoch):
            return float(target)
        return float(self.start * (target / self.start) ** (epoch / self.epochs))

    def __repr__(self) -> str:
        return f"GeometricAnnealing(start={self.start}, epochs={self.epochs})"
