#!/usr/bin/env bash
# Everything behind the GPU figures of the README and docs/ except bench.py's speed table
# (scripts/gpu_check.sh), about 9 minutes on one H200: the CUDA tests, the demo on a synthetic
# data set of the real one's size, the demo on the real data set (when REAL_DATA_DIR is given,
# e.g. data/DepthEstimationUnreal from get_data.py), the ablation at the paper's 224 × 224 and a
# profile of 50 training steps at the paper's batch of 32. WORK_DIR receives the data sets, the
# runs and the results; OUT_DIR a copy of the results as results.tgz, refreshed after each phase,
# so that a run cut short still leaves what it finished.
#
#   bash scripts/gpu_figures.sh WORK_DIR OUT_DIR [REAL_DATA_DIR]
set -u
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: bash scripts/gpu_figures.sh WORK_DIR OUT_DIR [REAL_DATA_DIR]" >&2
    exit 2
fi
WORK=$1
OUT=$2
REAL=${3:-}
R="$WORK/results"
PY=${PYTHON:-python}
mkdir -p "$WORK" "$R" "$OUT"
snap() { tar czf "$OUT/results.tgz.part" -C "$R" . && mv "$OUT/results.tgz.part" "$OUT/results.tgz"; }
export PYTHONUNBUFFERED=1
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$R/timeline.txt"; }
copy_run() {  # copy_run RUN_DIR DEST: the run's results, curves and its last prediction picture
    mkdir -p "$2"
    cp "$1"/demo_results.* "$1/curves.png" "$1/metrics.jsonl" "$1/config.json" "$2/" 2>/dev/null
    local last_vis
    last_vis=$(find "$1/vis" -name '*.png' 2>/dev/null | sort | tail -1)
    [ -n "$last_vis" ] && cp "$last_vis" "$2/last_vis.png"
}

t "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nproc; } > "$R/machine.txt" 2>&1
cat "$R/machine.txt"

t "cuda tests"
timeout "${TESTS_TIMEOUT_S:-90}" "$PY" -m pytest -q -rs -k cuda tests/test_train.py tests/test_dataset.py \
    -p no:cacheprovider > "$R/pytest_cuda.log" 2>&1
t "cuda tests exit $?: $(tail -n 1 "$R/pytest_cuda.log")"
snap

t "demo, synthetic"
timeout "${DEMO_TIMEOUT_S:-200}" "$PY" main.py --demo --data-dir "$WORK/synthetic_full" --demo-train 3469 \
    --demo-val 600 --demo-test 600 --run-dir "$WORK/demo_gpu" --quiet > "$R/demo.log" 2>&1
t "demo exit $?"
copy_run "$WORK/demo_gpu" "$R/demo"
snap

if [ -n "$REAL" ]; then
    t "demo, real data"
    timeout "${REAL_TIMEOUT_S:-150}" "$PY" main.py --demo --data-dir "$REAL" --run-dir "$WORK/demo_real" --quiet \
        > "$R/demo_real.log" 2>&1
    t "demo real exit $?"
    copy_run "$WORK/demo_real" "$R/demo_real"
    snap
fi

t "ablation"
timeout "${ABLATE_TIMEOUT_S:-200}" "$PY" ablate.py --data-dir "$WORK/synthetic_full" --steps 300 \
    --batch-size 32 --image-size 224 --device cuda --out "$WORK/ablation_gpu" --quiet > "$R/ablate.log" 2>&1
t "ablation exit $?"
mkdir -p "$R/ablation"
cp "$WORK"/ablation_gpu/ablation.* "$R/ablation/" 2>/dev/null
snap

t "profile"
timeout "${PROFILE_TIMEOUT_S:-60}" "$PY" bench.py --device cuda --profile 50 --batch-size 32 --warmup 30 \
    --data-dir "$WORK/synthetic_full" --out "$R/profile_b32.json" > "$R/profile.log" 2>&1
t "profile exit $?"
snap
t "done"
