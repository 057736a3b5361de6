"""CPU check: Fine-tune baseline recipes from a fitted full-width All-CNN w(D) (paper recipe).

CACHE is the cache of a CPU `paper`-preset run (pre-training, θ0's head) and `wd150.pt` a w(D)
fine-tuned from it with the preset's recipe (150 cosine epochs, lr 0.005; it ended at 8.6 %
training error). Arguments are LR:SCHEDULE pairs; output in cpu_finetune_check.log.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, "experiments")
import reproduce as R  # noqa: E402
from ntkscrub.recipes.training import train  # noqa: E402

from ntkscrub.recipes.models import build_model  # noqa: E402

CACHE = Path("/tmp/w1")
torch.set_num_threads(2)
cfg = R.PRESETS["paper"]
split = R.load_small(cfg, 0, Path("experiments/cache/gpu-data"), CACHE / "cache")
init = build_model("allcnn", num_classes=5, width=1.0)
head = torch.load(CACHE / "cache/seed0-0c08d80a57/theta0_head.pt", weights_only=True)
init.load_state_dict(head["state_dict"])
init.eval()
wd = build_model("allcnn", num_classes=5, width=1.0)
wd.load_state_dict(torch.load(CACHE / "wd150.pt", weights_only=True))
wd.eval()
for lr, sched in [(float(a), b) for a, b in (x.split(":") for x in sys.argv[1:])]:
    for seed in (1500, 3500):  # (1500, 2500, 3500) for the 0.005 cosine runs
        t = time.time()
        m, lg = train(
            wd, split.retain, epochs=10, lr=lr, momentum=0.9, weight_decay=0.1, anchor=init,
            batch_size=128, schedule=sched, freeze_bn=True, seed=seed,
        )  # fmt: skip
        errs = [round(e, 3) for e in lg.train_error]
        losses = [round(x, 3) for x in lg.train_loss]
        print(f"lr {lr} {sched} seed {seed}: errs {errs} losses {losses} {time.time() - t:.0f}s")
