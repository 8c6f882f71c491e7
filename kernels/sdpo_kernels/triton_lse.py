"""Forward kernel for the modes that need only log-sum-exps: "full_logits" and "sampled_token".

One program per token row. Pass 1 streams both rows for their log-sum-exps (base-2 exps relative
to a running max: one FFMA and one MUFU.EX2 per element, one max and one sum reduction per block).
sampled_token then reads the two logits of the sampled token; full_logits makes a second pass over
the rows (both LSEs are needed before any term of the generalised JSD) for D and Σ ∂D/∂a.
"""

import triton
import triton.language as tl

from .triton_math import LOG2E, divergence_terms, importance_weight, online_max_step, row_offset, sampled_token


@triton.jit
def lse_forward_kernel(
    student_ptr,
    teacher_ptr,
    completion_ids_ptr,
    old_logps_ptr,
    loss_ptr,
    lse_ptr,
    dense_ptr,
    index_ptr,
    coef_ptr,
    lse_teacher_ptr,
    weight_ptr,
    n_cols,
    rows_inner,
    stride_s_outer,
    stride_s_inner,
    stride_s_col,
    stride_t_outer,
    stride_t_inner,
    stride_t_col,
    inv_temp,
    alpha,
    is_clip,
    BLOCK_V: tl.constexpr,
    FULL: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    WIDE_COLS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row_offset(row, rows_inner, stride_s_outer, stride_s_inner)
    teacher_row = teacher_ptr + row_offset(row, rows_inner, stride_t_outer, stride_t_inner)
    neg_inf = float("-inf")
    scale_log2 = inv_temp * LOG2E
    block = tl.arange(0, BLOCK_V)
    max_z = tl.full([], neg_inf, tl.float32)  # of the raw logits
    max_u = tl.full([], neg_inf, tl.float32)
    sum_z = tl.zeros([], tl.float32)  # Σ 2^((x - shift)·scale_log2)
    sum_u = tl.zeros([], tl.float32)
    shift_z = tl.zeros([], tl.float32)
    shift_u = tl.zeros([], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + block
        if WIDE_COLS:
            offs = offs.to(tl.int64)
        in_row = offs < n_cols
        z = tl.load(student_row + offs * stride_s_col, mask=in_row, other=neg_inf).to(tl.float32)
        u = tl.load(teacher_row + offs * stride_t_col, mask=in_row, other=neg_inf).to(tl.float32)
        max_z, shift_z, rescale_z = online_max_step(max_z, tl.max(z, 0), scale_log2)
        max_u, shift_u, rescale_u = online_max_step(max_u, tl.max(u, 0), scale_log2)
        sum_z = sum_z * rescale_z + tl.sum(tl.math.exp2(z * scale_log2 - shift_z * scale_log2), 0)
        sum_u = sum_u * rescale_u + tl.sum(tl.math.exp2(u * scale_log2 - shift_u * scale_log2), 0)
    lse_z = shift_z * inv_temp + tl.log(sum_z)
    lse_u = shift_u * inv_temp + tl.log(sum_u)
    if old_logps_ptr is not None:
        w = importance_weight(
            student_row, stride_s_col, completion_ids_ptr, old_logps_ptr, row, n_cols, lse_z, inv_temp, is_clip
        )
    else:
        w = tl.full([], 1.0, tl.float32)

    if FULL:
        total = tl.zeros([BLOCK_V], tl.float32)
        d_total = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + block
            if WIDE_COLS:
                offs = offs.to(tl.int64)
            in_row = offs < n_cols
            z = tl.load(student_row + offs * stride_s_col, mask=in_row, other=neg_inf).to(tl.float32)
            u = tl.load(teacher_row + offs * stride_t_col, mask=in_row, other=neg_inf).to(tl.float32)
            terms, d_terms = divergence_terms(z * inv_temp - lse_z, u * inv_temp - lse_u, alpha, DIVERGENCE)
            total += terms
            d_total += d_terms
        tl.store(loss_ptr + row, w * tl.sum(total, 0))
        tl.store(dense_ptr + row, -w * tl.sum(d_total, 0))
        tl.store(lse_teacher_ptr + row, lse_u)
        tl.store(weight_ptr + row, w)
    else:
        y, y_ok = sampled_token(completion_ids_ptr, row, n_cols)
        a_y = tl.load(student_row + y * stride_s_col).to(tl.float32) * inv_temp - lse_z
        a_y = tl.where(y_ok, a_y, float("nan"))  # an out-of-range id: a NaN row, index 0
        b_y = tl.load(teacher_row + y * stride_t_col).to(tl.float32) * inv_temp - lse_u
        coef = w * (a_y - b_y)
        tl.store(loss_ptr + row, coef * a_y)
        tl.store(dense_ptr + row, -coef)
        tl.store(index_ptr + row, y)
        tl.store(coef_ptr + row, coef * (1.0 - tl.exp(a_y)))  # the whole gradient at y
    tl.store(lse_ptr + row, lse_z)
