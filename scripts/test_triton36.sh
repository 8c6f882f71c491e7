#!/usr/bin/env bash
# Compile the Triton kernels for sm_90 and run their tests under the interpreter with Triton 3.6
# (the GPU image's version),
# in a throwaway venv that shares this Python's packages. Triton 3.6's interpreter calls int()
# on 1-element arrays, which NumPy >= 2.4 rejects, so the venv pins NumPy < 2.3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-/tmp/sdpo-triton36}
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps "triton==3.6.0" "numpy<2.3"
"$VENV/bin/python" -c "import triton; print('triton', triton.__version__)"
# The real compiler too: every kernel variant down to an sm_90 cubin (no GPU needed).
env -u TRITON_INTERPRET "$VENV/bin/python" -m sdpo_kernels.compile_check --arch 90 | tail -n 1
TRITON_INTERPRET=1 exec "$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" -p no:benchmark -m interpret \
  tests/test_triton.py tests/test_properties.py "$@"
