"""Shift computations beyond the one-shot MSE step of Prop. 2 (issue 13, item 2).

Both methods work on the Jacobians ``J_r`` ``(c·N_r, p)`` and ``J_f`` ``(c·N_f, p)`` at one
linearisation point θ_lin (θ0 or w(D)) and solve every system through one
:class:`~ntkscrub.operators.Inverse` (``SolverConfig.method``: PCG or the dense Cholesky twin).

* :func:`ce_newton_shift` — the *cross-entropy-consistent linear model*. For a set S it minimises
  the linearised cross-entropy with a ridge (the loss w(D) was actually trained with, unlike
  eq. 10's MSE on one-hot targets)::

      L_S(w) = Σ_{i∈S} CE(f(x_i) + J_i w, y_i) + ½λ‖w‖²,       w ∈ R^p (displacement from θ_lin)

  by damped Newton in the dual (NTK) form, and returns Δ_ce = w_ce(D_r) − w_ce(D).
* :func:`projected_shift` — the *projected displacement*
  Δ′ = −P J_fᵀ (J_f P J_fᵀ + λI)⁻¹ J_f P (w(D) − θ0), P = I − J_rᵀ(Θ_rr + λI)⁻¹J_r: it removes
  from the true fine-tuning displacement its component along the forget gradients that the
  retain gradients do not explain (the true displacement replaces eq. 10's w_lin(D)).

Cost is counted in column-products (one per column of a Θ, H^½ΘH^½ or bare J/Jᵀ product), the
unit of :func:`ntkscrub.scrub.ntk_shift`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from linear_operator.operators import DenseLinearOperator
from torch import Tensor

from ntkscrub._progress import logger, warn
from ntkscrub.config import SolverConfig, _Config
from ntkscrub.operators import (
    NTK,
    Counted,
    Dual,
    Inverse,
    Jacobian,
    MatvecCounter,
    OutputHessian,
    Product,
    Recorded,
    SolveNotConverged,
    StackedJacobian,
)
from ntkscrub.operators.inverse import krylov_pairs
from ntkscrub.solvers import KrylovPairs, recycled

__all__ = [
    "NewtonConfig",
    "retain_change",
    "cancellation_amplification",
    "cancellation_solve",
    "cancellation_floor",
    "CEModel",
    "MethodShift",
    "entropy_temperature",
    "mean_entropy",
    "ce_newton_fit",
    "ce_newton_shift",
    "projected_shift",
]


@dataclass(frozen=True)
class NewtonConfig(_Config):
    """The damped Newton iteration of :func:`ce_newton_fit`.

    Attributes:
        max_iter: Newton steps at most (the issue's probe converged in 6–10).
        rtol: stop after the step whose half squared Newton decrement ``½ gᵀ(∇²L)⁻¹g`` (the
            predicted decrease of L, affine invariant) is ≤ ``rtol · max(1, L)``. ``None``:
            ``max(1e-14, 16·eps)`` of the logits' dtype — 1e-14 in float64, 1.9e-6 in float32:
            the objective's rounding, below which :func:`_armijo` cannot verify a decrease
            either. The step that meets the test is still taken (quadratic convergence: it ends
            far below the threshold). Measured on the quick preset at w(D), float32: the earlier
            1e-7 asked for one more step per fit after ½δ² ≈ 1e-4 (then 2e-9), ≈ 20 products each.
        forcing: inexact Newton: the inner PCG tolerance of step k is
            ``max(tol, min(forcing, (δ_{k−1}/δ_1)²))`` with δ the Newton decrement (loose while far
            from the minimum, tightening as the gradient vanishes: superlinear convergence).
            A loose solve that converged but gives no descent direction is solved again at the
            final tol (one more solve; seen on the quick preset at w(D), float32, forcing 0.1:
            δ² = −1.27, which raised before the re-solve existed). Why 0.01: the quick preset's
            CE model at w(D), float32, tol 1e-3, seeds 0/1/2 (logs in
            ``experiments/results/quick-dense-3seeds/engine-check/``): 324/434/360 products,
            against 349/503/357 at 0.1 and 403/510/438 at 1e-3 (the earlier default, which made
            every float32 step exact); the same readouts.
        armijo: sufficient decrease of the backtracking line search (halving the step).
    """

    max_iter: int = 50
    rtol: float | None = None
    forcing: float = 0.01
    armijo: float = 0.25

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_iter, bool)
            or not isinstance(self.max_iter, int)
            or self.max_iter < 1
        ):
            raise ValueError(f"NewtonConfig.max_iter: expected an int ≥ 1, got {self.max_iter!r}")
        for name in ("forcing", "armijo"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < 1):
                raise ValueError(f"NewtonConfig.{name}: expected a number in (0, 1), got {v!r}")
        if self.rtol is not None and not (isinstance(self.rtol, (int, float)) and self.rtol > 0):
            raise ValueError(f"NewtonConfig.rtol: expected a number > 0 or None, got {self.rtol!r}")

    def rtol_for(self, dtype: torch.dtype) -> float:
        if self.rtol is not None:
            return float(self.rtol)
        return max(1e-14, 16 * torch.finfo(dtype).eps)


@dataclass
class CEModel:
    """The fitted linear cross-entropy model on a set S.

    Attributes:
        alpha: dual coefficients ``(c·N,)``; the minimiser is ``w = J_Sᵀ α`` (representer theorem:
            ∇L = Jᵀ(π − Y) + λw = 0 puts w in the row space of J_S).
        outputs: the linear model's logits ``f + Θ_SS α`` at the minimiser, ``(N, c)``.
        objective: L_S at the minimiser.
        iterations: Newton steps taken; converged: the decrement test was met.
        history: per step: objective, decrement², inner tol, step length.
        precond: the Nyström factor built at the first step (reused by every later step).
        theta: the Θ_SS operator the steps used (the explicit matrix on the dense twin).
        start: the starting point :func:`_dual_start` took: the scale t of ``t·α₀`` (0: α = 0),
            or ``"warm"`` for the given warm start.
    """

    alpha: Tensor
    outputs: Tensor
    objective: float
    iterations: int
    converged: bool
    history: list[dict[str, float]] = field(default_factory=list)
    precond: Any = None
    start: float | str = 0.0
    theta: Any = None


def _ce_objective(z: Tensor, onehot: Tensor, alpha: Tensor, q: Tensor, lam: float) -> float:
    """Σ CE(z_i, y_i) + ½λ αᵀΘα with ``q = Θα`` (so ‖w‖² = αᵀΘα costs no product)."""
    ce = -(onehot * torch.log_softmax(z.double(), dim=1)).sum()
    return float(ce) + 0.5 * lam * float(alpha.double() @ q.double())


def ce_newton_fit(  # noqa: PLR0915 - listed in pyproject.toml
    jac: Jacobian,
    *,
    ridge: float,
    config: SolverConfig,
    newton: NewtonConfig | None = None,
    counter: MatvecCounter | None = None,
    label: str = "S",
    records: list[dict[str, Any]] | None = None,
    precond: Any = None,
    centre: Tensor | None = None,
    warm: Tensor | None = None,
    theta: Any = None,
    targets: Tensor | None = None,
) -> CEModel:
    """Minimise ``Σ_i CE(f(x_i) + J_i w, y_i) + ½λ‖w − c‖²`` over ``w = c + Jᵀα`` by damped
    Newton (``c = centre``, default 0; with ``u = w − c`` it is the same problem at the shifted
    logits ``f + J c``, one JVP pass).

    The primal Newton step ``(JᵀHJ + λI)⁻¹ Jᵀ r`` (gradient ``Jᵀr``, ``r = π − Y + λα``, H the
    block-diagonal softmax Hessian at the current linear logits z) equals ``Jᵀβ`` with
    ``β = (HΘ + λI)⁻¹ r = H^½ (H^½ΘH^½ + λI)⁻¹ H^{+½} r`` when r lies in the range of H (each
    sample's π − Y and α sum to zero over the classes, H_n's null vector) — plus an exact
    correction for the part of r along curvature too small to resolve (a confidently wrong
    sample; see :func:`_newton_direction`) — so each step is one solve on the SPD dual system of
    :func:`~ntkscrub.operators.Dual` plus one or two Θ products (Θβ, to update z), damped by
    Armijo backtracking on the exact objective.

    Why this form and not Woodbury's ``β = (r − H^½u)/λ``, ``u = (H^½ΘH^½ + λI)⁻¹H^½Θr``: there
    β is a difference of large terms and the right-hand side H^½Θr is dominated by Θ's top
    eigen-directions, so a relative residual of 1e-3 left errors in β larger than β along the
    top directions whenever a preconditioner spread CG's error over the spectrum. Measured with
    float64 replicas of the quick preset's Θ (c·N = 2500, λ = 50, tol 1e-3): Woodbury + the
    reused Nyström factor took 17–20 Newton steps (half of them backtracked) and 820–1019
    products per fit; this form converges in 5–6 full steps whatever the preconditioner.

    Preconditioner: one Nyström factor of Θ + λI (H-free, built at the first step or given),
    carried to each step's ``H^½ΘH^½ + λI`` by :meth:`~ntkscrub.solvers.LowRankPreconditioner.
    congruence` — a factor of the step-1 system reused as is had gone stale (measured: 97–118
    CG iterations per later step against 13–15 with the congruence, rank 64).

    Args:
        jac: ``J_S`` ``(c·N, p)`` at θ_lin (its outputs and labels define the model).
        ridge: λ > 0 (the cross-entropy alone has no unique minimiser).
        config: solver of the dual systems; the Nyström factor built at the first step is reused.
        newton: the iteration's knobs (:class:`NewtonConfig`).
        counter: shared column-product counter.
        label: the set's name in the solve records.
        records: list the solve records are appended to.
        precond: a Nyström factor of ``Θ_SS + λI`` (e.g. restricted from the D fit's); built
            once at the first step when None (and the configuration asks for one).
        centre: the ridge's centre relative to θ_lin ``(p,)`` (θ0 − θ_lin: weight decay toward
            θ0); ``alpha`` then parametrises ``w − centre``.
        warm: a candidate dual start ``(c·N,)`` (e.g. :func:`_retain_start`'s), taken
            when its exact objective beats every ``t·α₀`` (one more Θ product); the minimiser is
            unique, so it moves the cost, not the result.
        theta: Θ_SS ``(c·N, c·N)`` as an operator, when the caller has it (the dense twin's D_r
            fit takes the leading block of the D fit's explicit Θ); formed here when None.
        targets: soft targets ``(N, c)`` (rows on the simplex) in place of the one-hot labels
            ``Y`` (:func:`ce_newton_shift`'s ``forget_entropy``); every formula above holds with
            ``Y`` a probability row, since π − Y still sums to zero over each sample's classes.
    """
    _check_fit_inputs(jac, ridge, centre, warm, theta)
    newton = NewtonConfig() if newton is None else newton
    counter = MatvecCounter() if counter is None else counter
    records = [] if records is None else records
    lam, c, dt = float(ridge), jac.c, jac.dtype
    f_lin = f0 = jac.outputs()  # (N, c): θ_lin's own logits; f0 those of the centre
    if centre is not None:
        f0 = f_lin + (Counted(jac, counter) @ centre.to(dt)).reshape(jac.n, c)
    if not bool(torch.isfinite(f0).all()):
        raise ValueError("model: outputs at the linearisation point are not finite")
    onehot = _fit_targets(jac, targets)
    Theta = _theta_operator(jac, config, counter) if theta is None else theta
    precond, build = _theta_sketch(jac, lam, config, counter, label, precond)
    scale = _theta_scale(Theta, precond)
    floor = 0.0 if not scale or scale <= lam else lam / scale  # see _newton_direction
    proj = None
    if centre is not None and warm is None:
        proj, precond = _displacement_start(Theta, f0, f_lin, lam, precond, config, records, label)
    alpha, q, z, obj, start = _dual_start(Theta, f0, f_lin, onehot, lam, warm, proj)
    tol_final, rtol = config.tol_for(dt), newton.rtol_for(dt)
    history, converged, dec_prev, dec_first = [], False, 1.0, None
    it = 0
    for it in range(1, newton.max_iter + 1):
        probs = torch.softmax(z, dim=1)
        r = (probs - onehot).reshape(-1) + lam * alpha
        tol_k = max(tol_final, min(newton.forcing, dec_prev))  # dec_prev: relative to step 1
        stop = rtol * max(1.0, abs(obj))  # the decrement test's threshold on ½δ²
        solve = partial(
            _newton_direction, jac, Theta, probs, r, lam, precond,
            counter=counter, label=f"{label} #{it}", floor=floor,
        )  # fmt: skip
        pairs = _record_theta(Theta, precond, config)
        cfg = config if pairs is None else config.replace(recycle=0)  # Θ's pairs, not S's
        beta, Tb, inv, tol = _descent_direction(solve, Theta, r, cfg, (tol_k, tol_final))
        for i, rec in enumerate(inv.records):  # the sketch's cost goes on the first record
            rec.update(
                build if it == i + 1 == 1 else {"precond_matvecs": 0, "precond_seconds": 0.0}
            )
        records.extend(inv.records)
        beta, Tb, dec2, step_kind = _checked_direction(
            inv, label, it, r, beta, Theta, tol_final, stop, Tb
        )
        precond = _recycle_theta(Theta, precond, pairs, inv.records)
        if step_kind == "zero":  # the decrement vanishes to the products' precision: done
            history.append({"objective": obj, "decrement2": dec2, "inner_tol": tol})
            history[-1].update({"step": 0.0, "direction": "none (decrement at rounding floor)"})
            converged = True
            break
        done = step_kind == "newton" and 0.5 * dec2 <= stop
        t, a_new, q_new, z_new, obj_new = _armijo(
            alpha, q, beta, Tb, f0, onehot, lam, obj, newton.armijo * dec2
        )
        history.append(
            {
                "objective": obj_new,
                "decrement2": dec2,
                "inner_tol": tol,
                "step": t,
                "direction": step_kind,
            }
        )
        alpha, q, z, obj = a_new, q_new, z_new, obj_new
        logger.info(
            "CE Newton %s step %d: objective %.6g, decrement² %.3g, step %.3g (%s), "
            "%d CG iterations, %d products so far",
            label,
            it,
            obj,
            dec2,
            t,
            step_kind,
            sum(rec.get("iterations", 0) for rec in inv.records),
            counter.count,
        )
        if step_kind == "newton":
            dec_first = dec2 if dec_first is None else dec_first
            dec_prev = dec2 / dec_first  # (δ_k/δ_1)²: quadratic forcing, exact near the minimum
        if done:  # the last (full, quadratically convergent) step was still taken
            converged = True
            break
    return CEModel(alpha, z, obj, it, converged, history, precond, start, Theta)


def _fit_targets(jac: Jacobian, targets: Tensor | None) -> Tensor:
    """The fit's target rows ``(N, c)``: one-hot labels, or ``targets`` checked to lie on the
    simplex (a ValueError naming ``targets`` otherwise)."""
    c, dt = jac.c, jac.dtype
    if targets is None:
        return torch.nn.functional.one_hot(jac.labels().long(), c).to(dt)
    if tuple(targets.shape) != (jac.n, c):
        raise ValueError(f"targets: expected shape {(jac.n, c)}, got {tuple(targets.shape)}")
    t = targets.to(dtype=dt, device=jac.theta.device)
    ok = bool(torch.isfinite(t).all()) and bool((t >= 0).all())
    if not ok or float((t.sum(1) - 1).abs().max()) > 1e-4:
        raise ValueError("targets: every row must be finite, ≥ 0 and sum to 1")
    return t


def _check_fit_inputs(
    jac: Jacobian, ridge: Any, centre: Tensor | None, warm: Tensor | None, theta: Any
) -> None:
    """The argument checks of :func:`ce_newton_fit` (TypeError/ValueError naming the argument)."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)):
        raise TypeError(f"ridge: expected a number, got {type(ridge).__name__}")
    if not (ridge > 0 and math.isfinite(ridge)):
        raise ValueError(
            f"ridge: the cross-entropy linear model needs a finite ridge > 0, got {ridge}"
        )
    rows = jac.c * jac.n
    for name, value, shape in (
        ("centre", centre, (jac.p,)),
        ("warm", warm, (rows,)),
        ("theta", theta, (rows, rows)),
    ):
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(value.shape)}")


def _displacement_start(
    Theta: Any,
    f0: Tensor,
    f_lin: Tensor,
    lam: float,
    precond: Any,
    config: SolverConfig,
    records: list[dict[str, Any]],
    label: str,
) -> tuple[tuple[Tensor, Tensor], Any]:
    """A start whose linear logits are θ_lin's own: ``α = (Θ + λI)⁻¹(f(θ_lin) − f₀)`` ``(c·N,)``
    with ``f₀ = f(θ_lin) + J·centre`` — the dual image of the displacement θ_lin − centre on the
    rows (logits ``f₀ + Θα ≈ f(θ_lin) − λα``) — and ``Θα`` ``(c·N,)``. One solve on Θ + λI,
    preconditioned by the fit's own sketch, to 1e-2 (a start), recorded, and one product.
    Returns ``(α, Θα)`` and the sketch as that solve left it (recycled, ``SolverConfig.recycle``).

    Why: SGD does not end at the stationary point of the training objective, so the t·α₀ grid's
    points can all be far from the linear model's minimiser; this start keeps w(D)'s own fit of
    D. Measured on the quick preset, seed 2, CE at w(D): the D fit took 12 Newton steps from
    t = 0 (decrement² 4.5e4 at the start) and 4 from here (51) on the dense twin."""
    b = (f_lin - f0).reshape(-1)
    if isinstance(Theta, DenseLinearOperator):
        T = Theta.to_dense()
        A = DenseLinearOperator(T + lam * torch.eye(T.shape[0], dtype=T.dtype, device=T.device))
    else:
        A = Theta.add_diagonal(lam)
    inv = Inverse(A, config.replace(tol=max(config.tol_for(b.dtype), 1e-2)),
                  label=f"CE {label} start", precond=precond)  # fmt: skip
    a = inv.solve(b)
    records.extend(inv.records)
    # Θα by a product, not b − λα: the solve is loose, and that q (inconsistent with α) stalled
    # the Newton steps (a linear model on cg: decrement² stuck at 1.7e-6, Armijo steps of 1e-9,
    # the tracked objective below the true minimum). Not made to sum to zero over each sample's
    # classes like the minimiser's (Y − π)/λ: that start took 8 steps instead of 4 (quick preset).
    return (a, Theta @ a), inv.preconditioner


def _dual_start(
    Theta: Any,
    f0: Tensor,
    f_lin: Tensor,
    onehot: Tensor,
    lam: float,
    warm: Tensor | None = None,
    proj: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, float, float | str]:
    """The Newton iteration's starting point: ``t·α₀``, ``α₀ = (Y − softmax(f(θ_lin)))/λ``, with t
    the best of {0, ¼, ½, ¾, 1} by the exact objective (one Θ product: ``Θ(tα₀) = tΘα₀``), or
    ``warm`` when given and better (one more product). Returns ``(α, Θα, z, objective, start)``.

    Why: at a stationary point of the *network's* objective (w(D) trained with this loss and
    this weight decay toward θ0), ``w(D) − θ0 = J(w(D))ᵀ(Y − π)/λ``, so linearised at w(D)
    the point t = 1 is ``w = 0`` — the linear model's minimiser when training converged — while
    α = 0 is θ0, far from it. Measured on the quick preset, seed 1, dense twin: at w(D) the D
    fit takes t = ¼ (SGD with augmentation and BatchNorm does not end at the stationary point),
    14 → 12 Newton steps; at θ0 and on D_r t = 0 (the old start, one product spent).

    Why ``warm``: removing a small D_f barely moves the retained samples' logits, so a start
    that keeps the D fit's logits on D_r (:func:`_retain_start`) lies near the D_r minimiser,
    where the t grid's points may not (the quick preset at w(D): the D_r fit took 11 steps
    from t = 0). The objective decides, so a poor candidate costs one product, not steps."""
    alpha0 = (onehot - torch.softmax(f_lin, dim=1)).reshape(-1) / lam
    q0 = Theta @ alpha0
    cands: list[tuple[Tensor, Tensor, float | str]] = [
        (t * alpha0, t * q0, t) for t in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    if warm is not None:
        w = warm.to(alpha0.dtype)
        cands.append((w, Theta @ w, "warm"))
    if proj is not None:
        cands.append((proj[0].to(alpha0.dtype), proj[1].to(alpha0.dtype), "displacement"))
    best = None
    for a, q, label in cands:
        z = f0 + q.reshape(f0.shape)
        obj = _ce_objective(z, onehot, a, q, lam)
        if best is None or obj < best[3]:
            best = (a, q, z, obj, label)
    return best


def _theta_operator(jac: Jacobian, config: SolverConfig, counter: MatvecCounter) -> Any:
    """Θ_SS for the Newton iteration: matrix-free (counted) for cg; for the dense twin the
    explicit ``J Jᵀ`` once, so that each step's ``H^½ΘH^½`` is a block congruence of it — the
    Dual operator's own dense twin re-multiplies the ``(c·N, p)`` Jacobian at every step
    (measured on the quick preset: minutes per fit instead of seconds)."""
    if config.method != "dense":
        return Recorded(NTK(jac_a=jac), counter)  # its products can sharpen Θ's factor
    gate = Inverse(NTK(jac_a=jac), config, label="Θ (explicit, CE Newton)")
    # accumulated in float64 (the gate's dense system), held in the Jacobian's dtype: each
    # Newton step's system is formed from it and factored in float64 again by its own Inverse
    return DenseLinearOperator(gate.dense_system().to(jac.dtype))


def _newton_system(
    jac: Jacobian, Theta: Any, probs: Tensor, root: Tensor, lam: float, counter: MatvecCounter
) -> Any:
    """``H^½ΘH^½ + λI`` ``(c·N, c·N)``: through the recorded Θ (its products are Θ's, kept for
    recycling), the Dual operator, or from the explicit Θ when dense."""
    if isinstance(Theta, Recorded):
        kw = {"dtype": jac.dtype, "device": jac.device}
        R = OutputHessian(probs, jac.c, jac.n, power=0.5, **kw)
        return Product(R, Product(Theta, R)).add_diagonal(lam)
    if not isinstance(Theta, DenseLinearOperator):
        return Counted(Dual(jac=jac, loss="ce", damping=lam, probs=probs), counter)
    n, c = jac.n, jac.c
    T = Theta.to_dense().reshape(n, c, n, c)
    B = root.to(T.dtype)  # (N, c, c), symmetric blocks
    S = torch.einsum("iab,ibjc,jcd->iajd", B, T, B).reshape(n * c, n * c)
    return DenseLinearOperator(S + lam * torch.eye(n * c, dtype=S.dtype, device=S.device))


def _newton_direction(
    jac: Jacobian,
    Theta: Any,
    probs: Tensor,
    r: Tensor,
    lam: float,
    precond: Any,
    config: SolverConfig,
    counter: MatvecCounter,
    label: str,
    floor: float = 0.0,
) -> tuple[Tensor, Inverse]:
    """The dual Newton direction ``β = (HΘ + λI)⁻¹ r`` ``(c·N,)`` at softmax ``probs``
    ``(N, c)``, and the :class:`Inverse` that solved it (its records).

    With ``a = H^{+½} r`` (curvature below ``floor`` treated as zero) and ``r₀ = r − H^½a`` (the
    part of r along the dropped eigen-directions),

        β = r₀/λ + H^½ (H^½ΘH^½ + λI)⁻¹ (a − H^½Θr₀/λ),

    exact for any such split (multiply out: ``(HΘ + λI)β = r₀ + H^½a = r``); without r₀ it is
    the symmetric step. r₀ ≠ 0 needs one more Θ product. Why r₀ matters: a sample that is
    confidently wrong (its class at probability 1e-20) has O(1) gradient along a direction of
    curvature 1e-20 — below any threshold — and dropping it gave a non-descent direction after
    an exact solve (quick preset seed 1 at w(D): δ² = −0.06; a float64 linear model in
    ``test_shifts``). Why the floor: kept directions of tiny curvature h put ``r/√h`` in the
    right-hand side, whose norm then sets the inexact solve's tolerance for every other sample;
    below ``h = λ/λ_max(Θ)`` the system is λ to within a factor 2 there, so r₀ carries those
    directions without cancellation. The system is preconditioned by the H^½-congruence of
    Θ's Nyström factor ``precond``."""
    kw = {"dtype": jac.dtype, "device": jac.device}
    root = OutputHessian(probs, jac.c, jac.n, power=0.5, **kw).blocks
    pinv_root = OutputHessian(probs, jac.c, jac.n, power=-0.5, floor=floor, **kw).blocks
    a = _apply_blocks(pinv_root, r)
    r0 = r - _apply_blocks(root, a)
    if float(r0.norm()) > torch.finfo(r.dtype).eps * float(r.norm()):
        a = a - _apply_blocks(root, Theta @ r0) / lam
    else:
        r0 = None
    M = None if precond is None else precond.congruence(lambda U: _apply_blocks(root, U), lam)
    S = _newton_system(jac, Theta, probs, root, lam, counter)
    inv = Inverse(S, config, label=f"CE Newton {label}", precond=M)
    beta = _apply_blocks(root, inv.solve(a))
    if r0 is not None:
        beta = beta + r0 / lam
    for rec in inv.records:
        if M is not None:
            rec["precond"] = "nystrom of Θ + λI, H^½-congruence"
        rec["flat_curvature_share"] = 0.0 if r0 is None else float(r0.norm() / r.norm())
    return beta, inv


def _descent_direction(
    solve: Callable[[SolverConfig], tuple[Tensor, Inverse]],
    Theta: Any,
    r: Tensor,
    config: SolverConfig,
    tols: tuple[float, float],
) -> tuple[Tensor, Tensor, Inverse, float]:
    """``solve`` (:func:`_newton_direction` with all but its configuration bound) at the step's
    inexact tolerance ``tols[0]``, solved again at the final one ``tols[1]`` when that converged
    solve gives no descent (δ² = rᵀΘβ ≤ 0). Returns ``(β, Θβ, inv, tol)``: the direction, its
    product, the :class:`Inverse` (whose records hold every solve of the step: the retry's
    appended) and the tolerance of the last solve.

    Why: a loose solve may point uphill (quick preset at w(D), float32, forcing 0.1: δ² =
    −1.27), and only an answer at the final tol can be called an error by
    :func:`_checked_direction`. An unconverged loose solve (a time budget) is not retried: a
    tighter one would spend the budget again; it goes to the gradient fallback."""
    loose, final = tols
    records: list[dict[str, Any]] = []
    for tol in dict.fromkeys((loose, final)):
        beta, inv = solve(config.replace(tol=tol))
        records.extend(inv.records)
        Tb = Theta @ beta
        solved = all(rec.get("converged", True) for rec in inv.records)
        if _descends(_decrement(r, Tb)) or tol == final or not solved:
            break
        logger.info("CE Newton %s: no descent at tol %.3g, solving again", inv.label, tol)
    inv.records[:] = records
    return beta, Tb, inv, tol


def _record_theta(Theta: Any, precond: Any, config: SolverConfig) -> KrylovPairs | None:
    """Start keeping the Θ products of a Newton step (``Theta`` a :class:`Recorded`), to sharpen
    Θ's factor for the next step (:func:`_recycle_theta`); ``None`` where the configuration or
    the operator gives nothing to recycle."""
    if not isinstance(Theta, Recorded):
        return None
    Theta.pairs = krylov_pairs(precond, config)
    return Theta.pairs


def _recycle_theta(
    Theta: Any, precond: Any, pairs: KrylovPairs | None, records: list[dict[str, Any]]
) -> Any:
    """Θ's factor augmented with the step's ``(q, Θq)`` pairs (:func:`~ntkscrub.solvers.recycled`;
    every step's system ``H^½ΘH^½ + λI`` is a congruence of Θ's, so what one step's CG learnt
    about Θ carries to the next step's H), the rank recorded on the step's last solve."""
    if pairs is None:
        return precond
    Theta.pairs = None
    if pairs.columns == 0:
        return precond
    out = recycled(precond, pairs, shifted=False)
    if records:
        records[-1].update(recycled_columns=pairs.columns, recycled_rank=out.rank)
    return out


def _theta_scale(Theta: Any, precond: Any) -> float | None:
    """An estimate of λ_max(Θ_SS): the Nyström factor's top eigenvalue when there is one, the
    explicit Θ's by 30 power steps (fixed start, so a fixed seed repeats) when dense, else None."""
    if precond is not None and getattr(precond, "rank", 0):
        return float(precond.eigenvalues[0])
    if not isinstance(Theta, DenseLinearOperator):
        return None
    T = Theta.to_dense()
    v = torch.ones(T.shape[0], dtype=T.dtype, device=T.device)
    for _ in range(30):
        v = T @ v
        v = v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)
    return float(v @ (T @ v))


def _theta_sketch(
    jac: Jacobian, lam: float, config: SolverConfig, counter: MatvecCounter, label: str, given: Any
) -> tuple[Any, dict[str, Any]]:
    """Θ's Nyström factor (shift λ) for every Newton step — ``given`` or built now when the
    configuration asks for one — and its build record fields."""
    if given is not None or config.method != "cg":
        return given, {"precond_matvecs": 0, "precond_seconds": 0.0}
    sketch = Inverse(Counted(NTK(jac_a=jac, ridge=lam), counter), config, label=label)
    build = sketch.build_preconditioner()  # {} when the configuration asks for none
    keep = ("precond_matvecs", "precond_seconds")
    return sketch.preconditioner, {k: build.get(k, 0) for k in keep}


def _armijo(
    alpha: Tensor,
    q: Tensor,
    beta: Tensor,
    Tb: Tensor,
    f0: Tensor,
    onehot: Tensor,
    lam: float,
    obj: float,
    slope: float,
) -> tuple[float, Tensor, Tensor, Tensor, float]:
    """Backtracking (halving) from t = 1 until ``obj(t) ≤ obj − t·slope`` (Armijo), t ≥ 1e-10;
    returns ``(t, α, Θα, z, objective)`` at the accepted step.

    When the decrease the step promises is below the objective's rounding (``16·eps·|obj|`` in
    the logits' dtype), the test compares rounding noise: a full step that does not raise the
    objective by more than that is taken. Why: in the quadratic region the last Newton step is
    the one that brings the iterate to the working precision, and the noisy test had halved it
    to t = 5e-7 — leaving a relative error of up to 4e-9 in float64 (the stop test, on the
    decrement before the step, then ended the iteration on the untaken step)."""
    t, c = 1.0, onehot.shape[1]
    noise = 16 * torch.finfo(f0.dtype).eps * max(1.0, abs(obj))
    flat = slope <= noise
    while True:
        a_new, q_new = alpha - t * beta, q - t * Tb
        z_new = f0 + q_new.reshape(-1, c)
        obj_new = _ce_objective(z_new, onehot, a_new, q_new, lam)
        if obj_new <= obj - t * slope or (flat and obj_new <= obj + noise) or t < 1e-10:
            return t, a_new, q_new, z_new, obj_new
        t *= 0.5


def _checked_direction(
    inv: Inverse,
    label: str,
    it: int,
    r: Tensor,
    beta: Tensor,
    Theta: Any,
    tol: float,
    stop: float = 0.0,
    Tb: Tensor | None = None,
) -> tuple[Tensor, Tensor, float, str]:
    """``(β, Θβ, δ², kind)`` for the step: ``"newton"`` when δ² = rᵀΘβ > 0 (the squared Newton
    decrement gᵀ(∇²L)⁻¹g); ``"zero"`` when δ² ≤ 0 after converged solves but zero to the
    precision at hand — within ``tol·‖r‖·‖Θβ‖`` (Θβ carries the products' rounding, β the
    solve's tolerance) or ``½|δ²| ≤ stop`` (the stop test's own threshold, applied to |δ²|) —
    seen on the quick preset at w(D), float32: δ² = −2.9e-5 (cg) and −2.4e-6 (dense) at the
    minimum; else the gradient fallback (or its error). ``Tb``: Θβ when already computed."""
    Tb = Theta @ beta if Tb is None else Tb
    dec2 = _decrement(r, Tb)
    if _descends(dec2):
        return beta, Tb, dec2, "newton"
    floor = tol * float(r.double().norm()) * float(Tb.double().norm())
    solved = all(rec.get("converged", True) for rec in inv.records)
    if solved and math.isfinite(dec2) and (-dec2 <= floor or -0.5 * dec2 <= stop):
        return beta, Tb, dec2, "zero"
    beta, Tb, dec2 = _gradient_fallback(inv, label, it, dec2, r, Theta @ r)
    return beta, Tb, dec2, "gradient"


def _decrement(r: Tensor, Tb: Tensor) -> float:
    """δ² = rᵀΘβ (Θβ = ``Tb``), accumulated in float64: the squared Newton decrement."""
    return float(r.double() @ Tb.double())


def _descends(dec2: float) -> bool:
    """Whether a direction with decrement ``dec2`` descends: δ² > 0 and finite."""
    return dec2 > 0 and math.isfinite(dec2)


def _gradient_fallback(
    inv: Inverse, label: str, it: int, dec2: float, r: Tensor, Tr: Tensor
) -> tuple[Tensor, Tensor, float]:
    """``(β, Θβ, δ²)`` of the gradient direction β = r, for a Newton step whose inexact inner
    solve gave no descent direction (seen on the quick preset with the earlier Woodbury form: a
    dual solve stopped by its time budget at residual 2.8e-3 > tol made δ² = −56). ``rᵀΘr ≥ 0``
    always descends; an exactly solved system that still gives δ² ≤ 0 is a genuine error and
    raises."""
    if all(rec.get("converged", True) for rec in inv.records):
        raise ValueError(f"{label}: Newton direction is not a descent direction (δ²={dec2})")
    g2 = _decrement(r, Tr)
    if not _descends(g2):
        raise ValueError(f"{label}: neither the Newton nor the gradient direction descends")
    warn(
        f"{label}: Newton step {it}'s inner solve did not converge and its direction does not "
        f"descend (δ² = {dec2:.3g}); taking a gradient step instead. Give the solves more "
        f"budget (SolverConfig.max_seconds) or a larger ridge for Newton's fast convergence.",
        RuntimeWarning,
    )
    return r, Tr, g2


def _apply_blocks(B: Tensor, v: Tensor) -> Tensor:
    """The block-diagonal ``(c·N, c·N)`` matrix with blocks ``B`` ``(N, c, c)`` times ``v``
    ``(c·N,)`` or ``(c·N, k)``."""
    return (B.to(v.dtype) @ v.reshape(B.shape[0], B.shape[1], -1)).reshape(v.shape)


@dataclass
class MethodShift:
    """What the shift methods return (the fields :func:`ntkscrub.scrub.scrub` reads).

    Attributes:
        delta: the shift ``(p,)``.
        w_lin_r: the retain model's displacement ``(p,)`` (the trapezium rescale's leg).
        matvecs: column-products spent; records: every solve; extra: method-specific records.
    """

    delta: Tensor
    w_lin_r: Tensor
    matvecs: int
    records: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)


def ce_newton_shift(
    J_r: Jacobian,
    J_f: Jacobian,
    *,
    ridge_r: float,
    ridge_d: float,
    config: SolverConfig,
    newton: NewtonConfig | None = None,
    centre: Tensor | None = None,
    forget_entropy: float | None = None,
) -> MethodShift:
    """Δ_ce = w_ce(D_r) − w_ce(D) of the linearised cross-entropy + ridge model (issue 13).

    ``w_ce(S) = centre + J_Sᵀ α_S`` from :func:`ce_newton_fit`; ``ridge_r``/``ridge_d`` are λ for
    D_r and D (λ = N·wd each under the weight_decay convention); ``centre`` ``(p,)`` the ridge's
    centre relative to θ_lin (it cancels in Δ but moves both minimisers). With
    ``config.warm_start`` the D_r fit is offered a start that keeps the D fit's logits on D_r
    (:func:`_retain_start`, one Θ_rr solve; taken by :func:`_dual_start` when its objective is
    the lower), as the one-shot scrub starts its Θ_rr solve from the Θ_DD one. Returns ``(p,)``
    vectors; ``w_lin_r`` is w_ce(D_r).

    ``forget_entropy`` (nats, in (0, log c)): the retain model's predicted D_f logits
    z_f = f(x_f) + J_f w_ce(D_r) ``(N_f, c)`` are tempered, q_f = softmax(z_f / T), with T such
    that q_f's mean entropy is ``forget_entropy``, and the model is refitted on D with D_r's labels
    and q_f as D_f's soft targets (started at w_ce(D_r), which is that fit's minimiser at T = 1);
    Δ = w_cal − w_ce(D). Why: a retrain never saw D_f, so its confidence there is that of the
    recipe on unseen images — w(D)'s own entropy on held-out images measures it without a
    retrain — and the CE model was the more confident on D_f on every seed of the paper preset
    (mean entropy 0.43–0.82 of the retrains'; its attack readout above the band on each;
    ``benchmarks/results/cpu/calibrated_targets/``). One more Newton fit on D, warm.
    """
    counter, records = MatvecCounter(), []
    J_d = StackedJacobian(J_r, J_f)
    fit_d = ce_newton_fit(
        J_d,
        ridge=ridge_d,
        config=config,
        newton=newton,
        counter=counter,
        label="D",
        records=records,
        centre=centre,
    )
    # Θ_rr is the leading principal block of Θ_DD (retain rows first): its sketch restricts,
    # and on the dense twin Θ_rr and Θ_rf are blocks of the D fit's explicit Θ (forming them
    # again from J_r cost 31 → 45 s per CE scrub on the quick preset).
    cr, M = J_r.c * J_r.n, fit_d.precond
    shared = M.restrict(slice(0, cr), ridge_r) if config.share_precond and M is not None else None
    T = fit_d.theta.to_dense() if isinstance(fit_d.theta, DenseLinearOperator) else None
    warm = None
    if config.warm_start:
        warm, shared = _retain_start(
            J_r, J_f, fit_d.alpha, ridge_r, config, counter, records, shared, T
        )
    fit_r = ce_newton_fit(
        J_r,
        ridge=ridge_r,
        config=config,
        newton=newton,
        counter=counter,
        label="D_r",
        records=records,
        precond=shared,
        centre=centre,
        warm=warm,
        theta=None if T is None else DenseLinearOperator(T[:cr, :cr]),
    )
    w_r = Counted(J_r, counter).mT @ fit_r.alpha
    if centre is not None:
        w_r = w_r + centre.to(w_r.dtype)
    # Δ = J_rᵀ α_r − J_Dᵀ α_D = J_Dᵀ [α_r − α_D[r]; −α_D[f]]: one VJP pass over D.
    dual = torch.cat([fit_r.alpha - fit_d.alpha[:cr], -fit_d.alpha[cr:]])
    fits = [("D", fit_d), ("D_r", fit_r)]
    calibration = None
    if forget_entropy is not None:
        fit_c, calibration = _calibrated_fit(
            J_d, J_f, fit_d, fit_r, w_r, forget_entropy, ridge_r, config, newton, counter,
            records, centre,
        )  # fmt: skip
        fits.append(("D calibrated", fit_c))
        dual = fit_c.alpha - fit_d.alpha  # Δ = w_cal − w_ce(D) = J_Dᵀ(α_cal − α_D)
        w_r = Counted(J_d, counter).mT @ fit_c.alpha
        if centre is not None:
            w_r = w_r + centre.to(w_r.dtype)
    delta = Counted(J_d, counter).mT @ dual
    extra = {
        "newton": {
            name: {
                "iterations": fit.iterations,
                "converged": fit.converged,
                "objective": fit.objective,
                "start": fit.start,
                "history": fit.history,
            }
            for name, fit in fits
        },
        "newton_config": (newton or NewtonConfig()).to_dict(),
        "converged": all(fit.converged for _, fit in fits),
        **({"calibration": calibration} if calibration is not None else {}),
    }
    return MethodShift(delta, w_r, counter.count, records, extra)


def mean_entropy(logits: Tensor) -> float:
    """Mean over rows of the entropy (nats) of ``softmax(logits)``, ``logits`` ``(N, c)``."""
    logp = torch.log_softmax(logits.double(), dim=1)
    return float(-(logp.exp() * logp).sum(1).mean())


def entropy_temperature(logits: Tensor, entropy: float) -> float:
    """The temperature T > 0 at which ``softmax(logits / T)`` has mean entropy ``entropy``
    (nats), by bisection in log T (the mean entropy rises monotonically with T, from the
    argmax's at T → 0 to log c at T → ∞); ``logits`` ``(N, c)``. ValueError naming
    ``forget_entropy`` when the value is outside what any T reaches."""
    c = logits.shape[1]
    lo, hi = 1e-3, 1e3
    h_lo, h_hi = mean_entropy(logits / lo), mean_entropy(logits / hi)
    if not (h_lo < entropy < h_hi):
        raise ValueError(
            f"forget_entropy: {entropy:.4g} nats is outside what tempering D_f's predicted "
            f"outputs reaches ({h_lo:.3g}, {h_hi:.3g}); the mean entropy of a {c}-class "
            f"softmax lies in [0, log {c} = {math.log(c):.3g}]"
        )
    for _ in range(60):  # the bracket's ratio 1e6 → within 1e-6 relative
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if mean_entropy(logits / mid) < entropy else (lo, mid)
    return math.sqrt(lo * hi)


def _calibrated_fit(
    J_d: Jacobian,
    J_f: Jacobian,
    fit_d: CEModel,
    fit_r: CEModel,
    w_r: Tensor,
    entropy: float,
    ridge_r: float,
    config: SolverConfig,
    newton: NewtonConfig | None,
    counter: MatvecCounter,
    records: list[dict[str, Any]],
    centre: Tensor | None,
) -> tuple[CEModel, dict[str, Any]]:
    """:func:`ce_newton_shift`'s ``forget_entropy`` refit: D_r's labels and the tempered
    predictions q_f on D_f as targets, with the retain ridge λ_r, on Θ_DD with the D fit's Θ and
    sketch, started at ``[α_r; 0]`` (w_ce(D_r), its minimiser at T = 1). Returns the fit and its
    record."""
    z_f = J_f.outputs() + (Counted(J_f, counter) @ w_r.to(J_f.dtype)).reshape(J_f.n, J_f.c)
    T = entropy_temperature(z_f, entropy)
    q_f = torch.softmax(z_f.double() / T, dim=1).to(J_f.dtype)
    cr = fit_r.alpha.numel()
    targets = torch.cat([_fit_targets(J_d, None)[: cr // J_d.c].to(q_f.dtype), q_f])
    # λ_r, not λ_D: with it w_ce(D_r) is the exact minimiser at T = 1 (the D_f rows' gradient
    # J_fᵀ(π_f − q_f) vanishes there), so the refit changes only what the tempering asks for.
    M = fit_d.precond
    fit = ce_newton_fit(
        J_d, ridge=ridge_r, config=config, newton=newton, counter=counter,
        label="D calibrated", records=records, centre=centre,
        precond=None if M is None else M.restrict(slice(None), ridge_r),
        warm=torch.cat([fit_r.alpha, torch.zeros_like(fit_d.alpha[cr:])]),
        theta=fit_d.theta, targets=targets,
    )  # fmt: skip
    record = {
        "target_entropy": float(entropy),
        "temperature": T,
        "predicted_entropy": mean_entropy(z_f),
        "fitted_entropy": mean_entropy(fit.outputs[cr // J_d.c :]),
    }
    logger.info(
        "CE Newton calibration: T = %.3g, D_f entropy predicted %.3g, target %.3g, fitted %.3g",
        T, record["predicted_entropy"], entropy, record["fitted_entropy"],
    )  # fmt: skip
    return fit, record


def _retain_start(
    J_r: Jacobian,
    J_f: Jacobian,
    alpha_d: Tensor,
    ridge: float,
    config: SolverConfig,
    counter: MatvecCounter,
    records: list[dict[str, Any]],
    precond: Any,
    theta_dd: Tensor | None = None,
) -> tuple[Tensor, Any]:
    """A start for the D_r fit that keeps the D fit's logits on D_r:
    ``α = α_D[r] + (Θ_rr + λI)⁻¹ Θ_rf α_D[f]`` ``(c·N_r,)`` — one Θ_rf product and one solve
    (to 1e-2 or ``tol``, the looser: it is a start), recorded in ``records``. Returns it with the
    Θ_rr + λI factor the solve used (``precond``, or the one it built), which the D_r fit reuses.

    Why not ``α_D[r]`` alone: the D_r linear logits are ``f + Θ_rr α``, and dropping the forget
    rows moves them by ``−Θ_rf α_D[f]`` — on the quick preset at w(D) that start's objective was
    above α = 0's (Θ's top eigenvalues ~1e5 turn a small change of α into a large one of the
    logits). With the correction the logits on D_r are the D fit's up to ``λ(Θ_rr + λI)⁻¹Θ_rf α_f``,
    and near the D_r minimiser when D_f is a small part of D.

    ``theta_dd``: the explicit Θ_DD ``(c·N, c·N)`` (dense twin), whose blocks give Θ_rf and
    Θ_rr + λI without another Jacobian product."""
    cr = J_r.c * J_r.n
    if theta_dd is None:
        b = Counted(J_r, counter) @ (Counted(J_f, counter).mT @ alpha_d[cr:])  # Θ_rf α_f
        A = Counted(NTK(jac_a=J_r, ridge=ridge), counter)
    else:
        b = theta_dd[:cr, cr:] @ alpha_d[cr:].to(theta_dd.dtype)
        eye = torch.eye(cr, dtype=theta_dd.dtype, device=theta_dd.device)
        A = DenseLinearOperator(theta_dd[:cr, :cr] + ridge * eye)
    cfg = config.replace(tol=max(config.tol_for(b.dtype), 1e-2))
    inv = Inverse(A, cfg, label="CE D_r start", precond=precond)
    x = inv.solve(b)
    records.extend(inv.records)
    return alpha_d[:cr] + x, inv.preconditioner


def retain_change(
    J_r: Jacobian,
    J_f: Jacobian,
    x_r: Tensor,
    x_f: Tensor,
    *,
    ridge_r: float,
    ridge_d: float,
    config: SolverConfig,
    counter: MatvecCounter,
    precond: Any = None,
    x0: Tensor | None = None,
    e_norm: float | None = None,
) -> tuple[Tensor, Tensor, list[dict[str, Any]], Inverse]:
    """Δ = J_rᵀ y − J_fᵀ x_f ``(p,)`` with ``(Θ_rr + λ_r I) y = Θ_rf x_f + (λ_D − λ_r) x_r``,
    given ``x = [x_r; x_f] = (Θ_DD + λ_D I)⁻¹ e_D`` — the change of the dual solution when D_f
    leaves (the rows of the D system give ``(Θ_rr + λ_r I)(x_D[r] + y) = e_r``). Returns Δ, y
    ``(c·N_r,)``, the solve records (the last one carries ``cancellation`` = ρ and
    ``rhs_ratio``) and the :class:`Inverse` of Θ_rr + λ_r I it solved with (for another
    right-hand side: its preconditioner, or its Cholesky factor on the dense twin, is reused).
    ``e_norm``: ‖e_r‖, the right-hand side of the retain system.

    Why y and not ``x_r = (Θ_rr + λ_r I)⁻¹ e_r``, then ``J_rᵀ x_r − J_Dᵀ x_D``: Δ is a difference
    of two weight vectors ρ = ‖J_fᵀ x_f‖/‖Δ‖ times its size, so x_r and x_D each solved to tol
    left Δ ≈ ρ·tol off. Along y the D solve's error is damped (Δ = −P J_fᵀ x_f with
    P = I − J_rᵀ(Θ_rr + λ_r I)⁻¹J_r, ‖P‖ ≤ 1); y's own error is not, so y is solved once more,
    warm (:func:`cancellation_solve`), to tol / (max(1, ρ) · max(1, ‖b‖/‖e_r‖)): the second
    factor keeps x_D[r] + y at least as accurate as a direct x_r solve where a small ridge
    makes b ≫ e_r. Measured, float64 against the dense twin at tol 1e-3 (old form → this one):
    MLP of ``benchmarks/test_bench_scrubber.py`` with CE residuals, N = 256 / 1024: 2.0e-2 /
    3.5e-2 → 1.8e-3 / 1.9e-3 (42 → 50 products); with MSE, ridge 1: 2.1e-2 / 1.4e-2 → 5.3e-3 /
    1.9e-3; the torchvision ResNet of ``tests/test_resnet_e2e.py``: 6.5e-4 → 1.3e-4 (61 → 72)."""
    g = Counted(J_f, counter).mT @ x_f  # (p,)
    b = Counted(J_r, counter) @ g  # Θ_rf x_f
    if ridge_r != ridge_d:
        b = b + (ridge_d - ridge_r) * x_r
    inv = Inverse(
        Counted(NTK(jac_a=J_r, ridge=ridge_r), counter), config, label="Θ_rr", precond=precond
    )
    y = inv.solve(b, x0=x0)
    delta = Counted(J_r, counter).mT @ y - g
    records = list(inv.records)
    rho, big, amp = cancellation_amplification(
        float(g.norm()), float(delta.norm()), float(b.norm()), e_norm
    )
    if config.method == "cg" and amp > 1.0:
        y, rec = cancellation_solve(inv, b, y, amp)
        delta = Counted(J_r, counter).mT @ y - g
        records.append(rec)
    records[-1].update(cancellation=rho, rhs_ratio=big)
    return delta, y, records, inv


def cancellation_amplification(
    g_norm: float, delta_norm: float, b_norm: float, e_norm: float | None
) -> tuple[float, float, float]:
    """How much Δ = J_rᵀy − g amplifies y's relative error (:func:`retain_change`): returns
    ``(ρ, r, amp)`` with ρ = ‖g‖/‖Δ‖ (the cancellation), r = ‖b‖/‖e_r‖ (the right-hand side
    against the retain system's own; 1 without ``e_norm``) and amp = max(1, ρ)·max(1, r)."""
    rho = g_norm / max(delta_norm, 1e-300)
    big = 1.0 if e_norm is None else b_norm / max(e_norm, 1e-300)
    return rho, big, max(1.0, rho) * max(1.0, big)


def cancellation_floor(dtype: torch.dtype) -> float:
    """The tightest tolerance a cancellation re-solve asks of ``dtype``: 1e-13 in float64, 1e-6
    below (float32 CG stalls near 1e-5–1e-6: its products carry ~1e-7 relative error); below it
    the iterate reached is kept."""
    return 1e-13 if dtype == torch.float64 else 1e-6


def cancellation_solve(
    inv: Inverse, b: Tensor, y: Tensor, amp: float
) -> tuple[Tensor, dict[str, Any]]:
    """y solved once more, warm from ``y``, to tol/amp (amp: how much Δ amplifies y's error,
    :func:`retain_change`) on the same counted operator and preconditioner; returns it and its
    record (``converged``: the configuration's tol is met — tol/amp is best effort below
    :func:`cancellation_floor`)."""
    tol = inv.config.tol_for(b.dtype)
    # recycle=0: this inverse and its factor end with the call (nothing would use the pairs).
    tight = Inverse(
        inv.A,
        inv.config.replace(tol=max(tol / amp, cancellation_floor(b.dtype)), recycle=0),
        label=f"{inv.label} (tol / cancellation)",
        precond=inv.preconditioner,
    )
    try:
        y = tight.solve(b, x0=y)
    except SolveNotConverged as err:  # the dtype's floor: keep what it reached
        y = err.partial
    rec = tight.records[-1]
    rec["converged"] = max(rec.get("residuals") or [0.0]) <= tol
    return y, rec


def projected_shift(
    J_r: Jacobian,
    J_f: Jacobian,
    displacement: Tensor,
    e_r: Tensor,
    *,
    ridge: float,
    config: SolverConfig,
) -> MethodShift:
    """Δ′ = −P J_fᵀ (J_f P J_fᵀ + λI)⁻¹ J_f P v, ``v = w(D) − θ0`` ``(p,)`` (issue 13).

    Computed as two single-column solves, the shape of eq. 10's one-shot step::

        Δ′ = J_rᵀ(Θ_rr + λI)⁻¹J_r v − J_Dᵀ(Θ_DD + λI)⁻¹J_D v = (P_D − P_r) v,

    i.e. the one-shot shift with the linearised outputs of the true displacement, ``J v``, as
    residuals. Why it is the same vector: ``J_f P J_fᵀ + λI`` is the Schur complement S of
    ``Θ_DD + λI`` in its forget block, so ``y = (Θ_DD + λI)⁻¹J_D v`` has ``y_f = S⁻¹J_f P v``
    and ``y_r = (Θ_rr + λI)⁻¹(J_r v − Θ_rf y_f)``; then ``J_Dᵀy − J_rᵀ(Θ_rr + λI)⁻¹J_r v =
    P J_fᵀ y_f``. The earlier block form — a solve with ``c·N_f + 2`` right-hand sides and a
    dense Schur complement — cost ``c·N_f/2`` times as many products (quick preset: 127
    columns per CG iteration, > 17 min on a 2-core CPU); the dense twin
    (``SolverConfig.method="dense"``) runs the same two solves by Cholesky and
    tests/test_shifts.py checks both against the explicit formula.

    With λ = 0 and J_D of full row rank, Δ′ = −Q v with Q the orthogonal projection onto the
    range of P J_fᵀ (the row space of J_D orthogonal to that of J_r); on a model linear in its
    parameters whose w(D) is the minimum-norm interpolant of D from θ0, w(D) + Δ′ is the
    minimum-norm interpolant of D_r from θ0 (tests/test_shifts.py).

    ``e_r`` ``(c·N_r,)``: the retain residuals, for ``w_lin(D_r) = J_rᵀ(Θ_rr + λI)⁻¹e_r`` (the
    trapezium rescale's leg; its own Θ_rr solve). Δ′ is the retain model's change
    (:func:`retain_change`, solved to tol over its cancellation); ``extra["cancellation"]`` =
    ρ = ``‖J_fᵀ y_f‖ / ‖Δ′‖``.
    """
    if displacement.shape != (J_r.p,):
        raise ValueError(
            f"displacement: expected shape ({J_r.p},), got {tuple(displacement.shape)}"
        )
    counter = MatvecCounter()
    lam = float(ridge)
    cr = J_r.c * J_r.n
    J_d = StackedJacobian(J_r, J_f)
    v = displacement.to(J_r.dtype)
    Jv = Counted(J_d, counter) @ v  # (c·N_D,): J_r v then J_f v
    inv_d = Inverse(Counted(NTK(jac_a=J_d, ridge=lam), counter), config, label="Θ_DD")
    y = inv_d.solve(Jv)
    # Θ_rr is Θ_DD's leading principal block: its sketch restricts (as in scrub._shift_solves).
    M = inv_d.preconditioner
    shared = M.restrict(slice(0, cr), lam) if (config.share_precond and M is not None) else None
    delta, _, records, inv_r = retain_change(
        J_r, J_f, y[:cr], y[cr:], ridge_r=lam, ridge_d=lam, config=config, counter=counter,
        precond=shared, e_norm=float(Jv[:cr].norm()),
    )  # fmt: skip
    extra = {"cancellation": records[-1]["cancellation"]}
    # the same Θ_rr + λI (its factor: on the dense twin a second Inverse formed Θ_rr again)
    w_lin_r = Counted(J_r, counter).mT @ inv_r.solve(e_r.to(Jv.dtype))
    leg = inv_r.records[-1]
    leg.update({k: "Θ_rr (e_r)" for k in ("system", "label") if k in leg})
    return MethodShift(delta, w_lin_r, counter.count, inv_d.records + records + [leg], extra)
