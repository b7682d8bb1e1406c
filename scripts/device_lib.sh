# Sourced by the one-call device scripts (scripts/gpu_*.sh): a time budget, bounded and logged steps, and the
# OpenMMLab wheels where the GPU machine lacks them. The caller sets START=$SECONDS, BUDGET_S, LOG and PY.

left() { echo $(( BUDGET_S - (SECONDS - START) )); }

run() {  # run NAME SECONDS COMMAND...: logged, bounded by SECONDS and by the time left
  local name=$1 limit=$2
  shift 2
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  if [ "$limit" -lt 15 ]; then echo "=== $name skipped: out of time" | tee -a "$LOG"; return; fi
  echo "=== $name (limit ${limit}s, at $(( SECONDS - START ))s)" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  echo "=== $name rc=$? after $(( SECONDS - START ))s" | tee -a "$LOG"
}

install_openmmlab() {  # mmcv (CUDA ops), mmdet, mmengine... from .whl/ (../shared/wheels/README.md) if missing
  if ! $PY -c 'import mmdet, mmcv.ops' 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}
