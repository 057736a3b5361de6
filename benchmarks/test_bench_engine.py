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
import cases
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
    cache: dict, cfg: benchlib.BenchConfig, case: tuple, device: torch.device, timer=None
) -> dict[str, Any]:
    """The epoch record of a case (measured once, then shared with the matvec tests)."""
    key = ("epoch", *case)
    if key not in cache or timer is not None:
        label, n, prec_name = case
        data = _model_and_data(cache, label, n, prec_name, device)
        timer = timer or cases.clock_timer(device)
        cache[key] = cases.train_epoch(
            label, data[0], data[1:], prec_name, cfg.engine_batch, device, timer
        )
    return cache[key]


def test_train_epoch(benchmark, record, cache, bench_config, device, engine_case) -> None:
    timer = cases.pytest_timer(benchmark, device, bench_config.rounds)
    record(**_epoch(cache, bench_config, engine_case, device, timer))


def test_theta_matvec(benchmark, record, cache, bench_config, device, engine_case, vectors) -> None:
    label, n, prec_name = engine_case
    model, X, Y = _model_and_data(cache, label, n, prec_name, device)
    bs = bench_config.engine_batch
    ep = _epoch(cache, bench_config, engine_case, device)
    timer = cases.pytest_timer(benchmark, device, bench_config.rounds)
    rec = cases.theta_matvec(label, model, (X, Y), prec_name, bs, vectors, device, timer, ep)
    akey = ("accuracy", label, prec_name)
    if akey not in cache:
        na = min(bench_config.accuracy_n, n)
        prec = PRECISIONS[prec_name]
        cache[akey] = benchlib.precision_accuracy(
            model, X[:na], Y[:na], prec=prec, batch_size=min(bs, na)
        )
    record(**rec, **cache[akey])


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
    record(**cases.cg_record(bench_config.cg_model, prob, point, rec, base), **mem.to_dict())
    record(seconds=sec)  # pytest-benchmark's timing of the whole solve
