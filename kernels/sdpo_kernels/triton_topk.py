"""Top-K logit distillation forward kernel (mode "topk_logits").

One program per token row streams the vocabulary once, in blocks of BLOCK_V, and keeps:
- the online LSE of the scaled student and teacher logits;
- the student's running top-K' (K' = next power of two >= K) as sorted int64 keys
  (`order_key`: value, then lowest index first), merged block by block: the block's top-K'
  (descending) against the buffer (ascending) gives, elementwise, the K' largest (max) and the
  K' evicted (min) of their union (one bitonic half-cleaner), then one sort of K' keys. Only
  block keys above the buffer's smallest can enter: a block without any skips the merge, one
  with at most K' compacts them (cumsum slots, a K'-slot scratch row) and sorts K' keys instead
  of running the top-K' network over the whole block;
- with the tail bucket, the exact mass outside the support, Σ_{not S} e^z and Σ_{not S} e^u:
  every element that leaves (or never enters) the buffer is added once, the teacher values of
  evicted keys re-read by index (cache hits). No 1 - Σp cancellation.
At the end it gathers the teacher at the K support indices and writes the per-token loss and
the row statistics for the backward pass (see `stats.py`). Extra memory: O(K) per row.
"""

import triton
import triton.language as tl

from .triton_math import decode_key, divergence_terms, importance_weight, online_lse_step, order_key, row_offset


@triton.jit
def topk_forward_kernel(
    student_ptr,
    teacher_ptr,
    ids_ptr,
    old_ptr,
    loss_ptr,
    lse_ptr,
    dense_ptr,
    index_ptr,
    coef_ptr,
    scratch_ptr,
    n_cols,
    rows_inner,
    stride_s_outer,
    stride_s_inner,
    stride_s_col,
    stride_t_outer,
    stride_t_inner,
    stride_t_col,
    topk,
    inv_temp,
    alpha,
    log_alpha,
    log1m_alpha,
    is_clip,
    tail_floor,
    K_POW2: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ADD_TAIL: tl.constexpr,
    ALPHA_KIND: tl.constexpr,
    HAS_IS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row_offset(row, rows_inner, stride_s_outer, stride_s_inner)
    teacher_row = teacher_ptr + row_offset(row, rows_inner, stride_t_outer, stride_t_inner)
    neg_inf = float("-inf")
    low32 = (tl.full([], 1, tl.int64) << 32) - 1
    # Padding key: (-inf, index 2**32 - 1) sorts below every real key, decodes to an index >= V.
    pad_key = order_key(tl.full([], neg_inf, tl.float32), low32)
    block = tl.arange(0, BLOCK_V)
    k_pos = tl.arange(0, K_POW2)
    scratch_row = scratch_ptr + row * K_POW2

    buf = tl.full([K_POW2], 0, tl.int64) + pad_key  # ascending
    m_z = tl.full([], neg_inf, tl.float32)
    m_u = tl.full([], neg_inf, tl.float32)
    s_z = tl.zeros([], tl.float32)
    s_u = tl.zeros([], tl.float32)
    tail_z = tl.zeros([], tl.float32)  # Σ_{not S} e^(z - shift_z), same shift as s_z
    tail_u = tl.zeros([], tl.float32)
    shift_z = tl.zeros([], tl.float32)
    shift_u = tl.zeros([], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + block
        in_row = offs < n_cols
        z = tl.load(student_row + offs * stride_s_col, mask=in_row, other=neg_inf).to(tl.float32) * inv_temp
        u = tl.load(teacher_row + offs * stride_t_col, mask=in_row, other=neg_inf).to(tl.float32) * inv_temp
        m_z, s_z, shift_z, rescale_z, e_z = online_lse_step(m_z, s_z, z)
        m_u, s_u, shift_u, rescale_u, e_u = online_lse_step(m_u, s_u, u)

        keys = tl.where(in_row, order_key(z, offs), pad_key)
        if ADD_TAIL:
            tail_z = tail_z * rescale_z
            tail_u = tail_u * rescale_u
        # Only keys above the buffer's smallest can enter it. Once the running top-K' is high that
        # is a handful per block (about K'/b in block b of iid logits), or none: such blocks skip
        # the sorting network over the whole block, the kernel's costly part.
        enters = keys > tl.min(buf, 0)
        n_enter = tl.sum(enters.to(tl.int32), 0)
        if n_enter > 0:
            if n_enter <= K_POW2:
                # Compact the candidates into this row's K'-slot scratch (through L2) and sort K'.
                slot = tl.cumsum(enters.to(tl.int32), 0) - 1
                tl.store(scratch_row + slot, keys, mask=enters)
                tl.debug_barrier()  # the stores land before any thread reads the scratch back
                top = tl.load(scratch_row + k_pos, mask=k_pos < n_enter, other=pad_key)
                tl.debug_barrier()  # and the next block's stores wait for these loads
                top = tl.sort(top, descending=True)
                below = ~enters  # block entries that never enter the buffer
            else:
                top = tl.topk(keys, K_POW2)  # descending
                below = keys < tl.min(top, 0)
            if ADD_TAIL:
                tail_z += tl.sum(tl.where(below, e_z, 0.0), 0)
                tail_u += tl.sum(tl.where(below, e_u, 0.0), 0)
                evicted_val, evicted_idx = decode_key(tl.minimum(buf, top))
                real = evicted_idx < n_cols
                tail_z += tl.sum(tl.where(real, tl.exp(evicted_val - shift_z), 0.0), 0)
                u_ev = tl.load(teacher_row + evicted_idx * stride_t_col, mask=real, other=neg_inf).to(tl.float32)
                tail_u += tl.sum(tl.exp(u_ev * inv_temp - shift_u), 0)
            buf = tl.sort(tl.maximum(buf, top))  # ascending
        elif ADD_TAIL:
            tail_z += tl.sum(e_z, 0)  # masked lanes hold e = 0
            tail_u += tl.sum(e_u, 0)

    lse_z = m_z + tl.log(s_z)
    lse_u = m_u + tl.log(s_u)
    pos = tl.arange(0, K_POW2)
    in_support = pos >= K_POW2 - topk
    buf_val, idx = decode_key(buf)
    z_s = tl.where(in_support, buf_val, neg_inf)
    u_s = tl.load(teacher_row + idx * stride_t_col, mask=in_support, other=neg_inf).to(tl.float32) * inv_temp

    if ADD_TAIL:
        # Buffer entries below the K-th are tail too (K < K').
        spare = (~in_support) & (idx < n_cols)
        tail_z += tl.sum(tl.where(spare, tl.exp(buf_val - shift_z), 0.0), 0)
        u_spare = tl.load(teacher_row + idx * stride_t_col, mask=spare, other=neg_inf).to(tl.float32)
        tail_u += tl.sum(tl.exp(u_spare * inv_temp - shift_u), 0)
        a = z_s - lse_z
        b = u_s - lse_u
        a_tail = shift_z + tl.log(tail_z) - lse_z
        b_tail = shift_u + tl.log(tail_u) - lse_u
        floored = a_tail <= tail_floor  # TRL's floor: no gradient through the tail
        a_tail = tl.maximum(a_tail, tail_floor)
        b_tail = tl.maximum(b_tail, tail_floor)
        tail_term, d_tail = divergence_terms(a_tail, b_tail, alpha, log_alpha, log1m_alpha, ALPHA_KIND)
        d_tail = tl.where(floored, 0.0, d_tail)
    else:
        hi_z = tl.max(z_s, 0)
        a = z_s - (hi_z + tl.log(tl.sum(tl.exp(z_s - hi_z), 0)))
        hi_u = tl.max(u_s, 0)
        b = u_s - (hi_u + tl.log(tl.sum(tl.exp(u_s - hi_u), 0)))
    terms, d_terms = divergence_terms(a, b, alpha, log_alpha, log1m_alpha, ALPHA_KIND)
    loss = tl.sum(terms, 0)
    if ADD_TAIL:
        loss += tail_term
    if HAS_IS:
        w = importance_weight(student_row, stride_s_col, ids_ptr, old_ptr, row, lse_z, inv_temp, is_clip)
        loss = loss * w
        d_terms = d_terms * w
        if ADD_TAIL:
            d_tail = d_tail * w

    p_s = tl.exp(a)
    if ADD_TAIL:
        tail_ratio = tl.where(floored, 0.0, d_tail / tl.exp(a_tail))
        total = tl.sum(d_terms, 0) + d_tail
        dense = tail_ratio - total
        sparse = d_terms - p_s * total
    else:
        dense = tl.zeros([], tl.float32)
        sparse = d_terms - p_s * tl.sum(d_terms, 0)

    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse_z)
    tl.store(dense_ptr + row, dense)
    out = row * topk + pos - (K_POW2 - topk)
    tl.store(index_ptr + out, idx, mask=in_support)
    tl.store(coef_ptr + out, sparse, mask=in_support)
