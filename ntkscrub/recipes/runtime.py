"""The pipeline runtime shared by the reproduction, the GPU benchmark suite and the demo.

A run is a list of *stages* under one wall-clock :class:`Budget`; a :class:`RunLog` checks the
budget before each stage, logs it, records its wall time, and writes the run's JSON record
(through :func:`ntkscrub.io.write_record`, the one JSON writer). :func:`hardware` says what the run
ran on; :func:`cache_key` names cached artefacts (checkpoints, finished seeds) by their settings.

Nothing here knows about forgetting: the stages themselves live with their application
(:mod:`ntkscrub.recipes.reproduction.stages`, ``benchmarks/gpu_suite.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ntkscrub.io import write_record

__all__ = [
    "Budget",
    "BudgetExceeded",
    "RunLog",
    "cache_key",
    "hardware",
    "log",
    "set_threads",
    "tf32_flags",
]


class BudgetExceeded(RuntimeError):
    """Raised by :meth:`Budget.check` once the budget (or the current stage's share) is spent."""


class Budget:
    """A wall-clock budget of ``seconds`` (``None``: unlimited), checked between stages.

    Optionally split into stage allowances (the GPU suite): :meth:`start_stage` opens a stage
    with a ``share`` of the total plus whatever earlier stages left unused; ``reserve`` seconds
    at the end are kept for writing the results.
    """

    def __init__(self, seconds: float | None, *, reserve: float = 0.0) -> None:
        if seconds is not None and not (isinstance(seconds, (int, float)) and seconds > 0):
            raise ValueError(f"seconds: expected a number > 0 or None, got {seconds!r}")
        if not (isinstance(reserve, (int, float)) and reserve >= 0):
            raise ValueError(f"reserve: expected a number ≥ 0, got {reserve!r}")
        self.t0 = time.perf_counter()
        self.seconds, self.reserve = seconds, float(reserve)
        self.deadline = math.inf if seconds is None else self.t0 + seconds - self.reserve
        self.stage_deadline = self.deadline
        self.carry = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        """Seconds left in the current stage (never more than in the run; ``inf`` unlimited)."""
        return max(0.0, min(self.stage_deadline, self.deadline) - time.perf_counter())

    def check(self, stage: str) -> None:
        """Raise :class:`BudgetExceeded` when nothing is left before ``stage``."""
        if self.left() <= 0:
            raise BudgetExceeded(f"budget of {self.seconds:.0f}s spent before stage '{stage}'")

    def start_stage(self, share: float) -> float:
        """Open a stage with ``share`` of the total plus the unused carry; ``share ≤ 0`` means
        everything that is left. Returns the stage's seconds."""
        if share <= 0 or self.seconds is None:
            self.stage_deadline = self.deadline
        else:
            end = time.perf_counter() + share * self.seconds + self.carry
            self.stage_deadline = min(self.deadline, end)
        return self.left()

    def end_stage(self) -> None:
        """Close the stage; what it did not use passes on to the next one."""
        self.carry = max(0.0, self.stage_deadline - time.perf_counter())
        self.stage_deadline = self.deadline

    def fits(self, estimate: float, safety: float = 1.0) -> bool:
        """Whether ``safety × estimate`` seconds still fit into the current stage."""
        return safety * estimate <= self.left()


def log(msg: str) -> None:
    """A timestamped progress line on stderr (tqdm-safe)."""
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    try:
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(line, file=sys.stderr, flush=True)


def cache_key(obj: Any) -> str:
    """Short stable hash of a JSON-able object: the name of a cached artefact made from it."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class RunLog:
    """Stage timings of one run under one budget, and its JSON record.

    Attributes:
        budget: the run's :class:`Budget`.
        timings: stage name → wall seconds (summed over repeated stages of one name).
        verbose: log each stage on stderr.
    """

    budget: Budget
    timings: dict[str, float] = field(default_factory=dict)
    verbose: bool = True

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Check the budget, log the stage and add its wall time to ``timings[name]``."""
        self.budget.check(name)
        if self.verbose:
            log(f"stage {name} (elapsed {self.budget.elapsed():.0f}s)")
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t

    def write(self, path: str | os.PathLike, record: dict[str, Any]) -> Path:
        """Write ``record`` (JSON-able after :func:`ntkscrub.io.to_jsonable`) atomically."""
        return write_record(path, record)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def tf32_flags() -> dict[str, Any]:
    """The TF32 settings in force (legacy flags, and the torch ≥ 2.9 ``fp32_precision`` ones)."""
    out: dict[str, Any] = {}
    try:
        out["matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        out["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError as err:  # torch ≥ 2.9 refuses to read legacy flags after new-API writes
        out["legacy_flags_error"] = str(err)[:200]
    for name, obj in (
        ("matmul_fp32_precision", getattr(torch.backends.cuda, "matmul", None)),
        ("cudnn_fp32_precision", getattr(torch.backends, "cudnn", None)),
    ):
        try:
            val = getattr(obj, "fp32_precision", None)
        except RuntimeError:  # mixed legacy/new API use: report what we can
            val = "unreadable"
        if val is not None:
            out[name] = str(val)
    out["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return out


def hardware(device: torch.device | str) -> dict[str, Any]:
    """What a run ran on: CPU model (lscpu), cores, threads, load, platform, library versions and,
    on CUDA, the GPU, its memory and the TF32 / cuDNN settings."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "device": str(device),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        # the CPU hosts are shared: say how busy the machine was
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tf32_default_flags": tf32_flags(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            {
                "gpu": props.name,
                "gpu_capability": f"{props.major}.{props.minor}",
                "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
                "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            }
        )
    return info


def set_threads(requested: int | None, device: torch.device | str = "cpu") -> str:
    """Set torch's CPU threads; returns what was done, for the record.

    ``requested > 0``: that many. ``0``: auto — 1 thread when the machine is already loaded
    (OpenMP threads that spin while their sibling is descheduled made small ops ~7× slower on a
    shared 2-core machine), else torch's default. ``None``: leave as is.
    """
    device = torch.device(device)
    if requested is not None and requested > 0:
        torch.set_num_threads(requested)
        return f"{requested} (requested)"
    if requested is None or device.type != "cpu" or not hasattr(os, "getloadavg"):
        return f"{torch.get_num_threads()} (torch default)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0]
    if cores and load > 0.75 * cores:
        torch.set_num_threads(1)
        return f"1 (auto: load average {load:.1f} on {cores} cores)"
    return f"{torch.get_num_threads()} (auto: load average {load:.1f} on {cores} cores)"
