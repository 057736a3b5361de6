"""Mixed-precision solves (issue 14, item 2): low-precision products inside PCG, the true residual
in full precision (ntkscrub.solvers.mixed_cg, SolverConfig.inner_precision).

Low precision is emulated on CPU by operator wrappers that round every product (input and output)
to bfloat16 / float16, or add a controlled relative perturbation, around float64 operators — a
dense SPD matrix and the NTK of a tiny MLP — so each result is checked against float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from model_zoo import make_cnn, make_data, make_mlp, spd

from ntkscrub.config import SolverConfig
from ntkscrub.operators import NTK, Inverse, Jacobian, SolveNotConverged
from ntkscrub.params import ParameterSpace
from ntkscrub.scrub import scrub
from ntkscrub.solvers import (
    CGNotConverged,
    PrecisionFallbackWarning,
    cg,
    low_precision_products,
    mixed_cg,
    round_to_precision,
)

F64 = torch.float64


def rounded(A, dtype):
    """A's products with input and output rounded to ``dtype`` (a test-local emulation)."""

    def matmul(X):
        return (A @ X.to(dtype).to(A.dtype)).to(dtype).to(X.dtype)

    return matmul


def perturbed(A, delta, seed=0):
    """A's products plus a random error of relative norm ``delta`` per column (a fresh draw at
    each call, as rounding noise is)."""
    g = torch.Generator().manual_seed(seed)

    def matmul(X):
        Y = A @ X
        E = torch.randn(Y.shape, generator=g, dtype=Y.dtype)
        return Y + delta * E * (Y.norm(dim=0) / E.norm(dim=0))

    return matmul


def plain_cg(lo, B, tol):
    """CG with the low-precision products alone (the old path), its miss not warned about."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return cg(lo, B, tol=tol, strict=False, refine=False, max_seconds=60)[0]


def true_rel(A, x, b):
    return float((b - A @ x).norm() / b.norm())


def rhs(n, k=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*((n,) if k is None else (n, k)), generator=g, dtype=F64)


# ----------------------------------------------------------------------------- dense SPD
@pytest.mark.parametrize(
    "make_inner", [lambda A: rounded(A, torch.bfloat16), lambda A: rounded(A, torch.float16)]
)
def test_mixed_reaches_tol_where_plain_low_precision_cg_stalls(make_inner):
    A = spd(torch.logspace(-2, 0, 200), seed=0)  # κ = 100
    b = rhs(200)
    x_ref = torch.linalg.solve(A, b)
    lo = make_inner(A)
    tol = 1e-10
    x_plain = plain_cg(lo, b, tol)
    assert true_rel(A, x_plain, b) > 1e3 * tol  # the old path: low-precision CG stalls
    b0 = b.clone()
    x, info = mixed_cg(A, b, inner=lo, tol=tol, precision="bf16", max_seconds=60)
    assert torch.equal(b, b0)
    assert true_rel(A, x, b) <= tol and info.residuals[0] <= tol and info.all_converged
    # relative error ≤ κ · relative residual
    assert float((x - x_ref).norm() / x_ref.norm()) <= 100 * tol
    assert info.inner_matvecs > 0 and info.outer_matvecs == info.refinements >= 2
    assert info.matvecs == info.inner_matvecs + info.outer_matvecs
    assert not info.fallback and info.inner_precision == "bf16"
    assert len(info.history) == info.refinements + 1 and info.history[-1] <= tol


def test_controlled_perturbation_block_warm_start_and_zero_column():
    """3 % product error (what measured bf16 products carry on a GPU), three right-hand sides,
    one of them zero, and a warm start."""
    A = spd(torch.logspace(-1, 0, 120), seed=2)  # κ = 10
    B = rhs(120, 3)
    B[:, 1] = 0
    X_ref = torch.linalg.solve(A, B)
    lo = perturbed(A, 3e-2)
    x0 = X_ref + 1e-3 * rhs(120, 3, seed=5)
    x0[:, 1] = 0
    x0_copy = x0.clone()
    X_plain = plain_cg(lo, B, 1e-9)
    assert (B - A @ X_plain)[:, [0, 2]].norm(dim=0).div(B[:, [0, 2]].norm(dim=0)).max() > 1e-6
    X, info = mixed_cg(A, B, inner=lo, x0=x0, tol=1e-9, max_seconds=60)
    assert torch.equal(x0, x0_copy)
    assert torch.all(X[:, 1] == 0) and info.iterations_per_column[1] == 0
    for j in (0, 2):
        assert true_rel(A, X[:, j], B[:, j]) <= 1e-9
    assert float((X - X_ref).norm() / X_ref.norm()) <= 10 * 1e-9
    assert not info.fallback


def test_float32_right_hand_side_with_float64_residuals():
    """A float32 solve (float32 inner vectors, float64 residuals and accumulation) reaches a tol
    that float32 CG with the same bf16 products cannot; below what a float32 x can represent
    (≈ eps32·κ) it says so."""
    A = spd(torch.logspace(-2, 0, 150), seed=3)
    b = rhs(150).float()
    lo = rounded(A, torch.bfloat16)
    tol = 1e-6
    assert true_rel(A, plain_cg(lo, b, tol).double(), b.double()) > 10 * tol
    x, info = mixed_cg(A, b, inner=lo, tol=tol, max_seconds=60)
    assert x.dtype == torch.float32 and info.all_converged
    assert true_rel(A, x.double(), b.double()) <= tol
    with pytest.raises(CGNotConverged, match="rounded to torch.float32"):
        mixed_cg(A, b, inner=lo, tol=1e-9, max_seconds=60)


# ----------------------------------------------------------------------------- stagnation
def test_stagnation_falls_back_with_a_warning_or_raises():
    A = spd(torch.logspace(-5, 0, 150), seed=4)  # κ = 1e5: bf16 error × κ ≫ 1
    b = rhs(150)
    lo = rounded(A, torch.bfloat16)
    with pytest.warns(PrecisionFallbackWarning, match=r"cg\[Θ_test\].*stagnated.*full-precision"):
        x, info = mixed_cg(A, b, inner=lo, tol=1e-10, label="Θ_test", max_seconds=60)
    assert info.fallback and info.all_converged and true_rel(A, x, b) <= 1e-10
    assert info.outer_matvecs > info.refinements  # the fallback's inner solves are full precision
    with pytest.raises(CGNotConverged, match=r"cg\[Θ_test\].*stagnated.*fallback=False") as err:
        mixed_cg(A, b, inner=lo, tol=1e-10, label="Θ_test", fallback=False, max_seconds=60)
    assert err.value.info.status == "stalled" and not err.value.info.fallback
    assert err.value.x.shape == b.shape
    # the partial result is the best iterate (a correction that made it worse was undone) and
    # its reported residual is its true one
    assert true_rel(A, err.value.x, b) <= 1.0 + 1e-12
    assert err.value.info.residuals[0] == pytest.approx(true_rel(A, err.value.x, b), rel=1e-9)


def test_float16_overflow_falls_back_or_raises():
    """float16 products of an operator with entries ≈ 1e6 overflow (65504 is float16's max):
    the solve finishes in full precision with a warning, or raises CGNonFinite without fallback."""
    from ntkscrub.solvers import CGNonFinite

    A = 1e6 * spd(torch.logspace(-1, 0, 60), seed=7)
    b = rhs(60)
    lo = rounded(A, torch.float16)
    with pytest.warns(PrecisionFallbackWarning, match="overflowed or was NaN"):
        x, info = mixed_cg(A, b, inner=lo, tol=1e-10, max_seconds=60)
    assert info.fallback and info.all_converged and true_rel(A, x, b) <= 1e-10
    assert info.inner_matvecs > 0  # the overflowing products are counted
    with pytest.raises(CGNonFinite):
        mixed_cg(A, b, inner=lo, tol=1e-10, fallback=False, max_seconds=60)


# ----------------------------------------------------------------------------- NTK of an MLP
def mlp_ntk(dtype=F64, ridge=1.0, n=30, hidden=16):
    model = make_mlp(6, hidden, 3).to(dtype)
    X, Y = make_data("mlp", n)
    J = Jacobian(ParameterSpace(model), (X.to(dtype), Y))
    return NTK(jac_a=J, ridge=ridge)


def test_inverse_with_emulated_bf16_products_on_an_ntk():
    K = mlp_ntk()
    b = rhs(K.shape[0])
    Kd = K.to_dense()
    x_ref = torch.linalg.solve(Kd, b)
    kappa = float(torch.linalg.cond(Kd))
    lo, desc = low_precision_products(K, "bfloat16")
    assert desc == "bfloat16 (emulated)"
    x_plain = plain_cg(lo, b, 1e-10)
    assert true_rel(Kd, x_plain, b) > 1e-6  # low-precision products alone stall
    inv = Inverse(K, SolverConfig(inner_precision="bfloat16", precond_rank=10), label="Θ")
    x = inv.solve(b)
    rec = inv.records[-1]
    assert true_rel(Kd, x, b) <= 1e-10 and rec["converged"]
    assert float((x - x_ref).norm() / x_ref.norm()) <= kappa * 1e-10
    assert rec["inner_precision"] == "bfloat16 (emulated)" and not rec["fallback"]
    assert rec["inner_matvecs"] > 0 and rec["outer_matvecs"] > 0
    assert rec["matvecs"] == rec["inner_matvecs"] + rec["outer_matvecs"]
    assert rec["precond_rank"] == 10


def test_inverse_fallback_warns_naming_the_system_and_strict_miss_raises():
    K = mlp_ntk(ridge=1e-3)  # κ ≈ 1e5: bf16 refinement stagnates
    b = rhs(K.shape[0])
    inv = Inverse(K, SolverConfig(inner_precision="bfloat16", precond="none"), label="Θ_rr")
    with pytest.warns(PrecisionFallbackWarning, match=r"Θ_rr.*stagnated"):
        x = inv.solve(b)
    assert inv.records[-1]["fallback"] and inv.records[-1]["converged"]
    assert true_rel(K.to_dense(), x, b) <= 1e-10
    tight = Inverse(
        K, SolverConfig(inner_precision="bfloat16", precond="none", max_iter=3), label="Θ_rr"
    )
    with (
        pytest.warns(PrecisionFallbackWarning),
        pytest.raises(SolveNotConverged, match="Θ_rr") as err,
    ):
        tight.solve(b)
    assert err.value.partial.shape == b.shape and err.value.system == "Θ_rr"


def test_real_bf16_autocast_products_on_a_float32_mlp():
    """torch.autocast(bfloat16) products of a float32 MLP's NTK (CPU): refinement with float32
    residuals (float64 subtraction) reaches 1e-4; plain CG with those products does not."""
    K = mlp_ntk(torch.float32, ridge=3.0, hidden=32)
    b = rhs(K.shape[0]).float()
    Kd = mlp_ntk(F64, ridge=3.0, hidden=32).to_dense()
    x_ref = torch.linalg.solve(Kd, b.double())
    kappa = float(torch.linalg.cond(Kd))
    lo, desc = low_precision_products(K, "bfloat16")
    V = rhs(K.shape[0], 2).float()
    err_lo = float((lo(V) - K @ V).norm() / (K @ V).norm())
    assert desc == "bfloat16" and err_lo > 1e-4  # the products really are bf16
    x_plain = plain_cg(lo, b, 1e-4)
    assert true_rel(Kd, x_plain.double(), b.double()) > 1e-4
    inv = Inverse(K, SolverConfig(inner_precision="bfloat16", tol=1e-4, precond="none"))
    x = inv.solve(b)
    rec = inv.records[-1]
    assert rec["converged"] and not rec["fallback"] and rec["inner_precision"] == "bfloat16"
    # float32 products of the outer residual: allow their own 1e-6-level error on top of tol
    assert true_rel(Kd, x.double(), b.double()) <= 1e-4 + 1e-5
    assert float((x.double() - x_ref).norm() / x_ref.norm()) <= kappa * 1.1e-4


def test_autocast_through_batchnorm_fails_loudly():
    """torch cannot run forward-mode AD through an eval-mode BatchNorm under autocast: the error
    names the knob and the way out, instead of torch's bare dtype mismatch."""
    model = make_cnn().float()
    X, Y = make_data("cnn", 6)
    K = NTK(jac_a=Jacobian(ParameterSpace(model), (X.float(), Y)), ridge=1.0)
    inv = Inverse(K, SolverConfig(inner_precision="bfloat16", tol=1e-3, precond="none"))
    with pytest.raises(RuntimeError, match="inner_precision='bfloat16'.*BatchNorm.*'tf32'"):
        inv.solve(torch.randn(K.shape[0]))
    tf32 = Inverse(K, SolverConfig(inner_precision="tf32", tol=1e-3, precond="none"))
    tf32.solve(torch.randn(K.shape[0]))  # TF32 (plain float32 on a CPU) has no such problem
    assert tf32.records[-1]["converged"]
    assert tf32.records[-1]["inner_precision"] == "tf32 (none on cpu)"


# ----------------------------------------------------------------------------- scrub
def test_scrub_with_emulated_bf16_products_equals_float64_scrub():
    model = make_mlp(6, 12, 3, seed=0)
    init = make_mlp(6, 12, 3, seed=1)
    X, Y = make_data("mlp", 24)
    retain, forget = (X[:20], Y[:20]), (X[20:], Y[20:])
    kw = dict(init=init, ridge=0.5, solver="cg")
    ref = scrub(model, retain, forget, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionFallbackWarning)  # no fallback here
        mixed = scrub(
            model, retain, forget, solver_config=SolverConfig(inner_precision="bfloat16"), **kw
        )
    assert float((mixed.shift - ref.shift).norm() / ref.shift.norm()) <= 1e-6
    assert mixed.info["converged"]
    for rec in mixed.info["solves"]:
        assert rec["inner_precision"] == "bfloat16 (emulated)" and rec["inner_matvecs"] > 0
        assert max(rec["residuals"]) <= mixed.info["tol"]
    assert mixed.info["config"]["solver"]["inner_precision"] == "bfloat16"
    inner = sum(rec["inner_matvecs"] for rec in mixed.info["solves"])
    assert 0 < mixed.info["inner_matvecs"] == inner < mixed.info["matvecs"]
    assert ref.info["inner_matvecs"] == 0


def test_scrubber_with_emulated_bf16_products_equals_float64_scrub():
    """Two successive deletion requests (warm starts, the cached α) with mixed-precision solves."""
    from ntkscrub import Scrubber

    model, init = make_mlp(6, 12, 3, seed=0), make_mlp(6, 12, 3, seed=1)
    X, Y = make_data("mlp", 24)
    kw = dict(init=init, ridge=0.5)
    s = Scrubber(model, (X, Y), solver_config=SolverConfig(inner_precision="bfloat16"), **kw)
    s.forget([3, 7])
    res = s.forget([20])
    keep = [i for i in range(24) if i not in (3, 7, 20)]
    ref = scrub(model, (X[keep], Y[keep]), (X[[3, 7, 20]], Y[[3, 7, 20]]), solver="cg", **kw)
    assert float((res.shift - ref.shift).norm() / ref.shift.norm()) <= 1e-6
    assert s.prepare_info["solves"][0]["inner_precision"] == "bfloat16 (emulated)"
    assert s.prepare_info["solves"][0]["inner_matvecs"] > 0


def test_scrub_and_scrubber_refuse_low_precision_residuals():
    from ntkscrub import Scrubber
    from ntkscrub.config import ProductConfig

    model, init = make_mlp(seed=0), make_mlp(seed=1)
    X, Y = make_data("mlp", 8)
    mixed = SolverConfig(inner_precision="tf32")
    for products, what in (
        (ProductConfig(autocast=torch.bfloat16), "products.autocast"),
        (ProductConfig(allow_tf32=True), "allow_tf32"),
    ):
        with pytest.raises(ValueError, match=f"inner_precision.*{what}"):
            scrub(model, (X[:6], Y[:6]), (X[6:], Y[6:]), init=init, ridge=1.0,
                  solver_config=mixed, products=products)  # fmt: skip
        with pytest.raises(ValueError, match=f"inner_precision.*{what}"):
            Scrubber(model, (X, Y), init=init, ridge=1.0, solver_config=mixed, products=products)


def test_identity_allreduce_is_one_rank():
    """The data-parallel hook: with an identity all-reduce (one rank) the solve is unchanged."""
    A = spd(torch.logspace(-2, 0, 80), seed=6)
    b = rhs(80)
    lo = rounded(A, torch.bfloat16)
    x1, i1 = mixed_cg(A, b, inner=lo, tol=1e-10, max_seconds=60)
    x2, i2 = mixed_cg(A, b, inner=lo, tol=1e-10, allreduce=lambda t: t.clone())
    assert torch.allclose(x1, x2, rtol=0, atol=1e-14) and i2.all_converged
    assert i2.inner_matvecs == i1.inner_matvecs and i2.max_seconds == float("inf")


# ----------------------------------------------------------------------------- small parts
def test_rounding_helpers():
    x = torch.randn(1000, dtype=F64, generator=torch.Generator().manual_seed(0))
    x0 = x.clone()
    for name, u in (("bfloat16", 2.0**-8), ("float16", 2.0**-11), ("tf32", 2.0**-11)):
        r = round_to_precision(x, name)
        relerr = ((r - x).abs() / x.abs()).max()
        assert 0 < float(relerr) <= u * 1.001 and r.dtype == F64
    assert torch.equal(x, x0)
    exact = torch.tensor([1.0, -0.5, 3.0, 1024.0], dtype=F64)
    assert torch.equal(round_to_precision(exact, "tf32"), exact)


def test_bad_input():
    with pytest.raises(ValueError, match="SolverConfig.inner_precision"):
        SolverConfig(inner_precision="fp8")
    with pytest.raises(ValueError, match="SolverConfig.inner_tol"):
        SolverConfig(inner_tol=2.0)
    A = spd(torch.linspace(1, 2, 10))
    with pytest.raises(ValueError, match="inner_precision"):
        low_precision_products(A.half(), "bfloat16")
    with pytest.raises(ValueError, match="inner_precision"):
        low_precision_products(A, "int8")
    with pytest.raises(TypeError, match="A: "):
        low_precision_products(lambda X: X, "bfloat16")
    with pytest.raises(ValueError, match="inner_tol"):
        mixed_cg(A, rhs(10), inner=A, inner_tol=1.5)
    with pytest.raises(TypeError, match="fallback"):
        mixed_cg(A, rhs(10), inner=A, fallback=1)
    with pytest.raises(ValueError, match="x0"):
        mixed_cg(A, rhs(10), inner=A, x0=rhs(9))
