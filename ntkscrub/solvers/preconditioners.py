"""Low-rank preconditioners for ``(K + μI) x = b`` built from a few block matvecs with ``K``.

Both preconditioners here build a rank-r approximation ``K ≈ Û Λ̂ Ûᵀ`` (Û orthonormal, (n, r)) of the
PSD part K of the system and apply the inverse of the Frangella–Tropp–Udell preconditioner
(Frangella, Tropp, Udell, "Randomized Nyström preconditioning", SIMAX 2023, arXiv 2110.02820)

    P⁻¹ = (λ̂_r + μ) Û (Λ̂ + μI)⁻¹ Ûᵀ + (I − ÛÛᵀ),

where λ̂_r is the smallest retained eigenvalue and μ ≥ 0 is the shift (the ridge λ of the system
actually being solved). In the span of Û the system's top eigenvalues λ̂_i + μ are mapped to
λ̂_r + μ; outside it P⁻¹ is the identity, so the preconditioned condition number is about
(λ̂_r + μ)/μ plus the error of the low-rank approximation — good when the spectrum decays fast, as
the NTK's does.

Measured: n = 300 test matrix (50 eigenvalues over 4 decades, tail ≤ 3e-3, μ = 1e-3), tol 1e-8:
plain CG 399 iterations, Nyström rank 50: 30, RPCholesky rank 50: 31. n = 500,000
power-law spectrum 1e3/i², μ = 1e-3, float32 operator on an H200, tol 1e-4: plain CG did not get
there in 883 iterations (float32 floor ≈ 3e-4), Nyström rank 100: 67 iterations, rank 400: 18;
building took 1.6 s / 5.2 s (float64 QR, Cholesky and SVD of n × rank), about one NTK matvec.

Shift convention (the ``includes_shift`` argument):

* ``includes_shift=False`` (default): the operator passed in is the PSD part K itself and the system
  being preconditioned is ``(K + shift·I) x = b``. ``eigenvalues`` approximate the top eigenvalues
  of K.
* ``includes_shift=True``: the operator passed in already *is* the system matrix ``A = K + shift·I``
  (e.g. Θ + λI). The sketch of K is recovered exactly and for free as ``A Ω − shift·Ω``, so the
  factorisation and ``eigenvalues`` again refer to K = A − shift·I, and P⁻¹ is the same matrix as in
  the first convention. (Passing A = K + λI with ``shift=0`` also works — Λ̂ then approximates the
  eigenvalues of A and μ = 0 — and did about as well in a test: 628 vs 630 iterations at rank 50.)

In both conventions ``solve(R)`` applies P⁻¹ ≈ (K + shift·I)⁻¹ up to scale, to be passed to
:func:`~ntkscrub.solvers.cg` as ``precond``. Factorisations are computed in float64; ``solve`` works
in the dtype and device of its input.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from ntkscrub._progress import logger, progress_bar
from ntkscrub._validation import check_choice
from ntkscrub.solvers.cg import Operator, as_matmul, resolve_dtype_device

__all__ = [
    "LowRankPreconditioner",
    "NystromPreconditioner",
    "RPCholeskyPreconditioner",
    "nystrom_preconditioner",
    "stable_nystrom",
]


def _check_shift(shift: Any) -> float:
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not math.isfinite(shift):
        raise ValueError(f"shift: must be a finite number ≥ 0, got {shift!r}")
    if shift < 0:
        raise ValueError(f"shift: must be ≥ 0, got {shift!r}")
    return float(shift)


def _check_common(n: Any, rank: Any, shift: Any) -> tuple[int, int, float]:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: must be a positive integer, got {n!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank: must be a positive integer, got {rank!r}")
    return n, min(rank, n), _check_shift(shift)


def stable_nystrom(omega: Tensor, Y: Tensor, eps: float) -> tuple[Tensor, Tensor, float]:
    """Stable Nyström factorisation (Frangella–Tropp–Udell 2023, Alg. 2.1) of the sketch
    ``Y = K Ω``: returns ``(Û (n, ℓ), Λ̂ (ℓ,) descending, ν)`` with ``K ≈ Û diag(Λ̂) Ûᵀ``.

    ``omega`` (n, ℓ) orthonormal and ``Y`` in float64. ν starts at the rounding level of Y
    (``eps`` of the operator's dtype × ‖Y‖_F) and is raised ×10 until the Cholesky succeeds.
    FTU's √n·eps·‖Y‖₂ is harmless in float64 but in float32 at n = 5e5 it puts a floor of
    ~1e-4‖A‖ under Λ̂; measured here (float32, n = 3000, power-law spectrum) the smaller ν cut PCG
    iterations by up to 1.8× at rank 400.
    """
    nu = max(eps * float(torch.linalg.norm(Y)), torch.finfo(torch.float64).tiny)
    for _ in range(12):
        Y_nu = Y + nu * omega
        C = omega.T @ Y_nu  # (ℓ, ℓ)
        C = 0.5 * (C + C.T)
        L, info = torch.linalg.cholesky_ex(C)
        if int(info) == 0:
            break
        nu *= 10.0  # rounding (or a slightly indefinite A) beat ν: push further
    else:
        raise ValueError(
            "A: Ωᵀ A Ω is not positive definite even after shifting; is A symmetric PSD?"
        )
    Bm = torch.linalg.solve_triangular(L, Y_nu.T, upper=False).T  # (n, ℓ) = Y_ν L⁻ᵀ
    U, S, _ = torch.linalg.svd(Bm, full_matrices=False)
    return U, (S**2 - nu).clamp_min(0.0), nu


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


class LowRankPreconditioner:
    """``P⁻¹ = (λ̂_r + μ) Û (Λ̂ + μI)⁻¹ Ûᵀ + (I − ÛÛᵀ)`` from a given eigen-pair set.

    Args:
        U: ``(n, r)`` orthonormal columns (float64 preferred).
        eigenvalues: ``(r,)`` approximate eigenvalues Λ̂ ≥ 0 of the PSD part K, any order.
        shift: μ ≥ 0, the ridge of the system ``(K + μI)``.

    With ``μ = 0`` the formula needs λ̂ > 0: zero eigenvalues are dropped (their directions are
    treated as the identity part). If nothing positive is left, P⁻¹ = I.

    ``solve(R)`` for ``R`` of shape ``(n,)`` or ``(n, m)`` returns ``P⁻¹ R`` in ``R``'s dtype and
    device, at the cost of two thin products with Û (O(n r m) flops, no matvec with K).
    """

    def __init__(self, U: Tensor, eigenvalues: Tensor, shift: float = 0.0) -> None:
        U = U.to(torch.float64)
        lam = eigenvalues.to(device=U.device, dtype=torch.float64).clamp_min(0.0)
        order = torch.argsort(lam, descending=True)
        lam, U = lam[order], U[:, order]
        if shift == 0.0:
            # (λ̂_r + 0)/(λ̂_i + 0) is undefined for zero λ̂: keep only resolved, positive ones.
            pos = lam > (lam[0] * 1e-14 if lam.numel() else 0.0)
            lam, U = lam[pos], U[:, pos]
        self.shift = float(shift)
        self.U = U  # (n, r) float64
        self.eigenvalues = lam  # (r,) float64, descending
        self.rank = int(lam.numel())
        self.n = int(U.shape[0])
        if self.rank:
            floor = lam[-1] + self.shift
            # P⁻¹ R = R + Û diag(d − 1) Ûᵀ R, with d_i = (λ̂_r + μ) / (λ̂_i + μ) ∈ (0, 1].
            self._dm1 = floor / (lam + self.shift) - 1.0  # (r,)
        else:
            self._dm1 = lam.new_zeros(0)
        self._cache: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}
        self.matvecs = 0
        self.block_matvecs = 0
        self.seconds = 0.0

    def _factors(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = (self.U.to(device=device, dtype=dtype), self._dm1.to(device, dtype))
        return self._cache[key]

    def solve(self, R: Tensor) -> Tensor:
        """Apply P⁻¹ to ``R`` of shape ``(n,)`` or ``(n, m)``; returns the same shape and dtype."""
        if not isinstance(R, Tensor) or R.dim() not in (1, 2) or R.shape[0] != self.n:
            got = tuple(R.shape) if isinstance(R, Tensor) else type(R).__name__
            raise ValueError(f"R: expected shape ({self.n},) or ({self.n}, m), got {got}")
        if self.rank == 0:
            return R.clone()
        U, dm1 = self._factors(R.dtype, R.device)
        R2 = R.unsqueeze(1) if R.dim() == 1 else R  # (n, m)
        out = R2 + U @ (dm1.unsqueeze(1) * (U.T @ R2))  # (n, m)
        return out.squeeze(1) if R.dim() == 1 else out

    __call__ = solve

    def restrict(self, rows: slice | Tensor, shift: float) -> LowRankPreconditioner:
        """The preconditioner of a principal submatrix ``(K[rows, rows] + shift·I)`` from this
        one's factor, with no matvec: ``K ≈ Û Λ̂ Ûᵀ`` gives ``K[rows, rows] ≈ Û_r Λ̂ Û_rᵀ`` (Û_r the
        rows of Û), re-orthonormalised by a thin SVD of ``Û_r Λ̂^½`` (O(n_r r²) flops).

        Why it is as good as a fresh sketch of the submatrix: a Nyström approximation satisfies
        ``0 ⪯ K − Û Λ̂ Ûᵀ`` and the error of the restriction is the principal submatrix of that
        error, so its spectral norm is no larger. ``scrub`` solves with Θ_DD and then with its
        principal submatrix Θ_rr (the retain rows come first), so one sketch serves both solves
        and the second build (``rank`` column-matvecs) is saved.
        """
        if isinstance(rows, Tensor):
            return self.congruence(lambda U: U[rows.to(U.device)], shift)
        if isinstance(rows, slice):
            return self.congruence(lambda U: U[rows], shift)
        raise TypeError(f"rows: expected a slice or an index Tensor, got {type(rows).__name__}")

    def congruence(self, L: Callable[[Tensor], Tensor], shift: float) -> LowRankPreconditioner:
        """The preconditioner of ``(L K Lᵀ + shift·I)`` from this one's factor of K, with no
        matvec: ``K ≈ Û Λ̂ Ûᵀ`` gives ``L K Lᵀ ≈ F Fᵀ``, ``F = L Û Λ̂^½`` ``(m, r)``,
        re-orthonormalised by a thin SVD (O(m r²) flops). ``L`` maps an ``(n, r)`` float64 block
        to ``(m, r)`` (a row selection: :meth:`restrict`; the per-sample ``H^½`` blocks of the
        cross-entropy Newton systems ``H^½ΘH^½ + λI``: one sketch of Θ serves every step, whose
        H changes).

        Why the factor stays good: ``K − Û Λ̂ Ûᵀ ⪰ 0`` (Nyström), so the error of the
        congruence ``L (K − ÛΛ̂Ûᵀ) Lᵀ`` is PSD with spectral norm ≤ ‖L‖²·‖K − ÛΛ̂Ûᵀ‖ — no
        larger when ‖L‖ ≤ 1 (a selection; ‖H^½‖ ≤ 1/√2 for the softmax Hessian).
        """
        shift = _check_shift(shift)
        F = L(self.U * self.eigenvalues.sqrt())  # (m, r)
        if self.rank == 0 or F.shape[0] == 0:
            return LowRankPreconditioner(F[:, :0], F.new_zeros(0), shift)
        U2, S2, _ = torch.linalg.svd(F, full_matrices=False)
        return LowRankPreconditioner(U2, S2**2, shift)

    def dense_inverse(self) -> Tensor:
        """The dense ``(n, n)`` float64 matrix P⁻¹ (for tests and small n only)."""
        return self.solve(torch.eye(self.n, dtype=torch.float64, device=self.U.device))

    def to_dict(self) -> dict[str, Any]:
        lam = self.eigenvalues
        return {
            "type": type(self).__name__,
            "rank": self.rank,
            "shift": self.shift,
            "matvecs": self.matvecs,
            "block_matvecs": self.block_matvecs,
            "seconds": self.seconds,
            "eigenvalue_max": float(lam[0]) if self.rank else 0.0,
            "eigenvalue_min": float(lam[-1]) if self.rank else 0.0,
        }


class NystromPreconditioner(LowRankPreconditioner):
    """Randomized Nyström preconditioner (Frangella, Tropp, Udell 2023, Algorithms 2.1 and 5.1).

    Args:
        A: the operator (see :func:`~ntkscrub.solvers.as_matmul`), PSD; see the module docstring
            for whether it includes the shift.
        n: its size.
        rank: number of eigen-pairs kept (capped at n).
        shift: μ ≥ 0, the ridge of the system being solved.
        includes_shift: ``True`` if ``A`` already equals ``K + shift·I`` (A Ω − shift·Ω is used).
        seed: seed of the Gaussian test matrix (``None``: torch's global generator).
        dtype, device: of the block passed to ``A`` (default: those of a Tensor/LinearOperator,
            else the default dtype on the CPU — pass ``device="cuda"`` for a CUDA callable).
        oversample: extra sketch columns; the sketch has ``rank + oversample`` columns and the top
            ``rank`` eigen-pairs are kept, which makes them more accurate. Default 0 so that
            building costs exactly ``rank`` column-matvecs.

    Cost: one call to ``A`` with ``rank + oversample`` columns, then O(n (rank+oversample)²) float64
    flops (QR, Cholesky, thin SVD).

    Stable Nyström: with an orthonormal Gaussian Ω (n, ℓ) and Y = K Ω, take Y_ν = Y + νΩ with
    ν = eps(dtype of Y) · ‖Y‖_F (×10 until the Cholesky succeeds), C = chol(Ωᵀ Y_ν),
    B = Y_ν C⁻ᵀ, B = Û Σ Vᵀ and Λ̂ = max(Σ² − ν, 0). ν makes ΩᵀY_ν positive definite despite
    rounding; eps is that of the operator's dtype because that is the accuracy of Y. Eigenvalues
    of K below about eps·‖K‖ (≈ 1e-7‖K‖ for a float32 operator) cannot be resolved.

    Attributes: ``rank``, ``matvecs`` (= rank + oversample), ``block_matvecs`` (= 1), ``seconds``,
    ``eigenvalues`` (Λ̂, descending, float64), ``U`` (Û, float64), ``shift``, ``nu``.
    """

    def __init__(
        self,
        A: Operator,
        n: int,
        rank: int,
        *,
        shift: float = 0.0,
        includes_shift: bool = False,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        oversample: int = 0,
    ) -> None:
        t0 = time.perf_counter()
        n, rank, shift = _check_common(n, rank, shift)
        if not isinstance(oversample, int) or isinstance(oversample, bool) or oversample < 0:
            raise ValueError(f"oversample: must be an integer ≥ 0, got {oversample!r}")
        op_dtype, op_device = resolve_dtype_device(A, dtype, device)
        matmul = as_matmul(A, n, name="A")
        ell = min(rank + oversample, n)
        f64 = torch.float64

        # Drawn on the CPU so that a seed gives the same Ω on every device; orthonormalised there.
        omega = torch.randn(n, ell, dtype=f64, generator=_generator(seed)).to(op_device)  # (n, ℓ)
        omega = torch.linalg.qr(omega).Q
        omega_op = omega.to(device=op_device, dtype=op_dtype)
        # The factorisation must use the Ω that A actually saw (rounded to the operator's dtype).
        omega = omega_op.to(f64)
        Y = matmul(omega_op).to(f64)  # (n, ℓ): the single block matvec
        if not bool(torch.isfinite(Y).all()):
            raise ValueError("A: operator returned NaN or infinite values")
        if includes_shift and shift:
            Y = Y - shift * omega  # K Ω = A Ω − shift Ω, exactly
        U, lam, nu = stable_nystrom(omega, Y, torch.finfo(op_dtype).eps)
        super().__init__(U[:, :rank], lam[:rank], shift)
        self.nu = nu
        self.sketch_size = ell
        self.matvecs = ell
        self.block_matvecs = 1
        self.seconds = time.perf_counter() - t0


class RPCholeskyPreconditioner(LowRankPreconditioner):
    """Block randomly pivoted Cholesky preconditioner (Chen, Epperly, Tropp, Webber 2023,
    "Randomly pivoted Cholesky", arXiv 2207.06503), built from pivot columns ``K e_i``.

    Pivots are drawn in blocks of ``block_size`` without replacement with probability proportional
    to the diagonal of the current residual ``K − F Fᵀ``; each block costs one call to ``A`` with
    the corresponding unit vectors. The result ``K ≈ F Fᵀ`` (F: (n, r)) is turned into Û Λ̂ Ûᵀ by a
    thin SVD of F and used in the same P⁻¹ formula as :class:`NystromPreconditioner` (indeed
    ``F Fᵀ = K[:, S] K[S, S]⁺ K[S, :]``, the Nyström approximation with Ω = the pivot columns of I).

    It needs ``diagonal`` = diag(A) up front. For the NTK that is ‖∂f_k(x_i)/∂θ‖² per
    (sample, class) — one backward pass each, which the reference measurements put at hundreds of
    times a matvec at N = 50,000 — so :class:`NystromPreconditioner` is the default choice there;
    this one is for operators whose diagonal is cheap, and it adapts its pivots to the spectrum
    (better than Nyström on matrices with a few dominant rows, e.g. outlier samples).

    Args:
        A, n, rank, shift, includes_shift, seed, dtype, device: as for
            :class:`NystromPreconditioner`.
        diagonal: ``(n,)`` diagonal of ``A`` as passed (with the shift if ``includes_shift``).
        block_size: pivots per call to ``A``; default ``ceil(rank / 4)`` (4 calls): fewer calls
            cost less, more calls choose pivots more adaptively.

    Attributes: as :class:`LowRankPreconditioner`, plus ``pivots`` (list[int], in order).
    """

    def __init__(  # noqa: C901, PLR0915 - listed in pyproject.toml
        self,
        A: Operator,
        n: int,
        rank: int,
        *,
        diagonal: Tensor,
        shift: float = 0.0,
        includes_shift: bool = False,
        block_size: int | None = None,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        t0 = time.perf_counter()
        n, rank, shift = _check_common(n, rank, shift)
        if block_size is None:
            block_size = max(1, math.ceil(rank / 4))
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size: must be a positive integer, got {block_size!r}")
        if not isinstance(diagonal, Tensor) or tuple(diagonal.shape) != (n,):
            got = tuple(diagonal.shape) if isinstance(diagonal, Tensor) else type(diagonal).__name__
            raise ValueError(f"diagonal: expected a tensor of shape ({n},), got {got}")
        if not bool(torch.isfinite(diagonal).all()):
            raise ValueError("diagonal: contains NaN or infinite values")
        op_dtype, op_device = resolve_dtype_device(A, dtype, device)
        matmul = as_matmul(A, n, name="A")
        f64 = torch.float64
        gen = _generator(seed)

        d = diagonal.detach().to(device="cpu", dtype=f64).clone()  # (n,) residual diagonal
        if includes_shift and shift:
            d -= shift
        if bool((d < -1e-8 * d.abs().max().clamp_min(1e-300)).any()):
            raise ValueError(
                "diagonal: negative entries (of the PSD part); is A PSD / is shift right?"
            )
        d.clamp_(min=0.0)
        trace0 = float(d.sum())
        F = torch.zeros(n, 0, dtype=f64)  # (n, r) on CPU: K ≈ F Fᵀ
        pivots: list[int] = []
        calls = 0
        while len(pivots) < rank:
            support = int((d > 0).sum())
            # Stop once the residual is numerically exhausted (K has rank < requested rank).
            if support == 0 or float(d.sum()) <= 1e-14 * trace0:
                break
            b = min(block_size, rank - len(pivots), support)
            s = torch.multinomial(d, b, replacement=False, generator=gen)  # (b,)
            E = torch.zeros(n, b, dtype=op_dtype, device=op_device)
            E[s.to(op_device), torch.arange(b, device=op_device)] = 1.0
            G = matmul(E).to(device="cpu", dtype=f64)  # (n, b) = A[:, s]
            calls += 1
            if not bool(torch.isfinite(G).all()):
                raise ValueError("A: operator returned NaN or infinite values")
            if includes_shift and shift:
                G[s, torch.arange(b)] -= shift  # K e_i = A e_i − shift e_i
            G -= F @ F[s].T  # residual columns (K − F Fᵀ)[:, s]
            H = G[s]  # (b, b)
            H = 0.5 * (H + H.T)
            w, V = torch.linalg.eigh(H)
            # Pseudo-inverse square root: drop directions the residual no longer has.
            keep = (w > 1e-12 * float(w.max().clamp_min(0.0))) & (w > 0)
            if not bool(keep.any()):
                d[s] = 0.0  # these pivots carry nothing more
                pivots.extend(s.tolist())
                continue
            F_new = G @ (V[:, keep] / w[keep].sqrt())  # (n, b')
            F = torch.cat([F, F_new], dim=1)
            d = (d - (F_new**2).sum(dim=1)).clamp_min(0.0)
            d[s] = 0.0  # exact for pivots; guards against rounding picking them again
            pivots.extend(s.tolist())
        if F.shape[1]:
            U, S, _ = torch.linalg.svd(F, full_matrices=False)
            lam = S**2
        else:
            U, lam = torch.zeros(n, 0, dtype=f64), torch.zeros(0, dtype=f64)
        super().__init__(U.to(op_device), lam.to(op_device), shift)
        self.pivots = pivots
        self.matvecs = len(pivots)
        self.block_matvecs = calls
        self.seconds = time.perf_counter() - t0


# Adaptive Nyström defaults: the first sketch size, the factor of the stopping rule, and the
# relative floor that replaces the shift when it is 0 (≈ what a float32 sketch can resolve).
_AUTO_INITIAL_RANK = 16
_AUTO_FACTOR = 10.0
_AUTO_RTOL = 1e-6
_AUTO_MAX_RANK = 512


def _positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def _doubling_pays(
    lam: Tensor,
    history: list[dict[str, Any]],
    mu: float,
    tol: float,
    solves: float,
    new: int,
    column_cost: float = 1.0,
) -> tuple[bool, float]:
    """Whether sketching ``new`` more columns is predicted to save more CG iterations, over
    ``solves`` solves to ``tol``, than the ``column_cost · new`` products they cost (a Gaussian
    column is one product; a pivot column of an NTK about half, see
    :func:`nystrom_preconditioner`); and that saving.
    ``lam``: the sketch's eigenvalues (descending), ``mu``: the effective shift of the rule.

    PCG with the FTU factor of rank ℓ needs about ``ln(2/tol)·√κ̂_ℓ`` iterations, κ̂_ℓ =
    ``1 + λ̂_ℓ/μ`` — twice the textbook ``½√κ ln(2/tol)`` because the sketch's λ̂_ℓ
    underestimates the spectrum there (fitted, float64 replica of the quick preset's Θ_DD,
    c·N = 2500, ranks 16–128, tol 1e-3: 9–11·√κ̂_ℓ iterations). λ̂ at the next rank is
    extrapolated by the decay of the last doubling (``eig_min`` ratio of the last two rounds;
    in the first round, the sketch's own decay over its second half) — the within-sketch decay
    is steeper than the true one, so the first round's prediction errs towards stopping.
    Measured on that replica (2 solves: Θ_DD and the restricted Θ_rr, tol 1e-3), total products
    (build + both solves) by rank: MSE at θ0 16: 171, 32: 148, 48: 141, 64: 144, 128: 182,
    256: 292; CE at w(D) 32: 361, 64: 282, 96: 268, 128: 269, 256: 346 — this rule stops at
    64 for both (the time budget had picked 64 there by accident; on a fast device the
    factor rule alone would sketch 256–512 columns)."""
    ell = int(lam.numel())
    now = float(lam[-1])
    if len(history) >= 2 and history[-2]["eig_min"] > 0:
        prev_rank, prev = history[-2]["rank"], history[-2]["eig_min"]
        slope = math.log(max(now, 1e-300) / prev) / math.log(ell / prev_rank)
    else:
        half = float(lam[max(ell // 2 - 1, 0)])
        slope = math.log(max(now, 1e-300) / max(half, 1e-300)) / math.log(2.0) if ell > 1 else 0.0
    nxt = now * ((ell + new) / ell) ** min(slope, 0.0)
    saving = solves * math.log(2.0 / tol) * (math.sqrt(1 + now / mu) - math.sqrt(1 + nxt / mu))
    return saving > column_cost * new, saving


Sketch = Literal["gaussian", "columns"]


def _unit_columns(idx: Tensor, n: int) -> Tensor:
    """Ω ``(n, k)`` float64: the unit vectors of the indices ``idx`` ``(k,)``."""
    k = int(idx.numel())
    Q = torch.zeros(n, k, dtype=torch.float64)
    Q[idx, torch.arange(k)] = 1.0
    return Q


def nystrom_preconditioner(  # noqa: C901, PLR0915 - listed in pyproject.toml
    A: Operator,
    n: int,
    rank: int | str = "auto",
    *,
    shift: float = 0.0,
    includes_shift: bool = False,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    initial_rank: int = _AUTO_INITIAL_RANK,
    max_rank: int | None = None,
    factor: float = _AUTO_FACTOR,
    max_matvecs: int | None = None,
    max_seconds: float | None = None,
    solves: float | None = None,
    tol: float = 1e-3,
    progress: bool | None = None,
    sketch: Sketch = "gaussian",
    columns: Callable[[Tensor], Tensor] | None = None,
    column_cost: float = 1.0,
) -> NystromPreconditioner:
    """A Nyström preconditioner for ``(K + shift·I)`` whose rank adapts to the spectrum.

    ``rank="auto"`` (the default): the adaptive scheme of Frangella, Tropp & Udell (SIMAX 2023,
    §5.4): sketch ``initial_rank`` columns, then double the sketch — each round one block matvec
    with the *new* columns only, earlier products are kept — until the smallest kept eigenvalue
    λ̂_ℓ of the sketch satisfies ``λ̂_ℓ ≤ factor · max(shift, rtol·λ̂_1)``. With the FTU
    preconditioner the preconditioned system's condition number is about ``(λ̂_ℓ + μ)/μ``, so the
    rule targets κ ≲ factor + 1 (μ = shift; ``rtol = 1e-6`` stands in for a zero shift). The
    doubling also stops at ``max_rank`` (default ``min(max(n/4, initial_rank), 512)``), at
    ``max_matvecs``, when the next round's cost — measured on the previous rounds — would
    exceed ``max_seconds`` (default: no time budget), and, with ``solves`` given, when the
    CG iterations it is predicted to save over that many solves to ``tol`` no longer pay for
    its columns (:func:`_doubling_pays`; ``stop_reason`` ``"cost"``). The cost rule counts
    products, not seconds, so the rank does not depend on the host's load — the 150 s time
    budget it replaces as the default had picked rank 64 on an idle 2-core host and 16 on a
    loaded one for the same problem. An integer ``rank`` builds a
    :class:`NystromPreconditioner` of that rank in one pass (the previous behaviour).

    Measured (CPU, 1 thread, float32 NTK of a width-8 torchvision ResNet-10, n = c·N = 200,
    tol 1e-3; matvecs = build + CG, seconds of the whole solve): ridge 0: plain CG 71 matvecs
    7.1 s, auto 50 + 20 (rank 50, capped at n/4) 4.4 s; ridge 1e-2: 46 / 3.7 s vs 16 + 19
    (rank 16) / 1.8 s; ridge 1: 9 / 0.6 s vs 16 + 4 / 0.8 s — a sketch column costs far less
    than a CG iteration because the build's products are one multi-vector pass.

    Args:
        A, n, shift, includes_shift, seed, dtype, device: as for :class:`NystromPreconditioner`.
        rank: ``"auto"`` or a positive integer.
        initial_rank, max_rank, factor, max_matvecs, max_seconds: the adaptive scheme's knobs.
        solves: how many solves the factor will serve (scrub: 2, Θ_DD and the restricted Θ_rr);
            ``None``: no cost rule.
        tol: the relative residual those solves aim at (the cost rule's iteration model).
        progress: a tqdm bar over the sketch columns (``None``: only on a terminal).
        sketch: ``"gaussian"`` — Ω orthonormalised Gaussian, the products A Ω; ``"columns"`` —
            Ω = the unit vectors of uniformly drawn indices (seeded, without replacement), so the
            sketch is ``rank`` columns of A (column Nyström, Williams & Seeger 2001). On the quick
            preset's float64 replicas (``benchmarks/results/cpu/column_nystrom``) its PCG
            iterations are the Gaussian sketch's at ranks 32–128 to within 0–6 % (paper form
            at rank 64: 39–41 per solve against 40–41; reference form 119–127 against 115–117).
        columns: ``idx (k,) -> A[:, idx] (n, k)`` (with the shift when ``includes_shift``), for
            ``sketch="columns"``; ``None``: A applied to the unit vectors. Why it exists: a
            column of an NTK, Θ e_i = J (J_iᵀ e_i), needs a VJP over sample i alone and one JVP
            pass over the data — measured 0.51× the seconds of a Gaussian column
            (:func:`ntkscrub.operators.pivot_columns`).
        column_cost: what one sketch column costs in products, for the cost rule (0.5 with an
            NTK's ``columns``).

    Returns:
        A :class:`NystromPreconditioner` (``solve``, ``restrict``, ``to_dict``). Extra attributes:
        ``matvecs`` (column-matvecs spent building), ``block_matvecs`` (rounds), ``seconds``,
        ``history`` (one dict per round: rank, eig_min, matvecs, seconds) and ``stop_reason``
        (``"factor"``, ``"max_rank"``, ``"max_matvecs"``, ``"max_seconds"``, ``"cost"``,
        ``"exhausted"``).
    """
    check_choice(sketch, "sketch", ("gaussian", "columns"))
    if not (_positive_number(column_cost) and column_cost <= 1):
        raise ValueError(f"column_cost: must be a number in (0, 1], got {column_cost!r}")
    if not isinstance(rank, str) and sketch == "columns":
        # one round of exactly `rank` columns through the adaptive loop (which owns the sketch)
        n, rank, _ = _check_common(n, rank, shift)
        initial_rank, max_rank, solves, rank = rank, rank, None, "auto"
    if not isinstance(rank, str):
        return NystromPreconditioner(
            A,
            n,
            rank,
            shift=shift,
            includes_shift=includes_shift,
            seed=seed,
            dtype=dtype,
            device=device,
        )
    if rank != "auto":
        raise ValueError(f"rank: expected 'auto' or a positive integer, got {rank!r}")
    t0 = time.perf_counter()
    n, initial_rank, shift = _check_common(n, initial_rank, shift)
    if max_rank is None:
        # A rank-n sketch costs n matvecs, what CG needs at most in exact arithmetic: past n/4
        # the build would cost more than it can save.
        max_rank = min(max(n // 4, initial_rank), _AUTO_MAX_RANK)
    _, max_rank, _ = _check_common(n, max_rank, shift)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"factor: must be a number > 1, got {factor!r}")
    if max_matvecs is not None and (
        isinstance(max_matvecs, bool) or not isinstance(max_matvecs, int) or max_matvecs < 1
    ):
        raise ValueError(f"max_matvecs: must be a positive integer or None, got {max_matvecs!r}")
    for name, value in (("max_seconds", max_seconds), ("solves", solves)):
        if value is not None and not _positive_number(value):
            raise ValueError(f"{name}: must be a positive number or None, got {value!r}")
    if not (_positive_number(tol) and tol < 1):
        raise ValueError(f"tol: must be a number in (0, 1), got {tol!r}")
    op_dtype, op_device = resolve_dtype_device(A, dtype, device)
    matmul = as_matmul(A, n, name="A")
    f64, gen = torch.float64, _generator(seed)
    eps = torch.finfo(op_dtype).eps
    omega = torch.zeros(n, 0, dtype=f64, device=op_device)
    Y = torch.zeros(n, 0, dtype=f64, device=op_device)
    # the column sketch's indices: one seeded permutation, consumed round by round
    order = torch.randperm(n, generator=gen) if sketch == "columns" else None
    history: list[dict[str, Any]] = []
    bar = progress_bar(max_rank, "nystrom", progress, unit="col")
    new, stop = initial_rank, "max_rank"
    try:
        while True:
            if order is not None:
                idx = order[omega.shape[1] : omega.shape[1] + new]
                Q = _unit_columns(idx, n).to(op_device)
                Yq = columns(idx) if columns is not None else matmul(Q.to(op_dtype))
                Yq = Yq.to(device=op_device, dtype=f64)
            else:
                G = torch.randn(n, new, dtype=f64, generator=gen).to(op_device)
                for _ in range(2):  # twice is enough (Giraud et al.): Ω stays orthonormal to eps
                    G = G - omega @ (omega.T @ G)
                Q_op = torch.linalg.qr(G).Q.to(dtype=op_dtype)
                Yq = matmul(Q_op).to(f64)  # (n, new): one multi-vector pass, new columns only
                Q = Q_op.to(f64)  # the Ω that A actually saw
            if not bool(torch.isfinite(Yq).all()):
                raise ValueError("A: operator returned NaN or infinite values")
            if includes_shift and shift:
                Yq = Yq - shift * Q
            omega, Y = torch.cat([omega, Q], 1), torch.cat([Y, Yq], 1)
            U, lam, nu = stable_nystrom(omega, Y, eps)
            ell = omega.shape[1]
            lam_min, lam_max = float(lam[-1]), float(lam[0])
            history.append(
                {
                    "rank": ell,
                    "eig_min": lam_min,
                    "eig_max": lam_max,
                    "matvecs": ell,
                    "seconds": time.perf_counter() - t0,
                }
            )
            bar.update(new)
            bar.set_postfix(eig_min=f"{lam_min:.2e}", refresh=False)
            mu = max(shift, _AUTO_RTOL * lam_max)  # a zero shift: the dtype's resolution
            if lam_min <= factor * mu:
                stop = "factor"
                break
            if lam_min <= 10 * eps * lam_max:
                stop = "exhausted"  # the rest of the spectrum is below what the sketch resolves
                break
            new = min(ell, max_rank - ell)  # double the sketch
            if new <= 0:
                stop = "max_rank"
                break
            if max_matvecs is not None and ell + new > max_matvecs:
                new = max_matvecs - ell
                if new <= 0:
                    stop = "max_matvecs"
                    break
            per_col = (time.perf_counter() - t0) / ell
            if max_seconds is not None and time.perf_counter() - t0 + per_col * new > max_seconds:
                stop = "max_seconds"
                break
            if solves is not None:
                pays, history[-1]["predicted_saving"] = _doubling_pays(
                    lam, history, mu, tol, solves, new, column_cost
                )
                if not pays:
                    stop = "cost"
                    break
    finally:
        bar.close()
    M = NystromPreconditioner.__new__(NystromPreconditioner)
    LowRankPreconditioner.__init__(M, U, lam, shift)
    M.nu = nu
    M.sketch_size = omega.shape[1]
    M.matvecs = omega.shape[1]
    M.block_matvecs = len(history)
    M.seconds = time.perf_counter() - t0
    M.history = history
    M.stop_reason = stop
    M.sketch = sketch
    M.pivots = None if order is None else order[: omega.shape[1]].tolist()
    logger.info(
        "nystrom (%s): rank %d in %d rounds (%s), %d matvecs, %.2f s, eig_min %.3g, shift %.3g",
        sketch,
        M.rank,
        len(history),
        stop,
        M.matvecs,
        M.seconds,
        float(lam[-1]),
        shift,
    )
    return M
