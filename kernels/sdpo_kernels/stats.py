"""Per-row statistics that a forward pass saves for the backward pass.

Every mode's gradient w.r.t. the scaled student logits `z = logits / T` has the form
(derivation: `docs/math.md`)

    dℓ/dz_j = sparse_coef_k            if j == sparse_index_k   (the support / sampled token)
    dℓ/dz_j = dense_coef · p_j         otherwise                (+ full-vocab term)

with `p = softmax(z)` and one scalar `dense_coef` per row, where the upstream gradient `g` of
the per-token loss ℓ is *not* included (it multiplies everything in the backward pass). The
full-vocabulary mode adds `is_weight · ∂D/∂a_j`, which needs the teacher logits again
(`lse_teacher` and `is_weight` are kept for it). Nothing here is of vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowStats:
    """Saved row statistics, N = number of token rows.

    Attributes:
        lse_student: [N] float32, LSE of the scaled student logits.
        dense_coef: [N] float32, coefficient of p_j in the gradient.
        sparse_index: [N, Ks] int64 vocabulary indices (the top-K support, or the sampled token),
            None for full_logits.
        sparse_coef: [N, Ks] float32, the whole gradient at `sparse_index` (it replaces the
            dense term there: no dense + sparse cancellation in float32).
        lse_teacher: [N] float32, full_logits only.
        is_weight: [N] float32, full_logits only (the importance weight, 1 when IS is off).
    """

    lse_student: torch.Tensor
    dense_coef: torch.Tensor
    sparse_index: torch.Tensor | None = None
    sparse_coef: torch.Tensor | None = None
    lse_teacher: torch.Tensor | None = None
    is_weight: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor | None]:
        return [
            self.lse_student,
            self.dense_coef,
            self.sparse_index,
            self.sparse_coef,
            self.lse_teacher,
            self.is_weight,
        ]

    @staticmethod
    def from_tensors(tensors: list[torch.Tensor | None]) -> RowStats:
        return RowStats(*tensors)


def check_grad_out(out: torch.Tensor | None, student: torch.Tensor) -> torch.Tensor:
    """The buffer a backend's `backward` writes the logits gradient into: a new one when `out` is None.

    A given `out` must be contiguous with the student logits' shape, dtype and device; it may be the
    student logits themselves (the backends read each entry before writing it), but no other view of them.
    """
    if out is None:
        return torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if out.shape != student.shape or out.dtype != student.dtype or out.device != student.device:
        raise ValueError(
            f"out must match the student logits: got {tuple(out.shape)} {out.dtype} on {out.device}, "
            f"expected {tuple(student.shape)} {student.dtype} on {student.device}."
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous.")
    same_storage = out.untyped_storage().data_ptr() == student.untyped_storage().data_ptr()
    if same_storage and not (out.data_ptr() == student.data_ptr() and student.is_contiguous()):
        raise ValueError("out may be the (contiguous) student logits themselves, but no other view of them.")
    return out
