"""Scaling benchmarks: ``scrub(solver='dense' | 'cg')`` over |D| and over model size, against
retraining on D_r with the same recipe on the same device.

Problem (per model and N): N random CIFAR-shaped samples with random labels, |D_f| = 5 %; θ0 the
seeded network with calibrated BatchNorm statistics; w(D) = θ0 after one epoch of the fine-tuning
recipe on D. Scrub: ``linearize_at='init'``, cross-entropy residuals, ``weight_decay=0.1``
(λ = N·0.1 per system, the reference convention), ``form='solves'``, CG tolerance 1e-4 per column,
Nyström preconditioner of the size's rank. Dense: the library's explicit-Jacobian path, capped by
``max_dense_bytes``; where it refuses (``DenseTooLarge``) the point is recorded with
``status='skipped'`` and the message, and the run goes on.

Retrain time = (measured seconds per epoch of ``ntkscrub.training.train`` on D_r with the
recipe: lr 0.01, momentum 0.9, wd 0.1 toward θ0, batch 128, BN frozen) × 25 epochs (the reference
run's fine-tuning length); ``ratio_scrub_to_retrain`` = scrub seconds / that.

Benchmarks record time; they assert nothing about it.
"""

from __future__ import annotations

from typing import Any

import benchlib
import cases
import pytest
import torch
from benchlib import ModelSpec, size_params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cfg = benchlib.CONFIGS[metafunc.config.getoption("--bench-size")]
    if "scaling_case" in metafunc.fixturenames:
        # solver varies fastest so consecutive cases share one cached problem
        cases = [
            (m, n, s) for m in cfg.scaling_models for n in cfg.scaling_n for s in ("cg", "dense")
        ]
        ids = [f"{m}-N{n}-{s}" for m, n, s in cases]
        metafunc.parametrize("scaling_case", size_params(metafunc.config, cases, ids))
    if "size_model" in metafunc.fixturenames:
        ms = list(cfg.size_models)
        metafunc.parametrize("size_model", size_params(metafunc.config, ms, ms))
    if "variant" in metafunc.fixturenames:
        vs = list(_variants(cfg))
        metafunc.parametrize("variant", size_params(metafunc.config, vs, vs))


def _problem(cache: dict, label: str, n: int, device: torch.device) -> benchlib.ScrubProblem:
    """One cached problem at a time (large N would not fit many)."""
    key = (label, n)
    if cache.get("scrub_key") != key:
        cache.pop("scrub_problem", None)
        benchlib.free_memory(device)
        cache["scrub_problem"] = benchlib.make_scrub_problem(ModelSpec.parse(label), n, device)
        cache["scrub_key"] = key
    return cache["scrub_problem"]


def _retrain(cache: dict, label: str, n: int, device: torch.device) -> dict[str, Any]:
    key = ("retrain", label, n)
    if key not in cache:
        cache[key] = benchlib.measure_retrain(_problem(cache, label, n, device), device)
    return cache[key]


def _scrub_and_record(
    benchmark: Any,
    record: Any,
    cache: dict,
    cfg: benchlib.BenchConfig,
    device: torch.device,
    label: str,
    n: int,
    solver: str,
    kind: str,
    **overrides: Any,
) -> dict[str, Any]:
    benchlib.warm_up_scrub(ModelSpec.parse(label), device, solver, cfg.scrub_batch, cache)
    prob = _problem(cache, label, n, device)
    rt = _retrain(cache, label, n, device)
    opts: dict[str, Any] = {
        "solver": solver,
        "batch_size": cfg.scrub_batch,
        "precond_rank": cfg.scrub_rank,
        "max_dense_bytes": cfg.max_dense_bytes,
    }
    opts.update(overrides)
    box: dict[str, Any] = {}

    def call() -> None:
        box["rec"] = benchlib.run_scrub(prob, device, **opts)

    benchmark.pedantic(call, rounds=1, iterations=1, warmup_rounds=0)
    rec = box["rec"]
    record(**cases.scrub_record(kind, label, n, prob, rt, rec))
    return rec


def test_scrub_scaling(benchmark, record, cache, bench_config, device, scaling_case) -> None:
    label, n, solver = scaling_case
    _scrub_and_record(benchmark, record, cache, bench_config, device, label, n, solver, "scaling")


def test_scrub_model_size(benchmark, record, cache, bench_config, device, size_model) -> None:
    _scrub_and_record(
        benchmark,
        record,
        cache,
        bench_config,
        device,
        size_model,
        bench_config.size_n,
        "cg",
        "model_size",
    )


def _variants(cfg: benchlib.BenchConfig) -> dict[str, dict[str, Any]]:
    """Scrub settings compared at one (model, N): the speed knobs of the issue (the smoke size
    keeps the four that exercise distinct code paths)."""
    r = cfg.scrub_rank
    if cfg.name == "smoke":
        return {
            "baseline": {},
            "no-precond": {"precond_rank": 0},
            "own-Dr-precond": {"share_precond": False},
            "block-form": {"form": "block", "ridge": "N*0.1"},
            "trained-point": {"linearize_at": "trained"},
        }
    return {
        "baseline": {},
        "no-precond": {"precond_rank": 0},
        f"rank{4 * r}": {"precond_rank": 4 * r},
        "batch/2": {"batch_size": max(1, cfg.scrub_batch // 2)},
        "batch*2": {"batch_size": cfg.scrub_batch * 2},
        "no-warm-start": {"warm_start": False},
        "own-Dr-precond": {"share_precond": False},
        # the block form needs one ridge for both systems: λ = N·0.1 (the Θ_DD value) for both
        "solves-fixed-ridge": {"ridge": "N*0.1"},
        "block-form": {"form": "block", "ridge": "N*0.1"},
        "trained-point": {"linearize_at": "trained"},
    }


def test_scrub_variant(benchmark, record, cache, bench_config, device, variant) -> None:
    label, n = bench_config.scaling_models[0], bench_config.variant_n
    over = dict(_variants(bench_config)[variant])
    if over.get("ridge") == "N*0.1":
        over["ridge"] = n * benchlib.RECIPE["weight_decay"]
    rec = _scrub_and_record(
        benchmark, record, cache, bench_config, device, label, n, "cg", "variant", **over
    )
    benchmark.extra_info["variant"] = variant
    assert rec["status"] in ("ok", "skipped", "oom")
