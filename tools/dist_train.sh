#!/usr/bin/env bash
# Multi-GPU (or multi-process CPU/gloo) training through torchrun:
#   tools/dist_train.sh CONFIG GPUS [train.py args]      env: NNODES NODE_RANK MASTER_ADDR PORT PYTHON
# PYTHON defaults to the project's venv (${VIM_DISC_VENV:-<repo>/.venv}/bin/python, where scripts/setup_env.sh
# installs everything) when it exists, else `python` on PATH.
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV_PY=${VIM_DISC_VENV:-$ROOT/.venv}/bin/python
[ -x "$VENV_PY" ] || VENV_PY=python
PYTHON=${PYTHON:-$VENV_PY}

PYTHONPATH="$ROOT:$PYTHONPATH" exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" --master_port="$PORT" \
    "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "${@:3}"
