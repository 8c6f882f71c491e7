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

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_interpreter = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")

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
