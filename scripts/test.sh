#!/usr/bin/env bash
# The test suite: set up (idempotent), then every test, the slow end-to-end ones included.
# GPU tests skip on machines without CUDA. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VIM_DISC_VENV:-$PWD/.venv}
export PATH="$VENV/bin:$PATH"
exec "$VENV/bin/python" -m pytest "$@"
