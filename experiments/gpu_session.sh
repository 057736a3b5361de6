#!/usr/bin/env bash
# One budgeted GPU session: the `paper` reproduction preset, then the scaling suite's fp32 CG
# stage and its 50,000-image time-capped scrub. Everything lands in OUT_DIR as five files (the
# device tool returns at most eight): hardware.txt, paper.log, suite.log, paper.tgz, suite.tgz.
#
#   .venv/bin/python experiments/make_gpu_data.py     # here, once: experiments/cache/gpu-data
#   bash experiments/gpu_session.sh OUT_DIR [PAPER_BUDGET_S] [SUITE_BUDGET_S]   # on the GPU
#
# Each part runs under `timeout` (its budget + a margin for the final report), so the session
# ends in about PAPER_BUDGET_S + SUITE_BUDGET_S + 90 seconds whatever happens inside.
# SUITE_BUDGET_S = 0 runs the reproduction alone. SUITE_STAGES (default "cg scrub_large") and
# SUITE_ARGS (e.g. "--share variants=0") pick what the suite runs.
set -u
OUT_DIR=${1:?usage: gpu_session.sh OUT_DIR [PAPER_BUDGET_S] [SUITE_BUDGET_S]}
PAPER_BUDGET=${2:-400}
SUITE_BUDGET=${3:-240}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d)

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)'
  nproc
} >"$OUT_DIR/hardware.txt" 2>&1

timeout $((PAPER_BUDGET + 60)) "$PY" experiments/reproduce.py --preset paper --device cuda \
  --data-root experiments/cache/gpu-data --budget-seconds "$PAPER_BUDGET" \
  --out "$WORK/paper" --cache-dir "$WORK/paper-cache" --no-progress >"$OUT_DIR/paper.log" 2>&1
echo "reproduce.py exit $?" >>"$OUT_DIR/paper.log"

tar czf "$OUT_DIR/paper.tgz" -C "$WORK" paper
if [ "$SUITE_BUDGET" -gt 0 ]; then  # 0: the reproduction alone
  timeout $((SUITE_BUDGET + 30)) "$PY" benchmarks/gpu_suite.py --out "$WORK/suite" \
    --budget-seconds "$SUITE_BUDGET" --stages ${SUITE_STAGES:-cg scrub_large} ${SUITE_ARGS:-} \
    >"$OUT_DIR/suite.log" 2>&1
  echo "gpu_suite.py exit $?" >>"$OUT_DIR/suite.log"
  tar czf "$OUT_DIR/suite.tgz" -C "$WORK" suite
fi
ls -la "$OUT_DIR"
