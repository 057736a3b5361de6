"""Data splits: sizes, disjointness by index, forget ⊂ train class, seeds, cache round trip."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ntkscrub.recipes.datasets import (
    CIFAR_MEAN,
    CIFAR_STD,
    DEFAULT_CIFAR10_ROOT,
    SplitData,
    digits_split,
    list_image_folder,
    load_cache,
    load_cifar,
    load_image_folder,
    normalize,
    pretrain_cifar,
    save_cache,
    small_cifar,
)

HAS_CIFAR = os.path.isdir(os.path.join(DEFAULT_CIFAR10_ROOT, "train"))
needs_cifar = pytest.mark.skipif(not HAS_CIFAR, reason=f"{DEFAULT_CIFAR10_ROOT} not present")

# a handful of images per class keeps each CIFAR read well under a second
TINY = dict(n_train=4, n_val=2, n_test=3, n_forget=2)


def check_split(sd: SplitData, forget_label: int | None) -> None:
    """Invariants every split must satisfy."""
    idx = sd.indices
    sizes = sd.sizes()
    for name in ("train", "retain", "forget", "val", "test"):
        X, Y = getattr(sd, name)
        assert X.dtype == torch.float32 and Y.dtype == torch.int64
        assert X.shape[0] == Y.shape[0] == len(idx[name]) == sizes[name]
        if Y.numel():
            assert 0 <= int(Y.min()) and int(Y.max()) < sd.num_classes
    # train/val come from one original split and test from another, or all from one pool:
    # either way no original index is shared between train, val and test
    same = idx["split_of"]["train"] == idx["split_of"]["test"]
    tr, va, te = set(idx["train"]), set(idx["val"]), set(idx["test"])
    assert not tr & va
    if same:
        assert not tr & te and not va & te
    assert len(tr) == len(idx["train"])
    # train = retain ⊔ forget
    fo, re_ = set(idx["forget"]), set(idx["retain"])
    assert not fo & re_ and fo | re_ == tr
    assert sorted(idx["forget_rows"] + idx["retain_rows"]) == list(range(sizes["train"]))
    torch.testing.assert_close(sd.train[0][idx["forget_rows"]], sd.forget[0])
    torch.testing.assert_close(sd.train[0][idx["retain_rows"]], sd.retain[0])
    if forget_label is not None and sizes["forget"]:
        assert bool((sd.forget[1] == forget_label).all())
    json.dumps(sd.describe())  # JSON-serialisable record


# ------------------------------------------------------------------------------ digits (always)
def test_digits_split_sizes_and_invariants():
    pre, fin = digits_split()
    check_split(pre, None)
    check_split(fin, 0)
    assert fin.train[0].shape[1:] == (1, 8, 8)
    assert fin.classes == (0, 1, 2, 3, 4) and pre.classes == (5, 6, 7, 8, 9)
    assert fin.sizes()["forget"] == 25 and pre.sizes()["forget"] == 0
    assert fin.sizes()["retain"] == fin.sizes()["train"] - 25
    n_fin = sum(fin.sizes()[k] for k in ("train", "val", "test"))
    assert n_fin == 901  # digits 0–4 in load_digits
    assert abs(fin.sizes()["test"] / n_fin - 0.3) < 0.01
    # pre-training and fine-tuning images are disjoint
    all_pre = set(pre.indices["train"]) | set(pre.indices["val"]) | set(pre.indices["test"])
    all_fin = set(fin.indices["train"]) | set(fin.indices["val"]) | set(fin.indices["test"])
    assert not all_pre & all_fin
    # standardised inputs
    allx = torch.cat([pre.train[0], fin.train[0]])
    assert abs(float(allx.mean())) < 0.1 and 0.8 < float(allx.std()) < 1.2


def test_digits_split_seeds():
    _, a = digits_split(seed=0)
    _, b = digits_split(seed=0)
    _, c = digits_split(seed=1)
    assert a.indices == b.indices and torch.equal(a.train[0], b.train[0])
    assert a.indices["forget"] != c.indices["forget"]


def test_digits_split_bad_input():
    with pytest.raises(ValueError, match="forget_class"):
        digits_split(forget_class=7)
    with pytest.raises(ValueError, match="finetune_classes"):
        digits_split(finetune_classes=(0, 11))
    with pytest.raises(ValueError, match="pretrain_classes"):
        digits_split(pretrain_classes=(0, 5))
    with pytest.raises(ValueError, match="n_forget"):
        digits_split(n_forget=1000)
    with pytest.raises(ValueError, match="test_fraction"):
        digits_split(test_fraction=1.5)


# ------------------------------------------------------------------- image folder (synthetic)
@pytest.fixture
def tiny_folder(tmp_path):
    """root/{train,test}/{a,b}/N.png with known pixels; numbered 9 and 10 to test the sort."""
    from PIL import Image

    for split, n in (("train", 3), ("test", 2)):
        for label, cname in enumerate(("a", "b")):
            d = tmp_path / split / cname
            d.mkdir(parents=True)
            for k, num in enumerate([10, 9, 2][:n]):
                arr = np.full((4, 4, 3), 10 * label + num, dtype=np.uint8)
                arr[0, 0] = (k, 1, 2)
                Image.fromarray(arr).save(d / f"{num}.png")
    return tmp_path


def test_image_folder_listing_and_loading(tiny_folder):
    names, paths, labels = list_image_folder(tiny_folder, "train")
    assert names == ["a", "b"]
    assert paths == ["a/2.png", "a/9.png", "a/10.png", "b/2.png", "b/9.png", "b/10.png"]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    X, Y = load_image_folder(tiny_folder, "train")
    assert X.dtype == torch.uint8 and X.shape == (6, 3, 4, 4)
    assert X[:, 0, 1, 1].tolist() == [2, 9, 10, 12, 19, 20]
    assert Y.tolist() == [0, 0, 0, 1, 1, 1]
    X, Y = load_image_folder(tiny_folder, "test", classes=["b"])
    assert Y.tolist() == [1, 1] and X[:, 0, 1, 1].tolist() == [19, 20]
    X, Y = load_image_folder(tiny_folder, "train", indices=[4, 0])
    assert X[:, 0, 1, 1].tolist() == [19, 2] and Y.tolist() == [1, 0]


def test_image_folder_bad_input(tiny_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="root"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="classes"):
        load_image_folder(tiny_folder, classes=["c"])
    with pytest.raises(ValueError, match="split"):
        load_image_folder(tiny_folder, split="val")
    with pytest.raises(ValueError, match="indices"):
        load_image_folder(tiny_folder, indices=[99])
    with pytest.raises(FileNotFoundError, match="root"):
        load_cifar("cifar10", tmp_path / "nothing")
    with pytest.raises(ValueError, match="name"):
        load_cifar("mnist", tmp_path)


def test_normalize_constants():
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    out = normalize(x)
    expected = -torch.tensor(CIFAR_MEAN) / torch.tensor(CIFAR_STD)
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    assert CIFAR_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR_STD == (0.2023, 0.1994, 0.2010)


# ------------------------------------------------------------------------------------ cache
def test_cache_round_trip_and_atomic(tmp_path):
    path = tmp_path / "sub" / "c.pt"
    data = {
        "x": torch.arange(12, dtype=torch.uint8).view(1, 3, 2, 2),
        "y": torch.tensor([3]),
        "idx": [1, 2, 3],
        "meta": {"source": "s", "n": 1, "f": 0.5, "none": None},
    }
    save_cache(path, data)
    assert os.listdir(path.parent) == ["c.pt"]  # no temp file left behind
    back = torch.load(path, weights_only=True)
    assert back["idx"] == [1, 2, 3] and back["meta"] == data["meta"]
    back = load_cache(path)
    assert torch.equal(back["x"], data["x"]) and torch.equal(back["y"], data["y"])
    with pytest.raises(TypeError, match="tensors"):
        save_cache(tmp_path / "bad.pt", {"obj": object()})
    with pytest.raises(FileNotFoundError, match="path"):
        load_cache(tmp_path / "none.pt")


# ------------------------------------------------------------------------- CIFAR (few images)
@needs_cifar
def test_small_cifar_split_and_cache(tmp_path):
    cache = tmp_path / "small.pt"
    sd = small_cifar(seed=0, cache=cache, **TINY)
    check_split(sd, 0)
    assert sd.sizes() == {"train": 20, "retain": 18, "forget": 2, "val": 10, "test": 15}
    assert sd.train[0].shape[1:] == (3, 32, 32)
    assert sd.indices["split_of"]["test"] == "test"  # test drawn from the test split
    assert sd.class_names[0] == "airplane" and sd.num_classes == 5
    assert "CIFAR-10" in sd.source
    # forget images are class-0 (airplane) files: train-split positions 0..4999
    assert all(0 <= i < 5000 for i in sd.indices["forget"])
    # the cache is read without touching root, and gives the same tensors
    again = small_cifar(root=tmp_path / "no-such-root", seed=0, cache=cache, **TINY)
    assert again.indices == sd.indices and "cache" in again.source
    for name in ("train", "retain", "forget", "val", "test"):
        assert torch.equal(getattr(again, name)[0], getattr(sd, name)[0])
        assert torch.equal(getattr(again, name)[1], getattr(sd, name)[1])
    assert os.path.getsize(cache) < 200_000
    with pytest.raises(ValueError, match="cache"):
        small_cifar(seed=1, cache=cache, **TINY)


@needs_cifar
def test_small_cifar_seeds_and_classes():
    a = small_cifar(
        seed=0, classes=(3, 1), n_train=2, n_val=1, n_test=1, n_forget=1, forget_class=3
    )
    b = small_cifar(
        seed=0, classes=(3, 1), n_train=2, n_val=1, n_test=1, n_forget=1, forget_class=3
    )
    c = small_cifar(
        seed=1, classes=(3, 1), n_train=2, n_val=1, n_test=1, n_forget=1, forget_class=3
    )
    assert a.indices == b.indices and a.indices != c.indices
    assert a.classes == (3, 1) and a.class_names == ("cat", "automobile")
    check_split(a, 0)  # class 3 is remapped to label 0
    assert bool((a.train[1][torch.tensor(a.indices["train"]) >= 15000] == 0).all())


@needs_cifar
def test_pretrain_standin():
    pt = pretrain_cifar(use_cifar100=False, n_train=2, n_val=1, n_test=1)
    check_split(pt, None)
    assert "STAND-IN" in pt.source and pt.classes == (5, 6, 7, 8, 9)
    assert pt.sizes()["forget"] == 0 and pt.sizes()["retain"] == 10
    assert all(i >= 25000 for i in pt.indices["train"])  # classes 5–9 only


def test_small_cifar_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="root"):
        small_cifar(root=tmp_path / "missing", **TINY)
    with pytest.raises(ValueError, match="classes"):
        small_cifar(classes=(0, 10), **TINY)
    with pytest.raises(ValueError, match="forget_class"):
        small_cifar(classes=(1, 2), **TINY)
    with pytest.raises(ValueError, match="n_forget"):
        small_cifar(n_train=2, n_forget=3)
    with pytest.raises(FileNotFoundError):
        pretrain_cifar(use_cifar100=True, cifar100_root=tmp_path)


@needs_cifar
def test_small_cifar_sizes_larger_than_available():
    with pytest.raises(ValueError, match="n_train"):
        small_cifar(n_train=5000, n_val=1)
    with pytest.raises(ValueError, match="n_test"):
        small_cifar(n_train=1, n_val=0, n_test=1001, n_forget=0)
