#!/usr/bin/env bash
# Create ./.venv with the project and its test + judge extras installed (idempotent).
# torch is pinned to the build this project is tested with; on machines where the wheel is on
# local disk pip takes it from there, elsewhere it downloads it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test,score]"
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')" >&2
