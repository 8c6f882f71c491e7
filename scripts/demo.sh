#!/usr/bin/env bash
# Set up (pinned versions, see scripts/setup.sh), then run the offline demo: SDPO with top-K logit distillation
# (sdpo_kernels' fused-linear loss) vs a GRPO baseline on a tiny in-code model, 12 seeds, CPU, ~3 min on 2 cores.
# Extra arguments go to `sdpo demo` (e.g. --token_level_arm, --num_seeds 5, --topk 16); outputs in $DEMO_OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
exec "$PY" -m sdpo demo --out "${DEMO_OUT:-demo_out}" "$@"
