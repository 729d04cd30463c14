"""The ``gradcal`` command: demo, run, check, report, models, bench."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradcal.config import (
    BUILTIN_MODELS,
    ConfigError,
    check,
    checked,
    loads_toml,
    read_toml,
)

__all__ = ["PARALLEL_WORK", "choose_threads", "main", "set_threads", "step_work"]

logger = logging.getLogger("gradcal")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130
_PROGRESS = [True]  # progress bars; off with -q

DEMO_CONFIG = """
[run]
name = "Rama Cont demo: volatility clustering, calibrated by VI with a flow"
seed = 0

[model]
name = "RamaCont"
options = { n_agents = 1000, n_timesteps = 100, s = 0.1, sigmoid_k = 5.0, log10_params = true }

[data]
simulate = true        # synthetic data at the BlackBIRDS tutorial's true parameters
columns = ["returns"]  # names the model's output

[loss]
kind = "mmd"

[method]
kind = "vi"
family = "nsf"
w = 0.01               # about 1 / (number of observed returns): MMD-Bayes' usual weight
samples_per_epoch = 20
epochs = 400
patience = 400
learning_rate = 0.01
gradient_clipping_norm = 1.0
n_samples_regularisation = 100
posterior_samples = 4000  # also the draws behind k-hat: fewer make it noisy

# gamma_0 and gamma_1 set the agents' first thresholds, which each agent replaces with
# probability s = 0.1 per step: after 100 steps the returns carry no information on them
# (calibrated, they stay at their prior), so they are held at their true values
[[parameters]]
name = "log10_gamma_0"
value = 0.0

[[parameters]]
name = "log10_gamma_1"
value = -0.30103

[[parameters]]
name = "log10_sigma"
prior = { kind = "normal", loc = 0.0, scale = 1.0 }
truth = 0.0

[[parameters]]
name = "log10_eta"
prior = { kind = "normal", loc = 0.0, scale = 1.0 }
truth = -0.154902
"""

EXAMPLES = {
    "demo": "gradcal demo\n  gradcal demo --out my-demo",
    "run": "gradcal run examples/sp500/config.toml\n  gradcal run config.toml --out runs/a "
    "--seed 3\n  gradcal run config.toml --out runs/a --resume\n  "
    "gradcal run config.toml --out runs/a --overwrite\n  "
    "gradcal run config.toml --nproc 2",
    "check": "gradcal check config.toml",
    "report": "gradcal report runs/a",
    "models": "gradcal models",
    "bench": "gradcal bench --quick --out bench-quick\n  "
    "gradcal bench --out bench --seeds 2 --budgets 1000 4000\n  "
    "gradcal bench --out bench --resume\n  "
    "gradcal bench --merge part-a part-b --out bench",
}


#: Elements of one time step's state (draws simulated together x agents or graph nodes)
#: from which torch's intra-op threads are used. Torch splits an elementwise op across
#: threads only above 32,768 elements, and every split is a fork and join of the thread pool.
#: The demo (20 draws x 1000 agents) is below that: profiled with two threads on two cores,
#: its epoch spent 2.1 s of CPU against 0.2 s with one (log1p and floor of the agents'
#: random masks, the flow's and the MMD's matrix products and softmax waiting on the
#: join), so small steps run on one thread. At a million elements an elementwise op is
#: about a millisecond of work per thread, far above the cost of a join.
PARALLEL_WORK = 1_000_000


def step_work(config: Mapping[str, Any]) -> int:
    """Draws simulated together times the agents (or graph nodes) of the model: the number
    of elements of one time step's state, the work torch could split across threads.

    Example:
        >>> step_work({"model": {"options": {"n_agents": 1000}},
        ...            "method": {"kind": "vi", "samples_per_epoch": 20}})
        20000
    """
    method = config.get("method", {})
    draws = {
        "vi": method.get("samples_per_epoch", 10),
        "smd": method.get("starts", 8),
        "mcmc": method.get("chains", 8),
    }.get(method.get("kind", "vi"), 1)
    options = config.get("model", {}).get("options", {})
    graph = options.get("graph")
    size = options.get("n_agents") or (graph.get("n") if isinstance(graph, Mapping) else None)
    return int(draws) * int(size or 1)


def _positive(value: str, name: str) -> int:
    """``value`` as a positive int, else a one-line :class:`ConfigError` naming ``name``."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError([f"{name}: expected a positive integer (threads), got {value!r}"])
    return number


def choose_threads(
    option: str | None, environ: Mapping[str, str], work: int, cores: int
) -> tuple[int, str]:
    """The number of torch threads for a command, and why.

    ``--threads`` first, then ``OMP_NUM_THREADS``, else one thread when one step's work is
    below :data:`PARALLEL_WORK` elements and ``cores`` otherwise.

    Arguments:
        option: the ``--threads`` value as typed, or None.
        environ: the environment (``os.environ``).
        work: :func:`step_work` of the run (0 when unknown: one thread).
        cores: torch's default number of threads.

    Example:
        >>> choose_threads(None, {}, 20_000, 2)
        (1, 'one step is 20000 elements, below 1000000: one thread is faster')
        >>> choose_threads("2", {"OMP_NUM_THREADS": "1"}, 20_000, 2)
        (2, '--threads 2')
    """
    if option is not None:
        threads = _positive(option, "--threads")
        return threads, f"--threads {threads}"
    if environ.get("OMP_NUM_THREADS", "").strip():
        threads = _positive(environ["OMP_NUM_THREADS"], "OMP_NUM_THREADS")
        return threads, f"OMP_NUM_THREADS={threads}"
    if work < PARALLEL_WORK:
        return 1, f"one step is {work} elements, below {PARALLEL_WORK}: one thread is faster"
    threads = max(1, cores)
    return threads, f"one step is {work} elements: {threads} threads, one per core"


def set_threads(args: argparse.Namespace, work: int) -> int:
    """Choose the torch threads for this command (:func:`choose_threads`), set them, log it."""
    import torch

    threads, why = choose_threads(
        getattr(args, "threads", None), os.environ, work, torch.get_num_threads()
    )
    torch.set_num_threads(threads)
    logger.info("torch threads: %d (%s; --threads N or OMP_NUM_THREADS to choose)", threads, why)
    return threads


def _configured(raw: dict[str, Any], base: Path, seed: int | None, device: str | None) -> dict:
    return checked(raw, base, seed, device)


def _prepare(config: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    """Rank 0 readies the run folder (refusing to lose a run); every rank gets its verdict."""
    from gradcal.distributed import all_gather_objects, is_main
    from gradcal.runs import prepare_run_dir

    problems = None
    if is_main():
        try:
            prepare_run_dir(
                out,
                resume=args.resume,
                overwrite=args.overwrite,
                method=config["method"]["kind"],
                config_file=getattr(args, "config", None),
            )
        except ConfigError as error:
            problems = error.problems
    problems = all_gather_objects(problems)[0]  # also: other ranks wait for rank 0
    if problems:
        raise ConfigError(problems)


def _interrupted(config: dict[str, Any], out: Path, during: str, command: str) -> str:
    """What to tell the user after Ctrl-C: where the state is and the command to go on."""
    if config["method"]["kind"] != "vi":  # SMD and MCMC keep no checkpoint
        return f"\ninterrupted: start again with:\n  {command} --overwrite"
    if during == "outputs":
        return (
            f"\ninterrupted while writing the outputs (they may be incomplete); the "
            f"calibration is saved in {out / 'checkpoints'}. Write them again with:\n"
            f"  {command} --resume"
        )
    return f"\ninterrupted: the last state is saved in {out}. Continue with:\n  {command} --resume"


def _run_here(
    config: dict[str, Any], out: Path, base: Path, args: argparse.Namespace, command: str
) -> int:
    import torch

    from gradcal.distributed import init_distributed, shutdown
    from gradcal.runs import RunInterrupted, run_calibration

    context = init_distributed()
    main_rank = context.rank == 0
    try:
        _prepare(config, out, args)
    except ConfigError:
        shutdown()
        raise
    device = config["run"]["device"]
    if device == "cuda" and context.world_size > 1:
        device = f"cuda:{context.local_rank}"  # one device per local rank
    torch.set_default_device(device)
    try:
        report = run_calibration(config, out, base, resume=args.resume, progress=_PROGRESS[0])
    except RunInterrupted as interrupted:
        shutdown()
        if not main_rank:
            return EXIT_INTERRUPTED
        from gradcal.report import write_report

        if (out / "config.toml").exists():
            write_report(out)
        print(_interrupted(config, out, interrupted.during, command), file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        shutdown()
    if main_rank:
        print(f"report: {report}")
    return EXIT_OK


def _execute(
    config: dict[str, Any], out: Path, base: Path, args: argparse.Namespace, command: str
) -> int:
    """Run the calibration; a rank under torchrun ends its process right after (see
    :func:`gradcal.distributed.exit_process`)."""

    code = _run_here(config, out, base, args, command)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        from gradcal.distributed import exit_process

        exit_process(code)
    return code


def _launch(nproc: int, argv: list[str]) -> int:
    """Run this command again under torchrun with ``nproc`` local processes."""
    import subprocess

    forwarded, skip = [], False
    for arg in argv:  # the same arguments without --nproc
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            forwarded.append(arg)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "gradcal.cli",
        *forwarded,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(command, env=env)


def _cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    config = _configured(loads_toml(DEMO_CONFIG), Path.cwd(), args.seed, None)
    set_threads(args, step_work(config))
    return _execute(config, out, Path.cwd(), args, f"gradcal demo --out {shlex.quote(str(out))}")


def _cmd_run(args: argparse.Namespace) -> int:

    path = Path(args.config)
    base = path.parent
    config = _configured(read_toml(args.config), base, args.seed, args.device)
    out = Path(args.out) if args.out else Path("runs") / path.stem
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        # refuse a bad configuration or run folder here, once, before starting processes
        from gradcal.runs import prepare_run_dir

        prepare_run_dir(
            out,
            resume=args.resume,
            overwrite=args.overwrite,
            method=config["method"]["kind"],
            config_file=args.config,
        )
        return _launch(args.nproc, sys.argv[1:])
    set_threads(args, step_work(config))
    command = f"gradcal run {shlex.quote(args.config)} --out {shlex.quote(str(out))}"
    if args.seed is not None:
        command += f" --seed {args.seed}"
    return _execute(config, out, base, args, command)


def _cmd_check(args: argparse.Namespace) -> int:
    path = Path(args.config)
    problems = check(read_toml(args.config), path.parent)
    if problems:
        raise ConfigError(problems)
    print(f"{args.config}: ok")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from gradcal.report import write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError([f"{args.run_dir}: no such run folder"])
    print(f"report: {write_report(run_dir)}")
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    for name, info in BUILTIN_MODELS.items():
        print(f"{name:<12} {info.summary}")
        print(f"{'':<12} parameters: {', '.join(info.parameters)}")
        options = ", ".join(f"{k} = {v!r}" for k, v in info.options.items())
        print(f"{'':<12} options (defaults): {options}\n")
    return EXIT_OK


def _split(values: list[str] | None) -> list[str] | None:
    """Names given as ``a b`` or ``a,b``."""
    if values is None:
        return None
    return [name for value in values for name in value.split(",") if name]


def _cmd_bench(args: argparse.Namespace) -> int:
    from gradcal.bench import run_bench
    from gradcal.bench.merge import merge_bench

    set_threads(args, 0)  # small tasks, one after another: one thread
    try:
        if args.merge:
            given = [
                name
                for name in ("quick", "tasks", "methods", "seeds", "budgets", "resume")
                if getattr(args, name) not in (None, False)
            ]
            if given:
                raise ValueError(
                    f"--merge takes only --out and --overwrite, got --{', --'.join(given)}."
                )
            page = merge_bench(args.out, args.merge, overwrite=args.overwrite)
            print(f"benchmark: {page}")
            return EXIT_OK
        page = run_bench(
            args.out,
            "quick" if args.quick else "full",
            tasks=_split(args.tasks),
            methods=_split(args.methods),
            seeds=args.seeds,
            budgets=args.budgets,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    except ValueError as error:  # a bad option or an occupied folder: a user error
        raise ConfigError([str(error)]) from error
    print(f"benchmark: {page}")
    return EXIT_OK


def _threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        metavar="N",
        help="torch threads per process (default: OMP_NUM_THREADS, else one for small steps, "
        "one per core from a million agent-draws a step)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradcal",
        description="Calibrate differentiable simulators: generalised VI, SMD and MCMC.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="examples:\n  " + EXAMPLES[name],
        )

    demo = command(
        "demo",
        "Calibrate Rama Cont on synthetic data with VI and a flow; write a "
        "run folder with a report.",
    )
    demo.add_argument("--out", default="gradcal-demo", help="run folder (default gradcal-demo)")
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    demo.add_argument(
        "--overwrite", action="store_true", help="replace an earlier demo in the folder"
    )
    _threads_option(demo)
    demo.set_defaults(handler=_cmd_demo)

    run = command("run", "Run the calibration a TOML file describes.")
    run.add_argument("config", help="the TOML configuration")
    run.add_argument("--out", help="run folder (default runs/<config name>)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted (VI) run in the folder; an error without a checkpoint",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in the folder (without it, such a folder is refused)",
    )
    run.add_argument("--seed", type=int, help="override [run] seed")
    run.add_argument("--device", help="override [run] device, e.g. cuda")
    run.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="local processes, launched through torchrun (VI is data parallel)",
    )
    _threads_option(run)
    run.set_defaults(handler=_cmd_run)

    chk = command(
        "check", "Validate a configuration without simulating (exit code 2 on problems)."
    )
    chk.add_argument("config")
    chk.set_defaults(handler=_cmd_check)

    rep = command("report", "Rebuild report.html of a finished or interrupted run.")
    rep.add_argument("run_dir")
    rep.set_defaults(handler=_cmd_report)

    mod = command("models", "List the built-in models with their parameters.")
    mod.set_defaults(handler=_cmd_models)

    bench = command(
        "bench",
        "Benchmark the calibration methods against reference posteriors; write a CSV and "
        "an HTML page (see docs/bench.md).",
    )
    bench.add_argument(
        "--quick", action="store_true", help="one seed, tiny budgets (a smoke test, ~1 min)"
    )
    bench.add_argument("--out", default="gradcal-bench", help="output folder")
    bench.add_argument("--tasks", nargs="+", help="task names (default: all)")
    bench.add_argument("--methods", nargs="+", help="method names (default: all)")
    bench.add_argument("--seeds", type=int, help="number of seeds (default: the mode's)")
    bench.add_argument(
        "--budgets", type=int, nargs="+", help="simulator draws per run (default: the mode's)"
    )
    bench.add_argument(
        "--resume", action="store_true", help="keep the finished rows, run the missing ones"
    )
    bench.add_argument("--overwrite", action="store_true", help="replace a benchmark in --out")
    bench.add_argument(
        "--merge",
        nargs="+",
        metavar="PART",
        help="merge these benchmark folders (or results.csv files) into --out; run nothing",
    )
    _threads_option(bench)
    bench.set_defaults(handler=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradcal`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.INFO if args.verbose else logging.WARNING)
    if args.verbose > 1:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(name)s: %(message)s")
    _PROGRESS[0] = not args.quiet
    try:
        return args.handler(args)
    except ConfigError as error:
        for line in error.problems:
            print(f"config error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a failed run: one paragraph, the traceback on request
        if args.debug:
            raise
        advice = (
            ""
            if args.command in ("check", "report", "models")
            else "; check the configuration with `gradcal check`, and the simulator at the "
            "prior's draws"
        )
        message = textwrap.fill(
            f"gradcal {args.command} failed: {type(error).__name__}: {error}. Run again with "
            f"--debug for the full traceback{advice}.",
            width=88,
        )
        print(message, file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
