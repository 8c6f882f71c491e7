#!/usr/bin/env bash
# Install the project with its trainer and test extras into the current Python.
# A CPU build of torch 2.13.0 is installed first when no torch is present: an open torch
# requirement alone would pull a multi-GB CUDA build. An existing torch (e.g. CUDA) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --disable-pip-version-check -q "torch==2.13.0"
fi
"$PY" -m pip install --disable-pip-version-check -q -e ".[trainer,test,dev]"
