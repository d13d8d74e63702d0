#!/usr/bin/env bash
# The CUDA-graph checks and figures, about 8 minutes on one H100/H200: the CUDA tests (graphed and eager
# training agree, resume), then bench.py at the paper's batch of 32 and at 256, eager, --compile and
# --cuda-graphs, a profile of graphed and eager steps at batch 32, and the real-set demo with
# --cuda-graphs when REAL_DATA_DIR is given. Logs and JSON go to OUT_DIR; a run cut short keeps what
# it finished.
#
#   bash scripts/gpu_graphs.sh OUT_DIR [REAL_DATA_DIR]
set -u
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: bash scripts/gpu_graphs.sh OUT_DIR [REAL_DATA_DIR]" >&2
    exit 2
fi
OUT=$1
REAL=${2:-}
PY=${PYTHON:-python}
mkdir -p "$OUT"
source "$(dirname "$0")/run_logged.sh"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse --short HEAD; nproc; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

run tests 150 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_graphstep.py tests/test_train.py -k "cuda or graph"
for batch in 32 256; do
    run "bench_b${batch}_eager" 90 "$PY" bench.py --device cuda --batch-size "$batch" --out "$OUT/bench_b${batch}_eager.json"
    run "bench_b${batch}_graphs" 90 "$PY" bench.py --device cuda --batch-size "$batch" --cuda-graphs \
        --out "$OUT/bench_b${batch}_graphs.json"
done
run bench_b32_compile 150 "$PY" bench.py --device cuda --batch-size 32 --compile --out "$OUT/bench_b32_compile.json"
run profile_b32_eager 60 "$PY" bench.py --device cuda --profile 50 --batch-size 32 --warmup 30 \
    --out "$OUT/profile_b32_eager.json"
run profile_b32_graphs 60 "$PY" bench.py --device cuda --profile 50 --batch-size 32 --warmup 30 --cuda-graphs \
    --out "$OUT/profile_b32_graphs.json"
if [ -n "$REAL" ]; then
    run demo_real_graphs 240 "$PY" main.py --demo --data-dir "$REAL" --workers 8 --no-skips --no-augment --paste 0 --silog-weight 0 --lr 1e-3 --max-lr 5e-3 --cuda-graphs \
        --run-dir "$OUT/demo_real_graphs" --quiet
fi
echo "done after $(elapsed) s" | tee -a "$OUT/summary.txt"
