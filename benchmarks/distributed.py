"""VI epoch time on 1 versus 2 processes (torchrun, gloo, one thread each).

    OMP_NUM_THREADS=1 python benchmarks/distributed.py [--epochs 6] [--nodes 10000]

SIR on a 10,000-node Watts-Strogatz graph (k = 10, p = 0.1), 100 steps, 20 draws per epoch,
MMD loss, diagonal Gaussian family: the data-parallel engine splits the 20 draws over the
ranks and sums the gradients. Prints seconds per epoch, the speed-up and the parallel
efficiency; the load average before the run says how busy the machine was.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

WORKER = """
import sys, time, torch, networkx
from gradcal import VI
from gradcal.distributed import exit_process, init_distributed, is_main
from gradcal.losses import MMDLoss
from gradcal.models import SIR
from gradcal.posterior_estimators import DiagonalGaussian
torch.set_num_threads(1)
init_distributed()
nodes, epochs = int(sys.argv[1]), int(sys.argv[2])
model = SIR(networkx.watts_strogatz_graph(nodes, 10, 0.1, seed=0), 100)
truth = torch.tensor([-2.0, -0.6, -1.0])
torch.manual_seed(0)
y = [o.detach() for o in model.run_and_observe(truth)]
prior = torch.distributions.Independent(
    torch.distributions.Normal(truth, 0.3 * torch.ones(3)), 1)
q = DiagonalGaussian(truth, 0.1)
vi = VI(MMDLoss(model, y), prior, q, n_samples_per_epoch=20, progress_bar=False, seed=0)
vi.run(y, 1, 100)                      # warm-up epoch
start = time.perf_counter()
vi.run(y, epochs, 100)
if is_main():
    print((time.perf_counter() - start) / epochs, flush=True)
exit_process(0)
"""


def seconds(nproc: int, nodes: int, epochs: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(folder, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        prefix = [sys.executable]
        if nproc > 1:
            prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        result = subprocess.run(
            [*prefix, script, str(nodes), str(epochs)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--nodes", type=int, default=10_000)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, load average {load:.2f} "
        f"before the run; SIR {args.nodes} nodes, 100 steps, 20 draws per epoch"
    )
    one = seconds(1, args.nodes, args.epochs)
    two = seconds(2, args.nodes, args.epochs)
    print(f"1 process : {one:.3f} s per epoch")
    print(f"2 processes: {two:.3f} s per epoch")
    print(f"speed-up {one / two:.2f}x, parallel efficiency {one / two / 2:.0%}")


if __name__ == "__main__":
    main()
