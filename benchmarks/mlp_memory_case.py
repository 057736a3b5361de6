"""Issue 14's CPU memory case: an MLP 784-1024-1024-10 (p = 1,863,690), N = 2,050 (2,000 retain +
50 forget), c = 10, random data, scrubbed with defaults (``weight_decay=5e-4``); records seconds,
matvecs, convergence, peak RSS and the memory plan of the passes. Not run in CI (minutes).

    python benchmarks/mlp_memory_case.py [auto|none|K] > result.json

The argument sets ``ProductConfig.vector_chunk`` (default ``auto``: the measured memory plan).
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from torch import nn

from ntkscrub import scrub
from ntkscrub.config import ProductConfig


def mlp(c: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, c)
    ).eval()


def main(chunk: str) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n, c, nf = 2050, 10, 50
    X, Y = torch.randn(n, 784, generator=g), torch.randint(0, c, (n,), generator=g)
    theta0, model = mlp(c), mlp(c)
    model.load_state_dict(theta0.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        for i in range(0, n, 128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[i : i + 128]), Y[i : i + 128]).backward()
            opt.step()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    vc = None if chunk == "none" else (int(chunk) if chunk.isdigit() else "auto")
    t = time.perf_counter()
    res = scrub(
        model,
        (X[:-nf], Y[:-nf]),
        (X[-nf:], Y[-nf:]),
        init=theta0,
        solver="cg",  # the matrix-free path is what this case measures
        weight_decay=5e-4,
        products=ProductConfig(vector_chunk=vc),
    )
    return {
        "case": "MLP 784-1024-1024-10 (p=1,863,690), N=2,050 (2,000 retain + 50 forget), c=10, "
        "random data, weight_decay=5e-4, float32",
        "vector_chunk": chunk,
        "seconds": time.perf_counter() - t,
        "converged": res.info["converged"],
        "matvecs": res.info["matvecs"],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "rss_before_scrub_gb": rss0,
        "passes": res.info.get("passes"),
        "threads": 2,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "auto"), indent=1))
