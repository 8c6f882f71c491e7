"""Triton device functions shared by the SDPO kernels (one definition of each formula).

- `divergence_terms`: the elementwise generalised-JSD terms and ∂D/∂a of `loss-math.md`.
- `order_key` / `decode_key`: a float32 value and its vocabulary index packed into one int64
  whose integer order is (value, then LOWER index first): sorting keys sorts values with ties
  broken towards the lowest index, and every key is unique.
"""

import triton
import triton.language as tl

LOW32 = (1 << 32) - 1


@triton.jit
def divergence_terms(a, b, alpha, log_alpha, log1m_alpha, ALPHA_KIND: tl.constexpr):
    """Elementwise (terms, ∂terms/∂a) for student/teacher log-probs a, b (fp32, may be -inf).

    ALPHA_KIND 0: forward KL, 1: reverse KL, 2: generalised JSD with weight alpha. Entries with
    zero probability contribute 0 (absent), never NaN.
    """
    if ALPHA_KIND == 1:
        p = tl.exp(a)
        diff = a - b
        terms = tl.where(p > 0, p * diff, 0.0)
        d_terms = tl.where(p > 0, p * (diff + 1.0), 0.0)
    elif ALPHA_KIND == 0:
        q = tl.exp(b)
        terms = tl.where(q > 0, q * (b - a), 0.0)
        d_terms = -q
    else:
        p = tl.exp(a)
        q = tl.exp(b)
        x1 = a + log1m_alpha
        x2 = b + log_alpha
        hi = tl.maximum(x1, x2)
        hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
        mix = hi_safe + tl.log(tl.exp(x1 - hi_safe) + tl.exp(x2 - hi_safe))
        student_part = tl.where(p > 0, p * (a - mix), 0.0)
        terms = (1.0 - alpha) * student_part + alpha * tl.where(q > 0, q * (b - mix), 0.0)
        d_terms = (1.0 - alpha) * student_part
    return terms, d_terms


@triton.jit
def order_key(x, idx):
    """int64 keys ordered by (x, then lower idx first); x float32, idx integer < 2**32."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 and +0.0 are equal values: one key order for both
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    low32 = (tl.full([], 1, tl.int64) << 32) - 1
    return (ordered.to(tl.int64) << 32) | (low32 - idx.to(tl.int64))


@triton.jit
def decode_key(key):
    """Inverse of `order_key`: (float32 value, int64 index)."""
    hi = (key >> 32).to(tl.int32)
    bits = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
    low32 = (tl.full([], 1, tl.int64) << 32) - 1
    return bits.to(tl.float32, bitcast=True), low32 - (key & low32)


@triton.jit
def row_offset(row, rows_inner, stride_outer, stride_inner):
    """Element offset of token row `row` in a [B, T, V] view (T = rows_inner): no copies of sliced logits."""
    return (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner


@triton.jit
def online_lse_step(m, s, x):
    """One block of a streaming log-sum-exp.

    (m, s) is the running max and Σ exp(x - m_safe); returns the new (m, s), the shift m_safe
    the sum is now relative to (0 while everything seen is -inf), the factor that rescales
    other sums kept relative to the old shift, and exp(x - m_safe) for the block.
    """
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    m_old_safe = tl.where(m == float("-inf"), 0.0, m)
    rescale = tl.where(m == float("-inf"), 0.0, tl.exp(m_old_safe - m_safe))
    e = tl.exp(x - m_safe)
    return m_new, s * rescale + tl.sum(e, 0), m_safe, rescale, e


@triton.jit
def importance_weight(student_row, stride_col, ids_ptr, old_ptr, row, lse, inv_temp, is_clip):
    """IS weight min(exp(clamp(log p(y) - old, ±20)), is_clip) of the sampled token y (fp32)."""
    y = tl.load(ids_ptr + row).to(tl.int64)
    a_y = tl.load(student_row + y * stride_col).to(tl.float32) * inv_temp - lse
    # where-based clamps: NaN propagates as in torch.clamp (tl.minimum would drop it).
    log_ratio = a_y - tl.load(old_ptr + row).to(tl.float32)
    log_ratio = tl.where(log_ratio > 20.0, 20.0, tl.where(log_ratio < -20.0, -20.0, log_ratio))
    ratio = tl.exp(log_ratio)
    return tl.where(ratio > is_clip, is_clip, ratio)
