"""Shared machinery of the ntkscrub benchmarks (pytest-benchmark tests and ``gpu_suite.py``).

Everything here measures; nothing asserts a time. The same functions serve the pytest
benchmarks (``test_bench_*.py``) and the one-shot GPU script, so a CPU smoke run exercises the
code paths the GPU run will take.

Data are random tensors of CIFAR shape (3×32×32) with random labels, created on the target
device from a seeded generator: timing does not depend on image content, and no download is
needed. Models are built on the CPU from a seed (``build_model(..., seed=...)``) and moved.

Conventions (recorded with every result):

* precision ``fp64`` / ``fp32``: parameters and data in that dtype; on CUDA ``fp32`` turns TF32
  *off* for matmuls and cuDNN (strict IEEE fp32);
* ``tf32``: fp32 tensors with TF32 on for both matmuls and cuDNN convolutions;
* ``bf16``: fp32 tensors, ``torch.autocast(dtype=bfloat16)`` around the forward / Jacobian
  products (TF32 on for what autocast leaves in fp32);
* a training epoch = forward + backward + SGD-momentum step over all N samples, in mini-batches,
  BatchNorm in eval mode (the fine-tuning recipe freezes BN statistics);
* a Θ matvec = one VJP pass plus one JVP pass over N (``ntkscrub.operators.NTK.matmul``);
* memory: on CUDA ``torch.cuda.max_memory_allocated`` (absolute, and the increase over what was
  allocated when the measured call began); on CPU the resident set size sampled every few ms by a
  thread (absolute peak, and the increase over the RSS at the start). The CPU figure counts what
  the allocator returned to the OS only; small freed blocks kept by malloc inflate the baseline,
  so treat CPU memory as indicative.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import resource
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkscrub.operators import NTK, Counted, Jacobian
from ntkscrub.params import ParameterSpace
from ntkscrub.recipes.models import build_model, count_parameters  # noqa: F401 - re-exported

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

SCHEMA = "ntkscrub-bench-v1"
IMAGE_SHAPE = (3, 32, 32)  # CIFAR; gpu_suite --tiny shrinks it with set_image_size


def set_image_size(size: int) -> tuple[int, int, int]:
    """Change the side of the random images (all models pool globally, so any size ≥ 8 works)."""
    global IMAGE_SHAPE
    IMAGE_SHAPE = (3, int(size), int(size))
    return IMAGE_SHAPE


# The fine-tuning recipe of the paper / reference code (REFERENCE.md §1–2): SGD lr 0.01, momentum
# 0.9, weight decay 0.1 toward the pre-trained weights, batch 128, BatchNorm frozen; the reference
# run fine-tuned for 25 epochs. Retrain time = measured epoch time × RETRAIN_EPOCHS.
RECIPE: dict[str, Any] = {
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 0.1,
    "batch_size": 128,
    "freeze_bn": True,
    "loss": "ce",
}
RETRAIN_EPOCHS = 25


# ----------------------------------------------------------------------------------- devices
def resolve_device(name: str) -> torch.device:
    """``'cpu'`` or ``'cuda'`` → a ``torch.device``; a clear error when CUDA is missing."""
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--bench-device cuda: torch.cuda.is_available() is False on this host")
    return dev


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock times are the device's times."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads (``None``: leave as is) and return the count in use."""
    if n is not None and n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


# --------------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class Precision:
    """How products are computed: tensor dtype, optional autocast dtype, TF32 on/off (CUDA)."""

    name: str
    dtype: torch.dtype
    autocast: torch.dtype | None
    tf32: bool


PRECISIONS: dict[str, Precision] = {
    "fp64": Precision("fp64", torch.float64, None, False),
    "fp32": Precision("fp32", torch.float32, None, False),
    "tf32": Precision("tf32", torch.float32, None, True),
    "bf16": Precision("bf16", torch.float32, torch.bfloat16, True),
}


def _set_tf32(on: bool) -> None:
    try:
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
    except RuntimeError:  # torch ≥ 2.9 after someone used the new API: use it as well
        torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"


@contextlib.contextmanager
def precision_flags(prec: Precision, device: torch.device) -> Iterator[None]:
    """TF32 on/off for the duration (CUDA only; the CPU has no TF32), restored afterwards."""
    if device.type != "cuda":
        yield
        return
    try:
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        old = None
    _set_tf32(prec.tf32)
    try:
        yield
    finally:
        if old is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def autocast_ctx(prec: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the precision's autocast dtype, else a no-op."""
    if prec.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=prec.autocast)


def precisions_for(device: torch.device) -> list[str]:
    """fp64/fp32 on the CPU (no TF32, bf16 CPU kernels are not representative); fp32/TF32/bf16 on
    CUDA (fp64 there only as the accuracy reference)."""
    return ["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32", "fp64"]


# ------------------------------------------------------------------------------------ memory
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryMeter:
    """Peak memory of the code inside ``with MemoryMeter(device) as m:`` → ``m.peak_mib``,
    ``m.delta_mib`` (peak minus what was in use at entry) and ``m.kind``.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: RSS sampled by a
    daemon thread every ``interval`` seconds (torch kernels release the GIL, so it keeps up).
    """

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device, self.interval = device, interval
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_sampled"
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = _rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20

    @property
    def delta_mib(self) -> float:
        return max(0, self.peak - self.base) / 2**20

    def to_dict(self, prefix: str = "") -> dict[str, Any]:
        return {
            f"{prefix}peak_mib": round(self.peak_mib, 2),
            f"{prefix}delta_mib": round(self.delta_mib, 2),
            f"{prefix}memory_kind": self.kind,
        }


def memory_ratio(num_mib: float, den_mib: float, floor_mib: float = 1.0) -> float | None:
    """``num / den``, or None when the denominator is below ``floor_mib`` (on the CPU a small
    call's RSS increase is often 0: the allocator reuses freed pages, and the ratio is noise)."""
    return num_mib / den_mib if den_mib >= floor_mib else None


def is_oom(err: BaseException) -> bool:
    """True for allocation failures (CPU ``MemoryError``, CUDA out-of-memory)."""
    if isinstance(err, MemoryError):
        return True
    oom_cls = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(err, oom_cls):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def free_memory(device: torch.device) -> None:
    """Release cached blocks after an OOM or a large stage, so the next one starts clean."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------- data/models
def random_cifar(
    n: int,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``n`` random images ``(n, *IMAGE_SHAPE)`` ~ N(0, 1) and uniform labels, on ``device``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    X = torch.randn((n, *IMAGE_SHAPE), generator=gen, device=device, dtype=dtype)
    Y = torch.randint(0, num_classes, (n,), generator=gen, device=device)
    return X, Y


@dataclass(frozen=True)
class ModelSpec:
    """A model of :func:`ntkscrub.recipes.models.build_model` on CIFAR-shaped inputs."""

    name: str
    width: float
    num_classes: int

    @property
    def label(self) -> str:
        return f"{self.name}-w{self.width:g}-c{self.num_classes}"

    def kwargs(self) -> dict[str, Any]:
        if self.name == "mlp":
            return {"in_features": math.prod(IMAGE_SHAPE), "hidden": (256, 256)}
        if self.name == "smallcnn":
            return {"in_channels": IMAGE_SHAPE[0]}
        return {}

    @staticmethod
    def parse(text: str) -> ModelSpec:
        """``'allcnn-w1-c5'`` → ``ModelSpec('allcnn', 1.0, 5)``."""
        name, w, c = text.split("-")
        return ModelSpec(name, float(w.lstrip("w")), int(c.lstrip("c")))


def make_model(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0
) -> nn.Module:
    """A seeded model in eval mode on ``device``."""
    model = build_model(spec.name, spec.num_classes, spec.width, seed=seed, **spec.kwargs())
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def suffix_flop_share(spec: ModelSpec, params: str, device: torch.device) -> float:
    """Forward FLOPs of the suffix that ``params`` leaves after the frozen prefix
    (:func:`ntkscrub.prefix.split_frozen_prefix`) over the whole model's, on 4 random images;
    1.0 when the model cannot be split. What a partial-linearisation product costs relative to
    a full one, roughly (both run a JVP and a VJP through what they differentiate)."""
    import re

    from torch.utils.flop_counter import FlopCounterMode

    from ntkscrub.prefix import split_frozen_prefix

    model = make_model(spec, device)
    X, _ = random_cifar(4, spec.num_classes, device, torch.float32, seed=3)
    names = [n for n, _ in model.named_parameters() if re.search(params, n)]
    split, _ = split_frozen_prefix(model, names, X)
    if split is None:
        return 1.0
    flops = []
    for fn, x in ((model, X), (split.suffix, split.prefix(X))):
        with FlopCounterMode(display=False) as counter:
            fn(x)
        flops.append(counter.get_total_flops())
    return flops[1] / flops[0] if flops[0] else 1.0


@torch.no_grad()
def calibrate_bn(model: nn.Module, X: Tensor, batch_size: int = 128, batches: int = 4) -> nn.Module:
    """Set BatchNorm running statistics from a few batches (cumulative average), back to eval.

    A freshly initialised network in eval mode normalises with mean 0 / variance 1, so its
    activations are not those of a trained one; a few forward passes make the statistics real
    at negligible cost (used for the timing problems, where the weights stay random).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
        m.train()
    for s in range(0, min(X.shape[0], batch_size * batches), batch_size):
        model(X[s : s + batch_size])
    for m, mom in saved:
        m.momentum = mom
    return model.eval()


# --------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, result)`` of one call, synchronised on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def make_train_epoch(
    model: nn.Module,
    X: Tensor,
    Y: Tensor,
    *,
    batch_size: int,
    prec: Precision,
    lr: float = RECIPE["lr"],
    momentum: float = RECIPE["momentum"],
    max_samples: int | None = None,
) -> Callable[[], float]:
    """A function running one training epoch (forward + backward + SGD-momentum step) on a copy.

    BatchNorm stays in eval mode (frozen statistics, as the fine-tuning recipe); cross-entropy;
    momentum buffers updated with ``torch._foreach`` ops (the update of ``torch.optim.SGD``,
    without constructing it). Returns the last batch's loss (a float, which synchronises).
    ``max_samples`` restricts the epoch to a prefix (used for warm-up).
    """
    net = copy.deepcopy(model).eval()
    params = [p for p in net.parameters() if p.requires_grad]
    bufs = [torch.zeros_like(p) for p in params]
    n = X.shape[0] if max_samples is None else min(max_samples, X.shape[0])
    device = X.device

    def epoch() -> float:
        loss = None
        with precision_flags(prec, device):
            for s in range(0, n, batch_size):
                x, y = X[s : min(s + batch_size, n)], Y[s : min(s + batch_size, n)]
                with autocast_ctx(prec, device):
                    out = net(x)
                loss = F.cross_entropy(out.float(), y)
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    torch._foreach_mul_(bufs, momentum)
                    torch._foreach_add_(bufs, grads)
                    torch._foreach_add_(params, bufs, alpha=-lr)
        return float(loss.detach()) if loss is not None else 0.0

    return epoch


# ------------------------------------------------------------- autocast work-around (bf16)
# The library's ``autocast`` path has one defect the benchmarks work around (a second one — fp32
# cotangents passed to a bf16 pullback under ``vmap`` — is fixed in ``Jacobian.rmatvec``):
# forward-mode AD through an eval-mode BatchNorm under autocast yields a float32 tangent with a
# bfloat16 primal, and the next convolution's JVP fails ("Input type (FloatTensor) and weight
# type (BFloat16Type) should be the same"). Running BatchNorm in float32 (input cast up, output
# cast back) avoids it without changing the parameters or Θ. The benchmarks measure bf16 through
# this work-around and say so (``autocast_workaround``).
_FP32_BN: dict[type, type] = {}


def _fp32_bn_class(cls: type) -> type:
    """A subclass of a BatchNorm class whose forward runs in float32 and returns the input's
    dtype (see above). Same parameters and buffers, so the same parameter space and Θ."""
    if cls not in _FP32_BN:

        def forward(self: nn.Module, x: Tensor) -> Tensor:
            return cls.forward(self, x.float()).to(x.dtype)

        _FP32_BN[cls] = type(f"Fp32{cls.__name__}", (cls,), {"forward": forward})
    return _FP32_BN[cls]


def autocast_safe(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose BatchNorm layers compute in float32 (see above)."""
    out = copy.deepcopy(model)
    for mod in out.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.__class__ = _fp32_bn_class(type(mod))
    return out


def make_ntk(
    model: nn.Module,
    X: Tensor,
    Y: Tensor,
    *,
    batch_size: int,
    prec: Precision,
    ridge: float = 0.0,
) -> NTK:
    """The library's lazy ``Θ + ridge·I`` over ``(X, Y)`` at the model's weights.

    With an autocast precision the BatchNorm work-around above is applied (the library's own path
    raises on BatchNorm models); otherwise this is exactly the library's ``Jacobian`` and ``NTK``.
    """
    if prec.autocast is not None:
        space = ParameterSpace(autocast_safe(model))
        J = Jacobian(space, (X, Y), batch_size=batch_size, name="data", autocast=prec.autocast)
    else:
        space = ParameterSpace(model)
        J = Jacobian(space, (X, Y), batch_size=batch_size, name="data")
    return Counted(NTK(jac_a=J, ridge=ridge))  # counts the matvecs a solve costs


def random_block(rows: int, k: int, device: torch.device, dtype: torch.dtype, seed: int) -> Tensor:
    """A seeded Gaussian ``(rows,)`` (k = 1) or ``(rows, k)`` block on ``device``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    shape = (rows,) if k == 1 else (rows, k)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def make_matvec(K: NTK, k: int, prec: Precision, device: torch.device) -> Callable[[], Tensor]:
    """A function computing ``Θ V`` for a fixed random ``V`` with ``k`` columns (vmap if k > 1)."""
    V = random_block(K.shape[0], k, device, K.jac_a.dtype, seed=123)

    def mv() -> Tensor:
        with precision_flags(prec, device):
            return K.matmul(V)

    return mv


def precision_accuracy(
    model: nn.Module,
    X: Tensor,
    Y: Tensor,
    *,
    prec: Precision,
    batch_size: int,
    k: int = 2,
    tol: float = 1e-4,
    power_iterations: int = 10,
) -> dict[str, Any]:
    """How accurate Θ products and the CG solve are in ``prec``, against float64, on ``(X, Y)``.

    * ``rel_error_vs_fp64``: max over ``k`` random v of ``‖Θ̂v − Θv‖ / ‖Θv‖`` (pessimistic: a
      random v lies mostly in Θ's small-eigenvalue directions, where ‖Θv‖ is small);
    * ``normwise_error``: the same error over ``‖Θ‖₂‖v‖`` (‖Θ‖₂ from power iterations in fp64),
      the quantity that bounds what a Krylov solver can attain;
    * ``solve_true_residual``: CG (float64 scalars) on ``(Θ̂ + λI) x = e`` to ``tol`` with the
      ``prec`` operator, then the residual of x against the float64 operator — the accuracy a
      scrub run in this precision actually gets (λ = N·0.1, e the cross-entropy residual).
    """
    from ntkscrub.solvers import cg

    device = X.device
    n = X.shape[0]
    ridge = n * RECIPE["weight_decay"]
    ref_model = copy.deepcopy(model).double().eval()
    K64 = make_ntk(ref_model, X.double(), Y, batch_size=batch_size, prec=PRECISIONS["fp64"])
    V64 = random_block(K64.shape[0], k, device, torch.float64, seed=7)
    ref = K64.matmul(V64)
    out: dict[str, Any] = {"accuracy_n": n, "accuracy_ridge": ridge}
    # ‖Θ‖₂ by power iteration (Θ is PSD, so the Rayleigh quotient converges to λ_max).
    v = random_block(K64.shape[0], 1, device, torch.float64, seed=8)
    lam = 0.0
    for _ in range(power_iterations):
        w = K64.matmul(v / v.norm())
        lam = float(w.norm())
        v = w
    out["theta_norm2"] = lam
    if prec.dtype == torch.float64:
        Kp = K64
    else:
        Kp = make_ntk(model, X.to(prec.dtype), Y, batch_size=batch_size, prec=prec)
    with precision_flags(prec, device):
        got = Kp.matmul(V64.to(Kp.jac_a.dtype)).double() if Kp is not K64 else ref
    err = (got - ref).norm(dim=0)
    out["rel_error_vs_fp64"] = float((err / ref.norm(dim=0).clamp_min(1e-300)).max())
    out["normwise_error"] = float((err / (lam * V64.norm(dim=0)).clamp_min(1e-300)).max())
    # The same operators with the ridge, for the solve (Θ + λI) x = e.
    K64r = Counted(NTK(jac_a=K64.jac_a, ridge=ridge))
    Kp = K64r if Kp is K64 else Counted(NTK(jac_a=Kp.jac_a, ridge=ridge))
    e = ce_residual(K64r)
    with precision_flags(prec, device), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        # 100 iterations bound the cost: a precision that cannot reach tol stalls long before
        x, info = cg(Kp, e.to(Kp.jac_a.dtype), tol=tol, max_iter=100, strict=False)
    res = (e - K64r.matmul(x.double())).norm() / e.norm()
    out.update(
        {
            "solve_tol": tol,
            "solve_iterations": info.iterations,
            "solve_claimed_residual": max(info.residuals),
            "solve_true_residual": float(res),
        }
    )
    return out


# ----------------------------------------------------------------------- scrubbing problems
@dataclass
class ScrubProblem:
    """θ0, w(D), D_r and D_f of one timing problem, with what building it cost."""

    spec: ModelSpec
    init: nn.Module
    model: nn.Module
    data: tuple[Tensor, Tensor]
    retain: tuple[Tensor, Tensor]
    forget: tuple[Tensor, Tensor]
    p: int
    notes: dict[str, Any] = field(default_factory=dict)


def make_scrub_problem(
    spec: ModelSpec,
    n: int,
    device: torch.device,
    *,
    forget_fraction: float = 0.05,
    finetune_epochs: int = 1,
    pretrain_epochs: int = 0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ScrubProblem:
    """A scrubbing problem on ``n`` random CIFAR-shaped samples (|D_f| = 5 % by default).

    θ0: the seeded random network with BatchNorm statistics calibrated on the data, then
    ``pretrain_epochs`` epochs of training with BN in train mode on *another* random set (so the
    linearisation point is "not just random" when asked). w(D): θ0 fine-tuned on D with the
    recipe (:data:`RECIPE`) for ``finetune_epochs`` epochs (0: w(D) = θ0).
    """
    from ntkscrub.training import train

    X, Y = random_cifar(n, spec.num_classes, device, dtype, seed=seed + 1)
    init = calibrate_bn(make_model(spec, device, dtype, seed=seed), X)
    shape = "x".join(map(str, IMAGE_SHAPE))
    notes: dict[str, Any] = {"data": f"random N(0,1) images {shape}, uniform random labels"}
    if pretrain_epochs > 0:
        Xp, Yp = random_cifar(max(n, 256), spec.num_classes, device, dtype, seed=seed + 99)
        init, log = train(
            init,
            (Xp, Yp),
            epochs=pretrain_epochs,
            lr=0.05,
            momentum=0.9,
            weight_decay=5e-4,
            batch_size=RECIPE["batch_size"],
            freeze_bn=False,
            seed=seed,
        )
        notes["pretrain"] = {"epochs": pretrain_epochs, "final_error": log.train_error[-1]}
    nf = max(1, int(round(forget_fraction * n)))
    model = init
    if finetune_epochs > 0:
        model, log = train(
            init,
            (X, Y),
            epochs=finetune_epochs,
            anchor=init,
            seed=seed,
            **{k: RECIPE[k] for k in ("lr", "momentum", "weight_decay", "batch_size", "freeze_bn")},
        )
        notes["finetune"] = {
            "epochs": finetune_epochs,
            "final_error": log.train_error[-1],
            "epoch_seconds": log.epoch_seconds,
        }
    # Forget = the first nf samples, retain = the rest (views: no copy of the data).
    return ScrubProblem(
        spec=spec,
        init=init,
        model=model.eval(),
        data=(X, Y),
        retain=(X[nf:], Y[nf:]),
        forget=(X[:nf], Y[:nf]),
        p=count_parameters(init, trainable_only=True),
        notes=notes,
    )


def warm_up_scrub(
    spec: ModelSpec, device: torch.device, solver: str, batch_size: int, cache: dict
) -> None:
    """One tiny scrub per (model, solver, device) before any timed one: the first call of the
    ``torch.func`` transforms (and cuDNN/cuBLAS handles) costs seconds that no later call pays."""
    key = ("warm", spec.label, solver, str(device))
    if key in cache:
        return
    tiny = make_scrub_problem(spec, 8, device, finetune_epochs=0, seed=123)
    run_scrub(tiny, device, solver=solver, batch_size=min(batch_size, 8), precond_rank=2)
    cache[key] = True


def measure_retrain(
    problem: ScrubProblem, device: torch.device, *, epochs: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Time the retraining recipe on D_r from θ0 (``ntkscrub.training.train``), per epoch.

    Returns the measured epoch times and ``retrain_seconds`` = mean epoch time ×
    :data:`RETRAIN_EPOCHS` (the reference run's 25 fine-tuning epochs). The epoch time is that of
    the library's training loop, which also evaluates the training error once per epoch (the
    "until zero error" criterion needs it).
    """
    from ntkscrub.training import train

    with MemoryMeter(device) as mem:
        sync(device)
        t0 = time.perf_counter()
        _, log = train(
            problem.init,
            problem.retain,
            epochs=epochs,
            anchor=problem.init,
            seed=seed,
            **{k: RECIPE[k] for k in ("lr", "momentum", "weight_decay", "batch_size", "freeze_bn")},
        )
        sync(device)
        total = time.perf_counter() - t0
    per_epoch = sum(log.epoch_seconds) / max(1, len(log.epoch_seconds))
    return {
        "retrain_epochs_measured": epochs,
        "retrain_epoch_seconds": per_epoch,
        "retrain_measured_seconds": total,
        "retrain_epochs_assumed": RETRAIN_EPOCHS,
        "retrain_seconds": per_epoch * RETRAIN_EPOCHS,
        "retrain_recipe": dict(RECIPE),
        **mem.to_dict("retrain_"),
    }


def run_scrub(
    problem: ScrubProblem,
    device: torch.device,
    *,
    solver: str,
    batch_size: int,
    precond_rank: int | None,
    tol: float = 1e-4,
    max_iter: int = 300,
    linearize_at: str = "init",
    form: str = "solves",
    autocast: torch.dtype | None = None,
    max_dense_bytes: float = 4 * 2**30,
    ridge: float | None = None,
    warm_start: bool = True,
    share_precond: bool = True,
    seed: int = 0,
    params: str | None = None,
) -> dict[str, Any]:
    """One :func:`ntkscrub.scrub.scrub` call, timed and metered; never raises for lack of memory.

    The problem uses the reference convention: cross-entropy residuals, ``weight_decay=0.1``
    (ridge λ = N·0.1 per system) unless ``ridge`` is given (one λ for both systems, which
    ``form='block'`` needs), Nyström preconditioner of rank ``precond_rank`` (0 or ``None`` → no
    preconditioner; the library default is not used so that the rank is always explicit).
    ``DenseTooLarge`` and out-of-memory errors become a record with ``status`` ``'skipped'`` /
    ``'oom'`` and the message.
    """
    from ntkscrub.config import ProductConfig, SolverConfig
    from ntkscrub.scrub import DenseTooLarge, scrub

    rec: dict[str, Any] = {
        "solver": solver,
        "form": form,
        "linearize_at": linearize_at,
        "batch_size": batch_size,
        "precond_rank": (precond_rank or 0) if solver == "cg" else None,
        "tol": tol,
        "max_iter": max_iter,
        "autocast": str(autocast) if autocast is not None else None,
        "ridge": ridge,
        "weight_decay": None if ridge is not None else RECIPE["weight_decay"],
        "warm_start": warm_start,
        "share_precond": share_precond,
        "params_selected": params,  # ("params" is the model's parameter count in the records)
    }
    kwargs: dict[str, Any] = {
        "init": problem.init,
        "linearize_at": linearize_at,
        "loss": "ce",
        "solver": solver,
        "tol": tol,
        "max_iter": max_iter,
        "strict": False,
        "form": form,
        "seed": seed,
        "solver_config": SolverConfig(
            precond="nystrom" if precond_rank else "none",
            precond_rank=precond_rank or None,
            max_dense_bytes=max_dense_bytes,
            warm_start=warm_start,
            share_precond=share_precond,
        ),
        "products": ProductConfig(batch_size=batch_size, autocast=autocast),
        "params": params,
    }
    if ridge is not None:
        kwargs["ridge"] = ridge
    else:
        kwargs["weight_decay"] = RECIPE["weight_decay"]
    mem = MemoryMeter(device)
    try:
        with mem, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # non-convergence is recorded below
            seconds, res = timed(
                lambda: scrub(problem.model, problem.retain, problem.forget, **kwargs), device
            )
    except DenseTooLarge as err:
        rec.update({"status": "skipped", "reason": f"DenseTooLarge: {err}"})
        return rec
    except Exception as err:  # noqa: BLE001 - a failure is a data point, not a crash
        free_memory(device)
        status = "oom" if is_oom(err) else "error"
        rec.update({"status": status, "reason": f"{type(err).__name__}: {str(err)[:300]}"})
        return rec
    rec.update({"status": "ok", "seconds": seconds, **_scrub_summary(res.info), **mem.to_dict()})
    return rec


def run_scrubber(
    problem: ScrubProblem,
    device: torch.device,
    *,
    requests: list[list[int]],
    batch_size: int,
    tol: float = 1e-4,
    max_iter: int = 300,
    params: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """:class:`ntkscrub.Scrubber` over ``problem.data`` (cg, the library's default
    preconditioner, the settings of :func:`run_scrub`), then ``requests`` in turn (positions in
    D): the preparation's and each request's seconds, products and convergence, and the peak
    memory of the whole. Out-of-memory and other errors become ``status`` ``'oom'``/``'error'``."""
    from ntkscrub import Scrubber
    from ntkscrub.config import ProductConfig

    rec: dict[str, Any] = {"solver": "cg", "batch_size": batch_size, "tol": tol,
                           "max_iter": max_iter, "params_selected": params}  # fmt: skip
    mem = MemoryMeter(device)
    try:
        with mem, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # non-convergence is recorded below
            seconds, s = timed(
                lambda: Scrubber(problem.model, problem.data, init=problem.init, loss="ce",
                                 weight_decay=RECIPE["weight_decay"], solver="cg", tol=tol,
                                 max_iter=max_iter, params=params, seed=seed,
                                 products=ProductConfig(batch_size=batch_size)),
                device,
            )  # fmt: skip
            rec["prepare"] = {"seconds": seconds, "matvecs": s.prepare_info["matvecs"],
                              "converged": s.prepare_info["converged"]}  # fmt: skip
            rec["requests"] = []
            for idx in requests:
                seconds, res = timed(lambda idx=idx: s.forget(idx), device)
                rec["requests"].append({"n_new": len(idx), "seconds": seconds,
                                        "matvecs": res.info["request"]["matvecs"],
                                        "converged": res.info["converged"]})  # fmt: skip
    except Exception as err:  # noqa: BLE001 - a failure is a data point, not a crash
        free_memory(device)
        status = "oom" if is_oom(err) else "error"
        rec.update({"status": status, "reason": f"{type(err).__name__}: {str(err)[:300]}"})
        return rec
    rec.update({"status": "ok", **mem.to_dict()})
    return rec


def _scrub_summary(info: dict[str, Any]) -> dict[str, Any]:
    """Matvecs, CG iterations, preconditioner cost, residuals and memory of a scrub's info."""
    solves = info.get("solves", [])
    cg_solves = [s for s in solves if s.get("solver") == "cg"]
    residuals = [max(s.get("residuals") or [0.0]) for s in cg_solves]
    residuals += [float(s.get("max_residual") or 0.0) for s in solves if s.get("solver") == "dense"]
    return {
        "matvecs": info["matvecs"],
        "cg_iterations": [s.get("iterations") for s in cg_solves],
        "cg_iterations_total": sum(int(s.get("iterations") or 0) for s in cg_solves),
        "precond_matvecs": sum(int(s.get("precond_matvecs") or 0) for s in solves),
        "precond_seconds": sum(float(s.get("precond_seconds") or 0.0) for s in solves),
        "max_residual": max(residuals + [0.0]),
        "converged": all(s.get("all_converged", True) for s in solves),
        "solve_seconds": [s.get("seconds_total", s.get("seconds")) for s in solves],
        "library_peak_memory_mib": info.get("peak_memory_mib"),
        "library_peak_memory_kind": info.get("peak_memory_kind"),
        "shift_norm": info.get("shift_norm"),
        "p_linearised": info.get("p"),
        "prefix_cache": info.get("prefix_cache"),
    }


# ------------------------------------------------------------------------------ JSON output
@dataclass(frozen=True)
class BenchConfig:
    """What one ``--bench-size`` runs. Model labels are :class:`ModelSpec` strings."""

    name: str
    rounds: int  # timed rounds per pytest-benchmark measurement (after a warm-up on a prefix)
    engine_models: tuple[str, ...]
    engine_n: tuple[int, ...]
    engine_batch: int
    engine_vectors: tuple[int, ...]
    accuracy_n: int  # samples on which Θv is compared against float64
    cg_model: str
    cg_n: int
    cg_ranks: tuple[int, ...]  # 0 = no preconditioner
    cg_max_iter: int
    cg_pretrain_epochs: int
    cg_finetune_epochs: int
    scaling_models: tuple[str, ...]
    scaling_n: tuple[int, ...]
    size_models: tuple[str, ...]
    size_n: int
    variant_n: int  # N of the speed-knob comparison (first scaling model)
    scrub_batch: int
    scrub_rank: int
    max_dense_bytes: float


CONFIGS: dict[str, BenchConfig] = {
    # Seconds on two shared CPU cores: real runs of every code path at toy sizes. The dense cap
    # (128 MiB) is set so that the larger N hit DenseTooLarge and the skip path is exercised.
    "smoke": BenchConfig(
        name="smoke",
        rounds=1,
        engine_models=("mlp-w0.25-c5", "smallcnn-w1-c5"),
        engine_n=(64,),
        engine_batch=32,
        engine_vectors=(1, 8),
        accuracy_n=16,
        cg_model="smallcnn-w1-c5",
        cg_n=48,
        cg_ranks=(0, 8),
        cg_max_iter=100,
        cg_pretrain_epochs=1,
        cg_finetune_epochs=2,
        scaling_models=("mlp-w0.25-c5",),
        scaling_n=(16, 32, 64, 128),
        size_models=("mlp-w0.25-c5", "smallcnn-w1-c5"),
        size_n=16,
        variant_n=64,
        scrub_batch=64,
        scrub_rank=8,
        max_dense_bytes=128 * 2**20,
    ),
    # A few minutes on two CPU cores.
    "cpu": BenchConfig(
        name="cpu",
        rounds=1,
        engine_models=("mlp-w1-c5", "allcnn-w0.25-c5"),
        engine_n=(128,),
        engine_batch=64,
        engine_vectors=(1, 8),
        accuracy_n=16,
        cg_model="allcnn-w0.1-c5",
        cg_n=100,
        cg_ranks=(0, 16),
        cg_max_iter=300,
        cg_pretrain_epochs=2,
        cg_finetune_epochs=3,
        scaling_models=("mlp-w0.25-c5",),
        scaling_n=(32, 64, 128, 256, 512, 1024, 2048),
        size_models=(
            "mlp-w0.25-c5",
            "smallcnn-w1-c5",
            "allcnn-w0.1-c5",
            "allcnn-w0.25-c5",
            "resnet18-w0.1-c5",
        ),
        size_n=32,
        variant_n=256,
        scrub_batch=128,
        scrub_rank=16,
        max_dense_bytes=512 * 2**20,
    ),
    # The sizes, for a GPU (about an hour in full; gpu_suite.py is the budgeted run).
    "gpu": BenchConfig(
        name="gpu",
        rounds=3,
        engine_models=("allcnn-w1-c5", "resnet18-w0.4-c5", "resnet18-w1-c10"),
        engine_n=(5000, 50000),
        engine_batch=512,
        engine_vectors=(1, 8),
        accuracy_n=256,
        cg_model="resnet18-w0.4-c5",
        cg_n=500,
        cg_ranks=(0, 25, 100),
        cg_max_iter=500,
        cg_pretrain_epochs=5,
        cg_finetune_epochs=10,
        scaling_models=("allcnn-w1-c5", "resnet18-w1-c10"),
        scaling_n=(100, 500, 2000, 5000, 20000, 50000),
        size_models=("mlp-w1-c10", "allcnn-w1-c5", "resnet18-w0.4-c5", "resnet18-w1-c10"),
        size_n=5000,
        variant_n=5000,
        scrub_batch=256,
        scrub_rank=32,
        max_dense_bytes=24 * 2**30,
    ),
}


# ------------------------------------------------------------------------ measuring helpers
def bench_call(
    benchmark: Any, fn: Callable[[], Any], device: torch.device, rounds: int
) -> tuple[float, list[float], Any]:
    """Run ``fn`` under pytest-benchmark (``pedantic``, ``rounds`` rounds of one call) and also
    time every call ourselves (synchronised), so the seconds are in ``extra_info`` even with
    ``--benchmark-disable``. Returns ``(min seconds, all seconds, last result)``."""
    times: list[float] = []
    box: dict[str, Any] = {}

    def wrapped() -> None:
        sec, box["out"] = timed(fn, device)
        times.append(sec)

    benchmark.pedantic(wrapped, rounds=rounds, iterations=1, warmup_rounds=0)
    return min(times), times, box.get("out")


def ce_residual(K: NTK) -> Tensor:
    """``onehot(y) − softmax f(x)`` flat ``(c·N,)`` at the operator's point (the scrub's ``e``)."""
    J = K.jac_a
    f = J.outputs()
    onehot = F.one_hot(J.labels().long(), J.c).to(f.dtype)
    return (onehot - torch.softmax(f, dim=1)).reshape(-1)


def cg_solve_record(
    K: NTK,
    B: Tensor,
    *,
    rank: int,
    tol: float,
    max_iter: int,
    seed: int = 0,
    K_build: NTK | None = None,
) -> dict[str, Any]:
    """Solve ``(Θ + λI) X = B`` by the library's CG, with a Nyström preconditioner of ``rank``
    (0: none) built inside the call, and return iterations and matvecs (build included).

    ``K_build``: the same operator with a smaller batch for the rank-column build block (the
    library applies all columns of a block in one ``vmap``, so memory grows with batch × rank).
    """
    from ntkscrub.solvers import NystromPreconditioner, cg

    device = B.device
    Kb = K_build if K_build is not None else K
    before, before_b = K.matvecs, Kb.matvecs
    t0 = time.perf_counter()
    M = None
    build_mv, build_s = 0, 0.0
    if rank > 0:
        M = NystromPreconditioner(
            Kb,
            K.shape[0],
            rank,
            shift=K.ridge,
            includes_shift=True,
            seed=seed,
            dtype=B.dtype,
            device=device,
        )
        build_mv, build_s = Kb.matvecs - before_b, M.seconds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-convergence is recorded
        _, info = cg(K, B, precond=M, tol=tol, max_iter=max_iter, strict=False)
    sync(device)
    return {
        "precond_rank": rank,
        "iterations": info.iterations,
        "iterations_per_column": info.iterations_per_column,
        "matvecs_total": K.matvecs - before + (build_mv if Kb is not K else 0),
        "build_batch_size": Kb.jac_a.data.batch_size,
        "batch_size": K.jac_a.data.batch_size,
        "precond_matvecs": build_mv,
        "precond_seconds": build_s,
        "cg_matvecs": info.matvecs,
        "converged": info.all_converged,
        "max_residual": max(info.residuals),
        "restarts": info.restarts,
        "seconds": time.perf_counter() - t0,
        "tol": tol,
        "max_iter": max_iter,
        "size": K.shape[0],
        "ridge": K.ridge,
        "history": [float(h) for h in info.history],
    }


def size_params(config: pytest.Config, values: list[Any], ids: list[str] | None = None) -> list:
    """Wrap parameter values in ``pytest.param``, marked ``smoke`` at the smoke size."""
    marks = [pytest.mark.smoke] if config.getoption("--bench-size") == "smoke" else []
    ids = ids or [str(v) for v in values]
    return [pytest.param(v, marks=marks, id=i) for v, i in zip(values, ids)]
