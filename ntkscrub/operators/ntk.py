"""The empirical NTK Θ_AB = J_A J_Bᵀ (+ λI on diagonal blocks) as a lazy LinearOperator.

Θ is ``(c·|A|, c·|B|)``; ``Θ V`` costs one VJP pass over B and one JVP pass over A and never
forms J or Θ. :class:`NTK` subclasses :class:`linear_operator.LinearOperator`, so
linear_operator's ``solve``, ``inv_quad_logdet`` and settings apply to it; ntkscrub's own
solvers (:mod:`ntkscrub.solvers`) use :meth:`NTK.matmul` the same way.

:class:`PartitionedNTK` gives the blocks rr, rf, fr, ff of a retain/forget partition (eq. 10) and
:func:`dense_ntk` the exact twin built from explicit Jacobians.
"""

from __future__ import annotations

from typing import Any

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from ntkscrub.operators.jacobian import Jacobian, check_vector
from ntkscrub.params import ParameterSpace

__all__ = ["NTK", "PartitionedNTK", "dense_ntk"]


class NTK(LinearOperator):
    """``Θ_AB + λ·I`` (the ridge only when A and B are the same data): ``(c·|A|, c·|B|)``.

    Args:
        theta: the linearisation point, flat ``(p,)`` (the operator's tensor representation, so
            linear_operator can rebuild it cheaply).
        jac_a: the :class:`Jacobian` of the row data A (at ``theta``).
        jac_b: the :class:`Jacobian` of the column data B (default: ``jac_a``).
        ridge: λ ≥ 0 added to the diagonal of a square (A = B) block.

    ``NTK.matvecs`` counts column-products (one JVP + one VJP per column) since construction —
    the unit in which a scrub's cost is reported.
    """

    def __init__(
        self,
        theta: Tensor,
        *,
        jac_a: Jacobian,
        jac_b: Jacobian | None = None,
        ridge: float = 0.0,
        counter: list | None = None,
    ) -> None:
        if not isinstance(jac_a, Jacobian):
            raise TypeError(f"jac_a: expected a Jacobian, got {type(jac_a).__name__}")
        jac_b = jac_a if jac_b is None else jac_b
        if not isinstance(jac_b, Jacobian):
            raise TypeError(f"jac_b: expected a Jacobian, got {type(jac_b).__name__}")
        ridge = float(ridge)
        if not (ridge >= 0.0 and ridge != float("inf")):
            raise ValueError(f"ridge: must be a finite number ≥ 0, got {ridge}")
        if ridge > 0.0 and jac_a is not jac_b:
            raise ValueError("ridge: only a diagonal block (jac_a is jac_b) can carry a ridge")
        if jac_a.p != jac_b.p or jac_a.c != jac_b.c:
            raise ValueError("jac_b: row and column Jacobians must share p and c")
        self.jac_a, self.jac_b, self.ridge = jac_a, jac_b, ridge
        # A shared one-element list so that transposes and rebuilt copies count into one place.
        self._counter = counter if counter is not None else [0]
        super().__init__(theta, jac_a=jac_a, jac_b=jac_b, ridge=ridge, counter=self._counter)

    @property
    def matvecs(self) -> int:
        return self._counter[0]

    def _size(self) -> torch.Size:
        return torch.Size((self.jac_a.c * self.jac_a.n, self.jac_b.c * self.jac_b.n))

    def _transpose_nonbatch(self) -> NTK:
        return NTK(
            self._args[0],
            jac_a=self.jac_b,
            jac_b=self.jac_a,
            ridge=self.ridge,
            counter=self._counter,
        )

    def _matmul(self, rhs: Tensor) -> Tensor:
        single = rhs.dim() == 1
        if rhs.dim() > 2:
            raise ValueError(
                f"rhs: batched right-hand sides are not supported, got {tuple(rhs.shape)}"
            )
        check_vector(rhs, self.jac_b.c * self.jac_b.n, self.jac_b.dtype, self.jac_b.device, "rhs")
        self._counter[0] += 1 if single else rhs.shape[1]
        out = self.jac_a.matvec(self.jac_b.rmatvec(rhs))
        if self.ridge:
            out = out + self.ridge * rhs
        return out

    def _diagonal(self) -> Tensor:
        if self.jac_a is not self.jac_b:
            raise ValueError("diagonal: only defined for a square block")
        return self.jac_a.row_norms_sq() + self.ridge

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:
        raise NotImplementedError("NTK operators are not batched")

    def dense(self) -> Tensor:
        """The exact twin ``J_A J_Bᵀ + λI`` from explicit Jacobians (small problems only)."""
        return dense_ntk(
            self.jac_a.dense(),
            self.jac_b.dense() if self.jac_b is not self.jac_a else None,
            ridge=self.ridge,
        )

    def __repr__(self) -> str:
        return f"NTK(shape={tuple(self.shape)}, ridge={self.ridge})"


def dense_ntk(J_a: Tensor, J_b: Tensor | None = None, *, ridge: float = 0.0) -> Tensor:
    """``J_a J_bᵀ (+ λI)`` from explicit Jacobians ``(c·|A|, p)``, ``(c·|B|, p)``."""
    if J_b is None:
        K = J_a @ J_a.T
        if ridge:
            K = K + ridge * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
        return K
    if ridge:
        raise ValueError("ridge: only a diagonal block can carry a ridge")
    return J_a @ J_b.T


class PartitionedNTK:
    """The NTK of a retain/forget partition D = D_r ⊔ D_f at one point θ (eq. 10).

    Args:
        space: the parameter space.
        retain, forget: D_r and D_f (any form :func:`~ntkscrub.batches.as_batches` accepts).
        at: the linearisation point (default: the model's parameters).
        ridge: λ on the diagonal blocks rr and ff.
        batch_size, autocast: passed to both :class:`Jacobian` operators.

    Blocks: ``rr`` ``(c·N_r, c·N_r)``, ``rf`` ``(c·N_r, c·N_f)``, ``fr``, ``ff``; all share one
    matvec counter (:attr:`matvecs`).
    """

    def __init__(
        self,
        space: ParameterSpace,
        retain: Any,
        forget: Any,
        *,
        at: Any = None,
        ridge: float = 0.0,
        batch_size: int = 256,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.J_r = Jacobian(
            space, retain, at=at, batch_size=batch_size, name="retain", autocast=autocast
        )
        self.J_f = Jacobian(
            space,
            forget,
            at=self.J_r.theta,
            batch_size=batch_size,
            name="forget",
            autocast=autocast,
        )
        self.theta = self.J_r.theta
        self.ridge = float(ridge)
        self._counter: list = [0]
        kw: dict[str, Any] = {"counter": self._counter}
        self.rr = NTK(self.theta, jac_a=self.J_r, ridge=self.ridge, **kw)
        self.ff = NTK(self.theta, jac_a=self.J_f, ridge=self.ridge, **kw)
        self.rf = NTK(self.theta, jac_a=self.J_r, jac_b=self.J_f, **kw)
        self.fr = NTK(self.theta, jac_a=self.J_f, jac_b=self.J_r, **kw)

    @property
    def matvecs(self) -> int:
        return self._counter[0]

    def __getitem__(self, key: str) -> NTK:
        if key not in ("rr", "rf", "fr", "ff"):
            raise KeyError(f"key: expected one of 'rr', 'rf', 'fr', 'ff', got {key!r}")
        return getattr(self, key)
