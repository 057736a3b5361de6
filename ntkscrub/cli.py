"""Command line: ``ntkscrub <subcommand>`` (also ``python -m ntkscrub <subcommand>``).

Subcommands live in :data:`SUBCOMMANDS`, a dict of name → :class:`Subcommand` (help text, a
function that adds the subcommand's arguments to its parser, and a function that runs it and
returns the exit status). ``demo`` is built in; others (``reproduce``, ``bench``) are added by
calling :func:`register` from their own module and listing that module in :data:`PLUGINS`, so
this file never has to know their options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ntkscrub

__all__ = ["Subcommand", "SUBCOMMANDS", "PLUGINS", "register", "build_parser", "main"]


@dataclass(frozen=True)
class Subcommand:
    """One ``ntkscrub`` subcommand.

    Attributes:
        help: one line for ``ntkscrub --help``.
        add_arguments: adds the subcommand's options to its ``argparse`` sub-parser.
        run: runs it with the parsed namespace; returns the process exit status.
        description: longer text for ``ntkscrub <name> --help`` (default: ``help``).
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


#: name → subcommand, in the order shown by ``--help``.
SUBCOMMANDS: dict[str, Subcommand] = {}

#: Modules imported (if present) before the parser is built; each calls :func:`register`.
#: A later ``reproduce`` or ``bench`` subcommand adds its module name here.
PLUGINS: list[str] = ["ntkscrub.recipes.commands"]


def register(name: str, subcommand: Subcommand) -> None:
    """Add (or replace) subcommand ``name``."""
    if not name or not name.replace("-", "").isalnum():
        raise ValueError(
            f"name: a subcommand name must be alphanumeric (dashes allowed), got {name!r}"
        )
    if not isinstance(subcommand, Subcommand):
        raise TypeError(f"subcommand: expected a Subcommand, got {type(subcommand).__name__}")
    SUBCOMMANDS[name] = subcommand


# --------------------------------------------------------------------------- demo
def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="the one seed every other derives from (0)")
    p.add_argument(
        "--size",
        choices=("small", "full"),
        default="full",
        help="'full' (default: 5 retrains) or 'small' (the tests: 3 retrains, shorter "
        "pre-training)",
    )
    p.add_argument(
        "--out",
        default="ntkscrub-demo.json",
        help="where to write the JSON report (default: ./ntkscrub-demo.json); checked for "
        "writability before the run",
    )
    p.add_argument(
        "--figure",
        default=None,
        help="where to write the PNG figure (default: --out with the suffix .png)",
    )
    p.add_argument("--no-figure", action="store_true", help="do not draw the figure")
    p.add_argument("--quiet", action="store_true", help="print nothing (the files are written)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for the run (default 1: the operations are tiny, and extra "
        "threads stall badly on shared cores)",
    )


def _demo_run(args: argparse.Namespace) -> int:
    from ntkscrub.recipes.demo import run_demo

    if args.seed < 0:
        print("ntkscrub demo: error: --seed must be ≥ 0", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("ntkscrub demo: error: --threads must be ≥ 1", file=sys.stderr)
        return 2
    try:
        run_demo(
            size=args.size,
            seed=args.seed,
            out=args.out,
            figure=args.figure,
            draw=not args.no_figure,
            quiet=args.quiet,
            threads=args.threads,
        )
    except ValueError as err:  # an unwritable --out / --figure: said before anything runs
        print(f"ntkscrub demo: error: {err}", file=sys.stderr)
        return 2
    return 0


register(
    "demo",
    Subcommand(
        help="forget 25 mislabeled digits in about a minute on a CPU: Original, Retrain band, "
        "Fine-tune, Fisher, NTK, NTK+noise, NTK (CE)",
        add_arguments=_demo_arguments,
        run=_demo_run,
        description=(
            "Pre-train an MLP (64-256-256-5) on scikit-learn's bundled digits 5-9, fine-tune it "
            "until zero training error on digits 0-4 where 25 images of digit 0 carry a wrong "
            "label (it memorises them), then forget those 25 with every method: retrain from the "
            "pre-trained weights several times (the band), fine-tune, Fisher noise, the NTK "
            "scrub (scrub(linearize_at='trained', loss='ce', rescale='trapezium', "
            "weight_decay=0.001, solver='cg')), NTK + noise and NTK (CE) "
            "(scrub(method='ce_newton', loss='ce', linearize_at='trained', weight_decay=0.001)). "
            "Prints one table (errors on D_r, test and D_f, the membership attack, softmax L1 "
            "to the retrains on D_f), a one-line reading and the scrub settings with the "
            "reasons; writes a JSON report and a PNG figure. Nothing is downloaded."
        ),
    ),
)


# --------------------------------------------------------------------------- parser and main
def _load_plugins() -> None:
    for mod in PLUGINS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:  # the plugin exists but is broken: say so
                raise


def build_parser() -> argparse.ArgumentParser:
    """The ``ntkscrub`` parser with one sub-parser per registered subcommand."""
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="ntkscrub",
        description="Matrix-free NTK forgetting (Golatkar, Achille, Soatto, ECCV 2020).",
    )
    parser.add_argument("--version", action="version", version=f"ntkscrub {ntkscrub.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help)
        cmd.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ntkscrub`` console script; returns the exit status."""
    # A deprecation notice from a dependency's import (torch.jit.script, via linear_operator)
    # says nothing about the user's run; keep the console output to the run itself.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(SUBCOMMANDS[args.command].run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
