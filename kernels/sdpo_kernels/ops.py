"""The losses as torch custom ops, with fake-tensor implementations and registered autograd.

`torch.compile` traces each op as one graph node (no graph break inside a model's compiled forward),
`torch.library.opcheck` checks the registrations, and a CUDA graph captures the launches (no host
sync inside). The ops take only tensors and plain settings; backends are named by string:

- `sdpo_kernels::loss_forward(student, teacher, completion_ids?, old_logps?, <settings>)`
  -> (loss, lse_student, dense_coef, sparse_index, sparse_coef, lse_teacher, is_weight), the
  `RowStats` with absent fields as empty tensors (`pack_stats` / `unpack_stats`).
- `sdpo_kernels::loss_backward(student, teacher?, <stats>, grad_loss, <settings>)` -> the logits gradient.
- `sdpo_kernels::linear_loss(<both heads>, <rows>, <policy>, <settings>, <plan>)` -> (total, per_token,
  policy_per_token, grad_hidden, grad_weight, grad_bias, topk_mass, support_kl, token_logps, entropy): the whole
  fused-linear pass, the student gradients included (computed in the forward, as `chunking.fused_pass` does); its
  backward only scales them by the incoming scalar gradient, in place.

Double backward is not supported: a backward with `create_graph=True` through these ops raises a
RuntimeError (their backward formulas are hand-derived kernels, not differentiable graphs).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from . import reference
from .chunking import ChunkPlan, Head, RowInputs, fused_pass
from .config import LossConfig
from .policy import PolicyTerm
from .stats import RowStats

_DOUBLE_BACKWARD = (
    "sdpo_kernels: double backward (differentiating a gradient of the self-distillation loss, e.g. after "
    "backward(create_graph=True)) is not supported; its backward is a hand-derived kernel"
)


def backend_module(name: str) -> ModuleType:
    """ "triton" | "reference" -> the backend module (triton imported only when used)."""
    if name == "reference":
        return reference
    from . import triton_backend

    return triton_backend


def _config(mode: str, topk: int, alpha: float, add_tail: bool, is_clip: float | None, temperature: float):
    return LossConfig(mode=mode, topk=topk, alpha=alpha, add_tail=add_tail, is_clip=is_clip, temperature=temperature)


def _stat_shapes(student: Tensor, mode: str, topk: int) -> tuple[int, int, torch.dtype]:
    """(rows N, sparse width, float dtype of the stats) of a call."""
    vocab = student.shape[-1]
    n = student.numel() // vocab if vocab else 0
    width = topk if mode == "topk_logits" else 1 if mode == "sampled_token" else 0
    return n, width, torch.promote_types(student.dtype, torch.float32)


def pack_stats(stats: RowStats, student: Tensor, mode: str, topk: int) -> tuple[Tensor, ...]:
    """RowStats -> six tensors (absent fields as empty tensors of fixed shapes, see `_fake_forward`)."""
    n, width, dtype = _stat_shapes(student, mode, topk)
    full = mode == "full_logits"
    empty = lambda *shape, dt=dtype: torch.empty(shape, dtype=dt, device=student.device)
    index = stats.sparse_index if width else None
    coef = stats.sparse_coef if width else None
    return (
        stats.lse_student,
        stats.dense_coef,
        empty(n, width, dt=torch.int64) if index is None else index,
        empty(n, width) if coef is None else coef,
        stats.lse_teacher if full else empty(0),
        stats.is_weight if full else empty(0),
    )


def unpack_stats(tensors, mode: str) -> RowStats:
    lse, dense, index, coef, lse_teacher, is_weight = tensors
    full = mode == "full_logits"
    return RowStats(
        lse,
        dense,
        None if full else index,
        None if full else coef,
        lse_teacher if full else None,
        is_weight if full else None,
    )


@torch.library.custom_op("sdpo_kernels::loss_forward", mutates_args=())
def loss_forward(
    student: Tensor,
    teacher: Tensor,
    completion_ids: Tensor | None,
    old_logps: Tensor | None,
    mode: str,
    topk: int,
    alpha: float,
    add_tail: bool,
    is_clip: float | None,
    temperature: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token loss [N] and the packed row stats, for [N, V] / [B, T, V] row views of any strides."""
    if _stat_shapes(student, mode, topk)[0] == 0:  # fresh empty fields (a backend may return one tensor twice)
        return _fake_forward(student, teacher, completion_ids, old_logps, mode, topk, alpha, add_tail, is_clip,
                             temperature, backend)  # fmt: skip
    config = _config(mode, topk, alpha, add_tail, is_clip, temperature)
    loss, stats = backend_module(backend).forward(student, teacher, completion_ids, old_logps, config)
    return (loss, *pack_stats(stats, student, mode, topk))


@loss_forward.register_fake
def _fake_forward(student, teacher, completion_ids, old_logps, mode, topk, alpha, add_tail, is_clip, temperature,
                  backend):  # fmt: skip
    n, width, dtype = _stat_shapes(student, mode, topk)
    full = mode == "full_logits"
    rows = lambda: student.new_empty((n,), dtype=dtype)
    return (
        rows(),
        rows(),
        rows(),
        student.new_empty((n, width), dtype=torch.int64),
        student.new_empty((n, width), dtype=dtype),
        rows() if full else student.new_empty((0,), dtype=dtype),
        rows() if full else student.new_empty((0,), dtype=dtype),
    )


@torch.library.custom_op("sdpo_kernels::loss_backward", mutates_args=())
def loss_backward(
    student: Tensor,
    teacher: Tensor | None,
    lse_student: Tensor,
    dense_coef: Tensor,
    sparse_index: Tensor,
    sparse_coef: Tensor,
    lse_teacher: Tensor,
    is_weight: Tensor,
    grad_loss: Tensor,
    mode: str,
    topk: int,
    alpha: float,
    add_tail: bool,
    is_clip: float | None,
    temperature: float,
    backend: str,
) -> Tensor:
    """Gradient w.r.t. the student logits: shape and dtype of `student`, contiguous."""
    stats = unpack_stats((lse_student, dense_coef, sparse_index, sparse_coef, lse_teacher, is_weight), mode)
    config = _config(mode, topk, alpha, add_tail, is_clip, temperature)
    return backend_module(backend).backward(student, teacher, stats, grad_loss.contiguous(), config)


@loss_backward.register_fake
def _fake_backward(student, *_args):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _forward_setup(ctx, inputs, output):
    student, teacher, _ids, _old, mode, topk, alpha, add_tail, is_clip, temperature, backend = inputs
    ctx.settings = (mode, topk, alpha, add_tail, is_clip, temperature, backend)
    # The student logits are saved by reference (not copied); the teacher only where its gradient
    # needs it again (full_logits).
    ctx.save_for_backward(student, teacher if mode == "full_logits" else None, *output[1:])


def _forward_backward(ctx, grad_loss, *_grad_stats):
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradient would not be differentiable
        raise RuntimeError(_DOUBLE_BACKWARD)
    student, teacher, *stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        grad = loss_backward(student, teacher, *stats, grad_loss, *ctx.settings)
    return grad, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("sdpo_kernels::loss_forward", _forward_backward, setup_context=_forward_setup)


# ----------------------------------------------------------------------------------------------
# the fused-linear loss


@torch.library.custom_op("sdpo_kernels::linear_loss", mutates_args=())
def linear_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    completion_ids: Tensor | None,
    old_logps: Tensor | None,
    weights: Tensor,
    policy_advantages: Tensor | None,
    policy_weights: Tensor | None,
    policy_old_logps: Tensor | None,
    policy_epsilon_low: float,
    policy_epsilon_high: float,
    policy_delta: float | None,
    mode: str,
    topk: int,
    alpha: float,
    add_tail: bool,
    is_clip: float | None,
    temperature: float,
    chunk_rows: int,
    backend: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    support_stats: bool,
    token_logps: bool,
    entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused pass over [N, D] hidden states (flattened rows [N]); absent outputs are empty [0] tensors."""
    policy = None
    if policy_advantages is not None:
        policy = PolicyTerm(
            advantages=policy_advantages,
            epsilon_low=policy_epsilon_low,
            epsilon_high=policy_epsilon_high,
            weights=policy_weights,
            old_logps=policy_old_logps,
            delta=policy_delta,
        )
    plan = ChunkPlan(
        config=_config(mode, topk, alpha, add_tail, is_clip, temperature),
        backend=backend_module(backend),
        chunk_rows=chunk_rows,
        need_hidden=need_hidden,
        need_weight=need_weight,
        need_bias=need_bias,
        support_stats=support_stats,
        token_logps=token_logps,
        entropy=entropy,
    )
    out = fused_pass(
        student=Head(student_hidden, student_weight, student_bias),
        teacher=Head(teacher_hidden, teacher_weight, teacher_bias),
        rows=RowInputs(completion_ids=completion_ids, old_logps=old_logps, weights=weights, policy=policy),
        plan=plan,
    )
    acc = out.per_token.dtype
    none = lambda dtype: student_hidden.new_empty((0,), dtype=dtype)
    grad_h, grad_w, grad_b = out.grads
    return (
        out.total,
        out.per_token,
        none(acc) if out.policy_per_token is None else out.policy_per_token,
        none(student_hidden.dtype) if grad_h is None else grad_h,
        none(student_weight.dtype) if grad_w is None else grad_w,
        none(student_hidden.dtype) if grad_b is None else grad_b,
        none(acc) if out.support is None else out.support.topk_mass,
        none(acc) if out.support is None else out.support.support_kl,
        none(acc) if out.token_logps is None else out.token_logps,
        none(acc) if out.entropy is None else out.entropy,
    )


@linear_loss.register_fake
def _fake_linear(student_hidden, student_weight, student_bias, *args):
    policy_advantages = args[6]
    need_hidden, need_weight, need_bias, support_stats, token_logps, entropy = args[-6:]
    acc = torch.promote_types(student_hidden.dtype, torch.float32)
    n = student_hidden.shape[0]
    none = lambda dtype: student_hidden.new_empty((0,), dtype=dtype)
    return (
        student_hidden.new_empty((), dtype=acc),
        student_hidden.new_empty((n,), dtype=acc),
        student_hidden.new_empty((n,), dtype=acc) if policy_advantages is not None else none(acc),
        torch.empty_like(student_hidden) if need_hidden else none(student_hidden.dtype),
        torch.empty_like(student_weight) if need_weight else none(student_weight.dtype),
        torch.empty_like(student_bias) if need_bias else none(student_hidden.dtype),
        student_hidden.new_empty((n,), dtype=acc) if support_stats else none(acc),
        student_hidden.new_empty((n,), dtype=acc) if support_stats else none(acc),
        student_hidden.new_empty((n,), dtype=acc) if token_logps else none(acc),
        student_hidden.new_empty((n,), dtype=acc) if entropy else none(acc),
    )


def _linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[3:6])


def _linear_backward(ctx, grad_total, *_grad_rest):
    if torch.is_grad_enabled():  # backward(create_graph=True): the scaled gradients would not be differentiable
        raise RuntimeError(_DOUBLE_BACKWARD)
    if getattr(ctx, "consumed", False):
        raise RuntimeError(
            "linear_self_distillation_loss: backward ran twice through the same call; its precomputed "
            "gradients are consumed (and scaled in place) by the first backward"
        )
    ctx.consumed = True
    grads = ctx.saved_tensors
    # The precomputed gradients scaled by the incoming scalar. Eagerly in place: no second [V, D]
    # buffer (a second backward through the same call then fails autograd's saved-tensor version
    # check). While torch.compile / AOTAutograd traces the backward, out of place: the traced graph
    # must stay functional. Always a multiply, even by 1: knowing the value would cost a host sync.
    out = []
    for needed, g in zip(ctx.needs_input_grad[:3], grads):
        if not (needed and grad_total is not None):
            out.append(None)
        elif _traced(g):
            out.append(g * grad_total.to(g.dtype))
        else:
            out.append(g.mul_(grad_total.to(g.dtype)))
    return (*out, *([None] * 26))


def _traced(t: Tensor) -> bool:
    """Whether `t` is a tracing stand-in (fake or functional tensor) rather than real data."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, (FakeTensor, FunctionalTensor))


torch.library.register_autograd("sdpo_kernels::linear_loss", _linear_backward, setup_context=_linear_setup)
