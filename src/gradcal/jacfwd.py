r"""Forward-mode Jacobians in chunks: :func:`torch.func.jacfwd` with ``chunk_size``.

:func:`torch.func.jacfwd` pushes all N input directions through ``func`` at once (one
``vmap`` over N tangents), so memory grows with N. :func:`jacfwd` takes the same arguments
plus ``chunk_size``, the number of directions pushed through at a time, built on public
APIs only: :func:`torch.func.jvp` under ``torch.func.vmap(..., chunk_size=...)``.
``randomness="same"`` gives every direction the same random draws, so the Jacobian of a
stochastic simulator is that of one realisation. BlackBIRDS' ``jacfwd``, at its path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["jacfwd"]


def _map(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """Apply ``fn`` to every tensor of a nest of tuples, lists and dicts."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, tuple | list):
        return type(tree)(_map(fn, t) for t in tree)
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    raise TypeError(f"jacfwd: outputs must be tensors (or nests of them), got {type(tree)}.")


def _positions(argnums: int | tuple[int, ...], n_args: int) -> tuple[int, ...]:
    many = isinstance(argnums, tuple)
    positions = argnums if many else (argnums,)
    if not positions or not all(isinstance(a, int) and not isinstance(a, bool) for a in positions):
        raise ValueError(f"jacfwd: `argnums` must be an int or a tuple of ints, got {argnums!r}.")
    if any(not -n_args <= a < n_args for a in positions):
        raise ValueError(f"jacfwd: `argnums` {argnums!r} out of range for {n_args} argument(s).")
    return tuple(a % n_args for a in positions)


def jacfwd(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    has_aux: bool = False,
    *,
    randomness: str = "error",
    chunk_size: int | None = None,
) -> Callable[..., Any]:
    r"""The Jacobian of ``func`` with respect to the arguments ``argnums``, by forward mode.

    For an output y (shape S) and an input x (shape P) the Jacobian has shape (*S, *P):
    $J[s, p] = \partial y_s / \partial x_p$, one :func:`torch.func.jvp` per input
    element p, ``chunk_size`` of them at a time.

    Arguments:
        func: a function of tensors returning a tensor or a nest (tuple, list, dict) of
            tensors; with ``has_aux`` it returns ``(output, aux)``.
        argnums: the position (or a tuple of positions) of the tensor arguments to
            differentiate; a tuple gives one Jacobian per position.
        has_aux: return ``(jacobian, aux)``; aux is not differentiated.
        randomness: ``"error"``, ``"same"`` or ``"different"``, as in :func:`torch.func.vmap`.
        chunk_size: directions per pass (None: all at once; 1: one by one).

    Returns:
        A function with ``func``'s arguments returning the Jacobian (and aux).

    Example:
        >>> f = lambda x: x.sin() * x.sum()
        >>> x = torch.arange(3.0)
        >>> torch.allclose(jacfwd(f, chunk_size=2)(x), torch.func.jacrev(f)(x))
        True
    """
    if not callable(func):
        raise TypeError(f"jacfwd: `func` must be callable, got {type(func).__name__}.")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"jacfwd: `chunk_size` must be None or an int >= 1, got {chunk_size!r}.")
    if randomness not in ("error", "same", "different"):
        raise ValueError(
            f"jacfwd: `randomness` must be 'error', 'same' or 'different', got {randomness!r}."
        )

    def wrapper(*args: Any) -> Any:
        positions = _positions(argnums, len(args))
        primals = tuple(args[a] for a in positions)
        for a, p in zip(positions, primals, strict=True):
            if not isinstance(p, Tensor) or not p.is_floating_point():
                raise TypeError(f"jacfwd: argument {a} must be a floating-point tensor.")
        sizes = [p.numel() for p in primals]
        n = sum(sizes)
        eye = torch.eye(n, dtype=primals[0].dtype, device=primals[0].device)
        basis = tuple(
            block.reshape((n, *p.shape)).to(p)
            for block, p in zip(eye.split(sizes, dim=1), primals, strict=True)
        )

        def of_primals(*xs: Tensor) -> Any:
            full = list(args)
            for a, x in zip(positions, xs, strict=True):
                full[a] = x
            return func(*full)

        def push(*tangents: Tensor) -> Any:
            out = torch.func.jvp(of_primals, primals, tangents, has_aux=has_aux)
            return (out[1], out[2]) if has_aux else out[1]

        pushed = torch.func.vmap(push, randomness=randomness, chunk_size=chunk_size)(*basis)
        tangent_out, aux = pushed if has_aux else (pushed, None)

        def per_input(column: Tensor) -> Any:
            # column: (N, *S) -> (*S, N) -> one (*S, *P) block per differentiated argument
            moved = column.movedim(0, -1)
            blocks = tuple(
                b.reshape((*moved.shape[:-1], *p.shape))
                for b, p in zip(moved.split(sizes, dim=-1), primals, strict=True)
            )
            return blocks if isinstance(argnums, tuple) else blocks[0]

        jacobian = _map(per_input, tangent_out)
        if has_aux:
            return jacobian, _map(lambda t: t[0], aux)  # as seen along the first direction
        return jacobian

    return wrapper
