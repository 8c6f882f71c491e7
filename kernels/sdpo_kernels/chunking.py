"""The chunk loop of the fused-linear loss (`fused_pass`): row chunks of logits, loss and gradients.

For each chunk of rows, `logits = hidden[chunk] @ weight^T (+ bias)` for student and teacher, the
loss backend's `forward` (per-token loss ℓ and `RowStats`), then, since the loss is linear in ℓ
and each row's upstream gradient is its weight, the backend's `backward` writes the logits gradient
over the student logits, and it is folded at once into the hidden-state, weight (fp32 accumulated)
and bias gradients before the chunk is dropped. See docs/fused-linear.md for the memory bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from .config import LossConfig
from .policy import PolicyTerm, fold_policy_grad, renormalised_policy_grad_
from .stats import RowStats
from .support_stats import SupportStats, row_entropy, support_stats

# Default chunking: N // 8 rows per chunk (at least 1), so that the (at most two) [rows, V] chunk
# buffers stay ≤ 1/4 of one [N, V] logits tensor, with chunks as large as that allows (see
# docs/fused-linear.md). The reference backend's own temporaries are several times its input
# chunk (float32 and int64 [rows, V] work tensors), so it gets N // 32.
DEFAULT_CHUNK_DIVISOR = 8
REFERENCE_CHUNK_DIVISOR = 32


def default_chunk_rows(n_rows: int, reference_backend: bool = False) -> int:
    """Rows per chunk at default chunking: n_rows // 8 (n_rows // 32 for the reference backend),
    at least 1."""
    return max(1, n_rows // (REFERENCE_CHUNK_DIVISOR if reference_backend else DEFAULT_CHUNK_DIVISOR))


@dataclass(frozen=True)
class Head:
    """One side's lm_head operands: hidden [N, D], weight [V, D], bias [V] or None (one dtype and device)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    def logits(self, lo: int, hi: int) -> torch.Tensor:
        """[hi - lo, V] logits of rows [lo, hi), in the input dtype."""
        if self.bias is None:
            return self.hidden[lo:hi] @ self.weight.t()
        return torch.addmm(self.bias, self.hidden[lo:hi], self.weight.t())


@dataclass(frozen=True)
class RowInputs:
    """The per-row operands, flattened to [N] and detached.

    completion_ids: int [N] or None; old_logps: [N] or None (IS clipping); weights: [N] float;
    policy: a `PolicyTerm` flattened to [N] (`PolicyTerm.flattened`), or None.
    """

    completion_ids: torch.Tensor | None
    old_logps: torch.Tensor | None
    weights: torch.Tensor
    policy: PolicyTerm | None


@dataclass(frozen=True)
class ChunkPlan:
    """Validated settings of one fused pass: loss config, backend module, rows per chunk, which
    student gradients to compute, whether to keep each row's `SupportStats` (topk_logits), each
    row's student log-prob of its completion token (`token_logps`) and the student's entropy (`entropy`)."""

    config: LossConfig
    backend: ModuleType
    chunk_rows: int
    need_hidden: bool
    need_weight: bool
    need_bias: bool
    support_stats: bool = False
    token_logps: bool = False
    entropy: bool = False

    @property
    def needs_grad(self) -> bool:
        return self.need_hidden or self.need_weight or self.need_bias


@dataclass(frozen=True)
class FusedResult:
    """Scalar loss, per-token losses [N], policy per-token losses [N] (or None), the student
    gradients `(grad_hidden, grad_weight, grad_bias)` (None where not planned) and the rows'
    `SupportStats` ([N] each; None unless planned) and student log-probs of the completion tokens
    log softmax(z / T)_y [N] and entropies of softmax(z / T) [N] (each None unless planned)."""

    total: torch.Tensor
    per_token: torch.Tensor
    policy_per_token: torch.Tensor | None
    grads: tuple
    support: SupportStats | None = None
    token_logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


@dataclass
class _Sums:
    """What the chunks accumulate into."""

    per_token: torch.Tensor
    policy_tok: torch.Tensor | None
    total: torch.Tensor
    grad_h: torch.Tensor | None
    grad_w: torch.Tensor | None
    grad_b: torch.Tensor | None
    support: SupportStats | None = None
    token_logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    @classmethod
    def allocate(cls, student: Head, plan: ChunkPlan, has_policy: bool) -> _Sums:
        h, w, b = student.hidden, student.weight, student.bias
        acc_dtype = torch.promote_types(h.dtype, torch.float32)
        rows = lambda: torch.empty(h.shape[0], dtype=acc_dtype, device=h.device)
        return cls(
            per_token=rows(),
            policy_tok=rows() if has_policy else None,
            total=torch.zeros((), dtype=acc_dtype, device=h.device),
            grad_h=torch.empty_like(h) if plan.need_hidden else None,
            grad_w=torch.zeros_like(w, dtype=torch.promote_types(w.dtype, torch.float32)) if plan.need_weight else None,
            grad_b=torch.zeros_like(b, dtype=torch.promote_types(b.dtype, torch.float32)) if plan.need_bias else None,
            support=SupportStats(rows(), rows()) if plan.support_stats else None,
            token_logps=rows() if plan.token_logps else None,
            entropy=rows() if plan.entropy else None,
        )

    def add_grads(self, grad_logits: torch.Tensor, student: Head, lo: int, hi: int) -> None:
        if self.grad_h is not None:
            torch.mm(grad_logits, student.weight, out=self.grad_h[lo:hi])
        if self.grad_w is not None:
            _accumulate_weight_grad(self.grad_w, grad_logits, student.hidden[lo:hi])
        if self.grad_b is not None:
            self.grad_b += grad_logits.sum(0, dtype=self.grad_b.dtype)

    def result(self, student: Head) -> FusedResult:
        """The sums, with the weight and bias gradients cast to the parameters' dtypes."""
        grad_w, grad_b = self.grad_w, self.grad_b
        if grad_w is not None and grad_w.dtype != student.weight.dtype:
            grad_w = grad_w.to(student.weight.dtype)
        if grad_b is not None and grad_b.dtype != student.bias.dtype:
            grad_b = grad_b.to(student.bias.dtype)
        grads = (self.grad_h, grad_w, grad_b)
        return FusedResult(
            self.total, self.per_token, self.policy_tok, grads, self.support, self.token_logps, self.entropy
        )


def fused_pass(*, student: Head, teacher: Head, rows: RowInputs, plan: ChunkPlan) -> FusedResult:
    """Loss, per-token losses, policy per-token losses and (if planned) the student gradients."""
    n = student.hidden.shape[0]
    sums = _Sums.allocate(student, plan, has_policy=rows.policy is not None)
    for lo in range(0, n, plan.chunk_rows):
        _run_chunk(student, teacher, rows, plan, sums, lo, min(n, lo + plan.chunk_rows))
    return sums.result(student)


def _weighted_sum(w: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Σ w·loss, rows with w = 0 contributing exactly 0 (even where their loss is not finite)."""
    return torch.where(w != 0, w * loss, torch.zeros_like(loss)).sum()


def _run_chunk(student: Head, teacher: Head, rows: RowInputs, plan: ChunkPlan, sums: _Sums, lo: int, hi: int):
    config = plan.config
    c_ids = None if rows.completion_ids is None else rows.completion_ids[lo:hi]
    c_old = None if config.is_clip is None or rows.old_logps is None else rows.old_logps[lo:hi]
    logits_s = student.logits(lo, hi)
    logits_t = teacher.logits(lo, hi)
    loss, stats = plan.backend.forward(logits_s, logits_t, c_ids, c_old, config)
    if sums.support is not None:  # before the backward overwrites logits_s (two [rows, K] gathers)
        chunk = support_stats(logits_s, logits_t, stats, config.inv_temperature)
        sums.support.topk_mass[lo:hi] = chunk.topk_mass
        sums.support.support_kl[lo:hi] = chunk.support_kl
    if sums.entropy is not None:  # also before the backward: a pass over the chunk's student logits
        sums.entropy[lo:hi] = row_entropy(logits_s, config.inv_temperature, sums.entropy.dtype)
    if config.mode != "full_logits":
        logits_t = None  # only full_logits' backward reads the teacher logits
    g = rows.weights[lo:hi].to(loss.dtype)
    sums.per_token[lo:hi] = loss
    sums.total += _weighted_sum(g, loss)

    policy_coef = None
    z_y = None
    if rows.policy is not None or sums.token_logps is not None:  # one gathered value per row
        y = c_ids.long()
        z_y = logits_s.gather(1, y[:, None]).squeeze(1).to(stats.lse_student.dtype) * config.inv_temperature
    if sums.token_logps is not None:
        sums.token_logps[lo:hi] = z_y - stats.lse_student
    if rows.policy is not None:
        p_loss, policy_coef = rows.policy.surrogate(z_y, stats.lse_student, lo, hi)
        sums.policy_tok[lo:hi] = p_loss
        sums.total += _weighted_sum(rows.policy.weights[lo:hi].to(p_loss.dtype), p_loss)

    if not plan.needs_grad:
        return
    grad_logits = _grad_logits_(logits_s, logits_t, stats, g, policy_coef, c_ids, plan)
    del logits_s, logits_t, stats
    sums.add_grads(grad_logits, student, lo, hi)


def _grad_logits_(logits_s, logits_t, stats: RowStats, g, policy_coef, c_ids, plan: ChunkPlan) -> torch.Tensor:
    """The chunk's logits gradient, written over the student logits (no third [rows, V] buffer)."""
    config, backend = plan.config, plan.backend
    if policy_coef is None:
        return backend.backward(logits_s, logits_t, stats, g, config, out=logits_s)
    if config.mode == "topk_logits" and not config.add_tail:
        # Renormalised top-K: the dense coefficient is structurally zero and backends skip the
        # dense term, so the policy's dense part cannot be folded into it (see `fold_policy_grad`).
        grad_logits = renormalised_policy_grad_(logits_s, stats, g, policy_coef, config)
    else:
        folded, upstream = fold_policy_grad(stats, g, policy_coef, logits_s, config)
        grad_logits = backend.backward(logits_s, logits_t, folded, upstream, config, out=logits_s)
    # the δ_jy part of the policy gradient: one entry per row
    delta = (policy_coef * config.inv_temperature).to(grad_logits.dtype)
    grad_logits.scatter_add_(1, c_ids.long()[:, None], delta[:, None])
    return grad_logits


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
