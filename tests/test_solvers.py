"""Tests of ntkscrub.solvers (CG, low-rank preconditioners, Lanczos / SLQ).

Float64 dense linear algebra (torch.linalg.solve, eigh, Cholesky log-det) is the judge. Matrices are
small (n ≤ 300) so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from model_zoo import spd

from ntkscrub.solvers import (
    CGNotConverged,
    LanczosResult,
    NystromPreconditioner,
    RPCholeskyPreconditioner,
    as_matmul,
    cg,
    dense_logdet,
    lanczos,
    slq_logdet,
    slq_trace,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def decaying_kernel(n: int, seed: int = 0) -> torch.Tensor:
    """NTK-like PSD K: 50 eigenvalues over 4 decades (100 … 1e-2), then a tail at 3e-3 … 1e-4."""
    ev = torch.cat(
        [
            10.0 ** torch.linspace(2, -2, 50, dtype=F64),
            10.0 ** torch.linspace(-2.5, -4, n - 50, dtype=F64),
        ]
    )
    return spd(ev, seed)


class Counting:
    """A callable operator that records the number of columns of every block it is applied to."""

    def __init__(self, A: torch.Tensor) -> None:
        self.A = A
        self.widths: list[int] = []
        self.inputs: list[torch.Tensor] = []

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        self.widths.append(X.shape[1])
        self.inputs.append(X.clone())
        return (self.A.to(X.dtype) @ X).to(X.dtype)


def rel_err(X: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (X.to(F64) - ref).norm(dim=0) / ref.norm(dim=0)


# ---------------------------------------------------------------------------------------------
# CG
# ---------------------------------------------------------------------------------------------


def test_cg_matches_dense_solve_float64():
    n = 120
    A = spd(torch.logspace(0, 3, n, dtype=F64), seed=1)
    B = torch.randn(n, 5, dtype=F64, generator=_gen(2))
    X, info = cg(A, B, tol=1e-10)
    ref = torch.linalg.solve(A, B)
    assert X.shape == B.shape and X.dtype == F64
    assert float(rel_err(X, ref).max()) <= 1e-8
    assert info.converged == [True] * 5
    assert all(r <= 1e-10 for r in info.residuals)
    # the reported residuals are the true ones
    true = ((B - A @ X).norm(dim=0) / B.norm(dim=0)).tolist()
    assert info.residuals == pytest.approx(true, rel=1e-6, abs=1e-15)
    assert info.iterations == max(info.iterations_per_column)
    assert len(info.iterations_per_column) == 5


def test_cg_vector_rhs_and_precond_callable():
    n = 60
    A = spd(torch.linspace(1, 50, n, dtype=F64), seed=3)
    b = torch.randn(n, dtype=F64, generator=_gen(4))
    x, info = cg(A, b, tol=1e-10, precond=lambda R: R / torch.diagonal(A).unsqueeze(1))
    assert x.shape == (n,)
    assert torch.allclose(x, torch.linalg.solve(A, b), rtol=0, atol=1e-8 * float(x.norm()))
    assert info.converged == [True]


def test_cg_float32_matvecs_with_float64_scalars():
    # A = K + λI with K's spectrum over 6 decades and a small ridge: κ ≈ 1e3 in float32.
    n = 200
    lam = 1e-3
    A = spd(10.0 ** torch.linspace(0, -6, n, dtype=F64), seed=5) + lam * torch.eye(n, dtype=F64)
    B = torch.randn(n, 3, dtype=F64, generator=_gen(6))
    # tol 1e-3, not 1e-4: float32 rounding puts the floor of the true residual near 1e-4 here
    # (one column stopped at 1.03e-4 on another machine's BLAS)
    X, info = cg(A.float(), B.float(), tol=1e-3)
    assert X.dtype == torch.float32
    assert all(info.converged) and max(info.residuals) <= 1e-3
    # κ·tol = 1 bounds the error; in practice it is ~1e-4
    assert float(rel_err(X, torch.linalg.solve(A, B)).max()) < 1e-3
    assert 0 < info.attainable < 1e-3


def test_cg_per_column_stopping_and_dropping():
    n = 100
    evals = torch.linspace(1, 100, n, dtype=F64)
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=_gen(7)))
    A = (U * evals) @ U.T
    B = torch.randn(n, 4, dtype=F64, generator=_gen(8))
    B[:, 0] = U[:, 10]  # an eigenvector: CG converges in one iteration
    op = Counting(A)
    X, info = cg(op, B, tol=1e-10)
    its = info.iterations_per_column
    assert its[0] == 1 and min(its[1:]) > 10
    assert info.restarts == 0
    # matvecs = active columns per iteration + the final true-residual check of the 4 columns
    assert info.matvecs == sum(op.widths) == sum(its) + 4
    assert info.block_matvecs == len(op.widths) == info.iterations + 1
    iter_widths = op.widths[:-1]
    assert iter_widths[0] == 4 and iter_widths[1] == 3  # column 0 dropped after one iteration
    assert all(a >= b for a, b in zip(iter_widths, iter_widths[1:]))  # never grows back
    assert op.widths[-1] == 4  # final check over every column that moved
    assert float(rel_err(X, torch.linalg.solve(A, B)).max()) < 1e-8
    assert len(info.history) == info.iterations + 1 and info.history[0] == pytest.approx(1.0)


def test_cg_zero_rhs_columns():
    n = 50
    A = spd(torch.linspace(1, 10, n, dtype=F64), seed=9)
    B = torch.randn(n, 3, dtype=F64, generator=_gen(10))
    B[:, 1] = 0.0
    x0 = torch.ones(n, 3, dtype=F64)  # ignored for the zero column
    X, info = cg(A, B, x0=x0, tol=1e-10)
    assert torch.count_nonzero(X[:, 1]) == 0
    assert info.iterations_per_column[1] == 0 and info.converged[1] and info.residuals[1] == 0.0
    op = Counting(A)
    Z, info0 = cg(op, torch.zeros(n, 2, dtype=F64))
    assert torch.count_nonzero(Z) == 0 and info0.matvecs == 0 and op.widths == []


def test_cg_warm_start_from_solution_takes_no_iterations():
    n = 80
    A = spd(torch.linspace(1, 30, n, dtype=F64), seed=11)
    B = torch.randn(n, 3, dtype=F64, generator=_gen(12))
    X_exact = torch.linalg.solve(A, B)
    X, info = cg(A, B, x0=X_exact, tol=1e-8)
    assert info.iterations == 0 and info.iterations_per_column == [0, 0, 0]
    assert info.matvecs == 3 and info.block_matvecs == 1  # just the residual of x0
    assert torch.equal(X, X_exact)
    # a rough warm start saves iterations
    _, cold = cg(A, B, tol=1e-8)
    _, warm = cg(
        A, B, x0=X_exact + 1e-4 * torch.randn(n, 3, dtype=F64, generator=_gen(1)), tol=1e-8
    )
    assert warm.iterations < cold.iterations


def test_cg_strict_raises_and_non_strict_warns():
    n = 100
    A = spd(torch.logspace(0, 3, n, dtype=F64), seed=13)
    B = torch.randn(n, 2, dtype=F64, generator=_gen(14))
    with pytest.raises(CGNotConverged) as exc:
        cg(A, B, tol=1e-8, max_iter=2, strict=True)
    assert isinstance(exc.value, RuntimeError)
    assert exc.value.info.converged == [False, False] and exc.value.info.iterations == 2
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        X, info = cg(A, B, tol=1e-8, max_iter=2, strict=False)
    assert info.converged == [False, False] and not info.all_converged
    assert info.message is not None and all(r > 1e-8 for r in info.residuals)
    d = json.loads(json.dumps(info.to_dict()))
    assert d["all_converged"] is False and d["iterations"] == 2 and d["max_iter"] == 2
    assert set(d) >= {"iterations_per_column", "residuals", "matvecs", "block_matvecs", "seconds"}


def test_cg_reports_indefinite_and_unattainable_tol():
    n = 40
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        _, info = cg(-torch.eye(n, dtype=F64), torch.ones(n, dtype=F64), strict=False)
    assert info.converged == [False] and info.iterations == 0
    # float32 matvecs cannot resolve a relative residual of 1e-7 at κ ≈ 1e3: CG says so and stops
    # after at most a few restarts instead of running to max_iter.
    A = spd(10.0 ** torch.linspace(0, -6, 200, dtype=F64), seed=5) + 1e-3 * torch.eye(
        200, dtype=F64
    )
    B = torch.randn(200, 2, dtype=F64, generator=_gen(6))
    with pytest.warns(RuntimeWarning, match="rounding floor"):
        _, info = cg(A.float(), B.float(), tol=1e-7, strict=False)
    assert info.iterations < info.max_iter and info.attainable > 1e-7
    assert max(info.residuals) < 1e-3


def test_cg_info_consistent_when_converged():
    n = 90
    A = spd(torch.logspace(0, 2, n, dtype=F64), seed=15)
    B = torch.randn(n, 3, dtype=F64, generator=_gen(16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged run must not warn
        X, info = cg(A, B, tol=1e-6)
    for ok, r in zip(info.converged, info.residuals):
        assert ok and r <= 1e-6
    assert info.seconds >= 0 and info.tol == 1e-6 and info.max_iter == min(2 * n, 1000)
    assert info.history[-1] <= 1e-6 and info.message is None


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"B": torch.zeros(5, 2, 2)}, ValueError, "B"),
        ({"B": torch.tensor([1.0, float("nan"), 0, 0, 0])}, ValueError, "B"),
        ({"B": [1.0, 2.0]}, TypeError, "B"),
        ({"B": torch.ones(5, dtype=torch.int64)}, TypeError, "B"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"tol": -1e-3}, ValueError, "tol"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"max_iter": 2.5}, ValueError, "max_iter"),
        ({"x0": torch.zeros(4)}, ValueError, "x0"),
        ({"A": torch.eye(6)}, ValueError, "A"),
        ({"A": lambda X: X[:-1]}, ValueError, "A"),
        ({"A": lambda X: X * float("inf")}, ValueError, "A"),
        ({"A": "not an operator"}, TypeError, "A"),
        ({"precond": 3}, TypeError, "precond"),
        ({"precond": lambda R: R[:1]}, ValueError, "precond"),
    ],
)
def test_cg_bad_inputs_name_the_argument(kwargs, exc, name):
    args = {"A": torch.eye(5), "B": torch.ones(5)}
    args.update(kwargs)
    A, B = args.pop("A"), args.pop("B")
    with pytest.raises(exc, match=name):
        cg(A, B, **args)


def test_cg_with_linear_operators():
    from linear_operator.operators import (
        AddedDiagLinearOperator,
        DenseLinearOperator,
        DiagLinearOperator,
    )

    n, lam = 80, 1e-2
    K = decaying_kernel(n + 50, seed=17)[:n, :n]  # PSD (a principal block)
    B = torch.randn(n, 3, dtype=F64, generator=_gen(18))
    ref = torch.linalg.solve(K + lam * torch.eye(n, dtype=F64), B)
    A1 = AddedDiagLinearOperator(DenseLinearOperator(K), DiagLinearOperator(torch.full((n,), lam)))
    A2 = DenseLinearOperator(K + lam * torch.eye(n, dtype=F64))
    for A in (A1, A2):
        X, info = cg(A, B, tol=1e-10, max_iter=2000)
        assert all(info.converged)
        assert float(rel_err(X, ref).max()) < 1e-7


def test_as_matmul_forms_agree():
    n = 7
    A = spd(torch.linspace(1, 3, n, dtype=F64), seed=19)
    X = torch.randn(n, 2, dtype=F64, generator=_gen(20))
    from linear_operator.operators import DenseLinearOperator

    for op in (A, DenseLinearOperator(A), lambda V: A @ V):
        assert torch.allclose(as_matmul(op)(X), A @ X)
    # a float64 dense operator applied to float32 vectors returns float32
    assert as_matmul(A)(X.float()).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Preconditioners
# ---------------------------------------------------------------------------------------------


def _pinv_formula(U: torch.Tensor, lam: torch.Tensor, mu: float) -> torch.Tensor:
    """Dense P⁻¹ = (λ_r + μ) U (Λ + μI)⁻¹ Uᵀ + (I − UUᵀ) (float64)."""
    n = U.shape[0]
    return (lam[-1] + mu) * (U / (lam + mu)) @ U.T + torch.eye(n, dtype=F64) - U @ U.T


def test_nystrom_pcg_cuts_iterations():
    n, lam = 300, 1e-3
    K = decaying_kernel(n, seed=21)
    A = K + lam * torch.eye(n, dtype=F64)
    B = torch.randn(n, 4, dtype=F64, generator=_gen(22))
    _, plain = cg(A, B, tol=1e-8, max_iter=3000)
    P = NystromPreconditioner(K, n, 50, shift=lam, seed=0)
    X, pre = cg(A, B, tol=1e-8, precond=P, max_iter=3000)
    assert all(plain.converged) and all(pre.converged)
    assert plain.iterations >= 3 * pre.iterations  # measured: 399 vs 30
    assert float(rel_err(X, torch.linalg.solve(A, B)).max()) < 1e-6
    assert P.rank == 50 and P.matvecs == 50 and P.block_matvecs == 1 and P.seconds >= 0


def test_nystrom_matches_dense_formula():
    n, r, mu = 150, 30, 1e-3
    K = decaying_kernel(n, seed=23)
    op = Counting(K)
    P = NystromPreconditioner(op, n, r, shift=mu, seed=1, dtype=F64, oversample=5)
    assert op.widths == [35]  # one block call with rank + oversample columns
    Omega = op.inputs[0]  # (n, 35)
    Y = K @ Omega
    K_hat = Y @ torch.linalg.solve(Omega.T @ Y, Y.T)  # Nyström approximation
    w, V = torch.linalg.eigh(0.5 * (K_hat + K_hat.T))
    lam_top, U_top = w.flip(0)[:r], V.flip(1)[:, :r]
    assert torch.allclose(P.eigenvalues, lam_top, rtol=1e-7, atol=1e-10)
    dense = _pinv_formula(U_top, lam_top, mu)
    got = P.dense_inverse()
    assert float((got - dense).abs().max()) <= 1e-8
    # apply to a block, a vector, and in float32
    R = torch.randn(n, 3, dtype=F64, generator=_gen(24))
    assert torch.allclose(P.solve(R), dense @ R, atol=1e-10)
    assert torch.allclose(P.solve(R[:, 0]), dense @ R[:, 0], atol=1e-10)
    R32 = P.solve(R.float())
    assert R32.dtype == torch.float32 and torch.allclose(R32.double(), dense @ R, atol=1e-5)


def test_restrict_is_the_principal_submatrix_of_the_approximation():
    n, r, mu, m = 200, 40, 1e-3, 150
    K = decaying_kernel(n, seed=31)
    P = NystromPreconditioner(K, n, r, shift=mu, seed=2)
    K_hat = (P.U * P.eigenvalues) @ P.U.T  # (n, n)
    for rows in (slice(0, m), torch.randperm(n, generator=_gen(32))[:m]):
        Pr = P.restrict(rows, 5e-3)
        idx = torch.arange(n)[rows]
        sub = K_hat[idx][:, idx]
        assert torch.allclose((Pr.U * Pr.eigenvalues) @ Pr.U.T, sub, atol=1e-10)
        assert torch.allclose(Pr.U.T @ Pr.U, torch.eye(Pr.rank, dtype=F64), atol=1e-10)
        assert Pr.shift == 5e-3 and Pr.n == m and Pr.rank <= r and P.matvecs == r
        # the restricted error K_rr − K̂_rr stays PSD (a Nyström property) and no larger
        err = K[idx][:, idx] - sub
        assert float(torch.linalg.eigvalsh(err).min()) >= -1e-10
        assert torch.linalg.matrix_norm(err, 2) <= torch.linalg.matrix_norm(K - K_hat, 2) + 1e-10
    # and it preconditions the subsystem about as well as a fresh sketch of the same rank
    A_r = K[:m, :m] + mu * torch.eye(m, dtype=F64)
    B = torch.randn(m, 3, dtype=F64, generator=_gen(33))
    _, plain = cg(A_r, B, tol=1e-8, max_iter=3000)
    _, shared = cg(A_r, B, tol=1e-8, precond=P.restrict(slice(0, m), mu), max_iter=3000)
    fresh = NystromPreconditioner(K[:m, :m], m, r, shift=mu, seed=2)
    _, own = cg(A_r, B, tol=1e-8, precond=fresh, max_iter=3000)
    assert plain.iterations >= 3 * shared.iterations
    assert shared.iterations <= 1.5 * own.iterations
    with pytest.raises(TypeError, match="rows"):
        P.restrict([0, 1], mu)
    with pytest.raises(ValueError, match="shift"):
        P.restrict(slice(0, 3), -1.0)


def test_congruence_carries_the_factor_to_l_k_lt():
    """congruence(L): the factor of L K Lᵀ is L K̂ Lᵀ exactly, its error stays PSD and no larger
    for ‖L‖ ≤ 1, and it preconditions L K Lᵀ + μI about as well as a fresh sketch (the CE Newton
    systems H^½ΘH^½ + λI: one sketch of Θ for every step)."""
    n, r, mu = 200, 40, 1e-3
    K = decaying_kernel(n, seed=34)
    P = NystromPreconditioner(K, n, r, shift=mu, seed=4)
    K_hat = (P.U * P.eigenvalues) @ P.U.T
    G = torch.randn(n, n, dtype=F64, generator=_gen(35))
    L = G / torch.linalg.matrix_norm(G, 2)  # ‖L‖ = 1, full rank
    Pl = P.congruence(lambda U: L @ U, 2e-3)
    assert torch.allclose((Pl.U * Pl.eigenvalues) @ Pl.U.T, L @ K_hat @ L.T, atol=1e-10)
    assert torch.allclose(Pl.U.T @ Pl.U, torch.eye(Pl.rank, dtype=F64), atol=1e-10)
    assert Pl.shift == 2e-3 and Pl.n == n and P.matvecs == r
    err = L @ K @ L.T - L @ K_hat @ L.T
    assert float(torch.linalg.eigvalsh(0.5 * (err + err.T)).min()) >= -1e-10
    assert torch.linalg.matrix_norm(err, 2) <= torch.linalg.matrix_norm(K - K_hat, 2) + 1e-10
    # the identity gives the same preconditioner back
    P_id = P.congruence(lambda U: U, mu)
    R = torch.randn(n, 2, dtype=F64, generator=_gen(36))
    assert torch.allclose(P_id.solve(R), P.solve(R), atol=1e-10)
    A_l = L @ K @ L.T + mu * torch.eye(n, dtype=F64)
    _, plain = cg(A_l, R, tol=1e-8, max_iter=3000)
    _, carried = cg(A_l, R, tol=1e-8, precond=P.congruence(lambda U: L @ U, mu), max_iter=3000)
    fresh = NystromPreconditioner(L @ K @ L.T, n, r, shift=mu, seed=4)
    _, own = cg(A_l, R, tol=1e-8, precond=fresh, max_iter=3000)
    assert plain.iterations >= 2 * carried.iterations
    assert carried.iterations <= 1.5 * own.iterations
    with pytest.raises(ValueError, match="shift"):
        P.congruence(lambda U: U, -1.0)


def test_nystrom_shift_conventions_agree_and_seed_is_deterministic():
    n, r, lam = 120, 20, 1e-2
    K = decaying_kernel(n, seed=25)
    A = K + lam * torch.eye(n, dtype=F64)
    P1 = NystromPreconditioner(K, n, r, shift=lam, seed=3)
    P2 = NystromPreconditioner(A, n, r, shift=lam, includes_shift=True, seed=3)
    assert torch.allclose(P1.eigenvalues, P2.eigenvalues, rtol=1e-8, atol=1e-10)
    assert float((P1.dense_inverse() - P2.dense_inverse()).abs().max()) < 1e-8
    P3 = NystromPreconditioner(K, n, r, shift=lam, seed=3)
    P4 = NystromPreconditioner(K, n, r, shift=lam, seed=4)
    R = torch.randn(n, 2, dtype=F64, generator=_gen(26))
    assert torch.equal(P1.solve(R), P3.solve(R))
    assert not torch.allclose(P1.solve(R), P4.solve(R))


def test_nystrom_exact_on_low_rank():
    n, r = 100, 10
    ev = torch.zeros(n, dtype=F64)
    ev[:r] = torch.logspace(0, 2, r, dtype=F64)
    K = spd(ev, seed=27)
    P = NystromPreconditioner(K, n, r, seed=5)  # shift = 0: K + 0·I is singular, still defined
    assert torch.allclose(P.eigenvalues, ev[:r].flip(0), rtol=1e-8)
    Pi = P.dense_inverse()
    assert torch.isfinite(Pi).all()
    # rank > true rank with μ = 0: zero eigenvalues are dropped, nothing blows up
    P0 = NystromPreconditioner(K, n, 2 * r, seed=5)
    assert P0.rank == r and torch.isfinite(P0.dense_inverse()).all()


def test_rpcholesky_matches_dense_formula_and_cuts_iterations():
    n, lam, r = 300, 1e-3, 50
    K = decaying_kernel(n, seed=29)
    A = K + lam * torch.eye(n, dtype=F64)
    op = Counting(K)
    P = RPCholeskyPreconditioner(op, n, r, diagonal=torch.diagonal(K), shift=lam, seed=0, dtype=F64)
    assert P.matvecs == r and P.block_matvecs == len(op.widths) == math.ceil(r / P_block(r))
    S = torch.tensor(P.pivots)
    assert len(set(P.pivots)) == r
    K_hat = K[:, S] @ torch.linalg.solve(K[S][:, S], K[S, :])
    w, V = torch.linalg.eigh(0.5 * (K_hat + K_hat.T))
    lam_top, U_top = w.flip(0)[:r], V.flip(1)[:, :r]
    dense = _pinv_formula(U_top, lam_top, lam)
    assert float((P.dense_inverse() - dense).abs().max()) <= 1e-7
    B = torch.randn(n, 2, dtype=F64, generator=_gen(30))
    _, plain = cg(A, B, tol=1e-8, max_iter=3000)
    _, pre = cg(A, B, tol=1e-8, precond=P, max_iter=3000)
    assert all(pre.converged) and plain.iterations >= 3 * pre.iterations
    # includes_shift recovers the same pivots/preconditioner from A = K + λI and diag(A)
    P2 = RPCholeskyPreconditioner(
        A, n, r, diagonal=torch.diagonal(A), shift=lam, includes_shift=True, seed=0
    )
    assert P2.pivots == P.pivots
    assert float((P2.dense_inverse() - P.dense_inverse()).abs().max()) < 1e-8


def P_block(rank: int) -> int:
    return max(1, math.ceil(rank / 4))  # the documented default block size


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"shift": -1.0}, ValueError, "shift"),
        ({"n": 0}, ValueError, "n"),
        ({"oversample": -1}, ValueError, "oversample"),
        ({"A": torch.eye(5)}, ValueError, "A"),
    ],
)
def test_nystrom_bad_inputs(kwargs, exc, name):
    args = {"A": torch.eye(6, dtype=F64), "n": 6, "rank": 2}
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        NystromPreconditioner(args.pop("A"), args.pop("n"), args.pop("rank"), **args)


def test_rpcholesky_bad_diagonal():
    with pytest.raises(ValueError, match="diagonal"):
        RPCholeskyPreconditioner(torch.eye(6, dtype=F64), 6, 2, diagonal=torch.ones(5))


# ---------------------------------------------------------------------------------------------
# Lanczos and SLQ
# ---------------------------------------------------------------------------------------------


def test_lanczos_extremes_orthogonality_and_one_call_per_step():
    n, s, m = 200, 40, 3
    A = spd(torch.linspace(1, 100, n, dtype=F64), seed=31)
    op = Counting(A)
    v = torch.randn(n, m, dtype=F64, generator=_gen(32))
    res = lanczos(op, v, s, return_basis=True)
    assert isinstance(res, LanczosResult)
    assert op.widths == [m] * s and res.block_matvecs == s and res.matvecs == m * s
    assert res.alpha.shape == (m, s) and res.beta.shape == (m, s) and res.basis.shape == (m, n, s)
    for j in range(m):
        T = res.tridiagonal(j)
        theta = torch.linalg.eigvalsh(T)
        assert abs(theta[0] - 1) < 1e-2 and abs(theta[-1] - 100) < 1e-2
        Q = res.basis[j]
        assert float((Q.T @ Q - torch.eye(s, dtype=F64)).abs().max()) < 1e-12
        assert float((Q.T @ A @ Q - T).abs().max()) < 1e-10


def test_lanczos_breakdown_and_vector_start():
    n = 60
    A = spd(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64).repeat_interleave(12), seed=33)
    op = Counting(A)
    res = lanczos(op, torch.randn(n, 2, dtype=F64, generator=_gen(34)), 20)
    assert res.steps == [5, 5] and len(op.widths) == 5  # invariant subspace: stop, no wasted calls
    theta = torch.linalg.eigvalsh(res.tridiagonal(1))
    assert torch.allclose(theta, torch.arange(1.0, 6.0, dtype=F64), atol=1e-10)
    assert float(res.beta[0, 4]) == 0.0
    alpha, beta, Q = lanczos(A, torch.ones(n, dtype=F64), 4, return_basis=True)
    assert alpha.shape == (4,) and beta.shape == (4,) and Q.shape == (n, 4)
    with pytest.raises(ValueError, match="v"):
        lanczos(A, torch.zeros(n, dtype=F64), 3)
    with pytest.raises(ValueError, match="steps"):
        lanczos(A, torch.ones(n, dtype=F64), 0)


def test_lanczos_without_reorthogonalization_runs():
    n = 100
    A = spd(torch.linspace(1, 10, n, dtype=F64), seed=35)
    a, b, Q = lanczos(A, torch.randn(n, dtype=F64, generator=_gen(36)), 15, reorthogonalize=False)
    assert Q is None and torch.isfinite(a).all() and torch.isfinite(b).all()


def test_slq_logdet_within_three_stderr():
    n = 200
    A = spd(torch.linspace(0.5, 20, n, dtype=F64), seed=37)
    true = dense_logdet(A)
    assert true == pytest.approx(float(torch.logdet(A)), rel=1e-12)
    op = Counting(A)
    est = slq_logdet(op, n, probes=30, steps=30, seed=0, dtype=F64)
    assert op.widths == [30] * 30 and est.block_matvecs == 30 and est.matvecs == 900
    assert est.stderr > 0 and abs(est.value - true) <= 3 * est.stderr
    assert len(est.per_probe) == 30 and est.value == pytest.approx(sum(est.per_probe) / 30)
    d = json.loads(json.dumps(est.to_dict()))
    assert d["probes"] == 30 and d["shift"] is None and d["rule"] == "gauss"
    assert d["lower"] is None and d["upper"] == pytest.approx(est.value)


def test_slq_shift_reduces_error_on_clustered_spectrum():
    # Θ + λI: 40 eigenvalues over 4 decades, the other 160 of Θ tiny, so a cluster at λ.
    n, lam = 200, 1e-3
    ev = torch.cat(
        [
            10.0 ** torch.linspace(2, -2, 40, dtype=F64),
            10.0 ** torch.linspace(-4, -6, n - 40, dtype=F64),
        ]
    )
    A = spd(ev + lam, seed=39)
    true = dense_logdet(A)
    plain = slq_logdet(A, n, probes=30, steps=15, seed=0)
    shifted = slq_logdet(A, n, probes=30, steps=15, seed=0, shift=lam)
    se = plain.stderr
    err_plain, err_shift = abs(plain.value - true), abs(shifted.value - true)
    # measured at 15 steps: Gauss +218, Radau −26, midpoint +96 (stderr ≈ 10)
    assert plain.value - true > 3 * se  # the plain (Gauss) rule is biased upward here
    assert err_shift < 0.6 * err_plain
    assert abs(shifted.lower - true) < 0.25 * err_plain  # the Radau node sits on the cluster
    # same probes: the Gauss value of the shifted run is the plain estimate; bounds bracket
    assert shifted.gauss_value == pytest.approx(plain.value, rel=1e-9)
    assert shifted.lower - 3 * se <= true <= shifted.upper + 3 * se
    assert shifted.lower <= shifted.value <= shifted.upper
    assert shifted.quadrature_halfwidth > 3 * se  # says: 15 steps are not enough
    assert shifted.rule.startswith("gauss/gauss-radau") and shifted.shift == lam
    # with enough steps the bracket closes and the estimate is within the Monte-Carlo error
    enough = slq_logdet(A, n, probes=30, steps=45, seed=0, shift=lam)
    assert enough.quadrature_halfwidth < enough.stderr
    assert abs(enough.value - true) <= 3 * enough.stderr
    d = json.loads(json.dumps(enough.to_dict()))
    assert d["shift"] == lam and d["lower"] <= d["upper"] + 1e-9 * abs(d["upper"])


def test_slq_trace_identities():
    n = 100
    A = spd(torch.linspace(1, 5, n, dtype=F64), seed=41)
    ones = slq_trace(A, n, torch.ones_like, probes=8, steps=10, seed=1)
    assert ones.value == pytest.approx(n, rel=1e-12)  # the quadrature weights sum to one
    tr = slq_trace(A, n, lambda t: t, probes=40, steps=10, seed=1)
    assert abs(tr.value - float(torch.trace(A))) <= 4 * tr.stderr


def test_logdet_errors_on_indefinite():
    n = 30
    A = spd(torch.linspace(-1, 5, n, dtype=F64), seed=43)
    with pytest.raises(ValueError, match="positive definite"):
        dense_logdet(A)
    with pytest.raises(ValueError, match="A"):
        slq_logdet(A, n, probes=4, steps=n, seed=0)
    with pytest.raises(ValueError, match="shift"):
        slq_logdet(A, n, shift=-1.0)


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_solvers_on_cuda():
    n, lam = 300, 1e-3
    K = decaying_kernel(n, seed=45)
    A = K + lam * torch.eye(n, dtype=F64)
    B = torch.randn(n, 3, dtype=F64, generator=_gen(46))
    dev = torch.device("cuda")
    # float32 operator, float64 scalars: a ridge of 0.1 keeps tol 1e-4 above the float32 floor
    lam32 = 0.1
    A32 = (K + lam32 * torch.eye(n, dtype=F64)).to(dev, torch.float32)
    P = NystromPreconditioner(K.to(dev, torch.float32), n, 50, shift=lam32, seed=0)
    assert P.U.device.type == "cuda"
    X, info = cg(lambda V: A32 @ V, B.to(dev, torch.float32), precond=P, tol=1e-4)
    assert X.device.type == "cuda" and X.dtype == torch.float32 and all(info.converged)
    ref32 = torch.linalg.solve(K + lam32 * torch.eye(n, dtype=F64), B)
    assert float(rel_err(X.cpu(), ref32).max()) < 1e-3
    # float64 on the device, with a LinearOperator-free dense tensor, and SLQ
    ref = torch.linalg.solve(A, B)
    X64, info64 = cg(A.to(dev), B.to(dev), tol=1e-10, max_iter=3000)
    assert all(info64.converged) and float(rel_err(X64.cpu(), ref).max()) < 1e-7
    est = slq_logdet(A.to(dev), n, probes=16, steps=40, seed=0, shift=lam)
    assert abs(est.value - dense_logdet(A)) <= 4 * est.stderr + est.quadrature_halfwidth
    res = lanczos(A.to(dev, torch.float32), torch.ones(n, 2, device=dev), 10)
    assert res.alpha.dtype == F64 and res.steps == [10, 10]
