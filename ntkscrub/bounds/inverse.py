"""The one place where the bounds solve a linear system: ``X = A⁻¹ B`` for one SPD ``A``.

Every solve of :mod:`ntkscrub.bounds` — the c·|D_r| dual system, the p×p primal system and the
explicit dense twin — goes through :class:`Inverse`, so that a single swap (for the operator
layer's inverse operator) moves all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ntkscrub.bounds.config import BoundsConfig
from ntkscrub.solvers import NystromPreconditioner, cg

__all__ = ["Inverse"]

_F64 = torch.float64


class Inverse:
    """``A⁻¹`` applied to columns, for one symmetric positive definite system of size ``n``.

    Two backends, chosen by which of ``op`` / ``dense`` is given:

    * ``op`` (``(n, m) -> (n, m)`` products with A): PCG (:func:`ntkscrub.solvers.cg` with the
      config's ``cg_*`` fields), preconditioned by a rank-``precond_rank`` Nyström factor of A
      (``A = shift·I + PSD``) built on first use and kept; one record per solve in ``records``.
    * ``dense`` (a callable returning the explicit ``(n, n)`` A): Cholesky in float64, factored on
      first use and kept (:meth:`cholesky`, for log-determinants); no records.

    ``label`` names the system in the records (``"dual"``, ``"primal"``).
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
    ) -> None:
        if (op is None) == (dense is None):
            raise ValueError("Inverse: give exactly one of op= (CG) and dense= (Cholesky)")
        self.config, self.n, self.label = config, n, label
        self.op, self.shift, self._dense = op, shift, dense
        self._precond: NystromPreconditioner | None = None
        self._chol: Tensor | None = None
        self.records: list[dict[str, Any]] = []

    def __call__(self, B: Tensor) -> Tensor:
        """``A⁻¹ B`` for ``B`` ``(n,)`` or ``(n, m)``, in ``B``'s dtype."""
        if self.op is None:
            return torch.cholesky_solve(B.to(_F64), self.cholesky()).to(B.dtype)
        X, info = cg(self.op, B, precond=self._preconditioner(B), **self.config.cg_kwargs())
        self.records.append(
            {
                "system": self.label,
                "size": self.n,
                "rhs": B.shape[1] if B.dim() == 2 else 1,
                "iterations": info.iterations,
                "matvecs": info.matvecs,
                "max_residual": max(info.residuals) if info.residuals else 0.0,
                "converged": info.all_converged,
                "seconds": info.seconds,
            }
        )
        return X

    def cholesky(self) -> Tensor:
        """Lower Cholesky factor of the dense A ``(n, n)``, float64 (dense backend only)."""
        if self._dense is None:
            raise ValueError(f"Inverse({self.label}): cholesky() needs the dense backend")
        if self._chol is None:
            self._chol = torch.linalg.cholesky(self._dense().to(_F64))
        return self._chol

    def _preconditioner(self, B: Tensor) -> NystromPreconditioner | None:
        rank = min(self.config.precond_rank, self.n)
        if rank > 0 and self._precond is None:
            self._precond = NystromPreconditioner(
                self.op,
                self.n,
                rank,
                shift=self.shift,
                includes_shift=True,
                seed=self.config.seed,
                dtype=B.dtype,
                device=B.device,
            )
        return self._precond
