"""Parameter space: which weights are linearised, and the flat vectors that hold them.

Everything matrix-free in ntkscrub works on flat parameter vectors ``θ ∈ R^p``, concatenated in
``model.named_parameters()`` order over the *linearised* parameters (all trainable ones by
default, or a chosen subset such as BatchNorm affine + head). :class:`ParameterSpace` maps
between that flat vector and a dict of named tensors, and gives the functional model
``f(θ, x) -> logits`` through :func:`torch.func.functional_call` with every other parameter and
buffer held fixed. The model passed in is never modified.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["ParameterSpace", "check_eval_mode", "ParamSelector"]

ParamSelector = None | str | Iterable[str] | Callable[[str, nn.Parameter], bool]


def check_eval_mode(model: nn.Module, name: str = "model") -> None:
    """Raise if a module whose output depends on the batch or on chance is in training mode.

    A BatchNorm in training mode normalises with batch statistics, so a per-sample Jacobian is
    undefined; a Dropout in training mode makes f random. Both must be in eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected an nn.Module, got {type(model).__name__}")
    for mod_name, mod in model.named_modules():
        if mod.training and isinstance(
            mod, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
        ):
            kind = type(mod).__name__
            where = mod_name or "<root>"
            raise ValueError(
                f"{name}: module '{where}' ({kind}) is in training mode; per-sample Jacobians "
                f"need frozen statistics and no dropout — call {name}.eval() first"
            )


def _select(model: nn.Module, params: ParamSelector) -> list[str]:
    named = [(n, p) for n, p in model.named_parameters()]
    if params is None:
        chosen = [n for n, p in named if p.requires_grad]
    elif isinstance(params, str):
        rx = re.compile(params)
        chosen = [n for n, _ in named if rx.search(n)]
    elif callable(params):
        chosen = [n for n, p in named if params(n, p)]
    else:
        wanted = list(params)
        if not all(isinstance(w, str) for w in wanted):
            raise TypeError("params: expected parameter names (str)")
        known = {n for n, _ in named}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ValueError(f"params: unknown parameter names {unknown}")
        wanted_set = set(wanted)
        chosen = [n for n, _ in named if n in wanted_set]  # keep named_parameters() order
    if not chosen and params is None and named:
        # A model frozen after training (requires_grad_(False)) is common; say which rule chose.
        raise ValueError(
            f"params: none of the model's {len(named)} parameter tensors requires grad, and "
            "params=None selects those that do; pass params (a regex, names or a predicate), "
            "e.g. params='.*' for all, or call model.requires_grad_(True)"
        )
    if not chosen:
        raise ValueError("params: the selection contains no parameters")
    return chosen


class ParameterSpace:
    """The linearised parameters of a model, as one flat vector of length ``p``.

    Args:
        model: an ``nn.Module`` in eval mode (BatchNorm and Dropout modules must not be
            training). It is only read; its tensors are never written.
        params: which parameters are linearised: ``None`` (all with ``requires_grad``), a regex
            matched against names, an iterable of names, or a predicate ``(name, param) -> bool``.
            Order is always ``model.named_parameters()`` order.
        check: check eval mode and finite parameter values.

    Attributes:
        names, shapes, numels: per linearised tensor. ``p``: total length.
        dtype, device: those of the first linearised parameter (all must agree).
    """

    def __init__(self, model: nn.Module, params: ParamSelector = None, *, check: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if check:
            check_eval_mode(model, "model")
        self.model = model
        self.names: list[str] = _select(model, params)
        pdict = dict(model.named_parameters())
        tensors = [pdict[n] for n in self.names]
        self.shapes: list[torch.Size] = [t.shape for t in tensors]
        self.numels: list[int] = [t.numel() for t in tensors]
        self.p: int = sum(self.numels)
        self.dtype = tensors[0].dtype
        self.device = tensors[0].device
        for n, t in zip(self.names, tensors):
            if t.dtype != self.dtype or t.device != self.device:
                raise ValueError(
                    f"model: parameter '{n}' has dtype {t.dtype} on {t.device}, but "
                    f"'{self.names[0]}' has {self.dtype} on {self.device}; all linearised "
                    "parameters must share one dtype and device"
                )
            if check and not bool(torch.isfinite(t).all()):
                raise ValueError(f"model: parameter '{n}' contains NaN or infinite values")
        # Everything not linearised is held fixed at the model's current values (detached copies,
        # so later changes to the model do not leak into an operator built now).
        chosen = set(self.names)
        self._fixed: dict[str, Tensor] = {
            n: t.detach() for n, t in model.named_parameters() if n not in chosen
        }
        self._fixed.update({n: b.detach() for n, b in model.named_buffers()})

    # ------------------------------------------------------------------ vectors
    def flatten(self, tensors: Mapping[str, Tensor] | nn.Module) -> Tensor:
        """Dict of named tensors (or a module) → flat vector ``(p,)`` (detached)."""
        if isinstance(tensors, nn.Module):
            tensors = dict(tensors.named_parameters())
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"tensors: missing parameters {missing[:5]}")
        parts = []
        for n, shape in zip(self.names, self.shapes):
            t = tensors[n]
            if t.shape != shape:
                raise ValueError(
                    f"tensors: parameter '{n}' has shape {tuple(t.shape)}, expected {tuple(shape)}"
                )
            parts.append(t.detach().reshape(-1).to(dtype=self.dtype, device=self.device))
        return torch.cat(parts)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Flat ``(p,)`` → dict of shapes; ``(p, k)`` → dict of ``(k, *shape)`` (for vmap)."""
        if not isinstance(vec, Tensor):
            raise TypeError(f"vec: expected a tensor, got {type(vec).__name__}")
        if vec.shape[0] != self.p or vec.dim() not in (1, 2):
            raise ValueError(
                f"vec: expected shape ({self.p},) or ({self.p}, k), got {tuple(vec.shape)}"
            )
        out: dict[str, Tensor] = {}
        offset = 0
        for n, shape, k in zip(self.names, self.shapes, self.numels):
            chunk = vec[offset : offset + k]
            if vec.dim() == 1:
                out[n] = chunk.reshape(shape)
            else:
                out[n] = chunk.T.reshape(vec.shape[1], *shape)
            offset += k
        return out

    def flatten_batched(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Dict of ``(k, *shape)`` → ``(p, k)``; the inverse of :meth:`unflatten` on 2-D input."""
        k = next(iter(tensors.values())).shape[0]
        return torch.cat([tensors[n].reshape(k, -1) for n in self.names], dim=1).T

    def point(self, source: nn.Module | Mapping[str, Tensor] | Tensor | None = None) -> Tensor:
        """The flat linearised parameters of ``source`` (default: the model), shape ``(p,)``.

        ``source`` may be a module of the same architecture, a state_dict, or a flat vector.
        """
        if source is None:
            source = self.model
        if isinstance(source, Tensor):
            if source.shape != (self.p,):
                raise ValueError(f"source: expected a flat vector of shape ({self.p},)")
            return source.detach().to(dtype=self.dtype, device=self.device)
        if isinstance(source, nn.Module):
            source = dict(source.named_parameters())
        if not isinstance(source, Mapping):
            raise TypeError(
                f"source: expected a module, a state_dict or a tensor, got {type(source).__name__}"
            )
        return self.flatten(source)

    def split(self, vec: Tensor) -> dict[str, Tensor]:
        """Alias of :meth:`unflatten` for a single vector."""
        return self.unflatten(vec)

    # ------------------------------------------------------------------ the function
    def functional(self) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
        """``f(params, x) -> logits``: ``params`` a dict over :attr:`names`, ``x`` a batch."""
        model, fixed = self.model, self._fixed

        def f(params: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(model, (params, fixed), (x,))

        return f

    def logits(self, theta: Tensor, x: Tensor) -> Tensor:
        """``f_θ(x)`` for a flat ``θ`` ``(p,)`` and ``x`` ``(b, ...)``; returns ``(b, c)``."""
        return self.functional()(self.unflatten(theta), x)

    def load_into(self, module: nn.Module, theta: Tensor) -> nn.Module:
        """Write flat ``θ`` into ``module``'s linearised parameters, in place; returns it.

        Used on *copies* made by ntkscrub, never on a model a user passed in.
        """
        pdict = dict(module.named_parameters())
        with torch.no_grad():
            for n, t in self.unflatten(theta).items():
                pdict[n].copy_(t)
        return module

    def check_compatible(self, other: nn.Module | Mapping[str, Any], name: str = "init") -> None:
        """Raise if ``other`` does not hold the linearised parameters with the same shapes."""
        if isinstance(other, nn.Module):
            other = dict(other.named_parameters())
        if not isinstance(other, Mapping):
            raise TypeError(
                f"{name}: expected a module or a state_dict, got {type(other).__name__}"
            )
        for n, shape in zip(self.names, self.shapes):
            if n not in other:
                raise ValueError(f"{name}: has no parameter '{n}'; is it the same architecture?")
            if tuple(other[n].shape) != tuple(shape):
                raise ValueError(
                    f"{name}: parameter '{n}' has shape {tuple(other[n].shape)}, expected "
                    f"{tuple(shape)}; is it the same architecture?"
                )

    def __repr__(self) -> str:
        return f"ParameterSpace(p={self.p}, tensors={len(self.names)}, dtype={self.dtype})"
