"""How far the matrix-free one-shot shift is from its dense twin, by how it is assembled.

Δ = w_lin(D_r) − w_lin(D) is a difference of two fits, each ρ = ‖J_fᵀ x_f‖/‖Δ‖ times Δ's size.
Before, ``scrub`` solved x_D = (Θ_DD + λ_D I)⁻¹ e_D and x_r = (Θ_rr + λ_r I)⁻¹ e_r each to tol and
subtracted (``two_fits`` below, kept as the "before" twin); now it solves the retain system for
the *change* y = x_r − x_D[r] (:func:`ntkscrub.shifts.retain_change`). Both run here in float64
at the same tol against the dense (Cholesky) shift of the same problem.

Usage (from the repository root)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/shift_accuracy.py \\
        --out benchmarks/results/cpu/shift_accuracy.json
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_bench_scrubber import FORGET_FRACTION, _train, make_problem  # noqa: E402
from test_resnet_e2e import small_resnet  # noqa: E402  (a torchvision ResNet-10 layout)

from ntkscrub import scrub  # noqa: E402
from ntkscrub.io import to_jsonable, write_text  # noqa: E402
from ntkscrub.operators import NTK, Counted, Inverse, StackedJacobian  # noqa: E402

SCRUB = importlib.import_module("ntkscrub.scrub")  # the module (``ntkscrub.scrub`` is the function)


def two_fits(J_r, J_f, e_r, e_f, ridge_r, ridge_d, config, counter):  # noqa: ANN001, ANN201
    """The earlier ``_shift_solves``: x_r warm from x_D[r] to tol, Δ = J_rᵀx_r − J_Dᵀx_D."""
    cr = e_r.shape[0]
    J_d = StackedJacobian(J_r, J_f)
    inv_d = Inverse(Counted(NTK(jac_a=J_d, ridge=ridge_d), counter), config, label="Θ_DD")
    x_d = inv_d.solve(torch.cat([e_r, e_f]))
    M = inv_d.preconditioner
    shared = M.restrict(slice(0, cr), ridge_r) if (config.share_precond and M is not None) else None
    A_r = Counted(NTK(jac_a=J_r, ridge=ridge_r), counter)
    inv_r = Inverse(A_r, config, label="Θ_rr", precond=shared)
    x_r = inv_r.solve(e_r, x0=x_d[:cr].clone())
    delta = Counted(J_d, counter).mT @ torch.cat([x_r - x_d[:cr], -x_d[cr:]])
    w_lin_r = Counted(J_r, counter).mT @ x_r
    return SCRUB.ShiftResult(delta, w_lin_r, counter.count, inv_d.records + inv_r.records)


def problems() -> list[tuple[str, Any, Any, Any, Any, dict[str, Any]]]:
    """(name, w(D), θ0, D_r, D_f, scrub keywords), float64."""
    out = []
    for n in (256, 1024):
        init, X, Y = make_problem(n, 0)
        nf = max(1, round(FORGET_FRACTION * n))
        model = _train(init, (X, Y), 0)[0].model.eval()
        m, i, X = copy.deepcopy(model).double(), copy.deepcopy(init).double(), X.double()
        r, f = (X[nf:], Y[nf:]), (X[:nf], Y[:nf])
        out.append(
            (
                f"MLP 64-128-128-5, N={n}, CE, wd 0.1",
                m,
                i,
                r,
                f,
                {"loss": "ce", "weight_decay": 0.1},
            )
        )
        out.append((f"MLP 64-128-128-5, N={n}, MSE, ridge 1", m, i, r, f, {"ridge": 1.0}))
    theta0, model = small_resnet(seed=0), small_resnet(seed=0)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(10, 3, 16, 16, generator=g), torch.randint(0, 5, (10,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
    m, i, X = model.double(), theta0.double(), X.double()
    r, f = (X[:8], Y[:8]), (X[8:], Y[8:])
    out.append(("torchvision ResNet-10 x4, N=10, MSE, default ridge", m, i, r, f, {}))
    out.append(
        (
            "torchvision ResNet-10 x4, N=10, CE, wd 0.1",
            m,
            i,
            r,
            f,
            {"loss": "ce", "weight_decay": 0.1},
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-4])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows, now = [], SCRUB._shift_solves
    for name, model, init, retain, forget, kw in problems():
        ref = scrub(model, retain, forget, init=init, solver="dense", **kw).shift
        for tol in a.tols:
            row: dict[str, Any] = {"problem": name, "tol": tol}
            for label, assemble in (("two_fits_before", two_fits), ("retain_change_now", now)):
                SCRUB._shift_solves = assemble
                try:
                    t0 = time.perf_counter()
                    res = scrub(model, retain, forget, init=init, solver="cg", tol=tol, **kw)
                    sec = time.perf_counter() - t0
                finally:
                    SCRUB._shift_solves = now
                err = float((res.shift - ref).norm() / ref.norm())
                last = res.info["solves"][-1]
                row[label] = {"rel_error_to_dense": err, "products": res.info["matvecs"],
                              "seconds": sec, "converged": res.info["converged"],
                              "cancellation": last.get("cancellation"),
                              "rhs_ratio": last.get("rhs_ratio")}  # fmt: skip
            b, n_ = row["two_fits_before"], row["retain_change_now"]
            print(f"{name}, tol {tol:g}: before {b['rel_error_to_dense']:.1e} "
                  f"({b['products']} products), now {n_['rel_error_to_dense']:.1e} "
                  f"({n_['products']})", flush=True)  # fmt: skip
            rows.append(row)
    if a.out is not None:
        meta = {"command": " ".join(["benchmarks/shift_accuracy.py", *(argv or sys.argv[1:])]),
                "torch": torch.__version__, "threads": a.threads, "dtype": "float64"}  # fmt: skip
        write_text(a.out, json.dumps(to_jsonable({**meta, "rows": rows}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
