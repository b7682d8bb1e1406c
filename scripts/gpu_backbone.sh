#!/usr/bin/env bash
# One device call (< 10 min) for the backbone and detector step (docs/performance.md "Backbone step"):
# mamba-ssm's CUDA scan JIT-built and Triton's kernels compiled (every rule, our one-launch and two-launch scans)
# in the background while the fused-path and CUDA-graph GPU tests run; then benchmarks/benchmark_backbone.py
# (zoh: ours and mamba's scan, eager and captured, profile, SSM-statistics cost; the other rules captured), the
# two-launch scan for comparison (VIM_DISC_BIDIR=two), and benchmarks/benchmark_train.py (zoh bf16/fp32 x graph
# on/off, the other rules bf16 with the graph). JSON, card.txt and log.txt into OUT_DIR (7 files: the device tool
# brings back 8 at most); tools/summarize_backbone_run.py last.
#
#   [BUDGET_S=430] [MAMBA_SDIST=.whl_src/mamba_ssm-2.3.2.post1.tar.gz] scripts/gpu_backbone.sh OUT_DIR
#   PART=detector [BUDGET_S=170] scripts/gpu_backbone.sh OUT_DIR   (no mamba: the CUDA-graph tests and the zoh
#                                                                    detector rows only, for a short call)
#
# Needs the OpenMMLab wheels in .whl/ (../shared/wheels, see its README) on a machine without them.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_backbone.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET_S=${BUDGET_S:-430}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
MAMBA_SRC=${MAMBA_SDIST:-.whl_src/mamba_ssm-2.3.2.post1.tar.gz}
MAMBA_BUILD=/tmp/mamba_scan_build
LOG=$OUT/log.txt
source scripts/device_lib.sh

install_openmmlab
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/card.txt"
$PY -c 'import torch, triton, mmdet; print("torch", torch.__version__, "triton", triton.__version__, "mmdet", mmdet.__version__)' \
  >> "$OUT/card.txt" 2>&1
cat "$OUT/card.txt"

PART=${PART:-all}
NO_CKPT=(--cfg-options model.backbone.init_cfg=None)
if [ "$PART" = detector ]; then
  run train_zoh 90 $PY benchmarks/benchmark_train.py configs/vim_zoh.py --precision bf16 fp32 --cuda-graph on off \
    --iters 6 --warmup 3 --out "$OUT/train_zoh.json" "${NO_CKPT[@]}"
  run graph_tests 80 $PY -m pytest -q -p no:cacheprovider -n 5 tests/gpu/test_cuda_graph_gpu.py
  grep -h " passed\| failed\|rc=" "$LOG" | tail -n 4
  $PY tools/summarize_backbone_run.py "$OUT" 2>&1 | tail -n 12
  exit 0
fi
MAX_JOBS=8 $PY benchmarks/benchmark_scan.py --mamba-src "$MAMBA_SRC" --mamba-build-dir "$MAMBA_BUILD" --build-only \
  > /tmp/mamba_build.txt 2>&1 &
# Triton compiles each kernel variant once (cached on disk): one process per variant, in parallel, at the
# benchmarks' shapes (Vim-T, 1024 px, batch 2; bf16, zoh also fp32 for the detector's fp32 rows)
for spec in zoh:bf16:one zoh:bf16:two zoh:fp32:one foh:bf16:one bilinear:bf16:one poly:bf16:one \
            highorder:bf16:one rk4:bf16:one; do
  IFS=: read -r rule dt launch <<< "$spec"
  VIM_DISC_BIDIR=$launch $PY - "$rule" "$dt" > "/tmp/compile_${rule}_${dt}_${launch}.txt" 2>&1 <<'PY' &
import sys, time, torch
sys.path.insert(0, '.')
from projects.vim_disc.models import VimBackbone
rule, dt = sys.argv[1], sys.argv[2]
t0 = time.time()
m = VimBackbone(arch=dict(embed_dims=192, depth=1), img_size=1024, discretization=rule, cuda_graph=False).cuda()
x = torch.randn(2, 3, 1024, 1024, device='cuda')
with torch.autocast('cuda', dtype=torch.bfloat16, enabled=dt == 'bf16'):
    out = m.train()(x)[0]
out.float().square().mean().backward()
torch.cuda.synchronize()
print(rule, dt, 'compiled in', round(time.time() - t0, 1), 's')
PY
done
run tests 140 $PY -m pytest -q -p no:cacheprovider -n 3 tests/gpu/test_backbone_gpu.py tests/gpu/test_cuda_graph_gpu.py
wait
grep -h "compiled in\|Error" /tmp/compile_*.txt | tee -a "$LOG"
tail -n 2 /tmp/mamba_build.txt | tee -a "$LOG"
BENCH=(--warmup-ms 100 --rep-ms 300 --mamba-src "$MAMBA_SRC" --mamba-build "$MAMBA_BUILD")
run backbone 100 $PY benchmarks/benchmark_backbone.py --rules zoh --providers triton mamba --modes eager captured \
  --stats "${BENCH[@]}" --out "$OUT/backbone.json"
run rules 45 $PY benchmarks/benchmark_backbone.py --rules foh bilinear poly highorder rk4 --providers triton \
  --modes captured --no-profile "${BENCH[@]}" --out "$OUT/backbone_rules.json"
run train_zoh 75 $PY benchmarks/benchmark_train.py configs/vim_zoh.py --precision bf16 fp32 --cuda-graph on off \
  --iters 6 --warmup 3 --out "$OUT/train_zoh.json" "${NO_CKPT[@]}"
run two_launch 35 env VIM_DISC_BIDIR=two $PY benchmarks/benchmark_backbone.py --rules zoh --providers triton \
  --modes eager captured --no-profile "${BENCH[@]}" --out "$OUT/backbone_two_launch.json"
run train_rules 60 $PY benchmarks/benchmark_train.py configs/vim_{foh,bilinear,poly,highorder,rk4}.py \
  --precision bf16 --cuda-graph on --iters 6 --warmup 3 --out "$OUT/train_rules.json" "${NO_CKPT[@]}"
echo "=== summary at $(( SECONDS - START ))s (card: $(head -2 "$OUT/card.txt" | tail -1))"
grep -h " passed\| failed\|rc=" "$LOG" | tail -n 8
$PY tools/summarize_backbone_run.py "$OUT" 2>&1 | tail -n 40
