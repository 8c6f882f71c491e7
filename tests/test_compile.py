"""The Triton kernels compile for Hopper (sm_90) down to a cubin, without a GPU.

The interpreter tier checks numerics; this checks what only the real compiler enforces. It runs
in a subprocess because the tests set TRITON_INTERPRET=1, which replaces the compiler.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

triton_spec = importlib.util.find_spec("triton")
HAS_NVIDIA_BACKEND = (
    triton_spec is not None
    and (pathlib.Path(triton_spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()
)


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
    # Every kernel the launchers launch for every loss configuration, on two row layouts: the three
    # kernels, each in several specialisations.
    summary = re.search(r"compiled (\d+) kernel variants for sm_90", out.stdout)
    assert summary and int(summary.group(1)) >= 20, out.stdout[-2000:]
    for name in ("topk_forward_kernel", "lse_forward_kernel", "grad_kernel"):
        assert f"{name}[" in out.stdout
    registers = [int(r) for r in re.findall(r": (\d+) registers", out.stdout)]
    assert registers and all(0 < r <= 255 for r in registers)
