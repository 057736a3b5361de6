"""The reproduction's readouts from cached softmaxes: errors, softmax L1 to the retrains (and
their spread), the membership attack, Fig. 4's line, the information bounds and their noise sweep,
the linearisation diagnostics and Fig. 1's PCA. Pure functions of models and a split; the stages
(:mod:`.stages`) decide what to measure on which model."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ntkscrub import bounds, readouts
from ntkscrub.operators import Jacobian
from ntkscrub.params import ParameterSpace
from ntkscrub.recipes.datasets import SplitData
from ntkscrub.recipes.reproduction.config import Config
from ntkscrub.recipes.reproduction.data import data_sets
from ntkscrub.recipes.reproduction.weights import add_noise, flat_params, load_flat
from ntkscrub.scrub import full_fp32_precision

__all__ = [
    "SETS",
    "flat",
    "cosine",
    "mean_std",
    "principal_directions",
    "probs_of",
    "l1",
    "basic_readouts",
    "retrain_spread",
    "along_line",
    "scale_kl",
    "info_pair",
    "noisy_errors",
    "shift_diagnostics",
    "true_shifts",
    "one_se_step",
    "pca_projection",
    "RAW_LINE_ALPHAS",
    "raw_line",
    "kernel_prediction",
    "laziness",
    "fidelity_diagnostics",
    "rel_diff",
    "shift_dense_check",
    "output_dense_check",
    "bounds_dense_check",
]

SETS = ("forget", "retain", "test")


def flat(model: nn.Module) -> Tensor:
    """The parameters as one float64 CPU vector."""
    return flat_params(model).double()


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of two flat vectors ``(p,)`` (NaN when either is zero)."""
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean, sample std, min, max and count of the finite values (``None``s when there are none)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    a = np.asarray(v, dtype=float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": len(a),
    }


def probs_of(model: nn.Module, split: SplitData) -> dict[str, Tensor]:
    """Softmax outputs (float64) on D_f, D_r and test."""
    return {s: readouts.predict_proba(model, data_sets(split)[s]).double() for s in SETS}


def l1(p: Tensor, q: Tensor) -> float:
    """Mean over samples of ‖p − q‖₁ (readouts.SOFTMAX_L1_CONVENTION), from cached softmaxes."""
    return float((p - q).abs().sum(1).mean())


def basic_readouts(
    model: nn.Module,
    split: SplitData,
    retrain_probs: list[dict[str, Tensor]],
    *,
    self_index: int | None,
    attack: bool,
    seed: int,
) -> dict[str, Any]:
    """Errors, softmax L1 to every retrain (excluding itself) and the membership attack.

    Errors and cross-entropies come from the same softmax outputs as the distances (one forward
    pass per set): error = argmax ≠ label, loss = −log p(label), as readouts.evaluate."""
    sets = data_sets(split)
    probs = {s: readouts.predict_proba(model, sets[s]).double() for s in (*SETS, "val")}
    out: dict[str, Any] = {"error": {}, "loss": {}}
    for s, p in probs.items():
        y = sets[s][1].cpu()
        out["error"][s] = float((p.argmax(1) != y).double().mean())
        out["loss"][s] = float(-p.gather(1, y[:, None]).clamp_min(1e-300).log().mean())
    out["l1_to_retrain"] = {}
    for s in SETS:
        vals = [l1(probs[s], rp[s]) for k, rp in enumerate(retrain_probs) if k != self_index]
        out["l1_to_retrain"][s] = {**mean_std(vals), "per_retrain": vals}
    if attack:
        out["attack"] = readouts.membership_attack(
            model, split.retain, split.test, split.forget, seed=seed
        ).to_dict()
    return out


def retrain_spread(retrain_probs: list[dict[str, Tensor]]) -> dict[str, Any]:
    """Pairwise softmax L1 between independent retrains: the SGD-noise floor of every distance."""
    out = {}
    for s in SETS:
        vals = [
            l1(retrain_probs[i][s], retrain_probs[j][s])
            for i in range(len(retrain_probs))
            for j in range(i + 1, len(retrain_probs))
        ]
        out[s] = {**mean_std(vals), "pairs": vals}
    return out


def along_line(
    w_d: nn.Module,
    scrubbed: nn.Module,
    split: SplitData,
    retrain_probs: list[dict[str, Tensor]],
    points: int,
) -> dict[str, Any]:
    """Fig. 4: softmax L1 to the retrains along w(D) + a·(h − w(D)), a ∈ [0, 1] (all parameters,
    buffers of w(D); the same interpolation as readouts.softmax_l1_along_line, but each point's
    softmax is computed once and compared with all K retrains)."""
    a_list = [float(a) for a in np.linspace(0.0, 1.0, points)]
    v0, v1 = flat(w_d).float(), flat(scrubbed).float()
    res: dict[str, Any] = {"alphas": a_list}
    per: dict[str, list] = {s: [] for s in ("forget", "retain")}
    for a in a_list:
        m = load_flat(w_d, torch.lerp(v0, v1, a))
        for s in per:
            p = readouts.predict_proba(m, data_sets(split)[s]).double()
            per[s].append([l1(p, rp[s]) for rp in retrain_probs])
    for s, rows in per.items():
        arr = np.asarray(rows)
        res[s] = {"mean": arr.mean(1).tolist(), "std": arr.std(1).tolist(), "per_retrain": rows}
    return res


def scale_kl(entry: dict[str, Any], alpha0: float, alpha: float) -> float:
    """KL at noise scale α from the terms at α0: with Σ = α·V and Σ0 = α·V0 (the diagonal Fisher
    recipe is linear in α) only the quadratic term changes, as α0/α; trace and log-det do not."""
    q = entry["quadratic"] * alpha0 / alpha
    return 0.5 * (q + entry["trace_minus_k"] - entry["logdet_ratio"])


_KL_TERMS = ("kl", "two_kl", "quadratic", "trace_minus_k", "logdet_ratio", "k")


def info_pair(
    scrubbed: nn.Module,
    reference: nn.Module,
    split: SplitData,
    queries: dict[str, Any],
    cfg: Config,
    alpha: float,
    solver: str | None = None,
) -> dict[str, Any]:
    """Both bounds of Proposition 1 (diagonal Fisher noise, the reference's Σ) at one α, on
    ``solver`` (default ``cfg.measure.bounds_solver``; "dense" is the explicit twin)."""
    res = bounds.information_bounds(
        scrubbed,
        reference,
        split.retain,
        queries=queries,
        alpha=alpha,
        kind="diag",
        config=bounds.BoundsConfig(
            solver=solver or cfg.measure.bounds_solver, batch_size=cfg.forget.jac_batch
        ),
    )
    wb = res["white_box"]
    keep_w = {k: wb[k] for k in _KL_TERMS}
    keep_w["reference_two_kl"] = wb.get("reference_two_kl")
    bb = {}
    for name, e in (res["black_box"] or {}).items():
        bb[name] = {k: e.get(k) for k in (*_KL_TERMS, "queries", "jitter", "reference_two_kl")}
        pq = e["per_query"]
        bb[name]["per_query"] = {
            k: pq.get(k) for k in ("mean", "std", "stderr", "median", "max", "n", "values")
        }
    return {
        "alpha": alpha,
        "white_box": keep_w,
        "black_box": bb,
        "convention": res["convention"],
        "seconds": res["seconds"],
        "solver": solver or cfg.measure.bounds_solver,
        "cg": res.get("cg"),
    }


def rel_diff(a: float | Tensor, b: float | Tensor) -> float:
    """``|a − b| / |b|`` (vectors: ``‖a − b‖₂ / ‖b‖₂``) in float64; 0 when both are 0."""
    a_t, b_t = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    num, den = float((a_t - b_t).norm()), float(b_t.norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def shift_dense_check(cg_result: Any, dense_result: Any) -> dict[str, Any]:
    """cg vs dense for one scrub (:class:`~ntkscrub.scrub.ScrubResult`s of the same form): the
    relative differences of the raw step Δ ``(p,)`` (2-norm and largest entry over the largest
    entry), of the applied shift and of the trapezium factor, with each path's cost."""
    d_cg, d_dn = cg_result.delta.double().cpu(), dense_result.delta.double().cpu()
    ci, di = cg_result.info, dense_result.info
    return {
        "rel_l2_delta": rel_diff(d_cg, d_dn),
        "rel_max_entry_delta": float(
            (d_cg - d_dn).abs().max() / d_dn.abs().max().clamp_min(1e-300)
        ),
        "rel_l2_shift": rel_diff(cg_result.shift, dense_result.shift),
        "rel_trapezium_scale": rel_diff(ci["rescale_factor"], di["rescale_factor"]),
        "cg_converged": bool(ci["converged"]),
        "cg_tol": ci.get("tol"),
        "cg_matvecs": ci.get("matvecs"),
        "cg_seconds": ci.get("seconds"),
        "dense_seconds": di.get("seconds"),
    }


def output_dense_check(
    w_d: nn.Module, delta_cg: Tensor, delta_dense: Tensor, sets: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """cg vs dense where a user sees them: the two raw-step models w(D) + Δ ``(p,)`` on D_f and on
    the test images — the relative 2-norm difference of their logits ``(N, c)`` and their mean
    softmax-L1 (:func:`ntkscrub.readouts.softmax_l1`). Why beside the weights: the
    re-linearised output-matching rounds amplify a difference of their start (measured on the
    quick preset, seed 0: a first step perturbed by 1.5e-3 ends 2.1e-2 away in weights after
    three rounds, ``benchmarks/results/cpu/match_sensitivity``), mostly along weights the
    outputs barely see; a weight difference alone cannot tell that from a wrong path."""
    base = flat_params(w_d)
    m_cg = load_flat(w_d, base + delta_cg.to(base).reshape(base.shape)).eval()
    m_dn = load_flat(w_d, base + delta_dense.to(base).reshape(base.shape)).eval()
    out = {}
    for name in ("forget", "test"):
        a, b = readouts.predict_logits(m_cg, sets[name]), readouts.predict_logits(m_dn, sets[name])
        out[name] = {
            "rel_logits": rel_diff(a, b),
            "softmax_l1": readouts.softmax_l1(m_cg, m_dn, sets[name]),
        }
    return out


# a floor (nats) for the comparison's denominator when an entry records no dimension k
KL_ZERO = 1e-9


def jacobian_precision(model: nn.Module, data: tuple[Tensor, Tensor], seed: int) -> dict[str, Any]:
    """How far the network's float32 Jacobian products are from float64 ones on ``data``
    (``(X (N, …), Y (N,))``, e.g. D_f): relative 2-norm errors of one JVP ``J v`` ``(c·N,)`` and
    one VJP ``Jᵀu`` ``(p,)`` with Gaussian v, u drawn from ``seed``; ``None`` for a model that is
    not float32.

    Why the dense check records it: it is how far both paths are from a float64 model. Measured
    on the quick preset, seed 0, CE at w(D): products 1.9e-4 / 2.0e-4 from float64 while the
    logits are 2.5e-7 off (``precision_seed0.log`` in
    ``experiments/results/quick-dense-3seeds/engine-check/``) — far above rounding, i.e. a unit
    of D_f at a ReLU kink of the float32 forward pass. Until the dense twin's rows were checked
    against the batched products (commit 820be74) the explicit rows could sit at other kinks
    than the products, and this floor was read as the distance between cg and dense; it no
    longer is (``benchmarks/results/cpu/dense_twin_precision/``)."""
    if next(model.parameters()).dtype != torch.float32:
        return {"jvp": None, "vjp": None, "samples": 0}
    X, Y = data
    m64 = copy.deepcopy(model).double().eval()
    j32 = Jacobian(ParameterSpace(model), (X, Y), batch_size=64)
    j64 = Jacobian(ParameterSpace(m64), (X.double(), Y), batch_size=64)
    gen = torch.Generator().manual_seed(int(seed))
    v = torch.randn(j64.p, generator=gen, dtype=torch.float64).to(X.device)
    u = torch.randn(j64.c * j64.n, generator=gen, dtype=torch.float64).to(X.device)
    jv, jtu = j64 @ v, j64.mT @ u
    # in the precision scrub runs its products in: on a GPU, cuDNN's default TF32 convolutions
    # read 3e-3–6e-3 here on the paper preset (H200), a floor no scrub works at
    with full_fp32_precision():
        jv32, jtu32 = (j32 @ v.float()).double(), (j32.mT @ u.float()).double()
    return {"jvp": rel_diff(jv32, jv), "vjp": rel_diff(jtu32, jtu), "samples": j64.n}


def _kl_rel(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """|KL_a − KL_b| over the magnitude of b's terms, ½(|quadratic| + |tr(Σ0⁻¹Σ)| + |log-det|)
    with tr(Σ0⁻¹Σ) = (trace − k) + k: the KL is computed as a difference of those terms, so its
    rounding error scales with them (≥ k/2), not with the KL — two identical models give a KL of
    ±1e-10 in float32 whose plain relative difference would be meaningless. Equals the plain
    relative difference when no term cancels; None when a value is missing."""
    if a.get("kl") is None or b.get("kl") is None:
        return None
    trace = (b.get("trace_minus_k") or 0.0) + (b.get("k") or 0.0)
    terms = [b.get("quadratic"), trace, b.get("logdet_ratio")]
    scale = 0.5 * sum(abs(t) for t in terms if t is not None and math.isfinite(t))
    den = max(abs(b["kl"]), scale, KL_ZERO)
    diff = abs(a["kl"] - b["kl"])
    if not math.isfinite(diff):
        return float("inf")
    return diff / den if den > 0 else (0.0 if diff == 0 else float("inf"))


def bounds_dense_check(cg_pair: dict[str, Any], dense_pair: dict[str, Any]) -> dict[str, Any]:
    """cg vs dense for one pair of :func:`info_pair`: per bound (white box, black box on each
    query set) the relative difference of the KL (:func:`_kl_rel`) and both KLs."""
    both = {"white_box": (cg_pair["white_box"], dense_pair["white_box"])}
    for q, e in cg_pair["black_box"].items():
        if q in dense_pair["black_box"]:
            both[f"black_box_{q}"] = (e, dense_pair["black_box"][q])
    return {
        name: {"rel": _kl_rel(a, b), "kl_cg": a.get("kl"), "kl_dense": b.get("kl")}
        for name, (a, b) in both.items()
    }


def noisy_errors(
    model: nn.Module, var: dict[str, Tensor], alpha: float, split: SplitData, draws: int, seed: int
) -> dict[str, float]:
    """Mean errors (test, D_r, D_f) over ``draws`` noise draws at scale α."""
    errs: dict[str, list[float]] = {"test": [], "retain": [], "forget": []}
    for r in range(draws):
        m = add_noise(model, var, alpha, seed=70_000 + 97 * seed + r)
        ev = readouts.evaluate(m, {k: data_sets(split)[k] for k in errs})
        for k in errs:
            errs[k].append(ev[k]["error"])
    return {k: float(np.mean(v)) for k, v in errs.items()}


def shift_diagnostics(
    model: nn.Module, w_d: nn.Module, retrains: list[nn.Module], w_sm: nn.Module
) -> dict[str, Any]:
    """How a method's weight shift h − w(D) compares with the true shifts w(D_r,k) − w(D):
    cosine, norm ratio, and how much closer to each retrain than w(D) it lands."""
    v_d, v_m = flat(w_d), flat(model)
    true = [flat(m) - v_d for m in retrains]
    true_sm = flat(w_sm) - v_d
    shift = v_m - v_d
    d: dict[str, Any] = {
        "shift_norm": float(shift.norm()),
        "cos_vs_retrains": [cosine(shift, t) for t in true],
        "norm_ratio_vs_retrains": [float(shift.norm() / t.norm()) for t in true],
        "cos_vs_seed_matched": cosine(shift, true_sm),
        "norm_ratio_vs_seed_matched": float(shift.norm() / true_sm.norm()),
        "dist_ratio_to_retrains": [
            float((v_m - flat(m)).norm() / (v_d - flat(m)).norm()) for m in retrains
        ],
    }
    for k in ("cos_vs_retrains", "norm_ratio_vs_retrains", "dist_ratio_to_retrains"):
        d[f"{k}_mean"] = mean_std(d[k])
    return d


def true_shifts(w_d: nn.Module, retrains: list[nn.Module], w_sm: nn.Module) -> dict[str, Any]:
    """The retrains' own shifts: their norms, pairwise cosines and distances (the SGD noise)."""
    v_d = flat(w_d)
    true = [flat(m) - v_d for m in retrains]
    true_sm = flat(w_sm) - v_d
    pairs = [(i, j) for i in range(len(true)) for j in range(i + 1, len(true))]
    return {
        "norm_retrain_minus_original": mean_std([float(t.norm()) for t in true]),
        "norm_seed_matched_minus_original": float(true_sm.norm()),
        "cos_between_retrain_shifts": mean_std([cosine(true[i], true[j]) for i, j in pairs]),
        "distance_between_retrains": mean_std(
            [float((flat(retrains[i]) - flat(retrains[j])).norm()) for i, j in pairs]
        ),
        "cos_seed_matched_vs_retrain_shifts": mean_std([cosine(true_sm, t) for t in true]),
        "note": (
            "retrain shifts w(D_r,k) - w(D) include SGD noise (different seeds); their "
            "pairwise cosine is the best any predictor of a single retrain can reach. The "
            "seed-matched reference shares w(D)'s seed and batch order but duplicates retain "
            "images instead of removing D_f: it is NOT a true removal."
        ),
    }


# Issue 13, item 1: the scrubbing line of the raw step Δ, a ∈ [0, 4] (Fig. 4 samples [0, 1] of
# the rescaled step; the paper form's D_f distance still fell at 2–2.7× the raw step).
RAW_LINE_ALPHAS = tuple(float(a) for a in np.linspace(0.0, 4.0, 9))


def raw_line(
    w_d: nn.Module,
    delta: Tensor,
    split: SplitData,
    retrain_probs: list[dict[str, Tensor]],
    alphas: tuple[float, ...] = RAW_LINE_ALPHAS,
) -> dict[str, Any]:
    """w(D) + a·Δ along the raw (un-rescaled) step ``delta`` ``(p,)``: per a, the D_f softmax-L1
    to the retrains (mean, std over retrains), the D_f error, and the validation error (the only
    readout a validation-only tuning rule may look at). One forward pass over D_f and val per a."""
    sets = data_sets(split)
    v0, d = flat(w_d).float(), delta.detach().float().cpu()
    out: dict[str, Any] = {"alphas": list(alphas), "forget_l1_mean": [], "forget_l1_std": []}
    out.update({"forget_error": [], "val_error": []})
    for a in alphas:
        m = load_flat(w_d, v0 + a * d)
        p_f = readouts.predict_proba(m, sets["forget"]).double()
        vals = [l1(p_f, rp["forget"]) for rp in retrain_probs]
        out["forget_l1_mean"].append(float(np.mean(vals)))
        out["forget_l1_std"].append(float(np.std(vals)))
        out["forget_error"].append(
            float((p_f.argmax(1) != sets["forget"][1].cpu()).double().mean())
        )
        out["val_error"].append(readouts.error(m, sets["val"]))
    best = int(np.argmin(out["forget_l1_mean"]))
    out["argmin_forget_l1"] = {"alpha": alphas[best], "l1": out["forget_l1_mean"][best]}
    return out


def one_se_step(per_image: Tensor, grid: tuple[float, ...], prefer: float | None) -> dict[str, Any]:
    """Breiman's one-standard-error rule on a step grid: ``per_image`` ``(len(grid), n)`` holds
    each image's mismatch at each a. The a of least mean mismatch (``a_min``) replaces the
    preferred step ``prefer`` only if it beats it by more than one standard error of the paired
    per-image differences; ``prefer=None`` takes ``a_min``. Returns a, a_min and that margin."""
    if per_image.ndim != 2 or per_image.shape[0] != len(grid):
        raise ValueError(f"per_image must be (len(grid), n), got {tuple(per_image.shape)}")
    if prefer is not None and prefer not in grid:
        raise ValueError(f"prefer={prefer} is not in the grid {grid}")
    means = per_image.mean(1)
    best = int(torch.argmin(means))
    out = {"a_min": grid[best], "a": grid[best], "prefer": prefer, "gain": None, "se": None}
    if prefer is None or grid[best] == prefer:
        return out
    diff = per_image[grid.index(prefer)] - per_image[best]  # > 0 on average
    se = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else math.inf
    gain = float(diff.mean())
    out.update(gain=gain, se=se, a=grid[best] if gain > se else prefer)
    return out


@full_fp32_precision()  # a difference of logits against a JVP: TF32 would blur both
def step_to_predicted_change(
    w_d: nn.Module,
    at: nn.Module,
    delta: Tensor,
    val: tuple[Tensor, Tensor],
    grid: tuple[float, ...],
    prefer: float | None = 1.0,
) -> dict[str, Any]:
    """The step a of ``grid`` whose realised change of the logits on ``val`` (images only),
    ``f(w(D) + aΔ) − f(w(D))``, is closest in mean squared norm per image to the linear model's
    predicted change ``J_val(at) Δ`` (one JVP at θ_lin = ``at``); ``delta`` ``(p,)``. Ties within
    noise go to ``prefer`` (the method's own step, a = 1) by :func:`one_se_step`: on the quick
    preset's seed 1 the plain argmin took a = 0.75 on a mean mismatch of 0.584 against 0.592 at
    a = 1, a difference well inside its standard error over 125 images, and that step ended
    farther from every retrain on D_f (softmax-L1 0.267 against 0.214;
    benchmarks/results/cpu/ce_continuation). Returns the grid, the mismatch per a, the
    validation error per a (recorded, not used), the rule's margin and a."""
    from ntkscrub.operators import Jacobian
    from ntkscrub.params import ParameterSpace

    X, Y = val
    J = Jacobian(ParameterSpace(at), (X, Y), name="val")
    pred = (J @ delta.detach().to(J.device, J.dtype)).reshape(J.n, J.c).double().cpu()
    v0, d = flat_params(w_d), delta.detach().float().cpu()
    f0 = readouts.predict_logits(w_d, val).double()
    per_image, errors = [], []
    for a in grid:
        fa = readouts.predict_logits(load_flat(w_d, v0 + a * d), val).double()
        per_image.append((fa - f0 - pred).pow(2).sum(1))
        errors.append(float((fa.argmax(1) != Y.cpu()).double().mean()))
    rule = one_se_step(torch.stack(per_image), grid, prefer)
    return {
        "grid": list(grid),
        "mismatch": [float(m.mean()) for m in per_image],
        "val_errors": errors,
        "predicted_change_norm": float(pred.pow(2).sum(1).mean()),
        **rule,
    }


@full_fp32_precision()  # one JVP, in the precision the scrubs run in
def kernel_prediction(
    at: nn.Module,
    w_lin_r: Tensor,
    split: SplitData,
    retrain_probs: list[dict[str, Tensor]],
) -> dict[str, Any]:
    """The retain-only linear model's outputs on D_f, ``f(θ_lin; D_f) + J_f w_lin(D_r)`` (one JVP
    at ``at`` = θ_lin): its D_f error and softmax-L1 to each retrain (softmax of the linear
    outputs, also for the MSE model). If the linear model does not predict what a retrain
    outputs on D_f, no step built from it can get there."""
    from ntkscrub.operators import Jacobian
    from ntkscrub.params import ParameterSpace

    space = ParameterSpace(at)
    X, Y = data_sets(split)["forget"]
    J = Jacobian(space, (X, Y), name="forget")
    w = w_lin_r.detach().to(J.device, J.dtype)
    logits = J.outputs() + (J @ w).reshape(J.n, J.c)
    p = torch.softmax(logits.double(), 1).cpu()
    vals = [l1(p, rp["forget"]) for rp in retrain_probs]
    return {
        "forget_error": float((p.argmax(1) != Y.cpu()).double().mean()),
        "forget_l1_to_retrain": {**mean_std(vals), "per_retrain": vals},
        "convention": "softmax of f(θ_lin; D_f) + J_f w_lin(D_r)",
    }


def laziness(
    w_d: nn.Module, theta0: nn.Module, retrains: list[nn.Module], delta: Tensor, w_lin_r: Tensor
) -> dict[str, Any]:
    """How far fine-tuning is from its θ0-linearised model: ``‖w(D) − θ0 − w_lin(D)‖ / ‖w(D) − θ0‖``
    (w_lin(D) = w_lin(D_r) − Δ), and ``‖w(D_r,k) − θ0 − w_lin(D_r)‖ / ‖w(D_r,k) − θ0‖`` per retrain
    (1 = no better than θ0 itself; lazy training is ≪ 1). Only for a linearisation at θ0."""
    t0, w_r = flat(theta0), w_lin_r.detach().double().cpu()
    w_full = w_r - delta.detach().double().cpu()
    v = flat(w_d) - t0
    ratios = [float((flat(m) - t0 - w_r).norm() / (flat(m) - t0).norm()) for m in retrains]
    return {
        "original": float((v - w_full).norm() / v.norm()),
        "retrains": {**mean_std(ratios), "per_retrain": ratios},
    }


def fidelity_diagnostics(
    w_d: nn.Module,
    theta0: nn.Module,
    retrains: list[nn.Module],
    result: Any,
    linearize_at: str,
    split: SplitData,
    retrain_probs: list[dict[str, Tensor]],
) -> dict[str, Any]:
    """Issue 13, item 1, for one scrub (:class:`~ntkscrub.scrub.ScrubResult` with ``delta`` and
    ``w_lin_r``): the raw line, the kernel prediction and (at θ0) the laziness ratios."""
    out: dict[str, Any] = {
        "raw_line": raw_line(w_d, result.delta, split, retrain_probs),
        "kernel_prediction": kernel_prediction(
            theta0 if linearize_at == "init" else w_d, result.w_lin_r, split, retrain_probs
        ),
        "matvecs": result.info.get("matvecs"),
        "seconds": result.info.get("seconds"),
    }
    if linearize_at == "init":
        out["laziness"] = laziness(w_d, theta0, retrains, result.delta, result.w_lin_r)
    return out


def _flat_var(model: nn.Module, var: dict[str, Tensor]) -> Tensor:
    return torch.cat([var[n].reshape(-1).double().cpu() for n, _ in model.named_parameters()])


def principal_directions(A: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-``k`` right singular vectors ``(k, p)`` of a short, wide ``A`` ``(m, p)``, m ≪ p,
    and all m singular values, from the eigendecomposition of the Gram matrix ``A Aᵀ``
    ``(m, m)``: Vₖ = Σₖ⁻¹ Uₖᵀ A. Why not ``torch.linalg.svd``: for Fig. 1's 302 snapshots of
    All-CNN ×1 (p = 1.62 M, float64) the SVD took 113 s on two CPU cores and this 5.9 s, with
    the same directions to 4e-14 (and it was 37 s of every paper-preset seed on the GPU run's
    16 cores). Signs: each direction has a non-negative product with A's last row (in Fig. 1, the
    end of the second path)."""
    G = A @ A.T
    evals, U = torch.linalg.eigh(G)  # ascending
    evals, U = evals.flip(0).clamp_min(0.0), U.flip(1)
    S = evals.sqrt()
    V = (U[:, :k].T @ A) / S[:k].clamp_min(torch.finfo(A.dtype).tiny).unsqueeze(1)
    signs = torch.where(V @ A[-1] < 0, -1.0, 1.0).to(A.dtype)
    return V * signs.unsqueeze(1), S


def pca_projection(
    paths: tuple[Tensor, Tensor],
    points: dict[str, Any],
    clouds: dict[str, tuple[nn.Module, dict[str, Tensor], float]],
    n_cloud: int,
    seed: int,
) -> dict[str, Any]:
    """Fig. 1: the two training paths (on D and on D_r, from the same θ0) define a 2-D PCA basis;
    ``points`` (models, or lists of models) and the Fisher-noise ``clouds`` (name → model,
    variance at α = 1, α) around the methods are projected on it."""
    path_d, path_r = paths
    P = torch.cat([path_d, path_r]).double()
    mu = P.mean(0)
    basis, S = principal_directions(P - mu, 2)  # (2, p), all singular values

    def proj(v: Tensor) -> list[float]:
        return ((v.double() - mu) @ basis.T).tolist()

    gen = torch.Generator().manual_seed(90_000 + seed)

    def cloud(model: nn.Module, var: dict[str, Tensor], alpha: float) -> dict[str, Any]:
        center, v = flat(model), _flat_var(model, var)
        pts = []
        for _ in range(n_cloud):
            eps = torch.randn(center.shape, generator=gen, dtype=torch.float64)
            pts.append(proj(center + (alpha * v).sqrt() * eps))
        return {"center": proj(center), "cloud": pts}

    out: dict[str, Any] = {
        "explained_variance_ratio": ((S**2) / (S**2).sum())[:2].tolist(),
        "path_original": [proj(v) for v in path_d],
        "path_retrain0": [proj(v) for v in path_r],
        "theta0": proj(path_d[0]),
    }
    for name, p in points.items():
        if isinstance(p, dict):
            out[name] = {k: proj(flat(m)) for k, m in p.items()}
        elif isinstance(p, list):
            out[name] = [proj(flat(m)) for m in p]
        else:
            out[name] = proj(flat(p))
    for name, (model, var, alpha) in clouds.items():
        out[name] = cloud(model, var, alpha)
    return out
