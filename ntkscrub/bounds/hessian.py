"""The softmax output Hessian's square root H^½, block-diagonal over samples.

For cross-entropy the GGN/Fisher on D_r is ``F = J_rᵀ H J_r`` with ``H`` block-diagonal, one
``c×c`` block ``H_n = diag(π_n) − π_nπ_nᵀ`` per sample. The dual (Woodbury/NTK) form of
``Jₓ(sF + δI)⁻¹Jₓᵀ`` (REFERENCE.md §1) needs ``H^½`` so that its c·|D_r| system
``δ'I + H^½ J_r J_rᵀ H^½`` is symmetric. Rows of a ``(c·N, k)`` block are ordered ``n·c + j``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["softmax_hessian_sqrt", "hessian_sqrt_apply"]

_F64 = torch.float64


def softmax_hessian_sqrt(probs: Tensor) -> Tensor:
    """Symmetric square roots of the softmax Hessians ``H_n = diag(π_n) − π_nπ_nᵀ``: ``(N, c, c)``.

    H_n is PSD with rank c − 1 (``H_n 1 = 0``); its symmetric root ``V diag(√λ) Vᵀ`` comes from a
    batched c×c eigendecomposition in float64 (eigenvalues below 0 — rounding — are set to 0), so
    ``H^½ H^½ = H`` to rounding. Used by the dual form of Jₓ(F + δI)⁻¹Jₓᵀ (eq. 7, REFERENCE.md §1).
    """
    if not isinstance(probs, Tensor) or probs.dim() != 2:
        raise ValueError("probs: expected a tensor of shape (N, c)")
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
        raise ValueError("probs: must be finite and non-negative")
    p = probs.to(_F64)
    H = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    lam, V = torch.linalg.eigh(H)
    root = (V * lam.clamp_min(0.0).sqrt().unsqueeze(1)) @ V.mT
    return (0.5 * (root + root.mT)).to(probs.dtype)


def hessian_sqrt_apply(root: Tensor | None, U: Tensor, c: int) -> Tensor:
    """Apply the block-diagonal ``H^½`` to ``U`` ``(c·N,)`` or ``(c·N, k)`` (rows ``n·c + j``).

    ``root`` ``(N, c, c)`` from :func:`softmax_hessian_sqrt`, or ``None`` for ``H = I`` (MSE).
    """
    if root is None:
        return U
    single = U.dim() == 1
    u = U.reshape(root.shape[0], c, -1)
    out = torch.bmm(root.to(U.dtype), u)
    return out.reshape(U.shape) if single else out.reshape(-1, U.shape[1])
