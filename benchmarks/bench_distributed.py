"""Data-parallel scrub on CPU (gloo), launched by torchrun (issue 15).

    torchrun --nproc-per-node=2 benchmarks/bench_distributed.py --mode strong --samples 600
    torchrun --nproc-per-node=1 benchmarks/bench_distributed.py --mode strong --samples 600

Every rank builds the same seeded float64 problem (an MLP, random inputs), keeps its contiguous
shard of retain and forget (``--mode strong``: N samples in all; ``--mode weak``: N per rank) and
runs ``ntkscrub.scrub`` under the default process group. It then records

* the time of one Θ product (k = 1) on the row-sharded operator, median of ``--products`` runs,
  the all-reduce volume per product (p + 1 float64: Jᵀv and the error flag) and the time of that
  all-reduce alone and of one CG scalar reduction (all-gather of 3 float64);
* the scrub's seconds, matvecs, CG iterations, all-reduce calls and bytes;
* on rank 0 (``--check``), the one-process scrub of the concatenated shards: the shift norm of
  both and their largest absolute difference;
* with ``--slq PROBES``: the SLQ log det of Θ_rr + λI (``--slq-steps`` Lanczos steps, seed 0)
  on the row-sharded operator (:func:`ntkscrub.distributed.sharded_slq_logdet`), its seconds and
  scalar reductions, and with ``--check`` the one-process estimate with the same probes.

Rank 0 prints one JSON line (and writes it to ``--out`` when given). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import ntkscrub
from ntkscrub import distributed as nd
from ntkscrub.operators import Jacobian
from ntkscrub.params import ParameterSpace
from ntkscrub.solvers import slq_logdet


def _mlp(seed: int, d: int, h: int, c: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).double().eval()


def _data(n: int, d: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(
        0, c, (n,), generator=g
    )


def _shard(X: torch.Tensor, Y: torch.Tensor, rank: int, world: int) -> tuple:
    bounds = [round(i * X.shape[0] / world) for i in range(world + 1)]
    return X[bounds[rank] : bounds[rank + 1]], Y[bounds[rank] : bounds[rank + 1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("strong", "weak"), default="strong")
    ap.add_argument(
        "--samples", type=int, default=600, help="samples in all (strong) or per rank (weak)"
    )
    ap.add_argument("--forget", type=float, default=0.1, help="forget fraction")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--ridge", type=float, default=1.0)
    ap.add_argument("--products", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--check", action="store_true", help="rank 0: compare with one process")
    ap.add_argument("--slq", type=int, default=0, help="probes of an SLQ log det (0: none)")
    ap.add_argument("--slq-steps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    n_all = args.samples if args.mode == "strong" else args.samples * world
    n_f = max(1, round(args.forget * n_all))
    model = _mlp(0, args.dim, args.hidden, args.classes)
    init = _mlp(1, args.dim, args.hidden, args.classes)
    Xr, Yr = _data(n_all - n_f, args.dim, args.classes, seed=2)
    Xf, Yf = _data(n_f, args.dim, args.classes, seed=3)
    retain, forget = _shard(Xr, Yr, rank, world), _shard(Xf, Yf, rank, world)
    ref, ref_seconds, ref_slq = None, None, None
    if rank == 0 and args.check:
        # The one-process scrub of the concatenated shards, before any process group exists
        # (under one, scrub shards); the other ranks wait in init_process_group meanwhile.
        t0 = time.perf_counter()
        ref = ntkscrub.scrub(model, (Xr, Yr), (Xf, Yf), init=init, ridge=args.ridge)
        ref_seconds = time.perf_counter() - t0
        if args.slq:
            J_all = Jacobian(ParameterSpace(init), (Xr, Yr))
            theta_all = (J_all @ J_all.mT).add_diagonal(args.ridge)
            ref_slq = slq_logdet(theta_all, J_all.shape[0], probes=args.slq,
                                 steps=args.slq_steps, seed=0, shift=args.ridge)  # fmt: skip
    nd.init("gloo")  # collective timeout: nd.DEFAULT_TIMEOUT (10 min)

    # One Θ product on the row-sharded operator: local JVP + VJP and one all-reduce of p + 1.
    comm = nd.Comm()
    space = ParameterSpace(init)
    J = nd.ShardedJacobian(
        Jacobian(space, retain), comm, c=args.classes, p=space.p, dtype=torch.float64,
        device=torch.device("cpu"),
    )  # fmt: skip
    theta = nd.sharded_ntk(J, args.ridge)
    v = torch.ones(J.shape[0], 1, dtype=torch.float64)
    times = []
    for _ in range(args.products + 1):
        dist.barrier()
        t0 = time.perf_counter()
        theta @ v
        times.append(time.perf_counter() - t0)
    per_product = statistics.median(times[1:])  # the first one warms up
    bytes_per_product = comm.block_bytes // comm.block_calls
    # The communication alone: the (p + 1) all-reduce of a product, and a CG scalar reduction.
    block, scalars = (
        torch.zeros(space.p, 1, dtype=torch.float64),
        torch.zeros(2, dtype=torch.float64),
    )
    t_block, t_scalar = [], []
    for _ in range(args.products):
        dist.barrier()
        t0 = time.perf_counter()
        comm.sum_block(block)
        t_block.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        comm.sum_scalars(scalars)
        t_scalar.append(time.perf_counter() - t0)

    dist.barrier()
    t0 = time.perf_counter()
    res = ntkscrub.scrub(model, retain, forget, init=init, ridge=args.ridge)
    seconds = time.perf_counter() - t0
    info = res.info
    record = {
        "mode": args.mode,
        "world_size": world,
        "threads_per_rank": args.threads,
        "n_retain": info["n_retain"],
        "n_forget": info["n_forget"],
        "p": info["p"],
        "c": info["num_classes"],
        "theta_product_seconds": per_product,
        "allreduce_bytes_per_product": bytes_per_product,
        "allreduce_seconds": statistics.median(t_block),
        "scalar_reduction_seconds": statistics.median(t_scalar),
        "scrub_seconds": seconds,
        "matvecs": info["matvecs"],
        "cg_iterations": [s["iterations"] for s in info["solves"]],
        "allreduce_calls": info["distributed"]["allreduce_calls"],
        "allreduce_bytes": info["distributed"]["allreduce_bytes"],
        "scalar_reductions": info["distributed"]["scalar_reductions"],
        "shift_norm": float(res.shift.norm()),
    }
    if args.slq:
        dist.barrier()
        calls0, t0 = comm.scalar_calls, time.perf_counter()
        est = nd.sharded_slq_logdet(theta, comm, probes=args.slq, steps=args.slq_steps, seed=0)
        record.update({
            "slq_probes": args.slq, "slq_steps": est.steps, "slq_logdet": est.value,
            "slq_stderr": est.stderr, "slq_quadrature_halfwidth": est.quadrature_halfwidth,
            "slq_seconds": time.perf_counter() - t0,
            "slq_scalar_reductions": comm.scalar_calls - calls0,
        })  # fmt: skip
        if ref_slq is not None:
            record["one_process_slq_logdet"] = ref_slq.value
            record["slq_abs_diff_to_one_process"] = abs(est.value - ref_slq.value)
    if ref is not None:
        record["one_process_shift_norm"] = float(ref.shift.norm())
        record["one_process_seconds"] = ref_seconds
        record["max_abs_diff_to_one_process"] = float((res.shift - ref.shift).abs().max())
    dist.barrier()
    if rank == 0:
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as fh:
                fh.write(line + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
