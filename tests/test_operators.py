"""J, Jᵀ, Θ, P, the GGN, the dual, the inverse and the counting wrapper against explicit float64
references (a fixture grid of models).

Every lazy operator inherits :class:`OperatorContract`, which checks its products against the
dense matrix built independently in the test (``torch.func.jacrev`` over the whole data set).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from linear_operator.operators import LinearOperator
from model_zoo import make_cnn, make_data, make_mlp
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from ntkscrub.config import SolverConfig
from ntkscrub.operators import (
    GGN,
    NTK,
    Counted,
    DenseTooLarge,
    Dual,
    Inverse,
    Jacobian,
    PartitionedNTK,
    Product,
    Projection,
    StackedJacobian,
    Sum,
)
from ntkscrub.params import ParameterSpace
from ntkscrub.solvers import CGNotConverged

TOL = 1e-10


def explicit_jacobian(model: nn.Module, X: torch.Tensor, names=None) -> torch.Tensor:
    """The reference: jacrev over the whole data set at once, rows n·c + k, ``(c·N, p)``."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = names or list(params)
    fixed = {n: p for n, p in params.items() if n not in names}
    fixed.update(dict(model.named_buffers()))

    def f(lin):
        return functional_call(model, (lin, fixed), (X,))

    jac = jacrev(f)({n: params[n] for n in names})
    N, c = X.shape[0], f({n: params[n] for n in names}).shape[1]
    return torch.cat([jac[n].reshape(N * c, -1) for n in names], dim=1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class OperatorContract:
    """Shared tests every operator inherits: its products, transpose, shapes and dense twin match
    a dense float64 reference built independently in the test (like linear_operator's
    ``LinearOperatorTestCase``); bad dtypes, batch dimensions and dtype casts raise clearly."""

    tol = TOL

    def make(self, case):  # -> (operator, dense reference)
        raise NotImplementedError

    def test_shape(self, case):
        op, dense = self.make(case)
        assert tuple(op.shape) == tuple(dense.shape)
        assert tuple(op.mT.shape) == tuple(dense.T.shape)
        assert op.dtype == torch.float64 and isinstance(op, LinearOperator)

    def test_matmul_matches_dense(self, case):
        op, dense = self.make(case)
        g = torch.Generator().manual_seed(3)
        V = torch.randn(dense.shape[1], 5, generator=g, dtype=torch.float64)
        assert rel(op.matmul(V), dense @ V) <= self.tol
        assert rel(op.matmul(V[:, 2]), dense @ V[:, 2]) <= self.tol
        assert rel(op @ V[:, :1], dense @ V[:, :1]) <= self.tol

    def test_transpose_matches_dense(self, case):
        op, dense = self.make(case)
        U = torch.randn(dense.shape[0], 3, dtype=torch.float64)
        assert rel(op.mT.matmul(U), dense.T @ U) <= self.tol
        assert rel(op.rmatmul(U.T), U.T @ dense) <= self.tol
        assert rel(op.rmatmul(U[:, 0]), U[:, 0] @ dense) <= self.tol

    def test_to_dense_matches(self, case):
        op, dense = self.make(case)
        assert rel(op.to_dense(), dense) <= self.tol
        assert rel(op.mT.to_dense(), dense.T) <= self.tol

    def test_to_scipy(self, case):
        op, dense = self.make(case)
        A = op.to_scipy()
        x = np.random.default_rng(0).standard_normal((dense.shape[1], 2))
        y = np.random.default_rng(1).standard_normal(dense.shape[0])
        assert A.shape == tuple(dense.shape)
        assert np.allclose(A @ x, dense.numpy() @ x, rtol=1e-8, atol=1e-10)
        assert np.allclose(A.rmatvec(y), dense.numpy().T @ y, rtol=1e-8, atol=1e-10)

    def test_wrong_dtype_rejected(self, case):
        op, dense = self.make(case)
        with pytest.raises(ValueError, match="dtype"):
            op.matmul(torch.randn(dense.shape[1], 2, dtype=torch.float32))

    def test_batching_and_casts_refused_clearly(self, case):
        op, _ = self.make(case)
        with pytest.raises(NotImplementedError, match="batch"):
            op.unsqueeze(0)
        with pytest.raises(TypeError, match="dtype"):
            op.to(torch.float32)
        assert op.to(torch.float64) is op


# --------------------------------------------------------------------------- Jacobian
class TestJacobian(OperatorContract):
    def make(self, case):
        model, X, Y = case
        J = Jacobian(ParameterSpace(model), (X, Y), batch_size=5)
        return J, explicit_jacobian(model, X)

    def test_dense_twin(self, case):
        model, X, Y = case
        J = Jacobian(ParameterSpace(model), (X, Y), batch_size=4)
        assert rel(J.dense(chunk=3), explicit_jacobian(model, X)) <= TOL
        assert rel(J.row_norms_sq(), (explicit_jacobian(model, X) ** 2).sum(1)) <= TOL

    def test_dense_twin_rows_follow_the_batched_pass(self, case, monkeypatch):
        """A per-sample row that took another ReLU branch than the batched products (here: one
        sample's Jacobian perturbed, as a flipped unit would) is found by the row check and
        recomputed from the batched pass; a clean twin recomputes nothing."""
        model, X, Y = case
        J = Jacobian(ParameterSpace(model), (X, Y), batch_size=4)
        ref = explicit_jacobian(model, X)
        J.dense(chunk=3)
        assert J.recomputed_rows == 0
        per_sample = Jacobian._per_sample_jac

        def flipped(self, xi):
            jac = per_sample(self, xi)
            is_5 = ((xi - X[5]).abs().sum() == 0).to(xi.dtype)  # data-free branching, for vmap
            first = next(iter(jac))
            return {n: t * (1 + 1e-6 * is_5) if n == first else t for n, t in jac.items()}

        monkeypatch.setattr(Jacobian, "_per_sample_jac", flipped)
        J2 = Jacobian(ParameterSpace(model), (X, Y), batch_size=4)
        assert rel(J2.dense(chunk=3), ref) <= TOL
        assert J2.recomputed_rows == J2.c  # the c rows of sample 5

    def test_dense_twin_ignores_autocast(self, case):
        """The twin is full precision whatever the products' autocast: no row is 'repaired'
        towards low-precision batched passes."""
        model, X, Y = case
        if any(isinstance(m, nn.Conv2d) for m in model.modules()):
            pytest.skip("forward-mode AD through a conv under CPU autocast fails in torch")
        m32 = copy.deepcopy(model).float()  # CPU autocast lowers float32 ops only
        space, data = ParameterSpace(m32), (X.float(), Y)
        J = Jacobian(space, data, batch_size=4, autocast=torch.bfloat16)
        assert torch.equal(J.dense(chunk=3), Jacobian(space, data, batch_size=4).dense(chunk=3))
        assert J.recomputed_rows == 0

    @pytest.mark.parametrize("form", ["dataset", "loader", "tensors"])
    def test_data_forms_agree(self, case, form):
        model, X, Y = case
        data = {
            "dataset": TensorDataset(X, Y),
            "loader": DataLoader(TensorDataset(X, Y), batch_size=3, shuffle=False),
            "tensors": (X, Y),
        }[form]
        J = Jacobian(ParameterSpace(model), data, batch_size=6)
        V = torch.randn(J.p, 2, dtype=torch.float64)
        assert rel(J.matvec(V), explicit_jacobian(model, X) @ V) <= TOL

    def test_other_point_and_subset(self):
        model = make_cnn()
        X, Y = make_data("cnn", 9)
        # Linearise only BatchNorm affine parameters and the head, at another point; the other
        # parameters and the buffers stay those of the space's model (documented semantics).
        names = [n for n, p in model.named_parameters() if p.dim() == 1 or n.startswith("7.")]
        other = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in other.named_parameters():
                if n in names:
                    p.add_(0.1 * torch.randn_like(p))
        space = ParameterSpace(model, names)
        J = Jacobian(space, (X, Y), at=other, batch_size=4)
        ref = explicit_jacobian(other, X, names)
        V = torch.randn(space.p, 3, dtype=torch.float64)
        assert rel(J.matvec(V), ref @ V) <= TOL
        U = torch.randn(J.shape[0], 3, dtype=torch.float64)
        assert rel(J.rmatvec(U), ref.T @ U) <= TOL

    def test_vector_chunks(self, case):
        model, X, Y = case
        J = Jacobian(ParameterSpace(model), (X, Y), batch_size=5, vector_chunk=2)
        ref = explicit_jacobian(model, X)
        V = torch.randn(J.p, 5, dtype=torch.float64)
        U = torch.randn(J.shape[0], 5, dtype=torch.float64)
        assert rel(J.matvec(V), ref @ V) <= TOL
        assert rel(J.rmatvec(U), ref.T @ U) <= TOL
        assert rel(J.matvec(V[:, :1]), ref @ V[:, :1]) <= TOL
        with pytest.raises(ValueError, match="vector_chunk"):
            Jacobian(ParameterSpace(model), (X, Y), vector_chunk=0)

    def test_outputs(self, case):
        model, X, Y = case
        J = Jacobian(ParameterSpace(model), (X, Y), batch_size=5)
        assert rel(J.outputs(), model(X).detach()) <= TOL


class TestStackedJacobian(OperatorContract):
    def make(self, case):
        model, X, Y = case
        space = ParameterSpace(model)
        J_r = Jacobian(space, (X[:9], Y[:9]), batch_size=4)
        J_f = Jacobian(space, (X[9:], Y[9:]), batch_size=4)
        return StackedJacobian(J_r, J_f), explicit_jacobian(model, X)


class TestCounted(OperatorContract):
    def make(self, case):
        model, X, Y = case
        J = Jacobian(ParameterSpace(model), (X, Y), batch_size=5)
        return Counted(J), explicit_jacobian(model, X)

    def test_counts_columns(self, case):
        op, dense = self.make(case)
        K = Counted(op.base @ op.base.mT, op.counter)  # Θ shares the Jacobian's counter
        op @ torch.randn(dense.shape[1], 3, dtype=torch.float64)
        op.mT @ torch.randn(dense.shape[0], dtype=torch.float64)
        K @ torch.randn(dense.shape[0], 2, dtype=torch.float64)
        assert op.matvecs == K.matvecs == 3 + 1 + 2
        assert op.c == op.base.c  # the wrapped operator's attributes stay reachable


# --------------------------------------------------------------------------- NTK
class TestNTK(OperatorContract):
    ridge = 0.3

    def make(self, case):
        model, X, Y = case
        J = Jacobian(ParameterSpace(model), (X, Y), batch_size=4)
        Jd = explicit_jacobian(model, X)
        return NTK(J.theta, jac_a=J, ridge=self.ridge), Jd @ Jd.T + self.ridge * torch.eye(
            Jd.shape[0], dtype=torch.float64
        )

    def test_symmetric_psd(self, case):
        op, dense = self.make(case)
        K = op.dense()
        assert rel(K, dense) <= TOL
        assert float((K - K.T).abs().max()) == 0.0 or rel(K, K.T) <= 1e-14
        assert float(
            torch.linalg.eigvalsh(K - self.ridge * torch.eye(K.shape[0], dtype=K.dtype)).min()
        ) >= -1e-10 * float(K.diagonal().max())

    def test_is_a_composition(self, case):
        op, _ = self.make(case)
        assert isinstance(op, Sum) and op.ridge_shift() == pytest.approx(self.ridge)
        assert any(isinstance(t, Product) for t in op.terms)

    def test_blocks(self, case):
        model, X, Y = case
        part = PartitionedNTK(
            ParameterSpace(model), (X[:10], Y[:10]), (X[10:], Y[10:]), ridge=0.2, batch_size=3
        )
        Jr, Jf = explicit_jacobian(model, X[:10]), explicit_jacobian(model, X[10:])
        refs = {
            "rr": Jr @ Jr.T + 0.2 * torch.eye(Jr.shape[0], dtype=torch.float64),
            "ff": Jf @ Jf.T + 0.2 * torch.eye(Jf.shape[0], dtype=torch.float64),
            "rf": Jr @ Jf.T,
            "fr": Jf @ Jr.T,
        }
        for key, ref in refs.items():
            V = torch.randn(ref.shape[1], 2, dtype=torch.float64)
            assert rel(part[key].matmul(V), ref @ V) <= TOL, key
        assert part.matvecs == 8

    def test_stacked_jacobian(self, case):
        model, X, Y = case
        space = ParameterSpace(model)
        J_r = Jacobian(space, (X[:9], Y[:9]), batch_size=4)
        J_f = Jacobian(space, (X[9:], Y[9:]), batch_size=4)
        J_d = StackedJacobian(J_r, J_f)
        ref = explicit_jacobian(model, X)
        V = torch.randn(space.p, 2, dtype=torch.float64)
        U = torch.randn(ref.shape[0], 2, dtype=torch.float64)
        assert rel(J_d.matvec(V), ref @ V) <= TOL
        assert rel(J_d.rmatvec(U), ref.T @ U) <= TOL
        assert torch.equal(J_d.labels(), Y)

    def test_linear_operator_integration(self, case):
        op, dense = self.make(case)
        b = torch.randn(dense.shape[0], 2, dtype=torch.float64)
        assert rel(dense @ op.solve(b), b) <= 1e-8
        logdet = torch.logdet(dense)
        _, ld = op.inv_quad_logdet(logdet=True)
        assert abs(float(ld) - float(logdet)) <= 1e-6 * abs(float(logdet)) + 1e-6
        assert rel(op.diagonal(), dense.diagonal()) <= TOL

    def test_bad_ridge(self, case):
        model, X, Y = case
        J = Jacobian(ParameterSpace(model), (X, Y))
        with pytest.raises(ValueError, match="ridge"):
            NTK(J.theta, jac_a=J, ridge=-1.0)


class TestNTKNoRidge(OperatorContract):
    def make(self, case):
        model, X, Y = case
        J = Jacobian(ParameterSpace(model), (X, Y), batch_size=4)
        Jd = explicit_jacobian(model, X)
        return NTK(jac_a=J), Jd @ Jd.T


class TestNTKOffDiagonal(OperatorContract):
    def make(self, case):
        model, X, Y = case
        space = ParameterSpace(model)
        J_r = Jacobian(space, (X[:9], Y[:9]), batch_size=4)
        J_f = Jacobian(space, (X[9:], Y[9:]), batch_size=4)
        Jr, Jf = explicit_jacobian(model, X[:9]), explicit_jacobian(model, X[9:])
        return NTK(jac_a=J_r, jac_b=J_f), Jr @ Jf.T


# --------------------------------------------------------------------------- P
class TestProjection(OperatorContract):
    ridge = 0.0
    tol = 1e-9

    def jacobian(self, case):
        model, X, Y = case
        X, Y = X[:4], Y[:4]  # c·N = 12 < p so J_r has full row rank and P is a projection
        return Jacobian(ParameterSpace(model), (X, Y), batch_size=3), explicit_jacobian(model, X)

    def make(self, case):
        J, Jd = self.jacobian(case)
        ref = torch.eye(Jd.shape[1], dtype=torch.float64) - Jd.T @ torch.linalg.solve(Jd @ Jd.T, Jd)
        return Projection(J, ridge=self.ridge, config=SolverConfig(method="dense")), ref

    def test_idempotent_and_annihilates(self, case):
        op, _ = self.make(case)
        J, _ = self.jacobian(case)
        V = torch.randn(op.shape[0], 3, dtype=torch.float64)
        PV = op.matmul(V)
        assert rel(op.matmul(PV), PV) <= 1e-9
        U = torch.randn(J.shape[0], 2, dtype=torch.float64)
        JtU = J.rmatvec(U)
        assert float(op.matmul(JtU).norm()) <= 1e-9 * float(JtU.norm())
        assert rel(op.dense(), op.dense().T) <= 1e-12

    def test_ridge_form(self, case):
        model, X, Y = case
        J = Jacobian(ParameterSpace(model), (X, Y), batch_size=5)
        P = Projection(J, ridge=0.7, config=SolverConfig(method="dense"))
        Jd = explicit_jacobian(model, X)
        ref = 0.7 * torch.linalg.inv(Jd.T @ Jd + 0.7 * torch.eye(Jd.shape[1], dtype=torch.float64))
        V = torch.randn(J.p, 2, dtype=torch.float64)
        assert rel(P.matmul(V), ref @ V) <= 1e-9

    def test_cg_solver_matches_dense(self, case):
        J, _ = self.jacobian(case)
        _, ref = self.make(case)
        P = Projection(J, config=SolverConfig(tol=1e-12, precond="none"))
        V = torch.randn(ref.shape[0], 2, dtype=torch.float64)
        assert rel(P.matmul(V), ref @ V) <= 1e-8


# --------------------------------------------------------------------------- GGN and dual
def output_hessian_blocks(model, X, loss):
    if loss == "mse":
        return [torch.eye(3, dtype=torch.float64) for _ in range(len(X))]
    pi = torch.softmax(model(X).detach(), 1)
    return [torch.diag(p) - torch.outer(p, p) for p in pi]


class TestGGN(OperatorContract):
    loss = "ce"

    def make(self, case):
        model, X, Y = case
        J = Jacobian(ParameterSpace(model), (X, Y), batch_size=4)
        Jd = explicit_jacobian(model, X)
        H = torch.block_diag(*output_hessian_blocks(model, X, self.loss))
        ref = Jd.T @ H @ Jd + 0.05 * torch.eye(J.p, dtype=torch.float64)
        return GGN(J.theta, jac=J, loss=self.loss, damping=0.05), ref

    def test_matches_dense(self, case):
        F, ref = self.make(case)
        V = torch.randn(ref.shape[0], 3, dtype=torch.float64)
        assert rel(F.matmul(V), ref @ V) <= TOL
        assert rel(F.diagonal(), ref.diagonal()) <= TOL
        assert rel(F.dense(), ref) <= TOL
        assert F.ridge_shift() == pytest.approx(0.05)
        # s·F + δI (the bounds' mean-loss precision) is still K + δI with K PSD
        assert (F.terms[0] * 0.1).add_diagonal(0.2).ridge_shift() == pytest.approx(0.2)


class TestGGNMSE(TestGGN):
    loss = "mse"


class TestDual(OperatorContract):
    loss = "ce"
    # H is singular (π sums to 1): the square root of its rounding-level eigenvalues (≈1e-17)
    # differs by ≈3e-9 between any two eigen-solvers, so the twin agrees to ≈5e-10, not 1e-10.
    tol = 1e-8

    def make(self, case):
        model, X, Y = case
        J = Jacobian(ParameterSpace(model), (X, Y), batch_size=4)
        Jd = explicit_jacobian(model, X)
        roots = []
        for h in output_hessian_blocks(model, X, self.loss):
            lam, V = np.linalg.eigh(h.numpy())  # the PSD square root, R R = H
            roots.append(torch.from_numpy((V * np.sqrt(np.clip(lam, 0, None))) @ V.T))
        R = torch.block_diag(*roots)
        ref = R @ Jd @ Jd.T @ R + 0.1 * torch.eye(Jd.shape[0], dtype=torch.float64)
        return Dual(jac=J, loss=self.loss, damping=0.1), ref


# --------------------------------------------------------------------------- the inverse
class TestInverse(OperatorContract):
    tol = 1e-8
    method = "cg"

    def make(self, case):
        model, X, Y = case
        J = Jacobian(ParameterSpace(model), (X, Y), batch_size=4)
        Jd = explicit_jacobian(model, X)
        K = Jd @ Jd.T + 0.3 * torch.eye(Jd.shape[0], dtype=torch.float64)
        cfg = SolverConfig(method=self.method, tol=1e-12)
        return Inverse(NTK(jac_a=J, ridge=0.3), cfg, label="Θ"), torch.linalg.inv(K)

    def test_records_and_logdet(self, case):
        inv, ref = self.make(case)
        inv @ torch.randn(ref.shape[0], 2, dtype=torch.float64)
        rec = inv.records[-1]
        assert rec["system"] == "Θ" and rec["converged"] and rec["solver"] == self.method
        exact = -float(torch.logdet(ref))  # log det A = −log det A⁻¹
        value = inv.logdet()
        if self.method == "dense":
            assert value == pytest.approx(exact, rel=1e-9)
        else:  # SLQ: within its Monte-Carlo and quadrature error
            est = inv.records[-1]
            assert abs(value - exact) <= 3 * est["stderr"] + est["quadrature_halfwidth"]


class TestInverseDense(TestInverse):
    method = "dense"


def test_inverse_raises_naming_the_system(case):
    model, X, Y = case
    J = Jacobian(ParameterSpace(model), (X, Y), batch_size=4)
    inv = Inverse(
        NTK(jac_a=J, ridge=1e-6), SolverConfig(tol=1e-14, max_iter=2, precond="none"), label="Θ_rr"
    )
    b = torch.randn(J.shape[0], dtype=torch.float64)
    with pytest.raises(CGNotConverged, match="Θ_rr") as err:
        inv @ b
    assert err.value.system == "Θ_rr" and err.value.partial.shape == b.shape
    assert not err.value.record["converged"]
    lenient = Inverse(inv.A, SolverConfig(tol=1e-14, max_iter=2, precond="none", strict=False))
    with pytest.warns(RuntimeWarning, match="A: cg"):
        lenient @ b
    assert lenient.records[0]["converged"] is False
    # λ = 0 with c·N > p: Θ is singular; the dense path says so instead of a least-squares answer
    singular = Inverse(NTK(jac_a=J), SolverConfig(method="dense"), label="Θ_DD")
    if J.shape[0] > J.p:
        with pytest.raises(ValueError, match="Θ_DD: the dense system is singular"):
            singular @ b


def test_dense_too_large_names_the_system(case):
    model, X, Y = case
    J = Jacobian(ParameterSpace(model), (X, Y), batch_size=4)
    inv = Inverse(
        NTK(jac_a=J, ridge=0.1), SolverConfig(method="dense", max_dense_bytes=100), label="Θ_DD"
    )
    with pytest.raises(DenseTooLarge, match="Θ_DD.*max_dense_bytes"):
        inv @ torch.randn(J.shape[0], dtype=torch.float64)


# --------------------------------------------------------------------------- memory
class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_ntk_matvec_memory_independent_of_n():
    """Θ v over N samples allocates nothing of size N·p or (cN)²: the largest tensor is the same
    for N = 48 and N = 480 (only the (cN,) vectors grow)."""
    model = make_cnn()
    space = ParameterSpace(model)
    largest = {}
    for n in (48, 480):
        X, Y = make_data("cnn", n)
        J = Jacobian(space, (X, Y), batch_size=16)
        K = NTK(J.theta, jac_a=J)
        v = torch.randn(J.shape[0], 2, dtype=torch.float64)
        with LargestTensor() as mode:
            K.matmul(v)
        largest[n] = mode.largest
        assert mode.largest < n * space.p
        assert mode.largest < (3 * n) ** 2
    # The only thing allowed to grow with N is the (c·N, k) block of vectors itself.
    assert largest[480] <= max(largest[48], 3 * 480 * 2)


# --------------------------------------------------------------------------- bad input
def test_training_mode_batchnorm_rejected():
    model = make_cnn().train()
    with pytest.raises(ValueError, match="'1' \\(BatchNorm2d\\)"):
        ParameterSpace(model)


def test_bad_data():
    model = make_mlp()
    space = ParameterSpace(model)
    X, Y = make_data("mlp", 5)
    with pytest.raises(ValueError, match="empty"):
        Jacobian(space, (X[:0], Y[:0]))
    Xn = X.clone()
    Xn[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Jacobian(space, (Xn, Y))
    with pytest.raises(ValueError, match="same number"):
        Jacobian(space, (X, Y[:3]))
    with pytest.raises(ValueError, match="shuffles"):
        Jacobian(space, DataLoader(TensorDataset(X, Y), shuffle=True))
    J = Jacobian(space, (X, Y + 5))
    with pytest.raises(ValueError, match="labels must lie"):
        J.labels()
    with pytest.raises(ValueError, match="V: expected shape"):
        J.matvec(torch.randn(space.p + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="space"):
        Jacobian(model, (X, Y))


def test_nonfinite_parameters_rejected():
    model = make_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="0.weight"):
        ParameterSpace(model)


def test_model_unchanged(case):
    model, X, Y = case
    before = copy.deepcopy(model.state_dict())
    J = Jacobian(ParameterSpace(model), (X, Y))
    K = NTK(J.theta, jac_a=J, ridge=0.1)
    K.matmul(torch.randn(J.shape[0], 2, dtype=torch.float64))
    J.dense()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training


def test_flatten_roundtrip(case):
    model, _, _ = case
    space = ParameterSpace(model)
    v = torch.randn(space.p, dtype=torch.float64)
    assert torch.equal(space.flatten(space.unflatten(v)), v)
    V = torch.randn(space.p, 3, dtype=torch.float64)
    assert torch.equal(space.flatten_batched(space.unflatten(V)), V)
    assert torch.equal(space.point(), torch.cat([p.reshape(-1) for p in model.parameters()]))


def test_preconditioner_cuts_iterations_on_ntk():
    """On an ill-conditioned NTK (small CNN, κ ≈ 2·10⁴ with λ = 1e-3), Nyström PCG of rank n/2
    needs far fewer iterations than plain CG (measured 237 → 65) and gives the same solution."""
    from ntkscrub.solvers import NystromPreconditioner, cg

    model = make_cnn()
    X, Y = make_data("cnn", 40)
    J = Jacobian(ParameterSpace(model), (X, Y), batch_size=64)
    K = NTK(J.theta, jac_a=J, ridge=1e-3)
    b = torch.randn(K.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x0, plain = cg(K, b, tol=1e-8)
    M = NystromPreconditioner(K, K.shape[0], 60, shift=1e-3, includes_shift=True, seed=0)
    x1, pre = cg(K, b, tol=1e-8, precond=M)
    assert plain.converged[0] and pre.converged[0]
    assert pre.iterations * 2.5 <= plain.iterations
    assert rel(x1, x0) <= 1e-6


def test_slq_logdet_of_ntk_within_three_standard_errors():
    from ntkscrub.solvers import slq_logdet

    model = make_mlp()
    X, Y = make_data("mlp", 30)
    J = Jacobian(ParameterSpace(model), (X, Y), batch_size=64)
    K = NTK(J.theta, jac_a=J, ridge=0.1)
    exact = float(torch.logdet(K.dense()))
    est = slq_logdet(K, K.shape[0], probes=40, steps=30, shift=0.1, seed=1)
    assert abs(est.value - exact) <= 3 * est.stderr + 1e-6 * abs(exact)
    assert est.stderr > 0


# --------------------------------------------------------------------------- issue 12 and 16
def test_linear_operator_generic_calls_accurate_above_cholesky_size():
    """Above linear_operator's max_cholesky_size (800 rows) its own CG (tolerance 1, mean
    residual) left a relative residual of 0.94 on this Θ + 0.1 I and inv_quad 1 % off; the
    hooks now run ntkscrub's PCG and SLQ."""
    import linear_operator

    model = make_mlp()
    X, Y = make_data("mlp", 270)
    J = Jacobian(ParameterSpace(model), (X, Y), batch_size=270)
    K = NTK(jac_a=J, ridge=0.1)
    assert K.shape[0] > linear_operator.settings.max_cholesky_size.value()
    Kd = K.dense()
    B = torch.randn(K.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for X1 in (K.solve(B), linear_operator.solve(K, B), torch.linalg.solve(K, B)):
        assert rel(Kd @ X1, B) <= 1e-8
    quad, ld = K.inv_quad_logdet(B, logdet=True)
    assert float(quad) == pytest.approx(float((B * torch.linalg.solve(Kd, B)).sum()), rel=1e-8)
    exact = float(torch.logdet(Kd))
    assert abs(float(ld) - exact) <= 1e-2 * abs(exact)
    assert float(K.logdet()) == pytest.approx(float(ld), rel=1e-12)  # seeded probes


def test_to_scipy_runs_scipy_solvers():
    import scipy.sparse.linalg as sla

    model = make_cnn()
    X, Y = make_data("cnn", 14)
    J = Jacobian(ParameterSpace(model), (X, Y), batch_size=5)
    K = NTK(jac_a=J, ridge=0.3)
    Kd = K.dense().numpy()
    b = np.random.default_rng(0).standard_normal(Kd.shape[0])
    x, info = sla.cg(K.to_scipy(), b, rtol=1e-12, maxiter=500)
    assert info == 0 and np.linalg.norm(Kd @ x - b) <= 1e-9 * np.linalg.norm(b)
    top = sla.eigsh(K.to_scipy(), k=4, which="LA", return_eigenvectors=False)
    assert np.allclose(np.sort(top), np.linalg.eigvalsh(Kd)[-4:], rtol=1e-8)
    s = sla.svds(J.to_scipy(), k=3, return_singular_vectors=False)
    assert np.allclose(np.sort(s), np.linalg.svd(J.dense().numpy(), compute_uv=False)[:3][::-1])
    assert sla.aslinearoperator(K.to_scipy()).shape == Kd.shape


@pytest.mark.parametrize("method", ["cg", "dense"])
def test_inverse_float32_against_float64(method):
    """Every solve path in float32 lands within its tolerance's reach of the float64 answer."""
    model = make_cnn()
    X, Y = make_data("cnn", 30)
    out = {}
    for dtype in (torch.float64, torch.float32):
        m = copy.deepcopy(model).to(dtype)
        J = Jacobian(ParameterSpace(m), (X.to(dtype), Y), batch_size=16)
        inv = Inverse(NTK(jac_a=J, ridge=0.5), SolverConfig(method=method), label="Θ")
        b = torch.linspace(-1, 1, J.shape[0], dtype=torch.float64)
        out[dtype] = (inv @ b.to(dtype)).double()
        assert inv.records[-1]["converged"]
    assert rel(out[torch.float32], out[torch.float64]) <= 1e-2


def test_float32_dense_system_is_accumulated_and_factored_in_float64(monkeypatch):
    """The dense twin of a float32 Θ = J Jᵀ + λI sums J's long rows, factors and solves in
    float64: it matches float64 arithmetic on the same float32 entries to float32 rounding,
    where float32 throughout misses by κ·eps — also when the Gram product is formed in blocks
    of the inner dimension."""
    from ntkscrub.operators import base

    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(20000, 60, generator=g, dtype=torch.float64)).Q
    J32 = ((U * torch.logspace(2, 0, 60, dtype=torch.float64)) @ V.T).float()  # κ(Θ + I) ≈ 5e3
    b = torch.randn(60, generator=g)
    eye = torch.eye(60, dtype=torch.float64)
    ref = torch.linalg.solve(J32.double() @ J32.double().T + eye, b.double())
    monkeypatch.setattr(base, "PRODUCT_BLOCK_BYTES", 4 * 8 * 120 * 3000)  # 7 inner blocks
    J = base.Dense(J32)
    inv = Inverse((J @ J.mT).add_diagonal(1.0), SolverConfig(method="dense"), label="Θ")
    x = inv.solve(b)
    assert x.dtype == torch.float32 and inv.cholesky().dtype == torch.float64
    assert rel(x.double(), ref) <= 1e-6
    assert rel(inv.to_dense().double() @ b.double(), ref) <= 1e-6
    L32 = torch.linalg.cholesky(J32 @ J32.T + eye.float())
    assert rel(torch.cholesky_solve(b[:, None], L32)[:, 0].double(), ref) > 1e-5


def test_product_splits_wide_blocks_into_column_chunks(monkeypatch):
    """Θ X = J (Jᵀ X) with a p × k intermediate over the block budget is computed in column
    chunks (the 512-column sketch of a ResNet-18 needed 23 GB otherwise) — same numbers."""
    import ntkscrub.operators.base as base

    torch.manual_seed(0)
    A = base.Dense(torch.randn(7, 5, dtype=torch.float64))
    K = A @ A.mT
    X = torch.randn(7, 9, dtype=torch.float64)
    full = K @ X
    widths = []
    inner = K.B._mm
    monkeypatch.setattr(K.B, "_mm", lambda V: widths.append(V.shape[1]) or inner(V))
    monkeypatch.setattr(base, "PRODUCT_BLOCK_BYTES", 5 * 8 * 2)  # two columns of the (5, k) block
    chunked = K @ X
    assert widths == [2, 2, 2, 2, 1]
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked, A.to_dense() @ A.to_dense().T @ X)


def test_output_hessian_roots_and_pseudo_inverse_root():
    """H^½ squares to H; H^{+½} H H^{+½} is the projector onto 1⊥ per sample (H_n 1 = 0), so
    H^½ H^{+½} r = r for every r whose classes sum to zero — the CE Newton right-hand side."""
    from ntkscrub.operators import OutputHessian

    N, c = 7, 4
    probs = torch.softmax(
        torch.randn(N, c, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), 1
    )
    H = OutputHessian(probs, c, N, dtype=torch.float64, device=torch.device("cpu")).to_dense()
    kw = dict(dtype=torch.float64, device=torch.device("cpu"))
    root = OutputHessian(probs, c, N, power=0.5, **kw).to_dense()
    pinv = OutputHessian(probs, c, N, power=-0.5, **kw).to_dense()
    assert torch.allclose(root @ root, H, atol=1e-12)
    ones = torch.block_diag(*[torch.ones(c, c, dtype=torch.float64) / c] * N)
    assert torch.allclose(pinv @ H @ pinv, torch.eye(N * c, dtype=torch.float64) - ones, atol=1e-9)
    r = torch.randn(N, c, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    r = (r - r.mean(1, keepdim=True)).reshape(-1)
    assert torch.allclose(root @ (pinv @ r), r, atol=1e-10)
    with pytest.raises(ValueError, match="power"):
        OutputHessian(probs, c, N, power=2.0, **kw)
    # an absolute floor drops every eigenvalue at or below it: H^½ H^{+½} is the projector onto
    # the eigen-directions kept, its complement what the CE Newton step carries as r₀
    lam, V = torch.linalg.eigh(H.reshape(N, c, N, c)[range(N), :, range(N), :])
    floor = float(lam[:, -1].median())
    P = root @ OutputHessian(probs, c, N, power=-0.5, floor=floor, **kw).to_dense()
    kept = [(V[n][:, lam[n] > floor], n) for n in range(N)]
    expected = torch.block_diag(*[Vk @ Vk.T for Vk, _ in kept])
    assert torch.allclose(P, expected, atol=1e-9)
    assert 0 < sum(Vk.shape[1] for Vk, _ in kept) < N * (c - 1)
    for bad in (-1.0, float("inf"), "0"):
        with pytest.raises(ValueError, match="floor"):
            OutputHessian(probs, c, N, power=-0.5, floor=bad, **kw)
