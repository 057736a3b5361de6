"""Mixed-precision PCG: low-precision products inside the Krylov iteration, the true residual in
full precision.

One Θ product costs about two training epochs in float32; TF32 or bf16 products are cheaper, but
plain CG with them stalls far above the tolerance (TF32 products have a relative error of
5e-3–1e-2 on an H200 and CG stalls at 3e-2; bf16 products are 2–3 % off; see
:func:`ntkscrub.scrub.full_fp32_precision`). :func:`mixed_cg` keeps the cheap products where an
error is harmless and the expensive ones where it is not — iterative refinement (Wilkinson;
Carson & Higham, SISC 2018, with a Krylov inner solver)::

    x ← x0 (accumulated in float64);  r ← b − A_hi x                (full precision)
    while max_j ‖r_j‖ / ‖b_j‖ > tol:
        d ← PCG(A_lo, r) to a loose relative residual η           (low-precision products)
        x ← x + d;  r ← b − A_hi x                                  (the true residual)

A round contracts the true residual by about ``η + ‖A_hi − A_lo‖·‖A_lo⁻¹‖`` (the inner solve's
own accuracy plus the products' error times the condition number), so refinement reaches any
``tol`` the full-precision residual can resolve as long as that error stays below 1, whatever the
low precision — and the stopping test is always on the true residual, never on a recursion.

Why refinement and not a flexible/inexact CG with low-precision products throughout: the theory
of inexact Krylov methods (Simoncini–Szyld 2003, van den Eshof–Sleijpen 2004) lets the product
error *grow* as the residual falls, i.e. it needs accurate products early and tolerates cheap ones
late; with one fixed low precision it stalls at a true residual of about the product error times κ,
like plain CG with those products. The other candidate, CG on A_lo whose recursive residual is
*replaced* by the true ``b − A_hi x`` whenever it has fallen 10× (reliable updates, van der Vorst &
Ye 2000), keeps its search directions across replacements. Measured with a safeguarded version
(hand over to refinement when a replacement did not halve the true residual; same SPD problems,
n = 300, two right-hand sides; low + full-precision matvecs, refinement → replacement): κ = 1e2
bf16 tol 1e-4 120 + 8 → 98 + 8; κ = 10, 3 % perturbed products 85 + 6 → 37 + 8; κ = 1e4 TF32
1209 + 8 → 1033 + 8 — but κ = 1e2 with 3 % perturbed products 270 + 6 → 713 + 11 and κ = 1e4
bf16 367 + 596 (fallback) → 1809 + 14, and without the safeguard it diverged (κ = 1e4 fp16, tol
1e-10: true residual 34 after 3000 iterations): its directions lose A_hi-conjugacy, and how long
to wait between replacements is a guess. Refinement is the robust, predictable choice here;
replacement needs a better stopping rule before it can be the default.

Measured here (float64 SPD matrix n = 300, eigenvalues log-spaced in [1e-2, 1], κ = 100,
products rounded, tol 1e-10, no preconditioner, η = 1e-2):
plain CG with the rounded products stalls at a true residual of 1.5e-2 (bf16) / 1.7e-3 (TF32);
refinement reaches 4e-11 with 147 bf16 + 6 float64 column-matvecs (TF32: 132 + 5), where
float64 CG needs 110. At κ = 1e4 TF32/fp16 rounding needs 1285 + 8 / 1305 + 7 against 836, and
bf16 stagnates (u·κ ≈ 40) and falls back. On a float32 MLP NTK with real autocast products
(benchmarks/mixed_precision.py, tol 1e-4, fp32 PCG ≈ 20 matvecs): bf16 ≈ 38 + 8, fp16 ≈ 35 + 7.
So restarting the Krylov space at each round, and the products' error, cost 1.2–2.5× the
matvecs: low-precision products pay off only when they are at least that much cheaper — not TF32
on the H200 (1.05–1.2× cheaper per Θ product, issue 14), possibly bf16 on tensor cores (to be
measured on a GPU).

If refinement stagnates (a round no longer halves the worst residual: the low precision is too
coarse for this system) or a low-precision product overflows (float16 beyond 65504),
:func:`mixed_cg` warns (:class:`PrecisionFallbackWarning`, naming the
system) and finishes with full-precision inner solves, so the accuracy contract (``tol``) holds
and the cost is visible (``CGInfo.fallback``, ``outer_matvecs``); ``fallback=False`` raises
:class:`~ntkscrub.solvers.CGNotConverged` with the partial result instead.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ntkscrub._progress import check_progress, logger, warn
from ntkscrub.solvers.cg import (
    CGInfo,
    CGNonFinite,
    CGNotConverged,
    Operator,
    _check_cg_options,
    _check_tensor,
    _is_linear_operator,
    as_matmul,
    cg,
    coldot,
)

__all__ = [
    "mixed_cg",
    "low_precision_products",
    "round_to_precision",
    "PrecisionFallbackWarning",
    "PRECISIONS",
    "DEFAULT_INNER_TOL",
]

PRECISIONS = ("tf32", "bfloat16", "float16")
# Default inner tolerance η of the first round, per precision (later rounds adapt, see
# _Refinement.correction). A tighter η spends low-precision iterations that the next true residual
# throws away (a round cannot contract by more than the products' error × κ); a looser one spends
# full-precision residuals. Measured (low-precision + full-precision column-matvecs), float32 MLP
# NTK on a CPU (benchmarks/mixed_precision.py, n = 1000 rows, λ = 10, tol 1e-4, fp32 PCG: 20):
# real bf16 autocast products (1.7–3 % error) η = 1e-1 38 + 8, 1e-2 44 + 8, 1e-3 58 + 8; fp16
# (0.6–1 %) 35 + 7, 40 + 7, 42 + 7; "tf32" (plain fp32 on a CPU) 28 + 5, 23 + 3, 23 + 3.
# Float64 SPD n = 300, κ = 100, products rounded, tol 1e-10 (float64 CG: 110): bf16 η = 1e-1
# 140 + 10, 1e-2 147 + 6; TF32 146 + 10, 132 + 5. GPU TF32 products (5e-3–1e-2 error) sit between.
DEFAULT_INNER_TOL = {"bfloat16": 1e-1, "float16": 1e-1, "tf32": 1e-2}
# A round must cut the worst true residual at least this much, else refinement has stagnated.
_STAGNATION = 0.5
# At most this many refinement rounds (each contracts ≥ 2× or the solve falls back / stops).
_MAX_ROUNDS = 40
_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class PrecisionFallbackWarning(RuntimeWarning):
    """A mixed-precision solve stagnated and finished with full-precision inner solves."""


@contextlib.contextmanager
def _tf32() -> Iterator[None]:
    """TF32 matmuls and cuDNN convolutions inside the block (scrub turns them off around it)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def round_to_precision(X: Tensor, precision: str) -> Tensor:
    """``X`` rounded to ``precision`` (``"bfloat16"``, ``"float16"``, ``"tf32"``: float32 with a
    10-bit mantissa, round to nearest) and returned in ``X``'s dtype; ``X`` is not modified."""
    if precision == "tf32":
        bits = X.to(torch.float32).view(torch.int32)
        # Keep 10 of float32's 23 mantissa bits: add half an ulp of TF32, clear the 13 low bits.
        bits = (bits + 0x1000) & -0x2000
        return bits.view(torch.float32).to(X.dtype)
    if precision not in _AUTOCAST:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return X.to(_AUTOCAST[precision]).to(X.dtype)


def low_precision_products(
    A: Operator, precision: str, *, n: int | None = None
) -> tuple[Callable[[Tensor], Tensor], str]:
    """``X ↦ A X`` with products in ``precision``; returns ``(matmul, description)``.

    ``A`` is a dense tensor or a ``LinearOperator`` (its dtype decides):

    * float32: real low-precision products — ``"tf32"`` runs the product with TF32 matmuls and
      cuDNN convolutions allowed (CUDA; on a CPU it is plain float32), ``"bfloat16"`` /
      ``"float16"`` under ``torch.autocast`` on ``A``'s device;
    * float64: *emulated* — the input block and the product are rounded to ``precision``
      (:func:`round_to_precision`); no speed-up, but the error of a low-precision product, so a
      mixed solve can be checked against float64 on a CPU. ``description`` then ends in
      ``" (emulated)"``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"inner_precision: expected one of {PRECISIONS}, got {precision!r}")
    if not (isinstance(A, Tensor) or _is_linear_operator(A)):
        raise TypeError(
            f"A: low-precision products need a Tensor or a LinearOperator (its dtype decides "
            f"real or emulated products), got {type(A).__name__}"
        )
    matmul = as_matmul(A, n, name="A")
    if A.dtype == torch.float64:

        def emulated(X: Tensor) -> Tensor:
            return round_to_precision(matmul(round_to_precision(X, precision)), precision)

        return emulated, f"{precision} (emulated)"
    if A.dtype != torch.float32:
        raise ValueError(
            f"inner_precision: {precision!r} products need a float32 (real) or float64 "
            f"(emulated) operator, got {A.dtype}"
        )
    if precision == "tf32":

        def tf32(X: Tensor) -> Tensor:
            with _tf32():
                return matmul(X)

        # TF32 exists on CUDA only: elsewhere the products are plain float32 (recorded).
        return tf32, precision if A.device.type == "cuda" else f"tf32 (none on {A.device.type})"
    device_type, dtype = A.device.type, _AUTOCAST[precision]

    def autocast(X: Tensor) -> Tensor:
        try:
            with torch.autocast(device_type, dtype=dtype):
                return matmul(X)
        except RuntimeError as err:
            raise RuntimeError(
                f"inner_precision={precision!r}: a product under torch.autocast({precision}) "
                f"raised: {err}. Forward-mode AD through an eval-mode BatchNorm under autocast "
                "fails in torch (benchmarks/README.md, 'bf16: library defects'); for a model "
                "with BatchNorm use inner_precision='tf32' (or None)"
            ) from err

    return autocast, precision


def mixed_cg(
    A: Operator,
    B: Tensor,
    *,
    inner: Operator,
    precond: Any = None,
    x0: Tensor | None = None,
    tol: float = 1e-6,
    inner_tol: float = 1e-2,
    precision: str = "low-precision",
    max_iter: int | None = None,
    max_seconds: float | None = None,
    fallback: bool = True,
    strict: bool = True,
    scalar_dtype: torch.dtype = torch.float64,
    label: str = "A",
    progress: bool | None = None,
    allreduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, CGInfo]:
    """Solve ``A X = B`` by iterative refinement around low-precision PCG (module docstring).

    Args:
        A: the full-precision SPD operator (see :func:`~ntkscrub.solvers.as_matmul`): every
            residual ``b − A x`` is computed with it, in float64 (a Tensor/LinearOperator gets a
            float64 block and computes in its own dtype; the subtraction is float64).
        B: right-hand sides ``(n,)`` or ``(n, k)``; the inner solves' vectors have its dtype.
        inner: the same operator with cheap, inexact products (e.g. from
            :func:`low_precision_products`); a callable ``(n, k) -> (n, k)`` is fine.
        precond: preconditioner of the inner solves (as for :func:`~ntkscrub.solvers.cg`).
        x0: warm start with ``B``'s shape (one full-precision residual).
        tol: per-column relative *true* residual ``‖b − A x‖/‖b‖`` to reach.
        inner_tol: the first inner solve's relative residual η; a later round aims at
            ``max(inner_tol, ½ · the last round's contraction, ½ tol / current residual)``, at
            most ½ (no tighter than the products allow, nor than the outer tol needs).
        precision: the inner products' name in records and messages (``"bfloat16"``, ...).
        max_iter: iteration cap of each inner solve (default ``2n``).
        max_seconds: time budget of the whole solve (``None``: 300 s; with ``allreduce`` none).
        fallback: on stagnation or a non-finite low-precision product, finish with
            full-precision inner solves and warn (:class:`PrecisionFallbackWarning`); ``False``:
            stop (status ``"stalled"``) or raise the ``CGNonFinite``.
        strict, scalar_dtype, label, progress, allreduce: as for :func:`~ntkscrub.solvers.cg`.

    Returns:
        ``(X, info)``: ``X`` with ``B``'s shape and dtype (accumulated in float64, rounded at the
        end and its true residual recomputed when ``B`` is not float64); ``info`` a
        :class:`~ntkscrub.solvers.CGInfo` whose ``residuals`` are the true final residuals,
        ``inner_matvecs`` / ``outer_matvecs`` count low- and full-precision column-matvecs,
        ``refinements`` the rounds, ``history`` the worst true residual after each round,
        ``fallback`` whether the full-precision finish was needed.

    Raises:
        CGNotConverged: ``strict`` and some column missed ``tol`` (budget, negative curvature, or
            stagnation without ``fallback``); ``.x`` is the partial result.
        CGNonFinite: a product overflowed (e.g. float16 products of a large operator).
    """
    t_start = time.perf_counter()
    B = _check_tensor(B, "B")
    squeeze = B.dim() == 1
    B2 = B.unsqueeze(1) if squeeze else B
    n = B2.shape[0]
    if allreduce is not None:
        if max_seconds is not None and max_seconds != math.inf:
            raise ValueError("max_seconds: with allreduce give None (no time budget) or math.inf")
        max_seconds = math.inf
    max_iter, _, max_seconds = _check_cg_options(
        tol, max_iter, None, max_seconds, scalar_dtype, strict, True, None, label, n
    )
    if isinstance(inner_tol, bool) or not isinstance(inner_tol, (int, float)):
        raise TypeError(f"inner_tol: expected a number, got {type(inner_tol).__name__}")
    if not 0 < inner_tol < 1:
        raise ValueError(f"inner_tol: must be in (0, 1), got {inner_tol!r}")
    if not isinstance(fallback, bool):
        raise TypeError(f"fallback: expected a bool, got {type(fallback).__name__}")
    if x0 is not None:
        x0 = _check_tensor(x0, "x0")
        if x0.shape != B.shape:
            raise ValueError(f"x0: shape {tuple(x0.shape)} does not match B's {tuple(B.shape)}")
        x0 = x0.unsqueeze(1) if squeeze else x0
    run = _Refinement(
        A,
        as_matmul(inner, n, name="inner"),
        B2,
        x0,
        tol=float(tol),
        inner_tol=float(inner_tol),
        precision=str(precision),
        max_iter=max_iter,
        max_seconds=max_seconds,
        sd=scalar_dtype,
        label=label,
        progress=check_progress(progress),
        allreduce=allreduce,
        t_start=t_start,
    )
    run.solve(precond, fallback)
    info = run.info()
    X = run.X.to(B2.dtype)
    X = X.squeeze(1) if squeeze else X
    if info.message is not None:
        logger.info("%s", info.message)
        if strict:
            raise CGNotConverged(info.message, info, X)
        warn(info.message, RuntimeWarning)
    return X, info


class _Refinement:
    """The state of one :func:`mixed_cg` call."""

    def __init__(
        self,
        A: Operator,
        lo: Callable[[Tensor], Tensor],
        B2: Tensor,
        x0: Tensor | None,
        *,
        tol: float,
        inner_tol: float,
        precision: str,
        max_iter: int,
        max_seconds: float,
        sd: torch.dtype,
        label: str,
        progress: bool | None,
        allreduce: Callable[[Tensor], Tensor] | None,
        t_start: float,
    ) -> None:
        n, k = B2.shape
        f64 = torch.float64
        self.k, self.dtype, self.tol, self.inner_tol = k, B2.dtype, tol, inner_tol
        self.precision, self.max_iter, self.max_seconds = precision, max_iter, max_seconds
        self.sd, self.label, self.progress, self.allreduce = sd, label, progress, allreduce
        self.t_start = t_start
        self.hi = as_matmul(A, n, name="A")  # B's dtype: the inner solves after a fallback
        # Residuals in float64: a Tensor/LinearOperator computes in its own dtype, returns float64
        # (as_matmul casts); a callable gets B's dtype (it may not accept float64).
        self.hi64_input = isinstance(A, Tensor) or _is_linear_operator(A)
        self.lo = lo
        self.B64 = B2.to(f64)
        self.bnorm = self._norm(self.B64)  # (k,)
        self.X = torch.zeros_like(self.B64) if x0 is None else x0.to(f64, copy=True)
        nonzero = self.bnorm > 0
        self.X[:, ~nonzero] = 0
        self.nz = torch.nonzero(nonzero).flatten().tolist()
        self.rel = torch.zeros(k, dtype=f64)
        self.its = [0] * k
        self.inner_mv = self.outer_mv = self.calls = 0
        self.mv_time = 0.0
        self.rounds, self.restarts = 0, 0
        self.fell_back = False
        self.status = "converged"
        self.history: list[float] = []
        self.last_inner: CGInfo | None = None
        self.note: str | None = None
        self._precond: Any = None
        self.last_ratio: float | None = None

    def _norm(self, R: Tensor) -> Tensor:
        d = coldot(R, R, torch.float64)
        return (d if self.allreduce is None else self.allreduce(d)).sqrt()

    def residual(self, cols: list[int]) -> tuple[Tensor, Tensor]:
        """``b − A x`` for ``cols`` in float64 with the full-precision operator (one block
        matvec; none while x is still zero); returns ``(R (n, m), relative norms (m,))``."""
        sel = torch.tensor(cols, device=self.B64.device)
        Xs = self.X[:, sel]
        if bool(Xs.ne(0).any()) or self.allreduce is not None:
            t0 = time.perf_counter()
            AX = self.hi(Xs if self.hi64_input else Xs.to(self.dtype)).to(torch.float64)
            self.mv_time += time.perf_counter() - t0
            self.outer_mv += len(cols)
            self.calls += 1
            R = self.B64[:, sel] - AX
        else:
            R = self.B64[:, sel].clone()
        rel = self._norm(R) / self.bnorm[sel]
        if not bool(torch.isfinite(rel).all()):
            raise CGNonFinite(
                f"cg[{self.label}]: the full-precision residual b − A x is not finite",
                self.info(status="nonfinite"),
                self.X.to(self.dtype),
            )
        self.rel[sel.cpu()] = rel.cpu()
        return R, rel.cpu()

    def solve(self, precond: Any, fallback: bool) -> None:
        """Refinement rounds until every column's true residual is ≤ tol, or a stop."""
        self._precond = precond
        cols = list(self.nz)
        if not cols:
            return
        R, rel = self.residual(cols)
        self.history.append(float(rel.max()))
        while True:
            keep = [i for i in range(len(cols)) if float(rel[i]) > self.tol]
            if not keep:
                return
            sel = torch.tensor(keep, device=R.device)
            cols, R, rel = [cols[i] for i in keep], R[:, sel], rel[keep]
            if time.perf_counter() - self.t_start >= self.max_seconds:
                self.status = "max_seconds"
                return
            worst = float(rel.max())
            try:
                D, inner = self.correction(R, worst)
            except CGNonFinite as err:  # e.g. float16 products beyond 65504
                if self.fell_back or not fallback:
                    raise
                self.inner_mv += err.info.matvecs
                self._fall_back(f"a product overflowed or was NaN ({err.info.label})")
                continue
            sel = torch.tensor(cols, device=R.device)
            self.X[:, sel] += D
            for j, n_it in zip(cols, inner.iterations_per_column):
                self.its[j] += n_it
            R_new, rel_new = self.residual(cols)
            self.rounds += 1
            self.history.append(float(rel_new.max()))
            if inner.status in ("budget", "max_seconds", "max_matvecs", "not_positive_definite"):
                self.status = inner.status  # not a precision problem: report it as it is
                return
            ratio = rel_new / rel
            self.last_ratio = float(ratio.max())
            stagnant = [
                i
                for i in range(len(cols))
                if float(rel_new[i]) > self.tol and float(ratio[i]) > _STAGNATION
            ]
            # A low-precision correction that made the residual worse is undone (R, rel are still
            # valid). Not a full-precision one: CG's residual need not fall while its error does.
            worse = [i for i in range(len(cols)) if float(ratio[i]) > 1 and not self.fell_back]
            if worse:
                w = torch.tensor(worse, device=R.device)
                self.X[:, sel[w]] -= D[:, w]
                R_new[:, w], rel_new[worse] = R[:, w], rel[worse]
                self.rel[sel[w].cpu()] = rel[worse]
                self.history[-1] = float(rel_new.max())
            R, rel = R_new, rel_new
            if stagnant or self.rounds >= _MAX_ROUNDS * (2 if self.fell_back else 1):
                i = stagnant[0] if stagnant else int(rel.argmax())
                if self.fell_back or not fallback:
                    self.status = "stalled"
                    return
                self._fall_back(
                    f"stagnated at a true relative residual {float(rel[i]):.2e} > tol "
                    f"{self.tol:g} after {self.rounds} round(s) (the last round's residual ratio "
                    f"was {float(ratio[i]):.2f} > {_STAGNATION}: the products' error times the "
                    "condition number is too large)"
                )

    def correction(self, R: Tensor, worst: float) -> tuple[Tensor, CGInfo]:
        """One inner PCG solve ``A_lo D = R`` (``A_hi`` after a fallback) to η."""
        floor = self.inner_tol if not self.fell_back else 8 * torch.finfo(self.dtype).eps
        if self.last_ratio is not None and not self.fell_back:
            # The last round's contraction is ≈ η + (product error × κ): an inner solve far
            # below half of it buys nothing (measured 0–10 % fewer low-precision matvecs).
            floor = max(floor, min(0.5, 0.5 * self.last_ratio))
        eta = min(0.5, max(floor, 0.5 * self.tol / worst))
        left = self.max_seconds - (time.perf_counter() - self.t_start)
        what = "full precision, fallback" if self.fell_back else self.precision
        # CG is scale-invariant: unit-norm right-hand sides keep float16 products from
        # underflowing once the residual is small (its smallest subnormal is 6e-8).
        scale = self._norm(R).clamp_min(torch.finfo(torch.float64).tiny)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # judged by the true residual
            D, inner = cg(
                self.hi if self.fell_back else self.lo,
                (R / scale).to(self.dtype),
                precond=self._precond,
                tol=eta,
                strict=False,
                scalar_dtype=self.sd,
                max_seconds=math.inf if self.allreduce is not None else max(left, 1e-3),
                refine=False,
                label=f"{self.label} (inner, {what})",
                progress=self.progress,
                max_iter=self.max_iter,
                allreduce=self.allreduce,
            )
        if self.fell_back:
            self.outer_mv += inner.matvecs
        else:
            self.inner_mv += inner.matvecs
        self.calls += inner.block_matvecs
        self.mv_time += (inner.matvec_seconds or 0.0) * inner.matvecs
        self.restarts += inner.restarts
        self.last_inner = inner
        return D.to(torch.float64) * scale, inner

    def _fall_back(self, why: str) -> None:
        self.fell_back = True
        self.note = (
            f"cg[{self.label}]: mixed-precision refinement with {self.precision} products: "
            f"{why}; finishing with full-precision inner solves. For this system use "
            f"inner_precision=None or a finer precision."
        )
        warn(self.note, PrecisionFallbackWarning)

    def info(self, status: str | None = None) -> CGInfo:
        """The :class:`CGInfo` of the solve (true residuals; rounds in ``history``)."""
        if self.dtype != torch.float64 and self.nz and status is None:
            # The returned X is rounded to B's dtype: its own true residual is what counts.
            met = all(float(self.rel[j]) <= self.tol for j in self.nz)
            self.X = self.X.to(self.dtype).to(torch.float64)
            self.residual(self.nz)
            if met and any(float(self.rel[j]) > self.tol for j in self.nz):
                self.note = (
                    f"The float64 iterate met tol, but rounded to {self.dtype} it does not: "
                    f"tol is below what a {self.dtype} solution can represent (≈ eps·κ); "
                    f"solve in float64."
                )
        converged = [bool(self.rel[j] <= self.tol) for j in range(self.k)]
        status = status or ("converged" if all(converged) else self.status)
        if status == "converged" and not all(converged):
            status = "stalled"
        last = self.last_inner
        mv = self.inner_mv + self.outer_mv
        info = CGInfo(
            iterations=max(self.its) if self.its else 0,
            iterations_per_column=list(self.its),
            converged=converged,
            residuals=[float(self.rel[j]) for j in range(self.k)],
            matvecs=mv,
            block_matvecs=self.calls,
            seconds=time.perf_counter() - self.t_start,
            tol=self.tol,
            max_iter=int(self.max_iter),
            history=list(self.history),
            restarts=self.restarts,
            attainable=last.attainable if last is not None else 0.0,
            label=self.label,
            status=status,
            kappa=last.kappa if last is not None else None,
            eig_min=last.eig_min if last is not None else None,
            eig_max=last.eig_max if last is not None else None,
            matvec_seconds=self.mv_time / mv if mv else None,
            refinements=self.rounds,
            max_seconds=self.max_seconds,
            inner_precision=self.precision,
            inner_matvecs=self.inner_mv,
            outer_matvecs=self.outer_mv,
            fallback=self.fell_back,
        )
        if not all(converged) and status != "nonfinite":
            info.message = self._message(info)
        return info

    def _message(self, info: CGInfo) -> str:
        bad = [j for j in range(self.k) if not info.converged[j]]
        worst = max(info.residuals[j] for j in bad)
        parts = [
            f"cg[{self.label}]: mixed-precision solve ({self.precision} inner products, true "
            f"residual in full precision): {len(bad)} of {self.k} column(s) did not reach "
            f"tol={self.tol:g} (worst true relative residual {worst:.3e} after {info.refinements}"
            f" refinement round(s), {info.inner_matvecs} low-precision + {info.outer_matvecs} "
            f"full-precision matvecs, {info.seconds:.1f} s)."
        ]
        if self.note is not None and not self.fell_back:
            parts.append(self.note)
        elif info.status == "stalled":
            parts.append(
                "Refinement stagnated: a round no longer halved the residual"
                + (
                    " even with full-precision inner solves."
                    if self.fell_back
                    else " (fallback=False: no full-precision finish); the low precision is "
                    "too coarse for this system — use inner_precision=None or a finer one."
                )
            )
        elif info.status == "max_seconds":
            parts.append(f"Time budget exhausted (max_seconds={self.max_seconds:g}).")
        if self.last_inner is not None and self.last_inner.message and info.status != "stalled":
            parts.append(f"Last inner solve: {self.last_inner.message}")
        parts.append("The partial solution is attached (err.x / the returned X).")
        return " ".join(parts)
