"""The failed-training rule: a run that diverged or collapsed is no sample of its recipe.

A fine-tuning run has collapsed when its training error ends above ``COLLAPSE_FINAL`` × chance
level (1 − 1/c) after having been lower by more than ``COLLAPSE_RISE`` × chance: on the H200
(paper preset, lr 0.005) 2 of 21 runs jumped from ~5 % to 78–80 % training error (one class
predicted everywhere) and never recovered, while every other run ended at 0 %. A run that never
learned (the CPU presets' narrow networks end where they peaked) is slow, not collapsed.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "COLLAPSE_FINAL",
    "COLLAPSE_RISE",
    "TrainingFailed",
    "log_summary",
    "training_failure",
    "require_trained",
    "drop_failed_seeds",
]

COLLAPSE_FINAL = 0.75
COLLAPSE_RISE = 0.5


class TrainingFailed(RuntimeError):
    """A run the pipeline cannot do without (w(D), the seed-matched run) diverged or collapsed."""


def log_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The parts of a cached training run's meta worth keeping in results.json (with the curve)."""
    lg = meta.get("log", {})
    return {
        "epochs": lg.get("epochs"),
        "final_train_error": (lg.get("train_error") or [None])[-1],
        "reached_zero_error": lg.get("reached_zero_error"),
        "train_error": lg.get("train_error"),
        "train_loss": lg.get("train_loss"),
        "lr": lg.get("lr"),
        "seconds": lg.get("seconds"),
        "recipe": lg.get("recipe"),
        "seed": meta.get("seed"),
        "from_cache": meta.get("from_cache"),
    }


def training_failure(entry: dict[str, Any], num_classes: int) -> str | None:
    """Why a training run (a :func:`log_summary` entry) is no sample of the recipe, or None:
    ``diverged`` (non-finite loss; ``ntkscrub.training.train`` stops and records the
    epoch) or ``collapsed`` (see the module docstring)."""
    e = (entry.get("recipe") or {}).get("diverged_at_epoch")
    if e is not None:
        return f"diverged (non-finite loss at epoch {e})"
    errs = [x for x in entry.get("train_error") or [] if x is not None and math.isfinite(x)]
    if not errs:
        return None
    chance = 1.0 - 1.0 / num_classes
    final, best = errs[-1], min(errs)
    if final > COLLAPSE_FINAL * chance and final - best > COLLAPSE_RISE * chance:
        return (
            f"collapsed (training error {best:.1%} at best, {final:.1%} at the end; "
            f"chance {chance:.0%})"
        )
    return None


def require_trained(entry: dict[str, Any], num_classes: int, what: str) -> None:
    """Raise :class:`TrainingFailed` when ``entry`` failed (see :func:`training_failure`)."""
    why = training_failure(entry, num_classes)
    if why is not None:
        raise TrainingFailed(f"{what} {why}; lower ft_lr (--set ft_lr=...)")


def drop_failed_seeds(results: dict[str, Any], when: str) -> list[str]:
    """Move every seed with a failed training run (:func:`training_failure`) from ``seeds`` to
    ``meta.failed_seeds``; returns the seeds moved. For results written before the run itself
    applied the rule: their per-seed distances average over all K retrains, a failed one
    included, so the whole seed goes (a run applying the rule drops only the failed retrain)."""
    c = len(results["meta"]["config"]["classes"])
    moved = []
    for name, seed in list(results["seeds"].items()):
        tr = seed.get("training") or {}
        runs = [("w(D)", tr.get("original"))]
        runs += [(f"retrain {k}", r) for k, r in enumerate(tr.get("retrains") or [])]
        runs += [("the seed-matched run", tr.get("seed_matched"))]
        runs += [("the Fine-tune baseline", tr.get("finetune"))]
        # an entry marked "excluded" was already left out by the run itself
        runs = [(what, r) for what, r in runs if r and "excluded" not in r]
        why = [f"{what} {w}" for what, r in runs if (w := training_failure(r, c))]
        if why:
            moved.append(name)
            results["meta"].setdefault("failed_seeds", {})[name] = {
                "reason": "; ".join(why) + f" (rule applied {when})",
                "training": tr,
            }
            del results["seeds"][name]
    return moved
