"""The operator algebra: lazy matrices that compose by ``@``, ``+``, ``*`` and ``.mT``.

Every ntkscrub operator is a :class:`linear_operator.LinearOperator` whose product is defined by
two methods on 2-D blocks, ``_mm(X)`` (``A X``) and ``_tmm(X)`` (``Aᵀ X``). Compositions —
:class:`Product`, :class:`Sum`, :class:`Scaled`, :class:`Transposed`, :class:`Counted` — are
operators too, so the paper's matrices read as formulas: ``Θ_AB + λI = (J_A @ J_B.mT)
.add_diagonal(λ)`` and ``P = I − J_rᵀ (Θ_rr + λI)⁻¹ J_r`` (eq. 10). ``to_dense()`` evaluates the
same graph on the explicit twins (the Jacobian's is ``torch.func.jacrev``), never a separate code
path.

linear_operator's generic calls are routed to ntkscrub's own solvers: ``solve`` / ``_solve`` /
``torch.linalg.solve`` run :class:`~ntkscrub.operators.Inverse` (PCG with a Nyström factor, or
Cholesky), and ``inv_quad_logdet`` / ``logdet`` use that inverse and stochastic Lanczos
quadrature — linear_operator's default CG (mean residual, tolerance 1) is never used.

The operators hold a model and data, not differentiable tensors: ``representation()`` is empty and
``representation_tree()`` rebuilds to the same object, so linear_operator never reconstructs one.
They are single matrices: batch dimensions (``unsqueeze``, ``expand``) raise, and ``to(dtype)``
is only accepted when nothing changes (the dtype is the model's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from linear_operator.operators import LinearOperator
from linear_operator.utils.generic import _to_helper
from torch import Tensor

__all__ = [
    "Operator",
    "Product",
    "Sum",
    "Scaled",
    "Transposed",
    "Identity",
    "Dense",
    "Counted",
    "Recorded",
    "MatvecCounter",
    "check_vector",
    "to_scipy",
]


def check_vector(v: Any, rows: int, dtype: torch.dtype, device: torch.device, name: str) -> None:
    """Raise unless ``v`` has shape ``(rows,)`` or ``(rows, k)`` and the given dtype/device."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(v).__name__}")
    if v.dim() not in (1, 2) or v.shape[0] != rows:
        raise ValueError(f"{name}: expected shape ({rows},) or ({rows}, k), got {tuple(v.shape)}")
    if v.dtype != dtype:
        raise ValueError(f"{name}: dtype {v.dtype} does not match the operator's {dtype}")
    if v.device != device:
        raise ValueError(f"{name}: device {v.device} does not match the operator's {device}")


class _SameOperator:
    """A representation tree that rebuilds to the very same operator (nothing to rebuild)."""

    def __init__(self, op: Operator) -> None:
        self.op = op

    def __call__(self, *tensors: Tensor) -> Operator:
        return self.op


class Operator(LinearOperator):
    """Base class: a lazy ``(rows, cols)`` matrix defined by ``_mm`` and ``_tmm`` on 2-D blocks.

    Subclasses set ``children`` (the operators they are built from) and implement ``_mm`` and
    ``_tmm`` (``(cols, k) → (rows, k)`` and ``(rows, k) → (cols, k)``; inputs already checked) and
    ``to_dense``. ``symmetric = True`` makes ``.mT`` the operator itself.
    """

    symmetric: bool = False
    children: tuple[Operator, ...] = ()

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self._op_shape = torch.Size(shape)
        self._op_dtype = dtype
        self._op_device = torch.device(device)

    # ------------------------------------------------------------------ to implement
    def _mm(self, X: Tensor) -> Tensor:  # (cols, k) -> (rows, k)
        raise NotImplementedError

    def _tmm(self, X: Tensor) -> Tensor:  # (rows, k) -> (cols, k)
        raise NotImplementedError

    # ------------------------------------------------------------------ linear_operator hooks
    def _size(self) -> torch.Size:
        return self._op_shape

    @property
    def dtype(self) -> torch.dtype:
        return self._op_dtype

    @property
    def device(self) -> torch.device:
        return self._op_device

    def _matmul(self, rhs: Tensor) -> Tensor:
        if rhs.dim() == 1:
            return self._mm(rhs.unsqueeze(1)).squeeze(1)
        if rhs.dim() != 2:
            raise ValueError(
                f"rhs: batched right-hand sides are not supported, got {tuple(rhs.shape)}"
            )
        return self._mm(rhs)

    def _transpose_nonbatch(self) -> Operator:
        return self if self.symmetric else Transposed(self)

    def representation(self) -> tuple[Tensor, ...]:
        return ()

    def representation_tree(self) -> _SameOperator:  # type: ignore[override]
        return _SameOperator(self)

    @property
    def requires_grad(self) -> bool:
        return False

    def detach(self) -> Operator:
        return self

    def clone(self) -> Operator:
        return self  # immutable: a lazy operator holds no state worth copying

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:
        raise NotImplementedError(
            f"{type(self).__name__}: ntkscrub operators are single matrices without batch "
            f"dimensions (expand/unsqueeze to {tuple(batch_shape)} is not supported)"
        )

    def _unsqueeze_batch(self, dim: int) -> LinearOperator:
        return self._expand_batch(torch.Size([1]))

    def unsqueeze(self, dim: int) -> LinearOperator:
        """Refused: an ntkscrub operator has no batch dimensions (a clear error, not a crash)."""
        raise NotImplementedError(
            f"unsqueeze: {type(self).__name__} is a single {tuple(self.shape)} matrix; ntkscrub "
            "operators have no batch dimensions (apply it to a (n, k) block instead)"
        )

    def to(self, *args: Any, **kwargs: Any) -> Operator:  # type: ignore[override]
        """``self`` when the dtype/device asked for are the operator's; else a clear error (the
        products run in the model's dtype on its device: build the operator from
        ``model.to(dtype)``). :class:`Dense` converts."""
        device, dtype = _to_helper(*args, **kwargs)
        same_dtype = dtype is None or dtype == self.dtype
        same_device = device is None or torch.device(device) == self.device
        if same_dtype and same_device:
            return self
        raise TypeError(
            f"to: {type(self).__name__} is evaluated in the model's dtype {self.dtype} on "
            f"{self.device}; asked for dtype={dtype}, device={device}. Build the operator from "
            "a model and data in that dtype/device (model.to(...)), or use to_dense().to(...)"
        )

    def type(self, dtype: torch.dtype) -> Operator:  # type: ignore[override]
        return self.to(dtype)

    def cpu(self) -> Operator:  # type: ignore[override]
        return self.to(torch.device("cpu"))

    def cuda(self, device_id: Any = None) -> Operator:  # type: ignore[override]
        return self.to(torch.device("cuda" if device_id is None else f"cuda:{device_id}"))

    # ------------------------------------------------------------------ products
    def matmul(self, other: Any) -> Any:  # type: ignore[override]
        """``A @ other``: an operator for an operator (composition), else a tensor ``(rows,)``
        / ``(rows, k)`` for a tensor ``(cols,)`` / ``(cols, k)`` of the operator's dtype."""
        if isinstance(other, Operator):
            return Product(self, other)
        if isinstance(other, LinearOperator):
            return super().matmul(other)
        check_vector(other, self.shape[1], self.dtype, self.device, "rhs")
        return self._matmul(other)

    def rmatmul(self, other: Any) -> Any:  # type: ignore[override]
        """``other @ A`` for a tensor ``(rows,)`` or ``(k, rows)``."""
        if isinstance(other, Tensor) and other.dim() == 1:
            return self.mT.matmul(other)
        return self.mT.matmul(other.mT).mT

    def __add__(self, other: Any) -> Any:  # type: ignore[override]
        if isinstance(other, Operator):
            return Sum(self, other)
        if isinstance(other, Tensor):
            return Sum(self, Dense(other))
        if isinstance(other, (int, float)) and other == 0:
            return self
        return super().__add__(other)

    def mul(self, other: Any) -> Any:  # type: ignore[override]
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return Scaled(self, float(other))
        return super().mul(other)

    def __neg__(self) -> Operator:
        return Scaled(self, -1.0)

    def add_diagonal(self, diag: Any) -> Operator:  # type: ignore[override]
        """``A + d·I`` for a scalar ``d`` (a float or a 0-d tensor); ``d = 0`` returns ``A``."""
        if isinstance(diag, Tensor) and diag.dim() == 0:
            diag = float(diag)
        if isinstance(diag, bool) or not isinstance(diag, (int, float)):
            raise TypeError(f"diag: expected a number (a scalar ridge), got {type(diag).__name__}")
        if diag == 0:
            return self
        return Sum(
            self, Identity(self.shape[0], scale=float(diag), dtype=self.dtype, device=self.device)
        )

    # ------------------------------------------------------------------ dense twin
    def to_dense(self) -> Tensor:  # type: ignore[override]
        """The explicit matrix, by applying the operator to the identity (subclasses override
        with the explicit twin of their graph)."""
        eye = torch.eye(self.shape[1], dtype=self.dtype, device=self.device)
        return self._mm(eye)

    def dense(self) -> Tensor:
        """Alias of :meth:`to_dense` (small problems and tests)."""
        return self.to_dense()

    def leaves(self) -> Iterator[Operator]:
        """The operators at the bottom of the graph (each once)."""
        seen: set[int] = set()
        stack: list[Operator] = [self]
        while stack:
            op = stack.pop()
            if id(op) in seen:
                continue
            seen.add(id(op))
            if op.children:
                stack.extend(op.children)
            else:
                yield op

    def _diagonal(self) -> Tensor:
        return self.to_dense().diagonal()

    def ridge_shift(self) -> float | None:
        """``s`` if the operator is ``K + s·I`` with K PSD by construction (for SLQ), else None."""
        return None

    # ------------------------------------------------------------------ solves (issue 12)
    def _inverse(self) -> Any:
        """The inverse linear_operator's generic calls use: like linear_operator, Cholesky up to
        ``settings.max_cholesky_size`` rows (when the dense twin fits the default memory cap),
        else ntkscrub's PCG to 1e-10 (float64) / 1e-3 (float32), strict, with a rank-100
        Nyström preconditioner (100 column-products, once per call)."""
        from linear_operator import settings

        from ntkscrub.config import SolverConfig
        from ntkscrub.operators.inverse import Inverse

        cfg = SolverConfig()
        need = sum(getattr(op, "dense_bytes", lambda: 0)() for op in self.leaves())
        small = self.shape[0] <= settings.max_cholesky_size.value()
        method = "dense" if small and need <= cfg.max_dense_bytes else "cg"
        cfg = cfg.replace(method=method, precond_rank=min(100, self.shape[0]))
        return Inverse(self, cfg, label=type(self).__name__)

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """``A⁻¹ R`` (or ``L A⁻¹ R``) by :class:`~ntkscrub.operators.Inverse` with the default
        :class:`~ntkscrub.config.SolverConfig` (PCG to 1e-10 in float64 / 1e-3 in float32)."""
        X = self._inverse().matmul(right_tensor)
        return X if left_tensor is None else left_tensor @ X

    def _solve(self, rhs: Tensor, preconditioner: Any = None, num_tridiag: int = 0) -> Tensor:  # type: ignore[override]
        if num_tridiag:
            raise NotImplementedError(
                "_solve: tridiagonal outputs are not produced; use inv_quad_logdet"
            )
        return self._inverse().matmul(rhs)

    def _solve_preconditioner(self) -> None:
        return None  # the Inverse builds its own (Nyström) preconditioner

    def inv_quad_logdet(  # type: ignore[override]
        self,
        inv_quad_rhs: Tensor | None = None,
        logdet: bool | None = False,
        reduce_inv_quad: bool | None = True,
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(tr Rᵀ A⁻¹ R, log|A|)`` by ntkscrub's PCG and SLQ (or Cholesky when dense)."""
        inv = self._inverse()
        quad = torch.zeros((), dtype=self.dtype, device=self.device)
        if inv_quad_rhs is not None:
            R = inv_quad_rhs
            X = inv.matmul(R)
            quad = (R * X).sum(0) if R.dim() == 2 else (R * X).sum()
            if reduce_inv_quad and quad.dim():
                quad = quad.sum()
        elif not logdet:
            raise RuntimeError("inv_quad_logdet: give inv_quad_rhs or logdet=True")
        ld = torch.zeros((), dtype=self.dtype, device=self.device)
        if logdet:
            ld = torch.tensor(inv.logdet(), dtype=self.dtype, device=self.device)
        return quad, ld

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:  # type: ignore[override]
        return self.inv_quad_logdet(inv_quad_rhs, logdet=False, reduce_inv_quad=reduce_inv_quad)[0]

    def logdet(self) -> Tensor:  # type: ignore[override]
        return self.inv_quad_logdet(None, logdet=True)[1]

    # ------------------------------------------------------------------ export
    def to_scipy(self) -> Any:
        """This operator as a :class:`scipy.sparse.linalg.LinearOperator` (see :func:`to_scipy`)."""
        return to_scipy(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype})"


# =========================================================================== compositions
def _same_space(a: Operator, b: Operator, what: str) -> None:
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"{what}: operands differ in dtype/device "
            f"({a.dtype}/{a.device} vs {b.dtype}/{b.device})"
        )


#: Largest intermediate ``(inner, k)`` block a :class:`Product` forms in one pass. Θ X = J (Jᵀ X)
#: holds Jᵀ X, p × k: for a torchvision ResNet-18 (p = 11.2 M, float32) a 512-column Nyström
#: sketch would need 23 GB and was killed by the OOM killer on a 24 GB CPU machine (N = 500);
#: splitting the columns costs nothing in accuracy and little in time (each chunk is still one
#: multi-vector pass over the data).
PRODUCT_BLOCK_BYTES = 2**30


def _by_columns(apply: Callable[[Tensor], Tensor], X: Tensor, inner: int) -> Tensor:
    """``apply(X)`` in column chunks whose ``(inner, k)`` intermediate fits PRODUCT_BLOCK_BYTES."""
    k = X.shape[1]
    per_column = max(1, inner * X.element_size())
    chunk = max(1, PRODUCT_BLOCK_BYTES // per_column)
    if k <= chunk:
        return apply(X)
    return torch.cat([apply(X[:, i : i + chunk]) for i in range(0, k, chunk)], dim=1)


#: The dtype a dense twin sums the inner dimension of its products in (``None``: the operands'),
#: set by :func:`dense_accumulation`.
_ACCUMULATE: list[torch.dtype | None] = [None]


@contextlib.contextmanager
def dense_accumulation(dtype: torch.dtype | None) -> Iterator[None]:
    """Within this block, :meth:`Product.to_dense` sums the inner dimension in ``dtype`` when it
    is wider than the operands' and returns that dtype (sums, scalings and transposes above it
    follow by type promotion). :class:`~ntkscrub.operators.Inverse` builds its dense system so:
    Θ = J Jᵀ of a float32 J is a sum of p ≈ 10⁵ products per entry."""
    prev, _ACCUMULATE[0] = _ACCUMULATE[0], dtype
    try:
        yield
    finally:
        _ACCUMULATE[0] = prev


def accumulated_matmul(A: Tensor, B: Tensor, acc: torch.dtype | None) -> Tensor:
    """``A @ B``, the inner dimension summed in ``acc`` when that is wider than an operand's, in
    blocks of the inner dimension whose wider copies fit a quarter of PRODUCT_BLOCK_BYTES (the
    float32 J of a quick-preset Θ is 1 GB; its float64 copy need not exist at once)."""
    if acc is None or all(torch.finfo(t.dtype).bits >= torch.finfo(acc).bits for t in (A, B)):
        return A @ B
    size = torch.finfo(acc).bits // 8
    step = max(1, PRODUCT_BLOCK_BYTES // 4 // max(1, (A.shape[0] + B.shape[1]) * size))
    out = torch.zeros(A.shape[0], B.shape[1], dtype=acc, device=A.device)
    for i in range(0, A.shape[1], step):
        out += A[:, i : i + step].to(acc) @ B[i : i + step].to(acc)
    return out


class Product(Operator):
    """``A B``: ``(m, n) · (n, k)``; ``to_dense`` multiplies the dense twins."""

    def __init__(self, A: Operator, B: Operator) -> None:
        if A.shape[1] != B.shape[0]:
            raise ValueError(f"B: shapes {tuple(A.shape)} and {tuple(B.shape)} do not compose")
        _same_space(A, B, "B")
        super().__init__((A.shape[0], B.shape[1]), A.dtype, A.device)
        self.A, self.B = A, B
        self.children = (A, B)

    def _mm(self, X: Tensor) -> Tensor:
        return _by_columns(lambda V: self.A._mm(self.B._mm(V)), X, self.B.shape[0])

    def _tmm(self, X: Tensor) -> Tensor:
        return _by_columns(lambda V: self.B._tmm(self.A._tmm(V)), X, self.A.shape[1])

    def to_dense(self) -> Tensor:  # type: ignore[override]
        return accumulated_matmul(self.A.to_dense(), self.B.to_dense(), _ACCUMULATE[0])

    def _diagonal(self) -> Tensor:
        # Θ = J Jᵀ: the squared row norms of J, from explicit row blocks (no c·N × c·N matrix).
        if isinstance(self.B, Transposed) and self.B.base is self.A:
            rows = getattr(self.A, "row_norms_sq", None)
            if rows is not None:
                return rows()
        # F = Jᵀ (H J): the middle factor knows diag(Jᵀ H J) from explicit row blocks.
        if (
            isinstance(self.A, Transposed)
            and isinstance(self.B, Product)
            and self.B.B is self.A.base
        ):
            hook = getattr(self.B.A, "sandwich_diagonal", None)
            d = hook(self.A.base) if hook is not None else None
            if d is not None:
                return d
        return super()._diagonal()

    def __repr__(self) -> str:
        return f"({self.A!r} @ {self.B!r})"


class Sum(Operator):
    """``A + B + …`` of operators of one shape."""

    def __init__(self, *terms: Operator) -> None:
        flat: list[Operator] = []
        for t in terms:
            flat.extend(t.terms if isinstance(t, Sum) else (t,))
        for t in flat[1:]:
            if t.shape != flat[0].shape:
                raise ValueError(
                    f"terms: shapes {tuple(flat[0].shape)} and {tuple(t.shape)} differ"
                )
            _same_space(flat[0], t, "terms")
        super().__init__(tuple(flat[0].shape), flat[0].dtype, flat[0].device)
        self.terms = tuple(flat)
        self.children = self.terms
        self.symmetric = all(t.symmetric for t in flat)

    def _mm(self, X: Tensor) -> Tensor:
        out = self.terms[0]._mm(X)
        for t in self.terms[1:]:
            out = out + t._mm(X)
        return out

    def _tmm(self, X: Tensor) -> Tensor:
        out = self.terms[0]._tmm(X)
        for t in self.terms[1:]:
            out = out + t._tmm(X)
        return out

    def to_dense(self) -> Tensor:  # type: ignore[override]
        out = self.terms[0].to_dense()
        for t in self.terms[1:]:
            out = out + t.to_dense()
        return out

    def _diagonal(self) -> Tensor:
        out = self.terms[0]._diagonal()
        for t in self.terms[1:]:
            out = out + t._diagonal()
        return out

    def ridge_shift(self) -> float | None:
        """``s`` for ``K + s·I`` where K is a Gram product ``X Xᵀ``/``Xᵀ H X`` (PSD) — the shift
        SLQ's Gauss–Radau rule needs."""
        ridge = [t for t in self.terms if isinstance(t, Identity)]
        rest = [t for t in self.terms if not isinstance(t, Identity)]
        if len(ridge) == 1 and ridge[0].scale > 0 and all(_is_gram(t) for t in rest):
            return ridge[0].scale
        return None

    def __repr__(self) -> str:
        return " + ".join(repr(t) for t in self.terms)


def _is_gram(op: Operator) -> bool:
    """Whether ``op`` is PSD by construction: ``X Xᵀ``, ``Xᵀ X`` or ``Xᵀ (H X)`` with H PSD."""
    if isinstance(op, Counted) or (isinstance(op, Scaled) and op.scale > 0):
        return _is_gram(op.base)
    if not isinstance(op, Product):
        return False
    A, B = op.A, op.B
    if isinstance(B, Transposed) and B.base is A:
        return True
    if isinstance(A, Transposed):
        if B is A.base:
            return True
        if isinstance(B, Product) and B.B is A.base and getattr(B.A, "psd", False):
            return True
    return False


class Scaled(Operator):
    """``c · A`` for a float ``c``."""

    def __init__(self, A: Operator, scale: float) -> None:
        super().__init__(tuple(A.shape), A.dtype, A.device)
        self.base, self.scale = A, float(scale)
        self.children = (A,)
        self.symmetric = A.symmetric

    def _mm(self, X: Tensor) -> Tensor:
        return self.scale * self.base._mm(X)

    def _tmm(self, X: Tensor) -> Tensor:
        return self.scale * self.base._tmm(X)

    def to_dense(self) -> Tensor:  # type: ignore[override]
        return self.scale * self.base.to_dense()

    def _diagonal(self) -> Tensor:
        return self.scale * self.base._diagonal()


class Transposed(Operator):
    """``Aᵀ``; its transpose is ``A`` again."""

    def __init__(self, A: Operator) -> None:
        super().__init__((A.shape[1], A.shape[0]), A.dtype, A.device)
        self.base = A
        self.children = (A,)

    def _mm(self, X: Tensor) -> Tensor:
        return self.base._tmm(X)

    def _tmm(self, X: Tensor) -> Tensor:
        return self.base._mm(X)

    def _transpose_nonbatch(self) -> Operator:
        return self.base

    def to_dense(self) -> Tensor:  # type: ignore[override]
        return self.base.to_dense().T

    def __repr__(self) -> str:
        return f"{self.base!r}ᵀ"


class Identity(Operator):
    """``s · I`` of size n (``s`` = ``scale``, e.g. the ridge λ)."""

    symmetric = True

    def __init__(
        self, n: int, *, scale: float = 1.0, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__((n, n), dtype, torch.device(device))
        self.scale = float(scale)

    def _mm(self, X: Tensor) -> Tensor:
        return self.scale * X

    _tmm = _mm

    def mul(self, other: Any) -> Any:  # type: ignore[override]
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return Identity(
                self.shape[0], scale=self.scale * other, dtype=self.dtype, device=self.device
            )
        return super().mul(other)

    def to_dense(self) -> Tensor:  # type: ignore[override]
        return self.scale * torch.eye(self.shape[0], dtype=self.dtype, device=self.device)

    def _diagonal(self) -> Tensor:
        return torch.full((self.shape[0],), self.scale, dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return f"{self.scale:g}·I"


class Dense(Operator):
    """An explicit ``(m, n)`` tensor as an operator (small matrices: Schur complements, tests)."""

    def __init__(self, matrix: Tensor, *, symmetric: bool = False) -> None:
        if not isinstance(matrix, Tensor) or matrix.dim() != 2 or not matrix.is_floating_point():
            raise TypeError("matrix: expected a floating (m, n) tensor")
        super().__init__(tuple(matrix.shape), matrix.dtype, matrix.device)
        self.matrix = matrix
        self.symmetric = symmetric

    def _mm(self, X: Tensor) -> Tensor:
        return self.matrix @ X

    def _tmm(self, X: Tensor) -> Tensor:
        return self.matrix.T @ X

    def to_dense(self) -> Tensor:  # type: ignore[override]
        return self.matrix

    def to(self, *args: Any, **kwargs: Any) -> Dense:  # type: ignore[override]
        device, dtype = _to_helper(*args, **kwargs)
        return Dense(self.matrix.to(device=device, dtype=dtype), symmetric=self.symmetric)


class MatvecCounter:
    """Column-products counted by :class:`Counted` wrappers sharing this counter."""

    def __init__(self) -> None:
        self.count = 0

    def __repr__(self) -> str:
        return f"MatvecCounter({self.count})"


class Counted(Operator):
    """``A`` itself, counting the columns it is applied to (``A X`` or ``Aᵀ X`` with k columns
    adds k) into a :class:`MatvecCounter` shared by every wrapper given the same counter — the
    unit in which a scrub's cost is reported."""

    def __init__(self, A: Operator, counter: MatvecCounter | None = None) -> None:
        super().__init__(tuple(A.shape), A.dtype, A.device)
        self.base = A
        self.counter = counter if counter is not None else MatvecCounter()
        self.children = (A,)
        self.symmetric = A.symmetric

    @property
    def matvecs(self) -> int:
        return self.counter.count

    def _mm(self, X: Tensor) -> Tensor:
        self.counter.count += X.shape[1]
        return self.base._mm(X)

    def _tmm(self, X: Tensor) -> Tensor:
        self.counter.count += X.shape[1]
        return self.base._tmm(X)

    def _transpose_nonbatch(self) -> Operator:
        return self if self.symmetric else Counted(self.base.mT, self.counter)

    def to_dense(self) -> Tensor:  # type: ignore[override]
        return self.base.to_dense()

    def _diagonal(self) -> Tensor:
        return self.base._diagonal()

    def ridge_shift(self) -> float | None:
        return self.base.ridge_shift()

    def __getattr__(self, name: str) -> Any:
        # Named attributes of the wrapped operator (c, n, p, theta, outputs, ...) stay reachable.
        base = self.__dict__.get("base")
        if base is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(base, name)

    def __repr__(self) -> str:
        return f"Counted({self.base!r})"


class Recorded(Counted):
    """A counted ``A`` that, while :attr:`pairs` is set (a
    :class:`~ntkscrub.solvers.KrylovPairs`), also keeps every product's ``(X, A X)`` — the
    products a solve computes anyway, for Krylov recycling (:mod:`ntkscrub.solvers.recycle`;
    the cross-entropy Newton steps keep Θ's products to sharpen Θ's factor for the next step)."""

    def __init__(self, A: Operator, counter: MatvecCounter | None = None) -> None:
        super().__init__(A, counter)
        self.pairs: Any = None

    def _mm(self, X: Tensor) -> Tensor:
        Y = super()._mm(X)
        if self.pairs is not None:
            self.pairs.add(X, Y)
        return Y

    def __repr__(self) -> str:
        return f"Recorded({self.base!r})"


# =========================================================================== scipy export
def to_scipy(op: LinearOperator) -> Any:
    """``op`` as a :class:`scipy.sparse.linalg.LinearOperator`: float64 numpy in and out.

    Vectors are converted to the operator's dtype/device, multiplied, and returned as float64
    numpy arrays, so scipy's ``cg``, ``minres``, ``eigsh``, ``svds`` run on it (issue 16, as
    curvlinops offers).
    """
    from scipy.sparse.linalg import LinearOperator as ScipyOperator

    if not isinstance(op, LinearOperator):
        raise TypeError(f"op: expected a LinearOperator, got {type(op).__name__}")
    m, n = (int(s) for s in op.shape)

    def apply(A: Any, x: np.ndarray) -> np.ndarray:
        X = torch.as_tensor(np.asarray(x, dtype=np.float64)).to(dtype=op.dtype, device=op.device)
        Y = A.matmul(X)
        return Y.detach().to(device="cpu", dtype=torch.float64).numpy()

    return ScipyOperator(
        shape=(m, n),
        dtype=np.float64,
        matvec=lambda x: apply(op, x.reshape(-1)),
        rmatvec=lambda x: apply(op.mT, x.reshape(-1)),
        matmat=lambda X: apply(op, X),
        rmatmat=lambda X: apply(op.mT, X),
    )
