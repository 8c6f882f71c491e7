"""Compile every Triton kernel variant for a CUDA architecture, without a GPU.

    python -m sdpo_kernels.compile_check --arch 90          # H100 / H200 (sm_90)

The interpreter tier proves the kernels' numerics on CPU; it does not run the real compiler,
which enforces what the interpreter does not (types yielded by runtime branches, layouts of the
sorting network, register pressure). This runs Triton's whole pipeline down to a cubin with the
ptxas bundled in the triton wheel and prints each kernel's register use and spills.
Needs TRITON_INTERPRET unset (the kernels must be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ARG_TYPES = {
    "student_ptr": "*{dtype}",
    "teacher_ptr": "*{dtype}",
    "grad_ptr": "*{dtype}",
    "ids_ptr": "*i64",
    "scratch_ptr": "*i64",
    "index_ptr": "*i64",
    "n_cols": "i32",
    "n_sparse": "i32",
    "topk": "i32",
    "rows_inner": "i32",
    "stride_s_outer": "i64",
    "stride_s_inner": "i64",
    "stride_t_outer": "i64",
    "stride_t_inner": "i64",
    "stride_s_col": "i32",
    "stride_t_col": "i32",
}  # every other pointer is *fp32, every other scalar fp32


def _signature(fn, constexprs: dict, dtype: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            default = "*fp32" if name.endswith("_ptr") else "fp32"
            sig[name] = ARG_TYPES.get(name, default).format(dtype=dtype)
    return sig


def variants():
    """(kernel, constexprs, num_warps) for every compile-time branch the launcher can take."""
    from .triton_grad import grad_kernel
    from .triton_lse import lse_forward_kernel
    from .triton_topk import topk_forward_kernel

    for k_pow2, tail, alpha_kind, has_is in itertools.product([2, 128], [True, False], [0, 1, 2], [True, False]):
        flags = dict(K_POW2=k_pow2, BLOCK_V=1024, ADD_TAIL=tail, ALPHA_KIND=alpha_kind, HAS_IS=has_is)
        yield topk_forward_kernel, flags, 8 if k_pow2 >= 64 else 4
    for full, alpha_kind, has_is in itertools.product([True, False], [0, 1, 2], [True, False]):
        yield lse_forward_kernel, dict(BLOCK_V=4096, FULL=full, ALPHA_KIND=alpha_kind, HAS_IS=has_is), 8
    for sparse, dense, full, alpha_kind in [(128, True, False, 1), (128, False, False, 1), (1, True, False, 1)] + [
        (0, True, True, a) for a in (0, 1, 2)
    ]:
        yield grad_kernel, dict(BLOCK_V=4096, SPARSE_POW2=sparse, HAS_DENSE=dense, FULL=full, ALPHA_KIND=alpha_kind), 8


def _ptxas_report(ptx: str, arch: int) -> str:
    import triton

    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "k.ptx"
        src.write_text(ptx)
        for ptxas in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas"):
            if not ptxas.exists():
                continue
            out = subprocess.run(
                [str(ptxas), "-v", f"--gpu-name=sm_{arch}a", str(src), "-o", os.devnull],
                capture_output=True,
                text=True,
            )
            if out.returncode == 0:
                regs = re.search(r"Used (\d+) registers", out.stdout + out.stderr)
                spills = re.search(r"(\d+) bytes spill stores", out.stdout + out.stderr)
                return f"{regs.group(1) if regs else '?'} registers, {spills.group(1) if spills else '?'} B spilled"
    return "no ptxas report"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="logits dtype")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    count = 0
    for fn, constexprs, num_warps in variants():
        src = ASTSource(fn, _signature(fn, constexprs, args.dtype), constexprs=constexprs)
        kernel = triton.compile(src, target=target, options={"num_warps": num_warps})
        count += 1
        flags = ",".join(f"{k}={v}" for k, v in constexprs.items())
        print(f"{fn.__name__}[{flags}] warps={num_warps}: {_ptxas_report(kernel.asm['ptx'], args.arch)}")
    print(f"compiled {count} kernel variants for sm_{args.arch} ({args.dtype}) with triton {triton.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
