#!/usr/bin/env bash
# The main job: set up (idempotent), then train + evaluate the demo Vim Cascade Mask R-CNN on the embedded
# synthetic shapes dataset (generated into data/shapes/ on first use). Extra args go to tools/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VIM_DISC_VENV:-$PWD/.venv}
exec "$VENV/bin/python" tools/train.py configs/demo/vim_demo.py --work-dir work_dirs/vim_demo "$@"
