"""Tests of ntkscrub.readouts: errors, softmax distances (Fig. 4), relearn time, membership attack.

Tiny hand-built models and synthetic data only; the whole file runs in a few seconds on a CPU.
Models "whose output we control" are ``nn.Identity`` (logits = inputs) or linear maps with fixed
weights, so expected values are computed by hand.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from model_zoo import seeded
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ntkscrub import readouts as R

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------- helpers
def mlp(seed: int, d: int = 4, h: int = 16, c: int = 3, dtype=torch.float32) -> nn.Sequential:
    with torch.random.fork_rng():  # seeded weights without touching the session's RNG
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).to(dtype).eval()


def bn_mlp(seed: int) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        with torch.no_grad():  # non-trivial running statistics, so buffers matter
            m[1].running_mean.uniform_(-0.5, 0.5)
            m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def fixed_linear(weight, bias) -> nn.Linear:
    w = torch.as_tensor(weight, dtype=torch.float64)
    lin = nn.Linear(w.shape[1], w.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.as_tensor(bias, dtype=torch.float64))
    return lin.eval()


def blobs(n: int, seed: int, c: int = 3, d: int = 4, spread: float = 0.3):
    """Separable Gaussian blobs: class k centred at 3·e_k. X (n, d), Y (n,)."""
    g = torch.Generator().manual_seed(seed)
    Y = torch.arange(n) % c
    X = 3.0 * torch.eye(d)[Y] + spread * torch.randn(n, d, generator=g)
    return X, Y


def snapshot(*objs):
    out = []
    for o in objs:
        if isinstance(o, nn.Module):
            out.append({k: v.detach().clone() for k, v in o.state_dict().items()})
        else:
            out.append([t.clone() for t in o])
    return out


def assert_unchanged(objs, snaps):
    for o, snap in zip(objs, snaps):
        if isinstance(o, nn.Module):
            now = o.state_dict()
            assert set(now) == set(snap)
            for k, v in snap.items():
                assert torch.equal(now[k], v), k
        else:
            for t, s in zip(o, snap):
                assert torch.equal(t, s)


# --------------------------------------------------------------------------- error / loss
def test_error_and_loss_against_hand_computation():
    # Logits = inputs (identity weights): argmax of x is the prediction.
    model = fixed_linear([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    X = torch.tensor(
        [[2.0, 0.0], [0.0, 1.0], [1.0, 3.0], [5.0, 4.0], [0.5, 0.0]], dtype=torch.float64
    )
    Y = torch.tensor([0, 1, 0, 1, 0])  # predictions 0,1,1,0,0 -> wrong at 2 and 3
    snaps = snapshot(model, (X, Y))
    assert R.error(model, (X, Y), batch_size=2) == pytest.approx(2 / 5, abs=0)
    ce = sum(
        math.log(math.exp(x[0]) + math.exp(x[1])) - x[y] for x, y in zip(X.tolist(), Y.tolist())
    )
    assert R.loss(model, (X, Y), batch_size=3) == pytest.approx(ce / 5, rel=1e-12)
    mse = 0.5 * sum(
        (x[0] - (y == 0)) ** 2 + (x[1] - (y == 1)) ** 2 for x, y in zip(X.tolist(), Y.tolist())
    )
    assert R.loss(model, (X, Y), kind="mse") == pytest.approx(mse / 5, rel=1e-12)
    # Dataset and DataLoader forms give the same numbers.
    ds = TensorDataset(X, Y)
    assert R.error(model, ds) == R.error(model, DataLoader(ds, batch_size=2)) == 0.4
    assert_unchanged([model, (X, Y)], snaps)


def test_predict_proba_and_evaluate():
    model = mlp(0)
    X, Y = blobs(30, 1)
    P = R.predict_proba(model, X, batch_size=7)  # labels are optional here
    assert P.shape == (30, 3) and P.device.type == "cpu"
    assert torch.allclose(P.sum(1), torch.ones(30))
    assert torch.allclose(P, model(X).softmax(1).detach())
    # A float64 model gets float32 data cast to its dtype.
    P64 = R.predict_proba(mlp(0, dtype=torch.float64), X)
    assert P64.dtype == torch.float64 and torch.allclose(P64.float(), P, atol=1e-6)
    out = R.evaluate(model, {"retain": (X[:20], Y[:20]), "forget": (X[20:], Y[20:])})
    assert set(out) == {"retain", "forget"} and out["forget"]["n"] == 10
    assert out["retain"]["error"] == R.error(model, (X[:20], Y[:20]))
    assert out["forget"]["loss"] == pytest.approx(R.loss(model, (X[20:], Y[20:])), rel=1e-12)
    json.dumps(out)


# --------------------------------------------------------------------------- softmax L1
def test_softmax_l1_hand_computed_and_properties():
    ident = nn.Identity()  # logits = x
    uniform = fixed_linear([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0])
    # sample 1: p = (1/4, 3/4) vs (1/2, 1/2) -> L1 = 1/2; sample 2: identical -> 0
    X = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]], dtype=torch.float64)
    assert R.softmax_l1(ident, uniform, X) == pytest.approx(0.25, rel=1e-12)
    assert R.softmax_l1(uniform, ident, X) == pytest.approx(0.25, rel=1e-12)
    # Convention: full probability vectors, so opposite confident models approach 2, never exceed.
    a = fixed_linear([[50.0], [-50.0]], [0.0, 0.0])
    b = fixed_linear([[-50.0], [50.0]], [0.0, 0.0])
    x1 = torch.ones(4, 1, dtype=torch.float64)
    d = R.softmax_l1(a, b, x1)
    assert 1.999 < d <= 2.0

    m1, m2 = mlp(0), mlp(1)
    X, Y = blobs(50, 2)
    assert R.softmax_l1(m1, copy.deepcopy(m1), (X, Y)) == 0.0
    d12 = R.softmax_l1(m1, m2, (X, Y), batch_size=16)
    assert d12 == R.softmax_l1(m2, m1, X, batch_size=16)  # symmetric, exactly
    assert d12 == pytest.approx(R.softmax_l1(m2, m1, X), rel=1e-6)  # float32 batching only
    assert 0.0 < d12 <= 2.0
    expect = (m1(X).softmax(1) - m2(X).softmax(1)).abs().sum(1).mean().item()
    assert d12 == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_along_line_endpoints_and_midpoint(device):
    model, ref = bn_mlp(0).to(device), bn_mlp(2).to(device)
    scrubbed = copy.deepcopy(model)
    with torch.no_grad(), seeded(1):  # a different point in weight space, same buffers
        for p in scrubbed.parameters():
            p.add_(0.3 * torch.randn_like(p))
    X, Y = blobs(40, 3)  # data on the CPU; each model gets it on its own device
    snaps = snapshot(model, scrubbed, ref, (X, Y))
    out = R.softmax_l1_along_line(model, scrubbed, ref, (X, Y), batch_size=16)
    assert out["alphas"] == pytest.approx([i / 10 for i in range(11)])
    assert len(out["distances"]) == 11
    # Same batches as the direct distances, so the endpoints agree to rounding of the mean.
    direct0 = R.softmax_l1(model, ref, X, batch_size=16)
    assert out["distances"][0] == pytest.approx(direct0, rel=1e-12)
    direct1 = R.softmax_l1(scrubbed, ref, X, batch_size=16)
    assert out["distances"][-1] == pytest.approx(direct1, rel=1e-12)

    mid = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(mid.parameters(), scrubbed.parameters()):
            p.copy_(0.5 * p + 0.5 * q)
    half = R.softmax_l1_along_line(model, scrubbed, ref, X, alphas=[0.5, 1.5])
    assert half["alphas"] == [0.5, 1.5]
    assert half["distances"][0] == pytest.approx(R.softmax_l1(mid, ref, X), rel=1e-5)
    json.dumps(out)
    assert_unchanged([model, scrubbed, ref, (X, Y)], snaps)


def test_along_line_buffers_come_from_model():
    model, ref = bn_mlp(0), bn_mlp(2)
    scrubbed = copy.deepcopy(model)
    with torch.no_grad():
        scrubbed[1].running_mean.add_(1.0)
    X, _ = blobs(20, 4)
    with pytest.warns(UserWarning, match="buffers"):
        out = R.softmax_l1_along_line(model, scrubbed, ref, X, alphas=torch.tensor([1.0]))
    # Weights equal, buffers from model: the a = 1 point is model, not scrubbed.
    assert out["distances"][0] == pytest.approx(R.softmax_l1(model, ref, X), rel=1e-12)


# --------------------------------------------------------------------------- relearn time
def _trained_original(X, Y, steps: int = 50) -> nn.Module:
    """A small MLP fitted to the separable blobs (full-batch GD): zero error, small loss."""
    model = mlp(0)
    for _ in range(steps):
        model.zero_grad()
        nn.functional.cross_entropy(model(X), Y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    model.zero_grad(set_to_none=True)
    return model


@pytest.fixture(scope="module")
def relearn_setup():
    X, Y = blobs(150, 5)
    original = _trained_original(X, Y)
    assert R.error(original, (X, Y)) == 0.0
    forget = (X[Y == 0][:10], Y[Y == 0][:10])
    return original, (X, Y), forget


def test_relearn_original_is_one_epoch(relearn_setup):
    original, D, forget = relearn_setup
    snaps = snapshot(original, D, forget)
    res = R.relearn_time(original, D, forget, reference=original)  # the reference recipe
    assert res.reached and res.epochs == 1
    assert len(res.forget_losses) == 2
    assert res.forget_losses[0] == pytest.approx(res.target_loss)
    assert res.forget_losses[1] <= res.threshold == res.target_loss + 1e-5
    json.dumps(res.to_dict())
    assert "k >= 1" in res.convention
    assert_unchanged([original, D, forget], snaps)


def test_relearn_perturbed_head_takes_longer(relearn_setup):
    original, D, forget = relearn_setup
    perturbed = copy.deepcopy(original)
    with torch.no_grad():  # raise the forget loss: push the forget class's logit down
        perturbed[2].bias[0] -= 8.0
    target = R.loss(original, forget)
    assert R.loss(perturbed, forget) > target + 1.0
    snaps = snapshot(perturbed, D, forget)
    res = R.relearn_time(perturbed, D, forget, target_loss=target, lr=0.5, max_epochs=60)
    assert res.reached and 1 < res.epochs <= 60
    assert len(res.forget_losses) == res.epochs + 1
    assert res.forget_losses[-1] <= target + 1e-5 < min(res.forget_losses[:-1])
    assert_unchanged([perturbed, D, forget], snaps)

    # Never reached: epochs = max_epochs + 1, flagged.
    never = R.relearn_time(perturbed, D, forget, target_loss=target, lr=1e-4, max_epochs=2)
    assert not never.reached and never.epochs == 3 and len(never.forget_losses) == 3
    assert never.diverged_at_epoch is None

    # A longer "epoch" (samples_per_epoch = 2|D|: two draws of D per epoch) takes fewer epochs.
    long = R.relearn_time(
        perturbed, D, forget, target_loss=target, lr=0.5, samples_per_epoch=300, max_epochs=60
    )
    assert long.samples_per_epoch == 300 and long.reached and 1 < long.epochs < res.epochs


@pytest.mark.parametrize("samples_per_epoch", [None, 150])
def test_relearn_divergence_is_reported_not_called_slow(relearn_setup, samples_per_epoch):
    original, D, forget = relearn_setup
    start = copy.deepcopy(original)
    with torch.no_grad():  # large gradients, so that an absurd rate overflows float32 at once
        start[2].bias[0] -= 8.0
    target = R.loss(original, forget) - 1.0  # unreachable: only divergence can end the run early
    res = R.relearn_time(
        start, D, forget, target_loss=target, lr=1e38, max_epochs=20,
        samples_per_epoch=samples_per_epoch,
    )  # fmt: skip
    assert res.diverged_at_epoch is not None and res.diverged_at_epoch <= 3
    assert not res.reached and res.epochs == 21
    assert len(res.forget_losses) == res.diverged_at_epoch + 1  # stopped there, not at 20
    assert "diverged_at_epoch" in res.convention


def test_relearn_retain_guard_refuses_a_collapse_onto_the_forget_class(relearn_setup):
    original, D, forget = relearn_setup
    retain = (D[0][D[1] != 0], D[1][D[1] != 0])
    collapsed = copy.deepcopy(original)
    with torch.no_grad():  # predicts the forget class (0) everywhere: forget loss ≈ 0
        collapsed[2].bias[0] += 40.0
    assert R.error(collapsed, retain) == 1.0 and R.loss(collapsed, forget) < 1e-6
    target = R.loss(original, forget)
    snaps = snapshot(collapsed, D, forget, retain)
    kw = dict(target_loss=target, lr=1e-6, max_epochs=3)  # too small a rate to leave the collapse
    fooled = R.relearn_time(collapsed, D, forget, **kw)
    assert fooled.reached and fooled.epochs == 1 and fooled.retain_errors is None
    guarded = R.relearn_time(collapsed, D, forget, retain=retain, max_retain_error=0.6, **kw)
    assert not guarded.reached and guarded.epochs == 4
    assert guarded.collapsed_epochs == [1, 2, 3] and guarded.retain_errors == [1.0] * 4
    json.dumps(guarded.to_dict())
    assert "max_retain_error" in guarded.convention
    assert_unchanged([collapsed, D, forget, retain], snaps)
    # The guard does not touch a healthy model; retain alone only records the errors.
    ok = R.relearn_time(
        original, D, forget, reference=original, retain=retain, max_retain_error=0.6
    )
    assert ok.reached and ok.epochs == 1 and ok.collapsed_epochs == []
    rec = R.relearn_time(collapsed, D, forget, retain=retain, **kw)
    assert rec.reached and rec.retain_errors == [1.0, 1.0]
    with pytest.raises(ValueError, match="max_retain_error"):
        R.relearn_time(original, D, forget, reference=original, max_retain_error=0.5)
    with pytest.raises(ValueError, match="max_retain_error"):
        R.relearn_time(original, D, forget, reference=original, retain=retain, max_retain_error=2)


# --------------------------------------------------------------------------- membership attack
def test_attack_chance_when_one_distribution():
    g = torch.Generator().manual_seed(0)
    ident = nn.Identity()
    retain, test, forget = (torch.randn(n, 5, generator=g) for n in (300, 240, 25))
    snaps = snapshot((retain, test, forget))
    res = R.membership_attack(ident, retain, test, forget, seed=1)
    assert 0.35 <= res.attack_heldout_accuracy <= 0.65
    assert res.n_members == res.n_nonmembers == 240 and res.n_forget == 25  # balanced
    assert 0.0 <= res.forget_member_fraction <= 1.0
    d = res.to_dict()
    json.dumps(d)
    assert "lower = more forgotten" in d["convention"] and d["C"] == 3.0
    assert_unchanged([(retain, test, forget)], snaps)
    # Seeded: the same call gives the same result.
    assert R.membership_attack(ident, retain, test, forget, seed=1).to_dict() == d


def test_attack_separates_memorised_members():
    g = torch.Generator().manual_seed(0)
    ident = nn.Identity()
    Y = torch.arange(200) % 5
    confident = 12.0 * nn.functional.one_hot(Y, 5).float()  # memorised: near-zero entropy
    unsure = 0.3 * torch.randn(150, 5, generator=g)  # non-members: near log 5
    res = R.membership_attack(ident, (confident, Y), unsure, confident[:25])
    assert res.attack_heldout_accuracy >= 0.95
    assert res.forget_member_fraction == 1.0
    assert res.entropy_mean["retain"] < 0.01 < math.log(5) - 0.1 < res.entropy_mean["test"]
    forgotten = R.membership_attack(ident, (confident, Y), unsure, unsure[:25] + 0.01)
    assert forgotten.forget_member_fraction == 0.0
    capped = R.membership_attack(ident, confident, unsure, confident[:25], max_per_class=40)
    assert capped.n_members == capped.n_nonmembers == 40 and capped.forget_member_fraction == 1.0


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_naming_the_argument():
    m = mlp(0)
    X, Y = blobs(20, 0)
    train_bn = bn_mlp(0).train()
    with pytest.raises(ValueError, match="model"):
        R.error(train_bn, (X, Y))
    with pytest.raises(ValueError, match="model_b"):
        R.softmax_l1(m, train_bn, X)
    with pytest.raises(TypeError, match="model"):
        R.error("not a model", (X, Y))
    with pytest.raises(ValueError, match="data.*empty"):
        R.error(m, (X[:0], Y[:0]))
    with pytest.raises(ValueError, match="data"):
        R.error(m, (X, Y + 3))  # labels out of range for 3 logits
    with pytest.raises(ValueError, match="data"):
        R.error(m, X)  # no labels
    with pytest.raises(ValueError, match="data"):
        R.softmax_l1(m, m, X.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="kind"):
        R.loss(m, (X, Y), kind="hinge")
    with pytest.raises(TypeError, match="splits"):
        R.evaluate(m, [(X, Y)])
    with pytest.raises(ValueError, match=r"splits\['test'\]"):
        R.evaluate(m, {"test": (X[:0], Y[:0])})

    nan_model = mlp(0)
    with torch.no_grad():
        nan_model[2].bias[0] = float("nan")
    with pytest.raises(ValueError, match="model.*NaN"):
        R.loss(nan_model, (X, Y))

    # Two compared models with different output sizes.
    with pytest.raises(ValueError, match="model_b"):
        R.softmax_l1(m, mlp(0, c=4), X)
    # Interpolation needs the same architecture.
    with pytest.raises(ValueError, match="scrubbed"):
        R.softmax_l1_along_line(m, mlp(0, h=8), m, X)
    with pytest.raises(ValueError, match="scrubbed"):
        R.softmax_l1_along_line(m, bn_mlp(0), m, X)
    with pytest.raises(ValueError, match="reference"):
        R.softmax_l1_along_line(m, mlp(1), mlp(0, c=4), X)
    for bad in ([], [0.0, float("nan")], [[0.0, 1.0]], torch.zeros(2, 2)):
        with pytest.raises(ValueError, match="alphas"):
            R.softmax_l1_along_line(m, mlp(1), m, X, alphas=bad)
    for bad in ("0.5", ["a"]):
        with pytest.raises(TypeError, match="alphas"):
            R.softmax_l1_along_line(m, mlp(1), m, X, alphas=bad)

    with pytest.raises(ValueError, match="target_loss"):
        R.relearn_time(m, (X, Y), (X, Y))  # neither target_loss nor reference
    with pytest.raises(ValueError, match="target_loss"):
        R.relearn_time(m, (X, Y), (X, Y), target_loss=0.1, reference=m)
    with pytest.raises(ValueError, match="target_loss"):
        R.relearn_time(m, (X, Y), (X, Y), target_loss=float("nan"))
    with pytest.raises(ValueError, match="max_epochs"):
        R.relearn_time(m, (X, Y), (X, Y), target_loss=0.1, max_epochs=0)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        R.relearn_time(m, (X, Y), (X, Y), target_loss=0.1, samples_per_epoch=0)
    with pytest.raises(ValueError, match="data_full"):
        R.relearn_time(m, (X[:0], Y[:0]), (X, Y), target_loss=0.1)
    with pytest.raises(ValueError, match="reference"):
        R.relearn_time(m, (X, Y), (X, Y), reference=train_bn)

    with pytest.raises(ValueError, match="retain"):
        R.membership_attack(m, X[:1], X, X)
    with pytest.raises(ValueError, match="forget.*empty"):
        R.membership_attack(m, X, X, X[:0])
    with pytest.raises(ValueError, match="C"):
        R.membership_attack(m, X, X, X, C=0.0)
    with pytest.raises(ValueError, match="max_per_class"):
        R.membership_attack(m, X, X, X, max_per_class=1)


# --------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_models_match_cpu(relearn_setup):
    original, D, forget = relearn_setup
    X, Y = D
    gpu = copy.deepcopy(original).cuda()
    other = mlp(3)  # stays on the CPU: mixed devices are compared on one data stream
    snaps = snapshot(gpu, D)
    assert R.error(gpu, D) == R.error(original, D)
    assert R.loss(gpu, forget) == pytest.approx(R.loss(original, forget), rel=1e-4, abs=1e-7)
    assert R.predict_proba(gpu, X).device.type == "cpu"
    assert R.softmax_l1(gpu, other, X) == pytest.approx(R.softmax_l1(original, other, X), rel=1e-4)
    assert R.softmax_l1(other, gpu, X) == pytest.approx(R.softmax_l1(other, original, X), rel=1e-4)
    line = R.softmax_l1_along_line(gpu, copy.deepcopy(other).cuda(), original, X, alphas=[0, 1])
    assert line["distances"][0] == pytest.approx(0.0, abs=1e-6)

    test = (X + 0.5, Y)
    a_gpu = R.membership_attack(gpu, D, test, forget)
    a_cpu = R.membership_attack(original, D, test, forget)
    assert a_gpu.attack_heldout_accuracy == pytest.approx(a_cpu.attack_heldout_accuracy, abs=0.05)

    res = R.relearn_time(gpu, D, forget, reference=gpu)
    assert res.reached and res.epochs == 1
    perturbed = copy.deepcopy(gpu)
    with torch.no_grad():
        perturbed[2].bias[0] -= 8.0
    target = R.loss(gpu, forget)
    slow_gpu = R.relearn_time(perturbed, D, forget, target_loss=target, lr=0.5, max_epochs=60)
    slow_cpu = R.relearn_time(perturbed.cpu(), D, forget, target_loss=target, lr=0.5, max_epochs=60)
    assert slow_gpu.reached and abs(slow_gpu.epochs - slow_cpu.epochs) <= 1
    assert_unchanged([gpu, D], snaps)
