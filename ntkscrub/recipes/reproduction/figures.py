"""Figures 1–4 and the markdown report, drawn from ``results.json`` alone.

Redraw without recomputing (``experiments/figures.py`` calls :func:`main`)::

    .venv/bin/python experiments/figures.py experiments/results/quick/results.json

Every function tolerates partial results (a run stopped by its budget): panels without data say
so instead of failing.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ntkscrub.io import save_figure, write_text  # noqa: E402
from ntkscrub.recipes.reproduction.methods import METHODS, SKIPPED  # noqa: E402

# the registry's order is the order of every table and figure; SHORT: two-line tick labels
METHOD_ORDER = list(METHODS)
SHORT = {m.name: m.short for m in METHODS.values()}
READOUTS = [
    ("error_forget", "(a) error on D_f (%)", 100.0),
    ("error_retain", "(b) error on D_r (%)", 100.0),
    ("error_test", "(c) error on test (%)", 100.0),
    ("attack", "(d) attack: D_f predicted member", 1.0),
    ("relearn", "(e) relearn time (epochs)", 1.0),
    ("l1_forget", "softmax L1 to retrain on D_f", 1.0),
]
GREEN = "#2ca02c"


def _excluded(retrains: list[dict[str, Any]]) -> str:
    """ "retrains 1, 3 diverged and are left out of the band; " (or nothing)."""
    out = [f"retrain {k} {r['excluded']}" for k, r in enumerate(retrains) if r.get("excluded")]
    if not out:
        return ""
    return f"{'; '.join(out)}: left out of the band; "


def finished_seeds(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The seeds of a result that got as far as their readouts."""
    return [s for s in results.get("seeds", {}).values() if "readouts" in s]


def readout_value(r: dict[str, Any], readout: str) -> float | None:
    """One readout of one model's readouts record (``seeds.<s>.readouts.<model>``); None where it
    is missing — and for a relearn run that diverged, which has no relearn time. Shared with
    ``reproduce.summarize``."""
    if readout.startswith("error_"):
        return r["error"].get(readout[6:])
    if readout.startswith("l1_"):
        return r["l1_to_retrain"][readout[3:]]["mean"]
    if readout == "attack":
        return (r.get("attack") or {}).get("forget_member_fraction")
    if readout == "relearn":  # a diverged relearn run has no relearn time
        rl = r.get("relearn") or {}
        return None if rl.get("diverged_at_epoch") is not None else rl.get("epochs")
    raise KeyError(readout)


def methods_present(seeds: list[dict[str, Any]]) -> list[str]:
    """The methods of ``METHOD_ORDER`` that some seed has readouts for, in that order."""
    return [m for m in METHOD_ORDER if any(m in s["readouts"] for s in seeds)]


def method_values(seeds: list[dict[str, Any]], method: str, readout: str) -> list[float]:
    """``readout`` of ``method`` in every seed that has it (missing values left out)."""
    vals = [readout_value(s["readouts"][method], readout) for s in seeds if method in s["readouts"]]
    return [v for v in vals if v is not None]


def retrain_values(seeds: list[dict[str, Any]], readout: str) -> list[float]:
    """``readout`` of every retrain of every seed, pooled: the retrain band."""
    vals = [
        readout_value(r, readout)
        for s in seeds
        for k, r in s["readouts"].items()
        if k.startswith("retrain")
    ]
    return [v for v in vals if v is not None]


def _relearn_failures(seeds: list[dict[str, Any]], labels: dict[str, str]) -> str:
    """ "Relearn runs that diverged …: Retrain 4 of 8, …" over all seeds, and the runs in which
    an epoch met the loss target only by collapsing onto the forget class (or nothing)."""
    runs: dict[str, list[tuple[bool, bool]]] = {}
    for s in seeds:
        for name, r in s["readouts"].items():
            rl = r.get("relearn")
            if rl:
                key = "retrain" if name.startswith("retrain") else name
                flags = (rl.get("diverged_at_epoch") is not None, bool(rl.get("collapsed_epochs")))
                runs.setdefault(key, []).append(flags)
    out = []
    for i, what in enumerate(
        (
            "Relearn runs that diverged (non-finite loss: no relearn time, left out of the "
            "relearn column)",
            "Relearn runs in which an epoch met the D_f loss target only with D_r error above "
            "the collapse level (not counted as relearned)",
        )
    ):
        parts = [
            f"{'Retrain' if k == 'retrain' else labels.get(k, k)} {sum(f[i] for f in v)} of "
            f"{len(v)}"
            for k, v in runs.items()
            if any(f[i] for f in v)
        ]
        if parts:
            out.append(f"{what}: " + ", ".join(parts) + ".")
    return " ".join(out)


def _save(
    fig: Any, path: Path, heading: str, results: dict[str, Any], fontsize: float | None = None
) -> Path:
    """Title (heading + the run's one-line description), lay out, write the PNG, close."""
    size = {} if fontsize is None else {"fontsize": fontsize}  # else matplotlib's title size
    fig.suptitle(heading + "\n" + _title(results), **size)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _empty(ax: Any, msg: str) -> None:
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _title(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    cfg = meta.get("config", {})
    n = len(finished_seeds(results))
    extra = " (PARTIAL)" if meta.get("budget", {}).get("stopped") else ""
    syn = " SYNTHETIC DATA" if cfg.get("synthetic") else ""
    return (
        f"preset {meta.get('preset')}: {cfg.get('model')} ×{cfg.get('width')}, "
        f"{n} seed(s), K={cfg.get('retrains')} retrains{syn}{extra}"
    )


# ------------------------------------------------------------------------------------ Fig. 2
def fig2(results: dict[str, Any], path: Path) -> Path:
    """Each readout per method (mean ± std over seeds; dots = seeds) with the retrain band
    (green: mean ± std of all retrains; light green: their min–max)."""
    seeds = finished_seeds(results)
    present = methods_present(seeds)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (rn, label, scale) in zip(axes.flat, READOUTS):
        if not seeds:
            _empty(ax, "no results")
            continue
        band = [v * scale for v in retrain_values(seeds, rn)]
        if band:
            b = np.asarray(band)
            sd = b.std(ddof=1) if len(b) > 1 else 0.0
            ax.axhspan(b.min(), b.max(), color=GREEN, alpha=0.12, lw=0)
            ax.axhspan(b.mean() - sd, b.mean() + sd, color=GREEN, alpha=0.35, lw=0)
            ax.axhline(b.mean(), color=GREEN, lw=1)
        xs, labels = [], []
        for i, m in enumerate(present):
            vals = [v * scale for v in method_values(seeds, m, rn)]
            labels.append(SHORT[m])
            xs.append(i)
            if not vals:
                continue
            color = "0.5" if m == "seed_matched" else ("C3" if m.startswith("ntk") else "C0")
            ax.errorbar(
                i,
                np.mean(vals),
                yerr=np.std(vals, ddof=1) if len(vals) > 1 else 0,
                fmt="o",
                color=color,
                capsize=3,
            )
            ax.plot([i] * len(vals), vals, ".", color=color, alpha=0.4)
        if rn == "relearn":
            cap = results["meta"]["config"].get("relearn_max_epochs")
            if cap:
                ax.axhline(cap + 1, color="k", ls=":", lw=0.8)
                ax.text(0, cap + 1, f" not relearned within {cap}", fontsize=7, va="bottom")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=6.5)
        ax.set_title(label, fontsize=10)
    heading = (
        "Fig. 2 — readouts; green band = retrain on D_r (mean±std, light: min–max); "
        "*seed-matched = NOT a removal"
    )
    return _save(fig, path, heading, results, fontsize=10)


# ------------------------------------------------------------------------------------ Fig. 3
def fig3(results: dict[str, Any], path: Path) -> Path:
    """Test error vs white-box and vs black-box information over the noise sweep; per-query
    information on D_f, D_r and test queries."""
    seeds = [s for s in finished_seeds(results) if "information" in s]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    if not seeds:
        for ax in axes:
            _empty(ax, "no information results")
    else:
        inf = seeds[0]["information"]
        for pname, color in (("ntk", "C3"), ("fisher", "C0")):
            rows = inf["sweep"].get(pname) or []
            if not rows:
                continue
            te = [100 * r["errors"]["test"] for r in rows]
            wb = [r["white_box"] for r in rows]
            label = {"ntk": "NTK scrub + noise", "fisher": "Fisher (noise only)"}[pname]
            axes[0].plot(wb, te, "o-", color=color, label=label)
            for q, ls in (("forget", "-"), ("test", "--")):
                bb = [r["black_box"].get(q) for r in rows]
                if all(v is not None for v in bb):
                    axes[1].plot(
                        bb, te, "o" + ls, color=color, label=f"{label}, {q} queries", alpha=0.9
                    )
            for r in rows[:: max(1, len(rows) // 4)]:
                axes[0].annotate(
                    f"α={r['alpha']:.0e}",
                    (r["white_box"], 100 * r["errors"]["test"]),
                    fontsize=6,
                    color=color,
                )
        for ax, what in ((axes[0], "white box: weights"), (axes[1], "black box: activations")):
            ax.set_xscale("log")
            ax.set_xlabel(f"remaining information, {what} (KL, nats)")
            ax.set_ylabel("test error (%)")
            ax.legend(fontsize=7)
        q = inf.get("query_sizes", {})
        axes[1].set_title(
            f"joint over the query set (|D_f|={q.get('forget')}, |test|={q.get('test')})",
            fontsize=9,
        )
        axes[0].set_title(f"reference = {inf.get('reference')}", fontsize=9)
        ntk = inf["pairs"]["ntk"]["black_box"]
        data, names = [], []
        for qn in ("forget", "retain", "test"):
            if qn in ntk and ntk[qn]["per_query"].get("values"):
                v = np.asarray(ntk[qn]["per_query"]["values"], dtype=float)
                data.append(np.clip(v, 1e-6, None))
                names.append(f"{qn}\n(n={len(v)})")
        if data:
            axes[2].boxplot(data, tick_labels=names, showmeans=True)
            axes[2].set_yscale("log")
            axes[2].set_ylabel(f"per-query information (KL, nats) at α={inf['alpha']:.0e}")
            axes[2].set_title("NTK scrub: which queries leak", fontsize=9)
        else:
            _empty(axes[2], "no per-query values")
    return _save(fig, path, "Fig. 3 — error–information trade-off (Fisher-noise sweep)", results)


# ------------------------------------------------------------------------------------ Fig. 4
FIG4_STYLES = {
    "ntk_ref_trap": ("C3", "-", "NTK ref. + trapezium"),
    "ntk_paper_trap": ("C1", "-", "NTK paper + trapezium"),
    "ntk_ref": ("C3", ":", "NTK ref. (no rescale)"),
    "ntk_paper": ("C1", ":", "NTK paper (no rescale)"),
    "ntk_ce_init": ("C2", "-", "NTK CE at θ0 (a on val)"),
    "ntk_ce_trained": ("C4", "-", "NTK CE at w(D) (a on val)"),
    "ntk_ce_cal": ("C5", "-", "NTK CE at w(D), D_f entropy on val (a on val)"),
    "ntk_projected": ("C9", "-", "NTK projected displacement"),
    "ntk_match": ("C6", "-", "NTK output matching"),
    "ntk_match_ce": ("C8", "-", "NTK output matching (CE targets)"),
}
# the raw-step panel: one line per scrubbed form (un-rescaled Δ, a ∈ [0, 4])
FIG4_FORMS = {
    "ntk_paper": ("C1", "paper form"),
    "ntk_ref": ("C3", "ref.-code form"),
    "ntk_ce_init": ("C2", "CE at θ0"),
    "ntk_ce_trained": ("C4", "CE at w(D)"),
    "ntk_ce_cal": ("C5", "CE at w(D), entropy calibrated"),
    "ntk_projected": ("C9", "projected"),
    "ntk_match": ("C6", "output matching"),
    "ntk_match_ce": ("C8", "output matching, CE targets"),
}


def _spread_band(ax: Any, seeds: list[dict[str, Any]], st: str) -> None:
    """The retrain-vs-retrain softmax-L1 spread on set ``st`` (grey band, mean line)."""
    spread = [s["retrain_spread"][st]["mean"] for s in seeds if "retrain_spread" in s]
    spread = [v for v in spread if v is not None]
    if spread:
        ax.axhspan(min(spread), max(spread), color="0.6", alpha=0.3, lw=0)
        ax.axhline(np.mean(spread), color="0.4", lw=1, label="retrain vs retrain (SGD noise)")


def _curve(ax: Any, a: list[float], curves: list[Any], color: str, ls: str, label: str) -> None:
    mean = np.mean(curves, 0)
    ax.plot(a, mean, ls, color=color, label=label, marker="o", ms=3)
    if len(curves) > 1:
        sd = np.std(curves, 0, ddof=1)
        ax.fill_between(a, mean - sd, mean + sd, color=color, alpha=0.15, lw=0)


def fig4(results: dict[str, Any], path: Path) -> Path:
    """Softmax L1 distance to the retrains along w(D) → scrubbed, on D_f and D_r, with the
    retrain-vs-retrain spread (grey band); third panel: on D_f along the *raw* step w(D) + a·Δ,
    a ∈ [0, 4], of every scrubbed form (issue 13's extended line, ``seeds.<s>.fidelity``)."""
    seeds = [s for s in finished_seeds(results) if "line" in s]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for ax, st in zip(axes, ("forget", "retain")):
        if not seeds:
            _empty(ax, "no line results")
            continue
        _spread_band(ax, seeds, st)
        for name, (color, ls, label) in FIG4_STYLES.items():
            curves = [np.asarray(s["line"][name][st]["mean"]) for s in seeds if name in s["line"]]
            if curves:
                a = next(s["line"][name]["alphas"] for s in seeds if name in s["line"])
                _curve(ax, a, curves, color, ls, label)
        ax.set_xlabel("α  (0 = w(D), 1 = the method's model)")
        ax.set_ylabel("mean ‖softmax − softmax_retrain‖₁")
        ax.set_title(f"on D_{'f' if st == 'forget' else 'r'}", fontsize=10)
        ax.legend(fontsize=6.5)
    ax = axes[2]
    fid = [s for s in seeds if s.get("fidelity")]
    if not fid:
        _empty(ax, "no raw-step lines")
    else:
        _spread_band(ax, fid, "forget")
        for form, (color, label) in FIG4_FORMS.items():
            rows = [s["fidelity"][form]["raw_line"] for s in fid if form in s["fidelity"]]
            if rows:
                curves = [np.asarray(r["forget_l1_mean"]) for r in rows]
                _curve(ax, rows[0]["alphas"], curves, color, "-", label)
        ax.set_xlabel("a  (w(D) + a·Δ, Δ the raw un-rescaled step)")
        ax.set_ylabel("mean ‖softmax − softmax_retrain‖₁ on D_f")
        ax.set_title("on D_f, raw step extended to a = 4", fontsize=10)
        ax.legend(fontsize=6.5)
    return _save(fig, path, "Fig. 4 — scrubbing line, distance to the retrained models", results)


# ------------------------------------------------------------------------------------ Fig. 1
def fig1(results: dict[str, Any], path: Path) -> Path:
    """PCA of the training paths on D and on D_r with the scrubbed weights and noise clouds."""
    seeds = [s for s in finished_seeds(results) if "pca" in s]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    if not seeds:
        for ax in axes:
            _empty(ax, "no PCA results")
    else:
        p = seeds[0]["pca"]
        for ax, which in zip(axes, ("fisher", "ntk")):
            pd_, pr = np.asarray(p["path_original"]), np.asarray(p["path_retrain0"])
            ax.plot(pd_[:, 0], pd_[:, 1], ".-", color="C0", label="training path on D", ms=4)
            ax.plot(pr[:, 0], pr[:, 1], ".-", color="C1", label="training path on D_r", ms=4)
            ax.plot(*p["theta0"], "ks", label="θ0 (pre-trained)")
            ax.plot(*p["original"], "o", color="C0", ms=9, label="w(D)")
            rt = np.asarray(p["retrains"])
            ax.plot(rt[:, 0], rt[:, 1], "*", color="C1", ms=11, label="w(D_r), K retrains")
            ax.plot(*p["seed_matched"], "D", color="0.5", label="seed-matched (not removal)")
            e = p[which]
            cl = np.asarray(e["cloud"])
            if len(cl):
                ax.plot(cl[:, 0], cl[:, 1], ".", color="C3", alpha=0.4, label="scrubbed + noise")
            ax.plot(*e["center"], "x", color="C3", ms=12, mew=3, label="scrubbed (no noise)")
            if which == "ntk":
                for n, xy in p.get("ntk_variants", {}).items():
                    ax.plot(*xy, "+", color="C3", ms=8, alpha=0.7)
                    ax.annotate(n, xy, fontsize=6, color="C3")
            ev = p.get("explained_variance_ratio", [0, 0])
            ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f}% of path variance)")
            ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}%)")
            title = "Fisher forgetting" if which == "fisher" else f"NTK ({e.get('method')})"
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=6, markerscale=0.6)
    return _save(fig, path, "Fig. 1 — PCA projection of the training paths (seed 0)", results)


def draw_all(results: dict[str, Any], out: Path) -> list[Path]:
    """All four figures as PNG under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [
        fig1(results, out / "fig1_pca.png"),
        fig2(results, out / "fig2_readouts.png"),
        fig3(results, out / "fig3_information.png"),
        fig4(results, out / "fig4_line.png"),
    ]


# ------------------------------------------------------------------------------------ report
REFERENCE_TABLE = """\
| model | D_r err | D_f err | test err | relearn | attack (member frac.) \
| softmax L1 to retrain on D_f |
|---|---|---|---|---|---|---|
| Original | 0 | 0 | 24.0 | 1 | 1.00 | 0.748 |
| Retrain | 0 | 36 | 25.6 | 64 | 0.80 | 0 |
| Fine-tune | 0 | 0 | 24.6 | 1 | 0.96 | 0.755 |
| Fisher (α=1e-6) | 15.2 | 12 | 31.0 | 20 | 1.00 | 0.554 |
| NTK (s=23.54) | 0 | 28 | 25.4 | 64 | 0.80 | 0.234 |
"""


def _fmt(ms: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    if not ms or ms.get("mean") is None:
        return "–"
    m = ms["mean"] * scale
    if ms.get("n", 0) > 1:
        return f"{m:.{digits}f} ± {ms['std'] * scale:.{digits}f}"
    return f"{m:.{digits}f}"


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float) and (abs(x) >= 1e4 or (0 < abs(x) < 1e-3)):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _report_header(results: dict[str, Any]) -> list[str]:
    """Title, status, failed seeds, command, hardware, wall time."""
    meta = results.get("meta", {})
    hw = results.get("meta", {}).get("hardware", {})
    summ = results.get("summary") or {}
    L: list[str] = []
    L.append(f"# §5 reproduction — preset `{meta.get('preset')}`\n")
    stopped = meta.get("budget", {}).get("stopped")
    status = "PARTIAL (" + stopped + ")" if stopped else "complete"
    if meta.get("error"):
        status = "FAILED (see results.json meta.error)"
    L.append(f"- **Status**: {status}; seeds finished: {summ.get('seeds', [])}")
    for s_name, f in (meta.get("failed_seeds") or {}).items():
        L.append(f"- **Seed {s_name} FAILED**: {f.get('reason')}")
    for s_name, s in results.get("seeds", {}).items():
        failures = s.get("method_failures") or {}
        skipped = [m for m, why in failures.items() if why == SKIPPED]
        if skipped:
            L.append(f"- Seed {s_name}: not run (`forget.skip_methods`): {', '.join(skipped)}")
        for m, why in failures.items():
            if why != SKIPPED:
                L.append(
                    f"- **METHOD FAILED, seed {s_name}: {m}** (left out of this seed): `{why}`"
                )
        for w in s.get("solver_warnings") or []:
            L.append(
                f"- **SOLVER WARNING, seed {s_name}: {w.get('what')} did NOT converge** (its "
                f"partial result is what the readouts use): {json.dumps(w, default=str)}"
            )
    L.append(f"- **Command**: `{meta.get('command')}`")
    gpu = f", GPU {hw.get('gpu')} ({hw.get('gpu_memory_gib')} GiB)" if hw.get("gpu") else ""
    L.append(
        f"- **Hardware**: CPU {hw.get('cpu_model')} ({hw.get('cpu_affinity')} cores usable, "
        f"{hw.get('torch_threads')} torch threads, load average at start "
        f"{_loads(hw.get('loadavg_at_start'))}, at end {_loads(hw.get('loadavg_at_end'))})"
        f"{gpu}; device `{hw.get('device')}`; torch {hw.get('torch')}, Python {hw.get('python')}"
    )
    ptr = (results.get("pretrain") or {}).get("training") or {}
    wall = f"- **Wall time**: {meta.get('wall_seconds', 0):.0f} s for this invocation"
    if ptr.get("from_cache"):
        total = meta.get("wall_seconds", 0) + ptr.get("seconds", 0)
        wall += (
            f"; pre-training ({ptr.get('seconds', 0):.0f} s when it ran) was read from the "
            "checkpoint cache of an earlier invocation with the same pre-training settings, so "
            f"a run from scratch takes about {total:.0f} s at this load"
        )
        made = (ptr.get("recipe") or {}).get("threads")
        if hw.get("device") == "cpu" and made is not None and made != hw.get("torch_threads"):
            wall += (
                f". **That checkpoint was trained with {made} torch threads, this run has "
                f"{hw.get('torch_threads')}**: on a CPU the thread count changes the float "
                "summation order, which SGD amplifies, so a run from scratch here would not "
                "reproduce it bit for bit"
            )
    L.append(wall)
    return L


def _report_setup(results: dict[str, Any]) -> list[str]:
    """Data, model, recipes, the tuned Fisher α, each seed's training."""
    cfg = results.get("meta", {}).get("config", {})
    seeds = finished_seeds(results)
    L: list[str] = []
    if cfg.get("synthetic"):
        L.append("- **DATA ARE SYNTHETIC** (random images): numbers say nothing about CIFAR.")
    pre = results.get("pretrain") or {}
    L.append(f"- **Pre-training data**: {pre.get('source', '–')}")
    if seeds:
        src = seeds[0]["split"]["source"]
        L.append(f"- **Fine-tuning data** (seed of the first result): {src}")
    L.append(
        f"- **Model**: {cfg.get('model')} width {cfg.get('width')}, "
        f"{(pre.get('parameters') or '–')} parameters at pre-training; pre-training "
        f"{cfg.get('pre_epochs')} epochs (lr {cfg.get('pre_lr')}, {cfg.get('pre_schedule')}), "
        f"validation error {_pct(pre.get('val_error'))}"
    )
    L.append(
        f"- **Fine-tuning recipe** (w(D), retrains, seed-matched): SGD lr {cfg.get('ft_lr')} "
        f"momentum 0.9, weight decay {cfg.get('ft_wd')} toward θ0, batch {cfg.get('ft_batch')}, "
        f"BatchNorm frozen, schedule `{cfg.get('ft_schedule')}` over {cfg.get('ft_epochs')} "
        f"epochs then until zero training error (≤ {cfg.get('ft_max_epochs')} epochs)"
    )
    ft_lr, ft_sched = cfg.get("finetune_lr"), cfg.get("finetune_schedule")
    L.append(
        f"- **Fine-tune baseline**: {cfg.get('finetune_epochs')} epochs on D_r from w(D), the "
        f"same recipe at lr {ft_lr if ft_lr is not None else cfg.get('ft_lr')}, schedule "
        f"`{ft_sched if ft_sched is not None else cfg.get('ft_schedule')}`"
    )
    tuned = {
        k: (s.get("methods_config") or {}).get("fisher_val_tuning")
        for k, s in results.get("seeds", {}).items()
    }
    tuned = {k: t for k, t in tuned.items() if t}
    if tuned:
        L.append(
            "- **Fisher forgetting, α tuned on validation**: the largest α of the noise sweep "
            "whose mean increase of the validation cross-entropy (images outside D) over "
            "w(D)'s is within one standard error of the paired per-image differences; "
            "chosen α per seed: "
            + ", ".join(
                f"{k}: {t['alpha']:.0e}" + ("" if t["qualified"] else " (none qualified: smallest)")
                for k, t in tuned.items()
            )
            + f" (Fisher forgetting: the reference code's α = {cfg.get('fisher_alpha'):g})"
        )
    for s_name, s in results.get("seeds", {}).items():
        tr = s.get("training", {})
        if not tr:
            continue
        o = tr.get("original", {})
        rts = tr.get("retrains", [])
        L.append(
            f"  - seed {s_name}: w(D) {o.get('epochs')} epochs, final train error "
            f"{_pct(o.get('final_train_error'))}; retrains epochs "
            f"{[r.get('epochs') for r in rts]}, final errors "
            f"{[_pct(r.get('final_train_error')) for r in rts]}; "
            + _excluded(rts)
            + (
                f"the Fine-tune baseline {tr['finetune']['excluded']}: left out of this seed; "
                if (tr.get("finetune") or {}).get("excluded")
                else ""
            )
            + (s.get("fit_check", {}).get("statement", ""))
        )
    L.append("- Split indices: `results.json` → `seeds.<seed>.split.indices` (and pre-training).")
    L.append("")
    return L


def _report_table(results: dict[str, Any]) -> list[str]:
    """The results table beside the reference code's logged numbers."""
    meta = results.get("meta", {})
    cfg = results.get("meta", {}).get("config", {})
    summ = results.get("summary") or {}
    seeds = finished_seeds(results)
    L: list[str] = []
    L.append("## Results (mean ± std over seeds; errors in %)\n")
    L.append(
        "Attack = fraction of D_f the entropy attack predicts *member* (lower = more forgotten; "
        "compare with Retrain). Relearn = epochs of fine-tuning on D until the D_f loss is back at "
        f"w(D)'s; {cfg.get('relearn_max_epochs', '?')}+1 means not within the cap; runs that "
        "record D_r errors count an epoch only when D_r error is below the collapse level. L1 = "
        "mean softmax L1 distance to the K retrains (a retrain: to the other K−1)."
    )
    L.append("")
    L.append(
        "| method | D_r err | D_f err | test err | relearn | attack | L1 to retrain D_f "
        "| L1 D_r | L1 test |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|")
    table = summ.get("table", {})
    band = summ.get("retrain_band", {})

    def row(label: str, t: dict[str, Any]) -> str:
        return (
            f"| {label} | {_fmt(t.get('error_retain'), 100)} | {_fmt(t.get('error_forget'), 100)} "
            f"| {_fmt(t.get('error_test'), 100)} | {_fmt(t.get('relearn'), 1, 1)} "
            f"| {_fmt(t.get('attack'), 1, 2)} | {_fmt(t.get('l1_forget'), 1, 3)} "
            f"| {_fmt(t.get('l1_retain'), 1, 3)} | {_fmt(t.get('l1_test'), 1, 3)} |"
        )

    labels = meta.get("method_labels", {})
    for m in ["original"]:
        if m in table:
            L.append(row(labels.get(m, m), table[m]))
    if band:
        L.append(row(f"**Retrain** (all {band.get('error_test', {}).get('n')} retrains)", band))
    for m in METHOD_ORDER[1:]:
        if m in table:
            L.append(row(labels.get(m, m), table[m]))
    spread = summ.get("retrain_spread_l1", {})
    if spread:
        L.append(
            "\nRetrain-vs-retrain softmax L1 (pairwise, the SGD-noise floor of every distance "
            f"above): D_f {_fmt(spread.get('forget'), 1, 3)}, "
            f"D_r {_fmt(spread.get('retain'), 1, 3)}, test {_fmt(spread.get('test'), 1, 3)} "
            "(mean over seeds of the pairwise mean)."
        )
    relearn_note = _relearn_failures(seeds, labels)
    if relearn_note:
        L.append("\n" + relearn_note)
    L.append(
        "\n### The reference code's logged numbers (REFERENCE.md §2; one seed, ResNet-18 ×0.4)\n"
    )
    L.append(REFERENCE_TABLE)
    L.append(
        DIFFERENCES.format(model=cfg.get("model"), width=cfg.get("width"), recipe=_recipe(cfg))
    )
    return L


def _report_band(results: dict[str, Any]) -> list[str]:
    """Per readout: inside the retrain band? Then the statements."""
    cfg = results.get("meta", {}).get("config", {})
    summ = results.get("summary") or {}
    labels = results.get("meta", {}).get("method_labels", {})
    L: list[str] = []
    L.append("\n## Per readout: does each method lie inside the retrain band?\n")
    L.append(
        "Band = mean ± std over all retrains (of all seeds); in brackets whether the value lies "
        "within the retrains' min–max. Values are the method's mean over seeds."
    )
    L.append("")
    inside = summ.get("inside_band", {})
    names = ["error_forget", "error_retain", "error_test", "attack", "relearn", "l1_forget"]
    L.append("| method | " + " | ".join(names) + " |")
    L.append("|---|" + "---|" * len(names))
    for m in METHOD_ORDER:
        if m not in inside:
            continue
        cells = []
        for rn in names:
            e = inside[m].get(rn)
            if not e:
                cells.append("–")
                continue
            mark = "inside" if e["inside_mean_pm_std"] else "outside"
            mm = "in min–max" if e["inside_min_max"] else "not in min–max"
            cells.append(f"{mark} ({mm})")
        L.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    L.append("")
    L.extend(_statements(summ, cfg))
    return L


def _report_diagnostics(results: dict[str, Any]) -> list[str]:
    """The linearisation diagnostics (not in the paper)."""
    summ = results.get("summary") or {}
    labels = results.get("meta", {}).get("method_labels", {})
    L: list[str] = []
    L.append("\n## Linearisation diagnostics (not in the paper)\n")
    L.append(
        "cos = cosine between the predicted shift h(w(D)) − w(D) and the true w(D_r,k) − w(D), "
        "mean over the K retrains; ratio = ‖predicted‖/‖true‖; dist ratio = ‖h − w(D_r,k)‖ / "
        "‖w(D) − w(D_r,k)‖ (< 1: closer to the retrain than w(D) was). Seed-matched = the "
        "reference code's device (same seed and batch order, forget images replaced by duplicate "
        "retain images): NOT a true removal. The reference code reports cos 0.495."
    )
    L.append("")
    L.append(
        "| variant | cos vs retrains | ratio vs retrains | cos vs seed-matched "
        "| ratio vs seed-matched | dist ratio to retrains | step a |"
    )
    L.append("|---|---|---|---|---|---|---|")
    diag = summ.get("diagnostics", {})
    for n in METHOD_ORDER:
        if n not in diag:
            continue
        d = diag[n]
        L.append(
            f"| {labels.get(n, n)} | {_fmt(d['cos_vs_retrains'], 1, 3)} "
            f"| {_fmt(d['norm_ratio_vs_retrains'], 1, 3)} | {_fmt(d['cos_vs_seed_matched'], 1, 3)} "
            f"| {_fmt(d['norm_ratio_vs_seed_matched'], 1, 3)} "
            f"| {_fmt(d['dist_ratio_to_retrains'], 1, 3)} "
            f"| {_fmt(d.get('step') or d['trapezium_scale'], 1, 2)} |"
        )
    L.append(
        "\nstep a: the applied multiple of the raw step Δ — the trapezium factor (`+ trapezium`),"
        " the validation-chosen a (`step on val`: the a whose realised change of the validation"
        " logits best matches the linear model's J_val·Δ), 1 otherwise."
    )
    if "retrain_shift_pairwise_cos" in diag:
        L.append(
            f"\nPairwise cosine between two retrains' true shifts (w(D_r,i) − w(D) vs "
            f"w(D_r,j) − w(D)): {_fmt(diag['retrain_shift_pairwise_cos'], 1, 3)} — the ceiling "
            "for any predictor of one particular retrain."
        )
    for s_name, s in results.get("seeds", {}).items():
        ts = s.get("diagnostics", {}).get("true_shifts")
        if ts:
            L.append(
                f"- seed {s_name}: ‖w(D_r) − w(D)‖ = "
                f"{_fmt(ts['norm_retrain_minus_original'], 1, 3)}, ‖w(D_r,i) − w(D_r,j)‖ = "
                f"{_fmt(ts['distance_between_retrains'], 1, 3)}, "
                f"‖seed-matched − w(D)‖ = {_num(ts['norm_seed_matched_minus_original'])}"
            )
    return L


_LAND = (
    ("error_forget", "D_f err (%)", 100.0, 1),
    ("attack", "attack", 1.0, 2),
    ("error_test", "test err (%)", 100.0, 1),
    ("l1_forget", "L1 D_f", 1.0, 3),
)


def _report_methods(results: dict[str, Any]) -> list[str]:
    """Issue 13: for every method, where it lands against the retrain band (D_f error, attack,
    test error, softmax-L1 to the retrains on D_f against the retrain-vs-retrain floor, cosine to
    the true shift) and what it cost (matvecs, seconds)."""
    summ = results.get("summary") or {}
    labels = results.get("meta", {}).get("method_labels", {})
    table, band, inside = (
        summ.get("table", {}),
        summ.get("retrain_band", {}),
        summ.get("inside_band", {}),
    )
    costs, diag = summ.get("costs", {}), summ.get("diagnostics", {})
    floor = (summ.get("retrain_spread_l1") or {}).get("forget", {}).get("mean")
    L = ["\n## Per method: where it lands against the retrain band, and its cost\n"]
    L.append(
        "Each cell: the method's mean over seeds, then `in` / `out` of the band (mean ± std of "
        "all retrains). L1 D_f ×floor = its softmax-L1 to the retrains on D_f over the "
        "retrain-vs-retrain value. cos = cosine of its weight shift to the true shifts "
        "w(D_r,k) − w(D). matvecs = retain column products of the scrub (one JVP + one VJP over "
        "D_r each; dense solves count none); seconds = the scrub's wall time (other methods: "
        "their stage's)."
    )
    L.append("")
    head = "| method | " + " | ".join(n for _, n, _, _ in _LAND)
    L.append(head + " | L1 D_f ×floor | cos to true shift | step a | matvecs | seconds | solves |")
    L.append("|---|" + "---|" * (len(_LAND) + 6))
    bcells = [f"{_fmt(band.get(rn), sc, d)} (band)" for rn, _, sc, d in _LAND]
    L.append(f"| **Retrain band** | {' | '.join(bcells)} | 1 | – | – | – | – | – |")
    for m in METHOD_ORDER:
        if m not in table:
            continue
        cells = []
        for rn, _, sc, d in _LAND:
            e = (inside.get(m) or {}).get(rn)
            tag = "" if not e else (" in" if e["inside_mean_pm_std"] else " out")
            cells.append(_fmt(table[m].get(rn), sc, d) + tag)
        l1 = (table[m].get("l1_forget") or {}).get("mean")
        ratio = f"{l1 / floor:.2f}" if l1 is not None and floor else "–"
        c = costs.get(m, {})
        conv = {True: "converged", False: "**NOT converged**", None: "–"}[c.get("all_converged")]
        cos = _fmt((diag.get(m) or {}).get("cos_vs_retrains"), 1, 3)
        L.append(
            f"| {labels.get(m, m)} | {' | '.join(cells)} | {ratio} | {cos} "
            f"| {_fmt(c.get('step'), 1, 2)} | {_fmt(c.get('matvecs'), 1, 0)} "
            f"| {_fmt(c.get('seconds'), 1, 1)} | {conv} |"
        )
    L.extend(_report_per_seed(summ, labels))
    L.extend(_report_fidelity(summ))
    L.extend(_report_dense_check(summ))
    return L


def _report_per_seed(summ: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Issue 13's goal, counted per seed: inside the seed's own band / the pooled band."""
    per, n = summ.get("per_seed") or {}, summ.get("n_seeds", 0)
    if not per:
        return []
    L = [f"\n### Per seed: in how many of the {n} seeds each method is inside the band\n"]
    L.append(
        "Each cell: seeds inside the seed's own band (mean ± std of its retrains) · inside the "
        "pooled band (all retrains). *D_f + attack + test* counts the seeds inside on all three "
        "at once (issue 13's goal asks for each in ≥ 3 of 4 seeds)."
    )
    L.append("")
    names = [n for rn, n, _, _ in _LAND]
    L.append("| method | " + " | ".join(names) + " | D_f + attack + test |")
    L.append("|---|" + "---|" * (len(_LAND) + 1))
    for m in METHOD_ORDER:
        if m not in per:
            continue
        cells = [f"{per[m][rn]['own']} · {per[m][rn]['pooled']}" for rn, _, _, _ in _LAND]
        goal = per[m]["goal"]
        cells.append(f"{goal['own']} · {goal['pooled']}")
        L.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    return L


def _report_fidelity(summ: dict[str, Any]) -> list[str]:
    """Issue 13 item 1 per scrubbed form: the kernel prediction, the raw line, laziness."""
    fid = summ.get("fidelity") or {}
    if not fid:
        return []
    L = ["\n### Fidelity diagnostics per scrubbed form (issue 13, item 1)\n"]
    L.append(
        "kernel pred. = the retain-only linear model's outputs on D_f, f(θ_lin; D_f) + J_f "
        "w_lin(D_r): if it does not predict the retrains' outputs, no step built from it can. "
        "raw line = w(D) + a·Δ, a ∈ [0, 4]: the a with the smallest D_f softmax-L1 (read on D_f "
        "and the retrains: a diagnostic, never a tuner). laziness = ‖w − θ0 − w_lin‖ / ‖w − θ0‖ "
        "(≪ 1: lazy; at θ0 only)."
    )
    L.append("")
    L.append(
        "| form | kernel pred. D_f err (%) | kernel pred. L1 D_f | raw line best a "
        "| its L1 D_f | laziness w(D) | laziness retrains |"
    )
    L.append("|---|---|---|---|---|---|---|")
    for form, f in fid.items():
        L.append(
            f"| {form} | {_fmt(f['kernel_forget_error'], 100, 1)} "
            f"| {_fmt(f['kernel_forget_l1'], 1, 3)} | {_fmt(f['raw_argmin_alpha'], 1, 2)} "
            f"| {_fmt(f['raw_argmin_l1'], 1, 3)} | {_fmt(f['laziness_original'], 1, 3)} "
            f"| {_fmt(f['laziness_retrains'], 1, 3)} |"
        )
    return L


def _chained_over(entry: dict[str, Any], exp: float | None) -> bool:
    """Whether a dense-check entry is a chained (output-matching) form over its expectation:
    those carry a looser ``expected`` than the one-shot forms' ``expected_max``."""
    own = entry.get("expected")
    chained = own is not None and exp is not None and own > exp
    return chained and entry["rel_l2_delta"] > own


def _report_dense_check(summ: dict[str, Any]) -> list[str]:
    """Issue 13 item 4: the cg path against its dense twin on one seed."""
    checks = summ.get("dense_check") or {}
    if not checks:
        return ["\n### cg vs dense\n", "No seed ran the dense check (`dense_check_seed`)."]
    L = ["\n### The matrix-free path against its dense twin (issue 13, item 4)\n"]
    for s_name, chk in checks.items():
        exp = chk.get("expected_max")
        L.append(
            f"Seed {s_name}: every NTK scrub and the information bounds again with explicit "
            f"Jacobians (Cholesky). Largest relative difference of the shifts "
            f"{_num(chk.get('max_rel_shift'))}, of the bounds {_num(chk.get('max_rel_bounds'))} "
            f"(float32 expectation ≤ {exp:g}; the trapezium factor, whose cos(Δ, e) amplifies "
            "small differences, ≤ 10× that)."
        )
        prec = chk.get("float32_jacobian") or {}
        if prec:
            L.append(
                "The float32 floor of this comparison — the network's float32 Jacobian products "
                "on D_f against float64 ones (JVP / VJP, relative): "
                + "; ".join(
                    f"at {'θ0' if at == 'init' else 'w(D)'} {_num(p.get('jvp'))} / "
                    f"{_num(p.get('vjp'))}"
                    for at, p in prec.items()
                )
                + ". This is how far both paths are from a float64 model, not from each "
                "other: the dense twin's explicit rows are checked against the batched products "
                "(and recomputed where a ReLU kink sent the per-sample pass down another branch) "
                "and its system is solved in float64, so what separates cg from dense is the "
                "solves' tolerance. A floor far above 1e-6 means a unit of D_f sits at a kink of "
                "the float32 forward pass (a different linearisation, not rounding)."
            )
        L.append("")
        L.append(
            "| form | ‖Δ_cg − Δ_dense‖/‖Δ_dense‖ | largest entry | trapezium factor "
            "| D_f logits | D_f softmax-L1 | test softmax-L1 "
            "| cg tol | cg converged | cg matvecs | cg s | dense s |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for form, e in (chk.get("scrub") or {}).items():
            outs = e.get("outputs") or {}
            f_out, t_out = outs.get("forget") or {}, outs.get("test") or {}
            L.append(
                f"| {form} | {_num(e['rel_l2_delta'])} | {_num(e['rel_max_entry_delta'])} "
                f"| {_num(e['rel_trapezium_scale'])} | {_num(f_out.get('rel_logits'))} "
                f"| {_num(f_out.get('softmax_l1'))} | {_num(t_out.get('softmax_l1'))} "
                f"| {_num(e.get('cg_tol'))} "
                f"| {e['cg_converged']} | {_num(e.get('cg_matvecs'))} "
                f"| {_num(e.get('cg_seconds'))} | {_num(e.get('dense_seconds'))} |"
            )
        for pname, rel in (chk.get("bounds") or {}).items():
            L.append(
                f"- bounds, pair {pname}: relative differences (cg KL / dense KL, nats) "
                + ", ".join(
                    f"{k} {_num(v['rel'])} ({_num(v['kl_cg'])} / {_num(v['kl_dense'])})"
                    if isinstance(v, dict)
                    else f"{k} {_num(v)}"
                    for k, v in rel.items()
                )
            )
        if chk.get("bounds"):
            L.append(
                "  (relative to the magnitude of the KL's terms, ½(|quadratic| + |tr(Σ0⁻¹Σ)| + "
                "|log-det|), when that exceeds |KL|: the KL of two close models is a difference of "
                "large terms and its rounding scales with them)"
            )
        scrub = chk.get("scrub") or {}
        chained = [f for f, e in scrub.items() if _chained_over(e, exp)]
        if chained:
            L.append(
                f"- **Output matching** ({', '.join(chained)}) differs by more than its "
                f"{_num(scrub[chained[0]].get('expected'))}: its Levenberg–Marquardt rounds "
                "re-linearise the ReLU network where units of D_f and the anchors sit within "
                "float32 rounding of their kink, so they are not continuous in their start "
                "(quick preset, seed 0: a first step moved by 1e-6 ends 1.3e-2 away in weights; "
                "a ten times smaller `cg_tol` left cg vs dense at 3.5e-2; "
                "`benchmarks/results/cpu/match_sensitivity/`). A smaller `cg_tol` does not "
                "bring its weights closer; read its output columns instead."
            )
        others_over = any(
            e["rel_l2_delta"] > e.get("expected", exp) for f, e in scrub.items() if f not in chained
        )
        if chk.get("shift_within_expected") is False and (others_over or not chained):
            L.append(
                f"- **The shifts differ by more than {exp:g}.** The CG solves stop at a "
                "relative residual of `cg_tol` (float32 default 1e-3), and the error of the "
                "solution can be up to κ times that residual; rerun with a smaller "
                "`--set cg_tol=...` (at more matvecs): if the difference falls with it, it "
                "is the tolerance; if not, the products and the explicit rows differ (the "
                "twin's rows follow the batched products, so that would be a bug)."
            )
        if chk.get("bounds_within_expected") is False:
            L.append(
                f"- **The bounds differ by more than {exp:g}.** The diagonal-Fisher bounds "
                "solve nothing: cg and dense differ only in how the query Jacobians are formed "
                "(VJPs of unit vectors vs explicit rows, float32), so a larger difference means "
                "a KL dominated by rounding (see the KL values) or a product bug."
            )
        L.append("")
    return L


def _report_tail(results: dict[str, Any]) -> list[str]:
    """Information, stage wall times, figures."""
    meta = results.get("meta", {})
    L: list[str] = []
    L.append("\n## Information (Fig. 3)\n")
    L.extend(_information(results))
    L.append("\n## Stage wall times (s)\n")
    st = meta.get("stage_seconds", {})
    agg: dict[str, float] = {}
    for k, v in st.items():
        agg[k.split("/")[-1]] = agg.get(k.split("/")[-1], 0.0) + v
    L.append(", ".join(f"{k} {v:.0f}" for k, v in agg.items()))
    L.append("\n## Figures\n")
    for f in ("fig1_pca.png", "fig2_readouts.png", "fig3_information.png", "fig4_line.png"):
        L.append(f"![{f}]({f})")
    return L


def write_report(results: dict[str, Any], path: Path) -> Path:
    """``results.md``: command, hardware, data, the table beside the reference code's numbers,
    per-readout statements, diagnostics and information — generated from the JSON."""
    L: list[str] = []
    for section in (
        _report_header,
        _report_setup,
        _report_table,
        _report_band,
        _report_methods,
        _report_diagnostics,
        _report_tail,
    ):
        L.extend(section(results))
    path = Path(path)
    write_text(path, "\n".join(L) + "\n")
    return path


DIFFERENCES = """
**Differences from the reference code and the paper** (why the numbers differ):

- *Retrain is a true removal here* (D_r only, K independent SGD seeds → a band); the reference
  code overwrote each forget image with a random retain image (500 samples), which is what our
  "seed-matched" row does — reported separately and never used as the gold standard.
- *Test set disjoint* (CIFAR-10 test split); the reference drew its "test" images from the train
  split (overlap possible), so its test errors and its attack are not comparable one-to-one.
- *Model*: {model} ×{width} here; the reference's logged run is a pre-activation ResNet-18 ×0.4.
- *Pre-training*: CIFAR-100 is not available here, so pre-training uses the stated stand-in
  (CIFAR-10 classes 5–9, fewer images and epochs than the reference's 40k CIFAR-100 images); a
  weaker θ0 makes fine-tuning move further and the linearisation worse.
- *Data*: a JPEG copy of CIFAR-10 (about 2–3 points of accuracy lower than the official files).
- *Fine-tuning*: {recipe}
- *Relearn time* is capped (see the cap above); a capped value is a lower bound.
- *Information* is reported as the Gaussian KL in nats (with its ½, log-det sign fixed); the
  reference prints 2·KL of the reversed direction (`reference_two_kl` in the JSON). The noise is
  the reference's diagonal Fisher recipe, and the reference model is retrain 0 only.
"""


def _recipe(cfg: dict[str, Any]) -> str:
    """What the fine-tuning actually did, against the paper's recipe."""
    txt = (
        f"lr {cfg.get('ft_lr')} (`{cfg.get('ft_schedule')}` schedule), momentum 0.9, weight "
        f"decay {cfg.get('ft_wd')} toward θ0, batch {cfg.get('ft_batch')}, BatchNorm frozen, "
        f"until zero training error or {cfg.get('ft_max_epochs')} epochs (the paper: lr 0.01, "
        "until zero training error; REFERENCE.md §1 found the constant rate unstable at full "
        "width)."
    )
    if cfg.get("head_probe_epochs"):
        txt += (
            f" θ0's re-initialised head was first fitted on the validation images only (head "
            f"only, {cfg.get('head_probe_epochs')} epochs, lr {cfg.get('head_probe_lr')}) — a "
            "deviation: on this narrow network a random head's first gradients wrecked the "
            "pre-trained features (77 % training error after one epoch). D_f never enters θ0."
        )
    return txt


def _loads(x: Any) -> str:
    return "/".join(f"{v:.1f}" for v in x) if x else "–"


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


_STATEMENT_READOUTS = {
    "error_forget": "error on D_f",
    "error_retain": "error on D_r",
    "error_test": "test error",
    "attack": "membership attack",
    "relearn": "relearn time",
    "l1_forget": "softmax L1 to retrain on D_f",
}


def _flat_readouts(summ: dict[str, Any]) -> list[str]:
    """Readouts on which every model and every retrain has one value (relearn time all at its
    cap, say): they cannot tell methods apart, so "inside the band" would be vacuous."""
    inside = summ.get("inside_band", {})
    flat = []
    for r in _STATEMENT_READOUTS:
        band = (summ.get("retrain_band") or {}).get(r) or {}
        vals = [(summ.get("table") or {}).get(m, {}).get(r, {}).get("mean") for m in inside]
        vals = [v for v in vals if v is not None] + [band.get("min"), band.get("max")]
        if None not in vals and len(vals) > 2 and max(vals) - min(vals) <= 1e-12:
            flat.append(r)
    return flat


def _statements(summ: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Per NTK variant: the readouts inside / outside the retrain band; then w(D)'s fit of D_f
    and the information statements."""
    L = ["### Statements\n"]
    inside = summ.get("inside_band", {})
    head = cfg.get("headline", "ntk_ref_trap")
    names, flat = _STATEMENT_READOUTS, _flat_readouts(summ)
    for m in (m for m, e in METHODS.items() if e.diagnostics):
        if m not in inside:
            continue
        kept = [r for r in names if r not in flat and inside[m].get(r) is not None]
        ins = [names[r] for r in kept if inside[m][r]["inside_mean_pm_std"]]
        outs = [names[r] for r in kept if not inside[m][r]["inside_mean_pm_std"]]
        star = " (headline)" if m == head else ""
        L.append(
            f"- **{m}{star}** inside the retrain band for: {', '.join(ins) or 'none'}; "
            f"outside for: {', '.join(outs) or 'none'}."
        )
    for r in flat:
        v = summ["retrain_band"][r]["min"]
        L.append(
            f"- **{names[r]}: uninformative here** — every method and every retrain has the same "
            f"value ({v:g}), so it is left out of the statements above."
        )
    fits = summ.get("original_fits_forget_set")
    if fits is not None:
        L.append(
            f"- w(D) fits D_f (zero D_f error) per seed: {fits}. Where it does not, "
            "forgetting readouts on D_f are weak evidence."
        )
    return L + _information_statements(summ.get("information"))


def _information_statements(info: dict[str, Any] | None) -> list[str]:
    """Black box vs white box over the α sweep, and per-query leakage by query set."""
    if not info:
        return []
    L = []
    r = info["log10_white_over_black_forget_ntk"]
    if r.get("mean") is not None:
        verdict = (
            "orders of magnitude below over the whole sweep, as the paper reports"
            if r["min"] >= 2
            else "at least two orders of magnitude below for part of the sweep only"
            if r["max"] >= 2
            else "one to two orders of magnitude below, not the paper's several"
            if r["max"] >= 1
            else "NOT below by an order of magnitude"
        )
        L.append(
            "- Black box vs white box (NTK scrub; the same α gives the same test error): "
            f"log10(white-box KL / black-box KL on the 25 D_f queries jointly) ranges "
            f"{r['min']:.2f} … {r['max']:.2f} over the α sweep (table below) — {verdict}."
        )
    pq = info["per_query_mean_kl_ntk"]
    f, t = pq.get("forget", {}).get("mean"), pq.get("test", {}).get("mean")
    if f is not None and t is not None:
        L.append(
            f"- Per-query information at α={info['alpha']:.0e}: D_f queries "
            f"{_num(f)} nats, D_r {_num(pq.get('retain', {}).get('mean'))}, test {_num(t)} — "
            + (
                "queries from the forget set leak more than test queries (as in the paper)."
                if f > t
                else "forget-set queries do NOT leak more than test queries here."
            )
        )
    return L


def _information(results: dict[str, Any]) -> list[str]:
    L: list[str] = []
    for s_name, s in results.get("seeds", {}).items():
        inf = s.get("information")
        if not inf:
            continue
        L.append(
            f"Seed {s_name}, reference model {inf['reference']}, α = {inf['alpha']:.0e} "
            "(KL in nats; white box over all weights, black box jointly over each query set):\n"
        )
        L.append(
            "| pair | white box | black box D_f | black box D_r | black box test "
            "| per-query D_f | per-query D_r | per-query test |"
        )
        L.append("|---|---|---|---|---|---|---|---|")
        for pn, p in inf["pairs"].items():
            bb = p["black_box"]
            cells = [_num(p["white_box"]["kl"])]
            cells += [_num(bb.get(q, {}).get("kl")) for q in ("forget", "retain", "test")]
            cells += [
                _num((bb.get(q, {}).get("per_query") or {}).get("mean"))
                for q in ("forget", "retain", "test")
            ]
            label = {
                "ntk": "NTK scrub vs retrain0",
                "fisher": "Fisher (w(D)) vs retrain0",
                "retrain_floor": "retrain1 vs retrain0 (floor)",
            }.get(pn, pn)
            L.append(f"| {label} | " + " | ".join(cells) + " |")
        L.append(
            "\nNoise sweep (NTK scrub + Fisher noise at scale α; information from the terms at "
            "the α above, exact for this noise; errors from actual noise draws):\n"
        )
        L.append(
            "| α | test err (%) | D_f err (%) | white box | black box D_f | black box test "
            "| log10(white / black D_f) | Fisher: test err | Fisher: white | Fisher: black D_f |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        fis = {r["alpha"]: r for r in inf["sweep"].get("fisher", [])}
        for r in inf["sweep"].get("ntk", []):
            wb, bf = r["white_box"], r["black_box"].get("forget")
            ratio = math.log10(wb / bf) if wb and bf and wb > 0 and bf > 0 else None
            f = fis.get(r["alpha"], {})
            L.append(
                f"| {r['alpha']:.0e} | {100 * r['errors']['test']:.1f} "
                f"| {100 * r['errors']['forget']:.1f} | {_num(wb)} | {_num(bf)} "
                f"| {_num(r['black_box'].get('test'))} | {_num(ratio)} "
                f"| {100 * f['errors']['test']:.1f} | {_num(f.get('white_box'))} "
                f"| {_num(f.get('black_box', {}).get('forget'))} |"
                if f
                else f"| {r['alpha']:.0e} | {100 * r['errors']['test']:.1f} "
                f"| {100 * r['errors']['forget']:.1f} | {_num(wb)} | {_num(bf)} "
                f"| {_num(r['black_box'].get('test'))} | {_num(ratio)} | – | – | – |"
            )
        chk = inf.get("alpha_scaling_check")
        if chk:
            L.append(
                f"\nα-scaling check at α={chk['alpha']:.0e}: white box direct "
                f"{_num(chk['white_box_direct'])} vs scaled {_num(chk['white_box_scaled'])}; black "
                f"box D_f direct {_num(chk['black_box_forget_direct'])} vs scaled "
                f"{_num(chk['black_box_forget_scaled'])}."
            )
        L.append("")
        break  # the first seed with information; the JSON holds the others
    return L or ["(no information results)"]


def main(argv: list[str] | None = None) -> None:
    """``figures.py RESULTS_JSON [OUT_DIR]``: redraw the figures and the report from its JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: figures.py path/to/results.json [out_dir]")
    src = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else src.parent
    results = json.loads(src.read_text())
    for p in draw_all(results, out):
        print(p)
    print(write_report(results, out / "results.md"))


if __name__ == "__main__":
    main()
