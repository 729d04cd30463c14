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

    With ``seed=None`` the block uses (and advances) the global stream. Otherwise the CPU
    generator and, once CUDA is in use (initialised, or ``device`` is a CUDA device), the
    generator of every CUDA device are saved, seeded with ``seed`` and restored on exit:
    every device, because ``torch.manual_seed`` reseeds them all. An uninitialised CUDA is
    left untouched, so name ``device`` when the block may be the first to use CUDA: its
    CUDA draws are then seeded too. The caller's streams are safe either way.

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
    cuda = torch.cuda.is_available() and (torch.cuda.is_initialized() or device.type == "cuda")
    devices = list(range(torch.cuda.device_count())) if cuda else []
    cpu_state = torch.get_rng_state()
    cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
    try:
        torch.random.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed_all(seed)
        yield
    finally:
        torch.set_rng_state(cpu_state)
        for d, state in zip(devices, cuda_states, strict=True):
            torch.cuda.set_rng_state(state, d)


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
