"""Where ``solver="auto"``'s old memory-only rule went wrong: the dense twin against cg on MLPs
whose explicit J and Θ fit the 4 GiB cap (the cost model now takes cg there).

Two float32 MLPs, weights perturbed from θ0, cross-entropy with weight decay 0.1:
``mlp``: 64-256-256-5 (p = 84 k), N = 500, 25 forgotten; ``mlp100``: 64-256-100 (c = 100),
N = 60, 6 forgotten. Each scrub is timed with ``solver="dense"``, ``"cg"`` and ``"auto"``; the
auto cost model's numbers are printed.

Run: ``PYTHONPATH=$PWD .venv/bin/python benchmarks/auto_solver_cases.py`` (≈ 1 min, 2 threads).
"""

from __future__ import annotations

import json
import time

import torch
from torch import nn

from ntkscrub import scrub


def run(model: nn.Module, init: nn.Module, X: torch.Tensor, Y: torch.Tensor, nf: int) -> dict:
    out: dict = {}
    for solver in ("dense", "cg", "auto"):
        t = time.perf_counter()
        r = scrub(model, (X[nf:], Y[nf:]), (X[:nf], Y[:nf]), init=init, solver=solver,
                  weight_decay=0.1)  # fmt: skip
        out[solver] = {"seconds": round(time.perf_counter() - t, 2), "solver": r.info["solver"]}
    out["auto_solver"] = r.info["auto_solver"]
    return out


def pair(widths: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    init = nn.Sequential(*layers[:-1]).eval()
    model = nn.Sequential(*[type(m)(m.in_features, m.out_features) if isinstance(m, nn.Linear)
                            else nn.Tanh() for m in init]).eval()  # fmt: skip
    model.load_state_dict(init.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, init


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model, init = pair((64, 256, 256, 5))
    X, Y = torch.randn(500, 64), torch.randint(0, 5, (500,))
    print(json.dumps({"case": "mlp", **run(model, init, X, Y, 25)}, default=str), flush=True)
    model, init = pair((64, 256, 100))
    X, Y = torch.randn(60, 64), torch.randint(0, 100, (60,))
    print(json.dumps({"case": "mlp100", **run(model, init, X, Y, 6)}, default=str), flush=True)


if __name__ == "__main__":
    main()
