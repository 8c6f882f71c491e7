"""The Triton kernels compile for Hopper (sm_90) down to a cubin, without a GPU.

The interpreter tier checks numerics; this checks what only the real compiler enforces. It runs
in a subprocess because the tests set TRITON_INTERPRET=1, which replaces the compiler.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

triton_spec = importlib.util.find_spec("triton")
HAS_NVIDIA_BACKEND = triton_spec is not None and (
    pathlib.Path(triton_spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
).exists()


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="triton's NVIDIA backend (bundled ptxas) is not installed")
def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "sdpo_kernels.compile_check", "--arch", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "compiled 42 kernel variants for sm_90" in out.stdout
