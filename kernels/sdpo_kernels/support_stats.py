"""Per-row diagnostics of top-K distillation, from the support the forward already selected.

What a user watches to see whether top-K distillation is healthy:

- `topk_mass` [N]: the student's probability mass on its own top-K support, Σ_{k∈S} softmax(z / T)_k
  (1 − the tail bucket's mass). Near 1: the support covers what the student would sample; small: the loss
  sees only a sliver of the distribution (raise K, or keep the tail bucket).
- `support_kl` [N]: KL(p̂_T ‖ p̂_S) between teacher and student renormalised on the support S,
  p̂(k) = softmax over S of (logits / T). 0 where the two rank and weigh the support alike; how far apart
  the self-teacher and the student are on the tokens the loss reads.

Cost: two gathers of [N, K] values at the forward's `sparse_index` and a K-wide log-softmax, no pass over the
vocabulary (the full-vocabulary LSE of the student is the forward's saved `lse_student`). Computed on the logits
rows the forward saw (the fused-linear path: on each chunk's logits, before its backward overwrites them).
-inf logits are absent entries: they contribute 0 mass; a support entry where the teacher is -inf adds 0 to
the KL, one where only the student is -inf makes it +inf.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .stats import RowStats


class SupportStats(NamedTuple):
    """`topk_mass` [...] and `support_kl` [...], float32 (float64 for float64 logits), detached."""

    topk_mass: torch.Tensor
    support_kl: torch.Tensor


def support_stats(
    student_rows: torch.Tensor, teacher_rows: torch.Tensor, stats: RowStats, inv_temperature: float
) -> SupportStats:
    """Top-K mass and teacher-student KL on the support, per row (module docstring).

    Args:
        student_rows, teacher_rows: [N, V] (or [B, T, V]) logits as the forward read them (any float dtype).
        stats: the forward's `RowStats` of a topk_logits call (`sparse_index` [N, K], `lse_student` [N]).
        inv_temperature: 1 / T.
    Returns:
        `SupportStats` of [N] tensors in `stats.lse_student.dtype`.
    """
    if stats.sparse_index is None or stats.sparse_index.shape[-1] == 0:
        raise ValueError("support_stats needs the sparse_index of a topk_logits forward")
    k = stats.sparse_index.shape[-1]
    # Gathered in the rows' own layout (a [B, T, V] view need not flatten without a copy); then [N, K].
    index = stats.sparse_index.reshape(*student_rows.shape[:-1], k)
    dtype = stats.lse_student.dtype
    with torch.no_grad():
        z = student_rows.gather(-1, index).reshape(-1, k).to(dtype) * inv_temperature
        u = teacher_rows.gather(-1, index).reshape(-1, k).to(dtype) * inv_temperature
        topk_mass = torch.exp(torch.logsumexp(z, dim=1) - stats.lse_student.reshape(-1))
        log_p_s = torch.log_softmax(z, dim=1)
        log_p_t = torch.log_softmax(u, dim=1)
        p_t = log_p_t.exp()
        terms = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t))
        support_kl = terms.sum(dim=1)
    return SupportStats(topk_mass, support_kl)


def row_entropy(
    logits_rows: torch.Tensor, inv_temperature: float, dtype: torch.dtype = torch.float32, sub_rows: int = 128
) -> torch.Tensor:
    """Entropy H = LSE(z) − Σ softmax(z)·z of each row, z = logits / T: [N] in `dtype`, detached.

    Unlike the support statistics this is a pass over the vocabulary (GRPO's `entropy` metric makes the same pass):
    one read of the rows, in `sub_rows` blocks so that the float32 temporaries stay [sub_rows, V]. The LSE is the
    block's own, not the forward's: H cancels (both terms are of size max|z|) and dH/dLSE = 1 + Σ p·z ≈ LSE, so an
    LSE computed in another order (the kernels' base-2 streaming sum) would cost ~|LSE| ulps of itself. -inf
    logits contribute 0.
    """
    out = torch.empty(logits_rows.shape[0], dtype=dtype, device=logits_rows.device)
    with torch.no_grad():
        for lo in range(0, logits_rows.shape[0], sub_rows):
            z = logits_rows[lo : lo + sub_rows].to(dtype) * inv_temperature
            lse = torch.logsumexp(z, dim=-1)
            p = torch.exp(z - lse[:, None])
            pz = torch.where(p > 0, p * z, torch.zeros_like(p))
            out[lo : lo + sub_rows] = lse - pz.sum(-1)
    return out


__all__ = ["SupportStats", "row_entropy", "support_stats"]
