#!/usr/bin/env bash
# One device call for the selective scan (docs/performance.md): mamba-ssm's CUDA scan JIT-built in the background
# while the GPU scan tests run, then mamba's widened test grid beside it, the benchmark (ours and mamba: every rule,
# three shapes) and a launch-shape sweep that stops before the call's time is up. JSON + one log into OUT_DIR.
#
#   [MAMBA_SDIST=.whl_src/mamba_ssm-2.3.2.post1.tar.gz] [BUDGET_S=570] [MAMBA=1] [BENCH=1] [GRID=1] [SWEEP=1] \
#   [BENCH_SHAPES=...] [SWEEP_SHAPES=...] [SWEEP_RULES=...] scripts/gpu_scan.sh OUT_DIR
#
# MAMBA_SDIST: `pip download --no-deps --no-binary :all: mamba-ssm==2.3.2.post1` (carried as an ignored folder).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_scan.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET_S=${BUDGET_S:-570}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export MAMBA_SCAN_SRC=${MAMBA_SDIST:-.whl_src/mamba_ssm-2.3.2.post1.tar.gz} MAMBA_SCAN_BUILD_DIR=/tmp/mamba_scan_build
LOG=$OUT/log.txt
source scripts/device_lib.sh

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/card.txt"
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' >> "$OUT/card.txt"
cat "$OUT/card.txt"
MAMBA=${MAMBA:-1}
NO_MAMBA=()
if [ "$MAMBA" = 1 ]; then
  MAX_JOBS=6 $PY benchmarks/benchmark_scan.py --mamba-src "$MAMBA_SCAN_SRC" --mamba-build-dir "$MAMBA_SCAN_BUILD_DIR" \
    --build-only > "$OUT/mamba_build.txt" 2>&1 &
  BUILD=$!
else
  NO_MAMBA=(--no-mamba)
fi
run tests 180 $PY -m pytest -q -p no:cacheprovider -n 10 tests/gpu/test_scan_gpu.py -k "not mamba"
if [ "$MAMBA" = 1 ]; then
  wait $BUILD
  tail -n 3 "$OUT/mamba_build.txt" | tee -a "$LOG"
fi
if [ "${BENCH:-1}" = 1 ]; then
  run bench 200 $PY benchmarks/benchmark_scan.py --mamba-src "$MAMBA_SCAN_SRC" --mamba-build-dir "$MAMBA_SCAN_BUILD_DIR" \
    "${NO_MAMBA[@]}" --shapes ${BENCH_SHAPES:-det-b2 det-b8 cls-b128} --ref-shapes --out "$OUT/scan.json"
fi
if [ "${GRID:-1}" = 1 ] && [ "$MAMBA" = 1 ]; then
  run grid 180 env MAMBA_GRID_JSON=/tmp/grid $PY -m pytest -q -p no:cacheprovider -n 12 tests/gpu/test_mamba_grid.py \
    tests/gpu/test_scan_gpu.py -k "mamba or grid"
  $PY - "$OUT/grid.json" <<'PY'
import glob, json, sys
rows = [r for f in sorted(glob.glob('/tmp/grid.*.json')) for r in json.load(open(f))]
json.dump(rows, open(sys.argv[1], 'w'))
PY
fi
if [ "${SWEEP:-1}" = 1 ] && [ "$(left)" -gt 40 ]; then
  run sweep "$(left)" $PY benchmarks/benchmark_scan.py --sweep --deadline $(( $(left) - 30 )) \
    --shapes ${SWEEP_SHAPES:-det-b2 cls-b128} --rules ${SWEEP_RULES:-zoh highorder} --out "$OUT/sweep.json"
fi
$PY tools/summarize_scan_run.py "$OUT"
