"""Pure PyTorch backend: the CPU default and the tests' second oracle.

Same semantics as the Triton kernels (TRL 1.16 `loss_utils` applied to `logits / T`, with the
exact tail formula and masked (-inf) vocabulary entries treated as absent), computed chunk by
chunk over rows so that the temporaries stay a small fraction of one [N, V] tensor. The
gradient is written from the saved `RowStats` (hand-derived backward, no autograd graph over
the vocabulary), so forward+backward holds one [N, V] tensor extra: the gradient itself.
"""

from __future__ import annotations

import math

import torch

from .config import IS_LOG_RATIO_CLAMP, TAIL_LOG_FLOOR, LossConfig
from .stats import RowStats, check_grad_out

# Elements per [rows, V] float32 temporary in one chunk (16 MiB).
CHUNK_ELEMENTS = 1 << 22


def rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def scaled(logits: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """`logits / T` in float32 (float64 stays float64), multiplied by 1/T as the kernels do."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return z if config.temperature == 1.0 else z * config.inv_temperature


def _xlogy_term(prob: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """prob * diff, with 0 where prob == 0 (absent entries contribute nothing, not NaN)."""
    return torch.where(prob > 0, prob * diff, torch.zeros_like(diff))


def divergence_terms(a: torch.Tensor, b: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise divergence terms and ∂D/∂a on a support.

    Args:
        a, b: student / teacher log-probs over the support (same shape; may hold -inf).
        alpha: 0 forward KL, 1 reverse KL, else generalised JSD.
    Returns:
        (terms, d_terms): D = terms.sum(-1) and ∂D/∂a_i = d_terms_i (a treated as free).
    """
    if alpha == 1.0:
        p = a.exp()
        return _xlogy_term(p, a - b), _xlogy_term(p, a - b + 1.0)
    q = b.exp()
    if alpha == 0.0:
        return _xlogy_term(q, b - a), -q
    p = a.exp()
    mix = torch.logaddexp(a + math.log1p(-alpha), b + math.log(alpha))
    student_part = _xlogy_term(p, a - mix)
    terms = (1.0 - alpha) * student_part + alpha * _xlogy_term(q, b - mix)
    return terms, (1.0 - alpha) * student_part


def topk_lowest_index(z: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [n, k] of the k largest entries of each row of z; ties keep the lowest index.

    torch.topk leaves the choice among tied values unspecified; this resolves it the way the
    Triton kernel does (lowest vocabulary index wins). Rows are returned in index order.
    """
    values, index = torch.topk(z, k, dim=-1, sorted=False)
    kth = values.amin(-1, keepdim=True)
    at_kth = z == kth
    if bool(((values == kth).sum(-1) == at_kth.sum(-1)).all()):
        return index  # every entry equal to the K-th value was taken: no tie to resolve
    above = z > kth
    room = k - above.sum(-1, keepdim=True)
    keep = above | (at_kth & (at_kth.cumsum(-1) <= room))
    return keep.nonzero()[:, 1].view(z.shape[0], k)


def _lse_and_tail(x: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LSE(x) and the exact LSE over the entries outside `support`, from one exp pass.

    The support's terms are zeroed in place and the rest summed again: no 1 - Σp cancellation.
    """
    hi = x.amax(-1, keepdim=True)
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    e = torch.exp(x - hi)
    lse = torch.log(e.sum(-1)) + hi.squeeze(-1)
    e.scatter_(-1, support, 0.0)
    return lse, torch.log(e.sum(-1)) + hi.squeeze(-1)


def _tail_log_mass(support_values: torch.Tensor, lse_rest: torch.Tensor) -> torch.Tensor:
    """log(Σ_{not S} e^x / Σ e^x) from the support's values [n, K] and LSE_{not S}(x) [n]."""
    return -torch.log1p(torch.exp(torch.logsumexp(support_values, -1) - lse_rest))


def _importance_weight(
    a_sampled: torch.Tensor, old_logps: torch.Tensor | None, config: LossConfig
) -> torch.Tensor | None:
    if config.is_clip is None:
        return None
    log_ratio = (a_sampled - old_logps.to(a_sampled.dtype)).clamp(-IS_LOG_RATIO_CLAMP, IS_LOG_RATIO_CLAMP)
    return log_ratio.exp().clamp(max=config.is_clip)


def _forward_chunk(
    student: torch.Tensor,
    teacher: torch.Tensor,
    completion_ids: torch.Tensor | None,
    old_logps: torch.Tensor | None,
    config: LossConfig,
) -> tuple[torch.Tensor, RowStats]:
    z = scaled(student, config)
    u = scaled(teacher, config)
    support = topk_lowest_index(z, config.topk) if config.mode == "topk_logits" else None
    if config.add_tail:
        lse_z, lse_rest_z = _lse_and_tail(z, support)
    else:
        lse_z = torch.logsumexp(z, dim=-1)
    weight = None
    if completion_ids is not None:
        y = completion_ids.long().unsqueeze(-1)
        a_y = z.gather(-1, y).squeeze(-1) - lse_z
        weight = _importance_weight(a_y, old_logps, config)

    if config.mode == "sampled_token":
        lse_u = torch.logsumexp(u, dim=-1)
        b_y = u.gather(-1, y).squeeze(-1) - lse_u
        log_ratio = a_y - b_y
        coef = log_ratio if weight is None else weight * log_ratio
        loss = coef * a_y
        return loss, RowStats(lse_z, -coef, y, (coef * (1.0 - a_y.exp())).unsqueeze(-1))

    if config.mode == "full_logits":
        lse_u = torch.logsumexp(u, dim=-1)
        terms, d_terms = divergence_terms(z - lse_z[:, None], u - lse_u[:, None], config.alpha)
        loss = terms.sum(-1)
        d_sum = d_terms.sum(-1)
        w = torch.ones_like(lse_z) if weight is None else weight
        return loss * w, RowStats(lse_z, -w * d_sum, lse_teacher=lse_u, is_weight=w)

    # topk_logits
    z_s = z.gather(-1, support)
    u_s = u.gather(-1, support)
    if config.add_tail:
        lse_u, lse_rest_u = _lse_and_tail(u, support)
        a = z_s - lse_z[:, None]
        b = u_s - lse_u[:, None]
        # Exact tail log-mass log(P_tail) = -log1p(P_S / P_tail), floored as TRL. Written this way it
        # keeps its accuracy when the support holds almost no mass (LSE_{not S} - LSE would cancel).
        a_tail = _tail_log_mass(z_s, lse_rest_z)
        b_tail = _tail_log_mass(u_s, lse_rest_u)
        a_floored = ~(a_tail > TAIL_LOG_FLOOR)
        a_tail = a_tail.clamp(min=TAIL_LOG_FLOOR)
        b_tail = b_tail.clamp(min=TAIL_LOG_FLOOR)
        terms, d_terms = divergence_terms(a, b, config.alpha)
        tail_term, d_tail = divergence_terms(a_tail, b_tail, config.alpha)
        loss = terms.sum(-1) + tail_term
        d_tail = torch.where(a_floored, torch.zeros_like(d_tail), d_tail)
        if weight is not None:
            loss, d_terms, d_tail = loss * weight, d_terms * weight[:, None], d_tail * weight
        # γ_tail / P_tail (zero while floored: then P_tail may be 0).
        tail_ratio = torch.where(a_floored, torch.zeros_like(d_tail), d_tail / a_tail.exp())
        total = d_terms.sum(-1) + d_tail
        dense = tail_ratio - total
        sparse = d_terms - a.exp() * total[:, None]
        return loss, RowStats(lse_z, dense, support, sparse)

    a = torch.log_softmax(z_s, dim=-1)
    b = torch.log_softmax(u_s, dim=-1)
    terms, d_terms = divergence_terms(a, b, config.alpha)
    loss = terms.sum(-1)
    if weight is not None:
        loss, d_terms = loss * weight, d_terms * weight[:, None]
    sparse = d_terms - a.exp() * d_terms.sum(-1, keepdim=True)
    return loss, RowStats(lse_z, torch.zeros_like(lse_z), support, sparse)


def _cat_stats(parts: list[RowStats]) -> RowStats:
    fields = zip(*(p.tensors() for p in parts))
    return RowStats.from_tensors([None if f[0] is None else torch.cat(f) for f in fields])


def forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    completion_ids: torch.Tensor | None,
    old_logps: torch.Tensor | None,
    config: LossConfig,
) -> tuple[torch.Tensor, RowStats]:
    """Per-token loss and row statistics.

    Args:
        student, teacher: [N, V] (or [B, T, V], flattened here) logits, any strides.
        completion_ids: [N] int or None; old_logps: [N] float or None.
    Returns:
        loss [N] float32 and the `RowStats` for `backward`.
    """
    student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    n, vocab = student.shape
    step = rows_per_chunk(vocab)
    losses, stats = [], []
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        ids = None if completion_ids is None else completion_ids[lo:hi]
        old = None if old_logps is None else old_logps[lo:hi]
        loss, st = _forward_chunk(student[lo:hi], teacher[lo:hi], ids, old, config)
        losses.append(loss)
        stats.append(st)
    if not losses:
        empty = student.new_zeros(0, dtype=torch.promote_types(student.dtype, torch.float32))
        return empty, RowStats(empty, empty)
    return torch.cat(losses), _cat_stats(stats)


def grad_chunk(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    stats: RowStats,
    grad_loss: torch.Tensor,
    config: LossConfig,
) -> torch.Tensor:
    """dℓ/d(student logits) [n, V] float32 for one chunk of rows, from saved stats.

    `grad_loss` [n] is the upstream gradient of the per-token loss. Rows with zero upstream
    gradient get an exactly zero gradient, even where the loss itself is not finite.
    """
    z = scaled(student, config)
    grad = torch.exp(z - stats.lse_student[:, None])
    dense = stats.dense_coef[:, None]
    if bool(torch.isfinite(dense).all()):
        grad *= dense
    else:  # absent (-inf) entries get exactly zero, even in a row whose loss is infinite
        grad = torch.where(grad > 0, grad * dense, 0.0)
    if config.mode == "full_logits":
        a = z - stats.lse_student[:, None]
        b = scaled(teacher, config) - stats.lse_teacher[:, None]
        grad += divergence_terms(a, b, config.alpha)[1] * stats.is_weight[:, None]
    if stats.sparse_index is not None:
        grad.scatter_(-1, stats.sparse_index, stats.sparse_coef)
    row_scale = grad_loss.to(grad.dtype) * config.inv_temperature
    grad *= row_scale[:, None]
    return grad.masked_fill_((row_scale == 0)[:, None], 0.0)


def backward(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    stats: RowStats,
    grad_loss: torch.Tensor,
    config: LossConfig,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. the student logits (shape of `student`), student dtype, contiguous.

    `out` (optional) receives it and may be `student` itself: each row is read before it is written.
    """
    out = check_grad_out(out, student)
    student = student.reshape(-1, student.shape[-1])
    teacher = None if teacher is None else teacher.reshape(-1, teacher.shape[-1])
    n, vocab = student.shape
    flat = out.view(n, vocab)
    step = rows_per_chunk(vocab)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        chunk_stats = RowStats.from_tensors([None if t is None else t[lo:hi] for t in stats.tensors()])
        t_chunk = None if teacher is None else teacher[lo:hi]
        flat[lo:hi] = grad_chunk(student[lo:hi], t_chunk, chunk_stats, grad_loss[lo:hi], config)
    return out
