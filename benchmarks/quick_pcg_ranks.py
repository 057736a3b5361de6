"""Issue 14 on CPU: how few products can Nyström-PCG spend on the quick preset's systems?

A float64 replica of the two linear systems a quick-preset scrub solves (All-CNN ×0.25,
|D| = 500, c = 5, seed ``--seed``): the explicit Θ_DD = J Jᵀ of the paper form (J at θ0, MSE
residuals e = Y − f(θ0)) and of the reference-code form (J at w(D), CE residuals), with the
pipeline's ridges λ = N·wd (500·0.1 for Θ_DD, 475·0.1 for Θ_rr). For each Nyström rank of a
grid (and the adaptive rank with the cost rule, ``SolverConfig.precond_solves = 2``), the
products a scrub spends: the build's columns + PCG on Θ_DD + λI + PCG on Θ_rr + λ_rI with the
factor restricted to the retain rows, both to tol 1e-3, as the pipeline runs them (no warm
start here, so the counts are a few iterations above the pipeline's). Also the spectrum: Θ's
eigenvalues at ranks 16 … 512 and its condition number with the ridge.

Why a replica: the spectrum, not the hardware, sets the iteration count, and a float64 dense
Θ (2500 × 2500) makes each rank's count exact and cheap to measure. One Θ product costs about
one epoch of the recipe's training on this CPU (``quick_cost.py``); a retrain is ≈ 100 epochs.

    python benchmarks/quick_pcg_ranks.py --seed 0 --out benchmarks/results/cpu/quick_pcg_ranks.json
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ntkscrub.io import write_record
from ntkscrub.operators.jacobian import Jacobian
from ntkscrub.params import ParameterSpace
from ntkscrub.scrub import _targets
from ntkscrub.solvers import NystromPreconditioner, cg, nystrom_preconditioner

RANKS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
TOL = 1e-3


def replica(model: torch.nn.Module, X: torch.Tensor, Y: torch.Tensor, loss: str) -> dict:
    """Explicit float64 Θ = J Jᵀ ``(c·N, c·N)`` of ``model`` on (X, Y) and the residual e."""
    J = Jacobian(ParameterSpace(model), (X, Y), batch_size=128)
    D = J.dense().double()
    T = D @ D.T
    e = _targets(J, loss).double()  # scrub's residuals e_S, (c·N,)
    return {"T": 0.5 * (T + T.T), "e": e, "c": J.c}


def replicas(run: Any) -> Iterator[tuple[str, dict, int, float]]:
    """The quick preset's two forms as float64 replicas (:func:`replica`) on D = D_r ⊔ D_f:
    ``(form, replica, |D_r|, weight decay)`` for the paper form (θ0, MSE) and the
    reference-code form (w(D), CE); ``run`` is ``quick_cost.seed_run``'s."""
    (Xr, Yr), (Xf, Yf) = run.split.retain, run.split.forget
    X, Y = torch.cat([Xr, Xf]), torch.cat([Yr, Yf])
    wd = run.cfg.train.finetune.weight_decay
    for form, at, loss in (("paper", run.init, "mse"), ("ref", run.w_d, "ce")):
        yield form, replica(at, X, Y, loss), Xr.shape[0], wd


def products(T: torch.Tensor, e: torch.Tensor, m: int, lam: tuple, M: Any) -> dict[str, int]:
    """Build columns + PCG iterations on Θ_DD + λI and on the retain block with M restricted."""
    n = T.shape[0]
    A_d = T + lam[0] * torch.eye(n, dtype=T.dtype)
    A_r = T[:m, :m] + lam[1] * torch.eye(m, dtype=T.dtype)
    M_r = None if M is None else M.restrict(slice(0, m), lam[1])
    it_d = cg(A_d, e, precond=M, tol=TOL, strict=False)[1].iterations
    it_r = cg(A_r, e[:m], precond=M_r, tol=TOL, strict=False)[1].iterations
    build = 0 if M is None else M.matvecs
    return {"build": build, "cg_D": it_d, "cg_Dr": it_r, "total": build + it_d + it_r}


def study(rep: dict, n_retain: int, wd: float) -> dict[str, Any]:
    T, e, c = rep["T"], rep["e"], rep["c"]
    n = T.shape[0]
    m, lam = n_retain * c, (wd * (n // c), wd * n_retain)
    ev = torch.linalg.eigvalsh(T).flip(0)
    out: dict[str, Any] = {
        "n": n,
        "ridge": {"D": lam[0], "D_r": lam[1]},
        "eigenvalue_at_rank": {str(k): float(ev[k - 1]) for k in (1, 16, 32, 64, 128, 256, 512)},
        "kappa_D": float((ev[0] + lam[0]) / (ev[-1] + lam[0])),
        "plain": products(T, e, m, lam, None),
        "fixed_rank": {},
    }
    for r in RANKS:
        out["fixed_rank"][str(r)] = products(
            T, e, m, lam, NystromPreconditioner(T, n, r, shift=lam[0], seed=0)
        )
    M = nystrom_preconditioner(T, n, shift=lam[0], seed=0, solves=2, tol=TOL)
    out["adaptive_cost_rule"] = {"rank": M.rank, "stop": M.stop_reason}
    out["adaptive_cost_rule"].update(products(T, e, m, lam, M))
    best = min(out["fixed_rank"].items(), key=lambda kv: kv[1]["total"])
    out["best_fixed_rank"] = {"rank": int(best[0]), "total": best[1]["total"]}
    return out


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from quick_cost import quick_parser, seed_run  # the preset's cached w(D), θ0 and split

    a = quick_parser(__doc__, seed=0, threads=2).parse_args()
    torch.set_num_threads(a.threads)

    t0 = time.perf_counter()
    run = seed_run(a.seed, a.data_root)
    res: dict[str, Any] = {
        "what": __doc__.split("\n")[0],
        "command": " ".join(["python", *sys.argv]),
        "seed": a.seed,
        "tol": TOL,
        "forms": {},
    }
    for form, rep, n_retain, wd in replicas(run):
        res["forms"][form] = study(rep, n_retain, wd)
        r = res["forms"][form]
        print(form, "best", r["best_fixed_rank"], "cost rule", r["adaptive_cost_rule"], flush=True)
    res["seconds"] = time.perf_counter() - t0
    write_record(a.out, res)


if __name__ == "__main__":
    main()
