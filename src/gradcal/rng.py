"""Random streams: private seeded streams for entry points, and the state a checkpoint keeps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["get_rng_state", "seeded", "set_rng_state"]


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block on a private stream seeded with ``seed``; the caller's is restored.

    With ``seed=None`` the block uses (and advances) the global stream. ``device`` names the
    CUDA device whose generator is forked too (the CPU one always is).

    Example:
        >>> before = torch.get_rng_state()
        >>> with seeded(3):
        ...     a = torch.rand(2)
        >>> with seeded(3):
        ...     b = torch.rand(2)
        >>> torch.equal(a, b), torch.equal(torch.get_rng_state(), before)
        (True, True)
    """
    if seed is None:
        yield
        return
    device = torch.device("cpu" if device is None else device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def get_rng_state() -> dict[str, Any]:
    """torch's CPU generator state, and each CUDA device's where CUDA is available."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
