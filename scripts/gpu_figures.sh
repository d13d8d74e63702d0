#!/usr/bin/env bash
# Everything behind the GPU figures of the README and docs/, about 10 minutes on one H200:
# the GPU checks (scripts/gpu_check.sh), the demo on a synthetic data set of the real one's
# size, then the ablation at the paper's 224 × 224. WORK_DIR receives the data set and the
# runs; OUT_DIR the logs and results, refreshed after each phase (results.tgz), so that a run
# cut short still leaves what it finished.
#
#   bash scripts/gpu_figures.sh WORK_DIR OUT_DIR
set -u
if [ $# -ne 2 ]; then
    echo "usage: bash scripts/gpu_figures.sh WORK_DIR OUT_DIR" >&2
    exit 2
fi
WORK=$1
OUT=$2
R="$OUT/results"
mkdir -p "$WORK" "$R"
snap() { tar czf "$OUT/results.tgz" -C "$R" . ; }
export PYTHONUNBUFFERED=1
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$R/timeline.txt"; }

t "gpu_check"
BUDGET_S=${CHECK_BUDGET_S:-260} bash scripts/gpu_check.sh "$R/check" > "$R/gpu_check.log" 2>&1
snap

t "demo"
timeout "${DEMO_TIMEOUT_S:-200}" python main.py --demo --data-dir "$WORK/synthetic_full" --demo-train 3469 \
    --demo-val 600 --demo-test 600 --run-dir "$WORK/demo_gpu" --quiet > "$R/demo.log" 2>&1
t "demo exit $?"
mkdir -p "$R/demo"
cp "$WORK"/demo_gpu/demo_results.* "$WORK/demo_gpu/curves.png" "$WORK/demo_gpu/metrics.jsonl" "$R/demo/" 2>/dev/null
last_vis=$(find "$WORK/demo_gpu/vis" -name '*.png' 2>/dev/null | sort | tail -1)
[ -n "$last_vis" ] && cp "$last_vis" "$R/demo/last_vis.png"
snap

t "ablation"
timeout "${ABLATE_TIMEOUT_S:-200}" python ablate.py --data-dir "$WORK/synthetic_full" --steps 300 \
    --batch-size 32 --image-size 224 --device cuda --out "$WORK/ablation_gpu" --quiet > "$R/ablate.log" 2>&1
t "ablation exit $?"
mkdir -p "$R/ablation"
cp "$WORK"/ablation_gpu/ablation.* "$R/ablation/" 2>/dev/null
snap
t "done"
