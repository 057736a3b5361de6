"""The Jacobian J_S of the logits over a data set S, as a streamed, matrix-free operator.

``J_S = ∂f_θ(x)/∂θ`` stacked over the samples of S has shape ``(c·|S|, p)``, row ``n·c + k`` for
sample ``n`` and logit ``k`` (the paper's J_r, J_f; eq. 9–10). It is a rectangular
:class:`~ntkscrub.operators.base.Operator` (a ``linear_operator.LinearOperator``): ``J @ V``,
``J.mT @ U`` and compositions such as ``J_a @ J_b.mT`` (the NTK). It is never formed: ``J v`` is a
forward-mode product (JVP) per mini-batch and ``Jᵀ u`` a reverse-mode product (VJP) per
mini-batch, accumulated — so memory is that of one batch, whatever |S|. Several vectors are applied
in one pass by ``vmap`` over the tangents/cotangents, which shares the primal computation.

:meth:`Jacobian.to_dense` is the exact twin (explicit per-sample Jacobians via
``torch.func.jacrev``, chunked, cached) that the tests trust and that ``solver="dense"`` uses;
each of its rows is checked against the batched products and recomputed from the batched pass
where a ReLU kink sent the per-sample pass down another branch (:class:`_BatchedRows`).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.func import jacrev, jvp, vjp, vmap

from ntkscrub._progress import logger, warn
from ntkscrub._validation import check_logits, check_vector_chunk
from ntkscrub.batches import Batches, as_batches, check_model_accepts, subset
from ntkscrub.operators.base import Operator, accumulated_matmul, check_vector
from ntkscrub.operators.forward_cache import ForwardCache
from ntkscrub.operators.passes import PassPlan, plan_passes
from ntkscrub.params import ParameterSpace

__all__ = ["Jacobian", "StackedJacobian", "check_vector"]

# Random tangents along which the explicit twin's rows are checked (see _BatchedRows).
_CHECK_TANGENTS = 2


def _check_rtol(dtype: torch.dtype) -> float:
    """How far (relative to its norm) an explicit row may be from the batched JVP along a random
    tangent before it counts as another branch. Measured on the quick preset's All-CNN: rounding
    reaches 2.4e-6 in float32 (20 eps) and 8e-14 in float64 (700 eps); a flipped ReLU unit
    moved rows by 1.5e-4–3.6e-3 in either. The bound sits 4–100× above the rounding."""
    eps = torch.finfo(dtype).eps
    return max(100 * eps, 1e-11 if eps < 1e-10 else 1e-5)


# Rows recomputed per vmapped batched backward (memory: that many cotangent copies of a batch).
_RECOMPUTE_CHUNK = 8

# Pass plans per parameter space (weakly keyed: a plan lives as long as its space).
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Jacobian(Operator):
    """``J_S`` at a point θ: a ``(c·|S|, p)`` operator applied batch by batch.

    Args:
        space: the :class:`~ntkscrub.params.ParameterSpace` (model + linearised parameters).
        data: S — a Dataset, a non-shuffling DataLoader, an ``(X, Y)`` pair or ``X`` alone.
            Inputs are moved to the parameters' device and cast to their dtype batch by batch.
        at: the linearisation point θ (a module, a state_dict or a flat ``(p,)`` vector);
            default: the model's current parameters. Parameters that are not linearised and all
            buffers always come from the space's model.
        batch_size: samples per JVP/VJP batch (memory ∝ batch_size·(activations) · k vectors).
        name: argument name used in error messages.
        autocast: optional ``torch.autocast`` dtype for the products; ``None`` (default) computes
            in the parameters' dtype. Experimental: measured bf16 products have a normwise error
            of 2–3 %, too coarse for a CG solve to 1e-4, and forward-mode AD through an eval-mode
            BatchNorm under autocast fails in torch (benchmarks/README.md). TF32 (a global torch
            flag) needs no option here.
        vector_chunk: the most vectors pushed through one ``vmap`` per batch (memory grows with
            batch_size · vector_chunk); ``"auto"`` (default): as many as fit ``memory_budget``,
            measured once per batch shape (:func:`~ntkscrub.operators.passes.plan_passes`);
            ``None``: all at once.
        memory_budget: bytes one pass may hold when ``vector_chunk="auto"``; ``None``: twice a
            measured training step at the same batch size.
        cache_bytes: bytes of forward passes all Jacobians of the process may keep so that later
            products skip the primal computation (:mod:`~ntkscrub.operators.forward_cache`);
            ``None`` (default): a quarter of the device's available memory; 0: never.

    Shapes: ``J @ V``: ``(p,)``→``(c·N,)`` or ``(p, k)``→``(c·N, k)``; ``J.mT @ U`` the reverse
    (``matvec`` / ``rmatvec`` are the same products, with errors naming ``V`` / ``U``).
    """

    def __init__(
        self,
        space: ParameterSpace,
        data: Any,
        *,
        at: Any = None,
        batch_size: int = 256,
        name: str = "data",
        autocast: torch.dtype | None = None,
        vector_chunk: int | str | None = "auto",
        memory_budget: int | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        if not isinstance(space, ParameterSpace):
            raise TypeError(f"space: expected a ParameterSpace, got {type(space).__name__}")
        self.space = space
        self.theta = space.point(at)
        if not bool(torch.isfinite(self.theta).all()):
            raise ValueError("at: the linearisation point contains NaN or infinite values")
        self.data: Batches = as_batches(
            data, batch_size=batch_size, name=name, device=space.device, dtype=space.dtype
        )
        self.name = name
        self.autocast = autocast
        check_vector_chunk(vector_chunk, memory_budget)
        self.vector_chunk = vector_chunk
        self.memory_budget = memory_budget
        if cache_bytes is not None and (
            isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0
        ):
            raise ValueError(f"cache_bytes: expected an int ≥ 0 or None, got {cache_bytes!r}")
        self.cache = ForwardCache(cache_bytes, space.device)
        # Independent tensors, not views of the flat θ: under vmap, forward-mode AD through a
        # primal that is a view materialises a tangent for the whole base storage once per
        # parameter tensor — measured on torchvision ResNet-18 (62 tensors, p = 11.2 M): 2.8 GB
        # per vector instead of 46 MB at batch 64, and the N = 500 scrub was OOM-killed. One
        # extra copy of θ (4·p bytes) buys that back.
        self._params = {n: t.clone() for n, t in space.unflatten(self.theta).items()}
        self._f = space.functional()
        x0, _ = self.data.first()
        try:
            with torch.no_grad():
                out = self._f(self._params, x0[:1])
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            # A wrong feature dimension or layout would otherwise surface as torch's bare
            # "mat1 and mat2 shapes cannot be multiplied", naming neither the set nor the fix.
            check_model_accepts(space.model, **{name: self.data})
            raise ValueError(f"{name}: the model cannot be applied to its inputs: {err}") from err
        if check_logits(out).dim() != 2:
            raise ValueError(f"model: expected logits of shape (b, c), got {tuple(out.shape)}")
        self.c: int = out.shape[1]
        self.n: int = len(self.data)
        self.p: int = space.p
        self.data.num_classes = self.c  # labels, when read, are checked against c
        self._dense_cache: Tensor | None = None
        super().__init__((self.c * self.n, self.p), space.dtype, space.device)

    def _ctx(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _fn(self, x: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
        f = self._f

        def g(params: dict[str, Tensor]) -> Tensor:
            return f(params, x)

        return g

    def _row_batches(self) -> Iterator[tuple[int, int, Tensor]]:
        """Yield ``(row_start, row_stop, x)`` per mini-batch (rows of J, i.e. ×c)."""
        start = 0
        for x, _ in self.data:
            b = x.shape[0]
            yield start * self.c, (start + b) * self.c, x
            start += b

    # ------------------------------------------------------------------ products
    def pass_plan(self, measure: bool = True) -> PassPlan | None:
        """The memory plan of this Jacobian's passes (``None`` unless ``vector_chunk="auto"``).

        Measured on first use (``measure=False``: only return one already measured) and shared
        by every Jacobian of the same parameter space, batch shape, dtype and budget.
        """
        if self.vector_chunk != "auto":
            return None
        x, _ = self.data.first()
        key = (tuple(x.shape), self.dtype, self.autocast, self.memory_budget)
        plans = _PLANS.setdefault(self.space, {})
        if key not in plans and measure:
            try:
                plans[key] = plan_passes(self, self.memory_budget)
            except (RuntimeError, NotImplementedError, TypeError) as err:
                # The tracker relies on dispatch modes inside torch.func transforms (and the
                # 2-vector probe may itself run out of memory): if either fails, one vector per
                # pass is the safe choice, said out loud.
                warn(
                    f"{self.name}: could not measure the memory of a multi-vector pass ({err}); "
                    f"using one vector per pass (ProductConfig.vector_chunk sets it)",
                    RuntimeWarning,
                )
                plans[key] = None
        return plans.get(key)

    def _column_chunks(self, k: int, kind: str) -> list[slice]:
        if self.vector_chunk == "auto":
            plan = self.pass_plan()
            step = 1 if plan is None else plan.jvp_vectors if kind == "jvp" else plan.vjp_vectors
        else:
            step = self.vector_chunk or k
        return [slice(i, min(i + step, k)) for i in range(0, k, step)]

    def matvec(self, V: Tensor) -> Tensor:
        """``J V``: ``(p,)``→``(c·N,)`` or ``(p, k)``→``(c·N, k)`` (errors name ``V``)."""
        check_vector(V, self.p, self.dtype, self.device, "V")
        return self._matmul(V)

    def rmatvec(self, U: Tensor) -> Tensor:
        """``Jᵀ U``: ``(c·N,)``→``(p,)`` or ``(c·N, k)``→``(p, k)`` (errors name ``U``)."""
        check_vector(U, self.shape[0], self.dtype, self.device, "U")
        return self._tmm(U.unsqueeze(1)).squeeze(1) if U.dim() == 1 else self._tmm(U)

    def _mm(self, V: Tensor) -> Tensor:
        """``J V`` for ``V`` ``(p, k)`` — one JVP pass over S.

        The k tangents of a batch go through one ``vmap`` (sharing the primal computation), at
        most ``vector_chunk`` at a time so that memory stays ∝ batch_size · vector_chunk.
        """
        if V.shape[1] == 1:
            return self._jvp(V[:, 0]).unsqueeze(1)
        return self._jvp(V)

    def _jvp(self, V: Tensor) -> Tensor:
        single = V.dim() == 1
        V = V if single else V.contiguous()
        out = torch.empty(
            self.c * self.n, *([] if single else [V.shape[1]]), dtype=self.dtype, device=self.device
        )
        chunks = [] if single else self._column_chunks(V.shape[1], "jvp")
        T1 = self.space.unflatten(V) if single else None
        for i, (r0, r1, x) in enumerate(self._row_batches()):
            g = self._fn(x)
            with self._ctx():
                if single:
                    jv = self._jvp_kept(i, g, T1, 1)
                    out[r0:r1] = jv.reshape(-1).to(self.dtype)  # (b, c) → rows
                    continue
                # The cache is asked per chunk: a wide pass's later chunks use the tangent map
                # its first chunks' vectors made worth tracing.
                for sl in chunks:
                    jv = self._jvp_kept(i, g, V[:, sl], sl.stop - sl.start)  # (k, b, c)
                    out[r0:r1, sl] = jv.reshape(jv.shape[0], -1).T.to(self.dtype)
        return out

    def _jvp_kept(self, i: int, g: Callable, V: Any, k: int) -> Tensor:
        """Batch ``i``'s JVPs along ``V`` (``k`` vectors: one unflattened tangent when ``V`` is
        a dict, else ``(p, k)``), through the kept tangent map when the cache has or builds it;
        a streamed pass's time per vector is noted for the cache's tracing rule."""
        cached = self._cacheable()
        lin = self.cache.linearized(i, g, self._params, k) if cached else None
        t0 = time.perf_counter()
        jv = self._jvp_one(g, V, lin) if isinstance(V, dict) else self._jvp_block(g, V, lin)
        if cached and lin is None:
            self.cache.note_jvp(i, (time.perf_counter() - t0) / k)
        return jv

    def _jvp_block(self, g: Callable, V: Tensor, lin: Callable | None = None) -> Tensor:
        """``(k, b, c)``: the JVPs of batch function ``g`` along the k columns of ``V`` ``(p, k)``
        in one ``vmap`` (unflattened here, per batch and chunk — a copy of k·p — not all of V
        up front); through the kept tangent map ``lin`` when given.
        :func:`~ntkscrub.operators.passes.plan_passes` measures this same call."""
        if V.shape[1] == 1:  # vmap over a single vector buys nothing
            return self._jvp_one(g, self.space.unflatten(V[:, 0]), lin).unsqueeze(0)
        T = self.space.unflatten(V)
        if lin is not None:
            return vmap(lin)(T)
        return vmap(lambda t: jvp(g, (self._params,), (t,))[1])(T)

    def _jvp_one(self, g: Callable, t: dict[str, Tensor], lin: Callable | None) -> Tensor:
        """``(b, c)``: the JVP of ``g`` along one unflattened tangent ``t``."""
        return lin(t) if lin is not None else jvp(g, (self._params,), (t,))[1]

    def _cacheable(self) -> bool:
        """Keep forward passes only for full-precision products: a kept graph would ignore an
        autocast that a mixed-precision solve opens around a product."""
        if self.autocast is not None:
            return False
        try:
            return not torch.is_autocast_enabled(self.device.type)
        except TypeError:  # torch < 2.4 has no device argument
            return not torch.is_autocast_enabled()

    def _vjp_block(self, pullback: Callable, u: Tensor) -> Tensor:
        """``(p, k)``: ``pullback`` (of one batch's forward) applied to the k cotangents
        ``u`` ``(k, b, c)`` in one ``vmap``; measured by the pass plan the same way."""
        if u.shape[0] == 1:
            # measured on the quick preset's All-CNN (475 rows, 2 threads): a pass of one
            # cotangent through vmap took 0.45 s, the plain pullback 0.38 s
            return self.space.flatten(pullback(u[0])[0]).unsqueeze(1)
        return self.space.flatten_batched(vmap(pullback)(u)[0])

    def _tmm(self, U: Tensor) -> Tensor:
        """``Jᵀ U`` for ``U`` ``(c·N, k)`` — one VJP pass over S.

        One forward pass per batch is shared by the k cotangents (``vmap`` over the pullback, at
        most ``vector_chunk`` at a time).
        """
        if U.shape[1] == 1:
            return self._vjp(U[:, 0]).unsqueeze(1)
        return self._vjp(U)

    def _vjp(self, U: Tensor) -> Tensor:
        single = U.dim() == 1
        acc = torch.zeros(
            self.p, *([] if single else [U.shape[1]]), dtype=self.dtype, device=self.device
        )
        chunks = [] if single else self._column_chunks(U.shape[1], "vjp")
        cached = self._cacheable()
        for i, (r0, r1, x) in enumerate(self._row_batches()):
            with self._ctx():
                if cached:
                    k = 1 if single else U.shape[1]
                    pullback, out_dtype = self.cache.pullback(i, self._fn(x), self._params, k)
                else:
                    out, pullback = vjp(self._fn(x), self._params)
                    out_dtype = out.dtype
                # Under autocast the output may be in lower precision; the cotangent must match.
                if single:
                    g = pullback(U[r0:r1].reshape(-1, self.c).to(out_dtype))[0]
                    acc += self.space.flatten(g)
                    continue
                for sl in chunks:
                    u = U[r0:r1, sl].T.reshape(sl.stop - sl.start, -1, self.c)  # (k, b, c)
                    acc[:, sl] += self._vjp_block(pullback, u.to(out_dtype)).to(self.dtype)
        return acc

    def restricted(self, samples: Any, name: str | None = None) -> Jacobian:
        """``J_S`` ``(c·|S|, p)``: the Jacobian of the samples at positions ``samples`` of this
        one's data (in that order), at the same point θ with the same pass options — rows
        ``i·c + k`` for the i-th sample of ``samples``. Its passes run the model on S alone."""
        return Jacobian(
            self.space,
            subset(self.data, samples),
            at=self.theta,
            batch_size=self.data.batch_size,
            name=name or f"{self.name} (subset)",
            autocast=self.autocast,
            vector_chunk=self.vector_chunk,
            memory_budget=self.memory_budget,
        )

    def outputs(self) -> Tensor:
        """``f_θ(S)``: the logits at θ, shape ``(N, c)``."""
        outs = []
        with torch.no_grad():
            for _, _, x in self._row_batches():
                with self._ctx():
                    outs.append(self._f(self._params, x).to(self.dtype))
        return torch.cat(outs)

    def labels(self) -> Tensor:
        """The integer labels of S, shape ``(N,)``, checked against ``c``."""
        return self.data.labels()

    # ------------------------------------------------------------------ exact twin
    def dense_rows(self, chunk: int = 16) -> Iterator[tuple[int, int, Tensor]]:
        """Explicit rows of J: ``(row_start, row_stop, J[rows])`` with blocks ``(chunk·c, p)``,
        each row checked against the batched products (:class:`_BatchedRows`)."""
        self.recomputed_rows = 0
        for r0, _, x in self._row_batches():
            # Under autocast the products are not the twin's reference (the twin is full
            # precision): rows are checked only against full-precision batched passes.
            batched = _BatchedRows(self, x) if self.autocast is None else None
            for s in range(0, x.shape[0], chunk):
                xs = x[s : s + chunk]
                # Per-sample jacrev under vmap: one reverse pass per logit for the whole chunk
                # (a batch-level jacrev would differentiate every output w.r.t. every sample's
                # rows; measured 57.5 s → 4.2 s for 64 CIFAR images, identical to 1e-10).
                jac = vmap(self._per_sample_jac)(xs)  # dict of (b, c, *shape)
                b = xs.shape[0]
                block = torch.cat([jac[n].reshape(b * self.c, -1) for n in self.space.names], 1)
                if batched is not None:
                    self.recomputed_rows += batched.fix(block, s)
                yield r0 + s * self.c, r0 + (s + b) * self.c, block
        if self.recomputed_rows:
            logger.info(
                "%s: %d explicit Jacobian rows took another ReLU branch than the batched "
                "products and were recomputed from the batched pass",
                self.name,
                self.recomputed_rows,
            )

    def _per_sample_jac(self, xi: Tensor) -> dict[str, Tensor]:
        """∂f_θ(x)/∂θ for one sample ``xi`` (no batch dim): dict of ``(c, *shape)``."""
        return jacrev(lambda p: self._f(p, xi.unsqueeze(0))[0])(self._params)

    def dense(self, chunk: int = 16) -> Tensor:
        """The explicit Jacobian ``(c·N, p)`` (cached): for small problems and tests only."""
        if self._dense_cache is None:
            out = torch.empty(self.c * self.n, self.p, dtype=self.dtype, device=self.device)
            for r0, r1, block in self.dense_rows(chunk):
                out[r0:r1] = block
            self._dense_cache = out
        return self._dense_cache

    def to_dense(self) -> Tensor:  # type: ignore[override]
        """The exact twin: explicit per-sample Jacobians (``jacrev``), ``(c·N, p)``, cached."""
        return self.dense()

    def dense_bytes(self) -> int:
        """Memory of the explicit twin ``(c·N, p)`` in bytes."""
        return self.c * self.n * self.p * torch.finfo(self.dtype).bits // 8

    def forward_flops(self) -> float | None:
        """Floating-point operations of one forward pass per sample (matrix products and
        convolutions, counted by ``torch.utils.flop_counter`` on up to 8 samples of the first
        batch; 2 per multiply-add), cached; ``None`` when the counter cannot run the model.

        The unit of :func:`~ntkscrub.scrub.auto_solver`'s cost comparison: an NTK product costs
        about six forward passes over S, an explicit Jacobian about ``2c + 1``."""
        if not hasattr(self, "_forward_flops"):
            from torch.utils.flop_counter import FlopCounterMode  # torch ≥ 2.1

            x0, _ = self.data.first()
            x = x0[:8]
            try:
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    with self._ctx():
                        self._f(self._params, x)
                self._forward_flops = counter.get_total_flops() / x.shape[0]
            except (RuntimeError, TypeError, NotImplementedError):
                self._forward_flops = None
        return self._forward_flops

    def row_norms_sq(self, chunk: int = 16) -> Tensor:
        """``diag(J Jᵀ)``: squared norms of the rows, ``(c·N,)``, from explicit row blocks."""
        out = torch.empty(self.c * self.n, dtype=self.dtype, device=self.device)
        for r0, r1, block in self.dense_rows(chunk):
            out[r0:r1] = (block * block).sum(1)
        return out

    def __repr__(self) -> str:
        return f"Jacobian(c={self.c}, N={self.n}, p={self.p}, dtype={self.dtype})"


class StackedJacobian(Jacobian):
    """``J_D = [J_r; J_f]``: the Jacobian of a concatenation of data sets, ``(c·ΣN_i, p)``.

    Rows follow the order of the parts (all of the first set, then the second, ...). Built from
    :class:`Jacobian` parts at the same point; products are delegated to the parts, so no data
    are copied.
    """

    def __init__(self, *parts: Jacobian) -> None:  # noqa: D107 - documented on the class
        if not parts or not all(isinstance(j, Jacobian) for j in parts):
            raise TypeError("parts: expected one or more Jacobian operators")
        first = parts[0]
        for j in parts[1:]:
            if j.p != first.p or j.c != first.c or not torch.equal(j.theta, first.theta):
                raise ValueError("parts: Jacobians must share the parameter space, c and θ")
        self.parts = parts
        self.space, self.theta, self.c, self.p = first.space, first.theta, first.c, first.p
        self.autocast = first.autocast
        self.vector_chunk = first.vector_chunk
        self.memory_budget = first.memory_budget
        self.name = "+".join(j.name for j in parts)
        self.n = sum(j.n for j in parts)
        self._bounds = []
        r = 0
        for j in parts:
            self._bounds.append((r, r + j.c * j.n))
            r += j.c * j.n
        self._dense_cache = None
        Operator.__init__(self, (self.c * self.n, self.p), first.dtype, first.device)
        self.children = tuple(parts)

    def restricted(self, samples: Any, name: str | None = None) -> Jacobian:
        """``J_S`` of the samples at (stacked, ascending) positions ``samples``: each part's own
        :meth:`Jacobian.restricted` on its share, stacked in the parts' order."""
        pos = torch.as_tensor(samples, dtype=torch.long).reshape(-1).cpu()
        if bool((pos[1:] <= pos[:-1]).any()):
            raise ValueError("samples: a stacked Jacobian restricts to ascending positions")
        out, start = [], 0
        for j in self.parts:
            mine = pos[(pos >= start) & (pos < start + j.n)] - start
            if mine.numel():
                out.append(j.restricted(mine, name))
            start += j.n
        return out[0] if len(out) == 1 else StackedJacobian(*out)

    def _mm(self, V: Tensor) -> Tensor:
        return torch.cat([j._mm(V) for j in self.parts])

    def _tmm(self, U: Tensor) -> Tensor:
        out = None
        for j, (r0, r1) in zip(self.parts, self._bounds):
            g = j._tmm(U[r0:r1])
            out = g if out is None else out + g
        return out

    def dense(self, chunk: int = 16) -> Tensor:
        """The explicit ``(c·ΣN_i, p)`` Jacobian, allocated once: the parts' cached twins become
        views of it, so J_r and J_f are never held twice."""
        if self._dense_cache is None:
            full = torch.empty(self.c * self.n, self.p, dtype=self.dtype, device=self.device)
            for j, (r0, r1) in zip(self.parts, self._bounds):
                full[r0:r1] = j.dense(chunk)
                j._dense_cache = full[r0:r1]
            self._dense_cache = full
        return self._dense_cache

    def outputs(self) -> Tensor:
        return torch.cat([j.outputs() for j in self.parts])

    def labels(self) -> Tensor:
        return torch.cat([j.labels() for j in self.parts])

    def dense_rows(self, chunk: int = 16) -> Iterator[tuple[int, int, Tensor]]:
        for j, (r0, _) in zip(self.parts, self._bounds):
            for a, b, block in j.dense_rows(chunk):
                yield r0 + a, r0 + b, block

    def __repr__(self) -> str:
        return f"StackedJacobian(parts={len(self.parts)}, c={self.c}, N={self.n}, p={self.p})"


class _BatchedRows:
    """The rows of one batch as the batched products see them, for :meth:`Jacobian.dense_rows`.

    A per-sample reverse pass (``jacrev`` under ``vmap``) evaluates the network with other
    kernels than the batched passes of ``J V`` / ``Jᵀ U``. Where a ReLU pre-activation lies
    within rounding of zero the two take different branches, and the explicit row differs from
    the operator's by O(1) along that unit's path — not by rounding. Measured on the quick
    preset (All-CNN ×0.25, float32, 500 images): at w(D) the five rows of one sample are
    6e-4–3.6e-3 off the batched JVP, every other row ≤ 8.5e-7; at θ0 rows of several samples
    (up to 2e-3). With the shift's cancellation (ρ ≈ 200) that one sample made the dense twin
    3 % off the float32 CG scrub and off float64. So each explicit row is compared with the
    batched JVP along ``_CHECK_TANGENTS`` fixed random tangents (relative to the row's norm,
    in float64: float32 products of a 10⁵-long row carry 5e-6 of rounding themselves) and,
    beyond :func:`_check_rtol`, recomputed as a one-hot VJP through the batch's own forward
    pass. Cost: two batched JVPs per batch, and one batched backward per recomputed row.
    """

    def __init__(self, J: Jacobian, x: Tensor) -> None:
        self.J, self.x = J, x
        gen = torch.Generator().manual_seed(0)  # fixed: the twin is deterministic
        self.wide = torch.float64 if J.device.type != "mps" else J.dtype  # MPS has no float64
        T = torch.randn(J.p, _CHECK_TANGENTS, generator=gen, dtype=torch.float64)
        self.T = T.to(device=J.device, dtype=self.wide)
        g = J._fn(x)
        jv = [
            J._jvp_one(g, J.space.unflatten(self.T[:, k].to(J.dtype)), None)
            for k in range(_CHECK_TANGENTS)
        ]
        self.JT = torch.stack([v.reshape(-1) for v in jv], 1).to(self.wide)  # (b·c, k)
        self.rtol = _check_rtol(J.dtype)
        self.pullback: Callable | None = None  # the batch's own, built on the first bad row
        self.out_dtype = J.dtype

    def fix(self, block: Tensor, s: int) -> int:
        """Recompute, in place, the rows of ``block`` (samples ``s, s+1, …`` of the batch) that
        disagree with the batched JVP; returns how many."""
        c = self.J.c
        ref = self.JT[s * c : s * c + block.shape[0]]
        got = accumulated_matmul(block, self.T, self.wide)  # no wide copy of the whole block
        tol = self.rtol * torch.linalg.vector_norm(block, dim=1, dtype=self.wide)
        bad = ((got - ref).abs().amax(1) > tol).nonzero().flatten()
        if bad.numel() == 0:
            return 0
        if self.pullback is None:
            out, self.pullback = vjp(self.J._fn(self.x), self.J._params)
            self.out_dtype = out.dtype
        for i0 in range(0, bad.numel(), _RECOMPUTE_CHUNK):
            rows = bad[i0 : i0 + _RECOMPUTE_CHUNK]
            U = torch.zeros(
                rows.numel(), self.x.shape[0] * c, dtype=self.out_dtype, device=self.x.device
            )
            U[torch.arange(rows.numel()), s * c + rows] = 1
            U = U.reshape(rows.numel(), -1, c)
            block[rows] = self.J._vjp_block(self.pullback, U).T.to(block.dtype)
        return int(bad.numel())
