"""Worker for tests/compat/test_mpi_setup.py: a BlackBIRDS-style script under torchrun.

python -m torch.distributed.run --standalone --nproc-per-node 2 mpi_worker.py OUT_DIR
"""

import sys
from pathlib import Path

import torch

from gradcal.distributed import exit_process
from gradcal.infer.vi import compute_and_differentiate_loss, compute_loss_and_jacobian_pathwise
from gradcal.mpi_setup import mpi_comm, mpi_rank, mpi_size  # joins the launcher's group
from gradcal.posterior_estimators import TrainableGaussian


def loss(theta, y):
    return ((theta - y) ** 2).sum() + theta.sin().sum()


def main(out: Path) -> None:
    torch.manual_seed(0)  # rank 0 draws; the other ranks' streams do not matter
    q = TrainableGaussian([0.5, -0.5], 0.3)
    y = torch.tensor([0.2, 0.1])
    theta, value, jacobians = compute_loss_and_jacobian_pathwise(loss, q, 5, y)
    differentiated = compute_and_differentiate_loss(loss, q, 5, y)
    result = {
        "rank": mpi_rank,
        "size": mpi_size,
        "has_comm": mpi_comm is not None,
        "bcast": mpi_comm.bcast(100 + mpi_rank, root=0) if mpi_comm else 100,
        "gather": mpi_comm.gather(mpi_rank, root=0) if mpi_comm else [0],
        "theta": theta.detach() if isinstance(theta, torch.Tensor) else theta,
        "loss": value,
        "jacobians": jacobians,
        "differentiated": differentiated,
        "grad": q.mu.grad,
    }
    torch.save(result, out / f"mpi-{mpi_rank}.pt")
    exit_process(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
