"""Krylov recycling: a solve's search directions sharpen the preconditioner of the next solves.

Every CG iteration on ``(K + μI) x = b`` computes a product ``A p`` that is then thrown away. The
pairs ``(p, K p)`` with ``K p = A p − μ p`` are columns of a sketch of K as good as the random
Nyström sketch's ``(Ω, K Ω)``, and better aimed: CG's directions lie where the residual was, the
part of the spectrum the random sketch left unresolved. :class:`KrylovPairs` keeps them (no extra
product) and :func:`recycled` folds them into a low-rank factor ``K ≈ Û Λ̂ Ûᵀ``.

Why it is the Nyström approximation of the enlarged test matrix ``[Ω, W]``: with
``E = K − Û Λ̂ Ûᵀ ⪰ 0`` (any Nyström factor, restricted or congruent, stays below K), the Nyström
approximation of K from ``[Ω, W]`` is ``Û Λ̂ Ûᵀ + E W (Wᵀ E W)⁺ Wᵀ E`` (the K^½-projection onto the
larger span splits into the old one plus the projection onto its complement), and
``E W = K W − Û Λ̂ Ûᵀ W`` needs only the pairs. So Ω and its products need not be kept.

The augmented factor keeps only eigenvalues ≥ the old factor's smallest λ̂_r: the preconditioner
maps its span to λ̂_r + μ, and Ritz-like components below that floor are poorly resolved (their
E-error is of their own size). Without the floor (an ad-hoc probe while building this, the quick
preset's float64 Θ at w(D), rank-64 sketch) a later solve with a smooth right-hand side Θz took
22 iterations against 14 with the plain factor; with the floor 9.

Where it pays: ``scrub`` solves Θ_DD, then Θ_rr (its principal block, the factor restricted) to
tol and again warm to tol/amplification; a :class:`~ntkscrub.Scrubber` restricts the prepared
factor for every request; the cross-entropy Newton steps carry Θ's factor from step to step.
Measured (``benchmarks/recycle_study.py``, quick preset seed 2, tol 1e-3, rank-64 factor): on the
float64 replica the two retain solves took 45 → 35 CG iterations (paper form) and 128 → 84
(reference form), a fresh random right-hand side on Θ_DD 49 → 39 and 127 → 93; the float32
scrubs 166 → 151 products (paper form), 311 → 288 (reference form), 282 → 258 (CE Newton at
w(D)), each shift as far from the dense twin as before.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from ntkscrub._progress import logger
from ntkscrub.solvers.preconditioners import LowRankPreconditioner, stable_nystrom

__all__ = ["KrylovPairs", "recycled"]

# Columns of W whose QR pivot is below this fraction of the largest are dropped as dependent:
# EW R⁻¹ multiplies the products' rounding by cond(R). In the ad-hoc probe above 1e-3 and 1e-2
# gave the same iterations; 1e-8 made a later solve 5× slower.
_DEPENDENT = 1e-3


class KrylovPairs:
    """Search directions ``p`` and their products ``A p`` kept from CG iterations (the first
    ``capacity`` columns; later ones are dropped: the first directions carry the top of the
    residual's spectrum, where a factor's error is largest).

    ``add(P, AP)`` takes ``(n, m)`` blocks; :meth:`tensors` returns ``(W, AW)`` ``(n, k)``.
    """

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"capacity: must be an integer ≥ 0, got {capacity!r}")
        self.capacity = capacity
        self._W: list[Tensor] = []
        self._AW: list[Tensor] = []
        self.columns = 0

    def add(self, P: Tensor, AP: Tensor) -> None:
        room = self.capacity - self.columns
        if room <= 0 or P.shape[1] == 0:
            return
        self._W.append(P[:, :room].clone())
        self._AW.append(AP[:, :room].clone())
        self.columns += min(room, P.shape[1])

    def tensors(self) -> tuple[Tensor, Tensor]:
        return torch.cat(self._W, 1), torch.cat(self._AW, 1)


def recycled(
    M: LowRankPreconditioner, pairs: KrylovPairs, *, shifted: bool = True
) -> LowRankPreconditioner:
    """The factor ``M`` of ``K + μI`` (μ = ``M.shift``) augmented with CG's pairs
    ``(p, (K + μI) p)`` of that same system (``shifted=False``: pairs ``(p, K p)``, e.g. the Θ
    products of a cross-entropy Newton step, whose system is ``H^½ΘH^½ + λI``; see the module
    docstring): a new
    :class:`~ntkscrub.solvers.LowRankPreconditioner` of rank ≥ M's, with the same floor λ̂_r.
    ``M`` itself is not changed. O(n (r + k)²) flops, no product with K."""
    if pairs.columns == 0 or M.rank == 0:
        return M
    W, AW = pairs.tensors()
    eps = torch.finfo(AW.dtype).eps
    W, AW = W.to(torch.float64), AW.to(torch.float64)
    U, lam = M.U.to(W.device), M.eigenvalues.to(W.device)
    KW = AW - M.shift * W if shifted else AW
    EW = KW - U @ (lam.unsqueeze(1) * (U.T @ W))  # (n, k): E = K − Û Λ̂ Ûᵀ
    Q, R = torch.linalg.qr(W)
    pivot = R.diagonal().abs()
    keep = pivot > _DEPENDENT * pivot.max()
    Q, R = torch.linalg.qr(W[:, keep])
    tri = partial(torch.linalg.solve_triangular, R, upper=True, left=False)
    EQ, KQ = tri(EW[:, keep]), tri(KW[:, keep])  # E W R⁻¹, K W R⁻¹
    # The products' rounding is relative to K, not to E (E may be tiny when M already holds
    # these directions), amplified by R⁻¹ (≤ 1/_DEPENDENT): ν must cover it.
    noise = eps / _DEPENDENT * float(torch.linalg.norm(KQ))
    e_norm = float(torch.linalg.norm(EQ))
    if e_norm <= noise:  # nothing above rounding to add
        return M
    try:
        U2, lam2, _ = stable_nystrom(Q, EQ, noise / e_norm)
    except ValueError:  # not PSD even at ν ≫ rounding: the pairs are not K's; keep M
        logger.warning("recycle: the pairs are not products of the factor's system; not used")
        return M
    F = torch.cat([U * lam.sqrt(), U2 * lam2.sqrt()], 1)  # K̂' = F Fᵀ
    Uf, S, _ = torch.linalg.svd(F, full_matrices=False)
    ev = S**2
    kept = ev >= lam[-1]
    return LowRankPreconditioner(Uf[:, kept], ev[kept], M.shift)
