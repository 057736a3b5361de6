"""Benchmark cases shared by the pytest-benchmark tests (``test_bench_*.py``) and ``gpu_suite.py``.

Each case measures one thing with a *timer* — pytest-benchmark's (:func:`pytest_timer`) or a plain
synchronised clock (:func:`clock_timer`) — and returns the record both harnesses store, so a
record means the same whichever harness wrote it and ``report.py`` reads both alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import benchlib
import torch
from benchlib import PRECISIONS, MemoryMeter
from torch import Tensor, nn

__all__ = [
    "Timer",
    "clock_timer",
    "pytest_timer",
    "train_epoch",
    "theta_matvec",
    "cg_record",
    "scrub_record",
]

#: ``timer(fn) -> (seconds, every call's seconds or None)``
Timer = Callable[[Callable[[], Any]], tuple[float, list[float] | None]]


def clock_timer(device: torch.device) -> Timer:
    """One synchronised call (the GPU suite: every second counts)."""
    return lambda fn: (benchlib.timed(fn, device)[0], None)


def pytest_timer(benchmark: Any, device: torch.device, rounds: int) -> Timer:
    """pytest-benchmark's ``pedantic`` rounds; the minimum, and every round's seconds."""

    def timer(fn: Callable[[], Any]) -> tuple[float, list[float] | None]:
        sec, times, _ = benchlib.bench_call(benchmark, fn, device, rounds)
        return sec, times

    return timer


def _with_times(rec: dict[str, Any], times: list[float] | None) -> dict[str, Any]:
    return rec if times is None else {**rec, "seconds_all": times}


def train_epoch(
    label: str,
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    prec_name: str,
    batch_size: int,
    device: torch.device,
    timer: Timer,
) -> dict[str, Any]:
    """One training epoch (forward + backward + SGD-momentum step over N, BN in eval mode) after a
    one-batch warm-up; the ``train_epoch`` record (with ``train_`` memory fields)."""
    X, Y = data
    prec = PRECISIONS[prec_name]
    benchlib.make_train_epoch(
        model, X, Y, batch_size=batch_size, prec=prec, max_samples=batch_size
    )()
    epoch = benchlib.make_train_epoch(model, X, Y, batch_size=batch_size, prec=prec)
    with MemoryMeter(device) as mem:
        sec, times = timer(epoch)
    rec = {
        "kind": "train_epoch",
        "model": label,
        "params": benchlib.count_parameters(model),
        "n": X.shape[0],
        "precision": prec_name,
        "batch_size": batch_size,
        "seconds": sec,
        **mem.to_dict("train_"),
    }
    return _with_times(rec, times)


def theta_matvec(
    label: str,
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    prec_name: str,
    batch_size: int,
    vectors: int,
    device: torch.device,
    timer: Timer,
    epoch: dict[str, Any],
) -> dict[str, Any]:
    """``Θ V`` with V of ``vectors`` columns (one VJP and one JVP pass over the same N, model,
    batch size and precision as the epoch), after a warm-up on the first batch; the ``matvec``
    record with its ratios to ``epoch`` (a :func:`train_epoch` record)."""
    X, Y = data
    prec = PRECISIONS[prec_name]
    bs = batch_size
    K0 = benchlib.make_ntk(model, X[:bs], Y[:bs], batch_size=bs, prec=prec)
    benchlib.make_matvec(K0, vectors, prec, device)()
    K = benchlib.make_ntk(model, X, Y, batch_size=bs, prec=prec)
    mv = benchlib.make_matvec(K, vectors, prec, device)
    with MemoryMeter(device) as mem:
        sec, times = timer(mv)
    ep_s, train_delta = epoch["seconds"], epoch["train_delta_mib"]
    rec = {
        "kind": "matvec",
        "model": label,
        "params": benchlib.count_parameters(model),
        "n": X.shape[0],
        "precision": prec_name,
        "batch_size": bs,
        "vectors": vectors,
        "seconds": sec,
        "seconds_per_vector": sec / vectors,
        "epoch_seconds": ep_s,
        "ratio_matvec_to_epoch": sec / ep_s,
        "ratio_per_vector_to_epoch": sec / vectors / ep_s,
        "train_peak_mib": epoch["train_peak_mib"],
        "train_delta_mib": train_delta,
        "memory_ratio_to_train": benchlib.memory_ratio(mem.delta_mib, train_delta),
        "autocast_workaround": prec.autocast is not None,
        **mem.to_dict(),
    }
    return _with_times(rec, times)


def cg_record(
    model: str,
    problem: benchlib.ScrubProblem,
    point: str,
    solve: dict[str, Any],
    unpreconditioned: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ``cg`` record of one solve (:func:`benchlib.cg_solve_record`) at ``point`` (``init`` or
    ``trained``), with its iteration and matvec ratios to the unpreconditioned solve."""
    b, n = unpreconditioned, problem.data[0].shape[0]
    its, mvs = solve["iterations"], solve["matvecs_total"]
    return {
        "kind": "cg",
        "model": model,
        "params": problem.p,
        "n": n,
        "point": point,
        "notes": problem.notes,
        "iterations_ratio_unpreconditioned": b["iterations"] / its if b and its else None,
        "matvecs_ratio_unpreconditioned": b["matvecs_total"] / mvs if b and mvs else None,
        **solve,
    }


def scrub_record(
    kind: str,
    label: str,
    n: int,
    problem: benchlib.ScrubProblem,
    retrain: dict[str, Any],
    scrub: dict[str, Any],
) -> dict[str, Any]:
    """The record of one scrub (:func:`benchlib.run_scrub`) on ``problem`` beside the measured
    retraining (:func:`benchlib.measure_retrain`): ``kind`` is ``scaling``, ``model_size``,
    ``variant`` or ``capped``."""
    ok = scrub["status"] == "ok"
    return {
        "kind": kind,
        "model": label,
        "params": problem.p,
        "n": n,
        "n_retain": problem.retain[0].shape[0],
        "n_forget": problem.forget[0].shape[0],
        "problem_notes": problem.notes,
        "ratio_scrub_to_retrain": scrub["seconds"] / retrain["retrain_seconds"] if ok else None,
        **retrain,
        **scrub,
    }
