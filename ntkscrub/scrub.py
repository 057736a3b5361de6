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

``solver="dense"`` forms J and Θ explicitly (the reference; small problems); ``solver="cg"`` never
forms them (preconditioned CG on the lazy NTK). Both give the same shift.
"""

from __future__ import annotations

import contextlib
import copy
import resource
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ntkscrub._validation import check_choice, check_number
from ntkscrub.batches import subset_indices
from ntkscrub.noise import (  # noqa: F401 - re-exported: part of this module's API
    add_fisher_noise,
    diagonal_fisher,
    fisher_noise_variance,
)
from ntkscrub.operators.jacobian import Jacobian, StackedJacobian
from ntkscrub.operators.ntk import NTK
from ntkscrub.params import ParameterSpace, check_eval_mode

__all__ = [
    "ScrubResult",
    "DenseTooLarge",
    "scrub",
    "ntk_shift",
    "trapezium_scale",
    "fisher_noise_variance",
    "diagonal_fisher",
    "load_weights",
]

_OPTIONS = {
    "form",
    "params",
    "batch_size",
    "precond",
    "precond_rank",
    "strict",
    "weight_decay",
    "warm_start",
    "fisher_options",
    "max_dense_bytes",
    "autocast",
    "seed_precond",
    "vector_chunk",
    "allow_tf32",
    "share_precond",
}


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


class DenseTooLarge(MemoryError):
    """The dense path would need more memory than allowed (``max_dense_bytes``)."""


@dataclass
class ScrubResult:
    """What :func:`scrub` returns.

    Attributes:
        model: a new module holding the scrubbed weights (with noise when ``noise > 0``).
        shift: the deterministic shift ``s·Δ`` ``(p,)`` in ``model.named_parameters()`` order over
            the linearised parameters — after rescaling, before noise.
        info: solver iterations and residuals, matvecs, seconds, peak memory, rescale factor, ...
    """

    model: nn.Module
    shift: Tensor
    info: dict = field(default_factory=dict)


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


class _Solver:
    """Solves (Θ_SS + λI) X = B by PCG or densely, and keeps the records of every solve."""

    def __init__(
        self,
        kind: str,
        *,
        tol: float,
        max_iter: int | None,
        precond: str | None,
        precond_rank: int | None,
        strict: bool,
        seed: int | None,
        max_dense_bytes: float,
    ) -> None:
        self.kind, self.tol, self.max_iter = kind, tol, max_iter
        self.precond, self.precond_rank, self.strict, self.seed = (
            precond,
            precond_rank,
            strict,
            seed,
        )
        self.max_dense_bytes = max_dense_bytes
        self.records: list[dict] = []
        self._dense_J: dict[int, Tensor] = {}
        self.last_precond: Any = None  # the preconditioner of the latest CG solve (or None)

    def dense_jacobian(self, jac: Jacobian) -> Tensor:
        """The explicit ``(c·N, p)`` Jacobian, cached; a stacked J_D is allocated once and its
        parts are views of it, so J_r and J_f are never held twice."""
        key = id(jac)
        if key in self._dense_J:
            return self._dense_J[key]
        parts = jac.parts if isinstance(jac, StackedJacobian) else (jac,)
        if any(id(j) in self._dense_J for j in parts) and len(parts) > 1:
            self._dense_J[key] = torch.cat([self.dense_jacobian(j) for j in parts])
            return self._dense_J[key]
        need = jac.c * jac.n * jac.p * torch.finfo(jac.dtype).bits / 8
        if need > self.max_dense_bytes:
            raise DenseTooLarge(
                f"solver='dense': the explicit Jacobian of '{jac.name}' needs "
                f"{need / 2**20:,.1f} MiB (c·N·p = {jac.c}·{jac.n}·{jac.p}), over "
                f"max_dense_bytes = {self.max_dense_bytes / 2**20:,.1f} MiB; use solver='cg'"
            )
        full = torch.empty(jac.c * jac.n, jac.p, dtype=jac.dtype, device=jac.device)
        row = 0
        for j in parts:
            rows = j.c * j.n
            view = full[row : row + rows]
            for r0, r1, block in j.dense_rows():
                view[r0:r1] = block
            self._dense_J[id(j)] = view
            row += rows
        self._dense_J[key] = full
        return full

    def solve(
        self,
        K: NTK,
        B: Tensor,
        label: str,
        x0: Tensor | None = None,
        precond_from: tuple[Any, slice] | None = None,
    ) -> Tensor:
        """``precond_from = (M, rows)``: precondition with ``M.restrict(rows, K.ridge)`` (K is the
        principal submatrix ``rows`` of the system M was built for) instead of a new build."""
        t0 = time.perf_counter()
        if self.kind == "dense":
            J = self.dense_jacobian(K.jac_a)
            A = J @ J.T + K.ridge * torch.eye(J.shape[0], dtype=J.dtype, device=J.device)
            L, info = torch.linalg.cholesky_ex(A)
            Bm = B.unsqueeze(1) if B.dim() == 1 else B
            X = (
                torch.cholesky_solve(Bm, L)
                if int(info) == 0
                else torch.linalg.lstsq(A, Bm).solution
            )
            X = X.squeeze(1) if B.dim() == 1 else X
            rel = (A @ X.reshape(A.shape[0], -1) - B.reshape(A.shape[0], -1)).norm(
                dim=0
            ) / B.reshape(A.shape[0], -1).norm(dim=0).clamp_min(1e-300)
            self.records.append(
                {
                    "system": label,
                    "solver": "dense",
                    "size": A.shape[0],
                    "rhs": Bm.shape[1],
                    "max_residual": float(rel.max()),
                    "seconds": time.perf_counter() - t0,
                }
            )
            return X
        from ntkscrub.solvers import NystromPreconditioner, cg

        n = K.shape[0]
        M = None
        build: dict[str, Any] = {}
        # Default rank: none below 2000 rows (measured on CPU: building it costs more matvecs
        # than it saves on small systems, benchmarks/README.md), else 50.
        rank = self.precond_rank if self.precond_rank is not None else (0 if n < 2000 else 50)
        if precond_from is not None and precond_from[0] is not None:
            M = precond_from[0].restrict(precond_from[1], K.ridge)
            build = {
                "precond": "nystrom (restricted from the previous system)",
                "precond_rank": M.rank,
                "precond_matvecs": 0,
                "precond_seconds": time.perf_counter() - t0,
            }
        elif self.precond == "nystrom" and rank > 0:
            before = K.matvecs
            M = NystromPreconditioner(
                K,
                n,
                rank,
                shift=K.ridge,
                includes_shift=True,
                seed=self.seed,
                dtype=B.dtype,
                device=B.device,
            )
            build = {
                "precond": "nystrom",
                "precond_rank": rank,
                "precond_matvecs": K.matvecs - before,
                "precond_seconds": M.seconds,
            }
        self.last_precond = M
        X, info = cg(
            K, B, precond=M, x0=x0, tol=self.tol, max_iter=self.max_iter, strict=self.strict
        )
        rec = {"system": label, "solver": "cg", "size": n, **build, **info.to_dict()}
        rec["seconds_total"] = time.perf_counter() - t0
        self.records.append(rec)
        return X


# --------------------------------------------------------------------------- the shift
def ntk_shift(
    J_r: Jacobian,
    J_f: Jacobian,
    e_r: Tensor,
    e_f: Tensor,
    *,
    ridge_r: float,
    ridge_d: float,
    form: str,
    solver: _Solver,
    warm_start: bool = True,
    share_precond: bool = True,
) -> tuple[Tensor, Tensor, int]:
    """Δ = w_lin(D_r) − w_lin(D) and w_lin(D_r), both ``(p,)``; also the matvec count.

    ``ridge_r``/``ridge_d`` are the λ of the Θ_rr and Θ_DD systems (equal except under the
    ``weight_decay`` convention, where λ = N·wd for each set). ``form`` is ``"solves"`` or
    ``"block"`` (the latter needs ``ridge_r == ridge_d``).
    """
    counter: list = [0]
    K_rr = NTK(J_r.theta, jac_a=J_r, ridge=ridge_r, counter=counter)
    cr = e_r.shape[0]
    if form == "solves":
        J_d = StackedJacobian(J_r, J_f)
        K_dd = NTK(J_r.theta, jac_a=J_d, ridge=ridge_d, counter=counter)
        x_d = solver.solve(K_dd, torch.cat([e_r, e_f]), "D")  # (c·N_D,)
        # Θ_rr is the leading principal submatrix of Θ_DD: its preconditioner comes for free
        shared = (solver.last_precond, slice(0, cr)) if share_precond else None
        x_r = solver.solve(
            K_rr, e_r, "r", x0=x_d[:cr].clone() if warm_start else None, precond_from=shared
        )
        # Δ = J_rᵀ x_r − J_Dᵀ x_D = J_rᵀ (x_r − x_D[r]) − J_fᵀ x_D[f]
        delta = J_d.rmatvec(torch.cat([x_r - x_d[:cr], -x_d[cr:]]))
        w_lin_r = J_r.rmatvec(x_r)
        counter[0] += 2  # the two VJP passes above
        return delta, w_lin_r, counter[0]
    if form != "block":
        raise ValueError(f"form: expected 'solves' or 'block', got {form!r}")
    if ridge_r != ridge_d:
        raise ValueError(
            "form: 'block' needs one ridge for Θ_rr and Θ_DD; the weight_decay "
            "convention gives them different ridges — use form='solves'"
        )
    lam = ridge_r
    cf = e_f.shape[0]
    if solver.kind == "dense":
        Jr, Jf = solver.dense_jacobian(J_r), solver.dense_jacobian(J_f)
        Theta_rf = Jr @ Jf.T
        Theta_ff = Jf @ Jf.T
    else:
        eye_f = torch.eye(cf, dtype=e_f.dtype, device=e_f.device)
        Theta_rf = J_r.matvec(J_f.rmatvec(eye_f))  # (c·N_r, c·N_f)
        Theta_ff = J_f.matvec(J_f.rmatvec(eye_f))  # (c·N_f, c·N_f)
        counter[0] += 2 * cf
    Theta_ff = 0.5 * (Theta_ff + Theta_ff.T)
    Z = solver.solve(K_rr, torch.cat([Theta_rf, e_r.unsqueeze(1)], 1), "r|rf")
    Z_rf, z_r = Z[:, :cf], Z[:, cf]
    S = Theta_ff + lam * torch.eye(cf, dtype=e_f.dtype, device=e_f.device) - Theta_rf.T @ Z_rf
    S = 0.5 * (S + S.T)
    v = e_f - Theta_rf.T @ z_r  # residual of the forget targets under the retain-only model
    g = J_f.rmatvec(torch.linalg.solve(S, v))  # J_fᵀ M v
    # P g = g − J_rᵀ (Θ_rr + λI)⁻¹ J_r g
    delta = -(g - J_r.rmatvec(solver.solve(K_rr, J_r.matvec(g), "P")))
    w_lin_r = J_r.rmatvec(z_r)
    counter[0] += 4
    return delta, w_lin_r, counter[0]


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


# --------------------------------------------------------------------------- public API
def scrub(
    model: nn.Module,
    retain: Any,
    forget: Any,
    *,
    init: nn.Module | Mapping[str, Tensor],
    linearize_at: str = "init",
    loss: str = "mse",
    ridge: float = 0.0,
    solver: str = "cg",
    rescale: str | None = None,
    noise: float = 0.0,
    seed: int | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    **options: Any,
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
        solver: ``"cg"`` (matrix-free PCG) or ``"dense"`` (explicit J and Θ; the reference).
        rescale: ``None`` or ``"trapezium"`` (the reference code's heuristic, REFERENCE.md §2).
        noise: α ≥ 0: adds ``n ~ N(0, α F⁻¹)``, F the diagonal Fisher on D_r at the shifted
            weights, with the reference code's clamps (``fisher_options`` overrides them, see
            :func:`fisher_noise_variance`).
        seed: seeds the noise and the preconditioner's sketch; the same seed gives the same result.
        tol: per-column relative residual of CG (default 1e-10 in float64, 1e-3 in float32 —
            what float32 products deliver; see the comment in the code).
        max_iter: CG iteration cap (default: the CG default).

    Options:
        form: ``"solves"`` (default; two single-rhs solves) or ``"block"`` (eq. 10's block form).
        weight_decay: the reference code's convention: a mean loss with weight decay wd toward θ0
            equals a ridge λ = N·wd for each system (N = |D| for Θ_DD, |D_r| for Θ_rr); replaces
            ``ridge``.
        params: which parameters are linearised (see :class:`~ntkscrub.params.ParameterSpace`).
        batch_size: samples per JVP/VJP batch (256).
        precond: ``"nystrom"`` (default) or ``None``; precond_rank: its rank (default 0 — none —
            for systems under 2000 rows, else 50);
            strict: raise if CG does not converge (default True);
        warm_start: start the D_r solve from the D solution (default True);
        share_precond: precondition the D_r solve with the D system's Nyström factor restricted
            to the retain rows (default True: no second build; see
            :meth:`~ntkscrub.solvers.LowRankPreconditioner.restrict`);
        max_dense_bytes: the dense path refuses explicit Jacobians larger than this (4 GiB).
        autocast: a ``torch.autocast`` dtype for the Jacobian products (experimental, see
            :class:`~ntkscrub.operators.Jacobian`); vector_chunk: vectors per vmap (32).
        allow_tf32: keep PyTorch's TF32 convolutions/matmuls during the solves (default False:
            TF32 stalls CG near 3e-2, see :func:`full_fp32_precision`).

    Returns:
        :class:`ScrubResult` with ``.model``, ``.shift`` ``(p,)`` and ``.info``.
    """
    t_start = time.perf_counter()
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"options: unknown keyword arguments {sorted(unknown)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_eval_mode(model, "model")
    check_choice(linearize_at, "linearize_at", ("init", "trained"))
    check_choice(loss, "loss", ("mse", "ce"))
    check_choice(solver, "solver", ("cg", "dense"))
    check_choice(rescale, "rescale", (None, "trapezium"))
    form = check_choice(options.get("form", "solves"), "form", ("solves", "block"))
    ridge = check_number(ridge, "ridge")
    noise = check_number(noise, "noise")
    weight_decay = options.get("weight_decay")
    if weight_decay is not None:
        weight_decay = check_number(weight_decay, "weight_decay")
        if ridge != 0.0:
            raise ValueError("weight_decay: give either ridge or weight_decay, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
    precond = check_choice(options.get("precond", "nystrom"), "precond", ("nystrom", None))
    if tol is not None:
        tol = check_number(tol, "tol", positive=True)
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"max_iter: expected a positive integer, got {max_iter!r}")
    batch_size = options.get("batch_size", 256)

    # Overlap between retain and forget is only detectable for index-based subsets of one set.
    sr, sf = subset_indices(retain), subset_indices(forget)
    if sr is not None and sf is not None and sr[0] == sf[0]:
        both = sorted(set(sr[1]) & set(sf[1]))
        if both:
            raise ValueError(
                f"forget: {len(both)} sample(s) are also in retain, e.g. indices {both[:10]}"
            )

    space_w = ParameterSpace(model, options.get("params"))
    space_w.check_compatible(
        init if isinstance(init, Mapping) else _module_params(init, "init"), "init"
    )
    init_model = load_weights(model, init, "init")
    w_d = space_w.point()
    theta0 = space_w.point(init_model)
    if not bool(torch.isfinite(theta0).all()):
        raise ValueError("init: parameters contain NaN or infinite values")

    lin_model = init_model if linearize_at == "init" else model
    space = ParameterSpace(lin_model, space_w.names)
    autocast = options.get("autocast")
    jkw = {
        "batch_size": batch_size,
        "autocast": autocast,
        "vector_chunk": options.get("vector_chunk", 32),
    }
    J_r = Jacobian(space, retain, name="retain", **jkw)
    J_f = Jacobian(space, forget, at=J_r.theta, name="forget", **jkw)
    e_r, e_f = _targets(J_r, loss), _targets(J_f, loss)
    if weight_decay is not None:
        ridge_r, ridge_d = J_r.n * weight_decay, (J_r.n + J_f.n) * weight_decay
    else:
        ridge_r = ridge_d = ridge
    if tol is None:
        # float32: Θ products carry a relative error of 2e-4–4e-4 against float64, and a solve
        # told to reach 1e-4 ends at a true residual of 4e-4–2e-3 (H200,
        # benchmarks/results/gpu-h200/suite) — 1e-3 is what float32 honestly delivers. It moves
        # the shift by ≈ 0.3 % and the D_f outputs by < 1 % of the scrub's own step, for ≈ 20 %
        # fewer matvecs than 1e-4 (float64 study, benchmarks/results/cpu/tol_study.json).
        tol = 1e-10 if space.dtype == torch.float64 else 1e-3
    if space.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(space.device)
    slv = _Solver(
        solver,
        tol=tol,
        max_iter=max_iter,
        precond=precond,
        precond_rank=options.get("precond_rank"),
        strict=options.get("strict", True),
        seed=seed if seed is not None else options.get("seed_precond", 0),
        max_dense_bytes=float(options.get("max_dense_bytes", 4 * 2**30)),
    )
    with full_fp32_precision(not options.get("allow_tf32", False)):
        delta, w_lin_r, matvecs = ntk_shift(
            J_r,
            J_f,
            e_r,
            e_f,
            ridge_r=ridge_r,
            ridge_d=ridge_d,
            form=form,
            solver=slv,
            warm_start=options.get("warm_start", True),
            share_precond=options.get("share_precond", True),
        )
    scale, cos = 1.0, None
    if rescale == "trapezium":
        scale, cos = trapezium_scale(delta, w_d, theta0, w_lin_r)
    shift = scale * delta

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
            **dict(options.get("fisher_options") or {}),
        )
    out.eval()

    info: dict[str, Any] = {
        "linearize_at": linearize_at,
        "loss": loss,
        "solver": solver,
        "form": form,
        "ridge_r": ridge_r,
        "ridge_d": ridge_d,
        "weight_decay": weight_decay,
        "tol": tol,
        "n_retain": J_r.n,
        "n_forget": J_f.n,
        "num_classes": J_r.c,
        "p": space.p,
        "dtype": str(space.dtype),
        "device": str(space.device),
        "matvecs": matvecs,
        "solves": slv.records,
        "rescale": rescale,
        "rescale_factor": scale,
        "rescale_cos": cos,
        "shift_norm": float(shift.norm()),
        "delta_norm": float(delta.norm()),
        "noise": noise_info,
        "seconds": time.perf_counter() - t_start,
        "peak_memory_mib": _peak_memory(space.device),
        "peak_memory_kind": "cuda_max_allocated"
        if space.device.type == "cuda"
        else "process_max_rss",
    }
    return ScrubResult(model=out, shift=shift.detach(), info=info)


def _module_params(m: Any, name: str) -> dict[str, Tensor]:
    if not isinstance(m, nn.Module):
        raise TypeError(f"{name}: expected a module or a state_dict, got {type(m).__name__}")
    return dict(m.named_parameters())
