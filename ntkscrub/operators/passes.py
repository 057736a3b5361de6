"""Memory-bounded passes: how many vectors one ``vmap``-ed JVP or VJP pass may carry.

A pass of ``k`` vectors over a batch of ``b`` samples holds the primal activations once and
``k`` tangent (JVP) or cotangent (VJP) copies of them, plus ``k`` parameter-sized tangents or
gradients. At a fixed batch its live tensor memory is close to linear in k,
``m(k) = base + k·per_vector``.

:func:`plan_passes` measures ``m(1)`` and ``m(2)`` with :class:`ntkscrub.memory.LiveBytes` on the
first batch, measures a training step (forward + backward of a loss w.r.t. the linearised
parameters) the same way, and picks the largest ``k`` with ``m(k) ≤ budget``, default budget
``2 ×`` the training step (issue 14: "every pass ≤ 2× a training step's memory"). ``k`` is never
below 1: when even one vector exceeds the budget the plan says so (``over_budget``) and the
batch size is what must shrink. Cost: two JVP and two VJP passes and one training step on one
batch, once per parameter space and batch shape.

Why measure, and at the real batch: a vmapped pass's memory depends on the batching rules and
kernels torch picks. Measured on ResNet-18 (CPU): a VJP pass costs 89 MB per extra vector at
every batch from 16 to 128 and 162 MB at 256, so extrapolating from small batches under-
estimated a 3-vector pass by 22 %; and primals that were views of one flat θ once cost 2.8 GB
per vector instead of 46 MB (see :class:`~ntkscrub.operators.Jacobian`). Beyond ``k = 2`` the
linear model errs high (a 3-vector ResNet-18 VJP pass: 577 MB predicted, 544 MB measured).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp

from ntkscrub._progress import logger
from ntkscrub.memory import peak_bytes

__all__ = ["PassPlan", "plan_passes"]


@dataclass(frozen=True)
class PassPlan:
    """Vectors per pass and the memory model behind them (bytes; batch = ``batch``).

    Attributes:
        jvp_vectors / vjp_vectors: the most vectors per ``vmap``-ed JVP / VJP pass whose
            modelled memory fits the budget.
        jvp_gain / vjp_gain: measured throughput of a 2-vector pass over a 1-vector pass
            (``2·t₁ / t₂``; > 1: vectorising pays). Reported, not used: timings vary from run
            to run, and the choice of k changes the rounding of multi-vector products (the
            Nyström sketch), so a seeded scrub would not repeat itself.
        budget: the bytes a pass may hold; ``train_step``: a measured training step's peak.
        jvp_base, jvp_per_vector, vjp_base, vjp_per_vector: the linear model ``base + k·per``.
        over_budget: ``True`` when one vector alone exceeds the budget.
        seconds: what measuring the plan cost.
    """

    batch: int
    budget: int
    train_step: int
    jvp_vectors: int
    vjp_vectors: int
    jvp_base: int
    jvp_per_vector: int
    vjp_base: int
    vjp_per_vector: int
    jvp_gain: float
    vjp_gain: float
    over_budget: bool
    seconds: float

    def predicted(self, kind: str, k: int) -> int:
        """The modelled peak bytes of a ``kind`` (``"jvp"``/``"vjp"``) pass of ``k`` vectors."""
        if kind == "jvp":
            return self.jvp_base + k * self.jvp_per_vector
        return self.vjp_base + k * self.vjp_per_vector

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record."""
        return dataclasses.asdict(self)


# vmap over k vectors pays on a GPU (0.83–1.41 epochs per vector for 8 vectors against 2.1 for
# one, H200) but not always on a CPU: on ResNet-18 (2 cores) a 2-vector VJP pass took 12.3 s
# against 4.4 s for one vector (its JVP pass 4.2 s against 5.5 s). Below this measured gain the
# plan suggests vector_chunk=1 (a hint only; see PassPlan.jvp_gain).
_HINT_GAIN = 0.9
# A one-vector pass over the *default* budget (2× a training step) is worth a warning only when
# it needs real memory: for a model of a few thousand parameters the measured bytes (a few kB
# against a budget of a few kB) are allocator noise, and the warning read "needs 0 MB, over the
# 0 MB budget" (seen in the float64 test models). A budget the caller set always warns; the plan
# records ``over_budget`` either way.
_WARN_BYTES = 16 * 2**20


def _timed(fn: Any, device: torch.device) -> tuple[int, float]:
    """``(peak live bytes, seconds)`` of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    peak = peak_bytes(fn)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return peak, time.perf_counter() - t0


def _train_step(f: Any, params: dict[str, Tensor], x: Tensor) -> int:
    def step() -> Any:
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
        with torch.enable_grad():
            loss = torch.logsumexp(f(leaves, x), dim=1).sum()
            return torch.autograd.grad(loss, list(leaves.values()))

    return peak_bytes(step)


def training_step_bytes(space: Any, x: Tensor) -> int:
    """Peak bytes of a training step (forward and backward of a loss w.r.t. the parameters of
    ``space``, a :class:`~ntkscrub.params.ParameterSpace`) on the batch ``x``: the yardstick of a
    pass's memory budget. With a cached frozen prefix (:mod:`ntkscrub.prefix`) the products run
    a suffix whose own training step is a fraction of the network's, so the budget is taken
    from the whole network's (a first run measured a 25 MB budget for a 31 MB pass there, and
    warned for no reason)."""
    params = {n: t.detach() for n, t in space.unflatten(space.point()).items()}
    return _train_step(space.functional(), params, x)


def _jvp_pass(J: Any, x: Tensor, k: int) -> tuple[int, float]:
    g = J._fn(x)
    V = torch.ones(J.p, k, dtype=J.dtype, device=J.device)

    def run() -> Tensor:
        with J._ctx():
            return J._jvp_block(g, V)

    return _timed(run, J.device)


def _vjp_pass(J: Any, x: Tensor, k: int) -> tuple[int, float]:
    U = torch.ones(k, x.shape[0], J.c, dtype=J.dtype, device=J.device)

    def run() -> Tensor:
        with J._ctx():
            out, pullback = vjp(J._fn(x), J._params)
            return J._vjp_block(pullback, U.to(out.dtype))

    return _timed(run, J.device)


def _choose(one: tuple[int, float], two: tuple[int, float], limit: int) -> tuple[Any, ...]:
    """``(base, per_vector, vectors, gain)`` from the measured 1- and 2-vector passes."""
    per = max(two[0] - one[0], 1)
    base = max(one[0] - per, 0)
    gain = 2 * one[1] / max(two[1], 1e-9)
    return base, per, max(1, math.floor((limit - base) / per)), gain


def plan_passes(J: Any, budget: int | None = None) -> PassPlan:
    """Measure and choose the vectors per pass for Jacobian ``J`` (its first batch's size).

    Args:
        J: a :class:`~ntkscrub.operators.Jacobian`.
        budget: bytes one pass may hold; ``None``: twice a measured training step.
    """
    t0 = time.perf_counter()
    x, _ = J.data.first()
    b = x.shape[0]
    train = _train_step(J._f, J._params, x)
    limit = 2 * train if budget is None else int(budget)
    jb, jp, kj, jgain = _choose(_jvp_pass(J, x, 1), _jvp_pass(J, x, 2), limit)
    vb, vp, kv, vgain = _choose(_vjp_pass(J, x, 1), _vjp_pass(J, x, 2), limit)
    over = jb + jp > limit or vb + vp > limit
    plan = PassPlan(
        b,
        limit,
        train,
        kj,
        kv,
        jb,
        jp,
        vb,
        vp,
        jgain,
        vgain,
        over,
        time.perf_counter() - t0,
    )
    logger.info(
        "%s: %d JVP / %d VJP vectors per pass (batch %d, budget %.0f MB, training step %.0f MB; "
        "2-vector speed-up %.2f / %.2f; measured in %.1f s)",
        J.name,
        kj,
        kv,
        b,
        limit / 1e6,
        train / 1e6,
        jgain,
        vgain,
        plan.seconds,
    )
    if over and (budget is not None or max(jb + jp, vb + vp) > _WARN_BYTES):
        logger.warning(
            "%s: one vector per pass needs %.0f MB, over the %.0f MB budget; lower the batch size",
            J.name,
            max(jb + jp, vb + vp) / 1e6,
            limit / 1e6,
        )
    if min(jgain, vgain) < _HINT_GAIN and max(kj, kv) > 1:
        logger.info(
            "%s: a 2-vector pass was slower per vector than a 1-vector pass here (JVP %.2f, "
            "VJP %.2f); ProductConfig(vector_chunk=1) may be faster",
            J.name,
            jgain,
            vgain,
        )
    return plan
