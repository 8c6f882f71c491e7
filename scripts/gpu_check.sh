#!/usr/bin/env bash
# One self-checking GPU run (H100/H200) for a bare, offline machine: installs what the image lacks from
# .gpu_wheels/ (fetched beforehand by scripts/gpu_wheels.sh, carried with the tree), then, each step
# under its own `timeout`, keeps going after a failure and ends with a table of every step's rc and time:
#
#   step       limit s  what
#   install       40    trl, liger-kernel, datasets (+ deps the image lacks) from .gpu_wheels/, offline;
#                       the project itself editable (`pip install --no-index --no-deps --no-build-isolation -e .`;
#                       PYTHONPATH=kernels:. is set regardless, so a failed install stops nothing)
#   env           10    versions, device, driver, date -> bench/results/gpu-<device>-<date>-env.txt
#   selfcheck     45    bench/gpu_selfcheck.py: Triton vs reference on the same inputs, every cost-report
#                       variant, N=256, V in {151936, 32003}, bf16 + fp32 (loss, row stats, gradient); BEFORE
#                       any timing
#   tests         90    pytest -m gpu tests (the GPU tier, 8 xdist workers)
#   memcheck      60    compute-sanitizer memcheck over bench/sanitize_kernels.py (every kernel, NaN rows,
#                       column-strided logits, K = V, the fused-linear path); any error fails the step
#   racecheck     25    compute-sanitizer racecheck over the top-K forwards (sanitize_kernels.py --only topk_forward)
#   kernels      120    bench/kernel_timing.py, N=8192, V in {32000, 49152, 128256, 151936}: each launch timed, its outputs
#                       checked rewritten, measured / predicted (cost report) per vocabulary
#   loss          55    bench/bench_loss.py at N=8192, V=151936: ours, reference, TRL eager, torch.compile
#   linear        70    bench/bench_linear.py at N=8192, V=151936, D=1536: ours, TRL eager, torch.compile,
#                       Liger (2), the matmul floor
#   total        515 s <= 9 min (plus a few seconds of bookkeeping). Timed benchmarks use fixed rounds
#                       (SDPO_BENCH_ROUNDS) so they fit; D=3584 too: GPU_CHECK_LINEAR_D="1536 3584" (+70 s).
#
# Results: bench/results/gpu-<device>-<date>-{env.txt,selfcheck.*,tests.txt,sanitize.txt,kernels.*,
# loss.*,linear.*,summary.md}; step logs in .gpu_check/ (git-ignored). Under the device tool ($OUT set) the
# summary, the self-check and kernel tables and one .tar.gz of all of it are copied to $OUT after every step.
#
# Environment: PYTHON (default python3), GPU_WHEELS (default .gpu_wheels), GPU_CHECK_ONLY="selfcheck tests"
# (run only these steps, e.g. to rerun failures in the time left), GPU_CHECK_LIMIT_<STEP>=seconds (override
# one limit, e.g. GPU_CHECK_LIMIT_TESTS=150), GPU_CHECK_LINEAR_D (default 1536).
# Exit status: 0 when every step that ran passed, else 1 (2: no CUDA device).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu_wheels}
ONLY=${GPU_CHECK_ONLY:-}
LINEAR_D=${GPU_CHECK_LINEAR_D:-1536}
DEST=${OUT:-}  # the device tool's folder of files that come back

# Never reach out: pip, the Hub and datasets stay offline.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/kernels:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False)" >&2
    nvidia-smi 2>&1 | head -n 15 >&2
    exit 2
fi
DEV=$("$PY" -c "import torch; n = torch.cuda.get_device_name().split(); print((n[1] if len(n) > 1 else n[0]).lower())")
D=$(date +%F)
RES=bench/results/gpu-$DEV-$D
LOGS=.gpu_check
SUMMARY=$RES-summary${ONLY:+-rerun}.md  # a rerun of some steps does not overwrite the full run's table
mkdir -p bench/results "$LOGS"  # each step overwrites its own log; a rerun keeps the others

# compute-sanitizer: on the PATH, else where CUDA images keep it.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer \
    2>/dev/null | head -n 1)
SANITIZER=${SANITIZER:-compute-sanitizer}
# Options only where this compute-sanitizer has them (probed): --padding puts a guard after every
# allocation (an overrun into the next tensor is caught), --report-api-errors no keeps the verdict on
# the kernels' memory accesses (a failed launch raises in Python anyway).
SAN_HELP=$("$SANITIZER" --help 2>/dev/null || true)
SAN_OPTS="--error-exitcode 1"
for opt in "--print-limit 50" "--report-api-errors no"; do
    grep -q -- "${opt%% *}" <<<"$SAN_HELP" && SAN_OPTS="$SAN_OPTS $opt"
done
MEMCHECK_OPTS=$(grep -q -- "--padding" <<<"$SAN_HELP" && echo "--padding 32")

NAMES=() LIMITS=() RCS=() SECS=()
T_START=$(date +%s)

limit_of() {  # limit_of STEP DEFAULT: GPU_CHECK_LIMIT_<STEP> or DEFAULT
    local var="GPU_CHECK_LIMIT_${1^^}"
    var=${var//-/_}
    echo "${!var:-$2}"
}

status_of() {  # status_of RC
    case $1 in
        0) echo ok ;;
        124 | 137) echo "TIMEOUT" ;;
        *) echo "FAILED" ;;
    esac
}

summary() {
    {
        echo "# gpu_check $DEV $D: one row per step (rc 124/137: killed at its time limit)"
        echo
        echo "| step | limit s | seconds | rc | status |"
        echo "|---|---|---|---|---|"
        local i budget=0
        for i in "${!NAMES[@]}"; do
            echo "| ${NAMES[$i]} | ${LIMITS[$i]} | ${SECS[$i]} | ${RCS[$i]} | $(status_of "${RCS[$i]}") |"
            budget=$((budget + LIMITS[i]))
        done
        echo
        echo "Total: $(($(date +%s) - T_START)) s of wall time; step limits sum to $budget s."
    } >"$SUMMARY"
}

publish() {  # results so far into the device tool's $OUT (if any): at most 8 files come back
    summary
    [ -n "$DEST" ] && [ -d "$DEST" ] || return 0
    cp -f "$SUMMARY" "$DEST/" 2>/dev/null
    for f in "$RES-selfcheck.md" "$RES-kernels.md"; do [ -f "$f" ] && cp -f "$f" "$DEST/"; done
    local files=("$RES"-* "$LOGS")
    tar -czf "$DEST/gpu-check-$DEV-$D.tar.gz" "${files[@]}" 2>/dev/null || true
}

step() {  # step NAME DEFAULT_LIMIT_S COMMAND...: under `timeout`, output to .gpu_check/NAME.log, tail printed
    local name=$1 limit
    limit=$(limit_of "$1" "$2")
    shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    local log="$LOGS/$name.log" t0 rc
    local what="$*"
    what=${what//$'\n'/ }
    echo "=== gpu_check: $name (limit $limit s): ${what:0:160}"
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0))
    tail -n "${GPU_CHECK_TAIL:-12}" "$log"
    NAMES+=("$name") LIMITS+=("$limit") RCS+=("$rc") SECS+=("$dt")
    echo "=== gpu_check: $name: $(status_of $rc) (rc $rc) in $dt s"
    publish
}

# --- install: offline, from the carried wheels only --------------------------------------------------
install_cmd=$(
    cat <<EOF
set -u
rm -f "$LOGS/env.sh"
ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS/: run scripts/gpu_wheels.sh and carry $WHEELS"; exit 3; }
[ -f "$WHEELS/MANIFEST.txt" ] && cat "$WHEELS/MANIFEST.txt"
# pip's resolver, offline: keeps every installed package that satisfies a requirement (torch, triton,
# transformers, pyarrow, ...), takes the rest from $WHEELS/ only.
if ! "$PY" -m pip install --no-index --find-links "$WHEELS" trl liger-kernel; then
    echo "gpu_check: the offline resolver failed (an image package outside a pinned range?); installing the wheels with --no-deps"
    # fsspec only where the image has none: it serves more than datasets there.
    wheels=\$(ls "$WHEELS"/*.whl | grep -v '/fsspec-'; "$PY" -c "import fsspec" 2>/dev/null || ls "$WHEELS"/fsspec-*.whl)
    "$PY" -m pip install --no-index --no-deps \$wheels \
        || { "$PY" -m pip install --no-index --no-deps --target /tmp/gpu_site \$wheels \
             && echo "export PYTHONPATH=/tmp/gpu_site:\\\$PYTHONPATH" >"$LOGS/env.sh"; }
fi
"$PY" -m pip install --no-index --no-deps --no-build-isolation -e . \
    || echo "gpu_check: editable install failed; PYTHONPATH=kernels:. serves the project"
[ -f "$LOGS/env.sh" ] && . "$LOGS/env.sh"
"$PY" -m pip check 2>&1 | grep -i -E "trl|liger|datasets|dill|multiprocess|fsspec|pyarrow" || true
"$PY" -c "import trl.experimental.sdpo.loss_utils, trl.trainer.utils, datasets, liger_kernel.chunked_loss, liger_kernel.transformers, sdpo_kernels; print('gpu_check: trl, datasets, liger-kernel and sdpo_kernels import')"
EOF
)
step install 40 bash -c "$install_cmd"
[ -f "$LOGS/env.sh" ] && . "$LOGS/env.sh"

# --- env: versions, device, driver, date --------------------------------------------------------------
env_cmd=$(
    cat <<EOF
{
rc=0
echo "date: \$(date -u +%FT%TZ)"
echo "commit: \${GPU_CHECK_COMMIT:-\$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
git status --short 2>/dev/null | head -n 30 | sed 's/^/  dirty: /'
echo "host: \$(uname -srm), \$(nproc) CPUs"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>&1
"$PY" - <<'PY'
import importlib.metadata as md, platform, torch, triton
print(f"python {platform.python_version()}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
p = torch.cuda.get_device_properties(0)
print(f"device {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
print(f"triton {triton.__version__}")
for name in ("trl", "liger-kernel", "datasets", "transformers", "accelerate", "peft", "pyarrow", "fsspec",
             "huggingface-hub", "pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "sdpo-kernels"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
PY
[ \$? -eq 0 ] || rc=1
echo "compute-sanitizer: \$("$SANITIZER" --version 2>&1 | tail -n 1)"
echo "compute-sanitizer options: $SAN_OPTS; memcheck: ${MEMCHECK_OPTS:-no --padding}"
exit \$rc
} 2>&1 | tee "$RES-env.txt"
EOF
)
step env 10 bash -o pipefail -c "$env_cmd"

# --- correctness before any timing --------------------------------------------------------------------
step selfcheck 45 "$PY" bench/gpu_selfcheck.py --out "$RES-selfcheck"
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")  # compiles in 8 processes (the image has pytest-xdist)
step tests 90 bash -o pipefail -c "'$PY' -m pytest -q -p no:cacheprovider -p no:benchmark -m gpu $XDIST -rfE tests 2>&1 | tee '$RES-tests.txt'"
step memcheck 60 bash -o pipefail -c "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$SANITIZER' --tool memcheck $SAN_OPTS \
    $MEMCHECK_OPTS '$PY' bench/sanitize_kernels.py 2>&1 | tee '$RES-sanitize.txt'"
step racecheck 25 bash -o pipefail -c "'$SANITIZER' --tool racecheck $SAN_OPTS \
    '$PY' bench/sanitize_kernels.py --only topk_forward 2>&1 | tee -a '$RES-sanitize.txt'"

# --- timings -------------------------------------------------------------------------------------------
step kernels 120 "$PY" bench/kernel_timing.py --rows 8192 --out "$RES-kernels"  # its default V: the four real vocabularies
step loss 55 bash -o pipefail -c "SDPO_BENCH_ROUNDS=5 '$PY' -m pytest -q bench/bench_loss.py -p no:cacheprovider -k 'N8192-V151936' \
    --benchmark-json='$RES-loss.json' && '$PY' bench/render.py '$RES-loss.json'"
for d in $LINEAR_D; do
    suffix=$([ "$d" = 1536 ] && echo "" || echo "-d$d")
    step "linear$suffix" 70 bash -o pipefail -c "SDPO_BENCH_ROUNDS=3 '$PY' -m pytest -q bench/bench_linear.py -p no:cacheprovider \
        -k 'cuda and N8192 and V151936 and D$d' --benchmark-json='$RES-linear$suffix.json' \
        && '$PY' bench/render.py '$RES-linear$suffix.json'"
done

publish
echo
cat "$SUMMARY"
ls -l "$RES"-* 2>/dev/null
failed=0
for rc in "${RCS[@]}"; do [ "$rc" -eq 0 ] || failed=1; done
exit $failed
