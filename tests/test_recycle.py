"""Krylov recycling (ntkscrub.solvers.recycle): exact against the Nyström approximation of the
enlarged test matrix, and a scrub that recycles equals one that does not, for fewer products."""

from __future__ import annotations

import pytest
import torch

from ntkscrub import scrub
from ntkscrub.config import SolverConfig
from ntkscrub.solvers import KrylovPairs, LowRankPreconditioner, cg, recycled
from ntkscrub.solvers.preconditioners import stable_nystrom

EPS64 = torch.finfo(torch.float64).eps


def decaying_psd(n: int = 80, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = 10.0 ** torch.linspace(3, -4, n, dtype=torch.float64)
    return (Q * ev) @ Q.T


def nystrom_factor(K: torch.Tensor, omega: torch.Tensor, shift: float) -> LowRankPreconditioner:
    Q, _ = torch.linalg.qr(omega)
    U, lam, _ = stable_nystrom(Q, K @ Q, EPS64)
    return LowRankPreconditioner(U, lam, shift)


def dense(M: LowRankPreconditioner) -> torch.Tensor:
    return (M.U * M.eigenvalues) @ M.U.T


def test_recycled_is_the_nystrom_approximation_of_the_enlarged_test_matrix():
    K, mu = decaying_psd(), 1e-2
    g = torch.Generator().manual_seed(1)
    omega = torch.randn(80, 6, generator=g, dtype=torch.float64)
    W = torch.randn(80, 5, generator=g, dtype=torch.float64)
    M = nystrom_factor(K, omega, mu)
    pairs = KrylovPairs(5)
    pairs.add(W, K @ W + mu * W)  # CG's pairs are products with the system K + μI
    M2 = recycled(M, pairs)
    ref = nystrom_factor(K, torch.cat([omega, W], 1), mu)
    keep = ref.eigenvalues >= M.eigenvalues[-1]  # recycled keeps the old factor's floor
    ref = LowRankPreconditioner(ref.U[:, keep], ref.eigenvalues[keep], mu)
    assert M2.rank == ref.rank > M.rank and M2.shift == mu
    assert torch.linalg.matrix_norm(dense(M2) - dense(ref), 2) <= 1e-9 * float(K.norm())
    assert float(torch.linalg.eigvalsh(K - dense(M2)).min()) >= -1e-9 * float(K.norm())
    assert float(M2.eigenvalues[-1]) >= float(M.eigenvalues[-1])  # the floor is not lowered
    assert M.rank == 6  # M itself is not changed


def test_krylov_pairs_keep_the_first_columns_and_their_products():
    K, mu = decaying_psd(60), 10.0
    A = K + mu * torch.eye(60, dtype=torch.float64)
    b = torch.randn(60, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pairs = KrylovPairs(7)
    x, info = cg(A, b, tol=1e-8, krylov=pairs)
    W, AW = pairs.tensors()
    assert pairs.columns == W.shape[1] == 7 < info.matvecs
    assert torch.allclose(AW, A @ W, rtol=0, atol=1e-12 * float(A.norm()))
    assert torch.allclose(W[:, :2], b)  # no preconditioner, zero start: p₀ = r₀ = b
    with pytest.raises(ValueError, match="capacity"):
        KrylovPairs(-1)


def test_recycled_factor_solves_a_principal_block_in_fewer_iterations():
    """scrub's pattern: Θ_DD solved, its factor restricted to the retain rows for Θ_rr."""
    K, mu = decaying_psd(200, seed=3), 1.0
    A = K + mu * torch.eye(200, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    M = nystrom_factor(K, torch.randn(200, 10, generator=g, dtype=torch.float64), mu)
    pairs = KrylovPairs(10)
    cg(A, torch.randn(200, generator=g, dtype=torch.float64), precond=M, tol=1e-8, krylov=pairs)
    b = torch.randn(180, generator=g, dtype=torch.float64)
    its = {}
    for name, F in (("plain", M), ("recycled", recycled(M, pairs))):
        x, info = cg(A[:180, :180], b, precond=F.restrict(slice(0, 180), mu), tol=1e-8)
        its[name] = info.iterations
        assert float((A[:180, :180] @ x - b).norm() / b.norm()) <= 1e-8
    assert its["recycled"] < its["plain"]


def scrubs_with_and_without_recycling(bound: float, **kw) -> tuple[dict, dict]:
    """The cluster-MLP problem scrubbed on cg (rank-16 factor, tol 1e-3) with recycling on and
    off, each within ``bound`` of the float64 dense twin; returns their ``info``s."""
    from test_scrub import cluster_mlp_problem, rel

    init, model, retain, forget = cluster_mlp_problem()
    ref = scrub(model, retain, forget, init=init, solver="dense", weight_decay=0.1, **kw).shift
    out = {}
    for recycle in (None, 0):
        cfg = SolverConfig(method="cg", tol=1e-3, precond_rank=16, recycle=recycle)
        res = scrub(model, retain, forget, init=init, solver_config=cfg, weight_decay=0.1, **kw)
        assert rel(res.shift, ref) <= bound and res.info["converged"]
        out[recycle] = res.info
    return out[None], out[0]


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_scrub_with_recycling_equals_scrub_without_for_fewer_retain_iterations(loss):
    on, off = scrubs_with_and_without_recycling(5e-3, loss=loss)
    assert on["solves"][0]["recycled_rank"] > 16 and "recycled_rank" not in off["solves"][0]
    retain_its = [sum(s["iterations"] for s in i["solves"][1:]) for i in (on, off)]
    assert retain_its[0] < retain_its[1], retain_its
    with pytest.raises(ValueError, match="SolverConfig.recycle"):
        SolverConfig(recycle=-1)


def test_ce_newton_recycles_theta_products_across_steps():
    """Each Newton step's Θ products sharpen Θ's factor for the next step's H^½ΘH^½ + λI: the
    same minimisers (float64, against the dense twin) for fewer products."""
    on, off = scrubs_with_and_without_recycling(
        1e-6, loss="ce", method="ce_newton", linearize_at="trained"
    )
    steps = [s for s in on["solves"] if s["system"].startswith("CE Newton D #")]
    assert all(s["recycled_rank"] > 16 for s in steps)
    assert on["matvecs"] < off["matvecs"]


def test_recorded_operator_keeps_products_only_while_asked():
    from model_zoo import make_data, make_mlp

    from ntkscrub.operators import NTK, Jacobian, MatvecCounter, Recorded
    from ntkscrub.params import ParameterSpace

    model = make_mlp().double()
    X, Y = make_data("mlp", 5)
    counter = MatvecCounter()
    T = Recorded(NTK(jac_a=Jacobian(ParameterSpace(model), (X.double(), Y))), counter)
    V = torch.randn(15, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    TV = T @ V
    T.pairs = KrylovPairs(3)
    T @ V
    assert counter.count == 4 and T.pairs.columns == 2
    W, TW = T.pairs.tensors()
    assert torch.equal(W, V) and torch.allclose(TW, TV, rtol=1e-12, atol=0)
    assert torch.allclose(TV, T.to_dense() @ V, rtol=1e-10, atol=1e-12)
