"""The trainer's logged metrics as pure functions of tensors (no trainer state; see docs/trainer.md, "Metrics").

Every masked mean is returned as a `[2]` tensor `(sum, count)`, so that the trainer reduces all of them across
processes in one collective (`reduce_sum_counts`) and divides the global totals, as TRL's `global_masked_mean`.
Nothing here makes a pass over the vocabulary except `entropy_and_token_logps`, which the trainer calls only where
the student logits are already materialised (the logits path), as TRL's GRPO does for its `entropy`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "IS_LOG_RATIO_CLAMP",
    "entropy_and_token_logps",
    "is_clip_flags",
    "masked_sum_count",
    "per_token_kl",
    "policy_clip_flags",
    "reduce_sum_counts",
    "teacher_prompt_lengths",
]

# The kernels clamp the distillation IS log-ratio to ±20 before exp (sdpo_kernels.config.IS_LOG_RATIO_CLAMP).
IS_LOG_RATIO_CLAMP = 20.0


def masked_sum_count(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(Σ x·mask, Σ mask)` as a float32 [2] tensor (detached).

    x [B, T] with mask [B, T]; or x [B, 1] (sequence-level importance sampling, one value per row): then every row
    counts once, as TRL's `global_masked_mean`.
    """
    x = x.detach().float()
    if x.dim() == 2 and x.shape[1] == 1 and mask.shape[1] != 1:
        return torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
    m = mask.detach().float()
    return torch.stack([(x * m).sum(), m.sum()])


def reduce_sum_counts(
    stats: dict[str, torch.Tensor], gather: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> dict[str, float]:
    """Global means {name: Σ sums / max(Σ counts, 1)} of `masked_sum_count` pairs, with one `gather` (all ranks
    must pass the same names, in the same order) and one host sync. `gather` None: this process only."""
    if not stats:
        return {}
    rows = torch.stack([stats[k].float() for k in stats]).unsqueeze(0)  # [1, K, 2]
    if gather is not None:
        rows = gather(rows)
    totals = rows.reshape(-1, len(stats), 2).sum(0).tolist()
    return {k: s / max(c, 1.0) for k, (s, c) in zip(stats, totals)}


@torch.no_grad()
def entropy_and_token_logps(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, chunk_rows: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy [B, T], log-prob of `ids` [B, T]) of softmax(logits / temperature), float32, no gradient.

    One chunked pass over logits [B, T, V] (peak `chunk_rows × V` float32): the entropy H = LSE(z) − Σ p·z and the
    sampled token's log-prob z_y − LSE(z) share the chunk's LSE. The entropy is TRL's `entropy_from_logits`.
    """
    v = logits.size(-1)
    flat = logits.reshape(-1, v)
    flat_ids = ids.reshape(-1).long()
    entropy = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    logps = torch.empty_like(entropy)
    for start in range(0, flat.shape[0], chunk_rows):
        z = flat[start : start + chunk_rows].float() / temperature
        lse = torch.logsumexp(z, dim=-1)
        p = torch.exp(z - lse.unsqueeze(-1))
        entropy[start : start + chunk_rows] = lse - (p * z).sum(-1)
        idx = flat_ids[start : start + chunk_rows].clamp(0, v - 1).unsqueeze(-1)
        logps[start : start + chunk_rows] = z.gather(-1, idx).squeeze(-1) - lse
    return entropy.reshape(ids.shape), logps.reshape(ids.shape)


def policy_clip_flags(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    importance_sampling_level: str = "token",
) -> dict[str, torch.Tensor]:
    """GRPO's clip indicators (TRL 1.16 `_compute_loss`), float {low, high, region} [B, T] (or [B, 1] at sequence
    level): r = exp(logp − old) (sequence level: exp of the masked mean log-ratio), before `delta`;
    low = r < 1 − ε_lo with A < 0, high = r > 1 + ε_hi with A > 0, region = low | high. old None: r = 1."""
    logps = logps.detach().float()
    old = logps if old_logps is None else old_logps.detach().float()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = logps - old
    if importance_sampling_level == "sequence":
        m = mask.float()
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return {"low": low.float(), "high": high.float(), "region": (low | high).float()}


def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """GRPO's k3 estimator of KL(π‖π_ref) per token: exp(ref − logp) − (ref − logp) − 1 (detached)."""
    d = ref_logps.detach().float() - logps.detach().float()
    return torch.exp(d) - d - 1


def is_clip_flags(student_logps: torch.Tensor, old_logps: torch.Tensor, is_clip: float) -> torch.Tensor:
    """Float [B, T]: 1 where the distillation IS weight exp(clamp(logp − old, ±20)) exceeds `is_clip` (the kernels
    replace it by `is_clip` there), else 0."""
    log_ratio = (student_logps.detach().float() - old_logps.detach().float()).clamp(
        -IS_LOG_RATIO_CLAMP, IS_LOG_RATIO_CLAMP
    )
    return (torch.exp(log_ratio) > is_clip).float()


def teacher_prompt_lengths(teacher_attention_mask: torch.Tensor, completion_length: int) -> torch.Tensor:
    """Teacher (reprompted) prompt lengths [B] in tokens: the attended positions before the last
    `completion_length` columns (the completion that `teacher_input_ids` ends with)."""
    prompt = teacher_attention_mask[:, : teacher_attention_mask.size(1) - completion_length]
    return prompt.float().sum(-1)
