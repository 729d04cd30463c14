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

import weakref
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
    """The history ``state`` followed by the step ``x`` along axis 0, without a re-join.

    The history keeps a copy of ``x`` (and, at the first step, of ``state``), as the
    joined history ``torch.cat((state, x))`` does: a write through a read of the history
    never reaches the tensors the loop recorded. That is one copy of each step, O(T) over
    a run, where joining copies the whole history at every step. Where the join would
    promote a dtype, move a device or fail on shapes, it is done at once, as the plain loop
    does (the same result or the same error).

    Example:
        >>> h = append_step(torch.zeros(1, 3), torch.ones(1, 3))
        >>> type(h).__name__, tuple(h.shape), h[-1].tolist()
        ('LazyHistory', (2, 3), [1.0, 1.0, 1.0])
    """
    if isinstance(state, LazyHistory):
        state.check()
        pieces, length = state._pieces, len(state)
    else:
        pieces, length = [state], None
    if not _compatible(pieces[-1], x):
        return torch.cat((materialise(state), x))
    if length is None:  # the first step: the history owns its initial rows too
        pieces, length = [state.clone()], state.shape[0]
    return LazyHistory.owning([*pieces, x.clone()], length + x.shape[0])


def _version(t: Tensor) -> int:
    """The version counter of ``t``'s storage (under torch.func: of the tensor it wraps)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t._version


_LEFT_BEHIND = (
    "LazyHistory: the model wrote into its history (or through a view of it) after a read "
    "that joined several steps' rows which an earlier view, still held, pointed into; that "
    "view no longer follows the history, so the model would not compute what it computes on "
    "the joined tensor. Set `lazy_history = False` on the model class."
)


class LazyHistory:
    """A history along axis 0 held as a list of stretches (tensors joined along axis 0).

    Arguments:
        pieces: the stretches in time order, each (t_i, ...) with the same trailing shape.
            The history holds these tensors themselves: a write through a read of it writes
            into them (:func:`append_step`, which the time loop uses, hands it copies).

    Aliasing is that of the joined tensor: a read with an int or a step-1 slice on axis 0
    is a view of the history's own rows (a slice spanning several stretches first joins
    them and keeps the join in their place), so a write through it persists, as one through
    a view of the joined tensor does; any other use works on the joined tensor, kept. The
    one thing the joined tensor does that this cannot: a view read before a read that
    joined its rows with others (or before the whole history was joined) points into the
    old stretch; if, while it is still held, the model writes into the history or through
    it, the next read (or the next step) raises ``RuntimeError`` rather than computing
    something else. Views kept from an earlier step (on the model, say) follow the history
    here while the joined tensor of the next step is a new one: do not keep them. A write
    into rows that an earlier step read into its gradient (``x[-2].mul_(...)`` after that
    step used ``x[-1] * theta``) meets autograd's in-place error here, where the joined
    history, copied anew each step, would not: set ``lazy_history = False`` for such a model.

    Costs: ``len`` and ``shape`` are O(1); a read visits the stretches it reads, from the
    end; a run of T steps reading its last rows does O(T) work.

    Example:
        >>> h = LazyHistory([torch.arange(6.0).reshape(3, 2), torch.full((1, 2), 9.0)])
        >>> len(h), h[-1].tolist(), h[1:, 0].tolist()
        (4, [9.0, 9.0], [2.0, 4.0, 9.0])
        >>> (h * 2).sum().item()                  # any other use sees the joined tensor
        66.0
        >>> h[-2:, 0] = 0.0                        # writes persist, as in the joined tensor
        >>> h[:, 0].tolist()
        [0.0, 2.0, 0.0, 0.0]
    """

    def __init__(self, pieces: list[Tensor]):
        if not pieces or not all(isinstance(p, Tensor) and p.ndim >= 1 for p in pieces):
            raise ValueError("`pieces` must be a non-empty list of tensors with a time axis.")
        self._setup(list(pieces), sum(p.shape[0] for p in pieces))

    @classmethod
    def owning(cls, pieces: list[Tensor], length: int) -> LazyHistory:
        """A history of ``pieces`` (checked by the caller) whose rows number ``length``:
        O(1) in the number of pieces, for the time loop."""
        history = cls.__new__(cls)
        history._setup(pieces, length)
        return history

    def _setup(self, pieces: list[Tensor], length: int) -> None:
        self._pieces, self._length = pieces, length
        # views handed out: (the piece, a weak reference to the view)
        self._views: list[tuple[Tensor, weakref.ref]] = []
        # stretches whose rows moved while a view into them was held: (tensor, version)
        self._guards: list[tuple[Tensor, int]] = []

    # --- what is answered without joining -----------------------------------------------

    def __len__(self) -> int:
        return self._length

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._length, *self._pieces[-1].shape[1:]))

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

    def check(self) -> None:
        """Raise ``RuntimeError`` if the model wrote into rows that a view it still held
        no longer follows (see the class)."""
        if any(_version(t) != version for t, version in self._guards):
            raise RuntimeError(_LEFT_BEHIND)

    def _span(self, start: int, stop: int) -> tuple[int, int, int, int]:
        """(first, last, offset, last_offset): the pieces first..last hold rows
        start..stop-1 (a non-empty range), starting at rows ``offset`` and ``last_offset``;
        visits the pieces from the end."""
        end, last, last_offset = self._length, -1, -1
        for i in range(len(self._pieces) - 1, -1, -1):
            begin = end - self._pieces[i].shape[0]
            if last < 0 and begin < stop:
                last, last_offset = i, begin
            if begin <= start:
                return i, last, begin, last_offset
            end = begin
        raise IndexError(f"rows {start}..{stop - 1} outside a history of {self._length}")

    def _held(self, pieces: list[Tensor]) -> bool:
        """Whether a view into any of ``pieces`` is still held (forgets those that are not)."""
        ids = {id(p) for p in pieces}
        self._views = [v for v in self._views if v[1]() is not None]
        return any(id(v[0]) in ids for v in self._views)

    def _replace(self, first: int, last: int, new: list[Tensor]) -> None:
        """Put ``new`` in place of pieces first..last; guard the old ones if a view into
        them is still held (a write through it, or into ``new``, would not be shared)."""
        old = self._pieces[first : last + 1]
        if self._held(old):
            self._guards += [(t, _version(t)) for t in (*old, *new)]
        self._pieces[first : last + 1] = new

    def _join(self, span: tuple[int, int, int, int], start: int, stop: int) -> Tensor:
        """Rows start..stop-1 of the pieces ``span`` (from :meth:`_span`) as one tensor
        kept in their place; the rows around them stay as they were."""
        first, last, offset, last_offset = span
        head, tail = self._pieces[first], self._pieces[last]
        cut_head, cut_tail = start - offset, stop - last_offset
        joined = torch.cat([head[cut_head:], *self._pieces[first + 1 : last], tail[:cut_tail]])
        copy = self._held([head, tail])  # the old stretches leave the history entirely
        around = [(head[:cut_head], cut_head > 0), (tail[cut_tail:], cut_tail < len(tail))]
        kept = [p.clone() if copy else p for p, present in around if present]
        new = [*kept[: int(cut_head > 0)], joined, *kept[int(cut_head > 0) :]]
        self._replace(first, last, new)
        return joined

    def _locate(self, index: Any) -> tuple[Tensor, Any] | None:
        """(a history-owned tensor, the index into it) for an int or a non-empty step-1
        slice on axis 0; None for anything else."""
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) and index else (index, ())
        total = self._length
        if isinstance(first, int) and not isinstance(first, bool) and -total <= first < total:
            start = first + total if first < 0 else first
            stop, local = start + 1, None
        elif isinstance(first, slice):
            start, stop, step = first.indices(total)
            if step != 1 or stop <= start:
                return None
            local = slice
        else:
            return None
        span = self._span(start, stop)
        if span[0] != span[1]:
            base, offset = self._join(span, start, stop), start
        else:
            base, offset = self._pieces[span[0]], span[2]
        row = start - offset if local is None else slice(start - offset, stop - offset)
        return base, (row, *rest)

    def __getitem__(self, index: Any) -> Any:
        self.check()
        found = self._locate(index)
        if found is None:
            return self.full()[index]
        base, local = found
        view = base[local]
        if isinstance(view, Tensor):
            if len(self._views) > 64:  # a long-lived history read many times
                self._views = [v for v in self._views if v[1]() is not None]
            self._views.append((base, weakref.ref(view)))
        return view

    def __setitem__(self, index: Any, value: Any) -> None:
        self.check()
        found = self._locate(index)
        if found is None:
            self.full()[index] = materialise(value)
        else:
            found[0][found[1]] = materialise(value)

    # --- everything else sees the joined tensor --------------------------------------------

    def full(self) -> Tensor:
        """The joined history (computed once, then kept: in-place changes persist)."""
        self.check()
        if len(self._pieces) > 1:
            self._replace(0, len(self._pieces) - 1, [torch.cat(self._pieces)])
        return self._pieces[0]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*materialise(args), **materialise(kwargs or {}))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_pieces", "_length", "_views", "_guards"):
            raise AttributeError(name)
        return getattr(self.full(), name)

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
