"""Fused-linear SDPO loss: hidden states + lm_head -> loss, never holding the [N, V] logits.

`linear_self_distillation_loss` (functional API) and `LinearSelfDistillationLoss` (nn.Module)
equal computing `logits = hidden @ weight.T + bias` and `self_distillation_loss(...)`, then
`Σ weights · ℓ`, in row chunks whose gradients are computed during the forward; the autograd
backward only scales them by the incoming scalar gradient. The layers, flat and small:

- `config.py`: argument checks (`check_linear_pair`, `check_rows`, `check_policy`, ...);
- `policy.py`: the hybrid term `PolicyTerm` (TRL's GRPO clipped surrogate) and its gradient algebra;
- `chunking.py`: the chunk loop `fused_pass` (chunk sizes, weight-gradient accumulation);
- `ops.py`: the custom op `sdpo_kernels::linear_loss` around `fused_pass`, with its autograd;
- here: the functional API (validation, autocast, planning) and the Module.

Memory bound, no-grad and autocast behaviour, tied teacher weights: docs/fused-linear.md.
Sharded lm_heads (ZeRO-3, FSDP): docs/sharded-training.md.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from . import ops
from .chunking import DEFAULT_CHUNK_DIVISOR, REFERENCE_CHUNK_DIVISOR, default_chunk_rows
from .config import LossConfig, check_chunk_size, check_linear_pair, check_policy, check_rows
from .functional import resolve_backend_name
from .policy import POLICY_KEYS, POLICY_OPTIONAL_KEYS, PolicyTerm, as_policy_term
from .support_stats import SupportStats

__all__ = [
    "DEFAULT_CHUNK_DIVISOR",
    "POLICY_KEYS",
    "POLICY_OPTIONAL_KEYS",
    "REFERENCE_CHUNK_DIVISOR",
    "LinearLossOutput",
    "LinearSelfDistillationLoss",
    "PolicyTerm",
    "default_chunk_rows",
    "linear_self_distillation_loss",
]


class LinearLossOutput(tuple):
    """`(loss, per_token)`, with `.loss`, `.per_token`, `.policy_per_token`, `.support_stats`, `.token_logps` and
    `.entropy` attributes."""

    def __new__(
        cls,
        loss: torch.Tensor,
        per_token: torch.Tensor,
        policy_per_token: torch.Tensor | None = None,
        support_stats: SupportStats | None = None,
        token_logps: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
    ):
        out = super().__new__(cls, (loss, per_token))
        out.policy_per_token = policy_per_token
        out.support_stats = support_stats
        out.token_logps = token_logps
        out.entropy = entropy
        return out

    @property
    def loss(self) -> torch.Tensor:
        return self[0]

    @property
    def per_token(self) -> torch.Tensor:
        return self[1]


# ----------------------------------------------------------------------------------------------
# public API


def linear_self_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    completion_ids: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    *,
    weights: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    mode: str = "topk_logits",
    topk: int | None = 100,
    alpha: float = 0.5,
    add_tail: bool = True,
    is_clip: float | None = 2.0,
    temperature: float = 1.0,
    policy: PolicyTerm | dict | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    return_support_stats: bool = False,
    return_token_logps: bool = False,
    return_entropy: bool = False,
) -> LinearLossOutput:
    """SDPO self-distillation loss from hidden states and lm_head weights (docs/fused-linear.md).

    Values and gradients equal computing `logits = hidden @ weight.T + bias` and calling
    `self_distillation_loss(student_logits, teacher_logits, ...)`, then `Σ weights · ℓ`.
    Under `torch.no_grad()`, or when no student tensor requires grad, only the forward runs.
    Inside `torch.autocast`, float32 operands are cast to the autocast dtype first (as for `F.linear`).

    Args:
        student_hidden: [..., D] float32/bfloat16/float16; the gradient flows to it.
        student_weight: [V, D] lm_head weight, same dtype/device; the gradient flows to it.
        teacher_hidden: [..., D_t] with the student's leading dims, dtype and device (no gradient).
        teacher_weight: [V, D_t]; may be the very same tensor as `student_weight` (no gradient
            from the teacher path).
        completion_ids: [...] sampled tokens (sampled_token mode, IS clipping, policy term).
        old_logps: [...] rollout log-probs of `completion_ids`: the IS weight (with `is_clip`)
            and, by default, the policy ratio's (None: ratio 1, as TRL's `logp.detach()`).
        weights: [...] float per-token reduction weights: loss = Σ weights · ℓ.
        student_bias, teacher_bias: optional [V] lm_head biases (student: gradient flows).
        mode, topk, alpha, add_tail, is_clip, temperature: as in `self_distillation_loss`.
        policy: optional `PolicyTerm`, the GRPO clipped-surrogate term of hybrid mode: adds
            Σ policy.weights · policy_loss. The dict form `dict(advantages=..., epsilon_low=...,
            epsilon_high=..., weights=...[, old_logps=..., delta=...])` is deprecated (converted
            with a DeprecationWarning; a missing `old_logps` key means the call's `old_logps`).
        chunk_size: rows per chunk (default `max(1, N // 8)`, `N // 32` with the reference backend).
        backend: "auto" (Triton for CUDA tensors, reference otherwise) | "triton" | "reference".
        return_support_stats: topk_logits only: also compute each row's `SupportStats` (the student's
            top-K mass, the teacher-student KL on the support) on each chunk's logits: two [rows, K]
            gathers per chunk, no extra pass over the vocabulary.
        return_token_logps: also return the student's log-prob of each completion token,
            log softmax(z / T)_y (needs `completion_ids`; one gathered logit per row and the forward's LSE).
        return_entropy: also return the student's entropy per row, H(softmax(z / T)): one more pass over each
            chunk's logits (in 128-row float32 blocks), as GRPO's `entropy` metric makes over its logits.
    Returns:
        `LinearLossOutput`: `loss, per_token = out`; `loss` a differentiable float32 (float64 for
        float64 inputs) scalar, `per_token` [...] detached ℓ; `out.policy_per_token` [...] detached
        policy loss (None without policy); `out.support_stats` a `SupportStats` of [...] detached
        tensors (None unless `return_support_stats`); `out.token_logps` [...] detached (None unless
        `return_token_logps`); `out.entropy` [...] detached (None unless `return_entropy`). Rows with weight 0
        contribute exactly 0 to the loss and
        to every gradient, even where their loss is not finite (e.g. padding rows).
    """
    policy = as_policy_term(policy)
    student = (student_hidden, student_weight, student_bias)
    teacher = (teacher_hidden, teacher_weight, teacher_bias)
    context = contextlib.nullcontext()
    if isinstance(student_hidden, torch.Tensor) and torch.is_autocast_enabled(student_hidden.device.type):
        # As autocast runs F.linear: float32 operands in the autocast dtype (differentiable casts,
        # so float32 parameters still receive their gradient); the fused pass runs without autocast.
        cast_to = torch.get_autocast_dtype(student_hidden.device.type)
        cast = lambda t: t.to(cast_to) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t
        student, teacher = tuple(map(cast, student)), tuple(map(cast, teacher))
        context = torch.autocast(student_hidden.device.type, enabled=False)
    if return_support_stats and mode != "topk_logits":
        raise ValueError(f"return_support_stats needs mode='topk_logits' (the top-K support), got mode={mode!r}")
    if return_token_logps and completion_ids is None:
        raise ValueError("return_token_logps needs completion_ids (the tokens whose log-probs are returned)")
    settings = dict(mode=mode, topk=topk, alpha=alpha, add_tail=add_tail, is_clip=is_clip, temperature=temperature)
    with context:
        return _fused_loss(
            student=student,
            teacher=teacher,
            completion_ids=completion_ids,
            old_logps=old_logps,
            weights=weights,
            policy=policy,
            settings=settings,
            chunk_size=chunk_size,
            backend=backend,
            return_support_stats=return_support_stats,
            return_token_logps=return_token_logps,
            return_entropy=return_entropy,
        )


def _validate(*, student, teacher, completion_ids, old_logps, weights, policy, settings, chunk_size):
    """Checks every argument; returns the loss config and the row shape."""
    vocab, rows_shape = check_linear_pair(student, teacher)
    device = student[0].device
    check_rows(weights, "weights", rows_shape, device)
    check_chunk_size(chunk_size)
    # A zero-stride stand-in for the [..., V] logits: LossConfig.from_args checks shapes, dtypes
    # and devices (and the completion_ids range) without the logits existing.
    fake_logits = student[0].new_empty(()).expand(*rows_shape, vocab)
    config = LossConfig.from_args(fake_logits, fake_logits, completion_ids, old_logps, **settings)
    if policy is not None:
        check_policy(policy, rows_shape, device, completion_ids)
    return config, rows_shape


def _fused_loss(
    *,
    student,
    teacher,
    completion_ids,
    old_logps,
    weights,
    policy,
    settings,
    chunk_size,
    backend,
    return_support_stats,
    return_token_logps,
    return_entropy,
):
    """Validated, planned and flattened: the fused pass, through autograd when a gradient is wanted."""
    config, rows_shape = _validate(
        student=student,
        teacher=teacher,
        completion_ids=completion_ids,
        old_logps=old_logps,
        weights=weights,
        policy=policy,
        settings=settings,
        chunk_size=chunk_size,
    )
    (h_s, w_s, b_s), (h_t, w_t, b_t) = student, teacher
    impl = resolve_backend_name(backend, h_s.device)
    n = int(math.prod(rows_shape))
    grad_on = torch.is_grad_enabled()
    need_hidden = grad_on and h_s.requires_grad
    need_weight = grad_on and w_s.requires_grad
    need_bias = grad_on and b_s is not None and b_s.requires_grad
    chunk_rows = chunk_size or default_chunk_rows(n, reference_backend=impl == "reference")
    detach = lambda t: None if t is None else t.detach()
    flat = lambda t: None if t is None else t.detach().reshape(n)
    old = flat(old_logps)
    term = None if policy is None else policy.flattened(n, call_old_logps=old)
    c = config
    # reshape is a view when the leading dims collapse; autograd routes grad_h back through it.
    outputs = ops.linear_loss(
        h_s.reshape(n, h_s.shape[-1]) if need_hidden else h_s.detach().reshape(n, h_s.shape[-1]),
        w_s if need_weight else w_s.detach(),
        b_s if need_bias else detach(b_s),
        h_t.detach().reshape(n, h_t.shape[-1]),
        w_t.detach(),
        detach(b_t),
        flat(completion_ids),
        old,
        flat(weights),
        None if term is None else term.advantages,
        None if term is None else term.weights,
        None if term is None else term.old_logps,
        0.0 if term is None else term.epsilon_low,
        0.0 if term is None else term.epsilon_high,
        None if term is None else term.delta,
        c.mode,
        c.topk,
        c.alpha,
        c.add_tail,
        c.is_clip,
        c.temperature,
        chunk_rows,
        impl,
        need_hidden,
        need_weight,
        need_bias,
        return_support_stats,
        return_token_logps,
        return_entropy,
    )
    total, per_token, policy_tok, _grad_h, _grad_w, _grad_b, topk_mass, support_kl, token_logps, entropy = outputs
    support = None
    if return_support_stats:
        support = SupportStats(topk_mass.detach().view(rows_shape), support_kl.detach().view(rows_shape))
    return LinearLossOutput(
        total,
        per_token.detach().view(rows_shape),
        None if policy is None else policy_tok.detach().view(rows_shape),
        support,
        token_logps.detach().view(rows_shape) if return_token_logps else None,
        entropy.detach().view(rows_shape) if return_entropy else None,
    )


class LinearSelfDistillationLoss(nn.Module):
    """`linear_self_distillation_loss` with its settings fixed at construction.

    forward(student_hidden, student_weight, teacher_hidden, teacher_weight, completion_ids=None,
    old_logps=None, *, weights, student_bias=None, teacher_bias=None, policy=None)  (policy: a `PolicyTerm`)
    -> `LinearLossOutput` (`loss, per_token = ...`).
    """

    def __init__(
        self,
        mode: str = "topk_logits",
        topk: int | None = 100,
        alpha: float = 0.5,
        add_tail: bool = True,
        is_clip: float | None = 2.0,
        temperature: float = 1.0,
        chunk_size: int | None = None,
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
            chunk_size=chunk_size,
            backend=backend,
        )

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        completion_ids: torch.Tensor | None = None,
        old_logps: torch.Tensor | None = None,
        *,
        weights: torch.Tensor,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        policy: PolicyTerm | dict | None = None,
    ) -> LinearLossOutput:
        return linear_self_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            completion_ids,
            old_logps,
            weights=weights,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            policy=policy,
            **self.kwargs,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
