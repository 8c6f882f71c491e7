"""The torch.autograd.Function shared by both backends.

A backend is a module with `forward(student, teacher, completion_ids, old_logps, config)
-> (loss, RowStats)` and `backward(student, teacher, stats, grad_loss, config) -> grad`,
both on [N, V] row views. The Function saves the student logits (a reference, not a copy), the
teacher only in full_logits mode (its gradient needs the teacher again), and the row stats.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .config import LossConfig
from .stats import RowStats


class SelfDistillationFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        completion_ids: torch.Tensor | None,
        old_logps: torch.Tensor | None,
        config: LossConfig,
        backend: ModuleType,
    ) -> torch.Tensor:
        loss, stats = backend.forward(student, teacher, completion_ids, old_logps, config)
        ctx.config = config
        ctx.backend = backend
        keep_teacher = teacher if config.mode == "full_logits" else None
        ctx.save_for_backward(student, keep_teacher, *stats.tensors())
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        student, teacher, *stat_tensors = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            stats = RowStats.from_tensors(stat_tensors)
            grad = ctx.backend.backward(student, teacher, stats, grad_loss.contiguous(), ctx.config)
        return grad, None, None, None, None, None
