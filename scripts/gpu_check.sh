#!/usr/bin/env bash
# One GPU check (H100/H200, < 8 minutes): the GPU test tier, each Triton kernel timed against the
# static cost report's prediction, and the headline loss and fused-linear benchmarks (ours, TRL
# eager, torch.compile, Liger). Results: bench/results/gpu-<device>-<date>*.{json,md}.
# Assumes torch (CUDA) and triton are installed; installs the project and its bench/test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
"$PY" -m pip install --disable-pip-version-check -q -e ".[trainer,test,bench]" 2>&1 | tail -n 3 || true
DEV=$("$PY" -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
D=$(date +%F)
OUT=bench/results/gpu-$DEV-$D
mkdir -p bench/results
unset TRITON_INTERPRET
# Each step runs under its own time limit; a failed or timed-out step is reported and the next runs.
step() { local limit=$1; shift; timeout "$limit" "$@" || echo "gpu_check: step failed or timed out (rc=$?): $*"; }
step 240 "$PY" -m sdpo_kernels.compile_check --arch 90 | tail -n 1
step 180 "$PY" -m pytest -q -p no:benchmark -p no:cacheprovider -m gpu tests | tail -n 5 | tee "$OUT-tests.txt"
step 150 "$PY" bench/kernel_timing.py --rows 8192 --vocab 151936 --out "$OUT-kernels"
step 120 "$PY" -m pytest -q bench/bench_loss.py -p no:cacheprovider -k "N8192-V151936" \
    --benchmark-json="$OUT-loss.json" | tail -n 3
step 120 "$PY" -m pytest -q bench/bench_linear.py -p no:cacheprovider -k "N8192 and V151936" \
    --benchmark-json="$OUT-linear.json" | tail -n 3
for f in "$OUT-loss.json" "$OUT-linear.json"; do [ -s "$f" ] && "$PY" bench/render.py "$f"; done
ls -l "$OUT"*
