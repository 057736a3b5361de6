"""Readout functions: what an observer can measure on *any* model and forgetting method.

The paper (§5.4, Fig. 2 and Fig. 4) judges a scrubbed model by readouts an attacker could apply:

* errors on D_r, D_f and the test set (:func:`error`, :func:`loss`, :func:`evaluate`);
* the L1 distance of softmax outputs to the retrained model, also along the line from the original
  model w(D) (α = 0) to the scrubbed one (α = 1) (:func:`softmax_l1`,
  :func:`softmax_l1_along_line`; Fig. 4);
* the relearn time: epochs of fine-tuning on the full D until the forget-set loss is back at the
  original model's (:func:`relearn_time`; Fig. 2e, REFERENCE.md §2);
* an entropy membership-inference attack (:func:`membership_attack`; Fig. 2d).

Every function only reads its models and data: models must be in eval mode (BatchNorm and Dropout
not training; checked with :func:`ntkscrub.params.check_eval_mode`), are run under
``torch.no_grad`` on their own device, and are never written. Results are plain floats, dicts or
small dataclasses with ``.to_dict()`` (JSON-friendly). Bad input raises ``ValueError`` /
``TypeError`` naming the argument. The information bounds (Proposition 1) live in ``bounds.py``.

Shapes: data of N samples, inputs ``x`` of shape ``(b, *input_shape)`` per batch, logits
``f(x)`` of shape ``(b, c)``, labels ``y`` of shape ``(b,)`` in ``[0, c)``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from ntkscrub._progress import check_progress, logger, progress_bar, warn
from ntkscrub._validation import check_logits
from ntkscrub.batches import Batches, DataLike, _check_labels, as_batches, subset
from ntkscrub.params import check_eval_mode

# The losses are training's own, so "ce"/"mse" here are exactly what train() minimises.
from ntkscrub.training import LOSSES, _int, _num, _per_sample_loss, train

__all__ = [
    "error",
    "loss",
    "predict_logits",
    "predict_proba",
    "evaluate",
    "softmax_l1",
    "softmax_l1_along_line",
    "relearn_time",
    "RelearnResult",
    "membership_attack",
    "mean_entropy",
    "AttackResult",
    "SOFTMAX_L1_CONVENTION",
    "RELEARN_CONVENTION",
    "ATTACK_CONVENTION",
]

SOFTMAX_L1_CONVENTION = (
    "mean over samples of the L1 norm of the difference of the full softmax probability vectors, "
    "sum_k |p_a(k|x) - p_b(k|x)|; lies in [0, 2]"
)
RELEARN_CONVENTION = (
    "epochs = smallest k >= 1 such that the forget-set loss after k epochs of fine-tuning on the "
    "full D is <= target_loss + tol (checked after every epoch, never before the first); "
    "max_epochs + 1 with reached = False when never reached; one epoch = samples_per_epoch "
    "samples; forget_losses[k] = forget loss after k epochs (k = 0: before fine-tuning); "
    "diverged_at_epoch set when the fine-tuning loss became non-finite (then epochs = "
    "max_epochs + 1 means 'undefined', not 'slow': lower lr); with max_retain_error, an epoch "
    "counts only when the error on retain is <= max_retain_error as well (retain_errors[k]; "
    "collapsed_epochs lists the epochs that met the loss target without it)"
)
ATTACK_CONVENTION = (
    "forget_member_fraction = fraction of D_f predicted member; lower = more forgotten "
    "(compare with a model retrained on D_r); chance ≈ 0.5 of held-out accuracy "
    "(attack_heldout_accuracy measures the attack's strength on balanced retain vs test halves)"
)


# --------------------------------------------------------------------------- helpers
def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """The device and floating dtype a model's inputs must have (first parameter, else buffer)."""
    tensors = [*model.parameters(), *model.buffers()]
    for t in tensors:
        if t.is_floating_point():
            return t.device, t.dtype
    if tensors:
        return tensors[0].device, None
    return torch.device("cpu"), None  # parameter-free module (e.g. a fixed function)


def _batches(data: DataLike, name: str, batch_size: int) -> Batches:
    # No device here: each model gets the batch moved to its own device in _logits, so two models
    # on different devices can be compared on one stream.
    return as_batches(data, batch_size=batch_size, name=name)


def _logits(
    model: nn.Module,
    x: Tensor,
    model_name: str,
    data_name: str,
    placement: tuple[torch.device, torch.dtype | None],
) -> Tensor:
    """``f(x)`` of shape ``(b, c)`` on the model's device, in float32 or float64, checked finite."""
    device, dtype = placement
    x = x.to(device=device, dtype=dtype if (dtype is not None and x.is_floating_point()) else None)
    out = check_logits(model(x), model_name)
    if out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(
            f"{model_name}: expected logits of shape (batch, c) = ({x.shape[0]}, c), got "
            f"{tuple(out.shape)}"
        )
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{model_name}: outputs on {data_name} contain NaN or infinite values")
    # Half-precision logits would round probabilities to ~3 digits; softmax and CE need more.
    return out if out.dtype in (torch.float32, torch.float64) else out.float()


def _check_y(y: Tensor | None, c: int, data_name: str) -> Tensor:
    # c is only known from the model's output, so the range is checked here, batch by batch.
    if y is None:
        raise ValueError(f"{data_name}: labels are required but the data carry none")
    _check_labels(y, data_name, c)
    return y


def _stream(
    model: nn.Module, data: DataLike, model_name: str, data_name: str, batch_size: int
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(logits (b, c), y (b,) or None)`` over the data.

    Callers run it under ``torch.no_grad`` (a ``no_grad`` block inside a generator would stay
    entered in the caller between yields)."""
    placement = _placement(model)
    for x, y in _batches(data, data_name, batch_size):
        out = _logits(model, x, model_name, data_name, placement)
        yield out, (y.to(out.device) if y is not None else None)


def _check_kind(kind: Any) -> str:
    if kind not in LOSSES:
        raise ValueError(f"kind: expected one of {LOSSES}, got {kind!r}")
    return kind


def _comm(process_group: Any) -> Any:
    """The data-parallel :class:`~ntkscrub.distributed.Comm` when ``process_group`` is given or
    a default group is initialised (the rule of :func:`ntkscrub.scrub`), else ``None``."""
    from ntkscrub import distributed  # imported here: torch.distributed only when used

    return distributed.Comm(process_group) if distributed.active(process_group) else None


def _summed(comm: Any, data: Any, name: str, k: int, local: Any) -> list[float]:
    """``local()``: ``k`` sums over this data; with ``comm``, over *this rank's shard*, summed
    over the ranks in rank order (the same bits on every rank). An empty shard contributes
    zeros; an exception on any rank (bad labels on its shard, ...) raises a
    :class:`~ntkscrub.distributed.DistributedError` on every rank instead of a hang."""
    if comm is None:
        return local()
    from ntkscrub.distributed import _shard_size

    sums = [0.0] * k
    with comm.guard(f"reading its shard of {name}"):
        if _shard_size(data) != 0:
            sums = [float(v) for v in local()]
    return comm.sum_scalars(torch.tensor(sums, dtype=torch.float64)).tolist()


@torch.no_grad()
def _error_loss_sums(
    model: nn.Module, data: DataLike, name: str, kind: str, batch_size: int
) -> list[float]:
    """One pass: [samples misclassified, summed loss, N]."""
    wrong, total, n = 0, 0.0, 0
    for out, y in _stream(model, data, "model", name, batch_size):
        y = _check_y(y, out.shape[1], name)
        wrong += int((out.argmax(dim=1) != y).sum())
        total += float(_per_sample_loss(out, y, kind).double().sum())
        n += y.shape[0]
    return [wrong, total, n]


def _error_and_loss(
    model: nn.Module, data: DataLike, name: str, kind: str, batch_size: int, comm: Any = None
) -> tuple[float, float, int]:
    """(fraction misclassified, mean loss, N) — over every rank's shard with ``comm``."""
    wrong, total, n = _summed(
        comm, data, name, 3, lambda: _error_loss_sums(model, data, name, kind, batch_size)
    )
    if n == 0:
        raise ValueError(f"{name}: the data set is empty on every rank")
    return wrong / n, total / n, int(n)


# --------------------------------------------------------------------------- errors and losses
def error(
    model: nn.Module, data: DataLike, *, batch_size: int = 512, process_group: Any = None
) -> float:
    """Fraction of ``data`` misclassified by ``model`` (argmax of the logits ≠ label), in [0, 1].

    Readouts (i)–(iii) of §5.4 (error on D_r, D_f, test; Fig. 2a–c). ``data`` is a Dataset,
    a non-shuffling DataLoader or an ``(X, Y)`` pair; labels are required.
    ``process_group``: see :func:`loss`.
    """
    check_eval_mode(model, "model")
    return _error_and_loss(model, data, "data", "ce", batch_size, _comm(process_group))[0]


def loss(
    model: nn.Module,
    data: DataLike,
    *,
    kind: str = "ce",
    batch_size: int = 512,
    process_group: Any = None,
) -> float:
    """Mean loss of ``model`` over ``data``.

    ``kind="ce"``: cross-entropy of the softmax (the loss of the relearn-time readout, §5.4 (iv));
    ``kind="mse"``: ``½‖f(x) − onehot(y)‖²`` summed over the ``c`` logits, averaged over samples
    (the losses of :func:`ntkscrub.training.train`).

    ``process_group``: data-parallel readout (:mod:`ntkscrub.distributed`): when given, or when
    a default ``torch.distributed`` group is initialised (as for :func:`ntkscrub.scrub`), ``data``
    is *this rank's shard* (it may be empty) and every rank returns the value on the
    concatenation of the shards (the sums over samples reduced once; the same bits on every
    rank). The model must be the same on every rank. The same holds for :func:`error`,
    :func:`evaluate`, :func:`softmax_l1` and :func:`softmax_l1_along_line`.
    """
    check_eval_mode(model, "model")
    kind = _check_kind(kind)
    return _error_and_loss(model, data, "data", kind, batch_size, _comm(process_group))[1]


@torch.no_grad()
def predict_logits(model: nn.Module, data: DataLike, *, batch_size: int = 512) -> Tensor:
    """Outputs (logits) of ``model`` on ``data``, shape ``(N, c)``, on the CPU (labels optional)."""
    check_eval_mode(model, "model")
    return torch.cat([out.cpu() for out, _ in _stream(model, data, "model", "data", batch_size)])


def predict_proba(model: nn.Module, data: DataLike, *, batch_size: int = 512) -> Tensor:
    """Softmax outputs of ``model`` on ``data``, shape ``(N, c)``, on the CPU (labels optional)."""
    return predict_logits(model, data, batch_size=batch_size).softmax(dim=1)


def evaluate(
    model: nn.Module,
    splits: Mapping[str, DataLike],
    *,
    kind: str = "ce",
    batch_size: int = 512,
    process_group: Any = None,
) -> dict[str, dict[str, float]]:
    """Error and mean loss on several named splits, e.g. ``{"retain": …, "forget": …, "test": …}``.

    Returns ``{split: {"error": float, "loss": float, "n": int}}`` (one pass per split).
    ``process_group``: see :func:`loss` (each split is this rank's shard; ``n`` is global).
    """
    check_eval_mode(model, "model")
    if not isinstance(splits, Mapping):
        raise TypeError(f"splits: expected a dict of name -> data, got {type(splits).__name__}")
    if not splits:
        raise ValueError("splits: no splits given")
    _check_kind(kind)
    comm = _comm(process_group)
    result: dict[str, dict[str, float]] = {}
    for split, data in splits.items():
        name = f"splits[{split!r}]"
        err, mean_loss, n = _error_and_loss(model, data, name, kind, batch_size, comm)
        result[str(split)] = {"error": err, "loss": mean_loss, "n": n}
    return result


# --------------------------------------------------------------------------- softmax distances
def softmax_l1(
    model_a: nn.Module,
    model_b: nn.Module,
    data: DataLike,
    *,
    batch_size: int = 512,
    process_group: Any = None,
) -> float:
    """Mean over ``data`` of ``‖softmax(f_a(x)) − softmax(f_b(x))‖₁`` (Fig. 4 of the paper).

    Convention: the L1 norm of the difference of the *full* probability vectors (all ``c``
    classes), so each term and the mean lie in ``[0, 2]``. Labels are not needed. The two models
    may differ in architecture but must have the same number of logits ``c``; each runs on its own
    device. ``process_group``: see :func:`loss`.
    """
    check_eval_mode(model_a, "model_a")
    check_eval_mode(model_b, "model_b")

    def local() -> list[float]:
        batches = _batches(data, "data", batch_size)
        ref = _reference_probs(model_b, "model_b", batches)
        return [_sum_l1(model_a, "model_a", _placement(model_a), batches, ref, "model_b"),
                len(batches)]  # fmt: skip

    total, n = _summed(_comm(process_group), data, "data", 2, local)
    if n == 0:
        raise ValueError("data: the data set is empty on every rank")
    return total / n


def _probabilities(
    net: Any, net_name: str, placement: tuple[torch.device, torch.dtype | None], batches: Batches
) -> Iterator[Tensor]:
    """Softmax outputs ``(b, c)`` per batch; ``net`` is a module or a callable ``x -> f(x)``."""
    for x, _ in batches:
        yield _logits(net, x, net_name, batches.name, placement).softmax(dim=1)


@torch.no_grad()
def _sum_l1(
    net: Any,
    net_name: str,
    placement: tuple[torch.device, torch.dtype | None],
    batches: Batches,
    ref_probs: Sequence[Tensor],
    ref_name: str,
) -> float:
    """Sum over samples of ``‖softmax(net(x)) − p_ref(x)‖₁``, ``ref_probs`` one ``(b, c)`` per
    batch of ``batches`` (the reference is run once and reused, e.g. for every ``a`` of a line)."""
    total = 0.0
    for p, p_ref in zip(_probabilities(net, net_name, placement, batches), ref_probs):
        if p.shape[1] != p_ref.shape[1]:
            raise ValueError(
                f"{ref_name}: has {p_ref.shape[1]} outputs but {net_name} has {p.shape[1]}; "
                "softmax distances need the same number of classes"
            )
        # float64 accumulation: the mean of many small differences must not lose digits.
        total += float((p.to(device=p_ref.device, dtype=torch.float64) - p_ref).abs().sum())
    return total


@torch.no_grad()
def _reference_probs(reference: nn.Module, ref_name: str, batches: Batches) -> list[Tensor]:
    # N·c float64 values: small next to the data, and saves a forward pass per comparison.
    return [p.double() for p in _probabilities(reference, ref_name, _placement(reference), batches)]


def _check_same_architecture(model: nn.Module, other: nn.Module, other_name: str) -> None:
    """Raise ``ValueError`` naming ``other_name`` unless parameter/buffer names and shapes agree."""
    for what, mine, theirs in (
        ("parameters", dict(model.named_parameters()), dict(other.named_parameters())),
        ("buffers", dict(model.named_buffers()), dict(other.named_buffers())),
    ):
        if list(mine) != list(theirs):
            missing = sorted(set(mine) - set(theirs))[:3]
            extra = sorted(set(theirs) - set(mine))[:3]
            raise ValueError(
                f"{other_name}: not the same architecture as model — its {what} differ "
                f"(missing {missing}, unexpected {extra})"
            )
        for n, t in mine.items():
            if t.shape != theirs[n].shape:
                raise ValueError(
                    f"{other_name}: not the same architecture as model — '{n}' has shape "
                    f"{tuple(theirs[n].shape)}, expected {tuple(t.shape)}"
                )


def _check_alphas(alphas: Any) -> list[float]:
    if isinstance(alphas, (str, bytes)) or alphas is None:
        raise TypeError(f"alphas: expected a 1-D sequence or tensor of numbers, got {alphas!r}")
    try:
        a = torch.as_tensor(alphas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"alphas: expected a 1-D sequence or tensor of numbers ({err})") from err
    if a.dim() != 1 or a.numel() == 0:
        raise ValueError(f"alphas: expected a non-empty 1-D sequence, got shape {tuple(a.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise ValueError("alphas: contains NaN or infinite values")
    return [float(v) for v in a]


def softmax_l1_along_line(
    model: nn.Module,
    scrubbed: nn.Module,
    reference: nn.Module,
    data: DataLike,
    alphas: Sequence[float] | Tensor | None = None,
    *,
    batch_size: int = 512,
    process_group: Any = None,
) -> dict[str, list[float]]:
    """Softmax L1 distance to ``reference`` along the line from ``model`` to ``scrubbed`` (Fig. 4).

    For each ``a`` in ``alphas`` (default ``torch.linspace(0, 1, 11)``) the weights are
    ``w(a) = w(model) + a·(w(scrubbed) − w(model))`` over *all* parameters (computed with
    ``torch.lerp``, exact at ``a = 0`` and ``a = 1``), and the distance is
    :func:`softmax_l1` of that model to ``reference`` (typically the model retrained on D_r).
    Values of ``a`` outside ``[0, 1]`` extrapolate.

    Buffers (e.g. BatchNorm running statistics) are taken from ``model`` at every ``a``; when
    ``scrubbed``'s floating buffers differ, the ``a = 1`` point is not ``scrubbed`` itself and a
    warning says so. ``model`` and ``scrubbed`` must have the same parameter and buffer names and
    shapes (``ValueError`` naming ``scrubbed``); ``reference`` may be any model with the same
    number of outputs. Neither model is modified: the interpolated weights are passed through
    ``torch.func.functional_call``, using ``p`` extra memory per ``a``, one ``a`` at a time.

    Returns ``{"alphas": [...], "distances": [...]}`` (floats, same length).
    ``process_group``: see :func:`loss` (one reduction for all of ``alphas``).
    """
    check_eval_mode(model, "model")
    check_eval_mode(scrubbed, "scrubbed")
    check_eval_mode(reference, "reference")
    _check_same_architecture(model, scrubbed, "scrubbed")
    a_list = _check_alphas(torch.linspace(0, 1, 11) if alphas is None else alphas)

    start = dict(model.named_parameters())
    end = {
        n: t.detach().to(device=start[n].device, dtype=start[n].dtype)
        for n, t in scrubbed.named_parameters()
    }
    b_model, b_scrub = dict(model.named_buffers()), dict(scrubbed.named_buffers())
    if any(
        b.is_floating_point() and not torch.equal(b, b_scrub[n].to(b.device, b.dtype))
        for n, b in b_model.items()
    ):
        warn(
            "softmax_l1_along_line: scrubbed's buffers (e.g. BatchNorm running statistics) "
            "differ from model's; buffers are taken from model, so the a = 1 point is not "
            "scrubbed itself",
            UserWarning,
        )

    def local() -> list[float]:
        batches = _batches(data, "data", batch_size)
        ref = _reference_probs(reference, "reference", batches)
        placement = _placement(model)
        sums: list[float] = []
        # One a at a time: the extra memory is one set of weights (p values), not one per a.
        for a in a_list:
            with torch.no_grad():
                params = {n: torch.lerp(w.detach(), end[n], a) for n, w in start.items()}

            def net(x: Tensor, params: dict[str, Tensor] = params) -> Tensor:
                # Missing names (the buffers) are taken from model by functional_call.
                return functional_call(model, params, (x,))

            sums.append(_sum_l1(net, f"model at a={a:g}", placement, batches, ref, "reference"))
        return [*sums, len(batches)]

    *sums, n = _summed(_comm(process_group), data, "data", len(a_list) + 1, local)
    if n == 0:
        raise ValueError("data: the data set is empty on every rank")
    return {"alphas": a_list, "distances": [t / n for t in sums]}


# --------------------------------------------------------------------------- relearn time
@dataclass
class RelearnResult:
    """Relearn time (§5.4 (iv), Fig. 2e): see :data:`RELEARN_CONVENTION` for the convention."""

    epochs: int
    reached: bool
    target_loss: float
    threshold: float
    forget_losses: list[float]
    tol: float
    lr: float
    momentum: float
    batch_size: int
    samples_per_epoch: int
    max_epochs: int
    seed: int | None
    seconds: float
    diverged_at_epoch: int | None = None
    retain_errors: list[float] | None = None
    max_retain_error: float | None = None
    collapsed_epochs: list[int] = field(default_factory=list)
    convention: str = field(default=RELEARN_CONVENTION)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def relearn_time(  # noqa: C901, PLR0915 - listed in pyproject.toml
    model: nn.Module,
    data_full: DataLike,
    forget: DataLike,
    *,
    target_loss: float | None = None,
    reference: nn.Module | None = None,
    tol: float = 1e-5,
    lr: float = 0.01,
    momentum: float = 0.0,
    batch_size: int = 128,
    samples_per_epoch: int | None = None,
    max_epochs: int = 100,
    seed: int | None = 0,
    retain: DataLike | None = None,
    max_retain_error: float | None = None,
    progress: bool | None = None,
) -> RelearnResult:
    """Epochs of fine-tuning on the full D until the forget-set loss is back (§5.4 (iv), Fig. 2e).

    As in the reference code (REFERENCE.md §2): a copy of the (scrubbed) ``model`` is fine-tuned
    on ``data_full`` = D with plain SGD (``lr`` 0.01, batch 128, BatchNorm statistics frozen, no
    weight decay) with :func:`ntkscrub.training.train`; after each epoch the
    cross-entropy on ``forget`` = D_f is measured, and the relearn time is the first epoch ``k``
    (``k ≥ 1``) at which it is ``≤ target_loss + tol``. ``target_loss`` defaults to the forget
    loss of ``reference`` (the original model w(D)); give exactly one of the two. The original
    model itself relearns in 1 epoch by this convention (unless one more epoch on D raises its
    forget loss by more than ``tol``).

    One "epoch" is ``samples_per_epoch`` samples (default ``|D|``, as the reference's 500). With
    the default, one ``train`` run (seed ``seed``) reshuffles D every epoch and a callback checks
    the forget loss after each, so a momentum buffer carries over as in any fine-tuning run.
    Otherwise each epoch is its own ``train`` call (seed ``seed + k``) on a random draw of that
    many samples from D (without replacement up to ``|D|``, then whole extra permutations; one
    generator seeded with ``seed``), so a momentum buffer restarts every epoch — moot for the
    default plain SGD. Training stops as soon as the threshold is reached.

    ``retain`` (D_r) records the error on it after every epoch (``retain_errors``); with
    ``max_retain_error`` an epoch counts only when that error is ≤ ``max_retain_error`` too. The
    forget set is usually one class, so a run that the first large steps throw into predicting
    that class everywhere reaches any forget loss without relearning anything (measured on this
    CPU: a narrow All-CNN retrain went from forget loss 0.92 to 6e-5 in one epoch of plain SGD at
    lr 0.01, while its error on D_r rose to 84 % — 472 of 475 retain images called the forget
    class); such epochs are listed in ``collapsed_epochs`` and do not stop the run.

    Returns a :class:`RelearnResult`: ``epochs`` (``max_epochs + 1`` and ``reached=False`` when
    never reached), ``forget_losses`` (index ``k`` = after ``k`` epochs, index 0 = before),
    ``diverged_at_epoch`` (the epoch whose fine-tuning loss became non-finite, else None: a
    diverged run stops and its ``epochs = max_epochs + 1`` is undefined, not slow — on an H200,
    plain SGD at lr 0.01 stopped after 1–2 epochs, by their run times, from full-width All-CNNs
    that an lr-0.005-momentum-0.9 recipe had fitted, and on the CPU it sent such a model's
    forget loss from 0.14 to 77 in one epoch: models sharper than 2/0.01), the threshold and
    every option used. ``model``, ``reference`` and the data are not modified.

    ``progress``: a tqdm bar over the epochs (forget loss vs the threshold); ``None`` (default)
    shows it only when stderr is a terminal, ``False`` never.
    """
    check_eval_mode(model, "model")
    check_progress(progress)
    if (target_loss is None) == (reference is None):
        raise ValueError(
            "target_loss: give exactly one of target_loss and reference (the original model w(D), "
            "whose forget loss becomes the target)"
        )
    # Checked before any work (train() would check most of these only after the target loss).
    tol, lr, momentum = _num(tol, "tol"), _num(lr, "lr"), _num(momentum, "momentum")
    if tol < 0:
        raise ValueError(f"tol must be ≥ 0, got {tol}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    _int(batch_size, "batch_size", 1)
    _int(max_epochs, "max_epochs", 1)
    if seed is not None:
        _int(seed, "seed", 0)
    if max_retain_error is not None:
        max_retain_error = _num(max_retain_error, "max_retain_error")
        if retain is None:
            raise ValueError("max_retain_error: needs retain (the data it is measured on)")
        if not 0.0 <= max_retain_error <= 1.0:
            raise ValueError(f"max_retain_error must lie in [0, 1], got {max_retain_error}")
    if reference is not None:
        check_eval_mode(reference, "reference")
        # this rank's own data: relearn_time is not data-parallel
        target = _error_and_loss(reference, forget, "forget", "ce", 512)[1]
    else:
        target = _num(target_loss, "target_loss")
    n_full = len(_batches(data_full, "data_full", batch_size))  # checks data_full is usable
    per_epoch = (
        n_full if samples_per_epoch is None else _int(samples_per_epoch, "samples_per_epoch", 1)
    )
    threshold = target + tol
    recipe = dict(
        lr=lr,
        momentum=momentum,
        weight_decay=0.0,
        loss="ce",
        batch_size=batch_size,
        schedule="constant",
        freeze_bn=True,
        shuffle=True,
    )

    t0 = time.perf_counter()
    losses = [_error_and_loss(model, forget, "forget", "ce", 512)[1]]
    retain_errors = (
        None if retain is None else [_error_and_loss(model, retain, "retain", "ce", 512)[0]]
    )
    collapsed: list[int] = []

    bar = progress_bar(max_epochs, "relearn", progress, unit="ep")

    def relearned(net: nn.Module) -> bool:
        # net is train()'s copy after an epoch, in eval mode.
        losses.append(_error_and_loss(net, forget, "forget", "ce", 512)[1])
        bar.update(1)
        bar.set_postfix(forget_loss=f"{losses[-1]:.3g}", target=f"{threshold:.3g}", refresh=False)
        if retain_errors is not None:
            retain_errors.append(_error_and_loss(net, retain, "retain", "ce", 512)[0])
        if losses[-1] > threshold:
            return False
        if max_retain_error is not None and retain_errors[-1] > max_retain_error:
            collapsed.append(len(losses) - 1)
            return False
        return True

    if per_epoch == n_full:
        # One run with a callback: the momentum buffer and the shuffling stream carry over
        # between epochs exactly as in an ordinary fine-tuning run.
        _, lg = train(
            model,
            data_full,
            epochs=max_epochs,
            seed=seed,
            callback=lambda epoch, net, log: relearned(net),
            **recipe,
        )
        diverged = lg.recipe.get("diverged_at_epoch")
        if diverged is not None and len(losses) == diverged:  # train() stops before the callback
            losses.append(float("nan"))
            if retain_errors is not None:
                retain_errors.append(float("nan"))
    else:
        # A run per epoch on a fresh draw of samples_per_epoch samples from D.
        gen = torch.Generator()
        if seed is None:
            gen.seed()  # non-deterministic draws, like train(seed=None)
        else:
            gen.manual_seed(seed)
        current, reps, diverged = model, -(-per_epoch // n_full), None
        # a Dataset (not a loader) for train's own shuffling batches
        source = data_full.dataset if isinstance(data_full, DataLoader) else data_full
        for k in range(1, max_epochs + 1):
            idx = torch.cat([torch.randperm(n_full, generator=gen) for _ in range(reps)])
            epoch_data = subset(source, idx[:per_epoch])
            epoch_seed = None if seed is None else seed + k
            current, lg = train(current, epoch_data, epochs=1, seed=epoch_seed, **recipe)
            if lg.recipe.get("diverged_at_epoch") is not None:
                diverged = k
                losses.append(float("nan"))
                if retain_errors is not None:
                    retain_errors.append(float("nan"))
                break
            if relearned(current):
                break
    bar.close()
    reached = len(losses) > 1 and losses[-1] <= threshold and (len(losses) - 1) not in collapsed
    logger.info(
        "relearn_time: %s after %d epoch(s) (target forget loss %.4g), %.1f s",
        "reached" if reached else "not reached",
        len(losses) - 1,
        threshold,
        time.perf_counter() - t0,
    )
    epochs = len(losses) - 1 if reached else max_epochs + 1
    return RelearnResult(
        epochs=epochs,
        reached=reached,
        target_loss=target,
        threshold=threshold,
        forget_losses=losses,
        tol=tol,
        lr=lr,
        momentum=momentum,
        batch_size=batch_size,
        samples_per_epoch=per_epoch,
        max_epochs=max_epochs,
        seed=seed,
        seconds=time.perf_counter() - t0,
        diverged_at_epoch=diverged,
        retain_errors=retain_errors,
        max_retain_error=max_retain_error,
        collapsed_epochs=collapsed,
    )


# --------------------------------------------------------------------------- membership attack
@dataclass
class AttackResult:
    """Entropy membership-inference attack (§5.4 (v), Fig. 2d); see :data:`ATTACK_CONVENTION`."""

    forget_member_fraction: float
    attack_heldout_accuracy: float
    n_members: int
    n_nonmembers: int
    n_forget: int
    entropy_mean: dict[str, float]
    C: float
    gamma: str | float
    kernel: str
    seed: int
    max_per_class: int | None
    convention: str = field(default=ATTACK_CONVENTION)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def _entropies(model: nn.Module, data: DataLike, name: str, batch_size: int) -> np.ndarray:
    """Entropy ``−Σ_k p_k log p_k`` of the softmax per sample, shape ``(N,)``, in nats."""
    parts = []
    for out, _ in _stream(model, data, "model", name, batch_size):
        # float64 log_softmax: p·log p is exact 0 where p underflows, no log(0).
        logp = out.double().log_softmax(dim=1)
        parts.append(-(logp.exp() * logp).sum(dim=1).cpu())
    return torch.cat(parts).numpy()


def mean_entropy(model: nn.Module, data: DataLike, *, batch_size: int = 512) -> float:
    """Mean softmax entropy of ``model`` on ``data`` (nats; labels ignored) — the attack's feature.

    On held-out images it is what ``scrub(..., method="ce_newton", forget_entropy=...)`` takes:
    a retrain's confidence on D_f, images it never saw, measured without a retrain."""
    check_eval_mode(model, "model")
    return float(_entropies(model, data, "data", batch_size).mean())


def membership_attack(
    model: nn.Module,
    retain: DataLike,
    test: DataLike,
    forget: DataLike,
    *,
    C: float = 3.0,
    gamma: str | float = "auto",
    kernel: str = "rbf",
    seed: int = 0,
    max_per_class: int | None = None,
    batch_size: int = 512,
    progress: bool | None = None,
) -> AttackResult:
    """Black-box entropy membership attack on ``model`` (§5.4 (v), Fig. 2d; REFERENCE.md §2).

    Feature: the entropy of ``softmax(f(x))`` per sample, shape ``(N, 1)``. An
    ``sklearn.svm.SVC(C=3, gamma='auto', kernel='rbf')`` is trained on ``retain`` (label 1 =
    member) vs ``test`` (label 0 = non-member). Classes are balanced by subsampling the larger of
    the two, without replacement, to the smaller size, with ``numpy.random.default_rng(seed)``;
    ``max_per_class`` caps both sizes further (an SVC fit grows ~quadratically with the samples,
    so large sets need a cap; default: no cap, as in the reference).

    Reported:

    * ``forget_member_fraction``: fraction of ``forget`` = D_f predicted member (lower = more
      forgotten; compare with a model retrained on D_r — too low is a Streisand effect);
    * ``attack_heldout_accuracy``: the same attack trained on one half of the balanced (retain,
      test) and scored on the other half (balanced, so chance ≈ 0.5) — how strong the attack is;
    * mean entropies per set and the sizes used.

    Labels are not needed. Each balanced set needs at least 2 samples. ``progress``: a tqdm bar
    over the 5 steps (3 entropy passes, 2 SVC fits); ``None`` shows it only on a terminal.
    """
    from sklearn.svm import SVC  # sklearn import is slow; only pay for it when attacking

    check_eval_mode(model, "model")
    C = _num(C, "C")
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    _int(seed, "seed", 0)  # numpy's default_rng needs a non-negative seed
    bar = progress_bar(5, "membership_attack", check_progress(progress), unit="step")
    h = {}
    for name, data in (("retain", retain), ("test", test), ("forget", forget)):
        bar.set_postfix(step=f"entropies on {name}", refresh=False)
        try:
            h[name] = _entropies(model, data, name, batch_size)
        except BaseException:
            bar.close()
            raise
        bar.update(1)
    h_r, h_t, h_f = h["retain"], h["test"], h["forget"]
    m = min(h_r.size, h_t.size)
    if m < 2:
        bar.close()
        small = "retain" if h_r.size <= h_t.size else "test"
        raise ValueError(f"{small}: needs at least 2 samples for the attack and its held-out half")
    if max_per_class is not None:
        m = min(m, _int(max_per_class, "max_per_class", 2))

    entropy_mean = {
        "retain": float(h_r.mean()),
        "test": float(h_t.mean()),
        "forget": float(h_f.mean()),
    }
    rng = np.random.default_rng(seed)
    # Permuting both sets, then keeping the first m, subsamples the larger one and fixes the
    # random half-split used for the held-out accuracy in one step.
    h_r = h_r[rng.permutation(h_r.size)[:m]]
    h_t = h_t[rng.permutation(h_t.size)[:m]]

    def fit(members: np.ndarray, nonmembers: np.ndarray) -> Any:
        X = np.concatenate([members, nonmembers])[:, None]
        y = np.concatenate([np.ones(members.size, int), np.zeros(nonmembers.size, int)])
        return SVC(C=C, gamma=gamma, kernel=kernel).fit(X, y)

    half = m // 2
    bar.set_postfix(step="SVC fits", refresh=False)
    probe = fit(h_r[:half], h_t[:half])
    bar.update(1)
    X_out = np.concatenate([h_r[half:], h_t[half:]])[:, None]
    y_out = np.concatenate([np.ones(m - half, int), np.zeros(m - half, int)])
    heldout = float((probe.predict(X_out) == y_out).mean())

    attack = fit(h_r, h_t)
    bar.update(1)
    bar.close()
    member_frac = float((attack.predict(h_f[:, None]) == 1).mean())
    return AttackResult(
        forget_member_fraction=member_frac,
        attack_heldout_accuracy=heldout,
        n_members=m,
        n_nonmembers=m,
        n_forget=int(h_f.size),
        entropy_mean=entropy_mean,
        C=C,
        gamma=gamma,
        kernel=kernel,
        seed=seed,
        max_per_class=max_per_class,
    )
