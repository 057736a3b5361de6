"""The generalised Gauss–Newton (Fisher) matrix F = J_rᵀ H J_r on the retain set, matrix-free.

For a softmax output the Fisher information of the model's predictive distribution equals the
GGN: per sample, ``H = diag(π) − ππᵀ`` with ``π = softmax(f_θ(x))`` (``(c, c)``); for the MSE loss
``H = I``. ``F`` is ``(p, p)``; ``(F + δI) v`` costs one JVP and one VJP pass over D_r. F and the
dual system ``H^½ J_r J_rᵀ H^½ + δI`` are compositions of the Jacobian with
:class:`OutputHessian`. It defines
the full-covariance noise Σ = α(F + δI)⁻¹ of Proposition 1 and eq. 11; :func:`ggn_diagonal` is the
diagonal Fisher used by the reference code's noise (exact expectation over y ~ p(y|x)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ntkscrub.operators.base import Operator
from ntkscrub.operators.jacobian import Jacobian

__all__ = ["GGN", "Dual", "OutputHessian", "output_hessian_apply", "ggn_diagonal"]


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


class OutputHessian(Operator):
    """The block-diagonal output Hessian ``H`` (or its square root ``H^½``), ``(c·N, c·N)``.

    Per sample ``H_n = diag(π_n) − π_n π_nᵀ`` (softmax cross-entropy; PSD) from ``probs``
    ``(N, c)``; ``probs=None`` means the MSE loss, ``H = I``. ``power=0.5`` gives the symmetric
    PSD root ``H^½`` (by a per-sample eigen-decomposition), used by the dual form
    ``H^½ J Jᵀ H^½ + δI``; ``power=-0.5`` the pseudo-inverse root ``H^{+½}`` (per block,
    eigenvalues ≤ eps(dtype)·the block's largest, or ≤ the absolute ``floor``, are treated as
    zero: ``H_n 1 = 0`` always, and a class with probability below eps carries no curvature the
    dtype can resolve). ``H^½ H^{+½}`` is then the orthogonal projector onto the kept
    eigen-directions; what it leaves out of a vector is the caller's to handle (see
    :func:`ntkscrub.shifts.ce_newton_fit`).
    """

    symmetric = True
    psd = True

    def __init__(
        self,
        probs: Tensor | None,
        c: int,
        n: int,
        *,
        power: float = 1.0,
        floor: float = 0.0,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if power not in (1.0, 0.5, -0.5):
            raise ValueError(f"power: expected 1, 0.5 or -0.5, got {power!r}")
        if not (isinstance(floor, (int, float)) and 0.0 <= floor < math.inf):
            raise ValueError(f"floor: expected a finite number ≥ 0, got {floor!r}")
        super().__init__((c * n, c * n), dtype, device)
        self.probs, self.c, self.power = probs, c, float(power)
        self.blocks: Tensor | None = None  # (N, c, c) explicit blocks, when probs are given
        if probs is not None:
            pi = probs.to(dtype)
            H = torch.diag_embed(pi) - pi.unsqueeze(2) * pi.unsqueeze(1)  # (N, c, c)
            if power != 1.0:
                lam, V = torch.linalg.eigh(H.double())
                root = lam.clamp_min(0.0).sqrt()
                if power < 0:
                    rel = torch.finfo(dtype).eps * lam.amax(1, keepdim=True)
                    keep = lam > rel.clamp_min(float(floor))
                    root = torch.where(keep, 1.0 / root.clamp_min(1e-300), 0.0)
                H = ((V * root.unsqueeze(1)) @ V.mT).to(dtype)
            self.blocks = H

    def _mm(self, X: Tensor) -> Tensor:
        if self.blocks is None:
            return X
        if self.power == 1.0:
            return output_hessian_apply(self.probs, X, self.c)
        u = X.reshape(self.blocks.shape[0], self.c, -1)  # (N, c, k)
        return (self.blocks @ u).reshape(X.shape)

    _tmm = _mm

    def to_dense(self) -> Tensor:  # type: ignore[override]
        if self.blocks is None:
            return torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return torch.block_diag(*self.blocks)

    def sandwich_diagonal(self, jac: Any) -> Tensor | None:
        """``diag(Jᵀ H J)`` from explicit row blocks (the diagonal Fisher), or None."""
        if self.power != 1.0 or not isinstance(jac, Jacobian):
            return None
        return ggn_diagonal(jac, self.probs)


def _probs(jac: Jacobian, loss: str, probs: Tensor | None) -> Tensor | None:
    if loss not in ("ce", "mse"):
        raise ValueError(f"loss: expected 'ce' or 'mse', got {loss!r}")
    if loss == "mse":
        return None
    return torch.softmax(jac.outputs(), dim=1) if probs is None else probs


def _damping(damping: Any) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(f"damping: expected a number, got {type(damping).__name__}")
    damping = float(damping)
    if not (damping >= 0.0 and damping != float("inf")):
        raise ValueError(f"damping: must be a finite number ≥ 0, got {damping}")
    return damping


def GGN(  # noqa: N802 - a named constructor of the paper's F
    theta: Tensor | None = None,
    *,
    jac: Jacobian,
    loss: str = "ce",
    damping: float = 0.0,
    probs: Tensor | None = None,
) -> Operator:
    """``F + δI = J_rᵀ H J_r + δI`` as the composition ``(J.mT @ (H @ J)).add_diagonal(δ)``.

    Args:
        theta: optional, checked against ``jac.theta`` (older call sites pass it).
        jac: the Jacobian ``J_r`` ``(c·N_r, p)`` at θ.
        loss: ``"ce"`` (softmax Hessian; the Fisher) or ``"mse"`` (``H = I``).
        damping: δ ≥ 0.
        probs: precomputed ``softmax(f_θ(D_r))`` ``(N, c)`` (computed when omitted).

    Returns a ``(p, p)`` operator; ``to_dense()`` is ``J_dᵀ H_d J_d + δI`` from the explicit twins.
    """
    if not isinstance(jac, Jacobian):
        raise TypeError(f"jac: expected a Jacobian, got {type(jac).__name__}")
    damping = _damping(damping)
    if theta is not None and not torch.equal(theta, jac.theta):
        raise ValueError("theta: differs from the Jacobian's linearisation point")
    H = OutputHessian(_probs(jac, loss, probs), jac.c, jac.n, dtype=jac.dtype, device=jac.device)
    return (jac.mT @ (H @ jac)).add_diagonal(damping)


def Dual(  # noqa: N802 - a named constructor
    *,
    jac: Jacobian,
    loss: str = "ce",
    damping: float = 0.0,
    probs: Tensor | None = None,
) -> Operator:
    """The dual (Woodbury / NTK) system ``H^½ J_r J_rᵀ H^½ + δI``, ``(c·N_r, c·N_r)``.

    ``J (JᵀHJ + δI)⁻¹ Jᵀ`` is expressed through it (REFERENCE.md §1, a GP posterior covariance).
    Returned as the composition ``(X @ X.mT).add_diagonal(δ)`` with ``X = H^½ @ J``.
    """
    if not isinstance(jac, Jacobian):
        raise TypeError(f"jac: expected a Jacobian, got {type(jac).__name__}")
    damping = _damping(damping)
    root = OutputHessian(
        _probs(jac, loss, probs), jac.c, jac.n, power=0.5, dtype=jac.dtype, device=jac.device
    )
    X = root @ jac
    return (X @ X.mT).add_diagonal(damping)


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
