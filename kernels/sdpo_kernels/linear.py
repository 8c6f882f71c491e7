"""Fused-linear SDPO loss: hidden states + lm_head -> loss, never holding the [N, V] logits.

`linear_self_distillation_loss` computes, for row chunks of the token rows,

    logits_s = h_s[chunk] @ W_s^T (+ b_s)        logits_t = h_t[chunk] @ W_t^T (+ b_t)

in the input dtype (fp32 accumulation inside the matmul), runs a loss backend's `forward` on
the chunk (per-token loss ℓ and `RowStats`), and, because the loss is linear in ℓ
(`loss = Σ weights · ℓ`), already knows each row's upstream gradient `weights[row]`: the
backend's `backward` gives the chunk's logits gradient, which is folded at once into

    grad_h[chunk] = grad_logits @ W_s        grad_W += grad_logits^T @ h_s[chunk]        grad_b += Σ_rows grad_logits

and the chunk buffers are dropped. The autograd backward only scales these precomputed
gradients by the incoming scalar gradient (in place; skipped when it is exactly 1).

Memory (default chunking)
    Chunk rows `c = max(1, N // 8)` (`DEFAULT_CHUNK_DIVISOR`). At most two [c, V] buffers in the
    logits dtype are alive at once: student and teacher logits during the loss forward; during the
    loss backward the student logits are overwritten by their gradient (backends' `out=`), next
    to the teacher logits only in "full_logits" mode, whose backward needs them. That is ≤ 2/8 =
    1/4 of one [N, V] logits tensor (for N ≥ 8; a chunk has at least one row). Why 8 and not more
    chunks: the weight gradient is accumulated chunk by chunk into a float32 [V, D] buffer, and each
    accumulation reads and writes it whole, 8·V·D bytes against 2·c·V·D flops, so the GEMM is
    compute-bound only for c of about a thousand rows or more on an H100 (a roofline estimate, not
    a measurement). The backend's own temporaries come on top: the Triton backend has none of
    vocabulary size; the reference backend's float32/int64 work tensors are several times its input
    chunk (up to 2^22 elements each), so with it the default is `N // 32` (`REFERENCE_CHUNK_DIVISOR`).
    Everything else is the gradient of the weight (accumulated in float32 for 16-bit weights, then
    cast, as Liger does; in place in the weight's dtype for float32/float64), of the bias and of the
    hidden states. `chunk_size` overrides the row count. Measured on CPU (reference backend, fp32,
    profiler allocation trace): N = 2048, V = 151936, D = 1536 peaks at 0.85 [N, V] fp32 tensors of
    extra memory, where the weight gradient alone is 0.75.

No gradient work
    Under `torch.no_grad()` / `torch.inference_mode()`, or when none of `student_hidden`,
    `student_weight`, `student_bias` requires grad, only the forward runs: no backend backward,
    no gradient buffers.

Teacher and tied weights
    `teacher_weight` may be the very same tensor as `student_weight` (tied / shared lm_head):
    the teacher side is always computed under no_grad and never produces a gradient, so the
    weight gets exactly the student's gradient.

Sharded lm_head (DeepSpeed ZeRO-3, FSDP)
    The fused call reads the [V, D] weight directly (it never calls the lm_head module), and needs
    all of it on every rank: each rank computes its own token rows against the whole vocabulary.
    So the trainer gathers the weight around the call and passes *the module's parameter* (not a
    detached copy), so that the weight gradient reaches the sharded optimizer state:
    - DeepSpeed ZeRO-3: `with deepspeed.zero.GatheredParameters([lm_head.weight, lm_head.bias]):`
      (TRL's `trl.trainer.utils.maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias)` does this
      and is a no-op without ZeRO-3 or when the weight is already available, e.g. tied embeddings).
      The gradients are computed during the forward and only scaled in the backward, so the
      backward needs no gathered weight; but ZeRO-3 reduces gradients through hooks armed by the
      model's forward, so run the loss inside the wrapped model's forward (TRL's
      `trl.models.utils._ForwardRedirection`, as TRL does for Liger's fused losses).
    - FSDP (1 and 2): call the loss inside the root FSDP module's forward (the same forward
      redirection), where the parameters are unsharded and gradient reduce-scatter is armed.
      `FullyShardedDataParallel.summon_full_params` is for evaluation only (gradients computed
      inside it do not reach the shards).
    Pass the gathered weight as `teacher_weight` too when the teacher shares it (tied weights are
    supported: the teacher side never produces a gradient). A separate teacher model needs its own
    head whole as well: under ZeRO-3 gather it in the same context; under FSDP its head is
    unsharded only inside the teacher's forward, so copy it out there (`SDPOTrainer` does both;
    `tests/test_distributed.py` checks them against DDP on 2 CPU processes). Vocabulary-parallel
    (tensor-parallel) heads are not supported: top-K and LSE need the whole vocabulary row.

Hybrid (policy) term
    `policy=dict(advantages=[N], epsilon_low=, epsilon_high=, weights=[N])` adds
    `Σ policy_weights · policy_loss` computed from the same student logits chunk, with TRL's GRPO
    / SDPO clipped surrogate (`SDPOTrainer._compute_policy_loss`, token-level ratio):

        logp  = log_softmax(logits_s / T)[y]        (y = completion_ids)
        ratio = exp(logp - old_logps)               (old_logps = logp.detach() when None: ratio = 1)
        policy_loss = -min(ratio · A, clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) · A)

    With an optional `delta` (TRL's two-sided clipping), the first term is `min(ratio, delta) · A`.

    Its logits gradient, `coef · (δ_jy − p_j) / T`, is folded into the backend's row statistics
    (the `p_j` part joins the dense coefficient and the K on-support entries, see `stats.py`)
    plus one entry per row at y, so it costs no extra pass over the vocabulary. Exception:
    renormalised top-K (`add_tail=False`), whose dense coefficient is structurally zero (backends
    skip that term); there the whole gradient is written in place by `_renormalised_policy_grad_`.
    Sequence-level importance sampling is not supported.

Autocast
    Inside `torch.autocast`, float32 hidden states / weights / biases are cast to the autocast
    dtype first (as autocast does for `F.linear`; the casts are differentiable, so float32
    parameters get float32 gradients), then the fused pass runs with autocast off.

Return value
    A `LinearLossOutput`: a 2-tuple `(loss, per_token)` (so `loss, per_token = ...` unpacks) with
    attributes `.loss`, `.per_token` and `.policy_per_token` ([N] detached policy loss, None
    without `policy`). `loss` is the float32 (float64 for float64 inputs) scalar
    `Σ weights·ℓ (+ Σ policy_weights·policy_loss)`; rows with weight 0 contribute exactly 0 to it
    and to every gradient, even where their loss is not finite (e.g. padding rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import ModuleType

import torch
from torch import nn

from . import reference
from .config import FLOAT_DTYPES, LossConfig
from .functional import resolve_backend
from .stats import RowStats

__all__ = [
    "DEFAULT_CHUNK_DIVISOR",
    "REFERENCE_CHUNK_DIVISOR",
    "LinearLossOutput",
    "LinearSelfDistillationLoss",
    "default_chunk_rows",
    "linear_self_distillation_loss",
]

# Default chunking: N // 8 rows per chunk (at least 1), so that the (at most two) [rows, V] chunk
# buffers stay ≤ 1/4 of one [N, V] logits tensor, with chunks as large as that allows (see "Memory"
# above). The reference backend's own temporaries are several times its input chunk (float32 and
# int64 [rows, V] work tensors), so it gets N // 32.
DEFAULT_CHUNK_DIVISOR = 8
REFERENCE_CHUNK_DIVISOR = 32
POLICY_KEYS = ("advantages", "epsilon_low", "epsilon_high", "weights")
# Optional: the policy ratio's own old log-probs (None: ratio 1), when they differ from the
# `old_logps` used for IS clipping (e.g. a trainer clips with vLLM's sampling log-probs).
POLICY_OPTIONAL_KEYS = ("old_logps", "delta")


def default_chunk_rows(n_rows: int, reference_backend: bool = False) -> int:
    """Rows per chunk at default chunking: n_rows // 8 (n_rows // 32 for the reference backend),
    at least 1."""
    return max(1, n_rows // (REFERENCE_CHUNK_DIVISOR if reference_backend else DEFAULT_CHUNK_DIVISOR))


class LinearLossOutput(tuple):
    """`(loss, per_token)`, with `.loss`, `.per_token` and `.policy_per_token` attributes."""

    def __new__(cls, loss: torch.Tensor, per_token: torch.Tensor, policy_per_token: torch.Tensor | None = None):
        out = super().__new__(cls, (loss, per_token))
        out.policy_per_token = policy_per_token
        return out

    @property
    def loss(self) -> torch.Tensor:
        return self[0]

    @property
    def per_token(self) -> torch.Tensor:
        return self[1]


@dataclass(frozen=True)
class _Plan:
    config: LossConfig
    backend: ModuleType
    chunk_rows: int
    epsilon_low: float | None  # None: no policy term
    epsilon_high: float | None
    delta: float | None  # two-sided clipping of the ratio's unclipped term (None: off)
    need_hidden: bool
    need_weight: bool
    need_bias: bool

    @property
    def has_policy(self) -> bool:
        return self.epsilon_low is not None

    @property
    def needs_grad(self) -> bool:
        return self.need_hidden or self.need_weight or self.need_bias


# ----------------------------------------------------------------------------------------------
# validation


def _check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_float(x: torch.Tensor, name: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 (or float64, reference only), got {x.dtype}")


def _check_same(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def _check_linear(hidden, weight, bias, prefix: str) -> tuple[int, int]:
    """Checks one side (student or teacher); returns (V, D)."""
    hidden = _check_tensor(hidden, f"{prefix}_hidden")
    weight = _check_tensor(weight, f"{prefix}_weight")
    _check_float(hidden, f"{prefix}_hidden")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{prefix}_hidden must be [..., D] with D >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"{prefix}_weight must be [V, D] with V >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{prefix}_weight must be [V, {hidden.shape[-1]}] ({prefix}_hidden's last dim), got {tuple(weight.shape)}"
        )
    _check_same(weight, f"{prefix}_weight", hidden, f"{prefix}_hidden")
    if bias is not None:
        bias = _check_tensor(bias, f"{prefix}_bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        _check_same(bias, f"{prefix}_bias", hidden, f"{prefix}_hidden")
    return weight.shape[0], weight.shape[1]


def _check_rows(x, name: str, rows_shape: torch.Size, device: torch.device) -> torch.Tensor:
    x = _check_tensor(x, name)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape != rows_shape:
        raise ValueError(
            f"{name} must have shape {tuple(rows_shape)} (the hidden states without D), got {tuple(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"{name} must be on {device}, got {x.device}")
    return x


def _check_policy(policy, rows_shape: torch.Size, device: torch.device, completion_ids) -> tuple:
    if not isinstance(policy, dict):
        raise ValueError(f"policy must be None or a dict with keys {POLICY_KEYS}, got {type(policy).__name__}")
    unknown = sorted(set(policy) - set(POLICY_KEYS) - set(POLICY_OPTIONAL_KEYS))
    missing = [k for k in POLICY_KEYS if k not in policy]
    if unknown or missing:
        raise ValueError(
            f"policy must have the keys {POLICY_KEYS} (optionally {POLICY_OPTIONAL_KEYS}); "
            f"missing {missing}, unknown {unknown}"
        )
    if completion_ids is None:
        raise ValueError("completion_ids is required when policy is given (the policy term needs log p(y))")
    adv = _check_rows(policy["advantages"], "policy['advantages']", rows_shape, device)
    pw = _check_rows(policy["weights"], "policy['weights']", rows_shape, device)
    if policy.get("old_logps") is not None:
        policy_old = _check_rows(policy["old_logps"], "policy['old_logps']", rows_shape, device)
        if not policy_old.is_floating_point():
            raise ValueError("policy['old_logps'] must be a floating-point tensor")
    eps = []
    for key in ("epsilon_low", "epsilon_high"):
        v = policy[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"policy['{key}'] must be a finite number >= 0, got {v!r}")
        eps.append(float(v))
    delta = policy.get("delta")
    if delta is not None:
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta <= 0:
            raise ValueError(f"policy['delta'] must be None or a finite number > 0, got {delta!r}")
        delta = float(delta)
    return adv, pw, eps[0], eps[1], delta


# ----------------------------------------------------------------------------------------------
# the fused pass


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return hidden @ weight.t()
    return torch.addmm(bias, hidden, weight.t())


_OUT_DTYPE_ADDMM_FAILED: set[torch.device] = set()


def _accumulate_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc += grad_logits^T @ hidden, without a [V, D] temporary where possible."""
    if acc.dtype == grad_logits.dtype:
        acc.addmm_(grad_logits.t(), hidden)
        return
    if acc.device.type == "cuda" and acc.device not in _OUT_DTYPE_ADDMM_FAILED:
        try:  # float32 output of a 16-bit GEMM, accumulated in place (torch >= 2.8, as Liger does)
            torch.addmm(acc, grad_logits.t(), hidden, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _OUT_DTYPE_ADDMM_FAILED.add(acc.device)
    acc.add_(torch.mm(grad_logits.t(), hidden))


def _policy_rows(z_y, lse, old, adv, pw, eps_low: float, eps_high: float, delta: float | None = None):
    """TRL's clipped surrogate per row and the coefficient of d logp/dz in the gradient.

    Returns (policy_loss [n], coef [n]) with d(Σ pw·policy_loss)/d logp = coef (0 where pw == 0).
    """
    logp = z_y - lse
    log_ratio = torch.zeros_like(logp) if old is None else logp - old.to(logp.dtype)
    ratio = torch.exp(log_ratio)
    a = adv.to(logp.dtype)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * a
    # TRL clamps the unclipped term's ratio at delta after the clipped term took the raw ratio;
    # d min(ratio, delta)/dlogp = ratio where ratio <= delta (torch.clamp passes the boundary), else 0.
    capped = ratio if delta is None else ratio.clamp(max=delta)
    unclipped = capped * a
    loss = -torch.minimum(unclipped, clipped)
    # d(-min)/dlogp: -ratio·A where the unclipped term is the minimum and not capped (ties: both
    # branches agree, or A = 0), 0 where a constant (clipped or capped) term is.
    w = pw.to(logp.dtype)
    live = (w != 0) & (unclipped <= clipped)
    if delta is not None:
        live = live & (ratio <= delta)
    coef = torch.where(live, -ratio * a * w, torch.zeros_like(w))
    return loss, coef


def _fold(stats: RowStats, g: torch.Tensor, policy_coef: torch.Tensor, logits: torch.Tensor, config: LossConfig):
    """Row stats whose backward, with the returned 0/1 upstream gradient, gives
    `g · dℓ/dz − policy_coef · p` (the policy term's dense part) on every vocabulary entry.

    Follows the `RowStats` contract: entries at `sparse_index` hold their whole gradient, the
    others `dense_coef · p_j` (+ the full-vocabulary term). Rows with g = 0 get nothing of the
    distillation term, even where their stats are not finite.
    """
    live = g != 0

    def scale(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        gg = g.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))
        return torch.where(live.view_as(gg), t * gg, torch.zeros_like(t))

    sparse = scale(stats.sparse_coef)
    if sparse is not None:
        z_k = logits.gather(1, stats.sparse_index).to(sparse.dtype) * config.inv_temperature
        p_k = torch.exp(z_k - stats.lse_student[:, None].to(sparse.dtype))
        sparse = sparse - policy_coef.to(sparse.dtype)[:, None] * p_k
    folded = replace(
        stats,
        dense_coef=scale(stats.dense_coef) - policy_coef.to(stats.dense_coef.dtype),
        sparse_coef=sparse,
        is_weight=scale(stats.is_weight),
    )
    upstream = (live | (policy_coef != 0)).to(g.dtype)
    return folded, upstream


def _renormalised_policy_grad_(logits, stats: RowStats, g, policy_coef, config: LossConfig) -> torch.Tensor:
    """Logits gradient of renormalised top-K (`add_tail=False`) plus the policy term, written over `logits`.

    The distillation part has no dense term (backends skip it): `g/T · sparse_coef` at the support
    indices, 0 elsewhere. The policy adds `−policy_coef · p / T` everywhere (p = softmax(logits / T)),
    computed here in row slices of ≤ 2^22 elements before each slice is overwritten.
    """
    work = torch.promote_types(logits.dtype, torch.float32)
    inv_t = config.inv_temperature
    live = g != 0
    idx = stats.sparse_index
    # The support entries' final values, while their logits are still there.
    p_k = torch.exp(logits.gather(1, idx).to(work) * inv_t - stats.lse_student[:, None].to(work))
    c = (policy_coef * inv_t).to(work)
    dist_k = torch.where(live[:, None], stats.sparse_coef.to(work) * (g.to(work) * inv_t)[:, None], 0.0)
    support = dist_k - torch.where(c[:, None] != 0, c[:, None] * p_k, 0.0)
    step = max(1, (1 << 22) // max(logits.shape[1], 1))
    for lo in range(0, logits.shape[0], step):
        hi = min(logits.shape[0], lo + step)
        cc = c[lo:hi, None]
        p = torch.exp(logits[lo:hi].to(work) * inv_t - stats.lse_student[lo:hi, None].to(work))
        logits[lo:hi] = torch.where(cc != 0, -cc * p, 0.0).to(logits.dtype)
    logits.scatter_(1, idx, support.to(logits.dtype))
    return logits


def _fused_pass(h_s, w_s, b_s, h_t, w_t, b_t, ids, old, weights, adv, pw, policy_old, plan: _Plan):
    """Loss, per-token losses, policy per-token losses and (if planned) the parameter gradients."""
    config, backend = plan.config, plan.backend
    n = h_s.shape[0]
    acc_dtype = torch.promote_types(h_s.dtype, torch.float32)
    per_token = torch.empty(n, dtype=acc_dtype, device=h_s.device)
    policy_tok = torch.empty(n, dtype=acc_dtype, device=h_s.device) if plan.has_policy else None
    total = torch.zeros((), dtype=acc_dtype, device=h_s.device)
    grad_h = torch.empty_like(h_s) if plan.need_hidden else None
    grad_w = torch.zeros_like(w_s, dtype=torch.promote_types(w_s.dtype, torch.float32)) if plan.need_weight else None
    grad_b = torch.zeros_like(b_s, dtype=torch.promote_types(b_s.dtype, torch.float32)) if plan.need_bias else None
    old_for_loss = old if config.is_clip is not None else None
    keep_teacher = config.mode == "full_logits"

    for lo in range(0, n, plan.chunk_rows):
        hi = min(n, lo + plan.chunk_rows)
        c_ids = None if ids is None else ids[lo:hi]
        c_old = None if old_for_loss is None else old_for_loss[lo:hi]
        logits_s = _logits(h_s[lo:hi], w_s, b_s)
        logits_t = _logits(h_t[lo:hi], w_t, b_t)
        loss, stats = backend.forward(logits_s, logits_t, c_ids, c_old, config)
        if not keep_teacher:
            del logits_t
            logits_t = None
        g = weights[lo:hi].to(loss.dtype)
        per_token[lo:hi] = loss
        total += torch.where(g != 0, g * loss, torch.zeros_like(loss)).sum()

        policy_coef = None
        if plan.has_policy:
            y = c_ids.long()
            z_y = logits_s.gather(1, y[:, None]).squeeze(1).to(stats.lse_student.dtype) * config.inv_temperature
            p_old = None if policy_old is None else policy_old[lo:hi]
            p_loss, policy_coef = _policy_rows(
                z_y, stats.lse_student, p_old, adv[lo:hi], pw[lo:hi], plan.epsilon_low, plan.epsilon_high, plan.delta
            )
            policy_tok[lo:hi] = p_loss
            p_w = pw[lo:hi].to(p_loss.dtype)
            total += torch.where(p_w != 0, p_w * p_loss, torch.zeros_like(p_loss)).sum()

        if not plan.needs_grad:
            continue
        # The logits gradient overwrites the student logits: no third [rows, V] buffer.
        if policy_coef is None:
            grad_logits = backend.backward(logits_s, logits_t, stats, g, config, out=logits_s)
        elif config.mode == "topk_logits" and not config.add_tail:
            # Renormalised top-K: the dense coefficient is structurally zero and backends skip the
            # dense term, so the policy's dense part cannot be folded into it (see `_fold`).
            grad_logits = _renormalised_policy_grad_(logits_s, stats, g, policy_coef, config)
        else:
            folded, upstream = _fold(stats, g, policy_coef, logits_s, config)
            grad_logits = backend.backward(logits_s, logits_t, folded, upstream, config, out=logits_s)
        if policy_coef is not None:
            # the δ_jy part of the policy gradient: one entry per row
            delta = (policy_coef * config.inv_temperature).to(grad_logits.dtype)
            grad_logits.scatter_add_(1, y[:, None], delta[:, None])
        del logits_s, logits_t, stats
        if grad_h is not None:
            torch.mm(grad_logits, w_s, out=grad_h[lo:hi])
        if grad_w is not None:
            _accumulate_weight_grad(grad_w, grad_logits, h_s[lo:hi])
        if grad_b is not None:
            grad_b += grad_logits.sum(0, dtype=grad_b.dtype)
        del grad_logits

    if grad_w is not None and grad_w.dtype != w_s.dtype:
        grad_w = grad_w.to(w_s.dtype)
    if grad_b is not None and grad_b.dtype != b_s.dtype:
        grad_b = grad_b.to(b_s.dtype)
    return total, per_token, policy_tok, (grad_h, grad_w, grad_b)


class _LinearSelfDistillationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, ids, old, weights, adv, pw, policy_old, plan: _Plan):
        total, per_token, policy_tok, grads = _fused_pass(
            h_s, w_s, b_s, h_t, w_t, b_t, ids, old, weights, adv, pw, policy_old, plan
        )
        ctx.grads = grads
        if policy_tok is None:
            policy_tok = per_token.new_empty(0)
        ctx.mark_non_differentiable(per_token, policy_tok)
        return total, per_token, policy_tok

    @staticmethod
    def backward(ctx, grad_total, _grad_per_token, _grad_policy_tok):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_self_distillation_loss: backward ran twice through the same call; its precomputed "
                "gradients are consumed (and scaled in place) by the first backward"
            )
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None  # lets autograd take ownership of the buffers (no copy into .grad)
        if not torch.equal(grad_total, torch.ones_like(grad_total)):
            for t in (grad_h, grad_w, grad_b):
                if t is not None:
                    t.mul_(grad_total.to(t.dtype))
        return grad_h, grad_w, grad_b, *([None] * 10)


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
    policy: dict | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> LinearLossOutput:
    """SDPO self-distillation loss from hidden states and lm_head weights (see the module doc).

    Values and gradients equal computing `logits = hidden @ weight.T + bias` and calling
    `self_distillation_loss(student_logits, teacher_logits, ...)`, then `Σ weights · ℓ`.

    Args:
        student_hidden: [..., D] float32/bfloat16/float16; the gradient flows to it.
        student_weight: [V, D] lm_head weight, same dtype/device; the gradient flows to it.
        teacher_hidden: [..., D_t] with the student's leading dims, dtype and device (no gradient).
        teacher_weight: [V, D_t]; may be the very same tensor as `student_weight` (no gradient
            from the teacher path).
        completion_ids: [...] sampled tokens (sampled_token mode, IS clipping, policy term).
        old_logps: [...] rollout log-probs of `completion_ids`: the IS weight (with `is_clip`)
            and the policy ratio (None: ratio 1, as TRL's `logp.detach()`).
        weights: [...] float per-token reduction weights: loss = Σ weights · ℓ.
        student_bias, teacher_bias: optional [V] lm_head biases (student: gradient flows).
        mode, topk, alpha, add_tail, is_clip, temperature: as in `self_distillation_loss`.
        policy: optional GRPO term for hybrid mode, `dict(advantages=[...], epsilon_low=float,
            epsilon_high=float, weights=[...])`; adds Σ policy_weights · policy_loss. An optional
            `old_logps` key ([...] or None: ratio 1) gives the ratio its own old log-probs;
            without it the ratio uses `old_logps`. An optional `delta` (float > 0 or None) is TRL's
            two-sided clipping.
        chunk_size: rows per chunk (default `max(1, N // 8)`, `N // 32` with the reference backend).
        backend: "auto" (Triton for CUDA tensors, reference otherwise) | "triton" | "reference".
    Returns:
        `LinearLossOutput`: `loss, per_token = out`; `loss` a differentiable scalar, `per_token`
        [...] detached ℓ; `out.policy_per_token` [...] detached policy loss (None without policy).
    """
    if isinstance(student_hidden, torch.Tensor) and torch.is_autocast_enabled(student_hidden.device.type):
        # As autocast runs F.linear: float32 operands in the autocast dtype (differentiable casts,
        # so float32 parameters still receive their gradient); the fused pass runs without autocast.
        cast_to = torch.get_autocast_dtype(student_hidden.device.type)
        cast = lambda t: t.to(cast_to) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t
        with torch.autocast(student_hidden.device.type, enabled=False):
            return linear_self_distillation_loss(
                cast(student_hidden),
                cast(student_weight),
                cast(teacher_hidden),
                cast(teacher_weight),
                completion_ids,
                old_logps,
                weights=weights,
                student_bias=cast(student_bias),
                teacher_bias=cast(teacher_bias),
                mode=mode,
                topk=topk,
                alpha=alpha,
                add_tail=add_tail,
                is_clip=is_clip,
                temperature=temperature,
                policy=policy,
                chunk_size=chunk_size,
                backend=backend,
            )
    vocab, _ = _check_linear(student_hidden, student_weight, student_bias, "student")
    vocab_t, _ = _check_linear(teacher_hidden, teacher_weight, teacher_bias, "teacher")
    if vocab_t != vocab:
        raise ValueError(f"teacher_weight must have the student's vocabulary size {vocab}, got {vocab_t}")
    rows_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != rows_shape:
        raise ValueError(
            f"teacher_hidden must have the leading dims of student_hidden {tuple(rows_shape)}, "
            f"got {tuple(teacher_hidden.shape[:-1])}"
        )
    _check_same(teacher_hidden, "teacher_hidden", student_hidden, "student_hidden")
    device = student_hidden.device
    weights = _check_rows(weights, "weights", rows_shape, device)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    # A zero-stride stand-in for the [..., V] logits: LossConfig.from_args checks shapes, dtypes
    # and devices (and the completion_ids range) without the logits existing.
    fake_logits = student_hidden.new_empty(()).expand(*rows_shape, vocab)
    config = LossConfig.from_args(
        fake_logits,
        fake_logits,
        completion_ids,
        old_logps,
        mode=mode,
        topk=topk,
        alpha=alpha,
        add_tail=add_tail,
        is_clip=is_clip,
        temperature=temperature,
    )
    adv = pw = None
    eps_low = eps_high = delta = None
    if policy is not None:
        adv, pw, eps_low, eps_high, delta = _check_policy(policy, rows_shape, device, completion_ids)
    impl = resolve_backend(backend, device)

    n = int(math.prod(rows_shape))
    grad_on = torch.is_grad_enabled()
    plan = _Plan(
        config=config,
        backend=impl,
        chunk_rows=chunk_size or default_chunk_rows(n, reference_backend=impl is reference),
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        delta=delta,
        need_hidden=grad_on and student_hidden.requires_grad,
        need_weight=grad_on and student_weight.requires_grad,
        need_bias=grad_on and student_bias is not None and student_bias.requires_grad,
    )
    # reshape is a view when the leading dims collapse; autograd routes grad_h back through it.
    h_s = student_hidden.reshape(n, student_hidden.shape[-1])
    h_t = teacher_hidden.detach().reshape(n, teacher_hidden.shape[-1])
    w_t = teacher_weight.detach()
    b_t = None if teacher_bias is None else teacher_bias.detach()
    flat = lambda t: None if t is None else t.detach().reshape(n)
    ids = flat(completion_ids)
    old, weights, adv, pw = flat(old_logps), flat(weights), flat(adv), flat(pw)
    policy_old = flat(policy.get("old_logps")) if policy is not None and "old_logps" in policy else old

    if plan.needs_grad:
        total, per_token, policy_tok = _LinearSelfDistillationFunction.apply(
            h_s, student_weight, student_bias, h_t, w_t, b_t, ids, old, weights, adv, pw, policy_old, plan
        )
        policy_tok = policy_tok if plan.has_policy else None
    else:
        with torch.no_grad():
            total, per_token, policy_tok, _ = _fused_pass(
                h_s.detach(),
                student_weight.detach(),
                None if student_bias is None else student_bias.detach(),
                h_t,
                w_t,
                b_t,
                ids,
                old,
                weights,
                adv,
                pw,
                policy_old,
                plan,
            )
    return LinearLossOutput(
        total,
        per_token.view(rows_shape),
        None if policy_tok is None else policy_tok.view(rows_shape),
    )


class LinearSelfDistillationLoss(nn.Module):
    """`linear_self_distillation_loss` with its settings fixed at construction.

    forward(student_hidden, student_weight, teacher_hidden, teacher_weight, completion_ids=None,
    old_logps=None, *, weights, student_bias=None, teacher_bias=None, policy=None)
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
        policy: dict | None = None,
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
