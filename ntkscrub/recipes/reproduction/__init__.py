"""§5 of "Forgetting Outside the Box" (Golatkar, Achille, Soatto, ECCV 2020), reproduced.

Where things live:

* :mod:`.config` — :class:`Recipe` (the one training-recipe type) and the nested frozen
  :class:`Config`; :data:`PRESETS` (smoke / quick / paper) as diffs of :data:`BASE`.
* :mod:`.data` — the small CIFAR-10 split per seed, the pre-training split, the seed-matched set.
* :mod:`.caching` — checkpoints and finished seeds, named by the settings that made them.
* :mod:`.methods` — the method registry :data:`METHODS` (one entry per compared model).
* :mod:`.stages` — the train / forget / measure stages and :func:`run_seed`, their list.
* :mod:`.measure` — the readouts computed from cached softmaxes; :mod:`.weights` flat weights and
  Fisher-noise draws; :mod:`.failures` the failed-training rule.
* :mod:`.summary` — the summary across seeds and ``--resummarize``; :mod:`.figures` the four
  figures and results.md from results.json alone.
* :mod:`.main` — the command line (``experiments/reproduce.py``, ``ntkscrub reproduce``).

The run itself uses :mod:`ntkscrub.recipes.runtime` (budget, stage timings, hardware, JSON).
"""

from ntkscrub.recipes.reproduction.config import BASE, PRESETS, Config, Recipe
from ntkscrub.recipes.reproduction.failures import training_failure
from ntkscrub.recipes.reproduction.main import main
from ntkscrub.recipes.reproduction.methods import METHODS, Method
from ntkscrub.recipes.reproduction.stages import run_seed
from ntkscrub.recipes.reproduction.summary import resummarize, summarize

__all__ = [
    "BASE",
    "PRESETS",
    "Config",
    "Recipe",
    "METHODS",
    "Method",
    "main",
    "run_seed",
    "summarize",
    "resummarize",
    "training_failure",
]
