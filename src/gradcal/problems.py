"""Messages that say a result may be wrong, issued so that a Python user sees them.

gradcal's logger has only a ``NullHandler`` (a library leaves logging to its user), so a
``logger.warning`` never reaches someone who did not configure logging. A message that says
"this result may be wrong" therefore goes through :func:`warn_problem`: a
:class:`GradcalWarning` (a ``UserWarning``, shown once per place by Python's default
filters, catchable with ``warnings.catch_warnings`` or ``pytest.warns``) pointing at the
user's own line, and the same line in the log.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

__all__ = ["GradcalWarning", "warn_problem"]

logger = logging.getLogger("gradcal")

_PACKAGE = str(Path(__file__).resolve().parent)  # frames under it are gradcal's own


class GradcalWarning(UserWarning):
    """A gradcal result may be wrong (q misses mass, a fit the report does not trust, ...).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_problem("the fit may be wrong")
        >>> caught[0].category.__name__, str(caught[0].message)
        ('GradcalWarning', 'the fit may be wrong')
    """


def _outside_frames() -> int:
    """The ``stacklevel`` of the first caller outside gradcal, seen from warn_problem."""
    frame, level = sys._getframe(2), 2  # warn_problem's caller is level 2
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def warn_problem(message: str, log: bool = True) -> None:
    """Warn (:class:`GradcalWarning`) at the first line outside gradcal, and log the message.

    Arguments:
        message: what may be wrong, and what to do (one paragraph).
        log: also write it to the ``gradcal`` logger at level WARNING (the command line
            shows it there).
    """
    if log:
        logger.warning(message)
    warnings.warn(message, GradcalWarning, stacklevel=_outside_frames())
