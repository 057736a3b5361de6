"""``ntkscrub demo``: the whole forgetting pipeline on scikit-learn's bundled digits, in seconds.

Stages (the paper's protocol, §5, at toy scale; nothing is downloaded):

1. data — :func:`ntkscrub.datasets.digits_split`: pre-training task = digits 5–9, fine-tuning
   task D = digits 0–4 (train / val / test disjoint), D_f = 25 training images of digit 0,
   D_r = D minus D_f.
2. pre-train an :class:`~ntkscrub.models.MLP` (64-256-256-5) on digits 5–9 (SGD, cosine lr);
   reset its head → θ0.
3. fine-tune w(D) from θ0 on D with the paper's recipe (SGD lr 0.01, momentum 0.9, batch 128,
   cross-entropy + (λ/2)‖w − θ0‖², BatchNorm frozen where there is one, until zero training
   error) — with λ = 0.01 instead of the paper's 0.1, see below.
4. Retrain (from θ0 on D_r only, same recipe: the gold standard), Fine-tune (w(D) on D_r, 10
   epochs), Fisher forgetting (α = 1e-6), NTK (:func:`ntkscrub.scrub.scrub`, ``solver="cg"``),
   NTK + Fisher noise (α = 1e-9, the reference code's values).
5. one table: error on D_r, D_f, test (%), and the mean L1 distance between the softmax outputs of
   each model and of the retrained model on D_f (lower = closer to never having seen D_f). A
   second retrain with another shuffling seed gives the noise floor of that distance (the width
   of the paper's "green band"); it is printed under the table and stored in the report.

The report (every setting, seed, data size, stage time, the hardware, the scrub's CG record, the
training curves and the table) is written atomically as JSON.

Why these settings (measured on validation seeds 1–3, and 0–5 for ``--size small``, never tuned on
one reported number):

* Model. With the small BatchNorm CNN (:class:`~ntkscrub.models.SmallCNN`, 16 channels) and the
  paper's recipe, two retrains that differ only in the shuffling seed are as far apart on D_f
  (softmax L1) as Original is from Retrain: constant-lr SGD stopped at the first zero-error epoch
  lands at a random point, and that noise swamps the effect of 25 easy digits. NTK then helped on
  3 of 4 seeds and hurt on one. The MLP's training is far less noisy (retrain-to-retrain distance
  ≈ 0.004–0.006 against 0.018–0.024 for Original), so the effect of D_f is measurable.
* Weight decay 0.01 toward θ0. With the paper's 0.1 the MLP never reaches zero training error
  (it stalls at a few misclassified images for 200 epochs), so the paper's stopping rule cannot
  be met; 0.01 reaches it in 40–75 epochs. The NTK ridge follows the training: λ = N·wd for each
  system (``weight_decay`` option of :func:`~ntkscrub.scrub.scrub`).
* NTK: linearised at θ0 (the paper). Linearising at w(D) with the cross-entropy residual (the
  reference code) hardly moves the outputs, since at zero training error those residuals are
  almost zero. The un-rescaled shift points the right way but is 3–5× too short — the network is
  trained with cross-entropy, whose logits grow well past the 0/1 targets of the linearised
  squared loss — which the paper's "isosceles trapezium" rescaling corrects (factor ≈ 3–5 here).
  Residual ``loss="ce"`` and ``"mse"`` gave the same distances within 0.001; ``"ce"`` is the
  gradient of the training loss, so it is the default. Fine-tuning with a squared loss instead
  (to match the linearised objective) made training noisier and the NTK step no better.
* CG: Nyström preconditioner of rank 50, tolerance 1e-4 per column (≈ 170 NTK matvecs in all;
  rank 20 needs ≈ 215, rank 100 ≈ 250, none ≈ 300; the shifts agree to 1e-3).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from ntkscrub.io import atomic_write_json

__all__ = [
    "SIZES",
    "FINETUNE",
    "NTK_DEFAULTS",
    "FISHER_ALPHA",
    "NTK_NOISE_ALPHA",
    "METHODS",
    "run_demo",
    "format_table",
    "write_json_atomic",
]

#: Rows of the table, in order.
METHODS = ("Original", "Retrain", "Fine-tune", "Fisher", "NTK", "NTK+noise")

#: Settings of each ``--size``. ``small`` (CI) pre-trains for fewer epochs; the network stays the
#: same, because a narrower one (64-128-128-5) made the NTK step unreliable (worse than Original on
#: 1 of 4 validation seeds) while saving under a second.
SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "model": "mlp",
        "hidden": (256, 256),
        "pretrain_epochs": 15,
        "pretrain_lr": 0.05,
        "pretrain_weight_decay": 5e-4,
        "pretrain_batch_size": 64,
        "finetune_min_epochs": 10,
        "finetune_max_epochs": 200,
        "baseline_finetune_epochs": 10,
    },
    "small": {
        "model": "mlp",
        "hidden": (256, 256),
        "pretrain_epochs": 8,
        "pretrain_lr": 0.05,
        "pretrain_weight_decay": 5e-4,
        "pretrain_batch_size": 64,
        "finetune_min_epochs": 10,
        "finetune_max_epochs": 200,
        "baseline_finetune_epochs": 10,
    },
}

#: The paper's fine-tuning recipe (§5.2) with weight decay 0.01 instead of 0.1 (see the module
#: docstring), used for w(D), Retrain and Fine-tune.
FINETUNE = {
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 0.01,  # the paper's 0.1 keeps the MLP from zero training error
    "batch_size": 128,
    "schedule": "constant",
    "loss": "ce",
    "freeze_bn": True,
}

#: Default settings of the NTK step (see the module docstring for why).
NTK_DEFAULTS: dict[str, Any] = {
    "linearize_at": "init",
    "loss": "ce",
    "rescale": "trapezium",
    "weight_decay": FINETUNE["weight_decay"],  # ridge λ = N·wd for each system, as the training
    "solver": "cg",
    "tol": 1e-4,
    "precond": "nystrom",
    "precond_rank": 50,
}

#: Noise scales: Fisher alone (the reference code's 1e-6) and on top of the NTK step.
FISHER_ALPHA = 1e-6
NTK_NOISE_ALPHA = 1e-9


# --------------------------------------------------------------------------- small utilities
def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (tensors, dtypes, paths made JSON-able)."""
    return atomic_write_json(path, obj, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    return repr(o)


def _hardware() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
    }


class _Stages:
    """Times each stage and prints one line per stage on ``stream`` (unless quiet)."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total, self.stream, self.i = total, stream, 0
        self.seconds: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def run(self, key: str, text: str, fn: Callable[[], Any]) -> Any:
        self.i += 1
        if self.stream is not None:
            print(f"[demo {self.i}/{self.total}] {text} ...", file=self.stream, flush=True)
        t = time.perf_counter()
        out = fn()
        self.seconds[key] = time.perf_counter() - t
        if self.stream is not None:
            print(
                f"[demo {self.i}/{self.total}]   done in {self.seconds[key]:.1f} s",
                file=self.stream,
                flush=True,
            )
        return out

    def note(self, text: str) -> None:
        if self.stream is not None:
            print(f"[demo]   {text}", file=self.stream, flush=True)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """The demo's table: one row per method; errors in %, softmax L1 distance on D_f in [0, 2]."""
    head = (
        f"{'method':<11} {'D_r err %':>9} {'D_f err %':>9} {'test err %':>10} "
        f"{'L1 to Retrain on D_f':>21}"
    )
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(
            f"{name:<11} {100 * r['retain_error']:>9.2f} {100 * r['forget_error']:>9.2f} "
            f"{100 * r['test_error']:>10.2f} {r['softmax_l1_to_retrain_forget']:>21.4f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the pipeline
def run_demo(
    *,
    size: str = "full",
    seed: int = 0,
    out: str | os.PathLike | None = "ntkscrub-demo.json",
    quiet: bool = False,
    threads: int | None = 1,
    ntk_options: dict[str, Any] | None = None,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Run the digits pipeline and return (and, unless ``out`` is None, write) the report.

    Args:
        size: ``"full"`` or ``"small"`` (CI: narrower network, fewer pre-training epochs).
        seed: one seed from which every other is derived (data split, initialisation, head,
            shuffling, noise); the report lists them all.
        out: where to write the JSON report (atomically); ``None``: do not write.
        quiet: no stage lines and no table on the streams.
        threads: ``torch.set_num_threads`` for the run (restored afterwards); ``None``: as is.
            Default 1: every operation here is tiny, so a second intra-op thread gains little
            (≈ 1.3× on the scrub), while on cores shared with other processes the spinning
            threads slowed the 128-sample SGD steps 10–40× in our measurements.
        ntk_options: overrides of :data:`NTK_DEFAULTS` (e.g. ``{"linearize_at": "trained"}``).
        stream: where stage lines go (default ``sys.stderr``).

    Returns:
        The report dict (``"rows"``: method → readouts; ``"table"``: the printed table; settings,
        seeds, sizes, ``"stage_seconds"``, ``"hardware"``, ``"ntk_info"``, training curves).
    """
    from ntkscrub import readouts
    from ntkscrub.baselines import add_fisher_noise, finetune, fisher_forget, retrain
    from ntkscrub.recipes.datasets import digits_split
    from ntkscrub.recipes.models import build_model, count_parameters, reset_head
    from ntkscrub.recipes.training import train
    from ntkscrub.scrub import scrub

    if size not in SIZES:
        raise ValueError(f"size: expected one of {sorted(SIZES)}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads: expected a positive integer, got {threads!r}")
    ntk = dict(NTK_DEFAULTS)
    unknown = set(ntk_options or {}) - set(NTK_DEFAULTS) - {"ridge", "max_iter"}
    if unknown:
        raise ValueError(f"ntk_options: unknown keys {sorted(unknown)}")
    ntk.update(ntk_options or {})
    if "ridge" in (ntk_options or {}):
        ntk["weight_decay"] = None
    cfg = SIZES[size]
    stream = None if quiet else (stream if stream is not None else sys.stderr)

    # Every seed derives from the one given, so one number reproduces the whole report.
    seeds = {
        "split": seed,
        "model_init": 1000 + seed,
        "pretrain": 2000 + seed,
        "head": 3000 + seed,
        "finetune": 4000 + seed,
        "retrain": 5000 + seed,
        "retrain_second": 5500 + seed,
        "baseline_finetune": 6000 + seed,
        "fisher_noise": 7000 + seed,
        "ntk": 8000 + seed,
        "ntk_noise": 9000 + seed,
    }
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    try:
        st = _Stages(total=10, stream=stream)
        pre, fin = st.run(
            "data",
            "loading scikit-learn digits (pre-train 5-9, fine-tune 0-4, forget 25 of digit 0)",
            lambda: digits_split(seed=seeds["split"]),
        )
        retain, forget, test = fin.retain, fin.forget, fin.test

        def pretrain() -> tuple[nn.Module, Any]:
            net = build_model(
                cfg["model"],
                num_classes=5,
                in_features=64,
                hidden=cfg["hidden"],
                seed=seeds["model_init"],
            )
            net, log = train(
                net,
                pre.train,
                epochs=cfg["pretrain_epochs"],
                lr=cfg["pretrain_lr"],
                weight_decay=cfg["pretrain_weight_decay"],
                batch_size=cfg["pretrain_batch_size"],
                schedule="cosine",
                freeze_bn=False,
                seed=seeds["pretrain"],
            )
            return net, log

        pre_net, pre_log = st.run(
            "pretrain",
            f"pre-training MLP(64-{'-'.join(map(str, cfg['hidden']))}-5) on digits 5-9 "
            f"({cfg['pretrain_epochs']} epochs)",
            pretrain,
        )
        pre_test_error = readouts.error(pre_net, pre.test)
        theta0 = reset_head(pre_net, fin.num_classes, seed=seeds["head"]).eval()
        st.note(f"pre-training test error {100 * pre_test_error:.2f} %; head reset → θ0")

        recipe = {
            **FINETUNE,
            "epochs": cfg["finetune_min_epochs"],
            "until_zero_error": True,
            "max_epochs": cfg["finetune_max_epochs"],
        }
        w_d, ft_log = st.run(
            "finetune_original",
            f"fine-tuning w(D) from θ0 on digits 0-4 (lr {FINETUNE['lr']}, wd "
            f"{FINETUNE['weight_decay']} toward θ0, batch 128, "
            "until zero training error)",
            lambda: train(theta0, fin.train, anchor=theta0, seed=seeds["finetune"], **recipe),
        )
        fits = {
            "train_error": readouts.error(w_d, fin.train),
            "forget_error": readouts.error(w_d, forget),
            "epochs": ft_log.epochs,
            "reached_zero_error": bool(ft_log.reached_zero_error),
        }
        fits["fits_forget_set"] = fits["forget_error"] == 0.0
        st.note(
            f"w(D) after {ft_log.epochs} epochs: training error {100 * fits['train_error']:.2f} %,"
            f" D_f error {100 * fits['forget_error']:.2f} % — "
            + (
                "it fits D_f (every forget image classified correctly)"
                if fits["fits_forget_set"]
                else "WARNING: it does NOT fit D_f"
            )
        )

        retrain_kw = {k: v for k, v in recipe.items() if k not in ("epochs", "until_zero_error")}
        res_retrain = st.run(
            "retrain",
            "Retrain: from θ0 on D_r only (same recipe, until zero training error)",
            lambda: retrain(
                w_d,
                retain,
                init=theta0,
                epochs=cfg["finetune_min_epochs"],
                until_zero_error=True,
                seed=seeds["retrain"],
                **retrain_kw,
            ),
        )
        # The noise floor: the same retraining with another shuffling seed. Its distance to
        # Retrain is what SGD alone produces — no method can be expected to get much closer.
        res_retrain2 = st.run(
            "retrain_second_seed",
            "Retrain again with another shuffling seed (noise floor of the distance)",
            lambda: retrain(
                w_d,
                retain,
                init=theta0,
                epochs=cfg["finetune_min_epochs"],
                until_zero_error=True,
                seed=seeds["retrain_second"],
                **retrain_kw,
            ),
        )
        ft_kw = {k: v for k, v in retrain_kw.items() if k != "max_epochs"}
        res_ft = st.run(
            "finetune_baseline",
            f"Fine-tune: w(D) on D_r for {cfg['baseline_finetune_epochs']} epochs",
            lambda: finetune(
                w_d,
                retain,
                forget,
                init=theta0,
                epochs=cfg["baseline_finetune_epochs"],
                seed=seeds["baseline_finetune"],
                **ft_kw,
            ),
        )
        res_fisher = st.run(
            "fisher",
            f"Fisher forgetting (α = {FISHER_ALPHA:g})",
            lambda: fisher_forget(
                w_d, retain, forget, alpha=FISHER_ALPHA, seed=seeds["fisher_noise"]
            ),
        )

        scrub_kw = {k: v for k, v in ntk.items() if k not in ("weight_decay",)}
        if ntk.get("weight_decay") is not None:
            scrub_kw["weight_decay"] = ntk["weight_decay"]
        res_ntk = st.run(
            "ntk",
            f"NTK scrub (solver={ntk['solver']}, linearize_at={ntk['linearize_at']}, "
            f"loss={ntk['loss']}, rescale={ntk['rescale']})",
            lambda: scrub(w_d, retain, forget, init=theta0, seed=seeds["ntk"], **scrub_kw),
        )
        st.note(_cg_summary(res_ntk.info))
        # NTK + noise: Fisher noise on D_r at the shifted weights — exactly what
        # scrub(noise=α) adds, without solving the NTK systems a second time.
        ntk_noisy, _, noise_info = st.run(
            "ntk_noise",
            f"NTK + Fisher noise (α = {NTK_NOISE_ALPHA:g})",
            lambda: add_fisher_noise(
                res_ntk.model, retain, NTK_NOISE_ALPHA, seed=seeds["ntk_noise"]
            ),
        )

        models = {
            "Original": w_d,
            "Retrain": res_retrain.model,
            "Fine-tune": res_ft.model,
            "Fisher": res_fisher.model,
            "NTK": res_ntk.model,
            "NTK+noise": ntk_noisy,
        }

        def table() -> dict[str, dict[str, float]]:
            ref = models["Retrain"]
            return {
                name: {
                    "retain_error": readouts.error(m, retain),
                    "forget_error": readouts.error(m, forget),
                    "test_error": readouts.error(m, test),
                    "softmax_l1_to_retrain_forget": readouts.softmax_l1(m, ref, forget),
                }
                for name, m in models.items()
            }

        rows = st.run("readouts", "readouts (errors, softmax L1 to Retrain on D_f)", table)
        floor = readouts.softmax_l1(res_retrain2.model, models["Retrain"], forget)
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)

    total = time.perf_counter() - t_start
    text = format_table(rows)
    ntk_closer = (
        rows["NTK"]["softmax_l1_to_retrain_forget"]
        < rows["Original"]["softmax_l1_to_retrain_forget"]
    )
    report: dict[str, Any] = {
        "format": "ntkscrub-demo-v1",
        "command": f"ntkscrub demo --size {size} --seed {seed}",
        "size": size,
        "seed": seed,
        "seeds": seeds,
        "rows": rows,
        "table": text,
        "ntk_closer_to_retrain_than_original": bool(ntk_closer),
        "noise_floor": {
            "softmax_l1_second_retrain_forget": floor,
            "what": "softmax L1 on D_f between Retrain and the same retraining with another "
            "shuffling seed (seeds['retrain_second']): the spread SGD alone produces",
            "second_retrain_errors": {
                "retain_error": readouts.error(res_retrain2.model, retain),
                "forget_error": readouts.error(res_retrain2.model, forget),
                "test_error": readouts.error(res_retrain2.model, test),
            },
            "second_retrain_epochs": res_retrain2.info["epochs_run"],
        },
        "softmax_l1_convention": readouts.SOFTMAX_L1_CONVENTION,
        "error_unit": "fraction in [0, 1] in rows; percent in the printed table",
        "settings": {
            "size_config": cfg,
            "finetune_recipe": recipe,
            "retrain_recipe": {**retrain_kw, "epochs": cfg["finetune_min_epochs"]},
            "baseline_finetune_recipe": {**ft_kw, "epochs": cfg["baseline_finetune_epochs"]},
            "pretrain_recipe": dict(pre_log.recipe),
            "fisher_alpha": FISHER_ALPHA,
            "ntk": ntk,
            "ntk_noise_alpha": NTK_NOISE_ALPHA,
            "num_parameters": count_parameters(w_d),
        },
        "data": {
            "pretrain": {k: v for k, v in pre.describe().items() if k != "indices"},
            "finetune": {k: v for k, v in fin.describe().items() if k != "indices"},
            "forget_indices": fin.indices["forget"],
        },
        "pretrain": {
            "test_error": pre_test_error,
            "epochs": pre_log.epochs,
            "train_error": pre_log.train_error,
        },
        "original_fit": fits,
        "training_curves": {
            "original": {"train_error": ft_log.train_error, "recipe": ft_log.recipe},
            "retrain": {
                "train_error": res_retrain.info["log"]["train_error"],
                "reached_zero_error": res_retrain.info["reached_zero_error"],
                "epochs": res_retrain.info["epochs_run"],
            },
            "finetune_baseline": {"train_error": res_ft.info["log"]["train_error"]},
        },
        "fisher_info": res_fisher.info,
        "ntk_info": _ntk_info(res_ntk.info),
        "ntk_noise_info": noise_info,
        "stage_seconds": st.seconds,
        "total_seconds": total,
        "hardware": {**_hardware(), "torch_threads": threads or old_threads},
    }
    if out is not None:
        report["out"] = str(out)
        write_json_atomic(report, out)
    if not quiet:
        print(text, file=sys.stdout, flush=True)
        print(
            f"(noise floor: a second Retrain with another shuffling seed is at {floor:.4f} from "
            "Retrain on D_f)",
            file=sys.stdout,
            flush=True,
        )
        verdict = "closer to" if ntk_closer else "NOT closer to"
        print(
            f"\nNTK is {verdict} Retrain than Original on D_f (softmax L1 "
            f"{rows['NTK']['softmax_l1_to_retrain_forget']:.4f} vs "
            f"{rows['Original']['softmax_l1_to_retrain_forget']:.4f}); "
            f"total {total:.1f} s" + (f"; report: {out}" if out is not None else ""),
            file=sys.stdout,
            flush=True,
        )
    return report


def _cg_summary(info: dict[str, Any]) -> str:
    parts = []
    for rec in info.get("solves", []):
        if rec.get("solver") == "cg":
            parts.append(
                f"{rec['system']}: {rec.get('iterations')} it, "
                f"{rec.get('seconds_total', 0.0):.1f} s"
            )
    return (
        f"NTK: {info.get('matvecs')} NTK matvecs ({'; '.join(parts)}), rescale factor "
        f"{info.get('rescale_factor', 1.0):.2f}, {info.get('seconds', 0.0):.1f} s"
    )


def _ntk_info(info: dict[str, Any]) -> dict[str, Any]:
    """The scrub's info, JSON-ready (solve records kept whole: iterations, matvecs, seconds)."""
    return json.loads(json.dumps(copy.deepcopy(info), default=_json_default))
