#!/usr/bin/env python
"""Copy just the images the ``paper`` preset needs into ``experiments/cache/gpu-data/``.

The accelerator machine cannot see ``../shared`` and carries at most 64 MiB, so a GPU run reads a
compact image folder shipped inside the repository (ignored by git; pass it with ``carry``):

* ``train/<class>/NNNN.jpg`` for the pre-training classes: the *whole* train folder of each
  pre-training class (5000 files each). ``pretrain_cifar`` picks a seeded permutation within each
  class, so with complete class folders it picks exactly the files it picks from the full folder.
* an empty folder for every other class (the loaders check that all ten CIFAR-10 class folders
  exist; the fine-tuning images travel in the split caches below, which hold them as uint8).
* ``splits/small_<key>.pt``: the small split of each seed, built on the full folder with
  ``small_cifar`` (uint8, about 3.4 MB each). The reproduction reads ``<data-root>/splits/`` first,
  so the GPU run uses exactly the split a CPU run on the full folder would use.

Usage::

    .venv/bin/python experiments/make_gpu_data.py            # paper preset, its seeds (0–4)
    .venv/bin/python experiments/make_gpu_data.py --seeds 0,1 --preset paper
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

from ntkscrub.recipes import data_root  # noqa: E402
from ntkscrub.recipes.datasets import CIFAR10_CLASSES, small_cifar  # noqa: E402
from ntkscrub.recipes.reproduction import PRESETS  # noqa: E402
from ntkscrub.recipes.reproduction.data import (  # noqa: E402
    data_available,
    pretrain_params,
    small_cache_name,
    small_split_params,
)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--seeds", default=None, help="comma-separated (default: the preset's)")
    p.add_argument(
        "--src", type=Path, default=None, help="the full image folder (default: data_root())"
    )
    p.add_argument("--dst", type=Path, default=HERE / "cache" / "gpu-data")
    p.add_argument("--max-mb", type=float, default=50.0, help="refuse to exceed this size")
    args = p.parse_args(argv)
    cfg = PRESETS[args.preset]
    seeds = cfg.train.seeds
    if args.seeds is not None:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    src, dst = data_root(args.src), args.dst.resolve()
    if not data_available(src):
        raise SystemExit(f"--src {src}: no CIFAR-10 image folder")
    if dst.exists():
        shutil.rmtree(dst)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (dst / split / name).mkdir(parents=True, exist_ok=True)

    # pre-training classes: complete train folders (identical seeded selection, see above)
    pre = pretrain_params(cfg)
    copied = 0
    for c in pre["classes"]:
        name = CIFAR10_CLASSES[c]
        for f in sorted((src / "train" / name).iterdir()):
            shutil.copy2(f, dst / "train" / name / f.name)
            copied += 1
    # fine-tuning split of each seed: the cache the run reads (built on the full folder)
    (dst / "splits").mkdir(exist_ok=True)
    for seed in seeds:
        cache = dst / "splits" / small_cache_name(cfg, seed)
        small_cifar(src, **small_split_params(cfg, seed), cache=cache)
    size_mb = folder_size(dst) / 1e6
    print(
        f"{copied} images + {len(seeds)} split caches in {dst}: {size_mb:.1f} MB of file bytes "
        f"({sum(1 for _ in dst.rglob('*') if _.is_file())} files)"
    )
    if size_mb > args.max_mb:
        raise SystemExit(f"{dst} is {size_mb:.1f} MB, over --max-mb {args.max_mb}")
    return dst


if __name__ == "__main__":
    main()
