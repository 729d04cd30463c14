"""Seconds per VI epoch against BlackBIRDS 1.3, side by side in one run.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/vi.py [--cases rama_cont gaussian_linear]
        [--epochs 4] [--repeats 3] [--gl-epochs 100] [--draws 10 30]

Times are CPU seconds of this process (one thread), so that other load on the machine
slows the cases compared alike; each figure is the median over ``--repeats`` fresh runs,
after one warm-up run, with the cases interleaved.

**rama_cont**: the BlackBIRDS tutorial's set-up: 1000 agents, 100 steps, s = 0.1,
sigmoid_k = 5, MMD loss against data simulated at the tutorial's truth, the tutorial's
normflows affine-coupling flow, w = 0.001, MVN prior, Monte Carlo KL with BlackBIRDS'
default 10,000 draws. For B draws per epoch:

- (i)   gradcal's batched ``RamaCont`` and ``MMDLoss``, pathwise reverse mode;
- (ii)  the tutorial's own single-draw model and loss (examples/blackbirds_rama_cont.py,
        ``trim_time_series`` keeping the whole history), batched by vmap; its history grows
        as a :class:`gradcal.history.LazyHistory`; (ii-eager) the same with
        ``lazy_history = False`` (the history copied at every step, as before); (ii-loop)
        draw by draw; (ii') the model keeping the last step only;
- (iii) as (i) in forward mode;
- floor: one batched simulation of the same B draws without gradients, timed three times
  after every epoch run (interleaved with them, median);
- KL alone: the Monte Carlo KL term by itself (10,000 draws of the flow, the prior's log
  density, one backward pass through the flow), timed like the floor. An epoch does both
  and more, so (floor + KL) / floor bounds its ratio to the floor from below, whatever the
  simulator's gradient costs;
- BlackBIRDS 1.3 on the tutorial's own model and ``SingleOutput_SimulateAndMMD`` loss,
  when ``blackbirds`` is importable (else its figures measured on this machine class,
  1.2 s per epoch at B = 10 and 3.4 s at B = 30, are used).

**gaussian_linear**: a user's own family and loss: theta in R^10, prior N(0, 0.1 I), data
one draw of N(theta, 0.1 I), the exact Gaussian negative log-likelihood written for
batches, a user-written family around a zuko NSF (3 transforms, hidden 64 x 64) whose
``sample(n)`` returns ``rsample_and_log_prob``, Adam 1e-3, w = 1, 64 draws per epoch, 256
for the Monte Carlo KL; gradcal and BlackBIRDS run the same objects.

BlackBIRDS writes checkpoint files into the working directory; it runs in a temporary one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import zuko

from gradcal.infer.vi import VI
from gradcal.losses import MMDLoss
from gradcal.models import RamaCont
from gradcal.regularisation import kl_divergence

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from blackbirds_rama_cont import LogModel, make_flow
from blackbirds_rama_cont import MMDLoss as TutorialMMDLoss

BLACKBIRDS_SECONDS = {10: 1.2, 30: 3.4}  # BlackBIRDS 1.3, one thread, this machine class
TRUTH = torch.log10(torch.tensor([1.0, 0.5, 1.0, 0.7]))
HAS_BLACKBIRDS = importlib.util.find_spec("blackbirds") is not None


@contextlib.contextmanager
def scratch_directory() -> Iterator[None]:
    """Run inside a temporary working directory (BlackBIRDS saves files into it)."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            yield
        finally:
            os.chdir(here)


def cpu_seconds(run: Callable[[], None]) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


def per_epoch(
    makers: dict[str, Callable],
    data,
    epochs: int,
    repeats: int,
    baselines: dict[str, Callable[[], None]] | None = None,
) -> dict[str, float]:
    """Median CPU seconds per epoch of fresh runs of each maker, interleaved; with
    ``baselines``, also the median CPU seconds of each baseline measured in the same
    rounds (three calls after every epoch run), under its name, so that a ratio to it
    compares times taken under the same conditions."""
    for make in makers.values():  # warm-up
        make().run(data, 1, 10**9)
    for baseline in (baselines or {}).values():
        baseline()
    times: dict[str, list[float]] = {name: [] for name in [*makers, *(baselines or {})]}
    for _ in range(repeats):
        for name, make in makers.items():
            vi = make()
            times[name].append(cpu_seconds(lambda vi=vi: vi.run(data, epochs, 10**9)) / epochs)
            for base, baseline in (baselines or {}).items():
                times[base].extend(cpu_seconds(baseline) for _ in range(3))
    return {name: statistics.median(values) for name, values in times.items()}


class _EagerLogModel(LogModel):
    lazy_history = False  # the history copied at every step, as before LazyHistory


def rama_cont(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    builtin = RamaCont(1000, 100, s=0.1, sigmoid_k=5.0, log10_params=True)
    options = {"n_agents": 1000, "n_timesteps": 100, "s": 0.1, "sigmoid_k": 5.0}
    tutorial, eager, trimmed = LogModel(**options), _EagerLogModel(**options), LogModel(**options)
    trimmed.trim_time_series = lambda x: x[-1:]  # all its step reads
    y = builtin.run_and_observe(TRUTH)[0].detach()
    prior = torch.distributions.MultivariateNormal(torch.zeros(4), torch.eye(4))

    def make_vi(loss, b: int, options: dict):
        flow = make_flow(4)
        kwargs = {
            "w": 0.001,
            "gradient_clipping_norm": 1.0,
            "optimizer": torch.optim.AdamW(flow.parameters(), lr=1e-3),
            "n_samples_per_epoch": b,
            "progress_bar": False,
        }
        if loss == "blackbirds":
            from blackbirds.infer.vi import VI as BlackBirdsVI
            from blackbirds.losses import SingleOutput_SimulateAndMMD

            return BlackBirdsVI(SingleOutput_SimulateAndMMD(y, tutorial), prior, flow, **kwargs)
        return VI(loss, prior, flow, seed=0, **kwargs, **options)

    kl_flow = make_flow(4)
    for b in args.draws:
        params = TRUTH.expand(b, -1).clone()

        @torch.no_grad()
        def simulate(p: torch.Tensor = params) -> None:
            builtin.run_and_observe(p)

        def kl_alone() -> None:  # VI's own Monte Carlo KL, through the tutorial's flow
            kl_divergence(kl_flow, prior, "monte_carlo", 10_000).backward()
            kl_flow.zero_grad()

        configs = {
            "(i) built-in batched, reverse": (MMDLoss(builtin, y), {}),
            "(ii) tutorial model, vmap": (TutorialMMDLoss(model=tutorial, y=y), {}),
            "(ii-eager) tutorial, history copied, vmap": (
                TutorialMMDLoss(model=eager, y=y),
                {"batching": "vmap"},
            ),
            "(ii-loop) tutorial model, loop": (
                TutorialMMDLoss(model=tutorial, y=y),
                {"batching": "loop"},
            ),
            "(ii') tutorial model trimmed, vmap": (TutorialMMDLoss(model=trimmed, y=y), {}),
            "(iii) built-in batched, forward": (MMDLoss(builtin, y), {"diff_mode": "forward"}),
        }
        makers = {
            name: functools.partial(make_vi, loss, b, kwargs)
            for name, (loss, kwargs) in configs.items()
        }
        if HAS_BLACKBIRDS:
            makers["BlackBIRDS 1.3, tutorial model"] = functools.partial(
                make_vi, "blackbirds", b, {}
            )
        with scratch_directory():
            rows = per_epoch(
                makers, y, args.epochs, args.repeats, {"floor": simulate, "kl": kl_alone}
            )
        floor, kl = rows.pop("floor"), rows.pop("kl")
        reference = rows.pop("BlackBIRDS 1.3, tutorial model", BLACKBIRDS_SECONDS.get(b))
        source = "measured in this run" if HAS_BLACKBIRDS else "earlier figure"
        print(
            f"\nRama Cont, B = {b}: CPU s per epoch; BlackBIRDS 1.3 {reference:.3f} s ({source})"
        )
        print(f"  {'floor: one batched simulation, no gradient':<45} {floor:8.4f} s")
        print(
            f"  {'KL alone: 10,000 draws of the flow':<45} {kl:8.4f} s   "
            f"(so no reverse epoch is under {(floor + kl) / floor:.1f}x floor)"
        )
        first = rows["(i) built-in batched, reverse"]
        for name, seconds in rows.items():
            print(
                f"  {name:<45} {seconds:8.4f} s   {reference / seconds:6.1f}x faster than "
                f"BlackBIRDS   {seconds / floor:5.1f}x floor   {seconds / first:5.2f}x (i)"
            )


# --- a user's own family and loss -----------------------------------------------------------

DIM = 10


class GaussianNLL:
    """-log N(y; theta, 0.1 I) for theta (D,) or (B, D), written for batches."""

    def __call__(self, theta: torch.Tensor, data) -> torch.Tensor:
        y = data[0] if isinstance(data, list | tuple) else data
        constant = 0.5 * DIM * math.log(2 * math.pi * 0.1)
        return 0.5 * ((y - theta) ** 2).sum(-1) / 0.1 + constant


class UserNSF(torch.nn.Module):
    """A user's family: a zuko NSF whose ``sample(n)`` returns ``rsample_and_log_prob``."""

    def __init__(self, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.flow = zuko.flows.NSF(DIM, transforms=3, hidden_features=(64, 64))

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flow().rsample_and_log_prob((n,))

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        return self.flow().log_prob(theta)


def gaussian_linear(args: argparse.Namespace) -> None:
    prior = torch.distributions.MultivariateNormal(torch.zeros(DIM), 0.1 * torch.eye(DIM))
    torch.manual_seed(0)
    theta = prior.sample()
    y = theta + math.sqrt(0.1) * torch.randn(DIM)

    def make_vi(library: str, batched: bool):
        q = UserNSF()
        loss = GaussianNLL()
        loss.batched = batched  # declared: all draws in one call; else vmap-batched
        kwargs = {
            "w": 1.0,
            "optimizer": torch.optim.Adam(q.parameters(), lr=1e-3),
            "n_samples_per_epoch": 64,
            "n_samples_regularisation": 256,
            "progress_bar": False,
        }
        if library == "blackbirds":
            from blackbirds.infer.vi import VI as BlackBirdsVI

            return BlackBirdsVI(loss, prior, q, **kwargs)
        return VI(loss, prior, q, seed=0, **kwargs)

    makers = {
        "gradcal, loss declared batched": functools.partial(make_vi, "gradcal", True),
        "gradcal, loss batched by vmap": functools.partial(make_vi, "gradcal", False),
    }
    if HAS_BLACKBIRDS:
        makers["BlackBIRDS 1.3"] = functools.partial(make_vi, "blackbirds", False)
    with scratch_directory():
        rows = per_epoch(makers, [y], args.gl_epochs, args.repeats)
    print("\nGaussian-linear, 10 dims, user NSF family, 64 + 256 draws: CPU s per epoch")
    reference = rows.get("BlackBIRDS 1.3")
    for name, seconds in rows.items():
        ratio = f"   {reference / seconds:5.2f}x faster than BlackBIRDS" if reference else ""
        print(f"  {name:<45} {seconds:8.4f} s{ratio}")
    if reference is None:
        print("  (blackbirds is not importable: no side-by-side figure)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["rama_cont", "gaussian_linear"])
    parser.add_argument("--epochs", type=int, default=4, help="Rama Cont epochs per run")
    parser.add_argument("--gl-epochs", type=int, default=100, help="Gaussian-linear epochs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--draws", type=int, nargs="+", default=[10, 30])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average "
        f"{os.getloadavg()[0]:.2f}; blackbirds importable: {HAS_BLACKBIRDS}"
    )
    cases = {"rama_cont": rama_cont, "gaussian_linear": gaussian_linear}
    for case in args.cases:
        cases[case](args)


if __name__ == "__main__":
    main()
