"""Training utilities shared by the baselines and the experiments.

:func:`train` runs SGD with momentum on

    L(w) = mean_i ℓ(f_w(x_i), y_i) + (λ/2)·‖w − w_anchor‖²

where ℓ is cross-entropy (``'ce'``) or ½‖f(x) − onehot(y)‖² (``'mse'``), λ = ``weight_decay``
and ``w_anchor`` is 0 (plain weight decay) or given weights of the same architecture (the paper's
fine-tuning decays toward the pre-trained weights with λ = 0.1). The penalty is applied as the
gradient term λ(w − w_anchor) added before the optimiser step — *not* through SGD's own
``weight_decay``, which always decays toward 0.

Paper recipe (REFERENCE.md §1): pre-training SGD lr 0.1, momentum 0.9, wd 5e-4, 30 epochs, BN in
train mode; fine-tuning lr 0.01, momentum 0.9, λ = 0.1 toward θ0, batch 128, BN frozen, until
zero training error. On a full-width All-CNN the constant-lr fine-tuning was observed to be
unstable (error dips then climbs back) while a decaying lr converges, so every run records its
recipe and per-epoch training error in :class:`TrainLog` — look at the curve.

Data-parallel (``comm=``, a :class:`ntkscrub.distributed.Comm`; what the retrain and fine-tune
baselines run under a process group): each rank holds its shard; a step takes every rank's next
local batch (``batch_size`` per rank; a rank whose shard is used up contributes nothing), sums the
per-sample loss gradients over the ranks with the sample count in one all-reduce and divides —
the gradient of the mean over the *global* batch, so a full-batch (or fixed-order) run equals the
one-process run on the correspondingly ordered concatenation. The per-epoch error and loss are
global. Ranks shuffle their shards with ``seed + rank``.

Also: checkpoints written atomically and read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ntkscrub._validation import check_logits
from ntkscrub.batches import Batches, as_batches
from ntkscrub.io import atomic_write

__all__ = [
    "TrainLog",
    "train",
    "lr_at",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_torch_save",
    "check_json_like",
    "LOSSES",
    "SCHEDULES",
]

LOSSES = ("ce", "mse")
SCHEDULES = ("constant", "cosine", "step")

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class TrainLog:
    """What a :func:`train` run did.

    Attributes:
        epochs: epochs actually run.
        train_error, train_loss: per epoch, measured after the epoch in eval mode over the whole
            training data (error as a fraction in [0, 1]; loss = mean per-sample loss without
            the weight penalty).
        lr: learning rate used in each epoch.
        seconds: wall-clock time of the run (training and per-epoch evaluation).
        recipe: every setting of the run (JSON-like), for result files.
        penalty: (λ/2)‖w − w_anchor‖² after each epoch.
        epoch_seconds: wall-clock time of each epoch (including its evaluation).
        reached_zero_error: whether the last measured training error is 0.
        stopped_by_callback: whether ``callback`` ended the run.
    """

    epochs: int
    train_error: list[float]
    train_loss: list[float]
    lr: list[float]
    seconds: float
    recipe: dict
    penalty: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    reached_zero_error: bool = False
    stopped_by_callback: bool = False

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of every field."""
        return asdict(self)


# ---------------------------------------------------------------------------------- validation
def check_json_like(obj: Any, name: str, *, allow_tensors: bool = False, _depth: int = 0) -> None:
    """Raise ``TypeError`` unless ``obj`` is built from str/int/float/bool/None/list/tuple/dict
    (string keys) — the types ``torch.load(weights_only=True)`` reads back (plus tensors when
    ``allow_tensors``)."""
    if _depth > 50:
        raise TypeError(f"{name}: nested too deeply")
    # Exact types: subclasses (e.g. torch.TorchVersion, numpy floats) are refused on loading.
    if obj is None or type(obj) in (str, bool, int, float):
        return
    if allow_tensors and isinstance(obj, Tensor):
        return
    if isinstance(obj, (list, tuple)):
        for v in obj:
            check_json_like(v, name, allow_tensors=allow_tensors, _depth=_depth + 1)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{name}: dict keys must be str, got {k!r}")
            check_json_like(v, name, allow_tensors=allow_tensors, _depth=_depth + 1)
        return
    raise TypeError(
        f"{name}: values must be str/int/float/bool/None/list/dict"
        + ("/Tensor" if allow_tensors else "")
        + f" so that weights_only loading works, got {type(obj).__name__}"
    )


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (:func:`ntkscrub.io.atomic_write`)."""
    atomic_write(path, lambda fh: torch.save(obj, fh), binary=True)


def _num(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    return value


def _anchor_tensors(
    anchor: nn.Module | Mapping[str, Tensor] | None,
    params: dict[str, nn.Parameter],
) -> dict[str, Tensor] | None:
    """Detached copies of the anchor's values for every trained parameter (None: anchor 0)."""
    if anchor is None:
        return None
    if isinstance(anchor, nn.Module):
        src: Mapping[str, Any] = dict(anchor.named_parameters())
    elif isinstance(anchor, Mapping):
        src = anchor
    else:
        raise TypeError(
            f"anchor: expected an nn.Module, a state_dict or None, got {type(anchor).__name__}"
        )
    out = {}
    for n, p in params.items():
        if n not in src:
            raise ValueError(f"anchor: has no parameter '{n}'; is it the same architecture?")
        a = src[n]
        if not isinstance(a, Tensor):
            raise TypeError(f"anchor: entry '{n}' is a {type(a).__name__}, not a tensor")
        if a.shape != p.shape:
            raise ValueError(
                f"anchor: parameter '{n}' has shape {tuple(a.shape)}, the model's is "
                f"{tuple(p.shape)}; is it the same architecture?"
            )
        out[n] = a.detach().to(device=p.device, dtype=p.dtype).clone()
    return out


# ------------------------------------------------------------------------------------- losses
def _per_sample_loss(logits: Tensor, y: Tensor, loss: str) -> Tensor:
    """``(B, c)`` logits, ``(B,)`` labels → ``(B,)`` per-sample losses."""
    logits = check_logits(logits)
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return 0.5 * (logits - onehot).pow(2).sum(dim=1)


def lr_at(epoch: int, *, lr: float, epochs: int, schedule: str) -> float:
    """Learning rate of epoch ``epoch`` (0-based) for a schedule over ``epochs`` epochs.

    ``constant``: ``lr``. ``cosine``: ``lr·½(1 + cos(π·e/epochs))`` (e < epochs, so never 0).
    ``step``: ``lr``, ×0.1 from ``e ≥ 0.5·epochs``, ×0.01 from ``e ≥ 0.75·epochs``.
    Epochs past ``epochs`` (``until_zero_error``) keep the rate of the last scheduled epoch.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if epochs <= 0 or schedule == "constant":
        return lr
    e = min(epoch, epochs - 1)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * e / epochs))
    factor = 1.0
    if e >= 0.5 * epochs:
        factor = 0.1
    if e >= 0.75 * epochs:
        factor = 0.01
    return lr * factor


# ----------------------------------------------------------------------------------- evaluate
class _ModeGuard:
    """Put a module in eval mode and restore every submodule's own mode afterwards (so a
    mixed state — train mode with frozen BatchNorm — survives)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for m, mode in self.modes:
            m.training = mode


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        b = next(model.buffers(), None)
        return b.device if b is not None else torch.device("cpu")
    return p.device


@torch.no_grad()
def _eval_pass(model: nn.Module, batches: Batches, loss: str, comm: Any = None) -> dict[str, float]:
    # error and mean loss on an already checked stream (train() calls it every epoch; the
    # public evaluation is ntkscrub.readouts.evaluate); with comm, over every rank's shard
    wrong, total_loss, n = 0, 0.0, 0
    with _guard(comm, "evaluating its shard"), _ModeGuard(model):
        for x, y in batches:
            if y is None:
                raise ValueError("data: labels are required to evaluate")
            out = check_logits(model(x))
            wrong += int((out.argmax(dim=1) != y).sum())
            total_loss += float(_per_sample_loss(out.float(), y, loss).sum())
            n += y.shape[0]
    if comm is not None:
        sums = comm.sum_scalars(torch.tensor([wrong, total_loss, n], dtype=torch.float64))
        wrong, total_loss, n = float(sums[0]), float(sums[1]), int(sums[2])
    return {"error": wrong / n, "loss": total_loss / n, "n": n}


def _guard(comm: Any, phase: str) -> Any:
    """``comm.guard(phase)`` (a local exception raises on every rank), or nothing."""
    return comm.guard(phase) if comm is not None else contextlib.nullcontext()


# -------------------------------------------------------------------------------------- train
def _epoch_batches(
    data: Batches, batch_size: int, shuffle: bool, gen: torch.Generator
) -> Callable[[], Any]:
    """A function that yields one epoch of ``(x, y)`` batches in a (seeded) random order."""
    src = data.source
    if isinstance(src, (tuple, list)) and len(src) == 2 and isinstance(src[0], Tensor):
        X, Y = src

        def tensor_epoch():
            n = X.shape[0]
            order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                yield X[idx.to(X.device)], Y[idx.to(Y.device)]

        return tensor_epoch
    if isinstance(src, Dataset):
        loader = DataLoader(
            src, batch_size=batch_size, shuffle=shuffle, generator=gen if shuffle else None
        )

        def loader_epoch():
            for item in loader:
                if not isinstance(item, (tuple, list)) or len(item) < 2:
                    raise ValueError("data: Dataset items must be (x, y) pairs for training")
                yield item[0], torch.as_tensor(item[1])

        return loader_epoch
    raise TypeError("data: training needs an (X, Y) pair, a Dataset or a DataLoader")


def train(  # noqa: PLR0915 - listed in pyproject.toml
    model: nn.Module,
    data: Any,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    anchor: nn.Module | Mapping[str, Tensor] | None = None,
    loss: str = "ce",
    batch_size: int = 128,
    schedule: str = "constant",
    seed: int | None = 0,
    freeze_bn: bool = True,
    until_zero_error: bool = False,
    max_epochs: int | None = None,
    shuffle: bool = True,
    callback: Callable[[int, nn.Module, TrainLog], bool | None] | None = None,
    progress: bool = False,
    device=None,
    comm: Any = None,
) -> tuple[nn.Module, TrainLog]:
    """Train a deep copy of ``model`` with SGD + momentum; ``model`` itself is never modified.

    Objective: ``mean_i ℓ(f(x_i), y_i) + (weight_decay/2)·‖w − anchor‖²`` over the parameters
    with ``requires_grad`` (others stay fixed), ℓ = ``'ce'`` cross-entropy or ``'mse'``
    ½‖f(x) − onehot(y)‖² summed over classes.

    Args:
        model: the network; logits ``(B, c)`` for inputs ``(B, ...)``.
        data: ``(X, Y)`` tensors (``X (N, ...)``, ``Y (N,)`` int64), a Dataset of ``(x, y)`` or a
            DataLoader (its dataset is re-batched with ``batch_size`` and the seeded shuffle).
        epochs: epochs to run (≥ 0).
        lr: base learning rate (> 0); ``schedule`` ``'constant'``, ``'cosine'`` or ``'step'``
            (×0.1 at 50 % and 75 % of ``epochs``), per epoch, see :func:`lr_at`.
        weight_decay: λ ≥ 0 of the penalty toward ``anchor`` (default anchor: zeros). ``anchor``
            is a module or state_dict of the same architecture, e.g. the pre-trained weights.
        freeze_bn: BatchNorm in eval mode throughout (running statistics untouched: the
            paper's fine-tuning); ``False``: BatchNorm trains normally (pre-training). A final
            batch of one sample is skipped when BatchNorm trains (batch statistics undefined).
        until_zero_error: after ``epochs``, continue until the training error is 0 or
            ``max_epochs`` (default ``max(10·epochs, 100)``) epochs have run.
        seed: seeds the shuffling generator and, inside a forked RNG scope, any randomness of
            the model (dropout), so a fixed seed gives bit-identical results on CPU and the
            global RNG state is left as it was. ``None``: unseeded. On CUDA, cuDNN kernels may
            still differ run to run (seen for ResNet-18 on an H200; All-CNN was identical)
            unless ``torch.use_deterministic_algorithms(True)`` is set by the caller.
        callback: ``callback(epoch, model, log)`` after each epoch (``epoch`` counts completed
            epochs from 1; ``model`` in eval mode — do not modify it); returning True stops.
        progress: show a tqdm bar over epochs.
        device: where to train (default: the model's device); data are moved per batch.
        comm: data-parallel training (a :class:`ntkscrub.distributed.Comm`; see the module
            docstring): ``data`` is this rank's shard (not empty), ``batch_size`` per rank, the
            model and every argument the same on every rank; BatchNorm must be frozen. The
            returned weights are rank 0's (bit-identical on every rank), the log global.

    A non-finite training loss after an epoch ends the run (``recipe['diverged_at_epoch']``).

    Returns:
        ``(trained_copy, log)``; the copy is in eval mode.

    Raises:
        ValueError / TypeError naming the argument: ``epochs < 0``, ``lr ≤ 0``, unknown
        ``loss`` / ``schedule``, negative ``weight_decay``, an ``anchor`` of another
        architecture, labels out of range.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    epochs, lr, momentum, weight_decay, batch_size, seed, max_epochs = _check_train_args(
        epochs, lr, momentum, weight_decay, loss, schedule, batch_size, seed, max_epochs,
        until_zero_error, callback,
    )  # fmt: skip
    device = torch.device(device) if device is not None else _device_of(model)
    net = copy.deepcopy(model).to(device)
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model: has no parameters with requires_grad=True to train")
    sgd = _SGD(params, _anchor_tensors(anchor, params), momentum, weight_decay)
    data_desc = "DataLoader" if isinstance(data, DataLoader) else type(data).__name__
    _check_data_parallel(comm, net, freeze_bn)
    with _guard(comm, "reading its training shard"):
        batches, eval_batches, c = _training_batches(net, data, batch_size, device)
    shards = _shards_record(comm, batches)
    steps = shards.get("steps_per_epoch")
    recipe = {
        "optimizer": "SGD",
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "anchor": "zeros (plain weight decay)" if anchor is None else "given weights",
        "objective": f"mean {loss} + (weight_decay/2)*||w - anchor||^2",
        "loss": loss,
        "batch_size": batch_size,
        "schedule": schedule,
        "epochs": epochs,
        "until_zero_error": bool(until_zero_error),
        "max_epochs": max_epochs,
        "seed": seed,
        "freeze_bn": bool(freeze_bn),
        "shuffle": bool(shuffle),
    } | _data_record(batches, c, params, data_desc, device)
    recipe |= shards  # data-parallel: the global sample count, the shards, steps per epoch
    log = TrainLog(epochs=0, train_error=[], train_loss=[], lr=[], seconds=0.0, recipe=recipe)
    gen = torch.Generator()
    seed_k = seed if (comm is None or seed is None) else seed + comm.rank  # a shard: its order
    if seed_k is not None:
        gen.manual_seed(seed_k)
    else:
        gen.seed()
    epoch_iter = _epoch_batches(batches, batch_size, shuffle, gen)
    bar = _progress_bar(max_epochs if until_zero_error else epochs) if progress else None
    t_start = time.perf_counter()
    last_error: float | None = None
    with _seeded_model_rng(seed_k, device):
        e = 0
        while True:
            if e >= epochs:
                if not until_zero_error:
                    break
                if last_error is None:
                    last_error = _eval_pass(net, eval_batches, loss, comm)["error"]
                if last_error == 0.0 or e >= max_epochs:
                    break
            t_ep = time.perf_counter()
            cur_lr = lr_at(e, lr=lr, epochs=epochs, schedule=schedule)
            _train_epoch(net, epoch_iter, sgd, loss, cur_lr, freeze_bn, device, comm, steps)
            ev = _eval_pass(net, eval_batches, loss, comm)
            last_error = ev["error"]
            e += 1
            _log_epoch(log, ev, cur_lr, sgd.penalty(), t_ep, t_start, bar)
            if not math.isfinite(ev["loss"]):
                log.recipe["diverged_at_epoch"] = e
                break
            if callback is not None and _agree(comm, bool(callback(e, net, log))):
                log.stopped_by_callback = True
                break
    if bar is not None:
        bar.close()
    _sync_weights(comm, params)
    net.eval()
    log.seconds = time.perf_counter() - t_start
    log.reached_zero_error = last_error == 0.0
    return net, log


def _progress_bar(total: int | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="ep")


def _data_record(
    batches: Batches, c: int, params: dict[str, Tensor], data_desc: str, device: torch.device
) -> dict[str, Any]:
    """The data and model part of a run's recipe record."""
    return {
        "n_samples": len(batches),
        "num_classes": c,
        "trained_parameters": sum(p.numel() for p in params.values()),
        "data": data_desc,
        "device": str(device),
        "torch": str(torch.__version__),  # TorchVersion is a str subclass weights_only refuses
        # On a CPU the thread count sets the float summation order, and SGD amplifies it: the
        # quick preset's first pre-training epoch ends at loss 4.26 with 2 threads, 8.34 with 1
        # (same seed, same code), so a run is reproducible only at the same count.
        "threads": torch.get_num_threads(),
    }


def _check_train_args(
    epochs: Any,
    lr: Any,
    momentum: Any,
    weight_decay: Any,
    loss: Any,
    schedule: Any,
    batch_size: Any,
    seed: Any,
    max_epochs: Any,
    until_zero_error: bool,
    callback: Any,
) -> tuple[int, float, float, float, int, int | None, int | None]:
    """:func:`train`'s checks; returns ``(epochs, lr, momentum, weight_decay, batch_size, seed,
    max_epochs)`` normalised (``max_epochs`` defaulted for ``until_zero_error``)."""
    epochs = _int(epochs, "epochs", 0)
    lr = _num(lr, "lr")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    momentum = _num(momentum, "momentum")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    weight_decay = _num(weight_decay, "weight_decay")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay}")
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    batch_size = _int(batch_size, "batch_size", 1)
    if seed is not None:
        seed = _int(seed, "seed", 0)
    if max_epochs is not None:
        max_epochs = _int(max_epochs, "max_epochs", 0)
        if max_epochs < epochs:
            raise ValueError(f"max_epochs ({max_epochs}) must be ≥ epochs ({epochs})")
    elif until_zero_error:
        max_epochs = max(10 * epochs, 100)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable, got {type(callback).__name__}")
    return epochs, lr, momentum, weight_decay, batch_size, seed, max_epochs


def _training_batches(
    net: nn.Module, data: Any, batch_size: int, device: torch.device
) -> tuple[Batches, Batches, int]:
    """The training stream, the evaluation stream (on ``device``) and the number of logits,
    probed once so that labels are checked before any step is taken."""
    if isinstance(data, DataLoader):
        # train() does its own seeded shuffling and batching, so only the dataset is used (a
        # shuffling DataLoader would otherwise be refused by as_batches)
        data = data.dataset
    x0, y0 = as_batches(data, batch_size=batch_size, name="data").first()
    if y0 is None:
        raise ValueError("data: labels are required for training")
    with torch.no_grad(), _ModeGuard(net):
        c = check_logits(net(x0[:1].to(device))).shape[1]
    batches = as_batches(data, batch_size=batch_size, name="data", num_classes=c)
    eval_batches = as_batches(
        data, batch_size=max(batch_size, 512), name="data", num_classes=c, device=device
    )
    return batches, eval_batches, c


@contextlib.contextmanager
def _seeded_model_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Model-side randomness (dropout) from a fixed seed; ``fork_rng`` restores the global state
    on exit, so the caller's RNG stream is unaffected. Only the generator of the training device
    is seeded (``torch.manual_seed`` would also reseed every GPU)."""
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices, enabled=seed is not None):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
        yield


@dataclass
class _SGD:
    """SGD with heavy-ball momentum and the penalty ``(λ/2)‖w − anchor‖²``, written out (the
    update of ``torch.optim.SGD`` with dampening 0, no Nesterov): constructing
    ``torch.optim.SGD`` imports ``torch._dynamo``, seconds per process."""

    params: dict[str, Tensor]
    anchor: dict[str, Tensor] | None
    momentum: float
    weight_decay: float
    buffers: dict[str, Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for n, p in self.params.items():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if self.weight_decay > 0:
                # gradient of (λ/2)‖w − anchor‖²: λ(w − anchor), added before the momentum so it
                # acts exactly like a term of the loss
                d = p if self.anchor is None else p - self.anchor[n]
                g = g.add(d, alpha=self.weight_decay)
            if self.momentum > 0:
                buf = self.buffers.get(n)
                if buf is None:
                    buf = self.buffers[n] = g.clone()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-lr)

    @torch.no_grad()
    def penalty(self) -> float:
        """``(λ/2)‖w − anchor‖²`` in float64."""
        if self.weight_decay == 0:
            return 0.0
        tot = 0.0
        for n, p in self.params.items():
            d = p if self.anchor is None else p - self.anchor[n]
            tot += float(d.double().pow(2).sum())
        return 0.5 * self.weight_decay * tot


def _check_data_parallel(comm: Any, net: nn.Module, freeze_bn: bool) -> None:
    if comm is not None and not freeze_bn and any(isinstance(m, _BN) for m in net.modules()):
        raise ValueError(
            "freeze_bn: BatchNorm statistics are per rank; data-parallel training needs "
            "freeze_bn=True"
        )


def _shards_record(comm: Any, batches: Batches) -> dict[str, Any]:
    """Data-parallel: the global sample count, the shard sizes and the global steps per epoch
    (the longest shard's batches); ``{}`` in one process."""
    if comm is None:
        return {}
    sizes = comm.gather_objects((len(batches), batches.num_batches))
    return {
        "n_samples": sum(n for n, _ in sizes),
        "shards": [n for n, _ in sizes],
        "steps_per_epoch": max(b for _, b in sizes),
    }


@torch.no_grad()
def _sync_weights(comm: Any, params: dict[str, Tensor]) -> None:
    """Rank 0's weights on every rank (bit for bit, whatever the all-reduces rounded)."""
    if comm is not None:
        for p in params.values():
            p.copy_(comm.broadcast(p.detach()))


def _agree(comm: Any, flag: bool) -> bool:
    """``flag`` on any rank (one scalar reduction with ``comm``)."""
    if comm is None:
        return flag
    return float(comm.sum_scalars(torch.tensor([float(flag)], dtype=torch.float64))[0]) > 0


def _train_mode(net: nn.Module, freeze_bn: bool) -> None:
    """``net.train()``, with every BatchNorm kept in eval mode when ``freeze_bn``."""
    net.train()
    if freeze_bn:
        for m in net.modules():
            if isinstance(m, _BN):
                m.eval()


def _train_epoch(
    net: nn.Module,
    epoch_iter: Callable[[], Any],
    sgd: _SGD,
    loss: str,
    lr: float,
    freeze_bn: bool,
    device: torch.device,
    comm: Any = None,
    steps: int | None = None,
) -> None:
    """One pass over the data in training mode (BatchNorm frozen with ``freeze_bn``); a batch of
    one sample is skipped when BatchNorm trains (its statistics are undefined). Ends in eval.
    With ``comm``: ``steps`` global steps (:func:`_data_parallel_epoch`)."""
    if comm is not None:
        _data_parallel_epoch(net, epoch_iter, sgd, loss, lr, freeze_bn, device, comm, steps)
        return
    has_bn = any(isinstance(m, _BN) for m in net.modules())
    _train_mode(net, freeze_bn)
    for x, y in epoch_iter():
        if not freeze_bn and has_bn and x.shape[0] == 1:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for p in sgd.params.values():
            p.grad = None
        _per_sample_loss(net(x), y, loss).mean().backward()
        sgd.step(lr)
    net.eval()


def _data_parallel_epoch(
    net: nn.Module,
    epoch_iter: Callable[[], Any],
    sgd: _SGD,
    loss: str,
    lr: float,
    freeze_bn: bool,
    device: torch.device,
    comm: Any,
    steps: Any,
) -> None:
    """``steps`` steps, each on every rank's next local batch (none once a shard is used up):
    ``∇ = Σ_ranks Σ_batch ∇ℓ_i / Σ_ranks b_k`` — the gradient of the mean loss over the global
    batch — from one all-reduce of the flat gradients with the local count appended."""
    _train_mode(net, freeze_bn)
    params = list(sgd.params.values())
    dt = params[0].dtype
    for p in params[1:]:
        dt = torch.promote_types(dt, p.dtype)
    it = iter(epoch_iter())
    for _ in range(steps):
        for p in params:
            p.grad = None
        count = 0
        try:
            batch = next(it, None)
            if batch is not None:
                x, y = batch[0].to(device), batch[1].to(device)
                _per_sample_loss(net(x), y, loss).sum().backward()  # summed: ÷ global count
                count = y.shape[0]
        except Exception as err:  # noqa: BLE001 - raised on every rank by the all-reduce
            comm.fail("computing gradients on its batch", err)
        flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dt)
                for p in params]  # fmt: skip
        flat.append(torch.tensor([float(count)], dtype=dt, device=params[0].device))
        total = comm.sum_block(torch.cat(flat))
        grads = (total[:-1] / total[-1]).split([p.numel() for p in params])
        for p, g in zip(params, grads, strict=True):
            p.grad = g.reshape(p.shape).to(p.dtype)
        sgd.step(lr)
    net.eval()


def _log_epoch(
    log: TrainLog,
    ev: dict[str, float],
    lr: float,
    penalty: float,
    t_epoch: float,
    t_start: float,
    bar: Any,
) -> None:
    """Append one epoch's measurements to ``log`` (and the progress bar)."""
    log.epochs += 1
    log.train_error.append(ev["error"])
    log.train_loss.append(ev["loss"])
    log.lr.append(lr)
    log.penalty.append(penalty)
    log.epoch_seconds.append(time.perf_counter() - t_epoch)
    log.seconds = time.perf_counter() - t_start
    log.reached_zero_error = ev["error"] == 0.0
    if bar is not None:
        bar.update(1)
        bar.set_postfix(error=f"{ev['error']:.4f}", loss=f"{ev['loss']:.4f}", lr=f"{lr:.3g}")


# -------------------------------------------------------------------------------- checkpoints
_CKPT_FORMAT = "ntkscrub-checkpoint-v1"


def save_checkpoint(
    path: str | os.PathLike,
    model_or_state: nn.Module | Mapping[str, Tensor],
    meta: dict | None = None,
) -> None:
    """Write ``{'state_dict', 'meta'}`` to ``path`` atomically (temp file + ``os.replace``).

    Tensors are stored on the CPU. ``meta`` must be JSON-like (str/int/float/bool/None/list/
    dict with str keys) so that :func:`load_checkpoint` can use ``weights_only=True``.
    """
    if isinstance(model_or_state, nn.Module):
        state = model_or_state.state_dict()
    elif isinstance(model_or_state, Mapping):
        state = model_or_state
    else:
        raise TypeError(
            f"model_or_state: expected an nn.Module or a state_dict, got "
            f"{type(model_or_state).__name__}"
        )
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise TypeError(f"model_or_state: entries must be str → Tensor, got {k!r}")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise TypeError(f"meta: expected a dict, got {type(meta).__name__}")
    check_json_like(meta, "meta")
    payload = {
        "format": _CKPT_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
        "meta": meta,
    }
    atomic_torch_save(payload, path)


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module | None = None, map_location: Any = "cpu"
) -> tuple[dict[str, Tensor] | nn.Module, dict]:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Returns:
        ``(state_dict, meta)``; when ``model`` is given, ``(loaded_copy, meta)`` where
        ``loaded_copy`` is a deep copy of ``model`` with the weights loaded (strictly; ``model``
        itself is untouched). A bare state_dict file (no ``meta``) is accepted too.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"path: no checkpoint at {path}")
    state, meta = _read_checkpoint(path, map_location)
    if model is None:
        return state, meta
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    loaded = copy.deepcopy(model)
    try:
        loaded.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"model: checkpoint {path} does not fit this architecture: {err}") from err
    return loaded, meta


def _read_checkpoint(path: str | os.PathLike, map_location: Any) -> tuple[dict[str, Tensor], dict]:
    """``torch.load`` with every failure turned into a ValueError naming ``path``; the state_dict
    must map names to tensors (a list or number in it would be returned silently otherwise)."""
    if Path(path).stat().st_size == 0:
        raise ValueError(f"path: {path} is empty (0 bytes): an interrupted write? re-create it")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - EOFError, UnpicklingError, RuntimeError, KeyError …
        raise ValueError(
            f"path: {path} cannot be read as a torch checkpoint (truncated, not a checkpoint, or "
            f"written by something else): {type(err).__name__}: {err}"
        ) from err
    if isinstance(obj, dict) and obj.get("format") == _CKPT_FORMAT:
        if not isinstance(obj.get("state_dict"), dict):
            raise ValueError(f"path: {path} has no 'state_dict' entry (a damaged checkpoint)")
        state, meta = obj["state_dict"], obj.get("meta", {})
    elif isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        state, meta = obj, {}
    else:
        raise ValueError(
            f"path: {path} is not a checkpoint written by save_checkpoint (nor a bare state_dict)"
        )
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(
            f"path: {path}: state_dict values must be tensors; {bad[:3]} are "
            f"{type(state[bad[0]]).__name__}"
        )
    return state, meta
