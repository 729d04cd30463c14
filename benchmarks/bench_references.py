"""Regenerate the stored Rama Cont and SIR reference posteriors of ``gradcal bench``.

    python benchmarks/bench_references.py OUT_DIR [--n 8000] [--tasks rama_cont sir]

writes OUT_DIR/<task>/reference.txt (1000 draws) and OUT_DIR/<task>/evidence.json (ESS,
the two halves' agreement, seconds); the package's copies live in
src/gradcal/bench/data/<task>/. Deterministic (fixed seeds) on a given torch build.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from gradcal.bench.tasks import make_task, simulated_reference

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Write the references of the tasks asked for."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=8000, help="prior draws (two halves)")
    parser.add_argument("--size", type=int, default=1000, help="draws stored")
    parser.add_argument("--tasks", nargs="+", default=["rama_cont", "sir"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.tasks:
        start = time.perf_counter()
        draws, evidence = simulated_reference(make_task(name), args.n, args.size, seed=11)
        evidence["seconds"] = round(time.perf_counter() - start, 1)
        evidence["torch"] = torch.__version__
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        np.savetxt(folder / "reference.txt", draws.numpy(), fmt="%.6f")
        (folder / "evidence.json").write_text(json.dumps(evidence, indent=1) + "\n")
        print(name, json.dumps(evidence))


if __name__ == "__main__":
    main()
