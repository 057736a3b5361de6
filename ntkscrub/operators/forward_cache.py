"""Kept forward passes: a Jacobian's later products skip the primal computation.

A Θ product ``J(Jᵀu)`` is one VJP pass and one JVP pass over S, and each pass recomputes the
network's forward on every batch although the linearisation point θ never changes. This cache
keeps, per batch, what the second and later passes need:

* the pullback of ``torch.func.vjp`` (the forward's saved activations) — ``Jᵀ u`` then costs a
  backward pass only;
* the tangent map of ``torch.func.linearize`` (the JVP traced once, its primal values folded into
  constants) — ``J v`` then costs the tangent computation only.

Measured on this project's 2-core CPU (All-CNN ×0.25 of the quick preset, p = 102 k, batch 128,
1 thread, ``/tmp`` probe recorded in issue 14's note): JVP 0.478 s → 0.270 s, VJP 0.405 s →
0.246 s, i.e. a Θ product from 2.2 to 1.3 training steps; kept bytes 247 MB (linearised JVP)
and 93 MB (pullback) per batch. Numerically the cached products are the same computation
(equal to the last bit in that probe; tests/test_forward_cache.py holds them to float64 rounding).

Memory is bounded by a byte budget shared by every cache of the process (a ledger): an entry is
kept only while all caches together stay within it; once a batch does not fit, that cache stops
adding entries and the remaining batches stream as before. The default budget is a quarter of
the memory available on the device when the first entry is built.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import linearize, vjp

from ntkscrub.memory import LiveBytes

__all__ = ["ForwardCache", "default_cache_budget", "cached_bytes"]

# Bytes held by all live caches of this process (one slot: mutated in place).
_LEDGER = [0]


# Vectors pushed through a batch before its entry is built: a Jacobian used for one vector
# (outputs, one VJP) keeps nothing; the pullback's accounting (the dispatch-mode tracker) slows
# the pass that builds it. Counted in vectors, not passes: a multi-vector pass (the Nyström
# sketch's first rounds, 16 columns each) is as many products — counted in passes, the quick
# preset's first 32 sketch columns streamed their JVPs (0.53 s instead of 0.35 s per column).
_KEEP_AFTER = {"vjp": 1, "jvp": 2}
# Tracing a tangent map costs 0.15–0.7 s of Python whatever the batch (a 3-layer MLP on this CPU:
# 70 streamed JVPs of 16 rows; one-off 3 s for torch.fx's first import), and saves ≈ 40 % of a
# streamed JVP per later pass: only batches whose streamed JVP takes this long are traced (the
# quick preset's All-CNN batch: 0.48 s; a GPU batch, timed without synchronising, never is).
_TRACE_MIN_SECONDS = 0.05


def cached_bytes() -> int:
    """Bytes all live forward caches of this process hold."""
    return _LEDGER[0]


def default_cache_budget(device: torch.device) -> int:
    """A quarter of the memory available on ``device`` now (0 where it cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) // 4
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _release(box: list[int]) -> None:
    _LEDGER[0] -= box[0]
    box[0] = 0


def _graph_bytes(fn: Callable) -> int:
    """Bytes of the tensors a ``torch.func.linearize`` tangent map keeps (its traced graph's
    constants; the dispatch-mode tracker cannot see them, they are made while tracing)."""
    seen: dict[int, int] = {}
    for cell in getattr(fn, "__closure__", None) or ():
        gm = cell.cell_contents
        if not isinstance(gm, torch.nn.Module):
            continue
        for mod in gm.modules():
            values = [*vars(mod).values(), *mod._buffers.values(), *mod._parameters.values()]
            for t in values:
                if isinstance(t, Tensor):
                    s = t.untyped_storage()
                    seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class ForwardCache:
    """Per-batch linearised JVPs and VJP pullbacks of one Jacobian (see the module docstring).

    Args:
        budget: bytes all caches of the process may hold together; ``None``: a quarter of the
            device's available memory, read at the first entry; 0 disables caching.
        device: where the products run (for the default budget and CUDA accounting).
    """

    def __init__(self, budget: int | None, device: torch.device) -> None:
        self.budget = budget
        self.device = device
        self._jvp: dict[int, Callable] = {}
        self._vjp: dict[int, tuple[Callable, torch.dtype]] = {}
        self._box = [0]
        self._uses: dict[tuple[str, int], int] = {}
        self._jvp_seconds: dict[int, float] = {}
        self.full = budget == 0
        self.jvp_unavailable: str | None = None
        weakref.finalize(self, _release, self._box)

    def _admit(self, nbytes: int) -> bool:
        if self.budget is None:
            self.budget = default_cache_budget(self.device)
        if self.full or _LEDGER[0] + nbytes > self.budget:
            self.full = True
            return False
        _LEDGER[0] += nbytes
        self._box[0] += nbytes
        return True

    def pullback(
        self, i: int, g: Callable, params: dict[str, Tensor], vectors: int = 1
    ) -> tuple[Callable, Any]:
        """``(pullback, out dtype)`` of batch ``i``'s forward ``g`` at ``params``, about to carry
        ``vectors`` cotangents — kept when the budget allows, else computed for this pass only."""
        if i in self._vjp:
            return self._vjp[i]
        if self.full or not self._worth_it("vjp", i, _KEEP_AFTER["vjp"], vectors):
            out, pb = vjp(g, params)
            return pb, out.dtype
        with LiveBytes() as live:
            out, pb = vjp(g, params)
        entry = (pb, out.dtype)
        if self._admit(live.current):
            self._vjp[i] = entry
        return entry

    def linearized(
        self, i: int, g: Callable, params: dict[str, Tensor], vectors: int = 1
    ) -> Callable | None:
        """The kept tangent map ``t ↦ J_i t`` of batch ``i``, about to carry ``vectors`` tangents
        (``None``: stream them)."""
        if i in self._jvp:
            return self._jvp[i]
        if self.full or self.jvp_unavailable is not None:
            return None
        if not self._worth_it("jvp", i, _KEEP_AFTER["jvp"], vectors):
            return None
        if self._jvp_seconds.get(i, 0.0) < _TRACE_MIN_SECONDS:
            return None
        before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        try:
            with warnings.catch_warnings():
                # const_fold's "get_attr Node with no underlying reference": harmless here
                warnings.simplefilter("ignore", UserWarning)
                _, lin = linearize(g, params)
        except Exception as err:  # noqa: BLE001 - any tracing failure means: stream
            self.jvp_unavailable = f"{type(err).__name__}: {err}"
            return None
        if self.device.type == "cuda":
            nbytes = torch.cuda.memory_allocated(self.device) - before
        else:
            nbytes = _graph_bytes(lin)
            if nbytes == 0:  # this torch keeps its constants elsewhere: cannot account them
                self.jvp_unavailable = "the linearised graph's memory could not be measured"
                return None
        if not self._admit(nbytes):
            return None
        self._jvp[i] = lin
        return lin

    def note_jvp(self, i: int, seconds: float) -> None:
        """Record how long batch ``i``'s streamed JVP took (per vector)."""
        self._jvp_seconds[i] = seconds

    def _worth_it(self, kind: str, i: int, after: int, vectors: int) -> bool:
        n = self._uses[kind, i] = self._uses.get((kind, i), 0) + vectors
        return n > after

    def info(self) -> dict[str, Any]:
        """What is kept: batches per kind, bytes, the budget in effect."""
        return {
            "jvp_batches": len(self._jvp),
            "vjp_batches": len(self._vjp),
            "bytes": self._box[0],
            "budget": self.budget,
            "full": self.full,
            "jvp_unavailable": self.jvp_unavailable,
        }
