"""Independent oracles: TRL 1.16's eager `loss_utils`, applied as the SDPO trainer does."""

from __future__ import annotations

import torch
from trl.experimental.sdpo import loss_utils


def trl_self_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_ids: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    *,
    mode: str = "topk_logits",
    topk: int | None = 100,
    alpha: float = 0.5,
    add_tail: bool = True,
    is_clip: float | None = 2.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """TRL's per-token loss on `logits / temperature` (autograd flows to student_logits)."""
    z = student_logits / temperature
    u = teacher_logits / temperature
    if mode == "topk_logits":
        loss = loss_utils.compute_topk_self_distillation_loss(
            z, u, distillation_topk=topk, distillation_alpha=alpha, distillation_add_tail=add_tail
        )
    elif mode == "full_logits":
        loss = loss_utils.compute_full_logit_self_distillation_loss(z, u, distillation_alpha=alpha)
    else:
        loss = loss_utils.compute_sampled_token_self_distillation_loss(z, u, completion_ids, distillation_alpha=alpha)
    if is_clip is not None and old_logps is not None:
        logp = torch.log_softmax(z, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        loss = loss_utils.apply_importance_sampling_clipping(loss, logp, old_logps, is_clip)
    return loss


def tie_free_logits(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 0.0625) -> torch.Tensor:
    """Rows holding distinct values exactly representable in bf16 (vocab <= 256): no top-K ties."""
    *rows, vocab = shape
    n = 1
    for r in rows:
        n *= r
    perm = torch.stack([torch.randperm(vocab) for _ in range(n)]).to(torch.float64)
    return ((perm - vocab / 2) * scale).view(*shape).to(dtype)
