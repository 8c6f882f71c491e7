"""Functional API: `self_distillation_loss`."""

from __future__ import annotations

import itertools
import os

import torch

from . import ops
from .config import BACKENDS, LossConfig
from .support_stats import SupportStats, support_stats


def triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend_name(backend: str, device: torch.device) -> str:
    """ "triton" or "reference": the backend that `backend` ("auto" | "triton" | "reference") runs on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference" or (backend == "auto" and device.type != "cuda"):
        return "reference"
    if not triton_usable(device):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}")
    return "triton"


def resolve_backend(backend: str, device: torch.device):
    """The backend module for `backend` ("auto" | "triton" | "reference") and `device`."""
    return ops.backend_module(resolve_backend_name(backend, device))


def _collapses(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether dims with these sizes/strides merge into one (as `view` allows): size-1 dims never matter."""
    dims = [(n, st) for n, st in zip(shape, strides) if n != 1]
    pairs = itertools.pairwise(dims)
    return all(outer_stride == inner_stride * inner_n for (_, outer_stride), (inner_n, inner_stride) in pairs)


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """A [N, V] view of [..., V] logits, else a [B, T, V] view (e.g. `logits[:, :-1]`, whose
    leading dims do not collapse), else (rare layouts) a copy. Decided from sizes and strides (no
    exception handling: torch.compile traces it)."""
    vocab = logits.shape[-1]
    lead, lead_strides = tuple(logits.shape[:-1]), tuple(logits.stride()[:-1])
    if _collapses(lead, lead_strides):
        return logits.view(-1, vocab)
    if logits.dim() >= 3 and _collapses(lead[:-1], lead_strides[:-1]):
        return logits.view(-1, logits.shape[-2], vocab)
    return logits.reshape(-1, vocab)


def self_distillation_loss(
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
    backend: str = "auto",
    return_support_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SupportStats]:
    """Per-token SDPO self-distillation loss, never materialising full-vocabulary log-probs.

    Semantics are TRL 1.16's `trl.experimental.sdpo.loss_utils` applied to `logits / temperature`
    (then `apply_importance_sampling_clipping` with the student's log-prob of the sampled token),
    with two documented refinements: the tail bucket uses the exact `LSE_{not S} - LSE` (TRL's
    floor kept), and -inf logits are absent vocabulary entries (0 · log 0 = 0, where TRL gives NaN).
    Ties at the K-th largest student logit keep the lowest vocabulary index.

    Args:
        student_logits: [..., V] float32/bfloat16/float16; the gradient flows to it.
        teacher_logits: [..., V], same shape, dtype and device; never differentiated.
        completion_ids: [...] integer sampled tokens; needed by "sampled_token" and IS clipping.
        old_logps: [...] float rollout log-probs of `completion_ids`; with `is_clip` enables IS
            clipping, ignored when None (as in TRL).
        mode: "topk_logits" | "full_logits" | "sampled_token".
        topk: size of the student's top-K support (topk_logits; 1 <= topk <= V).
        alpha: 0 forward KL, 1 reverse KL, otherwise generalised JSD; sampled_token needs 1.0.
        add_tail: topk_logits only: add a tail bucket instead of renormalising the top-K.
        is_clip: clip of the importance weight exp(logp - old_logp); None disables it.
        temperature: logits are divided by it (> 0).
        backend: "auto" (Triton for CUDA tensors, reference otherwise) | "triton" | "reference".
        return_support_stats: topk_logits only: also return the `SupportStats` of each row (the student's
            top-K mass and the teacher-student KL on the support; `sdpo_kernels.support_stats`: two [N, K]
            gathers, no pass over the vocabulary).
    Returns:
        [...] float32 per-token loss, differentiable w.r.t. `student_logits`; with `return_support_stats`,
        `(loss, SupportStats)` whose fields are [...] detached float32.
    """
    if return_support_stats and mode != "topk_logits":
        raise ValueError(f"return_support_stats needs mode='topk_logits' (the top-K support), got mode={mode!r}")
    config = LossConfig.from_args(
        student_logits,
        teacher_logits,
        completion_ids,
        old_logps,
        mode=mode,
        topk=topk,
        alpha=alpha,
        add_tail=add_tail,
        is_clip=is_clip,
        temperature=temperature,
    )
    impl = resolve_backend_name(backend, student_logits.device)
    rows_shape = student_logits.shape[:-1]
    student = as_rows(student_logits)
    teacher = as_rows(teacher_logits.detach())
    if student.dim() != teacher.dim():  # one is only a [B, T, V] view: give both that form
        inner = student_logits.shape[-2]
        student, teacher = (x.view(-1, inner, x.shape[-1]) for x in (student, teacher))
    ids = None if completion_ids is None else completion_ids.reshape(-1)
    old = None if (old_logps is None or config.is_clip is None) else old_logps.detach().reshape(-1)
    c = config
    loss, *packed = ops.loss_forward(
        student, teacher, ids, old, c.mode, c.topk, c.alpha, c.add_tail, c.is_clip, c.temperature, impl
    )
    if not return_support_stats:
        return loss.view(rows_shape)
    rows = support_stats(student, teacher, ops.unpack_stats(packed, c.mode), c.inv_temperature)
    return loss.view(rows_shape), SupportStats(*(x.view(rows_shape) for x in rows))
