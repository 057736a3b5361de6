"""The scaling set in one budgeted run: matvec vs epoch, CG ± preconditioner, dense and CG scrubs
over N against retraining, with peak memory throughout.

Usage (GPU)::

    python benchmarks/gpu_suite.py --out DIR --budget-seconds 300

and on the CPU, the same code paths at toy sizes (< 60 s)::

    python benchmarks/gpu_suite.py --out DIR --device cpu --tiny

Stages, in order (each gets a share of the budget; time a stage leaves unused passes on):

1. ``engine``: for All-CNN f=1 c=5, ResNet-18 ×0.4 c=5, ResNet-18 ×1 c=10 at N=5000, in TF32,
   strict fp32 and bf16 autocast: one training epoch (forward + backward + SGD step, BN eval), one
   Θ matvec with 1 vector and with 8 (vmap), peak memory of each, and the accuracy of the
   precision against float64 (Θv error and the true residual of a CG solve).
2. ``cg``: ResNet-18 ×0.4 c=5 on N=500 (the small-CIFAR size), in strict fp32 (what ``scrub``
   runs: TF32 stalls CG near 4e-2), θ0 briefly pre-trained on other
   random data and w(D) fine-tuned with the recipe: CG iterations to 1e-4 at both linearisation
   points without and with the Nyström preconditioner (matvecs include its build).
3. ``dense``: scrub with ``solver='dense'`` (and ``'cg'`` at the same N) for N = 25, 50, 100, ...
   until the library refuses with ``DenseTooLarge`` (recorded with its message) or memory ends.
4. ``scrub:<model>``: scrub (CG) for All-CNN and ResNet-18 ×1 over N = 500 … 50,000 against the
   retrain time (measured epoch of the recipe on D_r × 25 epochs); points the budget cannot hold
   are recorded as skipped, and the largest N gets an *estimated* record (matvecs of the largest
   measured N × the measured matvec time at that N), marked ``status='estimated'``.
5. ``engine_large``: matvec (1 vector) vs epoch at N=50,000 for the three models.
6. ``partial_large:<model>``: a converged scrub of ResNet-18 ×1 c=10 at N=50,000 with only its
   last block and head linearised (``PARTIAL``; the frozen prefix runs once), against the
   retrain of the same problem (``kind='partial'``).
7. ``requests:<model>``: amortised deletion requests on that problem (``Scrubber``
   preparation, then two requests of |D_f| samples each), each against the retrain
   (``kind='requests'``; the issue's goal ≤ 0.1×).
8. ``scrub_large:<model>``: one scrub of ResNet-18 ×1 c=10 at N=50,000 with the CG iteration cap
   the remaining time allows (``kind='capped'``: peak memory against a training step at the same
   batch size, seconds per iteration, the residual reached; not a converged scrub).
9. ``variants``: speed knobs of one scrub (All-CNN, N=5000): preconditioner on/off, batch size,
   warm start — on whatever time the stages above left.
10. ``compile`` (only with ``--compile``): torch.compile of the per-batch JVP/VJP and of the
   training step, All-CNN at N=5000.

Budget: before every measurement its cost is estimated from per-sample costs probed on one batch
(or from the previous point) and the measurement is skipped (recorded as such) when it would not
fit. CG iteration caps are derived from the time left, so no solve can run away. Results are
written after every record, atomically, to ``DIR/results.json``; ``DIR/report.md`` and the plots
are written at the end (``python benchmarks/report.py DIR/results.json --out DIR`` renders a
partial file at any time). A run killed half-way leaves everything measured so far.

Data: random CIFAR-shaped tensors (N(0,1) pixels, uniform labels) created on the device from
seeded generators. Works with torch ≥ 2.4 (only long-standing APIs; TF32 through the legacy
flags, with a fallback to the ``fp32_precision`` API).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# Run as a script: make the sibling modules importable wherever the command is started from.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import cases  # noqa: E402
import torch  # noqa: E402
from benchlib import PRECISIONS, MemoryMeter, ModelSpec  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from ntkscrub.io import to_jsonable, write_record  # noqa: E402
from ntkscrub.recipes.runtime import Budget, hardware  # noqa: E402

SAFETY = 1.3  # estimates are multiplied by this before comparing with the time left
# The last block and the head of each model (partial_large): a suffix with one value crossing
# into it, so that ntkscrub.prefix caches the frozen part.
PARTIAL = {
    "resnet18": r"^(layer4\.1\.|classifier\.)",
    "allcnn": r"^(features\.9\.|classifier\.)",
    "smallcnn": r"^(features\.2\.|classifier\.)",
    "mlp": r"^classifier\.",
}


# ------------------------------------------------------------------------------------ config
@dataclass
class SuiteConfig:
    """Sizes of one suite run (``FULL`` on a GPU, ``TINY`` for a quick check anywhere)."""

    engine_models: tuple[str, ...]
    engine_n: int
    engine_large_n: int
    engine_batch: int
    engine_vectors: int
    precisions: tuple[str, ...]
    large_precisions: tuple[str, ...]
    accuracy_n: int
    cg_model: str
    cg_precision: str  # of the CG-stage operator; "fp32" = what scrub() runs (TF32 off)
    cg_n: int
    cg_ranks: tuple[int, ...]
    cg_max_iter: int
    cg_pretrain_epochs: int
    cg_finetune_epochs: int
    dense_model: str
    dense_n: tuple[int, ...]
    dense_max_bytes: float | None  # None: a quarter of the device's memory
    scrub_models: tuple[str, ...]
    scrub_precision: str  # what scrub() runs in (TF32 guard: "fp32"); sets the cost probes
    large_scrub_models: tuple[str, ...]  # scrubbed once at engine_large_n with a time-capped CG
    scrub_n: tuple[int, ...]
    scrub_tol: float
    scrub_max_iter: int
    variant_n: int  # N of the speed-knob comparison (first scrub model)
    default_rank: int
    memory_fraction: float  # of free device memory a vmap block may use (sets the batch)
    cpu_memory_bytes: float  # what "free memory" means on the CPU
    compile_model: str
    compile_estimate_s: float = 150.0  # compiling the VJP, JVP and training step (no probe)
    image_size: int = 32
    default_budget: float = 300.0
    shares: dict[str, float] = field(default_factory=dict)


SHARES = {
    "engine": 0.22,
    "cg": 0.16,
    "dense": 0.08,
    "scrub": 0.36,  # split evenly between the scrub models
    "engine_large": 0.18,
    "partial_large": 0.3,  # plus what earlier stages left; before scrub_large, which takes the rest
    "requests": 0.2,  # Scrubber on partial_large's problem (before scrub_large frees it)
    "scrub_large": 0.0,  # what the others leave (the whole budget with --stages scrub_large)
    "variants": 0.0,  # only what the others leave
    "compile": 0.0,  # likewise
}

# Models and precisions in priority order: when the budget runs short, the tail is skipped.
FULL = SuiteConfig(
    engine_models=("resnet18-w1-c10", "allcnn-w1-c5", "resnet18-w0.4-c5"),
    engine_n=5000,
    engine_large_n=50000,
    engine_batch=512,
    engine_vectors=8,
    precisions=("tf32", "bf16", "fp32"),
    large_precisions=("tf32", "bf16", "fp32"),
    accuracy_n=64,
    cg_model="resnet18-w0.4-c5",
    cg_precision="fp32",
    cg_n=500,
    cg_ranks=(0, 25, 100),
    cg_max_iter=300,
    cg_pretrain_epochs=3,
    cg_finetune_epochs=10,
    dense_model="allcnn-w1-c5",
    dense_n=(25, 50, 100, 200, 400, 800, 1600),
    dense_max_bytes=None,
    scrub_models=("allcnn-w1-c5", "resnet18-w1-c10"),
    scrub_precision="fp32",
    large_scrub_models=("resnet18-w1-c10",),
    scrub_n=(500, 2000, 5000, 20000, 50000),
    scrub_tol=1e-4,
    scrub_max_iter=300,
    variant_n=5000,
    default_rank=16,
    memory_fraction=0.35,
    cpu_memory_bytes=2 * 2**30,
    compile_model="allcnn-w1-c5",
    shares=dict(SHARES),
)

# Toy sizes: every stage and code path of FULL (ResNet and All-CNN engines, bf16 work-arounds,
# both CG points, DenseTooLarge reached at N=32, budget skips, estimates) in well under a minute
# on two CPU cores.
TINY = SuiteConfig(
    engine_models=("resnet18-w0.05-c10", "allcnn-w0.05-c5"),
    engine_n=16,
    engine_large_n=32,
    engine_batch=8,
    engine_vectors=8,
    precisions=("tf32", "bf16", "fp32"),
    large_precisions=("tf32", "bf16", "fp32"),
    accuracy_n=8,
    cg_model="smallcnn-w1-c5",
    cg_precision="fp32",
    cg_n=16,
    cg_ranks=(0, 8),
    cg_max_iter=60,
    cg_pretrain_epochs=1,
    cg_finetune_epochs=2,
    dense_model="allcnn-w0.05-c5",
    dense_n=(8, 16, 32, 64),
    dense_max_bytes=1 * 2**20,  # J_r at N=16 needs 1.07 MiB: DenseTooLarge there
    scrub_models=("allcnn-w0.05-c5", "smallcnn-w1-c10"),
    scrub_precision="fp32",
    large_scrub_models=("smallcnn-w1-c10",),
    scrub_n=(8, 16, 32),
    scrub_tol=1e-4,
    scrub_max_iter=60,
    variant_n=16,
    default_rank=4,
    memory_fraction=0.35,
    cpu_memory_bytes=1 * 2**30,
    compile_model="allcnn-w0.05-c5",
    compile_estimate_s=60.0,
    image_size=16,  # 3×16×16: a quarter of the convolution work of CIFAR's 32×32
    default_budget=50.0,  # a guaranteed bound: the toy run must stay under a minute
    shares=dict(SHARES),
)


# ------------------------------------------------------------------------------------- suite
class Suite:
    """Runs the stages, keeps the results document and writes it after every change."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = benchlib.resolve_device(args.device)
        self.cfg = TINY if args.tiny else FULL
        if args.share:
            shares = dict(self.cfg.shares)
            for item in args.share:
                name, _, frac = item.partition("=")
                if name not in shares or not frac:
                    raise SystemExit(
                        f"--share {item!r}: expected STAGE=FRACTION, STAGE one of {list(SHARES)}"
                    )
                shares[name] = float(frac)
            self.cfg = replace(self.cfg, shares=shares)
        if args.budget_seconds is None:
            args.budget_seconds = self.cfg.default_budget
        if args.reserve_seconds is None:
            args.reserve_seconds = max(3.0, 0.05 * args.budget_seconds)
        benchlib.set_image_size(self.cfg.image_size)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "results.json"
        self.budget = Budget(args.budget_seconds, reserve=args.reserve_seconds)
        self.timer = cases.clock_timer(self.device)
        self.costs: dict[tuple[str, str], dict[str, float]] = {}  # probe results per (model, prec)
        self.accuracy: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.warm: dict = {}  # (model, solver, device) pairs already warmed up
        self._problem_key: tuple[str, int] | None = None  # the one cached scrub problem
        self._problem: benchlib.ScrubProblem | None = None
        self._retrain: dict[str, Any] = {}
        self.doc: dict[str, Any] = {
            "schema": benchlib.SCHEMA,
            "suite": "gpu_suite",
            "command": " ".join(sys.argv),
            "budget_seconds": args.budget_seconds,
            "tiny": bool(args.tiny),
            "hardware": hardware(self.device),
            "config": asdict(self.cfg),
            "conventions": {
                "data": f"random N(0,1) images {'x'.join(map(str, benchlib.IMAGE_SHAPE))}, "
                "uniform random labels, seeded, created on the device",
                "retrain": f"measured epoch of ntkscrub.training.train on D_r with "
                f"{benchlib.RECIPE} x {benchlib.RETRAIN_EPOCHS} epochs",
                "scrub": "linearize_at=init, loss=ce, weight_decay=0.1 (ridge N*0.1), "
                "form=solves, tol 1e-4 per column, strict=False",
                "memory": "delta_mib = peak above the allocation at call start; "
                "peak_mib absolute (cuda max_memory_allocated / cpu sampled RSS)",
            },
            "stages": {},
            "records": [],
        }
        self.save()

    # -------------------------------------------------------------------------- bookkeeping
    def save(self) -> None:
        self.doc["elapsed_seconds"] = self.budget.elapsed()
        write_record(self.path, self.doc)

    def add(self, **rec: Any) -> dict[str, Any]:
        rec.setdefault("status", "ok")
        rec.setdefault("device", str(self.device))
        rec["t_elapsed"] = round(self.budget.elapsed(), 2)
        stored = to_jsonable(rec)
        self.doc["records"].append(stored)
        self.save()
        return stored  # the document's own copy: a caller may add fields, then save()

    def skip(self, why: str, **rec: Any) -> None:
        self.add(status="skipped", reason=why, **rec)

    def log(self, msg: str) -> None:
        print(f"[{self.budget.elapsed():7.1f}s] {msg}", flush=True)

    def run_stage(self, name: str, share: float, fn: Callable[[], None]) -> None:
        """Run a stage within its allowance; errors are recorded, never propagated."""
        if self.args.stages and not any(name.startswith(s) for s in self.args.stages):
            return
        allowance = self.budget.start_stage(share)
        entry: dict[str, Any] = {"allowance_seconds": round(allowance, 1), "status": "running"}
        self.doc["stages"][name] = entry
        self.save()
        t0 = time.perf_counter()
        if allowance < 1.0:
            entry["status"] = "skipped (no time left)"
        else:
            self.log(f"stage {name}: {allowance:.0f} s allowed")
            try:
                fn()
                entry["status"] = "done"
            except Exception as err:  # noqa: BLE001 - one stage failing must not end the run
                entry["status"] = "oom" if benchlib.is_oom(err) else "error"
                entry["error"] = f"{type(err).__name__}: {err}"[:500]
                entry["traceback"] = traceback.format_exc()[-3000:]
                self.log(f"stage {name} failed: {entry['error']}")
                benchlib.free_memory(self.device)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        self.budget.end_stage()
        self.save()  # the JSON is always current; report.py renders it at any time

    def write_report(self) -> None:
        try:
            import report

            report.write_report([self.path], self.out, title=f"gpu_suite ({self.device.type})")
        except Exception as err:  # noqa: BLE001 - the JSON is the result; the report is a view
            self.log(f"report failed: {type(err).__name__}: {err}")

    # ------------------------------------------------------------------------------ memory
    def free_bytes(self) -> float:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return float(free)
        return self.cfg.cpu_memory_bytes

    def batch_for(self, label: str, vectors: int, cap: int) -> int:
        """Largest power-of-two batch whose ``vectors``-column vmap block fits the memory share."""
        probed = [c.get("mib_per_sample_vector") for (m, _), c in self.costs.items() if m == label]
        mps = max([m for m in probed if m] or [8.0])
        budget = self.cfg.memory_fraction * self.free_bytes() / 2**20
        b = max(1, int(budget / (mps * max(1, vectors))))
        return max(1, min(cap, 2 ** int(math.log2(b))))

    # ------------------------------------------------------------------------------- probes
    def probe(self, label: str, prec_name: str) -> dict[str, float]:
        """Per-sample seconds of a training step, a 1-vector and a k-vector matvec, and MiB per
        (sample × vector), measured on one batch after a warm-up call. Cached."""
        key = (label, prec_name)
        if key in self.costs:
            return self.costs[key]
        spec = ModelSpec.parse(label)
        prec = PRECISIONS[prec_name]
        bs, k = self.cfg.engine_batch, self.cfg.engine_vectors
        X, Y = benchlib.random_cifar(bs, spec.num_classes, self.device, prec.dtype, seed=5)
        model = benchlib.calibrate_bn(benchlib.make_model(spec, self.device, prec.dtype), X)
        step = benchlib.make_train_epoch(model, X, Y, batch_size=bs, prec=prec)
        step()
        t_step, _ = benchlib.timed(step, self.device)
        K = benchlib.make_ntk(model, X, Y, batch_size=bs, prec=prec)
        mv1 = benchlib.make_matvec(K, 1, prec, self.device)
        mv1()
        t1, _ = benchlib.timed(mv1, self.device)
        mvk = benchlib.make_matvec(K, k, prec, self.device)
        with MemoryMeter(self.device) as mem:
            tk, _ = benchlib.timed(mvk, self.device)
        mps = mem.delta_mib / (bs * k) if mem.delta_mib > 0 else None
        out = {
            "train_s_per_sample": t_step / bs,
            "mv1_s_per_sample": t1 / bs,
            "mvk_s_per_sample": tk / bs,
            "mib_per_sample_vector": mps,
        }
        self.costs[key] = out
        self.add(kind="probe", model=label, precision=prec_name, batch_size=bs, vectors=k, **out)
        del model, K, X, Y
        benchlib.free_memory(self.device)
        return out

    # ------------------------------------------------------------------------------- engine
    def engine_case(
        self,
        label: str,
        n: int,
        precs: tuple[str, ...],
        vectors: tuple[int, ...],
        compare_1d: bool = True,
    ) -> None:
        """Epoch and matvecs for one model at one N in several precisions (the cases of
        ``test_bench_engine.py``, :mod:`cases`), as far as the budget allows."""
        spec, dev, bs = ModelSpec.parse(label), self.device, self.cfg.engine_batch
        for prec_name in precs:
            base = {"model": label, "n": n, "precision": prec_name, "batch_size": bs}
            c = self.probe_or_skip(label, prec_name, base)
            if c is None:
                continue
            est = n * (c["train_s_per_sample"] + (3 if compare_1d else 1) * c["mv1_s_per_sample"])
            est += n * c["mvk_s_per_sample"] if self.cfg.engine_vectors in vectors else 0.0
            if not self.budget.fits(est, SAFETY):
                left = self.budget.left()
                self.skip(
                    f"budget: est {est:.1f} s > {left:.1f} s left", kind="matvec", vectors=1, **base
                )
                continue
            prec = PRECISIONS[prec_name]
            X, Y = benchlib.random_cifar(n, spec.num_classes, dev, prec.dtype, seed=1)
            model = benchlib.calibrate_bn(benchlib.make_model(spec, dev, prec.dtype), X)
            ep = cases.train_epoch(label, model, (X, Y), prec_name, bs, dev, self.timer)
            self.add(**ep)
            self.log(f"{label} N={n} {prec_name}: epoch {ep['seconds']:.3f} s")
            for k in vectors:
                self.matvec_case(label, model, (X, Y), prec_name, k, ep, c, compare_1d and k == 1)
            self.accuracy_case(label, model, (X, Y), prec_name, c)
            del model, X, Y
            benchlib.free_memory(dev)

    def probe_or_skip(self, label: str, prec_name: str, base: dict) -> dict[str, float] | None:
        """The probe's per-sample costs, or ``None`` after recording why there are none."""
        try:
            return self.probe(label, prec_name)
        except Exception as err:  # noqa: BLE001 - e.g. the bf16 path failing: record, go on
            why = f"probe failed: {type(err).__name__}: {str(err)[:300]}"
            self.skip(why, kind="matvec", vectors=1, **base)
            benchlib.free_memory(self.device)
            return None

    def matvec_case(
        self,
        label: str,
        model: nn.Module,
        data: tuple[Tensor, Tensor],
        prec_name: str,
        k: int,
        epoch: dict[str, Any],
        costs: dict[str, float],
        compare_1d: bool,
    ) -> None:
        """One Θ matvec with ``k`` vectors (:func:`cases.theta_matvec`), budget permitting; with
        ``compare_1d`` also the plain 1-D JVP/VJP path (linear_operator hands ``_matmul`` an
        (n, 1) block, so the library path vmaps over one column)."""
        n, bs, dev = data[0].shape[0], self.cfg.engine_batch, self.device
        base = {"model": label, "n": n, "precision": prec_name, "batch_size": bs}
        per = costs["mv1_s_per_sample"] if k == 1 else costs["mvk_s_per_sample"] * k
        est = n * (per if k == 1 else per / self.cfg.engine_vectors)
        if not self.budget.fits(est, SAFETY):
            self.skip(f"budget: est {est:.1f} s", kind="matvec", vectors=k, **base)
            return
        try:
            rec = cases.theta_matvec(label, model, data, prec_name, bs, k, dev, self.timer, epoch)
            if compare_1d:
                prec = PRECISIONS[prec_name]
                J = benchlib.make_ntk(model, *data, batch_size=bs, prec=prec).jac_a
                v = benchlib.random_block(J.shape[0], 1, dev, J.dtype, seed=3)
                with benchlib.precision_flags(prec, dev):
                    rec["seconds_plain_1d"] = self.timer(lambda: J.matvec(J.rmatvec(v)))[0]
        except Exception as err:  # noqa: BLE001
            benchlib.free_memory(dev)
            st = "oom" if benchlib.is_oom(err) else "error"
            why = f"{type(err).__name__}: {str(err)[:300]}"
            self.add(status=st, reason=why, kind="matvec", vectors=k, **base)
            return
        self.add(**rec)
        self.log(
            f"{label} N={n} {prec_name}: matvec k={k} {rec['seconds']:.3f} s "
            f"({rec['ratio_per_vector_to_epoch']:.2f} epochs per vector)"
        )

    def accuracy_case(
        self,
        label: str,
        model: nn.Module,
        data: tuple[Tensor, Tensor],
        prec_name: str,
        costs: dict[str, float],
    ) -> None:
        """Accuracy against float64 on a subset (cheap), once per (model, precision), attached
        to every matvec record of that model and precision."""
        na = min(self.cfg.accuracy_n, data[0].shape[0])
        akey = ("acc", label, prec_name)
        if akey not in self.accuracy and self.budget.fits(
            na * costs["mv1_s_per_sample"] * 60, SAFETY
        ):
            try:
                self.accuracy[akey] = benchlib.precision_accuracy(
                    model,
                    data[0][:na],
                    data[1][:na],
                    prec=PRECISIONS[prec_name],
                    batch_size=min(self.cfg.engine_batch, na),
                    power_iterations=10,
                )
                self.add(kind="accuracy", model=label, precision=prec_name, **self.accuracy[akey])
            except Exception as err:  # noqa: BLE001
                why = f"{type(err).__name__}: {str(err)[:300]}"
                self.add(
                    status="error", kind="accuracy", model=label, precision=prec_name, reason=why
                )
        if akey not in self.accuracy:
            return
        for r in self.doc["records"]:
            same = r.get("model") == label and r.get("precision") == prec_name
            if r.get("kind") == "matvec" and same and r.get("status") == "ok":
                r.update(to_jsonable(self.accuracy[akey]))
        self.save()

    def stage_engine(self) -> None:
        for label in self.cfg.engine_models:
            self.engine_case(
                label, self.cfg.engine_n, self.cfg.precisions, (1, self.cfg.engine_vectors)
            )

    def stage_engine_large(self) -> None:
        for label in self.cfg.engine_models:  # priority order: the headline model first
            self.engine_case(
                label, self.cfg.engine_large_n, self.cfg.large_precisions, (1,), compare_1d=False
            )

    # ----------------------------------------------------------------------------------- cg
    def stage_cg(self) -> None:
        cfg, dev = self.cfg, self.device
        c = self.probe(cfg.cg_model, cfg.cg_precision)
        spec = ModelSpec.parse(cfg.cg_model)
        prob = benchlib.make_scrub_problem(
            spec,
            cfg.cg_n,
            dev,
            pretrain_epochs=cfg.cg_pretrain_epochs,
            finetune_epochs=cfg.cg_finetune_epochs,
        )
        X, Y = prob.data
        n = X.shape[0]
        ridge = n * benchlib.RECIPE["weight_decay"]
        bs = min(n, cfg.engine_batch)
        mv_s = n * c["mv1_s_per_sample"]
        # rank-major: if time runs short the largest rank goes, at both points alike
        solves = [(pt, r) for r in cfg.cg_ranks for pt in ("init", "trained")]
        base_its: dict[str, dict[str, Any]] = {}
        for i, (point, rank) in enumerate(solves):
            model = prob.init if point == "init" else prob.model
            prec = PRECISIONS[cfg.cg_precision]
            build_s = n * c["mvk_s_per_sample"] * rank / cfg.engine_vectors
            # iteration cap: this solve's share of what is left, at one matvec per iteration
            share = self.budget.left() / (len(solves) - i)
            cap = int(min(cfg.cg_max_iter, max(5, (share / SAFETY - build_s) / max(mv_s, 1e-9))))
            if not self.budget.fits(build_s + 5 * mv_s, SAFETY):
                self.skip(
                    "budget", kind="cg", model=cfg.cg_model, n=n, point=point, precond_rank=rank
                )
                continue
            with benchlib.precision_flags(prec, dev):
                K = benchlib.make_ntk(model, X, Y, batch_size=bs, prec=prec, ridge=ridge)
                Kb = None
                if rank:
                    bb = self.batch_for(cfg.cg_model, rank, bs)
                    Kb = benchlib.make_ntk(model, X, Y, batch_size=bb, prec=prec, ridge=ridge)
                e = benchlib.ce_residual(K)
                with MemoryMeter(dev) as mem:
                    rec = benchlib.cg_solve_record(
                        K, e, rank=rank, tol=1e-4, max_iter=cap, seed=0, K_build=Kb
                    )
            if rank == 0:
                base_its[point] = rec
            record = cases.cg_record(cfg.cg_model, prob, point, rec, base_its.get(point))
            self.add(**record, precision=cfg.cg_precision, **mem.to_dict())
            self.log(
                f"cg {point} rank {rank}: {rec['iterations']} its, "
                f"{rec['matvecs_total']} matvecs, converged={rec['converged']}"
            )
            del K, Kb
        benchlib.free_memory(dev)

    def chosen_rank(self) -> tuple[int, str]:
        """Preconditioner rank for the scrubs: the rank of the ``cg`` stage with the fewest total
        matvecs (build included) at the init point among converged solves; default otherwise."""
        cands = [
            r
            for r in self.doc["records"]
            if r.get("kind") == "cg"
            and r.get("status") == "ok"
            and r.get("point") == "init"
            and r.get("converged")
        ]
        if not cands:
            return self.cfg.default_rank, "default (no converged cg-stage result)"
        best = min(cands, key=lambda r: r["matvecs_total"])
        return int(best["precond_rank"]), (
            f"fewest matvecs incl. build in the cg stage ({best['matvecs_total']} at rank "
            f"{best['precond_rank']})"
        )

    # -------------------------------------------------------------------------------- scrub
    def problem_for(self, spec: ModelSpec, n: int) -> tuple[benchlib.ScrubProblem, dict[str, Any]]:
        """The scrub problem at (model, N) and its measured retrain; consecutive points (and
        stages) at the same (model, N) share one."""
        key = (spec.label, n)
        if self._problem_key != key:
            self._problem = None
            benchlib.free_memory(self.device)
            self._problem = benchlib.make_scrub_problem(spec, n, self.device)
            self._retrain = benchlib.measure_retrain(self._problem, self.device)
            self._problem_key = key
        return self._problem, self._retrain

    def scrub_point(
        self,
        label: str,
        n: int,
        solver: str,
        rank: int,
        batch: int,
        max_iter: int,
        max_dense: float,
        kind: str = "scaling",
        note: str = "",
        variant: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Problem, retrain measurement and one scrub at (model, N); records and returns it.
        ``options`` go to :func:`benchlib.run_scrub` (``warm_start``, ``form``, ...)."""
        dev = self.device
        spec = ModelSpec.parse(label)
        benchlib.warm_up_scrub(spec, dev, solver, batch, self.warm)
        prob, rt = self.problem_for(spec, n)
        rec = benchlib.run_scrub(
            prob,
            dev,
            solver=solver,
            batch_size=batch,
            precond_rank=rank,
            tol=self.cfg.scrub_tol,
            max_iter=max_iter,
            max_dense_bytes=max_dense,
            **options,
        )
        if variant is not None:
            rec["variant"] = variant
        out = self.add(**cases.scrub_record(kind, label, n, prob, rt, rec), note=note)
        ok = rec["status"] == "ok"
        msg = (
            f"{rec['seconds']:.2f} s, {rec.get('matvecs')} matvecs" if ok else rec.get("reason", "")
        )
        self.log(f"scrub {solver} {label} N={n}: {rec['status']} {msg[:160]}")
        benchlib.free_memory(dev)
        return out

    def stage_dense(self) -> None:
        cfg = self.cfg
        label = cfg.dense_model
        c = self.probe(label, cfg.scrub_precision)
        total = (
            torch.cuda.get_device_properties(self.device).total_memory
            if self.device.type == "cuda"
            else cfg.cpu_memory_bytes
        )
        max_dense = cfg.dense_max_bytes if cfg.dense_max_bytes is not None else 0.25 * total
        nc = ModelSpec.parse(label).num_classes
        last: tuple[int, float] | None = None
        done: list[int] = []
        # Dense points first, ascending, until the library refuses (the point of the stage);
        # the CG scrubs at the same N come after, as far as the time allows.
        for n in cfg.dense_n:
            # jacrev: one backward per (sample, class), ~10× a batched step per sample, plus
            # J Jᵀ (quadratic) — scaled from the previous point when there is one
            est = last[1] * (n / last[0]) ** 2 if last else 10 * n * nc * c["train_s_per_sample"]
            est += 4 * n * c["train_s_per_sample"]  # problem and retrain epochs
            if not self.budget.fits(est, SAFETY):
                self.skip(
                    f"budget: est {est:.1f} s", kind="scaling", model=label, n=n, solver="dense"
                )
                break
            rec = self.scrub_point(
                label, n, "dense", 0, cfg.engine_batch, cfg.scrub_max_iter, max_dense
            )
            if rec["status"] != "ok":
                break  # DenseTooLarge / OOM: every larger N would be refused as well
            last = (n, rec["seconds"])
            done.append(n)
        rank, why = self.chosen_rank()
        bcg = self.batch_for(label, rank, cfg.engine_batch) if rank else cfg.engine_batch
        for n in done:
            est = (
                n * (2 * (rank + 25) + 6) * c["mv1_s_per_sample"] + 4 * n * c["train_s_per_sample"]
            )
            if not self.budget.fits(est, SAFETY):
                self.skip(f"budget: est {est:.1f} s", kind="scaling", model=label, n=n, solver="cg")
                continue
            self.scrub_point(
                label, n, "cg", rank, bcg, cfg.scrub_max_iter, max_dense, note=f"rank: {why}"
            )

    def stage_scrub(self, label: str) -> None:
        cfg = self.cfg
        c = self.probe(label, cfg.scrub_precision)
        rank, why = self.chosen_rank()
        batch = self.batch_for(label, rank, cfg.engine_batch) if rank else cfg.engine_batch
        mv_ps = c["mv1_s_per_sample"] * (cfg.engine_batch / batch) ** 0.5  # smaller batch: slower
        matvecs_est = 2 * (rank + 25) + 6
        for n in cfg.scrub_n:
            est_mv = n * mv_ps
            overhead = n * c["train_s_per_sample"] * 6  # fine-tune + retrain epochs (batch 128)
            est = overhead + matvecs_est * est_mv
            if not self.budget.fits(est, SAFETY):
                self.skip(
                    f"budget: est {est:.0f} s ({matvecs_est} matvecs) > {self.budget.left():.0f} s",
                    kind="scaling",
                    model=label,
                    n=n,
                    solver="cg",
                    precond_rank=rank,
                )
                continue  # later N are larger: they are skipped the same way (and recorded)
            cap = int(
                min(
                    cfg.scrub_max_iter,
                    max(5, (self.budget.left() / SAFETY - overhead) / (2 * est_mv) - rank),
                )
            )
            rec = self.scrub_point(
                label,
                n,
                "cg",
                rank,
                batch,
                cap,
                0.0,
                note=f"rank: {why}; batch {batch}; iteration cap {cap}",
            )
            if rec.get("status") == "ok" and rec.get("seconds"):
                matvecs_est = rec["matvecs"]
                mv_ps = max(mv_ps, 0.7 * rec["seconds"] / max(1, rec["matvecs"]) / n)

    def stage_scrub_large(self, label: str) -> None:
        """One scrub at ``engine_large_n`` (50,000 on the GPU) with the CG iteration cap that the
        stage's time allows: peak memory against a training step at the same batch size, and
        the cost of an iteration at scale. Recorded as ``kind='capped'`` (never as a converged
        scaling point: the residual it reached is in the record)."""
        cfg, dev = self.cfg, self.device
        n = cfg.engine_large_n
        c = self.probe(label, cfg.scrub_precision)
        batch = cfg.engine_batch
        mv_est = n * c["mv1_s_per_sample"]
        overhead = n * c["train_s_per_sample"] * 6  # problem (fine-tune epoch) + retrain epoch
        # matvecs ≈ 2·cap (two solves) + 4 (residuals, warm start, final products)
        cap = int((self.budget.left() / SAFETY - overhead - 4 * mv_est) / (2 * mv_est))
        if cap < 1:
            self.skip(
                f"budget: one CG iteration per solve needs ~{overhead + 6 * mv_est:.0f} s",
                kind="capped",
                model=label,
                n=n,
                solver="cg",
            )
            return
        rec = self.scrub_point(
            label,
            n,
            "cg",
            0,
            batch,
            cap,
            0.0,
            kind="capped",
            note=f"time-capped at {cap} CG iterations per solve; no preconditioner",
        )
        if rec.get("status") != "ok":
            return
        # a training step's peak at the scrub's batch size (a few batches are enough)
        prob = self._problem
        prec = PRECISIONS[cfg.scrub_precision]
        X, Y = prob.data
        step = benchlib.make_train_epoch(
            prob.model, X, Y, batch_size=batch, prec=prec, max_samples=3 * batch
        )
        benchlib.free_memory(dev)
        with MemoryMeter(dev) as mem:
            step()
        rec["train_step_delta_mib"] = mem.delta_mib
        rec["memory_ratio_to_train_step"] = benchlib.memory_ratio(rec["delta_mib"], mem.delta_mib)
        nc = prob.spec.num_classes
        rec["dense_jacobian_bytes"] = float(n) * nc * prob.p * 4  # float32 J_D
        self.save()
        self.log(
            f"capped scrub {label} N={n}: memory {rec['delta_mib']:.0f} MiB vs train step "
            f"{mem.delta_mib:.0f} MiB"
        )
        del step
        self._problem, self._problem_key = None, None
        benchlib.free_memory(dev)

    def partial_costs(self, label: str) -> tuple[float, float, float]:
        """For the ``PARTIAL`` selection of ``label`` at ``engine_large_n``: the suffix's share of
        the forward FLOPs, the estimated seconds of one product (the full network's probe × that
        share, at least 5 %) and of the fixed work (problem, retrain, the prefix pass)."""
        spec, n = ModelSpec.parse(label), self.cfg.engine_large_n
        c = self.probe(label, self.cfg.scrub_precision)
        share = benchlib.suffix_flop_share(spec, PARTIAL[spec.name], self.device)
        mv = n * c["mv1_s_per_sample"] * max(0.05, share)
        overhead = n * c["train_s_per_sample"] * 6 + n * c["mv1_s_per_sample"]
        return share, mv, overhead

    def stage_partial_large(self, label: str) -> None:
        """A converged scrub at ``engine_large_n`` (50,000 on the GPU) with only the last block
        and the head linearised (``PARTIAL``): the frozen prefix runs once over D
        (:mod:`ntkscrub.prefix`) and every product runs the suffix — issue 14's "≤ 1× the
        retrain" for a partial linearisation, against the retrain of the same problem. The CG
        cap comes from the time left with a product priced at the full network's probe × the
        suffix's share of the forward FLOPs (at least 5 %). Kind ``'partial'``."""
        cfg = self.cfg
        spec, n = ModelSpec.parse(label), cfg.engine_large_n
        share, mv, overhead = self.partial_costs(label)
        cap = int((self.budget.left() / SAFETY - overhead - 4 * mv) / (2 * mv))
        base = {"kind": "partial", "model": label, "n": n, "solver": "cg"}
        if cap < 10:
            self.skip(f"budget: {cap} CG iterations per solve would fit", **base)
            return
        self.scrub_point(
            label,
            n,
            "cg",
            cfg.default_rank,
            cfg.engine_batch,
            min(cap, cfg.scrub_max_iter),
            0.0,
            kind="partial",
            note=f"params {PARTIAL[spec.name]!r} (forward-FLOP share {share:.3f}); cap {cap}",
            params=PARTIAL[spec.name],
        )

    def stage_requests(self, label: str) -> None:
        """Amortised deletion requests (issue 14 item 5) on the partial problem of
        :meth:`stage_partial_large` (same model, N and ``PARTIAL`` selection, its problem and
        retrain reused): ``Scrubber`` preparation over D, then request 1 = the problem's D_f
        (the scrub ``partial_large`` timed) and request 2 = as many further samples, each timed
        against the measured retrain. Kind ``'requests'``; the issue's goal is ≤ 0.1× a retrain."""
        cfg = self.cfg
        spec, n = ModelSpec.parse(label), cfg.engine_large_n
        _, mv, overhead = self.partial_costs(label)
        # preparation ≈ one solve, each request ≈ two (the re-solve over Δ's cancellation)
        cap = int((self.budget.left() / SAFETY - overhead - 6 * mv) / (5 * mv))
        base = {"kind": "requests", "model": label, "n": n}
        if cap < 10:
            self.skip(f"budget: {cap} CG iterations per solve would fit", **base)
            return
        prob, rt = self.problem_for(spec, n)
        nf = prob.forget[0].shape[0]
        rec = benchlib.run_scrubber(
            prob,
            self.device,
            requests=[list(range(nf)), list(range(nf, 2 * nf))],
            batch_size=cfg.engine_batch,
            tol=cfg.scrub_tol,
            max_iter=min(cap, cfg.scrub_max_iter),
            params=PARTIAL[spec.name],
        )
        ratios = [r["seconds"] / rt["retrain_seconds"] for r in rec.get("requests", [])]
        note = f"params {PARTIAL[spec.name]!r}; cap {min(cap, cfg.scrub_max_iter)}"
        self.add(**base, params=prob.p, n_forget=nf, **rt, **rec,
                 ratio_requests_to_retrain=ratios, note=note)  # fmt: skip
        self.log(f"requests {label} N={n}: {rec['status']} {ratios}")
        benchlib.free_memory(self.device)

    def stage_variants(self) -> None:
        """Speed knobs of one scrub (first scrub model at ``variant_n``): preconditioner on/off,
        batch size, warm start. Runs on what the other stages left."""
        cfg = self.cfg
        label, n = cfg.scrub_models[0], cfg.variant_n
        c = self.probe(label, cfg.scrub_precision)
        rank, why = self.chosen_rank()
        batch = self.batch_for(label, rank, cfg.engine_batch) if rank else cfg.engine_batch
        variants: list[tuple[str, int, int, dict[str, Any]]] = [
            ("baseline", rank, batch, {}),
            ("no-precond", 0, cfg.engine_batch, {}),
            ("no-precond batch/2", 0, max(1, cfg.engine_batch // 2), {}),
            ("no-precond batch*2", 0, cfg.engine_batch * 2, {}),
            ("no-warm-start", rank, batch, {"warm_start": False}),
            ("own D_r preconditioner", rank, batch, {"share_precond": False}),
        ]
        if rank == 0:
            variants.insert(
                1,
                (
                    f"rank {cfg.default_rank}",
                    cfg.default_rank,
                    self.batch_for(label, cfg.default_rank, cfg.engine_batch),
                    {},
                ),
            )
        last = None
        for name, r, b, opts in variants:
            mv = last["seconds"] / max(1, last["matvecs"]) if last else n * c["mv1_s_per_sample"]
            est = (last["matvecs"] if last else 2 * (r + 25) + 6) * mv + 6 * n * c[
                "train_s_per_sample"
            ]
            if not self.budget.fits(est, SAFETY):
                self.skip(
                    f"budget: est {est:.0f} s",
                    kind="variant",
                    model=label,
                    n=n,
                    solver="cg",
                    variant=name,
                )
                continue
            rec = self.scrub_point(
                label,
                n,
                "cg",
                r,
                b,
                cfg.scrub_max_iter,
                0.0,
                kind="variant",
                note=f"rank chosen: {why}",
                variant=name,
                **opts,
            )
            if rec.get("status") == "ok":
                last = rec

    # ------------------------------------------------------------------------------ compile
    def stage_compile(self) -> None:
        """torch.compile of the per-batch VJP/JVP and of the training step (eager vs compiled)."""
        from torch.func import functional_call, jvp, vjp

        cfg, dev = self.cfg, self.device
        label = cfg.compile_model
        if not self.budget.fits(cfg.compile_estimate_s, SAFETY):
            self.skip(
                f"budget: compiling takes ~{cfg.compile_estimate_s:.0f} s",
                kind="compile",
                model=label,
            )
            return
        spec = ModelSpec.parse(label)
        bs = cfg.engine_batch
        n = (cfg.engine_n // bs) * bs or bs  # whole batches only: one compiled shape
        X, Y = benchlib.random_cifar(n, spec.num_classes, dev, seed=1)
        model = benchlib.calibrate_bn(benchlib.make_model(spec, dev), X)
        params = {k: v.detach() for k, v in model.named_parameters()}
        bufs = dict(model.named_buffers())

        def f(p: dict, x: torch.Tensor) -> torch.Tensor:
            return functional_call(model, (p, bufs), (x,))

        def vjp_batch(p: dict, x: torch.Tensor, u: torch.Tensor) -> dict:
            return vjp(lambda q: f(q, x), p)[1](u)[0]

        def jvp_batch(p: dict, t: dict, x: torch.Tensor) -> torch.Tensor:
            return jvp(lambda q: f(q, x), (p,), (t,))[1]

        def matvec(vb: Callable, jb: Callable, v: torch.Tensor) -> torch.Tensor:
            g = {k: torch.zeros_like(w) for k, w in params.items()}
            for s in range(0, n, bs):
                gb = vb(params, X[s : s + bs], v[s : s + bs])
                for k in g:
                    g[k] += gb[k]
            return torch.cat([jb(params, g, X[s : s + bs]).reshape(-1) for s in range(0, n, bs)])

        v = torch.randn(n, spec.num_classes, device=dev)
        prec = PRECISIONS["tf32"]
        with benchlib.precision_flags(prec, dev):
            matvec(vjp_batch, jvp_batch, v)  # warm-up: the eager path's first call is slow too
            eager_s, _ = benchlib.timed(lambda: matvec(vjp_batch, jvp_batch, v), dev)
        epoch = benchlib.make_train_epoch(model, X, Y, batch_size=bs, prec=prec)
        epoch()
        ep_s, _ = benchlib.timed(epoch, dev)
        cv, cj = torch.compile(vjp_batch), torch.compile(jvp_batch)
        t0 = time.perf_counter()
        with benchlib.precision_flags(prec, dev):
            ref = matvec(vjp_batch, jvp_batch, v)
            got = matvec(cv, cj, v)  # first call compiles
            benchlib.sync(dev)
            compile_s = time.perf_counter() - t0
            comp_s, _ = benchlib.timed(lambda: matvec(cv, cj, v), dev)
        err = float((got - ref).norm() / ref.norm())
        cmodel = torch.compile(copy.deepcopy(model))
        cepoch = benchlib.make_train_epoch(cmodel, X, Y, batch_size=bs, prec=prec)
        t0 = time.perf_counter()
        cepoch()
        benchlib.sync(dev)
        compile_train_s = time.perf_counter() - t0
        cep_s, _ = benchlib.timed(cepoch, dev)
        self.add(
            kind="compile",
            model=label,
            n=n,
            batch_size=bs,
            precision="tf32",
            matvec_eager_s=eager_s,
            matvec_compiled_s=comp_s,
            matvec_compile_s=compile_s,
            epoch_eager_s=ep_s,
            epoch_compiled_s=cep_s,
            epoch_compile_s=compile_train_s,
            ratio_eager=eager_s / ep_s,
            ratio_compiled=comp_s / cep_s,
            compiled_rel_error=err,
            note="per-batch vjp/jvp compiled as functions (not the library's Jacobian)",
        )

    # ----------------------------------------------------------------------------- finalize
    def estimate_largest(self) -> None:
        """For each scrub model whose largest N was not measured: an *estimated* record from the
        matvecs of the largest measured N and the measured (or per-sample) matvec time."""
        for label in self.cfg.scrub_models:
            target = max(self.cfg.scrub_n)
            recs = [
                r
                for r in self.doc["records"]
                if r.get("kind") == "scaling"
                and r.get("model") == label
                and r.get("solver") == "cg"
                and r.get("status") == "ok"
            ]
            if not recs or any(r["n"] == target for r in recs):
                continue
            top = max(recs, key=lambda r: r["n"])
            mv = [
                r
                for r in self.doc["records"]
                if r.get("kind") == "matvec"
                and r.get("model") == label
                and r.get("n") == target
                and r.get("precision") == self.cfg.scrub_precision
                and r.get("vectors") == 1
                and r.get("status") == "ok"
            ]
            if mv:
                mv_s, src = mv[0]["seconds"], f"measured matvec at N={target}"
            else:
                mv_s = top["seconds"] / max(1, top["matvecs"]) * target / top["n"]
                src = f"matvec time of N={top['n']} scaled linearly"
            ep_s = top["retrain_epoch_seconds"] * target / top["n"]
            sec = top["matvecs"] * mv_s
            self.add(
                kind="scaling",
                model=label,
                n=target,
                solver="cg",
                status="estimated",
                seconds=sec,
                matvecs=top["matvecs"],
                precond_rank=top.get("precond_rank"),
                retrain_seconds=ep_s * benchlib.RETRAIN_EPOCHS,
                ratio_scrub_to_retrain=sec / (ep_s * benchlib.RETRAIN_EPOCHS),
                reason=(
                    f"estimated: {top['matvecs']} matvecs (as at N={top['n']}) × {src}; "
                    f"retrain epoch scaled linearly from N={top['n']}"
                ),
            )

    def summary(self) -> str:
        hw = self.doc["hardware"]
        nan = float("nan")
        rows = []
        for name, st in self.doc["stages"].items():
            rows.append(f"  {name:<28} {st.get('status'):<24} {st.get('seconds', 0):7.1f} s")
        lines = [
            "",
            "=== gpu_suite summary ===",
            f"device: {hw.get('gpu') or hw.get('gpu_name') or hw.get('cpu_model')}",
            f"elapsed {self.budget.elapsed():.1f} s of {self.budget.seconds:.0f} s budget",
            *rows,
            "",
        ]
        recs = self.doc["records"]
        mv = [r for r in recs if r.get("kind") == "matvec" and r.get("status") == "ok"]
        if mv:
            lines.append("matvec vs epoch (per vector ÷ epoch):")
            for r in mv:
                lines.append(
                    f"  {r['model']:<20} N={r['n']:<6} {r['precision']:<5} k={r['vectors']:<2} "
                    f"epoch {r['epoch_seconds']:.3f}s matvec {r['seconds']:.3f}s "
                    f"ratio {r['ratio_per_vector_to_epoch']:.2f}  "
                    f"mem×{r.get('memory_ratio_to_train') or nan:.2f}  "
                    f"err {r.get('rel_error_vs_fp64') or nan:.1e}"
                )
        cg = [r for r in recs if r.get("kind") == "cg" and r.get("status") == "ok"]
        if cg:
            lines.append("CG to 1e-4:")
            for r in cg:
                lines.append(
                    f"  {r['point']:<8} rank {r['precond_rank']:<4} its {r['iterations']:<4} "
                    f"matvecs {r['matvecs_total']:<5} converged {r['converged']}"
                )
        sc = [r for r in recs if r.get("kind") == "scaling"]
        if sc:
            lines.append("scrub vs retrain:")
            for r in sc:
                if r.get("status") in ("ok", "estimated"):
                    lines.append(
                        f"  {r['model']:<20} {r['solver']:<5} N={r['n']:<6} {r['status']:<9} "
                        f"scrub {r['seconds']:.2f}s retrain {r.get('retrain_seconds') or 0:.2f}s "
                        f"ratio {r.get('ratio_scrub_to_retrain') or float('nan'):.2f} "
                        f"matvecs {r.get('matvecs')}"
                    )
                else:
                    lines.append(
                        f"  {r['model']:<20} {r.get('solver')} N={r['n']:<6} "
                        f"{r['status']}: {(r.get('reason') or '')[:90]}"
                    )
        return "\n".join(lines)

    def run(self) -> None:
        cfg = self.cfg
        self.log(f"device {self.device}, budget {self.budget.seconds:.0f} s, out {self.out}")
        self.run_stage("engine", cfg.shares["engine"], self.stage_engine)
        self.run_stage("cg", cfg.shares["cg"], self.stage_cg)
        self.run_stage("dense", cfg.shares["dense"], self.stage_dense)
        per = cfg.shares["scrub"] / max(1, len(cfg.scrub_models))
        for label in cfg.scrub_models:
            self.run_stage(f"scrub:{label}", per, lambda label=label: self.stage_scrub(label))
        self.run_stage("engine_large", cfg.shares["engine_large"], self.stage_engine_large)
        for label in cfg.large_scrub_models:
            self.run_stage(
                f"partial_large:{label}",
                cfg.shares["partial_large"],
                lambda label=label: self.stage_partial_large(label),
            )
        for label in cfg.large_scrub_models:
            self.run_stage(
                f"requests:{label}",
                cfg.shares["requests"],
                lambda label=label: self.stage_requests(label),
            )
        per = cfg.shares["scrub_large"] / max(1, len(cfg.large_scrub_models))
        for label in cfg.large_scrub_models:
            self.run_stage(
                f"scrub_large:{label}", per, lambda label=label: self.stage_scrub_large(label)
            )
        self.run_stage("variants", cfg.shares["variants"], self.stage_variants)
        if self.args.compile:
            self.run_stage("compile", cfg.shares["compile"], self.stage_compile)
        self.estimate_largest()
        self.doc["finished"] = True
        self.save()
        self.write_report()
        print(self.summary(), flush=True)
        print(f"\nresults: {self.path}\nreport:  {self.out / 'report.md'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for results.json, report.md, PNGs")
    ap.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="wall-clock budget (default 300 s; 50 s with --tiny)",
    )
    ap.add_argument(
        "--reserve-seconds",
        type=float,
        default=None,
        help="kept free at the end for the report (default 5%% of the budget, ≥ 3 s)",
    )
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="toy sizes (same code paths)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 on cpu; unchanged on cuda)",
    )
    ap.add_argument(
        "--stages",
        nargs="*",
        default=None,
        help="only stages whose names start with these (engine cg dense scrub engine_large "
        "partial_large requests scrub_large variants compile)",
    )
    ap.add_argument(
        "--share",
        action="append",
        default=[],
        metavar="STAGE=FRACTION",
        help="override a stage's share of the budget (0 = whatever is left), e.g. cg=0.3 "
        f"scrub=0; defaults {SHARES}",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also run the torch.compile stage (compilation takes minutes)",
    )
    args = ap.parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else None)
    benchlib.set_threads(threads)
    Suite(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
