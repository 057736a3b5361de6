"""train(): objective, determinism, frozen BatchNorm, anchor decay, stopping; checkpoints."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from model_zoo import seeded
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ntkscrub import readouts
from ntkscrub.recipes.models import MLP, SmallCNN
from ntkscrub.training import (
    TrainLog,
    load_checkpoint,
    lr_at,
    save_checkpoint,
    train,
)


def evaluate(model: nn.Module, data, batch_size: int = 512) -> dict:
    """Error, loss and size on one data set (the one evaluate: ntkscrub.readouts.evaluate)."""
    return readouts.evaluate(model, {"data": data}, batch_size=batch_size)["data"]


def blobs(n_per: int = 20, c: int = 3, d: int = 4, sep: float = 4.0, seed: int = 0):
    """Linearly separable Gaussian blobs: X (n_per·c, d) float32, Y (n_per·c,) int64."""
    g = torch.Generator().manual_seed(seed)
    centers = sep * torch.eye(c, d)
    X = torch.cat([centers[k] + 0.3 * torch.randn(n_per, d, generator=g) for k in range(c)])
    Y = torch.arange(c).repeat_interleave(n_per)
    return X, Y


def images(n: int = 24, c: int = 3, seed: int = 0):
    """Tiny 1×8×8 images whose class shifts the mean, for the BatchNorm models."""
    g = torch.Generator().manual_seed(seed)
    Y = torch.arange(n) % c
    X = torch.randn(n, 1, 8, 8, generator=g) + Y.view(-1, 1, 1, 1).float()
    return X, Y


def mlp(seed: int = 0, hidden=(8,), d: int = 4, c: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(d, hidden, c)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------- objective
def test_training_lowers_the_loss_and_returns_copy_in_eval_mode():
    X, Y = blobs()
    m = mlp()
    before = evaluate(m, (X, Y))
    net, log = train(m, (X, Y), epochs=5, lr=0.05, batch_size=16)
    assert isinstance(log, TrainLog) and log.epochs == 5
    assert len(log.train_error) == len(log.train_loss) == len(log.lr) == 5
    assert log.train_loss[-1] < before["loss"]
    assert evaluate(net, (X, Y))["loss"] == pytest.approx(log.train_loss[-1], rel=1e-5)
    assert net is not m and not net.training
    assert log.seconds > 0 and log.recipe["lr"] == 0.05 and log.recipe["freeze_bn"]
    json.dumps(log.to_dict())


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("use_anchor", [False, True])
def test_one_step_matches_the_objective(loss, use_anchor):
    # one full-batch step without momentum: w1 = w0 − lr·(∇ mean ℓ + λ(w0 − anchor))
    X, Y = blobs(n_per=5)
    m = mlp(hidden=())
    anchor = mlp(seed=1, hidden=()) if use_anchor else None
    lr, lam = 0.1, 0.3
    out = m(X)
    if loss == "ce":
        obj = F.cross_entropy(out, Y)
    else:
        obj = 0.5 * (out - F.one_hot(Y, 3).float()).pow(2).sum(1).mean()
    grads = torch.autograd.grad(obj, list(m.parameters()))
    net, _ = train(
        m,
        (X, Y),
        epochs=1,
        lr=lr,
        momentum=0.0,
        weight_decay=lam,
        anchor=anchor,
        loss=loss,
        batch_size=len(Y),
    )
    anchors = (
        dict(anchor.named_parameters()) if use_anchor else {n: 0 for n, _ in m.named_parameters()}
    )
    for (name, p0), g, p1 in zip(m.named_parameters(), grads, net.parameters()):
        expected = p0 - lr * (g + lam * (p0 - anchors[name]))
        torch.testing.assert_close(p1, expected, rtol=1e-5, atol=1e-6)


def test_anchor_decay_pulls_toward_the_anchor():
    X, Y = blobs()
    m = mlp()
    anchor = mlp(seed=5)

    def dist(net):
        return sum(
            float((p - a).detach().pow(2).sum())
            for p, a in zip(net.parameters(), anchor.parameters())
        )

    free, _ = train(m, (X, Y), epochs=10, lr=0.05)
    pulled, log = train(m, (X, Y), epochs=10, lr=0.05, weight_decay=1.0, anchor=anchor)
    state_anchor, _ = train(
        m, (X, Y), epochs=10, lr=0.05, weight_decay=1.0, anchor=anchor.state_dict()
    )
    assert dist(pulled) < 0.5 * dist(free)
    assert same_state(pulled, state_anchor)  # module and state_dict anchors agree
    assert log.recipe["anchor"] == "given weights"
    assert log.penalty[-1] == pytest.approx(0.5 * dist(pulled), rel=1e-4)
    # default anchor = 0: plain weight decay shrinks the weights
    shrunk, _ = train(m, (X, Y), epochs=10, lr=0.05, weight_decay=1.0)
    norm = lambda net: sum(float(p.detach().pow(2).sum()) for p in net.parameters())  # noqa: E731
    assert norm(shrunk) < norm(free)


# ----------------------------------------------------------------------- side effects, seeds
def test_input_model_is_not_modified_and_global_rng_untouched():
    X, Y = images()
    with seeded(0):
        m = SmallCNN(1, 3, width=4)
    m.train()
    ref = copy.deepcopy(m)
    rng = torch.get_rng_state()
    train(m, (X, Y), epochs=2, lr=0.1, batch_size=8, freeze_bn=False)
    assert same_state(m, ref) and m.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_same_seed_gives_identical_weights():
    X, Y = images()
    with seeded(0):
        m = SmallCNN(1, 3, width=4)
    kw = dict(epochs=2, lr=0.1, batch_size=8, freeze_bn=False)
    a, la = train(m, (X, Y), seed=7, **kw)
    b, lb = train(m, (X, Y), seed=7, **kw)
    c, _ = train(m, (X, Y), seed=8, **kw)
    assert same_state(a, b) and la.train_loss == lb.train_loss
    assert not same_state(a, c)


def test_dropout_is_seeded():
    X, Y = blobs()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    a, _ = train(m, (X, Y), epochs=2, lr=0.1, seed=3)
    b, _ = train(m, (X, Y), epochs=2, lr=0.1, seed=3)
    assert same_state(a, b)


def test_frozen_batchnorm_keeps_running_statistics():
    X, Y = images()
    with seeded(0):
        m = SmallCNN(1, 3, width=4)
    buffers = {k: v.clone() for k, v in m.named_buffers()}
    frozen, _ = train(m, (X, Y), epochs=2, lr=0.1, batch_size=8, freeze_bn=True)
    for k, v in frozen.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert not same_state(frozen, m)  # the weights did train
    free, _ = train(m, (X, Y), epochs=2, lr=0.1, batch_size=8, freeze_bn=False)
    fb = dict(free.named_buffers())
    assert not torch.equal(fb["features.0.1.running_mean"], buffers["features.0.1.running_mean"])


# --------------------------------------------------------------------------- stopping rules
def test_until_zero_error_reaches_zero():
    X, Y = blobs(sep=3.0)
    m = mlp()
    net, log = train(m, (X, Y), epochs=1, lr=0.02, until_zero_error=True, max_epochs=300)
    assert log.reached_zero_error and log.train_error[-1] == 0.0
    assert evaluate(net, (X, Y))["error"] == 0.0
    assert 1 <= log.epochs <= 300
    # without it, exactly `epochs` are run
    _, log2 = train(m, (X, Y), epochs=1, lr=0.02)
    assert log2.epochs == 1


def test_until_zero_error_respects_max_epochs():
    X, Y = blobs()
    Y = Y[torch.randperm(len(Y), generator=torch.Generator().manual_seed(0))]  # not separable
    _, log = train(mlp(hidden=()), (X, Y), epochs=2, lr=0.01, until_zero_error=True, max_epochs=4)
    assert log.epochs == 4 and not log.reached_zero_error


def test_callback_stops_training():
    X, Y = blobs()
    seen = []

    def cb(epoch, model, log):
        seen.append((epoch, len(log.train_error), model.training))
        return epoch == 2

    _, log = train(mlp(), (X, Y), epochs=10, lr=0.05, callback=cb)
    assert log.epochs == 2 and log.stopped_by_callback
    assert seen == [(1, 1, False), (2, 2, False)]


def test_schedules():
    assert lr_at(0, lr=1.0, epochs=4, schedule="cosine") == 1.0
    assert lr_at(2, lr=1.0, epochs=4, schedule="cosine") == pytest.approx(0.5)
    assert [lr_at(e, lr=1.0, epochs=4, schedule="step") for e in range(5)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.01, 0.01]
    )
    X, Y = blobs()
    _, log = train(mlp(), (X, Y), epochs=4, lr=0.1, schedule="step", progress=True)
    assert log.lr == pytest.approx([0.1, 0.1, 0.01, 0.001])
    _, log = train(mlp(), (X, Y), epochs=3, lr=0.1, schedule="cosine")
    assert log.lr[0] == 0.1 and log.lr[0] > log.lr[1] > log.lr[2] > 0


def test_dataset_and_dataloader_inputs():
    X, Y = blobs()
    ds = TensorDataset(X, Y)
    a, la = train(mlp(), ds, epochs=2, lr=0.05)
    b, _ = train(mlp(), DataLoader(ds, batch_size=5, shuffle=True), epochs=2, lr=0.05)
    assert same_state(a, b)  # a DataLoader is re-batched with train's own seeded shuffle
    assert la.epochs == 2 and evaluate(a, ds)["n"] == len(Y)


# ------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_naming_the_argument():
    X, Y = blobs()
    m = mlp()
    cases = [
        (dict(epochs=-1, lr=0.1), ValueError, "epochs"),
        (dict(epochs=1, lr=0.0), ValueError, "lr"),
        (dict(epochs=1, lr=0.1, loss="hinge"), ValueError, "loss"),
        (dict(epochs=1, lr=0.1, schedule="linear"), ValueError, "schedule"),
        (dict(epochs=1, lr=0.1, weight_decay=-1.0), ValueError, "weight_decay"),
        (dict(epochs=1, lr=0.1, weight_decay=0.1, anchor=mlp(hidden=(5,))), ValueError, "anchor"),
        (dict(epochs=1, lr=0.1, anchor={"x": torch.zeros(1)}), ValueError, "anchor"),
        (dict(epochs=1, lr=0.1, anchor=3), TypeError, "anchor"),
        (dict(epochs=2, lr=0.1, max_epochs=1), ValueError, "max_epochs"),
        (dict(epochs=1.5, lr=0.1), TypeError, "epochs"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=name):
            train(m, (X, Y), **kw)
    with pytest.raises(ValueError, match="data"):
        train(m, (X, Y + 5), epochs=1, lr=0.1)  # labels beyond the 3 logits
    with pytest.raises(TypeError, match="model"):
        train("not a model", (X, Y), epochs=1, lr=0.1)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    with seeded(0):
        m = SmallCNN(1, 3, width=4)
    path = tmp_path / "ck" / "model.pt"
    meta = {"epochs": 3, "recipe": {"lr": 0.01, "schedule": "cosine"}, "errors": [0.5, 0.0]}
    save_checkpoint(path, m, meta)
    assert os.listdir(path.parent) == ["model.pt"]  # temp file replaced, none left behind
    raw = torch.load(path, weights_only=True)  # loads without unpickling code
    assert raw["meta"] == meta
    state, meta2 = load_checkpoint(path)
    assert meta2 == meta and state.keys() == m.state_dict().keys()
    with seeded(1):
        other = SmallCNN(1, 3, width=4)
    loaded, _ = load_checkpoint(path, other)
    assert same_state(loaded, m) and not same_state(other, m)  # `other` untouched
    save_checkpoint(tmp_path / "sd.pt", m.state_dict())
    assert load_checkpoint(tmp_path / "sd.pt")[1] == {}
    torch.save(m.state_dict(), tmp_path / "bare.pt")
    state3, meta3 = load_checkpoint(tmp_path / "bare.pt")
    assert meta3 == {} and torch.equal(state3["classifier.weight"], m.classifier.weight)


def test_checkpoint_bad_input(tmp_path):
    m = SmallCNN(1, 3, width=4)
    with pytest.raises(TypeError, match="meta"):
        save_checkpoint(tmp_path / "a.pt", m, {"obj": object()})
    with pytest.raises(TypeError, match="model_or_state"):
        save_checkpoint(tmp_path / "a.pt", [1, 2])
    assert not os.listdir(tmp_path)
    save_checkpoint(tmp_path / "a.pt", m)
    with pytest.raises(ValueError, match="model"):
        load_checkpoint(tmp_path / "a.pt", SmallCNN(1, 4, width=4))
    with pytest.raises(FileNotFoundError, match="path"):
        load_checkpoint(tmp_path / "missing.pt")


def test_evaluate():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
    X = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    Y = torch.tensor([0, 1, 1])
    out = evaluate(lin, (X, Y), batch_size=2)
    assert out["error"] == pytest.approx(1 / 3) and out["n"] == 3
    expected = float(F.cross_entropy(lin(X), Y).detach())
    assert out["loss"] == pytest.approx(expected, rel=1e-6)
