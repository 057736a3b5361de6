"""Minimal adapters between the experiments and the library, each with the library change it stands
in for (so the lead can move it into ``ntkscrub`` and delete it here).

* :func:`finetune`, :func:`retrain`, :func:`fisher_forget` — the baselines of §5.3, written with
  :func:`ntkscrub.training.train` and :mod:`ntkscrub.scrub`'s Fisher helpers because
  ``ntkscrub.baselines`` was not in the tree when this was written. *Recommended*: have
  ``baselines.fisher_forget(model, retain, alpha, seed)`` return ``(model, variance)`` so the
  variance can be reused for a noise sweep without a second Fisher pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ntkscrub.params import ParameterSpace
from ntkscrub.scrub import diagonal_fisher, fisher_noise_variance

__all__ = [
    "flat_params",
    "load_flat",
    "add_noise",
    "fisher_variance",
    "fisher_forget",
]


# ------------------------------------------------------------------------- flat weight vectors
def flat_params(model: nn.Module) -> Tensor:
    """All parameters of ``model`` as one float32 CPU vector (``named_parameters`` order)."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


def load_flat(model: nn.Module, vec: Tensor) -> nn.Module:
    """A copy of ``model`` (eval mode) whose parameters are ``vec`` (buffers kept)."""
    import copy

    out = copy.deepcopy(model)
    ParameterSpace(out).load_into(out, vec.to(next(out.parameters()).device))
    return out.eval()


# ------------------------------------------------------------------------- Fisher noise
def fisher_variance(
    model: nn.Module, retain: Any, num_classes: int, alpha: float = 1.0, **fisher_options: Any
) -> dict[str, Tensor]:
    """Per-parameter variance ``α·clamp(1/(F + 1e-8))`` with the reference conventions.

    ``F`` is the diagonal Fisher of ``model`` on ``retain`` (mean over samples, exact expectation
    over classes); the variance is linear in α, so one call at α = 1 serves a whole noise sweep.
    """
    fisher = diagonal_fisher(model, retain, reduction="mean")
    return fisher_noise_variance(fisher, alpha, num_classes, **fisher_options)


def add_noise(
    model: nn.Module, variance: Mapping[str, Tensor], scale: float, seed: int
) -> nn.Module:
    """A copy of ``model`` with ``w + sqrt(scale·v) ⊙ ε``, ε ~ N(0, I) from ``seed`` (CPU RNG)."""
    import copy

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(int(seed))
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, v in variance.items():
            eps = torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)
            params[name].add_((scale * v).sqrt() * eps)
    return out.eval()


def fisher_forget(
    model: nn.Module, retain: Any, num_classes: int, alpha: float, seed: int
) -> tuple[nn.Module, dict[str, Tensor]]:
    """Fisher forgetting (Golatkar et al. 2020a, the reference code's recipe): ``w + √v ⊙ ε``.

    Returns the noisy model and the variance at α = 1 (for noise sweeps).
    """
    var = fisher_variance(model, retain, num_classes, alpha=1.0)
    return add_noise(model, var, alpha, seed), var
