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


def trl_tail_condition(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mode: str = "topk_logits",
    topk: int | None = 100,
    add_tail: bool = True,
    temperature: float = 1.0,
    **_: object,
) -> float:
    """Ulps of the loss that one rounding in TRL's tail bucket can become (0 where it forms none).

    TRL forms the tail as log(-expm1(log P_K)), log P_K = logsumexp(z_K - LSE): the ulp of |z / T| or
    |LSE| that log P_K carries becomes a relative error of (1 + max|z / T|) ulps / P_tail in log P_tail.
    The divergence weighs log P_tail of one distribution by the tail mass of the other (or of the mixture),
    so the loss and its gradient err by about (1 + max|z / T|) * (1 + max(P_T / P_S, P_S / P_T)) ulps,
    P_S, P_T the student's and the teacher's mass outside the student's top-K. Returns the max over rows.
    0 also where the support holds every finite entry (both tails empty; TRL's clamp gives them equal
    mass). Masked (-inf) entries are ignored.
    """
    if mode != "topk_logits" or not add_tail:
        return 0.0
    z, u = student_logits.double() / temperature, teacher_logits.double() / temperature
    if topk >= int(torch.isfinite(z).sum(-1).max()):
        return 0.0
    idx = z.topk(topk, dim=-1).indices
    tails = []
    for x in (z, u):
        log_p = x - torch.logsumexp(x, -1, keepdim=True)
        tails.append((-torch.expm1(torch.logsumexp(log_p.gather(-1, idx), -1))).clamp_min(1e-300))
    ratio = torch.maximum(tails[0] / tails[1], tails[1] / tails[0])
    big = torch.stack([x.masked_fill(~torch.isfinite(x), 0).abs().amax(-1) for x in (z, u)]).amax(0)
    return float(((1 + big) * (1 + ratio)).max())
