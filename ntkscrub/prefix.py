"""The frozen prefix of a network whose linearised parameters (``params``) are a suffix of it.

When ``params`` selects only the last blocks, the head or their BatchNorm affines, every NTK
product still runs the whole network on every sample, although the part before the first
selected parameter — the *prefix* — is the same function at every product. Splitting
``f = suffix ∘ prefix`` lets :func:`~ntkscrub.scrub.scrub` compute ``H = prefix(X)`` once and run
the Jacobians on ``(H, Y)`` with the suffix alone (issue 14, item 6). The split is exact: no
selected parameter lies in the prefix, so ``J_θ f(x) = J_θ suffix(h)`` at ``h = prefix(x)``.

:func:`split_frozen_prefix` finds the split for

* an ``nn.Sequential`` (and a model made of exactly ``features`` and ``classifier``): at the first
  child that owns a selected parameter;
* else (also for blocks inside those children), any model ``torch.fx`` can trace (torchvision's
  ResNets, VGGs, ...): at the first graph node that uses a selected parameter, when exactly one
  value computed before it is used from there on (the output of the previous residual stage,
  say) — that value is H.

Anything else (an untraceable model, two live values at the split, the first layer selected)
gives ``None`` with the reason, and the caller streams the data through the whole network.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ntkscrub.batches import as_batches
from ntkscrub.operators.forward_cache import default_cache_budget
from ntkscrub.operators.passes import training_step_bytes
from ntkscrub.params import ParameterSpace

__all__ = ["PrefixSplit", "split_frozen_prefix", "prefix_rows", "jacobian_options"]


@dataclass
class PrefixSplit:
    """``model(x) == suffix(prefix(x))``; ``suffix`` holds every selected parameter under its
    name in ``model`` (``suffix.get_parameter(name)`` is the same tensor).

    Attributes:
        prefix: ``x ↦ h``, frozen (no selected parameter).
        suffix: ``h ↦ logits``.
        at: where the split was made (a child's name or a graph node's).
        how: ``"sequential"`` or ``"fx"``.
    """

    prefix: nn.Module
    suffix: nn.Module
    at: str
    how: str


def split_frozen_prefix(
    model: nn.Module, names: Sequence[str], example: Tensor
) -> tuple[PrefixSplit | None, str]:
    """Split ``model`` before its first parameter in ``names``; ``(split, reason)``.

    Args:
        model: the network (eval mode; it is not modified — the halves share its modules).
        names: the selected (linearised) parameter names, as in ``model.named_parameters()``.
        example: a batch of inputs ``(b, *input_shape)``; the split is kept only if
            ``suffix(prefix(example))`` equals ``model(example)`` exactly.

    Returns:
        the :class:`PrefixSplit` and ``"split at …"``, or ``None`` and why not.
    """
    chosen = set(names)
    split, reason = _sequential_split(model, chosen)
    if split is None:  # e.g. blocks inside a features → classifier model's `features`
        split, fx_reason = _fx_split(model, chosen)
        reason = fx_reason if reason == "not sequential" else f"{reason}; {fx_reason}"
    if split is None:
        return None, reason
    with torch.no_grad():
        same = torch.equal(split.suffix(split.prefix(example)), model(example))
    if not same:
        return None, f"{split.how} split at {split.at!r} does not reproduce the model's output"
    return split, f"split at {split.at!r} ({split.how})"


def _sequential_split(model: nn.Module, chosen: set[str]) -> tuple[PrefixSplit | None, str]:
    seq = model if isinstance(model, nn.Sequential) else None
    if seq is None and [n for n, _ in model.named_children()] == ["features", "classifier"]:
        if all("." in n for n, _ in model.named_parameters()) and all(
            "." in n for n, _ in model.named_buffers()
        ):  # no tensors of the root module itself: a pure composition (checked on data later)
            seq = nn.Sequential(OrderedDict(features=model.features, classifier=model.classifier))
    if seq is None:
        return None, "not sequential"
    keys = list(seq._modules)
    owners = [
        i
        for i, key in enumerate(keys)
        if any(f"{key}.{n}" in chosen for n, _ in seq[i].named_parameters())
    ]
    if not owners or min(owners) == 0:
        return None, "the first module holds linearised parameters: no frozen prefix"
    k = min(owners)
    return PrefixSplit(seq[:k], seq[k:], keys[k - 1], "sequential"), ""


def _fx_split(model: nn.Module, chosen: set[str]) -> tuple[PrefixSplit | None, str]:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: no split
        return None, f"torch.fx cannot trace the model ({type(err).__name__})"
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}

    def uses_chosen(node: torch.fx.Node) -> bool:
        if node.op == "get_attr":
            return node.target in chosen
        if node.op == "call_module":
            sub = gm.get_submodule(node.target)
            return any(f"{node.target}.{n}" in chosen for n, _ in sub.named_parameters())
        return False

    k = next((i for i, n in enumerate(nodes) if uses_chosen(n)), None)
    if k is None:
        return None, "no linearised parameter is used in the traced graph"
    live = [
        n for n in nodes[:k] if n.op != "get_attr" and any(index[u] >= k for u in n.users)
    ]  # values computed before the split and used after it
    if len(live) != 1 or live[0].op == "placeholder":
        what = "the input itself" if live and live[0].op == "placeholder" else f"{len(live)} values"
        return None, f"{what} cross the split before {nodes[k].name!r}: no single frozen prefix"
    h = live[0]
    pre = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in nodes[: index[h] + 1]:
        env[n] = pre.node_copy(n, lambda a: env[a])
    pre.output(env[h])
    suf = torch.fx.Graph()
    env = {h: suf.placeholder("h")}
    for n in nodes[k:]:
        for a in n.all_input_nodes:  # frozen attributes fetched before the split: fetch again
            if a not in env and a.op == "get_attr":
                env[a] = suf.get_attr(a.target)
        env[n] = suf.node_copy(n, lambda a: env[a])
    prefix, suffix = torch.fx.GraphModule(gm, pre), torch.fx.GraphModule(gm, suf)
    prefix.graph.eliminate_dead_code()
    prefix.recompile()
    prefix.training = suffix.training = False  # the roots only: the submodules are the model's
    return PrefixSplit(prefix, suffix, h.name, "fx"), ""


def prefix_rows(
    space: ParameterSpace,
    data: Mapping[str, Any],
    *,
    batch_size: int,
    budget: int | None = None,
) -> tuple[ParameterSpace, dict[str, Any], dict[str, Any]]:
    """Run the frozen prefix of ``space.model`` once over each data set.

    Args:
        space: the linearised parameters (a suffix of the network, or nothing is cached).
        data: ``{name: data set}`` in any form :func:`~ntkscrub.batches.as_batches` accepts.
        batch_size: samples per prefix batch.
        budget: bytes the activations ``H`` may take (``None``: a quarter of the device's
            available memory, the forward cache's default).

    Returns:
        ``(space, rows, info)``: on a split, the suffix's :class:`ParameterSpace` (the same
        names, in the same order) and ``{name: (H, Y)}`` with ``H`` ``(N, *h_shape)``;
        otherwise ``space`` and ``data`` unchanged. ``info``: ``cached``, ``reason`` and, when
        cached, ``at``, ``how``, ``shape`` per set, ``bytes``, ``seconds`` and
        ``train_step_bytes`` (the whole network's training step on one batch: the yardstick of
        the suffix's pass budget).
    """
    model = space.model
    trainable = [n for n, t in model.named_parameters() if t.requires_grad]
    if set(space.names) >= set(trainable):
        return space, dict(data), {"cached": False, "reason": "every parameter is linearised"}
    kw = {"batch_size": batch_size, "device": space.device, "dtype": space.dtype}
    batches = {name: as_batches(d, name=name, **kw) for name, d in data.items()}
    x0, _ = next(iter(batches.values())).first()
    split, why = split_frozen_prefix(model, space.names, x0[:8])
    if split is None:
        return space, dict(data), {"cached": False, "reason": why}
    suffix_space = ParameterSpace(split.suffix, space.names, check=False)
    if suffix_space.names != space.names:
        return space, dict(data), {"cached": False, "reason": "the suffix's parameters differ"}
    with torch.no_grad():
        h0 = split.prefix(x0[:1])
    need = h0.numel() * h0.element_size() * sum(len(b) for b in batches.values())
    limit = default_cache_budget(space.device) if budget is None else budget
    if need > limit:
        mib = f"{need / 2**20:,.1f} MiB, over the {limit / 2**20:,.1f} MiB budget"
        reason = f"the activations need {mib}"
        return space, dict(data), {"cached": False, "reason": reason}
    t0 = time.perf_counter()
    rows: dict[str, Any] = {}
    with torch.no_grad():
        for name, b in batches.items():
            hs, ys = zip(*[(split.prefix(x), y) for x, y in b])
            if any(y is None for y in ys):
                raise ValueError(f"{name}: labels are required but the data carry none")
            rows[name] = (torch.cat(hs), torch.cat(ys))
    info = {
        "cached": True,
        "reason": why,
        "at": split.at,
        "how": split.how,
        "shape": {name: list(h.shape) for name, (h, _) in rows.items()},
        "bytes": need,
        "seconds": time.perf_counter() - t0,
        # the whole network's training step at this batch size (every trainable parameter)
        "train_step_bytes": training_step_bytes(ParameterSpace(model, check=False), x0),
    }
    return suffix_space, rows, info


def jacobian_options(products: Any, info: Mapping[str, Any] | None) -> dict[str, Any]:
    """``products.jacobian_options()`` (a :class:`~ntkscrub.config.ProductConfig`) for Jacobians
    on the rows :func:`prefix_rows` returned: on a cached prefix the default pass budget is
    twice the whole network's training step (``info["train_step_bytes"]``), not the suffix's."""
    options = products.jacobian_options()
    if info and info.get("cached") and options["memory_budget"] is None:
        options["memory_budget"] = 2 * info["train_step_bytes"]
    return options
