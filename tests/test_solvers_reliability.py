"""Convergence by design (issue 12): budgets, early stop with a diagnosis, negative curvature vs
slow convergence, overflow, float32 refinement with float64 residuals, the adaptive Nyström
preconditioner, progress bars and warnings that point at the caller.

Float64 dense solves are the judge; matrices are small (n ≤ 300), the file runs in seconds.
"""

from __future__ import annotations

import json
import math
import time
import warnings

import pytest
import torch
from model_zoo import spd

from ntkscrub.solvers import (
    CGNonFinite,
    CGNotConverged,
    NystromPreconditioner,
    cg,
    nystrom_preconditioner,
)
from ntkscrub.solvers.cg import ridge_for_iterations, ritz_extremes

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def true_rel_residual(A: torch.Tensor, X: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    X2, B2 = X.reshape(A.shape[0], -1).to(F64), B.reshape(A.shape[0], -1).to(F64)
    return (B2 - A @ X2).norm(dim=0) / B2.norm(dim=0)


class LowPrecisionProducts:
    """A callable operator whose products on a float32 block are rounded to bfloat16 (≈ 3
    significant digits, like TF32/bf16 tensor-core matmuls), and exact on a float64 block."""

    def __init__(self, A: torch.Tensor) -> None:
        self.A = A
        self.calls = 0

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        Y = self.A @ X.to(F64)
        if X.dtype == F64:
            return Y
        return Y.to(torch.bfloat16).to(X.dtype)


# --------------------------------------------------------------------------- defaults, diagnosis
def test_cg_default_is_strict_and_attaches_the_partial_solution():
    A = spd(torch.logspace(-3, 2, 120, dtype=F64), seed=1)
    B = torch.randn(120, 2, dtype=F64, generator=_gen(2))
    with pytest.raises(CGNotConverged) as exc:
        cg(A, B, tol=1e-10, max_iter=5, label="Θ_DD + λI")
    err = exc.value
    assert "Θ_DD + λI" in str(err) and err.info.label == "Θ_DD + λI"
    assert err.info.status == "max_iter" and not err.info.all_converged
    assert err.x is not None and err.x.shape == B.shape
    # the partial solution is the iterate whose residuals the info reports
    res = true_rel_residual(A, err.x, B)
    assert torch.allclose(res, torch.tensor(err.info.residuals, dtype=F64), rtol=1e-6)
    assert float(err.x.abs().sum()) > 0  # it is the iterate, not zeros
    d = err.info.to_dict()
    json.dumps(d, allow_nan=False)  # strict JSON
    assert d["all_converged"] is False and d["label"] == "Θ_DD + λI"


def test_early_stop_estimates_kappa_and_the_ridge_that_converges():
    n = 200
    ev = torch.logspace(-4, 2, n, dtype=F64)  # κ = 1e6
    A = spd(ev, seed=3)
    b = torch.randn(n, dtype=F64, generator=_gen(4))
    budget = 60
    with pytest.raises(CGNotConverged) as exc:
        cg(A, b, tol=1e-8, max_matvecs=budget)
    info = exc.value.info
    assert info.status == "budget", info.message
    assert info.matvecs < budget  # stopped EARLY, before the budget was spent
    assert info.predicted_iterations is not None and info.predicted_iterations > 2 * (
        budget - info.matvecs
    )
    # κ from CG's own Lanczos coefficients: Ritz values lie inside the spectrum.
    assert 1e-4 * (1 - 1e-9) <= info.eig_min and info.eig_max <= 1e2 * (1 + 1e-9)
    assert info.eig_max > 0.5 * 1e2  # the top of the spectrum is found quickly
    assert info.kappa == pytest.approx(info.eig_max / info.eig_min)
    assert info.matvec_seconds is not None and info.matvec_seconds > 0
    msg = str(exc.value)
    assert "κ" in msg and "ridge" in msg and "Stopped early" in msg and "per matvec" in msg
    # The recommended extra ridge makes the system converge within the hinted iterations.
    delta, k = info.ridge_hint, info.hint_iterations
    assert delta is not None and delta > 0 and k is not None and k <= budget
    _, ok = cg(A + delta * torch.eye(n, dtype=F64), b, tol=1e-8, max_iter=k)
    assert ok.all_converged and ok.iterations <= k


def test_ritz_extremes_match_the_lanczos_matrix_of_cg():
    """Without a preconditioner, after n steps the Ritz values are A's extreme eigenvalues."""
    ev = torch.linspace(1.0, 50.0, 30, dtype=F64)
    A = spd(ev, seed=5)
    b = torch.randn(30, dtype=F64, generator=_gen(6))
    # Re-run the recurrence by hand and compare with ritz_extremes.
    x, r = torch.zeros(30, dtype=F64), b.clone()
    p, rz = r.clone(), float(r @ r)
    alphas, betas = [], []
    for _ in range(30):
        Ap = A @ p
        a = rz / float(p @ Ap)
        x, r = x + a * p, r - a * Ap
        rz_new = float(r @ r)
        alphas.append(a)
        betas.append(rz_new / rz)
        p, rz = r + (rz_new / rz) * p, rz_new
    lo, hi = ritz_extremes(alphas, betas[:-1])
    assert lo == pytest.approx(1.0, rel=1e-6) and hi == pytest.approx(50.0, rel=1e-6)
    assert ritz_extremes([1.0], []) is None
    # the κ-based ridge formula: (λmax + δ)/(λmin + δ) = κ_target exactly
    d = ridge_for_iterations(1e-6, 100.0, 40, 1e-6)
    k_target = (2 * 40 / math.log(2 / 1e-6)) ** 2
    assert (100.0 + d) / (1e-6 + d) == pytest.approx(k_target, rel=1e-9)


def test_negative_curvature_is_named_not_mistaken_for_slow_convergence():
    ev = torch.cat([torch.linspace(1, 10, 50, dtype=F64), -torch.ones(3, dtype=F64)])
    A = spd(ev, seed=7)
    b = torch.randn(53, dtype=F64, generator=_gen(8))
    with pytest.raises(CGNotConverged) as exc:
        cg(A, b, tol=1e-10, label="P")
    info = exc.value.info
    assert info.status == "not_positive_definite"
    assert info.negative_curvature is not None and info.negative_curvature <= 0
    assert "Negative curvature" in str(exc.value) and "not positive definite" in str(exc.value)
    assert "add ≈" not in str(exc.value)  # no ridge advice for an indefinite operator
    # slow convergence of an SPD system is reported as such, not as indefiniteness
    with pytest.raises(CGNotConverged) as slow:
        cg(spd(torch.logspace(-6, 2, 53, dtype=F64), seed=9), b, tol=1e-12, max_iter=8)
    assert slow.value.info.status == "max_iter" and "Negative curvature" not in str(slow.value)


def test_overflowing_products_are_reported_as_such():
    A = spd(torch.linspace(1, 2, 20, dtype=F64), seed=10)
    calls = {"n": 0}

    def op(X):
        calls["n"] += 1
        return A @ X * (1e308 if calls["n"] >= 4 else 1.0) * (1e10 if calls["n"] >= 4 else 1.0)

    b = torch.randn(20, dtype=F64, generator=_gen(11))
    with pytest.raises(CGNonFinite) as exc:
        cg(op, b, tol=1e-12, strict=False, label="Θ_rr")  # raised whatever strict says
    err = exc.value
    assert isinstance(err, ValueError) and isinstance(err, CGNotConverged)
    assert err.info.status == "nonfinite" and "overflow" in str(err) and "Θ_rr" in str(err)
    assert err.x is not None and bool(torch.isfinite(err.x).all())
    json.dumps(err.info.to_dict(), allow_nan=False)


def test_time_budget_stops_a_slow_operator():
    A = spd(torch.logspace(-5, 1, 80, dtype=F64), seed=12)

    def slow(X):
        time.sleep(0.01)
        return A @ X

    b = torch.randn(80, dtype=F64, generator=_gen(13))
    t0 = time.perf_counter()
    with pytest.raises(CGNotConverged) as exc:
        cg(slow, b, tol=1e-12, max_seconds=0.4)
    assert time.perf_counter() - t0 < 2.0
    info = exc.value.info
    assert info.status in ("budget", "max_seconds") and info.max_seconds == 0.4
    assert info.matvec_seconds >= 0.009


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"max_seconds": "4"}, TypeError, "max_seconds"),
        ({"max_seconds": 0.0}, ValueError, "max_seconds"),
        ({"max_seconds": float("nan")}, ValueError, "max_seconds"),
        ({"max_matvecs": 0}, ValueError, "max_matvecs"),
        ({"max_matvecs": 2.0}, TypeError, "max_matvecs"),
        ({"refine": "yes"}, TypeError, "refine"),
        ({"label": 3}, TypeError, "label"),
        ({"progress": "on"}, TypeError, "progress"),
        ({"early_stop": 1}, TypeError, "early_stop"),
    ],
)
def test_new_cg_keywords_are_checked(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        cg(torch.eye(5), torch.ones(5), **kwargs)


# --------------------------------------------------------------------------- float32 vs float64
def test_float32_refinement_reaches_tol_with_float64_residuals():
    n = 150
    A = spd(torch.logspace(0, 2, n, dtype=F64), seed=14)  # κ = 100
    B = torch.randn(n, 2, dtype=F64, generator=_gen(15))
    ref = torch.linalg.solve(A, B)
    op = LowPrecisionProducts(A)
    # Old behaviour (no refinement): bf16-rounded products cannot get below ~1e-3.
    with pytest.raises(CGNotConverged) as exc:
        cg(op, B.float(), tol=1e-5, refine=False)
    assert min(exc.value.info.residuals) > 1e-5
    # Auto refinement: float64 residuals, float32 corrections, float64 accumulation.
    X, info = cg(op, B.float(), tol=1e-5)
    assert X.dtype == torch.float32 and info.refinements >= 1 and info.all_converged
    assert float(true_rel_residual(A, X, B).max()) <= 1e-5  # the TRUE residual of what is returned
    assert float(((X.to(F64) - ref).norm(dim=0) / ref.norm(dim=0)).max()) < 1e-4
    # float64 solve of the same system: no refinement needed
    X64, info64 = cg(op, B, tol=1e-10)
    assert info64.refinements == 0 and float(true_rel_residual(A, X64, B).max()) <= 1e-10


def test_float32_refinement_with_the_adaptive_preconditioner():
    n = 200
    # κ ≈ 60: bf16 products (u ≈ 4e-3) give corrections of relative accuracy κu < 1, the regime
    # where refinement converges
    ev = torch.cat([torch.logspace(1.5, 0, 20, dtype=F64), torch.full((n - 20,), 0.5, dtype=F64)])
    K = spd(ev, seed=16)
    mu = 1e-2
    A = K + mu * torch.eye(n, dtype=F64)
    B = torch.randn(n, 2, dtype=F64, generator=_gen(17))
    ref = torch.linalg.solve(A, B)
    M = nystrom_preconditioner(K, n, shift=mu, seed=0)
    op = LowPrecisionProducts(A)
    X, info = cg(op, B.float(), precond=M, tol=1e-6)
    assert info.all_converged and info.refinements >= 1
    assert float(true_rel_residual(A, X, B).max()) <= 1e-6
    assert float(((X.to(F64) - ref).norm(dim=0) / ref.norm(dim=0)).max()) < 1e-3
    # float32 operator (products in float32 only): same answer as float64 to float32 accuracy
    X32, i32 = cg(A.float(), B.float(), precond=M, tol=1e-5)
    X64, i64 = cg(A, B, precond=M, tol=1e-10)
    assert i32.all_converged and i64.all_converged and i64.iterations < 60
    assert float(((X32.to(F64) - X64).norm(dim=0) / X64.norm(dim=0)).max()) < 1e-3


def test_float32_tensor_operator_is_not_refined_needlessly():
    """A float32 dense operator computes float32 products: auto refinement would only burn
    matvecs, so it is skipped and the rounding floor is reported."""
    A = spd(10.0 ** torch.linspace(0, -6, 100, dtype=F64), seed=18) + 1e-3 * torch.eye(
        100, dtype=F64
    )
    with pytest.raises(CGNotConverged) as exc:
        cg(A.float(), torch.randn(100, generator=_gen(19)), tol=1e-8)
    assert exc.value.info.refinements == 0 and "rounding floor" in str(exc.value)


# --------------------------------------------------------------------------- adaptive Nyström
def test_adaptive_nystrom_doubles_until_the_shift_is_reached():
    n = 300
    ev = torch.cat([10.0 ** torch.linspace(2, -3, 100, dtype=F64), torch.zeros(n - 100, dtype=F64)])
    K = spd(ev, seed=20)
    for mu, lo_rank in ((1.0, 16), (1e-2, 32)):
        M = nystrom_preconditioner(K, n, shift=mu, seed=1)
        assert isinstance(M, NystromPreconditioner) and M.stop_reason == "factor"
        ranks = [h["rank"] for h in M.history]
        assert ranks == [16 * 2**i for i in range(len(ranks))]  # doubling
        assert M.matvecs == ranks[-1] and M.block_matvecs == len(ranks) and M.seconds > 0
        assert M.eigenvalues[-1] <= 10 * mu  # the stopping rule
        if len(ranks) > 1:  # the previous round did not meet it
            assert M.history[-2]["eig_min"] > 10 * mu
        assert lo_rank <= M.rank <= n // 4  # default cap: a build costs ≤ n/4 matvecs
        # the sketch's eigenvalues are those of K (exact arithmetic: Nyström error is PSD)
        top = torch.linalg.eigvalsh(K).flip(0)[: M.rank]
        assert bool((M.eigenvalues <= top * (1 + 1e-8) + 1e-10).all())
        B = torch.randn(n, 3, dtype=F64, generator=_gen(21))
        A = K + mu * torch.eye(n, dtype=F64)
        _, plain = cg(A, B, tol=1e-8, strict=False)
        _, pre = cg(A, B, precond=M, tol=1e-8)
        assert pre.all_converged and pre.iterations <= 40
        assert pre.iterations < plain.iterations
    small = nystrom_preconditioner(K, n, shift=1.0, seed=1)
    tiny = nystrom_preconditioner(K, n, shift=1e-3, seed=1)
    assert tiny.rank > small.rank  # a smaller ridge needs a larger rank


def test_adaptive_nystrom_caps_and_integer_rank():
    n = 200
    K = spd(torch.logspace(2, -8, n, dtype=F64), seed=22)
    capped = nystrom_preconditioner(K, n, shift=1e-9, max_rank=48, seed=0)
    assert capped.stop_reason == "max_rank" and capped.rank <= 48 and capped.matvecs == 48
    mv = nystrom_preconditioner(K, n, shift=1e-9, max_matvecs=40, seed=0)
    assert mv.stop_reason == "max_matvecs" and mv.matvecs == 40
    fixed = nystrom_preconditioner(K, n, 24, shift=1e-3, seed=0)
    assert fixed.rank == 24 and fixed.matvecs == 24
    with pytest.raises(ValueError, match="rank"):
        nystrom_preconditioner(K, n, "big")
    with pytest.raises(ValueError, match="factor"):
        nystrom_preconditioner(K, n, factor=1.0)
    with pytest.raises(ValueError, match="max_seconds"):
        nystrom_preconditioner(K, n, max_seconds=-1)
    # deterministic given the seed; includes_shift gives the same factor
    a = nystrom_preconditioner(K, n, shift=1e-2, seed=3)
    b = nystrom_preconditioner(
        K + 1e-2 * torch.eye(n, dtype=F64), n, shift=1e-2, seed=3, includes_shift=True
    )
    assert a.rank == b.rank
    assert torch.allclose(a.dense_inverse(), b.dense_inverse(), atol=1e-8)


def _pcg_total(K: torch.Tensor, M: NystromPreconditioner, mu: float, B: torch.Tensor) -> int:
    """Products of a build + one PCG solve per column of B (2 columns = 2 solves)."""
    A = K + mu * torch.eye(K.shape[0], dtype=F64)
    its = [cg(A, B[:, j], precond=M, tol=1e-3, strict=False)[1].iterations for j in (0, 1)]
    return M.matvecs + sum(its)


def test_adaptive_nystrom_cost_rule_stops_near_the_cheapest_rank():
    """A slowly decaying (NTK-like, λ_k ∝ k^-1.5) spectrum: the factor rule alone sketches twice
    the columns that pay; the cost rule (2 solves to 1e-3) stops where build + CG products are
    within 15 % of the best fixed rank of a doubling grid — and it never reads a clock."""
    n, mu = 1200, 1.0
    K = spd(3e4 * torch.arange(1, n + 1, dtype=F64) ** -1.5, seed=40)
    B = torch.randn(n, 2, dtype=F64, generator=_gen(41))
    free = nystrom_preconditioner(K, n, shift=mu, seed=0)
    costed = nystrom_preconditioner(K, n, shift=mu, seed=0, solves=2, tol=1e-3)
    assert free.stop_reason == "factor" and free.rank == 128
    assert costed.stop_reason == "cost" and costed.rank < free.rank
    assert all("predicted_saving" in h for h in costed.history)
    assert costed.history[-1]["predicted_saving"] <= costed.rank  # the doubling it refused
    totals = {r: _pcg_total(K, NystromPreconditioner(K, n, r, shift=mu, seed=0), mu, B)
              for r in (16, 32, 64, 128, 256)}  # fmt: skip
    assert _pcg_total(K, costed, mu, B) <= 1.15 * min(totals.values())
    assert _pcg_total(K, free, mu, B) > 1.3 * min(totals.values())  # what the rule avoids
    # more solves to serve → a larger factor pays; repeatable bit for bit
    many = nystrom_preconditioner(K, n, shift=mu, seed=0, solves=50, tol=1e-3)
    assert many.rank > costed.rank
    again = nystrom_preconditioner(K, n, shift=mu, seed=0, solves=2, tol=1e-3)
    assert again.rank == costed.rank and torch.equal(again.eigenvalues, costed.eigenvalues)
    for bad in ({"solves": 0}, {"solves": True}, {"tol": 1.5}, {"tol": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            nystrom_preconditioner(K, n, shift=mu, **bad)


# --------------------------------------------------------------------------- progress, warnings
def test_progress_bar_shown_on_request_and_quiet_when_not_a_tty(capsys):
    A = spd(torch.logspace(0, 2, 60, dtype=F64), seed=23)
    b = torch.randn(60, dtype=F64, generator=_gen(24))
    cg(A, b, tol=1e-8, progress=True, label="Θ_DD")
    err = capsys.readouterr().err
    assert "cg[Θ_DD]" in err
    cg(A, b, tol=1e-8)  # progress=None: stderr is captured (not a TTY) → no bar
    nystrom_preconditioner(A, 60, shift=1.0)
    assert capsys.readouterr().err == ""
    cg(A, b, tol=1e-8, progress=False)
    assert capsys.readouterr().err == ""


def test_non_strict_warning_points_at_the_caller():
    A = spd(torch.logspace(0, 3, 50, dtype=F64), seed=25)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cg(A, torch.ones(50, dtype=F64), tol=1e-12, max_iter=3, strict=False)
    assert len(rec) == 1 and rec[0].filename == __file__


def test_no_ridge_hint_when_the_budget_allows_too_few_iterations():
    """With a budget of a couple of iterations even κ = 1 cannot reach tol: the diagnosis must say
    the budget is the problem instead of recommending an infinite ridge (seen as "add ≈ inf")."""
    n = 60
    A = spd(torch.logspace(-2, 2, n, dtype=F64), seed=7)
    b = torch.randn(n, dtype=F64, generator=_gen(8))
    with pytest.raises(CGNotConverged) as exc:
        cg(A, b, tol=1e-10, max_iter=3)
    info, msg = exc.value.info, str(exc.value)
    assert info.kappa is not None and info.hint_iterations is not None
    assert info.ridge_hint is None
    assert "inf" not in msg and "No ridge converges" in msg and "budget" in msg
