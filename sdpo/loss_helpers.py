"""The trainer's pure loss pieces (no trainer state; unit-tested against TRL's formulas).

Re-exported from `sdpo.trainer`, where they used to live.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import SDPOConfig

__all__ = [
    "aggregation_weights",
    "clipped_policy_per_token",
    "distillation_aggregation_weights",
    "distillation_loss_kwargs",
]


def aggregation_weights(
    mask: torch.Tensor,
    loss_type: str,
    *,
    max_completion_length: int | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Per-token weights w [B, T] with loss = Σ w·ℓ, reproducing TRL's GRPO aggregations (before GA scaling).

    grpo: per-sequence masked mean, then mean over the B rows (rows without tokens count as 0).
    bnpo: masked mean over the local batch.  dr_grpo: masked sum / (B · max_completion_length).
    dapo: masked sum / `normalizer` (the global active-token count per process, precomputed by the caller).
    """
    mask = mask.to(torch.float32)
    if loss_type == "grpo":
        return mask / mask.sum(-1, keepdim=True).clamp(min=1.0) / mask.size(0)
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("max_completion_length is required for loss_type='dr_grpo'")
        return mask / (mask.size(0) * max_completion_length)
    if loss_type == "dapo":
        if normalizer is None:
            raise ValueError("normalizer is required for loss_type='dapo'")
        return mask / torch.as_tensor(normalizer, dtype=torch.float32, device=mask.device).clamp(min=1.0)
    raise ValueError(f"loss_type must be one of 'grpo', 'bnpo', 'dr_grpo', 'dapo', got {loss_type!r}")


def distillation_aggregation_weights(
    mask: torch.Tensor, aggregation: str, *, max_completion_length: int | None = None
) -> torch.Tensor:
    """Per-token weights w [B, T] with distillation loss = Σ w·ℓ over one micro-batch (before GA scaling).

    mask [B, T]: the tokens that have a teacher. 'trl' (TRL 1.16): per-sequence token mean, averaged over all B
    rows (rows without a teacher count 0). The official SDPO modes (verl's `agg_loss` as SDPO calls it, on the
    micro-batch): 'token-mean', 'seq-mean-token-mean' / 'seq-mean-token-sum' (over the rows that have teacher
    tokens) and 'seq-mean-token-sum-norm' (total / `max_completion_length`, verl's padded response length).
    """
    mask = mask.to(torch.float32)
    row_tokens = mask.sum(-1, keepdim=True)
    rows = (row_tokens > 0).sum().clamp(min=1).to(torch.float32)
    if aggregation == "trl":
        return mask / row_tokens.clamp(min=1.0) / mask.size(0)
    if aggregation == "token-mean":
        return mask / mask.sum().clamp(min=1.0)
    if aggregation == "seq-mean-token-mean":
        return mask / row_tokens.clamp(min=1.0) / rows
    if aggregation == "seq-mean-token-sum":
        return mask / rows
    if aggregation == "seq-mean-token-sum-norm":
        if max_completion_length is None:
            raise ValueError("max_completion_length is required for 'seq-mean-token-sum-norm'")
        return mask / max_completion_length
    raise ValueError(f"unknown distillation aggregation {aggregation!r}")


def clipped_policy_per_token(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    importance_sampling_level: str = "token",
    delta: float | None = None,
) -> torch.Tensor:
    """GRPO's clipped surrogate per token, as TRL: −min(r·A, clip(r, 1−ε_lo, 1+ε_hi)·A).

    per_token_logps/old [B, T], advantages [B] or [B, T], mask [B, T] -> [B, T] (or [B, 1] at sequence level).
    """
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    return -torch.min(coef_1 * advantages, coef_2 * advantages)


def distillation_loss_kwargs(args: SDPOConfig, temperature: float, topk: int | None = None) -> dict[str, Any]:
    """Keyword arguments of `sdpo_kernels.self_distillation_loss` for this config (`topk`: the clamped K)."""
    return dict(
        mode=args.distillation_mode,
        topk=args.distillation_topk if topk is None else topk,
        alpha=args.distillation_alpha,
        add_tail=args.distillation_add_tail,
        is_clip=args.distillation_is_clip,
        temperature=temperature,
    )
