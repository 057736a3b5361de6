"""Data for the experiments: the paper's small CIFAR-10 split, a pre-training set, digits.

* :func:`small_cifar` — the paper's small CIFAR-10 (§1 of REFERENCE.md): classes 0–4, per class
  ``n_train`` + ``n_val`` images from the *train* split and ``n_test`` from the *test* split (so
  the test set is disjoint from training by construction, unlike the reference code), forget set
  = ``n_forget`` random class-0 training images, retain = train minus forget.
* :func:`pretrain_cifar` — the pre-training set: CIFAR-100 when its files are present, otherwise a
  stand-in made of CIFAR-10 classes 5–9 (disjoint from the fine-tuning classes); ``source`` says
  which.
* :func:`digits_split` — scikit-learn's bundled 8×8 digits, split into a pre-training and a
  fine-tuning task, for the embedded demo and tests (no download).

Images are read as ``uint8`` ``(N, 3, 32, 32)`` and normalised with the CIFAR constants of the
reference code; no augmentation. A split can be stored in a compact ``.pt`` cache
(:func:`save_cache` / :func:`load_cache`: ``uint8`` images, labels, indices) so that a GPU run
carries a few MB instead of the whole image folder.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ntkscrub.recipes import data_root
from ntkscrub.training import atomic_torch_save, check_json_like

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CIFAR10_CLASSES",
    "DEFAULT_CIFAR10_ROOT",
    "DEFAULT_TORCHVISION_ROOT",
    "SplitData",
    "normalize",
    "list_image_folder",
    "load_image_folder",
    "load_cifar",
    "save_cache",
    "load_cache",
    "small_cifar",
    "pretrain_cifar",
    "digits_split",
]

# Normalisation constants of the reference code (REFERENCE.md §2), used for CIFAR-10 and -100.
CIFAR_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

#: The JPEG image-folder copy of CIFAR-10 when no root is given: :func:`ntkscrub.recipes.data_root`
#: ($NTKSCRUB_DATA, else ``../shared/data/cifar10-jpeg`` beside the repository), read at import.
DEFAULT_CIFAR10_ROOT = str(data_root())
#: Where torchvision's CIFAR files are looked for (override with $NTKSCRUB_TORCHVISION_ROOT).
DEFAULT_TORCHVISION_ROOT = os.environ.get(
    "NTKSCRUB_TORCHVISION_ROOT", os.path.join(os.path.expanduser("~"), ".cache", "ntkscrub")
)

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_CACHE_FORMAT = "ntkscrub-split-v1"

XY = tuple[Tensor, Tensor]


# ------------------------------------------------------------------------------------ SplitData
@dataclass
class SplitData:
    """A forgetting split: ``train = retain ⊔ forget``, plus validation and test sets.

    Every set is an ``(X, Y)`` pair: ``X`` float32 ``(N, C, H, W)`` (normalised), ``Y`` int64
    ``(N,)`` with labels remapped to ``0..num_classes-1`` in the order of :attr:`classes`.
    A set may be empty (``N = 0``; e.g. ``forget`` of a pre-training split).

    Attributes:
        indices: JSON-serialisable record of where every sample came from: for each of
            ``train``, ``val``, ``test``, ``forget``, ``retain`` the list of original indices
            (see ``indices['index']`` for what an index means and ``indices['split_of']`` for
            which original split it refers to), and ``forget_rows`` / ``retain_rows``: the rows
            of ``train`` that form ``forget`` / ``retain``.
        classes: the original class labels, ``classes[k]`` is remapped label ``k``.
        num_classes: ``len(classes)``.
        source: a human-readable statement of which data these are (and any stand-in).
        class_names: names of :attr:`classes` where known.
    """

    train: XY
    retain: XY
    forget: XY
    val: XY
    test: XY
    indices: dict[str, Any]
    classes: tuple[int, ...]
    num_classes: int
    source: str
    class_names: tuple[str, ...] = field(default_factory=tuple)

    def sizes(self) -> dict[str, int]:
        """Number of samples in each set."""
        return {k: int(getattr(self, k)[1].shape[0]) for k in _SETS}

    def to(self, device: torch.device | str) -> SplitData:
        """A copy with every tensor on ``device``."""
        moved = {k: tuple(t.to(device) for t in getattr(self, k)) for k in _SETS}
        return SplitData(
            **moved,
            indices=self.indices,
            classes=self.classes,
            num_classes=self.num_classes,
            source=self.source,
            class_names=self.class_names,
        )

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary (sizes, classes, source, indices) for result files."""
        return {
            "source": self.source,
            "classes": list(self.classes),
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "sizes": self.sizes(),
            "input_shape": list(self.train[0].shape[1:]),
            "indices": self.indices,
        }


_SETS = ("train", "retain", "forget", "val", "test")


# ---------------------------------------------------------------------------------- raw images
def normalize(
    x: Tensor, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD
) -> Tensor:
    """``uint8`` images ``(N, C, H, W)`` in 0..255 → float32 ``(x/255 − mean)/std`` per channel."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x: expected a (N, C, H, W) tensor, got {getattr(x, 'shape', x)!r}")
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(f"mean/std: need {x.shape[1]} channels, got {len(mean)} and {len(std)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.to(torch.float32) / 255.0 - m) / s


def _file_key(name: str) -> tuple[int, int | str, str]:
    # numeric stems sort as numbers (9.jpg before 10.jpg); others after, by name
    stem = name.rpartition(".")[0]
    return (0, int(stem), name) if stem.isdigit() else (1, stem, name)


def list_image_folder(
    root: str | os.PathLike, split: str = "train"
) -> tuple[list[str], list[str], Tensor]:
    """The deterministic listing of ``root/split/<class>/*``.

    Class folders are sorted alphabetically (the label order of ``torchvision`` ``ImageFolder``;
    for the CIFAR-10 folder this is the official label order), files within a class by number.
    The listing is memoised per folder and recomputed when a class folder's mtime changes.

    Returns:
        ``(class_names, paths, labels)``: ``paths[i]`` relative to ``root/split``, ``labels``
        int64 ``(N,)``. The *index* of a file everywhere in this module is its position ``i``.
    """
    split_dir = Path(root) / split
    if not Path(root).is_dir():
        raise FileNotFoundError(f"root: no such directory: {root}")
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"root: {root} has no '{split}' folder (expected root/{split}/<class>/)"
        )
    entries = sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(split_dir) if e.is_dir())
    if not entries:
        raise FileNotFoundError(f"root: {split_dir} contains no class folders")
    names, paths, labels = _listing(str(split_dir.resolve()), tuple(entries))
    return list(names), list(paths), labels.clone()


@functools.lru_cache(maxsize=8)
def _listing(split_dir: str, entries: tuple[tuple[str, int], ...]) -> tuple[tuple, tuple, Tensor]:
    # ``entries`` (class folder names with mtimes) is part of the key so that a changed folder
    # is listed afresh
    class_names = tuple(name for name, _ in entries)
    paths: list[str] = []
    labels: list[int] = []
    for label, cname in enumerate(class_names):
        files = [
            e.name
            for e in os.scandir(os.path.join(split_dir, cname))
            if e.is_file() and e.name.lower().endswith(_IMAGE_EXTENSIONS)
        ]
        files.sort(key=_file_key)
        paths += [f"{cname}/{f}" for f in files]
        labels += [label] * len(files)
    return class_names, tuple(paths), torch.tensor(labels, dtype=torch.int64)


def _read_images(split_dir: Path, paths: Sequence[str]) -> Tensor:
    from PIL import Image  # torchvision's dependency; imported here to keep import time low

    out = None
    for i, rel in enumerate(paths):
        with Image.open(split_dir / rel) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if out is None:
            out = torch.empty((len(paths), 3, arr.shape[0], arr.shape[1]), dtype=torch.uint8)
        if tuple(arr.shape[:2]) != tuple(out.shape[2:]):
            raise ValueError(
                f"root: image {rel} has size {arr.shape[:2]}, expected {tuple(out.shape[2:])}"
            )
        out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    if out is None:
        return torch.empty((0, 3, 32, 32), dtype=torch.uint8)
    return out


def _resolve_classes(
    classes: Sequence[int | str] | None, names: Sequence[str], arg: str
) -> list[int]:
    if classes is None:
        return list(range(len(names)))
    if isinstance(classes, (int, str)):
        raise TypeError(f"{arg}: expected a sequence of class labels or names, got {classes!r}")
    out = []
    for c in classes:
        if isinstance(c, str):
            if c not in names:
                raise ValueError(f"{arg}: unknown class name {c!r}; known: {list(names)}")
            out.append(names.index(c))
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            if not 0 <= int(c) < len(names):
                raise ValueError(f"{arg}: unknown class {c!r}; labels run 0..{len(names) - 1}")
            out.append(int(c))
        else:
            raise TypeError(f"{arg}: class labels must be int or str, got {c!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{arg}: repeated classes in {list(classes)}")
    if not out:
        raise ValueError(f"{arg}: no classes given")
    return out


def load_image_folder(
    root: str | os.PathLike,
    split: str = "train",
    classes: Sequence[int | str] | None = None,
    *,
    indices: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Read an ImageFolder-layout split into memory.

    Args:
        root: folder with ``train/`` and ``test/`` subfolders of class folders.
        split: ``'train'`` or ``'test'``.
        classes: labels (ints) or folder names to keep; ``None`` keeps all.
        indices: read only these files (positions in :func:`list_image_folder`'s listing), in
            this order; combined with ``classes`` they must belong to those classes.

    Returns:
        ``X`` uint8 ``(N, 3, H, W)`` and ``Y`` int64 ``(N,)`` (the original labels), in listing
        order (or the order of ``indices``).
    """
    names, paths, labels = list_image_folder(root, split)
    keep = _resolve_classes(classes, names, "classes")
    if indices is None:
        mask = torch.isin(labels, torch.tensor(keep))
        pos = torch.nonzero(mask).flatten().tolist()
    else:
        pos = [int(i) for i in indices]
        bad = [i for i in pos if not 0 <= i < len(paths)]
        if bad:
            raise ValueError(f"indices: {bad[:5]} out of range for {len(paths)} files in {split}")
        if classes is not None:
            keep_set = set(keep)
            wrong = [i for i in pos if int(labels[i]) not in keep_set]
            if wrong:
                raise ValueError(f"indices: {wrong[:5]} are not in classes {list(classes)}")
    X = _read_images(Path(root) / split, [paths[i] for i in pos])
    return X, labels[torch.tensor(pos, dtype=torch.int64)] if pos else labels[:0]


def load_cifar(
    name: str = "cifar10",
    root: str | os.PathLike = DEFAULT_TORCHVISION_ROOT,
    download: bool = False,
    split: str = "train",
) -> tuple[Tensor, Tensor]:
    """CIFAR-10/100 through ``torchvision.datasets`` (official python files under ``root``).

    Returns ``X`` uint8 ``(N, 3, 32, 32)`` and ``Y`` int64 ``(N,)`` in the official order.

    Raises:
        ValueError: unknown ``name`` or ``split``.
        FileNotFoundError: the files are not under ``root`` (and ``download`` is False).
    """
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"name: expected 'cifar10' or 'cifar100', got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    import torchvision  # slow to import; only once the arguments are known to be good

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    if not download and not Path(root).is_dir():
        raise FileNotFoundError(f"root: no such directory: {root} (no {name} files)")
    try:
        ds = cls(root=str(root), train=(split == "train"), download=download)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(f"root: {name} not found under {root}: {err}") from err
    X = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    Y = torch.tensor(ds.targets, dtype=torch.int64)
    return X, Y


# --------------------------------------------------------------------------------------- cache
def save_cache(path: str | os.PathLike, tensors: dict[str, Any]) -> None:
    """Store a dict of tensors and JSON-like values (str/int/float/bool/None/list/dict) in one
    ``.pt`` file, atomically (temp file in the same folder, then ``os.replace``).

    Only types that ``torch.load(weights_only=True)`` accepts are allowed, so the file can be
    read back without unpickling arbitrary objects.
    """
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors: expected a dict, got {type(tensors).__name__}")
    check_json_like(tensors, "tensors", allow_tensors=True)
    payload = {
        k: (v.detach().cpu().contiguous() if isinstance(v, Tensor) else v)
        for k, v in tensors.items()
    }
    atomic_torch_save(payload, path)


def load_cache(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`save_cache` (``weights_only=True``, onto the CPU)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"path: no cache file at {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"path: {path} does not hold a dict written by save_cache")
    return obj


# ------------------------------------------------------------------------------- data sources
class _Source:
    """Uniform access to a labelled image source: labels per split and images by index."""

    def __init__(self, kind: str, root: str, class_names: list[str], description: str):
        self.kind, self.root, self.class_names, self.description = (
            kind,
            root,
            class_names,
            description,
        )
        self._labels: dict[str, Tensor] = {}
        self._arrays: dict[str, XY] = {}

    def labels(self, split: str) -> Tensor:
        if split not in self._labels:
            self._load_labels(split)
        return self._labels[split]

    def _load_labels(self, split: str) -> None:
        if self.kind == "folder":
            names, paths, labels = list_image_folder(self.root, split)
            if names != self.class_names:
                raise ValueError(f"root: class folders of {split} differ from those of train")
            self._labels[split] = labels
        else:
            self._arrays[split] = load_cifar(self.kind, self.root, split=split)
            self._labels[split] = self._arrays[split][1]

    def images(self, split: str, index: Sequence[int]) -> Tensor:
        if self.kind == "folder":
            return load_image_folder(self.root, split, indices=index)[0]
        self.labels(split)
        idx = torch.tensor(list(index), dtype=torch.int64)
        return self._arrays[split][0][idx] if len(idx) else self._arrays[split][0][:0]


def _folder_source(root: str | os.PathLike | None) -> _Source:
    root = str(data_root() if root is None else root)
    if not Path(root).is_dir():
        raise FileNotFoundError(f"root: no such directory: {root}")
    if (Path(root) / "train").is_dir():
        names, _, _ = list_image_folder(root, "train")
        desc = f"CIFAR-10 image folder {root}"
        if names == list(CIFAR10_CLASSES):
            desc = (
                f"CIFAR-10 (JPEG image-folder copy at {root}: quality ~75, labels exact, "
                "accuracies run a little lower than on the official files)"
            )
        return _Source("folder", root, names, desc)
    # otherwise: torchvision's python files under root
    try:
        load_cifar("cifar10", root, split="test")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"root: {root} is neither an image folder (root/train/<class>/) nor holds "
            "torchvision's CIFAR-10 files"
        ) from err
    return _Source("cifar10", root, list(CIFAR10_CLASSES), f"CIFAR-10 (official files, {root})")


def _cifar100_source(root: str | os.PathLike | None) -> _Source:
    import torchvision

    root = str(DEFAULT_TORCHVISION_ROOT if root is None else root)
    load_cifar("cifar100", root, split="test")  # raises FileNotFoundError when absent
    names = list(torchvision.datasets.CIFAR100(root, train=False).classes)
    return _Source("cifar100", root, names, f"CIFAR-100 (official files, {root})")


def _check_count(value: Any, name: str, minimum: int = 0) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def _build_split(
    src: _Source,
    classes: list[int],
    n_train: int,
    n_val: int,
    n_test: int,
    n_forget: int,
    forget_class: int | None,
    seed: int,
) -> dict[str, Any]:
    """Choose and read the images of a split; returns the cache payload (uint8 + indices)."""
    # Independent streams for train/val, test and forget, so changing n_test leaves the
    # training set and the forget set unchanged.
    ss_trainval, ss_test, ss_forget = np.random.SeedSequence(seed).spawn(3)
    rng_tv, rng_test, rng_forget = (
        np.random.default_rng(s) for s in (ss_trainval, ss_test, ss_forget)
    )
    ytr, yte = src.labels("train"), src.labels("test")
    train_idx: list[int] = []
    val_idx: list[int] = []
    test_idx: list[int] = []
    for c in classes:
        pos = torch.nonzero(ytr == c).flatten().numpy()
        if n_train + n_val > len(pos):
            raise ValueError(
                f"n_train, n_val: {n_train} + {n_val} images of class {c} requested, the train "
                f"split has {len(pos)}"
            )
        perm = pos[rng_tv.permutation(len(pos))]
        train_idx += perm[:n_train].tolist()
        val_idx += perm[n_train : n_train + n_val].tolist()
    for c in classes:
        pos = torch.nonzero(yte == c).flatten().numpy()
        if n_test > len(pos):
            raise ValueError(
                f"n_test: {n_test} images of class {c} requested, the test split has {len(pos)}"
            )
        test_idx += pos[rng_test.permutation(len(pos))[:n_test]].tolist()
    train_idx.sort()
    val_idx.sort()
    test_idx.sort()
    forget_rows: list[int] = []
    if n_forget > 0:
        assert forget_class is not None
        cand = [r for r, i in enumerate(train_idx) if int(ytr[i]) == forget_class]
        if n_forget > len(cand):
            raise ValueError(
                f"n_forget: {n_forget} forget images requested, the training set has {len(cand)} "
                f"of class {forget_class}"
            )
        forget_rows = sorted(
            int(r) for r in rng_forget.choice(np.array(cand), n_forget, replace=False)
        )
    return {
        "train_x": src.images("train", train_idx),
        "train_y": ytr[torch.tensor(train_idx, dtype=torch.int64)] if train_idx else ytr[:0],
        "val_x": src.images("train", val_idx),
        "val_y": ytr[torch.tensor(val_idx, dtype=torch.int64)] if val_idx else ytr[:0],
        "test_x": src.images("test", test_idx),
        "test_y": yte[torch.tensor(test_idx, dtype=torch.int64)] if test_idx else yte[:0],
        "train_index": train_idx,
        "val_index": val_idx,
        "test_index": test_idx,
        "forget_rows": forget_rows,
        "class_names": [src.class_names[c] for c in classes],
        "source": src.description,
        "index_meaning": (
            f"position in the sorted listing of {src.root}/<split> (class folders alphabetical, "
            "files by number)"
            if src.kind == "folder"
            else f"position in torchvision's {src.kind} <split> set"
        ),
    }


def _to_splitdata(payload: dict[str, Any], classes: list[int], source: str, mean, std) -> SplitData:
    remap = torch.full((max(max(classes) + 1, 1),), -1, dtype=torch.int64)
    remap[torch.tensor(classes)] = torch.arange(len(classes))

    def pair(x: Tensor, y: Tensor) -> XY:
        return normalize(x, mean, std) if x.dtype == torch.uint8 else x.float(), remap[y]

    train = pair(payload["train_x"], payload["train_y"])
    n = train[1].shape[0]
    forget_rows = [int(r) for r in payload["forget_rows"]]
    fmask = torch.zeros(n, dtype=torch.bool)
    fmask[torch.tensor(forget_rows, dtype=torch.int64)] = True
    retain_rows = torch.nonzero(~fmask).flatten().tolist()
    train_index = [int(i) for i in payload["train_index"]]
    indices = {
        "train": train_index,
        "val": [int(i) for i in payload["val_index"]],
        "test": [int(i) for i in payload["test_index"]],
        "forget": [train_index[r] for r in forget_rows],
        "retain": [train_index[r] for r in retain_rows],
        "forget_rows": forget_rows,
        "retain_rows": retain_rows,
        "split_of": {
            "train": "train",
            "val": "train",
            "forget": "train",
            "retain": "train",
            "test": "test",
        },
        "index": payload["index_meaning"],
    }
    return SplitData(
        train=train,
        retain=(train[0][~fmask], train[1][~fmask]),
        forget=(train[0][fmask], train[1][fmask]),
        val=pair(payload["val_x"], payload["val_y"]),
        test=pair(payload["test_x"], payload["test_y"]),
        indices=indices,
        classes=tuple(classes),
        num_classes=len(classes),
        source=source,
        class_names=tuple(payload["class_names"]),
    )


def _cached_or_build(
    cache: str | os.PathLike | None, params: dict[str, Any], build
) -> tuple[dict, str]:
    """Load the payload from ``cache`` if present (checking it was built with ``params``), else
    build it and, when ``cache`` is given, store it. Returns ``(payload, where)``."""
    params = json.loads(json.dumps(params))  # tuples → lists, as stored
    if cache is not None and Path(cache).is_file():
        payload = load_cache(cache)
        if payload.get("format") != _CACHE_FORMAT:
            raise ValueError(f"cache: {cache} is not a split cache ({_CACHE_FORMAT})")
        if payload.get("params") != params:
            raise ValueError(
                f"cache: {cache} was built with {payload.get('params')}, not with the requested "
                f"{params}; delete it or pass another path"
            )
        return payload, f" [read from cache {cache}]"
    payload = build()
    payload["format"] = _CACHE_FORMAT
    payload["params"] = params
    if cache is not None:
        save_cache(cache, payload)
    return payload, ""


# --------------------------------------------------------------------------------- the splits
def small_cifar(
    root: str | os.PathLike | None = None,
    classes: Sequence[int | str] = (0, 1, 2, 3, 4),
    n_train: int = 100,
    n_val: int = 25,
    n_test: int = 100,
    n_forget: int = 25,
    forget_class: int | str = 0,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
) -> SplitData:
    """The paper's small CIFAR-10 forgetting split.

    Per class in ``classes``: ``n_train + n_val`` random images of the *train* split (first
    ``n_train`` → train, the rest → val) and ``n_test`` random images of the *test* split. The
    forget set is ``n_forget`` random training images of ``forget_class`` (an original label);
    retain = train minus forget. Defaults give 500 train (475 retain, 25 forget), 125 val and
    500 test images.

    Args:
        root: CIFAR-10 as an image folder (``root/{train,test}/<class>/``, default
            :data:`DEFAULT_CIFAR10_ROOT`) or a folder with torchvision's CIFAR-10 files.
        classes: original labels (or class names) to keep; remapped to ``0..len-1`` in order.
        seed: chooses the images (three independent streams: train/val, test, forget).
        cache: a ``.pt`` path: read from it when it exists (it must have been built with the same
            arguments, else ``ValueError``), else build from ``root`` and write it there. With
            an existing cache, ``root`` is not read at all.

    Returns:
        :class:`SplitData` with float32 ``(N, 3, 32, 32)`` inputs normalised by
        :data:`CIFAR_MEAN` / :data:`CIFAR_STD`. Rows are sorted by original index, so classes
        come in blocks.

    Raises:
        FileNotFoundError: ``root`` missing (and no cache). ValueError: unknown class, a
        ``forget_class`` not among ``classes``, sizes larger than available.
    """
    n_train = _check_count(n_train, "n_train", 1)
    n_val = _check_count(n_val, "n_val")
    n_test = _check_count(n_test, "n_test")
    n_forget = _check_count(n_forget, "n_forget")
    seed = _check_count(seed, "seed")
    names = list(CIFAR10_CLASSES)
    cls = _resolve_classes(classes, names, "classes")
    (fc,) = _resolve_classes([forget_class], names, "forget_class")
    if fc not in cls:
        raise ValueError(
            f"forget_class: class {forget_class!r} is not among classes {list(classes)}"
        )
    if n_forget > n_train:
        raise ValueError(
            f"n_forget: {n_forget} exceeds n_train={n_train} images of the forget class"
        )
    params = {
        "kind": "small_cifar",
        "classes": cls,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "n_forget": n_forget,
        "forget_class": fc,
        "seed": seed,
    }

    def build() -> dict[str, Any]:
        src = _folder_source(root)
        if src.class_names != names:
            raise ValueError(f"root: class folders {src.class_names} are not CIFAR-10's {names}")
        return _build_split(src, cls, n_train, n_val, n_test, n_forget, fc, seed)

    payload, where = _cached_or_build(cache, params, build)
    source = (
        f"{payload['source']}; small split: classes {cls}, {n_train}+{n_val} per class from the "
        f"train split, {n_test} per class from the test split, forget {n_forget} of class {fc}, "
        f"seed {seed}{where}"
    )
    return _to_splitdata(payload, cls, source, CIFAR_MEAN, CIFAR_STD)


def pretrain_cifar(
    root: str | os.PathLike | None = None,
    *,
    classes: Sequence[int | str] = (5, 6, 7, 8, 9),
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    use_cifar100: bool | None = None,
    cifar100_root: str | os.PathLike | None = None,
) -> SplitData:
    """The pre-training set: CIFAR-100 when available, else CIFAR-10 classes 5–9 as a stand-in.

    The paper pre-trains on CIFAR-100, which cannot be obtained on these machines. With
    ``use_cifar100=None`` (auto) CIFAR-100 is used when :func:`load_cifar` finds its files under
    ``cifar100_root`` (default :data:`DEFAULT_TORCHVISION_ROOT`): all 100 classes, default 400
    train + 100 val per class (the reference's 40k) and 100 test per class. Otherwise the stand-in
    is CIFAR-10 ``classes`` (default 5–9, disjoint from the fine-tuning classes 0–4), default 1000
    train + 100 val + 200 test per class (configurable up to 5000 / 1000 in total per class; note
    that a cache of N images takes N·3 KiB). ``source`` states which one it is.

    Returns:
        :class:`SplitData` with an empty ``forget`` set and ``retain == train``.

    Raises:
        FileNotFoundError: ``use_cifar100=True`` and CIFAR-100 is absent, or ``root`` missing.
    """
    src100 = None
    if use_cifar100 is None or use_cifar100:
        try:
            src100 = _cifar100_source(cifar100_root)
        except FileNotFoundError:
            if use_cifar100:
                raise
    seed = _check_count(seed, "seed")
    if src100 is not None:
        names = src100.class_names
        cls = list(range(100))
        defaults = (400, 100, 100)
    else:
        names = list(CIFAR10_CLASSES)
        cls = _resolve_classes(classes, names, "classes")
        defaults = (1000, 100, 200)
    n_train = _check_count(defaults[0] if n_train is None else n_train, "n_train", 1)
    n_val = _check_count(defaults[1] if n_val is None else n_val, "n_val")
    n_test = _check_count(defaults[2] if n_test is None else n_test, "n_test")
    params = {
        "kind": "pretrain_cifar100" if src100 is not None else "pretrain_cifar10_standin",
        "classes": cls,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "seed": seed,
    }

    def build() -> dict[str, Any]:
        src = src100 if src100 is not None else _folder_source(root)
        if src100 is None and src.class_names != names:
            raise ValueError(f"root: class folders {src.class_names} are not CIFAR-10's {names}")
        return _build_split(src, cls, n_train, n_val, n_test, 0, None, seed)

    payload, where = _cached_or_build(cache, params, build)
    if src100 is not None:
        what = "CIFAR-100 pre-training set (as the paper)"
    else:
        what = (
            f"STAND-IN for CIFAR-100 (not available here): CIFAR-10 classes {cls} "
            f"({', '.join(names[c] for c in cls)})"
        )
    source = (
        f"{what}; {payload['source']}; {n_train}+{n_val} per class from the train split, "
        f"{n_test} per class from the test split, seed {seed}{where}"
    )
    return _to_splitdata(payload, cls, source, CIFAR_MEAN, CIFAR_STD)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits()``'s images ``(1797, 8, 8)`` (0..16) and targets ``(1797,)``.

    Read straight from the CSV that scikit-learn bundles when it is where expected, because
    importing ``sklearn.datasets`` costs seconds; otherwise through ``load_digits``.
    """
    spec = importlib.util.find_spec("sklearn")
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locs:
        path = Path(loc) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as fh:
                data = np.loadtxt(fh, delimiter=",")
            if data.shape == (1797, 65):
                return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def digits_split(
    seed: int = 0,
    pretrain_classes: Sequence[int] = (5, 6, 7, 8, 9),
    finetune_classes: Sequence[int] = (0, 1, 2, 3, 4),
    n_forget: int = 25,
    forget_class: int = 0,
    test_fraction: float = 0.3,
    *,
    val_fraction: float = 0.1,
) -> tuple[SplitData, SplitData]:
    """scikit-learn's 8×8 digits (1797 images, bundled) as a pre-training and a fine-tuning task.

    Images are ``(N, 1, 8, 8)`` float32: pixel values /16 (to [0, 1]), then standardised with
    the scalar mean and std of all 1797 images (a fixed data-set constant, like CIFAR's).
    Per class, ``round(test_fraction·n)`` images go to test, ``round(val_fraction·n)`` to val,
    the rest to train (stratified, random with ``seed``). The fine-tuning split's forget set is
    ``n_forget`` random training images of ``forget_class`` (an original digit).
    Indices are positions in ``load_digits()`` order.

    Returns:
        ``(pretrain, finetune)``: two :class:`SplitData`; ``pretrain`` has an empty forget set
        and ``retain == train``.
    """
    seed = _check_count(seed, "seed")
    n_forget = _check_count(n_forget, "n_forget")
    if isinstance(test_fraction, bool) or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    if isinstance(val_fraction, bool) or not 0.0 <= float(val_fraction) < 1.0 - float(
        test_fraction
    ):
        raise ValueError(f"val_fraction must lie in [0, 1 - test_fraction), got {val_fraction!r}")
    names = [str(d) for d in range(10)]
    pre = _resolve_classes(pretrain_classes, names, "pretrain_classes")
    fin = _resolve_classes(finetune_classes, names, "finetune_classes")
    if set(pre) & set(fin):
        raise ValueError(
            "pretrain_classes, finetune_classes: must be disjoint, both contain "
            f"{sorted(set(pre) & set(fin))}"
        )
    (fc,) = _resolve_classes([forget_class], names, "forget_class")
    if fc not in fin:
        raise ValueError(
            f"forget_class: {forget_class!r} is not among finetune_classes {list(finetune_classes)}"
        )

    images, target = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(target, dtype=torch.int64)
    return (
        _digits_task(x, y, pre, 0, fc, seed, 0, test_fraction, val_fraction),
        _digits_task(x, y, fin, n_forget, fc, seed, 1, test_fraction, val_fraction),
    )


def _stratified_rows(
    y: Tensor,
    classes: list[int],
    rng: np.random.Generator,
    test_fraction: float,
    val_fraction: float,
) -> tuple[list[int], list[int], list[int]]:
    """Per class, ``round(test_fraction·n)`` random rows to test, ``round(val_fraction·n)`` to
    val, the rest to train; each list sorted."""
    tr: list[int] = []
    va: list[int] = []
    te: list[int] = []
    for c in classes:
        pos = torch.nonzero(y == c).flatten().numpy()
        perm = pos[rng.permutation(len(pos))]
        n_te = int(round(test_fraction * len(pos)))
        n_va = int(round(val_fraction * len(pos)))
        te += perm[:n_te].tolist()
        va += perm[n_te : n_te + n_va].tolist()
        tr += perm[n_te + n_va :].tolist()
    return sorted(tr), sorted(va), sorted(te)


def _digits_task(
    x: Tensor,
    y: Tensor,
    classes: list[int],
    n_f: int,
    fc: int,
    seed: int,
    stream: int,
    test_fraction: float,
    val_fraction: float,
) -> SplitData:
    """One task of :func:`digits_split` (``stream`` 0: pre-training, 1: fine-tuning)."""
    rng_split, rng_forget = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, stream]).spawn(2)
    )
    tr, va, te = _stratified_rows(y, classes, rng_split, test_fraction, val_fraction)
    forget_rows: list[int] = []
    if n_f > 0:
        cand = [r for r, i in enumerate(tr) if int(y[i]) == fc]
        if n_f > len(cand):
            raise ValueError(
                f"n_forget: {n_f} requested, the training set has {len(cand)} images of digit {fc}"
            )
        forget_rows = sorted(int(r) for r in rng_forget.choice(np.array(cand), n_f, replace=False))
    payload: dict[str, Any] = {}
    for name, idx in (("train", tr), ("val", va), ("test", te)):
        t = torch.tensor(idx, dtype=torch.int64)
        payload |= {f"{name}_x": x[t], f"{name}_y": y[t], f"{name}_index": idx}
    payload |= {
        "forget_rows": forget_rows,
        "class_names": [str(c) for c in classes],
        "index_meaning": "position in sklearn.datasets.load_digits() order",
    }
    source = (
        f"scikit-learn digits (8x8, 1797 images), classes {classes}, test_fraction "
        f"{test_fraction}, val_fraction {val_fraction}, seed {seed}"
        + (f", forget {n_f} of digit {fc}" if n_f else ", pre-training task (no forget set)")
    )
    sd = _to_splitdata(payload, classes, source, (0.0,), (1.0,))
    sd.indices["split_of"] = {k: "digits" for k in _SETS}
    return sd
