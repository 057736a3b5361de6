"""A practitioner's trial: a torchvision ResNet-18 (BatchNorm), real CIFAR images, DataLoaders, the
README's ``scrub`` call with default settings, and a stopwatch against one retrain.

θ0: torchvision ``resnet18(num_classes=5)`` (no ImageNet weights: this machine is offline),
pre-trained 8 epochs on 100 images of each of CIFAR-10 classes 5–9, then a new head. D: the
first ``--per-class`` training images of each of classes 0–4; D_f: the first quarter of class 0's.
w(D) and one retrain on D_r: the README's recipe (SGD lr 0.01, momentum 0.9, 25 epochs, batch
128, cross-entropy + (wd/2)‖w − θ0‖², wd = 0.1, BatchNorm frozen). Then, for each parameter
selection (all, ``layer4`` + head, the last block + head, the head), ``scrub(model, retain,
forget, init=θ0, linearize_at="trained", loss="ce", rescale="trapezium", weight_decay=wd)`` with
the default ``solver`` (``"auto"``) and, where auto takes the dense twin, with ``solver="cg"``
too; the last-block selection and the head once more with ``ProductConfig(prefix_cache=False)``
(every product through the whole network, as before the frozen prefix was cached); and the CE
Newton method where it is affordable. Records seconds, the ratio to the
retrain, products, D_r/D_f/test error and the softmax-L1 to the retrain on D_f.

``--parts scrubber`` (in the default ``scrub,scrubber``): deletion requests as a service would
send them — ``Scrubber(model, DataLoader(D), init=θ0, linearize_at="trained", loss="ce",
weight_decay=wd, params=...)`` with the default ``solver``, then ``forget(D_f's positions)`` and
``forget(as many positions drawn from D_r)``; each request's seconds, products and ratio to the
retrain, and its shift against a fresh ``scrub`` of everything forgotten so far (same settings).

Run: ``PYTHONPATH=$PWD .venv/bin/python experiments/practitioner_resnet18.py --out FILE.json``
(≈ 6 min on 2 CPU cores; the Scrubber part ≈ 2 min more).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from torchvision.models import resnet18

from ntkscrub import Scrubber, readouts, scrub
from ntkscrub.config import ProductConfig
from ntkscrub.io import atomic_write_json
from ntkscrub.recipes import data_root

WD = 0.1
SELECTIONS = {
    "all": None,
    "layer4+fc": r"^(layer4|fc)\.",
    "layer4.1+fc": r"^(layer4\.1|fc)\.",
    "fc": r"^fc\.",
}


class Relabelled(Dataset):
    """``ds[idx[i]]`` with its label mapped through ``labels``."""

    def __init__(self, ds: Dataset, idx: list[int], labels: dict[int, int]) -> None:
        self.ds, self.idx, self.labels = ds, idx, labels

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int):
        x, y = self.ds[self.idx[i]]
        return x, self.labels[y]


def first_per_class(ds: datasets.ImageFolder, classes: list[int], per: int) -> list[int]:
    idx, count = [], dict.fromkeys(classes, 0)
    for i, (_, y) in enumerate(ds.samples):
        if y in count and count[y] < per:
            count[y] += 1
            idx.append(i)
    return idx


def finetune(theta0: nn.Module, data: Dataset, seed: int) -> nn.Module:
    """The README's recipe: 25 epochs, CE + (wd/2)‖w − θ0‖², BatchNorm frozen (eval mode)."""
    torch.manual_seed(seed)
    model = resnet18(num_classes=5).eval()
    model.load_state_dict(theta0.state_dict())
    anchor = [p.detach().clone() for p in theta0.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(25):
        for x, y in DataLoader(data, batch_size=128, shuffle=True):
            penalty = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            loss = nn.functional.cross_entropy(model(x), y) + WD / 2 * penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def scrubber_rows(
    model: nn.Module, theta0: nn.Module, D: Dataset, forget_idx: list[int], t_rt: float
) -> list[dict]:
    """Two deletion requests per selection against fresh scrubs of the same union (see the
    module docstring); ``t_rt`` is the retrain's seconds."""
    kw = {"init": theta0, "linearize_at": "trained", "loss": "ce", "weight_decay": WD, "seed": 0}
    drop = set(forget_idx)
    g = torch.Generator().manual_seed(0)
    pool = [i for i in range(len(D)) if i not in drop]
    second = sorted(pool[int(j)] for j in torch.randperm(len(pool), generator=g)[: len(drop)])
    rows = []
    for name in ("layer4.1+fc", "fc"):
        t0 = time.perf_counter()
        s = Scrubber(model, DataLoader(D, batch_size=64), params=SELECTIONS[name], **kw)
        prep = {"seconds": time.perf_counter() - t0, "products": s.prepare_info["matvecs"]}
        row = {"params": name, "solver": s.cfg.method,
               "auto_solver": s.prepare_info["auto_solver"], "requests": [],
               "prepare": {**prep, "x_retrain": prep["seconds"] / t_rt}}  # fmt: skip
        print(json.dumps({k: row[k] for k in ("params", "solver", "prepare")}), flush=True)
        gone: list[int] = []
        for request in (forget_idx, second):
            t0 = time.perf_counter()
            res = s.forget(request)
            sec = time.perf_counter() - t0
            gone += request
            keep = [i for i in range(len(D)) if i not in set(gone)]
            fresh = scrub(model, Subset(D, keep), Subset(D, sorted(gone)), params=SELECTIONS[name],
                          solver=s.cfg.method, **kw)  # fmt: skip
            diff = float((res.shift - fresh.shift).norm() / fresh.shift.norm())
            rec = {"forgotten": len(gone), "seconds": sec, "x_retrain": sec / t_rt,
                   "products": res.info["request"]["matvecs"], "converged": res.info["converged"],
                   "fresh_scrub_seconds": fresh.info["seconds"],
                   "fresh_scrub_products": fresh.info["matvecs"],
                   "rel_diff_to_fresh": diff}  # fmt: skip
            row["requests"].append(rec)
            print(json.dumps(rec), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--parts", default="scrub,scrubber", help="comma-separated: scrub, scrubber")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.25,) * 3)])
    root = data_root(None)
    train = datasets.ImageFolder(f"{root}/train", transform=tf)
    test = datasets.ImageFolder(f"{root}/test", transform=tf)
    shifted = {5 + k: k for k in range(5)}
    pre = Relabelled(train, first_per_class(train, [5, 6, 7, 8, 9], 100), shifted)
    ident = {k: k for k in range(5)}
    D = Relabelled(train, first_per_class(train, list(range(5)), args.per_class), ident)
    T = Relabelled(test, first_per_class(test, list(range(5)), 40), ident)
    labels = [D.ds.samples[i][1] for i in D.idx]
    forget_idx = [i for i, y in enumerate(labels) if y == 0][: max(2, args.per_class // 4)]
    drop = set(forget_idx)
    retain = Subset(D, [i for i in range(len(D)) if i not in drop])
    forget = Subset(D, forget_idx)

    net = resnet18(num_classes=5)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(8):
        net.train()
        for x, y in DataLoader(pre, batch_size=64, shuffle=True):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.fc = nn.Linear(512, 5)
    theta0 = net.eval()

    def errors(m: nn.Module) -> dict[str, float]:
        sets = (("D_r", retain), ("D_f", forget), ("test", T))
        return {k: round(readouts.error(m, DataLoader(d, batch_size=256)), 4) for k, d in sets}

    t0 = time.perf_counter()
    model = finetune(theta0, D, 0)
    t_wd = time.perf_counter() - t0
    t0 = time.perf_counter()
    retrain = finetune(theta0, retain, 1)
    t_rt = time.perf_counter() - t0
    l1 = lambda m: round(float(readouts.softmax_l1(m, retrain, forget)), 4)  # noqa: E731
    out = {
        "command": "experiments/practitioner_resnet18.py "
                   + f"--per-class {args.per_class} --parts {args.parts}",
        "hardware": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                     "python": platform.python_version(), "machine": platform.machine()},
        "sizes": {"D": len(D), "D_r": len(retain), "D_f": len(forget), "test": len(T)},
        "w_D": {"seconds": t_wd, **errors(model), "l1_to_retrain_D_f": l1(model)},
        "retrain": {"seconds": t_rt, **errors(retrain)},
        "scrubs": [],
    }  # fmt: skip
    print(json.dumps({k: out[k] for k in ("sizes", "w_D", "retrain")}), flush=True)
    parts = args.parts.split(",")
    if "scrubber" in parts:
        out["scrubber"] = scrubber_rows(model, theta0, D, forget_idx, t_rt)
    runs = [(name, "one_shot", None, True) for name in SELECTIONS] if "scrub" in parts else []
    if runs:
        runs += [("layer4.1+fc", "one_shot", None, False), ("fc", "one_shot", "cg", True)]
        runs += [("fc", "one_shot", "cg", False), ("fc", "ce_newton", None, True)]
        runs += [("layer4.1+fc", "ce_newton", None, True)]
    for name, method, solver, cache in runs:
        kw = {"rescale": "trapezium"} if method == "one_shot" else {"method": method}
        t0 = time.perf_counter()
        res = scrub(
            model, retain, forget, init=theta0, linearize_at="trained", loss="ce",
            weight_decay=WD, params=SELECTIONS[name], solver=solver, seed=0,
            products=ProductConfig(prefix_cache=cache), **kw,
        )  # fmt: skip
        sec = time.perf_counter() - t0
        rec = {
            "params": name, "p": res.info["p"], "method": method,
            "solver_requested": res.info["solver_requested"], "solver": res.info["solver"],
            "seconds": sec, "x_retrain": sec / t_rt, "products": res.info["matvecs"],
            "converged": res.info["converged"], **errors(res.model),
            "l1_to_retrain_D_f": l1(res.model), "auto_solver": res.info.get("auto_solver"),
            "prefix_cache": res.info["prefix_cache"],
        }  # fmt: skip
        out["scrubs"].append(rec)
        brief = {k: v for k, v in rec.items() if k not in ("auto_solver", "prefix_cache")}
        print(json.dumps({**brief, "prefix_cached": rec["prefix_cache"]["cached"]}), flush=True)
    atomic_write_json(args.out, out)


if __name__ == "__main__":
    main()
