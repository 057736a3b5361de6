"""ntkscrub.prefix: the frozen-prefix split (nn.Sequential and torch.fx) and scrub's cached rows."""

from __future__ import annotations

import copy

import pytest
import torch
from model_zoo import make_mlp, rel
from test_resnet_e2e import small_resnet
from torch import nn

from ntkscrub.config import ProductConfig
from ntkscrub.prefix import split_frozen_prefix
from ntkscrub.scrub import scrub


def names(model: nn.Module, prefix: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(prefix)]


def resnet_pair() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """θ0 and a perturbed w(D) of the small torchvision ResNet (float64, eval mode), 14 images."""
    init = small_resnet(seed=0).double()
    model = copy.deepcopy(init)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    X = torch.randn(14, 3, 8, 8, generator=g, dtype=torch.float64)
    return init, model, X, torch.randint(0, 5, (14,), generator=g)


@pytest.mark.parametrize(
    ("selected", "at"), [("fc.", "flatten"), ("layer4.", "layer3_0_relu_1"), ("layer3.", None)]
)
def test_fx_split_reproduces_the_model_and_keeps_the_selected_names(selected, at):
    _, model, X, _ = resnet_pair()
    chosen = [n for n, _ in model.named_parameters() if n.startswith(selected) or n[:3] == "fc."]
    before = copy.deepcopy(model.state_dict())
    split, why = split_frozen_prefix(model, chosen, X)
    assert split is not None and split.how == "fx", why
    assert at is None or split.at == at
    assert torch.equal(split.suffix(split.prefix(X)), model(X))
    in_suffix = [n for n, _ in split.suffix.named_parameters()]
    assert [n for n in in_suffix if n in chosen] == chosen  # all of them, in order
    if selected != "layer3.":
        assert in_suffix == chosen  # layer3 + fc: the frozen layer4 lies in the suffix too
    assert all(n not in chosen for n, _ in split.prefix.named_parameters())
    assert split.suffix.get_parameter(chosen[0]) is model.get_parameter(chosen[0])  # shared
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training and not any(m.training for m in model.modules())


def test_no_split_says_why():
    _, model, X, _ = resnet_pair()
    split, why = split_frozen_prefix(model, names(model, "conv1."), X)
    assert split is None and "the input itself" in why  # the stem is selected: nothing frozen
    # a BatchNorm inside a residual block: the block's input and the branch are both live
    split, why = split_frozen_prefix(model, names(model, "layer2.0.bn2."), X)
    assert split is None and "2 values cross the split" in why

    class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h if h.sum() > 0 else -h)

    split, why = split_frozen_prefix(Branchy().eval(), ["b.weight", "b.bias"], torch.randn(3, 4))
    assert split is None and "torch.fx cannot trace" in why


def test_sequential_split():
    model = make_mlp(seed=0).double().eval()  # Linear, Tanh, Linear
    split, why = split_frozen_prefix(model, ["2.weight", "2.bias"], torch.randn(5, 6).double())
    assert split is not None and split.how == "sequential" and split.at == "1", why
    split, why = split_frozen_prefix(model, ["0.bias"], torch.randn(5, 6).double())
    assert split is None and "first module" in why


@pytest.mark.parametrize("solver", ["cg", "dense"])
@pytest.mark.parametrize("selected", ["fc.", "layer4."])
def test_scrub_with_cached_prefix_equals_streaming(solver, selected):
    """The cached rows give the streamed shift (float64, to the solve's tolerance): the split is
    exact, and the Jacobians see the same function of the same parameters."""
    init, model, X, Y = resnet_pair()
    kw = dict(
        init=init, loss="ce", linearize_at="trained", weight_decay=0.05, solver=solver, tol=1e-12
    )
    kw["params"] = rf"^({selected.rstrip('.')}|fc)\."
    retain, forget = (X[:11], Y[:11]), (X[11:], Y[11:])
    cached = scrub(model, retain, forget, **kw)
    streamed = scrub(model, retain, forget, products=ProductConfig(prefix_cache=False), **kw)
    info = cached.info["prefix_cache"]
    assert info["cached"] and info["how"] == "fx" and info["bytes"] > 0
    assert info["shape"]["retain"][0] == 11 and info["shape"]["forget"][0] == 3
    assert streamed.info["prefix_cache"] == {
        "cached": False,
        "reason": "ProductConfig.prefix_cache is off",
    }
    assert rel(cached.shift, streamed.shift) <= 1e-8
    p = sum(
        model.get_parameter(n).numel() for n in set(names(model, selected) + names(model, "fc."))
    )
    assert cached.info["p"] == streamed.info["p"] == p == cached.shift.numel()


def test_prefix_over_budget_streams_and_says_so():
    init, model, X, Y = resnet_pair()
    res = scrub(
        model,
        (X[:11], Y[:11]),
        (X[11:], Y[11:]),
        init=init,
        ridge=0.5,
        params=r"^fc\.",
        solver="dense",
        products=ProductConfig(cache_bytes=16),
    )
    info = res.info["prefix_cache"]
    assert not info["cached"] and "over the" in info["reason"]
    full = scrub(model, (X[:11], Y[:11]), (X[11:], Y[11:]), init=init, ridge=0.5, solver="dense")
    assert full.info["prefix_cache"]["reason"] == "every parameter is linearised"
    with pytest.raises(TypeError, match="prefix_cache"):
        ProductConfig(prefix_cache=1)


def test_blocks_inside_features_fall_back_to_fx():
    """All-CNN (features → classifier) with its last block linearised: the top-level split finds
    nothing to freeze (the block is inside `features`), the fx split does; a scrub on the cached
    rows equals the streamed one."""
    from ntkscrub.recipes.models import AllCNN

    torch.manual_seed(0)
    init = AllCNN(num_classes=3, width=0.1).double().eval()
    model = copy.deepcopy(init)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    X, Y = torch.randn(12, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (12,))
    selected = [n for n, _ in model.named_parameters() if n.startswith(("features.9.", "class"))]
    split, why = split_frozen_prefix(model, selected, X)
    assert split is not None and split.how == "fx" and split.at == "features_8_2", why
    kw = dict(init=init, ridge=0.3, params=selected, solver="cg", tol=1e-12)
    cached = scrub(model, (X[:9], Y[:9]), (X[9:], Y[9:]), **kw)
    streamed = scrub(
        model, (X[:9], Y[:9]), (X[9:], Y[9:]), products=ProductConfig(prefix_cache=False), **kw
    )
    assert cached.info["prefix_cache"]["cached"]
    assert rel(cached.shift, streamed.shift) <= 1e-8


def test_cached_prefix_budgets_passes_against_the_whole_networks_training_step():
    """The suffix's pass plan takes 2× the whole network's training step (measured on one batch)
    as its budget, not 2× the suffix's own, which is a fraction of it."""
    init, model, X, Y = resnet_pair()
    res = scrub(
        model, (X[:11], Y[:11]), (X[11:], Y[11:]), init=init, ridge=0.5, params=r"^fc\.",
        solver="cg",
    )  # fmt: skip
    prefix, plan = res.info["prefix_cache"], res.info["passes"]["retain"]
    assert prefix["cached"] and prefix["train_step_bytes"] > plan["train_step"] > 0
    assert plan["budget"] == 2 * prefix["train_step_bytes"]
