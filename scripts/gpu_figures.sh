#!/usr/bin/env bash
# The GPU figures of the README and docs/ other than bench.py's speed table (scripts/gpu_check.sh),
# about 4 minutes on one H200: the CUDA tests, the demo on the real data set (REAL_DATA_DIR, e.g.
# data/DepthEstimationUnreal from get_data.py) and a profile of 50 training steps at the paper's
# batch of 32. WORK_DIR receives the runs and the results; OUT_DIR a copy of the results as
# results.tgz, refreshed after each phase, so that a run cut short still leaves what it finished.
#
#   bash scripts/gpu_figures.sh WORK_DIR OUT_DIR REAL_DATA_DIR
set -u
if [ $# -ne 3 ]; then
    echo "usage: bash scripts/gpu_figures.sh WORK_DIR OUT_DIR REAL_DATA_DIR" >&2
    exit 2
fi
WORK=$1
OUT=$2
REAL=$3
R="$WORK/results"
PY=${PYTHON:-python}
mkdir -p "$WORK" "$R" "$OUT"
snap() { tar czf "$OUT/results.tgz.part" -C "$R" . && mv "$OUT/results.tgz.part" "$OUT/results.tgz"; }
export PYTHONUNBUFFERED=1
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$R/timeline.txt"; }

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

t "demo, real data"
timeout "${DEMO_TIMEOUT_S:-240}" "$PY" main.py --demo --data-dir "$REAL" --workers 8 --no-skips --no-augment --paste 0 --silog-weight 0 --lr 1e-3 --max-lr 5e-3 --run-dir "$WORK/demo_real" \
    --quiet > "$R/demo_real.log" 2>&1
t "demo exit $?"
cp "$WORK"/demo_real/demo_results.json "$R/demo_real_results.json" 2>/dev/null
cp "$WORK"/demo_real/metrics.jsonl "$R/demo_real_metrics.jsonl" 2>/dev/null
last_vis=$(find "$WORK/demo_real/vis" -name '*.png' 2>/dev/null | sort | tail -n 1)
[ -n "$last_vis" ] && cp "$last_vis" "$R/demo_vis.png"
snap

t "profile"
timeout "${PROFILE_TIMEOUT_S:-90}" "$PY" bench.py --device cuda --profile 50 --batch-size 32 --warmup 30 \
    --data-dir "$REAL" --out "$R/profile_b32.json" > "$R/profile.log" 2>&1
t "profile exit $?"
snap
t "done"
