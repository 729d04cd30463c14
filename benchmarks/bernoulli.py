"""The fused straight-through Bernoulli draw against the composite it replaced, side by side.

    OMP_NUM_THREADS=1 python benchmarks/bernoulli.py [--shape 10 100000] [--repeats 20]

``relaxed_bernoulli(probs=p, hard=True)`` (SIR's infection and recovery draws) returns
1[u < p] with the gradient of the binary Concrete sample sigma((logit p + L(u)) / tau).
The composite ``hard + (soft - soft.detach())`` forms the soft sample in the forward pass;
the fused draw forms its slope only in the backward pass. Prints the median seconds of a
forward pass (with and without gradients) and of forward + backward, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from gradcal.relax import relaxed_bernoulli


def composite(probs: torch.Tensor, tau: float) -> torch.Tensor:
    """The straight-through draw written out, as gradcal computed it before."""
    info = torch.finfo(probs.dtype)
    p = probs.clamp(info.tiny, 1.0 - info.eps)
    u = torch.rand_like(probs)
    noisy = torch.log(p) - torch.log1p(-p) + (torch.log1p(-u) - torch.log(u.clamp(min=info.tiny)))
    soft = torch.sigmoid(noisy / tau)
    return (u < probs).to(soft.dtype) + (soft - soft.detach())


def fused(probs: torch.Tensor, tau: float) -> torch.Tensor:
    return relaxed_bernoulli(probs=probs, tau=tau, hard=True)


def seconds(fn, probs: torch.Tensor, grad: bool, backward: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        leaf = probs.clone().requires_grad_(grad)
        start = time.perf_counter()
        with torch.set_grad_enabled(grad):
            x = fn(leaf, 0.1)
            if backward:
                x.sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[10, 100_000])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    probs = torch.rand(*args.shape) * 0.2
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"shape {tuple(probs.shape)}, "
        f"median of {args.repeats}, load average {os.getloadavg()[0]:.2f}"
    )
    for label, grad, backward in (
        ("forward, no gradient", False, False),
        ("forward, gradient on", True, False),
        ("forward + backward", True, True),
    ):
        a = seconds(composite, probs, grad, backward, args.repeats)
        b = seconds(fused, probs, grad, backward, args.repeats)
        print(f"{label:<22} composite {a * 1e3:8.2f} ms   fused {b * 1e3:8.2f} ms   {a / b:5.2f}x")


if __name__ == "__main__":
    main()
