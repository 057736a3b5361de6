#!/usr/bin/env python
"""Reproduce §5 of "Forgetting Outside the Box" (Golatkar, Achille, Soatto, ECCV 2020).

A thin script: the pipeline lives in :mod:`ntkscrub.recipes.reproduction` (also ``ntkscrub
reproduce``). Usage (from the repository root)::

    .venv/bin/python experiments/reproduce.py --preset smoke
    .venv/bin/python experiments/reproduce.py --preset quick
    .venv/bin/python experiments/reproduce.py --preset paper --device cuda \
        --data-root experiments/cache/gpu-data --budget-seconds 480
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from ntkscrub.recipes.reproduction import main  # noqa: E402

if __name__ == "__main__":
    main()
