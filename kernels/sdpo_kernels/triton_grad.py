"""Backward kernel: the gradient w.r.t. the student logits from saved row statistics.

dℓ/dlogits_j = g/T · coef_k at j = index_k, else g/T · (dense · p_j [+ w · ∂D/∂a_j in full_logits]),
p = softmax(logits / T) (see `stats.py`). One program per row: a dense streaming pass that reads the student
logits (skipped entirely when dense is identically zero: renormalised top-K) and writes the
gradient, then, after a barrier, the K sparse entries are overwritten with their saved value.
Only full_logits reads the teacher again. Rows whose upstream gradient is 0 get exact zeros.
Absent inputs are None: `index_ptr`/`coef_ptr` without sparse entries (full_logits), `teacher_ptr`,
`lse_teacher_ptr`, `weight_ptr` outside full_logits (the full-vocabulary term is compiled in iff
the teacher LSE is given).
"""

import triton
import triton.language as tl

from .triton_math import divergence_terms, row_offset


@triton.jit
def _sparse_chunk(index_ptr, coef_ptr, row, n_sparse, k0, SPARSE_CHUNK: tl.constexpr):
    """The saved sparse entries k0 .. k0 + SPARSE_CHUNK of a row: (positions, in range, indices, values)."""
    k = k0 + tl.arange(0, SPARSE_CHUNK)
    in_k = k < n_sparse
    idx = tl.load(index_ptr + row * n_sparse + k, mask=in_k, other=0)
    coef = tl.load(coef_ptr + row * n_sparse + k, mask=in_k, other=0.0)
    return k, in_k, idx, coef


@triton.jit
def grad_kernel(
    student_ptr,
    teacher_ptr,
    grad_loss_ptr,
    grad_ptr,
    lse_ptr,
    dense_ptr,
    index_ptr,
    coef_ptr,
    lse_teacher_ptr,
    weight_ptr,
    n_cols,
    n_sparse,
    rows_inner,
    stride_s_outer,
    stride_s_inner,
    stride_s_col,
    stride_t_outer,
    stride_t_inner,
    stride_t_col,
    inv_temp,
    alpha,
    BLOCK_V: tl.constexpr,
    SPARSE_CHUNK: tl.constexpr,
    HAS_DENSE: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    WIDE_COLS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row_offset(row, rows_inner, stride_s_outer, stride_s_inner)
    grad_row = grad_ptr + row * n_cols
    out_ty = grad_ptr.dtype.element_ty
    g = tl.load(grad_loss_ptr + row).to(tl.float32) * inv_temp
    lse = tl.load(lse_ptr + row)
    dense = tl.load(dense_ptr + row)
    if lse_teacher_ptr is not None:
        teacher_row = teacher_ptr + row_offset(row, rows_inner, stride_t_outer, stride_t_inner)
        lse_t = tl.load(lse_teacher_ptr + row)
        w = tl.load(weight_ptr + row)
    # Absent (-inf) entries get exactly zero, except in a row whose student LSE is NaN (NaN or +inf
    # logits): that row's gradient is NaN throughout (docs/kernels.md, non-finite inputs).
    absent = tl.where(lse != lse, float("nan"), 0.0)
    # A chunk of at most one sparse entry per thread (K <= 256) is loaded now (the saved indices and
    # values are inputs): its round trip passes during the dense stream instead of following its
    # barrier. A wider chunk would hold its registers through the stream (K = 4096: 40 -> 48 registers,
    # 6 -> 5 CTAs per SM), so it is loaded after the barrier.
    PREFETCH: tl.constexpr = SPARSE_CHUNK <= 256
    if index_ptr is not None:
        if PREFETCH:
            k, in_k, idx, coef = _sparse_chunk(index_ptr, coef_ptr, row, n_sparse, 0, SPARSE_CHUNK)
        else:  # (placeholders: the loop below loads every chunk)
            k = tl.arange(0, SPARSE_CHUNK)
            in_k = k < n_sparse
            idx = tl.zeros([SPARSE_CHUNK], tl.int64)
            coef = tl.zeros([SPARSE_CHUNK], tl.float32)
    block = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + block
        if WIDE_COLS:
            offs = offs.to(tl.int64)
        in_row = offs < n_cols
        if HAS_DENSE:
            z = tl.load(student_row + offs * stride_s_col, mask=in_row, other=float("-inf")).to(tl.float32)
            a = z * inv_temp - lse
            p = tl.exp(a)
            grad = tl.where(p > 0, dense * p, absent)
            if lse_teacher_ptr is not None:
                u = tl.load(teacher_row + offs * stride_t_col, mask=in_row, other=float("-inf")).to(tl.float32)
                _, d_terms = divergence_terms(a, u * inv_temp - lse_t, alpha, DIVERGENCE)
                grad += w * d_terms
            grad = tl.where(g == 0.0, 0.0, g * grad)
        else:  # renormalised top-K: zero off the support (NaN in a bad row, as above)
            grad = tl.zeros([BLOCK_V], tl.float32) + tl.where(g == 0.0, 0.0, absent)
        tl.store(grad_row + offs, grad.to(out_ty), mask=in_row)
    if index_ptr is not None:
        tl.debug_barrier()  # the dense stores above must land before the sparse entries are rewritten
        for k0 in range(0, n_sparse, SPARSE_CHUNK):
            if (k0 > 0) | (not PREFETCH):
                k, in_k, idx, coef = _sparse_chunk(index_ptr, coef_ptr, row, n_sparse, k0, SPARSE_CHUNK)
            val = tl.where(g == 0.0, 0.0, g * coef)
            # Bounds-masked: the saved indices are in range by construction, a store outside the row never.
            tl.store(grad_row + idx, val.to(out_ty), mask=in_k & (idx >= 0) & (idx < n_cols))
