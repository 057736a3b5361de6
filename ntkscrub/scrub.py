"""One-shot NTK forgetting (Proposition 2, eq. 10) with Fisher noise (eq. 11).

Given w(D), trained from θ0 on D = D_r ⊔ D_f, the linearised model trained on a set S converges to

    w_lin(S) = J_Sᵀ (Θ_SS + λI)⁻¹ e_S ,     e_S = Y_S − f(S)   (``loss="mse"``)
                                             e_S = onehot(Y_S) − softmax f(S)   (``loss="ce"``)

and the scrubbing shift is Δ = w_lin(D_r) − w_lin(D) (REFERENCE.md §1, signs corrected from the
printed eq. 10). Two exact forms compute it:

* ``form="solves"``: two solves with one right-hand side each, (Θ_DD + λI) and (Θ_rr + λI);
* ``form="block"``: Δ = −P J_fᵀ M (e_f − Θ_fr(Θ_rr + λI)⁻¹ e_r), with P the projection off the
  retain gradients and M the inverse Schur complement; one solve with c·|D_f| + 1 right-hand sides,
  a small dense Schur system, and one more single solve inside P.

Both forms are written with the operator algebra of :mod:`ntkscrub.operators` (Θ = J Jᵀ + λI,
P = I − J_rᵀ (Θ_rr + λI)⁻¹ J_r) and every system is solved by one
:class:`~ntkscrub.operators.Inverse`. ``solver="dense"`` makes that inverse a Cholesky solve on
``to_dense()`` of the same graph (explicit J and Θ; the reference, small problems);
``solver="cg"`` never forms them (preconditioned CG on the lazy NTK). Both give the same shift.
Engineering knobs live in :mod:`ntkscrub.config` (``solver_config``, ``products``,
``noise_config``); the result records the configuration it used.
"""

from __future__ import annotations

import contextlib
import copy
import resource
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ntkscrub._progress import logger
from ntkscrub._validation import check_choice, check_not_meta, check_number
from ntkscrub.batches import subset_indices
from ntkscrub.config import (
    Method,
    NoiseConfig,
    ProductConfig,
    SolverConfig,
    check_mixed_precision,
)
from ntkscrub.matching import MatchConfig, check_match, output_match_shift
from ntkscrub.noise import (  # noqa: F401 - re-exported: part of this module's API
    add_fisher_noise,
    diagonal_fisher,
    fisher_noise_variance,
)
from ntkscrub.operators import (
    NTK,
    Counted,
    DenseTooLarge,
    Inverse,
    Jacobian,
    MatvecCounter,
    Projection,
    StackedJacobian,
    dense_dtype,
)
from ntkscrub.params import ParameterSpace, ParamSelector, check_eval_mode
from ntkscrub.prefix import jacobian_options, prefix_rows
from ntkscrub.shifts import NewtonConfig, ce_newton_shift, projected_shift, retain_change

__all__ = [
    "ScrubResult",
    "ShiftResult",
    "DenseTooLarge",
    "scrub",
    "ntk_shift",
    "auto_solver",
    "solver_estimate",
    "trapezium_scale",
    "fisher_noise_variance",
    "diagonal_fisher",
    "load_weights",
    "full_fp32_precision",
]

Form = Literal["solves", "block"]
ShiftMethod = Literal["one_shot", "projected", "ce_newton", "output_match"]
SolverChoice = Literal["cg", "dense", "auto"]


@contextlib.contextmanager
def full_fp32_precision(enabled: bool = True) -> Iterator[None]:
    """Turn TF32 off for matmuls and cuDNN convolutions inside the block (restored after).

    PyTorch runs cuDNN convolutions in TF32 by default; measured on an H200 (All-CNN, ResNet-18),
    Θv then has a relative error of 5e-3–1e-2 against float64 and a CG solve stalls at a true
    residual of 3e-2–4e-2, far from 1e-4. Full fp32 costs about 2.1× per matvec and reaches
    2e-4–4e-4 (benchmarks/results/gpu-h200). Correctness first: scrub disables TF32 unless
    ``allow_tf32=True``.
    """
    if not enabled:
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class ScrubResult:
    """What :func:`scrub` returns.

    Attributes:
        model: a new module holding the scrubbed weights (with noise when ``noise > 0``).
        shift: the deterministic shift ``s·Δ`` ``(p,)`` in ``model.named_parameters()`` order over
            the linearised parameters — after rescaling, before noise.
        info: solver records, ``converged`` (all solves), matvecs, seconds, peak memory, the
            configuration used (``info["config"]``), the measured memory plan of the passes
            (``info["passes"]``, :class:`~ntkscrub.operators.passes.PassPlan`), the kept forward
            passes (``info["forward_cache"]``), rescale factor, ...
        delta: the unrescaled Δ = w_lin(D_r) − w_lin(D) ``(p,)``.
        scale: the rescale factor s (1 without rescaling); ``shift = scale · delta``.
        w_lin_r: the retain-only linear model's displacement from the linearisation point
            ``(p,)`` (w_lin(D_r), or w_ce(D_r) for ``method="ce_newton"``): the kernel prediction
            of a retrain is ``f(θ_lin) + J w_lin_r``. For ``method="output_match"`` it is the
            first step's (the rounds re-linearise elsewhere and have no retain model of their
            own; the trapezium rescale uses it as its leg).
    """

    model: nn.Module
    shift: Tensor
    info: dict = field(default_factory=dict)
    delta: Tensor | None = None
    scale: float = 1.0
    w_lin_r: Tensor | None = None

    def to_dict(self, *, tensors: bool = False) -> dict[str, Any]:
        """A JSON-safe dict: ``info``, ``scale`` and the norms of ``shift`` and ``delta`` (the
        vectors themselves with ``tensors=True``; p floats each)."""
        from ntkscrub.io import to_jsonable

        out: dict[str, Any] = {
            "scale": self.scale,
            "shift_norm": float(self.shift.norm()),
            "delta_norm": None if self.delta is None else float(self.delta.norm()),
            "info": self.info,
        }
        if tensors:
            out["shift"], out["delta"] = self.shift, self.delta
        return to_jsonable(out)


# --------------------------------------------------------------------------- helpers
def load_weights(
    model: nn.Module, weights: nn.Module | Mapping[str, Tensor], name: str
) -> nn.Module:
    """A deep copy of ``model`` with ``weights`` (a module or a state_dict) loaded into it.

    Parameters must all be present with matching shapes; buffers are taken from ``weights`` when
    it has them (e.g. BatchNorm statistics of the pre-trained network), else kept from ``model``.
    """
    if isinstance(weights, nn.Module):
        state = dict(weights.state_dict())
    elif isinstance(weights, Mapping):
        state = dict(weights)
    else:
        raise TypeError(f"{name}: expected a module or a state_dict, got {type(weights).__name__}")
    out = copy.deepcopy(model)
    own = out.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{name}: tensor '{k}' has shape {tuple(v.shape)}, the model's has "
                f"{tuple(own[k].shape)}; is it the same architecture?"
            )
    missing = [k for k, _ in model.named_parameters() if k not in state]
    if missing:
        raise ValueError(f"{name}: missing parameters {missing[:5]}; is it the same architecture?")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ValueError(
            f"{name}: unexpected tensors {unexpected[:5]}; is it the same architecture?"
        )
    merged = {**own, **{k: v.to(own[k].device, own[k].dtype) for k, v in state.items()}}
    out.load_state_dict(merged)
    return out


def _targets(jac: Jacobian, loss: str) -> Tensor:
    """Residual e_S at the linearisation point, flat ``(c·N,)`` in row order ``n·c + k``."""
    y = jac.labels()
    f = jac.outputs()  # (N, c)
    if not bool(torch.isfinite(f).all()):
        raise ValueError("model: outputs at the linearisation point are not finite")
    onehot = torch.nn.functional.one_hot(y.long(), jac.c).to(f.dtype)
    e = onehot - (f if loss == "mse" else torch.softmax(f, dim=1))
    return e.reshape(-1)


def _peak_memory(device: torch.device) -> float:
    """Peak memory in MiB: ``torch.cuda.max_memory_allocated`` on CUDA, process max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- the shift
@dataclass
class ShiftResult:
    """What :func:`ntk_shift` computes: Δ and w_lin(D_r) ``(p,)``, the column-products spent
    (``matvecs``) and the records of every solve."""

    delta: Tensor
    w_lin_r: Tensor
    matvecs: int
    records: list[dict[str, Any]]


def ntk_shift(
    J_r: Jacobian,
    J_f: Jacobian,
    e_r: Tensor,
    e_f: Tensor,
    *,
    ridge_r: float,
    ridge_d: float,
    form: Form,
    config: SolverConfig,
) -> ShiftResult:
    """Δ = w_lin(D_r) − w_lin(D) (Prop. 2, signs corrected, REFERENCE.md §1).

    ``ridge_r``/``ridge_d`` are the λ of the Θ_rr and Θ_DD systems (equal except under the
    ``weight_decay`` convention, where λ = N·wd for each set). ``form`` is ``"solves"`` or
    ``"block"`` (the latter needs ``ridge_r == ridge_d``). ``matvecs`` counts column-products:
    one per column of a Θ product and one per column of a bare J or Jᵀ pass.
    """
    counter = MatvecCounter()
    if form == "solves":
        return _shift_solves(J_r, J_f, e_r, e_f, ridge_r, ridge_d, config, counter)
    if form != "block":
        raise ValueError(f"form: expected 'solves' or 'block', got {form!r}")
    if ridge_r != ridge_d:
        raise ValueError(
            "form: 'block' needs one ridge for Θ_rr and Θ_DD; the weight_decay "
            "convention gives them different ridges — use form='solves'"
        )
    return _shift_block(J_r, J_f, e_r, e_f, ridge_r, config, counter)


def _shift_solves(
    J_r: Jacobian,
    J_f: Jacobian,
    e_r: Tensor,
    e_f: Tensor,
    ridge_r: float,
    ridge_d: float,
    config: SolverConfig,
    counter: MatvecCounter,
) -> ShiftResult:
    """x_D = (Θ_DD + λ_D I)⁻¹ e_D, then the retain model as a change of it (:func:`retain_change`):
    x_r = x_D[r] + y, Δ = J_rᵀ y − J_fᵀ x_D[f]."""
    cr = e_r.shape[0]
    J_d = StackedJacobian(J_r, J_f)
    inv_d = Inverse(Counted(NTK(jac_a=J_d, ridge=ridge_d), counter), config, label="Θ_DD")
    x_d = inv_d.solve(torch.cat([e_r, e_f]))  # (c·N_D,)
    # Θ_rr is the leading principal submatrix of Θ_DD: its preconditioner comes for free.
    M = inv_d.preconditioner
    shared = M.restrict(slice(0, cr), ridge_r) if (config.share_precond and M is not None) else None
    delta, y, records, _ = retain_change(
        J_r, J_f, x_d[:cr], x_d[cr:], ridge_r=ridge_r, ridge_d=ridge_d, config=config,
        counter=counter, precond=shared, e_norm=float(e_r.norm()),
    )  # fmt: skip
    w_lin_r = Counted(J_r, counter).mT @ (x_d[:cr] + y)
    return ShiftResult(delta, w_lin_r, counter.count, inv_d.records + records)


# The least relative residual CG is asked for per dtype: below it the iterates sit at the
# rounding floor of the products (float32 CG was measured to stall near 1e-4–1e-5). float64 is
# clamped to its floor; float32 is refused below it.
_CG_FLOOR = {torch.float64: 1e-13, torch.float32: 1e-5}
# How much amplification of the inner solve's error the block form accepts before it re-solves.
_AMP_BUDGET = 10.0


def _shift_block(
    J_r: Jacobian,
    J_f: Jacobian,
    e_r: Tensor,
    e_f: Tensor,
    lam: float,
    config: SolverConfig,
    counter: MatvecCounter,
) -> ShiftResult:
    """Eq. 10: Δ = −P J_fᵀ M (e_f − Θ_fr (Θ_rr + λI)⁻¹ e_r), M the inverse Schur complement."""
    cf = e_f.shape[0]
    Jr, Jf = Counted(J_r, counter), Counted(J_f, counter)
    inv_rr = Inverse(Counted(NTK(jac_a=J_r, ridge=lam), counter), config, label="Θ_rr")
    eye_f = torch.eye(cf, dtype=e_f.dtype, device=e_f.device)
    Theta_rf = Counted(NTK(jac_a=J_r, jac_b=J_f), counter) @ eye_f  # (c·N_r, c·N_f)
    Theta_ff = Counted(NTK(jac_a=J_f), counter) @ eye_f  # (c·N_f, c·N_f)
    B = torch.cat([Theta_rf, e_r.unsqueeze(1)], 1)
    Z = inv_rr.solve(B)  # (Θ_rr + λI)⁻¹ [Θ_rf | e_r]
    S, amp = _schur(Theta_ff, Theta_rf, Z[:, :cf], lam)
    tol = config.tol_for(e_r.dtype)
    if amp > _AMP_BUDGET and config.method == "cg":
        # The Schur complement's small eigenvalues amplify the inner solve's relative error
        # ≈ amp times (issue 12: float32 at tol 1e-3 gave shifts 11–18× wrong, amp ≈ 1e3):
        # solve again so that the amplified error stays within _AMP_BUDGET · tol.
        Z = _refine_block_solve(inv_rr, B, Z, tol * _AMP_BUDGET / amp, amp)
        S, amp = _schur(Theta_ff, Theta_rf, Z[:, :cf], lam)
    z_r = Z[:, cf]
    v = e_f.double() - Theta_rf.double().T @ z_r.double()  # forget residual of the retain model
    Mv = _schur_solve(S, v).to(e_f.dtype)
    P = Projection(Jr, inverse=inv_rr)  # I − J_rᵀ (Θ_rr + λI)⁻¹ J_r
    delta = -(P @ (Jf.mT @ Mv))
    w_lin_r = Jr.mT @ z_r
    return ShiftResult(delta, w_lin_r, counter.count, inv_rr.records)


def _schur(Theta_ff: Tensor, Theta_rf: Tensor, Z_rf: Tensor, lam: float) -> tuple[Tensor, float]:
    """``S = Θ_ff + λI − Θ_rfᵀ (Θ_rr + λI)⁻¹ Θ_rf`` in float64 and its error amplification
    ``‖Θ_ff + λI‖₂ / λ_min(S)`` (how much a relative error in the subtracted term grows)."""
    T = Theta_ff.double()
    T = 0.5 * (T + T.T) + lam * torch.eye(T.shape[0], dtype=torch.float64, device=T.device)
    S = T - Theta_rf.double().T @ Z_rf.double()
    S = 0.5 * (S + S.T)
    top = float(torch.linalg.eigvalsh(T)[-1])
    low = float(torch.linalg.eigvalsh(S)[0])
    return S, (top / low if low > 0 else float("inf"))


def _refine_block_solve(inv: Inverse, B: Tensor, Z: Tensor, tol: float, amp: float) -> Tensor:
    """Re-solve the block system to ``tol`` (warm start), or refuse when the dtype cannot."""
    floor = _CG_FLOOR.get(B.dtype, 1e-6)
    if B.dtype == torch.float64:
        tol = max(tol, floor)
    if tol >= inv.config.tol_for(B.dtype):
        return Z
    if tol < floor:
        need = (
            f"needs a relative residual of {tol:.1e}"
            if amp < float("inf")
            else "is not even positive definite at the current accuracy"
        )
        raise ValueError(
            f"form: 'block' in {B.dtype} cannot be solved accurately here: the Schur complement "
            f"Θ_ff + λI − Θ_fr(Θ_rr + λI)⁻¹Θ_rf amplifies the inner Θ_rr solve's error "
            f"≈{amp:.1e}× and {need}, below what {B.dtype} CG reaches (≈{floor:g}). Use "
            "form='solves' (the default), a float64 model, or a larger ridge"
        )
    tight = Inverse(
        inv.A,
        inv.config.replace(tol=tol),
        label=f"{inv.label} (refined)",
        precond=inv.preconditioner,
    )
    tight._precond_origin = "reused"
    Z = tight.solve(B, x0=Z)
    inv.records.extend(tight.records)
    return Z


def _schur_solve(S: Tensor, v: Tensor) -> Tensor:
    """``S⁻¹ v`` by Cholesky in float64; a singular Schur complement raises, naming it."""
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0:
        raise ValueError(
            "form: the Schur complement Θ_ff + λI − Θ_fr(Θ_rr + λI)⁻¹Θ_rf is singular or not "
            "positive definite (forget samples duplicated in retain, or λ = 0 with c·N ≥ p); "
            "give a ridge > 0 or use form='solves'"
        )
    return torch.cholesky_solve(v.unsqueeze(1), L).squeeze(1)


def trapezium_scale(
    delta: Tensor, w_d: Tensor, theta0: Tensor, w_lin_r: Tensor
) -> tuple[float, float]:
    """The "isosceles trapezium" rescaling of the reference code (REFERENCE.md §2).

    Legs ``e = w(D) − θ0 − w_lin(D_r)``; ``cos θ = ⟨Δ, e⟩ / (‖Δ‖‖e‖)``; predicted length
    ``‖Δ‖ + 2|cos θ|‖e‖``; returns ``(s, cos θ)`` with ``s = predicted / ‖Δ‖``.
    """
    e = w_d - theta0 - w_lin_r
    nd, ne = float(delta.norm()), float(e.norm())
    if nd == 0.0:
        return 1.0, 0.0
    cos = float(delta.double() @ e.double()) / (nd * ne) if ne > 0 else 0.0
    return (nd + 2.0 * abs(cos) * ne) / nd, cos


# What a cg scrub costs and what the dense twin does, by method, for solver="auto": NTK
# products per cg scrub — the low end of what was measured on real NTKs, so that a close call
# goes to cg (quick preset, float32, tol 1e-3: one-shot 135–291, CE Newton 324–510, output
# matching 468–553 on the paper preset; torchvision ResNet-18 at N = 500: 79) — and Cholesky
# factorisations of the (c·N)² system on the dense twin (CE Newton: one per step, two fits).
_CG_PRODUCTS = {"one_shot": 80, "projected": 80, "ce_newton": 300, "output_match": 300}
_DENSE_FACTORS = {"one_shot": 2, "projected": 2, "ce_newton": 20, "output_match": 20}
# Below this many dense FLOPs (≈ 1 ms at the 120–160 GFLOP/s measured on 2 CPU cores) both
# paths cost their fixed overheads, not their FLOPs, and the dense twin is exact and cannot
# miss a tolerance: an 83-parameter MLP (c·N = 120) went to cg at 3.2 MFLOPs against 7.1.
_TINY_DENSE_FLOPS = 1e8


def solver_estimate(
    J_r: Jacobian, J_f: Jacobian | None, max_dense_bytes: float, method: str = "one_shot"
) -> dict[str, Any]:
    """The cost model behind ``solver="auto"`` (recorded as ``info["auto_solver"]``), over the
    samples of ``J_r`` and ``J_f`` (``None``: ``J_r`` holds all of D — a
    :class:`~ntkscrub.Scrubber`'s preparation).

    Memory: the explicit ``J_D`` ``(c·N, p)`` and two ``(c·N)²`` float64 matrices (Θ_DD and a
    factor; :func:`~ntkscrub.operators.inverse.dense_dtype`) must fit ``max_dense_bytes``. Time,
    in floating-point operations with F the forward FLOPs per sample
    (:meth:`~ntkscrub.operators.Jacobian.forward_flops`, at least 2p)::

        dense ≈ (2c + 1)·N·F  +  w·(2(c·N)²·p  +  k·(c·N)³/3)   (per-sample Jacobians, Θ = JJᵀ,
                                                                k Cholesky factorisations)
        cg    ≈ K · 6·N·F                                      (K products of a JVP + a VJP)

    with w = 2 where Θ and its factors are computed in a wider dtype than J (float64 for a
    float32 J: half the throughput; quick preset 27 → 39 s) and 1 otherwise.

    with K and k per method (``_CG_PRODUCTS``, ``_DENSE_FACTORS``); below ``_TINY_DENSE_FLOPS``
    the dense twin is taken whatever cg's count (overheads decide there). Why FLOPs: on this
    project's 2-core CPU the Θ product of the quick preset (All-CNN ×0.25, F = 44 MFLOPs)
    ran at ≈ 120 GFLOP/s by this count and the (2500 × 102 k) Gram product at 160, so one unit
    buys about the same time on either side. Why not memory alone (the rule before): with many
    classes the (c·N)²·p product dominates — c = 100, N = 100, p = 100 k, F = 10 MFLOPs fits
    4 GiB but costs ≈ 2e13 operations against cg's ≈ 5e11.
    """
    parts = [J_r] if J_f is None else [J_r, J_f]
    n, c, p = sum(j.n for j in parts), J_r.c, J_r.p
    rows = c * n
    item = torch.finfo(dense_dtype(J_r)).bits // 8
    need = sum(j.dense_bytes() for j in parts) + 2 * rows * rows * item
    wide = 1.0 if dense_dtype(J_r) == J_r.dtype else 2.0
    counted = J_r.forward_flops()
    F = max(counted or 0.0, 2.0 * p)
    K, k = _CG_PRODUCTS.get(method, 80), _DENSE_FACTORS.get(method, 2)
    dense = (2 * c + 1) * n * F + wide * (2.0 * rows * rows * p + k * rows**3 / 3)
    cg = K * 6.0 * n * F
    if need > max_dense_bytes:
        choice, why = "cg", "the explicit Jacobian and Θ exceed max_dense_bytes"
    elif dense <= _TINY_DENSE_FLOPS:
        choice, why = "dense", "the problem is tiny: the exact dense twin costs next to nothing"
    elif dense > cg:
        choice, why = "cg", "the dense twin would cost more operations than cg"
    else:
        choice, why = "dense", "the explicit Jacobian and Θ fit and cost fewer operations"
    logger.info("solver='auto' chose %s: %s", choice, why)
    return {
        "method": choice,
        "reason": why,
        "dense_bytes": need,
        "max_dense_bytes": max_dense_bytes,
        "forward_flops": counted,
        "dense_flops": dense,
        "cg_flops": cg,
        "cg_products_assumed": K,
    }


def _default_solver(solver: Any, solver_config: Any, max_iter: Any) -> Any:
    """``solver=None`` means ``"auto"`` unless a solver configuration or a CG iteration cap was
    given (then the configuration's method, ``"cg"`` by default, as before ``"auto"`` was the
    default). Why auto: on the quick preset the dense twin costs 0.3× a retrain and cg 1.6–3×
    (``benchmarks/results/cpu/``), while on an MLP of the demo's shape cg took 0.46 s and the
    dense twin 16 s (2 CPU cores, ``benchmarks/auto_solver_cases.py``); the cost model picks
    the cheaper one either way."""
    if solver is None and solver_config is None and max_iter is None:
        return "auto"
    return solver


def _resolve_auto(
    solver: Any, cfg: SolverConfig, J_r: Jacobian, J_f: Jacobian, method: str
) -> tuple[SolverConfig, dict[str, Any] | None]:
    """``solver="auto"`` resolved on the Jacobians (:func:`solver_estimate`); else as given."""
    if solver != "auto":
        return cfg, None
    auto = solver_estimate(J_r, J_f, cfg.max_dense_bytes, method)
    return cfg.replace(method=auto["method"]), auto


def auto_solver(
    J_r: Jacobian, J_f: Jacobian, max_dense_bytes: float, method: str = "one_shot"
) -> Method:
    """``solver="auto"``: ``"dense"`` when the explicit Jacobian and Θ fit ``max_dense_bytes``
    and the dense twin costs fewer operations than cg, else ``"cg"`` (:func:`solver_estimate`).

    Why the dense twin at all: explicit per-sample Jacobians cost about c backward passes per
    image, a solve on them a (c·N)²·p product and a Cholesky, while matrix-free PCG at the
    conditioning of real NTKs needs 100–300 products of about a training epoch each (quick
    preset, All-CNN ×0.25, c·N = 2500, p = 102 k, 2 CPU threads: dense 25 s, cg 204 s, one
    retrain 113 s).
    """
    return solver_estimate(J_r, J_f, max_dense_bytes, method)["method"]


# --------------------------------------------------------------------------- public API
def scrub(
    model: nn.Module,
    retain: Any,
    forget: Any,
    *,
    init: nn.Module | Mapping[str, Tensor],
    linearize_at: Literal["init", "trained"] = "init",
    loss: Literal["mse", "ce"] = "mse",
    ridge: float = 0.0,
    solver: SolverChoice | None = None,
    rescale: Literal["trapezium"] | None = None,
    noise: float = 0.0,
    seed: int | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    form: Form = "solves",
    strict: bool | None = None,
    weight_decay: float | None = None,
    params: ParamSelector = None,
    solver_config: SolverConfig | None = None,
    products: ProductConfig | None = None,
    noise_config: NoiseConfig | None = None,
    method: ShiftMethod = "one_shot",
    match: MatchConfig | None = None,
    newton: NewtonConfig | None = None,
    anchor_data: Any = None,
    forget_entropy: float | None = None,
    process_group: Any = None,
) -> ScrubResult:
    """Scrub D_f from ``model`` in one shot: ``S(w) = w(D) + s·Δ + n`` (Prop. 2, eq. 10–11).

    Args:
        model: an ``nn.Module`` in eval mode holding w(D), trained on D = retain ∪ forget.
            Never modified.
        retain, forget: D_r and D_f — a Dataset, a DataLoader or an ``(X, Y)`` pair; integer
            labels in ``[0, c)``.
        init: the pre-trained weights θ0 (a module or a state_dict of the same architecture).
        linearize_at: ``"init"`` (the paper: J and f at θ0) or ``"trained"`` (the reference code:
            J and residuals at w(D)).
        loss: ``"mse"`` (e = onehot − f, eq. 10) or ``"ce"`` (e = onehot − softmax f).
        ridge: λ ≥ 0 on the NTK diagonal; the linearised objective is
            ½Σ‖f_lin(x) − y‖² + ½λ‖w‖² summed over samples and classes.
        solver: ``"cg"`` (matrix-free PCG), ``"dense"`` (Cholesky on the explicit J and Θ;
            the reference) or ``"auto"``: dense when the explicit J_D and two Θ_DD fit
            ``solver_config.max_dense_bytes`` and cost fewer operations than cg, else cg
            (:func:`solver_estimate`; its numbers in ``info["auto_solver"]``). Overrides
            ``solver_config.method``. Default ``None``: ``"auto"``, unless ``solver_config`` or
            ``max_iter`` (a CG knob) is given — then ``solver_config.method`` (``"cg"`` by
            default). Both give the same shift to the solve's tolerance (the dense one is exact
            to rounding).
        rescale: ``None`` or ``"trapezium"`` (the reference code's heuristic, REFERENCE.md §2).
        noise: α ≥ 0: adds ``n ~ N(0, α F⁻¹)``, F the diagonal Fisher on D_r at the shifted
            weights, with the reference code's clamps (``noise_config``).
        seed: seeds the noise and the preconditioner's sketch; the same seed gives the same result.
        tol: per-column relative residual of CG (default 1e-10 in float64, 1e-3 in float32 —
            what float32 products deliver, see :meth:`SolverConfig.tol_for`). Θ_DD is solved to
            it; the retain system is solved for the *change* of that solution
            (:func:`~ntkscrub.shifts.retain_change`), to tol over Δ's cancellation, so that Δ is
            not ρ·tol off when it is ρ times smaller than either fit.
        max_iter: CG iteration cap per solve (default: the CG default).
        form: ``"solves"`` (default; two single-rhs solves) or ``"block"`` (eq. 10's block form).
        strict: raise :class:`~ntkscrub.operators.SolveNotConverged` (a ``CGNotConverged`` naming
            the system, with the partial result) if a solve misses ``tol`` (default True).
        weight_decay: the reference code's convention: a mean loss with weight decay wd toward θ0
            equals a ridge λ = N·wd for each system (N = |D| for Θ_DD, |D_r| for Θ_rr); replaces
            ``ridge``.
        params: which parameters are linearised (see :class:`~ntkscrub.params.ParameterSpace`).
        solver_config: the other solver knobs (:class:`~ntkscrub.config.SolverConfig`:
            preconditioner and rank, warm start, sharing, dense memory cap, sketch seed). The
            keywords ``solver``, ``tol``, ``max_iter``, ``strict`` take precedence; giving both a
            keyword and a different non-default field is an error.
        products: Jacobian products (:class:`~ntkscrub.config.ProductConfig`: batch size, vector
            chunk, autocast, TF32).
        noise_config: the Fisher noise conventions (:class:`~ntkscrub.config.NoiseConfig`).
        method: how Δ is computed (:mod:`ntkscrub.shifts`): ``"one_shot"`` (default; eq. 10),
            ``"projected"`` (Δ′ = −P J_fᵀ(J_f P J_fᵀ + λI)⁻¹J_f P (w(D) − θ0), λ = the retain
            ridge) or ``"ce_newton"`` (Δ_ce = w_ce(D_r) − w_ce(D) of the linearised
            cross-entropy + ridge model by damped Newton, the ridge centred at θ0; needs
            ``loss="ce"`` and a ridge > 0).
            ``"output_match"`` (:mod:`ntkscrub.matching`: a first step, then Levenberg–Marquardt
            rounds re-linearised at the current weights that move D_f's outputs to the retain
            model's predicted logits while holding anchors at w(D)'s; knobs in ``match``).
            ``form`` applies to ``"one_shot"`` only; rescale and noise apply to every method.
        match: :class:`~ntkscrub.matching.MatchConfig` of ``method="output_match"`` (rounds,
            damping, anchors, first step, seed); ``None``: its defaults.
        newton: :class:`~ntkscrub.shifts.NewtonConfig` of the cross-entropy model's damped
            Newton fits (``method="ce_newton"`` or ``match.first_step="ce_newton"``: step cap,
            stop test, inexact-Newton forcing, Armijo constant); ``None``: its defaults.
        anchor_data: ``method="output_match"``: extra unlabelled anchor images (X, a Dataset or
            DataLoader; labels ignored), e.g. validation images, held at w(D)'s outputs.
        forget_entropy: ``method="ce_newton"``: the mean softmax entropy (nats) D_f's outputs
            should have after the removal — a retrain's on images it never saw, measured
            without one as the model's own on held-out images:
            ``readouts.mean_entropy(model, val)``. The retain model's predicted D_f outputs are
            tempered to it and the CE model refitted on D with them as D_f's soft targets
            (:func:`ntkscrub.shifts.ce_newton_shift`; one more Newton fit). ``None``: off.
        process_group: data-parallel scrub (:mod:`ntkscrub.distributed`): when given, or when a
            default ``torch.distributed`` group is initialised, ``retain`` and ``forget`` are this
            rank's shards and the shift equals the one-process scrub of the shards concatenated
            in rank order, on every rank (see :func:`ntkscrub.distributed.sharded_scrub`).

    Returns:
        :class:`ScrubResult` with ``.model``, ``.shift`` ``(p,)``, ``.delta``, ``.scale`` and
        ``.info`` (``info["converged"]``, ``info["config"]``, ``info["solves"]``, ...).
    """
    t_start = time.perf_counter()
    _check_scrub_args(model, linearize_at, loss, rescale, form, seed)
    check_not_meta(model, "model")
    check_not_meta(init, "init")
    forget_entropy = _check_method(method, loss, ridge, weight_decay, form, forget_entropy)
    match = check_match(method, match, anchor_data, loss, ridge, weight_decay)
    ridge, noise, newton = (
        check_number(ridge, "ridge"),
        check_number(noise, "noise"),
        _typed(newton, NewtonConfig, "newton"),
    )
    if weight_decay is not None:
        weight_decay = check_number(weight_decay, "weight_decay")
        if ridge != 0.0:
            raise ValueError("weight_decay: give either ridge or weight_decay, not both")
    solver = _default_solver(solver, solver_config, max_iter)
    cfg = _solver_config(
        solver_config, None if solver == "auto" else solver, tol, max_iter, strict, seed
    )
    products = _typed(products, ProductConfig, "products")
    check_mixed_precision(cfg, products)
    noise_config = _typed(noise_config, NoiseConfig, "noise_config")
    _check_overlap(retain, forget)
    from ntkscrub import distributed  # imported here: torch.distributed only when used

    if distributed.active(process_group):
        if method != "one_shot":
            raise ValueError(
                f"method: {method!r} is not data-parallel yet; under torch.distributed only "
                "method='one_shot' runs (or scrub in one process)"
            )
        return distributed.sharded_scrub(
            model,
            retain,
            forget,
            init=init,
            process_group=process_group,
            linearize_at=linearize_at,
            loss=loss,
            ridge=ridge,
            rescale=rescale,
            weight_decay=weight_decay,
            params=params,
            solver_config=cfg.replace(method="cg") if solver == "auto" else cfg,
            products=products,
            noise=noise,
            form=form,
        )

    space_w, space, w_d, theta0 = _spaces(model, init, params, linearize_at)
    space, rows, prefix_info = _prefix_rows(space, retain, forget, products, method)
    J_r, J_f = _jacobians(space, rows, products, prefix_info)
    cfg, auto = _resolve_auto(solver, cfg, J_r, J_f, method)
    e_r, e_f = _targets(J_r, loss), _targets(J_f, loss)
    # the weight_decay convention: λ = N·wd for each system (N_r for Θ_rr, N_D for Θ_DD)
    wd = weight_decay
    ridge_r, ridge_d = (ridge, ridge) if wd is None else (J_r.n * wd, (J_r.n + J_f.n) * wd)
    check_rank(J_r.c * (J_r.n + J_f.n), J_r.p, ridge_d, "Θ_DD")
    if space.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(space.device)
    with full_fp32_precision(not products.allow_tf32):
        if method == "one_shot":
            res = ntk_shift(
                J_r, J_f, e_r, e_f, ridge_r=ridge_r, ridge_d=ridge_d, form=form, config=cfg
            )
        elif method == "output_match":
            res = output_match_shift(
                J_r, J_f, e_r, e_f, space=space_w, w_d=w_d, displacement=w_d - theta0,
                linearize_at=linearize_at, ridge_r=ridge_r, ridge_d=ridge_d, config=cfg,
                products=products, match=match, newton=newton, anchor_data=anchor_data,
            )  # fmt: skip
        else:
            res = _method_shift(
                method, J_r, J_f, e_r, w_d - theta0, linearize_at, ridge_r, ridge_d, cfg, newton,
                forget_entropy,
            )  # fmt: skip
    scale, cos = 1.0, None
    if rescale == "trapezium":
        scale, cos = trapezium_scale(res.delta, w_d, theta0, res.w_lin_r)
    shift = scale * res.delta

    out = copy.deepcopy(model)
    space_w.load_into(out, w_d + shift)
    noise_info: dict[str, Any] = {"alpha": noise}
    if noise > 0.0:
        out, _, noise_info = add_fisher_noise(
            out,
            retain,
            noise,
            seed=seed,
            params=space_w.names,
            noise_config=noise_config,
        )
    out.eval()
    info = {
        "linearize_at": linearize_at,
        "loss": loss,
        "solver": cfg.method,
        "solver_requested": solver or cfg.method,
        **({"auto_solver": auto} if auto is not None else {}),
        "form": form,
        "method": method,
        **({"method_info": res.extra} if method != "one_shot" else {}),
        "ridge_r": ridge_r,
        "ridge_d": ridge_d,
        "weight_decay": weight_decay,
        "tol": cfg.tol_for(space.dtype),
        **_solve_info(res, J_r, J_f, space),
        "rescale": rescale,
        "rescale_factor": scale,
        "rescale_cos": cos,
        "shift_norm": float(shift.norm()),
        "passes": {J.name: plan.to_dict() for J in (J_r, J_f) if (plan := J.pass_plan(False))},
        "prefix_cache": prefix_info,
        "forward_cache": {J.name: J.cache.info() for J in (J_r, J_f)},
        "noise": noise_info,
        "config": {
            "solver": cfg.to_dict(),
            "products": products.to_dict(),
            "noise": noise_config.to_dict(),
        },
        "seconds": time.perf_counter() - t_start,
        "peak_memory_mib": _peak_memory(space.device),
        "peak_memory_kind": "cuda_max_allocated"
        if space.device.type == "cuda"
        else "process_max_rss",
    }
    return ScrubResult(
        model=out,
        shift=shift.detach(),
        info=info,
        delta=res.delta.detach(),
        scale=scale,
        w_lin_r=res.w_lin_r.detach(),
    )


def _prefix_rows(
    space: ParameterSpace, retain: Any, forget: Any, products: ProductConfig, method: str
) -> tuple[ParameterSpace, dict[str, Any], dict[str, Any]]:
    """D_r and D_f through the frozen prefix once, when ``params`` linearises a suffix
    (:func:`ntkscrub.prefix.prefix_rows`); ``(space, {"retain", "forget"}, info)``.

    Why: each product otherwise runs the whole network. A torchvision ResNet-18 with only its
    head linearised, 200 CIFAR images, 2 CPU cores: 81 cg products took 10.6 s, all of it the
    frozen layers. Output matching builds Jacobians of its own on anchor data at moved weights:
    it streams as before."""
    data = {"retain": retain, "forget": forget}
    if not products.prefix_cache or method == "output_match":
        why = "ProductConfig.prefix_cache is off" if not products.prefix_cache else method
        return space, data, {"cached": False, "reason": why}
    return prefix_rows(space, data, batch_size=products.batch_size, budget=products.cache_bytes)


def _jacobians(
    space: ParameterSpace, rows: dict[str, Any], products: ProductConfig, prefix: dict[str, Any]
) -> tuple[Jacobian, Jacobian]:
    """``J_r`` ``(c·N_r, p)`` and ``J_f`` ``(c·N_f, p)`` at the same point; on a cached prefix
    the default pass budget is twice the whole network's training step, not the suffix's."""
    jkw = jacobian_options(products, prefix)
    J_r = Jacobian(space, rows["retain"], name="retain", **jkw)
    return J_r, Jacobian(space, rows["forget"], at=J_r.theta, name="forget", **jkw)


def _spaces(
    model: nn.Module, init: Any, params: ParamSelector, linearize_at: str
) -> tuple[ParameterSpace, ParameterSpace, Tensor, Tensor]:
    """The parameter space of ``model`` (w(D)) and the one linearised at θ0 or w(D), with the
    flat points w(D) and θ0 ``(p,)``."""
    space_w = ParameterSpace(model, params)
    space_w.check_compatible(
        init if isinstance(init, Mapping) else _module_params(init, "init"), "init"
    )
    init_model = load_weights(model, init, "init")
    w_d, theta0 = space_w.point(), space_w.point(init_model)
    if not bool(torch.isfinite(theta0).all()):
        raise ValueError("init: parameters contain NaN or infinite values")
    space = ParameterSpace(init_model if linearize_at == "init" else model, space_w.names)
    return space_w, space, w_d, theta0


def _solve_info(
    res: ShiftResult, J_r: Jacobian, J_f: Jacobian, space: ParameterSpace
) -> dict[str, Any]:
    """The solver part of ``ScrubResult.info``: convergence, sizes, matvecs and solve records."""
    return {
        "converged": all(rec.get("converged", True) for rec in res.records)
        and bool(getattr(res, "extra", {}).get("converged", True)),  # Newton's, for ce_newton
        "n_retain": J_r.n,
        "n_forget": J_f.n,
        "num_classes": J_r.c,
        "p": space.p,
        "dtype": str(space.dtype),
        "device": str(space.device),
        "matvecs": res.matvecs,
        # of which low-precision products inside mixed-precision solves (inner_precision)
        "inner_matvecs": sum(rec.get("inner_matvecs", 0) for rec in res.records),
        "solves": res.records,
        "delta_norm": float(res.delta.norm()),
    }


def _check_scrub_args(
    model: Any, linearize_at: Any, loss: Any, rescale: Any, form: Any, seed: Any
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_eval_mode(model, "model")
    check_choice(linearize_at, "linearize_at", ("init", "trained"))
    check_choice(loss, "loss", ("mse", "ce"))
    check_choice(rescale, "rescale", (None, "trapezium"))
    check_choice(form, "form", ("solves", "block"))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")


def check_rank(rows: int, p: int, ridge: float, system: str) -> None:
    """Refuse, before any product, a system that no solver can answer: ``Θ = J Jᵀ`` of
    ``rows`` = c·N rows has rank ≤ p (the linearised parameters), so with no ridge and
    c·N > p it is singular and the residuals e (not in J's range in general) have no solution —
    CG would run its whole budget and report a stall, the dense twin a failed Cholesky. Typical
    case: ``params`` selects the head (p = 2,565 for a 5-class ResNet-18 ``fc``) and D has more
    than p / c images. Θ_rr has fewer rows than Θ_DD and a ridge no larger, so checking Θ_DD
    covers it."""
    if ridge == 0.0 and rows > p:
        raise ValueError(
            f"ridge: {system} has c·N = {rows:,} rows but rank ≤ p = {p:,} (the linearised "
            "parameters), so with ridge=0 it is singular and has no solution; give ridge > 0 or "
            "weight_decay (the fine-tuning's, λ = N·wd), or linearise more parameters (params)"
        )


def _check_method(
    method: Any, loss: Any, ridge: Any, weight_decay: Any, form: Any, forget_entropy: Any = None
) -> float | None:
    """The method's argument checks; returns ``forget_entropy`` checked (a float or None)."""
    check_choice(method, "method", ("one_shot", "projected", "ce_newton", "output_match"))
    if method != "one_shot" and form != "solves":
        raise ValueError(f"form: applies to method='one_shot' only, got form={form!r}")
    if method == "ce_newton":
        if loss != "ce":
            raise ValueError(
                "loss: method='ce_newton' fits the linearised cross-entropy; pass loss='ce'"
            )
        if not ridge and not weight_decay:
            raise ValueError(
                "ridge: method='ce_newton' needs a ridge > 0 (or weight_decay > 0); the "
                "cross-entropy alone has no unique minimiser"
            )
    return _check_forget_entropy(forget_entropy, method)


def _check_forget_entropy(value: Any, method: str) -> float | None:
    if value is None:
        return None
    if method != "ce_newton":
        raise ValueError(f"forget_entropy: applies to method='ce_newton' only, got {method!r}")
    return check_number(value, "forget_entropy", positive=True)


def _method_shift(
    method: str,
    J_r: Jacobian,
    J_f: Jacobian,
    e_r: Tensor,
    displacement: Tensor,
    linearize_at: str,
    ridge_r: float,
    ridge_d: float,
    cfg: SolverConfig,
    newton: NewtonConfig | None = None,
    forget_entropy: float | None = None,
) -> Any:
    """The shift of a method of :mod:`ntkscrub.shifts` (a :class:`~ntkscrub.shifts.MethodShift`).

    ``displacement`` = w(D) − θ0. The cross-entropy model's ridge is centred at θ0 (weight decay
    toward θ0, the ``weight_decay`` convention), i.e. at −displacement from w(D) when
    linearised there: then it is the second-order model of w(D)'s own training objective."""
    if method == "projected":
        return projected_shift(J_r, J_f, displacement, e_r, ridge=ridge_r, config=cfg)
    centre = -displacement if linearize_at == "trained" else None
    return ce_newton_shift(
        J_r, J_f, ridge_r=ridge_r, ridge_d=ridge_d, config=cfg, newton=newton, centre=centre,
        forget_entropy=forget_entropy,
    )  # fmt: skip


def _typed(value: Any, cls: type, name: str) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise TypeError(f"{name}: expected a {cls.__name__} or None, got {type(value).__name__}")
    return value


def _solver_config(
    config: SolverConfig | None,
    solver: Any,
    tol: Any,
    max_iter: Any,
    strict: Any,
    seed: int | None,
) -> SolverConfig:
    """The solver configuration in effect: ``config`` with the keywords that were given."""
    given = config is not None
    config = _typed(config, SolverConfig, "solver_config")
    default = SolverConfig()
    changes: dict[str, Any] = {}
    for name, field_name, value in (
        ("solver", "method", solver),
        ("tol", "tol", tol),
        ("max_iter", "max_iter", max_iter),
        ("strict", "strict", strict),
    ):
        if value is None:
            continue
        current = getattr(config, field_name)
        if given and current != getattr(default, field_name) and current != value:
            raise ValueError(
                f"{name}: given as a keyword ({value!r}) and as solver_config.{field_name} "
                f"({current!r}); give one"
            )
        changes[field_name] = value
    if seed is not None:
        changes["seed"] = seed
    try:
        return config.replace(**changes)
    except (TypeError, ValueError) as err:
        # Name the keyword the user typed, not the dataclass field behind it.
        msg = str(err).replace("SolverConfig.method", "solver").replace("SolverConfig.", "")
        raise type(err)(msg) from None


def _check_overlap(retain: Any, forget: Any) -> None:
    """Overlap between retain and forget is only detectable for index subsets of one set."""
    sr, sf = subset_indices(retain), subset_indices(forget)
    if sr is not None and sf is not None and sr[0] == sf[0]:
        both = sorted(set(sr[1]) & set(sf[1]))
        if both:
            raise ValueError(
                f"forget: {len(both)} sample(s) are also in retain, e.g. indices {both[:10]}"
            )


def _module_params(m: Any, name: str) -> dict[str, Tensor]:
    if not isinstance(m, nn.Module):
        raise TypeError(f"{name}: expected a module or a state_dict, got {type(m).__name__}")
    return dict(m.named_parameters())
