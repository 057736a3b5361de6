"""Mixed-precision solves (issue 14, item 2) on the CPU: inner/outer matvecs, seconds, true
residual. (float32 MLP NTK; about a minute on two cores; ``--device cuda`` on a GPU.)

For each ridge: one float32 solve ``(Θ + λI) x = e`` per ``SolverConfig.inner_precision``
(``None`` = plain fp32 PCG, ``"tf32"`` = plain fp32 products on a CPU, ``"bfloat16"`` /
``"float16"`` = real ``torch.autocast`` products), recording the low-precision (inner) and
full-precision (outer) column-matvecs, the seconds, the fallback flag and the *true* residual
against the float64 twin of the same model. Also the seconds of one 8-vector Θ product per
precision and its relative error against float64 — on a CPU without native bf16 (no AVX512-BF16 /
AMX) autocast products are *slower* than fp32, so the speed-up must be measured on a GPU.

Usage::

    .venv/bin/python benchmarks/mixed_precision.py --out benchmarks/results/cpu/mixed_precision.json
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch import nn

from ntkscrub.config import SolverConfig
from ntkscrub.io import write_record
from ntkscrub.operators import NTK, Inverse, Jacobian
from ntkscrub.params import ParameterSpace
from ntkscrub.recipes.runtime import hardware
from ntkscrub.solvers import PrecisionFallbackWarning, low_precision_products


def problem(n: int, width: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 32 * 32, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, 3, 32, 32, generator=g)
    Y = torch.randint(0, 10, (n,), generator=g)
    return model, X, Y


def product_costs(K: NTK, K64: NTK, k: int = 8) -> dict:
    V = torch.randn(K.shape[0], k, generator=torch.Generator().manual_seed(2)).to(K.device)
    ref = K64 @ V.double()
    out = {}
    for name in (None, "bfloat16", "float16"):
        mm = (lambda X: K @ X) if name is None else low_precision_products(K, name)[0]
        mm(V[:, :1])  # warm-up
        if V.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        Y = mm(V)
        if V.is_cuda:
            torch.cuda.synchronize()
        out[name or "float32"] = {
            "seconds_per_column": (time.perf_counter() - t0) / k,
            "rel_error_vs_float64": float((Y.double() - ref).norm() / ref.norm()),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="samples (rows c·n)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--ridges", type=float, nargs="+", default=[10.0, 1.0])
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    model, X, Y = problem(args.n, args.width)
    model, X = model.to(dev), X.to(dev)
    J = Jacobian(ParameterSpace(model), (X, Y), batch_size=100)
    J64 = Jacobian(ParameterSpace(copy.deepcopy(model).double()), (X.double(), Y), batch_size=100)
    record: dict = {
        "what": f"mixed-precision solves, float32 MLP NTK, {dev.type}",
        "hardware": hardware(dev),
        "n_samples": args.n,
        "rows": J.shape[0],
        "p": J.p,
        "tol": args.tol,
        "products": product_costs(NTK(jac_a=J, ridge=1.0), NTK(jac_a=J64, ridge=1.0)),
        "solves": [],
    }
    e = torch.randn(J.shape[0], generator=torch.Generator().manual_seed(3)).to(dev)
    for ridge in args.ridges:
        K, K64 = NTK(jac_a=J, ridge=ridge), NTK(jac_a=J64, ridge=ridge)
        for prec in (None, "tf32", "bfloat16", "float16"):
            cfg = SolverConfig(inner_precision=prec, tol=args.tol, precond="none")
            inv = Inverse(K, cfg, label=f"Θ+{ridge:g}I")
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", PrecisionFallbackWarning)
                x = inv.solve(e)
            seconds = time.perf_counter() - t0
            rec = inv.records[-1]
            true = float((e.double() - K64 @ x.double()).norm() / e.double().norm())
            row = {
                "ridge": ridge,
                "inner_precision": prec,
                "matvecs": rec["matvecs"],
                "inner_matvecs": rec["inner_matvecs"],
                "outer_matvecs": rec["outer_matvecs"],
                "rounds": rec["refinements"],
                "fallback": rec["fallback"],
                "seconds": seconds,
                "residual_reported": rec["residuals"][0],
                "residual_vs_float64": true,
                "kappa_ritz": rec["kappa"],
                "warnings": [str(w.message)[:120] for w in caught],
            }
            record["solves"].append(row)
            print(
                f"λ={ridge:g} {str(prec):9s} matvecs {row['matvecs']:4d} (inner "
                f"{row['inner_matvecs']:4d}, outer {row['outer_matvecs']:3d}, rounds "
                f"{row['rounds']}) {seconds:6.1f} s  residual {row['residual_reported']:.1e} "
                f"(vs float64 {true:.1e})  fallback={row['fallback']}  κ≈{rec['kappa']}",
                flush=True,
            )
    print({k: v for k, v in record["products"].items()})
    if args.out:
        write_record(args.out, record)


if __name__ == "__main__":
    main()
