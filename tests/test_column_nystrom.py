"""Column-Nyström preconditioners (``SolverConfig.precond="columns"``): the factor is the Nyström
approximation K[:, S] K[S, S]⁺ K[S, :] of uniformly drawn columns S, an NTK's columns come from a
VJP over the pivot samples and one JVP pass (:func:`ntkscrub.operators.pivot_columns`), and a
scrub preconditioned that way equals the dense twin."""

from __future__ import annotations

import pytest
import torch
from test_recycle import decaying_psd, dense

from ntkscrub import scrub
from ntkscrub.config import SolverConfig
from ntkscrub.operators import (
    NTK,
    Counted,
    Jacobian,
    MatvecCounter,
    StackedJacobian,
    pivot_columns,
)
from ntkscrub.params import ParameterSpace
from ntkscrub.solvers import cg, nystrom_preconditioner
from ntkscrub.solvers.preconditioners import _generator


def test_column_sketch_is_the_nystrom_approximation_of_its_columns():
    K, n, r, mu = decaying_psd(90), 90, 12, 1e-2
    M = nystrom_preconditioner(K, n, r, shift=mu, seed=3, sketch="columns")
    S = torch.randperm(n, generator=_generator(3))[:r]  # the seeded draw the sketch consumes
    assert M.pivots == S.tolist() and M.rank == r and M.matvecs == r and M.sketch == "columns"
    C = K[:, S]
    ref = C @ torch.linalg.pinv(C[S], hermitian=True) @ C.T
    assert torch.linalg.matrix_norm(dense(M) - ref, 2) <= 1e-8 * float(K.norm())
    # a columns callable (A[:, idx] with the shift, as pivot_columns gives) changes nothing
    A = K + mu * torch.eye(n, dtype=K.dtype)
    calls = []

    def columns(idx: torch.Tensor) -> torch.Tensor:
        calls.append(idx.numel())
        return A[:, idx]

    M2 = nystrom_preconditioner(
        A, n, r, shift=mu, includes_shift=True, seed=3, sketch="columns", columns=columns
    )
    assert calls == [r] and torch.allclose(dense(M2), dense(M), rtol=0, atol=1e-9 * float(K.norm()))


def test_adaptive_column_sketch_doubles_and_preconditions():
    K, n, mu = decaying_psd(200), 200, 1e-1
    A = K + mu * torch.eye(n, dtype=K.dtype)
    M = nystrom_preconditioner(K, n, shift=mu, seed=0, sketch="columns", solves=2, tol=1e-6)
    assert len(M.pivots) == M.sketch_size == len(set(M.pivots))  # no column drawn twice
    assert [h["rank"] for h in M.history] == [min(16 * 2**k, n // 4) for k in range(len(M.history))]
    b = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=K.dtype)
    plain = cg(A, b, tol=1e-6, strict=False)[1].iterations
    x, info = cg(A, b, precond=M, tol=1e-6)
    assert info.iterations < plain and float((A @ x - b).norm() / b.norm()) <= 1e-6
    # half-price columns pay for more of them under the cost rule, never fewer
    half = nystrom_preconditioner(
        K, n, shift=mu, seed=0, sketch="columns", solves=2, tol=1e-6, column_cost=0.5
    )
    assert half.rank >= M.rank


def test_bad_sketch_arguments_are_named():
    K = decaying_psd(20)
    with pytest.raises(ValueError, match="sketch"):
        nystrom_preconditioner(K, 20, 4, sketch="rows")
    with pytest.raises(ValueError, match="column_cost"):
        nystrom_preconditioner(K, 20, 4, sketch="columns", column_cost=0.0)
    with pytest.raises(ValueError, match="precond"):
        SolverConfig(precond="column")


def _ntk(ridge: float):
    from model_zoo import make_data, make_mlp

    model = make_mlp()
    X, Y = make_data("mlp", 14)
    J = Jacobian(ParameterSpace(model), (X, Y), batch_size=5)
    return J, NTK(jac_a=J, ridge=ridge)


def test_pivot_columns_are_the_ntk_columns_and_are_counted():
    J, K = _ntk(ridge=0.3)
    counter = MatvecCounter()
    columns = pivot_columns(Counted(K, counter))
    # several classes of one sample, samples out of order
    idx = torch.tensor([J.c * 9 + 1, 2, J.c * 9, J.c * 4 + J.c - 1, 0])
    want = K.to_dense()[:, idx]
    got = columns(idx)
    assert got.shape == (J.shape[0], 5) and torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert counter.count == 5
    assert pivot_columns(K) is not None and pivot_columns(K.to_dense()) is None
    # a stacked Jacobian (scrub's J_D = [J_r; J_f]): pivots on both sides of the seam
    X, Y = J.data.source
    parts = [Jacobian(J.space, (X[a:b], Y[a:b]), batch_size=4) for a, b in ((0, 9), (9, 14))]
    K2 = NTK(jac_a=StackedJacobian(*parts), ridge=0.3)
    assert torch.allclose(pivot_columns(K2)(idx), want, rtol=1e-12, atol=1e-12)
    assert pivot_columns(J @ J.mT) is None  # Θ, but not made by NTK(): no known factors


def test_scrub_with_column_preconditioner_equals_the_dense_twin():
    from test_scrub import cluster_mlp_problem, rel

    init, model, retain, forget = cluster_mlp_problem()
    ref = scrub(model, retain, forget, init=init, solver="dense", weight_decay=0.1).shift
    its = {}
    for precond in ("columns", "none"):
        cfg = SolverConfig(method="cg", tol=1e-6, precond=precond, precond_rank=16)
        res = scrub(model, retain, forget, init=init, solver_config=cfg, weight_decay=0.1)
        assert res.info["converged"] and rel(res.shift, ref) <= 1e-4, precond
        its[precond] = sum(s["iterations"] for s in res.info["solves"])
    first = res.info["solves"][0]
    assert "precond" not in first or first["precond"] != "nystrom columns"
    cfg = SolverConfig(method="cg", tol=1e-6, precond="columns", precond_rank=16)
    rec = scrub(model, retain, forget, init=init, solver_config=cfg, weight_decay=0.1)
    assert rec.info["solves"][0]["precond"] == "nystrom columns"
    assert its["columns"] < its["none"], its
