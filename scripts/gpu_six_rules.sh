#!/usr/bin/env bash
# One device call (< 10 min) of the six-rules run (issue 13; docs/analysis.md "Six rules on one GPU"): the OpenMMLab
# wheels when mmdet is missing; the shapes dataset (data/shapes1024, the configs' generator arguments) generated
# while each rule's Triton kernels compile at the training shapes, all in the background; then
# tools/analysis/six_rules_gpu.py for PART (nominal: the configs' lr; stress: STRESS_FACTOR x it, default 4) and
# RULES, within BUDGET_S.
# OUT_DIR gets 5 files (the device tool brings back 8 at most): six_rules_<PART>.json, six_rules_<PART>.png,
# log.txt, card.txt and gpu_util.csv (utilisation and memory every 5 s while training).
#
#   [PART=nominal|stress] [STRESS_FACTOR=4] [RULES="zoh foh ..."] [ITERS=300] [PARALLEL=1] [BUDGET_S=540] \
#       [CFG_OPTIONS="key=value ..."] scripts/gpu_six_rules.sh OUT_DIR
#
# On one H200 a rule alone runs 0.41 s/iteration and leaves the card part idle; six side by side run 1.03-1.08 s
# each with the card ~100% busy (8-9 GiB per rule). So the 12 runs are 2 calls:
#   PART=nominal PARALLEL=6 BUDGET_S=540 scripts/gpu_six_rules.sh OUT   (453 s there)
#   PART=stress  PARALLEL=6 BUDGET_S=470 scripts/gpu_six_rules.sh OUT   (~460 s)
# s/iter in the JSON is then measured while sharing the card. Rules a call did not reach are in its JSON as not_run.
# Join the calls' JSONs afterwards, on any machine:
#   python tools/analysis/six_rules_gpu.py --merge A/six_rules_nominal.json B/six_rules_stress.json \
#       --out-json six_rules.json --out-png six_rules.png
#
# Needs the OpenMMLab wheels in .whl/ (../shared/wheels, see its README) on a machine without them.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_six_rules.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET_S=${BUDGET_S:-540}
PART=${PART:-nominal}
RULES=${RULES:-zoh foh bilinear poly highorder rk4}
ITERS=${ITERS:-}
PARALLEL=${PARALLEL:-1}
CFG_OPTIONS=${CFG_OPTIONS:-}
STRESS_FACTOR=${STRESS_FACTOR:-4}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
source scripts/device_lib.sh
case $PART in
  nominal) STRESS= ;;
  stress) STRESS="--stress --stress-factor $STRESS_FACTOR" ;;
  *) echo "PART must be nominal or stress, got $PART" >&2; exit 2 ;;
esac

install_openmmlab
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/card.txt"
$PY -c 'import torch, triton, mmdet; print("torch", torch.__version__, "triton", triton.__version__, "mmdet", mmdet.__version__)' \
  >> "$OUT/card.txt" 2>&1
cat "$OUT/card.txt" | tee -a "$LOG"
echo "=== PART=$PART${STRESS:+ STRESS_FACTOR=$STRESS_FACTOR} RULES=\"$RULES\" ITERS=${ITERS:-config} PARALLEL=$PARALLEL BUDGET_S=$BUDGET_S" | tee -a "$LOG"

# the dataset every rule reads (one process builds it; a rule that starts earlier waits on its lock)
$PY - > /tmp/six_rules_data.txt 2>&1 <<'PY' &
import sys, time
sys.path.insert(0, '.')
from mmengine.config import Config
from projects.vim_disc.datasets.shapes import generate_shapes_dataset
t0 = time.time()
ds = Config.fromfile('configs/shapes1024/vim_zoh.py').train_dataloader.dataset
info = generate_shapes_dataset(ds.data_root, workers=8,
                              **{k: ds[k] for k in ('seed', 'num_train', 'num_val', 'min_size', 'max_size')})
print('dataset', ds.data_root, 'built' if info['generated'] else 'already there', 'in', round(time.time() - t0, 1), 's')
PY
# Triton compiles each rule's kernels once (cached on disk) at the training shapes: Vim-T width, 1024 px, batch 2,
# bf16 autocast, forward + backward
for rule in $RULES; do
  $PY - "$rule" > "/tmp/six_rules_compile_$rule.txt" 2>&1 <<'PY' &
import sys, time, torch
sys.path.insert(0, '.')
from mmengine.config import Config
from projects.vim_disc.models import VimBackbone
rule = sys.argv[1]
t0 = time.time()
cfg = Config.fromfile(f'configs/shapes1024/vim_{rule}.py')
b = cfg.model.backbone
m = VimBackbone(arch=dict(embed_dims=b.arch.embed_dims, depth=1), img_size=b.img_size, discretization=rule,
                ssm_cfg=dict(b.ssm_cfg), cuda_graph=False).cuda()
x = torch.randn(cfg.train_dataloader.batch_size, 3, b.img_size, b.img_size, device='cuda')
with torch.autocast('cuda', dtype=torch.bfloat16):
    out = m.train()(x)[0]
out.float().square().mean().backward()
torch.cuda.synchronize()
print(rule, 'compiled in', round(time.time() - t0, 1), 's')
PY
done
wait
cat /tmp/six_rules_data.txt /tmp/six_rules_compile_*.txt | grep -v "^\s*$" | tail -n 30 | tee -a "$LOG"

# the card's utilisation and memory every 5 s while the rules train (how much room PARALLEL leaves)
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 5 > "$OUT/gpu_util.csv" 2>&1 &
SMI=$!
# rules training side by side share the CPU: each gets its share of the cores for data workers (the COCO recipe's
# 8 per process are meant for one process per GPU), unless CFG_OPTIONS sets them
if [ "$PARALLEL" -gt 1 ] && [[ "$CFG_OPTIONS" != *num_workers* ]]; then
  WORKERS=$(( $(nproc) * 3 / 4 / PARALLEL ))
  [ "$WORKERS" -lt 2 ] && WORKERS=2
  CFG_OPTIONS="${CFG_OPTIONS:+$CFG_OPTIONS }train_dataloader.num_workers=$WORKERS"
fi
LEFT=$(left)
[ "$LEFT" -lt 1 ] && LEFT=1  # spent already: the runner then lists every rule as not_run
echo "=== six_rules_gpu.py at $(( SECONDS - START ))s, ${LEFT}s left" | tee -a "$LOG"
# shellcheck disable=SC2086  # RULES and CFG_OPTIONS are word lists
$PY tools/analysis/six_rules_gpu.py --rules $RULES ${ITERS:+--iters "$ITERS"} $STRESS --parallel "$PARALLEL" \
  --work-dir work_dirs/six_rules --out-json "$OUT/six_rules_$PART.json" --time-budget "$LEFT" \
  ${CFG_OPTIONS:+--cfg-options $CFG_OPTIONS} >> "$LOG" 2>&1
rc=$?
kill "$SMI" 2>/dev/null
echo "=== six_rules_gpu.py rc=$rc after $(( SECONDS - START ))s" | tee -a "$LOG"
grep -h "^\[six_rules\]" "$LOG" | grep -v "\-\-train-one" | tail -n 12
ls "$OUT"
exit $rc
