"""The challenge-style entry point (issue 16, item 3) on the demo's data: a network that has
memorised 25 mislabeled digits, shuffling DataLoaders, settings chosen on validation only."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ntkscrub import readouts
from ntkscrub.challenge import UnlearnResult, sequential, unlearn, unlearning
from ntkscrub.demo import FINETUNE, prepare_demo


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    return prepare_demo("small", seed=0)


def _loader(xy, shuffle=True):
    return DataLoader(TensorDataset(*xy), batch_size=64, shuffle=shuffle)


@pytest.fixture(scope="module")
def result(setup):
    net = setup.original.train()  # as a harness might hand it over: train mode
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loaders = [_loader(setup.retain), _loader(setup.forget), _loader(setup.val)]
    res = unlearn(net, *loaders, weight_decay=FINETUNE["weight_decay"], seed=0)
    # nothing passed in is modified
    assert net.training
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(loader.dataset.tensors[0].shape[0] > 0 for loader in loaders)
    setup.original.eval()
    return res


def test_unlearning_forgets_the_cohort_within_the_validation_budget(setup, result):
    assert isinstance(result, UnlearnResult) and not result.model.training
    w_d = setup.original
    # the memorised wrong labels are dropped on a large part of D_f ...
    assert readouts.error(w_d, setup.forget) == 0.0
    assert readouts.error(result.model, setup.forget) >= 0.4
    # ... at no more validation error than allowed, and D_r stays fitted
    val0 = result.info["val_error_original"]
    assert val0 == readouts.error(w_d, setup.val)
    assert readouts.error(result.model, setup.val) <= val0 + 0.02
    assert readouts.error(result.model, setup.retain) <= 0.01


def test_unlearning_chooses_the_longest_step_within_budget(result):
    info = result.info
    cands = info["candidates"]
    assert [c["scale"] for c in cands] == [1.0, 2.0, 4.0, 8.0]
    ok = [c["scale"] for c in cands if c["val_error"] <= info["val_error_original"] + 0.02]
    assert ok and result.scale == max(ok)
    assert info["settings"]["linearize_at"] == "trained"
    assert info["scrub_info"]["solver"] == "cg" and info["scrub_info"]["matvecs"] > 0
    assert set(result.to_dict()) == {"scale", "info"}


def test_shuffling_loader_is_read_in_order(setup):
    loader = _loader(setup.retain, shuffle=True)
    ds = sequential(loader, "retain_loader")
    assert ds is loader.dataset
    x, y = ds[3]
    assert torch.equal(x, setup.retain[0][3]) and int(y) == int(setup.retain[1][3])


def test_unlearning_rejects_bad_input(setup):
    loaders = [_loader(setup.retain), _loader(setup.forget), _loader(setup.val)]
    with pytest.raises(TypeError, match="net"):
        unlearning("net", *loaders)
    with pytest.raises(TypeError, match="forget_loader"):
        unlearning(setup.original, loaders[0], [1, 2], loaders[2])
    with pytest.raises(ValueError, match="scales"):
        unlearning(setup.original, *loaders, scales=[])
    with pytest.raises(ValueError, match="scales"):
        unlearning(setup.original, *loaders, scales=[1.0, -2.0])
    with pytest.raises(ValueError, match="max_val_increase"):
        unlearning(setup.original, *loaders, max_val_increase=2.0)
