"""ntkscrub.shifts through scrub(method=...): the cross-entropy linear model against an independent
L-BFGS minimiser, the projected displacement against its explicit formula and its exact
statement on a model linear in its parameters, dense = cg, matvecs, rescale/noise, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_zoo import (
    explicit_jacobian,
    flat,
    make_data,
    make_mlp,
    min_norm_interpolant,
    random_features_model,
    rel,
    seeded,
)
from scipy.optimize import minimize

from ntkscrub import readouts
from ntkscrub.config import SolverConfig
from ntkscrub.scrub import scrub
from ntkscrub.shifts import NewtonConfig, entropy_temperature, mean_entropy


def lbfgs_ce_minimiser(J, f0, Y, lam, centre=None, targets=None):
    """argmin_w Σ CE(f0 + J w, y) + ½λ‖w − centre‖² by scipy L-BFGS in float64 (primal);
    ``targets`` ``(N, c)``: soft target rows in place of one-hot ``Y``."""
    centre = torch.zeros(J.shape[1], dtype=torch.float64) if centre is None else centre
    c = f0.shape[1]
    onehot = torch.nn.functional.one_hot(Y, c).double() if targets is None else targets

    def fun(w_np):
        w = torch.tensor(w_np, dtype=torch.float64, requires_grad=True)
        z = f0 + (J @ w).reshape(-1, c)
        L = -(onehot * torch.log_softmax(z, 1)).sum() + 0.5 * lam * ((w - centre) @ (w - centre))
        (g,) = torch.autograd.grad(L, w)
        return float(L.detach()), g.numpy()

    res = minimize(
        fun,
        np.zeros(J.shape[1]),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 20000, "gtol": 1e-13, "ftol": 0.0, "maxcor": 50},
    )
    _, g = fun(res.x)
    # λ-strong convexity: ‖w − w*‖ ≤ ‖∇L(w)‖/λ — the reference is within 1e-7 of the minimiser
    assert np.linalg.norm(g) / lam < 1e-7, np.linalg.norm(g)
    return torch.tensor(res.x)


def lbfgs_pair(trained, theta0, linearize_at, X, Y, lam_r, lam_d):
    """The L-BFGS references on D and on D_r (its first 16 images) at θ0 or w(D):
    ``(J_D, f_D, centre, w_ce(D), w_ce(D_r))``, the ridge centred at θ0 (weight decay toward
    θ0: at w(D), θ0 − w(D) from θ_lin)."""
    at = theta0 if linearize_at == "init" else trained
    J_d, f_d = explicit_jacobian(at, X)
    centre = flat(theta0) - flat(at)
    w_d = lbfgs_ce_minimiser(J_d, f_d, Y, lam_d, centre)
    w_r = lbfgs_ce_minimiser(J_d[: 3 * 16], f_d[:16], Y[:16], lam_r, centre)
    return J_d, f_d, centre, w_d, w_r


def linear(d, c, seed):
    """``nn.Linear(d, c)`` in float64 from its own seed: torch seeds the global generator at random
    per process, and an unseeded model made these tests see a new problem every run (one in
    three of them had hit the Armijo rounding fixed in ``shifts._armijo``)."""
    with seeded(seed):
        return torch.nn.Linear(d, c).double()


def trained_pair(seed=0):
    theta0 = make_mlp(seed=seed)
    trained = make_mlp(seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in trained.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return trained, theta0


# --------------------------------------------------------------------------- CE Newton
@pytest.mark.parametrize("linearize_at", ["init", "trained"])
@pytest.mark.parametrize("convention", ["ridge", "weight_decay"])
def test_ce_newton_equals_lbfgs_minimiser(linearize_at, convention):
    trained, theta0 = trained_pair()
    X, Y = make_data("mlp", 20)
    Xr, Yr, Xf, Yf = X[:16], Y[:16], X[16:], Y[16:]
    if convention == "ridge":
        kw, lam_r, lam_d = {"ridge": 0.7}, 0.7, 0.7
    else:
        kw, lam_r, lam_d = {"weight_decay": 0.05}, 16 * 0.05, 20 * 0.05
    J_d, f_d, centre, w_d, w_r = lbfgs_pair(trained, theta0, linearize_at, X, Y, lam_r, lam_d)
    expected = w_r - w_d
    before = flat(trained).clone()
    out = {}
    for solver in ("dense", "cg"):
        res = scrub(
            trained,
            (Xr, Yr),
            (Xf, Yf),
            init=theta0,
            linearize_at=linearize_at,
            loss="ce",
            method="ce_newton",
            solver=solver,
            **kw,
        )
        assert rel(res.delta, expected) <= 1e-6
        assert rel(res.w_lin_r, w_r) <= 1e-6  # the retain model itself (kernel prediction)
        assert torch.equal(res.shift, res.delta)  # no rescale
        assert rel(flat(res.model) - flat(trained), expected) <= 1e-6
        newton = res.info["method_info"]["newton"]
        assert newton["D"]["converged"] and newton["D_r"]["converged"]
        assert 2 <= newton["D"]["iterations"] <= 30
        assert res.info["converged"] and res.info["method"] == "ce_newton"
        out[solver] = res
    # cg: every Newton step is a counted PCG solve; the dense twin agrees
    assert out["cg"].info["matvecs"] > 0
    assert all(r["solver"] == "cg" for r in out["cg"].info["solves"])
    assert all(r["solver"] == "dense" for r in out["dense"].info["solves"])
    assert rel(out["cg"].delta, out["dense"].delta) <= 1e-8
    assert torch.equal(flat(trained), before)  # input not modified


def test_ce_newton_inexact_early_steps_loosen_the_inner_tolerance():
    trained, theta0 = trained_pair()
    X, Y = make_data("mlp", 20)
    res = scrub(
        trained,
        (X[:16], Y[:16]),
        (X[16:], Y[16:]),
        init=theta0,
        loss="ce",
        method="ce_newton",
        ridge=0.7,
        solver="cg",
    )
    hist = res.info["method_info"]["newton"]["D"]["history"]
    tols = [h["inner_tol"] for h in hist]
    # forcing term min(0.01, (δ_{k−1}/δ_1)²): loose first, tight at the end
    assert tols[0] == pytest.approx(0.01) and tols[-1] <= 1e-5
    assert all(b <= a for a, b in zip(tols, tols[1:]))
    assert hist[-1]["decrement2"] <= 1e-12
    objs = [h["objective"] for h in hist]
    assert all(b <= a + 1e-12 for a, b in zip(objs, objs[1:]))  # damped: monotone


def test_newton_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_iter"):
        NewtonConfig(max_iter=0)
    with pytest.raises(ValueError, match="forcing"):
        NewtonConfig(forcing=1.5)


# --------------------------------------------------------------------------- projected
@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_projected_lands_on_min_norm_retain_interpolant(solver):
    """Exact statement (λ = 0, J_D of full row rank, f linear in θ): Δ′ = −Q v with Q the
    orthogonal projection onto range(P J_fᵀ) = row(J_D) ⊖ row(J_r). If v = w(D) − θ0 is the
    min-norm interpolant's displacement (v ∈ row(J_D), J_D v = Y_D − f(θ0)), then
    w(D) + Δ′ = θ0 + proj_{row J_r} v = θ0 + J_r⁺(Y_r − f_r(θ0)) = w_min-norm(D_r)."""
    theta0 = random_features_model(seed=0)
    g = torch.Generator().manual_seed(4)
    X = torch.randn(10, 5, generator=g, dtype=torch.float64)  # c·N = 30 < p = 39
    Y = torch.randint(0, 3, (10,), generator=g)
    trained = min_norm_interpolant(theta0, X, Y)
    target = min_norm_interpolant(theta0, X[:8], Y[:8])
    res = scrub(
        trained,
        (X[:8], Y[:8]),
        (X[8:], Y[8:]),
        init=theta0,
        method="projected",
        ridge=0.0,
        solver=solver,
        tol=1e-12,  # above float64 CG's rounding floor here (≈ 1.4e-13, the solver says)
    )
    assert rel(flat(res.model), flat(target)) <= 1e-6
    assert res.info["matvecs"] > 0 and res.info["method"] == "projected"


@pytest.mark.parametrize("linearize_at", ["init", "trained"])
def test_projected_equals_explicit_formula(linearize_at):
    trained, theta0 = trained_pair(seed=2)
    X, Y = make_data("mlp", 14)
    lam = 0.4
    at = theta0 if linearize_at == "init" else trained
    J, _ = explicit_jacobian(at, X)
    Jr, Jf = J[: 3 * 10], J[3 * 10 :]
    P = torch.eye(J.shape[1], dtype=J.dtype) - Jr.T @ torch.linalg.solve(
        Jr @ Jr.T + lam * torch.eye(Jr.shape[0], dtype=J.dtype), Jr
    )
    v = flat(trained) - flat(theta0)
    S = Jf @ P @ Jf.T + lam * torch.eye(Jf.shape[0], dtype=J.dtype)
    expected = -P @ Jf.T @ torch.linalg.solve(S, Jf @ P @ v)
    out = {}
    for solver in ("dense", "cg"):
        res = scrub(
            trained,
            (X[:10], Y[:10]),
            (X[10:], Y[10:]),
            init=theta0,
            linearize_at=linearize_at,
            method="projected",
            ridge=lam,
            solver=solver,
        )
        assert rel(res.delta, expected) <= 1e-8
        out[solver] = res
    assert rel(out["cg"].delta, out["dense"].delta) <= 1e-8
    assert out["cg"].info["matvecs"] > 0


# --------------------------------------------------------------------------- rescale, noise, input
def test_rescale_and_noise_apply_to_every_method():
    trained, theta0 = trained_pair()
    X, Y = make_data("mlp", 20)
    for method, loss in (("projected", "mse"), ("ce_newton", "ce")):
        kw = dict(init=theta0, method=method, loss=loss, ridge=0.7, solver="dense")
        r = scrub(trained, (X[:16], Y[:16]), (X[16:], Y[16:]), rescale="trapezium", **kw)
        assert r.scale != 1.0 and r.info["rescale_factor"] == r.scale
        assert torch.allclose(r.shift, r.scale * r.delta)
        n = scrub(trained, (X[:16], Y[:16]), (X[16:], Y[16:]), noise=1e-3, seed=3, **kw)
        diff = flat(n.model) - flat(trained) - n.shift
        assert float(diff.norm()) > 0  # the noise was added on top of the shift


# --------------------------------------------------------------------------- forget_entropy
@pytest.mark.parametrize("linearize_at", ["init", "trained"])
def test_forget_entropy_equals_lbfgs_minimiser_with_tempered_soft_targets(linearize_at):
    """``forget_entropy``: the retain model's D_f logits tempered to the target entropy become D_f's
    soft targets of a refit on D with the retain ridge; against L-BFGS in float64 (independent:
    primal, explicit J, its own bisection for T), on cg and on the dense twin."""
    trained, theta0 = trained_pair()
    X, Y = make_data("mlp", 20)
    Xr, Yr, Xf, Yf = X[:16], Y[:16], X[16:], Y[16:]
    lam_r, lam_d = 16 * 0.05, 20 * 0.05
    J_d, f_d, centre, w_d, w_r = lbfgs_pair(trained, theta0, linearize_at, X, Y, lam_r, lam_d)
    z_f = f_d[16:] + (J_d[3 * 16 :] @ w_r).reshape(-1, 3)
    target = mean_entropy(z_f) + 0.15  # less confident than the retain model predicts
    lo, hi = 1e-3, 1e3  # the test's own bisection for T
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        h = float(-(torch.softmax(z_f / mid, 1) * torch.log_softmax(z_f / mid, 1)).sum(1).mean())
        lo, hi = (mid, hi) if h < target else (lo, mid)
    soft = torch.cat([torch.nn.functional.one_hot(Yr, 3).double(), torch.softmax(z_f / lo, 1)])
    w_cal = lbfgs_ce_minimiser(J_d, f_d, None, lam_r, centre, targets=soft)
    out = {}
    for solver in ("dense", "cg"):
        res = scrub(trained, (Xr, Yr), (Xf, Yf), init=theta0, linearize_at=linearize_at,
                    loss="ce", method="ce_newton", weight_decay=0.05, solver=solver,
                    forget_entropy=target)  # fmt: skip
        assert rel(res.delta, w_cal - w_d) <= 1e-6
        assert rel(res.w_lin_r, w_cal) <= 1e-6
        cal = res.info["method_info"]["calibration"]
        assert cal["temperature"] == pytest.approx(lo, rel=1e-5)
        assert cal["predicted_entropy"] < cal["fitted_entropy"] < target  # the ridge holds back
        assert res.info["method_info"]["newton"]["D calibrated"]["converged"]
        out[solver] = res
    assert rel(out["cg"].delta, out["dense"].delta) <= 1e-8


def test_forget_entropy_at_the_predicted_entropy_is_the_plain_ce_model():
    """T = 1 (the target is the retain model's own predicted entropy): the refit's minimiser is
    w_ce(D_r) itself, so the shift is the plain CE model's — why the refit uses the retain ridge."""
    trained, theta0 = trained_pair()
    X, Y = make_data("mlp", 20)
    kw = dict(init=theta0, loss="ce", method="ce_newton", weight_decay=0.05, solver="dense",
              linearize_at="trained")  # fmt: skip
    args = (trained, (X[:16], Y[:16]), (X[16:], Y[16:]))
    plain = scrub(*args, **kw)
    h = scrub(*args, forget_entropy=1.0, **kw).info["method_info"]["calibration"]
    same = scrub(*args, forget_entropy=h["predicted_entropy"], **kw)
    assert same.info["method_info"]["calibration"]["temperature"] == pytest.approx(1.0, rel=1e-9)
    assert rel(same.delta, plain.delta) <= 1e-9
    assert same.info["method_info"]["newton"]["D calibrated"]["start"] == "warm"


def test_entropy_temperature_and_mean_entropy():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.2, 3.0]], dtype=torch.float64)
    p = torch.softmax(z, 1)
    assert mean_entropy(z) == pytest.approx(float(-(p * p.log()).sum(1).mean()), rel=1e-12)
    for h in (0.1, 0.7, 1.05):
        assert mean_entropy(z / entropy_temperature(z, h)) == pytest.approx(h, rel=1e-6)
    with pytest.raises(ValueError, match="forget_entropy"):
        entropy_temperature(z, 1.2)  # > log 3
    model = make_mlp(seed=0)
    X, _ = make_data("mlp", 12)
    before = flat(model).clone()
    H = readouts.mean_entropy(model, X)
    with torch.no_grad():
        assert H == pytest.approx(mean_entropy(model(X)), rel=1e-12)
    assert torch.equal(flat(model), before)


def test_forget_entropy_bad_input_names_the_argument():
    trained, theta0 = trained_pair()
    X, Y = make_data("mlp", 20)
    args = (trained, (X[:16], Y[:16]), (X[16:], Y[16:]))
    kw = dict(init=theta0, loss="ce", ridge=0.1)
    with pytest.raises(ValueError, match="forget_entropy"):
        scrub(*args, method="one_shot", forget_entropy=0.5, **kw)
    with pytest.raises(ValueError, match="forget_entropy"):
        scrub(*args, method="ce_newton", forget_entropy=0.0, **kw)
    with pytest.raises(TypeError, match="forget_entropy"):
        scrub(*args, method="ce_newton", forget_entropy=True, **kw)
    with pytest.raises(ValueError, match="forget_entropy"):
        scrub(*args, method="ce_newton", forget_entropy=5.0, solver="dense", **kw)


def test_method_bad_input_names_the_argument():
    trained, theta0 = trained_pair()
    X, Y = make_data("mlp", 20)
    args = (trained, (X[:16], Y[:16]), (X[16:], Y[16:]))
    with pytest.raises(ValueError, match="method"):
        scrub(*args, init=theta0, method="two_shot", ridge=0.1)
    with pytest.raises(ValueError, match="loss"):
        scrub(*args, init=theta0, method="ce_newton", loss="mse", ridge=0.1)
    with pytest.raises(ValueError, match="ridge"):
        scrub(*args, init=theta0, method="ce_newton", loss="ce")
    with pytest.raises(ValueError, match="form"):
        scrub(*args, init=theta0, method="projected", form="block", ridge=0.1)
    with pytest.raises(TypeError, match="newton"):
        scrub(*args, init=theta0, method="ce_newton", loss="ce", ridge=0.1, newton={"max_iter": 2})


def test_scrub_newton_config_reaches_both_fits():
    """``scrub(newton=...)``: a step cap of 2 leaves the fits unconverged, and the result says
    so (not strict: recorded, not raised); the record carries the config that ran."""
    trained, theta0 = trained_pair()
    X, Y = make_data("mlp", 20)
    kw = dict(init=theta0, loss="ce", method="ce_newton", ridge=0.7, solver="dense")
    res = scrub(trained, (X[:16], Y[:16]), (X[16:], Y[16:]), newton=NewtonConfig(max_iter=2),
                strict=False, **kw)  # fmt: skip
    info = res.info["method_info"]
    assert info["newton_config"]["max_iter"] == 2
    assert info["newton"]["D"]["iterations"] == 2 and not info["newton"]["D"]["converged"]
    assert not res.info["converged"]


def test_ce_newton_one_sketch_serves_every_step_and_the_retain_fit():
    """One Nyström build of Θ_DD + λI for the D fit, carried to every Newton step's H^½ΘH^½ + λI
    by congruence and restricted to the retain rows for the D_r fit (no second build); the answer
    is the dense twin's."""
    from ntkscrub.config import SolverConfig

    trained, theta0 = trained_pair()
    X, Y = make_data("mlp", 20)
    kw = dict(init=theta0, loss="ce", method="ce_newton", ridge=0.7)
    args = (trained, (X[:16], Y[:16]), (X[16:], Y[16:]))
    cg = scrub(*args, solver="cg", solver_config=SolverConfig(precond_rank=10), **kw)
    dense = scrub(*args, solver="dense", **kw)
    steps = [r for r in cg.info["solves"] if r["label"].startswith("CE Newton")]
    starts = [r for r in cg.info["solves"] if r["label"] == "CE D_r start"]
    n_d = cg.info["method_info"]["newton"]["D"]["iterations"]
    assert all(r["precond"] == "nystrom of Θ + λI, H^½-congruence" for r in steps)
    assert len(starts) == 1 and starts[0]["precond"].startswith("nystrom (restricted")
    built = [r["precond_matvecs"] for r in cg.info["solves"]]
    assert built[0] == 10 and sum(built) == 10 and len(steps) > n_d  # the D_r fit built none
    assert rel(cg.delta, dense.delta) <= 1e-8


def _corrupt_first_newton_solve(monkeypatch, converged: bool):
    """Make the first inner solve of every CE Newton fit return a wrong solution whose direction
    does not descend, as a solve stopped early by its budget can (seen: δ² = −56 on the quick
    preset): x = −1e4·rhs gives β = −1e4·H^½H^{+½}r = −1e4·r and δ² = −1e4·rᵀΘr < 0."""
    import ntkscrub.shifts as shifts

    class Corrupt(shifts.Inverse):
        def solve(self, rhs):  # noqa: D102 - a test double
            u = super().solve(rhs)
            if self.label.endswith("#1"):
                self.records[-1] = {**self.records[-1], "converged": converged}
                return -1e4 * rhs
            return u

    monkeypatch.setattr(shifts, "Inverse", Corrupt)


def test_ce_newton_takes_a_gradient_step_when_an_inexact_solve_does_not_descend(monkeypatch):
    trained, theta0 = trained_pair()
    X, Y = make_data("mlp", 20)
    args = (trained, (X[:16], Y[:16]), (X[16:], Y[16:]))
    kw = {"init": theta0, "loss": "ce", "method": "ce_newton", "ridge": 0.7, "solver": "cg"}
    exact = scrub(*args, **kw)
    _corrupt_first_newton_solve(monkeypatch, converged=False)
    with pytest.warns(RuntimeWarning, match="taking a gradient step"):
        res = scrub(*args, **kw)
    hist = res.info["method_info"]["newton"]["D"]["history"]
    assert hist[0]["direction"] == "gradient" and hist[-1]["direction"] == "newton"
    assert res.info["method_info"]["newton"]["D"]["converged"]
    assert rel(res.delta, exact.delta) <= 1e-6  # the same minimiser, reached anyway


def test_ce_newton_non_descent_after_a_converged_solve_still_raises(monkeypatch):
    # every solve of step 1 is corrupted, the re-solve at the final tol included: an uphill
    # direction that is exact to the final tol is an error
    trained, theta0 = trained_pair()
    X, Y = make_data("mlp", 20)
    _corrupt_first_newton_solve(monkeypatch, converged=True)
    with pytest.raises(ValueError, match="not a descent direction"):
        scrub(
            trained, (X[:16], Y[:16]), (X[16:], Y[16:]), init=theta0, loss="ce",
            method="ce_newton", ridge=0.7, solver="cg",
        )  # fmt: skip


def test_ce_newton_solves_again_at_tol_when_a_loose_converged_solve_does_not_descend(monkeypatch):
    """Inexact Newton (forcing 0.1 ≫ float64's tol): a loose solve that *converged* but points
    uphill (the quick preset at w(D), float32, forcing 0.1: δ² = −1.27 raised) is solved again at
    the final tol, and the fit reaches the minimiser of a fit whose solves are all exact."""
    import ntkscrub.shifts as shifts
    from ntkscrub.shifts import NewtonConfig

    trained, theta0 = trained_pair()
    X, Y = make_data("mlp", 20)
    args = (trained, (X[:16], Y[:16]), (X[16:], Y[16:]))
    kw = {"init": theta0, "loss": "ce", "method": "ce_newton", "ridge": 0.7, "solver": "cg"}
    exact = scrub(*args, **kw)
    loose_tols = []

    class Uphill(shifts.Inverse):
        def solve(self, rhs):  # noqa: D102 - a test double
            u = super().solve(rhs)
            if self.config.tol > 1e-6:  # every loose solve: converged, and pointing uphill
                loose_tols.append(self.config.tol)
                return -1e4 * rhs
            return u

    monkeypatch.setattr(shifts, "Inverse", Uphill)
    res = scrub(*args, newton=NewtonConfig(forcing=0.1), **kw)
    info = res.info["method_info"]["newton"]["D"]
    assert loose_tols and loose_tols[0] == 0.1  # the first step's solve was the loose one
    assert info["converged"] and all(h["direction"] == "newton" for h in info["history"])
    assert info["history"][0]["inner_tol"] == 1e-10  # the step used the re-solve at tol
    step1 = [r for r in res.info["solves"] if r.get("system", "").endswith("D #1")]
    assert [r["tol"] for r in step1] == [0.1, 1e-10]  # both solves are recorded
    assert rel(res.delta, exact.delta) <= 1e-8


def test_ce_newton_keeps_newton_speed_with_a_preconditioner_on_a_spread_spectrum():
    """A model linear in its parameters whose NTK spans four decades (as the quick preset's: κ ≈
    5e4): with the Nyström factor of Θ carried to each step and exact inner solves, PCG-Newton
    takes the dense twin's number of steps (±1) and lands on its minimiser. Regression: the
    earlier Woodbury form with a reused step-1 factor took 17–20 mostly backtracked steps on the
    quick preset's Θ. With the default inexact early steps (forcing 0.01) it takes at most two
    more steps for fewer products (measured here: 984 against 2098) and the same minimiser."""
    from ntkscrub.config import SolverConfig

    g = torch.Generator().manual_seed(5)
    d, c, n = 40, 4, 60
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d).double()
    Y = torch.randint(0, c, (n,), generator=g)
    theta0 = linear(d, c, 0)
    trained = linear(d, c, 1)
    with torch.no_grad():
        trained.weight.mul_(30.0)
    args = (trained, (X[:50], Y[:50]), (X[50:], Y[50:]))
    kw = dict(init=theta0, loss="ce", method="ce_newton", ridge=1e-2, linearize_at="trained")
    dense = scrub(*args, solver="dense", **kw)
    cfg = SolverConfig(precond_rank=16)
    exact = scrub(*args, solver="cg", solver_config=cfg, newton=NewtonConfig(forcing=1e-12), **kw)
    inexact = scrub(*args, solver="cg", solver_config=cfg, **kw)
    for cg, extra in ((exact, 1), (inexact, 2)):
        for name in ("D", "D_r"):
            n_dense = dense.info["method_info"]["newton"][name]["iterations"]
            hist = cg.info["method_info"]["newton"][name]["history"]
            assert cg.info["method_info"]["newton"][name]["converged"]
            assert len(hist) <= n_dense + extra, (name, len(hist), n_dense)
        assert rel(cg.delta, dense.delta) <= 1e-7
    assert inexact.info["matvecs"] < exact.info["matvecs"]


def test_newton_decrement_at_the_rounding_floor_counts_as_converged():
    """δ² = rᵀΘβ ≤ 0 within tol·‖r‖·‖Θβ‖ of zero after converged solves is the minimum reached to
    the products' precision (float32 at w(D) on the quick preset: δ² = −2.9e-5), not an error;
    a clearly negative δ² after converged solves still raises, after an unconverged one falls
    back to the gradient."""
    from types import SimpleNamespace

    from ntkscrub.shifts import _checked_direction

    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 12, generator=g, dtype=torch.float64)
    Theta = A @ A.T
    r = torch.randn(12, generator=g, dtype=torch.float64)
    ok = SimpleNamespace(records=[{"converged": True}], label="S")
    beta = torch.linalg.solve(Theta + torch.eye(12, dtype=torch.float64), r)
    assert _checked_direction(ok, "S", 1, r, beta, Theta, 1e-3)[3] == "newton"
    # a direction whose decrement is −1e-4·‖r‖‖Θβ‖ (Θβ almost ⟂ r): zero to a 1e-3 tolerance
    v, rh = torch.randn(12, generator=g, dtype=torch.float64), r / r.norm()
    w = v - (v @ rh) * rh - 1e-4 * v.norm() * rh
    tiny = torch.linalg.solve(Theta, w)
    b, Tb, dec2, kind = _checked_direction(ok, "S", 6, r, tiny, Theta, 1e-3)
    assert kind == "zero" and dec2 < 0 and torch.equal(b, tiny)
    with pytest.raises(ValueError, match="not a descent direction"):
        _checked_direction(ok, "S", 6, r, -beta, Theta, 1e-3)
    # ... unless ½|δ²| is below the decrement test's own threshold
    d2 = float(r @ Theta @ beta)
    assert _checked_direction(ok, "S", 6, r, -beta, Theta, 1e-3, stop=0.5 * d2)[3] == "zero"
    with pytest.raises(ValueError, match="not a descent direction"):
        _checked_direction(ok, "S", 6, r, -beta, Theta, 1e-3, stop=0.4 * d2)
    bad = SimpleNamespace(records=[{"converged": False}], label="S")
    with pytest.warns(RuntimeWarning, match="gradient step"):
        b, Tb, dec2, kind = _checked_direction(bad, "S", 6, r, -beta, Theta, 1e-3)
    assert kind == "gradient" and torch.equal(b, r) and dec2 > 0


def primal_newton_ce_minimiser(J, f0, Y, lam, centre):
    """argmin_w Σ CE(f0 + J w, y) + ½λ‖w − centre‖² by damped Newton on the explicit primal
    Hessian ``JᵀHJ + λI`` (p × p, float64): a reference independent of the dual iteration."""
    c = f0.shape[1]
    onehot = torch.nn.functional.one_hot(Y, c).double()

    def loss(w):
        z = f0 + (J @ w).reshape(-1, c)
        return -(onehot * torch.log_softmax(z, 1)).sum() + 0.5 * lam * (w - centre) @ (w - centre)

    w = centre.clone()
    for _ in range(100):
        g = torch.func.grad(loss)(w)
        if g.norm() / lam < 1e-12:
            return w
        d = torch.linalg.solve(torch.func.hessian(loss)(w), g)
        t = 1.0
        while loss(w - t * d) > loss(w) - 0.25 * t * (g @ d) and t > 1e-12:
            t /= 2
        w = w - t * d
    raise AssertionError("reference Newton did not converge")


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_ce_newton_exact_with_a_confidently_wrong_sample(solver):
    """A sample whose true class sits at probability ~1e-22 under θ0 = w(D), with a ridge large
    enough to keep it wrong at the minimiser: its gradient along that class is O(1) while H's
    curvature there is below any dtype's resolution. The symmetric step alone dropped that part
    of r and stopped with a non-descent direction after an exact solve (δ² = −2.7e-5, both
    solvers; quick preset seed 1: −0.06); with the r₀ correction both land on the primal
    minimiser, and the records say how much of r went the flat way."""
    g = torch.Generator().manual_seed(3)
    d, c, n, lam = 6, 4, 24, 10.0
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randint(0, c, (n,), generator=g)
    model = linear(d, c, 2)
    with torch.no_grad():
        k, y, u = (int(Y[0]) + 1) % c, int(Y[0]), X[0] / X[0].norm() ** 2
        model.weight[k] += 30 * u
        model.weight[y] -= 20 * u
    assert float(torch.softmax(model(X[:1]).detach(), 1)[0, y]) < 1e-20
    J, f = explicit_jacobian(model, X)
    zero = torch.zeros(J.shape[1], dtype=torch.float64)
    w_d = primal_newton_ce_minimiser(J, f, Y, lam, zero)
    w_r = primal_newton_ce_minimiser(J[: c * 20], f[:20], Y[:20], lam, zero)
    res = scrub(
        model, (X[:20], Y[:20]), (X[20:], Y[20:]), init=model, linearize_at="trained",
        loss="ce", method="ce_newton", ridge=lam, solver=solver,
    )  # fmt: skip
    assert rel(res.delta, w_r - w_d) <= 1e-9
    assert res.info["converged"]
    shares = [r["flat_curvature_share"] for r in res.info["solves"] if "flat_curvature_share" in r]
    assert max(shares) > 0.1  # the sample's O(1) gradient went through r₀


def test_ce_newton_dense_twin_respects_max_dense_bytes():
    """The dense Newton fit makes Θ explicit once; that goes through the same memory cap as
    every dense solve (DenseTooLarge names the system), never around it."""
    from ntkscrub.config import SolverConfig
    from ntkscrub.operators import DenseTooLarge

    trained, theta0 = trained_pair()
    X, Y = make_data("mlp", 20)
    rows, p = 3 * 20, sum(t.numel() for t in trained.parameters())
    item = next(trained.parameters()).element_size()
    # room for one (c·N)² system, not for the explicit J_D beside it
    cap = rows * rows * item + rows * p * item // 2
    with pytest.raises(DenseTooLarge, match="max_dense_bytes"):
        scrub(
            trained, (X[:16], Y[:16]), (X[16:], Y[16:]), init=theta0, loss="ce",
            method="ce_newton", ridge=0.7, solver="dense",
            solver_config=SolverConfig(max_dense_bytes=cap),
        )  # fmt: skip


def test_ce_newton_at_a_stationary_w_d_starts_at_its_minimiser():
    """Linearised at w(D) that minimises the same CE + ridge objective (a model linear in its
    parameters, w(D) from the primal reference), α₀ = (Y − softmax f(w(D)))/λ is the D fit's
    minimiser: the start takes t = 1 and the first decrement already meets the stop test,
    where α = 0 (w = θ0) needed several Newton steps."""
    g = torch.Generator().manual_seed(4)
    d, c, n, lam = 5, 3, 30, 0.5
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randint(0, c, (n,), generator=g)
    theta0 = linear(d, c, 3)
    J, f = explicit_jacobian(theta0, X)
    w = primal_newton_ce_minimiser(J, f, Y, lam, torch.zeros(J.shape[1], dtype=torch.float64))
    trained = linear(d, c, 4)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat(theta0) + w, trained.parameters())
    res = scrub(
        trained, (X[:24], Y[:24]), (X[24:], Y[24:]), init=theta0, linearize_at="trained",
        loss="ce", method="ce_newton", ridge=lam, solver="dense",
    )  # fmt: skip
    newton = res.info["method_info"]["newton"]
    assert newton["D"]["start"] == 1.0 and newton["D"]["iterations"] == 1
    assert newton["D"]["converged"] and newton["D_r"]["iterations"] > 2


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_ce_newton_retain_fit_warm_starts_from_the_d_fit(solver):
    """With ``warm_start`` (default) the D_r fit starts from the D fit's logits on the retain rows
    (α_D[r] + (Θ_rr + λI)⁻¹Θ_rf α_D[f]) when that beats the t·α₀ grid: the same unique
    minimiser (float64, 1e-8), fewer Newton steps when D_f is a small part of D;
    ``warm_start=False`` keeps the grid."""
    g = torch.Generator().manual_seed(5)
    d, c, n, n_f, lam = 200, 3, 60, 3, 0.3
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randint(0, c, (n,), generator=g)
    theta0 = linear(d, c, 5)
    trained = linear(d, c, 6)
    kw = dict(init=theta0, loss="ce", method="ce_newton", ridge=lam, solver=solver)
    runs = {}
    for warm in (True, False):
        cfg = SolverConfig(warm_start=warm)
        runs[warm] = scrub(trained, (X[n_f:], Y[n_f:]), (X[:n_f], Y[:n_f]), solver_config=cfg, **kw)
    J_d, f_d = explicit_jacobian(theta0, torch.cat([X[n_f:], X[:n_f]]))
    zero = torch.zeros(J_d.shape[1], dtype=torch.float64)
    w_r = primal_newton_ce_minimiser(J_d[: c * (n - n_f)], f_d[: n - n_f], Y[n_f:], lam, zero)
    hot, cold = (runs[w].info["method_info"]["newton"]["D_r"] for w in (True, False))
    assert hot["start"] == "warm" and cold["start"] != "warm"
    assert hot["converged"] and cold["converged"]
    assert hot["iterations"] < cold["iterations"]
    assert rel(runs[True].w_lin_r, w_r) <= 1e-8 and rel(runs[False].w_lin_r, w_r) <= 1e-8
    assert rel(runs[True].delta, runs[False].delta) <= 1e-8


def test_ce_newton_dense_twin_forms_theta_once(monkeypatch):
    """On the dense twin the D_r fit and its logits-keeping start take Θ_rr and Θ_rf as blocks of
    the D fit's explicit Θ_DD (retain rows first): one explicit Θ per CE shift, not two (the
    quick preset: 31 → 45 s per CE scrub when Θ_rr was formed again). The blocks' minimiser is
    checked against the primal reference by the warm-start test above."""
    import ntkscrub.shifts as shifts

    formed = []
    real = shifts._theta_operator
    monkeypatch.setattr(
        shifts, "_theta_operator", lambda jac, *a: formed.append(jac.n) or real(jac, *a)
    )
    trained, theta0 = trained_pair()
    X, Y = make_data("mlp", 20)
    args = (trained, (X[:16], Y[:16]), (X[16:], Y[16:]))
    kw = {"init": theta0, "loss": "ce", "method": "ce_newton", "ridge": 0.7}
    dense = scrub(*args, solver="dense", **kw)
    assert formed == [20]  # Θ_DD only
    cg = scrub(*args, solver="cg", **kw)
    assert rel(dense.delta, cg.delta) <= 1e-8


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_ce_newton_at_a_non_stationary_w_d_starts_from_its_displacement(solver):
    """Linearised at a w(D) that is *not* the linear model's minimiser (a model linear in its
    parameters, w(D) = θ0 + w* + δ with δ in the row space of J), the D fit is offered the start
    whose logits are w(D)'s own, α = (Θ + λI)⁻¹(f(w(D)) − f(θ0)) (`_displacement_start`): it is
    taken, the fit needs fewer Newton steps than from the t·α₀ grid (measured on the quick
    preset at w(D): 12 → 4 on the dense twin), and both fits land on the primal minimisers."""
    from ntkscrub.operators import Jacobian
    from ntkscrub.params import ParameterSpace
    from ntkscrub.shifts import ce_newton_fit

    g = torch.Generator().manual_seed(6)
    d, c, n, n_f, lam = 40, 3, 30, 3, 0.5
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randint(0, c, (n,), generator=g)
    theta0 = linear(d, c, 3)
    J, f = explicit_jacobian(theta0, X)
    zero = torch.zeros(J.shape[1], dtype=torch.float64)
    w_star = primal_newton_ce_minimiser(J, f, Y, lam, zero)
    off = J.T @ torch.randn(c * n, generator=g, dtype=torch.float64)
    trained = linear(d, c, 4)
    with torch.no_grad():
        shift = w_star + 0.3 * float(w_star.norm()) * off / off.norm()
        torch.nn.utils.vector_to_parameters(flat(theta0) + shift, trained.parameters())
    res = scrub(
        trained, (X[n_f:], Y[n_f:]), (X[:n_f], Y[:n_f]), init=theta0, linearize_at="trained",
        loss="ce", method="ce_newton", ridge=lam, solver=solver,
    )  # fmt: skip
    newton = res.info["method_info"]["newton"]
    assert newton["D"]["start"] == "displacement" and newton["D"]["converged"]
    Jd, fd = explicit_jacobian(theta0, torch.cat([X[n_f:], X[:n_f]]))
    Yd = torch.cat([Y[n_f:], Y[:n_f]])
    w_d = primal_newton_ce_minimiser(Jd, fd, Yd, lam, zero)
    w_r = primal_newton_ce_minimiser(Jd[: c * (n - n_f)], fd[: n - n_f], Y[n_f:], lam, zero)
    assert rel(res.delta, w_r - w_d) <= 1e-8
    # the t·α₀ grid alone (a warm candidate of α = 0 turns the displacement start off)
    jac = Jacobian(ParameterSpace(trained), (torch.cat([X[n_f:], X[:n_f]]), Yd))
    cfg = SolverConfig(method=solver, tol=1e-10)
    centre = (flat(theta0) - flat(trained)).to(torch.float64)
    fit = ce_newton_fit(jac, ridge=lam, config=cfg, centre=centre)
    grid = ce_newton_fit(
        jac, ridge=lam, config=cfg, centre=centre, warm=torch.zeros(c * n, dtype=torch.float64)
    )
    assert fit.start == "displacement" and grid.start != "displacement"
    assert fit.iterations < grid.iterations, (fit.iterations, grid.iterations)
    assert rel(fit.alpha, grid.alpha) <= 1e-8
