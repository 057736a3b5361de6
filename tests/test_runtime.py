"""The pipeline runtime (ntkscrub.recipes.runtime) and the one JSON record writer."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from ntkscrub.io import write_record
from ntkscrub.recipes.runtime import (
    Budget,
    BudgetExceeded,
    RunLog,
    cache_key,
    hardware,
    set_threads,
)


def test_budget_check_raises_once_spent() -> None:
    b = Budget(0.05)
    b.check("first")  # time left
    time.sleep(0.06)
    assert b.left() == 0.0 and b.elapsed() >= 0.05
    with pytest.raises(BudgetExceeded, match="before stage 'late'"):
        b.check("late")
    unlimited = Budget(None)
    assert unlimited.left() == math.inf and unlimited.fits(1e9)
    for bad in (0, -1.0, "10"):
        with pytest.raises(ValueError, match="seconds"):
            Budget(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reserve"):
        Budget(10.0, reserve=-1.0)


def test_budget_stage_shares_pass_unused_time_on() -> None:
    b = Budget(100.0, reserve=10.0)
    assert 19.0 < b.start_stage(0.2) <= 20.0  # a fifth of the total
    b.end_stage()  # finished at once: ~20 s carried over
    assert 39.0 < b.start_stage(0.2) <= 40.0
    b.end_stage()
    assert 85.0 < b.start_stage(0.0) <= 90.0  # "everything left": the total minus the reserve
    assert b.fits(40.0, safety=2.0) and not b.fits(50.0, safety=2.0)


def test_runlog_times_stages_and_stops_on_the_budget(tmp_path) -> None:
    log = RunLog(Budget(None), verbose=False)
    for _ in range(2):
        with log.stage("a"):
            time.sleep(0.01)
    assert set(log.timings) == {"a"} and log.timings["a"] >= 0.02
    spent = RunLog(Budget(1e-9), verbose=False)
    with pytest.raises(BudgetExceeded):
        with spent.stage("b"):
            pass
    assert "b" not in spent.timings
    path = log.write(tmp_path / "r.json", {"x": torch.tensor([1.0, float("nan")]), "n": 3})
    assert json.loads(path.read_text()) == {"x": [1.0, None], "n": 3}


def test_write_record_is_strict_json(tmp_path) -> None:
    rec = {"a": float("inf"), "t": torch.ones(2, dtype=torch.float64), 1: (True, None)}
    write_record(tmp_path / "r.json", rec)
    text = (tmp_path / "r.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"a": None, "t": [1.0, 1.0], "1": [True, None]}
    assert rec["a"] == float("inf")  # the input is not modified


def test_cache_key_is_stable_and_order_free() -> None:
    a = cache_key({"lr": 0.01, "epochs": 3})
    assert a == cache_key({"epochs": 3, "lr": 0.01}) and len(a) == 10
    assert a != cache_key({"epochs": 4, "lr": 0.01})


def test_hardware_and_threads_record() -> None:
    hw = hardware("cpu")
    assert hw["device"] == "cpu" and hw["cpu_count"] >= 1 and hw["torch"] == torch.__version__
    assert "gpu" not in hw and isinstance(hw["tf32_default_flags"], dict)
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == "1 (requested)" and torch.get_num_threads() == 1
        assert set_threads(None).endswith("(torch default)")
    finally:
        torch.set_num_threads(before)
