#!/usr/bin/env python
"""Redraw Figures 1–4 and results.md from a ``results.json`` alone (nothing is recomputed)::

    .venv/bin/python experiments/figures.py experiments/results/quick/results.json [OUT_DIR]

A thin script over :mod:`ntkscrub.recipes.reproduction.figures`.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from ntkscrub.recipes.reproduction.figures import main  # noqa: E402

if __name__ == "__main__":
    main()
