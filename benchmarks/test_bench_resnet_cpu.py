"""Issue 12's new-user case on the CPU: a full-width torchvision ``resnet18(num_classes=5)``
scrubbed with ``scrub``'s defaults through DataLoaders (N = 200, all parameters and ``"fc"``).

NOT run in CI (minutes per case on two cores): skipped unless ``NTKSCRUB_BENCH_RESNET=1``.
For each case it records the outcome with the defaults — converged, or the ``CGNotConverged``
diagnosis (system, status, estimated κ, recommended extra ridge, matvec cost) — then, when a
ridge was recommended, reruns with that ridge. Recorded: matvecs, seconds, peak RSS, CG status
per solve. Results: JSON at ``NTKSCRUB_BENCH_RESNET_OUT`` (default
``benchmarks/results/cpu/resnet18_n200.json``).

    NTKSCRUB_BENCH_RESNET=1 timeout 900 python -m pytest -q -s benchmarks/test_bench_resnet_cpu.py
    # or, as a script with options:
    python benchmarks/test_bench_resnet_cpu.py --n 200 --params all fc --threads 1

Data: random CIFAR-shaped images (3×32×32, N(0,1)), 5 uniform labels; θ0 is torchvision's
seeded initialisation after 3 SGD steps on other random data ("pre-training"), w(D) is θ0 after
5 SGD steps on D = D_r ∪ D_f with BatchNorm frozen (eval mode), D_f = the last 10 % of D.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ntkscrub import scrub
from ntkscrub.io import atomic_write_json, to_jsonable
from ntkscrub.solvers import CGNotConverged

ENV = "NTKSCRUB_BENCH_RESNET"
DEFAULT_OUT = Path(__file__).parent / "results" / "cpu" / "resnet18_n200.json"
# The two parameter selections: every parameter (11.2 M) and the last layer (2,565).
PARAMS = {"all": None, "fc": ["fc.weight", "fc.bias"]}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_case(n: int, seed: int = 0) -> tuple[nn.Module, nn.Module, Any, Any]:
    """(model w(D), init θ0, retain loader, forget loader) of the issue's case, random data."""
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    theta0 = resnet18(num_classes=5)
    g = torch.Generator().manual_seed(seed + 1)
    pre_x = torch.randn(64, 3, 32, 32, generator=g)
    pre_y = torch.randint(0, 5, (64,), generator=g)
    X = torch.randn(n, 3, 32, 32, generator=g)
    Y = torch.randint(0, 5, (n,), generator=g)
    for net, (x, y), steps in ((theta0, (pre_x, pre_y), 3),):
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    theta0.eval()
    model = resnet18(num_classes=5)
    model.load_state_dict(theta0.state_dict())
    model.eval()  # BatchNorm frozen while fitting D
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(5):
        for i in range(0, n, 50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[i : i + 50]), Y[i : i + 50]).backward()
            opt.step()
    n_f = max(1, n // 10)
    retain = DataLoader(TensorDataset(X[:-n_f], Y[:-n_f]), batch_size=50)
    forget = DataLoader(TensorDataset(X[-n_f:], Y[-n_f:]), batch_size=50)
    return model, theta0, retain, forget


def run_scrub(model, theta0, retain, forget, *, params: str, ridge: float) -> dict[str, Any]:
    """One ``scrub`` with defaults (except ``params`` and ``ridge``); the outcome as a record."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"params": params, "ridge": ridge}
    try:
        res = scrub(
            model, retain, forget, init=theta0, params=PARAMS[params], ridge=ridge, solver="cg"
        )
    except CGNotConverged as err:
        info = err.info
        rec.update(
            outcome="CGNotConverged",
            message=str(err),
            status=info.status,
            kappa=info.kappa,
            ridge_hint=info.ridge_hint,
            hint_iterations=info.hint_iterations,
            matvec_seconds=info.matvec_seconds,
            iterations=info.iterations,
            matvecs=info.matvecs,
            solve_seconds=info.seconds,
        )
    else:
        solves = res.info["solves"]
        rec.update(
            outcome="converged" if all(s.get("all_converged", True) for s in solves) else "other",
            matvecs=res.info["matvecs"],
            p=res.info["p"],
            passes=res.info.get("passes"),
            solves=[
                {
                    k: s.get(k)
                    for k in (
                        "system",
                        "status",
                        "iterations",
                        "matvecs",
                        "kappa",
                        "seconds",
                        "matvec_seconds",
                        "residuals",
                    )
                }
                for s in solves
            ],
        )
    rec["seconds"] = time.perf_counter() - t0
    rec["peak_rss_mib"] = _peak_rss_mib()
    return rec


def bench(n: int, params_list: list[str], threads: int, out: Path) -> dict[str, Any]:
    torch.set_num_threads(threads)
    doc: dict[str, Any] = {
        "case": f"torchvision resnet18(num_classes=5), N={n}, random CIFAR-shaped data",
        "threads": threads,
        "torch": torch.__version__,
        "runs": [],
    }
    t0 = time.perf_counter()
    model, theta0, retain, forget = make_case(n)
    doc["setup_seconds"] = time.perf_counter() - t0
    for params in params_list:
        rec = run_scrub(model, theta0, retain, forget, params=params, ridge=0.0)
        doc["runs"].append(rec)
        atomic_write_json(out, to_jsonable(doc))
        print(f"[defaults] {params}: {rec['outcome']} in {rec['seconds']:.1f} s", flush=True)
        hint = rec.get("ridge_hint")
        if hint:
            rec2 = run_scrub(model, theta0, retain, forget, params=params, ridge=float(hint))
            rec2["recommended_by"] = "ridge_hint of the defaults' diagnosis"
            doc["runs"].append(rec2)
            atomic_write_json(out, to_jsonable(doc))
            print(
                f"[ridge={hint:.3g}] {params}: {rec2['outcome']} in {rec2['seconds']:.1f} s",
                flush=True,
            )
    return doc


@pytest.mark.skipif(os.environ.get(ENV) != "1", reason=f"set {ENV}=1 to run (minutes on a CPU)")
def test_resnet18_n200_converges_or_diagnoses():
    out = Path(os.environ.get(f"{ENV}_OUT", DEFAULT_OUT))
    doc = bench(200, ["all", "fc"], threads=int(os.environ.get(f"{ENV}_THREADS", "1")), out=out)
    for rec in doc["runs"]:
        assert rec["outcome"] in ("converged", "CGNotConverged")
        if rec["outcome"] == "CGNotConverged":
            assert rec["kappa"] is not None and "κ" in rec["message"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--params", nargs="+", default=["all", "fc"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    bench(a.n, a.params, a.threads, a.out)
    sys.exit(0)
