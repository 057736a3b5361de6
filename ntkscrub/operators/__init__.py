"""Lazy operators of the linearised network: J, Jᵀ, Θ, P and the GGN (never formed)."""

from ntkscrub.operators.ggn import GGN, ggn_diagonal, output_hessian_apply
from ntkscrub.operators.jacobian import Jacobian, StackedJacobian
from ntkscrub.operators.ntk import NTK, PartitionedNTK, dense_ntk
from ntkscrub.operators.projection import Projection

__all__ = [
    "GGN",
    "Jacobian",
    "NTK",
    "PartitionedNTK",
    "Projection",
    "StackedJacobian",
    "dense_ntk",
    "ggn_diagonal",
    "output_hessian_apply",
]
