"""Input checks shared by the diagnostics."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["as_pair", "as_samples", "check_int", "check_seed", "device_of", "standardised"]


def check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}.")
    return value


def check_seed(seed: Any, optional: bool = True) -> None:
    if seed is None and optional:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int{' or None' if optional else ''}, got {seed!r}.")


def as_samples(x: Any, name: str, min_points: int = 2) -> Tensor:
    """A detached floating sample (n, D) from (n, D) or (n,) (read as D = 1)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a tensor of shape (n, D), got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must have a floating-point dtype, got {x.dtype}.")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"`{name}` must have shape (n, D), got {tuple(x.shape)}.")
    if x.shape[0] < min_points:
        raise ValueError(
            f"`{name}` must hold at least {min_points} points (n, D), got {tuple(x.shape)}."
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return x.detach()


def as_pair(a: Any, b: Any, min_points: int = 2) -> tuple[Tensor, Tensor]:
    a, b = as_samples(a, "a", min_points), as_samples(b, "b", min_points)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"`a` (n, D) and `b` (m, D) must have the same D, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}."
        )
    return a, b.to(a)


def standardised(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """a and b divided coordinate-wise by the (unbiased) std of b; a zero std counts as 1."""
    scale = b.std(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return a / scale, b / scale


def device_of(*objects: Any) -> torch.device:
    """The first CUDA device among the tensors of modules and distributions, else the CPU."""
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            tensors = [*obj.parameters(), *obj.buffers()]
        else:  # a distribution: its parameter tensors, also inside Independent & co.
            tensors, stack = [], [obj]
            while stack:
                for value in getattr(stack.pop(), "__dict__", {}).values():
                    if isinstance(value, Tensor):
                        tensors.append(value)
                    elif isinstance(value, torch.distributions.Distribution):
                        stack.append(value)
        for t in tensors:
            if t.device.type == "cuda":
                return t.device
    return torch.device("cpu")
