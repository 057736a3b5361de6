"""The projection P = I − J_rᵀ(Θ_rr + λI)⁻¹J_r off the span of the retain gradients (eq. 10).

P acts on parameter-space vectors ``(p,)`` / ``(p, k)``. With λ = 0 and J_r of full row rank it is
the orthogonal projection onto the null space of J_r (idempotent, ``P J_rᵀ = 0``); with λ > 0 it
equals λ(J_rᵀJ_r + λI)⁻¹, a contraction that is no longer idempotent. It is a composition —
``I − J_r.mT @ Inverse(Θ_rr + λI) @ J_r`` — so each product costs one JVP pass, one solve (by the
:class:`~ntkscrub.operators.Inverse`, whose records it keeps) and one VJP pass, and
``to_dense()`` is the exact twin of the same graph.
"""

from __future__ import annotations

from ntkscrub.config import SolverConfig
from ntkscrub.operators.base import Identity, Operator
from ntkscrub.operators.inverse import Inverse
from ntkscrub.operators.jacobian import Jacobian
from ntkscrub.operators.ntk import NTK

__all__ = ["Projection"]


def Projection(  # noqa: N802 - a named constructor of the paper's P
    jac_r: Jacobian | Operator,
    *,
    ridge: float = 0.0,
    config: SolverConfig | None = None,
    inverse: Inverse | None = None,
) -> Operator:
    """``P = I − J_rᵀ (Θ_rr + λI)⁻¹ J_r`` as a lazy ``(p, p)`` operator.

    Args:
        jac_r: the retain Jacobian ``J_r`` ``(c·N_r, p)`` (possibly wrapped, e.g. counted).
        ridge: λ ≥ 0 of ``Θ_rr + λI`` (ignored when ``inverse`` is given).
        config: how the inner system is solved (:class:`~ntkscrub.config.SolverConfig`).
        inverse: an existing ``Inverse(Θ_rr + λI)`` to share (its preconditioner and records).
    """
    if not isinstance(jac_r, Operator):
        raise TypeError(f"jac_r: expected a Jacobian operator, got {type(jac_r).__name__}")
    if inverse is None:
        base = getattr(jac_r, "base", jac_r)
        inverse = Inverse(NTK(jac_a=base, ridge=ridge), config, label="P: Θ_rr")
    eye = Identity(jac_r.shape[1], dtype=jac_r.dtype, device=jac_r.device)
    return eye - jac_r.mT @ inverse @ jac_r
