#!/usr/bin/env bash
# Fetch, on a machine with a package registry, the wheels that the GPU machine's image lacks, so that
# scripts/gpu_check.sh can install them there offline (that machine reaches no registry).
#
#     bash scripts/gpu_wheels.sh            # -> .gpu_wheels/ (git-ignored) + .gpu_wheels/MANIFEST.txt
#
# The image (Python 3.12, torch 2.11 + CUDA, Triton 3.6, transformers, accelerate, peft, pyarrow,
# pandas, fsspec, xxhash, huggingface-hub, pytest, hypothesis, pytest-benchmark, pytest-xdist, ...;
# /work/.library/device/KINDS.md lists it) has no trl, liger-kernel or datasets. Each wheel below is
# fetched with --no-deps for CPython 3.12 on manylinux x86-64; the list names every requirement of
# trl 1.16 / datasets / liger-kernel that the image lacks, versions from constraints.txt:
#   trl 1.16.0          the TRL baselines (bench/harness.py) and the TRL oracles of the GPU tests
#   datasets 5.2.0      imported by trl.experimental.sdpo (needs pyarrow>=24, fsspec<=2026.9.0: the image's)
#   dill, multiprocess  datasets' requirements missing from the image (dill<0.4.2, multiprocess<0.70.20)
#   fsspec 2026.9.0     only used if the image's fsspec is outside datasets' range (pip's offline resolver
#                       keeps the installed one when it fits)
#   liger-kernel 0.8.5  the Liger anchors of bench/bench_linear.py; pure Python, requires torch>=2.1.2 and
#                       triton>=2.3.1 only (the image's); handles triton>=3.6 (ops/utils.py); its imports
#                       (chunked_loss, transformers) checked on torch 2.13 / triton 3.9 here
# Never torch, triton or nvidia-* (the image's CUDA builds must stay): the script fails if one appears.
# The project itself is not packaged here: gpu_check.sh installs the travelling source tree editable
# (`pip install --no-index --no-deps --no-build-isolation -e .`), so the wheel can never be stale.
#
# How they travel: .gpu_wheels/ is git-ignored, so a device `run` must name it in `carry`
# (carry: [".gpu_wheels"]). Tree + carried paths must stay under the device tool's 64 MiB; this script
# prints both sizes and fails if they would not fit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${GPU_WHEELS:-.gpu_wheels}
LIMIT_BYTES=$((64 * 1024 * 1024))

WHEELS=(
    trl==1.16.0
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    fsspec==2026.9.0
    liger-kernel==0.8.5
)

TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_wheels.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
# PIP_CONSTRAINT="" : a machine-wide constraint file (pip.conf) must not veto an exact pin here.
for spec in "${WHEELS[@]}"; do
    PIP_CONSTRAINT="" "$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --dest "$TMP" "$spec"
done

bad=$(find "$TMP" -name '*.whl' | grep -i -E '/(torch|triton|nvidia_[^/]*)-[^/]*\.whl$' || true)
if [ -n "$bad" ]; then
    echo "gpu_wheels: refusing wheels the image must provide itself: $bad" >&2
    exit 1
fi
# One version of each distribution (two stop the whole offline install).
dups=$(find "$TMP" -name '*.whl' -printf '%f\n' | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then
    echo "gpu_wheels: more than one wheel of: $dups" >&2
    exit 1
fi

# Replace the folder as a whole: no stale wheel of an older pin stays behind.
rm -rf "$DEST"
mkdir -p "$DEST"
mv "$TMP"/*.whl "$DEST"/
{
    echo "# wheels for scripts/gpu_check.sh (fetched $(date -u +%FT%TZ) by scripts/gpu_wheels.sh): bytes sha256 file"
    (cd "$DEST" && for f in *.whl; do printf '%s %s %s\n' "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-64)" "$f"; done)
} >"$DEST/MANIFEST.txt"

wheel_bytes=$(du -cb "$DEST"/* | tail -n 1 | cut -f1)
# What a device `run` sends: tracked + untracked-not-ignored files, plus the carried folder.
tree_bytes=$(git ls-files -co --exclude-standard -z | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((wheel_bytes + tree_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.2f MiB", b / 1048576}'; }
cat "$DEST/MANIFEST.txt"
echo "gpu_wheels: $(find "$DEST" -name '*.whl' | wc -l) wheels, $(mib "$wheel_bytes") in $DEST/;" \
    "working tree $(mib "$tree_bytes"); together $(mib "$total") of the device tool's 64 MiB."
if [ "$total" -gt "$LIMIT_BYTES" ]; then
    echo "gpu_wheels: tree + wheels exceed the 64 MiB a device run carries: trim the wheel list" \
        "(or the untracked files) before calling the device tool." >&2
    exit 1
fi
echo "gpu_wheels: carry it: device run with carry [\"$DEST\"] and command 'bash scripts/gpu_check.sh'."
