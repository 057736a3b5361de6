"""Amortised deletion requests: prepare once per trained model, then forget many times (issue 14.5).

:func:`ntkscrub.scrub.scrub` solves two systems per call, Θ_DD and Θ_rr (REFERENCE.md §1). When
deletion requests arrive one after another for the same trained model w(D), the Θ_DD solve and its
preconditioner do not change: :class:`Scrubber` does them once and answers each request with one
solve on what is retained.

The algebra (Prop. 2, eq. 10; c logits, N = |D|, F the samples forgotten so far, R = D ∖ F;
row ``n·c + k`` for sample n and logit k, so an index set of samples selects ``c·|S|`` rows):

    preparation:  α = (Θ_DD + λ_D I)⁻¹ e_D                         α, e_D ``(c·N,)``
    request:      Δ = w_lin(D_r) − w_lin(D) = J_Rᵀ x_R − J_Dᵀ α,   x_R = (Θ_RR + λ_R I)⁻¹ e_R

Rows R of the prepared system read ``(Θ_RR + λ_D I) α_R + Θ_RF α_F = e_R``, so

    x_R = α_R + y,   y = (Θ_RR + λ_R I)⁻¹ b,   b = J_R g + (λ_D − λ_R) α_R,   g = J_Fᵀ α_F ``(p,)``
    Δ  = J_Rᵀ x_R − J_Rᵀ α_R − J_Fᵀ α_F = J_Rᵀ y − g                                   ``(p,)``

With one ridge (λ_R = λ_D) this is the block identity Δ = −P J_Fᵀ α_F, P = I − J_Rᵀ(Θ_RR + λI)⁻¹J_R;
under the ``weight_decay`` convention (λ = N·wd for each system, so λ_R = |R|·wd ≠ λ_D) the extra
term (λ_D − λ_R) α_R keeps it exact.

Which form, and why (cost per request in passes over the data):

* the warm-started form — solve x_R from x0 = α_R — spends one Θ_RR product on the starting
  residual ``e_R − (Θ_RR + λ_R)α_R`` (a JVP and a VJP over R), its CG iterations, a VJP over R for
  J_Rᵀ x_R, and needs J_Dᵀ α (a VJP over D) at preparation;
* the chosen correction form gets the same starting residual b from a VJP over F (|F| ≪ |R|) and
  a JVP over R — half a Θ_RR product — then the same CG iterations (CG on y from 0 builds the same
  Krylov space as CG on x_R from α_R) and a VJP over R. It measures convergence relative to
  ‖b‖, the size of the correction; but Δ = J_Rᵀy − J_Fᵀα_F is itself a difference, ρ = ‖J_Fᵀα_F‖/‖Δ‖
  times smaller than its terms when the forgotten samples resemble retained ones, so y is then
  solved once more, warm, to tol/ρ (:meth:`Scrubber._delta`).

Requests compose: F accumulates, and each request solves for the whole F, warm-started from the
previous request's y restricted to the rows still retained (it differs from the new y only by
the effect of the newly forgotten samples). The Θ_RR system is preconditioned by the prepared
Nyström factor of Θ_DD restricted to the rows R (``LowRankPreconditioner.restrict``, no matvec).
On the dense twin (``solver="dense"``, or ``"auto"`` where it fits) the preparation keeps the
explicit J_D and Θ_DD + λ_D I, and a request's Θ_RR + λ_R I is their slice: one Cholesky and
three products with the explicit rows, no pass over the data (:meth:`Scrubber._delta_dense`).

Partial linearisation (issue 14.6): when ``params`` selects only a suffix of the network, the
frozen prefix's activations on D are computed once and every product runs the suffix alone.
"""

from __future__ import annotations

import copy
import operator
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from linear_operator.operators import DenseLinearOperator
from torch import Tensor, nn

from ntkscrub._validation import check_number
from ntkscrub.batches import subset
from ntkscrub.config import Method, ProductConfig, SolverConfig, check_mixed_precision
from ntkscrub.operators import NTK, Counted, Inverse, Jacobian, MatvecCounter
from ntkscrub.operators.base import accumulated_matmul
from ntkscrub.params import ParameterSpace, ParamSelector
from ntkscrub.prefix import jacobian_options, prefix_rows
from ntkscrub.scrub import (
    ScrubResult,
    _check_scrub_args,
    _default_solver,
    _module_params,
    _peak_memory,
    _solver_config,
    _targets,
    _typed,
    check_rank,
    full_fp32_precision,
    load_weights,
    solver_estimate,
)
from ntkscrub.shifts import retain_change

__all__ = ["Scrubber"]


def _rows(positions: list[int], c: int, device: torch.device) -> Tensor:
    """Rows ``n·c + k`` of the samples ``positions`` ``(c·len(positions),)``."""
    n = torch.as_tensor(positions, dtype=torch.long, device=device)
    return (n.unsqueeze(1) * c + torch.arange(c, device=device)).reshape(-1)


def _iterations(records: list[dict[str, Any]]) -> int:
    return int(sum(rec.get("iterations", 0) for rec in records))


class Scrubber:
    """Answer deletion requests against one trained model, preparing the shared work once.

    Args:
        model: the trained network w(D) in eval mode (never modified).
        data: D, every sample w(D) was trained on, in any form :func:`~ntkscrub.scrub.scrub`
            accepts (``(X, Y)``, a Dataset, a sequential DataLoader); its order defines the
            positions that :meth:`forget` takes.
        init, linearize_at, loss, ridge, weight_decay, solver, tol, max_iter, params, seed,
            solver_config, products: as :func:`~ntkscrub.scrub.scrub`, with the same defaults
            (``solver=None``: ``"auto"`` unless ``solver_config`` or ``max_iter`` is given —
            the dense twin when the explicit J_D and Θ_DD fit ``max_dense_bytes`` and cost
            fewer operations, :func:`~ntkscrub.scrub.solver_estimate` on D, recorded in
            ``prepare_info["auto_solver"]``; else matrix-free CG). The ``weight_decay``
            convention λ = |S|·wd is applied to each system: λ_D = N·wd for the prepared Θ_DD,
            λ_R = |R|·wd for each retained system.
        cache_prefix: when ``params`` leaves a frozen prefix (an ``nn.Sequential``'s first
            children, the ``features`` of a features → classifier model, or what ``torch.fx``
            can split off a torchvision-style model), compute its activations on D once and
            linearise only the suffix on them (same result, cheaper products;
            ``prepare_info["prefix_cached"]``, see :meth:`_cache_prefix`).

    Preparation solves α = (Θ_DD + λ_D I)⁻¹ e_D ``(c·N,)`` and keeps α and, on CG, the Nyström
    factor of Θ_DD; on the dense twin, the explicit J_D ``(c·N, p)`` and Θ_DD + λ_D I, of which
    each request's system is a slice (:meth:`_delta_dense`: no pass over the data).
    ``info["prepare"]`` records matvecs, seconds, iterations, converged. The module docstring
    derives the request formula Δ = J_Rᵀ y − J_Fᵀ α_F and says why it was chosen.
    Rescaling and noise are not offered: ``result.model`` is w(D) + Δ.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        *,
        init: nn.Module | Mapping[str, Tensor],
        linearize_at: Literal["init", "trained"] = "init",
        loss: Literal["mse", "ce"] = "mse",
        ridge: float = 0.0,
        weight_decay: float | None = None,
        solver: Method | None = None,
        tol: float | None = None,
        max_iter: int | None = None,
        params: ParamSelector = None,
        seed: int | None = None,
        solver_config: SolverConfig | None = None,
        products: ProductConfig | None = None,
        cache_prefix: bool = True,
    ) -> None:
        t0 = time.perf_counter()
        if not isinstance(cache_prefix, bool):
            raise TypeError(f"cache_prefix: expected a bool, got {type(cache_prefix).__name__}")
        _check_scrub_args(model, linearize_at, loss, None, "solves", seed)
        ridge = check_number(ridge, "ridge")
        if weight_decay is not None:
            weight_decay = check_number(weight_decay, "weight_decay")
            if ridge != 0.0:
                raise ValueError("weight_decay: give either ridge or weight_decay, not both")
        solver = _default_solver(solver, solver_config, max_iter)
        auto = solver == "auto"
        self.cfg = _solver_config(
            solver_config, None if auto else solver, tol, max_iter, None, seed
        )
        self.products = _typed(products, ProductConfig, "products")
        check_mixed_precision(self.cfg, self.products)
        self.model, self.data = model, data
        self.linearize_at, self.loss = linearize_at, loss
        self.ridge, self.weight_decay = ridge, weight_decay
        self._build_spaces(model, init, params)
        # What the products stream: D itself, or (prefix activations, labels) of D.
        self._rows_data, prefix_info = self._cache_prefix(data) if cache_prefix else (data, None)
        self._prefix = prefix_info
        self.J_D = self._jacobian(self._rows_data, "data")
        self.n, self.c = self.J_D.n, self.J_D.c
        estimate = solver_estimate(self.J_D, None, self.cfg.max_dense_bytes) if auto else None
        if estimate is not None:
            self.cfg = self.cfg.replace(method=estimate["method"])
        self.ridge_d = ridge if weight_decay is None else self.n * weight_decay
        check_rank(self.c * self.n, self.J_D.p, self.ridge_d, "Θ_DD")
        counter = MatvecCounter()
        e_d = _targets(self.J_D, loss)
        self._inv_d = Inverse(
            Counted(NTK(jac_a=self.J_D, ridge=self.ridge_d), counter), self.cfg, label="Θ_DD"
        )
        with full_fp32_precision(not self.products.allow_tf32):
            self.alpha = self._inv_d.solve(e_d).detach()  # (c·N,)
        self._e_d = e_d.detach()  # its retained rows scale a request's solve (retain_change)
        self.forgotten: list[int] = []
        self._y = torch.zeros_like(self.alpha)  # last request's y on its retained rows, else 0
        self.requests: list[dict[str, Any]] = []
        self.prepare_info: dict[str, Any] = {
            "matvecs": counter.count,
            "seconds": time.perf_counter() - t0,
            "iterations": _iterations(self._inv_d.records),
            "converged": all(r.get("converged", True) for r in self._inv_d.records),
            "solves": self._inv_d.records,
            "ridge_d": self.ridge_d,
            "prefix_cached": prefix_info,
            "auto_solver": estimate,
        }

    def _build_spaces(self, model: nn.Module, init: Any, params: ParamSelector) -> None:
        """w(D), θ0 and the parameter space at the linearisation point (as :func:`scrub`)."""
        self.space_w = ParameterSpace(model, params)
        self.space_w.check_compatible(
            init if isinstance(init, Mapping) else _module_params(init, "init"), "init"
        )
        init_model = load_weights(model, init, "init")
        self.w_d = self.space_w.point()
        if not bool(torch.isfinite(self.space_w.point(init_model)).all()):
            raise ValueError("init: parameters contain NaN or infinite values")
        at = init_model if self.linearize_at == "init" else model
        self.space = ParameterSpace(at, self.space_w.names)

    def _cache_prefix(self, data: Any) -> tuple[Any, dict[str, Any] | None]:
        """Item 6 of issue 14: when ``params`` selects a suffix of the network (the head, the
        last blocks), the frozen prefix (at the linearisation point, its buffers included) is
        applied to D once and every product runs only the suffix on the cached activations
        ``H`` ``(N, *h_shape)`` — exact, since f(x) = suffix(prefix(x)) and no linearised
        weight is in the prefix (:func:`ntkscrub.prefix.prefix_rows`: an ``nn.Sequential``, a
        features → classifier model, or any model ``torch.fx`` can split at one value).
        Memory: H is held for all of D, within ``ProductConfig.cache_bytes``. Returns the rows
        the products stream and the cache record (``None`` when nothing was cached)."""
        space, rows, info = prefix_rows(
            self.space,
            {"data": data},
            batch_size=self.products.batch_size,
            budget=self.products.cache_bytes,
        )
        if not info["cached"]:
            return data, None
        self.space = space
        return rows["data"], info

    def _jacobian(self, data: Any, name: str) -> Jacobian:
        at = getattr(self, "J_D", None)
        options = jacobian_options(self.products, self._prefix)
        return Jacobian(self.space, data, at=None if at is None else at.theta, name=name, **options)

    # ------------------------------------------------------------------ requests
    def _check_indices(self, indices: Any) -> list[int]:
        if isinstance(indices, Tensor):
            if indices.dim() > 1 or indices.is_floating_point() or indices.dtype == torch.bool:
                raise TypeError("indices: expected a 1-D integer tensor or a sequence of ints")
            indices = indices.reshape(-1).tolist()
        if not isinstance(indices, Iterable) or isinstance(indices, (str, bytes)):
            raise TypeError(f"indices: expected a sequence of ints, got {type(indices).__name__}")
        out = []
        for i in indices:
            if isinstance(i, bool):
                raise TypeError("indices: expected ints, got a bool")
            try:
                out.append(operator.index(i))
            except TypeError:
                raise TypeError(f"indices: expected ints, got {type(i).__name__}") from None
        if not out:
            raise ValueError("indices: empty; give at least one position to forget")
        bad = [i for i in out if not 0 <= i < self.n]
        if bad:
            raise ValueError(f"indices: {bad[:10]} out of range [0, {self.n}) of data")
        if len(set(out)) != len(out):
            dup = sorted({i for i in out if out.count(i) > 1})
            raise ValueError(f"indices: duplicated positions {dup[:10]}")
        again = sorted(set(out) & set(self.forgotten))
        if again:
            raise ValueError(f"indices: {again[:10]} were already forgotten")
        if len(self.forgotten) + len(out) >= self.n:
            raise ValueError("indices: forgetting them would leave no sample to retain")
        return out

    def forget(self, indices: Iterable[int] | Tensor) -> ScrubResult:
        """Forget the samples at ``indices`` (positions in ``data``'s order) on top of all earlier
        requests; the result equals ``scrub(model, D ∖ F, D[F], same settings)`` for F every
        position forgotten so far (``.shift`` = Δ ``(p,)`` relative to w(D)).

        ``info["request"]`` records this request's matvecs, seconds, iterations and convergence;
        ``info["prepare"]`` the preparation's. A solve that misses its tolerance raises (with
        ``strict``) and leaves the scrubber as it was.
        """
        t0 = time.perf_counter()
        new = self._check_indices(indices)
        F = sorted(self.forgotten + new)
        kept = set(F)
        R = [i for i in range(self.n) if i not in kept]
        counter = MatvecCounter()
        dense = self.cfg.method == "dense"
        with full_fp32_precision(not self.products.allow_tf32):
            delta, y, rows_r, ridge_r, records = (self._delta_dense if dense else self._delta)(
                F, R, counter
            )
        # Commit the state only once the request succeeded.
        self.forgotten = F
        self._y = torch.zeros_like(self.alpha)
        self._y[rows_r] = y
        out = copy.deepcopy(self.model)
        self.space_w.load_into(out, self.w_d + delta)
        out.eval()
        request = {
            "number": len(self.requests) + 1,
            "new": len(new),
            "matvecs": counter.count,
            "seconds": time.perf_counter() - t0,
            "iterations": _iterations(records),
            "converged": all(r.get("converged", True) for r in records),
            "solves": records,
        }
        self.requests.append(request)
        info = self._info(F, R, ridge_r, request, delta)
        return ScrubResult(model=out, shift=delta, info=info, delta=delta, scale=1.0)

    def _delta(
        self, F: list[int], R: list[int], counter: MatvecCounter
    ) -> tuple[Tensor, Tensor, Tensor, float, list[dict[str, Any]]]:
        """Δ = J_Rᵀ y − J_Fᵀ α_F with (Θ_RR + λ_R I) y = J_R J_Fᵀ α_F + (λ_D − λ_R) α_R."""
        J_r = self._jacobian(subset(self._rows_data, R), "retain")
        J_f = self._jacobian(subset(self._rows_data, F), "forget")
        rows_r = _rows(R, self.c, self.alpha.device)
        rows_f = _rows(F, self.c, self.alpha.device)
        a_r, a_f = self.alpha[rows_r], self.alpha[rows_f]
        ridge_r = self.ridge if self.weight_decay is None else len(R) * self.weight_decay
        M = self._inv_d.preconditioner
        shared = M.restrict(rows_r, ridge_r) if (self.cfg.share_precond and M is not None) else None
        warm = self.cfg.warm_start and bool(self.forgotten)
        delta, y, records, _ = retain_change(
            J_r, J_f, a_r, a_f, ridge_r=ridge_r, ridge_d=self.ridge_d, config=self.cfg,
            counter=counter, precond=shared, x0=self._y[rows_r].clone() if warm else None,
            e_norm=float(self._e_d[rows_r].norm()),
        )  # fmt: skip
        return delta.detach(), y.detach(), rows_r, ridge_r, records

    def _delta_dense(
        self, F: list[int], R: list[int], counter: MatvecCounter
    ) -> tuple[Tensor, Tensor, Tensor, float, list[dict[str, Any]]]:
        """:meth:`_delta` on the dense twin, from what the preparation built: the explicit J_D
        ``(c·N, p)`` and Θ_DD + λ_D I ``(c·N, c·N)`` (float64 below float64 J). Θ_RR + λ_R I is
        the slice of rows and columns R (+ (λ_R − λ_D) on its diagonal), so a request is one
        Cholesky of ``(c·|R|)²`` and three products with the explicit rows, summed in the
        system's dtype: g = J_Fᵀα_F, b = J_R g + (λ_D − λ_R)α_R, Δ = J_Rᵀy − g — no pass over
        the data and no products counted in ``counter``.

        Why not a fresh dense scrub of R and F: that recomputes per-sample Jacobians of every
        retained sample (c backward passes each) and Θ_RR = J_R J_Rᵀ, which the prepared
        matrices already hold (quick preset, 2 CPU threads: ``benchmarks/quick_scrubber.py``).
        The explicit rows do not depend on which samples share a batch, so the slice is the
        fresh scrub's system up to the order of its floating-point sums."""
        del counter  # the explicit rows are products already paid for
        Jd = self.J_D.dense()  # (c·N, p), cached by the preparation's dense system
        A = self._inv_d.dense_system()  # (c·N, c·N) in the dense dtype, λ_D on its diagonal
        wide = A.dtype
        rows_r = _rows(R, self.c, self.alpha.device)
        rows_f = _rows(F, self.c, self.alpha.device)
        ridge_r = self.ridge if self.weight_decay is None else len(R) * self.weight_decay
        u = torch.zeros(self.c * self.n, 1, dtype=wide, device=A.device)
        u[rows_f, 0] = self.alpha[rows_f].to(wide)
        g = accumulated_matmul(Jd.mT, u, wide)  # (p, 1): J_Fᵀ α_F
        b = accumulated_matmul(Jd, g, wide)[rows_r, 0]  # (c·|R|,): J_R g
        b = b + (self.ridge_d - ridge_r) * self.alpha[rows_r].to(wide)
        eye = torch.eye(len(rows_r), dtype=wide, device=A.device)
        A_rr = A[rows_r][:, rows_r] + (ridge_r - self.ridge_d) * eye
        inv = Inverse(DenseLinearOperator(A_rr), self.cfg, label="Θ_RR (slice of Θ_DD)")
        y = inv.solve(b)  # (c·|R|,)
        u.zero_()
        u[rows_r, 0] = y
        delta = (accumulated_matmul(Jd.mT, u, wide) - g)[:, 0]
        dtype = self.alpha.dtype
        return delta.to(dtype), y.to(dtype), rows_r, ridge_r, list(inv.records)

    def _info(
        self, F: list[int], R: list[int], ridge_r: float, request: dict, delta: Tensor
    ) -> dict[str, Any]:
        return {
            "linearize_at": self.linearize_at,
            "loss": self.loss,
            "solver": self.cfg.method,
            "form": "scrubber",
            "ridge_r": ridge_r,
            "ridge_d": self.ridge_d,
            "weight_decay": self.weight_decay,
            "tol": self.cfg.tol_for(self.space.dtype),
            "converged": request["converged"] and self.prepare_info["converged"],
            "n_retain": len(R),
            "n_forget": len(F),
            "forgotten": list(F),
            "num_classes": self.c,
            "p": self.space.p,
            "dtype": str(self.space.dtype),
            "device": str(self.space.device),
            "matvecs": request["matvecs"],
            "solves": request["solves"],
            "request": {k: v for k, v in request.items() if k != "solves"},
            "prepare": {k: v for k, v in self.prepare_info.items() if k != "solves"},
            "rescale": None,
            "rescale_factor": 1.0,
            "shift_norm": float(delta.norm()),
            "delta_norm": float(delta.norm()),
            "noise": {"alpha": 0.0},
            "config": {"solver": self.cfg.to_dict(), "products": self.products.to_dict()},
            "seconds": request["seconds"],
            "peak_memory_mib": _peak_memory(self.space.device),
        }

    def __repr__(self) -> str:
        return (
            f"Scrubber(N={self.n}, c={self.c}, p={self.space.p}, forgotten={len(self.forgotten)}, "
            f"requests={len(self.requests)})"
        )
