"""Top-K logit distillation forward kernel (mode "topk_logits"): threshold filter, candidate scratch.

Persistent programs; each takes token rows in turn and streams its row once, BLOCK_V entries at a
time (docs/kernels.md walks through the design and its cost):

- Filter. A float32 threshold `thr` that at least K entries already seen reach. An entry at or
  below it cannot be in the top-K (K earlier, i.e. lower-index, entries are at least as large),
  so it goes straight to the tail sums. In the first block thr is the smallest of K' group
  maxima (K' groups, each contributes one entry >= thr: ties there are admitted); afterwards
  only entries strictly above thr pass, one float compare each. A block whose maximum (already
  computed for the log-sum-exp) does not exceed thr skips everything else.
- Candidates. Entries that pass are appended, in index order, to this program's scratch: only
  their vocabulary index (a cumsum gives the slots; one store each). Their values are gathered
  back from the rows when the scratch is next tightened. When a block would overflow the
  scratch, `tighten` selects a new threshold among the candidates (bisection on int32 keys of
  their values, early exit once K..2K' of them reach it) and compacts the survivors in place;
  the evicted ones go to the tail sums. At the end the same routine selects exactly K, ties at
  the K-th value resolved towards the lowest index (the scratch is in index order).
- Sums. Per row only the tail sums Σ_{not S} e^z, Σ_{not S} e^u are kept, as base-2 exps relative
  to a base set by the first block's maximum and raised only when a block's sum overflows (or
  candidates exceed it): no per-block max reduction. One three-operand reduction per block gives
  both tail sums and the candidate count. The support's mass is added at the end, so LSE =
  log(tail + support) and the tail log-probs are -log1p(support / tail): accurate whichever of the
  two is tiny.
Renormalised top-K (no tail) does not stream the teacher at all: it needs u at the support only.
"""

import triton
import triton.language as tl

from .triton_math import LOG2E, divergence_terms, importance_weight, key_value, log1p, ordered_key, row_offset


@triton.jit
def _add3(a0, b0, c0, a1, b1, c1):
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def _exclusive_cumsum(x):
    """Exclusive prefix sum, in row-major order, of a [rows, RUN] int32 tile whose runs are held by one
    thread each: sums along a run stay in the thread, only the run totals are scanned across threads."""
    totals = tl.sum(x, 1)
    return tl.cumsum(x, 1) - x + (tl.cumsum(totals, 0) - totals)[:, None]


@triton.jit
def _max_all(x):
    return tl.max(tl.max(x, 1), 0)


@triton.jit
def _sum_all(x):
    return tl.sum(tl.sum(x, 1), 0)


@triton.jit
def _sum3_all(a, b, c):
    """Sums of three [rows, RUN] tiles in one reduction (one round of shuffles and barriers)."""
    a, b, c = tl.reduce((a, b, c), 1, _add3)
    return tl.reduce((a, b, c), 0, _add3)


@triton.jit
def _raise_base(base, total, top):
    """Sums of 2^(x - base): raise base to top (in the same base-2 units) if top is above it."""
    new_base = tl.maximum(base, top)  # top = -inf: unchanged
    return new_base, total * tl.math.exp2(base - new_base)


@triton.jit
def _rebase(base, total, stale, block_max):
    """A stale base moves to a finite block maximum: down too while nothing has been summed."""
    reset = stale & (total == 0.0) & (block_max > float("-inf"))
    return _raise_base(tl.where(reset, block_max, base), total, block_max)


@triton.jit
def _finite_or_zero(x):
    return tl.where((x == float("-inf")) | (x == float("inf")), 0.0, x)


@triton.jit
def _count_at_least(cand, n_cand, key, SCRATCH: tl.constexpr, CHUNK: tl.constexpr):
    """How many of the first n_cand candidates have ordered_key(z) >= key."""
    lanes = tl.arange(0, CHUNK)
    count = 0
    for start in range(0, n_cand, CHUNK):
        offs = start + lanes
        z = tl.load(cand + SCRATCH + offs, mask=offs < n_cand, other=float("-inf"))
        count += tl.sum(((ordered_key(z) >= key) & (offs < n_cand)).to(tl.int32), 0)
    return count


@triton.jit
def tighten(
    cand,
    n_cand,
    n_ready,
    student_row,
    teacher_row,
    stride_s_col,
    stride_t_col,
    inv_temp,
    thr,
    keep_lo,
    keep_hi,
    tail_z,
    tail_u,
    base_z,
    base_u,
    u_scale_log2,
    SCRATCH: tl.constexpr,
    CHUNK: tl.constexpr,
    STREAM_TEACHER: tl.constexpr,
):
    """Keep between keep_lo and keep_hi of the n_cand candidates, the largest ones.

    `cand` is this program's scratch: three float32 rows of SCRATCH slots, the vocabulary index
    (int32 bits), z and the raw teacher logit of each candidate, in index order. The stream appends
    indices only (one store per candidate); the values of candidates n_ready.. are gathered here from
    the logits rows (a rare path), and the tail sums rebased above the candidates' maxima. Bisection over int32 keys in [key(thr), key(max)]
    finds a key that keep_lo..keep_hi candidates reach, or else the keep_lo-th largest key exactly;
    the candidates at or above it are compacted to the front (order kept), ties at the keep_lo-th
    key cut at the lowest indices, and the evicted ones' e^z, e^u added to the tail sums.
    Returns (n_kept, new threshold, tail_z, tail_u, base_z, base_u).
    """
    tl.debug_barrier()  # the appends of every thread land before the scratch is read back
    lanes = tl.arange(0, CHUNK)
    top_z = tl.full([], float("-inf"), tl.float32)
    top_u = tl.full([], float("-inf"), tl.float32)
    for start in range(0, n_cand, CHUNK):
        offs = start + lanes
        valid = offs < n_cand
        fresh = valid & (offs >= n_ready)
        ready = valid & (offs < n_ready)
        index = tl.load(cand + offs, mask=fresh, other=0.0).to(tl.int32, bitcast=True)
        z = tl.load(student_row + index * stride_s_col, mask=fresh, other=float("-inf")).to(tl.float32) * inv_temp
        z = tl.where(fresh, z, tl.load(cand + SCRATCH + offs, mask=ready, other=float("-inf")))
        tl.store(cand + SCRATCH + offs, z, mask=fresh)
        top_z = tl.maximum(top_z, tl.max(z, 0))
        if STREAM_TEACHER:
            u = tl.load(teacher_row + index * stride_t_col, mask=fresh, other=float("-inf")).to(tl.float32)
            u = tl.where(fresh, u, tl.load(cand + 2 * SCRATCH + offs, mask=ready, other=float("-inf")))
            tl.store(cand + 2 * SCRATCH + offs, u, mask=fresh)
            top_u = tl.maximum(top_u, tl.max(u, 0))
    tl.debug_barrier()  # the gathered values land before the counting passes read them
    base_z, tail_z = _raise_base(base_z, tail_z, top_z * LOG2E)
    if STREAM_TEACHER:
        base_u, tail_u = _raise_base(base_u, tail_u, top_u * u_scale_log2)

    lo = ordered_key(thr).to(tl.int64)  # every candidate reaches thr: count(lo) = n_cand >= keep_lo
    hi = ordered_key(top_z).to(tl.int64) + 1  # count(hi) = 0
    count_hi = 0
    found = 0
    while (hi - lo > 1) & (found == 0):
        mid = lo + (hi - lo) // 2
        count = _count_at_least(cand, n_cand, mid.to(tl.int32), SCRATCH, CHUNK)
        if count >= keep_lo:
            lo = mid
            found = (count <= keep_hi).to(tl.int32)
        else:
            hi = mid
            count_hi = count
    lo_key = lo.to(tl.int32)
    # Entries tied at lo: all of them when `found` (count(lo) <= keep_hi), else enough to reach keep_lo.
    room = tl.where(found != 0, n_cand, keep_lo - count_hi)
    n_kept = 0
    ties = 0
    for start in range(0, n_cand, CHUNK):
        offs = start + lanes
        valid = offs < n_cand
        index = tl.load(cand + offs, mask=valid, other=0.0)
        z = tl.load(cand + SCRATCH + offs, mask=valid, other=float("-inf"))
        key = ordered_key(z)
        tie = valid & (key == lo_key)
        tie_rank = ties + tl.cumsum(tie.to(tl.int32), 0) - 1
        keep = valid & ((key > lo_key) | (tie & (tie_rank < room)))
        evict = valid & ~keep
        tail_z += tl.sum(tl.where(evict, tl.math.exp2(z * LOG2E - base_z), 0.0), 0)
        if STREAM_TEACHER:
            u = tl.load(cand + 2 * SCRATCH + offs, mask=valid, other=float("-inf"))
            tail_u += tl.sum(tl.where(evict, tl.math.exp2(u * u_scale_log2 - base_u), 0.0), 0)
        slot = n_kept + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.debug_barrier()  # every thread has read this chunk before any survivor moves down into it
        tl.store(cand + slot, index, mask=keep)
        tl.store(cand + SCRATCH + slot, z, mask=keep)
        if STREAM_TEACHER:
            tl.store(cand + 2 * SCRATCH + slot, u, mask=keep)
        n_kept += tl.sum(keep.to(tl.int32), 0)
        ties += tl.sum(tie.to(tl.int32), 0)
    tl.debug_barrier()  # the compacted scratch is complete before anyone appends or reads
    return n_kept, key_value(lo_key), tail_z, tail_u, base_z, base_u


@triton.jit
def topk_forward_kernel(
    student_ptr,
    teacher_ptr,
    completion_ids_ptr,
    old_logps_ptr,
    loss_ptr,
    lse_ptr,
    dense_ptr,
    index_ptr,
    coef_ptr,
    scratch_ptr,
    n_rows,
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
    SCRATCH: tl.constexpr,
    CHUNK: tl.constexpr,
    ADD_TAIL: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    RUN: tl.constexpr,
):
    neg_inf = float("-inf")
    # A block is [BLOCK_V / RUN, RUN]: a run of RUN consecutive entries is one thread's vector load,
    # so reductions and the candidate prefix sum along a run stay inside a thread.
    lanes = tl.arange(0, BLOCK_V // RUN)[:, None] * RUN + tl.arange(0, RUN)[None, :]
    k_pos = tl.arange(0, K_POW2)
    program = tl.program_id(0)
    cand = scratch_ptr + program.to(tl.int64) * (3 * SCRATCH)  # index bits | z | raw u, one row each
    u_scale_log2 = inv_temp * LOG2E
    for row in range(program, n_rows, tl.num_programs(0)):
        row = tl.cast(row, tl.int64)
        student_row = student_ptr + row_offset(row, rows_inner, stride_s_outer, stride_s_inner)
        teacher_row = teacher_ptr + row_offset(row, rows_inner, stride_t_outer, stride_t_inner)
        base_z = tl.zeros([], tl.float32)  # tail_z = Σ_{not S} 2^(z·log2(e) - base_z), z = logits / T
        base_u = tl.zeros([], tl.float32)  # tail_u = Σ_{not S} 2^(u·log2(e)/T - base_u), u raw
        tail_z = tl.zeros([], tl.float32)
        tail_u = tl.zeros([], tl.float32)
        thr = tl.full([], neg_inf, tl.float32)
        n_cand = 0
        n_ready = 0  # candidates whose values are in the scratch (the stream appends indices only)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + lanes
            in_row = offs < n_cols
            z = tl.load(student_row + offs * stride_s_col, mask=in_row, other=neg_inf).to(tl.float32) * inv_temp
            if ADD_TAIL:
                u = tl.load(teacher_row + offs * stride_t_col, mask=in_row, other=neg_inf).to(tl.float32)
            if start == 0:
                base_z = _finite_or_zero(_max_all(z)) * LOG2E
                if ADD_TAIL:
                    base_u = _finite_or_zero(_max_all(u)) * u_scale_log2
                if n_cols >= BLOCK_V:
                    # K' groups of a full block, one entry >= thr each: K' >= K witnesses.
                    thr = tl.min(tl.max(tl.reshape(z, [K_POW2, BLOCK_V // K_POW2]), 1), 0)
                passes = in_row & (z >= thr)
            else:
                passes = z > thr  # masked lanes hold -inf
            if ADD_TAIL:
                block_z, block_u, n_new = _sum3_all(
                    tl.where(passes, 0.0, tl.math.exp2(z * LOG2E - base_z)),
                    tl.where(passes, 0.0, tl.math.exp2(u * u_scale_log2 - base_u)),
                    passes.to(tl.int32),
                )
            else:
                block_z, block_u, n_new = _sum3_all(
                    tl.where(passes, 0.0, tl.math.exp2(z * LOG2E - base_z)), 0.0 * z, passes.to(tl.int32)
                )
            # Rare: the block overflows the base (a new maximum far above it), or nothing has been
            # summed yet and the block underflows it. Raise the base to the block's maximum.
            stale_z = (block_z == float("inf")) | ((block_z == 0.0) & (tail_z == 0.0))
            stale_u = (block_u == float("inf")) | ((block_u == 0.0) & (tail_u == 0.0))
            if stale_z | (stale_u & ADD_TAIL):
                base_z, tail_z = _rebase(base_z, tail_z, stale_z, _max_all(z) * LOG2E)
                block_z = _sum_all(tl.where(passes, 0.0, tl.math.exp2(z * LOG2E - base_z)))
                if ADD_TAIL:
                    base_u, tail_u = _rebase(base_u, tail_u, stale_u, _max_all(u) * u_scale_log2)
                    block_u = _sum_all(tl.where(passes, 0.0, tl.math.exp2(u * u_scale_log2 - base_u)))
            tail_z += block_z
            tail_u += block_u
            if n_new > 0:
                if n_cand + n_new > SCRATCH:
                    n_cand, thr, tail_z, tail_u, base_z, base_u = tighten(
                        cand=cand,
                        n_cand=n_cand,
                        n_ready=n_ready,
                        student_row=student_row,
                        teacher_row=teacher_row,
                        stride_s_col=stride_s_col,
                        stride_t_col=stride_t_col,
                        inv_temp=inv_temp,
                        thr=thr,
                        keep_lo=topk,
                        keep_hi=2 * K_POW2,
                        tail_z=tail_z,
                        tail_u=tail_u,
                        base_z=base_z,
                        base_u=base_u,
                        u_scale_log2=u_scale_log2,
                        SCRATCH=SCRATCH,
                        CHUNK=CHUNK,
                        STREAM_TEACHER=ADD_TAIL,
                    )
                    n_ready = n_cand
                    # Entries of this block between the old and the new threshold join the tail. The block
                    # is read again (a cache hit) rather than held in registers across the selection.
                    z = tl.load(student_row + offs * stride_s_col, mask=in_row, other=neg_inf).to(tl.float32)
                    z = z * inv_temp
                    dropped = passes & (z <= thr)
                    tail_z += _sum_all(tl.where(dropped, tl.math.exp2(z * LOG2E - base_z), 0.0))
                    if ADD_TAIL:
                        u = tl.load(teacher_row + offs * stride_t_col, mask=in_row, other=neg_inf).to(tl.float32)
                        tail_u += _sum_all(tl.where(dropped, tl.math.exp2(u * u_scale_log2 - base_u), 0.0))
                    passes = passes & (z > thr)
                    n_new = _sum_all(passes.to(tl.int32))
                slot = n_cand + _exclusive_cumsum(passes.to(tl.int32))
                tl.store(cand + slot, offs.to(tl.float32, bitcast=True), mask=passes)
                n_cand += n_new

        # Exactly K candidates remain, in index order: the support S.
        n_cand, thr, tail_z, tail_u, base_z, base_u = tighten(
            cand=cand,
            n_cand=n_cand,
            n_ready=n_ready,
            student_row=student_row,
            teacher_row=teacher_row,
            stride_s_col=stride_s_col,
            stride_t_col=stride_t_col,
            inv_temp=inv_temp,
            thr=thr,
            keep_lo=topk,
            keep_hi=topk,
            tail_z=tail_z,
            tail_u=tail_u,
            base_z=base_z,
            base_u=base_u,
            u_scale_log2=u_scale_log2,
            SCRATCH=SCRATCH,
            CHUNK=CHUNK,
            STREAM_TEACHER=ADD_TAIL,
        )
        in_support = k_pos < topk
        idx = tl.load(cand + k_pos, mask=in_support, other=0.0).to(tl.int32, bitcast=True).to(tl.int64)
        z_s = tl.load(cand + SCRATCH + k_pos, mask=in_support, other=neg_inf)
        support_z = tl.sum(tl.math.exp2(z_s * LOG2E - base_z), 0)
        lse_z = base_z / LOG2E + tl.log(tail_z + support_z)
        a = z_s - lse_z
        if ADD_TAIL:
            u_s = tl.load(cand + 2 * SCRATCH + k_pos, mask=in_support, other=neg_inf)
            support_u = tl.sum(tl.math.exp2(u_s * u_scale_log2 - base_u), 0)
            b = u_s * inv_temp - (base_u / LOG2E + tl.log(tail_u + support_u))
            # log(tail / (tail + support)) without cancellation when the support holds ~all or ~no mass.
            a_tail = -log1p(support_z / tail_z)
            b_tail = -log1p(support_u / tail_u)
            floored = a_tail <= tail_floor  # TRL's floor: no gradient through the tail
            a_tail = tl.maximum(a_tail, tail_floor)
            b_tail = tl.maximum(b_tail, tail_floor)
            tail_term, d_tail = divergence_terms(a_tail, b_tail, alpha, log_alpha, log1m_alpha, DIVERGENCE)
            d_tail = tl.where(floored, 0.0, d_tail)
        else:
            u_s = tl.load(teacher_row + idx * stride_t_col, mask=in_support, other=neg_inf).to(tl.float32) * inv_temp
            a = z_s - (tl.max(z_s, 0) + tl.log(tl.sum(tl.exp(z_s - tl.max(z_s, 0)), 0)))
            b = u_s - (tl.max(u_s, 0) + tl.log(tl.sum(tl.exp(u_s - tl.max(u_s, 0)), 0)))
        tl.debug_barrier()  # the next row's appends wait for these reads of the scratch
        terms, d_terms = divergence_terms(a, b, alpha, log_alpha, log1m_alpha, DIVERGENCE)
        loss = tl.sum(terms, 0)
        if ADD_TAIL:
            loss += tail_term
        if old_logps_ptr is not None:
            w = importance_weight(
                student_row, stride_s_col, completion_ids_ptr, old_logps_ptr, row, lse_z, inv_temp, is_clip
            )
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
        tl.store(index_ptr + row * topk + k_pos, idx, mask=in_support)
        tl.store(coef_ptr + row * topk + k_pos, sparse, mask=in_support)
