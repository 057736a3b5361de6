"""Probe: CE at w(D) + Fisher noise / longer step, quick preset, seed from argv (retrains cached)."""
import dataclasses, json, sys, time
import numpy as np, torch
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/benchmarks")
import quick_cost
from ntkscrub import readouts
from ntkscrub.recipes.reproduction import stages, methods as M
from ntkscrub.recipes.reproduction.data import data_sets
from ntkscrub.recipes.reproduction.weights import add_noise, flat_params, load_flat

torch.set_num_threads(2)
seed = int(sys.argv[1])
run = quick_cost.seed_run(seed, "/work/shared/data/cifar10-jpeg")
cfg = run.ctx.cfg
run.ctx.cfg = dataclasses.replace(cfg, forget=dataclasses.replace(cfg.forget, dense_forms=("ntk_ce_trained",)))
stages.stage_train_retrains(run)
run.res.setdefault("ntk", {})
sets = data_sets(run.split)
def row(m):
    at = readouts.membership_attack(m, sets["retain"], sets["test"], sets["forget"], progress=False)
    l1 = [readouts.softmax_l1(m, r, sets["forget"]) for r in run.retrains]
    return {"val": readouts.error(m, sets["val"]), "forget": readouts.error(m, sets["forget"]),
            "retain": readouts.error(m, sets["retain"]), "test": readouts.error(m, sets["test"]),
            "attack": at.forget_member_fraction, "H": at.entropy_mean, "l1": float(np.mean(l1))}
out = {"seed": seed, "retrains": [row(r) for r in run.retrains]}
t = time.time()
base = run.model("ntk_ce_trained")
print("scrub+val step", time.time() - t, run.method_notes.get("ntk_ce_trained_tuning", {}).get("a"), flush=True)
out["ce"] = row(base)
delta = run.scrubbed("ntk_ce_trained").delta.float().cpu()
out["steps"] = {a: row(load_flat(run.w_d, flat_params(run.w_d) + a * delta)) for a in (1.25, 1.5, 2.0)}
t = time.time()
var = __import__("ntkscrub.recipes.reproduction.weights", fromlist=["x"]).fisher_variance(base, run.split.retain, run.split.num_classes)
print("variance", time.time() - t, flush=True)
out["noise"] = {}
for alpha in np.logspace(-11, -5, 13):
    out["noise"][float(alpha)] = [row(add_noise(base, var, float(alpha), 61_000 + seed + 7 * d)) for d in range(2)]
    print(alpha, out["noise"][float(alpha)][0], flush=True)
json.dump(out, open(f"/tmp/ws/noise_probe_seed{seed}.json", "w"), indent=1)
