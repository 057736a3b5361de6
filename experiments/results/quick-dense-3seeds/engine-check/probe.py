import sys, time, importlib, torch
sys.path.insert(0, "/work/main/benchmarks")
from quick_cost import seed_run
torch.set_num_threads(int(__import__("os").environ.get("NT", "2")))
import logging; logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s"); [logging.getLogger(n).setLevel(logging.WARNING) for n in ("ntkscrub.operators", "ntkscrub.solvers")]
seed, solver = int(sys.argv[1]), sys.argv[2]
forms = sys.argv[3].split(",") if len(sys.argv) > 3 else ["ntk_ce_trained"]
run = seed_run(seed, "/work/shared/data/cifar10-jpeg")
methods = importlib.import_module("ntkscrub.recipes.reproduction.methods")
for form in forms:
    t0 = time.perf_counter()
    try:
        res = methods.scrub_call(run, form, solver)
        nt = res.info["method_info"]["newton"]
        print(form, solver, f"{time.perf_counter()-t0:.1f}s matvecs", res.info["matvecs"],
              {k: (v["iterations"], v["converged"]) for k, v in nt.items() if isinstance(v, dict) and "iterations" in v}, flush=True)
        print({k: v.get("start") for k, v in nt.items() if isinstance(v, dict)})
        torch.save(res.delta, f"/tmp/cw/delta_{form}_{seed}_{solver}.pt")
        for k, v in nt.items():
            if isinstance(v, dict) and "history" in v:
                for h in v["history"]:
                    print("  ", k, {a: (round(b, 6) if isinstance(b, float) else b) for a, b in h.items()})
    except Exception as e:
        print(form, solver, "FAIL", f"{time.perf_counter()-t0:.1f}s", e, flush=True)
