"""Issue 14 item 5 on CPU: amortised deletion requests (:class:`ntkscrub.Scrubber`) on the quick
preset's own models, against one retrain with the preset's recipe, timed side by side.

For one seed of the ``quick`` reproduction preset (All-CNN ×0.25, |D| = 500, c = 5, float32,
``weight_decay=0.1`` → λ = N·wd), D = D_r then D_f (positions 475–499 are D_f). For each NTK form
(paper: θ0 and MSE; reference: w(D) and softmax residuals) and each solver (``--solvers``: on
``cg`` once per ``precond_solves`` — how many solves the preparation's adaptive Nyström factor is
sized for, ``SolverConfig.precond_solves``; on ``dense`` the explicit twin, whose requests slice
the prepared Θ_DD):

* ``Scrubber(...)`` — preparation: α = (Θ_DD + λI)⁻¹ e_D and the factor (seconds, products, rank);
* request 1: ``forget(D_f)``; request 2: 25 more positions drawn from D_r (seeded) — the
  composed result removes both;
* each request's shift against a fresh ``scrub(..., solver="dense")`` of the same sets (the
  explicit-Jacobian twin, Cholesky): relative normwise difference.

Then one retrain on D_r from θ0 with the preset's recipe (``quick_cost.retrain_once``), timed in
the same process. Results (JSON, written atomically after every step) go to ``--out``.

    PYTHONPATH=$PWD python benchmarks/quick_scrubber.py --seed 0 --threads 2 \\
        --out benchmarks/results/cpu/quick_scrubber.json
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ntkscrub import Scrubber, scrub
from ntkscrub.config import ProductConfig, SolverConfig
from ntkscrub.io import write_record

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quick_cost import quick_parser, retrain_once, seed_run  # noqa: E402

FORMS = {
    "ntk_paper": {"linearize_at": "init", "loss": "mse"},
    "ntk_ref": {"linearize_at": "trained", "loss": "ce"},
}


def _data(run: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """D = D_r then D_f as one ``(X, Y)`` pair (the order the positions refer to)."""
    (xr, yr), (xf, yf) = run.split.retain, run.split.forget
    return torch.cat([xr, xf]), torch.cat([yr, yf])


def _sets(D: tuple, forgotten: list[int]) -> tuple[tuple, tuple]:
    """(D ∖ F, D[F]) as ``(X, Y)`` pairs, both in D's order."""
    gone = set(forgotten)
    keep = torch.tensor([i for i in range(len(D[1])) if i not in gone])
    drop = torch.tensor(sorted(gone))
    return (D[0][keep], D[1][keep]), (D[0][drop], D[1][drop])


def _request_row(res: Any) -> dict[str, Any]:
    r = res.info["request"]
    keys = ("label", "iterations", "matvecs", "converged", "precond_rank", "seconds")
    solves = [{k: s.get(k) for k in keys} for s in res.info["solves"]]
    return {k: r[k] for k in ("number", "new", "matvecs", "seconds", "iterations", "converged")} | {
        "solves": solves
    }


def run_form(
    run: Any, D: tuple, form: str, solver: str, k: int | None, requests: list[list[int]]
) -> dict:
    """Prepare one Scrubber of ``form`` on ``solver`` (its factor sized for ``k`` solves on
    cg) and answer ``requests``."""
    f = run.cfg.forget
    common = {
        "init": run.init,
        "weight_decay": run.cfg.train.finetune.weight_decay,
        "seed": run.seed,
        "products": ProductConfig(batch_size=f.jac_batch),
        **FORMS[form],
    }
    t0 = time.perf_counter()
    sc = Scrubber(
        run.w_d,
        D,
        solver=solver,
        tol=f.cg_tol if solver == "cg" else None,
        solver_config=SolverConfig(precond=f.cg_precond, precond_solves=k),
        **common,
    )
    p = sc.prepare_info
    row: dict[str, Any] = {
        "form": form,
        "solver": sc.cfg.method,
        "precond_solves": k if solver == "cg" else None,
        "prepare": {
            "seconds": time.perf_counter() - t0,
            "matvecs": p["matvecs"],
            "iterations": p["iterations"],
            "converged": p["converged"],
            "precond_rank": p["solves"][0].get("precond_rank"),
            "precond_seconds": p["solves"][0].get("precond_seconds"),
        },
        "requests": [],
    }
    name = f"{form} {solver}" + (f" precond_solves={k}" if solver == "cg" else "")
    print(f"{name}: prepared {row['prepare']}", flush=True)
    for idx in requests:
        res = sc.forget(idx)
        rec = _request_row(res)
        retain, forget = _sets(D, sc.forgotten)
        dense = scrub(run.w_d, retain, forget, solver="dense", **common)
        d = res.delta.double()
        ref = dense.delta.double()
        rec["rel_diff_to_dense"] = float((d - ref).norm() / ref.norm())
        rec["forgotten_so_far"] = len(sc.forgotten)
        row["requests"].append(rec)
        print(
            f"{name}: request {rec['number']} {rec['seconds']:.1f} s, "
            f"{rec['matvecs']} products, vs dense {rec['rel_diff_to_dense']:.2e}",
            flush=True,
        )
    return row


def main() -> None:
    p = quick_parser(__doc__, seed=0, threads=1)
    p.add_argument("--forms", default="ntk_paper,ntk_ref")
    p.add_argument("--solvers", default="cg", help="comma-separated: cg, dense, auto")
    p.add_argument(
        "--precond-solves", default="2,8,none", help="cg only: comma-separated ints or none"
    )
    p.add_argument("--no-retrain", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    run = seed_run(a.seed, a.data_root)
    D = _data(run)
    n, n_f = len(D[1]), len(run.split.forget[1])
    g = torch.Generator().manual_seed(1000 + a.seed)
    second = sorted(torch.randperm(n - n_f, generator=g)[:n_f].tolist())
    requests = [list(range(n - n_f, n)), second]
    out: dict[str, Any] = {
        "what": "quick preset: Scrubber preparation and two deletion requests vs one retrain",
        "hardware": {"cpu": platform.processor() or platform.machine(), "threads": a.threads},
        "torch": torch.__version__,
        "seed": a.seed,
        "requests": ["D_f (25)", f"25 of D_r: {second}"],
        "runs": [],
    }
    for form in a.forms.split(","):
        for solver in a.solvers.split(","):
            ks = a.precond_solves.split(",") if solver == "cg" else ["2"]
            for tok in ks:
                k = None if tok == "none" else int(tok)
                out["runs"].append(run_form(run, D, form, solver, k, requests))
                write_record(a.out, out)
    if not a.no_retrain:
        out["retrain"] = retrain_once(run)
        for r in out["runs"]:
            for q in r["requests"]:
                q["ratio_to_retrain"] = q["seconds"] / out["retrain"]["seconds"]
            r["prepare"]["ratio_to_retrain"] = r["prepare"]["seconds"] / out["retrain"]["seconds"]
        write_record(a.out, out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
