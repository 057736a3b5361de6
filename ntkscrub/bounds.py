"""Information bounds of Gaussian scrubbing (Proposition 1, eq. 6–7), matrix-free.

Proposition 1 compares the scrubbed weights ``S(w_D) = h(w_D) + n``, ``n ~ N(0, Σ)`` with the
baseline ``S0(w_Dr) = w_Dr + n'``, ``n' ~ N(0, Σ0)`` (the model retrained on D_r plus noise):

* white box (eq. 6): ``KL(N(h(w_D), Σ) ‖ N(w_Dr, Σ0))`` in the p weights, ``Δw = h(w_D) − w_Dr``;
* black box (eq. 7): ``KL(N(f_h(x), Σₓ) ‖ N(f_ref(x), Σ'ₓ))`` in the c·k outputs of k queries x,
  ``Σₓ = Jₓ Σ Jₓᵀ`` with ``Jₓ`` at h(w_D) and ``Σ'ₓ = Jₓ Σ0 Jₓᵀ`` with ``Jₓ`` at w_Dr (eq. 5).

Conventions (see :data:`CONVENTION`; repeated in every returned dict). The Gaussian KL is

    KL = ½ [ (μ0 − μs)ᵀ Σ0⁻¹ (μ0 − μs) + tr(Σ0⁻¹ Σ) − k + log|Σ0| − log|Σ| ]      (nats).

The paper prints ``Δwᵀ Σ0⁻¹ Δw + d(Σ, Σ0)`` with ``d = tr(ΣΣ0⁻¹) + log|ΣΣ0⁻¹| − k``: no ½, and
the log term with the wrong sign (the KL has ``− log|ΣΣ0⁻¹|``). We report ``kl`` (the KL, nats),
``two_kl`` (= 2·KL, the paper's scale with the sign fixed), ``paper_printed`` (the printed
expression, for comparison only — it is not a KL and can be negative) and, where it is cheap,
``reference_two_kl``: the number the public reference code prints,
``Σ (μ1−μ0)²/v0 + v1/v0 − log(v1/v0) − 1`` called with (scrubbed, retrained), which is
``2·KL(N(w_Dr, Σ0) ‖ N(h(w_D), Σ))`` — the *reversed* KL.

Covariances. ``kind="diag"`` is the reference code's noise (REFERENCE.md §2): the diagonal Fisher
on D_r (exact expectation over y ~ p(y|x), averaged over D_r) turned into a variance by
:func:`ntkscrub.scrub.fisher_noise_variance` (``α/(F + 1e-8)`` with its clamps and averaging), Σ at
the scrubbed weights and Σ0 the same recipe at the retrained weights — as the reference, which
computes each model's Fisher on the retain set and compares the two diagonal Gaussians.
``kind="full"`` is ``Σ = α(F + δI)⁻¹`` with ``F`` the GGN/Fisher ``J_rᵀ H J_r`` on D_r (divided by
|D_r| for ``reduction="mean"``, the reference's scale, default) at h(w_D), ``Σ0`` the same at w_Dr.
Only the linearised parameters (``params``) carry noise; everything else is each model's own.

Full white box, never forming a p×p matrix (A = sF + δI at h(w_D), A0 at w_Dr, s = 1 or 1/|D_r|):

* quadratic ``Δwᵀ Σ0⁻¹ Δw = Δwᵀ A0 Δw / α`` — one GGN product;
* ``tr(Σ0⁻¹ Σ) − p = tr((A0 − A) A⁻¹)`` by Hutchinson (Rademacher probes, CG solves with A); written
  as a difference so that it is exactly 0 when the models coincide and its variance scales with
  the difference, not with p;
* ``log|Σ0| − log|Σ| = log|A| − log|A0|`` by SLQ (:func:`ntkscrub.solvers.slq_logdet`, shift δ since
  A = δI + PSD) with the *same* probes for both (common random numbers): the per-probe differences
  give the estimate and its standard error.
Standard errors: trace and log-det use independent probes, so their variances add (independence
assumed, by construction); the quadratic term is deterministic up to solver tolerance.

Full black box: ``Jₓ A⁻¹ Jₓᵀ`` by the Woodbury / NTK dual form (REFERENCE.md §1), with δ' = δ/s,

    Jₓ A⁻¹ Jₓᵀ = (1/δ) (Θ_xx − Θ_xr H^½ (δ'I + H^½ Θ_rr H^½)⁻¹ H^½ Θ_rx)     (GP posterior),

computed as ``(1/δ) Jₓ (G − J_rᵀ H^½ Y)``, ``G = Jₓᵀ``, ``Y = (δ'I + H^½ J_r J_rᵀ H^½)⁻¹ H^½ J_r G``
(a c·|D_r| square CG solve for the c·k columns) — so neither Θ_rx nor Θ_xx is stored.
``form="primal"`` solves with A in parameter space instead (no subtraction: safer in float32 at
small δ'). H^½ is the symmetric square root of each sample's ``diag(π) − ππᵀ``
(:func:`softmax_hessian_sqrt`).

``solver="dense"`` is the exact twin (explicit Jacobians, p×p matrices): small problems and tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ntkscrub._validation import check_choice, check_int, check_number
from ntkscrub.batches import as_batches
from ntkscrub.operators.ggn import GGN, ggn_diagonal, output_hessian_apply
from ntkscrub.operators.jacobian import Jacobian
from ntkscrub.params import ParameterSpace, check_eval_mode
from ntkscrub.scrub import fisher_noise_variance
from ntkscrub.solvers.lanczos import rademacher

__all__ = [
    "CONVENTION",
    "gaussian_kl",
    "gaussian_kl_diag",
    "softmax_hessian_sqrt",
    "hessian_sqrt_apply",
    "output_covariance",
    "white_box",
    "black_box",
    "per_query_information",
    "information_bounds",
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


# =========================================================================== dense Gaussian KL
def _kl_terms(
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


def _assemble(
    quadratic: float, trace_minus_k: float, logdet_ratio: float, k: int
) -> dict[str, Any]:
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
    t, tau = _kl_terms(mu0, Sigma0, mu1, Sigma1, jitter, ("Sigma0", "Sigma1"))
    r, _ = _kl_terms(
        mu1, Sigma1, mu0, Sigma0, tau / _diag_scale(Sigma0, Sigma1), ("Sigma1", "Sigma0")
    )
    out = _assemble(
        *(float(t[n]) for n in ("quadratic", "trace_minus_k", "logdet_ratio")), k=mu0.shape[0]
    )
    out["reference_two_kl"] = float(r["quadratic"] + r["trace_minus_k"] - r["logdet_ratio"])
    out["jitter"] = tau
    return out


def _diag_scale(A: Tensor, B: Tensor) -> float:
    return max(
        float(torch.diagonal(A.to(_F64)).abs().mean()),
        float(torch.diagonal(B.to(_F64)).abs().mean()),
        torch.finfo(_F64).tiny,
    )


def _diag_terms(mu_p: Tensor, v_p: Tensor, mu_q: Tensor, v_q: Tensor) -> dict[str, Tensor]:
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
    t = _diag_terms(mu0, var0, mu1, var1)
    r = _diag_terms(mu1, var1, mu0, var0)
    out = _assemble(
        *(float(t[n].sum()) for n in ("quadratic", "trace_minus_k", "logdet_ratio")), k=mu0.numel()
    )
    out["reference_two_kl"] = float((r["quadratic"] + r["trace_minus_k"] - r["logdet_ratio"]).sum())
    out["jitter"] = 0.0
    return out


# =========================================================================== output Hessian H^½
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


# =========================================================================== validation helpers


class _Options:
    """Validated options shared by the public functions."""

    def __init__(
        self,
        *,
        alpha: Any,
        delta: Any,
        kind: Any,
        reduction: Any,
        loss: Any,
        solver: Any,
        form: Any,
        batch_size: Any,
        query_batch: Any,
        probes: Any,
        steps: Any,
        seed: Any,
        cg_options: Any,
        precond_rank: Any,
        fisher_options: Any,
        jitter: Any,
        params: Any,
    ) -> None:
        self.alpha = check_number(alpha, "alpha", positive=True)
        self.delta = check_number(delta, "delta")
        self.kind = check_choice(kind, "kind", ("diag", "full"))
        if self.kind == "full" and self.delta == 0.0:
            raise ValueError(
                "delta: must be > 0 for kind='full' (F is singular when p > c·|D_r|, and SLQ "
                "needs A = δI + PSD with δ > 0)"
            )
        self.reduction = check_choice(reduction, "reduction", ("mean", "sum"))
        self.loss = check_choice(loss, "loss", ("ce", "mse"))
        self.solver = check_choice(solver, "solver", ("cg", "dense"))
        self.form = check_choice(form, "form", ("dual", "primal"))
        self.batch_size = check_int(batch_size, "batch_size")
        self.query_batch = check_int(query_batch, "query_batch")
        self.probes = check_int(probes, "probes", 2)
        self.steps = check_int(steps, "steps")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
        self.seed = seed
        if cg_options is not None and not isinstance(cg_options, Mapping):
            raise TypeError("cg_options: expected a dict of keyword arguments for solvers.cg")
        self.cg_options = dict(cg_options or {})
        unknown = set(self.cg_options) - {"tol", "max_iter", "strict", "scalar_dtype"}
        if unknown:
            raise ValueError(f"cg_options: unknown keys {sorted(unknown)}")
        self.precond_rank = check_int(precond_rank, "precond_rank", 0)
        if fisher_options is not None and not isinstance(fisher_options, Mapping):
            raise TypeError("fisher_options: expected a dict (see scrub.fisher_noise_variance)")
        self.fisher_options = dict(fisher_options or {})
        self.jitter = check_number(jitter, "jitter")
        self.params = params

    def describe(self) -> dict[str, Any]:
        out = {
            "kind": self.kind,
            "alpha": self.alpha,
            "delta": self.delta if self.kind == "full" else None,
            "reduction": self.reduction,
            "loss": self.loss,
            "solver": self.solver,
        }
        if self.kind == "full" and self.solver == "cg":
            out["form"] = self.form
        if self.kind == "diag":
            out["fisher_options"] = dict(self.fisher_options)
        return out


# =========================================================================== one side
class _Side:
    """One model of the comparison (scrubbed h(w_D) or retrained w_Dr) and its noise covariance.

    Holds the flat linearised weights θ ``(p,)``, the retain Jacobian ``J_r`` ``(c·N_r, p)`` at θ,
    the softmax probabilities and H^½ on D_r, and either the diagonal variance ``v`` ``(p,)``
    (``kind="diag"``) or what is needed to apply ``A = sF + δI`` and ``A⁻¹`` (``kind="full"``).
    The model is only read.
    """

    def __init__(self, model: nn.Module, name: str, retain: Any, opts: _Options) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}: expected an nn.Module, got {type(model).__name__}")
        check_eval_mode(model, name)
        try:
            self.space = ParameterSpace(model, opts.params)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        self.name, self.opts = name, opts
        self.theta = self.space.point()
        self.counts = {"retain_jvp": 0, "retain_vjp": 0, "query_jvp": 0, "query_vjp": 0}
        self.J_r = Jacobian(
            self.space, retain, at=self.theta, batch_size=opts.batch_size, name="retain"
        )
        self.c, self.n_r, self.p = self.J_r.c, self.J_r.n, self.space.p
        out = self.J_r.outputs()
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"{name}: outputs on the retain set are not finite")
        self.probs = torch.softmax(out, dim=1) if opts.loss == "ce" else None
        self.root = softmax_hessian_sqrt(self.probs) if self.probs is not None else None
        self.s = 1.0 / self.n_r if opts.reduction == "mean" else 1.0
        self.delta = opts.delta
        self.var: Tensor | None = None
        if opts.kind == "diag":
            # The reference's Fisher: exact expectation over classes, averaged over D_r (or summed),
            # then the reference's variance recipe (clamps, averaging over inputs, ×10 head/1-D).
            diag = ggn_diagonal(self.J_r, self.probs) * self.s
            var = fisher_noise_variance(
                self.space.unflatten(diag), opts.alpha, self.c, **opts.fisher_options
            )
            self.var = self.space.flatten(var)
            if not bool((self.var > 0).all()) or not bool(torch.isfinite(self.var).all()):
                raise ValueError(f"{name}: the diagonal noise variance is not finite and > 0")
        self._precond: dict[str, Any] = {}
        self._dense: dict[str, Tensor] = {}
        self.cg_records: list[dict] = []

    # ------------------------------------------------------------------ counted products
    def jvp_r(self, V: Tensor) -> Tensor:
        self.counts["retain_jvp"] += 1 if V.dim() == 1 else V.shape[1]
        return self.J_r.matvec(V)

    def vjp_r(self, U: Tensor) -> Tensor:
        self.counts["retain_vjp"] += 1 if U.dim() == 1 else U.shape[1]
        return self.J_r.rmatvec(U)

    def ggn(self, V: Tensor) -> Tensor:
        """``s · J_rᵀ H J_r V``: ``(p, k) -> (p, k)``."""
        return self.s * self.vjp_r(output_hessian_apply(self.probs, self.jvp_r(V), self.c))

    def precision(self, V: Tensor) -> Tensor:
        """``A V = (sF + δI) V`` (full) — the precision α Σ⁻¹ of the noise."""
        return self.ggn(V) + self.delta * V

    def dual(self, U: Tensor) -> Tensor:
        """``(δ'I + H^½ J_r J_rᵀ H^½) U`` with δ' = δ/s: ``(c·N_r, k) -> (c·N_r, k)``."""
        hu = hessian_sqrt_apply(self.root, U, self.c)
        return self.delta / self.s * U + hessian_sqrt_apply(
            self.root, self.jvp_r(self.vjp_r(hu)), self.c
        )

    # ------------------------------------------------------------------ solves with A
    def _cg(
        self, op: Callable[[Tensor], Tensor], n: int, B: Tensor, shift: float, label: str
    ) -> Tensor:
        from ntkscrub.solvers import NystromPreconditioner, cg

        M = None
        rank = min(self.opts.precond_rank, n)
        if rank > 0:
            if label not in self._precond:
                self._precond[label] = NystromPreconditioner(
                    op,
                    n,
                    rank,
                    shift=shift,
                    includes_shift=True,
                    seed=self.opts.seed,
                    dtype=B.dtype,
                    device=B.device,
                )
            M = self._precond[label]
        X, info = cg(op, B, precond=M, **self.opts.cg_options)
        self.cg_records.append(
            {
                "system": label,
                "size": n,
                "rhs": B.shape[1] if B.dim() == 2 else 1,
                "iterations": info.iterations,
                "matvecs": info.matvecs,
                "max_residual": max(info.residuals) if info.residuals else 0.0,
                "converged": info.all_converged,
                "seconds": info.seconds,
            }
        )
        return X

    def solve_precision(self, R: Tensor) -> Tensor:
        """``A⁻¹ R`` for ``R`` ``(p, m)``: Woodbury dual (``form="dual"``) or CG on A."""
        if self.opts.form == "primal":
            return self._cg(self.precision, self.p, R, self.delta, "primal")
        # A⁻¹ = (1/δ)(I − Gᵀ(δ'I + GGᵀ)⁻¹G), G = H^½ J_r, δ' = δ/s (REFERENCE.md §1).
        B = hessian_sqrt_apply(self.root, self.jvp_r(R), self.c)
        Y = self._cg(self.dual, self.c * self.n_r, B, self.delta / self.s, "dual")
        return (R - self.vjp_r(hessian_sqrt_apply(self.root, Y, self.c))) / self.delta

    # ------------------------------------------------------------------ dense twins
    def dense_precision(self) -> Tensor:
        """Explicit ``A = sF + δI`` ``(p, p)`` (small p only)."""
        if "A" not in self._dense:
            F = GGN(self.theta, jac=self.J_r, loss=self.opts.loss, probs=self.probs).dense()
            A = self.s * F + self.delta * torch.eye(self.p, dtype=F.dtype, device=F.device)
            self._dense["A"] = 0.5 * (A + A.T)
        return self._dense["A"]

    def dense_cholesky(self) -> Tensor:
        if "L" not in self._dense:
            self._dense["L"] = torch.linalg.cholesky(self.dense_precision().to(_F64))
        return self._dense["L"]

    # ------------------------------------------------------------------ Σ applied to columns
    def apply_sigma(self, G: Tensor) -> Tensor:
        """``Σ G`` for parameter-space columns ``G`` ``(p, m)`` (Σ = diag(v) or α A⁻¹)."""
        if self.var is not None:
            return self.var.unsqueeze(1) * G
        if self.opts.solver == "dense":
            X = torch.cholesky_solve(G.to(_F64), self.dense_cholesky()).to(G.dtype)
            return self.opts.alpha * X
        return self.opts.alpha * self.solve_precision(G)

    # ------------------------------------------------------------------ query covariances
    def query_jacobian(self, X: Tensor, name: str) -> Jacobian:
        return Jacobian(self.space, X, at=self.theta, batch_size=self.opts.batch_size, name=name)

    def output_moments(self, X: Tensor, name: str, joint: bool) -> tuple[Tensor, Tensor]:
        """Mean ``f_θ(x)`` ``(k, c)`` and covariance ``Jₓ Σ Jₓᵀ`` of the k queries ``X``.

        ``joint=True``: the full ``(c·k, c·k)`` covariance (rows ``n·c + j``); ``False``: its k
        diagonal blocks ``(k, c, c)`` (one query at a time; no cross-query products).
        """
        k, c = X.shape[0], self.c
        J_all = self.query_jacobian(X, name) if joint else None
        if J_all is not None and J_all.c != c:
            raise ValueError(f"{self.name}: has {J_all.c} outputs on the queries, expected {c}")
        means, cov = [], None
        if joint:
            cov = torch.empty(c * k, c * k, dtype=self.space.dtype, device=self.space.device)
        else:
            cov = torch.empty(k, c, c, dtype=self.space.dtype, device=self.space.device)
        dense = self.opts.solver == "dense"
        Jx_dense = J_all.dense() if (dense and J_all is not None) else None
        for j0 in range(0, k, self.opts.query_batch):
            Xj = X[j0 : j0 + self.opts.query_batch]
            b = Xj.shape[0]
            Jj = self.query_jacobian(Xj, name)
            f = Jj.outputs()
            if not bool(torch.isfinite(f).all()):
                raise ValueError(f"{self.name}: outputs on '{name}' are not finite")
            means.append(f)
            if dense:
                G = Jj.dense().T  # (p, c·b) explicit Jₓᵀ
            else:
                E = torch.eye(c * b, dtype=self.space.dtype, device=self.space.device)
                self.counts["query_vjp"] += c * b
                G = Jj.rmatvec(E)  # (p, c·b): Jₓᵀ applied to the unit columns
            W = self.apply_sigma(G)  # Σ Jₓᵀ columns
            if joint:
                assert J_all is not None
                if Jx_dense is not None:
                    cols = Jx_dense @ W
                else:
                    self.counts["query_jvp"] += c * b
                    cols = J_all.matvec(W)
                cov[:, c * j0 : c * (j0 + b)] = cols
            else:
                blk = G.T @ W if dense else Jj.matvec(W)
                if not dense:
                    self.counts["query_jvp"] += c * b
                blk = blk.reshape(b, c, b, c)
                cov[j0 : j0 + b] = torch.diagonal(blk, dim1=0, dim2=2).permute(2, 0, 1)
        cov = 0.5 * (cov + cov.mT)
        return torch.cat(means), cov

    def matvecs(self) -> float:
        """Retain column products (one JVP + one VJP over D_r each) spent so far."""
        return 0.5 * (self.counts["retain_jvp"] + self.counts["retain_vjp"])


def _prepare(
    scrubbed: nn.Module, reference: nn.Module, retain: Any, opts: _Options
) -> tuple[_Side, _Side]:
    """Build both sides and check that they are comparable (names, shapes, dtype, c)."""
    for m, n in ((scrubbed, "scrubbed"), (reference, "reference")):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{n}: expected an nn.Module, got {type(m).__name__}")
    check_eval_mode(scrubbed, "scrubbed")
    check_eval_mode(reference, "reference")
    ss = _Side(scrubbed, "scrubbed", retain, opts)
    ss.space.check_compatible(reference, "reference")  # ValueError naming 'reference'
    sr = _Side(reference, "reference", retain, opts)
    if sr.space.names != ss.space.names:
        raise ValueError(
            "reference: linearises other parameters than scrubbed; is it the same architecture?"
        )
    if sr.space.dtype != ss.space.dtype or sr.space.device != ss.space.device:
        raise ValueError(
            f"reference: parameters are {sr.space.dtype} on {sr.space.device}, scrubbed's are "
            f"{ss.space.dtype} on {ss.space.device}"
        )
    if sr.c != ss.c:
        raise ValueError(f"reference: has {sr.c} outputs, scrubbed has {ss.c}")
    return ss, sr


def _stack_inputs(data: Any, name: str, side: _Side) -> Tensor:
    """All inputs of a query set as one tensor ``(k, *input_shape)`` (query sets are small)."""
    b = as_batches(
        data,
        batch_size=side.opts.batch_size,
        name=name,
        device=side.space.device,
        dtype=side.space.dtype,
    )
    return torch.cat([x for x, _ in b])


def _query_sets(queries: Any, name: str = "queries") -> dict[str, Any]:
    if isinstance(queries, Mapping):
        if not queries:
            raise ValueError(f"{name}: no query sets given")
        for key in queries:
            if not isinstance(key, str):
                raise TypeError(f"{name}: set names must be strings, got {type(key).__name__}")
        return dict(queries)
    return {name: queries}


def _counts(ss: _Side, sr: _Side) -> dict[str, Any]:
    return {
        "matvecs": ss.matvecs() + sr.matvecs(),
        "matvecs_scrubbed": ss.matvecs(),
        "matvecs_reference": sr.matvecs(),
        "query_jvp_columns": ss.counts["query_jvp"] + sr.counts["query_jvp"],
        "query_vjp_columns": ss.counts["query_vjp"] + sr.counts["query_vjp"],
    }


def _cg_summary(ss: _Side, sr: _Side) -> dict[str, Any] | None:
    recs = ss.cg_records + sr.cg_records
    if not recs:
        return None
    return {
        "solves": len(recs),
        "max_iterations": max(r["iterations"] for r in recs),
        "max_residual": max(r["max_residual"] for r in recs),
        "all_converged": all(r["converged"] for r in recs),
        "matvecs": sum(r["matvecs"] for r in recs),
        "seconds": sum(r["seconds"] for r in recs),
    }


# =========================================================================== white box
def _white(ss: _Side, sr: _Side, opts: _Options) -> dict[str, Any]:
    t0 = time.perf_counter()
    dw = ss.theta - sr.theta  # Δw = h(w_D) − w_Dr over the linearised parameters
    p = ss.p
    if opts.kind == "diag":
        assert ss.var is not None and sr.var is not None
        out = gaussian_kl_diag(ss.theta, ss.var, sr.theta, sr.var)
        # Per-tensor breakdown, as the reference prints it per layer.
        t = _diag_terms(ss.theta, ss.var, sr.theta, sr.var)
        kl_el = 0.5 * (t["quadratic"] + t["trace_minus_k"] - t["logdet_ratio"])
        per = {n: float(v.sum()) for n, v in ss.space.unflatten(kl_el).items()}
        out.update({"stderr": 0.0, "two_kl_stderr": 0.0, "per_tensor_kl": per})
    elif opts.solver == "dense":
        A = ss.dense_precision().to(_F64)
        A0 = sr.dense_precision().to(_F64)
        d = dw.to(_F64)
        quad = float(d @ (A0 @ d)) / opts.alpha
        L, L0 = ss.dense_cholesky(), sr.dense_cholesky()
        # tr(Σ0⁻¹Σ) − p = tr((A0 − A) A⁻¹); log|ΣΣ0⁻¹| = log|A0| − log|A|.
        tr = float(torch.trace(torch.cholesky_solve(A0 - A, L)))
        ld = 2.0 * float(torch.log(torch.diagonal(L0)).sum() - torch.log(torch.diagonal(L)).sum())
        out = _assemble(quad, tr, ld, p)
        quad_r = float(d @ (A @ d)) / opts.alpha
        tr_r = float(torch.trace(torch.cholesky_solve(A - A0, L0)))
        out["reference_two_kl"] = quad_r + tr_r + ld
        out.update({"stderr": 0.0, "two_kl_stderr": 0.0})
    else:
        seed = opts.seed
        # Quadratic term: one product with A0 = sF0 + δI at the reference weights.
        A0dw = sr.precision(dw.unsqueeze(1))[:, 0]
        quad = float(dw.to(_F64) @ A0dw.to(_F64)) / opts.alpha
        # tr(A0 A⁻¹) − p = tr((A0 − A) A⁻¹), Hutchinson with Rademacher probes (seed).
        t1 = time.perf_counter()
        Z = rademacher(p, opts.probes, seed, ss.space.dtype, ss.space.device)
        X = ss.solve_precision(Z)  # A⁻¹ Z
        D = sr.ggn(X) - ss.ggn(X)  # (A0 − A) X: δI cancels exactly
        per_tr = (Z.to(_F64) * D.to(_F64)).sum(0)  # (probes,)
        tr, tr_se = float(per_tr.mean()), float(per_tr.std() / math.sqrt(opts.probes))
        t_trace = time.perf_counter() - t1
        # log|A0| − log|A| by SLQ with the same probes for both (paired differences).
        from ntkscrub.solvers import slq_logdet

        slq_seed = None if seed is None else seed + 1  # independent of the trace probes
        if slq_seed is None:
            slq_seed = int(torch.randint(0, 2**31 - 1, (1,)))
        kw = dict(
            probes=opts.probes,
            steps=opts.steps,
            seed=slq_seed,
            shift=opts.delta,
            dtype=ss.space.dtype,
            device=ss.space.device,
        )
        ld_s = slq_logdet(ss.precision, p, **kw)
        ld_r = slq_logdet(sr.precision, p, **kw)
        per_ld = torch.tensor(ld_r.per_probe, dtype=_F64) - torch.tensor(ld_s.per_probe, dtype=_F64)
        ld, ld_se = float(per_ld.mean()), float(per_ld.std() / math.sqrt(opts.probes))
        gauss = ld_r.gauss_value - ld_s.gauss_value
        out = _assemble(quad, tr, ld, p)
        # Independent probes for trace and log-det: the variances add; the factor ½ of the KL.
        se = 0.5 * math.sqrt(tr_se**2 + ld_se**2)
        out.update(
            {
                "reference_two_kl": None,  # needs tr(Σ⁻¹Σ0): not computed matrix-free
                "stderr": se,
                "two_kl_stderr": 2.0 * se,
                "trace_stderr": tr_se,
                "logdet_stderr": ld_se,
                "logdet_gauss_value": gauss,
                "stderr_assumption": (
                    "trace (Hutchinson) and log-det (SLQ) estimates use independent probes, so "
                    "their variances add; the log-det stderr is that of the paired per-probe "
                    "differences (common random numbers); Monte-Carlo error only (not CG or "
                    "quadrature error: compare logdet_ratio with logdet_gauss_value)"
                ),
                "slq": {
                    "scrubbed": {k: v for k, v in ld_s.to_dict().items() if k != "per_probe"},
                    "reference": {k: v for k, v in ld_r.to_dict().items() if k != "per_probe"},
                },
                "probes": opts.probes,
                "steps": opts.steps,
                "seconds_trace": t_trace,
            }
        )
    out.update(opts.describe())
    out["delta_w_norm"] = float(dw.norm())
    out["p"] = p
    out.update(_counts(ss, sr))
    out["cg"] = _cg_summary(ss, sr)
    out["seconds"] = time.perf_counter() - t0
    return out


# =========================================================================== black box
def _per_query_stats(
    mu_s: Tensor, C_s: Tensor, mu_r: Tensor, C_r: Tensor, jitter: float
) -> dict[str, Any]:
    """KL of each single query (c dims) from the diagonal blocks ``(k, c, c)``; mean/std."""
    t, tau = _kl_terms(mu_s, C_s, mu_r, C_r, jitter, ("scrubbed", "reference"))
    r, _ = _kl_terms(mu_r, C_r, mu_s, C_s, jitter, ("reference", "scrubbed"))
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


def _black_set(
    ss: _Side, sr: _Side, data: Any, name: str, opts: _Options, joint: bool
) -> dict[str, Any]:
    t0 = time.perf_counter()
    X = _stack_inputs(data, name, ss)
    f_s, C_s = ss.output_moments(X, name, joint)  # at h(w_D), its own Jₓ
    f_r, C_r = sr.output_moments(X, name, joint)  # at w_Dr, its own Jₓ
    k, c = X.shape[0], ss.c
    out: dict[str, Any] = {}
    if joint:
        mu_s, mu_r = f_s.reshape(-1), f_r.reshape(-1)  # rows n·c + j, as the covariance
        t, tau = _kl_terms(mu_s, C_s, mu_r, C_r, opts.jitter, ("scrubbed", "reference"))
        r, _ = _kl_terms(
            mu_r, C_r, mu_s, C_s, tau / _diag_scale(C_s, C_r), ("reference", "scrubbed")
        )
        out = _assemble(
            *(float(t[n]) for n in ("quadratic", "trace_minus_k", "logdet_ratio")), k=c * k
        )
        out["reference_two_kl"] = float(r["quadratic"] + r["trace_minus_k"] - r["logdet_ratio"])
        out["jitter"] = tau
        out["stderr"] = 0.0
        blk_s = torch.stack([C_s[c * i : c * (i + 1), c * i : c * (i + 1)] for i in range(k)])
        blk_r = torch.stack([C_r[c * i : c * (i + 1), c * i : c * (i + 1)] for i in range(k)])
    else:
        blk_s, blk_r = C_s, C_r
    out["per_query"] = _per_query_stats(f_s, blk_s, f_r, blk_r, opts.jitter)
    out["queries"] = k
    out["delta_f_norm"] = float((f_s - f_r).norm())
    out["seconds"] = time.perf_counter() - t0
    out["convention"] = CONVENTION
    return out


# =========================================================================== public API
_DOC_OPTIONS = """
    Options (shared by :func:`white_box`, :func:`black_box`, :func:`per_query_information`,
    :func:`information_bounds`, :func:`output_covariance`):
        alpha: α > 0, the noise scale (Σ = α(F + δI)⁻¹, or the reference's α·clamp(1/(F+ε))).
        delta: δ ≥ 0 (> 0 for ``kind="full"``). Default 1e-3: the reference's variance clamp
            ``1/(F + ε) ≤ 1e3`` acts as a floor F ≥ 1e-3 on a mean-reduced Fisher. Unused by "diag".
        kind: ``"diag"`` (reference-code diagonal Fisher noise) or ``"full"`` (α(F + δI)⁻¹).
        reduction: ``"mean"`` (F averaged over D_r, the reference's Fisher; default) or ``"sum"``
            (F = J_rᵀ H J_r, the :class:`~ntkscrub.operators.GGN`).
        loss: ``"ce"`` (softmax Fisher, H = diag(π) − ππᵀ) or ``"mse"`` (H = I).
        params: which parameters are linearised / carry noise (see ParameterSpace).
        solver: ``"cg"`` (matrix-free) or ``"dense"`` (the exact twin; small p only).
        form: ``"dual"`` (Woodbury / NTK form, c·|D_r| systems) or ``"primal"`` (CG on the
            p×p A) for solves with A = sF + δI in the matrix-free full case.
        batch_size: samples per JVP/VJP batch; query_batch: queries per block of columns.
        probes, steps, seed: Hutchinson / SLQ probes (≥ 2), Lanczos steps, seed (``None``: random).
        cg_options: ``tol``, ``max_iter``, ``strict``, ``scalar_dtype`` for :func:`solvers.cg`.
        precond_rank: rank of a Nyström preconditioner for the CG solves (0: none).
        fisher_options: keyword arguments of :func:`ntkscrub.scrub.fisher_noise_variance`.
        jitter: relative jitter for the dense c·k covariances (see :func:`gaussian_kl`).
"""


def _opts_from(kw: dict[str, Any]) -> _Options:
    return _Options(
        alpha=kw["alpha"],
        delta=kw["delta"],
        kind=kw["kind"],
        reduction=kw["reduction"],
        loss=kw["loss"],
        solver=kw["solver"],
        form=kw["form"],
        batch_size=kw["batch_size"],
        query_batch=kw["query_batch"],
        probes=kw["probes"],
        steps=kw["steps"],
        seed=kw["seed"],
        cg_options=kw["cg_options"],
        precond_rank=kw["precond_rank"],
        fisher_options=kw["fisher_options"],
        jitter=kw["jitter"],
        params=kw["params"],
    )


def white_box(
    scrubbed: nn.Module,
    reference: nn.Module,
    retain: Any,
    *,
    alpha: float,
    delta: float = 1e-3,
    kind: str = "diag",
    reduction: str = "mean",
    loss: str = "ce",
    params: Any = None,
    solver: str = "cg",
    form: str = "dual",
    batch_size: int = 256,
    query_batch: int = 16,
    probes: int = 30,
    steps: int = 30,
    seed: int | None = 0,
    cg_options: Mapping[str, Any] | None = None,
    precond_rank: int = 0,
    fisher_options: Mapping[str, Any] | None = None,
    jitter: float = 0.0,
) -> dict[str, Any]:
    """Information in the weights (eq. 6): ``KL(N(h(w_D), Σ) ‖ N(w_Dr, Σ0))`` in nats.

    Args:
        scrubbed: the deterministic scrubbed model h(w_D) (no noise added), eval mode.
        reference: the model retrained on D_r, w_Dr (same architecture), eval mode.
        retain: D_r, where the Fisher/GGN of each model is computed.

    Returns a dict with ``kl`` (nats), ``stderr`` (Monte-Carlo, "full" + "cg" only), ``two_kl``,
    ``paper_printed``, ``reference_two_kl`` (diag and dense), the terms ``quadratic``,
    ``trace_minus_k``, ``logdet_ratio`` (with their stderrs), ``convention``, ``matvecs``
    (retain JVP+VJP column products), CG and SLQ records and ``seconds``. Neither model is modified.
    """
    opts = _opts_from(locals())
    ss, sr = _prepare(scrubbed, reference, retain, opts)
    return _white(ss, sr, opts)


def black_box(
    scrubbed: nn.Module,
    reference: nn.Module,
    retain: Any,
    queries: Any,
    *,
    alpha: float,
    delta: float = 1e-3,
    kind: str = "diag",
    reduction: str = "mean",
    loss: str = "ce",
    params: Any = None,
    solver: str = "cg",
    form: str = "dual",
    batch_size: int = 256,
    query_batch: int = 16,
    probes: int = 30,
    steps: int = 30,
    seed: int | None = 0,
    cg_options: Mapping[str, Any] | None = None,
    precond_rank: int = 0,
    fisher_options: Mapping[str, Any] | None = None,
    jitter: float = 0.0,
) -> dict[str, Any]:
    """Information in the outputs of a query set (eq. 7), jointly over its c·k outputs.

    ``KL(N(f_h(x), Jₓ Σ Jₓᵀ) ‖ N(f_ref(x), Jₓ' Σ0 Jₓ'ᵀ))`` with each Jacobian at its own model's
    weights. ``queries``: one data set (X, (X, Y), Dataset, DataLoader) or a mapping name → data
    set; the result is keyed by set name (``"queries"`` for a single set). Each entry has the joint
    KL (as :func:`gaussian_kl`) and ``per_query`` (the KL of each query alone, c dims: mean, std,
    values). Top-level: ``convention``, ``matvecs``, ``cg``, ``seconds``.
    """
    opts = _opts_from(locals())
    t0 = time.perf_counter()
    sets = _query_sets(queries)
    ss, sr = _prepare(scrubbed, reference, retain, opts)
    out: dict[str, Any] = {
        "sets": {n: _black_set(ss, sr, d, n, opts, joint=True) for n, d in sets.items()}
    }
    out.update(opts.describe())
    out.update(_counts(ss, sr))
    out["cg"] = _cg_summary(ss, sr)
    out["convention"] = CONVENTION
    out["seconds"] = time.perf_counter() - t0
    return out


def per_query_information(
    scrubbed: nn.Module,
    reference: nn.Module,
    retain: Any,
    query_sets: Any,
    *,
    alpha: float,
    delta: float = 1e-3,
    kind: str = "diag",
    reduction: str = "mean",
    loss: str = "ce",
    params: Any = None,
    solver: str = "cg",
    form: str = "dual",
    batch_size: int = 256,
    query_batch: int = 16,
    probes: int = 30,
    steps: int = 30,
    seed: int | None = 0,
    cg_options: Mapping[str, Any] | None = None,
    precond_rank: int = 0,
    fisher_options: Mapping[str, Any] | None = None,
    jitter: float = 0.0,
) -> dict[str, Any]:
    """Per-query information (eq. 7 with k = 1), e.g. over D_f, D_r and test (Fig. 3 right).

    ``query_sets``: mapping name → data set (or one data set, named ``"queries"``). For each
    query alone, the KL between the c-dimensional output Gaussians; only the c×c diagonal blocks
    of the output covariances are computed. Returns ``{"sets": {name: {"mean", "std", "stderr",
    "median", "max", "n", "values", "two_kl_mean", "reference_two_kl_mean",
    "paper_printed_mean", "jitter", "convention"}}, "convention", "matvecs", "cg", "seconds"}``.
    """
    opts = _opts_from(locals())
    t0 = time.perf_counter()
    sets = _query_sets(query_sets, "query_sets")
    ss, sr = _prepare(scrubbed, reference, retain, opts)
    res = {}
    for n, d in sets.items():
        r = _black_set(ss, sr, d, n, opts, joint=False)
        res[n] = {**r["per_query"], "seconds": r["seconds"]}
    out: dict[str, Any] = {"sets": res}
    out.update(opts.describe())
    out.update(_counts(ss, sr))
    out["cg"] = _cg_summary(ss, sr)
    out["convention"] = CONVENTION
    out["seconds"] = time.perf_counter() - t0
    return out


def information_bounds(
    scrubbed: nn.Module,
    reference: nn.Module,
    retain: Any,
    *,
    queries: Any = None,
    alpha: float,
    delta: float = 1e-3,
    kind: str = "diag",
    reduction: str = "mean",
    loss: str = "ce",
    params: Any = None,
    solver: str = "cg",
    form: str = "dual",
    batch_size: int = 256,
    query_batch: int = 16,
    probes: int = 30,
    steps: int = 30,
    seed: int | None = 0,
    cg_options: Mapping[str, Any] | None = None,
    precond_rank: int = 0,
    fisher_options: Mapping[str, Any] | None = None,
    jitter: float = 0.0,
) -> dict[str, Any]:
    """Both bounds of Proposition 1: white box (eq. 6) and, for ``queries``, black box (eq. 7).

    The two models' Fisher/GGN on D_r is computed once and shared. Returns
    ``{"white_box": <white_box dict>, "black_box": {name: <joint KL + per_query>} | None,
    "convention", "kind", "alpha", "delta", "matvecs", "cg", "seconds"}`` (nats throughout).
    """
    opts = _opts_from(locals())
    t0 = time.perf_counter()
    sets = _query_sets(queries) if queries is not None else None
    ss, sr = _prepare(scrubbed, reference, retain, opts)
    wb = _white(ss, sr, opts)
    bb = None
    if sets is not None:
        bb = {n: _black_set(ss, sr, d, n, opts, joint=True) for n, d in sets.items()}
    out: dict[str, Any] = {"white_box": wb, "black_box": bb}
    out.update(opts.describe())
    out.update(_counts(ss, sr))
    out["cg"] = _cg_summary(ss, sr)
    out["convention"] = CONVENTION
    out["seconds"] = time.perf_counter() - t0
    return out


def output_covariance(
    model: nn.Module,
    retain: Any,
    queries: Any,
    *,
    alpha: float,
    delta: float = 1e-3,
    kind: str = "full",
    reduction: str = "mean",
    loss: str = "ce",
    params: Any = None,
    solver: str = "cg",
    form: str = "dual",
    joint: bool = True,
    batch_size: int = 256,
    query_batch: int = 16,
    cg_options: Mapping[str, Any] | None = None,
    precond_rank: int = 0,
    fisher_options: Mapping[str, Any] | None = None,
    seed: int | None = 0,
) -> tuple[Tensor, Tensor]:
    """Output mean and covariance ``Jₓ Σ Jₓᵀ`` of one model (eq. 5) on the queries.

    Returns ``(f(x) (k, c), cov)`` with ``cov`` ``(c·k, c·k)`` (rows ``n·c + j``) if ``joint``,
    else the k diagonal blocks ``(k, c, c)``. For ``kind="full"``: ``α Jₓ(sF + δI)⁻¹Jₓᵀ`` by the
    dual (Woodbury/NTK) form, CG in parameter space (``form="primal"``) or densely.
    """
    opts = _Options(
        alpha=alpha,
        delta=delta,
        kind=kind,
        reduction=reduction,
        loss=loss,
        solver=solver,
        form=form,
        batch_size=batch_size,
        query_batch=query_batch,
        probes=2,
        steps=1,
        seed=seed,
        cg_options=cg_options,
        precond_rank=precond_rank,
        fisher_options=fisher_options,
        jitter=0.0,
        params=params,
    )
    side = _Side(model, "model", retain, opts)
    X = _stack_inputs(queries, "queries", side)
    return side.output_moments(X, "queries", bool(joint))


for _f in (white_box, black_box, per_query_information, information_bounds, output_covariance):
    _f.__doc__ = (_f.__doc__ or "") + _DOC_OPTIONS
del _f
