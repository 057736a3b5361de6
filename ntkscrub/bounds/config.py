"""Engineering knobs of the information bounds: one frozen dataclass, validated on construction.

The paper-level choices — the noise scale α, the covariance ``kind`` and the damping δ of
``Σ = α(F + δI)⁻¹`` — are explicit keywords of every entry point; everything else that changes how
(not what) is computed lives in :class:`BoundsConfig`, passed as ``config=``. Every result records
the config it used as a plain dict (:meth:`BoundsConfig.to_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from ntkscrub._validation import check_choice, check_int, check_number, check_seed
from ntkscrub.config import InnerPrecision

__all__ = ["BoundsConfig", "FisherVariance", "Kind", "Reduction", "Loss", "Solver", "Form"]

Kind = Literal["diag", "full"]
"""``"diag"``: the reference code's diagonal-Fisher noise; ``"full"``: Σ = α(sF + δI)⁻¹."""
Reduction = Literal["mean", "sum"]
"""``"mean"``: F averaged over D_r (the reference's scale, s = 1/|D_r|); ``"sum"``: s = 1."""
Loss = Literal["ce", "mse"]
"""``"ce"``: softmax output Hessian H = diag(π) − ππᵀ; ``"mse"``: H = I."""
Solver = Literal["cg", "dense"]
"""``"cg"``: matrix-free; ``"dense"``: the exact twin with explicit p×p matrices (small p)."""
Form = Literal["dual", "primal"]
"""Solves with A = sF + δI: ``"dual"`` Woodbury/NTK form (c·|D_r| systems), ``"primal"`` CG on A."""


def _check_literal(obj: Any, name: str, kind: Any) -> None:
    check_choice(getattr(obj, name), f"{type(obj).__name__}.{name}", get_args(kind))


@dataclass(frozen=True)
class FisherVariance:
    """The reference code's diagonal noise recipe (``kind="diag"``, REFERENCE.md §2).

    As :func:`ntkscrub.noise.fisher_noise_variance`: ``α/(F + eps)`` per weight, clamped at
    ``clamp`` (``head_clamp`` for the head), averaged over inputs (``average_inputs``), times
    ``head_scale`` for the head and ``vector_scale`` for other 1-D tensors. The defaults are that
    function's (a test keeps them equal).
    """

    eps: float = 1e-8
    clamp: float = 1e3
    head_clamp: float = 1e2
    head_scale: float = 10.0
    vector_scale: float = 10.0
    average_inputs: bool = True

    def __post_init__(self) -> None:
        for f in ("eps", "clamp", "head_clamp", "head_scale", "vector_scale"):
            check_number(getattr(self, f), f"FisherVariance.{f}")
        if not isinstance(self.average_inputs, bool):
            raise TypeError(
                "FisherVariance.average_inputs: expected a bool, got "
                f"{type(self.average_inputs).__name__}"
            )

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~ntkscrub.noise.fisher_noise_variance`."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BoundsConfig:
    """How the bounds are computed; the defaults are those of the former per-function keywords.

    Frozen (derive variants with :func:`dataclasses.replace`); every field is checked on
    construction and a bad one raises ``ValueError``/``TypeError`` naming ``BoundsConfig.<field>``;
    the ``Literal`` modes are checked at run time too.

    Covariance model (what F is):
        reduction: ``"mean"`` (F averaged over D_r, the reference's Fisher) or ``"sum"``
            (F = J_rᵀ H J_r, :class:`~ntkscrub.operators.GGN`).
        loss: ``"ce"`` (softmax Fisher) or ``"mse"`` (H = I).
        params: which parameters are linearised / carry noise (a
            :class:`~ntkscrub.params.ParameterSpace` selector; ``None``: all trainable).
        fisher: the diagonal recipe of ``kind="diag"`` (:class:`FisherVariance`).
    Solves with A = sF + δI (``kind="full"``):
        solver: ``"cg"`` (matrix-free) or ``"dense"`` (explicit, Cholesky; small p only).
        form: ``"dual"`` (Woodbury/NTK) or ``"primal"`` (CG in parameter space).
        cg_tol, cg_max_iter, cg_strict, cg_scalar_dtype: as :func:`ntkscrub.solvers.cg`.
        cg_inner_precision: low-precision products inside each CG solve, the true residual in
            full precision (:func:`ntkscrub.solvers.mixed_cg`; ``SolverConfig.inner_precision``).
        precond_rank: rank of a Nyström preconditioner for each CG system (0: none).
    Stochastic estimators (matrix-free white box):
        probes (≥ 2), steps: Hutchinson / SLQ probes and Lanczos steps.
        seed: probes, SLQ and Nyström sketches (``None``: torch's global generator).
    Products and KL:
        batch_size: samples per JVP/VJP batch; query_batch: queries per block of columns.
        jitter: relative jitter of the dense c·k output covariances (see
            :func:`~ntkscrub.bounds.gaussian_kl`).
    """

    reduction: Reduction = "mean"
    loss: Loss = "ce"
    params: Any = None
    fisher: FisherVariance = field(default_factory=FisherVariance)
    solver: Solver = "cg"
    form: Form = "dual"
    cg_tol: float = 1e-6
    cg_max_iter: int | None = None
    cg_strict: bool = False
    cg_scalar_dtype: torch.dtype = torch.float64
    cg_inner_precision: str | None = None
    precond_rank: int = 0
    probes: int = 30
    steps: int = 30
    seed: int | None = 0
    batch_size: int = 256
    query_batch: int = 16
    jitter: float = 0.0

    def __post_init__(self) -> None:
        modes = (("reduction", Reduction), ("loss", Loss), ("solver", Solver), ("form", Form))
        for name, kind in modes:
            _check_literal(self, name, kind)
        object.__setattr__(self, "params", _selector(self.params))
        if not isinstance(self.fisher, FisherVariance):
            raise TypeError(
                f"BoundsConfig.fisher: expected a FisherVariance, got {type(self.fisher).__name__}"
            )
        check_number(self.cg_tol, "BoundsConfig.cg_tol", positive=True)
        if self.cg_max_iter is not None:
            check_int(self.cg_max_iter, "BoundsConfig.cg_max_iter")
        if not isinstance(self.cg_strict, bool):
            raise TypeError(f"BoundsConfig.cg_strict: expected a bool, got {self.cg_strict!r}")
        if not isinstance(self.cg_scalar_dtype, torch.dtype):
            got = self.cg_scalar_dtype
            raise TypeError(f"BoundsConfig.cg_scalar_dtype: expected a torch.dtype, got {got!r}")
        check_int(self.precond_rank, "BoundsConfig.precond_rank", 0)
        allowed = get_args(InnerPrecision)
        if self.cg_inner_precision is not None and self.cg_inner_precision not in allowed:
            raise ValueError(
                f"BoundsConfig.cg_inner_precision: expected one of {allowed} or None, got "
                f"{self.cg_inner_precision!r}"
            )
        check_int(self.probes, "BoundsConfig.probes", 2)
        check_int(self.steps, "BoundsConfig.steps")
        try:
            check_seed(self.seed)
        except TypeError as err:
            raise TypeError(f"BoundsConfig.{err}") from None
        check_int(self.batch_size, "BoundsConfig.batch_size")
        check_int(self.query_batch, "BoundsConfig.query_batch")
        check_number(self.jitter, "BoundsConfig.jitter")

    def cg_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`ntkscrub.solvers.cg`."""
        return {
            "tol": self.cg_tol,
            "max_iter": self.cg_max_iter,
            "strict": self.cg_strict,
            "scalar_dtype": self.cg_scalar_dtype,
        }

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-safe dict of every field (dtypes and selectors as strings)."""
        out = dataclasses.asdict(self)
        out["cg_scalar_dtype"] = str(self.cg_scalar_dtype)
        out["params"] = _selector_record(self.params)
        return out


def _selector(params: Any) -> Any:
    """A selector kept as given, except that names become a tuple (a generator would be used up
    by the first of the two models; a set is sorted so that records are reproducible)."""
    if params is None or isinstance(params, str) or callable(params):
        return params
    if isinstance(params, (set, frozenset)):
        return tuple(sorted(params))
    try:
        return tuple(params)
    except TypeError:
        raise TypeError(
            "BoundsConfig.params: expected None, a regex, parameter names or a predicate, got "
            f"{type(params).__name__}"
        ) from None


def _selector_record(params: Any) -> Any:
    """A parameter selector as JSON: None / a pattern string / a list of names / its repr."""
    if params is None or isinstance(params, str):
        return params
    if isinstance(params, tuple):
        return list(params)
    return repr(params)  # a predicate
