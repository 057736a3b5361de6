"""The reproduction's command line: options, the run's record, and :func:`main`."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ntkscrub import bounds, readouts
from ntkscrub.recipes import DATA_ENV, data_root, source_checkout
from ntkscrub.recipes.reproduction import figures
from ntkscrub.recipes.reproduction.config import PRESETS, Config, derive, parse_set
from ntkscrub.recipes.reproduction.data import data_available
from ntkscrub.recipes.reproduction.methods import method_labels
from ntkscrub.recipes.reproduction.stages import Context, run_all
from ntkscrub.recipes.reproduction.summary import RESULTS_NAME, resummarize, summarize
from ntkscrub.recipes.runtime import Budget, BudgetExceeded, RunLog, hardware, log, set_threads

__all__ = ["add_arguments", "parse_args", "build_config", "main", "run"]

BANNER = "!" * 78
DESCRIPTION = (
    'Reproduce §5 of "Forgetting Outside the Box" (Golatkar, Achille, Soatto, ECCV 2020): '
    "pre-training (cached), fine-tuning w(D), K retrains on D_r, every forgetting method, every "
    "readout, several seeds; writes results.json, four figures and results.md under --out."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The reproduction's options (shared by ``experiments/reproduce.py`` and ``ntkscrub
    reproduce``)."""
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="smoke",
        help="smoke (default; CI, < 1 min on a CPU), quick (CPU, ≈ 25-30 min), paper (GPU)",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help=f"the CIFAR-10 image folder (train/, test/); default ${DATA_ENV}, else "
        "../shared/data/cifar10-jpeg beside the repository. Missing: an error for quick and "
        "paper; smoke falls back to random images (with a banner)",
    )
    p.add_argument(
        "--model",
        choices=["allcnn", "resnet18"],
        default=None,
        help="network (default: the preset's, All-CNN; resnet18 defaults to width 0.4)",
    )
    p.add_argument("--width", type=float, default=None, help="channel width multiplier")
    p.add_argument("--seeds", type=str, default=None, help="comma-separated, e.g. 0,1,2")
    p.add_argument("--retrains", type=int, default=None, help="K, retrains on D_r (the band)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where results.json, the figures and results.md go; default runs/reproduce/<preset> "
        "(git-ignored) in the repository, or in the current folder outside a checkout",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="checkpoints and finished seeds (rerunning skips every cached stage); default "
        "experiments/cache/<preset> (git-ignored) in the repository, else runs/cache/<preset>",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:0, ...")
    p.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="stop between stages once spent and write partial results (≤ 0: no budget; "
        "default: the preset's)",
    )
    p.add_argument("--synthetic", action="store_true", help="random data instead of CIFAR")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any flat config field (Python literal), e.g. --set pre_epochs=2",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch; 0 = auto: 1 when the machine is already loaded (OpenMP "
        "threads that spin while their sibling is descheduled made small ops ~7x slower on the "
        "shared 2-core machine), else torch's default",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-figures", action="store_true", help="skip the four PNG figures")
    p.add_argument(
        "--resummarize",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="apply the failed-training rule to a finished results.json and redo summary, "
        "figures and report (into --out, default: beside it); nothing is retrained",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The reproduction's command-line arguments (see ``--help``)."""
    p = argparse.ArgumentParser(description=DESCRIPTION)
    add_arguments(p)
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """The preset with the command line's overrides (flat field names, see ``--set``)."""
    over: dict[str, Any] = {}
    if args.model is not None:
        over["model"] = args.model
        if args.width is None and args.model == "resnet18":
            over["width"] = 0.4  # the reference code's ResNet-18 ×0.4
    if args.width is not None:
        over["width"] = args.width
    if args.seeds is not None:
        over["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    if args.retrains is not None:
        over["retrains"] = args.retrains
    if args.budget_seconds is not None:
        over["budget_seconds"] = args.budget_seconds if args.budget_seconds > 0 else None
    if args.synthetic:
        over["synthetic"] = True
    return derive(PRESETS[args.preset], **{**over, **parse_set(args.set)})


def _meta(cfg: Config, argv: Sequence[str] | None, device: torch.device) -> dict[str, Any]:
    """The run's ``meta`` record (completed by :func:`finish`)."""
    return {
        "title": "Forgetting Outside the Box (ECCV 2020), §5 reproduction",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "argv": sys.argv if argv is None else ["reproduce.py", *argv],
        "preset": cfg.preset,
        "config": cfg.flat(),
        "hardware": hardware(device),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method_labels": method_labels(),
        "conventions": {
            "softmax_l1": readouts.SOFTMAX_L1_CONVENTION,
            "attack": readouts.ATTACK_CONVENTION,
            "relearn": readouts.RELEARN_CONVENTION,
            "information": bounds.CONVENTION,
            "information_reported": "kl (nats, the Gaussian KL with its 1/2); the reference "
            "code prints 2*KL of the reversed direction (reference_two_kl)",
            "errors": "fractions in [0, 1] in JSON; % in the markdown",
        },
        "budget": {"seconds": cfg.budget_seconds, "stopped": None, "skipped_seeds": []},
    }


def finish(results: dict[str, Any], runlog: RunLog, out: Path, figures_too: bool) -> None:
    """Summary, JSON, figures and markdown — also for partial runs."""
    meta = results["meta"]
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["wall_seconds"] = runlog.budget.elapsed()
    meta["stage_seconds"] = runlog.timings
    if hasattr(os, "getloadavg"):
        meta["hardware"]["loadavg_at_end"] = list(os.getloadavg())
    try:
        results["summary"] = summarize(results)
    except Exception:  # a partial run may lack pieces; the JSON must still be written
        meta["summary_error"] = traceback.format_exc()
    out.mkdir(parents=True, exist_ok=True)
    runlog.write(out / RESULTS_NAME, results)
    for key, draw in (
        ("figure_error", lambda: figures.draw_all(results, out) if figures_too else None),
        ("report_error", lambda: figures.write_report(results, out / "results.md")),
    ):
        try:
            made = draw()
            if key == "figure_error" and made is not None:
                meta["figures"] = [str(p.name) for p in made]
        except Exception:
            meta[key] = traceback.format_exc()
            log(meta[key])
    runlog.write(out / RESULTS_NAME, results)
    log(f"wrote {out / RESULTS_NAME} ({meta['wall_seconds']:.0f}s)")


def default_dirs(preset: str, out: Path | None, cache: Path | None) -> tuple[Path, Path]:
    """``--out`` and ``--cache-dir`` or their git-ignored defaults (see :func:`add_arguments`)."""
    repo = source_checkout()
    if out is None:
        out = (repo or Path.cwd()) / "runs" / "reproduce" / preset
    if cache is None:
        cache = repo / "experiments" / "cache" / preset if repo else Path("runs/cache") / preset
    return Path(out), Path(cache)


def check_data(cfg: Config, root: Path) -> tuple[Config, list[str]]:
    """Refuse a missing image folder (quick, paper), or fall back to random images (smoke) with
    a banner on stderr and a note in the record; returns the config to run and the notes."""
    if cfg.synthetic or data_available(root):
        return cfg, []
    if cfg.preset != "smoke":
        raise SystemExit(
            f"--data-root {root}: no CIFAR-10 image folder (train/, test/). Pass --data-root or "
            f"set ${DATA_ENV}; --synthetic runs on random images"
        )
    note = f"image folder {root} not found: smoke preset fell back to random data"
    print(
        f"{BANNER}\n!! SYNTHETIC DATA: {note}.\n!! The numbers are meaningless; pass --data-root "
        f"or set ${DATA_ENV} for CIFAR-10.\n{BANNER}",
        file=sys.stderr,
        flush=True,
    )
    return replace(cfg, synthetic=True), [note]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``experiments/reproduce.py`` / ``ntkscrub reproduce``: run (or re-summarise); returns the
    results document."""
    return run(parse_args(argv), argv)


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the reproduction for parsed options (see :func:`add_arguments`)."""
    if args.resummarize is not None:
        return resummarize(args.resummarize, args.out, args.no_figures)
    cfg = build_config(args)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    out, cache_dir = default_dirs(cfg.preset, args.out, args.cache_dir)
    root = data_root(args.data_root)
    cfg, notes = check_data(cfg, root)
    threads_note = set_threads(args.threads, device)
    runlog = RunLog(Budget(cfg.budget_seconds))
    meta = _meta(cfg, argv, device)
    meta.update(data_root=str(root), cache_dir=str(cache_dir), notes=notes, threads=threads_note)
    results: dict[str, Any] = {"meta": meta, "pretrain": None, "seeds": {}, "summary": None}
    ctx = Context(cfg, device, root, cache_dir, not args.no_progress, runlog)
    try:
        run_all(ctx, results)
    except BudgetExceeded as err:
        meta["budget"]["stopped"] = str(err)
        log(f"STOPPED: {err}; writing partial results")
    except Exception as err:  # write what exists, then re-raise
        meta["error"] = "".join(traceback.format_exception(err))
        finish(results, runlog, out, not args.no_figures)
        raise
    finish(results, runlog, out, not args.no_figures)
    return results
