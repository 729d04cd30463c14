r"""A single-draw history kept as its stretches, joined only when something needs it whole.

The time loop appends each new step to the history. A model whose ``trim_time_series``
keeps the whole history (BlackBIRDS' tutorial models do) pays for a copy of all of it at
every step, O(T^2) over a run, forward and backward, even when ``step`` reads only the last
entry. :class:`LazyHistory` holds the stretches instead: reading rows with an int or a
step-1 slice on the time axis (``x[-1]``, ``x[-1, 0, :]``, ``x[-k:]``, ``x[3]``) returns
the rows of the stretch that holds them, which are the same numbers, with the same
gradients, as those of the joined tensor. Anything else (a torch function, a method, an
operator, ``len`` excepted) gets the joined tensor, computed once and kept, so a model
computes exactly what it computes on the joined history. The one difference a model can
see is the type: ``isinstance(x, torch.Tensor)`` is False (a model that needs a real tensor
sets ``lazy_history = False``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

__all__ = ["LazyHistory", "append_step", "materialise"]


def materialise(value: Any) -> Any:
    """``value`` with every :class:`LazyHistory` in it (nested lists, tuples, dicts) joined.

    Example:
        >>> materialise([LazyHistory([torch.zeros(1, 2), torch.ones(1, 2)]), 3])[0].shape
        torch.Size([2, 2])
    """
    return tree_map(lambda v: v.full() if isinstance(v, LazyHistory) else v, value)


def _compatible(a: Tensor, b: Tensor) -> bool:
    """Whether ``torch.cat((a, b))`` joins them with no promotion or move (else: join now)."""
    return (
        a.ndim == b.ndim >= 1
        and a.shape[1:] == b.shape[1:]
        and a.dtype == b.dtype
        and a.device == b.device
    )


def append_step(state: Tensor | LazyHistory, x: Tensor) -> Tensor | LazyHistory:
    """The history ``state`` followed by the step ``x`` along axis 0, without a copy.

    Where the join would promote a dtype, move a device or fail on shapes, it is done at
    once, as the plain loop does (the same result or the same error).

    Example:
        >>> h = append_step(torch.zeros(1, 3), torch.ones(1, 3))
        >>> type(h).__name__, tuple(h.shape), h[-1].tolist()
        ('LazyHistory', (2, 3), [1.0, 1.0, 1.0])
    """
    pieces = state._pieces if isinstance(state, LazyHistory) else [state]
    if not _compatible(pieces[-1], x):
        return torch.cat((materialise(state), x))
    return LazyHistory([*pieces, x])


class LazyHistory:
    """A history along axis 0 held as a list of stretches (tensors joined along axis 0).

    Arguments:
        pieces: the stretches in time order, each (t_i, ...) with the same trailing shape.

    Example:
        >>> h = LazyHistory([torch.arange(6.0).reshape(3, 2), torch.full((1, 2), 9.0)])
        >>> len(h), h[-1].tolist(), h[1:, 0].tolist()
        (4, [9.0, 9.0], [2.0, 4.0, 9.0])
        >>> (h * 2).sum().item()                  # any other use sees the joined tensor
        66.0
    """

    def __init__(self, pieces: list[Tensor]):
        if not pieces or not all(isinstance(p, Tensor) and p.ndim >= 1 for p in pieces):
            raise ValueError("`pieces` must be a non-empty list of tensors with a time axis.")
        self._pieces = list(pieces)

    # --- what is answered without joining -----------------------------------------------

    def __len__(self) -> int:
        return sum(p.shape[0] for p in self._pieces)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self._pieces[-1].shape[1:]))

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    @property
    def ndim(self) -> int:
        return self._pieces[-1].ndim

    def dim(self) -> int:
        return self.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self._pieces[-1].dtype

    @property
    def device(self) -> torch.device:
        return self._pieces[-1].device

    def _rows(self, start: int, stop: int) -> tuple[Tensor, int] | None:
        """(a tensor holding rows start..stop-1, the offset of its row 0), joining only the
        stretches that hold them; None for an empty range."""
        if stop <= start:
            return None
        end = len(self)
        covering = []
        for piece in reversed(self._pieces):
            begin = end - piece.shape[0]
            if begin < stop:
                covering.append(piece)
            if begin <= start:
                break
            end = begin
        covering.reverse()
        base = covering[0] if len(covering) == 1 else torch.cat(covering)
        return base, begin

    def __getitem__(self, index: Any) -> Any:
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) and index else (index, ())
        total = len(self)
        if isinstance(first, int) and not isinstance(first, bool) and -total <= first < total:
            row = first + total if first < 0 else first
            base, offset = self._rows(row, row + 1)
            return base[(row - offset, *rest)]
        if isinstance(first, slice):
            start, stop, step = first.indices(total)
            found = self._rows(start, stop) if step == 1 else None
            if found is not None:
                base, offset = found
                return base[(slice(start - offset, stop - offset), *rest)]
        return self.full()[index]

    # --- everything else sees the joined tensor --------------------------------------------

    def full(self) -> Tensor:
        """The joined history (computed once, then kept: in-place changes persist)."""
        if len(self._pieces) > 1:
            self._pieces = [torch.cat(self._pieces)]
        return self._pieces[0]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*materialise(args), **materialise(kwargs or {}))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_pieces":
            raise AttributeError(name)
        return getattr(self.full(), name)

    def __setitem__(self, index: Any, value: Any) -> None:
        self.full()[index] = materialise(value)

    def __iter__(self) -> Any:
        return iter(self.full())

    def __repr__(self) -> str:
        return f"LazyHistory({self.full()!r})"

    __hash__ = object.__hash__


def _forward(name: str) -> Any:
    def method(self: LazyHistory, *args: Any) -> Any:
        return getattr(self.full(), name)(*materialise(args))

    method.__name__ = name
    return method


_FORWARDED = (
    "__add__",
    "__radd__",
    "__iadd__",
    "__sub__",
    "__rsub__",
    "__isub__",
    "__mul__",
    "__rmul__",
    "__imul__",
    "__truediv__",
    "__rtruediv__",
    "__itruediv__",
    "__floordiv__",
    "__rfloordiv__",
    "__mod__",
    "__rmod__",
    "__pow__",
    "__rpow__",
    "__matmul__",
    "__rmatmul__",
    "__neg__",
    "__pos__",
    "__abs__",
    "__invert__",
    "__and__",
    "__rand__",
    "__or__",
    "__ror__",
    "__xor__",
    "__rxor__",
    "__lshift__",
    "__rshift__",
    "__lt__",
    "__le__",
    "__gt__",
    "__ge__",
    "__eq__",
    "__ne__",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
    "__contains__",
    "__array__",
    "__format__",
    "__reversed__",
)  # operators and conversions: on the joined tensor

for _name in _FORWARDED:
    setattr(LazyHistory, _name, _forward(_name))
