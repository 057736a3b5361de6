"""Argument checks shared by the public API: errors are ValueError/TypeError naming the argument."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def check_model(model: Any, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected an nn.Module, got {type(model).__name__}")
    return model


def check_logits(out: Any, name: str = "model") -> torch.Tensor:
    """``out`` if the model returned a tensor, else a TypeError naming ``name``: torchvision's
    GoogLeNet/Inception in train mode return aux logits, Hugging Face models an output object,
    and torch's own error would be "'tuple' object has no attribute 'dim'"."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"{name}: its forward must return a logits tensor (b, c), got "
            f"{type(out).__name__}; wrap it in a module that returns the logits alone"
        )
    return out


def check_number(x: Any, name: str, *, positive: bool = False) -> float:
    """A finite float ≥ 0 (> 0 with ``positive``), else an error naming ``name``."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ValueError(f"{name}: must be a finite number {'>' if positive else '≥'} 0, got {x}")
    return x


def check_int(x: Any, name: str, minimum: int = 1) -> int:
    """An int ≥ ``minimum`` (bools refused), else an error naming ``name``."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name}: expected an integer, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name}: must be ≥ {minimum}, got {x}")
    return x


def check_seed(seed: Any) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
    return seed


def check_choice(x: Any, name: str, allowed: tuple) -> Any:
    if x not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {x!r}")
    return x


def check_bytes(x: Any, name: str) -> float:
    """A memory size in bytes: a finite number > 0 (e.g. ``4 * 2**30``); a string such as
    ``"4GB"`` is refused with a TypeError naming ``name`` and the expected form."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(
            f"{name}: expected a number of bytes (e.g. 4 * 2**30 for 4 GiB), got "
            f"{type(x).__name__} {x!r}"
        )
    x = float(x)
    if not math.isfinite(x) and x != math.inf or x <= 0:
        raise ValueError(f"{name}: must be a number of bytes > 0 (math.inf: no limit), got {x}")
    return x


def check_not_meta(obj: Any, name: str) -> None:
    """Refuse tensors, modules or state_dicts on the 'meta' device (shapes without data),
    naming the argument — torch's own error ("Tensor.item() cannot be called on meta tensors")
    names neither the argument nor the fix."""
    if isinstance(obj, nn.Module):
        tensors = [t for _, t in obj.named_parameters()] + [t for _, t in obj.named_buffers()]
    elif isinstance(obj, torch.Tensor):
        tensors = [obj]
    elif isinstance(obj, dict):
        tensors = [t for t in obj.values() if isinstance(t, torch.Tensor)]
    else:
        return
    if any(t.device.type == "meta" for t in tensors):
        raise ValueError(
            f"{name}: holds tensors on the 'meta' device (shapes without data); load real "
            f"weights / data first (e.g. module.to_empty(device='cpu') then load_state_dict)"
        )


def check_vector_chunk(vector_chunk: Any, memory_budget: Any, owner: str = "") -> None:
    """Validate ``vector_chunk`` (a positive int, ``"auto"`` or ``None``) and ``memory_budget``."""
    if vector_chunk != "auto" and vector_chunk is not None:
        if isinstance(vector_chunk, bool) or not isinstance(vector_chunk, int) or vector_chunk < 1:
            raise ValueError(
                f"{owner}vector_chunk: expected a positive int, 'auto' or None, "
                f"got {vector_chunk!r}"
            )
    if memory_budget is not None:
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, int):
            raise TypeError(
                f"{owner}memory_budget: expected an int (bytes) or None, got "
                f"{type(memory_budget).__name__}"
            )
        if memory_budget < 1:
            raise ValueError(f"{owner}memory_budget: must be ≥ 1 byte, got {memory_budget}")
