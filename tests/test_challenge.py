"""The challenge-style entry point (issue 16, item 3) on the demo's data: a network that has
memorised 25 mislabeled digits, shuffling DataLoaders, settings chosen on validation only."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ntkscrub import readouts
from ntkscrub.challenge import UnlearnResult, sequential, unlearn, unlearning
from ntkscrub.recipes.demo import FINETUNE, prepare_demo


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
    assert readouts.error(result.model, setup.forget) >= 0.6  # measured: 0.92 (scale 8)
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


def test_unlearn_with_init_and_noise_on_a_tiny_network():
    """``init=θ0`` linearises at θ0; ``noise`` adds Fisher noise to the chosen weights; neither
    the network nor θ0 is modified (a tiny MLP, so this runs in a second)."""
    from torch import nn

    torch.manual_seed(0)
    theta0 = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        for p, q in zip(net.parameters(), theta0.parameters()):
            p.copy_(q + 0.1 * torch.randn_like(q))
    X = torch.randn(70, 6)
    Y = (X @ torch.randn(6, 3)).argmax(1)
    loaders = [_loader((X[a:b], Y[a:b])) for a, b in ((0, 40), (40, 50), (50, 70))]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in (net, theta0)]
    plain = unlearn(net, *loaders, init=theta0, weight_decay=0.01, precond_rank=None)
    noisy = unlearn(net, *loaders, init=theta0, weight_decay=0.01, noise=1e-6, precond_rank=None)
    for m, s in zip((net, theta0), saved):
        assert all(torch.equal(v, s[k]) for k, v in m.state_dict().items())
    assert plain.info["settings"]["linearize_at"] == "init"
    assert plain.info["scrub_info"]["linearize_at"] == "init"
    assert noisy.scale == plain.scale and noisy.info["noise"]["alpha"] == 1e-6
    moved = [
        not torch.equal(a, b) for a, b in zip(noisy.model.parameters(), plain.model.parameters())
    ]
    assert any(moved)
