"""Network architectures used in the experiments, and small models for tests and the demo.

* :class:`AllCNN` — the All-CNN of the paper's code (BatchNorm before every ReLU, no conv biases),
  1,619,045 parameters for width 1 and 5 classes.
* :class:`PreActResNet18` — the pre-activation ResNet-18 the reference code actually runs, at any
  width; width 0.4 gives stages 25/51/102/204 and 1,787,741 parameters for 5 classes.
* :class:`MLP` and :class:`SmallCNN` — small models for tests and the embedded digits demo
  (8×8 inputs), which also run on 32×32 images.

Every model exposes its output layer as the attribute ``classifier`` (an ``nn.Linear``), which
:func:`reset_head` re-initialises for fine-tuning. No module uses in-place activations, so
``torch.func`` transforms (``vmap``, ``jvp``, ``functional_call``) apply to all of them. Pooling
is global (adaptive), so the convolutional models accept any input size ≥ 8×8.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "AllCNN",
    "PreActResNet18",
    "PreActBlock",
    "MLP",
    "SmallCNN",
    "MODELS",
    "build_model",
    "reset_head",
    "count_parameters",
]


def _check_positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_width(width: Any, name: str = "width") -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"{name} must be a positive number, got {width!r}")
    if not math.isfinite(width):
        raise ValueError(f"{name} must be finite, got {width!r}")
    return float(width)


def _scaled(base: int, width: float, name: str = "width") -> int:
    """``int(base · width)`` (truncation, as the reference code does), at least 1."""
    n = int(base * width)
    if n < 1:
        raise ValueError(f"{name}={width} leaves no channels in a layer of base width {base}")
    return n


# --------------------------------------------------------------------------------------- All-CNN
class _ConvBNReLU(nn.Sequential):
    """Conv (no bias when followed by BatchNorm, whose shift makes a bias redundant) → BN → ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, batchnorm: bool):
        layers: list[nn.Module] = [
            nn.Conv2d(
                cin,
                cout,
                kernel_size,
                stride=stride,
                padding=(kernel_size - 1) // 2,
                bias=not batchnorm,
            )
        ]
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU())
        super().__init__(*layers)


class AllCNN(nn.Module):
    """All-CNN (Springenberg et al.) as in the paper's code, with BatchNorm before each ReLU.

    Channels ``n1 = int(96·width)``, ``n2 = int(192·width)``; blocks (3×3 unless stated):
    ``in→n1, n1→n1, n1→n2 (stride 2), n2→n2, n2→n2, n2→n2 (stride 2), n2→n2, n2→n2 (1×1)``,
    then global average pooling, flatten and ``classifier = Linear(n2, num_classes)``.
    With ``width=1`` and ``num_classes=5`` this has exactly 1,619,045 parameters.

    Args:
        num_classes: number of logits ``c``.
        width: channel multiplier ``f``.
        in_channels: input channels (3 for CIFAR).
        batchnorm: BatchNorm after each conv (then the convs carry no bias).
        dropout: Dropout(0.5) after each stride-2 block, as the original All-CNN.

    Input ``(B, in_channels, H, W)`` with ``H, W ≥ 4``; output logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
        batchnorm: bool = True,
        dropout: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_int(num_classes, "num_classes")
        _check_positive_int(in_channels, "in_channels")
        width = _check_width(width)
        n1, n2 = _scaled(96, width), _scaled(192, width)
        bn = bool(batchnorm)

        def drop() -> nn.Module:
            return nn.Dropout(0.5) if dropout else nn.Identity()

        self.features = nn.Sequential(
            _ConvBNReLU(in_channels, n1, 3, 1, bn),
            _ConvBNReLU(n1, n1, 3, 1, bn),
            _ConvBNReLU(n1, n2, 3, 2, bn),
            drop(),
            _ConvBNReLU(n2, n2, 3, 1, bn),
            _ConvBNReLU(n2, n2, 3, 1, bn),
            _ConvBNReLU(n2, n2, 3, 2, bn),
            drop(),
            _ConvBNReLU(n2, n2, 3, 1, bn),
            _ConvBNReLU(n2, n2, 1, 1, bn),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(n2, num_classes)
        self.num_classes = num_classes
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C, H, W)`` → logits ``(B, num_classes)``."""
        return self.classifier(self.features(x))


# ---------------------------------------------------------------------------- PreAct ResNet-18
class PreActBlock(nn.Module):
    """Pre-activation basic block: ``BN → ReLU → conv3×3 → BN → ReLU → conv3×3`` + shortcut.

    The 3×3 convs carry biases (as in the reference code); the projection shortcut (a 1×1 conv,
    used when the shape changes) has none and is applied to the pre-activated input.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=True)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + short


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 (CIFAR stem: 3×3 conv, no max-pool) at a width multiplier.

    Stem: ``Conv3×3(in, 64, bias) → BN → ReLU`` (64 channels at every width, as the reference
    code). Four stages of two :class:`PreActBlock` each with ``int(64·k·width)`` channels,
    ``k = 1, 2, 4, 8`` and stride 2 at the start of stages 2–4; then global average pooling and
    ``classifier = Linear(int(512·width), num_classes)``.

    ``width=0.4`` gives stages 25/51/102/204 and exactly 1,787,741 parameters for 5 classes;
    ``width=1`` is the standard model (64/128/256/512, about 11.2M parameters for 10 classes).

    Input ``(B, in_channels, H, W)`` → logits ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        _check_positive_int(num_classes, "num_classes")
        _check_positive_int(in_channels, "in_channels")
        width = _check_width(width)
        stem = 64
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        planes = [_scaled(64 * k, width) for k in (1, 2, 4, 8)]
        layers = []
        cin = stem
        for i, p in enumerate(planes):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(PreActBlock(cin, p, stride), PreActBlock(p, p, 1)))
            cin = p
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        self.num_classes = num_classes
        self.width = width
        self.stages = tuple(planes)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C, H, W)`` → logits ``(B, num_classes)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.classifier(torch.flatten(self.pool(out), 1))


# ------------------------------------------------------------------------------- small models
class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs.

    Args:
        in_features: input size after flattening (64 for 8×8 digits, 3072 for CIFAR).
        hidden: hidden layer sizes (may be empty: then it is a linear classifier).
        num_classes: number of logits.

    Input ``(B, *)`` with ``prod(*) == in_features`` → logits ``(B, num_classes)``.
    """

    def __init__(
        self, in_features: int, hidden: Sequence[int] = (128,), num_classes: int = 10
    ) -> None:
        super().__init__()
        _check_positive_int(in_features, "in_features")
        _check_positive_int(num_classes, "num_classes")
        hidden = tuple(hidden)
        for h in hidden:
            _check_positive_int(h, "hidden")
        layers: list[nn.Module] = [nn.Flatten()]
        cin = in_features
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU()]
            cin = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)
        self.in_features = in_features
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, *)`` → logits ``(B, num_classes)``."""
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """A three-conv network for tests and the digits demo (8×8) that also runs on 32×32.

    ``conv3×3(in→w) → conv3×3(w→2w, stride 2) → conv3×3(2w→2w)``, each followed by BatchNorm
    (optional) and ReLU, then global average pooling and ``classifier = Linear(2w, c)``.

    Input ``(B, in_channels, H, W)`` → logits ``(B, num_classes)``.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 8, batchnorm: bool = True
    ) -> None:
        super().__init__()
        _check_positive_int(in_channels, "in_channels")
        _check_positive_int(num_classes, "num_classes")
        _check_positive_int(width, "width")
        bn = bool(batchnorm)
        self.features = nn.Sequential(
            _ConvBNReLU(in_channels, width, 3, 1, bn),
            _ConvBNReLU(width, 2 * width, 3, 2, bn),
            _ConvBNReLU(2 * width, 2 * width, 3, 1, bn),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C, H, W)`` → logits ``(B, num_classes)``."""
        return self.classifier(self.features(x))


# ------------------------------------------------------------------------------------ registry
def _make_allcnn(num_classes: int, width: float, **kw: Any) -> nn.Module:
    return AllCNN(num_classes=num_classes, width=width, **kw)


def _make_resnet18(num_classes: int, width: float, **kw: Any) -> nn.Module:
    return PreActResNet18(num_classes=num_classes, width=width, **kw)


def _make_mlp(num_classes: int, width: float, **kw: Any) -> nn.Module:
    if "in_features" not in kw:
        raise ValueError("in_features: build_model('mlp', ...) needs in_features=<int>")
    hidden = kw.pop("hidden", (128,))
    # width scales the hidden sizes, so 'width' means "capacity" for every model
    hidden = tuple(_scaled(int(h), _check_width(width)) for h in hidden)
    return MLP(hidden=hidden, num_classes=num_classes, **kw)


def _make_smallcnn(num_classes: int, width: float, **kw: Any) -> nn.Module:
    channels = kw.pop("channels", None)
    if channels is None:
        channels = _scaled(8, _check_width(width))
    return SmallCNN(num_classes=num_classes, width=channels, **kw)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "allcnn": _make_allcnn,
    "resnet18": _make_resnet18,
    "mlp": _make_mlp,
    "smallcnn": _make_smallcnn,
}


def build_model(name: str, num_classes: int, width: float = 1.0, **kw: Any) -> nn.Module:
    """Build a model by name.

    Args:
        name: ``'allcnn'``, ``'resnet18'`` (pre-activation), ``'mlp'`` or ``'smallcnn'``
            (case-insensitive).
        num_classes: number of logits.
        width: capacity multiplier: channel factor for allcnn/resnet18; ``channels = int(8·width)``
            for smallcnn (or pass ``channels=``); hidden sizes × width for mlp.
        **kw: passed to the constructor (``in_channels``, ``batchnorm``, ``dropout``, ``hidden``,
            ``in_features`` — required for mlp). ``seed=<int>`` initialises the weights from that
            seed without changing the global RNG state.

    Raises:
        ValueError: unknown ``name`` or invalid sizes.
    """
    if not isinstance(name, str) or name.lower() not in MODELS:
        raise ValueError(f"name: unknown model {name!r}; choose one of {sorted(MODELS)}")
    seed = kw.pop("seed", None)
    make = MODELS[name.lower()]
    if seed is None:
        return make(num_classes, width, **kw)
    # fork_rng restores the global generator afterwards, so a seeded build has no side effect
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return make(num_classes, width, **kw)


def reset_head(model: nn.Module, num_classes: int, seed: int | None = None) -> nn.Module:
    """A deep copy of ``model`` whose ``classifier`` is a fresh ``Linear(in, num_classes)``.

    The new head uses PyTorch's default ``nn.Linear`` initialisation (weight and bias uniform in
    ``±1/sqrt(in_features)``), drawn from a private generator seeded with ``seed`` when given
    (else from the global RNG), on the old head's device and dtype. ``model`` is not modified.
    The copy keeps ``model``'s train/eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    _check_positive_int(num_classes, "num_classes")
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise TypeError(
            "model: reset_head needs a 'classifier' attribute that is an nn.Linear, got "
            f"{type(head).__name__}"
        )
    new = copy.deepcopy(model)
    fan_in = head.in_features
    w = torch.empty(num_classes, fan_in, dtype=head.weight.dtype)
    b = torch.empty(num_classes, dtype=head.weight.dtype)
    bound = 1.0 / math.sqrt(fan_in)
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
    w.uniform_(-bound, bound, generator=gen)
    b.uniform_(-bound, bound, generator=gen)
    # skip_init builds the layer without drawing from the global RNG; we fill it ourselves
    layer = torch.nn.utils.skip_init(
        nn.Linear, fan_in, num_classes, device=head.weight.device, dtype=head.weight.dtype
    )
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    layer.train(head.training)
    new.classifier = layer
    if hasattr(new, "num_classes"):
        new.num_classes = num_classes
    return new


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (all of them, or only those with ``requires_grad``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
