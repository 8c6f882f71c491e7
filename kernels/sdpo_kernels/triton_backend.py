"""Triton backend: thin launchers that check shapes and run the kernels.

Module API identical to `reference.py`: `forward(...) -> (loss, RowStats)` and
`backward(...) -> grad`, on [N, V] or [B, T, V] row views of any strides (no copies are made;
`logits[:, :-1]` is read in place). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

`forward_launches` / `backward_launches` return what `forward` / `backward` launch (kernel, grid,
every argument by name) without launching it: the cost report compiles exactly that.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import triton

from .config import TAIL_LOG_FLOOR, LossConfig
from .stats import RowStats, check_grad_out
from .triton_grad import grad_kernel
from .triton_lse import lse_forward_kernel
from .triton_topk import topk_forward_kernel

# The top-K forward's launch shape, per Triton version (the compilers allocate its registers
# differently). Its once-per-row selection code issues the same instructions per warp at any warp
# count, so fewer warps per row cost less of it, and more rows in flight per SM hide more of its
# latency; per thread a block is BLOCK_V / (32 * warps) entries. Chosen by the cost report (sm_90a,
# bf16, K = 100, 2026-12-07; V = 32000, tail, forward static / latency-aware ratio to the HBM floor,
# H200), against 4 warps, BLOCK_V 2048 (96 registers under 3.9, 128 under 3.6):
# - Triton >= 3.9: 2 warps, BLOCK_V 2048, 8 CTAs of 128 registers per SM: 1.83x / 2.26x -> 1.46x / 2.11x
#   with the one-layout expansion, measured together (1 warp, BLOCK_V 1024: 1.66x / 1.87x, static over
#   the 1.6x the project aims for);
# - Triton 3.6 (and the untested 3.7, 3.8): 1 warp, BLOCK_V 1024, 16 CTAs of 128 registers per SM:
#   1.93x / 3.46x -> 1.49x / 1.75x (2 warps: 1.57x / 2.62x).
# (The current figures are in bench/results/cost-report*-2026-12-07.md.)
# The selection walks its recorded runs in chunks of TOPK_CHUNK entries (one run per thread; twice or
# half that cost more in the report) and counts more than a tile of candidates in chunks of the same
# size. A selection over at most TOPK_TILE candidates (the common case) holds them in registers, one
# tile, through its search and compaction (a tile of 256 under 3.9 at 2 warps sends many mid-row
# selections to the chunked path: 1.77x / 3.70x; at 1 warp and BLOCK_V 1024, 256 is the better).
# Compaction runs one candidate per thread (TOPK_COMPACT_CHUNK: the compaction's two scans over wider
# chunks set the kernel's register peak under Triton 3.6).
_TRITON_3_9 = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9)
TOPK_WARPS = 2 if _TRITON_3_9 else 1
TOPK_BLOCK_V = 2048 if _TRITON_3_9 else 1024
# Entries per thread-owned run of a top-K block (one 16-byte load of bf16 logits).
TOPK_RUN = 8
TOPK_CHUNK = 32 * TOPK_WARPS * TOPK_RUN  # one run per thread
TOPK_TILE = 512 if _TRITON_3_9 else 256
TOPK_COMPACT_CHUNK = 32 * TOPK_WARPS
# The support (K entries) is read back 128 at a time (as at 4 warps, where this was 32 * warps): every
# K > 128 compiles to the same code, and a support of K <= 128 (a chunk of next_pow2(K)) is read once
# and held in registers through its three passes.
TOPK_SUPPORT_CHUNK = 128
# Vocabulary entries per iteration of the LSE forward (4 warps: 16 per thread; 5 CTAs per SM where 8
# warps fit 2, a shorter latency-aware figure in the cost report) and of the gradient (8 warps).
LSE_BLOCK_V = 2048
LSE_WARPS = 4
STREAM_BLOCK_V = 4096
# The gradient's sparse entries (the support) are written in chunks of at most this many: any K up to
# V compiles to the same tile (a next_pow2(K) tile was 262,144 entries per program at K = V = 151936).
GRAD_SPARSE_CHUNK = 1024
# A mid-row tightening of the candidates keeps between K and tighten_keep(K) = K' of them (the
# bisection stops as soon as the count falls in that range). It runs whenever the runs recorded
# since the last one would exceed one block's worth. Both chosen by the cost report: a looser keep
# (2K') or room for more runs (+K' or +2K') leave the threshold lower for longer, and the extra
# candidates cost more than the fewer tightenings save.


# After a block that leaves more than TOPK_RUNS_HIGH of the recorded runs' room filled, the candidates
# are tightened at once: a block that would overflow the room is streamed again after the tightening,
# and a watermark below the room spares most of those second reads. 3/4 is the cost report's best of
# 1/2 to 1 at BLOCK_V 2048 (V = 32000: 2.0 second reads per row -> 0.26, forward latency-aware 2.00x ->
# 1.91x, H100, 4 warps); at BLOCK_V 1024 (128 runs' room) 5/8 (Triton 3.6, V = 32000, tail: H100
# latency-aware 1.53x -> 1.50x, H200 1.74x -> 1.71x). There K >= 97 fills 3/4 of the room in the first
# block already, so every row tightens right after it.
TOPK_RUNS_HIGH = 0.75 if _TRITON_3_9 else 0.625


def tighten_keep(topk: int) -> int:
    return triton.next_power_of_2(topk)


# Floating-point contraction (a*b + c -> FFMA) pinned for every launch: Triton 3.9 defaults it on and
# warns that 3.10 turns it off, which would change every kernel's rounding (and its instruction mix).
# The cost report compiles with the same option.
FP_FUSION = True

# The top-K forward's register cap: 128 fits TOPK_PROGRAMS_PER_SM CTAs per SM (8 of 2 warps, 16 of
# 1 warp). Measured by the cost report (sm_90a, K = 100, 2026-12-07): no spilled local memory; Triton
# 3.9 keeps a few loop invariants of the selection code in a stack frame (48 bytes, 35 LDL/STL, none in
# the stream), 3.6 at 1 warp none. Triton 3.6 at 2 warps: 120, 136 or 144 (7 CTAs) were no better.
TOPK_MAX_REGISTERS = 128

# Persistent top-K programs per SM, each with its own candidate scratch (~28 KB at K = 100 and BLOCK_V
# 2048, ~15 KB at 1024); rows are handed out by a counter, so programs beyond what fits on an SM only idle.
TOPK_PROGRAMS_PER_SM = 8 if _TRITON_3_9 else 16
TOPK_SCRATCH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch: `kernel[grid](**args, num_warps=num_warps)`; absent pointers are None.

    `run()` can be repeated (timing loops, CUDA-graph replay): it first zeroes the `zeroed` tensors
    (the top-K forward's row counter) on the launch's stream, then launches on the device of the
    tensors (not the current CUDA device).
    """

    kernel: triton.runtime.JITFunction
    grid: tuple[int, ...]
    args: dict[str, object] = field(repr=False)
    num_warps: int
    zeroed: tuple[torch.Tensor, ...] = field(default=(), repr=False)
    max_registers: int | None = None  # ptxas's per-thread register cap (Triton's `maxnreg`), None: its choice

    @property
    def device(self) -> torch.device:
        return next(v.device for v in self.args.values() if isinstance(v, torch.Tensor))

    def run(self) -> None:
        device = self.device
        guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with guard:
            for t in self.zeroed:
                t.zero_()
            options = {} if self.max_registers is None else {"maxnreg": self.max_registers}
            self.kernel[self.grid](**self.args, num_warps=self.num_warps, enable_fp_fusion=FP_FUSION, **options)


def _block(n_cols: int, cap: int, floor: int = 16) -> int:
    return max(floor, min(cap, triton.next_power_of_2(n_cols)))


def _divergence_args(config: LossConfig) -> dict:
    return dict(alpha=config.alpha, DIVERGENCE=config.divergence)


def _check(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() not in (2, 3) or teacher.shape != student.shape:
        raise ValueError(
            f"expected [N, V] or [B, T, V] student and teacher rows, got {tuple(student.shape)}, {tuple(teacher.shape)}"
        )
    if student.dtype == torch.float64:
        raise ValueError("the triton backend takes float32/bfloat16/float16 logits; float64 needs backend='reference'")
    if student.shape[-1] >= 2**31:
        raise ValueError("vocabulary sizes >= 2**31 are not supported")


def _wide_columns(vocab: int, *col_strides: int) -> bool:
    """Whether a column offset `col * stride` can pass int32 (e.g. column-major logits `(W @ H.T).T`):
    the kernels then compute column offsets in int64 (a compile-time switch, so the common unit-stride
    layout keeps its int32 arithmetic)."""
    return (vocab - 1) * max(col_strides) >= 2**31


def _row_layout(student: torch.Tensor, teacher: torch.Tensor) -> dict:
    """Row strides of two same-shape [N, V] / [B, T, V] views, as the kernels' `row_offset` takes them,
    and WIDE_COLS (`_wide_columns`)."""

    def strides(x: torch.Tensor) -> tuple[int, int]:
        return (0, x.stride(0)) if x.dim() == 2 else (x.stride(0), x.stride(1))

    (s_outer, s_inner), (t_outer, t_inner) = strides(student), strides(teacher)
    return dict(
        WIDE_COLS=_wide_columns(student.shape[-1], student.stride(-1), teacher.stride(-1)),
        rows_inner=max(1, student.shape[-2]),
        stride_s_outer=s_outer,
        stride_s_inner=s_inner,
        stride_s_col=student.stride(-1),
        stride_t_outer=t_outer,
        stride_t_inner=t_inner,
        stride_t_col=teacher.stride(-1),
    )


def _bf16_pairs_allowed(*rows: torch.Tensor | None) -> bool:
    """Whether the top-K forward may stream these logits (the teacher: None when not streamed) as int32
    pairs of bf16 entries (one integer op per entry to float32 instead of 1.5): bf16, unit column
    stride, V a multiple of TOPK_RUN (the loads mask whole runs), every row start 4-byte aligned."""
    for x in rows:
        if x is None:
            continue
        if x.dtype != torch.bfloat16 or x.stride(-1) != 1 or x.shape[-1] % TOPK_RUN:
            return False
        if x.data_ptr() % 4 or any(s % 2 for s in x.stride()[:-1]):
            return False
    return True


def _topk_programs(n_rows: int, device: torch.device, scratch_floats: int) -> int:
    """Persistent programs: a few per SM, fewer when their scratch (scratch_floats each) would pass
    TOPK_SCRATCH_BYTES (large K: the candidate scratch grows with K)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter (or the cost report's meta tensors): an H100's 132 SMs
        sms = 132 if device.type == "meta" else 1
    return max(1, min(n_rows, sms * TOPK_PROGRAMS_PER_SM, TOPK_SCRATCH_BYTES // (4 * scratch_floats)))


def forward_launches(
    student: torch.Tensor,
    teacher: torch.Tensor,
    completion_ids: torch.Tensor | None,
    old_logps: torch.Tensor | None,
    config: LossConfig,
) -> tuple[list[KernelLaunch], torch.Tensor, RowStats]:
    """The launches of `forward`, with the (empty) loss and row stats they will fill."""
    _check(student, teacher)
    vocab = student.shape[-1]
    n = student.numel() // vocab
    dev = student.device
    f32 = dict(dtype=torch.float32, device=dev)
    loss = torch.empty(n, **f32)
    lse = torch.empty(n, **f32)
    dense = torch.empty(n, **f32)
    use_is = config.is_clip is not None
    common = dict(
        student_ptr=student,
        teacher_ptr=teacher,
        completion_ids_ptr=completion_ids.contiguous() if completion_ids is not None else None,
        old_logps_ptr=old_logps.contiguous() if use_is else None,
        loss_ptr=loss,
        lse_ptr=lse,
        dense_ptr=dense,
        n_cols=vocab,
        **_row_layout(student, teacher),
        inv_temp=config.inv_temperature,
        is_clip=config.is_clip if use_is else 1.0,
        **_divergence_args(config),
    )
    if n == 0:
        return [], loss, RowStats(lse, dense)

    if config.mode == "topk_logits":
        k_pow2 = triton.next_power_of_2(config.topk)
        block = _block(vocab, TOPK_BLOCK_V)
        # Recorded runs: one block's worth; flat candidates: the tightened survivors plus every entry
        # of the recorded runs.
        keep = tighten_keep(config.topk)
        runs_cap = block // TOPK_RUN
        # No more than V either (each entry becomes a candidate at most once; rounded up to 16 entries
        # for aligned accesses): at K near V, K' = next_pow2(K) would nearly double the scratch.
        flat_cap = min(keep + TOPK_RUN * runs_cap, -(-vocab // 16) * 16)
        tile = min(TOPK_TILE, block)
        flat_cap = max(flat_cap, tile)  # the selection reads a whole tile of each region, unmasked
        scratch_floats = 2 * runs_cap + 3 * flat_cap
        programs = _topk_programs(n, dev, scratch_floats)
        index = torch.empty(n, config.topk, dtype=torch.int64, device=dev)
        coef = torch.empty(n, config.topk, **f32)
        row_counter = torch.empty(1, dtype=torch.int32, device=dev)  # zeroed by every run()
        launch = KernelLaunch(
            kernel=topk_forward_kernel,
            grid=(programs,),
            args=dict(
                common,
                index_ptr=index,
                coef_ptr=coef,
                scratch_ptr=torch.empty(programs, scratch_floats, **f32),
                row_counter_ptr=row_counter,
                counters_ptr=None,  # (tests of the cost report's replay set it and COUNT_DECISIONS)
                n_rows=n,
                topk=config.topk,
                tighten_keep=keep,
                tail_floor=TAIL_LOG_FLOOR,
                K_POW2=k_pow2,
                BLOCK_V=block,
                RUNS_CAP=runs_cap,
                RUNS_HIGH=int(runs_cap * TOPK_RUNS_HIGH),
                FLAT_CAP=flat_cap,
                CHUNK=min(TOPK_CHUNK, block),
                TILE=tile,
                COMPACT_CHUNK=min(TOPK_COMPACT_CHUNK, block),
                SUPPORT_CHUNK=min(TOPK_SUPPORT_CHUNK, k_pow2),
                ADD_TAIL=config.add_tail,
                RUN=TOPK_RUN,
                SCALE_Z=config.inv_temperature != 1.0,  # T = 1: no multiply per entry
                COUNT_DECISIONS=False,
                PAIRS=_bf16_pairs_allowed(student, teacher if config.add_tail else None),
            ),
            num_warps=TOPK_WARPS,
            zeroed=(row_counter,),
            max_registers=TOPK_MAX_REGISTERS,
        )
        return [launch], loss, RowStats(lse, dense, index, coef)

    full = config.mode == "full_logits"
    index = None if full else torch.empty(n, 1, dtype=torch.int64, device=dev)
    coef = None if full else torch.empty(n, 1, **f32)
    lse_teacher = torch.empty(n, **f32) if full else None
    weight = torch.empty(n, **f32) if full else None
    launch = KernelLaunch(
        kernel=lse_forward_kernel,
        grid=(n,),
        args=dict(
            common,
            index_ptr=index,
            coef_ptr=coef,
            lse_teacher_ptr=lse_teacher,
            weight_ptr=weight,
            BLOCK_V=_block(vocab, LSE_BLOCK_V),
            FULL=full,
        ),
        num_warps=LSE_WARPS,
    )
    if full:
        return [launch], loss, RowStats(lse, dense, lse_teacher=lse_teacher, is_weight=weight)
    return [launch], loss, RowStats(lse, dense, index, coef)


def forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    completion_ids: torch.Tensor | None,
    old_logps: torch.Tensor | None,
    config: LossConfig,
) -> tuple[torch.Tensor, RowStats]:
    """Per-token loss [N] float32 and the row stats; see `reference.forward`."""
    launches, loss, stats = forward_launches(student, teacher, completion_ids, old_logps, config)
    for launch in launches:
        launch.run()
    return loss, stats


def backward_launches(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    stats: RowStats,
    grad_loss: torch.Tensor,
    config: LossConfig,
    out: torch.Tensor | None = None,
) -> tuple[list[KernelLaunch], torch.Tensor]:
    """The launches of `backward`, with the gradient buffer they will fill."""
    vocab = student.shape[-1]
    n = student.numel() // vocab
    grad = check_grad_out(out, student)
    if n == 0:
        return [], grad
    full = config.mode == "full_logits"
    if full and (teacher is None or teacher.shape != student.shape):
        raise ValueError("full_logits backward needs the teacher logits")
    n_sparse = 0 if stats.sparse_index is None else stats.sparse_index.shape[1]
    launch = KernelLaunch(
        kernel=grad_kernel,
        grid=(n,),
        args=dict(
            student_ptr=student,
            teacher_ptr=teacher if full else None,
            grad_loss_ptr=grad_loss.float().contiguous(),
            grad_ptr=grad,
            lse_ptr=stats.lse_student,
            dense_ptr=stats.dense_coef,
            index_ptr=stats.sparse_index if n_sparse else None,
            coef_ptr=stats.sparse_coef if n_sparse else None,
            lse_teacher_ptr=stats.lse_teacher if full else None,
            weight_ptr=stats.is_weight if full else None,
            n_cols=vocab,
            n_sparse=n_sparse,
            **_row_layout(student, teacher if full else student),
            inv_temp=config.inv_temperature,
            **_divergence_args(config),
            BLOCK_V=_block(vocab, STREAM_BLOCK_V),
            SPARSE_CHUNK=min(GRAD_SPARSE_CHUNK, triton.next_power_of_2(n_sparse)) if n_sparse else 0,
            HAS_DENSE=not (config.mode == "topk_logits" and not config.add_tail),
        ),
        num_warps=8,
    )
    return [launch], grad


def backward(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    stats: RowStats,
    grad_loss: torch.Tensor,
    config: LossConfig,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. the student logits (shape of `student`), student dtype, contiguous.

    `out` (optional) receives it and may be `student` itself: each program reads a block of its row
    before it writes that block, and the sparse entries it writes last need no logits.
    """
    launches, grad = backward_launches(student, teacher, stats, grad_loss, config, out)
    for launch in launches:
        launch.run()
    return grad
