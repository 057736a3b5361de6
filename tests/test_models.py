"""Architectures: parameter counts of the paper's models, shapes, determinism, reset_head."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ntkscrub.recipes.models import (
    MLP,
    AllCNN,
    PreActResNet18,
    SmallCNN,
    build_model,
    count_parameters,
    reset_head,
)


def test_allcnn_parameter_count_matches_reference():
    # REFERENCE.md §2: All-CNN f=1, c=5 has 1,619,045 parameters
    assert count_parameters(AllCNN(num_classes=5, width=1.0)) == 1_619_045


def test_resnet18_width04_matches_reference():
    # REFERENCE.md §2: stages 25/51/102/204, stem 64, biases on 3×3 convs → 1,787,741 (c=5)
    m = PreActResNet18(num_classes=5, width=0.4)
    assert m.stages == (25, 51, 102, 204)
    assert m.conv1.out_channels == 64
    assert count_parameters(m) == 1_787_741
    convs3 = [
        mod for mod in m.modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3)
    ]
    assert all(c.bias is not None for c in convs3)


def test_resnet18_width1_is_standard_size():
    m = PreActResNet18(num_classes=10, width=1.0)
    assert m.stages == (64, 128, 256, 512)
    assert 11.1e6 < count_parameters(m) < 11.3e6


def test_allcnn_width_and_options():
    m = AllCNN(num_classes=3, width=0.5, batchnorm=False, dropout=True)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [48, 48, 96, 96, 96, 96, 96, 96]
    assert all(c.bias is not None for c in convs)  # no BN → convs carry biases
    assert sum(isinstance(mod, nn.Dropout) for mod in m.modules()) == 2
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert isinstance(m.classifier, nn.Linear) and m.classifier.out_features == 3


@pytest.mark.parametrize(
    "model, shape",
    [
        (lambda: AllCNN(num_classes=5, width=0.25), (2, 3, 32, 32)),
        (lambda: AllCNN(num_classes=5, width=0.25, in_channels=1), (2, 1, 8, 8)),
        (lambda: PreActResNet18(num_classes=7, width=0.1), (2, 3, 32, 32)),
        (lambda: PreActResNet18(num_classes=7, width=0.1, in_channels=1), (2, 1, 8, 8)),
        (lambda: SmallCNN(in_channels=1, num_classes=4), (3, 1, 8, 8)),
        (lambda: SmallCNN(in_channels=3, num_classes=4), (3, 3, 32, 32)),
        (lambda: MLP(64, (16, 8), 4), (3, 1, 8, 8)),
    ],
)
def test_forward_shapes(model, shape):
    m = model().eval()
    with torch.no_grad():
        out = m(torch.randn(*shape))
    assert out.shape == (shape[0], m.classifier.out_features)
    assert isinstance(m.classifier, nn.Linear)


def test_eval_mode_is_deterministic_and_per_sample():
    torch.manual_seed(0)
    m = SmallCNN(in_channels=1, num_classes=3).eval()
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        a, b = m(x), m(x)
        single = m(x[2:3])
    assert torch.equal(a, b)
    # eval-mode BatchNorm: a sample's logits do not depend on the rest of the batch
    torch.testing.assert_close(single, a[2:3], rtol=1e-5, atol=1e-6)


def test_models_work_with_torch_func():
    # per-sample gradients through functional_call + vmap: no in-place ops in the models
    torch.manual_seed(0)
    for m in (SmallCNN(1, 3).eval(), PreActResNet18(3, width=0.05, in_channels=1).eval()):
        params = {k: v.detach() for k, v in m.named_parameters()}
        buffers = {k: v.detach() for k, v in m.named_buffers()}

        def f(p, x, m=m, buffers=buffers):
            return functional_call(m, (p, buffers), (x.unsqueeze(0),))[0, 0]

        g = vmap(grad(f), in_dims=(None, 0))(params, torch.randn(4, 1, 8, 8))
        assert g["classifier.weight"].shape == (4, *m.classifier.weight.shape)


def test_build_model_registry_and_seed():
    assert isinstance(build_model("allcnn", 5, width=0.25), AllCNN)
    assert isinstance(build_model("ResNet18", 5, width=0.1), PreActResNet18)
    assert isinstance(build_model("smallcnn", 5), SmallCNN)
    assert build_model("smallcnn", 5, width=2.0).classifier.in_features == 32
    mlp = build_model("mlp", 5, in_features=64, hidden=(20,))
    assert isinstance(mlp, MLP) and mlp.classifier.in_features == 20
    state = torch.get_rng_state()
    a = build_model("smallcnn", 5, seed=3)
    b = build_model("smallcnn", 5, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # seeded build leaves global RNG alone
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_build_model_bad_input():
    with pytest.raises(ValueError, match="name"):
        build_model("vgg", 5)
    with pytest.raises(ValueError, match="in_features"):
        build_model("mlp", 5)
    with pytest.raises(ValueError, match="width"):
        AllCNN(5, width=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        PreActResNet18(num_classes=0)


def test_reset_head_returns_new_model_and_leaves_input():
    torch.manual_seed(0)
    m = SmallCNN(1, 5).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    state = torch.get_rng_state()
    new = reset_head(m, 3, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert new is not m and m.classifier.out_features == 5
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    assert new.classifier.out_features == 3 and new.num_classes == 3
    assert not new.training  # mode kept
    for k, v in new.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(v, before[k]) and v.data_ptr() != m.state_dict()[k].data_ptr()
    bound = 1 / new.classifier.in_features**0.5
    assert new.classifier.weight.abs().max() <= bound
    again = reset_head(m, 3, seed=1)
    assert torch.equal(again.classifier.weight, new.classifier.weight)
    assert not torch.equal(reset_head(m, 3, seed=2).classifier.weight, new.classifier.weight)
    with torch.no_grad():
        assert new(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_reset_head_and_count_bad_input():
    with pytest.raises(TypeError, match="classifier"):
        reset_head(nn.Sequential(nn.Linear(2, 2)), 3)
    with pytest.raises(ValueError, match="num_classes"):
        reset_head(SmallCNN(), 0)
    m = MLP(4, (3,), 2)
    m.features[1].weight.requires_grad_(False)
    assert count_parameters(m) == 4 * 3 + 3 + 3 * 2 + 2
    assert count_parameters(m, trainable_only=True) == 3 + 3 * 2 + 2
