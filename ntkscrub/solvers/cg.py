"""Preconditioned conjugate gradients for ``A X = B`` with many right-hand sides, matrix-free.

``A`` is symmetric positive (semi)definite and is only ever *applied* to blocks of vectors. In this
project one application of the NTK operator Θ = J Jᵀ (+λI) to a block costs about two training
epochs, so this solver is built around spending as few column-matvecs as possible:

* every column runs its own CG recurrence (a block of independent recurrences, *not* block-CG) and
  stops on its own relative residual ``‖b − A x‖ / ‖b‖ ≤ tol``;
* converged columns are frozen and dropped from the block passed to ``A``;
* all scalars (α, β, ⟨r, z⟩, residual norms) are computed in ``scalar_dtype`` (float64 by default)
  while the vectors stay in the right-hand side's dtype: with float32 scalars CG stalls or diverges
  once the ridge is small and the system ill-conditioned;
* at exit the *true* residual is recomputed with one extra block matvec (the recursively updated
  residual drifts from ``b − A x`` in float32); a column whose recursion claimed convergence but
  whose true residual is still above ``tol`` is restarted from its current iterate with the true
  residual
  (at most ``_MAX_RESTARTS`` times, and only while restarts keep reducing the residual).

Why not ``linear_operator.utils.linear_cg`` (gpytorch's CG)? It runs at least 10 iterations, divides
each right-hand side by its norm, stops on the *mean* relative residual over the columns (default
tolerance 1) and only warns on non-convergence; it keeps multiplying converged columns. For a
scrubbing step whose accuracy is checked per column and whose cost is counted in matvecs, none of
that is acceptable, hence this implementation.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ntkscrub._progress import check_progress, logger, progress_bar, warn

__all__ = [
    "as_matmul",
    "cg",
    "CGInfo",
    "CGNotConverged",
    "CGNonFinite",
    "Operator",
    "as_precond",
    "ritz_extremes",
    "ridge_for_iterations",
    "DEFAULT_MAX_SECONDS",
]

# An operator: a callable (n, k) -> (n, k), a LinearOperator or a dense (n, n) tensor.
Operator = Any

# A restart is only useful while it makes progress; past a few the iterate sits at the attainable
# floor of the working precision (≈ eps · κ) and more restarts only burn matvecs.
_MAX_RESTARTS = 3

# Upcasting an (n, m) block to float64 for a reduction allocates a copy; chunk the rows so the copy
# stays below this many elements (a few hundred MB in float64) at NTK scale (n = c·N ≈ 5e5).
_CHUNK_ELEMENTS = 1 << 24


def _is_linear_operator(A: Any) -> bool:
    try:
        from linear_operator.operators import LinearOperator
    except ImportError:  # pragma: no cover - linear_operator is a declared dependency
        return False
    return isinstance(A, LinearOperator)


def as_matmul(A: Operator, n: int | None = None, *, name: str = "A") -> Callable[[Tensor], Tensor]:  # noqa: C901 - listed in pyproject.toml
    """Turn an operator into a function ``X (n, k) -> A X (n, k)``.

    Args:
        A: a dense ``Tensor`` of shape ``(n, n)``, a ``linear_operator.LinearOperator`` of shape
            ``(n, n)``, or a callable mapping an ``(n, k)`` tensor to an ``(n, k)`` tensor.
        n: when given, the operator's size is checked (eagerly for tensors and LinearOperators,
            on every call for callables).
        name: the argument name used in error messages.

    Dense tensors and LinearOperators are applied in *their own* dtype and device, and the result is
    cast back to the dtype and device of ``X`` (so a float64 reference matrix can serve a float32
    solve and vice versa). A callable receives ``X`` unchanged; its output must be a tensor of the
    same shape, and is cast to ``X``'s dtype/device if it differs.

    Every returned function checks the output shape (``ValueError`` naming ``name``).
    """
    if isinstance(A, Tensor) or _is_linear_operator(A):
        shape = tuple(A.shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"{name}: expected a square (n, n) operator, got shape {shape}")
        if n is not None and shape[0] != n:
            raise ValueError(f"{name}: operator has size {shape[0]}, expected {n}")
        if isinstance(A, Tensor) and not (A.is_floating_point() or A.is_complex()):
            raise TypeError(f"{name}: dense operator must be a floating tensor, got {A.dtype}")
        op_dtype, op_device = A.dtype, A.device
        size = shape[0]

        def matmul(X: Tensor) -> Tensor:
            _check_input(X, size, name)
            Y = A.matmul(X.to(device=op_device, dtype=op_dtype))
            if not isinstance(
                Y, Tensor
            ):  # a LinearOperator times a tensor is a tensor, but be safe
                Y = Y.to_dense()
            return Y.to(device=X.device, dtype=X.dtype)

        return matmul

    if callable(A):

        def matmul_callable(X: Tensor) -> Tensor:
            if n is not None:
                _check_input(X, n, name)
            Y = A(X)
            if not isinstance(Y, Tensor):
                raise TypeError(f"{name}: operator must return a torch.Tensor, got {type(Y)}")
            if Y.shape != X.shape:
                raise ValueError(
                    f"{name}: operator returned shape {tuple(Y.shape)} for an input of shape "
                    f"{tuple(X.shape)} (it must map (n, k) to (n, k))"
                )
            if Y.dtype != X.dtype or Y.device != X.device:
                Y = Y.to(device=X.device, dtype=X.dtype)
            return Y

        return matmul_callable

    raise TypeError(
        f"{name}: expected a torch.Tensor (n, n), a linear_operator.LinearOperator or a callable "
        f"(n, k) -> (n, k), got {type(A).__name__}"
    )


def resolve_dtype_device(
    A: Any, dtype: torch.dtype | None, device: torch.device | str | None
) -> tuple[torch.dtype, torch.device]:
    """dtype/device of the blocks passed to ``A``: given, else those of a Tensor/LinearOperator,
    else the default dtype on the CPU (pass ``device`` for a CUDA callable)."""
    if isinstance(A, Tensor) or _is_linear_operator(A):
        dt, dev = A.dtype, A.device
    else:
        dt, dev = torch.get_default_dtype(), torch.device("cpu")
    dt = dtype if dtype is not None else dt
    dev = torch.device(device) if device is not None else dev
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dt!r}")
    return dt, dev


def _check_input(X: Tensor, n: int, name: str) -> None:
    if X.dim() != 2 or X.shape[0] != n:
        raise ValueError(
            f"{name}: operator of size {n} applied to a block of shape {tuple(X.shape)}"
        )


def as_precond(precond: Any, name: str = "precond") -> Callable[[Tensor], Tensor] | None:
    """``None`` → ``None``; an object with ``.solve(R)`` or a callable → a function ``R ↦ M⁻¹R``."""
    if precond is None:
        return None
    solve = getattr(precond, "solve", None)
    if callable(solve):
        fn = solve
    elif callable(precond):
        fn = precond
    else:
        raise TypeError(
            f"{name}: expected None, an object with .solve(R) or a callable R -> M^-1 R, "
            f"got {type(precond).__name__}"
        )

    def apply(R: Tensor) -> Tensor:
        Z = fn(R)
        if not isinstance(Z, Tensor) or Z.shape != R.shape:
            got = tuple(Z.shape) if isinstance(Z, Tensor) else type(Z).__name__
            raise ValueError(f"{name}: returned {got} for an input of shape {tuple(R.shape)}")
        return Z.to(device=R.device, dtype=R.dtype)

    return apply


def coldot(a: Tensor, b: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Column-wise inner products ``⟨a[:, j], b[:, j]⟩`` of two ``(n, m)`` blocks, in ``dtype``.

    Returns an ``(m,)`` tensor. The rows are upcast in chunks so that no full ``(n, m)`` float64
    copy is allocated at once.
    """
    if a.dtype == dtype and b.dtype == dtype:
        return (a * b).sum(dim=0)
    n, m = a.shape
    step = max(1, _CHUNK_ELEMENTS // max(m, 1))
    out = torch.zeros(m, dtype=dtype, device=a.device)
    for i in range(0, n, step):
        out += (a[i : i + step].to(dtype) * b[i : i + step].to(dtype)).sum(dim=0)
    return out


def colnorm(a: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Column 2-norms of an ``(n, m)`` block, accumulated in ``dtype``; returns ``(m,)``."""
    return coldot(a, a, dtype).sqrt()


@dataclass
class CGInfo:
    """What a :func:`cg` run did, and — when it did not converge — why.

    Attributes:
        iterations: CG iterations of the slowest column (max over columns).
        iterations_per_column: iterations of each column (0 for zero right-hand sides and for
            columns already converged at the start).
        converged: per column, whether the *true* final relative residual is ≤ ``tol``
            (``all_converged`` / ``to_dict()["all_converged"]`` is the single flag).
        residuals: per column, the true final relative residual ``‖b − A x‖ / ‖b‖`` (recomputed with
            an explicit matvec, not the recursively updated one; 0 for zero right-hand sides).
        matvecs: column-matvecs spent: the sum over all calls to ``A`` of the number of columns
            passed (warm-start residual, iterations, final true-residual checks, restarts,
            refinement residuals and corrections).
        block_matvecs: number of calls to ``A``.
        seconds: wall-clock time of the solve.
        tol, max_iter: the settings used (``max_iter`` after the default was applied).
        history: ``history[i]`` is the max over columns of the relative residual after ``i``
            iterations (the recursively updated one during a recurrence; ``history[0]`` is the
            starting residual).
        restarts: number of restarts triggered by a true residual above ``tol``.
        attainable: worst-case rounding floor ``eps · ‖A‖ · ‖x‖ / ‖b‖`` (max over columns, eps
            of ``B``'s dtype, ‖A‖ from the largest Rayleigh quotient seen) of the relative
            residual that matvecs and iterates in that dtype can resolve. Pessimistic (the real
            floor is often far lower); a ``tol`` that is not met and lies below it is probably
            below the floor.
        message: ``None`` if all columns converged, else the diagnosis (one paragraph).
        label: the system's name (``cg(label=...)``), used in every message.
        status: ``"converged"``; ``"budget"`` (stopped early: the residual decay, extrapolated,
            would not reach ``tol`` within the budget); ``"max_iter"`` / ``"max_matvecs"`` /
            ``"max_seconds"`` (a budget limit was hit); ``"not_positive_definite"`` (a search
            direction with pᵀAp ≤ 0 — negative curvature); ``"nonfinite"`` (a product overflowed or
            was NaN); ``"stalled"`` (the true residual stopped decreasing above ``tol``).
        kappa: condition number of the preconditioned operator estimated from the extreme Ritz
            values of CG's own Lanczos tridiagonal (built from α, β; no extra matvec). A lower
            estimate: Ritz values lie inside the spectrum. ``None`` before 2 iterations.
        eig_min, eig_max: those Ritz values (in A's units when no preconditioner, or with the
            Frangella–Tropp–Udell preconditioner, which keeps the scale of A's tail).
        ridge_hint: extra ridge δ (added to the diagonal of A) for which the κ-based iteration
            count ``½√κ ln(2/tol)`` with ``κ = (eig_max + δ)/(eig_min + δ)`` is at most
            ``hint_iterations``; ``None`` when converged.
        hint_iterations: the iteration count ``ridge_hint`` is computed for (the budget's).
        predicted_iterations: at the early stop, the (optimistic) number of further iterations the
            extrapolation predicted; ``None`` otherwise.
        matvec_seconds: measured seconds per column-matvec (mean over the calls to ``A``).
        negative_curvature: the first pᵀAp ≤ 0 met (``None`` if none).
        refinements: iterative-refinement rounds with float64 residuals (see ``cg(refine=)``).
        max_matvecs, max_seconds: the budget used (``None``: unlimited).
        inner_precision: a mixed-precision solve (:func:`ntkscrub.solvers.mixed_cg`): the
            precision of its inner products (``"bfloat16"``, ...; ``" (emulated)"`` appended when
            rounded float64 products stood in for them); ``None`` for a plain CG solve.
        inner_matvecs, outer_matvecs: a mixed-precision solve's column-matvecs with the
            low-precision products (inner PCG) and with the full-precision operator (true
            residuals, and the inner solves after a fallback); ``matvecs`` is their sum.
        fallback: a mixed-precision solve's refinement stagnated and it finished with
            full-precision inner solves.
    """

    iterations: int
    iterations_per_column: list[int]
    converged: list[bool]
    residuals: list[float]
    matvecs: int
    block_matvecs: int
    seconds: float
    tol: float
    max_iter: int
    history: list[float] = field(default_factory=list)
    restarts: int = 0
    attainable: float = 0.0
    message: str | None = None
    label: str = "A"
    status: str = "converged"
    kappa: float | None = None
    eig_min: float | None = None
    eig_max: float | None = None
    ridge_hint: float | None = None
    hint_iterations: int | None = None
    predicted_iterations: float | None = None
    matvec_seconds: float | None = None
    negative_curvature: float | None = None
    refinements: int = 0
    max_matvecs: int | None = None
    max_seconds: float | None = None
    inner_precision: str | None = None
    inner_matvecs: int = 0
    outer_matvecs: int = 0
    fallback: bool = False

    @property
    def all_converged(self) -> bool:
        return all(self.converged)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (plain ints, floats, bools, lists; NaN/∞ → ``None``)."""
        d = _finite(asdict(self))
        d["all_converged"] = self.all_converged
        return d


def _finite(obj: Any) -> Any:
    """Non-finite floats → None, recursively (strict JSON has no NaN / Infinity)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class CGNotConverged(RuntimeError):
    """Raised by ``cg(..., strict=True)`` (the default) when some column did not converge.

    ``.info`` is the :class:`CGInfo` (``status``, ``kappa``, ``ridge_hint``, ``matvec_seconds``,
    ``label`` …) and ``.x`` the partial solution (``B``'s shape and dtype: the last iterate).
    """

    def __init__(self, message: str, info: CGInfo, x: Tensor | None = None) -> None:
        super().__init__(message)
        self.info = info
        self.x = x


class CGNonFinite(CGNotConverged, ValueError):
    """A product of ``A`` (or pᵀAp) overflowed or was NaN: raised whatever ``strict`` says, since
    no later iterate can be trusted. Also a ``ValueError`` (what earlier versions raised)."""


class _Overflow(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _check_tensor(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() not in (1, 2) or x.shape[0] == 0 or (x.dim() == 2 and x.shape[1] == 0):
        raise ValueError(
            f"{name}: expected a non-empty tensor of shape (n,) or (n, k), got {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def _check_budget(x: Any, name: str, integer: bool) -> Any:
    if x is None:
        return None
    ok_type = isinstance(x, int) if integer else isinstance(x, (int, float))
    if isinstance(x, bool) or not ok_type:
        kind = "a positive integer" if integer else "a positive number"
        raise TypeError(f"{name}: expected {kind} or None, got {type(x).__name__}")
    if not x > 0:  # NaN fails too
        raise ValueError(f"{name}: must be > 0, got {x!r}")
    return x


def ritz_extremes(alphas: list[float], betas: list[float]) -> tuple[float, float] | None:
    """Extreme eigenvalues of the Lanczos tridiagonal ``T`` that CG builds implicitly.

    With step lengths α_i and ratios β_i = ⟨r_{i+1}, z_{i+1}⟩ / ⟨r_i, z_i⟩ (Saad, *Iterative
    Methods for Sparse Linear Systems*, §6.7.3): ``T[0,0] = 1/α_0``,
    ``T[i,i] = 1/α_i + β_{i−1}/α_{i−1}``, ``T[i,i+1] = √β_i / α_i``. Its eigenvalues (Ritz values)
    approximate those of the preconditioned operator M⁻¹A from inside. Returns ``(θ_min, θ_max)``
    or ``None`` with fewer than 2 steps. O(L) per extreme (scipy's tridiagonal eigensolver).
    """
    L = len(alphas)
    if L < 2:
        return None
    from scipy.linalg import eigvalsh_tridiagonal

    a = [1.0 / x for x in alphas]
    d = [a[0]] + [a[i] + betas[i - 1] * a[i - 1] for i in range(1, L)]
    e = [math.sqrt(max(betas[i], 0.0)) * a[i] for i in range(L - 1)]
    try:
        lo = eigvalsh_tridiagonal(d, e, select="i", select_range=(0, 0))[0]
        hi = eigvalsh_tridiagonal(d, e, select="i", select_range=(L - 1, L - 1))[0]
    except Exception:  # noqa: BLE001 - LAPACK failure on a degenerate T: no estimate
        return None
    return float(lo), float(hi)


def kappa_iterations(kappa: float, reduction: float) -> float:
    """CG's κ-based iteration count to cut the error by ``reduction`` (< 1): the classical bound
    ``2((√κ − 1)/(√κ + 1))^k ≤ reduction`` gives ``k ≈ ½ √κ ln(2/reduction)``."""
    return 0.5 * math.sqrt(max(kappa, 1.0)) * math.log(2.0 / min(max(reduction, 1e-300), 1.0))


def ridge_for_iterations(eig_min: float, eig_max: float, iterations: int, tol: float) -> float:
    """Smallest extra ridge δ ≥ 0 with ``½√κ_δ ln(2/tol) ≤ iterations`` for
    ``κ_δ = (eig_max + δ)/(eig_min + δ)`` (the κ-based estimate λ_max / (λ_min + ridge))."""
    k_target = (2.0 * max(iterations, 1) / math.log(2.0 / tol)) ** 2
    if k_target <= 1.0:
        return float("inf")
    return max(0.0, (eig_max - k_target * max(eig_min, 0.0)) / (k_target - 1.0))


# Seconds a solve may take by default (the time budget). One NTK matvec costs about two training
# epochs: 300 s is "a few minutes", after which a practitioner wants a diagnosis, not more waiting.
DEFAULT_MAX_SECONDS = 300.0
# The early stop looks at the residual decay only after this many iterations and every few after.
_EARLY_MIN_ITERS = 10
_EARLY_EVERY = 5
_RATE_WINDOW = 20
_EARLY_SLACK = 2.0
# Iterative refinement: at most this many float64-residual rounds.
_MAX_REFINE = 10


def cg(
    A: Operator,
    B: Tensor,
    *,
    precond: Any = None,
    x0: Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int | None = None,
    strict: bool = True,
    scalar_dtype: torch.dtype = torch.float64,
    max_matvecs: int | None = None,
    max_seconds: float | None = None,
    early_stop: bool = True,
    refine: bool | None = None,
    label: str = "A",
    progress: bool | None = None,
    allreduce: Callable[[Tensor], Tensor] | None = None,
    krylov: Any = None,
) -> tuple[Tensor, CGInfo]:
    """Solve ``A X = B`` by preconditioned CG, one independent recurrence per column.

    Args:
        A: symmetric positive (semi)definite operator of size n (see :func:`as_matmul`).
        B: right-hand sides, ``(n,)`` or ``(n, k)``; its dtype and device are those of the iterates.
        precond: ``None``, an object with ``.solve(R: (n, m)) -> (n, m)`` applying M⁻¹ ≈ A⁻¹
            (e.g. :class:`~ntkscrub.solvers.NystromPreconditioner`), or a plain callable doing so.
            It must be symmetric positive definite.
        x0: warm start with ``B``'s shape (``None``: zeros). Costs one block matvec over the
            columns where ``x0`` is nonzero.
        tol: per-column stopping threshold on the relative residual ``‖b − A x‖ / ‖b‖``.
        max_iter: maximum CG iterations per column. Default ``2n`` (CG ends within n iterations in
            exact arithmetic; rounding can need more) — the time budget below is what normally
            limits a large solve.
        strict: raise :class:`CGNotConverged` (with the diagnosis, ``.info`` and the partial
            ``.x``) if some column did not converge — the default, as in :func:`ntkscrub.scrub`.
            ``False``: a ``RuntimeWarning`` pointing at the caller instead.
        scalar_dtype: dtype of all scalars and inner products (float64 unless you know better).
        max_matvecs: budget of column-matvecs (``None``: no limit).
        max_seconds: time budget in seconds (``None``: ``DEFAULT_MAX_SECONDS`` = 300 s;
            ``math.inf`` for none). The cost of an iteration is measured from the first matvecs,
            which turns the time budget into an iteration budget.
        early_stop: stop as soon as the residual decay, extrapolated, needs more than twice the
            iterations the budget (``max_matvecs`` / ``max_seconds``) still allows — checked every
            5 iterations after 10; the prediction is the *smaller* of the observed geometric rate
            over the last 20 iterations and the κ-based count ½√κ ln(2 r/tol) — so a hopeless
            solve ends early with a diagnosis instead of after the whole budget.
        refine: iterative refinement for low-precision solves: the residual ``b − A x`` is
            recomputed in float64 (``A`` applied to a float64 block), the correction is solved in
            ``B``'s dtype, ``x`` is accumulated in float64, so the final *true* residual can reach
            ``tol`` although the low-precision recurrence stalls above it. ``None`` (default):
            when ``B`` is not float64, some column missed ``tol``, and ``A`` computes float64
            products (a float64 tensor / LinearOperator, or a callable returning float64 for a
            float64 block). ``True``: whenever a column missed ``tol``. ``False``: never.
        label: name of the system (e.g. ``"Θ_DD + λI"``), used in messages and ``info.label``.
        progress: a tqdm bar (iteration, relative residual, matvecs, elapsed); ``None`` shows it
            only when stderr is a terminal, ``False`` never.
        allreduce: data-parallel hook (:mod:`ntkscrub.distributed`): ``A``, ``B``, ``x0`` and
            ``X`` are this rank's rows and ``allreduce`` sums an ``(m,)`` tensor of per-rank
            partial inner products over the ranks, returning the same bits on every rank — so
            every scalar and every decision (convergence, restarts, breakdown, non-finite
            products) agrees across ranks. The time budget needs agreeing clocks: with
            ``allreduce``, ``max_seconds`` must be ``None`` (then no time budget) or ``math.inf``,
            and ``max_iter`` defaults to twice the global n (summed by ``allreduce``).
            ``None`` (default): one process, unchanged.
        krylov: a :class:`~ntkscrub.solvers.recycle.KrylovPairs` that keeps the recurrences'
            search directions ``P`` and products ``A P`` (no extra product; the restarts' and
            the refinement's are not kept), to augment a preconditioner for later solves
            (:func:`~ntkscrub.solvers.recycle.recycled`). ``None``: nothing kept.

    Returns:
        ``(X, info)``: ``X`` with ``B``'s shape, dtype and device; ``info`` a :class:`CGInfo`.

    Raises:
        CGNotConverged: ``strict`` and some column missed ``tol`` (the message names ``label``,
            the reason — budget, negative curvature (A not positive definite), stall — the
            estimated κ, the extra ridge that would converge within the budget and the matvec
            cost).
        CGNonFinite: a product of ``A`` overflowed or was NaN (always raised; a ``ValueError``).

    Columns with ``b = 0`` return ``x = 0`` at once (0 iterations, converged, no matvecs).
    """
    t_start = time.perf_counter()
    B = _check_tensor(B, "B")
    squeeze = B.dim() == 1
    B2 = B.unsqueeze(1) if squeeze else B  # (n, k)
    n = B2.shape[0]
    if allreduce is not None:
        if max_seconds is not None and max_seconds != math.inf:
            raise ValueError(
                "max_seconds: a time budget would stop the ranks at different iterations "
                "(their clocks differ); with allreduce give None (no time budget) or math.inf"
            )
        max_seconds = math.inf
        if max_iter is None:  # 2n of the global n: each rank's own n would stop the ranks apart
            max_iter = 2 * int(allreduce(torch.tensor([float(n)], dtype=torch.float64))[0])
    max_iter, max_matvecs, max_seconds = _check_cg_options(
        tol, max_iter, max_matvecs, max_seconds, scalar_dtype, strict, early_stop, refine, label, n
    )
    progress = check_progress(progress)
    if x0 is not None:
        x0 = _check_tensor(x0, "x0")
        if x0.shape != B.shape:
            raise ValueError(
                f"x0: shape {tuple(x0.shape)} does not match B's shape {tuple(B.shape)}"
            )
        x0 = x0.unsqueeze(1) if squeeze else x0
    run = _CGRun(
        as_matmul(A, n, name="A"),
        as_precond(precond),
        B2,
        x0=x0,
        tol=float(tol),
        max_iter=max_iter,
        max_matvecs=max_matvecs,
        max_seconds=max_seconds,
        early_stop=early_stop,
        sd=scalar_dtype,
        label=label,
        progress=progress,
        t_start=t_start,
        allreduce=allreduce,
    )
    run.krylov = krylov
    try:
        run.iterate()
        # Refinement finishes a solve that stalled (or ran out of iterations) at the precision
        # floor; a budget stop or a breakdown is not a precision problem.
        if run.status in ("converged", "max_iter", "stalled") and not all(run.converged()):
            if _should_refine(refine, A, B2, run):
                run.refine(A, precond)
    except _Overflow as exc:
        info = run.info(status="nonfinite")
        info.message = (
            f"cg[{label}]: {exc.what} at iteration {run.it} — the products overflowed (or a NaN "
            f"came in), so no iterate can be trusted. Check the scale of the model's outputs "
            f"(logits of 1e19 overflow float32 products), use float64, or a larger ridge. "
            f"Partial solution (last finite iterate) in err.x."
        )
        raise CGNonFinite(info.message, info, run.x_out(squeeze)) from None
    finally:
        run.close_bar()
    info = run.info()
    X = run.x_out(squeeze)
    if info.message is not None:
        logger.info("%s", info.message)
        if strict:
            raise CGNotConverged(info.message, info, X)
        warn(info.message, RuntimeWarning)
    else:
        logger.debug(
            "cg[%s]: converged in %d iterations, %d matvecs, %.2f s",
            label,
            info.iterations,
            info.matvecs,
            info.seconds,
        )
    return X, info


def _check_cg_options(
    tol: Any,
    max_iter: Any,
    max_matvecs: Any,
    max_seconds: Any,
    scalar_dtype: Any,
    strict: Any,
    early_stop: Any,
    refine: Any,
    label: Any,
    n: int,
) -> tuple[int, int | None, float]:
    """Check cg's keywords (errors name the argument); returns the resolved
    ``(max_iter, max_matvecs, max_seconds)``."""
    if (
        not isinstance(tol, (int, float))
        or isinstance(tol, bool)
        or not math.isfinite(tol)
        or tol <= 0
    ):
        raise ValueError(f"tol: must be a positive finite number, got {tol!r}")
    if max_iter is None:
        max_iter = 2 * n
    elif not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter: must be a positive integer, got {max_iter!r}")
    max_matvecs = _check_budget(max_matvecs, "max_matvecs", integer=True)
    max_seconds = _check_budget(max_seconds, "max_seconds", integer=False)
    if not (isinstance(scalar_dtype, torch.dtype) and scalar_dtype.is_floating_point):
        raise TypeError(f"scalar_dtype: expected a floating torch.dtype, got {scalar_dtype!r}")
    for flag, fname in ((strict, "strict"), (early_stop, "early_stop")):
        if not isinstance(flag, bool):
            raise TypeError(f"{fname}: expected a bool, got {type(flag).__name__}")
    if refine is not None and not isinstance(refine, bool):
        raise TypeError(f"refine: expected True, False or None (auto), got {type(refine).__name__}")
    if not isinstance(label, str):
        raise TypeError(f"label: expected a str, got {type(label).__name__}")
    seconds = DEFAULT_MAX_SECONDS if max_seconds is None else float(max_seconds)
    return max_iter, max_matvecs, seconds


def _should_refine(refine: bool | None, A: Any, B2: Tensor, run: _CGRun) -> bool:
    if refine is False or run.broken:
        return False
    if refine is True:
        return True
    if B2.dtype == torch.float64:
        return False
    if isinstance(A, Tensor) or _is_linear_operator(A):
        return A.dtype == torch.float64
    return run.float64_products(A)


class _CGRun:
    """The state of one :func:`cg` call (split out so that each phase reads in one screen)."""

    def __init__(
        self,
        matmul: Callable[[Tensor], Tensor],
        apply_minv: Callable[[Tensor], Tensor] | None,
        B2: Tensor,
        *,
        x0: Tensor | None,
        tol: float,
        max_iter: int,
        max_matvecs: int | None,
        max_seconds: float,
        early_stop: bool,
        sd: torch.dtype,
        label: str,
        progress: bool | None,
        t_start: float,
        allreduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.matmul, self.apply_minv, self.B2 = matmul, apply_minv, B2
        self.allreduce = allreduce
        self.tol, self.max_iter, self.max_matvecs = tol, max_iter, max_matvecs
        self.max_seconds, self.early_stop, self.sd, self.label = max_seconds, early_stop, sd, label
        self.t_start = t_start
        n, k = B2.shape
        self.k = k
        self.matvecs = 0
        self.calls = 0
        self.matvec_time = 0.0
        self.bnorm = self._norm(B2, sd)  # (k,) in scalar dtype
        X = torch.zeros_like(B2) if x0 is None else x0.clone()
        nonzero = self.bnorm > 0
        X[:, ~nonzero] = 0  # b = 0 ⇒ x = 0, whatever x0 says
        self.X = X
        self.X64: Tensor | None = None  # the float64 iterate once refinement starts
        self.idx_nz = torch.nonzero(nonzero).flatten().tolist()
        self.its = [0] * k
        self.rel_true = torch.zeros(k, dtype=sd)
        self.rel_now = torch.zeros(k, dtype=sd)
        self.stale = [False] * k
        self.broken: list[int] = []
        self.neg_curv: float | None = None
        self.restarts_col = [0] * k
        self.n_restarts = 0
        self.history: list[float] = []
        self.a_norm = 0.0
        self.it = 0
        self.status = "converged"  # until a limit, a breakdown or a stall says otherwise
        self.stalled = False
        self.predicted: float | None = None
        self.budget_left: float | None = None  # iterations the budget allowed at an early stop
        self.refinements = 0
        self.refine_note: str | None = None
        # Lanczos coefficients of the current recurrence of each column, and per-column best κ.
        self.alphas: dict[int, list[float]] = {j: [] for j in self.idx_nz}
        self.betas: dict[int, list[float]] = {j: [] for j in self.idx_nz}
        self.ritz: dict[int, tuple[float, float]] = {}
        # per column, the running minimum of its relative residual after each iteration
        self.col_best: dict[int, list[float]] = {j: [] for j in self.idx_nz}
        self.bar = progress_bar(max_iter, f"cg[{label}]", progress)
        self.R_full = B2.clone()  # residual b − A x of every column (set by iterate)
        self.krylov: Any = None  # a KrylovPairs collecting (P, A P) of the recurrences

    # ------------------------------------------------------------------ reductions
    def _dot(self, a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
        """Column inner products, summed over the ranks when data-parallel."""
        d = coldot(a, b, dtype)
        return d if self.allreduce is None else self.allreduce(d)

    def _dots(self, *pairs: tuple[Tensor, Tensor], dtype: torch.dtype) -> list[Tensor]:
        """Several column inner products, summed over the ranks in one reduction."""
        local = [coldot(a, b, dtype) for a, b in pairs]
        if self.allreduce is None:
            return local
        summed = self.allreduce(torch.cat(local))
        return list(summed.split([d.shape[0] for d in local]))

    def _norm(self, a: Tensor, dtype: torch.dtype) -> Tensor:
        return self._dot(a, a, dtype).sqrt()

    def _agree(self, local_ok: bool) -> bool:
        """``local_ok`` on every rank (one scalar all-reduce when data-parallel)."""
        if self.allreduce is None:
            return local_ok
        bad = torch.tensor([0.0 if local_ok else 1.0], dtype=self.sd, device=self.B2.device)
        return float(self.allreduce(bad)[0]) == 0.0

    # ------------------------------------------------------------------ products
    def apply_A(self, P: Tensor, *, dotted: bool = False) -> Tensor:
        """``A P``; ``dotted``: the caller reduces ``Pᵀ(A P)`` at once and checks it, so a
        non-finite product is caught there on every rank without a collective of its own."""
        t0 = time.perf_counter()
        self.matvecs += P.shape[1]
        self.calls += 1
        Y = self.matmul(P)
        self.matvec_time += time.perf_counter() - t0
        if dotted and self.allreduce is not None:
            return Y
        if not self._agree(bool(torch.isfinite(Y).all())):
            raise _Overflow("a product of A returned NaN or infinite values")
        return Y

    def apply_M(self, R: Tensor) -> Tensor:
        if self.apply_minv is None:
            return R
        Z = self.apply_minv(R)
        if not bool(torch.isfinite(Z).all()):
            raise ValueError("precond: returned NaN or infinite values")
        return Z

    def float64_products(self, A: Any) -> bool:
        """Whether the callable ``A`` returns float64 for a float64 block (one column, counted)."""
        v = torch.zeros(self.B2.shape[0], 1, dtype=torch.float64, device=self.B2.device)
        v[0] = 1.0
        try:
            Y = A(v)
        except Exception:  # noqa: BLE001 - an operator that refuses float64 cannot refine
            return False
        self.matvecs += 1
        self.calls += 1
        return isinstance(Y, Tensor) and Y.dtype == torch.float64

    # ------------------------------------------------------------------ phases
    def _initial_residual(self) -> None:
        B2, sd = self.B2, self.sd
        nonzero_x = self.X.ne(0).any(dim=0)  # (k,): columns with a warm start
        if self.allreduce is not None:  # nonzero on any rank's rows
            nonzero_x = self.allreduce(nonzero_x.to(sd)) > 0
        if self.idx_nz and bool(nonzero_x.any()):
            cols = [j for j in self.idx_nz if bool(nonzero_x[j])]
            sel = torch.tensor(cols, device=B2.device)
            AX = self.apply_A(self.X[:, sel])
            self.R_full[:, sel] = (B2[:, sel].to(sd) - AX.to(sd)).to(B2.dtype)
        if self.idx_nz:
            sel = torch.tensor(self.idx_nz, device=B2.device)
            rel = (self._norm(self.R_full[:, sel], sd) / self.bnorm[sel]).cpu()
            self.rel_true[sel.cpu()] = rel
            self.rel_now[sel.cpu()] = rel
        self.history.append(float(self.rel_now.max()) if self.k else 0.0)

    def iterate(self) -> None:
        """Recurrence stretches, each followed by a true-residual check and possible restarts."""
        self._initial_residual()
        active = [j for j in self.idx_nz if float(self.rel_true[j]) > self.tol]
        while active:
            self._stretch(active)
            check = [j for j in self.idx_nz if self.stale[j]]
            if not check:
                break
            prev = self._true_residual(check)
            active = []
            if self.status != "converged":
                break  # a budget limit or the early stop: no restart
            for j in check:
                # Restart only columns whose recursion believed it had converged, while restarts
                # still cut the true residual by ≥ 10 % (a stricter "halve it" rule stopped float32
                # runs at 1.03·tol on the H200).
                if float(self.rel_true[j]) <= self.tol or j in self.broken:
                    continue
                if self.restarts_col[j] < _MAX_RESTARTS and float(self.rel_true[j]) < 0.9 * prev[j]:
                    active.append(j)
                    self.restarts_col[j] += 1
                    self.alphas[j], self.betas[j] = [], []
                else:
                    self.stalled = True
            if active:
                self.n_restarts += 1
        if self.broken:
            self.status = "not_positive_definite"
        elif self.stalled and self.status == "converged":
            self.status = "stalled"

    def _stretch(self, active: list[int]) -> None:  # noqa: PLR0915 - listed in pyproject.toml
        B2, sd = self.B2, self.sd
        idx = torch.tensor(active, device=B2.device, dtype=torch.long)
        R = self.R_full[:, idx]
        Z = self.apply_M(R)
        rz = self._dot(R, Z, sd)
        P = Z.clone()
        while idx.numel() > 0:
            if self._out_of_budget(idx):
                return
            AP = self.apply_A(P, dotted=True)  # (n, m): only the unconverged columns
            pAp, pp = self._dots((P, AP), (P, P), dtype=sd)  # one collective if data-parallel
            if not bool(torch.isfinite(pAp).all()):
                raise _Overflow("pᵀAp overflowed")
            bad = ~(pAp > 0)
            if bool(bad.any()):
                # Negative curvature pᵀAp ≤ 0: A is not positive definite along p; CG cannot go on.
                if self.neg_curv is None:
                    self.neg_curv = float(pAp[bad][0])
                self.broken.extend(idx[bad].tolist())
                keep = ~bad
                idx, R, P, AP, rz, pAp, pp = (
                    idx[keep],
                    R[:, keep],
                    P[:, keep],
                    AP[:, keep],
                    rz[keep],
                    pAp[keep],
                    pp[keep],
                )
                if idx.numel() == 0:
                    return
            self.a_norm = max(self.a_norm, float((pAp / pp).max()))
            if self.krylov is not None:
                self.krylov.add(P, AP)
            alpha = rz / pAp  # (m,) scalar dtype
            a_v = alpha.to(B2.dtype)  # the same rounded α for x and r keeps them consistent
            self.X[:, idx] += P * a_v
            R = R - AP * a_v
            self.it += 1
            idx_cpu = idx.cpu()
            alpha_cpu = alpha.cpu().tolist()
            rr = self._dot(R, R, sd)
            rel = (rr.sqrt() / self.bnorm[idx]).cpu()
            for i, j in enumerate(idx_cpu.tolist()):
                self.its[j] += 1
                self.stale[j] = True
                self.alphas[j].append(alpha_cpu[i])
                best = self.col_best[j]
                best.append(min(best[-1], float(rel[i])) if best else float(rel[i]))
            self.rel_now[idx_cpu] = rel
            self.history.append(float(self.rel_now.max()))
            self.bar.update(1)
            self.bar.set_postfix(
                rel_res=f"{float(rel.max()):.2e}", matvecs=self.matvecs, refresh=False
            )
            keep = rel > self.tol
            if not bool(keep.all()):
                keep_d = keep.to(B2.device)
                idx, R, P, rz = idx[keep_d], R[:, keep_d], P[:, keep_d], rz[keep_d]
                rr = rr[keep_d]
                if idx.numel() == 0:
                    return
            Z = self.apply_M(R)
            # Without a preconditioner Z is R: ⟨r, z⟩ is ⟨r, r⟩, already reduced (same bits).
            rz_new = rr if self.apply_minv is None else self._dot(R, Z, sd)
            beta = rz_new / rz
            for i, j in enumerate(idx.cpu().tolist()):
                self.betas[j].append(float(beta[i]))
            P = Z + P * beta.to(B2.dtype)
            rz = rz_new

    def _true_residual(self, check: list[int]) -> dict[int, float]:
        """Recompute ``b − A x`` for ``check`` in one block matvec; returns the previous values."""
        B2, sd = self.B2, self.sd
        sel = torch.tensor(check, device=B2.device)
        AX = self.apply_A(self.X[:, sel])
        R_true = B2[:, sel].to(sd) - AX.to(sd)  # (n, m) in scalar dtype: no cancellation loss
        rel = (self._norm(R_true, sd) / self.bnorm[sel]).cpu()
        prev = {j: float(self.rel_true[j]) for j in check}
        for i, j in enumerate(check):
            self.rel_true[j] = rel[i]
            self.rel_now[j] = rel[i]
            self.stale[j] = False
            self.R_full[:, j] = R_true[:, i].to(B2.dtype)
        return prev

    # ------------------------------------------------------------------ budget and diagnosis
    def _iteration_seconds(self, m: int) -> float:
        per_col = self.matvec_time / max(self.matvecs, 1)
        loop = (time.perf_counter() - self.t_start) / max(self.it, 1)
        return max(per_col * m, loop if self.it else 0.0)

    def _budget_iterations(self, m: int) -> float:
        """Iterations the cost budget (matvecs, seconds) still allows for a block of m columns.

        ``max_iter`` is not part of it: it is a safety cap, not a cost the user sized."""
        left = math.inf
        if self.max_matvecs is not None:
            left = min(left, (self.max_matvecs - self.matvecs) / max(m, 1))
        if math.isfinite(self.max_seconds) and self.calls:
            elapsed = time.perf_counter() - self.t_start
            left = min(left, (self.max_seconds - elapsed) / max(self._iteration_seconds(m), 1e-12))
        return left

    def _out_of_budget(self, idx: Tensor) -> bool:
        m = idx.numel()
        if self.it >= self.max_iter:
            self.status = "max_iter"
        elif self.max_matvecs is not None and self.matvecs + m > self.max_matvecs:
            self.status = "max_matvecs"
        elif time.perf_counter() - self.t_start >= self.max_seconds:
            self.status = "max_seconds"
        elif self.early_stop and self.it >= _EARLY_MIN_ITERS and self.it % _EARLY_EVERY == 0:
            need = max(self._predict(j) for j in idx.cpu().tolist())
            # Slack: CG often speeds up (superlinear convergence once the extreme eigenvalues are
            # resolved), so only a prediction well past the budget stops the solve.
            left = self._budget_iterations(m)
            if need > _EARLY_SLACK * left:
                self.status, self.predicted, self.budget_left = "budget", need, left
        return self.status != "converged"

    def _predict(self, j: int) -> float:
        """Optimistic further iterations for column j to reach tol: min(rate, κ-based)."""
        best = self.col_best[j]
        if not best:
            return 0.0  # nothing to extrapolate from: never a reason to stop
        r = best[-1]
        if r <= self.tol:
            return 0.0
        w = min(_RATE_WINDOW, len(best) - 1)
        rate_pred = math.inf
        if w >= 1 and best[-1 - w] > 0:
            rho = (best[-1] / best[-1 - w]) ** (1.0 / w)
            if rho < 0.999:
                rate_pred = math.log(self.tol / r) / math.log(rho)
        kap = self._kappa(j)
        kappa_pred = math.inf if kap is None else kappa_iterations(kap[1] / kap[0], self.tol / r)
        return min(rate_pred, kappa_pred)

    def _kappa(self, j: int) -> tuple[float, float] | None:
        ext = ritz_extremes(self.alphas[j], self.betas[j])
        if ext is not None and ext[0] > 0:
            old = self.ritz.get(j)
            # Keep the widest interval over restarts: Ritz values only move outwards.
            self.ritz[j] = ext if old is None else (min(old[0], ext[0]), max(old[1], ext[1]))
        return self.ritz.get(j)

    # ------------------------------------------------------------------ refinement
    def refine(self, A: Any, precond: Any) -> None:  # noqa: PLR0915 - listed in pyproject.toml
        """Iterative refinement: float64 residuals, low-precision corrections, float64 iterate."""
        B2, f64 = self.B2, torch.float64
        matmul64 = as_matmul(A, B2.shape[0], name="A")
        B64 = B2.to(f64)
        self.X64 = self.X.to(f64)
        cols = [j for j in self.idx_nz if float(self.rel_true[j]) > self.tol]
        prev = {j: float(self.rel_true[j]) for j in cols}
        for _ in range(_MAX_REFINE):
            if not cols:
                break
            sel = torch.tensor(cols, device=B2.device)
            t0 = time.perf_counter()
            R64 = B64[:, sel] - matmul64(self.X64[:, sel])  # the float64 residual
            self.matvec_time += time.perf_counter() - t0
            self.matvecs += len(cols)
            self.calls += 1
            rel = (self._norm(R64, f64) / self.bnorm[sel].to(f64)).cpu()
            for i, j in enumerate(cols):
                self.rel_true[j] = rel[i]
            left = [i for i, j in enumerate(cols) if float(rel[i]) > self.tol]
            if (
                not left
                # no round halved any residual: the float64 products cannot help further
                or (self.refinements and all(float(rel[i]) > 0.5 * prev[cols[i]] for i in left))
            ):
                break
            prev = {cols[i]: float(rel[i]) for i in left}
            sel_l = torch.tensor(left, device=B2.device)
            Rl = R64[:, sel_l]
            floor = 8 * torch.finfo(B2.dtype).eps
            inner_tol = min(0.5, max(0.5 * self.tol / float(rel[sel_l.cpu()].max()), floor))
            elapsed = time.perf_counter() - self.t_start
            if elapsed >= self.max_seconds:
                self.refine_note = "time budget spent during refinement"
                break
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # judged by the outer residual
                D, inner = cg(
                    self.matmul,
                    Rl.to(B2.dtype),
                    precond=precond,
                    tol=inner_tol,
                    strict=False,
                    scalar_dtype=self.sd,
                    max_seconds=self.max_seconds - elapsed,
                    refine=False,
                    label=f"{self.label} (refinement)",
                    progress=False,
                    max_iter=self.max_iter,
                    early_stop=False,
                    allreduce=self.allreduce,
                )
            self.matvecs += inner.matvecs
            self.calls += inner.block_matvecs
            self.matvec_time += inner.seconds
            self.it += inner.iterations
            self.refinements += 1
            cols = [cols[i] for i in left]
            self.X64[:, torch.tensor(cols, device=B2.device)] += D.to(f64)
            for j, n_it in zip(cols, inner.iterations_per_column):
                self.its[j] += n_it
        # The returned X is rounded to B's dtype: its own true residual is what counts.
        self.X = self.X64.to(B2.dtype)
        allc = torch.tensor(self.idx_nz, device=B2.device)
        t0 = time.perf_counter()
        R = B64[:, allc] - matmul64(self.X[:, allc].to(f64))
        self.matvec_time += time.perf_counter() - t0
        self.matvecs += len(self.idx_nz)
        self.calls += 1
        rel = (self._norm(R, f64) / self.bnorm[allc].to(f64)).cpu()
        for i, j in enumerate(self.idx_nz):
            self.rel_true[j] = rel[i]
        if all(float(self.rel_true[j]) <= self.tol for j in self.idx_nz):
            self.status = "converged"

    # ------------------------------------------------------------------ results
    def converged(self) -> list[bool]:
        return [bool(self.rel_true[j] <= self.tol) for j in range(self.k)]

    def close_bar(self) -> None:
        self.bar.close()

    def x_out(self, squeeze: bool) -> Tensor:
        return self.X.squeeze(1) if squeeze else self.X

    def info(self, status: str | None = None) -> CGInfo:
        B2, sd = self.B2, self.sd
        converged = self.converged()
        residuals = [float(self.rel_true[j]) for j in range(self.k)]
        attainable = 0.0
        if self.idx_nz:
            sel = torch.tensor(self.idx_nz, device=B2.device)
            ratio = float((self._norm(self.X[:, sel], sd) / self.bnorm[sel]).max())
            attainable = torch.finfo(B2.dtype).eps * self.a_norm * ratio
        exts = [e for e in (self._kappa(j) for j in self.idx_nz) if e is not None]
        eig_min = min(e[0] for e in exts) if exts else None
        eig_max = max(e[1] for e in exts) if exts else None
        kappa = eig_max / eig_min if exts else None
        status = status or ("converged" if all(converged) else self.status)
        if status == "converged" and not all(converged):
            status = "stalled"
        info = CGInfo(
            iterations=max(self.its) if self.its else 0,
            iterations_per_column=list(self.its),
            converged=converged,
            residuals=residuals,
            matvecs=self.matvecs,
            block_matvecs=self.calls,
            seconds=time.perf_counter() - self.t_start,
            tol=self.tol,
            max_iter=int(self.max_iter),
            history=list(self.history),
            restarts=self.n_restarts,
            attainable=attainable,
            label=self.label,
            status=status,
            kappa=kappa,
            eig_min=eig_min,
            eig_max=eig_max,
            predicted_iterations=self.predicted,
            matvec_seconds=self.matvec_time / self.matvecs if self.matvecs else None,
            negative_curvature=self.neg_curv,
            refinements=self.refinements,
            max_matvecs=self.max_matvecs,
            max_seconds=self.max_seconds,
        )
        if not all(converged) and status != "nonfinite":
            self._diagnose(info)
        return info

    def _diagnose(self, info: CGInfo) -> None:
        """Fill ``ridge_hint`` / ``hint_iterations`` and write ``info.message``."""
        k, tol, label = self.k, self.tol, self.label
        bad = [j for j in range(k) if not info.converged[j]]
        worst = max(info.residuals[j] for j in bad)
        cost = info.matvec_seconds
        head = (
            f"cg[{label}]: {len(bad)} of {k} column(s) did not reach tol={tol:g} (worst true "
            f"relative residual {worst:.3e} after {info.iterations} iterations, {info.matvecs} "
            f"matvecs, {info.seconds:.1f} s"
            + (f"; {cost:.3g} s per matvec" if cost is not None else "")
            + ")."
        )
        parts = [head]
        st = info.status
        if st == "not_positive_definite":
            cols = sorted(set(self.broken))
            parts.append(
                f"Negative curvature: pᵀAp = {self.neg_curv:.3e} ≤ 0 in column(s) {cols}, so "
                f"{label} is not positive definite (or not symmetric) — no ridge tuning of CG "
                f"fixes that. Usual causes: a model in train mode (dropout, batch-norm batch "
                f"statistics make each product different), a data loader that reorders the data "
                f"between passes, or a negative ridge."
            )
        elif st == "budget":
            parts.append(
                f"Stopped early: extrapolating the residual decay, it needs ≳ "
                f"{info.predicted_iterations:,.0f} more iterations, more than twice the ≈ "
                f"{max(self.budget_left or 0.0, 0.0):,.0f} the budget still allowed "
                f"({self._budget_text()})."
            )
        elif st in ("max_iter", "max_matvecs", "max_seconds"):
            parts.append(f"Budget exhausted: {st} ({self._budget_text()}).")
        elif st == "stalled":
            parts.append("The true residual stopped decreasing (restarts no longer help).")
        if tol < info.attainable and st != "not_positive_definite":
            parts.append(
                f"tol is below the worst-case rounding floor of {self.B2.dtype} matvecs "
                f"eps·‖A‖·‖x‖/‖b‖ ≈ {info.attainable:.1e}: use float64, or refine=True with "
                f"an operator that computes float64 products."
            )
        if self.refinements or self.refine_note:
            parts.append(
                f"Iterative refinement: {self.refinements} round(s) with float64 residuals"
                + (f" ({self.refine_note})" if self.refine_note else "")
                + "."
            )
        if info.kappa is not None and st != "not_positive_definite":
            hint_its = max(int(self._hint_iterations()), 1)
            delta = ridge_for_iterations(info.eig_min, info.eig_max, hint_its, tol)
            info.hint_iterations = hint_its
            info.ridge_hint = delta if math.isfinite(delta) else None
            advice = self._budget_advice(st, bad)
            kappa = (
                f"Estimated condition number κ ≈ {info.kappa:.2e} (Ritz values "
                f"{info.eig_min:.2e} … {info.eig_max:.2e} from CG's Lanczos coefficients; a lower "
                f"estimate)."
            )
            if info.ridge_hint is None:
                # Even κ = 1 needs more iterations than the budget allows: no ridge helps.
                parts.append(
                    f"{kappa} No ridge converges in the ≈ {hint_its} iteration(s) the budget "
                    f"allows (even κ = 1 needs more): the budget is what is too small"
                    f"{advice or ', raise max_seconds / max_matvecs'}."
                )
            else:
                parts.append(
                    f"{kappa} To converge in ≈ {hint_its} iterations, add ≈ {delta:.3g} to the "
                    f"ridge (κ-based estimate λ_max/(λ_min + ridge)), or use a stronger "
                    f"preconditioner{advice}."
                )
        parts.append("The partial solution is attached (err.x / the returned X).")
        info.message = " ".join(parts)

    def _budget_advice(self, status: str, bad: list[int]) -> str:
        """ ", or raise max_seconds to ≈ T s (…)" from the extrapolated need, if it is finite."""
        if status not in ("budget", "max_iter", "max_matvecs", "max_seconds"):
            return ""
        need = self.predicted
        if need is None:
            preds = [self._predict(j) for j in bad if j in self.col_best]
            need = max(preds) if preds else math.inf
        m = max(len(bad), 1)
        if not math.isfinite(need) or not self.calls:
            return ", or raise max_seconds / max_matvecs"
        seconds = time.perf_counter() - self.t_start + need * self._iteration_seconds(m)
        return (
            f", or give it the ≈ {need:,.0f} more iterations the residual decay predicts: "
            f"max_seconds ≈ {seconds:,.0f} (max_matvecs ≈ {self.matvecs + need * m:,.0f}"
            f", max_iter ≥ {self.it + need:,.0f})"
        )

    def _budget_text(self) -> str:
        out = [f"max_iter={self.max_iter}"]
        if self.max_matvecs is not None:
            out.append(f"max_matvecs={self.max_matvecs}")
        if math.isfinite(self.max_seconds):
            out.append(f"max_seconds={self.max_seconds:g}")
        return ", ".join(out)

    def _hint_iterations(self) -> float:
        """Iterations the whole budget allows (what the ridge hint aims at)."""
        m = max(self.k, 1)
        total = float(self.max_iter)
        if self.max_matvecs is not None:
            total = min(total, self.max_matvecs / m)
        if math.isfinite(self.max_seconds) and self.calls:
            total = min(total, self.max_seconds / max(self._iteration_seconds(m), 1e-12))
        return min(total, 1e6)
