"""Prototype validation-only step rules along w(D) + a·Δ (dense twin) vs the retrain band."""
import sys, importlib, json, torch, numpy as np
sys.path.insert(0, "/work/main/benchmarks")
from quick_cost import seed_run
torch.set_num_threads(2)
S = importlib.import_module("ntkscrub.recipes.reproduction.stages")
M = importlib.import_module("ntkscrub.recipes.reproduction.measure")
methods = importlib.import_module("ntkscrub.recipes.reproduction.methods")
from ntkscrub.recipes.reproduction.data import data_sets
from ntkscrub.recipes.reproduction.weights import flat_params, load_flat
from ntkscrub import readouts
from ntkscrub.operators import Jacobian
from ntkscrub.params import ParameterSpace
seed = int(sys.argv[1]); forms = sys.argv[2].split(",")
run = seed_run(seed, "/work/shared/data/cifar10-jpeg")
S.stage_train_retrains(run)
rp = [M.probs_of(m, run.split) for m in run.retrains]
sets = data_sets(run.split)
Xv, Yv = sets["val"]; Xf, Yf = sets["forget"]
band_err = [float((p["forget"].argmax(1) != Yf.cpu()).double().mean()) for p in rp]
print("band D_f err", np.mean(band_err), np.std(band_err), "val n", len(Yv))
grid = [round(0.25 * i, 2) for i in range(17)]
out = {}
for form in forms:
    res = methods.scrub_call(run, form, "dense")
    d = res.delta.float().cpu()
    at = run.init if methods.NTK_FORMS[form]["linearize_at"] == "init" else run.w_d
    J = Jacobian(ParameterSpace(at), (Xv, Yv), name="val")
    pred_change = (J @ d.to(J.dtype)).reshape(J.n, J.c).double().cpu()  # J_val Δ
    v0 = flat_params(run.w_d)
    with torch.no_grad():
        f0 = run.w_d.eval()(Xv).double()
    tgt = torch.softmax(f0 + pred_change, 1)
    rows = []
    for a in grid:
        m = load_flat(run.w_d, v0 + a * d).eval()
        with torch.no_grad():
            fa = m(Xv).double(); ff = m(Xf).double()
        pf = torch.softmax(ff, 1)
        rows.append({
            "a": a,
            "Df_err": float((pf.argmax(1) != Yf).double().mean()),
            "Df_L1": float(np.mean([M.l1(pf, p["forget"]) for p in rp])),
            "val_err": float((fa.argmax(1) != Yv).double().mean()),
            "val_nll": float(torch.nn.functional.cross_entropy(fa, Yv)),
            "R1_logit": float(((fa - f0) - pred_change).pow(2).sum(1).mean()),
            "R2_softL1": float((torch.softmax(fa, 1) - tgt).abs().sum(1).mean()),
        })
    out[form] = rows
    print(form)
    for r in rows:
        print("  " + " ".join(f"{k}={v:.3f}" for k, v in r.items()))
    for k in ("R1_logit", "R2_softL1", "val_nll", "Df_L1"):
        print("   argmin", k, min(rows, key=lambda r: r[k])["a"])
json.dump(out, open(f"/tmp/cw/valrule_{seed}.json", "w"))
