"""Compiling a launch exactly as Triton's JIT would, and reading back its SASS and resource usage.

The arguments go through Triton's own binder (`create_function_from_signature` + `_pack_args`:
stride/int == 1 → constexpr, 16-byte divisibility, i32/i64 by value, pointer dtypes) and
`triton.compile` keeps Triton's default options and its own ptxas flags, so the cubin is the
launched one (registers included). Also used by `sdpo_kernels.compile_check`.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import tempfile
from dataclasses import dataclass


def nvidia_bin(tool: str) -> pathlib.Path:
    import triton

    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool


def unwrap_kernel(kernel):
    while not hasattr(kernel, "params") and hasattr(kernel, "fn"):
        kernel = kernel.fn  # autotuner / heuristics wrappers
    return kernel


@dataclass
class Compiled:
    name: str
    signature: dict  # param name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # param name -> value
    attrs: dict  # param name -> Triton attributes (e.g. [["tt.divisibility", 16]])
    num_warps: int
    num_stages: int
    sass: str
    regs: int
    local_bytes: int  # per thread: spills (Triton kernels use no local arrays)
    stack_bytes: int
    static_smem: int  # bytes, includes the 1 KiB the driver reserves per CTA on sm_90
    dynamic_smem: int  # bytes, Triton's `shared`
    params: list[tuple[str, int, int]]  # (name, constant-bank offset, size) of the kernel parameters
    triton_version: str = ""

    @property
    def smem_per_cta(self) -> int:
        return self.static_smem + self.dynamic_smem


def _jit_kwargs(fn, num_warps: int, num_stages: int, max_registers: int | None = None) -> dict:
    """The options JITFunction.run adds before binding (Triton 3.6 and 3.9)."""
    from triton import knobs

    from ..triton_backend import FP_FUSION

    kw = dict(num_warps=num_warps, enable_fp_fusion=FP_FUSION)  # as `KernelLaunch.run` passes it
    if num_stages is not None:  # else Triton's default, as for a launch that passes none
        kw["num_stages"] = num_stages
    if max_registers is not None:  # as `KernelLaunch.run` passes a register cap
        kw["maxnreg"] = max_registers
    kw["debug"] = getattr(fn, "debug", None) or knobs.runtime.debug
    comp = knobs.compilation
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(comp, name):
            kw[name] = getattr(comp, name)
    return kw


def specialize(
    kernel, args: dict, num_warps: int, num_stages: int | None, arch: int = 90, max_registers: int | None = None
):
    """(backend, target, signature, constexprs, attrs, options) that Triton's JIT derives for this launch.

    Runs Triton's own binder (`create_function_from_signature` → `native_specialize_impl`) and
    `JITFunction._pack_args`, so integer/stride specialisation, divisibility and dtypes are Triton's.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = unwrap_kernel(kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    missing = [p.name for p in fn.params if p.name not in args]
    if missing:
        raise ValueError(f"{fn.__name__}: launch args lack {missing}")
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = _jit_kwargs(fn, num_warps, num_stages, max_registers)
    bound, specialization, options = binder(**{p.name: args[p.name] for p in fn.params}, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
    return backend, target, signature, constexprs, attrs, options


_COMPILED: dict[tuple, Compiled] = {}


def compile_launch(
    kernel,
    args: dict,
    num_warps: int,
    num_stages: int | None = None,
    arch: int = 90,
    max_registers: int | None = None,
) -> Compiled:
    """Compile (cached by Triton's specialization key and options) and read back SASS and resource
    usage; `max_registers`: the launch's register cap (Triton's `maxnreg`)."""
    import triton
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    fn = unwrap_kernel(kernel)
    _backend, target, signature, constexprs, attrs, options = specialize(
        fn, args, num_warps, num_stages, arch, max_registers
    )
    key = (
        fn.__module__,
        fn.__name__,
        arch,
        str(sorted(signature.items())),
        str(sorted(constexprs.items(), key=str)),
        str(sorted(attrs.items(), key=str)),
        str(options),
    )
    if key in _COMPILED:
        return _COMPILED[key]
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    cubin = compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = _run([nvidia_bin("nvdisasm"), "-c", "-gi", path])
        usage = _run([nvidia_bin("cuobjdump"), "--dump-resource-usage", path])

    def res(name: str) -> int:
        m = re.search(rf"\b{name}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    names = [p.name for p in fn.params]

    def by_name(d: dict) -> dict:  # Triton keys constexprs/attrs by argument path, e.g. (3,)
        return {(names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k)): v for k, v in d.items()}

    sig = dict(signature)
    out = Compiled(
        name=fn.__name__,
        signature=sig,
        constexprs=by_name(constexprs),
        attrs={k: v for k, v in by_name(attrs).items() if v},
        num_warps=options.num_warps,
        num_stages=options.num_stages,
        sass=sass,
        regs=res("REG"),
        local_bytes=res("LOCAL"),
        stack_bytes=res("STACK"),
        static_smem=res("SHARED"),
        dynamic_smem=int(getattr(compiled.metadata, "shared", 0) or 0),
        params=_ptx_params(compiled.asm["ptx"], sig),
        triton_version=triton.__version__,
    )
    _COMPILED[key] = out
    return out


def _run(cmd: list) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {out.stderr[-2000:]}")
    return out.stdout


_PTX_SIZES = {
    "u64": 8,
    "s64": 8,
    "b64": 8,
    "f64": 8,
    "u32": 4,
    "s32": 4,
    "b32": 4,
    "f32": 4,
    "u16": 2,
    "s16": 2,
    "b16": 2,
    "f16": 2,
    "u8": 1,
    "s8": 1,
    "b8": 1,
    "pred": 1,
}
PARAM_BASE = 0x210  # sm_70+: kernel parameters start at c[0x0][0x210]


def _ptx_params(ptx: str, signature: dict) -> list[tuple[str, int, int]]:
    """(name, constant-bank offset, size) of each PTX kernel parameter: the non-constexpr arguments
    in order, then Triton's own scratch pointers."""
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S)
    types = re.findall(r"\.param\s+\.(\w+)", entry.group(1)) if entry else []
    names = [n for n, t in signature.items() if t != "constexpr"]
    out, off = [], PARAM_BASE
    for i, t in enumerate(types):
        size = _PTX_SIZES.get(t, 8)
        off = (off + size - 1) // size * size
        out.append((names[i] if i < len(names) else f"<triton scratch {i - len(names)}>", off, size))
        off += size
    return out
