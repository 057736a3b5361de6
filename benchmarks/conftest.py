"""pytest options and fixtures of the ntkscrub benchmarks.

Options:
    --bench-size {smoke,cpu,gpu}   smoke (default): seconds on two CPU cores; cpu: a few minutes;
                                   gpu: the issue's sizes (N up to 50,000; see benchlib.CONFIGS).
    --bench-device {cpu,cuda}      where models, data and products live (default cpu).
    --bench-threads N              torch intra-op threads (default 1 on the CPU: the host's two
                                   cores are shared; recorded in every result).

Every parameter set of the smoke size carries the ``smoke`` marker, so CI runs
``pytest benchmarks -m smoke --benchmark-disable`` (each case once, real runs at toy size).
Results go into pytest-benchmark's JSON (``--benchmark-json=PATH``): timings in ``stats`` and
everything else (ratios, iterations, memory, hardware) in each benchmark's ``extra_info``;
``python benchmarks/report.py PATH --out DIR`` turns it into tables and plots.
"""

from __future__ import annotations

import warnings
from typing import Any

import benchlib
import pytest
import torch
from benchlib import size_params  # noqa: F401 - re-exported for old imports

from ntkscrub.io import to_jsonable
from ntkscrub.recipes.runtime import hardware

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ntkscrub benchmarks")
    group.addoption(
        "--bench-size",
        choices=sorted(benchlib.CONFIGS),
        default="smoke",
        help="problem sizes (default: smoke, seconds on two CPU cores)",
    )
    group.addoption(
        "--bench-device", choices=("cpu", "cuda"), default="cpu", help="device (default: cpu)"
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: 1 on cpu, unchanged on cuda)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "smoke: small-size benchmark runs used in CI")
    threads = config.getoption("--bench-threads", default=None)
    if threads is None and config.getoption("--bench-device", default="cpu") == "cpu":
        threads = 1  # shared two-core host: one thread per process keeps timings comparable
    benchlib.set_threads(threads)


@pytest.fixture(scope="session")
def bench_config(request: pytest.FixtureRequest) -> benchlib.BenchConfig:
    return benchlib.CONFIGS[request.config.getoption("--bench-size")]


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    return benchlib.resolve_device(request.config.getoption("--bench-device"))


@pytest.fixture(scope="session")
def cache() -> dict:
    """Session-wide store of models, data and measurements shared between benchmarks (e.g. the
    epoch time that a matvec benchmark divides by)."""
    return {}


@pytest.fixture
def record(benchmark: Any, bench_config: benchlib.BenchConfig, device: torch.device):
    """``record(**fields)``: add fields (plus size, device, threads) to ``benchmark.extra_info``."""

    def _record(**fields: Any) -> None:
        base = {
            "schema": benchlib.SCHEMA,
            "bench_size": bench_config.name,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        }
        benchmark.extra_info.update(to_jsonable({**base, **fields}))

    return _record


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Add the torch/GPU/TF32/threads facts to pytest-benchmark's ``machine_info``."""
    dev = benchlib.resolve_device(config.getoption("--bench-device"))
    machine_info["ntkscrub"] = to_jsonable(hardware(dev))
    machine_info["ntkscrub"]["bench_size"] = config.getoption("--bench-size")
