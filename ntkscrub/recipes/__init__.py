"""Applications built on the ntkscrub engine: data sets, models, the demo, the pipeline runtime,
and the §5 reproduction with its training recipes.

Where things live:

* :mod:`.datasets`, :mod:`.models` — CIFAR splits and the digits demo data, All-CNN / ResNet-18 /
  MLP / small CNN.
* :mod:`.demo` — ``ntkscrub demo``: a mislabeled cohort forgotten by every method.
* :mod:`.runtime` — stages under one budget, their timings, the hardware record, cache keys.
* :mod:`.reproduction` — the paper's §5 pipeline (``ntkscrub reproduce``).
* :func:`data_root` — where the CIFAR-10 image folder is found (one rule everywhere).

The engine (params, batches, operators, solvers, scrub, noise, bounds, readouts, baselines and the
SGD training loop they run, :mod:`ntkscrub.training`) sits in the package root and never imports
this sub-package.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV", "data_root", "source_checkout"]

#: The environment variable naming the CIFAR-10 image folder (``train/<class>/*.jpg``, ``test/``).
DATA_ENV = "NTKSCRUB_DATA"


def source_checkout() -> Path | None:
    """The repository this package runs from (a folder with ``experiments/`` and
    ``benchmarks/`` beside ``ntkscrub/``), or ``None`` for an installed copy."""
    repo = Path(__file__).resolve().parents[2]
    return repo if (repo / "experiments").is_dir() and (repo / "benchmarks").is_dir() else None


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Where the CIFAR-10 image folder is: the one rule of the library and the experiments.

    In order: ``explicit`` (``--data-root``), else ``$NTKSCRUB_DATA``, else
    ``<repository>/../shared/data/cifar10-jpeg`` (the shared data folder beside the checkout,
    where CI finds it). The path is returned whether or not it exists: the caller decides (the
    quick and paper presets refuse to run without it; the smoke preset falls back to random
    images and says so loudly).
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(DATA_ENV, "")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg"
