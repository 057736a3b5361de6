"""Tests of ``ntkscrub demo`` (ntkscrub.demo, ntkscrub.cli, ``python -m ntkscrub``).

The demo runs once at ``--size small`` (about 10 s on two CPU cores) and its report is shared by
the tests below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import ntkscrub
from ntkscrub import cli
from ntkscrub.demo import METHODS, format_table, run_demo, write_json_atomic


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report.json"
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    report = run_demo(size="small", seed=0, out=out, quiet=True)
    wall = time.perf_counter() - t0
    assert torch.get_num_threads() == threads
    return out, report, wall


def test_demo_writes_full_report(small_report):
    out, report, wall = small_report
    assert wall < 60.0, f"the small demo took {wall:.1f} s"
    assert out.is_file()
    on_disk = json.loads(out.read_text())
    assert on_disk["rows"] == report["rows"]
    assert list(on_disk["rows"]) == list(METHODS)
    for row in on_disk["rows"].values():
        assert set(row) == {
            "retain_error",
            "forget_error",
            "test_error",
            "softmax_l1_to_retrain_forget",
        }
        assert all(0.0 <= v <= 2.0 for v in row.values())
    assert on_disk["rows"]["Retrain"]["softmax_l1_to_retrain_forget"] == 0.0
    # settings, seeds, sizes, stage times, hardware, scrub record
    assert on_disk["size"] == "small" and on_disk["seed"] == 0
    assert len(set(on_disk["seeds"].values())) == len(on_disk["seeds"])
    sizes = on_disk["data"]["finetune"]["sizes"]
    assert sizes["forget"] == 25 and sizes["retain"] + 25 == sizes["train"]
    assert {"pretrain", "finetune_original", "retrain", "ntk", "fisher"} <= set(
        on_disk["stage_seconds"]
    )
    assert {"platform", "torch", "device"} <= set(on_disk["hardware"])
    ntk = on_disk["ntk_info"]
    assert ntk["solver"] == "cg" and ntk["matvecs"] > 0 and ntk["seconds"] > 0
    assert all("iterations" in s for s in ntk["solves"])
    assert on_disk["settings"]["ntk"]["linearize_at"] == "init"
    # no temp file left beside the report
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_demo_original_fits_forget_set(small_report):
    _, report, _ = small_report
    fit = report["original_fit"]
    assert fit["reached_zero_error"] and fit["train_error"] == 0.0
    assert fit["fits_forget_set"] and report["rows"]["Original"]["forget_error"] == 0.0


def test_demo_ntk_closer_to_retrain_than_original(small_report):
    """Done-when criterion: the NTK row is closer to Retrain than Original, softmax L1 on D_f."""
    _, report, _ = small_report
    rows = report["rows"]
    ntk = rows["NTK"]["softmax_l1_to_retrain_forget"]
    original = rows["Original"]["softmax_l1_to_retrain_forget"]
    assert ntk < original, f"NTK {ntk:.4f} vs Original {original:.4f}"
    assert report["ntk_closer_to_retrain_than_original"] is True
    # the scrub must not damage the retained data
    assert rows["NTK"]["retain_error"] <= 0.01


def test_format_table_lists_every_method(small_report):
    _, report, _ = small_report
    text = format_table(report["rows"])
    assert text == report["table"]
    for m in METHODS:
        assert m in text
    assert "L1 to Retrain on D_f" in text.splitlines()[0]


def test_write_json_atomic_replaces(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic({"a": 1}, path)
    write_json_atomic({"a": torch.tensor([1.0, 2.0])}, path)
    assert json.loads(path.read_text()) == {"a": [1.0, 2.0]}
    assert os.listdir(tmp_path) == ["r.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_run_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size"):
        run_demo(size="huge", out=None, quiet=True)
    with pytest.raises(ValueError, match="seed"):
        run_demo(seed=-1, out=None, quiet=True)
    with pytest.raises(ValueError, match="threads"):
        run_demo(threads=0, out=None, quiet=True)
    with pytest.raises(ValueError, match="ntk_options"):
        run_demo(ntk_options={"bogus": 1}, out=None, quiet=True)


# --------------------------------------------------------------------------- command line
def test_cli_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert ntkscrub.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--seed", "--size", "--out", "--quiet"):
        assert opt in out
    assert cli.main([]) == 2  # no subcommand: help and a usage error status


def test_cli_subcommand_registry():
    calls = []

    def add(p):
        p.add_argument("--n", type=int, default=1)

    cli.register("echo-test", cli.Subcommand("test only", add, lambda a: calls.append(a.n) or 0))
    try:
        assert cli.main(["echo-test", "--n", "3"]) == 0
        assert calls == [3]
    finally:
        cli.SUBCOMMANDS.pop("echo-test")
    with pytest.raises(ValueError, match="name"):
        cli.register("bad name", cli.Subcommand("x", add, lambda a: 0))
    assert "demo" in cli.SUBCOMMANDS


def test_cli_demo_rejects_negative_seed(capsys, tmp_path):
    assert cli.main(["demo", "--seed", "-1", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "ntkscrub", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout
