"""Across seeds: the summary of results.json (mean/std of every readout per method, the retrain
band, the statements the write-up needs) and ``--resummarize``, which redoes summary, figures and
report from a finished result file."""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ntkscrub.io import write_record
from ntkscrub.recipes.reproduction import figures
from ntkscrub.recipes.reproduction.failures import (
    COLLAPSE_FINAL,
    COLLAPSE_RISE,
    drop_failed_seeds,
)
from ntkscrub.recipes.reproduction.measure import SETS, mean_std
from ntkscrub.recipes.reproduction.methods import METHODS, NTK_FORMS
from ntkscrub.recipes.runtime import log

__all__ = ["READOUT_NAMES", "RESULTS_NAME", "summarize", "resummarize"]

RESULTS_NAME = "results.json"
READOUT_NAMES = ["error_forget", "error_retain", "error_test", "attack", "relearn"]
READOUT_NAMES += ["l1_forget", "l1_retain", "l1_test"]
# every NTK method of the registry whose model is a scrub of one form (not the +noise model)
_NTK = tuple(m for m in METHODS if m.removesuffix("_trap") in NTK_FORMS)


def _form(name: str) -> str:
    return name.removesuffix("_trap")


def method_step(seed: dict[str, Any], name: str) -> float | None:
    """The step a of w(D) + a·Δ an NTK method took in one seed: the trapezium factor (``*_trap``),
    the validation-chosen a (``methods_config.<form>_tuning``), else 1 (the raw step)."""
    if name.endswith("_trap"):
        return (seed.get("ntk", {}).get(_form(name)) or {}).get("trapezium_scale")
    tuning = (seed.get("methods_config") or {}).get(f"{name}_tuning")
    return tuning["a"] if tuning else 1.0


def method_cost(results: dict[str, Any], seed_name: str, name: str) -> dict[str, Any]:
    """What one method cost in one seed: the scrub's matvecs (retain column products), wall
    seconds and convergence for an NTK form; the stage's seconds for the others (Fisher's stage
    also holds the noise variances; the Fine-tune baseline: its training)."""
    seed = results["seeds"][seed_name]
    if _form(name) in NTK_FORMS:
        info = (seed.get("ntk", {}).get(_form(name)) or {}).get("scrub_info") or {}
        return {
            "matvecs": info.get("matvecs"),
            "seconds": info.get("wall_seconds"),
            "converged": info.get("converged"),
            "solver": info.get("solver"),
        }
    stage = METHODS[name].stage if name in METHODS else None
    st = results.get("meta", {}).get("stage_seconds", {})
    secs = st.get(f"seed{seed_name}/{stage}") if stage else None
    return {"matvecs": None, "seconds": secs, "converged": None, "solver": None}


def _costs(results: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """Per method, over the finished seeds: matvecs, seconds, the step a, and whether every
    solve converged."""
    names = [k for k, s in results["seeds"].items() if "readouts" in s]
    out = {}
    for m in methods:
        rows = [method_cost(results, k, m) for k in names]
        steps = [method_step(results["seeds"][k], m) for k in names] if m in _NTK else []
        conv = [r["converged"] for r in rows if r["converged"] is not None]
        out[m] = {
            "matvecs": mean_std([r["matvecs"] for r in rows]),
            "seconds": mean_std([r["seconds"] for r in rows]),
            "step": mean_std(steps),
            "all_converged": all(conv) if conv else None,
        }
    return out


def _fidelity(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 13 item 1 over seeds, per NTK form: the kernel prediction of the retrained outputs
    on D_f (error, softmax-L1 to the retrains), the raw line's best a and its L1, laziness."""
    out: dict[str, Any] = {}
    for form in NTK_FORMS:
        rows = [s["fidelity"][form] for s in seeds if form in s.get("fidelity", {})]
        if not rows:
            continue
        kp = [r["kernel_prediction"] for r in rows]
        lz = [r["laziness"] for r in rows if "laziness" in r]
        out[form] = {
            "kernel_forget_error": mean_std([k["forget_error"] for k in kp]),
            "kernel_forget_l1": mean_std([k["forget_l1_to_retrain"]["mean"] for k in kp]),
            "raw_argmin_alpha": mean_std(
                [r["raw_line"]["argmin_forget_l1"]["alpha"] for r in rows]
            ),
            "raw_argmin_l1": mean_std([r["raw_line"]["argmin_forget_l1"]["l1"] for r in rows]),
            "laziness_original": mean_std([z["original"] for z in lz]),
            "laziness_retrains": mean_std([z["retrains"]["mean"] for z in lz]),
        }
    return out


def _dense_checks(results: dict[str, Any]) -> dict[str, Any]:
    """The seeds' cg-vs-dense checks, keyed by seed (see ``stages.stage_dense_check``)."""
    return {k: s["dense_check"] for k, s in results["seeds"].items() if s.get("dense_check")}


def _inside(band: dict[str, Any], value: float | None) -> dict[str, Any] | None:
    """Whether ``value`` lies inside the band's mean ± std and min–max (1e-12 slack)."""
    if band["mean"] is None or value is None:
        return None
    lo, hi = band["mean"] - band["std"], band["mean"] + band["std"]
    return {
        "value": value,
        "band": [lo, hi],
        "inside_mean_pm_std": bool(lo - 1e-12 <= value <= hi + 1e-12),
        "inside_min_max": bool(band["min"] - 1e-12 <= value <= band["max"] + 1e-12),
    }


def _diagnostics(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """The linearisation diagnostics of the NTK forms, averaged over seeds."""
    diag = {}
    for name in _NTK:
        rows = [s["diagnostics"][name] for s in seeds if name in s.get("diagnostics", {})]
        if not rows:
            continue
        scales = [
            s["ntk"][_form(name)]["trapezium_scale"]
            for s in seeds
            if _form(name) in s.get("ntk", {})
        ]
        diag[name] = {
            "cos_vs_retrains": mean_std([r["cos_vs_retrains_mean"]["mean"] for r in rows]),
            "norm_ratio_vs_retrains": mean_std(
                [r["norm_ratio_vs_retrains_mean"]["mean"] for r in rows]
            ),
            "cos_vs_seed_matched": mean_std([r["cos_vs_seed_matched"] for r in rows]),
            "norm_ratio_vs_seed_matched": mean_std([r["norm_ratio_vs_seed_matched"] for r in rows]),
            "dist_ratio_to_retrains": mean_std(
                [r["dist_ratio_to_retrains_mean"]["mean"] for r in rows]
            ),
            "trapezium_scale": mean_std(scales),
            "step": mean_std([method_step(s, name) for s in seeds if "ntk" in s]),
        }
    ts = [s["diagnostics"]["true_shifts"] for s in seeds if "diagnostics" in s]
    if ts:
        diag["retrain_shift_pairwise_cos"] = mean_std(
            [t["cos_between_retrain_shifts"]["mean"] for t in ts]
        )
    return diag


def _information(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """log10(white / black box on D_f) over the NTK sweep, and the per-query KL of each set."""
    ratios, leak = [], {"forget": [], "retain": [], "test": []}
    for inf in infos:
        for row in inf["sweep"]["ntk"]:
            wb, bbf = row["white_box"], row["black_box"].get("forget")
            if wb and bbf and wb > 0 and bbf > 0:
                ratios.append(math.log10(wb / bbf))
        for q in leak:
            e = inf["pairs"]["ntk"]["black_box"].get(q)
            if e:
                leak[q].append(e["per_query"]["mean"])
    return {
        "log10_white_over_black_forget_ntk": mean_std(ratios),
        "per_query_mean_kl_ntk": {q: mean_std(v) for q, v in leak.items()},
        "alpha": infos[0]["alpha"],
    }


# issue 13's goal counts seeds: inside the band on these readouts in ≥ 3 of 4 seeds
PER_SEED_READOUTS = ("error_forget", "attack", "error_test", "l1_forget")
_GOAL_READOUTS = ("error_forget", "attack", "error_test")


def _per_seed(
    seeds: list[dict[str, Any]], methods: list[str], band: dict[str, Any]
) -> dict[str, Any]:
    """Per method and readout (:data:`PER_SEED_READOUTS`): in how many seeds the method's value
    lies inside that seed's own band (mean ± std of its K retrains) and inside the pooled band
    (all retrains); ``"goal"`` counts the seeds inside on D_f error, attack and test error at
    once. ``{method: {readout: {"values", "own", "pooled"}, "goal": {"own", "pooled"}}}``."""
    # each seed's own band, once per seed and readout (every method is placed against it)
    own_bands = [
        {rn: mean_std(figures.retrain_values([s], rn)) for rn in PER_SEED_READOUTS} for s in seeds
    ]
    out: dict[str, Any] = {}
    for m in methods:
        rows: dict[str, Any] = {}
        inside: dict[str, tuple[list[bool], list[bool]]] = {}
        for rn in PER_SEED_READOUTS:
            vals = [
                figures.readout_value(s["readouts"][m], rn) if m in s["readouts"] else None
                for s in seeds
            ]
            own = [_inside_band(b[rn], v) for b, v in zip(own_bands, vals)]
            pooled = [_inside_band(band[rn], v) for v in vals]
            inside[rn] = (own, pooled)
            rows[rn] = {"values": vals, "own": sum(own), "pooled": sum(pooled)}
        rows["goal"] = {
            kind: sum(all(inside[rn][j][i] for rn in _GOAL_READOUTS) for i in range(len(seeds)))
            for j, kind in enumerate(("own", "pooled"))
        }
        out[m] = rows
    return out


def _inside_band(band: dict[str, Any], value: float | None) -> bool:
    """Whether ``value`` lies inside ``band``'s mean ± std (False when either is missing)."""
    e = _inside(band, value)
    return bool(e and e["inside_mean_pm_std"])


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Across seeds: mean/std of every readout per method, the retrain band, and the statements
    the write-up needs (inside the band? black ≪ white? forget queries leak more?)."""
    seeds = figures.finished_seeds(results)
    if not seeds:
        return {"n_seeds": 0}
    methods = figures.methods_present(seeds)
    table = {
        m: {rn: mean_std(figures.method_values(seeds, m, rn)) for rn in READOUT_NAMES}
        for m in methods
    }
    # retrain band: all retrains of all seeds pooled (their own L1 readouts exclude themselves)
    band = {rn: mean_std(figures.retrain_values(seeds, rn)) for rn in READOUT_NAMES}
    spread = {
        st: mean_std([s["retrain_spread"][st]["mean"] for s in seeds if "retrain_spread" in s])
        for st in SETS
    }
    out: dict[str, Any] = {
        "n_seeds": len(seeds),
        "seeds": [k for k, s in results["seeds"].items() if "readouts" in s],
        "table": table,
        "retrain_band": band,
        "retrain_spread_l1": spread,
        "inside_band": {
            m: {rn: _inside(band[rn], table[m][rn]["mean"]) for rn in READOUT_NAMES}
            for m in methods
        },
        "per_seed": _per_seed(seeds, methods, band),
        "diagnostics": _diagnostics(seeds),
        "costs": _costs(results, methods),
        "fidelity": _fidelity(seeds),
        "dense_check": _dense_checks(results),
        "solver_warnings": {
            k: s["solver_warnings"] for k, s in results["seeds"].items() if s.get("solver_warnings")
        },
    }
    infos = [s["information"] for s in seeds if "information" in s]
    if infos:
        out["information"] = _information(infos)
    out["original_fits_forget_set"] = [s.get("fit_check", {}).get("fits_forget_set") for s in seeds]
    return out


def resummarize(path: Path, out: Path | None, no_figures: bool) -> dict[str, Any]:
    """Apply the failed-training rule to a finished results.json, then redo the summary, the
    figures and the report (``--resummarize``); the original measurements are not touched."""
    results = json.loads(Path(path).read_text())
    moved = drop_failed_seeds(results, "after the run, by --resummarize")
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    results["meta"].setdefault("resummarized", []).append(
        {
            "command": command,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seeds_dropped": moved,
            "rule": f"a training run diverged, or collapsed: final training error > "
            f"{COLLAPSE_FINAL} x chance level and > {COLLAPSE_RISE} x chance above its best",
        }
    )
    results["summary"] = summarize(results)
    out = Path(out or Path(path).parent)
    out.mkdir(parents=True, exist_ok=True)
    if not no_figures:
        results["meta"]["figures"] = [p.name for p in figures.draw_all(results, out)]
    figures.write_report(results, out / "results.md")
    write_record(out / RESULTS_NAME, results)
    log(f"re-summarised {path} → {out} (seeds dropped: {moved or 'none'})")
    return results
