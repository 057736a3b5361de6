#!/usr/bin/env bash
# One budgeted GPU session: the `paper` reproduction preset — its seeds in parallel processes on
# the one GPU, sharing one pre-training, merged into one result — then the scaling suite and the
# mixed-precision solves. Everything lands in OUT_DIR as at most eight files (what the device
# tool returns): hardware.txt, paper.log, paper.tgz, suite.log, suite.tgz, mixed.log, mixed.json.
#
#   .venv/bin/python experiments/make_gpu_data.py     # here, once: experiments/cache/gpu-data
#   bash experiments/gpu_session.sh OUT_DIR [PAPER_BUDGET_S] [SUITE_BUDGET_S] [MIXED_BUDGET_S]
#
# Each part runs under `timeout` (its budget + a margin), so the session ends in about
# PAPER_BUDGET_S + SUITE_BUDGET_S + MIXED_BUDGET_S + 150 seconds whatever happens inside; a
# budget of 0 skips its part.
#
# Environment:
#   SEED_GROUPS  seed groups, one process each (default "0,1,2,3,4": one process). The first
#                group pre-trains; the others start once its checkpoint is in the shared cache
#                (the pre-training is keyed without the seeds, so every group reads the same θ0).
#                Why processes: at N = 500 one seed's kernels leave most of an H200 idle (the
#                paper preset's 4 seeds took 388 s one after the other on an H100).
#   PAPER_SETS   extra `--set NAME=VALUE` pairs for every reproduction process, space-separated
#   SUITE_STAGES, SUITE_ARGS   what gpu_suite.py runs (default "cg partial_large requests scrub_large")
#   PRESET, DEVICE, DATA_ROOT  (default paper, cuda, experiments/cache/gpu-data): a CPU check
#                runs the same script with PRESET=smoke DEVICE=cpu.
set -u
OUT_DIR=${1:?usage: gpu_session.sh OUT_DIR [PAPER_BUDGET_S] [SUITE_BUDGET_S] [MIXED_BUDGET_S]}
PAPER_BUDGET=${2:-400}
SUITE_BUDGET=${3:-0}
MIXED_BUDGET=${4:-0}
PY=${PYTHON:-python3}
PRESET=${PRESET:-paper}
DEVICE=${DEVICE:-cuda}
DATA_ROOT=${DATA_ROOT:-experiments/cache/gpu-data}
read -r -a GROUPS_ <<<"${SEED_GROUPS:-0,1,2,3,4}"
SETS=()
for s in ${PAPER_SETS:-}; do SETS+=(--set "$s"); done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# separate processes share the GPU: fewer fragments left reserved in each one's allocator
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d)
CACHE="$WORK/cache"
mkdir -p "$CACHE"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)'
  nproc
  echo "SEED_GROUPS=${GROUPS_[*]} PAPER_SETS=${PAPER_SETS:-} budgets ${PAPER_BUDGET}/${SUITE_BUDGET}/${MIXED_BUDGET}"
} >"$OUT_DIR/hardware.txt" 2>&1

reproduce() {  # reproduce NAME SEEDS BUDGET [extra args]: one process → $WORK/paper-NAME{,.log}
  local name=$1 seeds=$2 budget=$3
  shift 3
  timeout $((budget + 60)) "$PY" experiments/reproduce.py --preset "$PRESET" --device "$DEVICE" \
    --data-root "$DATA_ROOT" --budget-seconds "$budget" --seeds "$seeds" \
    --out "$WORK/paper-$name" --cache-dir "$CACHE" --no-progress "${SETS[@]}" "$@" \
    >"$WORK/paper-$name.log" 2>&1
  echo "reproduce.py ($name: seeds $seeds) exit $?" >>"$WORK/paper-$name.log"
}

if [ "$PAPER_BUDGET" -gt 0 ]; then
  T0=$SECONDS
  reproduce g0 "${GROUPS_[0]}" "$PAPER_BUDGET" --no-figures &
  if [ "${#GROUPS_[@]}" -gt 1 ]; then
    # the other groups wait for the shared pre-training (or for group 0 to end)
    while ! compgen -G "$CACHE/pretrain-*.pt" >/dev/null && jobs -r | grep -q .; do sleep 2; done
    for i in $(seq 1 $((${#GROUPS_[@]} - 1))); do
      reproduce "g$i" "${GROUPS_[$i]}" $((PAPER_BUDGET - (SECONDS - T0))) --no-figures &
      sleep 5  # stagger the data loading
    done
  fi
  wait
  # merge: every seed that finished is read back from the shared cache (keyed without the seeds)
  DONE=$(ls "$CACHE"/seed*/result-*.json 2>/dev/null | sed -E 's#.*/seed([0-9]+)-[^/]*/.*#\1#' |
    sort -n | uniq | paste -sd, -)
  [ -n "$DONE" ] && reproduce merge "$DONE" 180  # → paper-merge/, with the figures
  cat "$WORK"/paper-merge.log "$WORK"/paper-g*.log >"$OUT_DIR/paper.log" 2>/dev/null
  (cd "$WORK" && tar czf "$OUT_DIR/paper.tgz" --exclude='*.pt' paper* 2>/dev/null)
fi

if [ "$SUITE_BUDGET" -gt 0 ]; then
  timeout $((SUITE_BUDGET + 30)) "$PY" benchmarks/gpu_suite.py --out "$WORK/suite" \
    --device "$DEVICE" --budget-seconds "$SUITE_BUDGET" --stages ${SUITE_STAGES:-cg partial_large requests scrub_large} \
    ${SUITE_ARGS:-} >"$OUT_DIR/suite.log" 2>&1
  echo "gpu_suite.py exit $?" >>"$OUT_DIR/suite.log"
  tar czf "$OUT_DIR/suite.tgz" -C "$WORK" suite
fi

if [ "$MIXED_BUDGET" -gt 0 ]; then
  timeout "$MIXED_BUDGET" "$PY" benchmarks/mixed_precision.py --device "$DEVICE" \
    ${MIXED_ARGS:-} --out "$OUT_DIR/mixed.json" >"$OUT_DIR/mixed.log" 2>&1
  echo "mixed_precision.py exit $?" >>"$OUT_DIR/mixed.log"
fi
ls -la "$OUT_DIR"
