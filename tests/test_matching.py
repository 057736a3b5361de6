"""ntkscrub.matching through scrub(method="output_match"): one undamped round is exact on a model
linear in its parameters (targets computed here from explicit Jacobians), dense = cg, rounds
reduce the misfit on a nonlinear MLP while the anchors stay at w(D)'s outputs, matvecs add up,
inputs untouched, seeded determinism, bad knobs name the argument."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from model_zoo import explicit_jacobian, flat, make_data, make_mlp, random_features_model, rel

from ntkscrub.config import ProductConfig
from ntkscrub.matching import MatchConfig
from ntkscrub.scrub import scrub

# one vector per pass: the pass plan's memory probe means nothing at these sizes
PRODUCTS = ProductConfig(vector_chunk=None)


def kernel_targets(at, X_r, Y_r, X_f, lam):
    """t_f = f(θ_lin; D_f) + J_f w_lin(D_r), w_lin(D_r) = J_rᵀ(Θ_rr + λI)⁻¹(onehot − f) (MSE)."""
    J_r, f_r = explicit_jacobian(at, X_r)
    J_f, f_f = explicit_jacobian(at, X_f)
    e_r = (torch.nn.functional.one_hot(Y_r, f_r.shape[1]).double() - f_r).reshape(-1)
    K = J_r @ J_r.T + lam * torch.eye(J_r.shape[0], dtype=torch.float64)
    w_r = J_r.T @ torch.linalg.solve(K, e_r)
    return f_f + (J_f @ w_r).reshape(f_f.shape)


def perturbed(model, scale, seed):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out


def logits(model, X):
    with torch.no_grad():
        return model(X)


def test_linear_model_one_undamped_round_reaches_the_targets():
    """f(x; θ) = Φ(x)θ: J does not depend on θ, so one Gauss–Newton round (μ = 0) on the
    c·(|D_f| + |anchors|) = 3·(2 + 5 + 2) = 27 < p = 39 rows solves J_A δ = t_A − f(θ_1; A)
    exactly: D_f lands on the kernel prediction, the anchors on w(D)'s outputs."""
    theta0 = random_features_model(seed=0)
    trained = perturbed(theta0, 0.5, seed=3)  # not the linear model's solution: θ_1 misses
    X, Y = make_data("mlp", 12, seed=5)
    X = X[:, :5]
    Xr, Yr, Xf, Yf, Xv = X[:5], Y[:5], X[5:7], Y[5:7], X[7:9]
    lam = 0.3
    t_f = kernel_targets(theta0, Xr, Yr, Xf, lam)
    for solver in ("dense", "cg"):
        res = scrub(
            trained,
            (Xr, Yr),
            (Xf, Yf),
            init=theta0,
            ridge=lam,
            solver=solver,
            tol=1e-13,
            method="output_match",
            match=MatchConfig(rounds=1, damping=0.0, anchors=100),  # 100 > |D_r|: all 5
            anchor_data=Xv,
            products=PRODUCTS,
        )
        info = res.info["method_info"]
        assert info["anchors_retain"] == 5 and info["anchors_extra"] == 2 and info["rows"] == 27
        start = info["rounds"][0]
        assert start["forget_rel"] > 0.1 and start["anchors_rms"] > 0.1  # something to match
        out_f, out_a = logits(res.model, Xf), logits(res.model, torch.cat([Xr, Xv]))
        assert rel(out_f, t_f) <= 1e-8
        assert rel(out_a, logits(trained, torch.cat([Xr, Xv]))) <= 1e-8
        assert info["rounds"][1]["forget_rel"] <= 1e-8 and info["rounds"][1]["accepted"]


def _mlp_problem():
    theta0 = make_mlp(seed=0, hidden=16)
    trained = perturbed(theta0, 0.3, seed=7)
    X, Y = make_data("mlp", 40)
    return trained, theta0, (X[:36], Y[:36]), (X[36:], Y[36:]), X[:2] + 0.1


@pytest.mark.parametrize("first_step,loss", [("one_shot", "mse"), ("ce_newton", "ce")])
def test_dense_and_cg_twins_agree(first_step, loss):
    trained, theta0, retain, forget, _ = _mlp_problem()
    out = {}
    for solver in ("dense", "cg"):
        out[solver] = scrub(
            trained,
            retain,
            forget,
            init=theta0,
            ridge=0.5,
            loss=loss,
            solver=solver,
            tol=1e-12,
            method="output_match",
            match=MatchConfig(rounds=3, anchors=8, damping=1e-2, first_step=first_step),
            products=PRODUCTS,
        )
    assert rel(out["cg"].delta, out["dense"].delta) <= 1e-6
    assert out["cg"].info["matvecs"] > out["dense"].info["matvecs"] > 0


def test_rounds_reduce_the_forget_misfit_and_hold_the_anchors():
    trained, theta0, retain, forget, _ = _mlp_problem()
    lam = 0.5
    res = scrub(
        trained,
        retain,
        forget,
        init=theta0,
        ridge=lam,
        solver="cg",
        method="output_match",
        match=MatchConfig(rounds=4, anchors=10, damping=1e-3),
        products=PRODUCTS,
    )
    info = res.info["method_info"]
    kept = [r for r in info["rounds"] if r.get("accepted", True)]
    fr = [r["forget_rel"] for r in kept]
    assert len(kept) >= 3 and all(b < a for a, b in zip(fr, fr[1:]))
    assert fr[-1] < 0.1 * fr[0]
    # the reported misfit is the model's: targets recomputed from explicit Jacobians at θ0
    t_f = kernel_targets(theta0, *retain, forget[0], lam)
    got = float(
        (logits(res.model, forget[0]) - t_f).norm() / (logits(trained, forget[0]) - t_f).norm()
    )
    assert got == pytest.approx(fr[-1], rel=1e-6)
    # the anchors end near w(D)'s outputs (tiny next to how far D_f moved)
    moved = float((logits(res.model, forget[0]) - logits(trained, forget[0])).norm())
    assert kept[-1]["anchors_rms"] * np.sqrt(10) < 0.05 * moved
    # the first step alone (one-shot eq. 10) is where round 0 stands
    one = scrub(trained, retain, forget, init=theta0, ridge=lam, solver="cg", products=PRODUCTS)
    first = logits(one.model, forget[0])
    assert float((first - t_f).norm() / (logits(trained, forget[0]) - t_f).norm()) == (
        pytest.approx(fr[0], rel=1e-6)
    )


def test_matvecs_add_up_inputs_untouched_and_seeded():
    trained, theta0, retain, forget, val = _mlp_problem()
    before = [t.clone() for t in (*retain, *forget, val, flat(trained), flat(theta0))]
    kw = dict(
        init=theta0,
        loss="ce",
        ridge=0.5,
        solver="cg",
        method="output_match",
        match=MatchConfig(rounds=2, anchors=6, first_step="ce_newton", seed=3),
        anchor_data=val,
        products=PRODUCTS,
    )
    a = scrub(trained, retain, forget, **kw)
    b = scrub(trained, retain, forget, **kw)
    assert torch.equal(a.shift, b.shift)
    after = [*retain, *forget, val, flat(trained), flat(theta0)]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    info = a.info["method_info"]
    rounds = sum(r["matvecs"] for r in info["rounds"][1:])
    # first step + one J_f product for the targets + every round (probes, sketch, CG, Jᵀ)
    assert a.info["matvecs"] == info["first_step"]["matvecs"] + 1 + rounds
    assert info["first_step"]["method"] == "ce_newton" and "newton" in info["first_step"]
    assert info["match_config"]["seed"] == 3 and a.info["method"] == "output_match"
    assert all(r["matvecs"] > 16 for r in info["rounds"][1:])
    # another seed picks other anchors: another shift
    c = scrub(trained, retain, forget, **{**kw, "match": MatchConfig(rounds=2, anchors=6, seed=4)})
    assert not torch.equal(a.shift, c.shift)
    # rescale applies to the matched shift like to any other method's
    r = scrub(trained, retain, forget, rescale="trapezium", **kw)
    assert torch.allclose(r.shift, r.scale * r.delta) and torch.equal(r.delta, a.delta)


def test_bad_knobs_name_the_argument():
    with pytest.raises(ValueError, match="rounds"):
        MatchConfig(rounds=0)
    with pytest.raises(TypeError, match="rounds"):
        MatchConfig(rounds=1.5)
    with pytest.raises(ValueError, match="damping"):
        MatchConfig(damping=-1.0)
    with pytest.raises(TypeError, match="damping"):
        MatchConfig(damping="1e-2")
    with pytest.raises(ValueError, match="anchors"):
        MatchConfig(anchors=-1)
    with pytest.raises(ValueError, match="first_step"):
        MatchConfig(first_step="projected")
    with pytest.raises(ValueError, match="min_decrease"):
        MatchConfig(min_decrease=1.0)
    assert MatchConfig().to_dict()["rounds"] == 3
    trained, theta0, retain, forget, val = _mlp_problem()
    args = (trained, retain, forget)
    with pytest.raises(ValueError, match="match"):
        scrub(*args, init=theta0, match=MatchConfig())
    with pytest.raises(ValueError, match="anchor_data"):
        scrub(*args, init=theta0, anchor_data=val)
    with pytest.raises(TypeError, match="match"):
        scrub(*args, init=theta0, method="output_match", match={"rounds": 2})
    with pytest.raises(ValueError, match="loss"):
        scrub(*args, init=theta0, method="output_match", match=MatchConfig(first_step="ce_newton"))
    with pytest.raises(TypeError, match="anchor_data"):
        scrub(*args, init=theta0, method="output_match", anchor_data=[1, 2, 3])
    with pytest.raises(ValueError, match="form"):
        scrub(*args, init=theta0, method="output_match", form="block")


def test_round_solve_judged_against_the_scrubs_tolerance():
    """A round aims at a tighter tolerance than the scrub's (its error is amplified in δ): missing
    only the tight one is recorded and counts as converged; missing the scrub's raises when
    strict, warns otherwise."""
    import warnings

    from model_zoo import spd

    from ntkscrub.config import SolverConfig
    from ntkscrub.matching import _judged_solve
    from ntkscrub.operators import Dense, Inverse, SolveNotConverged

    A = Dense(spd(torch.logspace(0, 1, 30, dtype=torch.float64), seed=1), symmetric=True)
    b = torch.randn(30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    base = SolverConfig(precond="none", max_iter=4, strict=False)
    probe = Inverse(A, base.replace(tol=1e-14))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe.solve(b)
    reached = probe.records[-1]["residuals"][0]  # what 4 iterations reach
    assert 1e-6 < reached < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tight miss is not warned about
        inv = Inverse(A, base.replace(tol=0.1 * reached), label="round")
        x = _judged_solve(inv, b, base.replace(tol=2 * reached, strict=True))
    assert inv.records[-1]["converged"] and inv.records[-1]["tight_tol_missed"]
    assert torch.isfinite(x).all()
    with pytest.raises(SolveNotConverged, match="round"):
        inv = Inverse(A, base.replace(tol=0.1 * reached), label="round")
        _judged_solve(inv, b, base.replace(tol=0.5 * reached, strict=True))
    with pytest.warns(RuntimeWarning, match="round"):
        inv = Inverse(A, base.replace(tol=0.1 * reached), label="round")
        _judged_solve(inv, b, base.replace(tol=0.5 * reached, strict=False))
    assert not inv.records[-1]["converged"]
