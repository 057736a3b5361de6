"""The ``ntkscrub reproduce`` and ``ntkscrub bench`` subcommands (a :data:`ntkscrub.cli.PLUGINS`
module: importing it registers both)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ntkscrub.cli import Subcommand, register
from ntkscrub.recipes import DATA_ENV, source_checkout

__all__ = ["bench_commands"]


# --------------------------------------------------------------------------- reproduce
def _reproduce_arguments(p: argparse.ArgumentParser) -> None:
    from ntkscrub.recipes.reproduction.main import add_arguments

    add_arguments(p)


def _reproduce_run(args: argparse.Namespace) -> int:
    from ntkscrub.recipes.reproduction.main import run

    run(args)
    return 0


register(
    "reproduce",
    Subcommand(
        help="reproduce §5 of the paper on CIFAR-10: --preset smoke (CPU, < 1 min) | quick | paper",
        add_arguments=_reproduce_arguments,
        run=_reproduce_run,
        description=(
            "Reproduce §5 of 'Forgetting Outside the Box': pre-training (cached), fine-tuning "
            "w(D), K retrains on D_r (the band), Fine-tune, Fisher, NTK (paper and reference-code "
            "forms, with and without the trapezium rescaling), NTK+noise, every readout, several "
            "seeds. Writes results.json, four figures and results.md under --out. Presets: smoke "
            "(CI, < 1 min on a CPU; random images when no data folder is found, with a banner), "
            "quick (≈ 25-30 min on 2 CPU cores), paper (GPU, ≈ 8 min on an H100/H200). The "
            f"CIFAR-10 image folder: --data-root, else ${DATA_ENV}, else "
            "../shared/data/cifar10-jpeg beside the repository. Rerunning a command skips every "
            "cached stage (--cache-dir)."
        ),
    ),
)


# --------------------------------------------------------------------------- bench
def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--size",
        choices=("smoke", "cpu", "gpu"),
        default="smoke",
        help="problem sizes: smoke (default: every case at toy size, ~3 min on 2 shared cores), "
        "cpu (~6 min), gpu (the issue's sizes, N up to 50,000)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on the CPU)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for bench.json (pytest-benchmark) and report/ (report.md, plots); default "
        "runs/bench/<size> in the repository (git-ignored)",
    )
    p.add_argument("-k", dest="select", default=None, help="pytest -k expression (a subset)")
    p.add_argument("--no-report", action="store_true", help="run the benchmarks only")


def bench_commands(args: argparse.Namespace, repo: Path, out: Path) -> list[list[str]]:
    """The pytest command over ``benchmarks/``, then the report's (see ``ntkscrub bench``)."""
    result = out / "bench.json"
    test = [sys.executable, "-m", "pytest", str(repo / "benchmarks"), "-q", "-p"]
    test += ["no:cacheprovider", "--bench-size", args.size, "--bench-device", args.device]
    test += [f"--benchmark-json={result}"]
    if args.size == "smoke":
        test += ["-m", "smoke"]
    if args.threads is not None:
        test += ["--bench-threads", str(args.threads)]
    if args.select:
        test += ["-k", args.select]
    commands = [test]
    if not args.no_report:
        report = [sys.executable, str(repo / "benchmarks" / "report.py"), str(result)]
        commands.append([*report, "--out", str(out / "report")])
    return commands


def _bench_run(args: argparse.Namespace) -> int:
    repo = source_checkout()
    if repo is None:
        print(
            "ntkscrub bench: error: the benchmark suites live in the repository's benchmarks/ "
            "folder, which is not installed with the package; run this from a source checkout "
            "(git clone, then `pip install -e .`)",
            file=sys.stderr,
        )
        return 2
    if args.threads is not None and args.threads < 1:
        print("ntkscrub bench: error: --threads must be ≥ 1", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH")) if p)
    out = Path(args.out) if args.out is not None else repo / "runs" / "bench" / args.size
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for cmd in bench_commands(args, repo, out):
        code = subprocess.run(cmd, cwd=repo, env=env).returncode
        if code != 0:
            return code
    return 0


register(
    "bench",
    Subcommand(
        help="run the pytest-benchmark suites under benchmarks/, then their report",
        add_arguments=_bench_arguments,
        run=_bench_run,
        description=(
            "Run the benchmark suites (benchmarks/test_bench_*.py, pytest-benchmark: Θ matvec "
            "vs a training epoch, CG ± Nyström, scrub dense vs cg over N and model size vs "
            "retraining), writing OUT/bench.json, then benchmarks/report.py's tables and "
            "log-log plots into OUT/report/. Times are recorded, never asserted. Needs a source "
            "checkout (the benchmarks/ folder is not installed with the package). The budgeted "
            "GPU run is `python benchmarks/gpu_suite.py` (see benchmarks/README.md)."
        ),
    ),
)
