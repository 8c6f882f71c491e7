#!/usr/bin/env bash
# Set up, then run the offline demo: SDPO vs a GRPO baseline on a tiny in-code model (CPU, minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
exec "$PY" -m sdpo demo --out "${DEMO_OUT:-demo_out}" "$@"
