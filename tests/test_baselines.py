"""Tests of ntkscrub.baselines: Fisher forgetting, Fine-tune, Retrain.

Tiny float64 models (conftest) and a few dozen synthetic samples: the file runs in seconds.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_zoo import make_cnn, make_data, make_mlp
from torch import nn
from torch.utils.data import Dataset

from ntkscrub.baselines import (
    FISHER_OPTIONS,
    ForgetResult,
    add_fisher_noise,
    finetune,
    fisher_forget,
    retrain,
)
from ntkscrub.config import NoiseConfig
from ntkscrub.scrub import diagonal_fisher, fisher_noise_variance, scrub
from ntkscrub.training import train


# --------------------------------------------------------------------------- helpers
def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} was modified"


def expected_variance(model: nn.Module, data, alpha: float, c: int = 3, **opts) -> torch.Tensor:
    """The documented variance, flat in named_parameters() order."""
    fisher = diagonal_fisher(model, data)
    var = fisher_noise_variance(fisher, alpha, c, **opts)
    return torch.cat([var[n].reshape(-1) for n, _ in model.named_parameters()])


class ExplodingDataset(Dataset):
    """A data set that fails on any access: proves a function never reads it."""

    def __len__(self) -> int:
        raise AssertionError("the forget set was read (len)")

    def __getitem__(self, i):
        raise AssertionError("the forget set was read (getitem)")


@pytest.fixture
def mlp_data():
    model = make_mlp()
    X, Y = make_data("mlp", 24)
    return model, (X[:20], Y[:20]), (X[20:], Y[20:])


# --------------------------------------------------------------------------- Fisher forgetting
def test_fisher_noise_has_documented_variance(mlp_data):
    model, retain, _ = mlp_data
    alpha = 1e-6
    v = expected_variance(model, retain, alpha)
    draws = torch.stack(
        [fisher_forget(model, retain, alpha=alpha, seed=s).shift for s in range(300)]
    )  # (300, p)
    emp = draws.pow(2).mean(0)  # zero-mean noise: E n² = v
    ratio = emp / v
    # 300 draws: each per-parameter ratio has std ≈ sqrt(2/300) ≈ 0.08
    assert abs(float(ratio.mean()) - 1.0) < 0.05
    assert float((ratio - 1).abs().max()) < 0.45
    assert abs(float(draws.mean())) < 0.05 * float(v.sqrt().mean())
    # the noise really is in the returned model's weights
    res = fisher_forget(model, retain, alpha=alpha, seed=3)
    assert torch.allclose(flat(res.model) - flat(model), res.shift, atol=1e-12)


def test_fisher_variance_uses_reference_clamps(mlp_data):
    model, retain, _ = mlp_data
    res = fisher_forget(model, retain, alpha=1.0, seed=0)
    v = expected_variance(model, retain, 1.0)
    # Clamp 1e3 (1e2 for the head), ×10 for the head and 1-D tensors: variance ≤ 1e4·α.
    assert float(v.max()) <= 1e4 + 1e-9
    z = res.shift / v.sqrt()
    assert abs(float(z.var()) - 1.0) < 0.3  # standardised noise ~ N(0, 1) over p entries
    # Options change the variance as documented.
    v2 = expected_variance(model, retain, 1.0, clamp=10.0, head_clamp=10.0)
    res2 = fisher_forget(
        model, retain, alpha=1.0, seed=0, noise_config=NoiseConfig(clamp=10.0, head_clamp=10.0)
    )
    assert torch.allclose(res2.shift, (v2 / v).sqrt() * res.shift, rtol=1e-10, atol=1e-14)


def test_fisher_seeds(mlp_data):
    model, retain, forget = mlp_data
    before = state_copy(model)
    a = fisher_forget(model, retain, forget, alpha=1e-6, seed=7)
    b = fisher_forget(model, retain, forget, alpha=1e-6, seed=7)
    c = fisher_forget(model, retain, forget, alpha=1e-6, seed=8)
    assert torch.equal(flat(a.model), flat(b.model))
    assert not torch.equal(flat(a.model), flat(c.model))
    assert_state_equal(model, before)
    assert isinstance(a, ForgetResult) and not a.model.training
    assert a.info["method"] == "fisher" and a.info["alpha"] == 1e-6 and a.info["seed"] == 7
    zero = fisher_forget(model, retain, alpha=0.0, seed=1)
    assert torch.equal(flat(zero.model), flat(model))


def test_fisher_on_batchnorm_cnn():
    model = make_cnn()
    X, Y = make_data("cnn", 16)
    before = state_copy(model)
    res = fisher_forget(model, (X, Y), alpha=1e-6, seed=0)
    assert_state_equal(model, before)
    assert torch.isfinite(flat(res.model)).all()
    # buffers (BatchNorm statistics) are untouched by the noise
    for (k, b0), b1 in zip(model.named_buffers(), res.model.buffers()):
        assert torch.equal(b0, b1), k


def test_add_fisher_noise_is_scrubs_noise(mlp_data):
    """NTK + noise computed in two steps equals scrub(noise=α): same variance, same draws."""
    model, retain, forget = mlp_data
    init = make_mlp(seed=5)
    kw = dict(init=init, solver="dense", ridge=1e-3, seed=11)
    noisy = scrub(model, retain, forget, noise=1e-6, **kw).model
    plain = scrub(model, retain, forget, **kw).model
    two_step, _, _ = add_fisher_noise(plain, retain, 1e-6, seed=11)
    assert torch.equal(flat(noisy), flat(two_step))


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"alpha": "big"}, TypeError, "alpha"),
        ({"seed": "7"}, TypeError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"head_clip": 3.0}, TypeError, "head_clip"),
        ({"noise_config": {"reduction": "max"}}, ValueError, "reduction"),
        ({"noise_config": {"batch_size": 0}}, ValueError, "batch_size"),
        ({"noise_config": {"clamp": 10.0}}, TypeError, "noise_config"),
    ],
)
def test_fisher_bad_arguments(mlp_data, kwargs, exc, word):
    model, retain, _ = mlp_data
    with pytest.raises(exc, match=word):
        if word in ("reduction", "batch_size"):  # a bad field of the typed config, named
            fisher_forget(model, retain, noise_config=NoiseConfig(**kwargs["noise_config"]))
        else:
            fisher_forget(model, retain, **kwargs)


def test_fisher_bad_data_and_model(mlp_data):
    model, retain, _ = mlp_data
    X, Y = retain
    with pytest.raises(ValueError, match="retain"):
        fisher_forget(model, (X[:0], Y[:0]))
    with pytest.raises(ValueError, match="retain"):
        fisher_forget(model, None)
    with pytest.raises(TypeError, match="model"):
        fisher_forget("not a model", retain)
    training = copy.deepcopy(make_cnn()).train()
    with pytest.raises(ValueError, match="model"):
        fisher_forget(training, make_data("cnn", 8))
    assert "reduction" in FISHER_OPTIONS


# --------------------------------------------------------------------------- Fine-tune
def test_finetune_trains_on_retain_only_and_keeps_inputs(mlp_data):
    model, retain, forget = mlp_data
    init = make_mlp(seed=5)
    before, init_before = state_copy(model), state_copy(init)
    X, Y = retain
    X0, Y0 = X.clone(), Y.clone()
    res = finetune(model, retain, ExplodingDataset(), init=init, epochs=3, lr=0.05, seed=0)
    assert_state_equal(model, before)
    assert_state_equal(init, init_before)
    assert torch.equal(X, X0) and torch.equal(Y, Y0)
    assert not res.model.training
    assert not torch.equal(flat(res.model), flat(model))
    assert res.info["epochs_run"] == 3 and len(res.info["log"]["train_error"]) == 3
    assert torch.allclose(res.shift, flat(res.model) - flat(model))
    # the same run by hand: w(D) trained on D_r with the penalty toward init
    ref, _ = train(
        model, retain, epochs=3, lr=0.05, weight_decay=0.1, anchor=init, seed=0, batch_size=128
    )
    assert torch.equal(flat(ref), flat(res.model))
    # seeds: same → identical, epochs=0 → unchanged copy
    again = finetune(model, retain, init=init, epochs=3, lr=0.05, seed=0)
    assert torch.equal(flat(again.model), flat(res.model))
    none = finetune(model, retain, init=init, epochs=0, seed=0)
    assert torch.equal(flat(none.model), flat(model))


def test_finetune_weight_decay_anchor(mlp_data):
    model, retain, _ = mlp_data
    init = make_mlp(seed=5)
    toward_init = finetune(model, retain, init=init, epochs=2, lr=0.05, weight_decay=1.0)
    toward_zero = finetune(model, retain, epochs=2, lr=0.05, weight_decay=1.0)
    assert toward_init.info["anchor"].startswith("init")
    assert toward_zero.info["anchor"] == "zeros"
    assert not torch.equal(flat(toward_init.model), flat(toward_zero.model))


# --------------------------------------------------------------------------- Retrain
def test_retrain_starts_from_init_and_never_reads_forget(mlp_data):
    model, retain, _ = mlp_data
    init = make_mlp(seed=5)
    before = state_copy(model)
    # zero epochs, no zero-error rule: the result is θ0 itself
    start = retrain(model, retain, ExplodingDataset(), init=init, epochs=0, until_zero_error=False)
    assert torch.equal(flat(start.model), flat(init))
    res = retrain(model, retain, ExplodingDataset(), init=init, epochs=4, lr=0.05, seed=1)
    assert_state_equal(model, before)
    # identical to training θ0 on D_r by hand: D_f plays no part
    ref, log = train(
        init,
        retain,
        epochs=4,
        lr=0.05,
        weight_decay=0.1,
        anchor=init,
        seed=1,
        until_zero_error=True,
        batch_size=128,
    )
    assert torch.equal(flat(ref), flat(res.model))
    assert res.info["epochs_run"] == log.epochs
    assert res.info["reached_zero_error"] == log.reached_zero_error
    assert res.info["start"].startswith("init")


def test_retrain_with_batchnorm_keeps_init_buffers():
    init = make_cnn(seed=3)
    model = make_cnn(seed=4)  # same architecture, other weights and statistics
    X, Y = make_data("cnn", 12)
    res = retrain(model, (X, Y), init=init, epochs=2, until_zero_error=False, seed=0)
    # BatchNorm frozen: running statistics are those of θ0, not of the model passed in
    for (k, b0), b1 in zip(init.named_buffers(), res.model.buffers()):
        assert torch.equal(b0, b1), k


@pytest.mark.parametrize("func", [finetune, retrain])
@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"epochs": -1}, ValueError, "epochs"),
        ({"epochs": 1.5}, TypeError, "epochs"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"lr": "fast"}, TypeError, "lr"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"seed": "0"}, TypeError, "seed"),
        ({"optimizer": "adam"}, TypeError, "optimizer"),
        ({"schedule": "wiggly"}, ValueError, "schedule"),
    ],
)
def test_training_baselines_bad_arguments(mlp_data, func, kwargs, exc, word):
    model, retain, _ = mlp_data
    with pytest.raises(exc, match=word):
        func(model, retain, init=make_mlp(seed=5), **kwargs)


@pytest.mark.parametrize("func", [finetune, retrain])
def test_training_baselines_bad_data(mlp_data, func):
    model, retain, _ = mlp_data
    X, Y = retain
    with pytest.raises(ValueError, match="retain"):
        func(model, (X[:0], Y[:0]), init=make_mlp(seed=5), epochs=1)
    with pytest.raises(TypeError, match="model"):
        func(object(), retain, init=make_mlp(seed=5), epochs=1)
    other = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match="init"):
        func(model, retain, init=other, epochs=1)


def test_retrain_needs_init(mlp_data):
    model, retain, _ = mlp_data
    with pytest.raises(ValueError, match="init"):
        retrain(model, retain, init=None)
