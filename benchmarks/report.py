"""Tables and log-log plots from benchmark results.

Usage::

    python benchmarks/report.py RESULTS.json [MORE.json ...] --out DIR [--title TEXT]

Each input is a pytest-benchmark JSON (``--benchmark-json``; records are the benchmarks'
``extra_info``) or a ``gpu_suite.py`` results file (``records`` list); both carry the same record
kinds: ``train_epoch``, ``matvec``, ``cg``, ``scaling``, ``model_size``, ``variant``. Writes
``DIR/report.md`` (tables, fitted slopes, the issue's targets — recorded, not asserted) and
``DIR/time_vs_n.png``, ``DIR/memory_vs_n.png`` (matplotlib, Agg backend).

Slopes are least-squares fits of log(seconds) (or log(MiB)) against log(N) (``numpy.polyfit``,
degree 1) over the points with ``status == 'ok'``; skipped points (``DenseTooLarge``) and
out-of-memory points are listed, never fitted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ntkscrub.io import save_figure, write_text  # noqa: E402

Record = dict[str, Any]


# ------------------------------------------------------------------------------------ loading
def load(paths: Iterable[str | Path]) -> tuple[list[Record], list[dict[str, Any]]]:
    """All records of the given files, and one ``{'source', 'hardware'}`` entry per file."""
    records: list[Record] = []
    sources: list[dict[str, Any]] = []
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        if "benchmarks" in data:  # pytest-benchmark
            mi = data.get("machine_info", {})
            hw = dict(mi.get("ntkscrub", {}))
            hw.setdefault("cpu_model", (mi.get("cpu") or {}).get("brand_raw"))
            sources.append({"source": str(path), "format": "pytest-benchmark", "hardware": hw})
            for b in data["benchmarks"]:
                rec = dict(b.get("extra_info", {}))
                rec["name"] = b.get("name")
                stats = b.get("stats") or {}
                if stats.get("rounds"):
                    rec["bench_min"] = stats.get("min")
                    rec["bench_median"] = stats.get("median")
                rec["source"] = str(path)
                records.append(rec)
        elif "records" in data:  # gpu_suite.py
            sources.append(
                {
                    "source": str(path),
                    "format": "gpu_suite",
                    "hardware": data.get("hardware", {}),
                    "stages": data.get("stages", {}),
                    "config": data.get("config", {}),
                }
            )
            for r in data["records"]:
                records.append({**r, "source": str(path)})
        else:
            raise ValueError(f"{path}: neither a pytest-benchmark JSON nor a gpu_suite.py result")
    return records, sources


# ------------------------------------------------------------------------------------ helpers
def fmt(x: Any, digits: int = 3) -> str:
    """Compact number formatting for tables (None → '–')."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        if x == 0:
            return "0"
        if abs(x) >= 1000 or abs(x) < 1e-3:
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}"
    if isinstance(x, (list, tuple)):
        return "/".join(fmt(v, digits) for v in x)
    return str(x).replace("|", "/")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[fmt(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Slope of log(y) against log(x) (least squares); None with fewer than 2 usable points."""
    pts = [(x, y) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    lx = np.log([p[0] for p in pts])
    ly = np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def _ok(r: Record) -> bool:
    return r.get("status", "ok") == "ok"


def series(records: list[Record], kind: str = "scaling") -> dict[tuple[str, str], list[Record]]:
    """Scaling records grouped by (model, solver), sorted by N."""
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        if r.get("kind") == kind and r.get("n") is not None:
            groups[(str(r.get("model")), str(r.get("solver")))].append(r)
    return {k: sorted(v, key=lambda r: r["n"]) for k, v in sorted(groups.items())}


def slopes(records: list[Record]) -> list[dict[str, Any]]:
    """Per (model, solver): slope of time and of memory vs N, over all points and the top three."""
    out = []
    for (model, solver), rs in series(records).items():
        ok = [r for r in rs if _ok(r) and r.get("seconds")]
        ns = [r["n"] for r in ok]
        row = {
            "model": model,
            "solver": solver,
            "points": len(ok),
            "n_range": f"{min(ns)}–{max(ns)}" if ns else "–",
            "time_slope": fit_slope(ns, [r["seconds"] for r in ok]),
            "time_slope_top3": fit_slope(ns[-3:], [r["seconds"] for r in ok[-3:]])
            if len(ok) >= 4
            else None,
            "memory_slope": fit_slope(ns, [r.get("delta_mib") for r in ok]),
            "retrain_slope": fit_slope(ns, [r.get("retrain_seconds") for r in ok]),
            "skipped": [f"N={r['n']}: {r.get('status')}" for r in rs if not _ok(r)],
        }
        out.append(row)
    return out


# -------------------------------------------------------------------------------------- plots
def plot_scaling(records: list[Record], out: Path, title: str) -> list[str]:
    """time_vs_n.png and memory_vs_n.png; returns the file names written."""
    groups = series(records)
    if not groups:
        return []
    written = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = sorted({m for m, _ in groups})
    for what, key, ylabel, fname in (
        ("time", "seconds", "wall time (s)", "time_vs_n.png"),
        ("memory", "delta_mib", "peak memory above start (MiB)", "memory_vs_n.png"),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 5.0))
        for (model, solver), rs in groups.items():
            ok = [r for r in rs if _ok(r) and r.get(key)]
            if not ok:
                continue
            c = colors[models.index(model) % len(colors)]
            ns, ys = [r["n"] for r in ok], [r[key] for r in ok]
            s = fit_slope(ns, ys)
            style = "o-" if solver == "cg" else "s--"
            lab = f"{model} {solver}" + (f" (slope {s:.2f})" if s is not None else "")
            ax.plot(ns, ys, style, color=c, label=lab)
            skipped = [r["n"] for r in rs if not _ok(r)]
            if skipped:
                ax.plot([], [], " ", label=f"  {solver} skipped at N={skipped}")
        if what == "time":
            for model in models:
                pts = {}
                for (m, _), rs in groups.items():
                    if m == model:
                        for r in rs:
                            if r.get("retrain_seconds"):
                                pts[r["n"]] = r["retrain_seconds"]
                if pts:
                    ns = sorted(pts)
                    s = fit_slope(ns, [pts[n] for n in ns])
                    c = colors[models.index(model) % len(colors)]
                    lab = f"{model} retrain est." + (f" (slope {s:.2f})" if s is not None else "")
                    ax.plot(ns, [pts[n] for n in ns], ":", color=c, alpha=0.7, label=lab)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N = |D| (samples)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: scrub {what} vs N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, out / fname, dpi=120)
        plt.close(fig)
        written.append(fname)
    return written


# ------------------------------------------------------------------------------------ markdown
def _targets(records: list[Record], slope_rows: list[dict[str, Any]]) -> list[list[Any]]:
    """The issue's targets with the measured value (recorded, not asserted)."""
    mv = [r for r in records if r.get("kind") == "matvec" and _ok(r)]
    rows: list[list[Any]] = []

    def add(name: str, value: Any, goal: str, met: bool | None) -> None:
        rows.append([name, value, goal, "–" if met is None else ("met" if met else "not met")])

    single = [r["ratio_matvec_to_epoch"] for r in mv if r.get("vectors") == 1]
    multi = [r["ratio_per_vector_to_epoch"] for r in mv if (r.get("vectors") or 0) >= 8]
    add(
        "matvec / epoch, 1 vector (worst)",
        max(single) if single else None,
        "≤ 2.0",
        (max(single) <= 2.0) if single else None,
    )
    add(
        "matvec / epoch per vector, ≥ 8 vectors (worst)",
        max(multi) if multi else None,
        "≤ 1.5",
        (max(multi) <= 1.5) if multi else None,
    )
    mem = [r["memory_ratio_to_train"] for r in mv if r.get("memory_ratio_to_train") is not None]
    one = [
        r["memory_ratio_to_train"]
        for r in mv
        if r.get("memory_ratio_to_train") is not None and r.get("vectors") == 1
    ]
    add(
        "matvec peak / train-step peak, 1 vector (worst)",
        max(one) if one else None,
        "≤ 2",
        (max(one) <= 2) if one else None,
    )
    add("matvec peak / train-step peak, any k (worst)", max(mem) if mem else None, "≤ 2", None)
    cgs = [r for r in records if r.get("kind") == "cg"]
    for point in ("init", "trained"):
        pre = [r for r in cgs if r.get("point") == point and r.get("precond_rank")]
        base = [r for r in cgs if r.get("point") == point and not r.get("precond_rank")]
        if pre:
            best = min(pre, key=lambda r: r["iterations"] if r.get("converged") else 10**9)
            add(
                f"PCG iterations to 1e-4 ({point}, best rank {best['precond_rank']})",
                best["iterations"],
                "≤ 25",
                best["iterations"] <= 25 and bool(best.get("converged")),
            )
            if base:
                ratio = base[0]["iterations"] / max(1, best["iterations"])
                add(
                    f"iterations without / with preconditioner ({point})",
                    ratio,
                    "≥ 3",
                    ratio >= 3,
                )
                add(
                    f"matvecs incl. build, without / with ({point})",
                    base[0]["matvecs_total"] / max(1, best["matvecs_total"]),
                    "(> 1 means it pays)",
                    None,
                )
    for s in slope_rows:
        if s["time_slope"] is None:
            continue
        goal = "≤ 1.1" if s["solver"] == "cg" else "≥ 2 (expected)"
        met = s["time_slope"] <= 1.1 if s["solver"] == "cg" else None
        add(f"time slope vs N, {s['model']} {s['solver']}", s["time_slope"], goal, met)
    for (model, solver), rs in series(records).items():
        ok = [r for r in rs if _ok(r) and r.get("ratio_scrub_to_retrain")]
        if solver == "cg" and ok:
            top = ok[-1]
            add(
                f"scrub / retrain at N={top['n']}, {model}",
                top["ratio_scrub_to_retrain"],
                "≤ 1 (at N=50,000)",
                top["ratio_scrub_to_retrain"] <= 1 if top["n"] >= 50000 else None,
            )
    for r in records:
        if r.get("kind") == "requests" and r.get("ratio_requests_to_retrain"):
            worst = max(r["ratio_requests_to_retrain"])
            ok = all(q.get("converged") for q in r["requests"])
            add(
                f"deletion request / retrain at N={r['n']}, {r['model']} (worst)",
                worst,
                "≤ 0.1",
                worst <= 0.1 and ok,
            )
    return rows


Column = tuple[str, Any]  # (header, record key or function of the record)

MATVEC_COLUMNS: list[Column] = [
    ("model", "model"),
    ("params", "params"),
    ("N", "n"),
    ("prec", "precision"),
    ("k", "vectors"),
    ("batch", "batch_size"),
    ("epoch s", "epoch_seconds"),
    ("matvec s", "seconds"),
    ("matvec/epoch", "ratio_matvec_to_epoch"),
    ("per vector/epoch", "ratio_per_vector_to_epoch"),
    ("1-D path s", "seconds_plain_1d"),
    ("rel err vs fp64", "rel_error_vs_fp64"),
    ("normwise err", "normwise_error"),
    ("CG true res.", "solve_true_residual"),
    ("matvec Δ MiB", "delta_mib"),
    ("train Δ MiB", "train_delta_mib"),
    ("mem ratio", "memory_ratio_to_train"),
    ("status", lambda r: f"{r.get('status', 'ok')} {(r.get('reason') or '')[:80]}".strip()),
]
ACCURACY_COLUMNS: list[Column] = [
    ("model", "model"),
    ("prec", "precision"),
    ("samples", "accuracy_n"),
    ("rel err (random v)", "rel_error_vs_fp64"),
    ("normwise err", "normwise_error"),
    ("‖Θ‖₂", "theta_norm2"),
    ("CG its", "solve_iterations"),
    ("CG claimed res.", "solve_claimed_residual"),
    ("CG true res.", "solve_true_residual"),
    ("status", lambda r: r.get("status", "ok")),
]
COMPILE_COLUMNS: list[Column] = [
    ("model", "model"),
    ("N", "n"),
    ("matvec eager s", "matvec_eager_s"),
    ("matvec compiled s", "matvec_compiled_s"),
    ("matvec compile s", "matvec_compile_s"),
    ("epoch eager s", "epoch_eager_s"),
    ("epoch compiled s", "epoch_compiled_s"),
    ("epoch compile s", "epoch_compile_s"),
    ("matvec/epoch eager", "ratio_eager"),
    ("matvec/epoch compiled", "ratio_compiled"),
    ("rel err", "compiled_rel_error"),
]
CG_COLUMNS: list[Column] = [
    ("model", "model"),
    ("N", "n"),
    ("point", "point"),
    ("rank", "precond_rank"),
    ("iterations", "iterations"),
    ("matvecs incl. build", "matvecs_total"),
    ("build matvecs", "precond_matvecs"),
    ("build s", "precond_seconds"),
    ("batch / build batch", lambda r: f"{r.get('batch_size')}/{r.get('build_batch_size')}"),
    ("seconds", "seconds"),
    ("converged", "converged"),
    ("residual", "max_residual"),
    ("its w/o ÷ with", "iterations_ratio_unpreconditioned"),
    ("matvecs w/o ÷ with", "matvecs_ratio_unpreconditioned"),
    ("status", lambda r: r.get("status", "ok")),
]
SCRUB_COLUMNS: list[Column] = [
    ("model", "model"),
    ("params", "params"),
    ("N", "n"),
    ("variant", lambda r: r.get("variant", "")),
    ("solver", "solver"),
    ("status", "status"),
    ("scrub s", "seconds"),
    ("matvecs", "matvecs"),
    ("CG its", "cg_iterations"),
    ("rank", "precond_rank"),
    ("build mv", "precond_matvecs"),
    ("batch", "batch_size"),
    ("Δ MiB", "delta_mib"),
    ("peak MiB", "peak_mib"),
    ("retrain s", "retrain_seconds"),
    ("scrub/retrain", "ratio_scrub_to_retrain"),
    ("note", lambda r: (r.get("reason") or r.get("note") or "")[:160]),
]


def _bytes(n: float | None) -> str | None:
    """Decimal units, as storage is sold (the issue's "22 TB")."""
    if not n:
        return None
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


CAPPED_COLUMNS: list[Column] = [
    ("model", "model"),
    ("params", "params"),
    ("N", "n"),
    ("iteration cap", "max_iter"),
    ("CG its", "cg_iterations"),
    ("max residual reached", "max_residual"),
    ("scrub s", "seconds"),
    ("matvecs", "matvecs"),
    ("s / matvec", lambda r: r["seconds"] / r["matvecs"] if r.get("matvecs") else None),
    ("retrain epoch s", "retrain_epoch_seconds"),
    ("batch", "batch_size"),
    ("scrub Δ MiB", "delta_mib"),
    ("train-step Δ MiB", "train_step_delta_mib"),
    ("mem ratio", "memory_ratio_to_train_step"),
    ("dense J would need", lambda r: _bytes(r.get("dense_jacobian_bytes"))),
    ("note", lambda r: (r.get("reason") or r.get("note") or "")[:160]),
]


def _per_request(key: str) -> Any:
    """A column listing ``key`` of each deletion request of a ``requests`` record."""
    return lambda r: ", ".join(fmt(q.get(key)) for q in r.get("requests") or []) or None


REQUESTS_COLUMNS: list[Column] = [
    ("model", "model"),
    ("params", "params"),
    ("N", "n"),
    ("forgotten per request", "n_forget"),
    ("status", "status"),
    ("prepare s", lambda r: (r.get("prepare") or {}).get("seconds")),
    ("prepare matvecs", lambda r: (r.get("prepare") or {}).get("matvecs")),
    ("request s", _per_request("seconds")),
    ("request matvecs", _per_request("matvecs")),
    ("converged", _per_request("converged")),
    ("retrain s", "retrain_seconds"),
    (
        "request/retrain",
        lambda r: ", ".join(fmt(x) for x in r.get("ratio_requests_to_retrain") or []),
    ),
    ("Δ MiB", "delta_mib"),
    ("note", lambda r: (r.get("reason") or r.get("note") or "")[:160]),
]
SLOPE_COLUMNS: list[Column] = [
    ("model", "model"),
    ("solver", "solver"),
    ("points", "points"),
    ("N range", "n_range"),
    ("time slope", "time_slope"),
    ("time slope (top 3 N)", "time_slope_top3"),
    ("memory slope", "memory_slope"),
    ("retrain slope", "retrain_slope"),
    ("not fitted", lambda r: "; ".join(r["skipped"])),
]


def column_table(records: Sequence[Record], columns: Sequence[Column]) -> str:
    """A markdown table with one row per record and the given (header, key/function) columns."""
    rows = [[(c(r) if callable(c) else r.get(c)) for _, c in columns] for r in records]
    return table([h for h, _ in columns], rows)


def _md_sources(sources: list[dict[str, Any]]) -> list[str]:
    """The conventions paragraph and one line (hardware, stages) per input file."""
    parts = [
        "Random CIFAR-shaped data (N(0,1) pixels, uniform labels; 3×32×32 unless the source says "
        "otherwise), seeded. Times are wall-clock seconds (synchronised on CUDA); memory is "
        "`torch.cuda.max_memory_allocated` on CUDA and sampled RSS on the CPU (indicative "
        "there), as the peak *above* what was in use when the call began (`Δ`). Targets are "
        "recorded, not asserted.",
        "",
    ]
    keys = (
        "device gpu gpu_name cpu_model cpu_count torch_threads torch cuda "
        "tf32_default_flags loadavg_at_start load_average_1m"
    ).split()
    for s in sources:
        hw = s.get("hardware", {})
        desc = ", ".join(f"{k}={hw[k]}" for k in keys if k in hw)
        parts.append(f"- `{s['source']}` ({s['format']}): {desc}")
        if s.get("stages"):
            st = ", ".join(
                f"{k}: {v.get('status')} ({fmt(v.get('seconds'))} s)"
                for k, v in s["stages"].items()
            )
            parts.append(f"  - stages: {st}")
    parts.append("")
    return parts


def _md_engine(by: Any) -> list[str]:
    """Matvec vs epoch, precision, torch.compile and CG sections."""
    parts: list[str] = []
    mv = sorted(
        by("matvec"),
        key=lambda r: (
            str(r.get("model")),
            r.get("n") or 0,
            str(r.get("precision")),
            r.get("vectors") or 0,
        ),
    )
    if mv:
        parts += ["## Θ matvec vs one training epoch", "", column_table(mv, MATVEC_COLUMNS), ""]
        parts.append(
            "`rel err`: ‖Θ̂v − Θv‖/‖Θv‖ for random v against float64 (pessimistic); `normwise`: "
            "the same over ‖Θ‖₂‖v‖; `CG true res.`: the float64 residual of a CG solve to 1e-4 "
            "run with this precision's operator (the accuracy a scrub would get). `1-D path`: "
            "the plain single-vector JVP/VJP, against the library path (linear_operator passes "
            "an (n, 1) block, so vmap over one column). Memory ratio: matvec Δ over the "
            "training epoch's Δ at the same batch size."
        )
        parts.append("")
    if by("accuracy"):
        parts += [
            "## Precision against float64",
            "",
            column_table(by("accuracy"), ACCURACY_COLUMNS),
        ]
        parts.append("")
    if by("compile"):
        parts += ["## torch.compile (per-batch VJP/JVP, training step)", ""]
        parts += [column_table(by("compile"), COMPILE_COLUMNS), ""]
    if by("cg"):
        parts += ["## CG to relative residual 1e-4, with and without the Nyström preconditioner"]
        parts += ["", column_table(by("cg"), CG_COLUMNS), ""]
    return parts


def _md_scrub(by: Any) -> list[str]:
    """The scrub-vs-retrain sections (over N, model size, variants, time-capped)."""
    if not any(
        by(k) for k in ("scaling", "model_size", "variant", "capped", "partial", "requests")
    ):
        return []
    parts = ["## Scrub vs retrain", ""]
    parts.append(
        "Retrain = measured epoch of the recipe on D_r × `retrain_epochs_assumed` (25). "
        "`matvecs` counts Θ column-products, preconditioner builds and final VJPs included. "
        "`estimated` rows are extrapolations (see their note), never fitted."
    )
    parts.append("")
    for kind, heading in (
        ("scaling", "### Over N"),
        ("model_size", "### Over model size"),
        ("variant", "### Variants (speed knobs) at one (model, N)"),
        (
            "partial",
            "### Partial linearisation at the largest N (last block + head, prefix cached)",
        ),
    ):
        rs = by(kind)
        if kind == "scaling":
            rs = sorted(rs, key=lambda r: (str(r.get("model")), str(r.get("solver")), r["n"]))
        if rs:
            parts += [heading, "", column_table(rs, SCRUB_COLUMNS), ""]
    if by("requests"):
        parts += [
            "### Amortised deletion requests (`Scrubber`) on the partial problem",
            "",
            "Preparation solves the D system once; each request forgets |D_f| more samples "
            "(request 1 = the partial scrub's D_f) with one solve on what is retained.",
            "",
            column_table(by("requests"), REQUESTS_COLUMNS),
            "",
        ]
    if by("capped"):
        parts += [
            "### At the largest N with a time-capped CG (memory and cost per iteration)",
            "",
            "The CG iteration cap comes from the time budget, so these solves stop before "
            "1e-4 (the residual reached is shown): they measure peak memory against a "
            "training step at the same batch size and the cost of one iteration, not the "
            "iterations a converged scrub needs.",
            "",
            column_table(by("capped"), CAPPED_COLUMNS),
            "",
        ]
    return parts


def markdown(
    records: list[Record], sources: list[dict[str, Any]], plots: list[str], title: str
) -> str:
    """The whole report as markdown text."""
    parts = [f"# {title}", "", *_md_sources(sources)]

    def by(kind: str) -> list[Record]:
        return [r for r in records if r.get("kind") == kind]

    parts += _md_engine(by) + _md_scrub(by)
    slope_rows = slopes(records)
    if slope_rows:
        parts += ["## Fitted log-log slopes (numpy.polyfit, degree 1)", ""]
        parts += [column_table(slope_rows, SLOPE_COLUMNS), ""]

    tgt = _targets(records, slope_rows)
    if tgt:
        parts += ["## Targets of the issue (recorded, not asserted)", ""]
        parts += [table(["target", "measured", "goal", "verdict"], tgt), ""]
    for p in plots:
        parts.append(f"![{p}]({p})")
    parts.append("")
    return "\n".join(parts)


def write_report(
    paths: Sequence[str | Path], out: str | Path, title: str = "ntkscrub benchmarks"
) -> Path:
    """Load ``paths``, write ``out/report.md`` and the plots; return the markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, sources = load(paths)
    plots = plot_scaling(records, out, title)
    md = out / "report.md"
    write_text(md, markdown(records, sources, plots, title))
    return md


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="pytest-benchmark JSON or gpu_suite.py results")
    ap.add_argument("--out", required=True, help="folder for report.md and the PNGs")
    ap.add_argument("--title", default="ntkscrub benchmarks")
    args = ap.parse_args(argv)
    md = write_report(args.inputs, args.out, args.title)
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
