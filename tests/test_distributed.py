"""Data-parallel engine (issue 15) on CPU with gloo: 2 and 3 spawned processes, float64.

Each spawn runs every scenario once (spawning costs seconds; the products cost milliseconds) and
saves what each rank computed; the tests compare with the one-process computation on the
concatenated shards (rank order) and with each other rank (bit for bit where promised).
"""

from __future__ import annotations

import datetime
import importlib
import os
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from model_zoo import make_cnn, make_data, make_mlp

import ntkscrub
from ntkscrub import distributed as nd
from ntkscrub.config import SolverConfig
from ntkscrub.operators import Jacobian
from ntkscrub.params import ParameterSpace
from ntkscrub.solvers import NystromPreconditioner, cg, lanczos, slq_logdet
from ntkscrub.solvers.lanczos import Sharding

RIDGE = 1.0
# Shard sizes per world size: uneven retain shards, and an empty forget shard on rank 1.
SHARDS = {2: ([8, 5], [4, 0]), 3: ([6, 3, 4], [2, 0, 3])}


def _split(X: torch.Tensor, Y: torch.Tensor, sizes: list[int]) -> list[tuple]:
    out, s = [], 0
    for n in sizes:
        out.append((X[s : s + n], Y[s : s + n]))
        s += n
    return out


def _problem(kind: str, world: int) -> dict[str, Any]:
    """The same data, models and shards in every process (seeded)."""
    sr, sf = SHARDS[world]
    make = make_mlp if kind == "mlp" else make_cnn
    model, init = make(seed=0), make(seed=1)
    Xr, Yr = make_data(kind, sum(sr), seed=2)
    Xf, Yf = make_data(kind, sum(sf), seed=3)
    return {
        "model": model,
        "init": init,
        "retain": (Xr, Yr),
        "forget": (Xf, Yf),
        "retain_shards": _split(Xr, Yr, sr),
        "forget_shards": _split(Xf, Yf, sf),
    }


def _catch(fn: Any) -> dict[str, Any]:
    try:
        return {"ok": fn()}
    except Exception as err:  # noqa: BLE001 - the test inspects what each rank raised
        return {"error": type(err).__name__, "message": str(err), "tb": traceback.format_exc()}


def _operators(rank: int, world: int) -> dict[str, Any]:
    pb = _problem("mlp", world)
    comm = nd.Comm()
    space = ParameterSpace(pb["init"])
    J = nd.ShardedJacobian(
        Jacobian(space, pb["retain_shards"][rank]),
        comm,
        c=3,
        p=space.p,
        dtype=torch.float64,
        device=torch.device("cpu"),
    )
    g = torch.Generator().manual_seed(5)
    V = torch.randn(space.p, 2, generator=g, dtype=torch.float64)
    U = torch.randn(3 * sum(SHARDS[world][0]), 2, generator=g, dtype=torch.float64)
    r0 = 3 * sum(SHARDS[world][0][:rank])
    U_loc = U[r0 : r0 + J.shape[0]]
    b0 = comm.block_bytes
    Jtu = J.mT @ U_loc
    bytes_per_product = comm.block_bytes - b0
    theta = nd.sharded_ntk(J, RIDGE)
    X, info = nd.sharded_cg(theta, U_loc[:, 0], comm, n_global=U.shape[0], tol=1e-12)
    M = nd.ShardedNystrom(
        theta,
        comm,
        n_global=U.shape[0],
        rows=slice(r0, r0 + J.shape[0]),
        rank=8,
        shift=RIDGE,
        seed=3,
        dtype=torch.float64,
        device=torch.device("cpu"),
    )
    X_pc, info_pc = nd.sharded_cg(
        theta, U_loc[:, 0], comm, n_global=U.shape[0], tol=1e-12, precond=M
    )
    return {
        "nystrom_apply": M.solve(U_loc),
        "pcg_nystrom": X_pc,
        "pcg_nystrom_converged": info_pc.all_converged,
        "Jv": J @ V,
        "Jtu": Jtu,
        "theta_u": theta @ U_loc,
        "pcg": X,
        "pcg_iterations": info.iterations,
        "bytes_per_product": bytes_per_product,
    }


SLQ = {"probes": 6, "steps": 20, "seed": 4}


def _sharded_theta(rank: int, world: int, which: str) -> tuple[Any, nd.Comm]:
    """Θ + λI row-sharded over the retain (or forget: rank 1's shard empty) shards."""
    pb = _problem("mlp", world)
    comm = nd.Comm()
    space = ParameterSpace(pb["init"])
    data = pb[f"{which}_shards"][rank]
    local = Jacobian(space, data) if data[0].shape[0] else None
    J = nd.ShardedJacobian(
        local, comm, c=3, p=space.p, dtype=torch.float64, device=torch.device("cpu")
    )
    return nd.sharded_ntk(J, RIDGE), comm


def _lanczos_slq(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for which in ("retain", "forget"):
        theta, comm = _sharded_theta(rank, world, which)
        est = nd.sharded_slq_logdet(theta, comm, **SLQ)
        out[which] = {k: getattr(est, k) for k in ("value", "per_probe", "upper", "lower")}
    theta, comm = _sharded_theta(rank, world, "retain")
    rows, n = comm.shard_rows(theta.shape[0])
    V = torch.randn(n, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    res = nd.sharded_lanczos(theta, V[rows], 12, comm)
    out["lanczos"] = {"alpha": res.alpha, "beta": res.beta, "steps": res.steps}
    out["ritz"] = [torch.linalg.eigvalsh(res.tridiagonal(j)) for j in range(2)]
    return out


def _slq_seed_differs(rank: int, world: int) -> Any:
    theta, comm = _sharded_theta(rank, world, "retain")
    return nd.sharded_slq_logdet(theta, comm, probes=2, steps=3, seed=rank)


def _subgroup(rank: int, world: int, group: Any) -> dict[str, Any]:
    """Ranks 0 and 2 of 3 only, through an explicit ``process_group`` (rank 1 does other work)."""
    pb = _problem("mlp", world)
    retain = pb["retain_shards"][rank]
    theta, comm = _sharded_theta_group(pb, rank, group)
    est = nd.sharded_slq_logdet(theta, comm, **SLQ)
    return {
        "error": ntkscrub.readouts.error(pb["model"], retain, process_group=group),
        "slq": est.value,
        "shift": ntkscrub.scrub(
            pb["model"], retain, pb["forget_shards"][rank], init=pb["init"], ridge=RIDGE,
            process_group=group,
        ).shift,
    }  # fmt: skip


def _sharded_theta_group(pb: dict[str, Any], rank: int, group: Any) -> tuple[Any, nd.Comm]:
    comm = nd.Comm(group)
    space = ParameterSpace(pb["init"])
    J = nd.ShardedJacobian(
        Jacobian(space, pb["retain_shards"][rank]), comm, c=3, p=space.p,
        dtype=torch.float64, device=torch.device("cpu"),
    )  # fmt: skip
    return nd.sharded_ntk(J, RIDGE), comm


def _scrub(rank: int, world: int, kind: str, **kw: Any) -> dict[str, Any]:
    pb = _problem(kind, world)
    res = ntkscrub.scrub(
        pb["model"],
        pb["retain_shards"][rank],
        pb["forget_shards"][rank],
        init=pb["init"],
        **kw,
    )
    w = torch.cat([p.detach().reshape(-1) for p in res.model.parameters()])
    precond = [s["precond"] for s in res.info["solves"]]
    return {"shift": res.shift, "weights": w, "info": res.info["distributed"], "precond": precond}


def _scrub_other_model(rank: int, world: int) -> Any:
    pb = _problem("mlp", world)
    model = make_mlp(seed=rank)  # rank 1 holds other weights than rank 0
    return ntkscrub.scrub(
        model, pb["retain_shards"][rank], pb["forget_shards"][rank], init=pb["init"], ridge=RIDGE
    )


def _bad_labels(rank: int, world: int) -> Any:
    pb = _problem("mlp", world)
    X, Y = pb["retain_shards"][rank]
    if rank == 1:
        Y = torch.full_like(Y, 7)  # out of range for c = 3: only rank 1's shard is bad
    return ntkscrub.scrub(pb["model"], (X, Y), pb["forget_shards"][rank], init=pb["init"])


def _failing_product(rank: int, world: int) -> Any:
    """Rank 1's VJP raises in the middle of the solve (after a few products)."""
    pb = _problem("mlp", world)
    comm = nd.Comm()
    space = ParameterSpace(pb["init"])
    local = Jacobian(space, pb["retain_shards"][rank])
    if rank == 1:
        calls = {"n": 0}
        tmm = local._tmm

        def flaky(U: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("simulated failure in a VJP")
            return tmm(U)

        local._tmm = flaky  # type: ignore[method-assign]
    J = nd.ShardedJacobian(
        local, comm, c=3, p=space.p, dtype=torch.float64, device=torch.device("cpu")
    )
    b = torch.ones(J.shape[0], dtype=torch.float64)
    return nd.sharded_cg(nd.sharded_ntk(J, RIDGE), b, comm, n_global=3 * 13, tol=1e-12)


def _init_gloo(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),  # a bug fails the test instead of hanging CI
    )


def _worker(rank: int, world: int, store: str, out: str) -> None:
    _init_gloo(rank, world, store)
    results: dict[str, Any] = {}
    try:
        results["scrub_mlp"] = _catch(lambda: _scrub(rank, world, "mlp", ridge=RIDGE))
        results["lanczos_slq"] = _catch(lambda: _lanczos_slq(rank, world))
        if world == 2:
            results["operators"] = _catch(lambda: _operators(rank, world))
            results["scrub_ce"] = _catch(
                lambda: _scrub(
                    rank,
                    world,
                    "mlp",
                    loss="ce",
                    linearize_at="trained",
                    weight_decay=1e-2,
                    rescale="trapezium",
                )
            )
            results["bad_labels"] = _catch(lambda: _bad_labels(rank, world))
            results["failing_product"] = _catch(lambda: _failing_product(rank, world))
            results["scrub_nystrom"] = _catch(
                lambda: _scrub(
                    rank, world, "mlp", ridge=RIDGE, solver_config=SolverConfig(precond_rank=10)
                )
            )
            results["ridge_differs"] = _catch(
                lambda: _scrub(rank, world, "mlp", ridge=RIDGE * (1 + rank))
            )
            results["model_differs"] = _catch(lambda: _scrub_other_model(rank, world))
            results["slq_seed_differs"] = _catch(lambda: _slq_seed_differs(rank, world))
            results["not_converged"] = _catch(
                lambda: _scrub(rank, world, "mlp", ridge=RIDGE, max_iter=2)
            )
        else:
            results["scrub_cnn"] = _catch(lambda: _scrub(rank, world, "cnn", ridge=RIDGE))
            sub = dist.new_group([0, 2])  # collective: every rank creates it
            if rank != 1:
                results["subgroup"] = _catch(lambda: _subgroup(rank, world, sub))
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _spawn(world: int, tmp: Any, worker: Any = None) -> list[dict[str, Any]]:
    """Fork ``world`` gloo ranks running ``worker(rank, world, store, out)`` (default: this
    file's scenarios); returns what each rank saved to ``out/rank{r}.pt``."""
    # Forked, not spawned: a fresh interpreter re-imports torch and torch.func's compiler stack
    # (≈ 10 s each on 2 busy cores); a fork inherits them, warmed by one product here.
    pb = _problem("cnn", world)
    J = Jacobian(ParameterSpace(pb["init"]), pb["retain"])
    J.mT @ (J @ torch.ones(J.p, 2, dtype=torch.float64))
    mp.start_processes(
        _worker if worker is None else worker,
        args=(world, str(tmp / "store"), str(tmp)),
        nprocs=world,
        join=True,
        start_method="fork",
    )
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory: Any) -> list[dict[str, Any]]:
    return _spawn(2, tmp_path_factory.mktemp("dist2"))


@pytest.fixture(scope="module")
def three(tmp_path_factory: Any) -> list[dict[str, Any]]:
    return _spawn(3, tmp_path_factory.mktemp("dist3"))


def _ok(results: list[dict[str, Any]], case: str) -> list[dict[str, Any]]:
    for r, res in enumerate(results):
        assert "ok" in res[case], f"rank {r} raised in {case}: {res[case].get('tb')}"
    return [res[case]["ok"] for res in results]


def _reference_scrub(kind: str, world: int, **kw: Any) -> ntkscrub.ScrubResult:
    pb = _problem(kind, world)
    return ntkscrub.scrub(pb["model"], pb["retain"], pb["forget"], init=pb["init"], **kw)


# --------------------------------------------------------------------------- operators and PCG
def test_sharded_operators_match_one_process(two: list[dict[str, Any]]) -> None:
    ranks = _ok(two, "operators")
    pb = _problem("mlp", 2)
    J = Jacobian(ParameterSpace(pb["init"]), pb["retain"])
    Jd = J.to_dense()
    g = torch.Generator().manual_seed(5)
    V = torch.randn(J.p, 2, generator=g, dtype=torch.float64)
    U = torch.randn(J.shape[0], 2, generator=g, dtype=torch.float64)
    theta = Jd @ Jd.T + RIDGE * torch.eye(J.shape[0], dtype=torch.float64)
    Jv = torch.cat([r["Jv"] for r in ranks])
    theta_u = torch.cat([r["theta_u"] for r in ranks])
    assert (Jv - Jd @ V).abs().max() <= 1e-10
    assert (theta_u - theta @ U).abs().max() <= 1e-10 * theta.abs().max()
    for r in ranks:
        assert (r["Jtu"] - Jd.T @ U).abs().max() <= 1e-10 * (Jd.T @ U).abs().max()
    assert torch.equal(ranks[0]["Jtu"], ranks[1]["Jtu"])
    # One all-reduce of p·k numbers (+ the error flag) per product, k = 2 here.
    assert ranks[0]["bytes_per_product"] == (J.p * 2 + 1) * 8


def test_sharded_pcg_matches_one_process(two: list[dict[str, Any]]) -> None:
    ranks = _ok(two, "operators")
    pb = _problem("mlp", 2)
    J = Jacobian(ParameterSpace(pb["init"]), pb["retain"])
    g = torch.Generator().manual_seed(5)
    torch.randn(J.p, 2, generator=g, dtype=torch.float64)
    b = torch.randn(J.shape[0], 2, generator=g, dtype=torch.float64)[:, 0]
    theta = (J @ J.mT).add_diagonal(RIDGE)
    x, info = cg(theta, b, tol=1e-12)
    x_dist = torch.cat([r["pcg"] for r in ranks])
    assert (x_dist - x).norm() <= 1e-10 * x.norm()
    # Every rank stops at the same iteration (the counts may differ from one process's by the
    # rounding of the reordered sums near tol = 1e-12, the float64 floor here).
    assert ranks[0]["pcg_iterations"] == ranks[1]["pcg_iterations"]
    assert info.all_converged
    exact = torch.linalg.solve(theta.to_dense(), b)
    assert (x_dist - exact).norm() <= 1e-9 * exact.norm()


def test_sharded_nystrom_matches_one_process(two: list[dict[str, Any]]) -> None:
    ranks = _ok(two, "operators")
    pb = _problem("mlp", 2)
    J = Jacobian(ParameterSpace(pb["init"]), pb["retain"])
    g = torch.Generator().manual_seed(5)
    torch.randn(J.p, 2, generator=g, dtype=torch.float64)
    U = torch.randn(J.shape[0], 2, generator=g, dtype=torch.float64)
    theta = (J @ J.mT).add_diagonal(RIDGE)
    M = NystromPreconditioner(theta, J.shape[0], 8, shift=RIDGE, includes_shift=True, seed=3)
    applied = torch.cat([r["nystrom_apply"] for r in ranks])
    assert (applied - M.solve(U)).norm() <= 1e-8 * U.norm()
    assert all(r["pcg_nystrom_converged"] for r in ranks)
    x = torch.linalg.solve(theta.to_dense(), U[:, 0])
    assert (torch.cat([r["pcg_nystrom"] for r in ranks]) - x).norm() <= 1e-9 * x.norm()


# --------------------------------------------------------------------------- scrub
@pytest.mark.parametrize(
    "case, kw",
    [
        ("scrub_mlp", {"ridge": RIDGE}),
        (
            "scrub_ce",
            {
                "loss": "ce",
                "linearize_at": "trained",
                "weight_decay": 1e-2,
                "rescale": "trapezium",
            },
        ),
    ],
)
def test_sharded_scrub_two_ranks(two: list[dict[str, Any]], case: str, kw: dict) -> None:
    ranks = _ok(two, case)
    ref = _reference_scrub("mlp", 2, **kw)
    for r in ranks:
        assert (r["shift"] - ref.shift).abs().max() <= 1e-10 * max(1.0, float(ref.shift.norm()))
    assert torch.equal(ranks[0]["shift"], ranks[1]["shift"])  # bit for bit on every rank
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    assert ranks[0]["info"]["shards"] == [(8, 4), (5, 0)]  # uneven, rank 1's forget empty


def test_sharded_scrub_with_nystrom(two: list[dict[str, Any]]) -> None:
    ranks = _ok(two, "scrub_nystrom")
    ref = _reference_scrub("mlp", 2, ridge=RIDGE, solver_config=SolverConfig(precond_rank=10))
    for r in ranks:
        assert (r["shift"] - ref.shift).abs().max() <= 1e-10 * max(1.0, float(ref.shift.norm()))
    assert torch.equal(ranks[0]["shift"], ranks[1]["shift"])
    # Θ_DD and Θ_rr each build one; the re-solve to tol/ρ (scrub.retain_change) reuses Θ_rr's
    assert ranks[0]["precond"][:2] == ["nystrom (row-sharded)"] * 2
    assert ranks[0]["precond"][2:] in ([], ["nystrom (row-sharded, reused)"])


def test_sharded_scrub_three_ranks(three: list[dict[str, Any]]) -> None:
    for case, kind in (("scrub_mlp", "mlp"), ("scrub_cnn", "cnn")):
        ranks = _ok(three, case)
        ref = _reference_scrub(kind, 3, ridge=RIDGE)
        for r in ranks:
            tol = 1e-10 * max(1.0, float(ref.shift.norm()))
            assert (r["shift"] - ref.shift).abs().max() <= tol
        assert all(torch.equal(ranks[0]["shift"], r["shift"]) for r in ranks[1:])
        assert ranks[0]["info"]["world_size"] == 3
        assert ranks[0]["info"]["shards"] == [(6, 2), (3, 0), (4, 3)]


# --------------------------------------------------------------------------- Lanczos and SLQ
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_lanczos_and_slq_match_one_process(
    world: int, two: list[dict[str, Any]], three: list[dict[str, Any]]
) -> None:
    ranks = _ok(two if world == 2 else three, "lanczos_slq")
    pb = _problem("mlp", world)
    space = ParameterSpace(pb["init"])
    for which in ("retain", "forget"):
        J = Jacobian(space, pb[which])
        theta = (J @ J.mT).add_diagonal(RIDGE)
        ref = slq_logdet(theta, J.shape[0], shift=RIDGE, **SLQ)
        for r in ranks:
            got = r[which]
            assert abs(got["value"] - ref.value) <= 1e-10 * max(1.0, abs(ref.value))
            assert abs(got["upper"] - ref.upper) <= 1e-10 * max(1.0, abs(ref.upper))
            assert abs(got["lower"] - ref.lower) <= 1e-10 * max(1.0, abs(ref.lower))
            diff = torch.tensor(got["per_probe"]) - torch.tensor(ref.per_probe)
            assert diff.abs().max() <= 1e-10 * max(1.0, abs(ref.value))
            assert got == ranks[0][which]  # the same bits on every rank
        # the quadrature has converged; what is left is the Monte-Carlo error of 6 probes
        assert ref.quadrature_halfwidth <= 1e-8 * abs(ref.value)
        exact = float(torch.linalg.slogdet(theta.to_dense())[1])
        assert abs(ref.value - exact) <= 4 * ref.stderr
    J = Jacobian(space, pb["retain"])
    theta = (J @ J.mT).add_diagonal(RIDGE)
    V = torch.randn(J.shape[0], 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref_l = lanczos(theta, V, 12)
    for r in ranks:
        assert r["lanczos"]["steps"] == ref_l.steps
        assert (r["lanczos"]["alpha"] - ref_l.alpha).abs().max() <= 1e-10 * ref_l.alpha.abs().max()
        assert (r["lanczos"]["beta"] - ref_l.beta).abs().max() <= 1e-10 * ref_l.alpha.abs().max()
        for j in range(2):
            ritz = torch.linalg.eigvalsh(ref_l.tridiagonal(j))
            for got, want in ((r["ritz"][j][0], ritz[0]), (r["ritz"][j][-1], ritz[-1])):
                assert abs(float(got - want)) <= 1e-10 * float(ritz[-1])
        assert torch.equal(r["lanczos"]["alpha"], ranks[0]["lanczos"]["alpha"])
        assert torch.equal(r["lanczos"]["beta"], ranks[0]["lanczos"]["beta"])
    # the largest Ritz value has converged to λ_max(Θ + λI) after 12 steps
    lam = torch.linalg.eigvalsh(theta.to_dense())
    assert abs(float(ranks[0]["ritz"][0][-1]) - float(lam[-1])) <= 1e-8 * float(lam[-1])


def test_slq_seed_differing_between_ranks_raises_everywhere(two: list[dict[str, Any]]) -> None:
    errs = [res["slq_seed_differs"] for res in two]
    assert all(e.get("error") == "ValueError" for e in errs), errs
    assert all(e["message"].startswith("seed: differs between ranks") for e in errs), errs


def test_rademacher_rows_tile_the_one_process_probes(monkeypatch: Any) -> None:
    lz = importlib.import_module("ntkscrub.solvers.lanczos")  # the name `lanczos` is the function

    full = lz.rademacher(23, 3, 9, torch.float64, torch.device("cpu"))
    monkeypatch.setattr(lz, "_PROBE_CHUNK", 12)  # 4 rows a chunk: shards cross chunk borders
    cuts = [0, 5, 5, 6, 17, 23]  # uneven, one empty
    parts = [
        lz.rademacher(23, 3, 9, torch.float64, torch.device("cpu"), rows=slice(a, b))
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]
    assert [p.shape[0] for p in parts] == [5, 0, 1, 11, 6]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError, match="rows"):
        lz.rademacher(23, 3, 9, torch.float64, torch.device("cpu"), rows=slice(0, 10, 2))


def test_lanczos_allreduce_hook_leaves_one_process_unchanged() -> None:
    A = torch.randn(30, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    A = A @ A.T + torch.eye(30, dtype=torch.float64)
    v = torch.randn(30, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = lanczos(A, v, 10)
    b = lanczos(A, v, 10, allreduce=lambda t: t)
    assert torch.equal(a.alpha, b.alpha) and torch.equal(a.beta, b.beta) and a.steps == b.steps
    one = Sharding(rows=slice(0, 30), allreduce=lambda t: t)
    ref = slq_logdet(A, 30, probes=4, steps=10, seed=3, shift=1.0)
    est = slq_logdet(A, 30, probes=4, steps=10, seed=3, shift=1.0, shard=one)
    assert est.per_probe == ref.per_probe
    with pytest.raises(ValueError, match="seed"):
        slq_logdet(A, 30, probes=4, steps=10, seed=None, shard=one)
    with pytest.raises(ValueError, match="add up to 20"):
        slq_logdet(A, 30, probes=4, steps=10, seed=3, shard=Sharding(slice(0, 20), one.allreduce))


def test_explicit_process_group_selects_a_subgroup(three: list[dict[str, Any]]) -> None:
    """Ranks 0 and 2 of 3 in a new group: the values are those of shards 0 and 2 together."""
    got = [three[0]["subgroup"], three[2]["subgroup"]]
    for g in got:
        assert "ok" in g, g.get("tb")
    a, b = got[0]["ok"], got[1]["ok"]
    assert "subgroup" not in three[1]
    pb = _problem("mlp", 3)
    (Xr0, Yr0), (Xr2, Yr2) = pb["retain_shards"][0], pb["retain_shards"][2]
    (Xf0, Yf0), (Xf2, Yf2) = pb["forget_shards"][0], pb["forget_shards"][2]
    retain = (torch.cat([Xr0, Xr2]), torch.cat([Yr0, Yr2]))
    forget = (torch.cat([Xf0, Xf2]), torch.cat([Yf0, Yf2]))
    assert a["error"] == b["error"] == ntkscrub.readouts.error(pb["model"], retain)
    J = Jacobian(ParameterSpace(pb["init"]), retain)
    ref = slq_logdet((J @ J.mT).add_diagonal(RIDGE), J.shape[0], shift=RIDGE, **SLQ)
    assert a["slq"] == b["slq"]
    assert abs(a["slq"] - ref.value) <= 1e-10 * abs(ref.value)
    shift = ntkscrub.scrub(pb["model"], retain, forget, init=pb["init"], ridge=RIDGE).shift
    assert torch.equal(a["shift"], b["shift"])
    assert (a["shift"] - shift).abs().max() <= 1e-10 * max(1.0, float(shift.norm()))


# --------------------------------------------------------------------------- failures
def test_bad_shard_on_one_rank_raises_everywhere(two: list[dict[str, Any]]) -> None:
    errs = [res["bad_labels"] for res in two]
    assert all(e.get("error") == "DistributedError" for e in errs), errs
    assert errs[0]["message"] == errs[1]["message"]
    assert errs[0]["message"].startswith("rank 1 failed while building the Jacobians")
    assert "label" in errs[0]["message"]


def test_failing_product_on_one_rank_raises_everywhere(two: list[dict[str, Any]]) -> None:
    errs = [res["failing_product"] for res in two]
    assert all(e.get("error") == "DistributedError" for e in errs), errs
    assert errs[0]["message"] == errs[1]["message"]
    assert "rank 1 failed while computing Jᵀ u" in errs[0]["message"]
    assert "simulated failure in a VJP" in errs[0]["message"]


def test_arguments_or_weights_differing_between_ranks_raise_everywhere(
    two: list[dict[str, Any]],
) -> None:
    for case, start in (
        ("ridge_differs", "ridge: differs between ranks"),
        ("model_differs", "model: the parameters differ between ranks"),
    ):
        errs = [res[case] for res in two]
        assert all(e.get("error") == "ValueError" for e in errs), errs
        assert all(e["message"].startswith(start) for e in errs), errs


def test_non_convergence_raises_on_every_rank(two: list[dict[str, Any]]) -> None:
    errs = [res["not_converged"] for res in two]
    assert all(e.get("error") == "SolveNotConverged" for e in errs), errs
    # The same message up to the measured seconds it quotes.
    same = [e["message"].split(" matvecs, ")[0] for e in errs]
    assert same[0] == same[1]
    assert errs[0]["message"].startswith("Θ_DD: cg[Θ_DD]: 1 of 1 column(s) did not reach")


# --------------------------------------------------------------------------- single process
def test_cg_allreduce_hook_leaves_one_process_unchanged() -> None:
    pb = _problem("mlp", 2)
    J = Jacobian(ParameterSpace(pb["init"]), pb["retain"])
    theta = (J @ J.mT).add_diagonal(RIDGE)
    B = torch.randn(J.shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = 0.5 * B
    x_a, info_a = cg(theta, B, x0=x0, tol=1e-12, max_seconds=float("inf"))
    x_b, info_b = cg(theta, B, x0=x0, tol=1e-12, allreduce=lambda t: t)
    assert torch.equal(x_a, x_b)
    assert info_a.iterations_per_column == info_b.iterations_per_column
    with pytest.raises(ValueError, match="max_seconds"):
        cg(theta, B, tol=1e-12, allreduce=lambda t: t, max_seconds=10.0)


def test_process_group_without_init_is_a_clear_error() -> None:
    assert not dist.is_initialized()
    pb = _problem("mlp", 2)
    with pytest.raises(RuntimeError, match="not initialised"):
        ntkscrub.scrub(
            pb["model"], pb["retain"], pb["forget"], init=pb["init"], process_group=object()
        )
