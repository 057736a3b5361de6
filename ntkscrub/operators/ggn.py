"""The generalised Gauss–Newton (Fisher) matrix F = J_rᵀ H J_r on the retain set, matrix-free.

For a softmax output the Fisher information of the model's predictive distribution equals the
GGN: per sample, ``H = diag(π) − ππᵀ`` with ``π = softmax(f_θ(x))`` (``(c, c)``); for the MSE loss
``H = I``. ``F`` is ``(p, p)``; ``(F + δI) v`` costs one JVP and one VJP pass over D_r. It defines
the full-covariance noise Σ = α(F + δI)⁻¹ of Proposition 1 and eq. 11; :func:`ggn_diagonal` is the
diagonal Fisher used by the reference code's noise (exact expectation over y ~ p(y|x)).
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from ntkscrub.operators.jacobian import Jacobian, check_vector

__all__ = ["GGN", "output_hessian_apply", "ggn_diagonal"]


def output_hessian_apply(probs: Tensor | None, U: Tensor, c: int) -> Tensor:
    """Apply the block-diagonal output Hessian H to ``U`` ``(c·N,)`` or ``(c·N, k)``.

    ``probs`` ``(N, c)``: softmax probabilities (cross-entropy Hessian ``diag(π) − ππᵀ``), or
    ``None`` for the MSE loss (``H = I``).
    """
    if probs is None:
        return U
    single = U.dim() == 1
    u = U.reshape(probs.shape[0], c, -1)  # (N, c, k)
    pi = probs.unsqueeze(-1)  # (N, c, 1)
    out = pi * u - pi * (pi * u).sum(1, keepdim=True)
    return out.reshape(U.shape) if single else out.reshape(-1, U.shape[1])


class GGN(LinearOperator):
    """``F + δI = J_rᵀ H J_r + δI`` as a lazy ``(p, p)`` operator.

    Args:
        theta: the point ``(p,)`` where J_r and H are evaluated (the tensor representation).
        jac: the Jacobian ``J_r`` at ``theta``.
        loss: ``"ce"`` (softmax Hessian; the Fisher) or ``"mse"`` (``H = I``).
        damping: δ ≥ 0.
        probs: precomputed ``softmax(f_θ(D_r))`` ``(N, c)`` (computed when omitted).
    """

    def __init__(
        self,
        theta: Tensor,
        *,
        jac: Jacobian,
        loss: str = "ce",
        damping: float = 0.0,
        probs: Tensor | None = None,
    ) -> None:
        if loss not in ("ce", "mse"):
            raise ValueError(f"loss: expected 'ce' or 'mse', got {loss!r}")
        damping = float(damping)
        if not (damping >= 0.0 and damping != float("inf")):
            raise ValueError(f"damping: must be a finite number ≥ 0, got {damping}")
        if loss == "ce" and probs is None:
            probs = torch.softmax(jac.outputs(), dim=1)
        self.jac, self.loss, self.damping = jac, loss, damping
        self.probs = probs if loss == "ce" else None
        super().__init__(theta, jac=jac, loss=loss, damping=damping, probs=self.probs)

    def _size(self) -> torch.Size:
        return torch.Size((self.jac.p, self.jac.p))

    def _transpose_nonbatch(self) -> GGN:
        return self

    def _matmul(self, rhs: Tensor) -> Tensor:
        check_vector(rhs, self.jac.p, self.jac.dtype, self.jac.device, "rhs")
        out = self.jac.rmatvec(output_hessian_apply(self.probs, self.jac.matvec(rhs), self.jac.c))
        return out + self.damping * rhs if self.damping else out

    def _diagonal(self) -> Tensor:
        return ggn_diagonal(self.jac, self.probs) + self.damping

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:
        raise NotImplementedError("GGN operators are not batched")

    def dense(self) -> Tensor:
        """The exact twin ``J_rᵀ H J_r + δI`` from the explicit Jacobian (small problems only)."""
        J = self.jac.dense()
        F = J.T @ output_hessian_apply(self.probs, J, self.jac.c)
        return F + self.damping * torch.eye(J.shape[1], dtype=J.dtype, device=J.device)


def ggn_diagonal(jac: Jacobian, probs: Tensor | None = None, *, chunk: int = 8) -> Tensor:
    """``diag(J_rᵀ H J_r)`` ``(p,)`` from explicit per-sample Jacobian blocks.

    With the softmax Hessian this is the diagonal Fisher ``Σ_x E_{y~p(y|x)} (∂ log p(y|x)/∂θ)²``,
    the exact expectation over classes. Memory: ``chunk·c·p`` per block.
    """
    c = jac.c
    out = torch.zeros(jac.p, dtype=jac.dtype, device=jac.device)
    for r0, r1, block in jac.dense_rows(chunk):
        b = (r1 - r0) // c
        Jb = block.reshape(b, c, -1)  # (b, c, p)
        if probs is None:
            out += (Jb * Jb).sum((0, 1))
        else:
            pi = probs[r0 // c : r1 // c].unsqueeze(-1)  # (b, c, 1)
            out += (pi * Jb * Jb).sum((0, 1)) - ((pi * Jb).sum(1) ** 2).sum(0)
    return out
