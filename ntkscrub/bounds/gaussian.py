"""Gaussian algebra of Proposition 1: the KL between two Gaussians and its convention string.

Proposition 1 measures the information left about D_f as the KL between the scrubbed Gaussian
``N(μs, Σ)`` (h(w_D) plus noise) and the baseline ``N(μ0, Σ0)`` (w_Dr plus noise):

    KL = ½ [ (μ0 − μs)ᵀ Σ0⁻¹ (μ0 − μs) + tr(Σ0⁻¹ Σ) − k + log|Σ0| − log|Σ| ]      (nats).

The paper prints ``Δwᵀ Σ0⁻¹ Δw + d(Σ, Σ0)`` with ``d = tr(ΣΣ0⁻¹) + log|ΣΣ0⁻¹| − k``: no ½, and the
log term with the wrong sign. Every result carries :data:`CONVENTION` and reports ``kl`` (nats),
``two_kl`` (the paper's scale, sign fixed), ``paper_printed`` (the printed expression, comparison
only: not a KL, can be negative) and, where cheap, ``reference_two_kl`` — the reference code's
``Σ (μ1−μ0)²/v0 + v1/v0 − log(v1/v0) − 1`` called with (scrubbed, retrained), which is
``2·KL(N(w_Dr, Σ0) ‖ N(h(w_D), Σ))``, the *reversed* KL.

Everything here is float64 and small (k up to a few thousand); the matrix-free terms of the white
box are in :mod:`ntkscrub.bounds.covariance`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ntkscrub._validation import check_number

__all__ = [
    "CONVENTION",
    "assemble",
    "blockwise_kl",
    "dense_kl",
    "diag_terms",
    "gaussian_kl",
    "gaussian_kl_diag",
    "kl_terms",
]

_F64 = torch.float64

CONVENTION = (
    "kl = KL(N(mu_s, Sigma) || N(mu_0, Sigma0)) in nats = 1/2 [quadratic + trace_minus_k "
    "- logdet_ratio], with quadratic = (mu_0 - mu_s)^T Sigma0^-1 (mu_0 - mu_s), trace_minus_k = "
    "tr(Sigma0^-1 Sigma) - k, logdet_ratio = log|Sigma Sigma0^-1|; (mu_s, Sigma) = scrubbed "
    "h(w_D), (mu_0, Sigma0) = baseline w_Dr (Proposition 1). The paper's printed "
    "d(Sigma, Sigma0) has +log|Sigma Sigma0^-1| and no 1/2: paper_printed = quadratic + "
    "trace_minus_k + logdet_ratio "
    "(comparison only, not a KL); two_kl = 2*kl; reference_two_kl = the reference code's number "
    "sum (mu1-mu0)^2/v0 + v1/v0 - log(v1/v0) - 1 with (mu0, v0) scrubbed, (mu1, v1) retrained, "
    "i.e. 2*KL(N(mu_0, Sigma0) || N(mu_s, Sigma)) (reversed direction)."
)

# Relative jitter levels tried, in order, when a dense covariance is not numerically positive
# definite (Cholesky fails): the same absolute τ = level · mean(diag) is added to *both*
# covariances, so that identical inputs still give KL = 0.
_JITTER_LEVELS = (1e-12, 1e-10, 1e-8, 1e-6)


def kl_terms(
    mu_p: Tensor, S_p: Tensor, mu_q: Tensor, S_q: Tensor, jitter: float, names: tuple[str, str]
) -> tuple[dict[str, Tensor], float]:
    """Batched ``KL(N(mu_p, S_p) ‖ N(mu_q, S_q))`` terms in float64.

    ``mu_*`` ``(..., k)``, ``S_*`` ``(..., k, k)``. Returns per-batch tensors ``quadratic``,
    ``trace_minus_k``, ``logdet_ratio`` (= log|S_p| − log|S_q|) and the absolute jitter used.
    """
    mu_p, mu_q = mu_p.to(_F64), mu_q.to(_F64)
    S_p = 0.5 * (S_p.to(_F64) + S_p.to(_F64).mT)
    S_q = 0.5 * (S_q.to(_F64) + S_q.to(_F64).mT)
    k = S_p.shape[-1]
    eye = torch.eye(k, dtype=_F64, device=S_p.device)
    scale = max(
        float(torch.diagonal(S_p, dim1=-2, dim2=-1).abs().mean()),
        float(torch.diagonal(S_q, dim1=-2, dim2=-1).abs().mean()),
        torch.finfo(_F64).tiny,
    )
    levels = [float(jitter)] + [lv for lv in _JITTER_LEVELS if lv > jitter]
    for level in levels:
        tau = level * scale
        L_p, info_p = torch.linalg.cholesky_ex(S_p + tau * eye)
        L_q, info_q = torch.linalg.cholesky_ex(S_q + tau * eye)
        if not bool(info_p.any()) and not bool(info_q.any()):
            break
    else:
        bad = names[1] if bool(info_q.any()) else names[0]
        raise ValueError(
            f"{bad}: covariance is not positive definite even with a relative jitter of "
            f"{levels[-1]:g} (Cholesky failed)"
        )
    d = (mu_q - mu_p).unsqueeze(-1)  # (..., k, 1)
    a = torch.linalg.solve_triangular(L_q, d, upper=False)
    quad = (a * a).sum((-2, -1))
    # tr(S_q⁻¹ S_p) = ‖L_q⁻¹ L_p‖_F²; subtract k per element of the diagonal (M_ii² − 1) first so
    # that the rounding of a near-identity M does not swamp a small trace difference.
    M = torch.linalg.solve_triangular(L_q, L_p, upper=False)
    diag = torch.diagonal(M, dim1=-2, dim2=-1)
    off = (M * M).sum((-2, -1)) - (diag * diag).sum(-1)
    trace_minus_k = off + ((diag - 1.0) * (diag + 1.0)).sum(-1)
    logdet_ratio = 2.0 * (
        torch.log(torch.diagonal(L_p, dim1=-2, dim2=-1))
        - torch.log(torch.diagonal(L_q, dim1=-2, dim2=-1))
    ).sum(-1)
    return {"quadratic": quad, "trace_minus_k": trace_minus_k, "logdet_ratio": logdet_ratio}, tau


def assemble(quadratic: float, trace_minus_k: float, logdet_ratio: float, k: int) -> dict[str, Any]:
    """The KL and its companions from the three terms of Proposition 1 (see :data:`CONVENTION`)."""
    kl = 0.5 * (quadratic + trace_minus_k - logdet_ratio)
    return {
        "kl": kl,
        "two_kl": 2.0 * kl,
        "paper_printed": quadratic + trace_minus_k + logdet_ratio,
        "quadratic": quadratic,
        "trace": k + trace_minus_k,
        "trace_minus_k": trace_minus_k,
        "logdet_ratio": logdet_ratio,
        "k": k,
        "convention": CONVENTION,
    }


def _check_mean_cov(mu: Any, S: Any, mu_name: str, S_name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(mu, Tensor) or not isinstance(S, Tensor):
        bad = mu_name if not isinstance(mu, Tensor) else S_name
        raise TypeError(f"{bad}: expected a tensor")
    if mu.dim() != 1 or mu.numel() == 0:
        raise ValueError(f"{mu_name}: expected a non-empty vector (k,), got {tuple(mu.shape)}")
    k = mu.shape[0]
    if S.shape != (k, k):
        raise ValueError(f"{S_name}: expected shape ({k}, {k}), got {tuple(S.shape)}")
    for t, n in ((mu, mu_name), (S, S_name)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{n}: contains NaN or infinite values")
    return mu, S


def gaussian_kl(
    mu0: Tensor, Sigma0: Tensor, mu1: Tensor, Sigma1: Tensor, *, jitter: float = 0.0
) -> dict[str, Any]:
    """``KL(N(mu0, Sigma0) ‖ N(mu1, Sigma1))`` in nats for small dense covariances (float64).

    Argument order is that of ``torch.distributions.kl_divergence(p, q)``: the first Gaussian is p,
    the second q. For Proposition 1 call ``gaussian_kl(μ_s, Σ, μ_0, Σ0)`` — scrubbed first,
    baseline second — which gives
    ``½[(μ0−μs)ᵀΣ0⁻¹(μ0−μs) + tr(Σ0⁻¹Σ) − k + log|Σ0| − log|Σ|]``. (The reference code's
    ``kl_divergence_fisher(mu0, var0, mu1, var1)`` uses the opposite order: its (mu0, var0) is q.)

    Args:
        mu0, Sigma0: mean ``(k,)`` and covariance ``(k, k)`` of p (symmetrised).
        mu1, Sigma1: mean ``(k,)`` and covariance ``(k, k)`` of q.
        jitter: relative jitter ``τ/mean(diag)`` added to both covariances (default 0). If a
            Cholesky factorisation fails, 1e-12, 1e-10, 1e-8, 1e-6 are tried in turn; the
            absolute jitter used is returned as ``jitter``.

    Returns:
        a dict: ``kl``, ``two_kl``, ``paper_printed``, ``quadratic`` (= (mu1−mu0)ᵀΣ1⁻¹(mu1−mu0)),
        ``trace`` (= tr(Σ1⁻¹Σ0)), ``trace_minus_k``, ``logdet_ratio`` (= log|Σ0Σ1⁻¹|), ``k``,
        ``reference_two_kl`` (= 2·KL(q ‖ p)), ``jitter``, ``convention``.
    """
    mu0, Sigma0 = _check_mean_cov(mu0, Sigma0, "mu0", "Sigma0")
    mu1, Sigma1 = _check_mean_cov(mu1, Sigma1, "mu1", "Sigma1")
    if mu1.shape != mu0.shape:
        raise ValueError(f"mu1: shape {tuple(mu1.shape)} does not match mu0 {tuple(mu0.shape)}")
    jitter = check_number(jitter, "jitter")
    return dense_kl(mu0, Sigma0, mu1, Sigma1, jitter, ("Sigma0", "Sigma1"))


def dense_kl(
    mu_p: Tensor, S_p: Tensor, mu_q: Tensor, S_q: Tensor, jitter: float, names: tuple[str, str]
) -> dict[str, Any]:
    """:func:`gaussian_kl` without the input checks: ``mu_*`` ``(k,)``, ``S_*`` ``(k, k)``.

    The reversed KL (``reference_two_kl``) uses the same absolute jitter τ as the forward one.
    """
    t, tau = kl_terms(mu_p, S_p, mu_q, S_q, jitter, names)
    r, _ = kl_terms(mu_q, S_q, mu_p, S_p, tau / _diag_scale(S_p, S_q), names[::-1])
    out = assemble(
        *(float(t[n]) for n in ("quadratic", "trace_minus_k", "logdet_ratio")), k=mu_p.shape[0]
    )
    out["reference_two_kl"] = float(r["quadratic"] + r["trace_minus_k"] - r["logdet_ratio"])
    out["jitter"] = tau
    return out


def blockwise_kl(
    mu_s: Tensor, C_s: Tensor, mu_r: Tensor, C_r: Tensor, jitter: float
) -> dict[str, Any]:
    """KL of each block alone: ``mu_*`` ``(k, c)``, ``C_*`` ``(k, c, c)`` -> summary statistics.

    Used for one query at a time (eq. 7 with k = 1, Fig. 3): ``values`` (k,), their mean, std,
    stderr, median and max, and the means of ``two_kl``, ``reference_two_kl``, ``paper_printed``.
    """
    t, tau = kl_terms(mu_s, C_s, mu_r, C_r, jitter, ("scrubbed", "reference"))
    r, _ = kl_terms(mu_r, C_r, mu_s, C_s, jitter, ("reference", "scrubbed"))
    kl = 0.5 * (t["quadratic"] + t["trace_minus_k"] - t["logdet_ratio"])
    ref2 = r["quadratic"] + r["trace_minus_k"] - r["logdet_ratio"]
    printed = t["quadratic"] + t["trace_minus_k"] + t["logdet_ratio"]
    n = kl.numel()
    return {
        "n": n,
        "mean": float(kl.mean()),
        "std": float(kl.std()) if n > 1 else 0.0,
        "stderr": float(kl.std() / math.sqrt(n)) if n > 1 else float("nan"),
        "median": float(kl.median()),
        "max": float(kl.max()),
        "values": kl.tolist(),
        "two_kl_mean": float(2.0 * kl.mean()),
        "reference_two_kl_mean": float(ref2.mean()),
        "paper_printed_mean": float(printed.mean()),
        "jitter": tau,
        "convention": CONVENTION,
    }


def _diag_scale(A: Tensor, B: Tensor) -> float:
    return max(
        float(torch.diagonal(A.to(_F64)).abs().mean()),
        float(torch.diagonal(B.to(_F64)).abs().mean()),
        torch.finfo(_F64).tiny,
    )


def diag_terms(mu_p: Tensor, v_p: Tensor, mu_q: Tensor, v_q: Tensor) -> dict[str, Tensor]:
    """Elementwise terms of ``KL(N(mu_p, diag v_p) ‖ N(mu_q, diag v_q))`` (float64, unsummed)."""
    mu_p, v_p, mu_q, v_q = (t.to(_F64) for t in (mu_p, v_p, mu_q, v_q))
    d = mu_q - mu_p
    rel = (v_p - v_q) / v_q  # v_p/v_q − 1 without the cancellation of forming the ratio first
    return {"quadratic": d * d / v_q, "trace_minus_k": rel, "logdet_ratio": torch.log1p(rel)}


def gaussian_kl_diag(mu0: Tensor, var0: Tensor, mu1: Tensor, var1: Tensor) -> dict[str, Any]:
    """``KL(N(mu0, diag var0) ‖ N(mu1, diag var1))`` in nats, summed over all elements.

    Same argument order and returned keys as :func:`gaussian_kl` (any common shape; float64
    sums). For Proposition 1 call ``gaussian_kl_diag(h(w_D), v_scrubbed, w_Dr, v_retrained)``; then
    ``reference_two_kl`` is exactly the reference code's printed information
    ``Σ (w_Dr − h)²/v_s + v_r/v_s − log(v_r/v_s) − 1 = 2·KL(N(w_Dr, v_r) ‖ N(h, v_s))``.
    """
    ts = {"mu0": mu0, "var0": var0, "mu1": mu1, "var1": var1}
    for n, t in ts.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{n}: expected a tensor, got {type(t).__name__}")
        if t.shape != mu0.shape:
            raise ValueError(f"{n}: shape {tuple(t.shape)} does not match mu0 {tuple(mu0.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{n}: contains NaN or infinite values")
    if mu0.numel() == 0:
        raise ValueError("mu0: empty")
    for n in ("var0", "var1"):
        if not bool((ts[n] > 0).all()):
            raise ValueError(f"{n}: variances must be > 0")
    t = diag_terms(mu0, var0, mu1, var1)
    r = diag_terms(mu1, var1, mu0, var0)
    out = assemble(
        *(float(t[n].sum()) for n in ("quadratic", "trace_minus_k", "logdet_ratio")), k=mu0.numel()
    )
    out["reference_two_kl"] = float((r["quadratic"] + r["trace_minus_k"] - r["logdet_ratio"]).sum())
    out["jitter"] = 0.0
    return out
