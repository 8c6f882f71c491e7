"""Top-K logit distillation forward kernel (mode "topk_logits"): threshold filter, candidate scratch.

Persistent programs; each takes token rows in turn and streams its row once, BLOCK_V entries at a
time (docs/kernels.md walks through the design and its cost):

- Filter. A float32 threshold `thr` that at least K entries already seen reach. An entry at or
  below it cannot be in the top-K (K earlier, i.e. lower-index, entries are at least as large),
  so it goes straight to the tail sums. In the first block thr is the K-th largest of its run
  maxima (K runs, each with one entry >= thr: ties there are admitted; found by the search of
  `tighten` over one register tile); afterwards only entries strictly above thr pass. Both are
  one float compare per entry, z >= cut (cut = thr, or the next float above it), with no branch.
  A block where nothing passes stops after its sums.
- Candidates. A block is [BLOCK_V / RUN, RUN]: a run is one thread's vector load. The entries
  that pass form one bit mask per run; each run with candidates takes one slot of the recorded
  runs (its run number and mask: two stores per run, slots from a prefix sum over runs), in index
  order. The stream stores no values. After a block that leaves more than RUNS_HIGH runs recorded
  (or before one that would overflow them: that block is streamed again) the stream loop exits
  and `tighten` runs: the runs are expanded into flat candidates
  (index, z, raw u, values gathered back from the rows; slots from a scan of the runs' candidate
  counts, then +1 lane by lane where a lane is a candidate), a bisection on int32 keys of their
  values, each step snapped to the nearest candidate keys (so ties end it at once), finds a new
  threshold that K..tighten_keep of them reach, and the survivors are compacted in place (the
  evicted ones go to the tail sums). Up to TILE candidates (the common case) stay in registers
  from the search to the compaction; more are counted and compacted from the scratch in chunks.
  The stream then goes on. At the end the same routine selects exactly K, ties at
  the K-th value resolved towards the lowest index (the flat candidates are in index order),
  leaving the support in the first K flat entries.
- Sums. Per row only the tail sums Σ_{not S} e^z, Σ_{not S} e^u are kept, as base-2 exps relative
  to a base set by the first block's maximum and raised only when a block's sum overflows (or
  candidates exceed it): no per-block max reduction. A block's sums go into per-run partial sums
  held in-thread across blocks (no cross-thread float reduction per block); two integer maxima of
  their bits tell an overflow (+inf) or nothing summed (0), and one more reduction counts the runs
  with candidates. The partial sums are folded into the row's at the end. The support's
  mass is added at the end, so LSE = log(tail + support) and the tail log-probs are
  -log1p(support / tail): accurate whichever of the two is tiny.
Renormalised top-K (no tail) does not stream the teacher at all: it needs u at the support only.
"""

import triton
import triton.language as tl

from .triton_math import (
    INT32_MAX,
    INT32_MIN,
    LOG2E,
    clipped_ratio,
    divergence_terms,
    key_value,
    log1p,
    online_max_step,
    ordered_key,
    row_offset,
    sampled_logit,
)

# float32 +inf as int32 bits: a non-negative float's bits are >= these iff it is +inf or NaN.
INF_BITS: tl.constexpr = tl.constexpr(0x7F800000)


@triton.jit
def _add2(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _scaled(logits, inv_temp, SCALE_Z: tl.constexpr):
    """z = logits / T in float32; at T = 1 (SCALE_Z false) no multiply (one FMUL per entry saved)."""
    z = logits.to(tl.float32)
    if SCALE_Z:
        z = z * inv_temp
    return z


@triton.jit
def _max_all(x):
    return tl.max(tl.max(x, 1), 0)


@triton.jit
def _fold(tail_z, tail_u, acc_z, acc_u, ADD_TAIL: tl.constexpr):
    """The row's tail sums plus the per-run partial sums [runs] (one reduction for both)."""
    if ADD_TAIL:
        sum_z, sum_u = tl.reduce((acc_z, acc_u), 0, _add2)
        return tail_z + sum_z, tail_u + sum_u
    else:
        return tail_z + tl.sum(acc_z, 0), tail_u


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
def _bf16_pairs(row, pairs, mask, ROWS: tl.constexpr, RUN: tl.constexpr):
    """bf16 entries 2p, 2p+1 of a row for each pair p in `pairs` [ROWS, RUN / 2], as float32 [ROWS, RUN]:
    one int32 load per pair and one integer op per entry (low half shifted up, high half masked; a
    bf16 load converts each high half with two). Masked pairs read as -inf."""
    w = tl.load(row.to(tl.pointer_type(tl.int32)) + pairs, mask=mask, other=-8323200)  # 0xFF80FF80: -inf, -inf
    lo = (w << 16).to(tl.float32, bitcast=True)
    hi = (w & -65536).to(tl.float32, bitcast=True)
    return tl.reshape(tl.join(lo, hi), [ROWS, RUN])


@triton.jit
def _strict_cut(thr):
    """The pass test's cut after the first block: entries strictly above thr pass, i.e. z >= the next
    float above it; while thr is -inf (no witnesses yet) every entry passes, -inf ones too."""
    return tl.where(thr == float("-inf"), thr, key_value(ordered_key(thr) + 1))


@triton.jit
def _lane_bits(passes, lanes):
    """[rows, RUN] bool -> [rows] int32 bit masks (bit l: lane l)."""
    return tl.sum(passes.to(tl.int32) << lanes[None, :], 1)


@triton.jit
def _add_min_max(n0, lo0, hi0, n1, lo1, hi1):
    return n0 + n1, tl.minimum(lo0, lo1), tl.maximum(hi0, hi1)


@triton.jit
def _bracket_tile(key, mid, ONE_REDUCTION: tl.constexpr = False):
    """Over a tile of candidate keys (INT32_MIN where no candidate): how many reach mid, the smallest
    key that does and the largest that does not. Three integer reductions (a warp-level REDUX each)
    have the shorter critical path over a tile held in registers; over chunks loaded from the
    scratch one three-operand reduction (ONE_REDUCTION) compiles to the shorter one (cost report)."""
    at_least = key >= mid
    if ONE_REDUCTION:
        return tl.reduce(
            (at_least.to(tl.int32), tl.where(at_least, key, INT32_MAX), tl.where(at_least, INT32_MIN, key)),
            0,
            _add_min_max,
        )
    else:
        count = tl.sum(at_least.to(tl.int32), 0)
        above = tl.min(tl.where(at_least, key, INT32_MAX), 0)
        below = tl.max(tl.where(at_least, INT32_MIN, key), 0)
        return count, above, below


@triton.jit
def _bracket_chunks(flat_z, n_flat, mid, CHUNK: tl.constexpr):
    """`_bracket_tile` over the n_flat candidate values in scratch, CHUNK at a time (more than a tile)."""
    count = 0
    above = INT32_MAX
    below = INT32_MIN
    for start in range(0, n_flat, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        z = tl.load(flat_z + offs, mask=offs < n_flat, other=float("-inf"))
        c, a, b = _bracket_tile(tl.where(offs < n_flat, ordered_key(z), INT32_MIN), mid, True)
        count += c
        above = tl.minimum(above, a)
        below = tl.maximum(below, b)
    return count, above, below


@triton.jit
def _bisect_step(lo, hi, count_hi, found, count, above, below, keep_lo, keep_hi):
    """One step of the threshold search, snapped to candidate keys: count(lo) >= keep_lo > count(hi)
    stays true, and no candidate key lies in [mid, above) or (below, mid) for the step's mid, so lo
    moves up to `above` or hi down to below + 1. Ties (bf16 logits) then end the search at the adjacent pair of distinct
    candidate values around the cut instead of bisecting the int32 keys between them."""
    if count >= keep_lo:
        lo = above.to(tl.int64)
        found = (count <= keep_hi).to(tl.int32)
    else:
        hi = below.to(tl.int64) + 1
        count_hi = count
    return lo, hi, count_hi, found


@triton.jit
def _popcount(x, BITS: tl.constexpr):
    """Set bits of each int32 in x, for x < 2^BITS (a run's candidate mask: BITS = RUN <= 16 lanes).
    For BITS <= 8 by two multiplies (int32, wrapping): x * 0x08040201 puts bit i of x at bit 4i + 3
    (among others), the mask keeps one bit per nibble, and * 0x11111111 sums the nibbles into the top
    one; the multiplies run on the FMA pipe (about 4.5 instructions per count in the SASS, ~18 before)."""
    if BITS <= 8:
        spread = ((x * 0x08040201) >> 3) & 0x11111111
        return ((spread * 0x11111111) >> 28) & 0xF
    else:
        x = x - ((x >> 1) & 0x5555)
        x = (x & 0x3333) + ((x >> 2) & 0x3333)
        x = (x + (x >> 4)) & 0x0F0F
        return (x + (x >> 8)) & 0x1F


@triton.jit
def _kth_largest(values, k, COUNT_DECISIONS: tl.constexpr):
    """The k-th largest of a tile of float32 values (not NaN; ties counted), by the snapped bisection
    of `tighten` over their int32 keys: count(lo) >= k > count(hi) from lo = the smallest key.
    Returns (value, search steps; 0 unless COUNT_DECISIONS)."""
    key = ordered_key(values)
    lo = tl.min(key, 0).to(tl.int64)
    hi = tl.max(key, 0).to(tl.int64) + 1
    count_hi = 0
    found = 0
    steps = 0
    while (found == 0) & (hi - lo > 1):  # (the condition's order names this loop for the cost report)
        mid = lo + (hi - lo) // 2
        count, above, below = _bracket_tile(key, mid.to(tl.int32))
        lo, hi, count_hi, found = _bisect_step(lo, hi, count_hi, found, count, above, below, k, k)
        if COUNT_DECISIONS:
            steps += 1
    return key_value(lo.to(tl.int32)), steps


@triton.jit
def _run_records(cand, rows, n_runs, RUNS_CAP: tl.constexpr):
    """The candidate bit masks and run numbers of the recorded runs `rows` (0 past n_runs)."""
    in_range = rows < n_runs
    bits = tl.load(cand + RUNS_CAP + rows, mask=in_range, other=0.0).to(tl.int32, bitcast=True)
    run_col = tl.load(cand + rows, mask=in_range, other=0.0).to(tl.int32, bitcast=True)
    return bits, run_col


@triton.jit
def _expand_runs(
    cand,
    n_runs,
    n_flat,
    student_row,
    teacher_row,
    stride_s_col,
    stride_t_col,
    inv_temp,
    RUNS_CAP: tl.constexpr,
    FLAT_CAP: tl.constexpr,
    CHUNK: tl.constexpr,
    RUN: tl.constexpr,
    STREAM_TEACHER: tl.constexpr,
    WIDE_COLS: tl.constexpr,
    SCALE_Z: tl.constexpr,
):
    """Append the candidates of the n_runs recorded runs to the flat entries, in index order, with
    their values gathered from the logits rows. Returns (n_flat, max z, max raw u) of those appended."""
    flat_idx = cand + 2 * RUNS_CAP
    runs = tl.arange(0, CHUNK // RUN)
    # One run per thread and one 1-D tensor per lane: every value keeps the runs' layout, so the gathers,
    # slots and stores need no layout conversion (a [runs, RUN] tile took ~10 shared-memory round trips
    # with barriers per chunk to move between the load and store layouts).
    # Software-pipelined: each chunk's run records are loaded one iteration ahead, so a chunk waits for
    # one global round trip (its gathers) instead of two (the records, then the gathers).
    bits, run_col = _run_records(cand, runs, n_runs, RUNS_CAP)
    # The maxima are kept per thread across chunks and reduced once, after the loop.
    max_z = tl.full([CHUNK // RUN], float("-inf"), tl.float32)
    max_u = tl.full([CHUNK // RUN], float("-inf"), tl.float32)
    for start in range(0, n_runs, CHUNK // RUN):
        col0 = run_col * RUN
        if WIDE_COLS:
            col0 = col0.to(tl.int64)
        # Every lane's gathers first (the stores below might alias them, so they could not move up).
        # (Tuples grow by concatenation: Triton's code generator has no starred unpacking.)
        zs = ()
        us = ()
        for lane in tl.static_range(RUN):
            valid = ((bits >> lane) & 1) != 0
            col = col0 + lane
            z = tl.load(student_row + col * stride_s_col, mask=valid, other=float("-inf"))
            zs = zs + (_scaled(z, inv_temp, SCALE_Z),)  # noqa: RUF005
            if STREAM_TEACHER:
                u = tl.load(teacher_row + col * stride_t_col, mask=valid, other=float("-inf"))
                us = us + (u.to(tl.float32),)  # noqa: RUF005
        next_bits, next_col = _run_records(cand, start + CHUNK // RUN + runs, n_runs, RUNS_CAP)
        # Slots: a scan over the runs' candidate counts (one value per run), then lane by lane.
        per_run = _popcount(bits, RUN)
        at = n_flat + tl.cumsum(per_run, 0) - per_run
        for lane in tl.static_range(RUN):
            taken = (bits >> lane) & 1
            valid = taken != 0
            dst = flat_idx + at  # (one address per candidate, the three regions at constant offsets from it)
            tl.store(dst, (col0 + lane).to(tl.int32).to(tl.float32, bitcast=True), mask=valid)
            tl.store(dst + FLAT_CAP, zs[lane], mask=valid)
            max_z = tl.maximum(max_z, zs[lane])
            if STREAM_TEACHER:
                tl.store(dst + 2 * FLAT_CAP, us[lane], mask=valid)
                max_u = tl.maximum(max_u, us[lane])
            at += taken
        n_flat += tl.sum(per_run, 0)
        bits = next_bits
        run_col = next_col
    # The maxima: integer maxima of their keys (a warp REDUX each, then across warps, shorter than one
    # two-operand float reduction); without a teacher u is z.
    top_z = key_value(tl.max(ordered_key(max_z), 0))
    if STREAM_TEACHER:
        top_u = key_value(tl.max(ordered_key(max_u), 0))
    else:
        top_u = top_z
    return n_flat, top_z, top_u


@triton.jit
def tighten(
    cand,
    n_runs,
    n_flat,
    student_row,
    teacher_row,
    stride_s_col,
    stride_t_col,
    inv_temp,
    thr,
    keep_lo,
    keep_hi,
    top_z,
    top_u,
    tail_z,
    tail_u,
    base_z,
    base_u,
    u_scale_log2,
    parts_zero_z,
    parts_zero_u,
    RUNS_CAP: tl.constexpr,
    FLAT_CAP: tl.constexpr,
    CHUNK: tl.constexpr,
    TILE: tl.constexpr,
    COMPACT_CHUNK: tl.constexpr,
    RUN: tl.constexpr,
    STREAM_TEACHER: tl.constexpr,
    WIDE_COLS: tl.constexpr,
    SCALE_Z: tl.constexpr,
    COUNT_DECISIONS: tl.constexpr,
):
    """Keep between keep_lo and keep_hi of the candidates, the largest ones (all of them if there are
    at most keep_hi: the threshold then stays).

    `cand` is this program's scratch: the runs the stream recorded since the last call (run numbers
    [RUNS_CAP] and candidate bit masks [RUNS_CAP], int32 stored as float32 bits), then the flat
    candidates in index order: indices, z and raw teacher logits u, [FLAT_CAP] each. The n_runs runs
    are first appended to the n_flat flat entries (`_expand_runs`), and the tail sums rebased above
    the candidates' maxima (top_z, top_u: those of the flat entries already there). Bisection over
    int32 keys in [key(thr), key(max)], snapped to candidate keys (`_bisect_step`), finds a key that
    keep_lo..keep_hi candidates reach, or else the keep_lo-th largest key exactly (in registers when
    n_flat <= TILE, else in chunks from the scratch); candidates below it are evicted (their e^z, e^u go to the
    tail sums), ties at the keep_lo-th key cut at the lowest indices, and the survivors are compacted
    in place. parts_zero_z / parts_zero_u: the stream's partial sums (kept apart from tail_z, tail_u;
    the caller rescales them to the new bases) are all 0. Returns (entries kept, new threshold, top_z,
    top_u, tail_z, tail_u, base_z, base_u, search steps: 0 unless COUNT_DECISIONS).
    """
    flat_idx = cand + 2 * RUNS_CAP
    flat_z = flat_idx + FLAT_CAP
    flat_u = flat_idx + 2 * FLAT_CAP
    tl.debug_barrier()  # the appends of every thread land before the runs are read back
    n_flat, new_top_z, new_top_u = _expand_runs(
        cand, n_runs, n_flat, student_row, teacher_row, stride_s_col, stride_t_col, inv_temp,
        RUNS_CAP, FLAT_CAP, CHUNK, RUN, STREAM_TEACHER, WIDE_COLS, SCALE_Z,
    )  # fmt: skip
    tl.debug_barrier()  # the gathered values land before the counting passes read them
    top_z = tl.maximum(top_z, new_top_z)
    # Raised to the candidates' maximum; moved down to it while nothing has been summed (the stream
    # rebases on its blocks' tail entries only, so a base may still be stale when all entries passed).
    base_z, tail_z = _rebase(base_z, tail_z, parts_zero_z, top_z * LOG2E)
    if STREAM_TEACHER:
        top_u = tl.maximum(top_u, new_top_u)
        base_u, tail_u = _rebase(base_u, tail_u, parts_zero_u, top_u * u_scale_log2)

    steps = 0
    if n_flat > keep_hi:  # else nothing to select: all are kept (and thr keeps its K witnesses)
        lo = ordered_key(thr).to(tl.int64)  # every candidate reaches thr: count(lo) >= keep_lo
        hi = ordered_key(top_z).to(tl.int64) + 1  # count(hi) = 0
        count_lo = n_flat
        count_hi = 0
        found = 0
        if n_flat <= TILE:
            # The common case: every candidate fits one tile, held in registers through the search
            # and the compaction (no scratch reads per step).
            offs = tl.arange(0, TILE)
            valid = offs < n_flat
            # Unmasked (TILE <= FLAT_CAP): vector loads, one round trip; lanes past n_flat are ignored.
            # The indices and teacher values the compaction moves are loaded now too: their latency
            # passes during the search.
            z = tl.load(flat_z + offs)
            idx = tl.load(flat_idx + offs)
            if STREAM_TEACHER:
                u = tl.load(flat_u + offs)
            key = tl.where(valid, ordered_key(z), INT32_MIN)
            while (hi - lo > 1) & (found == 0):
                mid = lo + (hi - lo) // 2
                count, above, below = _bracket_tile(key, mid.to(tl.int32))
                count_lo = tl.where(count >= keep_lo, count, count_lo)
                lo, hi, count_hi, found = _bisect_step(lo, hi, count_hi, found, count, above, below, keep_lo, keep_hi)
                if COUNT_DECISIONS:
                    steps += 1
            lo_key = lo.to(tl.int32)
            # Entries tied at lo: all of them when `found` (count(lo) <= keep_hi), else enough to reach keep_lo.
            room = tl.where(found != 0, INT32_MAX, keep_lo - count_hi)
            above_cut = key > lo_key
            tie = key == lo_key  # (lanes without a candidate hold INT32_MIN, below any lo)
            # One scan gives both prefix counts, packed in one int32 (each count < 2^16): a survivor's
            # slot is the survivors before it, i.e. the entries above the cut before it plus the ties
            # before it that fit in `room`.
            packed = above_cut.to(tl.int32) + (tie.to(tl.int32) << 16)
            before = tl.cumsum(packed, 0) - packed
            above_before = before & 0xFFFF
            ties_before = before >> 16
            keep = above_cut | (tie & (ties_before < room))
            evict = valid & ~keep
            at = above_before + tl.minimum(ties_before, room)
            evicted_z = tl.where(evict, tl.math.exp2(z * LOG2E - base_z), 0.0)
            if STREAM_TEACHER:
                evicted_u = tl.where(evict, tl.math.exp2(u * u_scale_log2 - base_u), 0.0)
                evicted_z, evicted_u = tl.reduce((evicted_z, evicted_u), 0, _add2)
                tail_u += evicted_u
            else:
                evicted_z = tl.sum(evicted_z, 0)
            tail_z += evicted_z
            tl.debug_barrier()  # every thread has read the tile before any survivor moves down into it
            dst = flat_idx + at  # (one address per survivor, the three regions at constant offsets from it)
            tl.store(dst, idx, mask=keep)
            tl.store(dst + FLAT_CAP, z, mask=keep)
            if STREAM_TEACHER:
                tl.store(dst + 2 * FLAT_CAP, u, mask=keep)
            # count(lo) when every tie stays, else exactly keep_lo (count(lo) >= keep_lo > count_hi).
            n_kept = tl.where(found != 0, count_lo, keep_lo)
        else:
            # More candidates than a tile (ties over many blocks, K near V): counted from scratch in
            # chunks, the same search, then compacted COMPACT_CHUNK at a time.
            while (hi - lo > 1) & (found == 0):
                mid = lo + (hi - lo) // 2
                count, above, below = _bracket_chunks(flat_z, n_flat, mid.to(tl.int32), CHUNK)
                lo, hi, count_hi, found = _bisect_step(lo, hi, count_hi, found, count, above, below, keep_lo, keep_hi)
                if COUNT_DECISIONS:
                    steps += 1
            lo_key = lo.to(tl.int32)
            room = tl.where(found != 0, INT32_MAX, keep_lo - count_hi)
            n_kept = 0
            ties = 0
            for start in range(0, n_flat, COMPACT_CHUNK):
                offs = start + tl.arange(0, COMPACT_CHUNK)
                valid = offs < n_flat
                z = tl.load(flat_z + offs, mask=valid, other=float("-inf"))
                key = ordered_key(z)
                tie = valid & (key == lo_key)
                tie_rank = ties + tl.cumsum(tie.to(tl.int32), 0) - tie.to(tl.int32)
                keep = valid & ((key > lo_key) | (tie & (tie_rank < room)))
                evict = valid & ~keep
                tail_z += tl.sum(tl.where(evict, tl.math.exp2(z * LOG2E - base_z), 0.0), 0)
                idx = tl.load(flat_idx + offs, mask=valid)
                if STREAM_TEACHER:
                    u = tl.load(flat_u + offs, mask=valid, other=float("-inf"))
                    tail_u += tl.sum(tl.where(evict, tl.math.exp2(u * u_scale_log2 - base_u), 0.0), 0)
                at = n_kept + tl.cumsum(keep.to(tl.int32), 0) - keep.to(tl.int32)
                tl.debug_barrier()  # every thread has read this chunk before any survivor moves down into it
                dst = flat_idx + at
                tl.store(dst, idx, mask=keep)
                tl.store(dst + FLAT_CAP, z, mask=keep)
                if STREAM_TEACHER:
                    tl.store(dst + 2 * FLAT_CAP, u, mask=keep)
                n_kept += tl.sum(keep.to(tl.int32), 0)
                ties += tl.sum(tie.to(tl.int32), 0)
        tl.debug_barrier()  # the compacted scratch is complete before anyone appends or reads
        n_flat = n_kept
        thr = key_value(lo_key)
    return n_flat, thr, top_z, top_u, tail_z, tail_u, base_z, base_u, steps


@triton.jit
def _support_values(support, support_z_ptr, support_u_ptr, k_pos, topk, teacher_row, stride_t_col, n_cols, inv_temp,
                    ADD_TAIL: tl.constexpr):  # fmt: skip
    """The support entries at positions k_pos: (z, u = teacher logit / T, index), -inf / 0 beyond topk.
    u comes from the scratch (tail mode: the raw logit the stream kept) or is gathered from the
    teacher row at the index (renormalised top-K streams no teacher)."""
    in_support = k_pos < topk
    z_s = tl.load(support_z_ptr + k_pos, mask=in_support, other=float("-inf"))
    idx = tl.load(support + k_pos, mask=in_support, other=0.0).to(tl.int32, bitcast=True).to(tl.int64)
    if ADD_TAIL:
        u_s = tl.load(support_u_ptr + k_pos, mask=in_support, other=float("-inf")) * inv_temp
    else:
        # Bounds-masked: a row with NaN logits may end its selection short of K (see `bad`).
        in_row = in_support & (idx >= 0) & (idx < n_cols)
        u_s = tl.load(teacher_row + idx * stride_t_col, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temp
    return z_s, u_s, idx


@triton.jit
def _support_chunk(z_0, u_0, idx_0, support, support_z_ptr, support_u_ptr, k_pos, topk, teacher_row, stride_t_col,
                   n_cols, inv_temp, ONE_CHUNK: tl.constexpr, ADD_TAIL: tl.constexpr):  # fmt: skip
    """`_support_values` at k_pos, or the first chunk's (z_0, u_0, idx_0) held in registers when that
    chunk is the whole support (ONE_CHUNK)."""
    if ONE_CHUNK:
        z_s, u_s, idx = z_0, u_0, idx_0
    else:
        z_s, u_s, idx = _support_values(
            support, support_z_ptr, support_u_ptr, k_pos, topk, teacher_row, stride_t_col, n_cols, inv_temp, ADD_TAIL
        )
    return z_s, u_s, idx


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
    row_counter_ptr,
    counters_ptr,
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
    tighten_keep,
    inv_temp,
    alpha,
    is_clip,
    tail_floor,
    K_POW2: tl.constexpr,
    BLOCK_V: tl.constexpr,
    RUNS_CAP: tl.constexpr,
    RUNS_HIGH: tl.constexpr,
    FLAT_CAP: tl.constexpr,
    CHUNK: tl.constexpr,
    TILE: tl.constexpr,
    COMPACT_CHUNK: tl.constexpr,
    SUPPORT_CHUNK: tl.constexpr,
    ADD_TAIL: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    RUN: tl.constexpr,
    WIDE_COLS: tl.constexpr,
    SCALE_Z: tl.constexpr,
    COUNT_DECISIONS: tl.constexpr,
    PAIRS: tl.constexpr,
):
    neg_inf = float("-inf")
    # A block is [BLOCK_V / RUN, RUN]: a run of RUN consecutive entries is one thread's vector load,
    # so reductions and the candidate prefix sum along a run stay inside a thread.
    block_runs = tl.arange(0, BLOCK_V // RUN)
    run_lanes = tl.arange(0, RUN)
    lanes = block_runs[:, None] * RUN + run_lanes[None, :]
    pair_lanes = block_runs[:, None] * (RUN // 2) + tl.arange(0, RUN // 2)[None, :]
    support_pos = tl.arange(0, SUPPORT_CHUNK)
    program = tl.program_id(0)
    # Recorded runs, then the flat candidates (see `tighten`); after the final selection the first K
    # flat entries are the support.
    cand = scratch_ptr + program.to(tl.int64) * (2 * RUNS_CAP + 3 * FLAT_CAP)
    support = cand + 2 * RUNS_CAP
    support_z_ptr = support + FLAT_CAP
    support_u_ptr = support + 2 * FLAT_CAP
    u_scale_log2 = inv_temp * LOG2E
    # Rows come from a shared counter: programs that find no room on an SM start late and take fewer.
    row = tl.atomic_add(row_counter_ptr, 1, sem="relaxed").to(tl.int64)
    while row < n_rows:
        student_row = student_ptr + row_offset(row, rows_inner, stride_s_outer, stride_s_inner)
        teacher_row = teacher_ptr + row_offset(row, rows_inner, stride_t_outer, stride_t_inner)
        if old_logps_ptr is not None:
            # The IS weight's two dependent loads (the sampled id, then its logit) issued now: their
            # latency passes during the stream instead of adding to the row's epilogue.
            z_y, old_logp = sampled_logit(
                student_row, stride_s_col, completion_ids_ptr, old_logps_ptr, row, n_cols, inv_temp
            )
        base_z = tl.zeros([], tl.float32)  # tail_z = Σ_{not S} 2^(z·log2(e) - base_z), z = logits / T
        base_u = tl.zeros([], tl.float32)  # tail_u = Σ_{not S} 2^(u·log2(e)/T - base_u), u raw
        tail_z = tl.zeros([], tl.float32)
        tail_u = tl.zeros([], tl.float32)
        thr = tl.full([], neg_inf, tl.float32)
        # The pass test's cut of the blocks after the first (`_strict_cut(thr)`), kept with thr: it only
        # changes where thr does (the first block, a tightening), not recomputed per block.
        cut = tl.full([], neg_inf, tl.float32)
        top_z = tl.full([], neg_inf, tl.float32)  # the largest z and raw u among the flat candidates
        top_u = tl.full([], neg_inf, tl.float32)
        # Per-run partial tail sums (relative to the bases) of the blocks since the last fold into
        # tail_z, tail_u: a block adds to them in-thread, without a cross-thread reduction.
        acc_z = tl.zeros([BLOCK_V // RUN], tl.float32)
        acc_u = tl.zeros([BLOCK_V // RUN], tl.float32)
        parts_top_z = 0  # the largest partial sum, as int32 bits (0: all are 0)
        parts_top_u = 0
        n_runs = 0  # runs recorded since the last tightening (each with at least one candidate)
        n_flat = 0  # flat candidates (values gathered)
        start = 0
        # COUNT_DECISIONS (tests of the cost report's replay): per row, the stream's tightenings and
        # search steps, the final and first-block search steps, appending blocks, other blocks.
        stream_tightens = 0
        stream_steps = 0
        first_steps = 0
        appends = 0
        skips = 0
        while start < n_cols:
            # Stream blocks until the recorded runs pass RUNS_HIGH, or until a block would overflow
            # them (that block is then streamed again after the tightening); the selection stays out
            # of the stream's register peak.
            full = 0
            while (start < n_cols) & (full == 0) & (n_runs <= RUNS_HIGH):
                offs = start + lanes
                if WIDE_COLS:
                    offs = offs.to(tl.int64)
                in_row = offs < n_cols
                if PAIRS:  # bf16 rows read as int32 pairs (`_bf16_pairs`; launcher: `_bf16_pairs_allowed`)
                    pairs = start // 2 + pair_lanes
                    in_pairs = (start + block_runs * RUN < n_cols)[:, None]  # whole runs (V % RUN == 0)
                    z = _scaled(_bf16_pairs(student_row, pairs, in_pairs, BLOCK_V // RUN, RUN), inv_temp, SCALE_Z)
                    if ADD_TAIL:
                        u = _bf16_pairs(teacher_row, pairs, in_pairs, BLOCK_V // RUN, RUN)
                else:
                    z = tl.load(student_row + offs * stride_s_col, mask=in_row, other=neg_inf)
                    z = _scaled(z, inv_temp, SCALE_Z)
                    if ADD_TAIL:
                        u = tl.load(teacher_row + offs * stride_t_col, mask=in_row, other=neg_inf).to(tl.float32)
                if start == 0:
                    run_max = tl.max(z, 1)
                    base_z = _finite_or_zero(tl.max(run_max, 0)) * LOG2E
                    if ADD_TAIL:
                        base_u = _finite_or_zero(_max_all(u)) * u_scale_log2
                    # K witnesses in a full block: K runs whose maxima reach thr (the K-th largest run
                    # maximum; with K' = next_pow2(K) runs instead, about one iid row in two overflowed
                    # the recorded runs at the second block already), or else K' groups, one entry >= thr
                    # each (the smallest group maximum; a lower threshold). For K' > BLOCK_V / 2, thr
                    # stays -inf until a selection has more than K' candidates.
                    if BLOCK_V // RUN >= K_POW2:
                        if n_cols >= BLOCK_V:
                            thr, first_steps = _kth_largest(run_max, topk, COUNT_DECISIONS)
                    elif BLOCK_V >= 2 * K_POW2:
                        if n_cols >= BLOCK_V:
                            thr = tl.min(tl.max(tl.reshape(z, [K_POW2, BLOCK_V // K_POW2]), 1), 0)
                    cut = _strict_cut(thr)
                # Ties with thr are admitted in the first block (its runs are the witnesses) and while thr
                # is -inf (it may have no witnesses yet: -inf entries must stay candidates, masked lanes
                # not); otherwise z > thr (`cut`). One test for every block, one compare per entry and no
                # branch: a branch would merge the pass flags of its two sides (16 predicates per thread)
                # by packing them into a register bit by bit.
                passes = (z >= tl.where(start == 0, thr, cut)) & in_row
                bits = _lane_bits(passes, run_lanes)
                # The tail entries' values, -inf where an entry passed: the pass flags die here.
                z_tail = tl.where(passes, neg_inf, z)
                if ADD_TAIL:
                    u_tail = tl.where(passes, neg_inf, u)
                new_z = acc_z + tl.sum(tl.math.exp2(z_tail * LOG2E - base_z), 1)
                if ADD_TAIL:
                    new_u = acc_u + tl.sum(tl.math.exp2(u_tail * u_scale_log2 - base_u), 1)
                else:
                    new_u = acc_u  # (zeros: no teacher sums)
                # The largest per-run sum of each side as int32 bits (non-negative floats order as their
                # bits): 0 when nothing is summed, INF_BITS when a sum overflowed. Integer maxima: a
                # warp-level REDUX each.
                top_sum_z = tl.max(new_z.to(tl.int32, bitcast=True), 0)
                top_sum_u = tl.max(new_u.to(tl.int32, bitcast=True), 0)
                has = bits != 0
                # The block's two halves of runs packed in one int32 per thread (counts < 2^16): one
                # reduction and, when appending, one scan over half as many values.
                halves = tl.reshape(has.to(tl.int32), [2, BLOCK_V // RUN // 2])
                packed = tl.sum(halves << (tl.arange(0, 2) * 16)[:, None], 0)
                counts = tl.sum(packed, 0)
                first_half_runs = counts & 0xFFFF
                n_new_runs = first_half_runs + (counts >> 16)
                if n_runs + n_new_runs > RUNS_CAP:
                    full = 1  # (never the first block: RUNS_CAP >= BLOCK_V // RUN)
                    if COUNT_DECISIONS:
                        skips += 1  # (the replay costs the exit as a skip)
                else:
                    # Rare: a sum overflows the base (a new maximum far above it), or nothing has been summed
                    # yet and the block underflows it. The partial sums are folded into the row's, the
                    # base raised to the block's tail maximum and the block summed again.
                    overflow = (top_sum_z >= INF_BITS) | (top_sum_u >= INF_BITS)
                    stale_z = overflow | ((top_sum_z == 0) & (tail_z == 0.0))
                    stale_u = overflow | ((top_sum_u == 0) & (tail_u == 0.0))
                    if stale_z | (stale_u & ADD_TAIL):
                        tail_z, tail_u = _fold(tail_z, tail_u, acc_z, acc_u, ADD_TAIL)
                        base_z, tail_z = _rebase(base_z, tail_z, stale_z, _max_all(z_tail) * LOG2E)
                        new_z = tl.sum(tl.math.exp2(z_tail * LOG2E - base_z), 1)
                        if ADD_TAIL:
                            base_u, tail_u = _rebase(base_u, tail_u, stale_u, _max_all(u_tail) * u_scale_log2)
                            new_u = tl.sum(tl.math.exp2(u_tail * u_scale_log2 - base_u), 1)
                        top_sum_z = tl.max(new_z.to(tl.int32, bitcast=True), 0)
                        top_sum_u = tl.max(new_u.to(tl.int32, bitcast=True), 0)
                    acc_z = new_z
                    acc_u = new_u
                    parts_top_z = top_sum_z
                    parts_top_u = top_sum_u
                    if n_new_runs != 0:
                        # One slot per run with candidates: its number and bit mask, two stores per run.
                        # Runs of the first half before a run, or all of the first half and those of the
                        # second half before it: both from one exclusive scan of the packed counts.
                        before = tl.cumsum(packed, 0) - packed
                        second = tl.arange(0, 2)[:, None] == 1
                        slot = tl.where(second, first_half_runs + (before >> 16), before & 0xFFFF)
                        slot = n_runs + tl.reshape(slot, [BLOCK_V // RUN])
                        run_id = start // RUN + block_runs
                        tl.store(cand + slot, run_id.to(tl.float32, bitcast=True), mask=has)
                        tl.store(cand + RUNS_CAP + slot, bits.to(tl.float32, bitcast=True), mask=has)
                        n_runs += n_new_runs
                    if COUNT_DECISIONS:
                        appends += (n_new_runs != 0).to(tl.int32)
                        skips += (n_new_runs == 0).to(tl.int32)
                    start += BLOCK_V
            # More than RUNS_HIGH runs recorded (the loop's third condition): tightened now rather than
            # let a later block overflow the scratch and be streamed twice (unless the row is done).
            if (full != 0) | ((n_runs > RUNS_HIGH) & (start < n_cols)):
                old_base_z = base_z
                old_base_u = base_u
                n_flat, thr, top_z, top_u, tail_z, tail_u, base_z, base_u, steps = tighten(
                    cand, n_runs, n_flat, student_row, teacher_row, stride_s_col, stride_t_col, inv_temp,
                    thr, topk, tighten_keep, top_z, top_u, tail_z, tail_u, base_z, base_u, u_scale_log2,
                    parts_top_z == 0, parts_top_u == 0,
                    RUNS_CAP, FLAT_CAP, CHUNK, TILE, COMPACT_CHUNK, RUN, ADD_TAIL, WIDE_COLS, SCALE_Z,
                    COUNT_DECISIONS,
                )  # fmt: skip
                cut = _strict_cut(thr)
                # The partial sums follow the bases (a base moves down only while they are all 0).
                acc_z *= tl.math.exp2(tl.minimum(old_base_z - base_z, 0.0))
                acc_u *= tl.math.exp2(tl.minimum(old_base_u - base_u, 0.0))
                n_runs = 0
                if COUNT_DECISIONS:
                    stream_tightens += 1
                    stream_steps += steps

        # Exactly K candidates remain, in index order: the support S.
        tail_z, tail_u = _fold(tail_z, tail_u, acc_z, acc_u, ADD_TAIL)
        n_flat, thr, top_z, top_u, tail_z, tail_u, base_z, base_u, final_steps = tighten(
            cand, n_runs, n_flat, student_row, teacher_row, stride_s_col, stride_t_col, inv_temp,
            thr, topk, topk, top_z, top_u, tail_z, tail_u, base_z, base_u, u_scale_log2,
            True, True,
            RUNS_CAP, FLAT_CAP, CHUNK, TILE, COMPACT_CHUNK, RUN, ADD_TAIL, WIDE_COLS, SCALE_Z,
            COUNT_DECISIONS,
        )  # fmt: skip
        if COUNT_DECISIONS:
            counts = tl.arange(0, 8)
            values = tl.where(counts == 0, stream_tightens, 0)
            values = tl.where(counts == 1, stream_steps, values)
            values = tl.where(counts == 2, final_steps, values)
            values = tl.where(counts == 3, first_steps, values)
            values = tl.where(counts == 4, appends, values)
            values = tl.where(counts == 5, skips, values)
            tl.store(counters_ptr + row * 8 + counts, values, mask=counts < 6)
        # The support: K flat entries (index | z | raw u), three passes in chunks of SUPPORT_CHUNK: its
        # masses, then the loss and the sum of dD/da, then the gradient coefficients. A support of one
        # chunk (K <= SUPPORT_CHUNK) is read once and held in registers through the three.
        ONE_CHUNK: tl.constexpr = K_POW2 <= SUPPORT_CHUNK
        # The first chunk (unused, so not loaded, unless ONE_CHUNK).
        z_0, u_0, idx_0 = _support_values(
            support, support_z_ptr, support_u_ptr, support_pos, topk, teacher_row, stride_t_col, n_cols, inv_temp,
            ADD_TAIL,
        )  # fmt: skip
        support_z = tl.zeros([], tl.float32)
        support_u = tl.zeros([], tl.float32)
        max_z = tl.full([], neg_inf, tl.float32)  # renormalised top-K: LSEs over the support only
        max_u = tl.full([], neg_inf, tl.float32)
        sum_z = tl.zeros([], tl.float32)
        sum_u = tl.zeros([], tl.float32)
        for s0 in range(0, topk, SUPPORT_CHUNK):
            z_s, u_s, _ = _support_chunk(
                z_0, u_0, idx_0, support, support_z_ptr, support_u_ptr, s0 + support_pos, topk, teacher_row,
                stride_t_col, n_cols, inv_temp, ONE_CHUNK, ADD_TAIL,
            )  # fmt: skip
            support_z += tl.sum(tl.math.exp2(z_s * LOG2E - base_z), 0)
            if ADD_TAIL:
                support_u += tl.sum(tl.math.exp2(u_s * LOG2E - base_u), 0)
            else:
                max_z, shift_z, rescale_z = online_max_step(max_z, tl.max(z_s, 0), LOG2E)
                sum_z = sum_z * rescale_z + tl.sum(tl.math.exp2((z_s - shift_z) * LOG2E), 0)
                max_u, shift_u, rescale_u = online_max_step(max_u, tl.max(u_s, 0), LOG2E)
                sum_u = sum_u * rescale_u + tl.sum(tl.math.exp2((u_s - shift_u) * LOG2E), 0)
        lse_z = base_z / LOG2E + tl.log(tail_z + support_z)
        # A student NaN never passes the filter, so it reaches the tail sum: LSE is NaN (+inf logits give
        # +inf or NaN). Such a row's selection may hold fewer than K entries (the rest of the support is
        # stale scratch), so its outputs are fixed instead: NaN loss and statistics, support 0..K-1.
        bad = ~(lse_z < float("inf"))
        if ADD_TAIL:
            lse_u = base_u / LOG2E + tl.log(tail_u + support_u)  # of u / T
            # log(tail / (tail + support)) without cancellation when the support holds ~all or ~no mass.
            a_tail = -log1p(support_z / tail_z)
            b_tail = -log1p(support_u / tail_u)
            floored = a_tail <= tail_floor  # TRL's floor: no gradient through the tail
            a_tail = tl.maximum(a_tail, tail_floor)
            b_tail = tl.maximum(b_tail, tail_floor)
            tail_term, d_tail = divergence_terms(a_tail, b_tail, alpha, DIVERGENCE)
            d_tail = tl.where(floored, 0.0, d_tail)
            lse_s_z = lse_z
        else:
            lse_s_z = tl.where(max_z == neg_inf, 0.0, max_z) + tl.log(sum_z)
            lse_u = tl.where(max_u == neg_inf, 0.0, max_u) + tl.log(sum_u)
        w = 1.0
        if old_logps_ptr is not None:
            w = clipped_ratio(z_y, old_logp, lse_z, is_clip)
        loss = tl.zeros([], tl.float32)
        d_sum = tl.zeros([], tl.float32)
        for s0 in range(0, topk, SUPPORT_CHUNK):
            z_s, u_s, _ = _support_chunk(
                z_0, u_0, idx_0, support, support_z_ptr, support_u_ptr, s0 + support_pos, topk, teacher_row,
                stride_t_col, n_cols, inv_temp, ONE_CHUNK, ADD_TAIL,
            )  # fmt: skip
            terms, d_terms = divergence_terms(z_s - lse_s_z, u_s - lse_u, alpha, DIVERGENCE)
            loss += tl.sum(terms, 0)
            d_sum += tl.sum(d_terms, 0)
        if ADD_TAIL:
            loss += tail_term
            total = (d_sum + d_tail) * w
            dense = tl.where(floored, 0.0, d_tail / tl.exp(a_tail)) * w - total
        else:
            total = d_sum * w
            dense = tl.zeros([], tl.float32)
        for s0 in range(0, topk, SUPPORT_CHUNK):
            k_pos = s0 + support_pos
            in_support = k_pos < topk
            z_s, u_s, idx = _support_chunk(
                z_0, u_0, idx_0, support, support_z_ptr, support_u_ptr, k_pos, topk, teacher_row, stride_t_col, n_cols,
                inv_temp, ONE_CHUNK, ADD_TAIL,
            )  # fmt: skip
            a = z_s - lse_s_z
            _, d_terms = divergence_terms(a, u_s - lse_u, alpha, DIVERGENCE)
            tl.store(index_ptr + row * topk + k_pos, tl.where(bad, k_pos.to(tl.int64), idx), mask=in_support)
            coef = tl.where(bad, float("nan"), d_terms * w - tl.exp(a) * total)
            tl.store(coef_ptr + row * topk + k_pos, coef, mask=in_support)
        tl.debug_barrier()  # the next row's appends wait for these reads of the scratch
        tl.store(loss_ptr + row, tl.where(bad, float("nan"), loss * w))
        tl.store(lse_ptr + row, tl.where(bad, float("nan"), lse_z))
        tl.store(dense_ptr + row, tl.where(bad, float("nan"), dense))
        row = tl.atomic_add(row_counter_ptr, 1, sem="relaxed").to(tl.int64)
