"""ntkscrub: matrix-free NTK forgetting (Golatkar, Achille, Soatto, ECCV 2020) at scale."""

from ntkscrub.batches import Batches, as_batches
from ntkscrub.params import ParameterSpace, check_eval_mode

__all__ = ["Batches", "as_batches", "ParameterSpace", "check_eval_mode"]
__version__ = "0.1.0"
