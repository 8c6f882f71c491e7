"""Compile every Triton kernel variant the launcher can launch, for a CUDA architecture, without a GPU.

    python -m sdpo_kernels.compile_check --arch 90          # H100 / H200 (sm_90a)

The interpreter tier proves the kernels' numerics on CPU; it does not run the real compiler,
which enforces what the interpreter does not (types yielded by runtime branches, layouts,
register pressure). This builds the launches of `triton_backend.forward_launches` /
`backward_launches` for every loss configuration (mode, tail, divergence, IS, small and large K)
on meta tensors of a few shapes (contiguous rows, a strided [B, T, V] view with an odd V),
compiles each distinct specialisation exactly as Triton's JIT would at that launch (the cost
report's compile path: Triton's own argument specialisation and options, its ptxas flags) and
prints each kernel's registers, spills and resident CTAs per SM.
Needs TRITON_INTERPRET unset (the kernels must be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys


def configs():
    """Every LossConfig branch the kernels compile differently for."""
    from .config import LossConfig

    for topk, tail, alpha, is_clip in itertools.product([1, 100, 4096], [True, False], [0.0, 1.0, 0.5], [2.0, None]):
        yield LossConfig(mode="topk_logits", topk=topk, alpha=alpha, add_tail=tail, is_clip=is_clip, temperature=1.0)
    for alpha, is_clip in itertools.product([0.0, 1.0, 0.5], [2.0, None]):
        yield LossConfig(mode="full_logits", topk=0, alpha=alpha, add_tail=False, is_clip=is_clip, temperature=1.0)
    for is_clip in (2.0, None):
        yield LossConfig(mode="sampled_token", topk=0, alpha=1.0, add_tail=False, is_clip=is_clip, temperature=1.0)


def shapes(dtype):
    """(student, teacher) meta tensors: contiguous [N, V] rows, and a strided [B, T, V][:, :-1] view."""
    import torch

    yield (torch.empty(64, 32000, dtype=dtype, device="meta"),) * 2
    full = torch.empty(4, 17, 32001, dtype=dtype, device="meta")
    yield full[:, :-1], torch.empty(4, 17, 32001, dtype=dtype, device="meta")[:, :-1]


def launches(dtype_name: str):
    """Every (description, KernelLaunch) the launchers produce for `configs()` × `shapes()`."""
    import torch

    from .cost_report import launches as cost_launches

    dtype = getattr(torch, cost_launches.DTYPES[dtype_name])
    for (student, teacher), config in itertools.product(list(shapes(dtype)), list(configs())):
        rows_shape = student.shape[:-1]
        ids = torch.empty(rows_shape, dtype=torch.int64, device="meta")
        old = torch.empty(rows_shape, dtype=torch.float32, device="meta") if config.is_clip is not None else None
        fwd, outputs = cost_launches.forward_launches(student, teacher, ids, old, config)
        stats = cost_launches.row_stats_of(outputs) or cost_launches.row_stats_like(config, rows_shape)
        grad_loss = torch.empty(rows_shape, dtype=torch.float32, device="meta")
        bwd, _ = cost_launches.backward_launches(student, teacher, stats, grad_loss, config)
        desc = (
            f"{config.mode} K={config.topk} tail={config.add_tail} alpha={config.alpha} IS={config.is_clip is not None}"
        )
        for launch in fwd + bwd:
            yield desc, launch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="logits dtype")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    import warnings

    import triton

    from .cost_report.compile import compile_launch
    from .cost_report.hardware import ctas_per_sm

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    seen = set()
    spilled = 0
    for desc, launch in launches(args.dtype):
        stages = getattr(launch, "num_stages", None)
        cap = getattr(launch, "max_registers", None)
        comp = compile_launch(launch.kernel, launch.args, launch.num_warps, stages, args.arch, cap)
        if id(comp) in seen:
            continue
        seen.add(id(comp))
        spilled += comp.local_bytes > 0
        ctas, limit = ctas_per_sm(comp.regs, comp.smem_per_cta, comp.num_warps)
        flags = ",".join(f"{k}={v}" for k, v in comp.constexprs.items() if k.isupper())
        print(
            f"{comp.name}[{flags}] warps={comp.num_warps} ({desc}): {comp.regs} registers, "
            f"{comp.local_bytes} B spilled, {comp.smem_per_cta} B smem, {ctas} CTAs/SM ({limit})"
        )
    print(
        f"compiled {len(seen)} kernel variants for sm_{args.arch} ({args.dtype}) with triton {triton.__version__}"
        + (f"; {spilled} of them spill registers" if spilled else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
