#!/usr/bin/env bash
# The whole GPU session behind the README's GPU figures, sized for one ~9-minute lease:
# CUDA tests and bench.py (scripts/gpu_check.sh), the demo on a data set of the real one's
# size, then the ablation at the paper's 224 × 224. Logs and JSON go to $OUT/results.tgz,
# refreshed after each phase so a cut-off run still returns what it finished.
set -u
OUT=${OUT:-gpu_out}
W=/tmp/gpu_session
mkdir -p "$OUT" "$W"
snap() { tar czf "$OUT/results.tgz" -C "$W" . ; }
export PYTHONUNBUFFERED=1
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$W/timeline.txt"; }

t "gpu_check"
OUT="$W/check" BUDGET_S=${CHECK_BUDGET_S:-260} bash scripts/gpu_check.sh > "$W/gpu_check.log" 2>&1
snap

t "demo"
timeout ${DEMO_TIMEOUT_S:-200} python main.py --demo --data-dir /tmp/synthetic_full --demo-train 3469 --demo-val 600 \
    --demo-test 600 --run-dir /tmp/demo_gpu --quiet > "$W/demo.log" 2>&1
t "demo exit $?"
mkdir -p "$W/demo"
cp /tmp/demo_gpu/demo_results.* /tmp/demo_gpu/curves.png /tmp/demo_gpu/metrics.jsonl "$W/demo/" 2>/dev/null
cp "$(ls /tmp/demo_gpu/vis/*.png 2>/dev/null | tail -1)" "$W/demo/last_vis.png" 2>/dev/null
snap

t "ablation"
timeout ${ABLATE_TIMEOUT_S:-200} python ablate.py --data-dir /tmp/synthetic_full --steps ${ABLATE_STEPS:-600} \
    --batch-size 32 --image-size 224 --device cuda --out /tmp/ablation_gpu --quiet > "$W/ablate.log" 2>&1
t "ablation exit $?"
mkdir -p "$W/ablation"
cp /tmp/ablation_gpu/ablation.* "$W/ablation/" 2>/dev/null
snap
t "done"
