#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment (.venv) on a fresh machine.
# A second run only checks that the environment still imports and returns in seconds.
# Why each step is the way it is: README.md "Dependencies".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VIM_DISC_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
STAMP=$VENV/.vim_disc_setup
# The stamp holds a hash of everything that decides the environment.
WANT=$(cat requirements.txt scripts/setup_env.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
   && "$VENV/bin/python" -c "import mmcv.ops, mmdet, triton, shapely, importlib.util as u; assert u.find_spec('mamba_ssm')" 2>/dev/null; then
  exit 0
fi
if [ -x "$VENV/bin/python" ]; then
  echo "[setup] updating $VENV (requirements or this script changed; seconds unless mmcv must be rebuilt)"
else
  echo "[setup] building environment in $VENV (first run on a machine: ~15-20 min, mostly mmcv's ops)"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: mmcv and mamba-ssm compile against the torch that is installed (no build isolation).
echo "[setup] 1/4 torch 2.13.0 (CPU) and build tools"
$PIP install -q "torch==2.13.0" "setuptools<81" wheel packaging ninja "numpy>=2.0,<2.6"
# mmcv's ops: with build isolation pip silently builds a wheel WITHOUT ops; never let it.
if ! "$VENV/bin/python" -c "import mmcv.ops" 2>/dev/null; then
  echo "[setup] 2/4 mmcv 2.1.0 with its compiled ops (from source: ~15 min on 2 cores the first time; pip caches the wheel)"
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} $PIP install --no-build-isolation "mmcv==2.1.0"
  "$VENV/bin/python" -c "import mmcv.ops; from mmcv.ops import RoIAlign, nms" \
    || { echo "[setup] mmcv was built without its compiled ops (see README)"; exit 1; }
fi
echo "[setup] 3/4 requirements.txt (mmengine, mmdet, triton, shapely, ...)"
$PIP install -q -r requirements.txt
# mamba-ssm only as the reference oracle for tests: its CUDA extension cannot be built without a GPU.
if ! "$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('mamba_ssm')" 2>/dev/null; then
  echo "[setup] 4/4 mamba-ssm 2.3.2.post1 without its CUDA extension (the tests' reference oracle)"
  MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
    $PIP install -q --no-build-isolation --no-deps "mamba-ssm==2.3.2.post1"
fi
echo "$WANT" > "$STAMP"
echo "[setup] done"
