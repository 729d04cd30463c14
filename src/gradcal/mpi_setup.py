"""BlackBIRDS' ``mpi_setup``: this process's rank, the number of ranks and a communicator.

BlackBIRDS reads these from mpi4py at import (rank 0, size 1 and no communicator without
it). gradcal runs several processes with torch.distributed instead, so importing this
module joins the process group the launcher set up, as importing mpi4py joins MPI's:
``torchrun``, ``srun`` and ``mpirun`` (Open MPI) all work, through
:func:`gradcal.distributed.init_distributed`. Then

- ``mpi_rank``, ``mpi_size``: this process's rank and the number of ranks;
- ``mpi_comm``: a :class:`Communicator` with the mpi4py calls BlackBIRDS scripts use
  (``Get_rank``, ``Get_size``, ``bcast``, ``gather``, ``allgather``, ``Barrier``), carried
  by torch.distributed's object collectives; None in a single process, as in BlackBIRDS
  without mpi4py.

In a single process (no launcher variables) importing it does nothing else. The group is
left, with a barrier, when the interpreter exits. gradcal's VI, SMD and MCMC share their
draws over the ranks by themselves; nothing here is needed to use them.
"""

from __future__ import annotations

import atexit
from typing import Any

import torch.distributed as dist

from gradcal.distributed import all_gather_objects, init_distributed, shutdown

__all__ = ["Communicator", "mpi_comm", "mpi_rank", "mpi_size"]


class Communicator:
    """The part of mpi4py's ``COMM_WORLD`` that BlackBIRDS scripts use, on torch.distributed.

    Every call is a collective: every rank must make it, in the same order.

    Example:
        >>> Communicator().Get_size()  # a single process
        1
    """

    def Get_rank(self) -> int:  # mpi4py's name
        """This process's rank."""
        return dist.get_rank() if dist.is_initialized() else 0

    def Get_size(self) -> int:  # mpi4py's name
        """The number of ranks."""
        return dist.get_world_size() if dist.is_initialized() else 1

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """``root``'s ``obj`` on every rank (a picklable object)."""
        if not dist.is_initialized():
            return obj
        box = [obj if self.Get_rank() == root else None]
        dist.broadcast_object_list(box, src=root)
        return box[0]

    def allgather(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        return all_gather_objects(obj)

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        """Every rank's ``obj`` in rank order at ``root``; None on the other ranks."""
        everything = self.allgather(obj)
        return everything if self.Get_rank() == root else None

    def Barrier(self) -> None:  # mpi4py's name
        """Wait for every rank."""
        if dist.is_initialized():
            dist.barrier()

    barrier = Barrier


_started_here = not (dist.is_available() and dist.is_initialized())
_context = init_distributed()
mpi_rank: int = _context.rank
mpi_size: int = _context.world_size
mpi_comm: Communicator | None = Communicator() if mpi_size > 1 else None
if mpi_size > 1 and _started_here:
    atexit.register(shutdown)
