"""Calibrate Rama Cont with a million agents on one CPU, memory bounded by checkpointing.

    OMP_NUM_THREADS=1 python examples/million_agents.py [--agents 1000000] [--steps 100]
        [--draws 10] [--epochs 30] [--mode checkpointed] [--checkpoint-every 10]
        [--device cpu] [--seed 0] [--default-malloc]

Rama Cont (Cont 2005) with ``--agents`` threshold traders, ``--steps`` steps, s = 0.1 and
sigmoid_k = 5; data: one simulation at the truth log10 (1, 0.5, 1, 0.7). Generalised VI
with a neural spline flow started away from the truth, MMD loss on the returns, w = 0.001,
``--draws`` draws per epoch simulated in one batch, Adam at 1e-2. The gradient mode:

- ``checkpointed`` (default): reverse mode storing the state every ``--checkpoint-every``
  steps and recomputing each stretch in the backward pass with the same random numbers:
  the plain gradient, memory like T / k + k states instead of T;
- ``forward``: forward mode, one tangent per parameter (4): memory flat in T;
- ``plain``: reverse mode keeping the whole graph (9.0 GiB above the process's own memory
  for one epoch at 10^6 agents, 10 draws and 100 steps, measured by ``benchmarks/scale.py``).

On Linux the script first asks glibc to reuse freed memory (``mallopt``: no block mapped on
its own, no trimming of the heap) unless ``--default-malloc``: by default glibc maps every
block over 32 MiB afresh and unmaps it when freed, and at a million agents every
(draws, agents) tensor (40 MB) is such a block, so the kernel zeroes fresh pages for each;
that made an epoch about 4 times slower (``benchmarks/scale.py`` measures it).

Each epoch prints its seconds (wall clock, and CPU time of the process, which a busy
machine does not inflate), the peak memory so far, the loss and the distance of q's mean to
the truth; at the end, the means. Peak memory is the peak resident set of the process
(on CUDA, the peak of ``torch.cuda.max_memory_allocated``). Nothing is written.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import resource
import time

import torch

from gradcal.infer.vi import VI
from gradcal.losses import MMDLoss
from gradcal.models import RamaCont
from gradcal.posterior_estimators import Flow

TRUTH = [0.0, math.log10(0.5), 0.0, math.log10(0.7)]  # log10 (gamma_0, gamma_1, sigma, eta)
START = [0.3, 0.0, 0.3, 0.1]  # where q starts: 0.58 away from the truth


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--mode", choices=("checkpointed", "forward", "plain"), default="checkpointed"
    )
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--default-malloc", action="store_true")
    args = parser.parse_args()
    for name in ("agents", "steps", "draws", "epochs", "checkpoint_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; False where the C library is not glibc.

    ``mallopt(M_MMAP_MAX, 0)``: no block is mapped from the kernel on its own (by default
    every block over 32 MiB is, and unmapped when freed); ``mallopt(M_TRIM_THRESHOLD, 512 MiB)``:
    the top of the heap is not given back unless more than 512 MiB of it is free (at 30 steps
    this peaked 11 % lower than 2 GiB, at the same speed).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 512 * 2**20))


def peak_memory_gib(device: torch.device) -> float:
    """Peak resident memory of this process (CPU) or peak CUDA memory allocated, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    args = parse_args()
    reused = not args.default_malloc and reuse_freed_memory()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = RamaCont(args.agents, args.steps, s=0.1, sigmoid_k=5.0, log10_params=True)
    truth = torch.tensor(TRUTH, device=device)
    with torch.no_grad():
        (y,) = model.run_and_observe(truth)
    loss = MMDLoss(
        model, y, checkpoint_every=args.checkpoint_every if args.mode == "checkpointed" else None
    )
    prior = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(4, device=device), torch.ones(4, device=device)),
        1,
    )
    start = torch.tensor(START, device=device)
    family = Flow(4, loc=start, scale=0.1, transforms=2, hidden_features=(32, 32))
    vi = VI(
        loss,
        prior,
        family,
        w=0.001,
        optimizer=torch.optim.Adam(family.parameters(), lr=1e-2),
        n_samples_per_epoch=args.draws,
        n_samples_regularisation=1000,
        diff_mode="forward" if args.mode == "forward" else "reverse",
        progress_bar=False,
        device=device,
        seed=args.seed,
    )
    print(
        f"Rama Cont, {args.agents:,} agents, {args.steps} steps, {args.draws} draws per "
        f"epoch, {args.mode} mode on {device}, freed memory reused: {reused}; q starts "
        f"{float((start - truth).norm()):.3f} from the truth"
    )
    seconds, cpu_seconds = [], []
    for epoch in range(1, args.epochs + 1):
        begin, cpu_begin = time.perf_counter(), time.process_time()
        _, loss_value, _, _ = vi.step(y)
        vi.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - begin)
        cpu_seconds.append(time.process_time() - cpu_begin)
        with torch.no_grad():
            mean = family.sample(1000)[0].mean(0)
        print(
            f"epoch {epoch:3d}  {seconds[-1]:7.1f} s ({cpu_seconds[-1]:6.1f} s CPU)  "
            f"peak {peak_memory_gib(device):5.2f} GiB  loss {loss_value:9.5f}  "
            f"|mean - truth| {float((mean - truth).norm()):.3f}  "
            f"mean {[round(v, 3) for v in mean.tolist()]}",
            flush=True,
        )
    print(
        f"mean {sum(seconds) / len(seconds):.1f} s per epoch "
        f"({sum(cpu_seconds) / len(cpu_seconds):.1f} s CPU); peak memory "
        f"{peak_memory_gib(device):.2f} GiB; truth {[round(v, 3) for v in TRUTH]}"
    )


if __name__ == "__main__":
    main()
