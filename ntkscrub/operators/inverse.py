"""The one inverse operator: ``A⁻¹`` as a lazy operator whose product is a solve.

:class:`Inverse` is where every system of scrub and of the projection P is solved, so solver
features (preconditioning, precision, refinement, records) land in one place:

* ``SolverConfig.method == "cg"``: preconditioned CG (:func:`ntkscrub.solvers.cg`) with a
  randomized Nyström factor (Frangella–Tropp–Udell 2023) built once per inverse from the same
  operator, through the single function :func:`pcg_solve`;
* ``SolverConfig.inner_precision``: the same PCG inside iterative refinement, its products in
  TF32 / bf16 / fp16 and every residual ``b − A x`` in full precision
  (:func:`ntkscrub.solvers.mixed_cg`); records add ``inner_precision``, ``inner_matvecs``
  (low precision), ``outer_matvecs`` (full precision) and ``fallback``;
* ``method == "dense"``: Cholesky of ``A.to_dense()`` (the exact twin of the same graph), cached.
  A singular or indefinite dense system raises, naming the system — no least-squares fallback.
  Below float64 the system is accumulated, factored and solved in float64 (:func:`dense_dtype`)
  and the solution returned in the operator's dtype.

Every solve appends a record to :attr:`Inverse.records` (system label, iterations, residuals,
matvecs, seconds, converged). A solve that misses its tolerance raises
:class:`SolveNotConverged` (a :class:`~ntkscrub.solvers.CGNotConverged`) naming the system, with
the partial result attached, unless ``strict=False`` (then a warning and ``converged=False``).
``logdet()`` is exact (Cholesky) when dense, else stochastic Lanczos quadrature.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from ntkscrub.config import SLQConfig, SolverConfig
from ntkscrub.operators.base import Operator, check_vector, dense_accumulation
from ntkscrub.operators.ntk import pivot_columns
from ntkscrub.solvers import (
    CGInfo,
    CGNotConverged,
    KrylovPairs,
    LowRankPreconditioner,
    PrecisionFallbackWarning,
    cg,
    low_precision_products,
    mixed_cg,
    nystrom_preconditioner,
    recycled,
)
from ntkscrub.solvers.mixed import DEFAULT_INNER_TOL

__all__ = ["Inverse", "SolveNotConverged", "DenseTooLarge", "krylov_pairs", "pcg_solve"]

# What a pivot column of an NTK costs in products, for the column sketch's cost rule: one JVP
# pass (and a VJP over the pivot samples alone) against a product's JVP + VJP passes — measured
# 26.5 s for 64 columns against 51 s for 64 products (quick preset, 2 CPU threads).
_PIVOT_COLUMN_COST = 0.5


class DenseTooLarge(MemoryError):
    """The dense path would need more memory than allowed (``SolverConfig.max_dense_bytes``)."""


class SolveNotConverged(CGNotConverged):
    """A solve of :class:`Inverse` missed its tolerance.

    Attributes:
        system: the label of the system (``"Θ_DD"``, ``"Θ_rr"``, ``"P: Θ_rr"``, ...).
        info: the :class:`~ntkscrub.solvers.CGInfo` of the solve.
        partial: the iterate reached, with the right-hand side's shape (the partial result).
        record: the solve record (also appended to the inverse's ``records``).
    """

    def __init__(
        self, message: str, info: CGInfo, *, system: str, partial: Tensor, record: dict
    ) -> None:
        super().__init__(message, info)
        self.system, self.partial, self.record = system, partial, record


def pcg_solve(
    A: Any,
    B: Tensor,
    *,
    config: SolverConfig,
    label: str,
    precond: LowRankPreconditioner | None,
    x0: Tensor | None = None,
    allreduce: Callable[[Tensor], Tensor] | None = None,
    krylov: KrylovPairs | None = None,
) -> tuple[Tensor, CGInfo]:
    """The single entry to :func:`ntkscrub.solvers.cg` (non-strict: the caller decides).

    CG's own budget, early stop and diagnosis (κ from its Lanczos coefficients, the ridge that
    would converge) run here; :class:`Inverse` turns a miss into :class:`SolveNotConverged`.
    With ``config.inner_precision`` the solve is :func:`ntkscrub.solvers.mixed_cg`: inner PCG
    with ``A``'s products in that precision (:func:`ntkscrub.solvers.low_precision_products`),
    true residuals with ``A`` itself. ``krylov`` keeps CG's (p, A p) pairs (not in a mixed
    solve, whose products are inexact).
    """
    common: dict[str, Any] = {
        "precond": precond,
        "x0": x0,
        "tol": config.tol_for(B.dtype),
        "max_iter": config.max_iter,
        "max_seconds": config.max_seconds,
        "progress": False if allreduce is not None else config.progress,
        "label": label,
        "scalar_dtype": config.scalar_dtype,
        "allreduce": allreduce,
        "strict": False,
    }
    with warnings.catch_warnings(record=True) as caught:
        # Inverse raises or warns about a miss itself, naming the system.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("always", PrecisionFallbackWarning)
        if config.inner_precision is None:
            out = cg(A, B, refine=config.refine, krylov=krylov, **common)
        else:
            lo, precision = low_precision_products(A, config.inner_precision, n=B.shape[0])
            inner_tol = config.inner_tol or DEFAULT_INNER_TOL[config.inner_precision]
            out = mixed_cg(A, B, inner=lo, inner_tol=inner_tol, precision=precision, **common)
    for w in caught:  # the rest (a fallback, torch's own) goes out again, to the caller's filters
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


def krylov_pairs(precond: Any, config: SolverConfig) -> KrylovPairs | None:
    """Where a solve preconditioned by ``precond`` keeps its products for recycling
    (``SolverConfig.recycle``: ``None`` — as many columns as the factor's rank), or ``None``
    when there is no factor, recycling is off, or the products are inexact (``inner_precision``)."""
    rank = getattr(precond, "rank", 0)
    if not rank or config.recycle == 0 or config.inner_precision is not None:
        return None
    return KrylovPairs(rank if config.recycle is None else config.recycle)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside ntkscrub (the
    user's call site), however deep the solve sits in the package."""
    import os
    import sys

    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg):
        frame, level = frame.f_back, level + 1
    return level


def dense_dtype(op: Operator) -> torch.dtype:
    """The dtype of an operator's dense system, Cholesky factor and solves: float64 unless the
    device has none (MPS). Measured on the quick preset (seed 2, float32, against the float64
    scrub): a float32 Θ = J Jᵀ and Cholesky left the reference form's shift 1.7e-3 off, float64
    accumulation and factor 9.0e-5 (paper form 6.2e-4 → 5.3e-4, its rest being ReLU kinks at
    θ0), for 26 → 39 s of the dense scrub (``benchmarks/results/cpu/dense_twin_precision/``)."""
    return op.dtype if op.device.type == "mps" else torch.float64


class Inverse(Operator):
    """``A⁻¹`` of a symmetric positive definite operator ``A`` ``(n, n)``, applied by solves.

    Args:
        A: the system (an ntkscrub operator, e.g. ``Θ_rr + λI``, or any square LinearOperator).
        config: the :class:`~ntkscrub.config.SolverConfig` (default: ``SolverConfig()``).
        label: the system's name in records and errors (``"Θ_rr"``).
        precond: a preconditioner to use instead of building one (e.g. a factor restricted
            from a larger system, :meth:`~ntkscrub.solvers.LowRankPreconditioner.restrict`).
        slq: the :class:`~ntkscrub.config.SLQConfig` of :meth:`logdet` (CG method).
        allreduce: data-parallel solves (:mod:`ntkscrub.distributed`): A and the right-hand
            sides hold this rank's rows, and CG's inner products are summed over the ranks by
            this function (then no time budget: the ranks must stop at the same iteration).

    ``Inverse(A) @ B`` is ``A⁻¹ B`` for ``B`` ``(n,)`` or ``(n, k)``; :meth:`solve` also takes a
    warm start. :attr:`preconditioner` is the Nyström factor built at the first CG solve (or the
    one given) and reused by every later solve; :attr:`records` lists the solves.
    """

    symmetric = True

    def __init__(
        self,
        A: LinearOperator,
        config: SolverConfig | None = None,
        *,
        label: str = "A",
        precond: LowRankPreconditioner | None = None,
        slq: SLQConfig | None = None,
        allreduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not isinstance(A, LinearOperator):
            raise TypeError(f"A: expected a LinearOperator, got {type(A).__name__}")
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"A: expected a square (n, n) operator, got {tuple(A.shape)}")
        config = SolverConfig() if config is None else config
        if not isinstance(config, SolverConfig):
            raise TypeError(f"config: expected a SolverConfig, got {type(config).__name__}")
        super().__init__(tuple(A.shape), A.dtype, A.device)
        self.A, self.config, self.label = A, config, str(label)
        self.slq = SLQConfig() if slq is None else slq
        self.children = (A,) if isinstance(A, Operator) else ()
        self.allreduce = allreduce
        self.last_info: CGInfo | None = None  # the CGInfo of the latest CG solve
        self.preconditioner: LowRankPreconditioner | None = precond
        self._precond_origin = "given" if precond is not None else None
        self._chol: Tensor | None = None
        self._dense_A: Tensor | None = None
        self.records: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ products
    def _mm(self, B: Tensor) -> Tensor:
        return self._solve_block(B, None)

    _tmm = _mm

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.solve(rhs)  # a partial result keeps the right-hand side's shape

    def solve(
        self, B: Tensor, left_tensor: Tensor | None = None, *, x0: Tensor | None = None
    ) -> Tensor:  # type: ignore[override]
        """``A⁻¹ B`` for ``B`` ``(n,)`` or ``(n, k)`` (``L A⁻¹ B`` with ``left_tensor``), starting
        CG from ``x0`` (B's shape) when given."""
        check_vector(B, self.shape[0], self.dtype, self.device, "B")
        if x0 is not None and x0.shape != B.shape:
            raise ValueError(f"x0: shape {tuple(x0.shape)} does not match B's {tuple(B.shape)}")
        single = B.dim() == 1
        try:
            X = self._solve_block(
                B.unsqueeze(1) if single else B,
                None if x0 is None else (x0.unsqueeze(1) if single else x0),
            )
        except SolveNotConverged as err:
            err.partial = err.partial.reshape(B.shape)
            raise
        X = X.squeeze(1) if single else X
        return X if left_tensor is None else left_tensor @ X

    def _solve_block(self, B: Tensor, x0: Tensor | None) -> Tensor:
        t0 = time.perf_counter()
        if self.config.method == "dense":
            return self._dense_solve(B, t0)
        return self._cg_solve(B, x0, t0)

    # ------------------------------------------------------------------ dense
    def _check_dense_memory(self) -> None:
        cap = self.config.max_dense_bytes
        n = self.shape[0]
        leaves = list(self.A.leaves()) if isinstance(self.A, Operator) else []
        sized = [
            (getattr(op, "name", type(op).__name__), op.dense_bytes())
            for op in leaves
            if hasattr(op, "dense_bytes")
        ]
        need = sum(b for _, b in sized) + n * n * torch.finfo(dense_dtype(self)).bits // 8
        if need > cap:
            parts = ", ".join(f"'{name}' {b / 2**20:,.1f} MiB" for name, b in sized)
            raise DenseTooLarge(
                f"solver='dense': {self.label} needs {need / 2**20:,.1f} MiB for its explicit "
                f"Jacobians ({parts}) and the {n}×{n} matrix, over max_dense_bytes = "
                f"{cap / 2**20:,.1f} MiB; use solver='cg'"
            )

    def cholesky(self) -> Tensor:  # type: ignore[override]
        """The lower Cholesky factor of ``A.to_dense()`` (cached); raises if A is not SPD."""
        if self._chol is None:
            Ad = self.dense_system()
            L, info = torch.linalg.cholesky_ex(Ad)
            if int(info) != 0:
                raise ValueError(
                    f"{self.label}: the dense system is singular or not positive definite "
                    f"(Cholesky failed at pivot {int(info)} of {Ad.shape[0]}); give a ridge > 0 "
                    "(or weight_decay) so that the system is solvable"
                )
            self._chol = L
        return self._chol

    def dense_system(self) -> Tensor:
        """``A.to_dense()`` symmetrised ``(n, n)``, cached; :class:`DenseTooLarge` when it and the
        explicit Jacobians behind it exceed ``max_dense_bytes`` (the one memory gate of every
        dense path)."""
        if self._dense_A is None:
            self._check_dense_memory()
            wide = dense_dtype(self)
            with dense_accumulation(wide):
                Ad = self.A.to_dense().to(wide)
            self._dense_A = 0.5 * (Ad + Ad.T)
        return self._dense_A

    def _dense_solve(self, B: Tensor, t0: float) -> Tensor:
        L = self.cholesky()
        Bw = B.to(L.dtype)
        X = torch.cholesky_solve(Bw, L)
        rel = (self._dense_A @ X - Bw).norm(dim=0) / Bw.norm(dim=0).clamp_min(1e-300)
        self.records.append(
            {
                "system": self.label,
                "solver": "dense",
                "size": self.shape[0],
                "rhs": B.shape[1],
                "max_residual": float(rel.max()),
                "converged": True,
                "seconds": time.perf_counter() - t0,
            }
        )
        return X.to(B.dtype)

    # ------------------------------------------------------------------ cg
    def build_preconditioner(self) -> dict[str, Any]:
        """Build the Nyström factor now (CG solves call it first; a no-op once built) and return
        its record fields (``precond``, ``precond_rank``, ``precond_matvecs``,
        ``precond_seconds``); ``{}`` when the configuration asks for none."""
        if self.preconditioner is not None:
            origin = self._precond_origin
            self._precond_origin = "reused"
            return {
                "precond": "nystrom (restricted from the previous system)"
                if origin == "given"
                else "nystrom (reused)",
                "precond_rank": self.preconditioner.rank,
                "precond_matvecs": 0,
                "precond_seconds": 0.0,
            }
        n = self.shape[0]
        rank = self.config.rank_for(n)
        if rank == 0 or self._precond_origin == "none":
            self._precond_origin = "none"
            return {}
        shift = self.A.ridge_shift() if isinstance(self.A, Operator) else None
        columns = pivot_columns(self.A) if self.config.precond in ("auto", "columns") else None
        by_columns = self.config.precond == "columns" or columns is not None
        M = nystrom_preconditioner(
            self.A,
            n,
            rank,
            shift=shift or 0.0,
            includes_shift=True,
            seed=self.config.seed,
            dtype=self.dtype,
            device=self.device,
            solves=self.config.precond_solves,
            tol=self.config.tol_for(self.dtype),
            progress=self.config.progress,
            sketch="columns" if by_columns else "gaussian",
            columns=columns,
            column_cost=_PIVOT_COLUMN_COST if columns is not None else 1.0,
        )
        self.preconditioner, self._precond_origin = M, "reused"
        kind = "nystrom" + (" columns" if by_columns else "")
        return {
            "precond": f"{kind} (adaptive rank)" if rank == "auto" else kind,
            "precond_rank": M.rank,
            "precond_matvecs": M.matvecs,
            "precond_seconds": M.seconds,
        }

    def _krylov(self) -> KrylovPairs | None:
        """Where this solve keeps its (p, A p) pairs for :meth:`_recycle`, or ``None``."""
        if self.allreduce is not None:  # the factor's rows are global, the pairs local
            return None
        return krylov_pairs(self.preconditioner, self.config)

    def _recycle(self, pairs: KrylovPairs | None) -> dict[str, Any]:
        """Augment the preconditioner with the solve's pairs, for the next solves with this
        inverse and whatever restricts its factor (:mod:`ntkscrub.solvers.recycle`)."""
        if pairs is None or pairs.columns == 0:
            return {}
        t0 = time.perf_counter()
        M = recycled(self.preconditioner, pairs)
        self.preconditioner = M
        return {"recycled_columns": pairs.columns, "recycled_rank": M.rank,
                "recycle_seconds": time.perf_counter() - t0}  # fmt: skip

    def _cg_solve(self, B: Tensor, x0: Tensor | None, t0: float) -> Tensor:
        build = self.build_preconditioner()
        pairs = self._krylov()
        X, info = pcg_solve(
            self.A,
            B,
            config=self.config,
            label=self.label,
            precond=self.preconditioner,
            x0=x0,
            allreduce=self.allreduce,
            krylov=pairs,
        )
        self.last_info = info
        rec = {"system": self.label, "solver": "cg", "size": self.shape[0], **build}
        rec.update(info.to_dict())
        rec.update(self._recycle(pairs))
        rec["converged_per_column"] = rec.pop("converged")
        rec["converged"] = info.all_converged
        rec["seconds_total"] = time.perf_counter() - t0
        self.records.append(rec)
        if not info.all_converged:
            message = f"{self.label}: {info.message}"
            if self.config.strict:
                raise SolveNotConverged(message, info, system=self.label, partial=X, record=rec)
            warnings.warn(message, RuntimeWarning, stacklevel=_caller_stacklevel())
        return X

    # ------------------------------------------------------------------ dense twin, logdet
    def to_dense(self) -> Tensor:  # type: ignore[override]
        """``(A.to_dense())⁻¹`` by Cholesky (small problems and tests)."""
        return torch.cholesky_inverse(self.cholesky()).to(self.dtype)

    def logdet(self) -> float:  # type: ignore[override]
        """``log det A``: exact by Cholesky when the method is dense, else SLQ (with the
        Gauss–Radau bracket when A is ``K + s·I`` with K PSD by construction)."""
        if self.config.method == "dense":
            return float(2.0 * torch.log(torch.diagonal(self.cholesky())).sum())
        if self.allreduce is not None:  # the local rows alone would give a wrong value
            raise ValueError(
                f"{self.label}: a row-sharded log det needs the rank's rows: use "
                "ntkscrub.distributed.sharded_slq_logdet"
            )
        from ntkscrub.solvers import slq_logdet

        shift = self.A.ridge_shift() if isinstance(self.A, Operator) else None
        est = slq_logdet(
            self.A,
            self.shape[0],
            probes=self.slq.probes,
            steps=min(self.slq.steps, self.shape[0]),
            seed=self.slq.seed,
            shift=shift,
        )
        self.records.append({"system": self.label, "solver": "slq", **est.to_dict()})
        return est.value

    def _inverse(self) -> Any:
        raise NotImplementedError(f"{self.label}: solving with an Inverse is a product with A")

    def __repr__(self) -> str:
        return f"Inverse({self.label}: {self.A!r})"
