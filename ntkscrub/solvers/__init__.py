"""Matrix-free solvers for the NTK systems of ntkscrub.

* :func:`cg` — preconditioned CG with many right-hand sides, per-column stopping, converged columns
  dropped from the operator calls, float64 scalars; :class:`CGInfo`, :class:`CGNotConverged`.
* :class:`NystromPreconditioner`, :class:`RPCholeskyPreconditioner` — low-rank preconditioners for
  ``(K + μI)`` built from a few block matvecs; :func:`nystrom_preconditioner` with ``rank="auto"``
  doubles the Nyström sketch until its smallest kept eigenvalue is within a factor of the shift.
* :class:`KrylovPairs`, :func:`recycled` — a solve's search directions and products augment the
  factor for the next solves (Krylov recycling, no extra product).
* :func:`cg` stops within a time/matvec budget, early when the residual decay cannot reach ``tol``
  in it, and raises :class:`CGNotConverged` with a diagnosis (κ estimated from CG's own Lanczos
  coefficients, the extra ridge that would converge, the matvec cost, the partial solution).
* :func:`mixed_cg` — iterative refinement around PCG with low-precision products (TF32, bf16,
  fp16; :func:`low_precision_products`), the true residual in full precision.
* :func:`lanczos`, :func:`slq_logdet`, :func:`slq_trace` — block Lanczos runs and stochastic Lanczos
  quadrature; :func:`dense_logdet` is the exact small-n reference.

An operator ``A`` is a dense ``(n, n)`` tensor, a ``linear_operator.LinearOperator`` or a callable
``(n, k) -> (n, k)``; :func:`as_matmul` turns any of them into a function.
"""

from ntkscrub.solvers.cg import (
    DEFAULT_MAX_SECONDS,
    CGInfo,
    CGNonFinite,
    CGNotConverged,
    as_matmul,
    as_precond,
    cg,
)
from ntkscrub.solvers.lanczos import (
    LanczosResult,
    LogdetEstimate,
    TraceEstimate,
    dense_logdet,
    lanczos,
    rademacher,
    slq_logdet,
    slq_trace,
)
from ntkscrub.solvers.mixed import (
    PrecisionFallbackWarning,
    low_precision_products,
    mixed_cg,
    round_to_precision,
)
from ntkscrub.solvers.preconditioners import (
    LowRankPreconditioner,
    NystromPreconditioner,
    RPCholeskyPreconditioner,
    nystrom_preconditioner,
)
from ntkscrub.solvers.recycle import KrylovPairs, recycled

__all__ = [
    "as_matmul",
    "as_precond",
    "cg",
    "CGInfo",
    "CGNotConverged",
    "CGNonFinite",
    "DEFAULT_MAX_SECONDS",
    "mixed_cg",
    "low_precision_products",
    "round_to_precision",
    "PrecisionFallbackWarning",
    "nystrom_preconditioner",
    "LowRankPreconditioner",
    "NystromPreconditioner",
    "RPCholeskyPreconditioner",
    "KrylovPairs",
    "recycled",
    "lanczos",
    "rademacher",
    "LanczosResult",
    "slq_logdet",
    "slq_trace",
    "LogdetEstimate",
    "TraceEstimate",
    "dense_logdet",
]
