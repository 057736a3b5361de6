"""Kept forward passes (ntkscrub.operators.forward_cache) against the streamed products."""

from __future__ import annotations

import gc

import pytest
import torch

from ntkscrub import scrub
from ntkscrub.config import ProductConfig, SolverConfig
from ntkscrub.operators import Jacobian, forward_cache
from ntkscrub.operators.forward_cache import cached_bytes
from ntkscrub.params import ParameterSpace
from tests.test_passes import conv_net, images


def pair(cache_bytes: int | None, n: int = 30, batch: int = 12) -> tuple[Jacobian, Jacobian]:
    """The same float64 Jacobian with caching as given and streamed (cache_bytes=0)."""
    model = conv_net(width=6).double()
    X, Y = images(n)
    space = ParameterSpace(model)
    kw = dict(batch_size=batch, vector_chunk=None)
    J = Jacobian(space, (X.double(), Y), cache_bytes=cache_bytes, **kw)
    ref = Jacobian(space, (X.double(), Y), cache_bytes=0, **kw)
    return J, ref


@pytest.mark.parametrize("k", [1, 3])
def test_cached_products_equal_streamed_products(k, monkeypatch):
    monkeypatch.setattr(forward_cache, "_TRACE_MIN_SECONDS", 0.0)  # trace these tiny batches
    J, ref = pair(cache_bytes=None)
    g = torch.Generator().manual_seed(0)
    V = torch.randn(J.p, k, generator=g, dtype=torch.float64).squeeze(1)
    U = torch.randn(J.shape[0], k, generator=g, dtype=torch.float64).squeeze(1)
    for _ in range(4):  # entries are built at the 2nd (VJP) and 3rd (JVP) pass of a batch
        assert torch.allclose(J.matvec(V), ref.matvec(V), rtol=1e-12, atol=1e-13)
        assert torch.allclose(J.rmatvec(U), ref.rmatvec(U), rtol=1e-12, atol=1e-13)
    info = J.cache.info()
    assert info["vjp_batches"] == 3 and info["jvp_batches"] == 3 and info["bytes"] > 0
    assert ref.cache.info()["bytes"] == 0 and ref.cache.info()["vjp_batches"] == 0


def test_a_wide_pass_counts_as_many_products(monkeypatch):
    """The cache counts vectors, not passes: one 5-vector pass in chunks of one (the Nyström
    sketch's first round) keeps each batch's pullback and traces its tangent map after the
    second chunk — and its products still equal the streamed ones."""
    monkeypatch.setattr(forward_cache, "_TRACE_MIN_SECONDS", 0.0)
    J, ref = pair(cache_bytes=None)
    J.vector_chunk = 1
    g = torch.Generator().manual_seed(1)
    V = torch.randn(J.p, 5, generator=g, dtype=torch.float64)
    U = torch.randn(J.shape[0], 5, generator=g, dtype=torch.float64)
    assert torch.allclose(J @ V, ref @ V, rtol=1e-12, atol=1e-13)
    assert torch.allclose(J.mT @ U, ref.mT @ U, rtol=1e-12, atol=1e-13)
    info = J.cache.info()
    assert info["vjp_batches"] == 3 and info["jvp_batches"] == 3
    # a single vector still streams on first use
    J1, _ = pair(cache_bytes=None)
    J1.matvec(V[:, 0])
    J1.rmatvec(U[:, 0])
    assert J1.cache.info()["vjp_batches"] == 0 and J1.cache.info()["jvp_batches"] == 0


def test_budget_bounds_what_is_kept_and_gc_releases_it():
    gc.collect()
    before = cached_bytes()
    J, _ = pair(cache_bytes=None)
    for _ in range(2):
        J.rmatvec(torch.ones(J.shape[0], dtype=torch.float64))
    per_batch = J.cache.info()["bytes"] / 3
    # A budget for about one and a half batches: one is kept, the rest stream (still exact).
    small, ref = pair(cache_bytes=int(before + J.cache.info()["bytes"] + 1.5 * per_batch))
    U = torch.randn(small.shape[0], dtype=torch.float64)
    for _ in range(3):
        assert torch.allclose(small.rmatvec(U), ref.rmatvec(U), rtol=1e-12, atol=1e-13)
    assert small.cache.info()["vjp_batches"] == 1 and small.cache.info()["full"]
    del J, small
    gc.collect()
    assert cached_bytes() == before


def test_fast_batches_are_not_traced():
    """A JVP batch quicker than the tracing threshold streams; its pullback is still kept."""
    J, _ = pair(cache_bytes=None)
    v, u = torch.ones(J.p, dtype=torch.float64), torch.ones(J.shape[0], dtype=torch.float64)
    for _ in range(4):
        J.matvec(v)
        J.rmatvec(u)
    assert J.cache.info()["jvp_batches"] == 0 and J.cache.info()["vjp_batches"] == 3


def test_autocast_and_mixed_precision_products_are_never_cached():
    J, _ = pair(cache_bytes=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            J.rmatvec(torch.ones(J.shape[0], dtype=torch.float64))
    assert J.cache.info()["vjp_batches"] == 0


def test_scrub_with_and_without_the_cache_agree():
    model = conv_net(width=4).double()
    init = conv_net(width=4, seed=3).double()
    X, Y = images(24)
    X = X.double()
    kw = dict(init=init, ridge=0.5, solver="cg", tol=1e-10, seed=0)
    out = {
        b: scrub(
            model,
            (X[:18], Y[:18]),
            (X[18:], Y[18:]),
            products=ProductConfig(batch_size=8, cache_bytes=b),
            solver_config=SolverConfig(precond_rank=0),
            **kw,
        )
        for b in (None, 0)
    }
    d0, d1 = out[None].delta, out[0].delta
    assert float((d0 - d1).norm() / d1.norm()) <= 1e-9
    assert out[None].info["matvecs"] == out[0].info["matvecs"]
    kept = out[None].info["forward_cache"]
    assert (
        kept["retain"]["vjp_batches"] == 3 and out[0].info["forward_cache"]["retain"]["bytes"] == 0
    )


def test_cache_bytes_is_validated():
    with pytest.raises(ValueError, match="cache_bytes"):
        pair(cache_bytes=-1)
    with pytest.raises(TypeError, match="cache_bytes"):
        ProductConfig(cache_bytes=1.5)
    with pytest.raises(ValueError, match="cache_bytes"):
        ProductConfig(cache_bytes=-3)
