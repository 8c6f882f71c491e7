"""Triton backend: thin launchers that check shapes and run the kernels.

Module API identical to `reference.py`: `forward(...) -> (loss, RowStats)` and
`backward(...) -> grad`, on [N, V] or [B, T, V] row views of any strides (no copies are made;
`logits[:, :-1]` is read in place). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math

import torch
import triton

from .config import TAIL_LOG_FLOOR, LossConfig
from .stats import RowStats, check_grad_out
from .triton_grad import grad_kernel
from .triton_lse import lse_forward_kernel
from .triton_topk import topk_forward_kernel

# Vocabulary block per iteration. The top-K kernel sorts a block per step: its block is kept
# at a few K'; the LSE and gradient kernels are pure streams and take wider blocks.
TOPK_BLOCK_V = 1024
STREAM_BLOCK_V = 4096


def _block(n_cols: int, cap: int, floor: int = 16) -> int:
    return max(floor, min(cap, triton.next_power_of_2(n_cols)))


def _alpha_args(config: LossConfig) -> tuple[float, float, float]:
    a = config.alpha
    log_alpha = math.log(a) if a > 0 else 0.0
    log1m_alpha = math.log1p(-a) if a < 1 else 0.0
    return a, log_alpha, log1m_alpha


def _check(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() not in (2, 3) or teacher.shape != student.shape:
        raise ValueError(
            f"expected [N, V] or [B, T, V] student and teacher rows, got {tuple(student.shape)}, {tuple(teacher.shape)}"
        )
    if student.dtype == torch.float64:
        raise ValueError("the triton backend takes float32/bfloat16/float16 logits; float64 needs backend='reference'")
    if student.shape[-1] >= 2**31:
        raise ValueError("vocabulary sizes >= 2**31 are not supported")


def _row_layout(student: torch.Tensor, teacher: torch.Tensor) -> dict:
    """Row strides of two same-shape [N, V] / [B, T, V] views, as the kernels' `row_offset` takes them."""

    def strides(x: torch.Tensor) -> tuple[int, int]:
        return (0, x.stride(0)) if x.dim() == 2 else (x.stride(0), x.stride(1))

    (s_outer, s_inner), (t_outer, t_inner) = strides(student), strides(teacher)
    return dict(
        rows_inner=max(1, student.shape[-2]),
        stride_s_outer=s_outer,
        stride_s_inner=s_inner,
        stride_s_col=student.stride(-1),
        stride_t_outer=t_outer,
        stride_t_inner=t_inner,
        stride_t_col=teacher.stride(-1),
    )


def forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    completion_ids: torch.Tensor | None,
    old_logps: torch.Tensor | None,
    config: LossConfig,
) -> tuple[torch.Tensor, RowStats]:
    """Per-token loss [N] float32 and the row stats; see `reference.forward`."""
    _check(student, teacher)
    vocab = student.shape[-1]
    n = student.numel() // vocab
    dev = student.device
    f32 = dict(dtype=torch.float32, device=dev)
    loss = torch.empty(n, **f32)
    lse = torch.empty(n, **f32)
    dense = torch.empty(n, **f32)
    has_is = config.is_clip is not None
    ids = completion_ids.contiguous() if completion_ids is not None else lse  # dummy pointer when unused
    old = old_logps.contiguous() if has_is else lse
    alpha, log_alpha, log1m_alpha = _alpha_args(config)
    common = dict(
        n_cols=vocab,
        **_row_layout(student, teacher),
        inv_temp=config.inv_temperature,
        alpha=alpha,
        log_alpha=log_alpha,
        log1m_alpha=log1m_alpha,
        is_clip=config.is_clip if has_is else 1.0,
        ALPHA_KIND=config.alpha_kind,
        HAS_IS=has_is,
    )
    if n == 0:
        return loss, RowStats(lse, dense)

    if config.mode == "topk_logits":
        # At least 2: Triton 3.6's tl.topk(x, 1) reduces to a scalar and fails to compile.
        k_pow2 = max(2, triton.next_power_of_2(config.topk))
        index = torch.empty(n, config.topk, dtype=torch.int64, device=dev)
        coef = torch.empty(n, config.topk, **f32)
        scratch = torch.empty(n, k_pow2, dtype=torch.int64, device=dev)  # candidate compaction, O(N·K)
        topk_forward_kernel[(n,)](
            student, teacher, ids, old, loss, lse, dense, index, coef, scratch,
            topk=config.topk,
            tail_floor=TAIL_LOG_FLOOR,
            K_POW2=k_pow2,
            BLOCK_V=max(k_pow2, _block(vocab, TOPK_BLOCK_V)),
            ADD_TAIL=config.add_tail,
            num_warps=8 if k_pow2 >= 64 else 4,
            **common,
        )  # fmt: skip
        return loss, RowStats(lse, dense, index, coef)

    full = config.mode == "full_logits"
    index = torch.empty(n, 1, dtype=torch.int64, device=dev)
    coef = torch.empty(n, 1, **f32)
    lse_teacher = torch.empty(n, **f32) if full else None
    weight = torch.empty(n, **f32) if full else None
    lse_forward_kernel[(n,)](
        student, teacher, ids, old, loss, lse, dense, index, coef,
        lse_teacher if full else lse, weight if full else lse,
        BLOCK_V=_block(vocab, STREAM_BLOCK_V),
        FULL=full,
        num_warps=8,
        **common,
    )  # fmt: skip
    if full:
        return loss, RowStats(lse, dense, lse_teacher=lse_teacher, is_weight=weight)
    return loss, RowStats(lse, dense, index, coef)


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
    vocab = student.shape[-1]
    n = student.numel() // vocab
    grad = check_grad_out(out, student)
    if n == 0:
        return grad
    full = config.mode == "full_logits"
    if full and (teacher is None or teacher.shape != student.shape):
        raise ValueError("full_logits backward needs the teacher logits")
    teacher_arg = teacher if full else student
    n_sparse = 0 if stats.sparse_index is None else stats.sparse_index.shape[1]
    alpha, log_alpha, log1m_alpha = _alpha_args(config)
    grad_kernel[(n,)](
        student, teacher_arg, grad_loss.float().contiguous(), grad,
        stats.lse_student, stats.dense_coef,
        stats.sparse_index if n_sparse else stats.lse_student,
        stats.sparse_coef if n_sparse else stats.lse_student,
        stats.lse_teacher if full else stats.lse_student,
        stats.is_weight if full else stats.lse_student,
        n_cols=vocab,
        n_sparse=n_sparse,
        **_row_layout(student, teacher_arg),
        inv_temp=config.inv_temperature,
        alpha=alpha,
        log_alpha=log_alpha,
        log1m_alpha=log1m_alpha,
        BLOCK_V=_block(vocab, STREAM_BLOCK_V),
        SPARSE_POW2=triton.next_power_of_2(n_sparse) if n_sparse else 0,
        HAS_DENSE=not (config.mode == "topk_logits" and not config.add_tail),
        FULL=full,
        ALPHA_KIND=config.alpha_kind,
        num_warps=8,
    )  # fmt: skip
    return grad
