"""Information bounds of Proposition 1 (eq. 6–7): closed forms, matrix-free vs dense twins."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from ntkscrub.bounds import (
    CONVENTION,
    BoundsConfig,
    black_box,
    gaussian_kl,
    gaussian_kl_diag,
    hessian_sqrt_apply,
    information_bounds,
    output_covariance,
    per_query_information,
    softmax_hessian_sqrt,
    white_box,
)
from ntkscrub.operators import GGN, Jacobian, output_hessian_apply
from ntkscrub.params import ParameterSpace
from ntkscrub.scrub import diagonal_fisher, fisher_noise_variance

F64 = torch.float64
TIGHT = {"cg_tol": 1e-12}


def _mlp(seed: int = 0, c: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, c)).double().eval()


def _moved(model: nn.Module, scale: float, seed: int = 7) -> nn.Module:
    """A copy of ``model`` moved by ``scale`` along a fixed random direction."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    Xr = torch.randn(20, 5, generator=g, dtype=F64)
    Yr = torch.randint(0, 3, (20,), generator=g)
    Xq = torch.randn(4, 5, generator=g, dtype=F64)
    return (Xr, Yr), Xq


@pytest.fixture(scope="module")
def models():
    ref = _mlp(0)
    return _moved(ref, 0.05), ref  # (scrubbed, reference)


def _spd(k: int, g: torch.Generator) -> torch.Tensor:
    A = torch.randn(k, k, generator=g, dtype=F64)
    return A @ A.T + 0.5 * torch.eye(k, dtype=F64)


# --------------------------------------------------------------------------- Gaussian KL
def test_gaussian_kl_matches_torch_and_conventions():
    g = torch.Generator().manual_seed(1)
    k = 4
    mu0, mu1 = torch.randn(k, generator=g, dtype=F64), torch.randn(k, generator=g, dtype=F64)
    S0, S1 = _spd(k, g), _spd(k, g)
    out = gaussian_kl(mu0, S0, mu1, S1)
    p, q = MultivariateNormal(mu0, S0), MultivariateNormal(mu1, S1)
    assert out["kl"] == pytest.approx(float(kl_divergence(p, q)), rel=1e-12)
    assert out["reference_two_kl"] == pytest.approx(2 * float(kl_divergence(q, p)), rel=1e-12)
    assert out["two_kl"] == pytest.approx(2 * out["kl"], rel=1e-15)
    # The terms, and the paper's printed expression (+ log|ΣΣ0⁻¹|, no ½).
    d = mu1 - mu0
    quad = float(d @ torch.linalg.solve(S1, d))
    tr = float(torch.trace(torch.linalg.solve(S1, S0)))
    ld = float(torch.logdet(S0) - torch.logdet(S1))
    assert out["quadratic"] == pytest.approx(quad, rel=1e-12)
    assert out["trace"] == pytest.approx(tr, rel=1e-12)
    assert out["logdet_ratio"] == pytest.approx(ld, rel=1e-10)
    assert out["paper_printed"] == pytest.approx(quad + tr + ld - k, rel=1e-10)
    assert out["kl"] == pytest.approx(0.5 * (quad + tr - ld - k), rel=1e-12)
    assert out["convention"] == CONVENTION and "+log|Sigma Sigma0^-1|" in CONVENTION
    assert gaussian_kl(mu0, S0, mu0, S0)["kl"] == pytest.approx(0.0, abs=1e-13)


def test_gaussian_kl_diag_matches_closed_forms():
    g = torch.Generator().manual_seed(2)
    mu0, mu1 = torch.randn(7, generator=g, dtype=F64), torch.randn(7, generator=g, dtype=F64)
    v0 = torch.rand(7, generator=g, dtype=F64) + 0.1
    v1 = torch.rand(7, generator=g, dtype=F64) + 0.1
    out = gaussian_kl_diag(mu0, v0, mu1, v1)
    torch_kl = float(kl_divergence(Normal(mu0, v0.sqrt()), Normal(mu1, v1.sqrt())).sum())
    assert out["kl"] == pytest.approx(torch_kl, rel=1e-12)
    dense = gaussian_kl(mu0, torch.diag(v0), mu1, torch.diag(v1))
    for key in ("kl", "quadratic", "trace_minus_k", "logdet_ratio", "reference_two_kl"):
        assert out[key] == pytest.approx(dense[key], rel=1e-10, abs=1e-12)
    # The reference code's number: Σ (μ1−μ0)²/v0 + v1/v0 − log(v1/v0) − 1 with its (mu0, var0) the
    # scrubbed model, i.e. our first argument.
    ref = float(((mu1 - mu0) ** 2 / v0 + v1 / v0 - torch.log(v1 / v0) - 1).sum())
    assert out["reference_two_kl"] == pytest.approx(ref, rel=1e-12)


def test_gaussian_kl_jitter_and_bad_inputs():
    # A rank-deficient covariance: Cholesky needs the documented jitter; identical inputs stay 0.
    v = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    S = torch.outer(v, v)  # rank 1
    out = gaussian_kl(v, S, v, S)
    assert out["jitter"] > 0 and out["kl"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="Sigma1"):
        gaussian_kl(v, torch.eye(3, dtype=F64), v, torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match="Sigma0"):
        gaussian_kl(v, torch.full((3, 3), float("nan"), dtype=F64), v, torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="var1"):
        gaussian_kl_diag(v, v, v, -v)
    with pytest.raises(ValueError, match="jitter"):
        gaussian_kl(v, torch.eye(3, dtype=F64), v, torch.eye(3, dtype=F64), jitter=-1.0)


def test_softmax_hessian_sqrt_is_exact():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(6, 4, generator=g, dtype=F64) * 3, dim=1)
    R = softmax_hessian_sqrt(probs)
    H = torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)
    torch.testing.assert_close(R, R.mT, rtol=0, atol=1e-15)
    torch.testing.assert_close(R @ R, H, rtol=0, atol=1e-14)
    U = torch.randn(24, 3, generator=g, dtype=F64)
    twice = hessian_sqrt_apply(R, hessian_sqrt_apply(R, U, 4), 4)
    torch.testing.assert_close(twice, output_hessian_apply(probs, U, 4), rtol=0, atol=1e-14)
    u = U[:, 0]
    torch.testing.assert_close(hessian_sqrt_apply(R, u, 4), hessian_sqrt_apply(R, U, 4)[:, 0])


# --------------------------------------------------------------------------- covariances
def _explicit_full_cov(model, retain, Xq, alpha, delta, reduction="mean"):
    """α Jₓ (sF + δI)⁻¹ Jₓᵀ from explicit Jacobians (the primal formula, no Woodbury)."""
    space = ParameterSpace(model)
    J_r = Jacobian(space, retain)
    F = GGN(space.point(), jac=J_r).dense()
    s = 1.0 / J_r.n if reduction == "mean" else 1.0
    Jx = Jacobian(space, Xq).dense()
    A = s * F + delta * torch.eye(space.p, dtype=F64)
    return alpha * Jx @ torch.linalg.solve(A, Jx.T)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_full_output_covariance_matches_explicit(models, data, reduction):
    scrubbed, _ = models
    retain, Xq = data
    alpha, delta = 0.5, 0.05
    E = _explicit_full_cov(scrubbed, retain, Xq, alpha, delta, reduction)
    kw = dict(alpha=alpha, delta=delta, kind="full")
    forms = [("cg", "dual"), ("dense", "dual")] + (
        [("cg", "primal")] if reduction == "mean" else []
    )
    for solver, form in forms:
        cfg = BoundsConfig(solver=solver, form=form, reduction=reduction, **TIGHT)
        f, C = output_covariance(scrubbed, retain, Xq, config=cfg, **kw)
        rel = float((C - E).norm() / E.norm())
        assert rel <= 1e-6, (solver, form, rel)
        assert f.shape == (4, 3) and C.shape == (12, 12)
    # Per-query (block-diagonal) covariances are the diagonal blocks of the joint one.
    cfg = BoundsConfig(reduction=reduction, query_batch=3, **TIGHT)
    _, B = output_covariance(scrubbed, retain, Xq, joint=False, config=cfg, **kw)
    for i in range(4):
        torch.testing.assert_close(B[i], E[3 * i : 3 * i + 3, 3 * i : 3 * i + 3], rtol=1e-6, atol=0)


def test_diag_output_covariance_matches_explicit(models, data):
    scrubbed, _ = models
    retain, Xq = data
    space = ParameterSpace(scrubbed)
    var = space.flatten(fisher_noise_variance(diagonal_fisher(scrubbed, retain), 1e-2, 3))
    Jx = Jacobian(space, Xq).dense()
    E = Jx @ (var.unsqueeze(1) * Jx.T)
    for solver in ("cg", "dense"):
        cfg = BoundsConfig(solver=solver)
        _, C = output_covariance(scrubbed, retain, Xq, alpha=1e-2, kind="diag", config=cfg)
        torch.testing.assert_close(C, E, rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- white box
def test_white_box_diag_is_the_reference_recipe(models, data):
    scrubbed, reference = models
    retain, _ = data
    alpha = 1e-3
    out = white_box(scrubbed, reference, retain, alpha=alpha, kind="diag")
    # Σ: the reference's noise variance from the mean diagonal Fisher on D_r at each model.
    space = ParameterSpace(scrubbed)
    v_s = space.flatten(fisher_noise_variance(diagonal_fisher(scrubbed, retain), alpha, 3))
    v_r = space.flatten(fisher_noise_variance(diagonal_fisher(reference, retain), alpha, 3))
    w_s, w_r = space.point(scrubbed), space.point(reference)
    expect = gaussian_kl_diag(w_s, v_s, w_r, v_r)
    assert out["kl"] == pytest.approx(expect["kl"], rel=1e-12)
    printed = float(((w_r - w_s) ** 2 / v_s + v_r / v_s - torch.log(v_r / v_s) - 1).sum())
    assert out["reference_two_kl"] == pytest.approx(printed, rel=1e-12)
    assert sum(out["per_tensor_kl"].values()) == pytest.approx(out["kl"], rel=1e-12)
    assert out["convention"] == CONVENTION and out["k"] == space.p


def test_white_box_full_dense_twin_matches_gaussian_kl(models, data):
    scrubbed, reference = models
    retain, _ = data
    alpha, delta = 1e-2, 0.05
    dense = BoundsConfig(solver="dense")
    out = white_box(
        scrubbed, reference, retain, alpha=alpha, delta=delta, kind="full", config=dense
    )
    covs = []
    for m in (scrubbed, reference):
        space = ParameterSpace(m)
        J_r = Jacobian(space, retain)
        A = GGN(space.point(), jac=J_r).dense() / J_r.n + delta * torch.eye(space.p, dtype=F64)
        covs.append(alpha * torch.linalg.inv(A))
    space = ParameterSpace(scrubbed)
    expect = gaussian_kl(space.point(scrubbed), covs[0], space.point(reference), covs[1])
    for key in ("kl", "quadratic", "trace_minus_k", "logdet_ratio", "reference_two_kl"):
        assert out[key] == pytest.approx(expect[key], rel=1e-7), key


def test_white_box_full_slq_within_three_stderr(models, data):
    scrubbed, reference = models
    retain, _ = data
    kw = dict(alpha=1e-2, delta=0.05, kind="full")
    exact = white_box(scrubbed, reference, retain, config=BoundsConfig(solver="dense"), **kw)
    cfg = BoundsConfig(probes=10, steps=12, seed=3, **TIGHT)
    est = white_box(scrubbed, reference, retain, config=cfg, **kw)
    assert est["logdet_stderr"] > 0 and est["trace_stderr"] > 0 and est["stderr"] > 0
    assert abs(est["logdet_ratio"] - exact["logdet_ratio"]) <= 3 * est["logdet_stderr"]
    assert abs(est["trace_minus_k"] - exact["trace_minus_k"]) <= 3 * est["trace_stderr"]
    assert abs(est["kl"] - exact["kl"]) <= 3 * est["stderr"]
    assert est["quadratic"] == pytest.approx(exact["quadratic"], rel=1e-10)
    se = 0.5 * math.sqrt(est["trace_stderr"] ** 2 + est["logdet_stderr"] ** 2)
    assert est["stderr"] == pytest.approx(se) and est["two_kl_stderr"] == pytest.approx(2 * se)
    assert est["matvecs"] > 0 and est["seconds"] > 0 and est["cg"]["all_converged"]


# --------------------------------------------------------------------------- both bounds
@pytest.mark.parametrize("kind", ["diag", "full"])
def test_zero_information_when_models_coincide(models, data, kind):
    _, reference = models
    retain, Xq = data
    twin = copy.deepcopy(reference)
    out = information_bounds(
        twin, reference, retain, queries={"q": Xq}, alpha=1e-2, delta=0.05, kind=kind,
        config=BoundsConfig(probes=4, steps=4),
    )  # fmt: skip
    wb, bb = out["white_box"], out["black_box"]["q"]
    assert wb["kl"] == pytest.approx(0.0, abs=1e-12) and wb["stderr"] == 0.0
    assert wb["quadratic"] == 0.0
    assert bb["kl"] == pytest.approx(0.0, abs=1e-9)
    assert bb["per_query"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert out["convention"] == CONVENTION and bb["convention"] == CONVENTION


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_information_grows_as_scrubbed_model_moves_away(data, kind):
    retain, Xq = data
    reference = _mlp(0)
    kw = dict(alpha=1e-2, delta=0.05, kind=kind)
    wb, bb = [], []
    for t in (0.0, 0.02, 0.1):
        scrubbed = _moved(reference, t)
        dense = BoundsConfig(solver="dense")
        wb.append(white_box(scrubbed, reference, retain, config=dense, **kw)["kl"])
        bb.append(black_box(scrubbed, reference, retain, Xq, **kw)["sets"]["queries"]["kl"])
    assert wb[0] == pytest.approx(0.0, abs=1e-12) and wb[0] < wb[1] < wb[2]
    assert bb[0] == pytest.approx(0.0, abs=1e-9) and bb[0] < bb[1] < bb[2]


def test_per_query_information_sets(models, data):
    scrubbed, reference = models
    (Xr, Yr), Xq = data
    sets = {"forget": Xq[:2], "retain": (Xr[:5], Yr[:5]), "test": Xq[2:]}
    kw = dict(alpha=1e-2, kind="diag")
    out = per_query_information(scrubbed, reference, (Xr, Yr), sets, **kw)
    assert set(out["sets"]) == {"forget", "retain", "test"}
    r = out["sets"]["retain"]
    assert r["n"] == 5 and len(r["values"]) == 5 and all(v >= 0 for v in r["values"])
    assert r["mean"] == pytest.approx(sum(r["values"]) / 5, rel=1e-12) and r["std"] >= 0
    # The same numbers as the per-query part of the joint black-box computation.
    bb = black_box(scrubbed, reference, (Xr, Yr), {"forget": Xq[:2]}, **kw)
    assert bb["sets"]["forget"]["per_query"]["values"] == pytest.approx(
        out["sets"]["forget"]["values"], rel=1e-10
    )


# --------------------------------------------------------------------------- validation
def test_bad_inputs_raise_naming_the_argument(models, data):
    scrubbed, reference = models
    retain, Xq = data
    (Xr, Yr) = retain
    kw = dict(alpha=1e-2, kind="diag")
    for bad, name in ((-1.0, "alpha"), (0.0, "alpha"), (float("nan"), "alpha")):
        with pytest.raises(ValueError, match=name):
            white_box(scrubbed, reference, retain, alpha=bad)
    with pytest.raises(ValueError, match="delta"):
        white_box(scrubbed, reference, retain, alpha=1e-2, delta=-1.0)
    with pytest.raises(ValueError, match="delta"):
        white_box(scrubbed, reference, retain, alpha=1e-2, delta=0.0, kind="full")
    with pytest.raises(ValueError, match="kind"):
        white_box(scrubbed, reference, retain, alpha=1e-2, kind="diagonal")
    # Architectures: another hidden width.
    other = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    with pytest.raises(ValueError, match="reference"):
        white_box(scrubbed, other, retain, **kw)
    # Output sizes, when only the first layer is linearised (so parameter shapes agree).
    four = _mlp(0, c=4)
    with pytest.raises(ValueError, match="reference.*outputs"):
        white_box(scrubbed, four, (Xr, Yr % 3), config=BoundsConfig(params=r"^0\."), **kw)
    with pytest.raises(ValueError, match="retain"):
        white_box(scrubbed, reference, (Xr[:0], Yr[:0]), **kw)
    with pytest.raises(ValueError, match="queries"):
        black_box(scrubbed, reference, retain, Xq[:0], **kw)
    with pytest.raises(ValueError, match="queries"):
        black_box(scrubbed, reference, retain, {}, **kw)
    # Non-finite outputs (finite weights that overflow).
    huge = copy.deepcopy(scrubbed)
    with torch.no_grad():
        huge[2].weight.fill_(1e308)
    with pytest.raises(ValueError, match="scrubbed"):
        white_box(huge, reference, retain, **kw)
    # Training-mode dropout in the reference; and a non-module.
    drop = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.1), nn.Linear(6, 3)).double()
    with pytest.raises(ValueError, match="reference"):
        white_box(scrubbed, drop, retain, **kw)
    with pytest.raises(TypeError, match="scrubbed"):
        white_box("model", reference, retain, **kw)


def test_models_are_not_modified(models, data):
    scrubbed, reference = models
    retain, Xq = data
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (scrubbed, reference)]
    grads = [p.grad for m in (scrubbed, reference) for p in m.parameters()]
    information_bounds(
        scrubbed, reference, retain, queries=Xq, alpha=1e-2, delta=0.05, kind="full",
        config=BoundsConfig(probes=3, steps=3),
    )  # fmt: skip
    for m, b in zip((scrubbed, reference), before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, b[k]), k
        assert not m.training
    assert grads == [p.grad for m in (scrubbed, reference) for p in m.parameters()]
