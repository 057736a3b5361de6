"""The method registry: every model the paper run compares, one :class:`Method` entry each.

Adding a forgetting method to the paper run is one entry in :data:`METHODS`: a name, its labels
(report and figure), the stage it is timed under, and ``make(run)`` — a function of the seed's
:class:`~ntkscrub.recipes.reproduction.stages.SeedRun` (w(D), θ0, the split, the retrains, other
methods' models through ``run.model(name)``) that returns the forgotten model, or ``None`` when the
method has nothing to offer in this seed (a failed baseline). Every readout, the relearn time and,
with ``diagnostics`` / ``line``, the shift diagnostics and Fig. 4's line then follow from the
registry; the order of :data:`METHODS` is the order of the tables and figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor, nn

from ntkscrub import baselines, readouts
from ntkscrub.config import ProductConfig, SolverConfig
from ntkscrub.matching import MatchConfig
from ntkscrub.recipes.reproduction import measure as M
from ntkscrub.recipes.reproduction.caching import train_cached
from ntkscrub.recipes.reproduction.data import data_sets
from ntkscrub.recipes.reproduction.failures import log_summary, training_failure
from ntkscrub.recipes.reproduction.weights import add_noise, flat_params, load_flat
from ntkscrub.recipes.runtime import cache_key, log
from ntkscrub.scrub import scrub

if TYPE_CHECKING:  # pragma: no cover
    from ntkscrub.recipes.reproduction.stages import SeedRun

__all__ = [
    "Method",
    "METHODS",
    "NTK_FORMS",
    "STEP_GRID",
    "SKIPPED",
    "method_labels",
    "fisher_noise_seed",
    "scrub_call",
    "scrub_form",
]


@dataclass(frozen=True)
class Method:
    """One compared model.

    Attributes:
        name: key in results.json (``seeds.<s>.readouts.<name>``).
        label: one line for results.md. short: the figures' tick label (may hold a newline).
        stage: the stage whose time it counts under (``seed<s>/<stage>``); ``None`` for a
            model the training stages made (w(D), the seed-matched run).
        make: ``make(run) -> nn.Module | None`` (see the module docstring).
        diagnostics: compare its weight shift with the retrains' (cosine, norm ratio).
        line: draw its line w(D) + a·(h − w(D)) in Fig. 4.
    """

    name: str
    label: str
    short: str
    stage: str | None
    make: Callable[[SeedRun], nn.Module | None]
    diagnostics: bool = False
    line: bool = False


# name: scrub() arguments; "paper" = linearised at θ0 with MSE residuals (eq. 10), "ref" = the
# reference code: Jacobians and softmax residuals at the trained weights w(D).
# Issue 13's methods (ntkscrub.shifts): "ce_*" = the cross-entropy linear model by damped Newton,
# "projected" = the projected true displacement −P J_fᵀ(J_f P J_fᵀ + λI)⁻¹J_f P (w(D) − θ0).
# "match" = re-linearised output matching (ntkscrub.matching): the paper form's step, then
# Levenberg–Marquardt rounds at the current weights moving D_f's logits to the paper form's
# kernel prediction, anchors (100 images of D_r + the unlabelled validation images, scrub_call)
# held at w(D)'s; MatchConfig defaults — no knob was chosen on retrains or D_f. "match_ce": the
# same rounds toward the cross-entropy linear model's kernel prediction (first_step="ce_newton").
# "ce_cal": the CE model at w(D) with D_f's predicted outputs tempered to w(D)'s mean entropy on
# the (unlabelled) validation images, ``scrub(forget_entropy=...)`` — a retrain's confidence on
# images it never saw, measured without one.
NTK_FORMS: dict[str, dict[str, str]] = {
    "ntk_paper": {"linearize_at": "init", "loss": "mse"},
    "ntk_ref": {"linearize_at": "trained", "loss": "ce"},
    "ntk_ce_init": {"linearize_at": "init", "loss": "ce", "method": "ce_newton"},
    "ntk_ce_trained": {"linearize_at": "trained", "loss": "ce", "method": "ce_newton"},
    "ntk_ce_cal": {
        "linearize_at": "trained",
        "loss": "ce",
        "method": "ce_newton",
        "forget_entropy": "val",
    },
    "ntk_projected": {"linearize_at": "init", "loss": "mse", "method": "projected"},
    "ntk_match": {"linearize_at": "init", "loss": "mse", "method": "output_match"},
    "ntk_match_ce": {
        "linearize_at": "init",
        "loss": "ce",
        "method": "output_match",
        "first_step": "ce_newton",
    },
}
# The step scales a of w(D) + a·Δ a validation-only rule may choose from (_val_step): the raw
# line's range [0, 4] (measure.RAW_LINE_ALPHAS) at twice its resolution.
STEP_GRID = tuple(0.25 * k for k in range(1, 17))


def fisher_noise_seed(seed: int) -> int:
    """The noise draw of Fisher forgetting for a data seed (shared by ``fisher`` and
    ``fisher_val``, so the two differ only by the scale α)."""
    return 60_000 + seed


# --------------------------------------------------------------------------- makers
def _finetune(run: SeedRun) -> nn.Module | None:
    """The Fine-tune baseline: the baseline recipe on D_r from w(D), anchored at θ0 (cached).

    A failed run says something about this recipe, not about the seed: the seed goes on without
    it (recorded as ``excluded`` and reported in results.md)."""
    recipe = run.cfg.train.baseline
    w_ft, meta, _ = train_cached(
        # the seed's cache key covers the fine-tuning recipe only, not this baseline's own
        run.cdir / f"finetune-{cache_key(recipe.train_kwargs())}.pt",
        run.w_d,
        run.split.retain,
        recipe=recipe,
        seed=run.sgd_seed + 500,
        anchor=run.init,
        device=run.device,
        progress=run.progress,
    )
    entry = run.res["training"]["finetune"] = log_summary(meta)
    why = training_failure(entry, run.split.num_classes)
    if why is None:
        return w_ft
    entry["excluded"] = why
    log(f"the Fine-tune baseline {why}: left out of this seed")
    return None


def _fisher(run: SeedRun) -> nn.Module:
    """Fisher forgetting at the reference code's α (:func:`ntkscrub.baselines.fisher_forget`)."""
    alpha = run.cfg.forget.fisher_alpha
    seed = fisher_noise_seed(run.seed)
    return baselines.fisher_forget(run.w_d, run.split.retain, alpha=alpha, seed=seed).model


def _val_losses(model: nn.Module, val: Any) -> Tensor:
    """Per-image cross-entropy of ``model`` on the labelled validation images, shape ``(n,)``,
    in float64 (the paired differences below are small against the losses)."""
    _, y = val
    logits = readouts.predict_logits(model, val).double()
    return F.cross_entropy(logits, y.to(logits.device), reduction="none").cpu()


def _fisher_val(run: SeedRun) -> nn.Module:
    """Fisher forgetting with its noise scale tuned on held-out data only: the largest α of
    ``sweep_alphas`` whose added validation loss is not detectable — the mean per-image increase
    of the cross-entropy over w(D)'s, ``d_i = ℓ(w_α; x_i) − ℓ(w(D); x_i)``, at most one standard
    error of the paired differences, ``std(d)/√n``; the smallest α when none qualifies. One
    noise draw (``fisher``'s seed) for every α, so the losses along the grid differ only by the
    scale. Only the validation images and their labels are read: no image of D, no test image
    and no retrain (the issue 13 tuning rule: the retrains are the yardstick, not the tuner).
    The rule this replaced capped the validation *error* at the worst retrain's; measured on
    the quick preset (seed 2, cached models; ``benchmarks/results/cpu/fisher_val_rule``) it
    took α = 1e-6, where the error on D_r is 11 % against retrains' 3–9.5 %; this rule takes
    1e-7 (4.4 %). The Fisher itself is on D_r, as the method defines it."""
    val = data_sets(run.split)["val"]
    var, seed = run.variance("original"), fisher_noise_seed(run.seed)
    base = _val_losses(run.w_d, val)
    grid = sorted(run.cfg.measure.sweep_alphas)
    increase, stderr = [], []
    for a in grid:
        d = _val_losses(add_noise(run.w_d, var, a, seed), val) - base
        increase.append(float(d.mean()))
        stderr.append(float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else 0.0)
    ok = [a for a, m, se in zip(grid, increase, stderr) if m <= se]
    alpha = max(ok) if ok else grid[0]
    run.method_notes["fisher_val_tuning"] = {
        "rule": "largest α of the grid whose mean per-image increase of the validation "
        "cross-entropy over w(D) is at most one standard error of the paired differences",
        "alphas": grid,
        "val_loss_increase": increase,
        "val_loss_increase_stderr": stderr,
        "alpha": alpha,
        "qualified": bool(ok),
    }
    return add_noise(run.w_d, var, alpha, seed)


def scrub_call(run: SeedRun, form: str, solver: str) -> Any:
    """One NTK form's :func:`~ntkscrub.scrub.scrub` of w(D) on ``solver`` ("cg" or "dense"),
    trapezium-rescaled, never strict (a missed tolerance is recorded by the caller)."""
    cfg = run.cfg.forget
    form_kw = dict(NTK_FORMS[form])
    first_step = form_kw.pop("first_step", "one_shot")
    match = form_kw.get("method") == "output_match"
    val = data_sets(run.split)["val"][0]  # unlabelled: what the tuning rule allows
    if form_kw.pop("forget_entropy", None) == "val":
        form_kw["forget_entropy"] = readouts.mean_entropy(run.w_d, val)
    return scrub(
        run.w_d,
        run.split.retain,
        run.split.forget,
        init=run.init,
        solver=solver,
        rescale="trapezium",
        weight_decay=run.cfg.train.finetune.weight_decay,
        seed=run.seed,
        max_iter=cfg.cg_max_iter if solver == "cg" else None,
        tol=cfg.cg_tol if solver == "cg" else None,
        strict=False,
        products=ProductConfig(batch_size=cfg.jac_batch),
        solver_config=SolverConfig(
            max_dense_bytes=40 * 2**30,
            max_seconds=cfg.cg_max_seconds if solver == "cg" else None,
            precond=cfg.cg_precond,
        ),
        # the validation images (unlabelled) as extra anchors: allowed by the tuning rule
        anchor_data=val if match else None,
        match=MatchConfig(first_step=first_step) if match else None,
        **form_kw,
    )


def _max_finite(values: Any) -> float | None:
    """The largest of a record's per-column values (``None``: non-finite or absent)."""
    vals = [v for v in (values if isinstance(values, list) else [values]) if v is not None]
    return max(vals, default=None)


def scrub_form(run: SeedRun, form: str) -> Any:
    """Scrub w(D) in one NTK form on the configured solver; records ``res["ntk"][form]``.

    A solve that missed its tolerance is still used (the partial solution is the method's
    output at this budget) but never silently: it is logged with a banner and listed in
    ``res["solver_warnings"]``, which results.md prints at the top."""
    t0, f = time.perf_counter(), run.cfg.forget
    unknown = set(f.dense_forms) - set(NTK_FORMS)
    if unknown:
        raise ValueError(
            f"dense_forms: unknown NTK forms {sorted(unknown)}; known: {list(NTK_FORMS)}"
        )
    r = scrub_call(run, form, "dense" if form in f.dense_forms else f.solver)
    info = {k: v for k, v in r.info.items() if k != "solves"}
    info["solves"] = [
        {k: v for k, v in rec.items() if not isinstance(v, list)} for rec in r.info["solves"]
    ]
    info["wall_seconds"] = time.perf_counter() - t0
    scale = float(r.info["rescale_factor"])
    run.res["ntk"][form] = {"scrub_info": info, "trapezium_scale": scale, **NTK_FORMS[form]}
    if not r.info["converged"]:
        keep = ("system", "status", "iterations", "matvecs", "seconds", "kappa")
        keep += ("ridge_hint", "predicted_iterations", "matvec_seconds")
        bad = [
            {**{k: rec.get(k) for k in keep}, "max_residual": _max_finite(rec.get("residuals"))}
            for rec in r.info["solves"]
            if not rec.get("converged", True)
        ]
        warning = {
            "what": f"scrub {form}",
            "solver": info.get("solver"),
            "tol": info.get("tol"),
            "unconverged_solves": bad,
            "method_converged": (info.get("method_info") or {}).get("converged"),
        }
        run.res.setdefault("solver_warnings", []).append(warning)
        log(
            f"{'!' * 60}\n!! WARNING: {form}: a solve did NOT reach tol {info.get('tol')}: "
            f"{bad or warning['method_converged']}; its partial result is used\n{'!' * 60}"
        )
    return r


def _ntk(form: str, trapezium: bool) -> Callable[[SeedRun], nn.Module]:
    def make(run: SeedRun) -> nn.Module:
        r = run.scrubbed(form)
        if trapezium:
            return r.model.eval()
        delta = r.delta  # un-rescaled Δ = w_lin(D_r) − w_lin(D)
        return load_flat(run.w_d, flat_params(run.w_d) + delta.float().cpu())

    return make


def _val_step(run: SeedRun, form: str) -> float:
    """The step scale a of w(D) + a·Δ, chosen on the (unlabelled) validation images only.

    Rule: the a of the grid whose *realised* change of the validation logits,
    ``f(w(D) + aΔ; val) − f(w(D); val)``, is closest (mean squared, per image) to the change the
    linear model itself predicts for a step Δ, ``J_val(θ_lin) Δ`` — the step length at which the
    network does on held-out images what the method's linear model says removing D_f does
    there. No label, no image of D_f, no retrain and no test image is read. Why not the previous
    rule (the longest step whose validation error stays within two binomial standard errors of
    w(D)'s): with 125 validation images the margin was 8.5 points and the walk reached a = 4,
    overshooting D_f (quick preset: D_f error 60–64 % against bands of 27 and 44 %). Measured on
    the dense twin of the quick preset, seed 1
    (``experiments/results/quick-dense-3seeds/engine-check/valrule_seed1.log``): this rule
    picks a = 1 for the cross-entropy model at w(D) (D_f error 32 %, D_f-L1 0.243 — the
    line's minimum 0.241 is at 1.25) and a = 0.25 at θ0, where the network moves the
    validation logits ~4× further than the θ0-linear model predicts (not lazy: the rule then
    trusts the linear model less). A step other than a = 1 (the method's own) is taken only
    when it beats a = 1 by more than one standard error of the per-image differences
    (:func:`~.measure.one_se_step`): seed 1 of ``quick-dense-3seeds-r2`` took a = 0.75 on a gain
    of 0.0085 against a standard error of 0.086, which moved D_f farther from the retrains.
    Recorded in ``methods_config.<form>_tuning``.
    """
    r = run.scrubbed(form)
    at = run.linearization_point(NTK_FORMS[form]["linearize_at"])
    val = data_sets(run.split)["val"]
    match = M.step_to_predicted_change(run.w_d, at, r.delta, val, STEP_GRID)
    run.method_notes[f"{form}_tuning"] = {
        "rule": "the a of the grid whose realised change of the validation logits is closest "
        "to the linear model's predicted change J_val(θ_lin)·Δ; a = 1 unless another a is "
        "closer by more than one standard error of the per-image differences",
        **match,
    }
    return match["a"]


def _ntk_val(form: str) -> Callable[[SeedRun], nn.Module]:
    """w(D) + a·Δ of an NTK form, a chosen by :func:`_val_step` (validation images only)."""

    def make(run: SeedRun) -> nn.Module:
        a = _val_step(run, form)
        delta = run.scrubbed(form).delta.float().cpu()
        return load_flat(run.w_d, flat_params(run.w_d) + a * delta)

    return make


def _ntk_noise(run: SeedRun) -> nn.Module:
    """The headline NTK model plus Fisher noise at ``ntk_noise_alpha`` (eq. 11)."""
    head = run.cfg.forget.headline
    alpha = run.cfg.forget.ntk_noise_alpha
    return add_noise(run.model(head), run.variance(head), alpha, 61_000 + run.seed)


# method_failures' entry for a method named in forget.skip_methods (reported as not run)
SKIPPED = "skipped (forget.skip_methods)"

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("original", "Original w(D)", "Original", None, lambda r: r.w_d),
        Method("finetune", "Fine-tune on D_r", "Fine-tune", "train_finetune", _finetune),
        Method("fisher", "Fisher forgetting", "Fisher", "fisher", _fisher),
        Method(
            "fisher_val",
            "Fisher forgetting, α tuned on validation",
            "Fisher\nα on val",
            "fisher",
            _fisher_val,
        ),
        Method(
            "ntk_paper",
            "NTK, paper form",
            "NTK\npaper",
            "scrub_ntk_paper",
            _ntk("ntk_paper", False),
            diagnostics=True,
            line=True,
        ),
        Method(
            "ntk_paper_trap",
            "NTK, paper form + trapezium",
            "NTK paper\n+trap.",
            "scrub_ntk_paper",
            _ntk("ntk_paper", True),
            diagnostics=True,
            line=True,
        ),
        Method(
            "ntk_ref",
            "NTK, ref.-code form",
            "NTK\nref.",
            "scrub_ntk_ref",
            _ntk("ntk_ref", False),
            diagnostics=True,
            line=True,
        ),
        Method(
            "ntk_ref_trap",
            "NTK, ref.-code form + trapezium",
            "NTK ref.\n+trap.",
            "scrub_ntk_ref",
            _ntk("ntk_ref", True),
            diagnostics=True,
            line=True,
        ),
        Method(
            "ntk_ce_init",
            "NTK, cross-entropy linear model at θ0, step on val",
            "NTK CE\nθ0, val",
            "scrub_ntk_ce_init",
            _ntk_val("ntk_ce_init"),
            diagnostics=True,
            line=True,
        ),
        Method(
            "ntk_ce_trained",
            "NTK, cross-entropy linear model at w(D), step on val",
            "NTK CE\nw(D), val",
            "scrub_ntk_ce_trained",
            _ntk_val("ntk_ce_trained"),
            diagnostics=True,
            line=True,
        ),
        Method(
            "ntk_ce_cal",
            "NTK, cross-entropy linear model at w(D), D_f entropy calibrated on val, step on val",
            "NTK CE\nw(D) cal.",
            "scrub_ntk_ce_cal",
            _ntk_val("ntk_ce_cal"),
            diagnostics=True,
            line=True,
        ),
        Method(
            "ntk_projected",
            "NTK, projected true displacement",
            "NTK\nproj.",
            "scrub_ntk_projected",
            _ntk("ntk_projected", False),
            diagnostics=True,
            line=True,
        ),
        Method(
            "ntk_match",
            "NTK, output matching (paper-form targets, re-linearised LM rounds)",
            "NTK\nmatch",
            "scrub_ntk_match",
            _ntk("ntk_match", False),
            diagnostics=True,
            line=True,
        ),
        Method(
            "ntk_match_ce",
            "NTK, output matching (cross-entropy model's targets, re-linearised LM rounds)",
            "NTK\nmatch CE",
            "scrub_ntk_match_ce",
            _ntk("ntk_match_ce", False),
            diagnostics=True,
            line=True,
        ),
        Method("ntk_noise", "NTK + noise", "NTK\n+noise", "fisher", _ntk_noise, diagnostics=True),
        Method(
            "seed_matched",
            "Seed-matched replacement (NOT a removal)",
            "Seed-\nmatched*",
            None,
            lambda r: r.w_sm,
        ),
    )
}


def method_labels() -> dict[str, str]:
    """``meta.method_labels`` of results.json: name → label, with the retrain band's."""
    labels = {m.name: m.label for m in METHODS.values()}
    return {"original": labels.pop("original"), "retrain": "Retrain w(D_r) (K runs)", **labels}
