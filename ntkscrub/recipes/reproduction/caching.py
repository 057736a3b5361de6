"""Checkpoints and finished seeds, named by the settings that made them.

Layout under ``--cache-dir``: ``pretrain-<model>-w<width>-<key>.pt``; per seed
``seed<s>-<key>/`` with ``original.pt`` (+ ``original.path.pt``, the per-epoch weights for Fig.
1), ``retrain<k>.pt``, ``seed_matched.pt``, ``finetune-<recipe key>.pt``, ``theta0_head.pt`` and
``result-<config key>.json`` (the finished seed); ``splits/`` holds the data splits. The training
keys are those of the earlier flat configuration, so existing checkpoints stay valid; a finished
seed's key also holds the scrubs' library defaults (:func:`library_defaults`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ntkscrub.config import NoiseConfig, ProductConfig, SLQConfig, SolverConfig
from ntkscrub.matching import MatchConfig
from ntkscrub.recipes.reproduction.config import Config, Recipe
from ntkscrub.recipes.reproduction.data import pretrain_params, small_split_params
from ntkscrub.recipes.reproduction.weights import flat_params
from ntkscrub.recipes.runtime import cache_key
from ntkscrub.shifts import NewtonConfig
from ntkscrub.training import atomic_torch_save, load_checkpoint, save_checkpoint, train

__all__ = [
    "train_cached",
    "seed_cache_dir",
    "pretrain_checkpoint",
    "finished_seed_path",
    "library_defaults",
]


def seed_cache_dir(cfg: Config, cache_dir: Path, seed: int) -> Path:
    """The folder of one seed's checkpoints, keyed by everything that shapes its training."""
    key = cache_key(
        {
            "model": cfg.model,
            "width": cfg.width,
            "split": small_split_params(cfg, seed),
            "pre": pretrain_params(cfg),
            "pre_recipe": cfg.pretrain.recipe.train_kwargs(),
            "ft": cfg.train.finetune.train_kwargs(),
            "head_probe": [cfg.train.head_probe.epochs, cfg.train.head_probe.lr],
            "synthetic": cfg.synthetic,
        }
    )
    return cache_dir / f"seed{seed}-{key}"


def pretrain_checkpoint(cfg: Config, cache_dir: Path) -> Path:
    """The pre-trained model's checkpoint (shared by every seed)."""
    key = cache_key(
        {
            "model": cfg.model,
            "width": cfg.width,
            "pre": pretrain_params(cfg),
            "recipe": cfg.pretrain.recipe.train_kwargs(),
        }
        | {"synthetic": cfg.synthetic}
    )
    return cache_dir / f"pretrain-{cfg.model}-w{cfg.width:g}-{key}.pt"


def finished_seed_path(cfg: Config, cache_dir: Path, seed: int) -> Path:
    """Where a finished seed's result is kept (any setting change makes a new name, a changed
    library default of the scrubs included: :func:`library_defaults`)."""
    rkey = cache_key(
        cfg.flat() | {"seeds": None, "budget_seconds": None, "defaults": library_defaults()}
    )
    return seed_cache_dir(cfg, cache_dir, seed) / f"result-{rkey}.json"


def library_defaults() -> dict[str, dict[str, Any]]:
    """The defaults of every configuration the scrubs and bounds take but the reproduction does
    not set. Why in the key: a changed default (the CE Newton forcing, 1e-3 → 0.01) changes a
    seed's recorded costs, and the result read back from the cache would have kept the old
    ones; the trainings are keyed by :func:`seed_cache_dir` and stay cached."""
    classes = (NewtonConfig, MatchConfig, SolverConfig, ProductConfig, SLQConfig, NoiseConfig)
    return {cls.__name__: cls().to_dict() for cls in classes}


def train_cached(
    path: Path,
    model: nn.Module,
    data: Any,
    *,
    recipe: Recipe,
    seed: int,
    anchor: nn.Module | None,
    device: torch.device,
    progress: bool,
    snapshots: bool = False,
) -> tuple[nn.Module, dict[str, Any], Tensor | None]:
    """``train`` with a checkpoint: load ``path`` when it exists, else train and save it.

    With ``snapshots``, the flat weights after every epoch (and at the start) are kept in
    ``<path>.path.pt`` for the PCA of Fig. 1. Returns ``(model in eval mode, meta, snapshots)``;
    ``meta = {"log": TrainLog dict, "seed", "from_cache"}``.
    """
    snap_path = path.with_suffix(".path.pt")
    if path.is_file() and (not snapshots or snap_path.is_file()):
        net, meta = load_checkpoint(path, model)
        snaps = torch.load(snap_path, weights_only=True) if snapshots else None
        return net.to(device).eval(), {**meta, "from_cache": True}, snaps
    snaps_list: list[Tensor] = [flat_params(model)] if snapshots else []

    def keep(epoch: int, net: nn.Module, log_: Any) -> bool:
        snaps_list.append(flat_params(net))
        return False

    net, tlog = train(
        model,
        data,
        seed=seed,
        anchor=anchor,
        device=device,
        progress=progress,
        callback=keep if snapshots else None,
        **recipe.train_kwargs(),
    )
    # JSON round trip: TrainLog.recipe["torch"] is a TorchVersion (a str subclass) that
    # check_json_like accepts but torch.load(weights_only=True) then refuses to unpickle
    meta = json.loads(json.dumps({"log": tlog.to_dict(), "seed": seed}))
    save_checkpoint(path, net, meta)
    snaps = None
    if snapshots:
        snaps = torch.stack(snaps_list)
        atomic_torch_save(snaps, snap_path)
    return net.eval(), {**meta, "from_cache": False}, snaps
