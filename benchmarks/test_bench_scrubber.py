"""Amortised deletion requests against an honest yardstick (issue 14, items 1 and 5).

One case at size N, all measured in the same process, one after another:

1. w(D): ``ntkscrub.baselines.retrain`` from θ0 on D with the paper's fine-tuning recipe
   (``FINETUNE_RECIPE``: SGD lr 0.01, momentum 0.9, weight decay 0.1 toward θ0, batch 128) for
   ``epochs`` epochs and then until zero training error — the stopping rule recorded.
2. the yardstick: ``retrain`` on D_r with exactly that recipe and stopping rule (epochs measured);
3. a fresh ``scrub(model, D_r, D_f)`` (CE residual at θ0, ``weight_decay`` = the recipe's 0.1,
   i.e. λ = |S|·0.1 per system, float32 CG at its default tol 1e-3);
4. ``Scrubber`` preparation over D, then request 1 (D_f, the same samples as the scrub) and
   request 2 (another |D_f| samples; the result removes both).

Recorded: seconds and matvecs of each, the ratios to the retrain and to the fresh scrub, and the
agreement of request 1's shift with the fresh scrub's and, up to N = 1024, the error of both
against a float64 scrub (tol 1e-10). Data: Gaussian class clusters (learnable,
seeded); model: an MLP 64-128-128-c from ``build_model`` (float32, θ0 its seeded init).
Benchmarks record time; they assert nothing about it.

CLI (writes one JSON with every case):
    python benchmarks/test_bench_scrubber.py --n 256 1024 4096 \
        --out benchmarks/results/cpu/cpu_scrubber.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ntkscrub import Scrubber, retrain, scrub
from ntkscrub.baselines import FINETUNE_RECIPE
from ntkscrub.io import to_jsonable
from ntkscrub.recipes.models import build_model

SIZES = {"smoke": [48], "cpu": [256, 1024, 4096], "gpu": [256, 1024, 4096]}
IN_FEATURES, HIDDEN, CLASSES = 64, (128, 128), 5
# Epochs before the zero-error criterion takes over (both trainings): the reproduction presets'
# fine-tuning length (recipes/reproduction/config.py, finetune_epochs=10).
EPOCHS = 10
FORGET_FRACTION = 0.02
REFERENCE_MAX_N = 1024  # float64 reference shift up to this N (cost: a float64 scrub)


def make_problem(n: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """θ0 (seeded MLP, float32, eval) and N samples from Gaussian class clusters."""
    g = torch.Generator().manual_seed(seed + 1)
    means = torch.randn(CLASSES, IN_FEATURES, generator=g)
    Y = torch.randint(0, CLASSES, (n,), generator=g)
    X = means[Y] + torch.randn(n, IN_FEATURES, generator=g)
    init = build_model("mlp", CLASSES, 1.0, in_features=IN_FEATURES, hidden=HIDDEN, seed=seed)
    return init.float().eval(), X, Y


def _train(init: torch.nn.Module, data: tuple, seed: int) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = retrain(
        init,
        data,
        init=init,
        epochs=EPOCHS,
        lr=FINETUNE_RECIPE["lr"],
        weight_decay=FINETUNE_RECIPE["weight_decay"],
        until_zero_error=True,
        seed=seed,
        progress=False,
    )
    return out, time.perf_counter() - t0


def run_case(n: int, seed: int = 0) -> dict[str, Any]:
    """Every measurement of one N (see the module docstring)."""
    init, X, Y = make_problem(n, seed)
    nf = max(1, round(FORGET_FRACTION * n))
    trained, train_s = _train(init, (X, Y), seed)
    model = trained.model.eval()
    retain, forget = (X[nf:], Y[nf:]), (X[:nf], Y[:nf])
    yard, retrain_s = _train(init, retain, seed)
    # cg as the Scrubber runs (solver="auto", the default, may take the dense twin)
    kw = {
        "init": init,
        "loss": "ce",
        "weight_decay": FINETUNE_RECIPE["weight_decay"],
        "solver": "cg",
    }

    t0 = time.perf_counter()
    fresh = scrub(model, retain, forget, **kw)
    scrub_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = Scrubber(model, (X, Y), **kw)
    prep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    req1 = s.forget(list(range(nf)))
    req1_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    req2 = s.forget(list(range(nf, 2 * nf)))
    req2_s = time.perf_counter() - t0

    ref = _reference(model, init, X, Y, nf) if n <= REFERENCE_MAX_N else None
    prep_mv, mv1, mv2 = s.prepare_info["matvecs"], req1.info["matvecs"], req2.info["matvecs"]
    scrub_mv = fresh.info["matvecs"]
    agree = float((req1.shift - fresh.shift).norm() / fresh.shift.norm())
    return {
        "n": n,
        "n_forget_per_request": nf,
        "p": fresh.info["p"],
        "classes": CLASSES,
        "dtype": fresh.info["dtype"],
        "tol": fresh.info["tol"],
        "recipe": {**FINETUNE_RECIPE, "epochs": EPOCHS, "until_zero_error": True},
        "train_wD": {"seconds": train_s, "epochs": trained.info["epochs_run"]},
        "retrain": {
            "seconds": retrain_s,
            "epochs": yard.info["epochs_run"],
            "reached_zero_error": yard.info["reached_zero_error"],
            "seconds_per_epoch": retrain_s / max(1, yard.info["epochs_run"]),
        },
        "scrub": {
            "seconds": scrub_s,
            "matvecs": scrub_mv,
            "converged": fresh.info["converged"],
            "iterations": [r.get("iterations") for r in fresh.info["solves"]],
        },
        "prepare": {"seconds": prep_s, **_plain(s.prepare_info)},
        "request_1": {"seconds": req1_s, **req1.info["request"]},
        "request_2": {"seconds": req2_s, **req2.info["request"]},
        "request_1_vs_scrub_shift_rel_diff": agree,
        "float64_reference": None
        if ref is None
        else {
            "scrub_shift_rel_error": _rel(fresh.shift, ref),
            "request_1_shift_rel_error": _rel(req1.shift, ref),
            "what": "scrub in float64 (same w(D), θ0, data), tol 1e-10",
        },
        "ratios": {
            "scrub_over_retrain": scrub_s / retrain_s,
            "prepare_over_retrain": prep_s / retrain_s,
            "request_1_over_retrain": req1_s / retrain_s,
            "request_2_over_retrain": req2_s / retrain_s,
            "request_1_over_scrub_seconds": req1_s / scrub_s,
            "request_1_over_scrub_matvecs": mv1 / scrub_mv,
            "request_2_over_scrub_matvecs": mv2 / scrub_mv,
            "prepare_plus_request_over_scrub_matvecs": (prep_mv + mv1) / scrub_mv,
        },
    }


def run_prefix_case(n: int, arch: str = "mlp", seed: int = 0) -> dict[str, Any]:
    """Issue 14 item 6: head-only linearisation (``params=r"^classifier\\."``) with the frozen
    features computed once (``cache_prefix=True``) vs streamed through every product.
    ``arch``: the MLP, or ``"smallcnn"`` (three 3×3 convolutions + BN) on the same data as
    1×8×8 images."""
    init, X, Y = make_problem(n, seed)
    if arch == "smallcnn":
        X = X.reshape(n, 1, 8, 8)
        init = build_model("smallcnn", CLASSES, 1.0, in_channels=1, seed=seed).float().eval()
    nf = max(1, round(FORGET_FRACTION * n))
    model = _train(init, (X, Y), seed)[0].model.eval()
    # cg: the measured effect is the prefix cache on every product (auto may pick dense here)
    kw = {
        "init": init,
        "loss": "ce",
        "weight_decay": FINETUNE_RECIPE["weight_decay"],
        "solver": "cg",
    }
    out: dict[str, Any] = {"n": n, "arch": arch, "params": r"^classifier\.", "n_forget": nf}
    shifts = {}
    for cache in (True, False):
        t0 = time.perf_counter()
        s = Scrubber(model, (X, Y), params=r"^classifier\.", cache_prefix=cache, **kw)
        prep_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = s.forget(list(range(nf)))
        req_s = time.perf_counter() - t0
        shifts[cache] = res.shift
        out["cached" if cache else "streamed"] = {
            "prepare_seconds": prep_s,
            "request_seconds": req_s,
            "prepare_matvecs": s.prepare_info["matvecs"],
            "request_matvecs": res.info["matvecs"],
            "p": res.info["p"],
            "prefix_cached": s.prepare_info["prefix_cached"],
        }
    c, st = out["cached"], out["streamed"]
    out["speedup_prepare"] = st["prepare_seconds"] / c["prepare_seconds"]
    out["speedup_request"] = st["request_seconds"] / c["request_seconds"]
    out["shift_rel_diff"] = _rel(shifts[True], shifts[False].double())
    return out


def _reference(model: Any, init: Any, X: Any, Y: Any, nf: int) -> torch.Tensor:
    """The float64 shift of the same scrub (tol 1e-10): what both float32 shifts should match."""
    m64, i64, X64 = copy.deepcopy(model).double(), copy.deepcopy(init).double(), X.double()
    wd = FINETUNE_RECIPE["weight_decay"]
    res = scrub(
        m64,
        (X64[nf:], Y[nf:]),
        (X64[:nf], Y[:nf]),
        init=i64,
        loss="ce",
        weight_decay=wd,
        tol=1e-10,
        solver="cg",
    )
    return res.shift


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def _plain(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k != "solves"}


# --------------------------------------------------------------------------- pytest
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "scrubber_n" in metafunc.fixturenames:
        size = metafunc.config.getoption("--bench-size")
        marks = [pytest.mark.smoke] if size == "smoke" else []
        ns = SIZES[size]
        metafunc.parametrize("scrubber_n", [pytest.param(n, marks=marks, id=f"N{n}") for n in ns])


def test_scrubber_vs_retrain(benchmark, record, device, scrubber_n) -> None:
    if device.type != "cpu":
        pytest.skip("the Scrubber yardstick runs on the CPU (float32 MLP)")
    box: dict[str, Any] = {}

    def case() -> None:
        box["rec"] = run_case(scrubber_n)

    benchmark.pedantic(case, rounds=1, iterations=1, warmup_rounds=0)
    rec = box["rec"]
    assert rec["scrub"]["converged"] and rec["request_1"]["converged"]  # correctness, not speed
    record(**rec)


@pytest.mark.parametrize("arch", ["mlp", "smallcnn"])
def test_scrubber_cached_prefix(benchmark, record, device, scrubber_n, arch) -> None:
    if device.type != "cpu":
        pytest.skip("the Scrubber yardstick runs on the CPU (float32 MLP)")
    box: dict[str, Any] = {}

    def case() -> None:
        box["rec"] = run_prefix_case(scrubber_n, arch)

    benchmark.pedantic(case, rounds=1, iterations=1, warmup_rounds=0)
    rec = box["rec"]
    assert rec["cached"]["prefix_cached"] is not None and rec["streamed"]["prefix_cached"] is None
    record(**rec)


# --------------------------------------------------------------------------- CLI
def _write(path: Path, t0: float, cases: list, prefix_cases: list) -> None:
    """Write everything measured so far (after every case: a cut run keeps its results)."""
    out = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "total_seconds": time.perf_counter() - t0,
        "cases": cases,
        "prefix_cases": prefix_cases,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(out), indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=SIZES["cpu"])
    ap.add_argument("--prefix-n", type=int, nargs="*", default=[4096])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run_case(32)  # warm-up (imports, first-call allocations); not recorded
    t0 = time.perf_counter()
    cases: list[dict[str, Any]] = []
    prefix_cases: list[dict[str, Any]] = []
    for n in args.n:
        rec = run_case(n)
        cases.append(rec)
        r = rec["ratios"]
        print(
            f"N={n}: retrain {rec['retrain']['seconds']:.1f}s ({rec['retrain']['epochs']} ep), "
            f"scrub {rec['scrub']['seconds']:.1f}s/{rec['scrub']['matvecs']}mv, "
            f"prepare {rec['prepare']['seconds']:.1f}s/{rec['prepare']['matvecs']}mv, "
            f"request {rec['request_1']['seconds']:.2f}s/{rec['request_1']['matvecs']}mv; "
            f"scrub/retrain {r['scrub_over_retrain']:.2f}, "
            f"request/retrain {r['request_1_over_retrain']:.3f}",
            flush=True,
        )
        _write(args.out, t0, cases, prefix_cases)
    for n, arch in [(n, a) for n in args.prefix_n for a in ("mlp", "smallcnn")]:
        rec = run_prefix_case(n, arch)
        prefix_cases.append(rec)
        print(
            f"head-only {arch} N={n}: cached prefix, speed-up prepare "
            f"{rec['speedup_prepare']:.2f}x, "
            f"request {rec['speedup_request']:.2f}x (shift rel diff {rec['shift_rel_diff']:.1e})",
            flush=True,
        )
        _write(args.out, t0, cases, prefix_cases)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
