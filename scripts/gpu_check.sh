#!/usr/bin/env bash
# The GPU checks, about 7 minutes on one H100/H200: the CUDA tests, then bench.py (ours against
# the plain baseline) at the paper's batch of 32 and at 256, the SSIM variants, and --compile
# while time is left. Logs and JSON go to OUT_DIR.
#
#   bash scripts/gpu_check.sh OUT_DIR
set -u
if [ $# -ne 1 ]; then
    echo "usage: bash scripts/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
OUT=$1
PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-420}
mkdir -p "$OUT"
source "$(dirname "$0")/run_logged.sh"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nproc; } >"$OUT/machine.txt" 2>&1
tee -a "$OUT/summary.txt" <"$OUT/machine.txt"

run pytest_cuda 120 "$PY" -m pytest -q -rs -k cuda tests -p no:cacheprovider
run ssim_variants 60 "$PY" bench.py --device cuda --ssim-variants --batch-size 32 --rounds 5 --out "$OUT/ssim_cuda.json"
run bench_b32 150 "$PY" bench.py --device cuda --batch-size 32 --warmup 30 --steps 150 --baseline-steps 40 \
    --images 2048 --out "$OUT/bench_cuda_b32.json"
run bench_b256 150 "$PY" bench.py --device cuda --batch-size 256 --warmup 10 --steps 40 --baseline-steps 10 \
    --images 2048 --out "$OUT/bench_cuda_b256.json"
if [ "$(elapsed)" -lt $(( BUDGET_S - 200 )) ]; then
    run bench_b32_compile 200 "$PY" bench.py --device cuda --batch-size 32 --warmup 40 --steps 150 --baseline-steps 10 \
        --images 2048 --compile --inference-reps 20 --out "$OUT/bench_cuda_b32_compile.json"
else
    echo "== bench_b32_compile skipped: $(elapsed) s elapsed of $BUDGET_S" | tee -a "$OUT/summary.txt"
fi
echo "done in $(elapsed) s" | tee -a "$OUT/summary.txt"
