"""Issue 14 on CPU: the quick preset's scrubs against one retrain with the preset's recipe, timed
side by side in one process.

For one seed of the ``quick`` reproduction preset (All-CNN ×0.25, |D| = 500, c = 5, float32,
``weight_decay=0.1`` → λ = N·wd), read w(D) and θ0 from the preset's training cache (trained on
first use, as ``experiments/reproduce.py`` would), then:

* every NTK form given (default: the paper form and the reference-code form) scrubbed exactly as
  the reproduction does (``scrub_call``: matrix-free CG, trapezium rescale), once with each
  forward-cache budget given (0 = stream every pass, the behaviour before the cache; ``auto`` =
  the default): seconds, matvecs, each solve's iterations / true residual / preconditioner cost;
* one retrain on D_r from θ0 with the preset's fine-tuning recipe and stopping rule (the run that
  made the retrains of the band), timed fresh, not read from the cache: epochs and seconds.

Ratios scrub / retrain are written with the raw numbers to ``--out`` (JSON, atomically).
``--solvers cg,auto`` adds ``scrub(solver="auto")`` (the dense twin when J_D fits memory); when
a form ran on both cg and the dense twin, ``cg_vs_dense`` records how far apart the two shifts
are (normwise and in the largest entry, relative to the dense shift).

    python benchmarks/quick_cost.py --seed 0 --out benchmarks/results/cpu/quick_cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ntkscrub.config import ProductConfig
from ntkscrub.io import write_record
from ntkscrub.training import train


def _solve_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("label", "iterations", "matvecs", "converged", "max_residual", "seconds")
    keys += ("precond", "precond_rank", "precond_matvecs", "precond_seconds")
    return [{k: r.get(k) for k in keys} for r in info.get("solves", [])]


def scrub_once(
    run: Any, form: str, cache: int | None, solver: str = "cg"
) -> tuple[dict[str, Any], torch.Tensor]:
    """One reproduction scrub of ``form`` with forward-cache budget ``cache`` (bytes / None) on
    ``solver`` ("cg" as the reproduction runs it, "dense" or "auto"): its record and its shift
    ``(p,)`` in float64."""
    methods = importlib.import_module("ntkscrub.recipes.reproduction.methods")
    jac_batch = run.cfg.forget.jac_batch
    original = methods.ProductConfig
    # scrub_call builds ProductConfig(batch_size=...): give it this run's cache budget.
    methods.ProductConfig = lambda **kw: ProductConfig(**kw, cache_bytes=cache)
    try:
        t0 = time.perf_counter()
        res = methods.scrub_call(run, form, solver)
        seconds = time.perf_counter() - t0
    finally:
        methods.ProductConfig = original
    info = res.info
    row = {
        "form": form,
        "solver_requested": solver,
        "solver": info.get("solver"),
        "cache_bytes": "auto" if cache is None else cache,
        "jac_batch": jac_batch,
        "seconds": seconds,
        "matvecs": info.get("matvecs"),
        "converged": info.get("converged"),
        "solves": _solve_rows(info),
        "passes": info.get("passes"),
    }
    return row, res.shift.detach().double()


def retrain_once(run: Any) -> dict[str, Any]:
    """A fresh retrain on D_r from θ0 with the preset's recipe (what the band's runs did)."""
    t0 = time.perf_counter()
    _, log = train(
        run.init,
        run.split.retain,
        seed=run.sgd_seed + 1,
        anchor=run.init,
        device=run.device,
        progress=False,
        **run.cfg.train.finetune.train_kwargs(),
    )
    d = log.to_dict()
    return {"seconds": time.perf_counter() - t0, "epochs": d.get("epochs"), "log": d}


def seed_run(seed: int, data_root: str) -> Any:
    """The quick preset's :class:`SeedRun` for ``seed`` with w(D) loaded (or trained)."""
    main = importlib.import_module("ntkscrub.recipes.reproduction.main")
    stages = importlib.import_module("ntkscrub.recipes.reproduction.stages")
    runtime = importlib.import_module("ntkscrub.recipes.runtime")
    args = main.parse_args(["--preset", "quick", "--no-progress", "--data-root", data_root])
    cfg = main.build_config(args)
    _, cache_dir = main.default_dirs(cfg.preset, None, None)
    cfg, _ = main.check_data(cfg, Path(data_root))
    log = runtime.RunLog(runtime.Budget(None))
    ctx = stages.Context(cfg, torch.device("cpu"), Path(data_root), cache_dir, False, log)
    stages.run_pretrain(ctx, {"meta": {"budget": {"skipped_seeds": []}}, "seeds": {}})
    run = stages.SeedRun(ctx, seed, {})
    run.cdir.mkdir(parents=True, exist_ok=True)
    stages.stage_data(run)
    stages.stage_train_original(run)
    return run


def quick_parser(doc: str, seed: int, threads: int) -> argparse.ArgumentParser:
    """The arguments every quick-preset study shares: --seed, --threads, --data-root, --out."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument(
        "--data-root", default=os.environ.get("NTKSCRUB_DATA", "../shared/data/cifar10-jpeg")
    )
    p.add_argument("--out", type=Path, required=True)
    return p


def main() -> None:
    """Command line (see the module docstring)."""
    p = quick_parser(__doc__, seed=0, threads=1)
    p.add_argument("--forms", default="ntk_paper,ntk_ref")
    p.add_argument("--caches", default="0,auto", help="forward-cache budgets: bytes or 'auto'")
    p.add_argument("--solvers", default="cg", help="comma-separated: cg, dense, auto")
    p.add_argument("--precond", default="auto", help="SolverConfig.precond: auto, nystrom, columns")
    p.add_argument("--no-retrain", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    run = seed_run(a.seed, a.data_root)
    forget = dataclasses.replace(run.ctx.cfg.forget, cg_precond=a.precond)
    run.ctx.cfg = dataclasses.replace(run.ctx.cfg, forget=forget)
    caches = [None if c == "auto" else int(c) for c in a.caches.split(",")]
    out: dict[str, Any] = {
        "what": "quick preset: scrub (matrix-free, as the reproduction runs it) vs one retrain",
        "hardware": {
            "cpu": platform.processor() or platform.machine(),
            "threads": a.threads,
            "load_before": os.getloadavg(),
        },
        "torch": torch.__version__,
        "seed": a.seed,
        "precond": a.precond,
        "scrubs": [],
    }

    def save() -> None:
        out["load_after"] = os.getloadavg()
        write_record(a.out, out)

    if not a.no_retrain:
        out["retrain"] = retrain_once(run)
        save()
    runs = [(f, s, c) for f in a.forms.split(",") for s in a.solvers.split(",") for c in caches]
    keys = ("form", "solver", "cache_bytes", "seconds", "matvecs", "converged")
    shifts: dict[tuple[str, str], torch.Tensor] = {}
    for form, solver, cache in runs:
        row, shift = scrub_once(run, form, cache, solver)
        shifts[form, row["solver"]] = shift  # "auto" is recorded as what it resolved to
        if "retrain" in out:
            row["ratio_to_retrain"] = row["seconds"] / out["retrain"]["seconds"]
        pair = {(form, "cg"), (form, "dense")}
        if row["solver"] in ("cg", "dense") and pair <= shifts.keys():
            row["cg_vs_dense"] = _difference(shifts[form, "cg"], shifts[form, "dense"])
        out["scrubs"].append(row)
        print(json.dumps({k: row.get(k) for k in (*keys, "cg_vs_dense")}), flush=True)
        save()


def _difference(cg: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
    """The shifts' relative difference, normwise and in the largest entry (issue 13 item 4)."""
    return {
        "relative": float((cg - dense).norm() / dense.norm()),
        "largest_entry": float((cg - dense).abs().max() / dense.abs().max()),
    }


if __name__ == "__main__":
    main()
