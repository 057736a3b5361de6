"""The budgeted GPU script at toy size on the CPU: the stages a device session runs (fp32 CG
stage, time-capped large scrub) must work end to end before any device time is spent on them."""

from __future__ import annotations

import json

import gpu_suite
import pytest


@pytest.mark.smoke
def test_gpu_suite_tiny_cg_and_capped_scrub(tmp_path):
    out = tmp_path / "suite"
    # a generous budget: the tiny suite takes ≈ 10 s idle, but a stage the budget cuts on a loaded
    # machine would fail this test for the wrong reason (seen at load 7 on 2 cores)
    argv = ["--out", str(out), "--device", "cpu", "--tiny", "--budget-seconds", "300"]
    assert gpu_suite.main([*argv, "--stages", "cg", "scrub_large"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["finished"] is True
    assert {s["status"] for s in doc["stages"].values()} == {"done"}, doc["stages"]

    cg = [r for r in doc["records"] if r["kind"] == "cg" and r["status"] == "ok"]
    assert cg and {r["precision"] for r in cg} == {"fp32"}
    assert {r["point"] for r in cg} == {"init", "trained"}

    (capped,) = [r for r in doc["records"] if r["kind"] == "capped"]
    assert capped["status"] == "ok"
    assert capped["n"] == gpu_suite.TINY.engine_large_n
    assert 1 <= max(capped["cg_iterations"]) <= capped["max_iter"]
    assert capped["dense_jacobian_bytes"] == 4.0 * capped["n"] * 10 * capped["params"]
    assert "train_step_delta_mib" in capped
    assert "time-capped CG" in (out / "report.md").read_text()


@pytest.mark.smoke
def test_gpu_suite_tiny_partial_linearisation(tmp_path):
    """partial_large: a converged scrub of the last block + head at the largest N, the frozen
    prefix cached, against the retrain of the same problem — before any device time."""
    out = tmp_path / "suite"
    argv = ["--out", str(out), "--device", "cpu", "--tiny", "--budget-seconds", "300"]
    assert gpu_suite.main([*argv, "--stages", "partial_large"]) == 0
    doc = json.loads((out / "results.json").read_text())
    (rec,) = [r for r in doc["records"] if r["kind"] == "partial"]
    assert rec["status"] == "ok" and rec["converged"] is True
    assert rec["n"] == gpu_suite.TINY.engine_large_n
    assert rec["prefix_cache"]["cached"] and rec["p_linearised"] < rec["params"]
    assert rec["retrain_seconds"] > 0 and rec["ratio_scrub_to_retrain"] > 0
    assert "Partial linearisation" in (out / "report.md").read_text()


@pytest.mark.smoke
def test_gpu_suite_tiny_deletion_requests(tmp_path):
    """requests: Scrubber preparation and two requests on the partial problem, each against the
    retrain, and the report's table and target row — before any device time."""
    out = tmp_path / "suite"
    argv = ["--out", str(out), "--device", "cpu", "--tiny", "--budget-seconds", "300"]
    assert gpu_suite.main([*argv, "--stages", "requests"]) == 0
    doc = json.loads((out / "results.json").read_text())
    (rec,) = [r for r in doc["records"] if r["kind"] == "requests"]
    assert rec["status"] == "ok", rec.get("reason")
    assert rec["n"] == gpu_suite.TINY.engine_large_n
    assert rec["prepare"]["converged"] and rec["prepare"]["matvecs"] > 0
    assert [q["n_new"] for q in rec["requests"]] == [rec["n_forget"]] * 2
    assert all(q["converged"] and q["matvecs"] > 0 for q in rec["requests"])
    assert len(rec["ratio_requests_to_retrain"]) == 2 and rec["retrain_seconds"] > 0
    report = (out / "report.md").read_text()
    assert "Amortised deletion requests" in report and "deletion request / retrain" in report
