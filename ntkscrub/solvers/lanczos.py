"""Block-of-independent-runs Lanczos and stochastic Lanczos quadrature (SLQ).

``lanczos`` runs m independent Lanczos recurrences (one per start vector) side by side, so each
step costs ONE call to the operator with m columns: at NTK scale a call costs about two training
epochs whatever the number of columns, and batching the columns is much cheaper per vector.

``slq_trace`` / ``slq_logdet`` estimate ``tr f(A)`` (Ubaru, Chen, Saad, "Fast estimation of
tr(f(A)) via stochastic Lanczos quadrature", SIMAX 2017): for Rademacher probes z (‖z‖² = n),
``zᵀ f(A) z ≈ n · Σ_i τ_i² f(θ_i)``, with θ_i the eigenvalues of the Lanczos tridiagonal T and τ_i
the first components of its eigenvectors (the Gauss quadrature rule of the spectral measure of A
at z).

Shifted spectra (the ``shift`` argument). Θ + λI has a huge cluster of eigenvalues at (just above)
λ and a few large ones; log is steep near λ, and the k-node Gauss rule systematically overestimates
log det (for log, whose even derivatives are negative, the Gauss rule is an upper bound on
zᵀ log(A) z) until k is large. Knowing ``A = s·I + K`` with K PSD (s = λ):

* we evaluate ``log det A = n log s + n Σ τ_i² log(θ_i / s)``, i.e. SLQ on A/s, whose cluster sits
  at 1 where log is 0. Note that on its own this rewriting is an *exact identity* for normalised
  probes (the weights τ_i² sum to one), so it does not change the estimate;
* what does reduce the error is to use s as a *prescribed quadrature node*: the Gauss–Radau rule
  with a node fixed at s (Golub & Meurant, "Matrices, Moments and Quadrature", 2010) places one node
  exactly on the cluster. For log and a node s ≤ λ_min(A), Radau is a *lower* bound and Gauss an
  *upper* bound on each probe's zᵀ log(A) z (exact arithmetic), both from the same Lanczos data at
  no extra matvec. ``slq_logdet(..., shift=s)`` reports the midpoint as ``value`` and half the gap
  as ``quadrature_halfwidth``, a bound on the quadrature (not the Monte-Carlo) error: if it is not
  small next to ``stderr``, run more steps.

Measured. Test matrix (n = 200, 80% of the spectrum in a cluster at s, 15 steps): Gauss +218,
Radau −26, midpoint +96 (stderr ≈ 10). Power-law spectrum 1e3/i² + s, n = 500,000, float64, 32
probes, s = 1e-3 (two thirds of K's eigenvalues below s), errors Gauss / Radau / midpoint: 20 steps
+3679 / −1334 / +1172, 50 steps +53 / −46 / +3.2, 100 steps +0.18 for all (stderr 0.13). When K's
spectrum ends well above s (n = 3000, s = 1e-5: no cluster) the Radau node is wasted and the
midpoint can be worse than Gauss (50 steps: −1287 vs +450), but then the half-width (1737) says so.
With a float32 operator the rounding of the Lanczos vectors adds a bias of its own (≈ −110, i.e.
3e-5 relative, at n = 500,000), and Gauss is no longer a strict upper bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ntkscrub.solvers.cg import (
    Operator,
    _is_linear_operator,
    as_matmul,
    coldot,
    resolve_dtype_device,
)

__all__ = [
    "LanczosResult",
    "lanczos",
    "TraceEstimate",
    "LogdetEstimate",
    "slq_trace",
    "slq_logdet",
    "dense_logdet",
    "Sharding",
]

_F64 = torch.float64


@dataclass
class LanczosResult:
    """Output of :func:`lanczos` for m start vectors and at most s steps.

    Attributes:
        alpha: ``(m, s)`` float64 diagonals of the tridiagonals (``(s,)`` for a 1-D start vector);
            entries past a run's ``steps[j]`` are 0.
        beta: ``(m, s)`` float64: ``beta[:, i]`` is the norm of the Lanczos residual after step i,
            so ``T_j`` uses ``beta[j, :steps[j] − 1]`` off the diagonal and
            ``beta[j, steps[j] − 1]`` is the coupling to the next (not computed) basis vector — 0
            after a breakdown. Needed by the Gauss–Radau rule.
        basis: ``(m, n, s)`` (``(n, s)`` for a 1-D start) Lanczos vectors in the start vector's
            dtype when requested, else ``None``; ``basis[j][:, :steps[j]]`` is orthonormal and
            ``basis[j]ᵀ A basis[j] = T_j``.
        steps: effective number of steps of each run (< s after a breakdown, i.e. when the Krylov
            space of that start vector became invariant).
        matvecs, block_matvecs, seconds: column-matvecs, calls to A, wall time.

    Unpacks as ``alpha, beta, basis = lanczos(...)``.
    """

    alpha: Tensor
    beta: Tensor
    basis: Tensor | None
    steps: list[int]
    matvecs: int = 0
    block_matvecs: int = 0
    seconds: float = 0.0

    def __iter__(self) -> Iterator[Tensor | None]:
        return iter((self.alpha, self.beta, self.basis))

    def tridiagonal(self, j: int = 0) -> Tensor:
        """The ``(steps[j], steps[j])`` float64 tridiagonal of run ``j``."""
        a = self.alpha if self.alpha.dim() == 2 else self.alpha.unsqueeze(0)
        b = self.beta if self.beta.dim() == 2 else self.beta.unsqueeze(0)
        k = self.steps[j]
        return _tridiag(a[j, :k], b[j, : k - 1])


def _tridiag(a: Tensor, b: Tensor) -> Tensor:
    return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)


def _reduced_dot(
    allreduce: Callable[[Tensor], Tensor] | None,
) -> Callable[..., Tensor]:
    """Column inner products ``(m,)`` in float64, summed over the ranks when ``allreduce`` is
    given; ``extra`` scalars (flags, counts) ride along in the same reduction, appended."""

    def dot(a: Tensor, b: Tensor, extra: list[float] | None = None) -> Tensor:
        d = coldot(a, b)
        if extra is not None:
            d = torch.cat([d, torch.tensor(extra, dtype=_F64, device=d.device)])
        return d if allreduce is None else allreduce(d)

    return dot


def lanczos(  # noqa: C901, PLR0915 - listed in pyproject.toml
    A: Operator,
    v: Tensor,
    steps: int,
    *,
    reorthogonalize: bool = True,
    return_basis: bool = False,
    allreduce: Callable[[Tensor], Tensor] | None = None,
) -> LanczosResult:
    """Run ``steps`` Lanczos steps from each column of ``v``, all columns in one call to A per step.

    Args:
        A: symmetric operator of size n (see :func:`~ntkscrub.solvers.as_matmul`).
        v: start vector(s), ``(n,)`` or ``(n, m)``; nonzero columns; normalised here. Vectors are
            kept in ``v``'s dtype/device, scalars (α, β) in float64.
        steps: maximum number of steps (capped at n).
        reorthogonalize: full reorthogonalisation of every new vector against all previous ones of
            its run (classical Gram–Schmidt, twice). It costs O(n s² m) flops and n·s·m stored
            numbers, negligible next to s NTK matvecs, and keeps the Ritz values free of the
            spurious copies ("ghosts") plain Lanczos produces.
        return_basis: also return the Lanczos vectors (stored anyway when reorthogonalising).
        allreduce: data-parallel hook (:mod:`ntkscrub.distributed`): ``A`` and ``v`` are this
            rank's rows (``(n_k,)``/``(n_k, m)``, ``n_k`` may be 0) of a row-sharded operator, and
            ``allreduce`` sums a 1-D float64 tensor of per-rank partials over the ranks, returning
            the same bits on every rank (:meth:`ntkscrub.distributed.Comm.sum_scalars`). Every
            inner product and norm (α, β, the reorthogonalisation coefficients, the start norms)
            goes through it, so every rank builds the same tridiagonals and takes the same
            breakdown decisions; ``steps`` is capped at the global n. The basis stays row-sharded.

    A run stops early (breakdown) when its residual norm falls below ``100 · eps · ‖T‖``: its Krylov
    space is invariant, its Ritz values are exact eigenvalues, and it is dropped from later calls.
    """
    t0 = time.perf_counter()
    if not isinstance(v, Tensor) or not v.is_floating_point():
        raise TypeError(f"v: expected a floating-point torch.Tensor, got {type(v).__name__}")
    # With allreduce, a rank may hold no rows (the global n is checked below).
    empty_rows = v.dim() in (1, 2) and v.shape[0] == 0 and allreduce is None
    if v.dim() not in (1, 2) or empty_rows or (v.dim() == 2 and v.shape[1] == 0):
        raise ValueError(
            f"v: expected a non-empty tensor of shape (n,) or (n, m), got {tuple(v.shape)}"
        )
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: must be a positive integer, got {steps!r}")
    squeeze = v.dim() == 1
    V = v.unsqueeze(1) if squeeze else v  # (n, m): this rank's rows under allreduce
    n, m = V.shape
    dot = _reduced_dot(allreduce)
    # One reduction for the global n, the start norms and the finiteness of v on every rank.
    head = dot(V, V, extra=[float(n), 0.0 if bool(torch.isfinite(V).all()) else 1.0])
    vnorm, n_glob, bad = head[:m].sqrt(), int(head[m]), float(head[m + 1])
    if n_glob == 0:
        raise ValueError(f"v: expected a non-empty tensor of shape (n,) or (n, m), got {(0, m)}")
    if bad > 0:
        raise ValueError("v: contains NaN or infinite values")
    steps = min(steps, n_glob)
    matmul = as_matmul(A, n, name="A")
    if bool((vnorm == 0).any()):
        raise ValueError("v: start vectors must be nonzero")
    dt, dev = V.dtype, V.device
    eps = torch.finfo(dt).eps
    keep_basis = reorthogonalize or return_basis

    alpha = torch.zeros(m, steps, dtype=_F64)  # CPU bookkeeping
    beta = torch.zeros(m, steps, dtype=_F64)
    run_steps = [0] * m
    q = V / vnorm.to(dt)  # (n, m) current Lanczos vectors
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros(m, dtype=_F64, device=dev)
    # (s, n, m) preallocated so that reorthogonalisation reads a view, never a growing copy
    basis = torch.empty(steps, n, m, dtype=dt, device=dev) if keep_basis else None
    active = torch.ones(m, dtype=torch.bool)  # CPU mask of runs still going
    anorm = torch.zeros(m, dtype=_F64)  # running estimate of ‖T‖ per run, for breakdown tests
    matvecs = calls = 0
    for i in range(steps):
        if basis is not None:
            basis[i] = q
        idx = torch.nonzero(active).flatten()
        idx_d = idx.to(dev)
        Wa = matmul(q[:, idx_d])  # (n, m_active): one call for every running start vector
        matvecs += int(idx.numel())
        calls += 1
        W = torch.zeros_like(q)
        W[:, idx_d] = Wa
        # α and a non-finite-product flag in one reduction: every rank raises together.
        a = dot(q, W, extra=[0.0 if bool(torch.isfinite(Wa).all()) else 1.0])
        a, bad = a[:m], float(a[m])
        if bad > 0:
            raise ValueError("A: operator returned NaN or infinite values")
        a[~active.to(dev)] = 0.0
        alpha[:, i] = a.cpu()
        for j in idx.tolist():
            run_steps[j] = i + 1
        W = W - q * a.to(dt) - q_prev * b_prev.to(dt)
        if reorthogonalize:
            Qs = basis[: i + 1]  # (i+1, n, m) view
            for _ in range(2):  # "twice is enough" (Kahan–Parlett)
                c = torch.einsum("inm,nm->im", Qs, W)
                if allreduce is not None:  # the (i+1, m) coefficients are sums over all rows
                    c = allreduce(c.to(_F64).reshape(-1)).reshape(c.shape).to(dt)
                W = W - torch.einsum("im,inm->nm", c, Qs)
        W[:, ~active.to(dev)] = 0.0
        b = dot(W, W).sqrt()  # (m,) float64
        b_cpu = b.cpu()
        anorm = torch.maximum(anorm, alpha[:, i].abs() + b_cpu + beta[:, max(i - 1, 0)])
        broke = active & (b_cpu <= 100 * eps * anorm.clamp_min(torch.finfo(_F64).tiny))
        b_cpu[broke] = 0.0
        b_cpu[~active] = 0.0
        beta[:, i] = b_cpu
        active &= ~broke
        if i == steps - 1 or not bool(active.any()):
            break
        b_safe = torch.where(b_cpu > 0, b_cpu, torch.ones_like(b_cpu)).to(dev)
        q_prev, q = q, W / b_safe.to(dt)
        q[:, ~active.to(dev)] = 0.0
        b_prev = b_cpu.to(dev)

    s_eff = max(run_steps)
    alpha, beta = alpha[:, :s_eff], beta[:, :s_eff]
    Q = None
    if return_basis:
        Q = basis[:s_eff].permute(2, 1, 0).contiguous()  # (m, n, s)
        for j in range(m):
            Q[j, :, run_steps[j] :] = 0.0
    if squeeze:
        alpha, beta = alpha[0], beta[0]
        Q = Q[0] if Q is not None else None
    return LanczosResult(
        alpha=alpha,
        beta=beta,
        basis=Q,
        steps=run_steps,
        matvecs=matvecs,
        block_matvecs=calls,
        seconds=time.perf_counter() - t0,
    )


def _radau(T: Tensor, beta_k: float, node: float) -> Tensor:
    """Extend T (k, k) to the (k+1, k+1) Jacobi matrix whose Gauss rule has a node at ``node``.

    Golub–Meurant: solve (T − node·I) δ = β_k² e_k, set φ = node + δ_k; then ``node`` is an
    eigenvalue of [[T, β_k e_k], [β_k e_kᵀ, φ]].
    """
    k = T.shape[0]
    if beta_k == 0.0:
        return T  # invariant subspace: the Gauss rule is already exact
    rhs = torch.zeros(k, dtype=_F64)
    rhs[-1] = beta_k**2
    shifted = T - node * torch.eye(k, dtype=_F64)
    try:
        delta = torch.linalg.solve(shifted, rhs)
    except RuntimeError:  # node is (numerically) a Ritz value already: Gauss has it as a node
        return T
    phi = node + float(delta[-1])
    out = torch.zeros(k + 1, k + 1, dtype=_F64)
    out[:k, :k] = T
    out[k, k - 1] = out[k - 1, k] = beta_k
    out[k, k] = phi
    return out


def _quadrature(res: LanczosResult, fn: Callable[[Tensor], Tensor], node: float | None) -> Tensor:
    """Per-run ``Σ τ_i² f(θ_i)`` (Gauss rule, or Gauss–Radau with a node at ``node``); (m,)."""
    a = res.alpha if res.alpha.dim() == 2 else res.alpha.unsqueeze(0)
    b = res.beta if res.beta.dim() == 2 else res.beta.unsqueeze(0)
    out = torch.empty(a.shape[0], dtype=_F64)
    for j, k in enumerate(res.steps):
        T = _tridiag(a[j, :k], b[j, : k - 1])
        if node is not None:
            T = _radau(T, float(b[j, k - 1]), node)
        theta, S = torch.linalg.eigh(T)
        w = S[0] ** 2  # Gauss weights, sum to 1
        out[j] = (w * fn(theta)).sum()
    return out


@dataclass
class TraceEstimate:
    """A stochastic Lanczos quadrature estimate of ``tr f(A)``.

    Attributes:
        value: the estimate (mean of ``per_probe``).
        stderr: sample standard deviation of ``per_probe`` / √probes (``nan`` for one probe); the
            Monte-Carlo error only, not the quadrature error.
        probes, steps: number of probe vectors and of Lanczos steps (max over probes).
        matvecs, block_matvecs: column-matvecs and calls to A (one call per step for all probes).
        seconds: wall time.
        per_probe: the per-probe estimates ``n Σ τ² f(θ)``.
        rule: the quadrature rule behind ``value``.
        gauss_value: the plain Gauss-rule estimate from the same Lanczos runs.
    """

    value: float
    stderr: float
    probes: int
    steps: int
    matvecs: int
    block_matvecs: int
    seconds: float
    per_probe: list[float] = field(default_factory=list)
    rule: str = "gauss"
    gauss_value: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (non-finite floats become ``None``)."""
        out: dict[str, Any] = {}
        for key, val in self.__dict__.items():
            if isinstance(val, float) and not math.isfinite(val):
                val = None
            out[key] = val
        return out


@dataclass
class LogdetEstimate(TraceEstimate):
    """SLQ estimate of ``log det A``; see :class:`TraceEstimate`.

    Extra attributes:
        shift: the s of ``A = s·I + K`` used (``None`` if not given).
        upper: mean Gauss-rule estimate — an upper bound on the probes' exact quadratic forms
            ``Σ_j z_jᵀ log(A) z_j / probes`` (log has negative even derivatives).
        lower: with a shift, the mean Gauss–Radau estimate with a node at s — a lower bound on the
            same quantity; ``None`` without a shift.
        quadrature_halfwidth: ``(upper − lower) / 2`` with a shift (``None`` without): bounds the
            quadrature error of ``value`` (the Monte-Carlo error, ``stderr``, comes on top). If it
            is not small next to ``stderr``, run more steps.
    """

    shift: float | None = None
    upper: float | None = None
    lower: float | None = None
    quadrature_halfwidth: float | None = None


_PROBE_CHUNK = 1 << 22  # int8 draws per chunk when only some rows are kept


def rademacher(
    n: int,
    m: int,
    seed: int | None,
    dtype: torch.dtype,
    device: torch.device,
    rows: slice | None = None,
) -> Tensor:
    """An ``(n, m)`` block of ±1 probes, drawn on the CPU (same draws on every device) from
    ``seed``, or from torch's global generator when ``seed`` is None.

    ``rows``: keep only these rows (``slice(start, stop)``, step 1), e.g. a rank's shard. The
    draws are made in row chunks from the same generator and the others discarded, so the shards
    of all ranks, concatenated in order, are exactly the full block (tested) while no rank holds
    more than its rows plus one chunk of ``2**22`` int8 draws.
    """
    g = None
    if seed is not None:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(seed))
    if rows is None:
        z = torch.randint(0, 2, (n, m), generator=g, dtype=torch.int8)  # (n, m) CPU: reproducible
        return (2 * z - 1).to(device=device, dtype=dtype)
    start, stop, step = rows.indices(n)
    if step != 1:
        raise ValueError(f"rows: expected a contiguous slice, got {rows!r}")
    chunk = max(1, _PROBE_CHUNK // max(m, 1))
    kept = []
    for lo in range(0, max(stop, start), chunk):  # the stream up to this shard's last row
        hi = min(lo + chunk, n)
        z = torch.randint(0, 2, (hi - lo, m), generator=g, dtype=torch.int8)
        if hi > start:
            kept.append(z[max(start - lo, 0) : stop - lo])
    z = torch.cat(kept) if kept else torch.zeros(0, m, dtype=torch.int8)
    return (2 * z - 1).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Sharding:
    """How a row-sharded operator is split over the ranks (data-parallel SLQ).

    Attributes:
        rows: this rank's rows ``slice(start, stop)`` of the global ``n`` (the ranks' slices,
            in rank order, tile ``range(n)``; a slice may be empty).
        allreduce: sums a 1-D float64 tensor over the ranks, the same bits on every rank
            (:meth:`ntkscrub.distributed.Comm.sum_scalars`).

    An operator *replicated* on every rank (the bounds' p×p precision) uses ``rows =
    slice(0, n)`` and, as ``allreduce``, rank 0's value (:meth:`~ntkscrub.distributed.Comm.
    broadcast`): then every rank takes the same decisions even if its products rounded otherwise.
    """

    rows: slice
    allreduce: Callable[[Tensor], Tensor]


def _probe_runs(
    A: Operator,
    n: Any,
    probes: Any,
    steps: Any,
    seed: Any,
    dtype: torch.dtype | None,
    device: Any,
    shard: Sharding | None = None,
) -> LanczosResult:
    """Validate, draw ``probes`` Rademacher vectors (‖z‖² = n) and run Lanczos on all at once
    (with ``shard``: this rank's rows of the very probes one process would draw)."""
    for name, val in (("n", n), ("probes", probes), ("steps", steps)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name}: must be a positive integer, got {val!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
    dt, dev = resolve_dtype_device(A, dtype, device)
    if shard is None:
        Z = rademacher(n, probes, seed, dt, dev)  # (n, probes)
        return lanczos(A, Z, steps, reorthogonalize=True)
    if seed is None:  # each rank's global generator is its own: the probes would not tile
        raise ValueError("seed: data-parallel SLQ needs an int seed (the same on every rank)")
    if not isinstance(shard, Sharding):
        raise TypeError(f"shard: expected a Sharding, got {type(shard).__name__}")
    start, stop, _ = shard.rows.indices(n)
    Z = rademacher(n, probes, seed, dt, dev, rows=shard.rows)  # (n_k, probes)
    # The row counts must tile n (a wrong slice would silently estimate another matrix).
    total = float(shard.allreduce(torch.tensor([float(stop - start)], dtype=_F64))[0])
    if int(total) != n:
        raise ValueError(f"shard: the ranks' rows add up to {int(total)}, not n = {n}")
    return lanczos(A, Z, steps, reorthogonalize=True, allreduce=shard.allreduce)


def _stderr(per: Tensor) -> float:
    if per.numel() < 2:
        return float("nan")
    return float(per.std(unbiased=True) / math.sqrt(per.numel()))


def slq_trace(
    A: Operator,
    n: int,
    fn: Callable[[Tensor], Tensor],
    *,
    probes: int = 30,
    steps: int = 30,
    seed: int | None = None,
    node: float | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    shard: Sharding | None = None,
) -> TraceEstimate:
    """Estimate ``tr f(A)`` by stochastic Lanczos quadrature with Rademacher probes.

    Args:
        A: symmetric operator of size ``n``.
        fn: f, applied elementwise to a float64 tensor of Ritz values (e.g. ``torch.log``).
        probes: number of Rademacher probes, all run as one block (one A call per step).
        steps: Lanczos steps per probe (capped at n).
        seed: seed of the probes (``None``: torch's global generator).
        node: if given, ``value`` uses the Gauss–Radau rule with a node prescribed at ``node`` (a
            known end of the spectrum); ``gauss_value`` always holds the plain Gauss rule.
        dtype, device: of the probe block passed to A (default: those of a Tensor/LinearOperator,
            else the default dtype on the CPU).
        shard: data-parallel SLQ (:class:`Sharding`): ``A`` acts on this rank's rows of a
            row-sharded operator of global size ``n``; each rank draws its rows of the same probes
            (so the estimate equals the one-process estimate up to the rounding of the reordered
            sums) and every rank returns the same bits. ``seed`` must be an int.

    Cost: ``steps`` calls to A, each with ``probes`` columns (fewer after breakdowns); with
    ``shard``, four scalar reductions per step (α, two Gram–Schmidt passes, β).
    """
    t0 = time.perf_counter()
    res = _probe_runs(A, n, probes, steps, seed, dtype, device, shard)
    gauss = n * _quadrature(res, fn, None)  # (probes,)
    per = gauss if node is None else n * _quadrature(res, fn, float(node))
    return TraceEstimate(
        value=float(per.mean()),
        stderr=_stderr(per),
        probes=probes,
        steps=max(res.steps),
        matvecs=res.matvecs,
        block_matvecs=res.block_matvecs,
        seconds=time.perf_counter() - t0,
        per_probe=per.tolist(),
        rule="gauss" if node is None else "gauss-radau",
        gauss_value=float(gauss.mean()),
    )


def slq_logdet(
    A: Operator,
    n: int,
    *,
    probes: int = 30,
    steps: int = 30,
    seed: int | None = None,
    shift: float | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    shard: Sharding | None = None,
) -> LogdetEstimate:
    """Estimate ``log det A`` for a symmetric positive definite ``A`` by SLQ (Rademacher probes).

    Args:
        A: SPD operator of size ``n``.
        probes, steps, seed, dtype, device, shard: as for :func:`slq_trace` (``shard``: A is
            this rank's rows of a row-sharded operator; the same value on every rank).
        shift: ``s > 0`` such that ``A = s·I + K`` with K PSD (for Θ + λI: s = λ). Then, per
            probe, the Gauss rule (upper bound) and the Gauss–Radau rule with a node at s (lower
            bound) are both evaluated on the same Lanczos data — as
            ``n log s + n Σ τ² log(θ / s)``, the cluster at s mapped to 1 where log is 0 — and
            ``value`` is their midpoint, ``quadrature_halfwidth`` half their gap. Ritz values below
            s (rounding) are clamped to s. See the module docstring for why the shift alone changes
            nothing and the Radau node is what helps.

    Without a shift, ``value`` is the standard Gauss-rule SLQ estimate (biased upward when the
    steps do not resolve the low end of the spectrum).

    Raises:
        ValueError: if a Ritz value is ≤ 0 (A not positive definite) when no shift is given.
    """
    t0 = time.perf_counter()
    if shift is None:

        def log_checked(theta: Tensor) -> Tensor:
            if bool((theta <= 0).any()):
                raise ValueError(
                    f"A: a Ritz value is {float(theta.min()):.3e} ≤ 0, so A is not positive "
                    "definite (pass shift=s if A = s·I + PSD)"
                )
            return torch.log(theta)

        res = _probe_runs(A, n, probes, steps, seed, dtype, device, shard)
        per = n * _quadrature(res, log_checked, None)
        value = float(per.mean())
        return LogdetEstimate(
            value=value,
            stderr=_stderr(per),
            probes=probes,
            steps=max(res.steps),
            matvecs=res.matvecs,
            block_matvecs=res.block_matvecs,
            seconds=time.perf_counter() - t0,
            per_probe=per.tolist(),
            rule="gauss",
            gauss_value=value,
            upper=value,
        )

    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not shift > 0:
        raise ValueError(f"shift: must be a positive number (A = shift·I + PSD), got {shift!r}")
    if not math.isfinite(shift):
        raise ValueError(f"shift: must be finite, got {shift!r}")
    s = float(shift)

    def log_rel(theta: Tensor) -> Tensor:
        # log(θ/s): the cluster at s contributes 0 and n·log s is added outside the quadrature.
        return torch.log((theta / s).clamp_min(1.0))

    res = _probe_runs(A, n, probes, steps, seed, dtype, device, shard)
    const = n * math.log(s)
    gauss = n * _quadrature(res, log_rel, None) + const  # (probes,) upper bounds
    radau = n * _quadrature(res, log_rel, s) + const  # (probes,) lower bounds
    per = 0.5 * (gauss + radau)
    upper, lower = float(gauss.mean()), float(radau.mean())
    return LogdetEstimate(
        value=float(per.mean()),
        stderr=_stderr(per),
        probes=probes,
        steps=max(res.steps),
        matvecs=res.matvecs,
        block_matvecs=res.block_matvecs,
        seconds=time.perf_counter() - t0,
        per_probe=per.tolist(),
        rule="gauss/gauss-radau midpoint",
        gauss_value=upper,
        shift=s,
        upper=upper,
        lower=lower,
        # ≥ 0: once the bracket has closed, rounding can leave lower a hair above upper
        quadrature_halfwidth=max(0.5 * (upper - lower), 0.0),
    )


def dense_logdet(A: Any) -> float:
    """Exact ``log det A`` of a dense symmetric positive definite matrix, in float64.

    Args:
        A: ``(n, n)`` tensor or a LinearOperator (densified; small n only).

    Raises:
        ValueError: if A is not square or not positive definite.
    """
    if _is_linear_operator(A):
        A = A.to_dense()
    if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[0] != A.shape[1]:
        got = tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__
        raise ValueError(f"A: expected a square (n, n) matrix, got {got}")
    A64 = A.detach().to(_F64)
    A64 = 0.5 * (A64 + A64.T)
    L, info = torch.linalg.cholesky_ex(A64)
    if int(info) != 0:
        lam_min = float(torch.linalg.eigvalsh(A64)[0])
        raise ValueError(f"A: not positive definite (smallest eigenvalue {lam_min:.3e})")
    return float(2.0 * torch.log(torch.diagonal(L)).sum())
