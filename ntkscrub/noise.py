"""Eq. 11: Gaussian noise shaped by the diagonal Fisher information, S(w) = h(w) + n.

``n ~ N(0, α F⁻¹)`` with F the diagonal Fisher of the predictive distribution on D_r, under the
reference code's conventions (clamps, averaging over input dimensions, ×10 for the head and for
1-D tensors). Used by :func:`ntkscrub.scrub.scrub` (``noise=α``) and by the Fisher-forgetting
baseline, which share :func:`add_fisher_noise` so that one seed gives one draw everywhere.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ntkscrub._validation import check_logits, check_model, check_number, check_seed
from ntkscrub.batches import as_batches
from ntkscrub.config import NoiseConfig
from ntkscrub.operators.ggn import ggn_diagonal
from ntkscrub.operators.jacobian import Jacobian
from ntkscrub.params import ParameterSpace

__all__ = ["FISHER_OPTIONS", "add_fisher_noise", "diagonal_fisher", "fisher_noise_variance"]


#: Keyword options of :func:`fisher_forget` passed on to :func:`fisher_noise_variance` (the
#: clamps) plus ``reduction`` of :func:`diagonal_fisher`.
FISHER_OPTIONS = (
    "eps",
    "clamp",
    "head_clamp",
    "head_scale",
    "vector_scale",
    "average_inputs",
    "reduction",
)


def diagonal_fisher(
    model: nn.Module,
    data: Any,
    *,
    params: Any = None,
    batch_size: int = 64,
    reduction: str = "mean",
) -> dict[str, Tensor]:
    """Diagonal Fisher of the predictive distribution on ``data``, per linearised tensor.

    ``F_ii = Σ_x E_{y~p(y|x)} (∂ log p(y|x)/∂θ_i)²`` — the exact expectation over classes, as the
    reference code; ``reduction="mean"`` divides by |data| (the reference convention),
    ``"sum"`` does not.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    space = ParameterSpace(model, params)
    jac = Jacobian(space, data, batch_size=batch_size, name="data")
    probs = torch.softmax(jac.outputs(), dim=1)
    diag = ggn_diagonal(jac, probs)
    if reduction == "mean":
        diag = diag / jac.n
    return space.unflatten(diag)


def fisher_noise_variance(
    fisher: Mapping[str, Tensor],
    alpha: float,
    num_classes: int,
    *,
    eps: float = 1e-8,
    clamp: float = 1e3,
    head_clamp: float = 1e2,
    head_scale: float = 10.0,
    vector_scale: float = 10.0,
    average_inputs: bool = True,
) -> dict[str, Tensor]:
    """Per-parameter noise variance ``α·(F + eps)⁻¹`` with the reference code's conventions.

    Documented defaults (REFERENCE.md §2): ``1/(F + 1e-8)`` clamped at ``clamp`` = 1e3 (at
    ``head_clamp`` = 1e2 for tensors whose first dimension is ``num_classes`` — the head), times α,
    averaged over the input dimension (dim 1) of each ≥2-D tensor, then ×``head_scale`` for the
    head and ×``vector_scale`` for other 1-D tensors (BatchNorm affine).
    """
    if not (alpha >= 0.0 and math.isfinite(alpha)):
        raise ValueError(f"noise: must be a finite number ≥ 0, got {alpha}")
    out = {}
    for n, F in fisher.items():
        is_head = F.dim() >= 1 and F.shape[0] == num_classes
        v = (1.0 / (F + eps)).clamp(max=head_clamp if is_head else clamp) * alpha
        if average_inputs and F.dim() > 1:
            v = v.mean(dim=1, keepdim=True).expand_as(F).clone()
        if is_head:
            v = v * head_scale
        elif F.dim() == 1:
            v = v * vector_scale
        out[n] = v
    return out


def add_fisher_noise(
    model: nn.Module,
    data: Any,
    alpha: float,
    *,
    seed: int | None = None,
    params: Any = None,
    noise_config: NoiseConfig | None = None,
) -> tuple[nn.Module, Tensor, dict[str, Any]]:
    """A copy of ``model`` with ``n ~ N(0, diag(v))`` added, ``v`` = Fisher noise variance on data.

    ``v = fisher_noise_variance(diagonal_fisher(model, data), alpha, c, **clamps)``; the noise
    ``√v ⊙ ε`` is drawn tensor by tensor in ``named_parameters()`` order from a CPU
    ``torch.Generator`` seeded with ``seed`` (fresh entropy when ``None``) — the same draws
    :func:`ntkscrub.scrub.scrub` makes for its ``noise`` option, so one seed gives one result on
    every device.

    Returns:
        ``(noisy_copy, noise (p,), info)``; ``noise`` is flat over the selected parameters.
    """
    check_model(model)
    alpha = check_number(alpha, "alpha")
    seed = check_seed(seed)
    noise_config = NoiseConfig() if noise_config is None else noise_config
    if not isinstance(noise_config, NoiseConfig):
        raise TypeError(f"noise_config: expected a NoiseConfig, got {type(noise_config).__name__}")
    fopts = noise_config.fisher_options()
    reduction = fopts.pop("reduction")
    batch_size = noise_config.batch_size
    space = ParameterSpace(model, params)
    # The number of logits decides which tensors count as the head (first dimension = c).
    x0, _ = as_batches(data, name="retain", batch_size=1).first()
    p0 = next(iter(model.parameters()))
    with torch.no_grad():
        c = int(check_logits(model(x0.to(device=p0.device, dtype=p0.dtype))).shape[1])
    fisher = diagonal_fisher(
        model, data, params=space.names, batch_size=batch_size, reduction=reduction
    )
    var = fisher_noise_variance(fisher, alpha, c, **fopts)
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    out = copy.deepcopy(model)
    pdict = dict(out.named_parameters())
    pieces = []
    with torch.no_grad():
        for n, v in var.items():
            eps = torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)
            noise = v.sqrt() * eps
            pdict[n].add_(noise)
            pieces.append(noise.reshape(-1))
    out.eval()
    flat = torch.cat(pieces) if pieces else torch.zeros(0)
    fisher_flat = torch.cat([f.reshape(-1) for f in fisher.values()])
    var_flat = torch.cat([v.reshape(-1) for v in var.values()])
    info = {
        "alpha": alpha,
        "seed": seed,
        "num_classes": c,
        "fisher_reduction": reduction,
        "fisher_options": {k: v for k, v in fopts.items()},
        "fisher_mean": float(fisher_flat.mean()),
        "fisher_min": float(fisher_flat.min()),
        "variance_mean": float(var_flat.mean()),
        "variance_max": float(var_flat.max()),
        "noise_norm": float(flat.norm()),
        "p": int(flat.numel()),
    }
    return out, flat, info
