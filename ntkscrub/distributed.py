"""Data-parallel NTK forgetting with ``torch.distributed`` (issue 15): each rank holds its rows.

The NTK product is a sum over data. With the rows of D sharded over R ranks (rank k holds D^(k),
its part of D_r and of D_f), the Jacobian is ``J = [J^(0); …; J^(R−1)]`` and

    J v      = [J^(k) v]_k                         (local rows, no communication)
    Jᵀ u     = Σ_k J^(k)ᵀ u^(k)                    (one all-reduce of a (p, k) block)
    Θ u      = J (Jᵀ u) + λ u                      (one all-reduce per product)

so vectors in data space (residuals, CG iterates) are *row-sharded* — no rank ever holds another
rank's rows — and vectors in parameter space (Jᵀ u, the shift Δ of eq. 10) are replicated. PCG
(:func:`ntkscrub.solvers.cg` with its ``allreduce`` hook) sums its per-rank partial inner products
with :meth:`Comm.sum_scalars` — an all-gather of the ``(m,)`` partials summed in rank order, so
every scalar, and hence every decision of the solver, is the same bits on every rank.

:func:`sharded_scrub` is what :func:`ntkscrub.scrub` runs under an initialised process group: the
shift of Proposition 2 (``form="solves"``: x_D = (Θ_DD + λI)⁻¹ e_D, x_r = (Θ_rr + λI)⁻¹ e_r,
Δ = J_rᵀ x_r − J_Dᵀ x_D) with the shards of every rank, equal to the one-process scrub of the
concatenation of the shards in rank order (row order does not change Δ: it is a sum over rows).

Failures: an exception on one rank (bad input on its shard, a failing product) is caught, and an
error flag rides along the next collective (every collective of :class:`Comm` carries one), so
every rank raises the same :class:`DistributedError` naming the rank, the phase and the original
error instead of waiting in a collective. A solve that misses its tolerance is a global decision
(all-reduced residuals) and raises :class:`~ntkscrub.operators.SolveNotConverged` on every rank.
What a flag cannot catch — a rank that dies or hangs — is bounded by the process group's
collective timeout (``init_process_group(timeout=...)``; :func:`init` sets 10 minutes).

The Nyström preconditioner is row-sharded (:class:`ShardedNystrom`): one block product for the
sketch, ``ℓ × ℓ`` core matrices summed over the ranks. Lanczos and SLQ (:func:`sharded_lanczos`,
:func:`sharded_slq_logdet`) run the one-process recurrences on row-sharded vectors with their
inner products summed by :meth:`Comm.sum_scalars`; each rank draws its rows of the one-process
Rademacher probes. The readouts (:mod:`ntkscrub.readouts`), the information bounds
(:mod:`ntkscrub.bounds`) and the retrain/fine-tune baselines (:func:`ntkscrub.training.train`
with ``comm``) take ``process_group=`` by the same rule as :func:`ntkscrub.scrub`. Not (yet)
data-parallel: sharing the
Θ_DD factor with Θ_rr (each system builds its own), ``form="block"``, the Fisher noise,
``solver="dense"`` (each raises or is recorded, see :func:`sharded_scrub`).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ntkscrub.config import SolverConfig
from ntkscrub.operators import Inverse, Jacobian, Operator, SolveNotConverged, StackedJacobian
from ntkscrub.solvers import LowRankPreconditioner
from ntkscrub.solvers.lanczos import LanczosResult, LogdetEstimate, Sharding, lanczos, slq_logdet

__all__ = [
    "Comm",
    "DistributedError",
    "ShardedJacobian",
    "ShardedNystrom",
    "active",
    "init",
    "sharded_ntk",
    "sharded_cg",
    "sharded_lanczos",
    "sharded_slq_logdet",
    "sharded_scrub",
    "DEFAULT_TIMEOUT",
]

# The collective timeout init() sets: a rank that dies or hangs ends every other rank's wait after
# this long (gloo honours it directly; NCCL with async error handling, the default in torch ≥ 2.2).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


class DistributedError(RuntimeError):
    """Raised on every rank when some rank failed.

    Attributes:
        rank: the first failing rank; ``phase``: what it was doing; ``error_type``: the class
        name of its exception (``"ValueError"``, ...); ``message``: that exception's message.
    """

    def __init__(self, rank: int, phase: str, error_type: str, message: str) -> None:
        super().__init__(f"rank {rank} failed while {phase}: {error_type}: {message}")
        self.rank, self.phase, self.error_type, self.message = rank, phase, error_type, message


def init(backend: str | None = None, *, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> None:
    """``init_process_group`` from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) with a collective ``timeout``; backend: NCCL when CUDA is
    available, else gloo. Does nothing if a default group already exists."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timeout)


def active(process_group: Any = None) -> bool:
    """Whether :func:`ntkscrub.scrub` runs data-parallel: a group is given, or a default
    process group is initialised."""
    if process_group is not None:
        return True
    return dist.is_available() and dist.is_initialized()


class Comm:
    """Collectives of one process group, each carrying an error flag.

    Args:
        group: a ``torch.distributed`` process group; ``None``: the default group (which must
            be initialised).

    :attr:`block_bytes` / :attr:`block_calls` count the (p, k) all-reduces (the communication
    of the NTK products), :attr:`scalar_calls` the scalar reductions of the solver.
    """

    def __init__(self, group: Any = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "process_group: torch.distributed is not initialised; call "
                "ntkscrub.distributed.init() (or dist.init_process_group) first"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.block_bytes = 0
        self.block_calls = 0
        self.scalar_calls = 0
        self._failure: tuple[str, BaseException] | None = None

    # ------------------------------------------------------------------ failures
    def fail(self, phase: str, err: BaseException) -> None:
        """Record a local error; the next collective raises it on every rank."""
        if self._failure is None:
            self._failure = (phase, err)

    @contextlib.contextmanager
    def guard(self, phase: str) -> Iterator[None]:
        """Run a local phase; any rank's exception becomes a :class:`DistributedError` on every
        rank at the end of the phase (one scalar all-reduce)."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - re-raised on every rank by sync()
            self.fail(phase, err)
        self.sync()

    def sync(self) -> None:
        """A collective that only exchanges the error flag."""
        self.sum_scalars(torch.zeros(0, dtype=torch.float64, device=self._device()))

    def _flag(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.tensor([0.0 if self._failure is None else 1.0], dtype=dtype, device=device)

    def _raise_if(self, flag: float) -> None:
        if flag == 0.0:
            return
        mine = None
        if self._failure is not None:
            phase, err = self._failure
            mine = (phase, type(err).__name__, str(err))
        reports: list[Any] = [None] * self.size
        dist.all_gather_object(reports, mine, group=self.group)
        rank = next(r for r, rep in enumerate(reports) if rep is not None)
        phase, etype, msg = reports[rank]
        original = self._failure[1] if self._failure is not None else None
        self._failure = None
        raise DistributedError(rank, phase, etype, msg) from original

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ------------------------------------------------------------------ reductions
    def sum_scalars(self, t: Tensor) -> Tensor:
        """``Σ_ranks t`` for a small 1-D tensor, the same bits on every rank: all-gather, then a
        sum in rank order (deterministic whatever the backend's reduction algorithm)."""
        dev = self._device()
        buf = torch.cat([self._flag(t.dtype, t.device), t.reshape(-1)]).to(dev)
        parts = [torch.empty_like(buf) for _ in range(self.size)]
        dist.all_gather(parts, buf, group=self.group)
        self.scalar_calls += 1
        self._raise_if(float(sum(float(p[0]) for p in parts)))
        out = parts[0][1:].clone()
        for p in parts[1:]:
            out += p[1:]
        return out.to(t.device).reshape(t.shape)

    def sum_block(self, t: Tensor) -> Tensor:
        """``Σ_ranks t`` for a ``(p, k)`` block: one all-reduce (the error flag appended)."""
        buf = torch.cat([t.reshape(-1), self._flag(t.dtype, t.device)])
        dist.all_reduce(buf, group=self.group)
        self.block_calls += 1
        self.block_bytes += buf.numel() * buf.element_size()
        self._raise_if(float(buf[-1]))
        return buf[:-1].reshape(t.shape)

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        """``t`` of rank ``src`` on every rank (a copy; ``t`` is not modified)."""
        buf = torch.cat([t.reshape(-1), self._flag(t.dtype, t.device)])
        dist.broadcast(
            buf, src=dist.get_global_rank(self.group, src) if self.group else src, group=self.group
        )
        self._raise_if(float(buf[-1]))
        return buf[:-1].reshape(t.shape).clone()

    def shard_rows(self, n_local: int) -> tuple[slice, int]:
        """This rank's rows ``slice(start, start + n_local)`` of the concatenation of every
        rank's ``n_local`` rows in rank order, and the global row count."""
        sizes = [int(s) for s in self.gather_objects(int(n_local))]
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank]), sum(sizes)

    def sharding(self, rows: slice) -> Sharding:
        """The :class:`~ntkscrub.solvers.lanczos.Sharding` that row-sharded Lanczos/SLQ take."""
        return Sharding(rows=rows, allreduce=self.sum_scalars)

    def replicated(self, n: int) -> Sharding:
        """The :class:`~ntkscrub.solvers.lanczos.Sharding` of an ``n``-row operator held whole
        by every rank (the bounds' p×p precision): every scalar is rank 0's (a broadcast), so
        the ranks take the same decisions even where their products rounded apart."""
        return Sharding(rows=slice(0, n), allreduce=self.broadcast)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (small Python objects: sizes, arguments), in rank order."""
        self.sync()
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


class ShardedJacobian(Operator):
    """``J`` with its rows sharded over the ranks: this rank's ``(c·N_k, p)`` rows.

    ``J V`` (``(p, k)`` → ``(c·N_k, k)``) is the local JVP pass; ``Jᵀ U`` (``(c·N_k, k)`` →
    ``(p, k)``) the local VJP pass summed over the ranks by one all-reduce of ``p·k`` numbers.
    ``local`` may be ``None`` for a rank without rows (then ``c`` and ``p`` are given).
    An exception in a local pass is caught and raised on every rank by the next collective.
    """

    def __init__(
        self,
        local: Jacobian | None,
        comm: Comm,
        *,
        c: int,
        p: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        rows = 0 if local is None else local.c * local.n
        super().__init__((rows, p), dtype, device)
        self.local, self.comm, self.c, self.p = local, comm, c, p
        self.n = rows // c

    def _mm(self, V: Tensor) -> Tensor:
        if self.local is None:
            return V.new_zeros(0, V.shape[1])
        try:
            return self.local._mm(V)
        except Exception as err:  # noqa: BLE001 - flagged at the next collective
            self.comm.fail("computing J v on its rows", err)
            return V.new_zeros(self.shape[0], V.shape[1])

    def _tmm(self, U: Tensor) -> Tensor:
        part = U.new_zeros(self.p, U.shape[1])
        if self.local is not None:
            try:
                part = self.local._tmm(U)
            except Exception as err:  # noqa: BLE001 - flagged by this very all-reduce
                self.comm.fail("computing Jᵀ u on its rows", err)
        return self.comm.sum_block(part)

    def to_dense(self) -> Tensor:  # type: ignore[override]
        """This rank's explicit rows ``(c·N_k, p)`` (tests)."""
        if self.local is None:
            return torch.zeros(0, self.p, dtype=self.dtype, device=self.device)
        return self.local.to_dense()


def sharded_ntk(J: ShardedJacobian, ridge: float = 0.0) -> Operator:
    """``Θ + λI = J Jᵀ + λI`` on this rank's rows ``(c·N_k, c·N_k)`` of every column block:
    ``Θ U`` = ``J_k (Σ_ranks J_rᵀ U_r) + λ U_k`` — one all-reduce of ``(p, k)`` per product."""
    return (J @ J.mT).add_diagonal(float(ridge))


def sharded_cg(
    A: Any,
    B: Tensor,
    comm: Comm,
    *,
    n_global: int,
    tol: float,
    max_iter: int | None = None,
    x0: Tensor | None = None,
    label: str = "A",
    precond: LowRankPreconditioner | None = None,
) -> tuple[Tensor, Any]:
    """PCG on row-sharded ``B`` ``(n_k,)``/``(n_k, k)``, through the engine's one
    :class:`~ntkscrub.operators.Inverse` (``precond``: ``None`` or a
    :class:`ShardedNystrom` of the same rows): inner products and
    norms summed over the ranks in float64 (:meth:`Comm.sum_scalars`), so every rank takes the
    same steps and stops at the same iteration. ``max_iter`` defaults to ``2·n_global``. Not
    strict: returns ``(X_k, info)``, the caller decides on ``info.all_converged`` (the same on
    every rank)."""
    config = SolverConfig(
        tol=tol,
        max_iter=2 * n_global if max_iter is None else max_iter,
        strict=False,
        precond="none",
        progress=False,
    )
    inv = Inverse(A, config, label=label, precond=precond, allreduce=comm.sum_scalars)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the caller raises or records it
        X = inv.solve(B, x0=x0)
    return X, inv.last_info


def _check_square_local(A: Any, comm: Comm) -> int:
    """This rank's row count of the row-sharded square ``A`` (checked on every rank at once, so
    a bad shard raises everywhere instead of leaving the others in a collective)."""
    n = -1
    with comm.guard("checking its rows of A"):
        shape = tuple(getattr(A, "shape", ()))
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"A: expected this rank's (n_k, n_k) rows, got shape {shape}")
        n = int(shape[0])
    return n


def sharded_lanczos(
    A: Any, v: Tensor, steps: int, comm: Comm, *, return_basis: bool = False
) -> LanczosResult:
    """:func:`~ntkscrub.solvers.lanczos` on a row-sharded symmetric ``A`` (e.g.
    :func:`sharded_ntk`) from this rank's rows ``v`` ``(n_k,)``/``(n_k, m)`` of the start
    vectors: every inner product is summed over the ranks (:meth:`Comm.sum_scalars`, four
    reductions per step), so ``alpha``, ``beta``, ``steps`` — the tridiagonals and their Ritz
    values — are the same bits on every rank and equal the one-process run on the concatenated
    start vectors up to rounding. ``basis`` (if asked) holds this rank's rows. Always fully
    reorthogonalised."""
    n_k = _check_square_local(A, comm)
    with comm.guard("checking its rows of the start vectors"):
        if not isinstance(v, Tensor) or v.dim() not in (1, 2) or v.shape[0] != n_k:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"v: expected this rank's {n_k} rows, got {got}")
    return lanczos(A, v, steps, reorthogonalize=True, return_basis=return_basis,
                   allreduce=comm.sum_scalars)  # fmt: skip


def sharded_slq_logdet(
    A: Any,
    comm: Comm,
    *,
    probes: int = 30,
    steps: int = 30,
    seed: int = 0,
    shift: float | None = None,
) -> LogdetEstimate:
    """SLQ ``log det A`` (:func:`~ntkscrub.solvers.slq_logdet`) of a row-sharded SPD ``A``
    whose local ``(n_k, n_k)`` rows this rank holds (e.g. ``sharded_ntk(J, λ)``; ``shift``
    defaults to ``A.ridge_shift()``, λ there, for the Gauss–Radau bracket).

    The probes are the one-process probes of ``seed`` for ``n = Σ n_k``, each rank drawing its
    rows (:func:`~ntkscrub.solvers.lanczos.rademacher` with ``rows``), so the estimate equals
    the one-process ``slq_logdet(A_full, n, probes=, steps=, seed=, shift=)`` up to the rounding
    of the reordered sums, and is the same bits on every rank. ``probes``, ``steps``, ``seed``
    and ``shift`` must be the same on every rank (checked: ValueError on every rank).
    """
    n_k = _check_square_local(A, comm)
    if shift is None and hasattr(A, "ridge_shift"):
        shift = A.ridge_shift()
    args = {"probes": probes, "steps": steps, "seed": seed, "shift": shift}
    everyone = comm.gather_objects(args)
    for name in args:
        if any(other[name] != args[name] for other in everyone):
            raise ValueError(f"{name}: differs between ranks ({[o[name] for o in everyone]})")
    rows, n = comm.shard_rows(n_k)
    return slq_logdet(
        A,
        n,
        probes=probes,
        steps=min(steps, n),
        seed=seed,
        shift=shift,
        dtype=A.dtype,
        device=A.device,
        shard=comm.sharding(rows),
    )


class ShardedNystrom(LowRankPreconditioner):
    """The randomized Nyström preconditioner (Frangella–Tropp–Udell 2023, Alg. 2.1) of a
    row-sharded ``A = K + μI`` ``(n, n)``: this rank holds rows ``rows`` of Û.

    Ω ``(n, ℓ)`` is drawn from ``seed`` on every rank exactly as
    :class:`~ntkscrub.solvers.NystromPreconditioner` draws it (so the factor is the one-process
    one up to rounding; every rank holds Ω, n·ℓ numbers, while it is built) and each rank keeps its
    rows. ``Y_k = A Ω_k`` is one block product (one all-reduce of ``p × ℓ``); the ``ℓ × ℓ`` core
    matrices ``Ωᵀ Y_ν`` and ``Bᵀ B`` are summed over the ranks, and the thin SVD of the sharded
    ``B = Y_ν C⁻ᵀ`` comes from the eigen-decomposition of ``Bᵀ B`` (Λ̂ = σ² − ν, Û_k = B_k V Σ⁻¹).
    :meth:`solve` sums ``Ûᵀ R`` (``r × m``) over the ranks: one more reduction per CG iteration.
    """

    def __init__(
        self,
        A: Any,
        comm: Comm,
        *,
        n_global: int,
        rows: slice,
        rank: int,
        shift: float,
        seed: int | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        t0 = time.perf_counter()
        f64 = torch.float64
        ell = min(rank, n_global)
        omega = torch.randn(n_global, ell, dtype=f64, generator=_seeded(seed))
        omega = torch.linalg.qr(omega).Q[rows].to(device=device, dtype=dtype)
        Y = A.matmul(omega).to(f64)  # (n_k, ℓ): the single block product
        omega = omega.to(f64)
        if shift:
            Y = Y - shift * omega  # K Ω = A Ω − μ Ω
        nu = max(torch.finfo(dtype).eps * float(comm.sum_scalars((Y * Y).sum().reshape(1))) ** 0.5,
                 torch.finfo(f64).tiny)  # fmt: skip
        for _ in range(12):
            Y_nu = Y + nu * omega
            C = comm.sum_scalars((omega.T @ Y_nu).reshape(-1)).reshape(ell, ell)
            L, info = torch.linalg.cholesky_ex(0.5 * (C + C.T))
            if int(info) == 0:
                break
            nu *= 10.0
        else:
            raise ValueError("A: Ωᵀ A Ω is not positive definite even after shifting")
        B = torch.linalg.solve_triangular(L, Y_nu.T, upper=False).T  # (n_k, ℓ)
        G = comm.sum_scalars((B.T @ B).reshape(-1)).reshape(ell, ell)
        s2, V = torch.linalg.eigh(0.5 * (G + G.T))  # ascending σ²
        keep = s2 > s2.max() * 1e-14
        U = B @ (V[:, keep] / s2[keep].sqrt())
        super().__init__(U, (s2[keep] - nu).clamp_min(0.0), shift)
        self.comm, self.nu, self.n_global = comm, nu, n_global
        self.matvecs, self.block_matvecs = ell, 1
        self.seconds = time.perf_counter() - t0

    def solve(self, R: Tensor) -> Tensor:
        """``P⁻¹ R`` on this rank's rows (``R`` ``(n_k,)`` or ``(n_k, m)``)."""
        R2 = R.unsqueeze(1) if R.dim() == 1 else R
        U, dm1 = self._factors(R.dtype, R.device)
        UtR = self.comm.sum_scalars((U.T @ R2).reshape(-1)).reshape(U.shape[1], R2.shape[1])
        out = R2 + U @ (dm1.unsqueeze(1) * UtR)
        return out.squeeze(1) if R.dim() == 1 else out

    __call__ = solve

    def restrict(self, rows: slice | Tensor, shift: float) -> LowRankPreconditioner:
        """Not sharded yet (the restricted factor needs a distributed re-orthonormalisation)."""
        raise NotImplementedError("restrict: a row-sharded Nyström factor cannot be restricted yet")


def _seeded(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(int(seed))


# --------------------------------------------------------------------------- scrub
def _shard_size(data: Any) -> int | None:
    """Samples in a shard when cheaply known (an (X, Y) pair, a tensor, a Dataset, a loader)."""
    if isinstance(data, Tensor):
        return int(data.shape[0])
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor):
        return int(data[0].shape[0])
    inner = getattr(data, "dataset", data)
    try:
        return len(inner)
    except TypeError:
        return None


def _check_same_everywhere(comm: Comm, values: dict[str, Any], w_d: Tensor, theta0: Tensor) -> None:
    """The scalar arguments and the weights must be the same on every rank (else the ranks would
    compute different things): a clear ValueError on every rank naming what differs."""
    everyone = comm.gather_objects(values)
    for name in values:
        diff = [r for r, other in enumerate(everyone) if other[name] != everyone[0][name]]
        if diff:
            raise ValueError(
                f"{name}: differs between ranks (rank 0: {everyone[0][name]!r}; "
                f"ranks {diff} differ)"
            )
    for name, w in (("model", w_d), ("init", theta0)):
        same = torch.equal(comm.broadcast(w), w)
        bad = comm.sum_scalars(torch.tensor([0.0 if same else 1.0], dtype=torch.float64))
        if float(bad[0]) > 0:
            raise ValueError(f"{name}: the parameters differ between ranks (they must be equal)")


def sharded_scrub(  # noqa: C901, PLR0915 - listed in pyproject.toml
    model: nn.Module,
    retain: Any,
    forget: Any,
    *,
    init: nn.Module | Mapping[str, Tensor],
    process_group: Any = None,
    linearize_at: str = "init",
    loss: str = "mse",
    ridge: float = 0.0,
    rescale: str | None = None,
    weight_decay: float | None = None,
    params: Any = None,
    solver_config: Any = None,
    products: Any = None,
    noise: float = 0.0,
    form: str = "solves",
) -> Any:
    """:func:`ntkscrub.scrub` with ``retain``/``forget`` this rank's shards (Prop. 2, eq. 10).

    Every rank passes the same model, ``init`` and keywords and its own shards (uneven sizes
    allowed; a forget shard may be empty; a retain shard may not). Returns a
    :class:`~ntkscrub.scrub.ScrubResult` whose ``shift`` ``(p,)`` and ``model`` are identical on
    every rank (the shift is broadcast from rank 0) and equal — to the solver tolerance — the
    one-process scrub of the shards concatenated in rank order. ``info["distributed"]`` records
    the world size, the shard sizes and the all-reduce volume.

    Data-parallel here: ``form="solves"``, ``solver="cg"`` (PCG with a row-sharded Nyström
    factor per system at ``SolverConfig.rank_for(c·N)``; ``share_precond`` is not applied; the
    iteration cap ``max_iter`` or 2·c·N; no time budget: the ranks' clocks differ), ``loss``,
    ``linearize_at``, ``ridge``/``weight_decay`` (N counted over all ranks), ``rescale``,
    ``params``. Raises ValueError for ``form="block"``, ``solver="dense"`` and ``noise > 0``
    (not data-parallel yet).
    """
    from ntkscrub.config import ProductConfig, SolverConfig
    from ntkscrub.scrub import (
        ScrubResult,
        _spaces,
        _targets,
        check_rank,
        trapezium_scale,
    )
    from ntkscrub.shifts import cancellation_amplification, cancellation_floor

    t_start = time.perf_counter()
    cfg = solver_config if solver_config is not None else SolverConfig()
    products = products if products is not None else ProductConfig()
    if form != "solves":
        raise ValueError("form: only 'solves' runs data-parallel (the block form is not sharded)")
    if cfg.method != "cg":
        raise ValueError("solver: only 'cg' runs data-parallel ('dense' needs all rows)")
    if noise > 0:
        raise ValueError("noise: the Fisher noise is not data-parallel yet; scrub with noise=0")
    comm = Comm(process_group)
    with comm.guard("reading the model and init"):
        space_w, space, w_d, theta0 = _spaces(model, init, params, linearize_at)
    _check_same_everywhere(
        comm,
        {
            "linearize_at": linearize_at,
            "loss": loss,
            "ridge": ridge,
            "rescale": rescale,
            "weight_decay": weight_decay,
            "solver_config": cfg.to_dict(),
            "p": space_w.p,
        },
        w_d,
        theta0,
    )
    jkw = products.jacobian_options()
    J_r = J_f = None
    with comm.guard("building the Jacobians and residuals of its shards"):
        J_r = Jacobian(space, retain, name="retain", **jkw)
        if _shard_size(forget) != 0:
            J_f = Jacobian(space, forget, at=J_r.theta, name="forget", **jkw)
        e_r = _targets(J_r, loss)
        e_f = _targets(J_f, loss) if J_f is not None else e_r.new_zeros(0)
    sizes = comm.gather_objects((J_r.n, 0 if J_f is None else J_f.n))
    c, p, dt, dev = J_r.c, J_r.p, space.dtype, space.device
    n_r, n_f = sum(s[0] for s in sizes), sum(s[1] for s in sizes)
    ridge_r = ridge_d = float(ridge)
    if weight_decay is not None:
        ridge_r, ridge_d = n_r * weight_decay, (n_r + n_f) * weight_decay
    check_rank(c * (n_r + n_f), p, ridge_d, "Θ_DD")  # global sizes: every rank raises alike
    tol = cfg.tol_for(dt)

    J_d_loc = J_r if J_f is None else StackedJacobian(J_r, J_f)
    shard = {"c": c, "p": p, "dtype": dt, "device": dev}
    Jd, Jr = ShardedJacobian(J_d_loc, comm, **shard), ShardedJacobian(J_r, comm, **shard)
    cr = e_r.shape[0]
    records = []

    def nystrom(A: Any, ridge: float, per_rank: list[int]) -> dict[str, Any]:
        n_glob, start = sum(per_rank), sum(per_rank[: comm.rank])
        rank = cfg.rank_for(n_glob)
        if rank == "auto":  # the adaptive rank doubling is not row-sharded yet: the fixed default
            rank = 0 if n_glob < 2000 else min(50, n_glob)
        if rank == 0:
            return {"precond": None, "record": {"precond": "none"}}
        M = ShardedNystrom(A, comm, n_global=n_glob, rows=slice(start, start + per_rank[comm.rank]),
                           rank=rank, shift=ridge, seed=cfg.seed, dtype=dt, device=dev)  # fmt: skip
        rec = {"precond": "nystrom (row-sharded)", "precond_rank": M.rank,
               "precond_matvecs": M.matvecs, "precond_seconds": M.seconds}  # fmt: skip
        return {"precond": M, "record": rec}

    def solve(
        A: Any, B: Tensor, n_glob: int, label: str, x0: Tensor | None, pc: dict, tol: float = tol
    ) -> Tensor:
        # The engine's one inverse operator, with CG's inner products summed over the ranks.
        local = cfg.replace(
            max_iter=2 * n_glob if cfg.max_iter is None else cfg.max_iter,
            precond="none" if pc["precond"] is None else cfg.precond,
            max_seconds=None,
            tol=tol,
        )
        inv = Inverse(A, local, label=label, precond=pc["precond"], allreduce=comm.sum_scalars)
        try:
            X = inv.solve(B, x0=x0)
        finally:
            for rec in inv.records:
                rec.update({"solver": "cg (data-parallel)", "size": n_glob, **pc["record"]})
                records.append(rec)
        return X

    # Each system gets its own row-sharded Nyström factor when the configuration asks for one
    # (restricting Θ_DD's factor to the retain rows, as one process does, is not sharded yet).
    rows_d, rows_r = [c * (a + b) for a, b in sizes], [c * a for a, _ in sizes]
    A_d, A_r = sharded_ntk(Jd, ridge_d), sharded_ntk(Jr, ridge_r)
    pc_d = nystrom(A_d, ridge_d, rows_d)
    x_d = solve(A_d, torch.cat([e_r, e_f]), sum(rows_d), "Θ_DD", None, pc_d)
    pc_r = nystrom(A_r, ridge_r, rows_r)
    # The retain model as a change of the D solution, as scrub.retain_change (why: there):
    # (Θ_rr + λ_r I) y = Θ_rf x_f + (λ_D − λ_r) x_D[r], Δ = J_rᵀ y − J_fᵀ x_f, y once more to
    # tol/(ρ·‖b‖/‖e_r‖) when Δ cancels (ρ = ‖J_fᵀ x_f‖/‖Δ‖: all-reduced, the same everywhere).
    g = Jd._tmm(torch.cat([torch.zeros_like(e_r), x_d[cr:]]).unsqueeze(1)).squeeze(1)
    b = Jr._mm(g.unsqueeze(1)).squeeze(1) + (ridge_d - ridge_r) * x_d[:cr]
    y = solve(A_r, b, sum(rows_r), "Θ_rr", None, pc_r)
    delta = Jr._tmm(y.unsqueeze(1)).squeeze(1) - g
    b2, e2 = comm.sum_scalars(torch.stack([b.pow(2).sum(), e_r.pow(2).sum()])).tolist()
    rho, big, amp = cancellation_amplification(
        float(g.norm()), float(delta.norm()), b2**0.5, e2**0.5
    )
    if amp > 1.0:
        tight = max(tol / amp, cancellation_floor(dt))
        try:
            reused = {**pc_r, "record": {**pc_r["record"], "precond_matvecs": 0}}
            if pc_r["precond"] is not None:
                reused["record"].update(
                    precond="nystrom (row-sharded, reused)", precond_seconds=0.0
                )
            y = solve(A_r, b, sum(rows_r), "Θ_rr (tol / cancellation)", y, reused, tight)
        except SolveNotConverged as err:  # the dtype's floor: keep what it reached
            y = err.partial
        records[-1]["converged"] = max(records[-1].get("residuals") or [0.0]) <= tol
        delta = Jr._tmm(y.unsqueeze(1)).squeeze(1) - g
    records[-1].update(cancellation=rho, rhs_ratio=big)
    w_lin_r = Jr._tmm((x_d[:cr] + y).unsqueeze(1)).squeeze(1)
    # Bit-identical on every rank whatever the backend's all-reduce algorithm: rank 0's copy.
    delta, w_lin_r = comm.broadcast(delta), comm.broadcast(w_lin_r)
    scale, cos = 1.0, None
    if rescale == "trapezium":
        scale, cos = trapezium_scale(delta, w_d, theta0, w_lin_r)
    shift = scale * delta
    out = copy.deepcopy(model)
    space_w.load_into(out, w_d + shift)
    out.eval()
    info = {
        "linearize_at": linearize_at,
        "loss": loss,
        "solver": "cg",
        "form": form,
        "ridge_r": ridge_r,
        "ridge_d": ridge_d,
        "weight_decay": weight_decay,
        "tol": tol,
        "converged": all(r["converged"] for r in records),
        "n_retain": n_r,
        "n_forget": n_f,
        "num_classes": c,
        "p": p,
        "dtype": str(dt),
        "device": str(dev),
        # + the bare passes: J_fᵀx_f, J_r g, J_rᵀy (twice after a re-solve), J_rᵀx_r
        "matvecs": sum(r["matvecs"] + r.get("precond_matvecs", 0) for r in records)
        + (5 if amp > 1.0 else 4),
        "solves": records,
        "rescale": rescale,
        "rescale_factor": scale,
        "rescale_cos": cos,
        "shift_norm": float(shift.norm()),
        "delta_norm": float(delta.norm()),
        "noise": {"alpha": 0.0},
        "config": {"solver": cfg.to_dict(), "products": products.to_dict()},
        "seconds": time.perf_counter() - t_start,
        "distributed": {
            "world_size": comm.size,
            "rank": comm.rank,
            "shards": sizes,
            "allreduce_calls": comm.block_calls,
            "allreduce_bytes": comm.block_bytes,
            "allreduce_bytes_per_product": (p + 1) * torch.finfo(dt).bits // 8,
            "scalar_reductions": comm.scalar_calls,
            "timeout_note": "collective timeout: the process group's (init() sets 10 min)",
        },
    }
    return ScrubResult(
        model=out, shift=shift.detach(), info=info, delta=delta.detach(), scale=scale
    )
