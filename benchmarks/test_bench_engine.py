"""Engine benchmarks: one Θ matvec against one training epoch, its accuracy, and CG iterations.

* ``test_train_epoch``: forward + backward + SGD-momentum step over N samples, BN in eval mode.
* ``test_theta_matvec``: ``Θ V`` (one VJP and one JVP pass over the same N, model, batch size and
  precision) with V of 1 or 8 columns (8: ``vmap`` over the vectors); ``extra_info`` holds the
  ratio to the epoch (per vector), the peak memory against the training epoch's peak, and the
  relative error of Θv against float64 on ``accuracy_n`` samples.
* ``test_cg_iterations``: CG on ``(Θ_DD + λI) x = e`` (λ = N·0.1, e the cross-entropy residual)
  to a relative residual of 1e-4, at both linearisation points (θ0 and w(D)), without and with
  the Nyström preconditioner; matvecs include the preconditioner's build.

Benchmarks record time; they assert nothing about it. Data: random CIFAR-shaped tensors.
"""

from __future__ import annotations

from typing import Any

import benchlib
import pytest
import torch
from benchlib import PRECISIONS, MemoryMeter, ModelSpec, size_params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cfg = benchlib.CONFIGS[metafunc.config.getoption("--bench-size")]
    dev = torch.device(metafunc.config.getoption("--bench-device"))
    precs = benchlib.precisions_for(dev)
    if "engine_case" in metafunc.fixturenames:
        cases = [(m, n, p) for m in cfg.engine_models for n in cfg.engine_n for p in precs]
        ids = [f"{m}-N{n}-{p}" for m, n, p in cases]
        metafunc.parametrize("engine_case", size_params(metafunc.config, cases, ids))
    if "vectors" in metafunc.fixturenames:
        ks = list(cfg.engine_vectors)
        metafunc.parametrize("vectors", size_params(metafunc.config, ks, [f"k{k}" for k in ks]))
    if "cg_case" in metafunc.fixturenames:
        cases = [(pt, r) for pt in ("init", "trained") for r in cfg.cg_ranks]
        ids = [f"{pt}-rank{r}" for pt, r in cases]
        metafunc.parametrize("cg_case", size_params(metafunc.config, cases, ids))


def _model_and_data(
    cache: dict, label: str, n: int, prec_name: str, device: torch.device
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A seeded model (BN calibrated) and N random samples, cached per (model, N, dtype)."""
    prec = PRECISIONS[prec_name]
    key = ("engine", label, n, prec.dtype)
    if key not in cache:
        spec = ModelSpec.parse(label)
        X, Y = benchlib.random_cifar(n, spec.num_classes, device, prec.dtype, seed=1)
        model = benchlib.calibrate_bn(benchlib.make_model(spec, device, prec.dtype, seed=0), X)
        cache[key] = (model, X, Y)
    return cache[key]


def _epoch(
    cache: dict, cfg: benchlib.BenchConfig, case: tuple, device: torch.device
) -> dict[str, Any]:
    """Epoch seconds and memory for a case (measured once, then shared with the matvec tests)."""
    key = ("epoch", *case)
    if key not in cache:
        label, n, prec_name = case
        model, X, Y = _model_and_data(cache, label, n, prec_name, device)
        prec = PRECISIONS[prec_name]
        bs = cfg.engine_batch
        # Warm-up on one batch (kernel selection, lazy init), then the timed epoch.
        benchlib.make_train_epoch(model, X, Y, batch_size=bs, prec=prec, max_samples=bs)()
        epoch = benchlib.make_train_epoch(model, X, Y, batch_size=bs, prec=prec)
        with MemoryMeter(device) as mem:
            sec, _ = benchlib.timed(epoch, device)
        cache[key] = {"epoch_seconds": sec, **mem.to_dict("train_")}
    return cache[key]


def test_train_epoch(benchmark, record, cache, bench_config, device, engine_case) -> None:
    label, n, prec_name = engine_case
    model, X, Y = _model_and_data(cache, label, n, prec_name, device)
    prec = PRECISIONS[prec_name]
    bs = bench_config.engine_batch
    benchlib.make_train_epoch(model, X, Y, batch_size=bs, prec=prec, max_samples=bs)()
    epoch = benchlib.make_train_epoch(model, X, Y, batch_size=bs, prec=prec)
    with MemoryMeter(device) as mem:
        sec, times, _ = benchlib.bench_call(benchmark, epoch, device, bench_config.rounds)
    cache[("epoch", *engine_case)] = {"epoch_seconds": sec, **mem.to_dict("train_")}
    record(
        kind="train_epoch",
        model=label,
        params=benchlib.count_parameters(model),
        n=n,
        precision=prec_name,
        batch_size=bs,
        seconds=sec,
        seconds_all=times,
        **mem.to_dict("train_"),
    )


def test_theta_matvec(benchmark, record, cache, bench_config, device, engine_case, vectors) -> None:
    label, n, prec_name = engine_case
    model, X, Y = _model_and_data(cache, label, n, prec_name, device)
    prec = PRECISIONS[prec_name]
    bs = bench_config.engine_batch
    ep = _epoch(cache, bench_config, engine_case, device)
    # Warm-up: the same product on the first batch only.
    K0 = benchlib.make_ntk(model, X[:bs], Y[:bs], batch_size=bs, prec=prec)
    benchlib.make_matvec(K0, vectors, prec, device)()
    K = benchlib.make_ntk(model, X, Y, batch_size=bs, prec=prec)
    mv = benchlib.make_matvec(K, vectors, prec, device)
    with MemoryMeter(device) as mem:
        sec, times, _ = benchlib.bench_call(benchmark, mv, device, bench_config.rounds)
    akey = ("accuracy", label, prec_name)
    if akey not in cache:
        na = min(bench_config.accuracy_n, n)
        cache[akey] = benchlib.precision_accuracy(
            model, X[:na], Y[:na], prec=prec, batch_size=min(bs, na)
        )
    per_vector = sec / vectors
    train_delta = ep["train_delta_mib"]
    record(
        kind="matvec",
        model=label,
        params=benchlib.count_parameters(model),
        n=n,
        precision=prec_name,
        batch_size=bs,
        vectors=vectors,
        seconds=sec,
        seconds_all=times,
        seconds_per_vector=per_vector,
        epoch_seconds=ep["epoch_seconds"],
        ratio_matvec_to_epoch=sec / ep["epoch_seconds"],
        ratio_per_vector_to_epoch=per_vector / ep["epoch_seconds"],
        **cache[akey],
        train_peak_mib=ep["train_peak_mib"],
        train_delta_mib=train_delta,
        memory_ratio_to_train=benchlib.memory_ratio(mem.delta_mib, train_delta),
        **mem.to_dict(),
    )


def _cg_problem(cache: dict, cfg: benchlib.BenchConfig, device: torch.device):
    """The small-CIFAR-like problem: θ0 briefly pre-trained, w(D) fine-tuned with the recipe."""
    if "cg_problem" not in cache:
        spec = ModelSpec.parse(cfg.cg_model)
        cache["cg_problem"] = benchlib.make_scrub_problem(
            spec,
            cfg.cg_n,
            device,
            pretrain_epochs=cfg.cg_pretrain_epochs,
            finetune_epochs=cfg.cg_finetune_epochs,
        )
    return cache["cg_problem"]


def test_cg_iterations(benchmark, record, cache, bench_config, device, cg_case) -> None:
    point, rank = cg_case
    prob = _cg_problem(cache, bench_config, device)
    model = prob.init if point == "init" else prob.model
    X, Y = prob.data
    n = X.shape[0]
    ridge = n * benchlib.RECIPE["weight_decay"]  # the reference convention λ = N·wd
    bs = bench_config.engine_batch
    K = benchlib.make_ntk(model, X, Y, batch_size=bs, prec=PRECISIONS["fp32"], ridge=ridge)
    e = benchlib.ce_residual(K)

    def solve() -> dict[str, Any]:
        return benchlib.cg_solve_record(
            K, e, rank=rank, tol=1e-4, max_iter=bench_config.cg_max_iter, seed=0
        )

    with MemoryMeter(device) as mem:
        sec, _, rec = benchlib.bench_call(benchmark, solve, device, 1)
    cache[("cg", point, rank)] = rec
    base = cache.get(("cg", point, 0))
    record(
        kind="cg",
        model=bench_config.cg_model,
        params=prob.p,
        n=n,
        point=point,
        notes=prob.notes,
        iterations_ratio_unpreconditioned=(
            base["iterations"] / rec["iterations"] if base and rec["iterations"] else None
        ),
        matvecs_ratio_unpreconditioned=(
            base["matvecs_total"] / rec["matvecs_total"] if base and rec["matvecs_total"] else None
        ),
        **{k: v for k, v in rec.items() if k != "seconds"},
        seconds=sec,
        **mem.to_dict(),
    )
