"""Typed configuration of the engine: small frozen dataclasses shared by scrub, the operators and
(later) the bounds.

The paper's choices (ridge, loss, linearisation point, ...) are keywords of
:func:`ntkscrub.scrub.scrub`; the engineering knobs that change cost or accuracy but not the
method live here, each with a documented default, and every result records the values it used
(``to_dict()``):

* :class:`SolverConfig` — how a system ``A X = B`` is solved (:class:`~ntkscrub.operators.Inverse`):
  PCG with a Nyström preconditioner, or Cholesky on the dense twin.
* :class:`ProductConfig` — how Jacobian products are streamed (batch size, vectors per vmap,
  autocast, TF32).
* :class:`SLQConfig` — stochastic Lanczos quadrature for log-determinants.
* :class:`NoiseConfig` — the reference code's conventions for the diagonal Fisher noise (eq. 11).

Validation errors name the field (``SolverConfig.tol: ...``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ntkscrub._validation import check_vector_chunk

__all__ = [
    "Method",
    "Preconditioner",
    "InnerPrecision",
    "SolverConfig",
    "ProductConfig",
    "SLQConfig",
    "NoiseConfig",
    "check_mixed_precision",
]

Method = Literal["cg", "dense"]
Preconditioner = Literal["auto", "nystrom", "columns", "none"]
# Precision of the products inside a mixed-precision solve's inner PCG
# (SolverConfig.inner_precision; ntkscrub.solvers.mixed.PRECISIONS).
InnerPrecision = Literal["tf32", "bfloat16", "float16"]
_INNER_PRECISIONS = ("tf32", "bfloat16", "float16")


def _num(cls: str, name: str, x: Any, *, positive: bool = False, allow_none: bool = False) -> None:
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{cls}.{name}: expected a number, got {type(x).__name__}")
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ValueError(
            f"{cls}.{name}: must be a finite number {'>' if positive else '≥'} 0, got {x}"
        )


def _int(cls: str, name: str, x: Any, minimum: int, *, allow_none: bool = False) -> None:
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{cls}.{name}: expected an integer, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{cls}.{name}: must be ≥ {minimum}, got {x}")


def _choice(cls: str, name: str, x: Any, allowed: tuple) -> None:
    if x not in allowed:
        raise ValueError(f"{cls}.{name}: expected one of {allowed}, got {x!r}")


def _bool(cls: str, name: str, x: Any) -> None:
    if not isinstance(x, bool):
        raise TypeError(f"{cls}.{name}: expected a bool, got {type(x).__name__}")


class _Config:
    """Shared helpers: a JSON-safe dict and a validated copy with some fields replaced."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, torch.dtype) else v
        return out

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class SolverConfig(_Config):
    """How :class:`~ntkscrub.operators.Inverse` solves ``A X = B``.

    Attributes:
        method: ``"cg"`` — matrix-free PCG (:func:`ntkscrub.solvers.cg`); ``"dense"`` — Cholesky
            on ``A.to_dense()`` (the exact twin; small problems). A singular dense system raises.
        tol: per-column relative residual ``‖b − A x‖/‖b‖`` of CG. ``None``: 1e-10 in float64,
            1e-3 in float32 (what float32 products deliver, see ``scrub``).
        max_iter: CG iteration cap per solve (``None``: the CG default ``2n``; the time budget
            ``max_seconds`` is what normally limits a large solve).
        max_seconds: time budget of one solve (``None``: :data:`ntkscrub.solvers.cg`'s default,
            300 s). CG measures the cost of its first matvecs, stops *early* when the residual's
            decay says the budget cannot be met, and reports a diagnosis: the estimated condition
            number κ and the ridge that would converge (see :func:`ntkscrub.solvers.cg`).
        refine: iterative refinement with float64 residuals for float32 solves (``None``: only
            when the operator really computes in float64; see :func:`ntkscrub.solvers.cg`).
        progress: a tqdm bar per solve and per Nyström build (``None``: only on a terminal).
        strict: raise :class:`~ntkscrub.operators.SolveNotConverged` when a solve misses ``tol``
            (``False``: warn and record ``converged=False``).
        scalar_dtype: dtype of CG's scalars (α, β, residual norms): float64 keeps fp32 solves
            from failing at small ridge.
        precond: ``"nystrom"`` (randomized Nyström, Frangella–Tropp–Udell 2023: a Gaussian
            sketch, one product per column), ``"columns"`` (Nyström from uniformly drawn
            columns of the system; for an NTK each costs one JVP pass plus a VJP over its
            sample alone — 0.51× a product, measured — and on the quick preset's systems it
            needs 0–6 % more iterations than the Gaussian sketch at the same rank:
            :func:`ntkscrub.operators.pivot_columns`), ``"auto"`` (the default: ``"columns"``
            for an NTK built by :func:`~ntkscrub.operators.NTK`, whose columns are cheap,
            ``"nystrom"`` for any other system) or ``"none"``.
        precond_rank: its rank; ``None``: adaptive (rank doubling until the sketch's smallest
            kept eigenvalue is within a factor of the ridge, Frangella–Tropp–Udell 2023 §5.4,
            or until ``precond_solves``' cost rule stops it;
            :func:`ntkscrub.solvers.nystrom_preconditioner`); ``0``: no preconditioner.
        precond_solves: how many solves one adaptive Nyström factor serves (scrub: Θ_DD and,
            restricted, Θ_rr — 2): the rank stops doubling when the CG iterations it would save
            over that many solves no longer pay for its columns (counted in products, so the
            rank does not depend on the host's speed or load); ``None``: no cost rule (the
            sketch grows until the factor rule or ``min(n/4, 512)``). A
            :class:`~ntkscrub.Scrubber`'s factor serves its preparation and every request:
            raise it to the number of requests expected.
        seed: seed of the Nyström sketch (reproducible preconditioner).
        warm_start: scrub starts the Θ_rr solve from the Θ_DD solution's retain rows.
        share_precond: scrub preconditions Θ_rr with the Θ_DD factor restricted to the retain
            rows (no second build).
        recycle: how many of a CG solve's search directions (and their products, which CG
            computes anyway) augment the Nyström factor for the later solves that use it: the
            retain solves after Θ_DD, a :class:`~ntkscrub.Scrubber`'s requests, each
            cross-entropy Newton step (:mod:`ntkscrub.solvers.recycle`; the retain solves took
            128 → 84 iterations on the quick preset's reference form). ``None``: as many as the
            factor's rank (their memory is then about the factor's own); ``0``: off. Not with
            ``inner_precision`` (inexact products) or data-parallel solves.
        max_dense_bytes: the dense method refuses operators whose dense twin needs more memory
            (:class:`~ntkscrub.operators.DenseTooLarge`); 4 GiB.
        inner_precision: a mixed-precision solve (:func:`ntkscrub.solvers.mixed_cg`): ``None``
            (default) — every product in the operator's precision; ``"tf32"``, ``"bfloat16"``,
            ``"float16"`` — iterative refinement whose inner PCG solves use products in that
            precision (TF32 matmuls/convolutions, or ``torch.autocast``) while every residual
            ``b − A x`` is recomputed in full precision (float64 subtraction), so the returned
            *true* residual meets ``tol``. Real low-precision products need a float32
            operator; on a float64 operator they are *emulated* (each product's input and output
            rounded to that precision: no speed-up, a CPU check of the mixed solve against
            float64). If refinement stagnates (the low precision cannot get there) or a
            low-precision product overflows, the solve finishes with full-precision inner
            solves and a :class:`~ntkscrub.solvers.PrecisionFallbackWarning` naming the system
            (``fallback`` in the record). Unlike ``ProductConfig.autocast`` / ``allow_tf32``,
            which put *every* product (residuals too) in low precision (refused together with
            this field by ``scrub``/``Scrubber``). bf16/fp16 autocast fails in torch through an
            eval-mode BatchNorm (forward-mode AD): use ``"tf32"`` for such models. ``refine``
            does not apply (the mixed solve refines by construction).
        inner_tol: relative residual the first inner solve aims at (``None``: 0.1 for
            ``"bfloat16"``/``"float16"``, 1e-2 for ``"tf32"``, measured in
            :mod:`ntkscrub.solvers.mixed`); later rounds adapt it to the contraction the products
            allow. Ignored without ``inner_precision``.
    """

    method: Method = "cg"
    tol: float | None = None
    max_iter: int | None = None
    max_seconds: float | None = None
    refine: bool | None = None
    progress: bool | None = None
    strict: bool = True
    scalar_dtype: torch.dtype = torch.float64
    precond: Preconditioner = "auto"
    precond_rank: int | None = None
    precond_solves: int | None = 2
    seed: int = 0
    warm_start: bool = True
    share_precond: bool = True
    recycle: int | None = None
    max_dense_bytes: float = 4 * 2**30
    inner_precision: InnerPrecision | None = None
    inner_tol: float | None = None

    def __post_init__(self) -> None:
        c = "SolverConfig"
        _choice(c, "method", self.method, ("cg", "dense"))
        _num(c, "tol", self.tol, positive=True, allow_none=True)
        _int(c, "max_iter", self.max_iter, 1, allow_none=True)
        _num(c, "max_seconds", self.max_seconds, positive=True, allow_none=True)
        for name in ("refine", "progress"):
            if getattr(self, name) is not None:
                _bool(c, name, getattr(self, name))
        _bool(c, "strict", self.strict)
        if self.scalar_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"{c}.scalar_dtype: expected torch.float32 or torch.float64, "
                f"got {self.scalar_dtype!r}"
            )
        _choice(c, "precond", self.precond, ("auto", "nystrom", "columns", "none"))
        _int(c, "precond_rank", self.precond_rank, 0, allow_none=True)
        _int(c, "precond_solves", self.precond_solves, 1, allow_none=True)
        _int(c, "seed", self.seed, 0)
        _bool(c, "warm_start", self.warm_start)
        _bool(c, "share_precond", self.share_precond)
        _int(c, "recycle", self.recycle, 0, allow_none=True)
        _num(c, "max_dense_bytes", self.max_dense_bytes)
        if self.inner_precision is not None:
            _choice(c, "inner_precision", self.inner_precision, _INNER_PRECISIONS)
        _num(c, "inner_tol", self.inner_tol, positive=True, allow_none=True)
        if self.inner_tol is not None and self.inner_tol >= 1:
            raise ValueError(f"{c}.inner_tol: must be < 1, got {self.inner_tol}")

    def tol_for(self, dtype: torch.dtype) -> float:
        """The tolerance in effect for iterates of ``dtype``.

        float32: Θ products carry a relative error of 2e-4–4e-4 against float64, and a solve told
        to reach 1e-4 ends at a true residual of 4e-4–2e-3 (H200, benchmarks/results/gpu-h200) —
        1e-3 is what float32 honestly delivers.
        """
        if self.tol is not None:
            return float(self.tol)
        return 1e-10 if dtype == torch.float64 else 1e-3

    def rank_for(self, n: int) -> int | Literal["auto"]:
        """The Nyström rank in effect for a system of ``n`` rows (0: no preconditioner;
        ``"auto"``: the adaptive rank of :func:`ntkscrub.solvers.nystrom_preconditioner`)."""
        if self.precond == "none":
            return 0
        if self.precond_rank is not None:
            return min(self.precond_rank, n)
        return "auto"


@dataclass(frozen=True)
class ProductConfig(_Config):
    """How Jacobian products ``J V`` / ``Jᵀ U`` are streamed (:class:`ntkscrub.operators.Jacobian`).

    Attributes:
        batch_size: samples per JVP/VJP batch (memory ∝ batch_size · activations · vectors).
        vector_chunk: the most vectors pushed through one ``vmap`` per batch: ``"auto"``
            (default) as many as fit ``memory_budget``, measured once per batch shape
            (:func:`ntkscrub.operators.passes.plan_passes`); an int fixes it; ``None``: all.
        memory_budget: bytes one pass may hold with ``vector_chunk="auto"``; ``None``: twice a
            measured training step at the same batch size.
        autocast: a ``torch.autocast`` dtype for the products (experimental: bf16 products are
            2–3 % off, too coarse for CG); ``None`` computes in the parameters' dtype.
        allow_tf32: keep PyTorch's TF32 convolutions/matmuls during solves (default ``False``:
            TF32 products stall CG near 3e-2, see :func:`ntkscrub.scrub.full_fp32_precision`).
        cache_bytes: bytes of forward passes (VJP pullbacks, linearised JVPs) the Jacobians of
            the process may keep so that later products skip the primal computation
            (:mod:`ntkscrub.operators.forward_cache`; a Θ product 2.2 → 1.3 training steps on
            the quick preset's CPU model); ``None``: a quarter of the device's available
            memory; 0: never keep them.
        prefix_cache: when ``params`` linearises a suffix of the network (the last blocks, the
            head), run the frozen prefix once over the data and every product on the suffix
            alone (:mod:`ntkscrub.prefix`; exact). The activations must fit ``cache_bytes``
            (same default); otherwise, or for a model that cannot be split, products stream
            the whole network as before (``info["prefix_cache"]`` says which and why).
    """

    batch_size: int = 256
    vector_chunk: int | str | None = "auto"
    memory_budget: int | None = None
    autocast: torch.dtype | None = None
    allow_tf32: bool = False
    cache_bytes: int | None = None
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        c = "ProductConfig"
        _int(c, "batch_size", self.batch_size, 1)
        check_vector_chunk(self.vector_chunk, self.memory_budget, owner=f"{c}.")
        if self.autocast is not None and not isinstance(self.autocast, torch.dtype):
            raise TypeError(f"{c}.autocast: expected a torch.dtype or None, got {self.autocast!r}")
        _bool(c, "allow_tf32", self.allow_tf32)
        if self.cache_bytes is not None:
            _int(c, "cache_bytes", self.cache_bytes, 0)
        _bool(c, "prefix_cache", self.prefix_cache)

    def jacobian_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`ntkscrub.operators.Jacobian` this config sets."""
        return {
            "batch_size": self.batch_size,
            "autocast": self.autocast,
            "vector_chunk": self.vector_chunk,
            "memory_budget": self.memory_budget,
            "cache_bytes": self.cache_bytes,
        }


def check_mixed_precision(solver: SolverConfig, products: ProductConfig) -> None:
    """Refuse ``solver.inner_precision`` with low-precision *products*: a mixed-precision solve
    computes its residuals ``b − A x`` with the operator's own products, which
    ``ProductConfig.autocast`` / ``allow_tf32`` would put in low precision too — the true
    residual would not be full precision, and the tolerance not honestly met."""
    if solver.inner_precision is None:
        return
    if products.autocast is not None:
        raise ValueError(
            f"solver_config.inner_precision={solver.inner_precision!r} needs full-precision "
            f"products for the residuals, but products.autocast={products.autocast} puts every "
            "product in low precision; give products.autocast=None (the inner solves already "
            "run their products under autocast)"
        )
    if products.allow_tf32:
        raise ValueError(
            f"solver_config.inner_precision={solver.inner_precision!r} needs full-precision "
            "products for the residuals, but products.allow_tf32=True puts every product in "
            "TF32; give allow_tf32=False (inner_precision='tf32' allows TF32 in the inner "
            "solves only)"
        )


@dataclass(frozen=True)
class SLQConfig(_Config):
    """Stochastic Lanczos quadrature (:func:`ntkscrub.solvers.slq_logdet`) for ``log det A``.

    Attributes:
        probes: Rademacher probe vectors (Monte-Carlo error ∝ 1/√probes).
        steps: Lanczos steps per probe.
        seed: seed of the probes (``None``: torch's global generator).
    """

    probes: int = 30
    steps: int = 30
    seed: int | None = 0

    def __post_init__(self) -> None:
        c = "SLQConfig"
        _int(c, "probes", self.probes, 1)
        _int(c, "steps", self.steps, 1)
        _int(c, "seed", self.seed, 0, allow_none=True)


@dataclass(frozen=True)
class NoiseConfig(_Config):
    """The diagonal Fisher noise ``n ~ N(0, α F⁻¹)`` of eq. 11 with the reference code's clamps
    (:func:`ntkscrub.noise.fisher_noise_variance`, REFERENCE.md §2).

    Attributes:
        eps: added to F before inverting (1e-8).
        clamp: cap of ``1/(F + eps)`` (1e3); ``head_clamp`` for the classifier head (1e2).
        head_scale, vector_scale: ×10 for the head and for other 1-D tensors.
        average_inputs: average the variance over the input dimension of each ≥2-D tensor.
        reduction: ``"mean"`` (Fisher averaged over samples) or ``"sum"``.
        batch_size: samples per batch of the Fisher pass.
    """

    eps: float = 1e-8
    clamp: float = 1e3
    head_clamp: float = 1e2
    head_scale: float = 10.0
    vector_scale: float = 10.0
    average_inputs: bool = True
    reduction: Literal["mean", "sum"] = "mean"
    batch_size: int = 64

    def __post_init__(self) -> None:
        c = "NoiseConfig"
        for name in ("eps", "clamp", "head_clamp", "head_scale", "vector_scale"):
            _num(c, name, getattr(self, name))
        _bool(c, "average_inputs", self.average_inputs)
        _choice(c, "reduction", self.reduction, ("mean", "sum"))
        _int(c, "batch_size", self.batch_size, 1)

    def fisher_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`ntkscrub.noise.add_fisher_noise` (clamps, reduction)."""
        d = self.to_dict()
        d.pop("batch_size")
        return d
