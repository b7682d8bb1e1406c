#!/usr/bin/env bash
# One device call (< 10 min) on nvidia-h200-x2 for issue 14 (docs/performance.md "Two GPUs"):
# benchmarks/benchmark_ddp.py on CONFIG with NCCL: `tools/dist_train.sh CONFIG 2` for ITERS iterations (bf16 as the
# config says), 2 GPUs x batch 1 against 1 GPU x batch 1 x 2 accumulated from the same weights and samples, a NaN
# loss on rank 1 (the update skipped on both), a stop after ITERS/2 (SIGUSR1 to rank 1) + --resume, images/s on 1
# and 2 GPUs. Into OUT_DIR (4 files; the device tool brings back 8 at most): card.txt, log.txt, ddp.json and
# runs_tail.txt (the end of every run's log).
#
#   [CONFIG=configs/shapes1024/vim_zoh.py] [ITERS=30] [BUDGET_S=540] [CFG_OPTIONS="k=v ..."] \
#     scripts/gpu_ddp.sh OUT_DIR [benchmark args...]
#
# CFG_OPTIONS are added to the benchmark's --cfg-options (model.backbone.init_cfg=None: no ImageNet checkpoint on the
# card); the args after OUT_DIR go to benchmarks/benchmark_ddp.py as they are (e.g. --checks launch guard).
# Needs the OpenMMLab wheels in .whl/ (../shared/wheels, see its README) on a machine without them.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_ddp.sh OUT_DIR [benchmark args...]}
shift
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET_S=${BUDGET_S:-540}
CONFIG=${CONFIG:-configs/shapes1024/vim_zoh.py}
ITERS=${ITERS:-30}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/ddp_check}
LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1
# NVLink multicast stays off everywhere, the training processes included (the device library's KINDS.md: a program
# that uses it can take the host's shared GPUs out of service); benchmark_ddp.py sets them for its runs too
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

source scripts/device_lib.sh

install_openmmlab
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$OUT/card.txt"
nvidia-smi topo -m >> "$OUT/card.txt" 2>&1
$PY -c 'import torch, triton, mmdet
print("torch", torch.__version__, "triton", triton.__version__, "mmdet", mmdet.__version__)
print("nccl", torch.cuda.nccl.version(), "gpus", torch.cuda.device_count())' >> "$OUT/card.txt" 2>&1
cat "$OUT/card.txt" | tee -a "$LOG"

# the benchmark bounds every run (--run-timeout) and all of them (--budget-s); `run` bounds the benchmark itself
RUNS_S=$(( $(left) - 30 ))
run ddp_check $(( RUNS_S + 20 )) $PY benchmarks/benchmark_ddp.py "$CONFIG" --device cuda --iters "$ITERS" \
  --budget-s "$RUNS_S" --run-timeout 240 --work-dir "$WORK" --out "$OUT/ddp.json" \
  --cfg-options model.backbone.init_cfg=None ${CFG_OPTIONS:-} "$@"
grep "^  [a-z]*: rc" "$LOG"  # one line per training run
awk '/^check +result/ {print prev; p = 1} p && !/^===/ {print} {prev = $0}' "$LOG"  # the table
for f in "$WORK"/*/*.log; do
  echo "===== $f"
  tail -n 40 "$f"
done > "$OUT/runs_tail.txt" 2>&1
