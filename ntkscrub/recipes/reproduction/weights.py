"""Flat weight vectors and Fisher-noise draws for the reproduction's readouts.

Fisher forgetting itself is :func:`ntkscrub.baselines.fisher_forget`; what stays here is what the
noise *sweeps* need: the variance at α = 1 (linear in α, so one Fisher pass serves every α) and a
draw at any scale.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ntkscrub.noise import diagonal_fisher, fisher_noise_variance
from ntkscrub.params import ParameterSpace

__all__ = ["flat_params", "load_flat", "add_noise", "fisher_variance"]


def flat_params(model: nn.Module) -> Tensor:
    """All parameters of ``model`` as one float32 CPU vector (``named_parameters`` order)."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


def load_flat(model: nn.Module, vec: Tensor) -> nn.Module:
    """A copy of ``model`` (eval mode) whose parameters are ``vec`` (buffers kept)."""
    out = copy.deepcopy(model)
    ParameterSpace(out).load_into(out, vec.to(next(out.parameters()).device))
    return out.eval()


def fisher_variance(model: nn.Module, retain: Any, num_classes: int) -> dict[str, Tensor]:
    """Per-parameter variance ``clamp(1/(F + 1e-8))`` at α = 1 with the reference conventions
    (:func:`ntkscrub.noise.fisher_noise_variance`); ``F`` is the diagonal Fisher of ``model`` on
    ``retain`` (mean over samples, exact expectation over classes)."""
    fisher = diagonal_fisher(model, retain, reduction="mean")
    return fisher_noise_variance(fisher, 1.0, num_classes)


def add_noise(
    model: nn.Module, variance: Mapping[str, Tensor], scale: float, seed: int
) -> nn.Module:
    """A copy of ``model`` with ``w + sqrt(scale·v) ⊙ ε``, ε ~ N(0, I) from ``seed`` (CPU RNG,
    tensor by tensor in ``variance`` order, as :func:`ntkscrub.noise.add_fisher_noise` draws)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(int(seed))
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, v in variance.items():
            eps = torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)
            params[name].add_((scale * v).sqrt() * eps)
    return out.eval()
