"""The paper's baselines for forgetting (§5.3): Fisher forgetting, Fine-tune, and Retrain.

All three take the same arguments as :func:`ntkscrub.scrub.scrub` — ``(model, retain, forget,
*, init, ...)`` — never modify their inputs, and return a :class:`ForgetResult` with ``.model``
(a new module in eval mode) and ``.info`` (a JSON-friendly dict: settings, seeds, seconds, the
training curve where there is one).

* :func:`fisher_forget` — "Fisher forgetting" (Golatkar et al., CVPR 2020) as the reference code
  runs it (REFERENCE.md §2): the diagonal Fisher ``F`` on D_r at w(D) (exact expectation over
  ``y ~ p(y|x)``, mean over samples), variance ``v = α·clamp(1/(F + 1e-8))`` with the
  reference clamps (:func:`ntkscrub.scrub.fisher_noise_variance`), and ``w + √v ⊙ ε``.
* :func:`finetune` — "Fine-tune": continue training w(D) on D_r for a few epochs (catastrophic
  forgetting; it does not remove information, the paper shows it barely forgets).
* :func:`retrain` — "Retrain": train from θ0 on D_r only with the fine-tuning recipe (weight
  decay toward θ0, BatchNorm frozen, until zero training error). D_f is never read: this is
  true removal, the gold standard every forgetting method is compared with. (The reference code's
  "retrain" replaces each forget image by a random retain image instead; that is *not* removal.)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ntkscrub._progress import logger, resolve_progress
from ntkscrub._validation import check_int, check_model, check_number, check_seed
from ntkscrub.batches import as_batches
from ntkscrub.config import NoiseConfig
from ntkscrub.noise import FISHER_OPTIONS, add_fisher_noise
from ntkscrub.params import check_eval_mode
from ntkscrub.scrub import load_weights

__all__ = [
    "ForgetResult",
    "fisher_forget",
    "add_fisher_noise",
    "finetune",
    "retrain",
    "FINETUNE_RECIPE",
    "FISHER_OPTIONS",
]

#: The paper's fine-tuning recipe (§5.2): SGD lr 0.01, momentum 0.9, weight decay 0.1 toward the
#: pre-trained weights, batch 128, BatchNorm statistics frozen.
FINETUNE_RECIPE: dict[str, Any] = {
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 0.1,
    "batch_size": 128,
    "schedule": "constant",
    "loss": "ce",
    "freeze_bn": True,
}


@dataclass
class ForgetResult:
    """What a baseline returns (the ``.model`` / ``.info`` part of :class:`~ntkscrub.scrub.
    ScrubResult`).

    Attributes:
        model: a new module in eval mode with the forgetting applied.
        info: settings, seeds, seconds and, for the training baselines, the training log.
        shift: ``w_new − w_old`` over the parameters in ``named_parameters()`` order, flat
            ``(p,)`` (for Fisher forgetting: the noise that was added).
    """

    model: nn.Module
    info: dict = field(default_factory=dict)
    shift: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe record: ``info`` (settings, seeds, seconds, training log), the shift's
        norm and size. The model and the ``(p,)`` shift themselves are not included (save them
        with ``torch.save``)."""
        from ntkscrub.io import to_jsonable

        return {
            "info": to_jsonable(self.info),
            "shift_norm": None if self.shift is None else float(self.shift.norm()),
            "shift_numel": None if self.shift is None else int(self.shift.numel()),
        }


# --------------------------------------------------------------------------- validation


def _check_data(data: Any, name: str) -> int:
    """Raise (naming ``name``) unless ``data`` is a non-empty data set; returns its size."""
    if data is None:
        raise ValueError(f"{name}: no data given")
    return len(as_batches(data, name=name))  # raises ValueError on an empty set


# --------------------------------------------------------------------------- Fisher forgetting
def fisher_forget(
    model: nn.Module,
    retain: Any,
    forget: Any = None,
    *,
    alpha: float = 1e-6,
    seed: int | None = None,
    init: Any = None,
    params: Any = None,
    noise_config: NoiseConfig | None = None,
) -> ForgetResult:
    """Fisher forgetting: ``S(w) = w + √v ⊙ ε``, ``v = α·clamp(1/(F_r + 1e-8))`` (REFERENCE.md §2).

    ``F_r`` is the diagonal Fisher of the predictive distribution on D_r at w(D): the exact
    expectation over ``y ~ p(y|x)``, averaged over the samples. The variance follows the
    reference code's conventions (clamped at 1e3, 1e2 for the head; averaged over the input
    dimension of each weight tensor; ×10 for the head and other 1-D tensors), see
    :func:`~ntkscrub.scrub.fisher_noise_variance`.

    Args:
        model: w(D) in eval mode (never modified).
        retain: D_r (Dataset, DataLoader or ``(X, Y)``); the Fisher is computed on it.
        forget: D_f; not used (the method only needs D_r), accepted for a uniform call style.
        alpha: noise scale α ≥ 0 (the reference uses 1e-6 for Fisher alone).
        seed: seeds the noise; the same seed gives identical weights, ``None`` is unseeded.
        init: unused (uniform call style with :func:`~ntkscrub.scrub.scrub`).
        params: which parameters get noise (default: all trainable ones), see
            :class:`~ntkscrub.params.ParameterSpace`.
        noise_config: the variance recipe (:class:`~ntkscrub.config.NoiseConfig`: ``eps``,
            ``clamp``, ``head_clamp``, ``head_scale``, ``vector_scale``, ``average_inputs``,
            ``reduction`` and the Fisher pass's ``batch_size``; default: the reference code's).

    Returns:
        :class:`ForgetResult`; ``.shift`` is the noise added, ``.info`` the settings and
        summary statistics of the Fisher and the variance.

    Raises:
        TypeError / ValueError naming the argument: a non-module model, an empty or malformed
        retain set, a negative or non-finite ``alpha``, a non-int ``seed``, unknown options.
    """
    t0 = time.perf_counter()
    check_model(model)
    check_eval_mode(model, "model")
    alpha = check_number(alpha, "alpha")
    seed = check_seed(seed)
    n_r = _check_data(retain, "retain")
    out, noise, info = add_fisher_noise(
        model, retain, alpha, seed=seed, params=params, noise_config=noise_config
    )
    info.update({"method": "fisher", "n_retain": n_r, "seconds": time.perf_counter() - t0})
    return ForgetResult(model=out, info=info, shift=noise)


# --------------------------------------------------------------------------- training baselines
def _flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def finetune(
    model: nn.Module,
    retain: Any,
    forget: Any = None,
    *,
    init: nn.Module | Mapping[str, Tensor] | None = None,
    epochs: int = 10,
    lr: float = 0.01,
    weight_decay: float = 0.1,
    seed: int | None = 0,
    momentum: float = FINETUNE_RECIPE["momentum"],
    batch_size: int = FINETUNE_RECIPE["batch_size"],
    schedule: str = FINETUNE_RECIPE["schedule"],
    loss: str = FINETUNE_RECIPE["loss"],
    freeze_bn: bool = FINETUNE_RECIPE["freeze_bn"],
    max_epochs: int | None = None,
    shuffle: bool = True,
    callback: Callable[..., Any] | None = None,
    progress: bool | None = None,
    device: Any = None,
    process_group: Any = None,
) -> ForgetResult:
    """ "Fine-tune": train w(D) on D_r alone for ``epochs`` epochs (the paper's §5.3 baseline).

    The recipe defaults to the paper's fine-tuning (:data:`FINETUNE_RECIPE`): SGD lr 0.01,
    momentum 0.9, batch 128, BatchNorm frozen, cross-entropy plus ``(weight_decay/2)‖w − θ0‖²``
    — the penalty is toward ``init`` when it is given, toward 0 otherwise.

    Args:
        model: w(D) (never modified).
        retain: D_r. forget: D_f — not used, accepted for a uniform call style.
        init: θ0 (module or state_dict), the anchor of the weight decay.
        epochs: epochs on D_r (≥ 0; 0 returns a copy of ``model``).
        lr, weight_decay: learning rate (> 0) and penalty λ (≥ 0).
        seed: seeds the shuffling (and any dropout); ``None`` is unseeded.
        momentum, batch_size, schedule, loss, freeze_bn: the rest of the recipe
            (:data:`FINETUNE_RECIPE`), max_epochs, shuffle, callback, device: as
            :func:`ntkscrub.training.train`.
        progress: a tqdm bar over epochs; ``None`` (default): only when stderr is a terminal.
        process_group: data-parallel training (:mod:`ntkscrub.distributed`; the rule of
            :func:`ntkscrub.scrub`: a group given, or a default group initialised): ``retain``
            is this rank's shard, ``batch_size`` per rank, and each step all-reduces the summed
            gradients with the sample count, i.e. the gradient of the mean over the *global*
            batch (:func:`ntkscrub.training.train` with ``comm``). The model is the same on
            every rank; ``freeze_bn`` must be True.

    Returns:
        :class:`ForgetResult`; ``.info["log"]`` is the :class:`~ntkscrub.training.TrainLog`
        as a dict (per-epoch training error: check the curve).
    """
    return _train_baseline(
        "finetune",
        model,
        model,
        retain,
        init=init,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        until_zero_error=False,
        train_options={
            "momentum": momentum,
            "batch_size": batch_size,
            "schedule": schedule,
            "loss": loss,
            "freeze_bn": freeze_bn,
            "max_epochs": max_epochs,
            "shuffle": shuffle,
            "callback": callback,
            "progress": progress,
            "device": device,
        },
        process_group=process_group,
    )


def retrain(
    model: nn.Module,
    retain: Any,
    forget: Any = None,
    *,
    init: nn.Module | Mapping[str, Tensor],
    epochs: int = 10,
    lr: float = 0.01,
    weight_decay: float = 0.1,
    until_zero_error: bool = True,
    seed: int | None = 0,
    momentum: float = FINETUNE_RECIPE["momentum"],
    batch_size: int = FINETUNE_RECIPE["batch_size"],
    schedule: str = FINETUNE_RECIPE["schedule"],
    loss: str = FINETUNE_RECIPE["loss"],
    freeze_bn: bool = FINETUNE_RECIPE["freeze_bn"],
    max_epochs: int | None = None,
    shuffle: bool = True,
    callback: Callable[..., Any] | None = None,
    progress: bool | None = None,
    device: Any = None,
    process_group: Any = None,
) -> ForgetResult:
    """ "Retrain": train from θ0 on D_r only, with the fine-tuning recipe — true removal of D_f.

    Starts from ``init`` (θ0: its parameters and buffers loaded into a copy of ``model``'s
    architecture), trains on ``retain`` with cross-entropy plus ``(weight_decay/2)‖w − θ0‖²``,
    BatchNorm frozen, for ``epochs`` epochs and then, with ``until_zero_error``, until the
    training error on D_r is 0 (at most ``max_epochs``, default ``max(10·epochs, 100)``). The
    forget set is never read: ``forget`` is accepted only for a uniform call style.

    Args:
        model: any module of the architecture (w(D) or θ0 itself); only its structure is used.
        retain: D_r. forget: ignored.
        init: θ0 (module or state_dict), the starting point and the anchor of the weight decay.
        epochs, lr, weight_decay, until_zero_error, seed, momentum, batch_size, schedule, loss,
            freeze_bn, max_epochs, shuffle, callback, progress, device, process_group: as
            :func:`finetune`.

    Returns:
        :class:`ForgetResult`; ``.info["log"]`` holds the training curve and
        ``.info["reached_zero_error"]`` whether the run fitted D_r.
    """
    if init is None:
        raise ValueError("init: retrain starts from the pre-trained weights θ0; give init=")
    check_model(model)
    start = load_weights(model, init, "init")
    return _train_baseline(
        "retrain",
        model,
        start,
        retain,
        init=init,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        until_zero_error=until_zero_error,
        train_options={
            "momentum": momentum,
            "batch_size": batch_size,
            "schedule": schedule,
            "loss": loss,
            "freeze_bn": freeze_bn,
            "max_epochs": max_epochs,
            "shuffle": shuffle,
            "callback": callback,
            "progress": progress,
            "device": device,
        },
        process_group=process_group,
    )


def _train_baseline(
    method: str,
    model: nn.Module,
    start: nn.Module,
    retain: Any,
    *,
    init: Any,
    epochs: Any,
    lr: Any,
    weight_decay: Any,
    seed: Any,
    until_zero_error: bool,
    train_options: dict[str, Any],
    process_group: Any = None,
) -> ForgetResult:
    from ntkscrub import distributed  # imported late: torch.distributed only when used
    from ntkscrub.training import train  # imported late: training imports are heavier

    t0 = time.perf_counter()
    check_model(model)
    epochs = check_int(epochs, "epochs", 0)
    weight_decay = check_number(weight_decay, "weight_decay")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr: expected a number, got {type(lr).__name__}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: must be a finite number > 0, got {lr}")
    seed = check_seed(seed)
    if not isinstance(until_zero_error, bool):
        raise TypeError(f"until_zero_error: expected a bool, got {type(until_zero_error).__name__}")
    opts = dict(train_options)
    # progress=None (the default) shows train()'s epoch bar only when stderr is a terminal.
    opts["progress"] = resolve_progress(opts.get("progress"))
    comm = distributed.Comm(process_group) if distributed.active(process_group) else None
    n_r = 0
    with comm.guard("checking its retain shard") if comm else contextlib.nullcontext():
        n_r = _check_data(retain, "retain")
    anchor = None
    if init is not None:
        anchor = load_weights(model, init, "init") if not isinstance(init, Mapping) else init
    before = _flat_params(start)
    net, log = train(
        start,
        retain,
        epochs=epochs,
        lr=float(lr),
        weight_decay=weight_decay,
        anchor=anchor,
        seed=seed,
        until_zero_error=until_zero_error,
        comm=comm,
        **opts,
    )
    net.eval()
    if method == "finetune":
        shift = _flat_params(net) - before
    else:  # retrain: the move relative to the model it replaces
        shift = _flat_params(net) - _flat_params(model)
    info = {
        "method": method,
        "start": "w(D)" if method == "finetune" else "init (θ0)",
        "anchor": "init (θ0)" if init is not None else "zeros",
        "n_retain": log.recipe.get("n_samples", n_r),  # every rank's shard when data-parallel
        "epochs_run": log.epochs,
        "reached_zero_error": bool(log.reached_zero_error),
        "final_train_error": log.train_error[-1] if log.train_error else None,
        "recipe": dict(log.recipe),
        "log": log.to_dict(),
        "seconds": time.perf_counter() - t0,
    }
    logger.info(
        "%s: %d epochs on %d retain samples in %.1f s (final train error %s)",
        method,
        log.epochs,
        n_r,
        info["seconds"],
        info["final_train_error"],
    )
    return ForgetResult(model=net, info=info, shift=shift)
