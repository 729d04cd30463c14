"""torch.distributed glue: start from the launcher's environment, shard draws, reduce.

Data parallel, as DDP: every rank holds the same family, draws its share of the draws from
its own stream, and gradients and loss figures are summed over ranks. In a single process
every function here is a no-op, so the engines call them unconditionally.

Launch with ``torchrun --standalone --nproc-per-node N script.py`` (one node),
``torchrun --nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...`` (several), or
``srun`` / ``mpirun``: SLURM's and Open MPI's variables are read when torchrun's are absent.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Context",
    "all_gather_objects",
    "all_reduce_sum",
    "backend_devices",
    "broadcast_module",
    "broadcast_object",
    "choose_backend",
    "exit_process",
    "init_distributed",
    "is_main",
    "launched_without_process_group",
    "rank",
    "reduce_epoch",
    "shard",
    "shutdown",
    "sum_gradients",
    "world_size",
]

logger = logging.getLogger("gradcal")


@dataclass(frozen=True)
class Context:
    """Where this process sits: its rank, the number of ranks, its rank on the node."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as ``node[03-05,07],gpu1``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if match is None:
        return nodelist
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _launcher_environment() -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK (and MASTER_*) from torchrun, SLURM or Open MPI."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return {}
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        found = {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        }
        if "MASTER_ADDR" not in env:
            found["MASTER_ADDR"] = _first_host(env.get("SLURM_JOB_NODELIST", "localhost"))
    elif "OMPI_COMM_WORLD_RANK" in env:
        found = {
            "RANK": env["OMPI_COMM_WORLD_RANK"],
            "WORLD_SIZE": env["OMPI_COMM_WORLD_SIZE"],
            "LOCAL_RANK": env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
        }
    else:
        return {}
    found.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", "localhost"))
    found["MASTER_PORT"] = env.get("MASTER_PORT", "29500")
    return found


def init_distributed(backend: str | None = None, timeout_s: float = 120.0) -> Context:
    """Join the process group the launcher set up; a no-op for a single process.

    Arguments:
        backend: a torch.distributed backend string; default (and for ``"nccl"``)
            ``"cpu:gloo,cuda:nccl"`` when CUDA is available, else ``"gloo"``. gradcal
            reduces some small CPU tensors (loss totals, acceptance rates), which NCCL alone
            cannot carry; see :func:`choose_backend`.
        timeout_s: how long a collective waits for a rank that has gone silent before
            every rank fails (so nothing hangs for ever).

    Returns:
        This process's :class:`Context`. With CUDA, each process uses the device of its
        local rank.
    """
    if dist.is_available() and dist.is_initialized():
        return Context(
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", 0)),
            dist.get_backend(),
        )
    os.environ.update(_launcher_environment())
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size <= 1:
        return Context(0, 1, 0, None)
    local = int(os.environ.get("LOCAL_RANK", 0))
    backend = choose_backend(backend, torch.cuda.is_available())
    if "nccl" in backend:  # NCCL needs each rank on its own GPU
        torch.cuda.set_device(local)
    dist.init_process_group(
        backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s)
    )
    logger.info("rank %d of %d (%s)", dist.get_rank(), size, backend)
    return Context(dist.get_rank(), size, local, backend)


def choose_backend(backend: str | None, cuda: bool) -> str:
    """The process-group backend string: one backend for every device gradcal reduces on.

    Collectives run on CPU tensors (loss totals, acceptance rates, RNG states) and, with a
    family on a GPU, on CUDA tensors (gradients). NCCL serves CUDA tensors only, so with
    CUDA the default, and what ``"nccl"`` becomes, is ``"cpu:gloo,cuda:nccl"``.

    Example:
        >>> choose_backend(None, cuda=True), choose_backend(None, cuda=False)
        ('cpu:gloo,cuda:nccl', 'gloo')
    """
    if backend is None:
        return "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if backend == "nccl":
        logger.info("backend 'nccl' serves CUDA tensors only: using 'cpu:gloo,cuda:nccl'.")
        return "cpu:gloo,cuda:nccl"
    return backend


def backend_devices(backend: str) -> set[str]:
    """The device types a backend string serves, e.g. {"cpu", "cuda"}.

    Example:
        >>> sorted(backend_devices("cpu:gloo,cuda:nccl")), sorted(backend_devices("nccl"))
        (['cpu', 'cuda'], ['cuda'])
    """
    if ":" in backend:
        return {part.split(":")[0].strip() for part in backend.split(",")}
    return {"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}, "mpi": {"cpu", "cuda"}}.get(
        backend, {"cpu", "cuda"}
    )


def launched_without_process_group() -> str | None:
    """Why this process must not run alone, or None: a launcher started several processes
    (torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` with ``WORLD_SIZE > 1``, or Open
    MPI's ``OMPI_COMM_WORLD_SIZE > 1``) but no process group is initialised, so each process
    would run its own full calibration.

    SLURM's variables alone are not taken as a launch: a batch script's single process sees
    them too.
    """
    if dist.is_available() and dist.is_initialized():
        return None
    env = os.environ
    if all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        size, where = env["WORLD_SIZE"], f"RANK={env['RANK']}, WORLD_SIZE={env['WORLD_SIZE']}"
    elif "OMPI_COMM_WORLD_SIZE" in env:
        size = env["OMPI_COMM_WORLD_SIZE"]
        where = f"OMPI_COMM_WORLD_RANK={env.get('OMPI_COMM_WORLD_RANK')}, size {size}"
    else:
        return None
    if not size.isdigit() or int(size) <= 1:
        return None
    return (
        f"this process is one of {size} started by a launcher ({where}) but torch.distributed "
        "is not initialised: call gradcal.distributed.init_distributed() at the start of "
        f"your script, or each of the {size} processes runs its own full calibration"
    )


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0, the rank that writes files and shows progress."""
    return rank() == 0


def shard(n: int, of: int | None = None, at: int | None = None) -> tuple[int, int]:
    """This rank's share of n items as (start, count); the first n mod world get one more.

    Example:
        >>> [shard(10, of=3, at=r) for r in range(3)]
        [(0, 4), (4, 3), (7, 3)]
    """
    of = world_size() if of is None else of
    at = rank() if at is None else at
    base, extra = divmod(n, of)
    start = at * base + min(at, extra)
    return start, base + (1 if at < extra else 0)


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over ranks (``t`` itself in a single process); not in place."""
    if not _active():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def reduce_epoch(values: Tensor, error: BaseException | None = None) -> Tensor:
    """The sum of ``values`` over ranks, once every rank has said whether its share failed.

    The rank-failure protocol of every epoch (VI, SMD) and MCMC step: a rank that caught
    ``error`` still joins this one collective (with ``values`` of the agreed shape, e.g.
    zeros), then every rank raises here, the failing one its own error and the others a
    ``RuntimeError``, so no rank waits for the others in a later collective until the
    collective's timeout. In one process: ``values``, or the error raised.

    Arguments:
        values: (...) this rank's share; summed in float64, returned in its own dtype.
        error: what this rank caught, or None.

    Example:
        >>> reduce_epoch(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    flag = torch.full((1,), float(error is not None), dtype=torch.float64, device=values.device)
    packed = all_reduce_sum(torch.cat((values.detach().reshape(-1).double(), flag)))
    if error is not None:
        raise error
    if packed[-1] > 0:
        raise RuntimeError("another rank failed during this epoch (its error is in its log).")
    return packed[:-1].reshape(values.shape).to(values.dtype)


def sum_gradients(parameters: Any) -> None:
    """Replace each parameter's ``.grad`` by its sum over ranks (missing grads count 0)."""
    if not _active():
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers."""
    if not _active():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a picklable object; ``obj`` itself in a single
    process). Every rank must call it; the others' ``obj`` is ignored (pass None).

    Put tensors on the CPU first: a pickled CUDA tensor comes back on rank ``src``'s device.
    """
    if not _active():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Leave the process group together: wait for every rank, then tear it down.

    A rank that tears down (or exits) while another still talks to it can abort in gloo's
    threads; the barrier lets the slowest rank finish first.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """End a rank's process at once, after :func:`shutdown` and flushing its output.

    gloo's threads can abort a process in interpreter teardown ("terminate called without
    an active exception") even after a clean shutdown; skipping the teardown avoids a
    spurious failure that torchrun would report for the whole job.
    """
    import sys

    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
