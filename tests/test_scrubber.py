"""ntkscrub.Scrubber: prepared once, each request equals a fresh scrub of everything forgotten."""

from __future__ import annotations

import copy

import pytest
import torch
from model_zoo import make_cnn, make_data, make_mlp
from torch.utils.data import DataLoader, TensorDataset

from ntkscrub import Scrubber, scrub
from ntkscrub.config import SolverConfig
from ntkscrub.operators import Jacobian


def rel(a, b):
    return float((a - b).norm() / b.norm())


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def setup(kind="mlp", n=24, seed=0):
    model = make_mlp(seed=seed) if kind == "mlp" else make_cnn(seed=seed)
    init = make_mlp(seed=seed + 7) if kind == "mlp" else make_cnn(seed=seed + 7)
    X, Y = make_data(kind, n)
    return model, init, X, Y


def split(X, Y, forget):
    keep = [i for i in range(len(X)) if i not in set(forget)]
    return (X[keep], Y[keep]), (X[forget], Y[forget])


def fresh(model, init, X, Y, forget, **kw):
    retain, forget_set = split(X, Y, list(forget))
    return scrub(model, retain, forget_set, init=init, **kw)


SETTINGS = [
    pytest.param({"solver": "cg", "loss": "mse", "ridge": 0.5}, id="cg-mse-ridge"),
    pytest.param({"solver": "cg", "loss": "ce", "weight_decay": 0.05}, id="cg-ce-wd"),
    pytest.param({"solver": "dense", "loss": "ce", "ridge": 0.5}, id="dense-ce-ridge"),
    pytest.param({"solver": "dense", "loss": "mse", "weight_decay": 0.05}, id="dense-mse-wd"),
]


@pytest.mark.parametrize("kw", SETTINGS)
def test_one_request_equals_fresh_scrub(kw):
    model, init, X, Y = setup()
    before = flat(model).clone()
    X0, Y0 = X.clone(), Y.clone()
    s = Scrubber(model, (X, Y), init=init, tol=1e-12, **kw)
    forget = [3, 17, 8]
    got = s.forget(forget)
    want = fresh(model, init, X, Y, sorted(forget), tol=1e-12, **kw)
    assert rel(got.shift, want.shift) <= 1e-6
    assert rel(flat(got.model), flat(want.model)) <= 1e-10
    assert got.info["ridge_r"] == pytest.approx(want.info["ridge_r"])
    assert got.info["ridge_d"] == pytest.approx(want.info["ridge_d"])
    # inputs untouched
    assert torch.equal(flat(model), before)
    assert torch.equal(X, X0) and torch.equal(Y, Y0)


@pytest.mark.parametrize("kw", SETTINGS[:2])
def test_cnn_trained_point(kw):
    """The reference code's linearisation point (w(D)) on a CNN with BatchNorm."""
    model, init, X, Y = setup("cnn", n=16)
    s = Scrubber(model, (X, Y), init=init, linearize_at="trained", tol=1e-12, **kw)
    got = s.forget([0, 5])
    want = fresh(model, init, X, Y, [0, 5], linearize_at="trained", tol=1e-12, **kw)
    assert rel(got.shift, want.shift) <= 1e-6


@pytest.mark.parametrize("kw", [SETTINGS[0], SETTINGS[1], SETTINGS[3]])
def test_successive_requests_compose(kw):
    model, init, X, Y = setup()
    s = Scrubber(model, (X, Y), init=init, tol=1e-12, **kw)
    first = s.forget([4, 11])
    second = s.forget(torch.tensor([20, 1]))
    want_first = fresh(model, init, X, Y, [4, 11], tol=1e-12, **kw)
    want_union = fresh(model, init, X, Y, [1, 4, 11, 20], tol=1e-12, **kw)
    assert rel(first.shift, want_first.shift) <= 1e-6
    assert rel(second.shift, want_union.shift) <= 1e-6
    # the second result is relative to w(D), not to the first scrubbed model
    assert rel(flat(second.model) - flat(model), want_union.shift) <= 1e-6
    assert second.info["forgotten"] == [1, 4, 11, 20]
    assert second.info["n_retain"] == 20 and second.info["n_forget"] == 4
    assert len(s.requests) == 2


def test_preconditioned_and_warm_started_request():
    """A Nyström factor on Θ_DD (rank forced) restricted to the retained rows, and the warm
    start from the previous request: same answer as a fresh scrub."""
    model, init, X, Y = setup(n=30)
    cfg = SolverConfig(precond_rank=10)
    kw = {"loss": "mse", "ridge": 0.1}
    s = Scrubber(model, (X, Y), init=init, tol=1e-12, solver_config=cfg, **kw)
    s.forget([2, 9])
    got = s.forget([25])
    assert got.info["solves"][0]["precond"].startswith("nystrom (restricted")
    want = fresh(model, init, X, Y, [2, 9, 25], tol=1e-12, solver_config=cfg, **kw)
    assert rel(got.shift, want.shift) <= 1e-6


def test_dataset_and_loader_forms():
    model, init, X, Y = setup()
    kw = {"loss": "ce", "ridge": 0.2, "tol": 1e-12}
    ref = Scrubber(model, (X, Y), init=init, **kw).forget([6, 7])
    ds = TensorDataset(X, Y)
    by_ds = Scrubber(model, ds, init=init, **kw).forget([6, 7])
    by_loader = Scrubber(model, DataLoader(ds, batch_size=5), init=init, **kw).forget([7, 6])
    assert rel(by_ds.shift, ref.shift) <= 1e-10
    assert rel(by_loader.shift, ref.shift) <= 1e-10


def test_records_per_request():
    model, init, X, Y = setup()
    s = Scrubber(model, (X, Y), init=init, ridge=0.5, tol=1e-12, solver="cg")
    prep = s.prepare_info
    assert prep["matvecs"] > 0 and prep["iterations"] > 0 and prep["converged"]
    res = s.forget([0])
    req = res.info["request"]
    for key in ("matvecs", "seconds", "iterations", "converged"):
        assert key in req
    assert req["matvecs"] > 0 and req["iterations"] > 0 and req["converged"] is True
    assert res.info["prepare"]["matvecs"] == prep["matvecs"]
    full = fresh(model, init, X, Y, [0], ridge=0.5, tol=1e-12, solver="cg")
    assert full.info["matvecs"] > 0  # both counted (speed is for the benchmarks, not asserted)


def test_bad_indices():
    model, init, X, Y = setup(n=10)
    s = Scrubber(model, (X, Y), init=init, ridge=0.5)
    for bad in ([10], [-1], [2, 2], []):
        with pytest.raises(ValueError, match="indices"):
            s.forget(bad)
    for bad in ([1.0], [True], "12", torch.tensor([0.5])):
        with pytest.raises(TypeError, match="indices"):
            s.forget(bad)
    with pytest.raises(ValueError, match="indices"):
        s.forget(list(range(10)))  # nothing left to retain
    s.forget([3])
    with pytest.raises(ValueError, match="already forgotten"):
        s.forget([4, 3])
    # a refused request leaves the state unchanged
    assert s.forgotten == [3] and len(s.requests) == 1


def test_bad_arguments():
    model, init, X, Y = setup(n=10)
    with pytest.raises(ValueError, match="weight_decay"):
        Scrubber(model, (X, Y), init=init, ridge=0.1, weight_decay=0.1)
    with pytest.raises(ValueError, match="loss"):
        Scrubber(model, (X, Y), init=init, loss="hinge")
    with pytest.raises(ValueError, match="solver"):
        Scrubber(model, (X, Y), init=init, solver="lu")
    with pytest.raises(TypeError, match="model"):
        Scrubber("net", (X, Y), init=init)


# --------------------------------------------------------------------------- cached prefix
@pytest.mark.parametrize(
    "kind,params,k",
    [("mlp", ["2.weight", "2.bias"], 2), ("cnn", r"^7\.", 7), ("cnn", r"^(4|7)\.", 4)],
)
@pytest.mark.parametrize("point", ["init", "trained"])
def test_cached_prefix_equals_full_products(kind, params, k, point):
    """params selecting a suffix of an nn.Sequential: the frozen prefix runs once, and the
    request still equals a fresh scrub with the same params (and the uncached Scrubber)."""
    model, init, X, Y = setup(kind, n=16)
    kw = {"loss": "ce", "ridge": 0.3, "tol": 1e-12, "params": params, "linearize_at": point}
    s = Scrubber(model, (X, Y), init=init, **kw)
    assert s.prepare_info["prefix_cached"]["at"] == str(k - 1)  # the last frozen child
    plain = Scrubber(model, (X, Y), init=init, cache_prefix=False, **kw)
    assert plain.prepare_info["prefix_cached"] is None
    got = s.forget([1, 6])
    want = fresh(model, init, X, Y, [1, 6], **kw)
    assert rel(got.shift, want.shift) <= 1e-6
    assert rel(got.shift, plain.forget([1, 6]).shift) <= 1e-8
    assert rel(flat(got.model), flat(want.model)) <= 1e-10
    assert got.shift.shape[0] == want.info["p"] < sum(p.numel() for p in model.parameters())


def test_no_prefix_to_cache():
    model, init, X, Y = setup(n=10)
    s = Scrubber(model, (X, Y), init=init, ridge=0.5)  # all parameters: nothing frozen
    assert s.prepare_info["prefix_cached"] is None
    with pytest.raises(TypeError, match="cache_prefix"):
        Scrubber(model, (X, Y), init=init, ridge=0.5, cache_prefix=1)


@pytest.mark.parametrize("name", ["mlp", "smallcnn"])
def test_cached_prefix_on_features_classifier_models(name):
    """ntkscrub's own models (features → classifier): the head is linearised on cached
    features, with the same result as a fresh head-only scrub."""
    from ntkscrub.recipes.models import build_model

    kw_model = {"in_features": 36, "hidden": (16,)} if name == "mlp" else {"in_channels": 1}
    model = build_model(name, 3, 1.0, seed=0, **kw_model).double().eval()
    init = build_model(name, 3, 1.0, seed=5, **kw_model).double().eval()
    X, Y = make_data("cnn", 14)
    kw = {"loss": "mse", "weight_decay": 0.05, "tol": 1e-12, "params": r"^classifier\."}
    s = Scrubber(model, (X, Y), init=init, **kw)
    assert s.prepare_info["prefix_cached"]["at"] == "features"
    got = s.forget([0, 13])
    want = fresh(model, init, X, Y, [0, 13], **kw)
    assert rel(got.shift, want.shift) <= 1e-6


def test_request_tightens_its_solve_by_the_cancellation_of_delta():
    """Δ = J_Rᵀy − J_Fᵀα_F is a difference: forgetting near-duplicates of retained samples makes
    ρ = ‖J_Fᵀα_F‖/‖Δ‖ large, and y is solved again to tol/ρ (recorded), so the request is as
    accurate as a fresh scrub at the same tol (float64 reference at 1e-12)."""
    model, init, X, Y = setup("mlp", n=60)
    g = torch.Generator().manual_seed(0)
    X = torch.cat([X[:3] + 1e-2 * torch.randn(X[:3].shape, generator=g, dtype=X.dtype), X])
    Y = torch.cat([Y[:3], Y])
    kw = {"loss": "ce", "weight_decay": 0.05, "linearize_at": "trained", "solver": "cg"}
    s = Scrubber(model, (X, Y), init=init, tol=1e-3, **kw)
    got = s.forget([0, 1, 2])
    rho = got.info["solves"][-1]["cancellation"]
    assert rho > 1 and got.info["solves"][-1]["system"] == "Θ_rr (tol / cancellation)"
    assert got.info["solves"][-1]["tol"] == pytest.approx(1e-3 / rho)
    assert got.info["converged"]
    exact = fresh(model, init, X, Y, [0, 1, 2], tol=1e-12, **kw)
    loose = fresh(model, init, X, Y, [0, 1, 2], tol=1e-3, **kw)
    assert rel(got.shift, exact.shift) <= 2 * rel(loose.shift, exact.shift) + 1e-4


# --------------------------------------------------------------------------- dense twin
def test_dense_request_slices_the_prepared_system(monkeypatch):
    """solver='dense': a request reads Θ_RR + λ_R I from the prepared Θ_DD and J_R, J_F from the
    explicit rows of J_D — no per-sample Jacobian is computed again, no product is counted —
    and equals a fresh dense scrub of everything forgotten (float64)."""
    model, init, X, Y = setup(n=30)
    kw = {"loss": "ce", "weight_decay": 0.05, "solver": "dense"}
    s = Scrubber(model, (X, Y), init=init, **kw)
    calls = []
    rows = Jacobian.dense_rows

    def counted(self, *a, **k):
        calls.append(self.name)
        return rows(self, *a, **k)

    monkeypatch.setattr(Jacobian, "dense_rows", counted)
    first = s.forget([5, 12])
    second = s.forget([0])
    assert calls == []
    assert first.info["request"]["matvecs"] == 0
    assert first.info["solves"][0]["system"] == "Θ_RR (slice of Θ_DD)"
    monkeypatch.setattr(Jacobian, "dense_rows", rows)
    assert rel(first.shift, fresh(model, init, X, Y, [5, 12], **kw).shift) <= 1e-9
    assert rel(second.shift, fresh(model, init, X, Y, [0, 5, 12], **kw).shift) <= 1e-9


def test_dense_request_in_float32_sums_in_float64():
    """A float32 model: the sliced request is as close to the float64 scrub as a fresh float32
    dense scrub is (both solve in float64; the slice also sums its products there)."""
    model, init, X, Y = setup(n=30)
    kw = {"loss": "mse", "weight_decay": 0.05, "solver": "dense"}
    exact = fresh(model, init, X, Y, [3, 4, 20], **kw).shift
    m32, i32 = copy.deepcopy(model).float(), copy.deepcopy(init).float()
    got = Scrubber(m32, (X.float(), Y), init=i32, **kw).forget([3, 4, 20]).shift.double()
    want = fresh(m32, i32, X.float(), Y, [3, 4, 20], **kw).shift.double()
    assert rel(got, exact) <= max(2 * rel(want, exact), 1e-6)


def test_auto_solver_is_the_default():
    """solver=None: "auto" on D (prepare_info["auto_solver"]), as scrub's default; a given
    solver configuration keeps its method; a memory cap too small for the dense twin gives cg."""
    model, init, X, Y = setup()
    s = Scrubber(model, (X, Y), init=init, ridge=0.5)
    est = s.prepare_info["auto_solver"]
    assert est["method"] == s.cfg.method == "dense"  # a 24-sample MLP: the twin is cheap
    assert est["dense_bytes"] == 24 * s.c * s.J_D.p * 8 + 2 * (24 * s.c) ** 2 * 8
    want = fresh(model, init, X, Y, [7], ridge=0.5)
    assert rel(s.forget([7]).shift, want.shift) <= 1e-9
    tight = SolverConfig(max_dense_bytes=1)
    capped = Scrubber(model, (X, Y), init=init, ridge=0.5, solver="auto", solver_config=tight)
    assert (
        capped.cfg.method == "cg"
        and "max_dense_bytes" in capped.prepare_info["auto_solver"]["reason"]
    )
    given = Scrubber(model, (X, Y), init=init, ridge=0.5, solver_config=SolverConfig())
    assert given.cfg.method == "cg" and given.prepare_info["auto_solver"] is None
