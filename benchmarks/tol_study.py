"""How accurate must the two CG solves of a scrub be? (float64, CPU; minutes)

For each problem: a reference scrub at tol 1e-10, then scrubs at tol 1e-2 … 1e-4, recording the
matvecs, the relative error of the shift against the reference, and the function-space effect —
the mean softmax L1 on D_f between the scrubbed model and the reference scrub, beside the L1 of the
scrub's own step (w(D) → reference scrub). No preconditioner, λ = N·0.1, cross-entropy residuals,
linearised at θ0 (as the scaling benchmarks).

Usage::

    .venv/bin/python benchmarks/tol_study.py --out benchmarks/results/cpu/tol_study.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import torch  # noqa: E402
from benchlib import ModelSpec  # noqa: E402

from ntkscrub import readouts, scrub  # noqa: E402
from ntkscrub.config import ProductConfig, SolverConfig  # noqa: E402
from ntkscrub.io import write_record  # noqa: E402
from ntkscrub.recipes.runtime import hardware  # noqa: E402

PROBLEMS = (("allcnn-w0.1-c5", 200), ("mlp-w0.25-c5", 400))
TOLS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    records = []
    for label, n in PROBLEMS:
        spec = ModelSpec.parse(label)
        prob = benchlib.make_scrub_problem(
            spec, n, dev, dtype=torch.float64, pretrain_epochs=1, finetune_epochs=3
        )
        kw = dict(init=prob.init, loss="ce", weight_decay=0.1, solver="cg", strict=False)
        kw |= dict(
            products=ProductConfig(batch_size=128), solver_config=SolverConfig(precond="none")
        )
        ref = scrub(prob.model, prob.retain, prob.forget, tol=1e-10, **kw)
        p_ref = readouts.predict_proba(ref.model, prob.forget)
        step = float((p_ref - readouts.predict_proba(prob.model, prob.forget)).abs().sum(1).mean())
        for tol in TOLS:
            r = scrub(prob.model, prob.retain, prob.forget, tol=tol, **kw)
            p = readouts.predict_proba(r.model, prob.forget)
            rec = {
                "model": label,
                "n": n,
                "params": prob.p,
                "tol": tol,
                "matvecs": r.info["matvecs"],
                "reference_matvecs": ref.info["matvecs"],
                "cg_iterations": [s["iterations"] for s in r.info["solves"]],
                "shift_rel_error": float((r.shift - ref.shift).norm() / ref.shift.norm()),
                "l1_to_reference_on_forget": float((p - p_ref).abs().sum(1).mean()),
                "step_l1_on_forget": step,
            }
            records.append(rec)
            print(rec, flush=True)
    doc = {
        "command": " ".join([sys.executable, *sys.argv]),
        "hardware": hardware(dev),
        "records": records,
    }
    write_record(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
