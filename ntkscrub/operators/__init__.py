"""Lazy operators of the linearised network, composed as LinearOperators: J, Jᵀ, Θ = J Jᵀ + λI,
P, the GGN Jᵀ H J + δI, the dual H^½ J Jᵀ H^½ + δI, and the one inverse operator that solves them.
"""

from ntkscrub.operators.base import (
    Counted,
    Dense,
    Identity,
    MatvecCounter,
    Operator,
    Product,
    Recorded,
    Scaled,
    Sum,
    Transposed,
    to_scipy,
)
from ntkscrub.operators.ggn import GGN, Dual, OutputHessian, ggn_diagonal, output_hessian_apply
from ntkscrub.operators.inverse import (
    DenseTooLarge,
    Inverse,
    SolveNotConverged,
    dense_dtype,
    pcg_solve,
)
from ntkscrub.operators.jacobian import Jacobian, StackedJacobian
from ntkscrub.operators.ntk import NTK, PartitionedNTK, dense_ntk, pivot_columns
from ntkscrub.operators.projection import Projection

__all__ = [
    "Counted",
    "Dense",
    "DenseTooLarge",
    "Dual",
    "GGN",
    "Identity",
    "Inverse",
    "Jacobian",
    "MatvecCounter",
    "NTK",
    "Operator",
    "OutputHessian",
    "PartitionedNTK",
    "Product",
    "Projection",
    "Recorded",
    "Scaled",
    "SolveNotConverged",
    "StackedJacobian",
    "Sum",
    "Transposed",
    "dense_dtype",
    "dense_ntk",
    "ggn_diagonal",
    "output_hessian_apply",
    "pcg_solve",
    "pivot_columns",
    "to_scipy",
]
