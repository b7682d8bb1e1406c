#!/usr/bin/env bash
# Every number this project measures on a GPU, in one go, into OUT_DIR (docs/performance.md says what each is):
#
#   [MAMBA_SDIST=mamba_ssm-2.3.2.post1.tar.gz] [STEPS="tests scan backbone train stability ddp"] \
#   [MODES="eager captured"] [GRAPH="on off"] scripts/gpu_report.sh OUT_DIR
#
#   tests      pytest tests/gpu (with MAMBA_SDIST: also zoh against mamba-ssm's CUDA scan)
#   scan       benchmarks/benchmark_scan.py, every rule and shape, against mamba-ssm's CUDA scan
#   backbone   benchmarks/benchmark_backbone.py: our scan, mamba-ssm's and the PyTorch path, eager and CUDA-graph
#              captured (MODES), in one run + profile of ours + the cost of an SSM-statistics step
#   train      benchmarks/benchmark_train.py: the six configs, bf16 and fp32, backbone graph on and off (GRAPH),
#              20 iterations
#   stability  benchmarks/benchmark_train.py: the six configs, bf16, graph on (first of GRAPH), 500 iterations
#              each (counts non-finite steps)
#   ddp        tools/dist_train.sh on the demo config with 2 GPUs (skipped with fewer)
#
# MAMBA_SDIST is mamba-ssm's PyPI source (`pip download --no-deps --no-binary :all: mamba-ssm==2.3.2.post1`);
# only its csrc/selective_scan is JIT-built (about 2.5 min on 16 cores), once, into $OUT_DIR/mamba_build.
# Runs with the python on PATH ($PYTHON), which must have CUDA torch, triton, mmcv with CUDA ops and mmdet.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_report.sh OUT_DIR}
STEPS=${STEPS:-tests scan backbone train stability ddp}
MODES=${MODES:-eager captured}  # MODES=eager GRAPH=off: a checkout whose VimBackbone has no cuda_graph
GRAPH=${GRAPH:-on off}
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
MAMBA=()
if [ -n "${MAMBA_SDIST:-}" ]; then
  export MAMBA_SCAN_SRC=$MAMBA_SDIST MAMBA_SCAN_BUILD_DIR=$OUT/mamba_build
fi
CONFIGS=(configs/vim_{zoh,foh,bilinear,poly,highorder,rk4}.py)
NO_CKPT=(--cfg-options model.backbone.init_cfg=None)  # synthetic inputs: no ImageNet weights needed
failed=()

step() {  # step NAME COMMAND...: run when NAME is in STEPS, log to OUT/NAME.log, remember failures
  local name=$1
  shift
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "[gpu_report] $name: $*"
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1 || failed+=("$name")
  echo "[gpu_report] $name: $(( SECONDS - start )) s, last lines:"
  tail -n 5 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/card.csv"
"$PYTHON" -c 'import torch, triton; print(torch.__version__, triton.__version__)' >> "$OUT/card.csv"
if [ -n "${MAMBA_SDIST:-}" ]; then
  MAMBA=(--mamba-src "$MAMBA_SDIST")
  step mamba_build "$PYTHON" benchmarks/benchmark_scan.py "${MAMBA[@]}" --mamba-build-dir "$MAMBA_SCAN_BUILD_DIR" \
    --build-only
fi
step tests "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu
step scan "$PYTHON" benchmarks/benchmark_scan.py "${MAMBA[@]}" ${MAMBA_SDIST:+--mamba-build-dir "$MAMBA_SCAN_BUILD_DIR"} \
  --out "$OUT/scan.json"
step backbone "$PYTHON" benchmarks/benchmark_backbone.py "${MAMBA[@]}" ${MAMBA_SDIST:+--mamba-build "$MAMBA_SCAN_BUILD_DIR"} \
  --providers triton ${MAMBA_SDIST:+mamba} parallel --modes $MODES --stats --out "$OUT/backbone.json"
step train "$PYTHON" benchmarks/benchmark_train.py "${CONFIGS[@]}" --precision bf16 fp32 --cuda-graph $GRAPH \
  --iters 20 --out "$OUT/train.json" "${NO_CKPT[@]}"
step stability "$PYTHON" benchmarks/benchmark_train.py "${CONFIGS[@]}" --precision bf16 --cuda-graph ${GRAPH%% *} \
  --iters 500 --warmup 0 --out "$OUT/stability.json" "${NO_CKPT[@]}"
if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step ddp env PYTHON="$PYTHON" tools/dist_train.sh configs/demo/vim_demo.py 2 --work-dir "$OUT/ddp" \
    --cfg-options train_cfg.max_iters=20 train_cfg.val_interval=20
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "[gpu_report] failed: ${failed[*]} (logs in $OUT)"
  exit 1
fi
echo "[gpu_report] all steps passed; results in $OUT"
