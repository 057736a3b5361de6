"""The entry points of Proposition 1: white box (eq. 6), black box (eq. 7), per query (Fig. 3).

Each compares the scrubbed weights ``S(w_D) = h(w_D) + n``, ``n ~ N(0, Σ)``, with the baseline
``S0(w_Dr) = w_Dr + n'``, ``n' ~ N(0, Σ0)`` (the model retrained on D_r plus noise), and reports the
KL ``KL(N(μs, Σ) ‖ N(μ0, Σ0))`` in nats with the terms and conventions of
:data:`~ntkscrub.bounds.CONVENTION` (½ included; the paper's printed expression beside it).

Common keywords: ``alpha`` (α > 0, the noise scale), ``kind`` (``"diag"``: the reference code's
diagonal-Fisher noise; ``"full"``: Σ = α(sF + δI)⁻¹), ``delta`` (δ ≥ 0, > 0 for ``"full"``; default
1e-3: the reference's variance clamp ``1/(F + ε) ≤ 1e3`` acts as a floor F ≥ 1e-3 on a mean-reduced
Fisher; unused by ``"diag"``) and ``config`` (:class:`~ntkscrub.bounds.BoundsConfig`, everything
else; ``None``: the defaults). Every result records ``kind``, ``alpha``, ``delta``, ``config``
(a plain dict), ``matvecs`` (retain JVP+VJP column products), ``cg`` and ``seconds``. Neither model
is modified; both must be in eval mode and share an architecture.

``process_group`` (every entry point; the rule of :func:`ntkscrub.scrub`): when given, or when a
default ``torch.distributed`` group is initialised, ``retain`` is *this rank's shard* of D_r
(uneven shards; not empty) and every rank returns the bounds of the concatenation of the shards:
the Fisher/GGN, a sum over D_r, is all-reduced (one ``(p, k)`` block per product) and N_r counts
every rank's rows (:mod:`ntkscrub.bounds.covariance`). Models, queries and keywords must be the
same on every rank; the results are rank 0's, identical on every rank. Data-parallel: every
``kind``, ``solver`` and ``form`` (the dual system row-sharded) except a Nyström factor of the
dual system (``precond_rank > 0`` with ``form="dual"`` raises ValueError); ``config.seed`` must
be an int.
"""

from __future__ import annotations

import time
from typing import Any

from torch import Tensor, nn

from ntkscrub._validation import check_choice, check_number
from ntkscrub.bounds.config import BoundsConfig, Kind
from ntkscrub.bounds.covariance import NoiseCovariance
from ntkscrub.bounds.gaussian import CONVENTION
from ntkscrub.bounds.outputs import output_information, stack_inputs
from ntkscrub.bounds.outputs import query_sets as as_query_sets
from ntkscrub.bounds.weights import weight_information
from ntkscrub.params import check_eval_mode

__all__ = [
    "white_box",
    "black_box",
    "per_query_information",
    "information_bounds",
    "output_covariance",
]


def white_box(
    scrubbed: nn.Module,
    reference: nn.Module,
    retain: Any,
    *,
    alpha: float,
    kind: Kind = "diag",
    delta: float = 1e-3,
    config: BoundsConfig | None = None,
    process_group: Any = None,
) -> dict[str, Any]:
    """Information in the weights (eq. 6): ``KL(N(h(w_D), Σ) ‖ N(w_Dr, Σ0))`` over the p weights.

    Args:
        scrubbed: the deterministic scrubbed model h(w_D) (no noise added), eval mode.
        reference: the model retrained on D_r, w_Dr (same architecture), eval mode.
        retain: D_r (``(X (N_r, ...), Y (N_r,))``, Dataset or DataLoader), where each model's
            Fisher/GGN F is taken (s·F with s = 1/N_r for ``config.reduction="mean"``).
        alpha: α > 0, the noise scale: Σ = α(sF + δI)⁻¹, or α times the reference's diagonal recipe.
        kind: ``"diag"`` (the reference code's diagonal-Fisher noise) or ``"full"``.
        delta: δ ≥ 0, > 0 for ``"full"``, unused by ``"diag"``. Default 1e-3: the reference's
            variance clamp ``1/(F + ε) ≤ 1e3`` acts as a floor F ≥ 1e-3 on a mean-reduced Fisher.
        config: how it is computed (:class:`~ntkscrub.bounds.BoundsConfig`; ``None``: defaults).
        process_group: data-parallel over shards of ``retain`` (see the module docstring).

    The KL is in nats with the ½ (:data:`~ntkscrub.bounds.CONVENTION`): scrubbed first.

    Returns ``kl`` (nats), ``two_kl``, ``paper_printed``, the terms ``quadratic``,
    ``trace_minus_k``, ``logdet_ratio``, ``k`` (= p), ``reference_two_kl`` (diag and dense; None
    matrix-free), ``stderr`` / ``two_kl_stderr`` (Monte-Carlo; 0 unless full + cg, which also
    gives ``trace_stderr``, ``logdet_stderr``, ``slq``), ``per_tensor_kl`` (diag), ``convention``,
    ``delta_w_norm``, ``p`` and the common records.
    """
    t0 = time.perf_counter()
    alpha, kind, delta, config = _check(alpha, kind, delta, config)
    comm = _comm(process_group)
    sigma, sigma0 = _pair(scrubbed, reference, retain, alpha, kind, delta, config, comm)
    return _agreed(comm, _white(sigma, sigma0, t0))


def black_box(
    scrubbed: nn.Module,
    reference: nn.Module,
    retain: Any,
    queries: Any,
    *,
    alpha: float,
    kind: Kind = "diag",
    delta: float = 1e-3,
    config: BoundsConfig | None = None,
    process_group: Any = None,
) -> dict[str, Any]:
    """Information in the outputs of a query set (eq. 7), jointly over its c·k outputs.

    ``KL(N(f_h(x), Jₓ Σ Jₓᵀ) ‖ N(f_ref(x), Jₓ' Σ0 Jₓ'ᵀ))``, each Jacobian at its own model's
    weights (eq. 5); nats, scrubbed first, with the ½ (:data:`~ntkscrub.bounds.CONVENTION`).
    ``queries``: one data set (X ``(k, ...)``, (X, Y), Dataset, DataLoader) or a mapping name →
    data set; the other arguments as :func:`white_box`. Returns ``{"sets": {name: entry}}`` keyed
    by set name (``"queries"`` for a single set) plus the common records; each entry has the joint
    KL (keys as :func:`~ntkscrub.bounds.gaussian_kl`, k = c·|set|, from the ``(c·k, c·k)`` output
    covariances) and ``per_query`` (each query alone, c dims: ``mean``, ``std``, ``values``, ...).
    """
    t0 = time.perf_counter()
    alpha, kind, delta, config = _check(alpha, kind, delta, config)
    sets = as_query_sets(queries)
    comm = _comm(process_group)
    sigma, sigma0 = _pair(scrubbed, reference, retain, alpha, kind, delta, config, comm)
    entries = {n: output_information(sigma, sigma0, d, n, joint=True) for n, d in sets.items()}
    return _agreed(comm, {"sets": entries, **_records(sigma, sigma0, t0)})


def per_query_information(
    scrubbed: nn.Module,
    reference: nn.Module,
    retain: Any,
    query_sets: Any,
    *,
    alpha: float,
    kind: Kind = "diag",
    delta: float = 1e-3,
    config: BoundsConfig | None = None,
    process_group: Any = None,
) -> dict[str, Any]:
    """Per-query information (eq. 7 with k = 1), e.g. over D_f, D_r and test (Fig. 3 right).

    ``query_sets``: mapping name → data set (or one data set, named ``"queries"``). For each query
    alone, the KL (nats, as :func:`black_box`) between the c-dimensional output Gaussians; only the
    ``(k, c, c)`` diagonal blocks of the output covariances are computed; the other arguments as
    :func:`white_box`. Returns ``{"sets": {name: {"mean", "std", "stderr", "median", "max", "n",
    "values", "two_kl_mean", "reference_two_kl_mean", "paper_printed_mean", "jitter",
    "convention", "seconds"}}}`` plus the common records.
    """
    t0 = time.perf_counter()
    alpha, kind, delta, config = _check(alpha, kind, delta, config)
    sets = as_query_sets(query_sets, "query_sets")
    comm = _comm(process_group)
    sigma, sigma0 = _pair(scrubbed, reference, retain, alpha, kind, delta, config, comm)
    entries = {}
    for n, d in sets.items():
        r = output_information(sigma, sigma0, d, n, joint=False)
        entries[n] = {**r["per_query"], "seconds": r["seconds"]}
    return _agreed(comm, {"sets": entries, **_records(sigma, sigma0, t0)})


def information_bounds(
    scrubbed: nn.Module,
    reference: nn.Module,
    retain: Any,
    *,
    queries: Any = None,
    alpha: float,
    kind: Kind = "diag",
    delta: float = 1e-3,
    config: BoundsConfig | None = None,
    process_group: Any = None,
) -> dict[str, Any]:
    """Both bounds of Proposition 1: white box (eq. 6) and, for ``queries``, black box (eq. 7).

    The two models' noise covariances on D_r are built once and shared. Returns
    ``{"white_box": <white_box dict>, "black_box": {name: <joint KL + per_query>} | None}`` plus
    the common records (nats throughout; arguments as :func:`white_box` and :func:`black_box`).
    """
    t0 = time.perf_counter()
    alpha, kind, delta, config = _check(alpha, kind, delta, config)
    sets = as_query_sets(queries) if queries is not None else None
    comm = _comm(process_group)
    sigma, sigma0 = _pair(scrubbed, reference, retain, alpha, kind, delta, config, comm)
    wb = _white(sigma, sigma0, time.perf_counter())
    bb = None
    if sets is not None:
        bb = {n: output_information(sigma, sigma0, d, n, joint=True) for n, d in sets.items()}
    return _agreed(comm, {"white_box": wb, "black_box": bb, **_records(sigma, sigma0, t0)})


def output_covariance(
    model: nn.Module,
    retain: Any,
    queries: Any,
    *,
    alpha: float,
    kind: Kind = "full",
    delta: float = 1e-3,
    joint: bool = True,
    config: BoundsConfig | None = None,
    process_group: Any = None,
) -> tuple[Tensor, Tensor]:
    """Output mean and covariance ``Jₓ Σ Jₓᵀ`` of one model (eq. 5) on k queries.

    ``Σ`` is this model's noise covariance on D_r (``retain``; ``kind``, ``alpha``, ``delta``,
    ``config`` as for :func:`white_box`); for ``kind="full"`` ``α Jₓ(sF + δI)⁻¹Jₓᵀ`` by the dual
    (Woodbury/NTK) form, CG in parameter space (``config.form="primal"``) or densely. Returns
    ``(f(x) (k, c), cov)`` with ``cov`` ``(c·k, c·k)`` (rows ``n·c + j``) if ``joint``, else the k
    diagonal blocks ``(k, c, c)``.
    """
    alpha, kind, delta, config = _check(alpha, kind, delta, config)
    comm = _comm(process_group)
    sigma = NoiseCovariance(
        model, "model", retain, alpha=alpha, kind=kind, delta=delta, config=config, comm=comm
    )
    X = stack_inputs(queries, "queries", sigma)
    mean, cov = sigma.output_moments(X, "queries", bool(joint))
    if comm is not None:  # rank 0's, bit for bit on every rank
        mean, cov = comm.broadcast(mean), comm.broadcast(cov)
    return mean, cov


# =========================================================================== shared steps
def _comm(process_group: Any) -> Any:
    """The :class:`~ntkscrub.distributed.Comm` when data-parallel (as :func:`ntkscrub.scrub`
    decides: a group given, or a default group initialised), else ``None``."""
    from ntkscrub import distributed  # imported here: torch.distributed only when used

    return distributed.Comm(process_group) if distributed.active(process_group) else None


def _agreed(comm: Any, result: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's result on every rank (replicated parameter-space estimates may round apart in
    the last bits from rank to rank; the answer must be one)."""
    return result if comm is None else comm.gather_objects(result)[0]


def _check(
    alpha: Any, kind: Any, delta: Any, config: Any
) -> tuple[float, Kind, float, BoundsConfig]:
    """Validate the paper-level keywords and the config (errors name the argument)."""
    alpha = check_number(alpha, "alpha", positive=True)
    delta = check_number(delta, "delta")
    kind = check_choice(kind, "kind", ("diag", "full"))
    if kind == "full" and delta == 0.0:
        raise ValueError(
            "delta: must be > 0 for kind='full' (F is singular when p > c·|D_r|, and SLQ "
            "needs A = δI + PSD with δ > 0)"
        )
    if config is None:
        config = BoundsConfig()
    elif not isinstance(config, BoundsConfig):
        raise TypeError(f"config: expected a BoundsConfig or None, got {type(config).__name__}")
    return alpha, kind, delta, config


def _pair(
    scrubbed: nn.Module,
    reference: nn.Module,
    retain: Any,
    alpha: float,
    kind: Kind,
    delta: float,
    config: BoundsConfig,
    comm: Any = None,
) -> tuple[NoiseCovariance, NoiseCovariance]:
    """Σ at h(w_D) and Σ0 at w_Dr, checked comparable (names, shapes, dtype, device, c)."""
    for m, n in ((scrubbed, "scrubbed"), (reference, "reference")):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{n}: expected an nn.Module, got {type(m).__name__}")
    check_eval_mode(scrubbed, "scrubbed")
    check_eval_mode(reference, "reference")
    noise = dict(alpha=alpha, kind=kind, delta=delta, config=config, comm=comm)
    sigma = NoiseCovariance(scrubbed, "scrubbed", retain, **noise)
    sigma.space.check_compatible(reference, "reference")  # ValueError naming 'reference'
    sigma0 = NoiseCovariance(reference, "reference", retain, **noise)
    s, s0 = sigma.space, sigma0.space
    if s0.names != s.names:
        raise ValueError(
            "reference: linearises other parameters than scrubbed; is it the same architecture?"
        )
    if s0.dtype != s.dtype or s0.device != s.device:
        raise ValueError(
            f"reference: parameters are {s0.dtype} on {s0.device}, scrubbed's are "
            f"{s.dtype} on {s.device}"
        )
    if sigma0.c != sigma.c:
        raise ValueError(f"reference: has {sigma0.c} outputs, scrubbed has {sigma.c}")
    return sigma, sigma0


def _white(sigma: NoiseCovariance, sigma0: NoiseCovariance, t0: float) -> dict[str, Any]:
    out = weight_information(sigma, sigma0)
    out.update(_describe(sigma))
    out["delta_w_norm"] = float((sigma.theta - sigma0.theta).norm())
    out["p"] = sigma.p
    out.update(_records(sigma, sigma0, t0))
    return out


def _describe(sigma: NoiseCovariance) -> dict[str, Any]:
    """What was computed: the paper-level choices, the main config fields, the whole config."""
    cfg = sigma.config
    out: dict[str, Any] = {
        "kind": sigma.kind,
        "alpha": sigma.alpha,
        "delta": sigma.delta if sigma.kind == "full" else None,
        "reduction": cfg.reduction,
        "loss": cfg.loss,
        "solver": cfg.solver,
    }
    if sigma.kind == "full" and cfg.solver == "cg":
        out["form"] = cfg.form
    if sigma.kind == "diag":
        out["fisher_options"] = cfg.fisher.kwargs()
    out["config"] = cfg.to_dict()
    return out


def _records(sigma: NoiseCovariance, sigma0: NoiseCovariance, t0: float) -> dict[str, Any]:
    """The common records: description, matvec counts, CG summary, convention, seconds."""
    out = _describe(sigma)
    out.update(
        {
            "matvecs": sigma.matvecs() + sigma0.matvecs(),
            "matvecs_scrubbed": sigma.matvecs(),
            "matvecs_reference": sigma0.matvecs(),
            "query_jvp_columns": sigma.counts["query_jvp"] + sigma0.counts["query_jvp"],
            "query_vjp_columns": sigma.counts["query_vjp"] + sigma0.counts["query_vjp"],
            "cg": _cg_summary(sigma.cg_records + sigma0.cg_records),
            "convention": CONVENTION,
            "seconds": time.perf_counter() - t0,
        }
    )
    return out


def _cg_summary(recs: list[dict[str, Any]]) -> dict[str, Any] | None:
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
