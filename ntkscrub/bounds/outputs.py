"""Information in the outputs of queries (eq. 7): the KL between the two output Gaussians.

For k queries x, ``KL(N(f_h(x), Jₓ Σ Jₓᵀ) ‖ N(f_ref(x), Jₓ' Σ0 Jₓ'ᵀ))`` in the c·k outputs, each
Jacobian at its own model's weights (eq. 5). Jointly over a set (dense c·k Gaussians), and for each
query alone (its c×c diagonal block: Fig. 3's per-query values).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ntkscrub.batches import as_batches
from ntkscrub.bounds.covariance import NoiseCovariance
from ntkscrub.bounds.gaussian import CONVENTION, blockwise_kl, dense_kl

__all__ = ["output_information", "query_sets", "stack_inputs"]


def output_information(
    sigma: NoiseCovariance, sigma0: NoiseCovariance, data: Any, name: str, joint: bool
) -> dict[str, Any]:
    """The black-box KL of one query set (nats).

    ``joint=True``: the joint KL over its c·k outputs (:func:`~ntkscrub.bounds.gaussian_kl`'s
    keys) plus ``per_query`` (each query alone, from the diagonal blocks); ``joint=False``: only
    ``per_query`` (no cross-query covariances are computed). Also ``queries`` (k),
    ``delta_f_norm`` (‖f_h(x) − f_ref(x)‖), ``seconds``, ``convention``.
    """
    t0 = time.perf_counter()
    X = stack_inputs(data, name, sigma)
    f_s, C_s = sigma.output_moments(X, name, joint)  # at h(w_D), its own Jₓ
    f_r, C_r = sigma0.output_moments(X, name, joint)  # at w_Dr, its own Jₓ
    k, c, jitter = X.shape[0], sigma.c, sigma.config.jitter
    out: dict[str, Any] = {}
    if joint:
        # Rows n·c + j, as the covariance.
        pair = (f_s.reshape(-1), C_s, f_r.reshape(-1), C_r)
        out = dense_kl(*pair, jitter, ("scrubbed", "reference"))
        out["stderr"] = 0.0
        C_s, C_r = _diagonal_blocks(C_s, k, c), _diagonal_blocks(C_r, k, c)
    out["per_query"] = blockwise_kl(f_s, C_s, f_r, C_r, jitter)
    out["queries"] = k
    out["delta_f_norm"] = float((f_s - f_r).norm())
    out["seconds"] = time.perf_counter() - t0
    out["convention"] = CONVENTION
    return out


def _diagonal_blocks(C: Tensor, k: int, c: int) -> Tensor:
    """The k diagonal ``(c, c)`` blocks of a ``(c·k, c·k)`` covariance: ``(k, c, c)``."""
    return torch.stack([C[c * i : c * (i + 1), c * i : c * (i + 1)] for i in range(k)])


def stack_inputs(data: Any, name: str, sigma: NoiseCovariance) -> Tensor:
    """All inputs of a query set as one tensor ``(k, *input_shape)`` (query sets are small)."""
    b = as_batches(
        data,
        batch_size=sigma.config.batch_size,
        name=name,
        device=sigma.space.device,
        dtype=sigma.space.dtype,
    )
    return torch.cat([x for x, _ in b])


def query_sets(queries: Any, name: str = "queries") -> dict[str, Any]:
    """One data set (named ``name``) or a mapping name → data set, as a dict."""
    if isinstance(queries, Mapping):
        if not queries:
            raise ValueError(f"{name}: no query sets given")
        for key in queries:
            if not isinstance(key, str):
                raise TypeError(f"{name}: set names must be strings, got {type(key).__name__}")
        return dict(queries)
    return {name: queries}
