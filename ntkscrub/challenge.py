"""ntkscrub in the form of the NeurIPS 2023 machine-unlearning challenge.

That challenge asked for one function, ``unlearning(net, retain_loader, forget_loader,
val_loader) -> net``: given a trained network and PyTorch ``DataLoader`` s of the retain set D_r,
the forget set D_f and a validation set, return the unlearned network. :func:`unlearning` is that
function, running ntkscrub's one-shot NTK step (:func:`ntkscrub.scrub.scrub`, Prop. 2):

    w_new = w(D) + s·Δ,     Δ = w_lin(D_r) − w_lin(D),   w_lin(S) = J_Sᵀ(Θ_SS + λI)⁻¹ e_S

linearised at the trained weights (``linearize_at="trained"``, cross-entropy residuals
e = onehot − softmax f; J ``(c·|S|, p)``, Θ_SS = J_S J_Sᵀ ``(c·|S|, c·|S|)``) unless ``init``
gives the pre-trained θ0. The step scale ``s`` is chosen on ``val_loader`` only: the longest step
of ``scales`` whose validation error stays within ``max_val_increase`` of the original's. Why
the longest: the linear step is too short for a network trained with cross-entropy (the
reference code rescales it by 5–25×; the demo measures 4–9×), and validation data hold nothing
about D_f, so they cannot say how much was forgotten — only what the step costs in accuracy.

Example (any classifier and loaders that yield ``(inputs, labels)`` batches)::

    from ntkscrub.challenge import unlearning
    new_net = unlearning(net, retain_loader, forget_loader, val_loader, weight_decay=5e-4)

``weight_decay`` should be the one ``net`` was trained with: the ridge of each NTK system is
λ = N·wd (N = its number of samples), the linear model of a mean loss with that weight decay.

The loaders may shuffle: only their ``.dataset`` is read, in order (:func:`sequential`), so the
rows of J match the labels. Nothing passed in is modified; the returned network is a new module
in eval mode (BatchNorm uses its running statistics, as during the scrub).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ntkscrub.config import SolverConfig

__all__ = ["UnlearnResult", "sequential", "unlearn", "unlearning"]

#: Step scales tried on the validation set (s = 1 is the linear step itself).
DEFAULT_SCALES = (1.0, 2.0, 4.0, 8.0)


@dataclass
class UnlearnResult:
    """What :func:`unlearn` returns.

    Attributes:
        model: the unlearned network (a new module, eval mode).
        scale: the chosen step scale ``s``.
        info: the original's and each candidate's validation error, the rule that chose ``s``,
            the scrub's record (CG iterations, matvecs, seconds) and the settings.
    """

    model: nn.Module
    scale: float
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe record (``scale`` and ``info``; the model is not included)."""
        from ntkscrub.io import to_jsonable

        return {"scale": self.scale, "info": to_jsonable(self.info)}


def sequential(loader: DataLoader | Dataset, name: str) -> Dataset:
    """The data set behind ``loader``, to be read in index order (a shuffling loader's order
    changes every epoch; the NTK needs one fixed order). The loader is not touched."""
    if isinstance(loader, DataLoader):
        return loader.dataset
    if isinstance(loader, Dataset):
        return loader
    raise TypeError(f"{name}: expected a torch DataLoader or Dataset, got {type(loader).__name__}")


def _check_scales(scales: Sequence[float]) -> list[float]:
    try:
        out = sorted(float(s) for s in scales)
    except (TypeError, ValueError) as err:
        raise TypeError(f"scales: expected a sequence of numbers ({err})") from err
    if not out or any(not (math.isfinite(s) and s > 0) for s in out):
        raise ValueError(f"scales: expected a non-empty sequence of numbers > 0, got {scales!r}")
    return out


def unlearn(
    net: nn.Module,
    retain_loader: DataLoader | Dataset,
    forget_loader: DataLoader | Dataset,
    val_loader: DataLoader | Dataset,
    *,
    init: nn.Module | Mapping[str, Tensor] | None = None,
    weight_decay: float = 5e-4,
    scales: Sequence[float] = DEFAULT_SCALES,
    max_val_increase: float = 0.02,
    noise: float = 0.0,
    seed: int = 0,
    precond_rank: int | None = 200,
    strict: bool = True,
) -> UnlearnResult:
    """:func:`unlearning` with the record of what it chose.

    Args:
        net: the trained network w(D) (train or eval mode; never modified).
        retain_loader, forget_loader, val_loader: ``DataLoader`` s (or data sets) of
            ``(inputs, integer labels)``; shuffling is fine, only ``.dataset`` is read.
        init: the pre-trained weights θ0 (a module or a state_dict of the same architecture):
            linearise there (the paper) instead of at the trained weights. ``None`` (default):
            linearise at ``net``'s weights (the reference code) — θ0 is then not needed, since
            the step at w(D) does not depend on it without trapezium rescaling.
        weight_decay: the weight decay ``net`` was trained with: ridge λ = N·wd per system.
        scales: step scales tried on ``val_loader`` (default 1, 2, 4, 8).
        max_val_increase: the largest allowed rise of the validation error over the original's
            (a fraction: 0.02 = two points; keep it above 1/|val|, one image: on the demo's 90
            validation images 0.01 is less than one image). The longest step within it is
            chosen; when none is within it, the step with the lowest validation error.
        noise: α ≥ 0: Fisher noise N(0, α F⁻¹) on D_r at the chosen weights (eq. 11).
        seed: seeds the preconditioner's sketch and the noise.
        precond_rank: rank of the Nyström preconditioner of CG (``None``: scrub's default).
        strict: raise when CG does not converge (default; ``False`` records it in ``info``).

    Returns:
        :class:`UnlearnResult`.
    """
    from ntkscrub import readouts
    from ntkscrub.noise import add_fisher_noise
    from ntkscrub.params import ParameterSpace
    from ntkscrub.scrub import scrub

    t0 = time.perf_counter()
    if not isinstance(net, nn.Module):
        raise TypeError(f"net: expected an nn.Module, got {type(net).__name__}")
    retain = sequential(retain_loader, "retain_loader")
    forget = sequential(forget_loader, "forget_loader")
    val = sequential(val_loader, "val_loader")
    grid = _check_scales(scales)
    if isinstance(max_val_increase, bool) or not (
        isinstance(max_val_increase, (int, float)) and 0.0 <= max_val_increase <= 1.0
    ):
        raise ValueError(f"max_val_increase: expected a number in [0, 1], got {max_val_increase!r}")

    model = copy.deepcopy(net).eval()  # eval: BatchNorm uses running statistics, as in training
    res = scrub(
        model,
        retain,
        forget,
        init=model if init is None else init,
        linearize_at="trained" if init is None else "init",
        loss="ce",
        weight_decay=weight_decay,
        solver="cg",
        seed=seed,
        strict=strict,
        solver_config=SolverConfig(precond_rank=precond_rank),
    )
    space = ParameterSpace(model)
    w_d = space.point()
    val_original = readouts.error(model, val)
    candidates = []
    for s in grid:
        cand = space.load_into(copy.deepcopy(model), w_d + s * res.shift.to(w_d))
        candidates.append({"scale": s, "val_error": readouts.error(cand, val), "model": cand})
    ok = [c for c in candidates if c["val_error"] <= val_original + max_val_increase]
    chosen = ok[-1] if ok else min(candidates, key=lambda c: (c["val_error"], c["scale"]))
    out = chosen["model"]
    noise_info: dict[str, Any] = {"alpha": noise}
    if noise > 0:
        out, _, noise_info = add_fisher_noise(out, retain, noise, seed=seed)
    info = {
        "rule": "the longest step with val error <= original's + max_val_increase"
        if ok
        else "no step within max_val_increase: the step with the lowest val error",
        "val_error_original": val_original,
        "candidates": [{k: v for k, v in c.items() if k != "model"} for c in candidates],
        "settings": {
            "linearize_at": "trained" if init is None else "init",
            "loss": "ce",
            "weight_decay": weight_decay,
            "scales": grid,
            "max_val_increase": max_val_increase,
            "noise": noise,
            "seed": seed,
            "precond_rank": precond_rank,
        },
        "scrub_info": res.info,
        "noise": noise_info,
        "seconds": time.perf_counter() - t0,
    }
    return UnlearnResult(model=out.eval(), scale=chosen["scale"], info=info)


def unlearning(
    net: nn.Module,
    retain_loader: DataLoader | Dataset,
    forget_loader: DataLoader | Dataset,
    val_loader: DataLoader | Dataset,
    *,
    init: nn.Module | Mapping[str, Tensor] | None = None,
    weight_decay: float = 5e-4,
    scales: Sequence[float] = DEFAULT_SCALES,
    max_val_increase: float = 0.02,
    noise: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """The NeurIPS 2023 machine-unlearning challenge's entry point, run with ntkscrub's NTK step.

    ``unlearning(net, retain_loader, forget_loader, val_loader) -> net``; the keyword arguments
    are those of :func:`unlearn` (which also returns what it chose). ``net`` is not modified.
    """
    return unlearn(
        net,
        retain_loader,
        forget_loader,
        val_loader,
        init=init,
        weight_decay=weight_decay,
        scales=scales,
        max_val_increase=max_val_increase,
        noise=noise,
        seed=seed,
    ).model
