"""The projection P = I − J_rᵀ(Θ_rr + λI)⁻¹J_r off the span of the retain gradients (eq. 10).

P acts on parameter-space vectors ``(p,)`` / ``(p, k)``. With λ = 0 and J_r of full row rank it is
the orthogonal projection onto the null space of J_r (idempotent, ``P J_rᵀ = 0``); with λ > 0 it
equals λ(J_rᵀJ_r + λI)⁻¹, a contraction that is no longer idempotent. Each product costs one JVP
pass, one solve with Θ_rr + λI and one VJP pass.
"""

from __future__ import annotations

from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from ntkscrub.operators.jacobian import Jacobian, check_vector
from ntkscrub.operators.ntk import NTK

__all__ = ["Projection"]


class Projection(LinearOperator):
    """``P = I − J_rᵀ (Θ_rr + λI)⁻¹ J_r`` as a lazy ``(p, p)`` operator.

    Args:
        theta: the linearisation point ``(p,)`` (the operator's tensor representation).
        jac_r: the retain Jacobian ``J_r`` ``(c·N_r, p)``.
        ridge: λ ≥ 0.
        solver: ``"cg"`` (matrix-free PCG, :func:`ntkscrub.solvers.cg`) or ``"dense"`` (explicit
            Θ_rr and a Cholesky solve; small problems and tests).
        solver_options: keyword arguments for :func:`ntkscrub.solvers.cg` (``tol``, ``max_iter``,
            ``precond``, ``strict``). The info record of the latest solve is :attr:`last_info`.
    """

    def __init__(
        self,
        theta: Tensor,
        *,
        jac_r: Jacobian,
        ridge: float = 0.0,
        solver: str = "cg",
        solver_options: dict | None = None,
    ) -> None:
        if solver not in ("cg", "dense"):
            raise ValueError(f"solver: expected 'cg' or 'dense', got {solver!r}")
        self.jac_r, self.ridge, self.solver = jac_r, float(ridge), solver
        self.solver_options = dict(solver_options or {})
        self.ntk = NTK(theta, jac_a=jac_r, ridge=self.ridge)
        self.last_info: Any = None
        self._dense_chol: Tensor | None = None
        super().__init__(
            theta, jac_r=jac_r, ridge=ridge, solver=solver, solver_options=solver_options
        )

    def _size(self) -> torch.Size:
        return torch.Size((self.jac_r.p, self.jac_r.p))

    def _transpose_nonbatch(self) -> Projection:
        return self  # P is symmetric

    def solve_ntk(self, B: Tensor) -> Tensor:
        """``(Θ_rr + λI)⁻¹ B`` for ``B`` of shape ``(c·N_r,)`` or ``(c·N_r, k)``."""
        if self.solver == "dense":
            if self._dense_chol is None:
                self._dense_chol = torch.linalg.cholesky(self.ntk.dense())
            Bm = B.unsqueeze(1) if B.dim() == 1 else B
            X = torch.cholesky_solve(Bm, self._dense_chol)
            return X.squeeze(1) if B.dim() == 1 else X
        from ntkscrub.solvers import cg

        X, self.last_info = cg(self.ntk, B, **self.solver_options)
        return X

    def _matmul(self, rhs: Tensor) -> Tensor:
        check_vector(rhs, self.jac_r.p, self.jac_r.dtype, self.jac_r.device, "rhs")
        return rhs - self.jac_r.rmatvec(self.solve_ntk(self.jac_r.matvec(rhs)))

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:
        raise NotImplementedError("projection operators are not batched")

    def dense(self) -> Tensor:
        """The exact twin ``I − J_rᵀ(J_rJ_rᵀ + λI)⁻¹J_r`` from the explicit Jacobian."""
        J = self.jac_r.dense()
        K = J @ J.T + self.ridge * torch.eye(J.shape[0], dtype=J.dtype, device=J.device)
        return torch.eye(J.shape[1], dtype=J.dtype, device=J.device) - J.T @ torch.linalg.solve(
            K, J
        )
