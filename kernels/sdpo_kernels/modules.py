"""nn.Module form of the loss."""

from __future__ import annotations

import torch
from torch import nn

from .functional import self_distillation_loss


class SelfDistillationLoss(nn.Module):
    """`self_distillation_loss` with its settings fixed at construction.

    forward(student_logits [..., V], teacher_logits [..., V], completion_ids=None, old_logps=None)
    -> per-token loss [...] float32. See `self_distillation_loss` for the arguments.
    """

    def __init__(
        self,
        mode: str = "topk_logits",
        topk: int | None = 100,
        alpha: float = 0.5,
        add_tail: bool = True,
        is_clip: float | None = 2.0,
        temperature: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.kwargs = dict(
            mode=mode,
            topk=topk,
            alpha=alpha,
            add_tail=add_tail,
            is_clip=is_clip,
            temperature=temperature,
            backend=backend,
        )

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        completion_ids: torch.Tensor | None = None,
        old_logps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self_distillation_loss(student_logits, teacher_logits, completion_ids, old_logps, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
