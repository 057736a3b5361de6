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
from ntkscrub.recipes.runtime import log

__all__ = ["READOUT_NAMES", "RESULTS_NAME", "summarize", "resummarize"]

RESULTS_NAME = "results.json"
READOUT_NAMES = ["error_forget", "error_retain", "error_test", "attack", "relearn"]
READOUT_NAMES += ["l1_forget", "l1_retain", "l1_test"]
_NTK = ("ntk_paper", "ntk_paper_trap", "ntk_ref", "ntk_ref_trap")


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
        rows = [s["diagnostics"][name] for s in seeds if "diagnostics" in s]
        if not rows:
            continue
        scales = [
            s["ntk"][name.replace("_trap", "")]["trapezium_scale"] for s in seeds if "ntk" in s
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
        "diagnostics": _diagnostics(seeds),
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
