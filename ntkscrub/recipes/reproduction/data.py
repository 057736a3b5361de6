"""The reproduction's data: the small CIFAR-10 split of each seed, the pre-training split, the
seed-matched replacement set, and a random stand-in when no image folder is present.

Splits are cached (``<cache>/splits/small_<key>.pt``; a copy shipped with the data root under
``splits/``, as ``experiments/make_gpu_data.py`` writes it, is preferred).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ntkscrub.recipes.datasets import SplitData, pretrain_cifar, small_cifar
from ntkscrub.recipes.reproduction.config import Config
from ntkscrub.recipes.runtime import cache_key

__all__ = [
    "synthetic_split",
    "small_split_params",
    "small_cache_name",
    "pretrain_params",
    "load_small",
    "load_pretrain",
    "data_available",
    "seed_matched_data",
    "data_sets",
]


def _synthetic_xy(n_per_class: int, classes: int, gen: torch.Generator, means: Tensor):
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), 3, 32, 32, generator=gen) + means[y]
    return x, y


def synthetic_split(
    n_classes: int, n_train: int, n_val: int, n_test: int, n_forget: int, seed: int, what: str
) -> SplitData:
    """Random class-dependent images (a learnable stand-in used only when no data are present)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    means = 0.8 * torch.randn(n_classes, 3, 32, 32, generator=gen)
    train = _synthetic_xy(n_train, n_classes, gen, means)
    val = _synthetic_xy(n_val, n_classes, gen, means)
    test = _synthetic_xy(n_test, n_classes, gen, means)
    rows = torch.randperm(n_train, generator=gen)[:n_forget].sort().values  # class-0 rows
    fmask = torch.zeros(len(train[1]), dtype=torch.bool)
    fmask[rows] = True
    return SplitData(
        train=train,
        retain=(train[0][~fmask], train[1][~fmask]),
        forget=(train[0][fmask], train[1][fmask]),
        val=val,
        test=test,
        indices={
            "train": list(range(len(train[1]))),
            "val": list(range(len(val[1]))),
            "test": list(range(len(test[1]))),
            "forget_rows": rows.tolist(),
            "retain_rows": torch.nonzero(~fmask).flatten().tolist(),
            "index": "row of the synthetic tensors (no image files)",
        },
        classes=tuple(range(n_classes)),
        num_classes=n_classes,
        source=f"SYNTHETIC random images ({what}); the CIFAR-10 image folder was not found",
        class_names=tuple(f"synthetic{k}" for k in range(n_classes)),
    )


def small_split_params(cfg: Config, seed: int) -> dict[str, Any]:
    """Arguments of :func:`small_cifar` for one seed (also the cache key)."""
    s = cfg.split
    return {
        "classes": list(s.classes),
        "n_train": s.n_train,
        "n_val": s.n_val,
        "n_test": s.n_test,
        "n_forget": s.n_forget,
        "forget_class": s.forget_class,
        "seed": seed,
    }


def small_cache_name(cfg: Config, seed: int) -> str:
    """File name of the cached small-CIFAR split of ``seed`` (keyed by its parameters)."""
    return f"small_{cache_key(small_split_params(cfg, seed))}.pt"


def pretrain_params(cfg: Config) -> dict[str, Any]:
    """Arguments of :func:`pretrain_cifar` (also the cache key)."""
    return {
        "classes": list(cfg.pretrain.classes),
        "n_train": cfg.pretrain.n_train,
        "n_val": cfg.pretrain.n_val,
        "n_test": 0,  # pre-training is judged on its validation images only
        "seed": 0,
    }


def load_small(cfg: Config, seed: int, data_root: Path, cache_dir: Path) -> SplitData:
    """The small split of one seed: a split cache shipped with the data root (``splits/``) or in
    the cache dir, else built from the image folder; random data with ``cfg.synthetic``."""
    s = cfg.split
    if cfg.synthetic:
        return synthetic_split(
            len(s.classes), s.n_train, s.n_val, s.n_test, s.n_forget, seed, "fine-tuning"
        )
    name = small_cache_name(cfg, seed)
    shipped = data_root / "splits" / name
    cache = shipped if shipped.is_file() else cache_dir / "splits" / name
    return small_cifar(data_root, **small_split_params(cfg, seed), cache=cache)


def load_pretrain(cfg: Config, data_root: Path, cache_dir: Path) -> SplitData:
    """The pre-training split (cached), random data with ``cfg.synthetic``."""
    p = cfg.pretrain
    if cfg.synthetic:
        return synthetic_split(len(p.classes), p.n_train, p.n_val, 1, 0, 999, "pre-training")
    params = pretrain_params(cfg)
    cache = cache_dir / "splits" / f"pretrain_{cache_key(params)}.pt"
    return pretrain_cifar(data_root, cache=cache, **params)


def data_available(root: Path) -> bool:
    """Whether ``root`` is an image folder with ``train/`` and ``test/``."""
    return (root / "train").is_dir() and (root / "test").is_dir()


def seed_matched_data(split: SplitData, seed: int) -> tuple[tuple[Tensor, Tensor], list[list[int]]]:
    """D with each forget row overwritten by a duplicate of a random retain row (the reference
    code's device). Same size and row order as D, so the same SGD seed gives the same batches."""
    X, Y = split.train[0].clone(), split.train[1].clone()
    rows_f = split.indices["forget_rows"]
    rows_r = split.indices["retain_rows"]
    rng = np.random.default_rng(50_000 + seed)
    pick = rng.choice(np.array(rows_r), size=len(rows_f), replace=False)
    for r, j in zip(rows_f, pick):
        X[r], Y[r] = X[int(j)], Y[int(j)]
    return (X, Y), [[int(r), int(j)] for r, j in zip(rows_f, pick)]


def data_sets(split: SplitData) -> dict[str, Any]:
    """The four evaluation sets of a split by name: forget, retain, test, val."""
    return {"forget": split.forget, "retain": split.retain, "test": split.test, "val": split.val}
