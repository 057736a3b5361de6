"""Which α would each validation rule pick for Fisher forgetting (quick preset, cached seed)?"""
import json, sys
import numpy as np, torch
sys.path.insert(0, "/work/main/benchmarks")
import quick_cost
from ntkscrub import readouts
from ntkscrub.recipes.reproduction import stages, methods as M
from ntkscrub.recipes.reproduction.data import data_sets
from ntkscrub.recipes.reproduction.weights import add_noise

torch.set_num_threads(2)
seed = int(sys.argv[1])
run = quick_cost.seed_run(seed, "/work/shared/data/cifar10-jpeg")
stages.stage_train_retrains(run)
sets = data_sets(run.split)
xv, yv = sets["val"]
def losses(m):
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(m(xv), yv, reduction="none").double()
var, nseed = run.variance("original"), M.fisher_noise_seed(run.seed)
base = losses(run.w_d)
out = {"seed": seed, "grid": list(run.cfg.measure.sweep_alphas), "retrain_val_error_max": max(readouts.error(m, sets["val"]) for m in run.retrains),
       "w_d_val_error": readouts.error(run.w_d, sets["val"]), "rows": []}
for a in out["grid"]:
    m = add_noise(run.w_d, var, a, nseed)
    d = losses(m) - base
    at = readouts.membership_attack(m, sets["retain"], sets["test"], sets["forget"], progress=False)
    r = {"alpha": a, "val_error": readouts.error(m, sets["val"]), "dloss_mean": float(d.mean()), "dloss_se": float(d.std() / len(d) ** 0.5),
         "val_loss": float(losses(m).mean()), "retain": readouts.error(m, sets["retain"]), "forget": readouts.error(m, sets["forget"]), "test": readouts.error(m, sets["test"]), "attack": at.forget_member_fraction}
    out["rows"].append(r); print(json.dumps(r), flush=True)
print("retrain max val err", out["retrain_val_error_max"], "w(D)", out["w_d_val_error"])
for m in run.retrains:
    print("retrain", readouts.error(m, sets["retain"]), readouts.error(m, sets["forget"]), readouts.error(m, sets["test"]))
json.dump(out, open(f"/tmp/ws/fisher_rule_seed{seed}.json", "w"), indent=1)
