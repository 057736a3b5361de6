"""BoundsConfig (validation, records), the one solve class of the bounds, float32 vs float64."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json

import pytest
import torch
from torch import nn

from ntkscrub import bounds
from ntkscrub.bounds import BoundsConfig, FisherVariance
from ntkscrub.bounds.inverse import Inverse
from ntkscrub.noise import fisher_noise_variance
from ntkscrub.params import ParameterSpace
from ntkscrub.scrub import diagonal_fisher

F64 = torch.float64


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    Xr = torch.randn(20, 5, generator=g, dtype=F64)
    Yr = torch.randint(0, 3, (20,), generator=g)
    Xq = torch.randn(4, 5, generator=g, dtype=F64)
    reference = _mlp(0)
    scrubbed = copy.deepcopy(reference)
    with torch.no_grad():
        for p in scrubbed.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=F64))
    return scrubbed, reference, (Xr, Yr), Xq


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "field, value, error",
    [
        ("reduction", "avg", ValueError),
        ("loss", "nll", ValueError),
        ("solver", "cholesky", ValueError),
        ("form", "woodbury", ValueError),
        ("fisher", {"clamp": 1.0}, TypeError),
        ("cg_tol", 0.0, ValueError),
        ("cg_tol", "1e-6", TypeError),
        ("cg_max_iter", 0, ValueError),
        ("cg_max_iter", 2.5, TypeError),
        ("cg_strict", 1, TypeError),
        ("cg_scalar_dtype", "float64", TypeError),
        ("precond_rank", -1, ValueError),
        ("cg_inner_precision", "int8", ValueError),
        ("probes", 1, ValueError),
        ("steps", 0, ValueError),
        ("seed", 1.5, TypeError),
        ("seed", True, TypeError),
        ("batch_size", 0, ValueError),
        ("query_batch", 0, ValueError),
        ("jitter", -1.0, ValueError),
        ("jitter", float("nan"), ValueError),
    ],
)
def test_bad_config_field_raises_naming_it(field, value, error):
    with pytest.raises(error, match=rf"BoundsConfig\.{field}\b"):
        BoundsConfig(**{field: value})
    # dataclasses.replace validates too (it goes through __init__).
    with pytest.raises(error, match=rf"BoundsConfig\.{field}\b"):
        dataclasses.replace(BoundsConfig(), **{field: value})


@pytest.mark.parametrize(
    "field, value, error",
    [("clamp", -1.0, ValueError), ("eps", "tiny", TypeError), ("average_inputs", 1, TypeError)],
)
def test_bad_fisher_field_raises_naming_it(field, value, error):
    with pytest.raises(error, match=rf"FisherVariance\.{field}\b"):
        FisherVariance(**{field: value})


def test_config_is_frozen_and_unknown_fields_are_refused(problem):
    scrubbed, reference, retain, _ = problem
    cfg = BoundsConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.probes = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="tol"):
        BoundsConfig(tol=1e-3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="config"):
        bounds.white_box(scrubbed, reference, retain, alpha=1e-2, config={"probes": 3})
    # The old per-function keywords are gone from the signatures (one config keyword instead).
    with pytest.raises(TypeError, match="probes"):
        bounds.white_box(scrubbed, reference, retain, alpha=1e-2, probes=3)  # type: ignore


def test_fisher_variance_defaults_are_the_noise_functions():
    sig = inspect.signature(fisher_noise_variance).parameters
    for f in dataclasses.fields(FisherVariance):
        assert getattr(FisherVariance(), f.name) == sig[f.name].default, f.name


def test_entry_points_share_one_signature():
    names = ("white_box", "black_box", "per_query_information", "information_bounds")
    for n in names + ("output_covariance",):
        params = inspect.signature(getattr(bounds, n)).parameters
        assert {"alpha", "kind", "delta", "config"} <= set(params), n
        assert len(params) <= 9, n
        assert params["config"].default is None and params["config"].kind.name == "KEYWORD_ONLY"


# --------------------------------------------------------------------------- records
def _plain(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return x is None or isinstance(x, (bool, int, float, str))


def test_config_recorded_in_results_as_plain_dict(problem):
    scrubbed, reference, retain, Xq = problem
    cfg = BoundsConfig(
        probes=3, steps=4, seed=5, cg_tol=1e-8, query_batch=2, fisher=FisherVariance(clamp=50.0)
    )
    kw = dict(alpha=1e-2, kind="diag", config=cfg)
    expect = cfg.to_dict()
    assert _plain(expect) and json.loads(json.dumps(expect)) == expect
    assert expect["probes"] == 3 and expect["fisher"]["clamp"] == 50.0
    assert expect["cg_scalar_dtype"] == "torch.float64"
    both = bounds.information_bounds(scrubbed, reference, retain, queries=Xq, **kw)
    records = [
        both,
        both["white_box"],
        bounds.white_box(scrubbed, reference, retain, **kw),
        bounds.black_box(scrubbed, reference, retain, Xq, **kw),
        bounds.per_query_information(scrubbed, reference, retain, Xq, **kw),
    ]
    for rec in records:
        assert rec["config"] == expect and _plain(rec["config"])
        assert rec["kind"] == "diag" and rec["alpha"] == 1e-2
        assert rec["fisher_options"] == dataclasses.asdict(cfg.fisher)
    # Default config when none is given; selectors that are not strings recorded as strings/lists.
    assert bounds.white_box(scrubbed, reference, retain, alpha=1e-2)["config"] == (
        BoundsConfig().to_dict()
    )
    assert BoundsConfig(params=["0.weight", "0.bias"]).to_dict()["params"] == ["0.weight", "0.bias"]
    assert BoundsConfig(params={"b", "a"}).to_dict()["params"] == ["a", "b"]
    pick = lambda name, _: name.startswith("0.")  # noqa: E731
    assert BoundsConfig(params=pick).to_dict()["params"] == repr(pick)


def test_names_given_as_a_generator_select_the_same_parameters_on_both_models(problem):
    scrubbed, reference, retain, _ = problem
    names = ["0.weight", "0.bias"]
    kw = dict(alpha=1e-2, kind="diag")
    by_list = bounds.white_box(scrubbed, reference, retain, config=BoundsConfig(params=names), **kw)
    gen = BoundsConfig(params=(n for n in names))
    by_gen = bounds.white_box(scrubbed, reference, retain, config=gen, **kw)
    assert by_gen["kl"] == by_list["kl"] and by_gen["p"] == by_list["p"] == 36
    assert by_gen["config"]["params"] == names
    with pytest.raises(TypeError, match=r"BoundsConfig\.params"):
        BoundsConfig(params=3)


def test_fisher_recipe_reaches_the_diagonal_noise(problem):
    """A non-default recipe changes the white box exactly as fisher_noise_variance says."""
    scrubbed, reference, retain, _ = problem
    recipe = FisherVariance(clamp=10.0, head_clamp=5.0, average_inputs=False)
    cfg = BoundsConfig(fisher=recipe)
    out = bounds.white_box(scrubbed, reference, retain, alpha=1e-3, kind="diag", config=cfg)
    space = ParameterSpace(scrubbed)
    v = [
        space.flatten(fisher_noise_variance(diagonal_fisher(m, retain), 1e-3, 3, **recipe.kwargs()))
        for m in (scrubbed, reference)
    ]
    expect = bounds.gaussian_kl_diag(space.point(scrubbed), v[0], space.point(reference), v[1])
    assert out["kl"] == pytest.approx(expect["kl"], rel=1e-12)
    default = bounds.white_box(scrubbed, reference, retain, alpha=1e-3, kind="diag")
    assert abs(default["kl"] - out["kl"]) > 1e-3 * abs(out["kl"])


# --------------------------------------------------------------------------- the one solve class
def test_inverse_backends_match_a_dense_solve():
    g = torch.Generator().manual_seed(4)
    K = torch.randn(12, 12, generator=g, dtype=F64)
    A = K @ K.T + 0.5 * torch.eye(12, dtype=F64)  # 0.5·I + PSD
    B = torch.randn(12, 3, generator=g, dtype=F64)
    exact = torch.linalg.solve(A, B)
    dense = Inverse(BoundsConfig(), n=12, label="dense", dense=lambda: A)
    torch.testing.assert_close(dense(B), exact, rtol=1e-10, atol=0)
    torch.testing.assert_close(dense.cholesky() @ dense.cholesky().T, A, rtol=1e-12, atol=1e-12)
    assert dense.records == []
    for rank in (0, 5):
        cfg = BoundsConfig(cg_tol=1e-12, precond_rank=rank)
        inv = Inverse(cfg, n=12, label="primal", op=lambda V: A @ V, shift=0.5)
        torch.testing.assert_close(inv(B), exact, rtol=1e-8, atol=1e-10)
        inv(B[:, 0])  # a second solve reuses the preconditioner
        assert (inv.preconditioner is not None) == (rank > 0)
        assert [r["rhs"] for r in inv.records] == [3, 1]
        assert all(r["converged"] and r["system"] == "primal" for r in inv.records)
    with pytest.raises(ValueError, match="exactly one"):
        Inverse(BoundsConfig(), n=12, label="x")
    with pytest.raises(ValueError, match="dense backend"):
        Inverse(BoundsConfig(), n=12, label="x", op=lambda V: V).cholesky()


# --------------------------------------------------------------------------- precision
def test_float32_matches_float64(problem):
    """The same bounds in float32 and float64 (KL terms are always summed in float64).

    Measured on this problem: the diagonal white box agrees to 3e-7 relative; the full bounds
    (matrix-free, dual form, CG to 1e-5, 30 SLQ probes) to 4e-7 (white box) and 6e-6 (black box).
    Tolerances: 1e-5 and 1e-4 relative.
    """
    scrubbed, reference, (Xr, Yr), Xq = problem
    cases = (("diag", BoundsConfig(), 1e-5), ("full", BoundsConfig(cg_tol=1e-5), 1e-4))
    for kind, cfg, tol in cases:
        res = {}
        for dt in (torch.float64, torch.float32):
            s, r = copy.deepcopy(scrubbed).to(dt), copy.deepcopy(reference).to(dt)
            res[dt] = bounds.information_bounds(
                s, r, (Xr.to(dt), Yr), queries={"q": Xq.to(dt)},
                alpha=1e-2, delta=0.05, kind=kind, config=cfg,
            )  # fmt: skip
        r64, r32 = res[torch.float64], res[torch.float32]
        for key in ("white_box", "black_box"):
            e64 = r64[key] if key == "white_box" else r64[key]["q"]
            e32 = r32[key] if key == "white_box" else r32[key]["q"]
            assert e32["kl"] == pytest.approx(e64["kl"], rel=tol), (kind, key)
            assert e32["kl"] != e64["kl"], "float32 path not taken"
    # Mixed precision (products rounded to bf16 inside CG, emulated on float64; the true
    # residual in float64) reaches the same bounds as full-precision CG.
    cfg = BoundsConfig(cg_tol=1e-8)
    full, mixed = (
        bounds.information_bounds(
            scrubbed, reference, (Xr, Yr), queries={"q": Xq}, alpha=1e-2, delta=0.05,
            kind="full", config=dataclasses.replace(cfg, cg_inner_precision=ip),
        )
        for ip in (None, "bfloat16")
    )  # fmt: skip
    assert mixed["white_box"]["kl"] == pytest.approx(full["white_box"]["kl"], rel=1e-6)
    assert mixed["black_box"]["q"]["kl"] == pytest.approx(full["black_box"]["q"]["kl"], rel=1e-6)
    # The float32 covariance is computed in float32.
    s32 = copy.deepcopy(scrubbed).float()
    _, C = bounds.output_covariance(s32, (Xr.float(), Yr), Xq.float(), alpha=1e-2)
    assert C.dtype == torch.float32


def test_every_solve_of_the_bounds_goes_through_inverse():
    """Guard for the one-place rule: outside bounds/inverse.py no module imports a linear solver
    or calls a factorised solve on A (gaussian.py's Cholesky of the small c·k output covariances is
    the KL's own algebra, not a solve with A)."""
    import ast
    from pathlib import Path

    import ntkscrub.bounds as pkg

    solvers_allowed = {"rademacher", "slq_logdet"}  # probes and log-determinants, no solves
    banned_calls = {"cholesky_solve", "solve", "cholesky", "inv", "cg", "lstsq"}
    for path in sorted(Path(pkg.__file__).parent.glob("*.py")):
        if path.name == "inverse.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "ntkscrub.solvers"
            ):
                names = {a.name for a in node.names}
                assert names <= solvers_allowed, (path.name, names - solvers_allowed)
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)  # e.g. torch.linalg.solve, sigma.inverse.cholesky
                is_torch = name.startswith("torch.") and name.split(".")[-1] in banned_calls
                assert not is_torch and name not in banned_calls, (path.name, node.lineno, name)
