"""ntkscrub.scrub: the exact identity, cg = dense, block = two solves, noise, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from model_zoo import make_cnn, make_data, min_norm_interpolant, random_features_model
from torch import nn
from torch.utils.data import Subset, TensorDataset

from ntkscrub.config import ProductConfig, SolverConfig
from ntkscrub.operators import SolveNotConverged
from ntkscrub.scrub import (
    diagonal_fisher,
    fisher_noise_variance,
    scrub,
    trapezium_scale,
)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


# --------------------------------------------------------------------------- exact identity
def ridge_optimum(model, theta0_model, X, Y, lam):
    """θ0 + argmin_w ½‖Φ w − e‖² + ½λ‖w‖², solved in *parameter space* (primal normal
    equations) — independent of the dual NTK form that scrub uses."""
    with torch.no_grad():
        phi = torch.tanh(theta0_model[0](X))  # (N, h)
        c = theta0_model[2].out_features
        Phi = torch.cat([phi, torch.ones(len(X), 1, dtype=phi.dtype)], 1)  # (N, h+1)
        e = torch.nn.functional.one_hot(Y, c).double() - theta0_model(X)  # (N, c)
        # rows (n, k) of J are Φ_n ⊗ e_k; the system decouples over the c output rows.
        A = Phi.T @ Phi + lam * torch.eye(Phi.shape[1], dtype=Phi.dtype)
        Wb = torch.linalg.solve(A, Phi.T @ e).T  # (c, h+1)
        out = copy.deepcopy(theta0_model)
        out[2].weight.add_(Wb[:, :-1])
        out[2].bias.add_(Wb[:, -1])
    return out


@pytest.mark.parametrize("lam", [0.3, 0.0])
def test_exact_identity_linear_model(lam):
    theta0 = random_features_model(seed=0)
    g = torch.Generator().manual_seed(4)
    X = torch.randn(30, 5, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (30,), generator=g)
    Xr, Yr, Xf, Yf = X[:24], Y[:24], X[24:], Y[24:]
    if lam == 0.0:  # min-norm solution needs c·N < p: 3·30 = 90 > 39, so use fewer samples
        X, Y, Xr, Yr, Xf, Yf = X[:10], Y[:10], X[:8], Y[:8], X[8:10], Y[8:10]
        trained = min_norm_interpolant(theta0, X, Y)
        target = min_norm_interpolant(theta0, Xr, Yr)
    else:
        trained = ridge_optimum(None, theta0, X, Y, lam)
        target = ridge_optimum(None, theta0, Xr, Yr, lam)
    res = scrub(
        trained,
        (Xr, Yr),
        (Xf, Yf),
        init=theta0,
        linearize_at="init",
        loss="mse",
        ridge=lam,
        solver="cg",
        tol=1e-12,
    )
    assert rel(flat(res.model), flat(target)) <= 1e-6
    assert res.info["matvecs"] > 0 and res.info["solves"][0]["converged"]


# --------------------------------------------------------------------------- cg = dense
@pytest.fixture(scope="module")
def cnn_problem():
    init = make_cnn(seed=0)
    trained = copy.deepcopy(init)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    X, Y = make_data("cnn", 16)
    return trained, init, (X[:12], Y[:12]), (X[12:], Y[12:])


@pytest.mark.parametrize("linearize_at", ["init", "trained"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_cg_matches_dense(cnn_problem, linearize_at, loss):
    trained, init, retain, forget = cnn_problem
    kw = dict(init=init, linearize_at=linearize_at, loss=loss, ridge=0.05)
    dense = scrub(trained, retain, forget, solver="dense", **kw)
    cg = scrub(trained, retain, forget, solver="cg", tol=1e-12, **kw)
    block = scrub(trained, retain, forget, solver="cg", tol=1e-12, form="block", **kw)
    dense_block = scrub(trained, retain, forget, solver="dense", form="block", **kw)
    assert rel(cg.shift, dense.shift) <= 1e-6
    assert rel(block.shift, dense.shift) <= 1e-6
    assert rel(dense_block.shift, dense.shift) <= 1e-9
    assert float(dense.shift.norm()) > 0


def test_shared_preconditioner_saves_a_build(cnn_problem):
    trained, init, retain, forget = cnn_problem
    kw = dict(init=init, weight_decay=0.01, solver="cg", tol=1e-10)
    own = scrub(
        trained,
        retain,
        forget,
        solver_config=SolverConfig(precond_rank=8, share_precond=False),
        **kw,
    )
    shared = scrub(trained, retain, forget, solver_config=SolverConfig(precond_rank=8), **kw)
    assert rel(shared.shift, own.shift) <= 1e-7
    d_own, r_own, *again_own = own.info["solves"]  # again: y to tol/ρ (retain_change)
    d_sh, r_sh, *again_sh = shared.info["solves"]
    assert all(a["precond_matvecs"] == 0 for a in again_own + again_sh)  # the factor reused
    assert d_own["precond_matvecs"] == d_sh["precond_matvecs"] == 8
    assert r_own["precond_matvecs"] == 8 and r_sh["precond_matvecs"] == 0
    assert "restricted" in r_sh["precond"] and r_sh["converged"]
    assert shared.info["matvecs"] <= own.info["matvecs"] - 8 + 2  # the build, ± an iteration


def test_weight_decay_convention(cnn_problem):
    trained, init, retain, forget = cnn_problem
    a = scrub(trained, retain, forget, init=init, solver="dense", weight_decay=0.01)
    assert a.info["ridge_r"] == pytest.approx(12 * 0.01)
    assert a.info["ridge_d"] == pytest.approx(16 * 0.01)
    b = scrub(trained, retain, forget, init=init, solver="cg", weight_decay=0.01, tol=1e-12)
    assert rel(b.shift, a.shift) <= 1e-6
    with pytest.raises(ValueError, match="form"):
        scrub(trained, retain, forget, init=init, weight_decay=0.01, form="block")


def test_trapezium(cnn_problem):
    trained, init, retain, forget = cnn_problem
    plain = scrub(trained, retain, forget, init=init, solver="dense", ridge=0.05)
    res = scrub(trained, retain, forget, init=init, solver="dense", ridge=0.05, rescale="trapezium")
    s = res.info["rescale_factor"]
    assert s >= 1.0
    assert rel(res.shift, s * plain.shift) <= 1e-12
    d = torch.tensor([1.0, 0.0])
    s2, cos = trapezium_scale(d, torch.tensor([0.0, 1.0]), torch.zeros(2), torch.zeros(2))
    assert cos == 0.0 and s2 == 1.0
    s3, cos3 = trapezium_scale(d, torch.tensor([2.0, 0.0]), torch.zeros(2), torch.zeros(2))
    assert cos3 == pytest.approx(1.0) and s3 == pytest.approx(5.0)  # (1 + 2·1·2) / 1


# --------------------------------------------------------------------------- noise
def test_noise_seeded(cnn_problem):
    trained, init, retain, forget = cnn_problem
    kw = dict(init=init, solver="dense", ridge=0.05, noise=1e-4)
    a = scrub(trained, retain, forget, seed=3, **kw)
    b = scrub(trained, retain, forget, seed=3, **kw)
    c = scrub(trained, retain, forget, seed=4, **kw)
    assert torch.equal(flat(a.model), flat(b.model))
    assert not torch.equal(flat(a.model), flat(c.model))
    assert torch.equal(a.shift, c.shift)  # the shift is deterministic, before noise
    det = scrub(trained, retain, forget, init=init, solver="dense", ridge=0.05)
    assert not torch.equal(flat(a.model), flat(det.model))


def test_noise_variance_conventions():
    F = {"w": torch.tensor([[1e-9, 1.0], [4.0, 1e6]]), "b": torch.tensor([0.5, 2.0])}
    v = fisher_noise_variance(F, 2.0, num_classes=3, average_inputs=False)
    assert v["w"][0, 0] == pytest.approx(2.0 * 1e3)  # clamped at 1e3
    assert v["w"][1, 1] == pytest.approx(2.0 / (1e6 + 1e-8))
    assert v["b"][0] == pytest.approx(10 * 2.0 / 0.5)  # 1-D tensors ×10
    head = fisher_noise_variance({"h": torch.full((3, 2), 1e-9)}, 1.0, num_classes=3)
    assert torch.allclose(head["h"], torch.full((3, 2), 1e3))  # clamp 1e2, ×10
    with pytest.raises(ValueError, match="noise"):
        fisher_noise_variance(F, -1.0, 3)


def test_diagonal_fisher_matches_explicit():
    model = make_cnn()
    X, Y = make_data("cnn", 5)
    fisher = diagonal_fisher(model, (X, Y), reduction="sum")
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x in X:
        logp = torch.log_softmax(model(x[None]), 1)[0]
        for k in range(3):
            model.zero_grad()
            logp[k].backward(retain_graph=True)
            for n, p in model.named_parameters():
                ref[n] += logp[k].exp().detach() * p.grad**2
    for n in ref:
        assert rel(fisher[n], ref[n]) <= 1e-10, n


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("solver", ["auto", "cg", "dense"])
def test_inputs_unchanged_and_result(cnn_problem, solver):
    trained, init, retain, forget = cnn_problem
    before = copy.deepcopy(trained.state_dict()), copy.deepcopy(init.state_dict())
    Xr = retain[0].clone()
    res = scrub(
        trained,
        retain,
        forget,
        init=init.state_dict(),
        ridge=0.1,
        noise=1e-5,
        seed=0,
        solver=solver,
    )
    for sd, m in zip(before, (trained, init)):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k])
    assert torch.equal(retain[0], Xr)
    assert res.model is not trained and not res.model.training
    assert res.shift.shape == (sum(p.numel() for p in trained.parameters()),)
    for key in ("matvecs", "solves", "seconds", "peak_memory_mib", "rescale_factor"):
        assert key in res.info


def test_bad_input(cnn_problem):
    trained, init, retain, forget = cnn_problem
    X, Y = retain
    cases = [
        (dict(forget=(forget[0][:0], forget[1][:0])), ValueError, "forget"),
        (dict(retain=(X, Y + 7)), ValueError, "retain: labels"),
        (dict(retain=(X, Y[:-1])), ValueError, "retain"),
        (dict(ridge=-1.0), ValueError, "ridge"),
        (dict(noise=-1e-3), ValueError, "noise"),
        (dict(solver="lu"), ValueError, "solver"),
        (dict(linearize_at="middle"), ValueError, "linearize_at"),
        (dict(loss="hinge"), ValueError, "loss"),
        (dict(rescale="triangle"), ValueError, "rescale"),
        (dict(frobnicate=1), TypeError, "frobnicate"),
        (dict(init=nn.Linear(3, 3).double()), ValueError, "init"),
        (dict(model=copy.deepcopy(trained).train()), ValueError, "model"),
    ]
    for kw, err, msg in cases:
        args = dict(model=trained, retain=retain, forget=forget, init=init)
        args.update(kw)
        with pytest.raises(err, match=msg):
            scrub(args.pop("model"), args.pop("retain"), args.pop("forget"), **args)
    Xn = X.clone()
    Xn[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="retain"):
        scrub(trained, (Xn, Y), forget, init=init)


def test_overlap_reported(cnn_problem):
    trained, init, _, _ = cnn_problem
    X, Y = make_data("cnn", 10)
    ds = TensorDataset(X, Y)
    with pytest.raises(ValueError, match="also in retain"):
        scrub(trained, Subset(ds, range(0, 8)), Subset(ds, [7, 8, 9]), init=init)


def test_cg_not_converging_raises(cnn_problem):
    trained, init, retain, forget = cnn_problem
    from ntkscrub.solvers import CGNotConverged

    with pytest.raises(CGNotConverged):
        scrub(
            trained,
            retain,
            forget,
            init=init,
            solver="cg",
            tol=1e-14,
            max_iter=1,
            solver_config=SolverConfig(precond="none"),
        )


def test_tf32_guard_restores_flags():
    from ntkscrub.scrub import full_fp32_precision

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True
    try:
        with full_fp32_precision():
            assert not torch.backends.cudnn.allow_tf32
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------- issue 11/12 additions
def near_duplicate_problem(dtype, n=40, nf=6, eps=0.05):
    """Forget = near-copies of retain images: Θ_ff's Schur complement is tiny (λ_min ≈ 1e-2
    against ‖Θ_ff‖ ≈ 20), so the block form amplifies the inner solve's error ≈ 1.7e3×."""
    init = make_cnn(seed=0)
    trained = copy.deepcopy(init)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    X, Y = make_data("cnn", n)
    Xf = X[:nf] + eps * torch.randn(X[:nf].shape, generator=g, dtype=X.dtype)
    return init.to(dtype), trained.to(dtype), (X.to(dtype), Y), (Xf.to(dtype), Y[:nf])


def test_block_form_float32_is_not_silently_wrong():
    """Issue 12: float32 ``form="block"`` at the default tol returned a shift 34 % off the
    float64 answer here (11–18× in the audit), every solve "converged". Now the Schur
    amplification is measured and the inner solve refined, or float32 is refused clearly."""
    i64, t64, r64, f64 = near_duplicate_problem(torch.float64)
    kw = dict(ridge=1e-2, loss="ce")
    ref = scrub(t64, r64, f64, init=i64, solver="dense", **kw).shift
    block64 = scrub(t64, r64, f64, init=i64, solver="cg", form="block", **kw)
    assert rel(block64.shift, ref) <= 1e-6  # float64: refined to tol / amplification
    i32, t32, r32, f32 = near_duplicate_problem(torch.float32)
    with pytest.raises(ValueError, match="form: 'block' in torch.float32"):
        scrub(t32, r32, f32, init=i32, solver="cg", form="block", **kw)
    solves32 = scrub(t32, r32, f32, init=i32, solver="cg", **kw)
    assert rel(solves32.shift.double(), ref) <= 0.05


def test_result_records_delta_scale_config_and_converged(cnn_problem):
    trained, init, retain, forget = cnn_problem
    res = scrub(
        trained, retain, forget, init=init, ridge=0.05, rescale="trapezium", tol=1e-10, solver="cg"
    )
    assert res.scale == res.info["rescale_factor"] and res.scale >= 1.0
    assert rel(res.shift, res.scale * res.delta) <= 1e-15
    assert res.info["converged"] is True
    cfg = res.info["config"]
    assert cfg["solver"]["method"] == "cg" and cfg["solver"]["tol"] == 1e-10
    assert cfg["products"]["batch_size"] == 256 and cfg["noise"]["clamp"] == 1e3
    d = res.to_dict()
    text = json.dumps(d, allow_nan=False)  # strict JSON
    assert json.loads(text)["scale"] == pytest.approx(res.scale)
    assert d["delta_norm"] == pytest.approx(float(res.delta.norm()))
    assert len(res.to_dict(tensors=True)["delta"]) == res.delta.numel()


def test_configs_replace_options(cnn_problem):
    trained, init, retain, forget = cnn_problem
    kw = dict(init=init, ridge=0.05, tol=1e-10, solver="cg")
    a = scrub(trained, retain, forget, products=ProductConfig(batch_size=5, vector_chunk=2), **kw)
    b = scrub(trained, retain, forget, **kw)
    assert rel(a.shift, b.shift) <= 1e-8
    assert a.info["config"]["products"]["batch_size"] == 5
    with pytest.raises(ValueError, match="SolverConfig.precond_rank"):
        SolverConfig(precond_rank=-1)
    with pytest.raises(TypeError, match="ProductConfig.batch_size"):
        ProductConfig(batch_size="64")
    with pytest.raises(ValueError, match="tol: given as a keyword"):
        scrub(trained, retain, forget, solver_config=SolverConfig(tol=1e-6), **kw)
    with pytest.raises(TypeError, match="products"):
        scrub(trained, retain, forget, products={"batch_size": 5}, **kw)
    with pytest.raises(ValueError, match="solver"):
        scrub(trained, retain, forget, init=init, solver="lu")


def test_not_converged_names_the_system_with_partial_result(cnn_problem):
    trained, init, retain, forget = cnn_problem
    with pytest.raises(SolveNotConverged, match="Θ_DD") as err:
        scrub(
            trained,
            retain,
            forget,
            init=init,
            tol=1e-14,
            max_iter=1,
            solver_config=SolverConfig(precond="none"),
        )
    assert err.value.system == "Θ_DD" and err.value.partial.shape == (3 * 16,)
    with pytest.warns(RuntimeWarning, match="Θ_(DD|rr)") as caught:
        res = scrub(
            trained,
            retain,
            forget,
            init=init,
            tol=1e-14,
            max_iter=1,
            strict=False,
            solver_config=SolverConfig(precond="none"),
        )
    assert res.info["converged"] is False
    assert {str(w.message)[:4] for w in caught} == {"Θ_DD", "Θ_rr"}  # each system named
    assert all(w.filename == __file__ for w in caught)  # the warning points at the call site


def test_dense_singular_system_raises_not_least_squares():
    """λ = 0 and Θ_DD singular: the old dense path fell back to least squares. With c·N > p the
    rank bound refuses it before any product (naming ``ridge``); with c·N ≤ p a repeated sample
    makes two rows of J equal, which only the factorisation can see."""
    model = make_cnn(seed=0)
    X, Y = make_data("cnn", 100)  # c·N = 300 > p = 267
    with pytest.raises(ValueError, match="ridge: Θ_DD has c·N = 300 rows but rank ≤ p = 267"):
        scrub(model, (X[:90], Y[:90]), (X[90:], Y[90:]), init=make_cnn(seed=1), solver="dense")
    X, Y = X[:40].clone(), Y[:40].clone()  # c·N = 120 ≤ 267
    X[1], Y[1] = X[0], Y[0]
    with pytest.raises(ValueError, match="Θ_DD: the dense system is singular"):
        scrub(model, (X[:36], Y[:36]), (X[36:], Y[36:]), init=make_cnn(seed=1), solver="dense")


def test_auto_solver_is_dense_when_it_fits_else_cg(cnn_problem):
    """solver="auto": the dense twin's exact answer when J_D and Θ fit max_dense_bytes, the
    matrix-free path (same answer to its tolerance) when they do not; the choice is recorded."""
    trained, init, retain, forget = cnn_problem
    kw = dict(init=init, ridge=0.05)
    dense = scrub(trained, retain, forget, solver="dense", **kw)
    auto = scrub(trained, retain, forget, solver="auto", **kw)
    assert auto.info["solver"] == "dense" and auto.info["solver_requested"] == "auto"
    assert torch.equal(auto.shift, dense.shift)
    tight = SolverConfig(max_dense_bytes=1024, tol=1e-12)
    small = scrub(trained, retain, forget, solver="auto", solver_config=tight, **kw)
    assert small.info["solver"] == "cg" and small.info["matvecs"] > 0
    assert rel(small.shift, dense.shift) <= 1e-6
    with pytest.raises(ValueError, match="solver"):
        scrub(trained, retain, forget, solver="fast", **kw)


def test_default_solver_is_auto_unless_a_cg_knob_is_given(cnn_problem):
    """solver=None: "auto" (the dense twin here: it fits and costs fewer operations), recorded
    with its cost model; a solver_config or max_iter keeps the configuration's method (cg)."""
    trained, init, retain, forget = cnn_problem
    kw = dict(init=init, ridge=0.05)
    default = scrub(trained, retain, forget, **kw)
    assert default.info["solver_requested"] == "auto" and default.info["solver"] == "dense"
    est = default.info["auto_solver"]
    assert est["method"] == "dense" and est["dense_flops"] <= est["cg_flops"]
    assert est["forward_flops"] > 0  # the CNN's convolutions and head were counted
    for knob in (dict(max_iter=500), dict(solver_config=SolverConfig(tol=1e-12))):
        res = scrub(trained, retain, forget, **kw, **knob)
        assert res.info["solver"] == "cg" and "auto_solver" not in res.info
        assert res.info["matvecs"] > 0


def test_auto_solver_takes_cg_when_the_gram_product_dominates():
    """Many classes: J_D and Θ fit the memory cap, but forming Θ = J Jᵀ costs 2(c·N)²·p
    operations against cg's K·6·N·F — auto takes cg (the memory-only rule took dense; measured
    on 2 CPU cores at a wider MLP of 100 classes, benchmarks/auto_solver_cases.py: dense 31.6 s,
    cg 0.19 s)."""
    from ntkscrub.operators import Jacobian
    from ntkscrub.params import ParameterSpace
    from ntkscrub.scrub import solver_estimate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 100)).eval()
    X, Y = torch.randn(60, 10), torch.randint(0, 100, (60,))
    space = ParameterSpace(model)
    J_r, J_f = Jacobian(space, (X[:50], Y[:50])), Jacobian(space, (X[50:], Y[50:]))
    est = solver_estimate(J_r, J_f, 4 * 2**30)
    assert est["dense_bytes"] <= 4 * 2**30  # memory alone would say dense
    assert est["method"] == "cg" and est["dense_flops"] > est["cg_flops"]
    assert est["forward_flops"] == 2 * (10 * 8 + 8 * 100)  # the two matmuls (biases: not counted)
    assert solver_estimate(J_r, J_f, 1024)["reason"].startswith("the explicit Jacobian")


def cluster_mlp_problem(n: int = 256, nf: int = 5):
    """θ0 and w(D) (the fine-tuning recipe, float64) of an MLP 64-128-128-5 on Gaussian class
    clusters: the forget samples resemble retained ones, so Δ is small against either fit."""
    from ntkscrub import retrain
    from ntkscrub.recipes.models import build_model

    g = torch.Generator().manual_seed(1)
    means = torch.randn(5, 64, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 5, (n,), generator=g)
    X = means[Y] + torch.randn(n, 64, generator=g, dtype=torch.float64)
    init = build_model("mlp", 5, 1.0, in_features=64, hidden=(128, 128), seed=0).double().eval()
    out = retrain(init, (X, Y), init=init, epochs=10, lr=0.01, weight_decay=0.1, seed=0)
    return init, out.model.eval(), (X[nf:], Y[nf:]), (X[:nf], Y[:nf])


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_shift_error_is_not_the_fits_error_times_the_cancellation(loss):
    """Δ = w_lin(D_r) − w_lin(D) is a difference of two fits ρ times its size: solving each to
    tol left Δ ≈ ρ·tol off (2e-2 here at tol 1e-3, every solve converged). Δ is now the retain
    model's change (scrub.retain_change), solved to tol / (ρ · ‖b‖/‖e_r‖)."""
    init, model, retain, forget = cluster_mlp_problem()
    kw = dict(init=init, loss=loss, weight_decay=0.1)
    ref = scrub(model, retain, forget, solver="dense", **kw).shift
    res = scrub(model, retain, forget, solver="cg", tol=1e-3, **kw)
    assert rel(res.shift, ref) <= 5e-3
    last = res.info["solves"][-1]
    assert last["cancellation"] > 1 and last["rhs_ratio"] > 0 and res.info["converged"]
    assert last["system"] == "Θ_rr (tol / cancellation)" and last["converged"]


def test_auto_takes_the_exact_dense_twin_for_a_tiny_problem():
    """Below ``_TINY_DENSE_FLOPS`` the FLOP comparison is noise (fixed overheads decide) and the
    dense twin cannot miss a tolerance: an MLP of 83 parameters, c·N = 120, used to go to cg."""
    from ntkscrub.scrub import _TINY_DENSE_FLOPS

    torch.manual_seed(0)
    mk = lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()  # noqa: E731
    X, Y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    res = scrub(mk(), (X[5:], Y[5:]), (X[:5], Y[:5]), init=mk(), weight_decay=0.01)
    auto = res.info["auto_solver"]
    assert res.info["solver"] == "dense" and auto["dense_flops"] <= _TINY_DENSE_FLOPS
    assert auto["dense_flops"] > auto["cg_flops"]  # the FLOP rule alone would have said cg
    assert auto["reason"].startswith("the problem is tiny")
