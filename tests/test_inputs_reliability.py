"""No silent wrong result at the door (issue 12): data orders, drop_last, uint8 / channels-last /
meta inputs, mismatched input shapes, checkpoint files, atomic JSON files, byte-size arguments.

Each case that used to be *silently wrong* (a random-order loader accepted, a list returned as a
state_dict value, bare NaN written as JSON) has a test that fails on the old code.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from model_zoo import make_cnn, make_data, make_mlp
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from ntkscrub import scrub
from ntkscrub._validation import check_bytes, check_not_meta
from ntkscrub.batches import (
    Batches,
    as_batches,
    check_input_shapes,
    check_model_accepts,
)
from ntkscrub.io import atomic_write, atomic_write_json
from ntkscrub.training import load_checkpoint, save_checkpoint

X, Y = make_data("mlp", 24)
DS = TensorDataset(X, Y)


class Reversed(Sampler):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self) -> int:
        return self.n


class MySequential(SequentialSampler):  # a subclass may reorder: not proven sequential
    def __iter__(self):
        return iter(reversed(range(len(self.data_source))))


class Stream(IterableDataset):
    def __iter__(self):
        return iter(zip(X, Y))


# --------------------------------------------------------------------------- data orders
@pytest.mark.parametrize(
    "loader, sampler_name",
    [
        (DataLoader(DS, batch_size=5, shuffle=True), "RandomSampler"),
        (DataLoader(DS, batch_size=5, sampler=SubsetRandomSampler(range(24))), "SubsetRandom"),
        (
            DataLoader(DS, batch_sampler=BatchSampler(RandomSampler(DS), 5, False)),
            "RandomSampler",
        ),
        (
            DataLoader(DS, batch_size=5, sampler=WeightedRandomSampler([1.0] * 24, 24)),
            "WeightedRandomSampler",
        ),
        (DataLoader(DS, batch_size=5, sampler=Reversed(24)), "Reversed"),
        (DataLoader(DS, batch_size=5, sampler=MySequential(DS)), "MySequential"),
    ],
)
def test_loaders_not_proven_sequential_are_refused_naming_the_sampler(loader, sampler_name):
    with pytest.raises(ValueError, match=f"forget.*{sampler_name}"):
        as_batches(loader, name="forget")


def test_custom_batch_sampler_iterable_dataset_and_unbatched_loader_are_refused():
    class MyBatches(BatchSampler):
        pass

    bad = DataLoader(DS, batch_sampler=MyBatches(SequentialSampler(DS), 5, False))
    with pytest.raises(ValueError, match="retain.*batch_sampler=MyBatches"):
        as_batches(bad, name="retain")
    with pytest.raises(ValueError, match="retain.*IterableDataset"):
        as_batches(DataLoader(Stream(), batch_size=4), name="retain")
    with pytest.raises(ValueError, match="retain.*batch_size=None"):
        as_batches(DataLoader(DS, batch_size=None), name="retain")


def test_sequential_loaders_are_accepted_and_keep_their_order():
    for loader in (
        DataLoader(DS, batch_size=5),
        DataLoader(DS, batch_sampler=BatchSampler(SequentialSampler(DS), 7, False)),
    ):
        Xb, Yb = as_batches(loader, name="retain").tensors()
        assert torch.equal(Xb, X) and torch.equal(Yb, Y)


def test_drop_last_is_refused_naming_drop_last_and_the_set():
    with pytest.raises(ValueError, match=r"retain.*drop_last=True.*4 sample"):
        as_batches(DataLoader(DS, batch_size=5, drop_last=True), name="retain")


def test_random_order_loader_no_longer_gives_a_silent_wrong_shift():
    """Old code: a SubsetRandomSampler slipped through and the dense shift was wrong silently."""
    m, m0 = make_mlp(), make_mlp(seed=3)
    Xd, Yd = make_data("mlp", 20)
    retain = DataLoader(
        TensorDataset(Xd[:15], Yd[:15]), batch_size=4, sampler=SubsetRandomSampler(range(15))
    )
    with pytest.raises(ValueError, match="retain.*SubsetRandomSampler"):
        scrub(m, retain, (Xd[15:], Yd[15:]), init=m0, solver="dense", ridge=1.0)


# --------------------------------------------------------------------------- input forms
def test_uint8_images_are_refused_with_the_fix():
    img = torch.randint(0, 255, (6, 1, 6, 6), dtype=torch.uint8)
    lab = torch.zeros(6, dtype=torch.long)
    with pytest.raises(TypeError, match=r"forget: inputs are uint8.*/ 255"):
        as_batches((img, lab), name="forget")
    with pytest.raises(TypeError, match="retain: inputs are uint8"):
        list(as_batches(DataLoader(TensorDataset(img, lab), batch_size=3), name="retain"))


def test_channels_last_memory_format_is_handled():
    Xc, Yc = make_data("cnn", 8)
    b = as_batches((Xc.to(memory_format=torch.channels_last), Yc), batch_size=3, name="retain")
    for x, _ in b:
        assert x.is_contiguous()
    assert torch.equal(b.tensors()[0], Xc)


def test_channels_last_layout_and_wrong_feature_dimension_are_named():
    model = make_cnn()
    Xc, Yc = make_data("cnn", 8)
    retain = as_batches((Xc, Yc), name="retain")
    nhwc = as_batches((Xc.permute(0, 2, 3, 1).contiguous(), Yc), name="forget")
    with pytest.raises(ValueError, match=r"forget.*\(6, 6, 1\).*retain.*permute"):
        check_input_shapes(retain=retain, forget=nhwc)
    with pytest.raises(ValueError, match="forget: the model cannot be applied.*channels-last"):
        check_model_accepts(model, retain=retain, forget=nhwc)
    wrong = as_batches((torch.randn(8, 1, 7, 7, dtype=torch.float64), Yc), name="forget")
    with pytest.raises(ValueError, match=r"forget: inputs have per-sample shape \(1, 7, 7\)"):
        check_input_shapes(retain=retain, forget=wrong)
    assert check_input_shapes(retain=retain, forget=retain) == (1, 6, 6)
    check_model_accepts(model, retain=retain)  # fine inputs pass


def test_meta_tensors_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="retain: inputs are on the 'meta' device"):
        as_batches((X.to("meta"), Y), name="retain")
    with pytest.raises(ValueError, match="forget: labels are on the 'meta' device"):
        as_batches((X, Y.to("meta")), name="forget")
    with torch.device("meta"):
        meta_model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="init: holds tensors on the 'meta' device"):
        check_not_meta(meta_model, "init")
    check_not_meta(make_mlp(), "init")  # real weights pass


def test_check_bytes_names_the_argument():
    with pytest.raises(TypeError, match=r"max_dense_bytes: expected a number of bytes.*'4GB'"):
        check_bytes("4GB", "max_dense_bytes")
    with pytest.raises(ValueError, match="max_dense_bytes"):
        check_bytes(-1, "max_dense_bytes")
    with pytest.raises(ValueError, match="max_dense_bytes"):
        check_bytes(float("nan"), "max_dense_bytes")
    with pytest.raises(TypeError, match="max_dense_bytes"):
        check_bytes(True, "max_dense_bytes")
    assert check_bytes(4 * 2**30, "max_dense_bytes") == 4.0 * 2**30
    assert check_bytes(float("inf"), "max_dense_bytes") == float("inf")


# --------------------------------------------------------------------------- checkpoints
def test_damaged_checkpoints_raise_naming_the_path(tmp_path):
    model = make_mlp()
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, {"k": 1})
    data = good.read_bytes()
    cases = {
        "empty.pt": b"",
        "truncated.pt": data[: len(data) // 2],
        "text.pt": b"this is not a checkpoint\n",
    }
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ValueError, match=f"path: .*{name}"):
            load_checkpoint(p)
    keyless = tmp_path / "keyless.pt"
    torch.save({"format": torch.load(good, weights_only=True)["format"], "meta": {}}, keyless)
    with pytest.raises(ValueError, match="keyless.pt has no 'state_dict'"):
        load_checkpoint(keyless)


def test_non_tensor_state_dict_values_are_refused(tmp_path):
    """Old code returned the list as a state_dict value when no model was passed."""
    model = make_mlp()
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, {})
    obj = torch.load(good, weights_only=True)
    obj["state_dict"]["0.weight"] = [1.0, 2.0]
    bad = tmp_path / "bad.pt"
    torch.save(obj, bad)
    with pytest.raises(ValueError, match=r"bad.pt: state_dict values must be tensors.*0.weight"):
        load_checkpoint(bad)
    state, meta = load_checkpoint(good)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


# --------------------------------------------------------------------------- files
def test_atomic_write_json_writes_strict_json(tmp_path):
    """Old code wrote bare NaN (invalid JSON) by default."""
    p = atomic_write_json(tmp_path / "r.json", {"a": float("nan"), "b": [float("inf"), 1.0]})

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    assert json.loads(p.read_text(), parse_constant=no_constants) == {"a": None, "b": [None, 1.0]}
    p2 = atomic_write_json(tmp_path / "loose.json", {"a": float("nan")}, allow_nan=True)
    assert "NaN" in p2.read_text()


def test_failed_write_leaves_no_temp_and_the_old_file(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"v": 1})

    def boom(fh):
        fh.write("partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, boom, binary=False)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(TypeError):  # unserialisable: refused before any temp file is written
        atomic_write_json(target, {"v": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_stale_temp_files_of_killed_writes_are_removed(tmp_path):
    target = tmp_path / "ckpt.pt"
    stale = tmp_path / ".ckpt.pt.abc123.tmp"
    fresh = tmp_path / ".ckpt.pt.def456.tmp"  # maybe a concurrent writer: kept
    other = tmp_path / ".other.pt.xyz.tmp"
    for p in (stale, fresh, other):
        p.write_bytes(b"x" * 10)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    atomic_write(target, lambda fh: fh.write(b"data"), binary=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["ckpt.pt", fresh.name, other.name])


def test_directory_is_fsynced_after_replace(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(
            os.path.isdir(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else True
        )
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write_json(tmp_path / "r.json", {"v": 1})
    assert synced[-1] is True and len(synced) == 2  # the file, then its folder


def test_unwritable_folder_error_names_the_target(tmp_path, monkeypatch):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".r.json.xyz.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError, match=r"cannot write .*r\.json: Permission denied") as exc:
        atomic_write_json(tmp_path / "r.json", {"v": 1})
    assert exc.value.filename == str(tmp_path / "r.json")


def test_batches_from_dataset_still_sequential():
    b = Batches(DS, batch_size=5, name="retain")
    Xb, Yb = b.tensors()
    assert torch.equal(Xb, X) and torch.equal(Yb, Y)


def test_scrub_names_the_set_with_the_wrong_feature_dimension_and_refuses_meta_init():
    """Old code: torch's "mat1 and mat2 shapes cannot be multiplied" (no set named) and a raw
    meta-tensor error; now a ValueError naming ``forget`` / ``init``."""
    import copy

    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    X, Y = torch.randn(40, 10), torch.randint(0, 3, (40,))
    with pytest.raises(ValueError, match=r"forget: the model cannot be applied.*\(12,\)"):
        scrub(m, (X[:30], Y[:30]), (torch.randn(10, 12), Y[30:]), init=m, ridge=1.0)
    with pytest.raises(ValueError, match="init: holds tensors on the 'meta' device"):
        scrub(m, (X[:30], Y[:30]), (X[30:], Y[30:]), init=copy.deepcopy(m).to("meta"), ridge=1.0)


@pytest.mark.parametrize("solver", ["cg", "dense", None])
def test_ridge_free_system_with_more_rows_than_parameters_is_refused_up_front(solver):
    """Θ_DD = J Jᵀ has rank ≤ p: with ridge 0 and c·N > p it is singular. Old behaviour: cg ran
    its budget (κ ≈ 1e9, "tol below the rounding floor"), the dense twin failed its Cholesky;
    now a ValueError naming ``ridge`` before any product — from scrub and from Scrubber."""
    from ntkscrub import Scrubber

    m, m0 = make_mlp(seed=0), make_mlp(seed=1)  # p = 6·8 + 8 + 8·3 + 3 = 83
    X, Y = make_data("mlp", 40)  # c·N = 120 > 83
    kw = {} if solver is None else {"solver": solver}
    with pytest.raises(ValueError, match=r"ridge: Θ_DD has c·N = 120 rows but rank ≤ p = 83"):
        scrub(m, (X[1:], Y[1:]), (X[:1], Y[:1]), init=m0, **kw)
    with pytest.raises(ValueError, match="ridge: Θ_DD has c·N = 120 rows"):
        Scrubber(m, (X, Y), init=m0, weight_decay=0.0, **kw)
    # below the rank bound (c·N = 75 ≤ 83) a ridge-free scrub is still allowed and solved
    res = scrub(m, (X[1:25], Y[1:25]), (X[:1], Y[:1]), init=m0, solver="dense")
    assert torch.isfinite(res.shift).all()
    # and a ridge makes the large system solvable
    res = scrub(m, (X[1:], Y[1:]), (X[:1], Y[:1]), init=m0, weight_decay=0.01, **kw)
    assert torch.isfinite(res.shift).all()


def test_a_model_returning_a_tuple_is_named_everywhere_it_is_called():
    """GoogLeNet/Inception in train mode, Hugging Face models: forward returns no tensor. Old:
    AttributeError "'tuple' object has no attribute 'dim'" (scrub) / "'shape'" (fisher_forget,
    train); now a TypeError naming the model in each entry point."""
    from torch import nn

    from ntkscrub import Scrubber, baselines, readouts
    from ntkscrub.training import train

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fc(x), x.sum()

    torch.manual_seed(0)
    m, m0 = Pair().eval(), Pair().eval()
    X, Y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    calls = [
        lambda: scrub(m, (X[2:], Y[2:]), (X[:2], Y[:2]), init=m0, weight_decay=0.1),
        lambda: Scrubber(m, (X, Y), init=m0, weight_decay=0.1),
        lambda: baselines.fisher_forget(m, (X, Y), alpha=1e-6),
        lambda: train(m, (X, Y), epochs=1, lr=0.1, progress=False),
        lambda: readouts.error(m, (X, Y)),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"model.*logits.*got tuple"):
            call()


def test_a_list_of_samples_gets_a_hint_not_just_a_refusal():
    X, Y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(TypeError, match=r"data: .*list of length 4 — a list of \(x, y\) samples"):
        as_batches([(X[i], int(Y[i])) for i in range(4)], name="data")
    with pytest.raises(TypeError, match=r"of length 3$"):  # three tensors: no sample hint
        as_batches([X, Y, Y], name="data")


def test_a_frozen_model_is_told_how_to_select_its_parameters():
    """requires_grad_(False) after training left params=None with nothing, and the old message
    ("the selection contains no parameters") did not say why; an explicit selection still works
    (torch.func needs no requires_grad) and gives the same shift."""
    from torch import nn

    torch.manual_seed(0)
    mk = lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()  # noqa: E731
    m0, m = mk(), mk()
    X, Y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    kw = {"init": m0, "weight_decay": 0.01, "solver": "dense"}
    ref = scrub(m, (X[5:], Y[5:]), (X[:5], Y[:5]), **kw)
    m.requires_grad_(False)
    with pytest.raises(ValueError, match=r"params: none of the model's 4 parameter tensors"):
        scrub(m, (X[5:], Y[5:]), (X[:5], Y[:5]), **kw)
    res = scrub(m, (X[5:], Y[5:]), (X[:5], Y[:5]), params=".*", **kw)
    assert torch.equal(res.shift, ref.shift)
    assert not any(p.requires_grad for p in m.parameters())  # input untouched
