"""Worker for tests/test_distributed.py, run by torchrun (or directly for one process).

    python -m torch.distributed.run --standalone --nproc-per-node 2 distributed_worker.py \
        SCENARIO OUT_DIR
"""

import sys
from pathlib import Path

import torch

from gradcal import VI
from gradcal.distributed import exit_process, init_distributed, rank, shard
from gradcal.gradients import BatchedLoss, PathwiseReverse
from gradcal.posterior_estimators import DiagonalGaussian

N_DRAWS, DIM, EPOCHS = 6, 2, 8
TABLE = torch.randn(EPOCHS * 2, N_DRAWS, DIM, generator=torch.Generator().manual_seed(0))


class FixedDraws(DiagonalGaussian):
    """A Gaussian family whose reparameterisation noise comes from a fixed table, so that
    one process and two ranks see exactly the same global draws, epoch by epoch."""

    def __init__(self):
        super().__init__(torch.tensor([0.5, -0.5]), 1.0)
        self.calls = 0

    def sample(self, n):
        start, count = shard(N_DRAWS)
        assert count == n, (count, n)
        eps = TABLE[self.calls, start : start + count]
        self.calls += 1
        theta = self.loc + self.scale * eps
        return theta, self.log_prob(theta)


def loss(theta, y):
    return ((theta - y) ** 2).sum(-1) + torch.sin(3 * theta).sum(-1)


loss.batched = True


def failing(theta, y):
    failing.calls += 1
    if rank() == 1 and failing.calls >= 3:
        raise ValueError("simulator exploded on rank 1")
    return loss(theta, y)


failing.calls = 0
failing.batched = True


class Counting:
    """A loss (default ``loss``), counting its calls on this rank (one per epoch)."""

    batched = True

    def __init__(self, inner=loss):
        self.inner, self.calls = inner, 0
        self.exact = getattr(inner, "exact", False)

    def __call__(self, theta, y):
        self.calls += 1
        return self.inner(theta, y)


SERIES = torch.randn(30, DIM, generator=torch.Generator().manual_seed(2)) + torch.tensor(
    [1.0, -1.0]
)


def series_loss(theta, y):
    """Gaussian negative log-likelihood of the rows of y (T, DIM) about theta (B, DIM)."""
    return 0.5 * ((y[None] - theta[:, None]) ** 2).sum((-2, -1))


series_loss.batched = series_loss.exact = True


def unseeded_calibration():
    """Choosing w from the global stream: each rank's stream would give another w."""
    from gradcal.infer.weight import WeightCalibration

    return WeightCalibration(resample="iid", seed=None)


def prior():
    return torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(DIM), torch.ones(DIM)), 1
    )


def main(scenario: str, out: Path) -> None:
    torch.set_num_threads(1)
    init_distributed(timeout_s=60)
    y = torch.tensor([1.0, -1.0])
    if scenario == "gradient":
        q = FixedDraws()
        estimate = PathwiseReverse()(q, BatchedLoss(loss), y, N_DRAWS)
        from gradcal.distributed import sum_gradients

        sum_gradients(q.parameters())
        torch.save(
            {"grads": [p.grad for p in q.parameters()], "loss": estimate.loss},
            out / f"gradient-{rank()}.pt",
        )
    elif scenario in ("vi", "fail"):
        q = FixedDraws()
        vi = VI(
            failing if scenario == "fail" else loss,
            prior(),
            q,
            n_samples_per_epoch=N_DRAWS,
            progress_bar=False,
            seed=0,
            optimizer=torch.optim.SGD(q.parameters(), lr=0.05),
        )
        vi.run(y, EPOCHS, 100)
        torch.save(
            {"state": q.state_dict(), "history": dict(vi.losses_hist)}, out / f"vi-{rank()}.pt"
        )
    elif scenario.startswith("objective-"):  # objective-NAME, objective-NAME-score
        from gradcal.infer import ForwardKL, ImportanceWeighted, Renyi

        name = scenario.removeprefix("objective-").removesuffix("-score")
        objective = {
            "renyi": lambda: Renyi(0.5, k=3),  # groups of 3: one per rank
            "forward_kl": ForwardKL,
            "iw1": lambda: ImportanceWeighted(k=1),  # score: baselines across ranks
        }[name]()
        method = "score" if scenario.endswith("-score") else "pathwise"
        q = FixedDraws()
        vi = VI(
            loss,
            prior(),
            q,
            n_samples_per_epoch=N_DRAWS,
            progress_bar=False,
            seed=0,
            optimizer=torch.optim.SGD(q.parameters(), lr=0.05),
            objective=objective,
            gradient_estimation_method=method,
        )
        vi.run(y, EPOCHS, 100)
        torch.save(
            {"state": q.state_dict(), "history": dict(vi.losses_hist)},
            out / f"{scenario}-{rank()}.pt",
        )
    elif scenario in ("fail-smd", "fail-mcmc-warmup", "fail-mcmc-sampling"):
        # rank 1's loss raises at its third call: every rank must stop with the error
        from gradcal.infer import MALA, MCMC, SMD

        if scenario == "fail-smd":
            theta = torch.tensor([[0.0, 0.0], [2.0, -2.0], [-1.0, 1.0], [0.5, 0.5]])
            SMD(failing, torch.optim.Adam([theta.requires_grad_()], lr=0.05), seed=0).run(
                y, 30, 100
            )
        else:
            warmup = 20 if scenario == "fail-mcmc-warmup" else 0
            mcmc = MCMC(MALA(prior(), failing), num_samples=20, progress_bar=False)
            mcmc.run(torch.zeros(4, DIM), y, scale=0.05, seed=3, warmup=warmup)
    elif scenario == "shards":  # SMD starts, MCMC chains and IS draws split over ranks
        from gradcal.infer import MALA, MCMC, SMD, importance_sampling

        theta = torch.tensor([[0.0, 0.0], [2.0, -2.0], [-1.0, 1.0], [0.5, 0.5]])
        theta.requires_grad_()
        smd = SMD(loss, torch.optim.Adam([theta], lr=0.05), seed=0)
        estimate, _ = smd.run(y, 30, 100)
        mcmc = MCMC(MALA(prior(), loss), num_samples=40, progress_bar=False)
        mcmc.run(torch.zeros(4, DIM), y, scale=0.05, seed=3)
        samples = importance_sampling(loss, prior(), y, 300, seed=5, min_ess=0)
        one = torch.tensor([0.3, 0.2], requires_grad=True)  # a single start: not sharded
        single_start, single_loss = SMD(loss, torch.optim.Adam([one], lr=0.05), seed=0).run(
            y, 20, 100
        )
        torch.save(
            {
                "single_start": single_start,
                "single_loss": torch.tensor(single_loss),
                "smd": estimate,
                "smd_losses": smd.losses,
                "mcmc": mcmc.samples,
                "is": samples.theta,
                "is_w": samples.log_weights,
            },
            out / f"shards-{rank()}.pt",
        )
    elif scenario.startswith("checkpoint"):  # checkpoint-<epochs>-<resume>
        # w = "calibrate", unseeded, with each rank's global stream seeded apart (and the
        # resumed processes' otherwise again): every rank must run at rank 0's choice, and a
        # resumed run at the checkpoint's.
        _, epochs, resume = scenario.split("-")
        # A resumed run starts q elsewhere: only a real resume continues the checkpoint.
        start = [3.0, 3.0] if resume == "resume" else [0.5, -0.5]
        q = DiagonalGaussian(torch.tensor(start), 1.0)
        counting = Counting(series_loss)
        vi = VI(
            counting,
            prior(),
            q,
            w=unseeded_calibration(),
            n_samples_per_epoch=N_DRAWS,
            progress_bar=False,
            seed=1,
            checkpoint_dir=out / "checkpoints",
            resume=resume == "resume",
        )
        torch.manual_seed((200 if resume == "resume" else 100) + rank())
        vi.run(SERIES, int(epochs), 100)
        torch.save(
            {
                "epochs": len(vi.losses_hist["total"]),
                "calls": counting.calls,  # epochs run here, plus the choice of w if made here
                "w": vi.w,
                "state": q.state_dict(),
                "history": dict(vi.losses_hist),
            },
            out / f"checkpoint-{rank()}.pt",
        )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    exit_process(0)
