"""Static cost report of the Triton kernels as the launcher launches them, without a GPU.

    python -m sdpo_kernels.cost_report                          # N=8192, V in {32000, 151936}, bf16
    python -m sdpo_kernels.cost_report --vocab 151936 --out bench/results/

Every time it prints is PREDICTED (static SASS model), NOT MEASURED. What it does:

1. Compiles each kernel launch of `triton_backend.forward_launches` / `backward_launches` (meta
   tensors of the real shape: no memory) exactly as Triton's JIT would at that launch: the
   arguments go through Triton's own binder (`create_function_from_signature` + `_pack_args`:
   stride/int == 1 → constexpr, 16-byte divisibility, i32/i64 by value, pointer dtypes) and
   `triton.compile` keeps Triton's default options and its own ptxas flags, so the cubin is the
   launched one (registers included). Target sm_90a by default.
2. Disassembles it (`nvdisasm -c -gi`, bundled in the triton wheel; with source line info),
   builds the control-flow graph (basic blocks, dominators, back edges → natural loops and their
   nesting) and classifies every instruction (fp32, int, mufu, conv, gmem, smem, sync =
   SHFL/BAR/…, ctrl, other). Registers and local memory from `cuobjdump --dump-resource-usage`.
3. Finds the vocabulary loop(s): those whose `for` line names an argument equal to V (n_cols)
   and that load or store an [N, V] tensor (address dataflow from the kernel parameters through
   the SASS; without line info, the innermost loops doing so). Enumerates the acyclic paths of
   each loop body from header to back edge (inner loops collapsed into one node and reported
   separately) and costs each path per thread per iteration and per element; code outside these
   loops counts once per row.
4. Time model for an H100 SXM and an H200 (`GPUS`): HBM floor, a static lower bound (HBM, issue,
   MUFU pipe, INT/ALU pipe) and a latency-aware estimate (one warp's in-order dependent critical
   path per iteration against the issue cycles of all resident warps), with the real CTAs per SM
   and the launch's waves (persistent grids included).
5. Weights the paths with `path_mix` and adds `row_extras` (`path_labels`, fed by the replay of
   the top-K kernel in `replay_topk`: update both when a kernel's control flow changes).

Modules, by concern, top to bottom; each imports only modules listed below it (no cycles; tested
in tests/test_cost_report_package.py), and `import sdpo_kernels` imports none of them:

    __main__     `python -m sdpo_kernels.cost_report`        → cli
    cli          the command line                           → report, render, launches
    report       the report as data (the JSON)              → analysis, launch_time, path_labels, structure,
                                                               launches, compile, hardware
    render       the markdown                               → hardware, sass
    launch_time  whole-launch time model (Timing)           → structure, timing, hardware
    analysis     analyze(): structure + labels + mix        → path_labels, structure
    path_labels  loop names, path labels, path mix          → replay_topk, structure
    structure    one launch: loops, paths, their costs      → cfg, dataflow, compile, timing, launches,
                                                               hardware, sass
    timing       per-path cost, critical-path scheduler     → hardware, sass
    dataflow     which parameter each access addresses      → cfg, sass
    cfg          CFG, dominators, natural loops, paths      → sass
    replay_topk  replay of topk_forward_kernel's decisions  (numpy, torch for the fixture)
    launches     VARIANTS, launches on meta tensors         (sdpo_kernels.triton_backend, lazily)
    compile      compile a launch as Triton's JIT would     (triton, triton_backend.FP_FUSION: lazily)
    sass         SASS parsing, opcode classes
    hardware     GPUs, latencies, CTAs per SM

Public entry points: `build_report` / `render_markdown` / `main` (the CLI), `analyze(launch, rows,
vocab)` → `KernelAnalysis` and `time_model(analysis, gpu)` for one launch, `compile_launch` (also
used by `compile_check`), and the SASS tools `parse_sass`, `build_cfg`, `loop_paths`,
`critical_path`, `address_params`.
"""

from .analysis import analyze, assign_mix
from .cfg import Block, Cfg, Loop, Path, build_cfg, heaviest_path_instrs, loop_paths
from .cli import main
from .compile import Compiled, _jit_kwargs, compile_launch, nvidia_bin, specialize
from .dataflow import address_params
from .hardware import GPUS, H100, H200, LATENCY, PREDICTED, Gpu, ctas_per_sm
from .launch_time import Timing, time_model
from .launches import (
    DTYPES,
    HEADLINE,
    VARIANTS,
    Variant,
    backward_launches,
    forward_launches,
    row_stats_like,
    row_stats_of,
    variant_launches,
)
from .render import render_markdown
from .report import build_report, kernel_report
from .sass import CLASSES, Instr, instr_class, latency_class, parse_sass
from .structure import KernelAnalysis, LoopCost, PathCost, analyze_structure, source_line
from .timing import Cost, critical_path

__all__ = [
    "CLASSES",
    "DTYPES",
    "GPUS",
    "H100",
    "H200",
    "HEADLINE",
    "LATENCY",
    "PREDICTED",
    "VARIANTS",
    "Block",
    "Cfg",
    "Compiled",
    "Cost",
    "Gpu",
    "Instr",
    "KernelAnalysis",
    "Loop",
    "LoopCost",
    "Path",
    "PathCost",
    "Timing",
    "Variant",
    "_jit_kwargs",  # tests/test_hardening.py checks the launch options the compile uses
    "address_params",
    "analyze",
    "analyze_structure",
    "assign_mix",
    "backward_launches",
    "build_cfg",
    "build_report",
    "compile_launch",
    "critical_path",
    "ctas_per_sm",
    "forward_launches",
    "heaviest_path_instrs",
    "instr_class",
    "kernel_report",
    "latency_class",
    "loop_paths",
    "main",
    "nvidia_bin",
    "parse_sass",
    "render_markdown",
    "row_stats_like",
    "row_stats_of",
    "source_line",
    "specialize",
    "time_model",
    "variant_launches",
]
