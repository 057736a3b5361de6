"""The bounds' systems ``X = A⁻¹ B`` (one SPD ``A``), solved by the engine's one inverse operator.

Every solve of :mod:`ntkscrub.bounds` — the c·|D_r| dual system, the p×p primal system and the
explicit dense twin — goes through :class:`Inverse` here, which hands it to
:class:`ntkscrub.operators.Inverse` (PCG with a Nyström factor, or Cholesky): the budget, early
stop, diagnosis, refinement and records of the engine's solves apply to the bounds too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ntkscrub.bounds.config import BoundsConfig
from ntkscrub.config import SolverConfig
from ntkscrub.operators import Dense, Operator
from ntkscrub.operators import Inverse as _EngineInverse

__all__ = ["Inverse", "SymmetricProduct"]

_F64 = torch.float64


class SymmetricProduct(Operator):
    """A symmetric ``(n, n)`` operator ``A = shift·I + (PSD)`` given by its product ``A X``
    (the bounds' precision sF + δI and dual system; ``shift`` feeds the Nyström factor)."""

    symmetric = True

    def __init__(
        self,
        matmul: Callable[[Tensor], Tensor],
        n: int,
        *,
        shift: float,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__((n, n), dtype, device)
        self._product, self._shift = matmul, float(shift)

    def _mm(self, X: Tensor) -> Tensor:  # (n, k) -> (n, k)
        return self._product(X)

    _tmm = _mm

    def ridge_shift(self) -> float | None:
        return self._shift


def solver_config(config: BoundsConfig, *, dense: bool) -> SolverConfig:
    """The engine's :class:`~ntkscrub.config.SolverConfig` for the bounds' ``cg_*`` fields."""
    return SolverConfig(
        method="dense" if dense else "cg",
        tol=config.cg_tol,
        max_iter=config.cg_max_iter,
        strict=config.cg_strict,
        scalar_dtype=config.cg_scalar_dtype,
        inner_precision=config.cg_inner_precision,
        precond="nystrom" if config.precond_rank > 0 else "none",
        precond_rank=config.precond_rank,
        seed=0 if config.seed is None else config.seed,
        max_dense_bytes=2.0**62,  # the bounds refuse oversized dense problems themselves
    )


class Inverse:
    """``A⁻¹`` applied to columns, for one symmetric positive definite system of size ``n``.

    ``op`` (``(n, m) -> (n, m)`` products with ``A = shift·I + PSD``): PCG through the engine's
    :class:`~ntkscrub.operators.Inverse`, its Nyström factor (rank ``precond_rank``) built at the
    first solve and kept; one record per solve in :attr:`records`. ``dense`` (a callable
    returning the explicit A): Cholesky in float64, factored once (:meth:`cholesky`, for
    log-determinants). ``label`` names the system (``"dual"``, ``"primal"``).
    """

    def __init__(
        self,
        config: BoundsConfig,
        *,
        n: int,
        label: str,
        op: Callable[[Tensor], Tensor] | None = None,
        shift: float = 0.0,
        dense: Callable[[], Tensor] | None = None,
        allreduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if (op is None) == (dense is None):
            raise ValueError("Inverse: give exactly one of op= (CG) and dense= (Cholesky)")
        self.config, self.n, self.label = config, n, label
        self.op, self.shift, self._dense = op, shift, dense
        # Data-parallel bounds: CG's scalar reduction — the sum over the ranks for a row-sharded
        # A (the dual system), rank 0's value for a replicated one (the primal) — so every rank
        # takes the same steps and stops at the same iteration.
        self.allreduce = allreduce
        self._engine: _EngineInverse | None = None

    def _inverse(self, dtype: torch.dtype, device: torch.device) -> _EngineInverse:
        if self._engine is None:
            if self.op is None:
                A: Operator = Dense(self._dense().to(_F64), symmetric=True)  # type: ignore[misc]
            else:
                A = SymmetricProduct(self.op, self.n, shift=self.shift, dtype=dtype, device=device)
            cfg = solver_config(self.config, dense=self.op is None)
            self._engine = _EngineInverse(A, cfg, label=self.label, allreduce=self.allreduce)
        return self._engine

    def __call__(self, B: Tensor) -> Tensor:
        """``A⁻¹ B`` for ``B`` ``(n,)`` or ``(n, m)``, in ``B``'s dtype."""
        inv = self._inverse(B.dtype, B.device)
        return inv.solve(B.to(inv.dtype)).to(B.dtype)

    def cholesky(self) -> Tensor:
        """Lower Cholesky factor of the dense A ``(n, n)``, float64 (dense backend only)."""
        if self._dense is None:
            raise ValueError(f"Inverse({self.label}): cholesky() needs the dense backend")
        return self._inverse(_F64, torch.device("cpu")).cholesky()

    @property
    def preconditioner(self) -> Any:
        """The Nyström factor built at the first CG solve (``None`` before it, or without one)."""
        return None if self._engine is None else self._engine.preconditioner

    @property
    def records(self) -> list[dict[str, Any]]:
        """One record per CG solve: system, size, rhs, iterations, matvecs, max_residual,
        converged, seconds (dense solves are exact and not recorded)."""
        if self._engine is None:
            return []
        return [
            {
                "system": r["system"],
                "size": r["size"],
                "rhs": len(r["residuals"]),
                "iterations": r["iterations"],
                "matvecs": r["matvecs"],
                "max_residual": max(x for x in r["residuals"] if x is not None)
                if r["residuals"]
                else 0.0,
                "converged": r["converged"],
                "seconds": r["seconds"],
            }
            for r in self._engine.records
            if r.get("solver") == "cg"
        ]
