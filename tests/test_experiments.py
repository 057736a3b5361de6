"""The smoke preset of experiments/reproduce.py end to end (CI): JSON, four PNGs, results.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "reproduce.py"


def _script(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )


def test_smoke_preset_end_to_end(tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--preset",
            "smoke",
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            "--no-progress",
            "--threads",
            "1",  # tiny tensors: one thread avoids OpenMP overhead on a shared CI machine
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    meta = res["meta"]
    assert meta["preset"] == "smoke"
    assert "error" not in meta and "figure_error" not in meta, meta.get("figure_error")
    assert meta["hardware"]["cpu_count"] >= 1 and meta["command"]
    seed = res["seeds"]["0"]
    assert seed["status"] == "complete"
    # split indices are saved with the result, and the forget set lies inside train
    idx = seed["split"]["indices"]
    assert len(idx["forget_rows"]) == meta["config"]["n_forget"]
    assert set(idx["forget_rows"]).isdisjoint(idx["retain_rows"])
    # every method has every readout; the pre-training source is stated
    for m in (
        "original",
        "finetune",
        "fisher",
        "fisher_val",
        "ntk_paper",
        "ntk_ref_trap",
        "ntk_noise",
    ):
        r = seed["readouts"][m]
        assert set(r["error"]) >= {"forget", "retain", "test"}
        assert "relearn" in r and "attack" in r
    assert "STAND-IN" in res["pretrain"]["source"] or "SYNTHETIC" in res["pretrain"]["source"]
    assert seed["diagnostics"]["ntk_ref_trap"]["cos_vs_retrains"]
    # Fisher with α tuned on the validation images: the largest qualifying α of the grid
    tune = seed["methods_config"]["fisher_val_tuning"]
    assert "fisher_val" in seed["readouts"] and tune["alpha"] in tune["alphas"]
    # no retrain is read: the validation loss may not rise by more than its paired std. error
    assert "retrain_val_error_max" not in tune
    inc, se = tune["val_loss_increase"], tune["val_loss_increase_stderr"]
    ok = [a for a, m, s in zip(tune["alphas"], inc, se) if m <= s]
    assert tune["alpha"] == (max(ok) if ok else min(tune["alphas"]))
    assert tune["qualified"] == bool(ok)
    # issue 13: the new methods' readouts, their validation-only step rule, and the diagnostics
    new = ("ntk_ce_init", "ntk_ce_trained", "ntk_ce_cal", "ntk_projected", "ntk_match")
    for m in new + ("ntk_match_ce",):
        assert set(seed["readouts"][m]["error"]) >= {"forget", "retain", "test"}
        assert seed["diagnostics"][m]["cos_vs_retrains"]
    for form in ("ntk_ce_init", "ntk_ce_trained", "ntk_ce_cal"):
        t = seed["methods_config"][f"{form}_tuning"]
        # the step whose realised change of the validation logits best matches J_val Δ
        assert len(t["mismatch"]) == len(t["val_errors"]) == len(t["grid"])
        assert t["a"] == t["grid"][int(np.argmin(t["mismatch"]))]
        newton = seed["ntk"][form]["scrub_info"]["method_info"]["newton"]
        assert newton["D"]["converged"] and newton["D_r"]["converged"]
    # D_f's predicted outputs tempered to w(D)'s mean entropy on the unlabelled validation images
    cal = seed["ntk"]["ntk_ce_cal"]["scrub_info"]["method_info"]["calibration"]
    assert 0 < cal["target_entropy"] and cal["temperature"] > 0
    assert seed["ntk"]["ntk_ce_cal"]["scrub_info"]["method_info"]["newton"]["D calibrated"]
    fid = seed["fidelity"]
    assert set(fid) == {
        "ntk_paper",
        "ntk_ref",
        "ntk_ce_init",
        "ntk_ce_trained",
        "ntk_ce_cal",
        "ntk_projected",
        "ntk_match",
        "ntk_match_ce",
    }
    _check_matching(seed["ntk"], len(idx["val"]))
    for form, d in fid.items():
        line = d["raw_line"]
        assert line["alphas"][0] == 0.0 and line["alphas"][-1] == 4.0
        assert len(line["forget_l1_mean"]) == len(line["alphas"]) == len(line["forget_error"])
        # a = 0 is w(D) itself
        assert (
            abs(
                line["forget_l1_mean"][0]
                - seed["readouts"]["original"]["l1_to_retrain"]["forget"]["mean"]
            )
            <= 1e-6
        )
        kp = d["kernel_prediction"]
        assert 0.0 <= kp["forget_error"] <= 1.0 and kp["forget_l1_to_retrain"]["n"] >= 2
        lazy = ("ntk_paper", "ntk_ce_init", "ntk_projected", "ntk_match", "ntk_match_ce")
        assert ("laziness" in d) == (form in lazy)
    # issue 13 item 4: the engine scrubs and bounds; seed 0 also runs the dense twin
    cfg = meta["config"]
    assert cfg["solver"] == cfg["bounds_solver"] == "cg" and cfg["dense_check_seed"] == 0
    for form, rec in seed["ntk"].items():
        assert rec["scrub_info"]["solver"] == "cg" and rec["scrub_info"]["matvecs"] > 0, form
    dc = seed["dense_check"]
    assert set(dc["scrub"]) == set(seed["ntk"])
    for form, e in dc["scrub"].items():
        # float32 products, CG to its float32 tolerance 1e-3: the two paths agree to that —
        # except output matching, LM rounds re-linearised at moved weights, which branch on
        # rounding (accept/stop decisions, ReLU kinks): 1e-2 on this smoke model; its float64
        # twins agree, test_matching)
        assert e["expected"] == (1e-2 if form in ("ntk_match", "ntk_match_ce") else 1e-3)
        assert e["cg_converged"] and e["rel_l2_delta"] <= e["expected"], (form, e)
        # the trapezium factor inherits cos(Δ, e)'s conditioning (stages.TRAPEZIUM_AMPLIFICATION)
        assert e["expected_trapezium"] == 10 * e["expected"]
        assert e["rel_max_entry_delta"] <= 1e-2, (form, e)
        assert e["rel_trapezium_scale"] <= e["expected_trapezium"], (form, e)
        # ... and where a user sees it: the two raw-step models' outputs on D_f and test
        _assert_outputs_agree(form, e["outputs"])
    assert dc["max_rel_shift"] == max(
        max(e["rel_l2_delta"], e["rel_trapezium_scale"]) for e in dc["scrub"].values()
    )
    assert set(dc["bounds"]) >= {"ntk", "fisher"}
    for pname, rel in dc["bounds"].items():
        assert set(rel) >= {"white_box", "black_box_forget"}
        for name, v in rel.items():
            assert v["rel"] is not None and v["rel"] <= 1e-3, (pname, name, v)
    assert dc["shift_within_expected"] and dc["bounds_within_expected"]
    # the float32 floor: both linearisation points of the forms, products measured vs float64
    assert set(dc["float32_jacobian"]) == {"init", "trained"}
    prec = dc["float32_jacobian"].values()
    assert all(0 < p["jvp"] < 1e-2 and 0 < p["vjp"] < 1e-2 and p["samples"] > 0 for p in prec)
    assert "solver_warnings" not in seed  # every smoke solve converges
    # the report carries the check and, for every method, its band position and cost
    summ = res["summary"]
    assert summ["dense_check"]["0"]["max_rel_shift"] == dc["max_rel_shift"]
    for m in new:
        assert summ["costs"][m]["matvecs"]["mean"] == seed["ntk"][m]["scrub_info"]["matvecs"]
        assert summ["costs"][m]["all_converged"] is True and m in summ["inside_band"]
        assert m in summ["diagnostics"] and m in seed["line"]
    assert (
        summ["costs"]["ntk_ce_init"]["step"]["mean"]
        == (seed["methods_config"]["ntk_ce_init_tuning"]["a"])
    )
    md = (out / "results.md").read_text()
    assert "against its dense twin" in md and "where it lands against the retrain band" in md
    assert "in how many of the 1 seeds each method is inside the band" in md
    assert set(res["summary"]["per_seed"]) == set(res["summary"]["table"])
    labels = meta["method_labels"]
    land = md[md.index("where it lands against the retrain band") :]
    for m in ("ntk_ce_init", "ntk_ce_trained", "ntk_projected", "fisher", "ntk_ref_trap"):
        assert f"| {labels[m]} |" in land, m
    # the information sweep is exact in α for the diagonal-Fisher noise
    chk = seed["information"]["alpha_scaling_check"]
    assert abs(chk["white_box_direct"] - chk["white_box_scaled"]) <= 1e-4 * abs(
        chk["white_box_direct"]
    )
    for name in ("fig1_pca.png", "fig2_readouts.png", "fig3_information.png", "fig4_line.png"):
        assert (out / name).stat().st_size > 10_000, name
    assert (
        "Reference code" in (out / "results.md").read_text()
        or "reference code" in (out / "results.md").read_text()
    )
    # resumable: a second run reads the finished seed from the cache
    proc2 = _script(
        ["--preset", "smoke", "--out", str(out), "--cache-dir", str(cache), "--no-progress"]
        + ["--threads", "1", "--no-figures"],
        env,
    )
    assert proc2.returncode == 0, proc2.stderr[-4000:]
    assert json.loads((out / "results.json").read_text())["seeds"]["0"].get("from_cache")
    print(f"smoke preset: {wall:.1f}s")

    # --resummarize: a collapsed w(D) fails its seed; the measurements themselves are kept
    doc = json.loads((out / "results.json").read_text())
    curve = doc["seeds"]["0"]["training"]["original"]["train_error"]
    doc["seeds"]["0"]["training"]["original"]["train_error"] = [*curve, 0.0, 0.49]
    doc["seeds"]["0"]["training"]["original"]["final_train_error"] = 0.49
    src = tmp_path / "collapsed.json"
    src.write_text(json.dumps(doc))
    proc3 = _script(["--resummarize", str(src), "--out", str(tmp_path / "rs"), "--no-figures"], env)
    assert proc3.returncode == 0, proc3.stderr[-4000:]
    rs = json.loads((tmp_path / "rs" / "results.json").read_text())
    assert rs["seeds"] == {} and "collapsed" in rs["meta"]["failed_seeds"]["0"]["reason"]
    assert rs["meta"]["resummarized"][0]["seeds_dropped"] == ["0"]
    assert "Seed 0 FAILED" in (tmp_path / "rs" / "results.md").read_text()


def test_training_failure_rule() -> None:
    from ntkscrub.recipes import reproduction as reproduce

    ok = {"train_error": [0.6, 0.3, 0.0], "final_train_error": 0.0}
    slow = {"train_error": [0.8, 0.75, 0.7], "final_train_error": 0.7}  # never learned: not failed
    collapsed = {"train_error": [0.5, 0.05, 0.78], "final_train_error": 0.78}
    diverged = {"train_error": [0.5, float("nan")], "recipe": {"diverged_at_epoch": 2}}
    assert reproduce.training_failure(ok, 5) is None
    assert reproduce.training_failure(slow, 5) is None
    assert reproduce.training_failure(collapsed, 5).startswith("collapsed")
    assert reproduce.training_failure(diverged, 5).startswith("diverged")
    assert reproduce.training_failure({}, 5) is None


def _check_matching(ntk: dict, n_val: int) -> None:
    """Output matching's rounds are recorded, the validation images served as anchors, accepted
    rounds lower the total misfit; toward the paper form's targets the D_f misfit falls too."""
    for form in ("ntk_match", "ntk_match_ce"):
        info = ntk[form]["scrub_info"]["method_info"]
        assert info["anchors_extra"] == n_val and len(info["rounds"]) >= 2
        assert info["rounds"][-1]["misfit"] < info["rounds"][0]["misfit"]
    rounds = ntk["ntk_match"]["scrub_info"]["method_info"]["rounds"]
    assert rounds[-1]["forget_rel"] < rounds[0]["forget_rel"]
    assert ntk["ntk_match_ce"]["scrub_info"]["method_info"]["first_step"]["method"] == "ce_newton"


# issue 13's Newton and matching forms: covered end to end by test_smoke_preset_end_to_end; the
# other pipeline tests skip them (CI time: −27 s and −15 s)
_HEAVY_FORMS = ("ntk_ce_init", "ntk_ce_trained", "ntk_ce_cal", "ntk_match")


def test_failed_finetune_baseline_leaves_the_seed(tmp_path: Path) -> None:
    """A diverged Fine-tune baseline is left out of its seed (the other methods still run) and
    ``--resummarize`` does not drop the seed for it again."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    args = ["--preset", "smoke", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    args += ["--no-progress", "--threads", "1", "--no-figures", "--set", "relearn_max_epochs=1"]
    args += ["--set", f"skip_methods={_HEAVY_FORMS!r}"]
    args += ["--set", "finetune_lr=1e30"]
    first = ["--set", "finetune_schedule='constant'", "--set", "dense_check_seed=None"]
    proc = _script(args + first, env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    seed = res["seeds"]["0"]
    assert seed["status"] == "complete" and not res["meta"].get("failed_seeds")
    assert seed["training"]["finetune"]["excluded"].startswith("diverged")
    assert "finetune" not in seed["readouts"] and "ntk_ref_trap" in seed["readouts"]
    assert seed["training"]["finetune"]["recipe"]["lr"] == 1e30
    assert "Fine-tune baseline diverged" in (out / "results.md").read_text()
    proc2 = _script(
        ["--resummarize", str(out / "results.json"), "--out", str(tmp_path / "rs")]
        + ["--no-figures"],
        env,
    )
    assert proc2.returncode == 0, proc2.stderr[-4000:]
    assert list(json.loads((tmp_path / "rs" / "results.json").read_text())["seeds"]) == ["0"]
    # the same cache with the preset's own Fine-tune recipe trains that baseline afresh; with
    # a CG budget of 2 iterations to a tolerance float32 cannot reach, the scrubs cannot
    # converge: their partial results are used, but recorded loudly
    # (ntk_projected on the dense path by name: no solver warning and no cg-vs-dense row)
    over = ["--set", "cg_max_iter=2", "--set", "cg_tol=1e-12"]
    over += ["--set", "dense_forms=('ntk_projected',)"]
    proc3 = _script(args[:-2] + over, env)
    assert proc3.returncode == 0, proc3.stderr[-4000:]
    res3 = json.loads((out / "results.json").read_text())
    ft = res3["seeds"]["0"]["training"]["finetune"]
    assert "excluded" not in ft and ft["recipe"]["lr"] != 1e30 and not ft["from_cache"]
    warnings = res3["seeds"]["0"]["solver_warnings"]
    assert {w["what"] for w in warnings} >= {"scrub ntk_paper", "scrub ntk_ref"}
    paper = next(w for w in warnings if w["what"] == "scrub ntk_paper")
    assert paper["unconverged_solves"] and paper["unconverged_solves"][0]["iterations"] <= 2
    assert paper["unconverged_solves"][0]["max_residual"] > paper["tol"]
    assert "did NOT reach tol" in proc3.stderr
    ntk = res3["seeds"]["0"]["ntk"]
    assert ntk["ntk_projected"]["scrub_info"]["solver"] == "dense"
    assert {f for f, e in ntk.items() if e["scrub_info"]["solver"] == "cg"} == set(ntk) - {
        "ntk_projected"
    }
    assert set(res3["seeds"]["0"]["dense_check"]["scrub"]) == set(ntk) - {"ntk_projected"}
    # the fidelity diagnostics need no cg: the dense form has them too
    assert set(res3["seeds"]["0"]["fidelity"]) == set(ntk)
    assert "scrub ntk_projected" not in {w["what"] for w in warnings}
    md = (out / "results.md").read_text()
    assert "SOLVER WARNING, seed 0: scrub ntk_paper did NOT converge" in md
    assert res3["summary"]["costs"]["ntk_paper"]["all_converged"] is False


def test_report_counts_diverged_relearn_runs() -> None:
    from ntkscrub.recipes.reproduction import figures

    def rd(diverged: int | None, collapsed: tuple = ()) -> dict:
        return {
            "relearn": {"epochs": 71, "diverged_at_epoch": diverged, "collapsed_epochs": collapsed}
        }

    seeds = [
        {"readouts": {"retrain0": rd(4), "retrain1": rd(None), "ntk_ref": rd(None)}},
        {"readouts": {"retrain0": rd(None, (1,)), "retrain1": rd(9), "fisher": rd(2)}},
    ]
    note = figures._relearn_failures(seeds, {"fisher": "Fisher forgetting"})
    assert "Retrain 2 of 4" in note and "Fisher forgetting 1 of 1" in note
    assert "ntk_ref" not in note  # no diverged run, not listed
    assert "collapse level (not counted as relearned): Retrain 1 of 4." in note
    assert figures.readout_value(rd(4), "relearn") is None
    assert figures._relearn_failures([], {}) == ""


# ----------------------------------------------------------------------------- configuration
def test_presets_round_trip_through_the_flat_record() -> None:
    from dataclasses import FrozenInstanceError

    import pytest

    from ntkscrub.recipes.reproduction import config as C

    for name, cfg in C.PRESETS.items():
        flat = cfg.flat()
        assert list(flat) == list(C.FLAT_FIELDS) and flat["preset"] == name
        assert C.from_flat(flat) == cfg
    quick = C.PRESETS["quick"]
    # the Fine-tune baseline: the fine-tuning recipe at its own lr / schedule, no zero-error run
    base = quick.train.baseline
    assert (base.lr, base.schedule, base.epochs) == (0.001, "constant", 10)
    assert base.until_zero_error is False and base.max_epochs is None
    assert base.weight_decay == quick.train.finetune.weight_decay == 0.1
    kw = quick.train.finetune.train_kwargs()
    assert kw["until_zero_error"] is True and kw["max_epochs"] == 100
    assert "until_zero_error" not in quick.pretrain.recipe.train_kwargs()
    # a smoke baseline follows the fine-tuning lr: recorded as None, and so after an override
    smoke = C.derive(C.PRESETS["smoke"], ft_lr=0.02)
    assert smoke.train.baseline.lr == 0.02 and smoke.flat()["finetune_lr"] is None
    with pytest.raises(FrozenInstanceError):
        smoke.train.finetune.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown fields"):
        C.from_flat({"preset": "x", "no_such_field": 1})
    assert C.parse_set(["seeds=[1, 2]", "ft_schedule=cosine"]) == {
        "seeds": (1, 2),
        "ft_schedule": "cosine",
    }
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        C.parse_set(["nope=1"])


def test_method_registry_orders_tables_and_labels() -> None:
    from ntkscrub.recipes.reproduction import METHODS, figures
    from ntkscrub.recipes.reproduction.methods import method_labels

    assert figures.METHOD_ORDER == list(METHODS)
    assert list(METHODS)[:2] == ["original", "finetune"]
    labels = method_labels()
    assert list(labels)[:2] == ["original", "retrain"] and set(labels) - {"retrain"} == set(METHODS)
    # Fig. 4 draws the line of every NTK scrub, issue 13's methods included, each in its style
    assert {m for m, e in METHODS.items() if e.line} == {
        "ntk_paper",
        "ntk_paper_trap",
        "ntk_ref",
        "ntk_ref_trap",
        "ntk_ce_init",
        "ntk_ce_trained",
        "ntk_ce_cal",
        "ntk_projected",
        "ntk_match",
        "ntk_match_ce",
    }
    assert set(figures.FIG4_STYLES) == {m for m, e in METHODS.items() if e.line}


# ----------------------------------------------------------------------------- data location
def test_data_root_explicit_then_env_then_beside_the_repository(tmp_path, monkeypatch) -> None:
    from ntkscrub.recipes import DATA_ENV, data_root

    monkeypatch.delenv(DATA_ENV, raising=False)
    assert data_root() == REPO.parent / "shared" / "data" / "cifar10-jpeg"
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "flag") == tmp_path / "flag"


def test_missing_data_is_an_error_for_quick(tmp_path) -> None:
    import pytest

    from ntkscrub.recipes.reproduction import main

    argv = ["--preset", "quick", "--data-root", str(tmp_path / "missing"), "--threads", "1"]
    with pytest.raises(SystemExit, match="no CIFAR-10 image folder"):
        main([*argv, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- command line
def test_cli_help_of_reproduce_and_bench(capsys) -> None:
    import pytest

    from ntkscrub import cli

    for name, words in (
        ("reproduce", ("--preset", "--data-root", "NTKSCRUB_DATA", "--out", "smoke")),
        ("bench", ("--size", "--device", "--out", "pytest-benchmark", "source checkout")),
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert all(w in text for w in words), (name, text)
    cli.main([])
    top = capsys.readouterr().out
    assert all(n in top for n in ("demo", "reproduce", "bench"))


def test_cli_bench_needs_a_source_checkout(monkeypatch, capsys, tmp_path) -> None:
    from ntkscrub import cli
    from ntkscrub.recipes import commands

    monkeypatch.setattr(commands, "source_checkout", lambda: None)
    assert cli.main(["bench", "--out", str(tmp_path)]) == 2
    assert "source checkout" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["bench", "--size", "cpu", "-k", "matvec"])
    test, report = commands.bench_commands(args, REPO, tmp_path)
    assert test[test.index("--bench-size") + 1] == "cpu" and "smoke" not in test
    assert f"--benchmark-json={tmp_path / 'bench.json'}" in test and "matvec" in test
    assert report[-1] == str(tmp_path / "report") and str(tmp_path / "bench.json") in report


def test_cli_reproduce_smoke_with_missing_data_says_so(tmp_path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "ntkscrub", "reproduce", "--preset", "smoke", "--out", str(out)]
        + ["--cache-dir", str(tmp_path / "cache"), "--data-root", str(tmp_path / "missing")]
        + ["--no-progress", "--threads", "1", "--no-figures", "--set", "relearn_max_epochs=1"]
        + ["--set", "dense_check_seed=None", "--set", f"skip_methods={_HEAVY_FORMS!r}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SYNTHETIC DATA" in proc.stderr and "NTKSCRUB_DATA" in proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["config"]["synthetic"] is True and res["meta"]["notes"]
    assert res["seeds"]["0"]["status"] == "complete" and (out / "results.md").is_file()
    assert not (REPO / "experiments" / "results" / "smoke").exists()


def test_fisher_forgetting_matches_the_sweep_draw() -> None:
    """The reproduction's ``fisher`` model (ntkscrub.baselines.fisher_forget) and its noise sweep
    (variance at α = 1, scaled) draw the same noise: equal up to float32 rounding of the α scaling
    (which is why fisher_val at the reference α matches fisher)."""
    import torch
    from torch import nn

    from ntkscrub import baselines
    from ntkscrub.recipes.reproduction.weights import add_noise, fisher_variance, flat_params

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    X, Y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    before = flat_params(model).clone()
    alpha, seed = 1e-6, 60_000
    lib = baselines.fisher_forget(model, (X, Y), alpha=alpha, seed=seed).model
    sweep = add_noise(model, fisher_variance(model, (X, Y), 3), alpha, seed)
    a, b = flat_params(lib) - before, flat_params(sweep) - before
    assert float(a.norm()) > 0 and torch.allclose(a, b, rtol=1e-5, atol=1e-12)
    assert torch.equal(flat_params(model), before)  # the input is not modified


_CTX = ("device", "data_root", "cache_dir", "progress", "runlog")


def test_a_failing_method_is_left_out_and_recorded(tmp_path, monkeypatch) -> None:
    """A forgetting method that raises is left out of its seed with its error recorded (the other
    methods go on); a failure of w(D) or of the seed-matched run (no stage) still propagates."""
    from ntkscrub.recipes.reproduction import config as C
    from ntkscrub.recipes.reproduction import figures, methods, stages
    from ntkscrub.recipes.runtime import Budget, RunLog

    def boom(run):
        raise ValueError("D: Newton direction is not a descent direction")

    monkeypatch.setitem(methods.METHODS, "boom", methods.Method("boom", "B", "B", "scrub_x", boom))
    monkeypatch.setitem(methods.METHODS, "core", methods.Method("core", "C", "C", None, boom))
    ctx = stages.Context(
        C.PRESETS["smoke"], torch.device("cpu"), tmp_path, tmp_path, False, RunLog(Budget(None))
    )
    run = stages.SeedRun(ctx, 0, {})
    assert run.model("boom") is None and run.models["boom"] is None
    assert "ValueError: D: Newton direction" in run.res["method_failures"]["boom"]
    assert "seed0/scrub_x" in ctx.runlog.timings
    with pytest.raises(ValueError, match="descent"):
        run.model("core")
    # a method named in forget.skip_methods is not made at all, and said so
    skip = C.derive(C.PRESETS["smoke"], skip_methods=("core",))
    run2 = stages.SeedRun(stages.Context(skip, *[getattr(ctx, k) for k in _CTX]), 0, {})
    assert run2.model("core") is None and "skipped" in run2.res["method_failures"]["core"]
    with pytest.raises(ValueError, match="headline"):  # NTK + noise and Fig. 3 need it
        C.derive(C.PRESETS["smoke"], skip_methods=(C.PRESETS["smoke"].forget.headline,))
    doc = {"meta": {}, "seeds": {"0": {"method_failures": run.res["method_failures"]}}}
    text = "\n".join(figures._report_header(doc))
    assert "METHOD FAILED, seed 0: boom" in text
    doc["seeds"]["0"]["method_failures"].update(run2.res["method_failures"])
    text = "\n".join(figures._report_header(doc))
    assert "not run (`forget.skip_methods`): core" in text and "FAILED, seed 0: core" not in text


def test_step_rule_takes_the_raw_step_of_a_model_linear_in_its_parameters():
    """The validation step rule compares the realised change of the validation logits along
    w(D) + aΔ with J_val·Δ: for a model linear in its parameters they agree exactly at a = 1
    and differ by (a − 1)²‖J_val Δ‖² elsewhere, so the rule must return the raw step."""
    from ntkscrub.recipes.reproduction.measure import step_to_predicted_change

    torch.manual_seed(0)
    model = torch.nn.Linear(7, 4).eval()
    X, Y = torch.randn(30, 7), torch.randint(0, 4, (30,))
    delta = 0.3 * torch.randn(sum(p.numel() for p in model.parameters()))
    grid = tuple(0.25 * k for k in range(1, 17))
    out = step_to_predicted_change(model, model, delta, (X, Y), grid)
    assert out["a"] == 1.0
    norm = out["predicted_change_norm"]
    for a, m in zip(grid, out["mismatch"], strict=True):
        assert abs(m - (a - 1.0) ** 2 * norm) <= 1e-4 * norm, (a, m)
    assert len(out["val_errors"]) == len(grid)


def test_step_rule_keeps_the_raw_step_on_a_tie_within_noise():
    """One-standard-error rule: a step of lower mean mismatch replaces a = 1 only when its gain
    exceeds the standard error of the paired per-image differences."""
    from ntkscrub.recipes.reproduction.measure import one_se_step

    g = torch.Generator().manual_seed(0)
    grid, n = (0.5, 0.75, 1.0, 1.25), 125
    base = torch.rand(n, generator=g, dtype=torch.float64)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    rows = torch.stack([base + 1.0, base + 0.01 * noise - 0.001, base, base + 0.5])
    tie = one_se_step(rows, grid, prefer=1.0)
    assert tie["a_min"] == 0.75 and tie["a"] == 1.0
    assert 0 < tie["gain"] < tie["se"]
    rows[1] = base - 0.1 + 0.01 * noise  # a clear gain: 0.1 against a standard error ~ 1e-3
    clear = one_se_step(rows, grid, prefer=1.0)
    assert clear["a"] == 0.75 and clear["gain"] > clear["se"]
    assert one_se_step(rows, grid, prefer=None)["a"] == 0.75
    rows[1] = base + 0.01 * noise - 0.001
    assert one_se_step(rows, grid, prefer=None)["a"] == 0.75  # plain argmin
    with pytest.raises(ValueError, match="prefer"):
        one_se_step(rows, grid, prefer=2.0)
    with pytest.raises(ValueError, match="per_image"):
        one_se_step(rows[:2], grid, prefer=1.0)


def test_dense_check_report_reads_a_difference_as_the_tolerance():
    """results.md no longer attributes a cg-vs-dense difference to the Jacobian's float32 floor
    (the twin's rows follow the batched products): it points at cg_tol, and says the floor is
    the distance of both paths from float64."""
    from ntkscrub.recipes.reproduction import figures

    entry = {"rel_l2_delta": 1e-2, "rel_max_entry_delta": 1e-2, "rel_trapezium_scale": 1e-3}
    entry.update(cg_converged=True, expected=1e-3)
    floor = {"init": {"jvp": 2e-7, "vjp": 1e-6}, "trained": {"jvp": 2e-4, "vjp": 2e-4}}
    chk = {"expected_max": 1e-3, "max_rel_shift": 1e-2, "max_rel_bounds": 1e-5}
    chk.update(float32_jacobian=floor, scrub={"ntk_paper": entry}, shift_within_expected=False)
    text = "\n".join(figures._report_dense_check({"dense_check": {"0": chk}}))
    assert "--set cg_tol" in text and "from a float64 model, not from each other" in text
    assert "D_f softmax-L1" in text  # the outputs' columns, empty ("–") for an old record
    assert "rounding, which a smaller" not in text and "two float32 evaluations" not in text
    # output matching over its own (looser) expectation: explained as the rounds' discontinuity
    # at ReLU kinks, not sent to cg_tol; a one-shot form within 1e-3 adds no cg_tol advice
    match = dict(entry, rel_l2_delta=3.5e-2, expected=1e-2)
    fine = dict(entry, rel_l2_delta=5e-4)
    chk.update(scrub={"ntk_paper": fine, "ntk_match": match}, max_rel_shift=3.5e-2)
    text = "\n".join(figures._report_dense_check({"dense_check": {"0": chk}}))
    assert "**Output matching** (ntk_match)" in text and "not continuous in their start" in text
    assert "--set cg_tol=" not in text
    chk["scrub"]["ntk_paper"] = entry  # a one-shot form over 1e-3 as well: both are said
    text = "\n".join(figures._report_dense_check({"dense_check": {"0": chk}}))
    assert "**Output matching**" in text and "--set cg_tol=" in text


def _assert_outputs_agree(form: str, outputs: dict) -> None:
    """A smoke dense check's output comparison: logits and softmax within 1e-2 on both sets."""
    for name in ("forget", "test"):
        o = outputs[name]
        assert 0 <= o["rel_logits"] <= 1e-2 and 0 <= o["softmax_l1"] <= 1e-2, (form, name, o)


def test_output_dense_check_compares_the_raw_step_models():
    """Equal shifts give equal outputs; a shift along one weight changes them by what the
    model's logits change; w(D) itself is not modified."""
    import torch
    from torch import nn

    from ntkscrub.recipes.reproduction import measure as M
    from ntkscrub.recipes.reproduction.weights import flat_params, load_flat

    torch.manual_seed(0)
    w_d = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    sets = {k: (torch.randn(20, 4), torch.randint(0, 3, (20,))) for k in ("forget", "test")}
    before = flat_params(w_d).clone()
    d = 0.1 * torch.randn(before.numel())
    same = M.output_dense_check(w_d, d, d.clone(), sets)
    assert all(v == {"rel_logits": 0.0, "softmax_l1": 0.0} for v in same.values())
    bumped = d.clone()
    bumped[-1] += 0.5  # the last output bias: every logit of class 2 moves by 0.5
    diff = M.output_dense_check(w_d, bumped, d, sets)
    for name, (x, _) in sets.items():
        with torch.no_grad():
            ref = load_flat(w_d, before + d)(x)
        want = 0.5 * len(x) ** 0.5 / float(ref.double().norm())
        assert abs(diff[name]["rel_logits"] - want) < 1e-6 * want
        assert diff[name]["softmax_l1"] > 0
    assert torch.equal(flat_params(w_d), before)


def test_finished_seed_key_follows_the_library_defaults(monkeypatch, tmp_path):
    """A finished seed read back from the cache must have been made under the same library
    defaults (a changed Newton forcing changes its recorded costs); the trainings' folder does
    not depend on them, so a changed default recomputes the scrubs only."""
    from ntkscrub.recipes.reproduction import caching
    from ntkscrub.recipes.reproduction import config as C
    from ntkscrub.shifts import NewtonConfig

    cfg = C.PRESETS["quick"]
    before = caching.finished_seed_path(cfg, tmp_path, 0)
    assert caching.finished_seed_path(cfg, tmp_path, 0) == before  # stable
    assert caching.library_defaults()["NewtonConfig"]["forcing"] == NewtonConfig().forcing

    class Looser(NewtonConfig):
        def __init__(self, **kw):
            super().__init__(**({"forcing": 0.5} | kw))

    monkeypatch.setattr(caching, "NewtonConfig", Looser)
    after = caching.finished_seed_path(cfg, tmp_path, 0)
    assert after != before and after.parent == before.parent


def test_principal_directions_match_the_svd_in_float64():
    from ntkscrub.recipes.reproduction.measure import principal_directions

    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 3000, generator=g, dtype=torch.float64)
    A = A - A.mean(0)
    V, S = principal_directions(A, 2)
    _, S_ref, Vh = torch.linalg.svd(A, full_matrices=False)
    assert V.shape == (2, 3000) and S.shape == (12,)
    torch.testing.assert_close(S[:11], S_ref[:11], rtol=1e-10, atol=1e-10)  # last: rank 11
    for i in range(2):  # the same directions up to sign, the sign fixed by the last row
        assert abs(abs(float(V[i] @ Vh[i])) - 1.0) < 1e-10
        assert float(V[i] @ A[-1]) >= 0.0


def _readouts(d_f: float, attack: float, test: float, l1: float) -> dict:
    return {
        "error": {"forget": d_f, "retain": 0.0, "test": test},
        "attack": {"forget_member_fraction": attack},
        "l1_to_retrain": {k: {"mean": l1} for k in ("forget", "retain", "test")},
    }


def test_per_seed_tally_counts_own_and_pooled_bands():
    from ntkscrub.recipes.reproduction.figures import retrain_values
    from ntkscrub.recipes.reproduction.measure import mean_std
    from ntkscrub.recipes.reproduction.summary import READOUT_NAMES, _per_seed

    # seed A: retrains at D_f error 0.30/0.40 (band 0.35 ± 0.05); seed B: 0.10/0.12
    seeds = [
        {"readouts": {"retrain0": _readouts(0.30, 0.6, 0.3, 0.1),
                      "retrain1": _readouts(0.40, 0.7, 0.3, 0.1),
                      "m": _readouts(0.36, 0.65, 0.3, 0.1)}},
        {"readouts": {"retrain0": _readouts(0.10, 0.6, 0.3, 0.1),
                      "retrain1": _readouts(0.12, 0.7, 0.3, 0.1),
                      "m": _readouts(0.36, 0.9, 0.3, 0.1)}},
    ]  # fmt: skip
    band = {rn: mean_std(retrain_values(seeds, rn)) for rn in READOUT_NAMES}
    per = _per_seed(seeds, ["m"], band)["m"]
    assert per["error_forget"]["values"] == [0.36, 0.36]
    # own bands: inside A's (0.30–0.40), outside B's (0.10–0.12); pooled 0.23 ± 0.13: both
    assert per["error_forget"]["own"] == 1 and per["error_forget"]["pooled"] == 2
    assert per["attack"]["own"] == 1  # 0.9 is outside 0.65 ± 0.05
    assert per["goal"] == {"own": 1, "pooled": 1}


def test_jacobian_precision_measures_in_the_precision_scrub_runs(monkeypatch):
    """The float32 floor of the dense check is read with TF32 off, as scrub's products are."""
    from ntkscrub.operators.jacobian import Jacobian
    from ntkscrub.recipes.reproduction.measure import jacobian_precision

    seen: list[tuple[bool, bool]] = []
    mm, tmm = Jacobian._mm, Jacobian._tmm

    def spy(f):
        def wrapped(self, X):
            if X.dtype == torch.float32:
                seen.append(
                    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
                )
            return f(self, X)

        return wrapped

    monkeypatch.setattr(Jacobian, "_mm", spy(mm))
    monkeypatch.setattr(Jacobian, "_tmm", spy(tmm))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    out = jacobian_precision(net, (torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])), seed=0)
    assert seen and all(flags == (False, False) for flags in seen)
    assert out["jvp"] < 1e-5 and out["vjp"] < 1e-5 and out["samples"] == 4
    assert torch.backends.cudnn.allow_tf32  # restored


def test_step_rule_and_kernel_prediction_run_without_tf32(monkeypatch):
    """The validation step rule (a JVP against realised logit changes) and the kernel prediction
    read the network with TF32 off, as the scrubs that produced Δ did; the flags come back."""
    from ntkscrub.recipes.reproduction.measure import step_to_predicted_change

    seen: list[tuple[bool, bool]] = []
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    net[1].register_forward_hook(
        lambda *_: seen.append(
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        )
    )
    val = (torch.randn(5, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1]))
    delta = 0.1 * torch.randn(39)
    out = step_to_predicted_change(net, net, delta, val, (0.5, 1.0, 2.0))
    assert out["a"] == 1.0  # a model linear in its parameters: the linear prediction is exact
    assert seen and all(flags == (False, False) for flags in seen)
    assert torch.backends.cudnn.allow_tf32  # restored


def test_cached_pretraining_made_with_other_threads_is_named(monkeypatch):
    """A CPU run is reproducible only at the same torch thread count (the quick preset's first
    pre-training epoch: loss 4.26 with 2 threads, 8.34 with 1), so train() records the count and
    results.md says when a cached checkpoint was made with another."""
    import torch

    from ntkscrub.recipes.reproduction.figures import _report_header
    from ntkscrub.training import train

    net = torch.nn.Linear(3, 2)
    X, Y = torch.randn(8, 3), torch.arange(8) % 2
    _, log = train(net, (X, Y), epochs=1, lr=0.1, batch_size=4)
    assert log.recipe["threads"] == torch.get_num_threads()

    def header(made: int) -> str:
        res = {
            "meta": {"hardware": {"device": "cpu", "torch_threads": 2}, "wall_seconds": 5},
            "pretrain": {
                "training": {"from_cache": True, "seconds": 90, "recipe": {"threads": made}}
            },
        }
        return "\n".join(_report_header(res))

    assert "trained with 1 torch threads, this run has 2" in header(1)
    assert "torch threads, this run" not in header(2)
