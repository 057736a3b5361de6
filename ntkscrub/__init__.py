"""ntkscrub: matrix-free NTK forgetting (Golatkar, Achille, Soatto, ECCV 2020) at scale.

The public API: :func:`scrub` (Proposition 2 + eq. 11), the baselines :func:`retrain`,
:func:`finetune` and :func:`fisher_forget`, the :mod:`~ntkscrub.readouts` and the information
:mod:`~ntkscrub.bounds` (Proposition 1). Operators and solvers live in
:mod:`ntkscrub.operators` and :mod:`ntkscrub.solvers`.
"""

import warnings

with warnings.catch_warnings():
    # linear_operator's import calls torch.jit.script, which torch ≥ 2.10 deprecates with a
    # FutureWarning about linear_operator's internals — nothing a user of ntkscrub can act on.
    # torch's own JVP decompositions do the same when the first torch.func.jvp imports them
    # (the first scrub); importing them here, inside the filter, keeps that warning away too.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    import linear_operator  # noqa: F401

    try:
        import torch._decomp.decompositions_for_jvp  # noqa: F401
    except ImportError:  # a private module: absent in some torch versions, then nothing to hide
        pass

from ntkscrub import bounds, readouts  # noqa: E402
from ntkscrub.baselines import ForgetResult, finetune, fisher_forget, retrain
from ntkscrub.batches import Batches, as_batches
from ntkscrub.params import ParameterSpace, check_eval_mode
from ntkscrub.scrub import DenseTooLarge, ScrubResult, scrub
from ntkscrub.scrubber import Scrubber

__all__ = [
    "Batches",
    "DenseTooLarge",
    "ForgetResult",
    "ParameterSpace",
    "ScrubResult",
    "Scrubber",
    "as_batches",
    "bounds",
    "check_eval_mode",
    "finetune",
    "fisher_forget",
    "readouts",
    "retrain",
    "scrub",
]
#: The one source of the version: pyproject.toml reads it (``dynamic = ["version"]``).
__version__ = "0.1.0"
