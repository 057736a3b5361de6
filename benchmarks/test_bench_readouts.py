"""The cost of each readout and information bound on small-CIFAR-sized data.

Small CIFAR (seed paper §5): |D_r| = 475, |D_f| = 25, 500 test images, 5 classes, 3×32×32 inputs
(random tensors here, seeded; the cost does not depend on the pixels). The model is an All-CNN whose
width depends on ``--bench-size`` (smoke: 0.05 and a tenth of the data; cpu: 0.25; gpu: 1). Each
readout runs once per benchmark (``pedantic``, one round); ``extra_info`` holds its value, so a
run also shows that the readout produced a number. Benchmarks record time; they assert nothing
about it.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from benchlib import size_params

from ntkscrub import bounds, readouts
from ntkscrub.recipes.models import build_model

SIZES = {  # (width, n_retain, n_forget, n_test)
    "smoke": (0.05, 48, 8, 48),
    "cpu": (0.25, 475, 25, 500),
    "gpu": (1.0, 475, 25, 500),
}

READOUTS = [
    "error",
    "softmax_l1",
    "softmax_l1_along_line",
    "relearn_time",
    "membership_attack",
    "white_box_diag",
    "black_box_diag_per_query",
    "white_box_full_slq",
    "black_box_full",
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "readout" in metafunc.fixturenames:
        metafunc.parametrize("readout", size_params(metafunc.config, READOUTS))


@pytest.fixture(scope="module")
def problem(bench_config: Any, device: torch.device) -> dict[str, Any]:
    width, nr, nf, nt = SIZES.get(bench_config.name, SIZES["smoke"])
    g = torch.Generator().manual_seed(0)

    def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.randn(n, 3, 32, 32, generator=g).to(device)
        return X, torch.randint(0, 5, (n,), generator=g).to(device)

    retain, forget, test = data(nr), data(nf), data(nt)
    original = build_model("allcnn", 5, width, seed=0).to(device).eval()
    perturbed = []
    for s in (1, 2):  # stand-ins for a scrubbed and a retrained model near the original
        m = copy.deepcopy(original)
        gen = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1e-2 * torch.randn(p.shape, generator=gen).to(device))
        perturbed.append(m.eval())
    full = (torch.cat([retain[0], forget[0]]), torch.cat([retain[1], forget[1]]))
    return dict(
        original=original,
        scrubbed=perturbed[0],
        retrained=perturbed[1],
        retain=retain,
        forget=forget,
        test=test,
        full=full,
        sizes=(width, nr, nf, nt),
    )


def _run(name: str, P: dict[str, Any]) -> Any:
    o, s, r = P["original"], P["scrubbed"], P["retrained"]
    if name == "error":
        return readouts.error(s, P["forget"])
    if name == "softmax_l1":
        return readouts.softmax_l1(s, r, P["forget"])
    if name == "softmax_l1_along_line":
        return readouts.softmax_l1_along_line(o, s, r, P["forget"])["distances"][-1]
    if name == "relearn_time":
        return readouts.relearn_time(s, P["full"], P["forget"], reference=o, max_epochs=3).epochs
    if name == "membership_attack":
        res = readouts.membership_attack(s, P["retain"], P["test"], P["forget"])
        return res.forget_member_fraction
    if name == "white_box_diag":
        return bounds.white_box(s, r, P["retain"], alpha=1e-6, kind="diag")["kl"]
    if name == "black_box_diag_per_query":
        out = bounds.per_query_information(
            s, r, P["retain"], {"forget": P["forget"]}, alpha=1e-6, kind="diag"
        )
        return out["sets"]["forget"]["mean"]
    if name == "white_box_full_slq":
        return bounds.white_box(
            s,
            r,
            P["retain"],
            alpha=1e-6,
            delta=1e-3,
            kind="full",
            config=bounds.BoundsConfig(
                probes=4, steps=8, cg_tol=1e-3, cg_max_iter=20, cg_strict=False
            ),
        )["kl"]
    if name == "black_box_full":
        out = bounds.black_box(
            s,
            r,
            P["retain"],
            {"forget": P["forget"]},
            alpha=1e-6,
            delta=1e-3,
            kind="full",
            config=bounds.BoundsConfig(cg_tol=1e-3, cg_max_iter=20, cg_strict=False),
        )
        return out["sets"]["forget"]["kl"]
    raise ValueError(name)


def test_readout_cost(benchmark: Any, record: Any, problem: dict[str, Any], readout: str) -> None:
    value = benchmark.pedantic(_run, args=(readout, problem), rounds=1, iterations=1)
    width, nr, nf, nt = problem["sizes"]
    record(
        readout=readout,
        value=value,
        width=width,
        n_retain=nr,
        n_forget=nf,
        n_test=nt,
        data="random CIFAR-shaped tensors, 5 classes (small-CIFAR sizes)",
    )
