"""Issue 14 item 3 on CPU: Krylov recycling between the solves of a scrub, measured.

Two parts, each with recycling off (``SolverConfig(recycle=0)``) and on (the default):

* ``replica``: the float64 explicit Θ of the quick preset (``quick_pcg_ranks.replica``, seed
  ``--seed``) for the paper form (θ0, MSE) and the reference-code form (w(D), CE), solved as
  ``scrub`` solves them — Θ_DD + λI with a rank-r Nyström factor, then the retain system
  Θ_rr + λ_r I (the factor restricted) to tol and again warm to tol/amplification
  (``shifts.retain_change``) — plus a later solve with fresh right-hand sides on Θ_DD (what a
  second fit or a bound asks of the same factor). CG iterations per solve, r = 32 and 64.
* ``scrub``: the library's ``scrub(..., solver="cg")`` in float32 on the quick preset's cached
  models (seed ``--seed``), both forms and the cross-entropy Newton model at w(D)
  (``method="ce_newton"``): products, seconds, the shift's distance to the dense twin, every
  solve converged.

    PYTHONPATH=$PWD python benchmarks/recycle_study.py --seed 2 \
        --out benchmarks/results/cpu/recycle_study.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from ntkscrub import scrub
from ntkscrub.config import SolverConfig
from ntkscrub.io import write_record
from ntkscrub.shifts import cancellation_amplification
from ntkscrub.solvers import KrylovPairs, NystromPreconditioner, cg, recycled

TOL = 1e-3
# the scrub part's forms (the replica part's: quick_pcg_ranks.replicas): both one-shot forms and
# the cross-entropy Newton model at w(D) (its steps carry Θ's factor)
SCRUB_FORMS = {"paper": ("init", "mse"), "ref": ("trained", "ce"), "ce_newton": ("trained", "ce")}


def _solve(A: torch.Tensor, b: torch.Tensor, M: Any, tol: float, recycle: bool, x0=None):
    """CG on dense A; returns (x, iterations, M augmented with the pairs when recycling)."""
    pairs = KrylovPairs(M.rank) if recycle else None
    x, info = cg(A, b, precond=M, tol=tol, x0=x0, strict=False, krylov=pairs)
    return x, info.iterations, (recycled(M, pairs) if recycle else M)


def replica_study(T: torch.Tensor, e: torch.Tensor, m: int, lam: tuple, rank: int) -> dict:
    n = T.shape[0]
    A = T + lam[0] * torch.eye(n, dtype=T.dtype)
    A_r = T[:m, :m] + lam[1] * torch.eye(m, dtype=T.dtype)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, 2, dtype=T.dtype, generator=g)
    fresh = torch.stack([z[:, 0], T @ z[:, 1]], 1)  # a rough and a smooth right-hand side
    out: dict[str, Any] = {}
    for recycle in (False, True):
        M = NystromPreconditioner(T, n, rank, shift=lam[0], seed=0)
        x, it_d, M = _solve(A, e, M, TOL, recycle)
        b = T[:m, m:] @ x[m:] + (lam[0] - lam[1]) * x[:m]
        M_r = M.restrict(slice(0, m), lam[1])
        y, it_y, M_r = _solve(A_r, b, M_r, TOL, recycle)
        amp = _amplification(T, x, y, b, e, m)
        _, it_y2, _ = _solve(A_r, b, M_r, max(TOL / amp, 1e-13), recycle, x0=y)
        its_fresh = [_solve(A, fresh[:, j], M, TOL, False)[1] for j in range(fresh.shape[1])]
        out["on" if recycle else "off"] = {
            "Theta_DD": it_d, "Theta_rr": it_y, "Theta_rr_tight": it_y2, "amplification": amp,
            "factor_rank_after_D": M.rank, "fresh_rhs_Theta_DD": its_fresh,
        }  # fmt: skip
    return out


def _amplification(T, x, y, b, e, m) -> float:
    """amp of retain_change from explicit Θ: ‖J_fᵀx_f‖ and ‖Δ‖ as Θ-norms (‖Jᵀv‖² = vᵀΘv)."""
    v_f = torch.cat([torch.zeros_like(x[:m]), x[m:]])
    v_d = torch.cat([y, -x[m:]])
    g2, d2 = float(v_f @ (T @ v_f)), float(v_d @ (T @ v_d))
    return cancellation_amplification(g2**0.5, d2**0.5, float(b.norm()), float(e[:m].norm()))[2]


def scrub_study(run: Any, wd: float) -> dict:
    out: dict[str, Any] = {}
    for form, (at, loss) in SCRUB_FORMS.items():
        kw = dict(init=run.init, weight_decay=wd, linearize_at=at, loss=loss)
        if form == "ce_newton":
            kw["method"] = "ce_newton"
        dense = scrub(run.w_d, run.split.retain, run.split.forget, solver="dense", **kw).shift
        out[form] = {}
        for name, recycle in (("off", 0), ("on", None)):
            t0 = time.perf_counter()
            cfg = SolverConfig(method="cg", recycle=recycle)
            r = scrub(run.w_d, run.split.retain, run.split.forget, solver_config=cfg, **kw)
            sec = time.perf_counter() - t0
            rel = float((r.shift.double() - dense.double()).norm() / dense.double().norm())
            out[form][name] = {
                "products": r.info["matvecs"], "seconds": round(sec, 1),
                "converged": r.info["converged"], "rel_to_dense": rel,
                "solves": [(s["system"], s.get("iterations"), s.get("recycled_rank"))
                           for s in r.info["solves"]],
            }  # fmt: skip
            print(form, name, out[form][name], flush=True)
    return out


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from quick_cost import quick_parser, seed_run
    from quick_pcg_ranks import replicas

    p = quick_parser(__doc__, seed=2, threads=2)
    p.add_argument("--parts", default="replica,scrub")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    t0 = time.perf_counter()
    run = seed_run(a.seed, a.data_root)
    res: dict[str, Any] = {
        "what": __doc__.split("\n")[0], "command": " ".join(["python", *sys.argv]),
        "seed": a.seed, "tol": TOL, "threads": a.threads,
    }  # fmt: skip
    if "replica" in a.parts:
        res["replica"] = {}
        for form, rep, n_retain, wd in replicas(run):
            n = rep["T"].shape[0]
            m, lam = n_retain * rep["c"], (wd * (n // rep["c"]), wd * n_retain)
            res["replica"][form] = {
                str(r): replica_study(rep["T"], rep["e"], m, lam, r) for r in (32, 64)
            }
            print(form, res["replica"][form], flush=True)
    if "scrub" in a.parts:
        res["scrub"] = scrub_study(run, run.cfg.train.finetune.weight_decay)
    res["seconds"] = time.perf_counter() - t0
    write_record(a.out, res)


if __name__ == "__main__":
    main()
