"""The noise covariance of one model of Proposition 1, and the terms that compare two of them.

Proposition 1 adds Gaussian noise ``N(0, Σ)`` to the scrubbed weights h(w_D) and ``N(0, Σ0)`` to the
retrained w_Dr. :class:`NoiseCovariance` is one such Σ, at one model's weights:

* ``kind="diag"``: the reference code's noise (REFERENCE.md §2) — the diagonal Fisher on D_r (exact
  expectation over y ~ p(y|x), times s) turned into a variance ``v`` ``(p,)`` by
  :func:`ntkscrub.noise.fisher_noise_variance` (its clamps and averaging, ``config.fisher``);
* ``kind="full"``: ``Σ = α A⁻¹``, ``A = sF + δI`` with ``F = J_rᵀ H J_r`` the GGN/Fisher on D_r at
  the model's weights and ``s = 1/|D_r|`` (``reduction="mean"``, the reference's scale) or 1.

Only the linearised parameters (``config.params``) carry noise. Solves with A go through
:class:`~ntkscrub.bounds.inverse.Inverse`: the dual (Woodbury / NTK) form, with δ' = δ/s,

    A⁻¹ = (1/δ) (I − J_rᵀ H^½ (δ'I + H^½ J_r J_rᵀ H^½)⁻¹ H^½ J_r)          (REFERENCE.md §1),

a c·|D_r| system; ``form="primal"`` runs CG on the p×p A instead (no subtraction, safer in float32
at small δ'); ``solver="dense"`` is the exact twin (explicit A, Cholesky). The black-box output
covariance ``Jₓ Σ Jₓᵀ`` (eq. 5) is :meth:`NoiseCovariance.output_moments`.

The white-box terms of two covariances (:func:`trace_minus_p`, :func:`logdet_ratio`) never form a
p×p matrix in the matrix-free case: ``tr(Σ0⁻¹Σ) − p = tr((A0 − A) A⁻¹)`` by Hutchinson (exactly 0
when the models coincide; variance scaling with the difference, not with p) and
``log|ΣΣ0⁻¹| = log|A0| − log|A|`` by SLQ with common random numbers (paired per-probe differences).

Data-parallel (``comm``, a :class:`ntkscrub.distributed.Comm`): each rank holds its shard of D_r.
F = Σ_ranks J_kᵀ H_k J_k is a sum over data, so every product with F all-reduces one ``(p, k)``
block (``vjp_r``), the diagonal Fisher and the dense twin are summed once, and ``s = 1/N_r`` counts
every rank's rows; everything else lives in parameter space and is replicated. Replicated solvers
(primal CG, SLQ on A) take every scalar decision from rank 0 (``comm.broadcast``), so the ranks
stop together even if an all-reduce rounded differently. The dual (Woodbury) system is
row-sharded like the scrub's: each rank holds its c·N_k rows, CG sums its inner products over the
ranks (``comm.sum_scalars``); its Nyström factor is not sharded (``precond_rank`` must be 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from ntkscrub.bounds.config import BoundsConfig, Kind
from ntkscrub.bounds.hessian import hessian_sqrt_apply, softmax_hessian_sqrt
from ntkscrub.bounds.inverse import Inverse
from ntkscrub.noise import fisher_noise_variance
from ntkscrub.operators.ggn import GGN, ggn_diagonal, output_hessian_apply
from ntkscrub.operators.jacobian import Jacobian
from ntkscrub.params import ParameterSpace, check_eval_mode
from ntkscrub.solvers.lanczos import rademacher, slq_logdet

__all__ = ["NoiseCovariance", "trace_minus_p", "logdet_ratio"]

_F64 = torch.float64


class NoiseCovariance:
    """Σ of one model (scrubbed h(w_D) or retrained w_Dr); the model is only read.

    Holds the flat linearised weights ``theta`` ``(p,)``, the retain Jacobian ``J_r``
    ``(c·N_r, p)`` at theta, the softmax probabilities and H^½ on D_r, and either the diagonal
    variance ``var`` ``(p,)`` (``kind="diag"``) or ``inverse`` (``kind="full"``): the solver of
    ``A = sF + δI`` (primal CG or dense Cholesky) or, when ``woodbury``, of the c·N_r dual system.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        retain: Any,
        *,
        alpha: float,
        kind: Kind,
        delta: float,
        config: BoundsConfig,
        comm: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}: expected an nn.Module, got {type(model).__name__}")
        check_eval_mode(model, name)
        self.comm = comm
        dual = kind == "full" and config.solver == "cg" and config.form == "dual"
        if comm is not None and dual and config.precond_rank > 0:
            raise ValueError(
                "config: precond_rank > 0 with form='dual': the Nyström factor of the row-sharded "
                "Woodbury system is not data-parallel yet (use precond_rank=0 or form='primal')"
            )
        if comm is not None and config.seed is None:
            raise ValueError("config: seed=None draws other probes on every rank; give an int")
        try:
            self.space = ParameterSpace(model, config.params)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        self.name, self.config = name, config
        self.alpha, self.kind, self.delta = alpha, kind, delta
        self.theta = self.space.point()
        self.counts = {"retain_jvp": 0, "retain_vjp": 0, "query_jvp": 0, "query_vjp": 0}
        guard = comm.guard if comm is not None else lambda _: contextlib.nullcontext()
        with guard(f"building {name}'s covariance on its retain shard"):
            self.J_r = Jacobian(
                self.space, retain, at=self.theta, batch_size=config.batch_size, name="retain"
            )
            out = self.J_r.outputs()
            if not bool(torch.isfinite(out).all()):
                raise ValueError(f"{name}: outputs on the retain set are not finite")
        self.c, self.n_r, self.p = self.J_r.c, self.J_r.n, self.space.p
        if comm is not None:  # N_r over every rank's shard
            self.n_r = int(comm.sum_scalars(torch.tensor([float(self.n_r)], dtype=_F64))[0])
        self.probs = torch.softmax(out, dim=1) if config.loss == "ce" else None
        self.root = softmax_hessian_sqrt(self.probs) if self.probs is not None else None
        self.s = 1.0 / self.n_r if config.reduction == "mean" else 1.0
        self.var = self._diagonal_variance() if kind == "diag" else None
        # The dual form solves the c·N_r system of the Woodbury identity, not A itself.
        self.woodbury = kind == "full" and config.solver == "cg" and config.form == "dual"
        self.inverse = self._make_inverse() if kind == "full" else None
        self._dense_A: Tensor | None = None

    def _diagonal_variance(self) -> Tensor:
        """The reference's Fisher (exact expectation over classes, × s), then its variance recipe
        (clamps, averaging over inputs, ×10 head / 1-D): ``(p,)``."""
        diag = self._summed(lambda: ggn_diagonal(self.J_r, self.probs), (self.p,), "diagonal")
        diag = diag * self.s
        var = fisher_noise_variance(
            self.space.unflatten(diag), self.alpha, self.c, **self.config.fisher.kwargs()
        )
        var = self.space.flatten(var)
        if not bool((var > 0).all()) or not bool(torch.isfinite(var).all()):
            raise ValueError(f"{self.name}: the diagonal noise variance is not finite and > 0")
        return var

    def _make_inverse(self) -> Inverse:
        cfg = self.config
        if cfg.solver == "dense":
            return Inverse(cfg, n=self.p, label="dense", dense=self.dense_precision)
        comm = self.comm
        if self.woodbury:  # row-sharded under comm: this rank's c·N_k rows, scalars summed
            if comm is not None and cfg.cg_max_iter is None:  # CG's 2n from the global n
                cfg = dataclasses.replace(cfg, cg_max_iter=2 * self.c * self.n_r)
            n = self.c * self.J_r.n
            return Inverse(cfg, n=n, label="dual", op=self.dual, shift=self.delta / self.s,
                           allreduce=None if comm is None else comm.sum_scalars)  # fmt: skip
        # replicated under comm: every rank takes rank 0's scalars
        return Inverse(cfg, n=self.p, label="primal", op=self.precision, shift=self.delta,
                       allreduce=None if comm is None else comm.broadcast)  # fmt: skip

    def _summed(self, local: Any, shape: tuple[int, ...], what: str) -> Tensor:
        """``local()``, a sum over this rank's retain rows, summed over the ranks (one
        all-reduce; a local exception raises on every rank)."""
        if self.comm is None:
            return local()
        try:
            part = local()
        except Exception as err:  # noqa: BLE001 - raised on every rank by the all-reduce
            self.comm.fail(f"computing the {what} on its retain rows", err)
            part = torch.zeros(shape, dtype=self.space.dtype, device=self.space.device)
        return self.comm.sum_block(part)

    # ------------------------------------------------------------------ counted products
    def jvp_r(self, V: Tensor) -> Tensor:
        self.counts["retain_jvp"] += 1 if V.dim() == 1 else V.shape[1]
        return self.J_r.matvec(V)

    def vjp_r(self, U: Tensor) -> Tensor:
        """``J_rᵀ U`` ``(c·N_r, k) -> (p, k)`` (this rank's rows, summed over the ranks)."""
        self.counts["retain_vjp"] += 1 if U.dim() == 1 else U.shape[1]
        return self._summed(lambda: self.J_r.rmatvec(U), (self.p, *U.shape[1:]), "VJP")

    def ggn(self, V: Tensor) -> Tensor:
        """``s · J_rᵀ H J_r V``: ``(p, k) -> (p, k)``."""
        return self.s * self.vjp_r(output_hessian_apply(self.probs, self.jvp_r(V), self.c))

    def precision(self, V: Tensor) -> Tensor:
        """``A V = (sF + δI) V`` ``(p, k)`` — the precision α Σ⁻¹ of the full noise."""
        return self.ggn(V) + self.delta * V

    def dual(self, U: Tensor) -> Tensor:
        """``(δ'I + H^½ J_r J_rᵀ H^½) U`` with δ' = δ/s: ``(c·N_r, k) -> (c·N_r, k)``."""
        hu = hessian_sqrt_apply(self.root, U, self.c)
        return self.delta / self.s * U + hessian_sqrt_apply(
            self.root, self.jvp_r(self.vjp_r(hu)), self.c
        )

    def dense_precision(self) -> Tensor:
        """Explicit ``A = sF + δI`` ``(p, p)``, symmetrised (the dense twin; small p only)."""
        if self._dense_A is None:
            ggn = GGN(self.theta, jac=self.J_r, loss=self.config.loss, probs=self.probs)
            F = self._summed(ggn.dense, (self.p, self.p), "dense GGN")
            A = self.s * F + self.delta * torch.eye(self.p, dtype=F.dtype, device=F.device)
            self._dense_A = 0.5 * (A + A.T)
        return self._dense_A

    # ------------------------------------------------------------------ Σ applied to columns
    def solve_precision(self, R: Tensor) -> Tensor:
        """``A⁻¹ R`` for ``R`` ``(p, m)`` (``kind="full"``)."""
        assert self.inverse is not None, "solve_precision needs kind='full'"
        if not self.woodbury:  # primal CG or dense Cholesky: the inverse is A's own
            return self.inverse(R)
        # A⁻¹ = (1/δ)(I − Gᵀ(δ'I + GGᵀ)⁻¹G), G = H^½ J_r, δ' = δ/s (REFERENCE.md §1).
        B = hessian_sqrt_apply(self.root, self.jvp_r(R), self.c)
        Y = self.inverse(B)
        return (R - self.vjp_r(hessian_sqrt_apply(self.root, Y, self.c))) / self.delta

    def apply(self, G: Tensor) -> Tensor:
        """``Σ G`` for parameter-space columns ``G`` ``(p, m)`` (Σ = diag(v) or α A⁻¹)."""
        if self.var is not None:
            return self.var.unsqueeze(1) * G
        return self.alpha * self.solve_precision(G)

    # ------------------------------------------------------------------ output moments (eq. 5)
    def output_moments(self, X: Tensor, name: str, joint: bool) -> tuple[Tensor, Tensor]:
        """Mean ``f_θ(x)`` ``(k, c)`` and covariance ``Jₓ Σ Jₓᵀ`` of the k queries ``X``.

        ``joint=True``: the full ``(c·k, c·k)`` covariance (rows ``n·c + j``); ``False``: its k
        diagonal blocks ``(k, c, c)`` (one query at a time; no cross-query products). Queries are
        taken ``config.query_batch`` at a time: ``Σ Jₓᵀ`` for a block of c·b columns, then Jₓ.
        """
        k, c, dense = X.shape[0], self.c, self.config.solver == "dense"
        J_all = self._query_jacobian(X, name) if joint else None
        if J_all is not None and J_all.c != c:
            raise ValueError(f"{self.name}: has {J_all.c} outputs on the queries, expected {c}")
        shape = (c * k, c * k) if joint else (k, c, c)
        cov = torch.empty(shape, dtype=self.space.dtype, device=self.space.device)
        Jx_dense = J_all.dense() if (dense and J_all is not None) else None
        means = []
        for j0 in range(0, k, self.config.query_batch):
            Jj = self._query_jacobian(X[j0 : j0 + self.config.query_batch], name)
            f, G = self._outputs_and_transpose(Jj, name, dense)  # G = Jₓᵀ (p, c·b)
            means.append(f)
            b, W = f.shape[0], self.apply(G)  # Σ Jₓᵀ columns
            if joint:
                assert J_all is not None
                cov[:, c * j0 : c * (j0 + b)] = self._left(J_all, Jx_dense, W)
            else:
                blk = self._left(Jj, G.T if dense else None, W).reshape(b, c, b, c)
                cov[j0 : j0 + b] = torch.diagonal(blk, dim1=0, dim2=2).permute(2, 0, 1)
        cov = 0.5 * (cov + cov.mT)
        return torch.cat(means), cov

    def _query_jacobian(self, X: Tensor, name: str) -> Jacobian:
        return Jacobian(self.space, X, at=self.theta, batch_size=self.config.batch_size, name=name)

    def _outputs_and_transpose(self, Jj: Jacobian, name: str, dense: bool) -> tuple[Tensor, Tensor]:
        """Outputs ``(b, c)`` and ``Jₓᵀ`` ``(p, c·b)`` (explicit, or VJPs of the unit columns)."""
        f = Jj.outputs()
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"{self.name}: outputs on '{name}' are not finite")
        if dense:
            return f, Jj.dense().T
        m = self.c * f.shape[0]
        self.counts["query_vjp"] += m
        return f, Jj.rmatvec(torch.eye(m, dtype=self.space.dtype, device=self.space.device))

    def _left(self, J: Jacobian, J_dense: Tensor | None, W: Tensor) -> Tensor:
        """``Jₓ W``: explicit rows when given, else JVPs (counted)."""
        if J_dense is not None:
            return J_dense @ W
        self.counts["query_jvp"] += W.shape[1]
        return J.matvec(W)

    # ------------------------------------------------------------------ accounting
    def matvecs(self) -> float:
        """Retain column products (one JVP + one VJP over D_r each) spent so far."""
        return 0.5 * (self.counts["retain_jvp"] + self.counts["retain_vjp"])

    @property
    def cg_records(self) -> list[dict[str, Any]]:
        return [] if self.inverse is None else list(self.inverse.records)


# =========================================================================== two covariances
def trace_minus_p(sigma: NoiseCovariance, sigma0: NoiseCovariance) -> tuple[float, float]:
    """``tr(Σ0⁻¹Σ) − p = tr((A0 − A) A⁻¹)`` (full kind) and its standard error.

    Dense: exact (stderr 0). Matrix-free: Hutchinson with ``config.probes`` Rademacher probes from
    ``config.seed``, ``A⁻¹Z`` by one block solve; ``(A0 − A)X = s(F0 − F)X`` so δI cancels exactly.
    """
    cfg = sigma.config
    if cfg.solver == "dense":
        A, A0 = sigma.dense_precision().to(_F64), sigma0.dense_precision().to(_F64)
        return float(torch.trace(sigma.inverse(A0 - A))), 0.0
    Z = rademacher(sigma.p, cfg.probes, cfg.seed, sigma.space.dtype, sigma.space.device)
    X = sigma.solve_precision(Z)  # A⁻¹ Z
    D = sigma0.ggn(X) - sigma.ggn(X)  # (A0 − A) X
    per = (Z.to(_F64) * D.to(_F64)).sum(0)  # (probes,)
    return float(per.mean()), float(per.std() / math.sqrt(cfg.probes))


def logdet_ratio(sigma: NoiseCovariance, sigma0: NoiseCovariance) -> dict[str, Any]:
    """``log|ΣΣ0⁻¹| = log|A0| − log|A|`` (full kind): ``{"value", "stderr", ...}``.

    Dense: from the two Cholesky factors. Matrix-free: SLQ (:func:`~ntkscrub.solvers.slq_logdet`,
    shift δ since A = δI + PSD) with the *same* probes for both (common random numbers), seed
    ``config.seed + 1`` (independent of the trace probes); the paired per-probe differences give
    the value and its standard error, ``gauss_value`` the Gauss-rule difference and ``slq`` the
    two runs' records (Monte-Carlo error only, not quadrature error).
    """
    cfg = sigma.config
    if cfg.solver == "dense":
        L, L0 = sigma.inverse.cholesky(), sigma0.inverse.cholesky()
        ld = 2.0 * float(torch.log(torch.diagonal(L0)).sum() - torch.log(torch.diagonal(L)).sum())
        return {"value": ld, "stderr": 0.0}
    seed = None if cfg.seed is None else cfg.seed + 1
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
    kw = dict(probes=cfg.probes, steps=cfg.steps, seed=seed, shift=sigma.delta)
    kw.update(dtype=sigma.space.dtype, device=sigma.space.device)
    if sigma.comm is not None:  # A is replicated: every rank takes rank 0's scalars
        kw["shard"] = sigma.comm.replicated(sigma.p)
    ld_s = slq_logdet(sigma.precision, sigma.p, **kw)
    ld_r = slq_logdet(sigma0.precision, sigma.p, **kw)
    per = torch.tensor(ld_r.per_probe, dtype=_F64) - torch.tensor(ld_s.per_probe, dtype=_F64)
    records = {
        side: {k: v for k, v in est.to_dict().items() if k != "per_probe"}
        for side, est in (("scrubbed", ld_s), ("reference", ld_r))
    }
    return {
        "value": float(per.mean()),
        "stderr": float(per.std() / math.sqrt(cfg.probes)),
        "gauss_value": ld_r.gauss_value - ld_s.gauss_value,
        "slq": records,
    }
