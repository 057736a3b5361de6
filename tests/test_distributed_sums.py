"""Readouts and bounds that sum over data, under a process group (issue 15): 2 gloo ranks, float64.

One fork of 2 ranks runs every scenario; each rank passes its shard (uneven; rank 1's forget
shard empty) and the tests compare with the one-process value on the concatenation in rank order
(≤ 1e-10) and across ranks (the same value on every rank).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from model_zoo import make_mlp
from test_distributed import _catch, _init_gloo, _ok, _problem, _spawn

from ntkscrub import readouts
from ntkscrub.baselines import finetune, retrain
from ntkscrub.bounds import BoundsConfig, black_box, output_covariance, white_box

ALPHAS = [0.0, 0.5, 1.0, 1.5]
PRIMAL = BoundsConfig(form="primal", cg_tol=1e-12, probes=4, steps=12)
DUAL = BoundsConfig(form="dual", cg_tol=1e-12, probes=4, steps=12)  # the default form
BOUNDS = {  # name: (function, keywords)
    "white_diag": (white_box, {"alpha": 0.1, "kind": "diag"}),
    "white_dense": (
        white_box,
        {"alpha": 0.1, "kind": "full", "config": BoundsConfig(solver="dense")},
    ),
    "white_primal": (white_box, {"alpha": 0.1, "kind": "full", "config": PRIMAL}),
    "black_primal": (black_box, {"alpha": 0.1, "kind": "full", "config": PRIMAL}),
    "white_dual": (white_box, {"alpha": 0.1, "kind": "full", "config": DUAL}),
    "black_dual": (black_box, {"alpha": 0.1, "kind": "full", "config": DUAL}),
}


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return make_mlp(seed=0), make_mlp(seed=1)  # "scrubbed" and "reference" (both eval)


def _readouts(pb: dict[str, Any], rank: int) -> dict[str, Any]:
    model, other = _models()
    retain, forget = pb["retain_shards"][rank], pb["forget_shards"][rank]
    return {
        "error": readouts.error(model, retain),
        "loss_mse": readouts.loss(model, retain, kind="mse", batch_size=3),
        "evaluate": readouts.evaluate(model, {"retain": retain, "forget": forget}),
        "softmax_l1": readouts.softmax_l1(model, other, forget),  # rank 1: empty shard
        "line": readouts.softmax_l1_along_line(model, other, make_mlp(seed=2), retain, ALPHAS),
    }


def _bound(pb: dict[str, Any], rank: int, name: str) -> Any:
    fn, kw = BOUNDS[name]
    scrubbed, reference = _models()
    args = (pb["forget"],) if fn is black_box else ()  # the queries: the same on every rank
    return fn(scrubbed, reference, pb["retain_shards"][rank], *args, **kw)


def _bad_labels(pb: dict[str, Any], rank: int) -> Any:
    X, Y = pb["retain_shards"][rank]
    return readouts.error(_models()[0], (X, torch.full_like(Y, 7) if rank == 1 else Y))


# Retrain / fine-tune: (function, keywords, per-rank batch size, shuffle). Full batch: one step
# per epoch on all 13 samples; fixed order: global batches {r0[0:4], r1[0:4]}, {r0[4:8], r1[4]}.
TRAIN = {
    "retrain_full_batch": (retrain, {"until_zero_error": False, "lr": 0.5}, 16, True),
    "finetune_full_batch_mse": (finetune, {"loss": "mse", "lr": 0.2}, 16, True),
    "retrain_fixed_order": (retrain, {"until_zero_error": False, "lr": 0.5}, 4, False),
}


def _train(pb: dict[str, Any], rank: int | None, name: str) -> dict[str, Any]:
    """On this rank's shard, or (rank None) in one process on the concatenation in the order
    whose global batches the ranks form."""
    fn, kw, batch, shuffle = TRAIN[name]
    X, Y = pb["retain"]
    if rank is not None:
        data, bs = pb["retain_shards"][rank], batch
    elif shuffle:
        data, bs = (X, Y), batch
    else:
        order = torch.cat(
            [torch.arange(0, 4), torch.arange(8, 12), torch.arange(4, 8), torch.tensor([12])]
        )
        data, bs = (X[order], Y[order]), 2 * batch
    res = fn(pb["model"], data, init=pb["init"], epochs=3, batch_size=bs, shuffle=shuffle, **kw)
    w = torch.cat([p.detach().reshape(-1) for p in res.model.parameters()])
    log = res.info["log"]
    return {
        "weights": w,
        "loss": log["train_loss"],
        "error": log["train_error"],
        "n_retain": res.info["n_retain"],
    }


def _train_bad_labels(pb: dict[str, Any], rank: int) -> Any:
    X, Y = pb["retain_shards"][rank]
    data = (X, torch.full_like(Y, 7) if rank == 1 else Y)
    return retrain(pb["model"], data, init=pb["init"], epochs=1, until_zero_error=False)


def _bounds_nan_shard(pb: dict[str, Any], rank: int) -> Any:
    X, Y = pb["retain_shards"][rank]
    if rank == 1:
        X = X.clone()
        X[0, 0] = float("nan")  # only rank 1's shard is bad
    return white_box(*_models(), (X, Y), alpha=0.1, kind="full", config=PRIMAL)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    _init_gloo(rank, world, store)
    pb = _problem("mlp", world)
    results: dict[str, Any] = {}
    try:
        results["readouts"] = _catch(lambda: _readouts(pb, rank))
        results["bad_labels"] = _catch(lambda: _bad_labels(pb, rank))
        for name in BOUNDS:
            results[name] = _catch(lambda name=name: _bound(pb, rank, name))
        results["output_cov"] = _catch(
            lambda: output_covariance(
                _models()[0], pb["retain_shards"][rank], pb["forget"], alpha=0.1, config=PRIMAL
            )
        )
        for name in TRAIN:
            results[name] = _catch(lambda name=name: _train(pb, rank, name))
        results["train_bad_labels"] = _catch(lambda: _train_bad_labels(pb, rank))
        results["bounds_nan_shard"] = _catch(lambda: _bounds_nan_shard(pb, rank))
        dual_nystrom = BoundsConfig(precond_rank=4)
        results["dual_nystrom"] = _catch(
            lambda: white_box(
                *_models(), pb["retain_shards"][rank], alpha=0.1, kind="full", config=dual_nystrom
            )
        )
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two(tmp_path_factory: Any) -> list[dict[str, Any]]:
    return _spawn(2, tmp_path_factory.mktemp("sums2"), _worker)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-10 * max(1.0, abs(b))


def test_readouts_over_shards_equal_one_process(two: list[dict[str, Any]]) -> None:
    ranks = _ok(two, "readouts")
    pb = _problem("mlp", 2)
    model, other = _models()
    ref = {
        "error": readouts.error(model, pb["retain"]),
        "loss_mse": readouts.loss(model, pb["retain"], kind="mse"),
        "softmax_l1": readouts.softmax_l1(model, other, pb["forget"]),
    }
    ev = readouts.evaluate(model, {"retain": pb["retain"], "forget": pb["forget"]})
    line = readouts.softmax_l1_along_line(model, other, make_mlp(seed=2), pb["retain"], ALPHAS)
    assert 0 < ref["error"] < 1 and ref["softmax_l1"] > 0  # nothing trivially zero or one
    for r in ranks:
        for key, want in ref.items():
            assert _close(r[key], want), (key, r[key], want)
        for split in ("retain", "forget"):
            assert r["evaluate"][split]["n"] == ev[split]["n"]
            assert _close(r["evaluate"][split]["error"], ev[split]["error"])
            assert _close(r["evaluate"][split]["loss"], ev[split]["loss"])
        assert r["line"]["alphas"] == line["alphas"]
        for got, want in zip(r["line"]["distances"], line["distances"], strict=True):
            assert _close(got, want)
        assert r == ranks[0]  # the same value on every rank


def test_readout_bad_shard_on_one_rank_raises_everywhere(two: list[dict[str, Any]]) -> None:
    errs = [res["bad_labels"] for res in two]
    assert all(e.get("error") == "DistributedError" for e in errs), errs
    assert errs[0]["message"] == errs[1]["message"]
    assert errs[0]["message"].startswith("rank 1 failed while reading its shard of data")


def _numbers(d: Any, prefix: str = "") -> dict[str, float]:
    """The float leaves of a nested result, keyed by path; timings and solver bookkeeping
    (matvec counts, CG records: one iteration more or less near tol = 1e-12) excluded."""
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            if not any(w in str(k) for w in ("seconds", "matvecs", "cg")):
                out.update(_numbers(v, f"{prefix}/{k}"))
    elif isinstance(d, (list, tuple)):
        for i, v in enumerate(d):
            out.update(_numbers(v, f"{prefix}/{i}"))
    elif isinstance(d, float) and not isinstance(d, bool):
        out[prefix] = d
    return out


@pytest.mark.parametrize("name", list(BOUNDS))
def test_bounds_over_retain_shards_equal_one_process(two: list[dict[str, Any]], name: str) -> None:
    ranks = _ok(two, name)
    fn, kw = BOUNDS[name]
    pb = _problem("mlp", 2)
    args = (pb["forget"],) if fn is black_box else ()
    ref = fn(*_models(), pb["retain"], *args, **kw)
    want = _numbers(ref)
    kl = want["/kl"] if fn is white_box else want["/sets/queries/kl"]
    assert kl > 0
    for r in ranks:
        got = _numbers(r)
        assert got.keys() == want.keys()
        bad = {k: (got[k], want[k]) for k in want if not _close(got[k], want[k])}
        assert not bad, bad
    assert _numbers(ranks[0]) == _numbers(ranks[1])  # rank 0's result on every rank


def test_output_covariance_over_retain_shards(two: list[dict[str, Any]]) -> None:
    ranks = _ok(two, "output_cov")
    pb = _problem("mlp", 2)
    mean, cov = output_covariance(
        _models()[0], pb["retain"], pb["forget"], alpha=0.1, config=PRIMAL
    )
    for r_mean, r_cov in ranks:
        assert (r_mean - mean).abs().max() <= 1e-10 * mean.abs().max()
        assert (r_cov - cov).abs().max() <= 1e-10 * cov.abs().max()
    assert torch.equal(ranks[0][1], ranks[1][1])


def test_bounds_dual_nystrom_is_refused_on_every_rank(two: list[dict[str, Any]]) -> None:
    errs = [res["dual_nystrom"] for res in two]
    assert all(e.get("error") == "ValueError" for e in errs), errs
    assert all(e["message"].startswith("config: precond_rank > 0 with form='dual'") for e in errs)


@pytest.mark.parametrize("name", list(TRAIN))
def test_retrain_and_finetune_over_shards_equal_one_process(
    two: list[dict[str, Any]], name: str
) -> None:
    ranks = _ok(two, name)
    ref = _train(_problem("mlp", 2), None, name)
    moved = ref["weights"] - torch.cat(
        [p.reshape(-1) for p in _problem("mlp", 2)["init"].parameters()]
    )
    assert moved.norm() > 1e-2  # the steps did something
    for r in ranks:
        scale = ref["weights"].abs().max()
        assert (r["weights"] - ref["weights"]).abs().max() <= 1e-10 * scale
        # train() logs the loss in float32 (its _eval_pass casts the logits), so the per-rank
        # partial sums round differently there; the weights above are the float64 check.
        for got, want in zip(r["loss"], ref["loss"], strict=True):
            assert abs(got - want) <= 1e-6 * abs(want)
        assert r["error"] == ref["error"]
        assert r["n_retain"] == 13
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])  # bit for bit on every rank


def test_retrain_bad_shard_on_one_rank_raises_everywhere(two: list[dict[str, Any]]) -> None:
    errs = [res["train_bad_labels"] for res in two]
    assert all(e.get("error") == "DistributedError" for e in errs), errs
    assert errs[0]["message"] == errs[1]["message"]
    assert errs[0]["message"].startswith("rank 1 failed while reading its training shard")


def test_bounds_bad_shard_on_one_rank_raises_everywhere(two: list[dict[str, Any]]) -> None:
    errs = [res["bounds_nan_shard"] for res in two]
    assert all(e.get("error") == "DistributedError" for e in errs), errs
    assert errs[0]["message"] == errs[1]["message"]
    assert errs[0]["message"].startswith("rank 1 failed while building scrubbed's covariance")
    assert "retain: inputs contain NaN" in errs[0]["message"]
