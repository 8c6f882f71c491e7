"""Triton device functions shared by the SDPO kernels (one definition of each formula).

Notation (docs/math.md): z = student logits / T, u = teacher logits / T, a = z - LSE(z) and
b = u - LSE(u) the log-probs, D(a, b) the divergence, `dense` / `sparse` the coefficients of the
saved gradient (`stats.py`).

- `divergence_terms`: the elementwise generalised-JSD terms and ∂D/∂a.
- `ordered_key` / `key_value`: the int32 image of a float32 whose integer order is the value order
  (-0.0 and +0.0 map to the same key), and its inverse.
- `sampled_token` / `importance_weight` (= `sampled_logit` then `clipped_ratio`): the sampled token
  (bounds-checked) and its IS weight.
- `online_max_step`: the running-max update of a streaming log-sum-exp; the sum itself is kept in
  base 2 (`exp2(x·log2(e) - shift·log2(e))`: one FFMA and one MUFU.EX2 per element).
"""

import triton
import triton.language as tl

# Divergence kinds, a compile-time switch (`LossConfig.divergence` holds the same numbers).
FORWARD_KL: tl.constexpr = tl.constexpr(0)
REVERSE_KL: tl.constexpr = tl.constexpr(1)
GENERALISED_JSD: tl.constexpr = tl.constexpr(2)
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
INT32_MAX: tl.constexpr = tl.constexpr(2147483647)
INT32_MIN: tl.constexpr = tl.constexpr(-2147483648)


@triton.jit
def _exp(x):
    """e^x as one FMUL and one MUFU.EX2 (tl.exp adds range handling the divergence does not need)."""
    return tl.math.exp2(x * LOG2E)


@triton.jit
def divergence_terms(a, b, alpha, DIVERGENCE: tl.constexpr):
    """Elementwise (terms, ∂terms/∂a) for student/teacher log-probs a, b (fp32, may be -inf).

    Entries with zero probability contribute 0 (absent), never NaN; a NaN log-prob gives NaN.
    """
    if DIVERGENCE == REVERSE_KL:
        p = _exp(a)
        diff = a - b
        terms = tl.where(p > 0, p * diff, 0.0)
        d_terms = tl.where(p > 0, p * (diff + 1.0), 0.0)
    elif DIVERGENCE == FORWARD_KL:
        q = _exp(b)
        # q == 0, not q > 0: a NaN teacher log-prob must make the loss NaN, not drop out.
        terms = tl.where(q == 0, 0.0, q * (b - a))
        d_terms = -q
    else:
        p = _exp(a)
        q = _exp(b)
        # m = log((1 - α) P + α Q) in linear space: one FFMA and one MUFU.LG2. Entries whose P and Q
        # underflow (log-prob below about -87) are absent here, a ~1e-38 difference.
        mix = tl.math.log2((1.0 - alpha) * p + alpha * q) * LN2
        student_part = tl.where(p > 0, p * (a - mix), 0.0)
        terms = (1.0 - alpha) * student_part + alpha * tl.where(q == 0, 0.0, q * (b - mix))
        d_terms = (1.0 - alpha) * student_part
    return terms, d_terms


@triton.jit
def ordered_key(x):
    """int32 keys ordered as the float32 values x (a total order on non-NaN values; -0.0 == +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, (bits ^ 0x7FFFFFFF) + 1)


@triton.jit
def key_value(key):
    """Inverse of `ordered_key` (key 0 gives +0.0)."""
    bits = tl.where(key >= 0, key, (key - 1) ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def log1p(x):
    """log(1 + x) for x >= 0 (may be +inf), accurate for tiny x (float32 log(1 + x) would give 0)."""
    w = 1.0 + x
    ratio = tl.where((w == 1.0) | (w == float("inf")), 1.0, x / (w - 1.0))
    return tl.where(w == 1.0, x, tl.log(w) * ratio)


@triton.jit
def row_offset(row, rows_inner, stride_outer, stride_inner):
    """Element offset of token row `row` in a [B, T, V] view (T = rows_inner): no copies of sliced logits."""
    return (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner


@triton.jit
def online_max_step(running_max, block_max, scale_log2):
    """Running max of a streaming log-sum-exp of exp(x · scale) after one block.

    Returns the new max of x, the shift the sums are now relative to (0 while everything seen is
    -inf, so that exp2 of -inf stays 0 instead of NaN), and the factor that rescales sums kept
    relative to the previous shift. scale_log2 = scale · log2(e).
    """
    new_max = tl.maximum(running_max, block_max)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    old_shift = tl.where(running_max == float("-inf"), 0.0, running_max)
    rescale = tl.where(running_max == float("-inf"), 0.0, tl.math.exp2((old_shift - shift) * scale_log2))
    return new_max, shift, rescale


@triton.jit
def sampled_token(completion_ids_ptr, row, n_cols):
    """(y, in range) for the sampled token of `row`: y int64, clamped to 0 when outside [0, n_cols)
    (no host check on the GPU path: such a row's loss is NaN, and nothing is read outside the row)."""
    y = tl.load(completion_ids_ptr + row).to(tl.int64)
    ok = (y >= 0) & (y < n_cols)
    return tl.where(ok, y, 0), ok


@triton.jit
def sampled_logit(student_row, stride_col, completion_ids_ptr, old_logps_ptr, row, n_cols, inv_temp):
    """What the IS weight reads: (z_y = the sampled token's logit / T, NaN when y is out of range; the
    rollout's log-prob old_logps[row]), both fp32. Apart from `clipped_ratio` so that a kernel can issue
    these two dependent loads early and use them after its stream."""
    y, ok = sampled_token(completion_ids_ptr, row, n_cols)
    z_y = tl.load(student_row + y * stride_col).to(tl.float32) * inv_temp
    return tl.where(ok, z_y, float("nan")), tl.load(old_logps_ptr + row).to(tl.float32)


@triton.jit
def clipped_ratio(z_y, old_logp, lse, is_clip):
    """IS weight min(exp(clamp(z_y - lse - old, ±20)), is_clip) (fp32; NaN propagates)."""
    # where-based clamps: NaN propagates as in torch.clamp (tl.minimum would drop it).
    log_ratio = (z_y - lse) - old_logp
    log_ratio = tl.where(log_ratio > 20.0, 20.0, tl.where(log_ratio < -20.0, -20.0, log_ratio))
    ratio = tl.exp(log_ratio)
    return tl.where(ratio > is_clip, is_clip, ratio)


@triton.jit
def importance_weight(student_row, stride_col, completion_ids_ptr, old_logps_ptr, row, n_cols, lse, inv_temp, is_clip):
    """IS weight min(exp(clamp(log p(y) - old, ±20)), is_clip) of the sampled token y (fp32); NaN when y
    is out of range."""
    z_y, old_logp = sampled_logit(student_row, stride_col, completion_ids_ptr, old_logps_ptr, row, n_cols, inv_temp)
    return clipped_ratio(z_y, old_logp, lse, is_clip)
