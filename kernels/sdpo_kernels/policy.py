"""The hybrid (GRPO policy) term of the fused-linear loss: its arguments and its algebra.

`PolicyTerm` adds `Σ weights · policy_loss` to `linear_self_distillation_loss`, computed from the
same student logits chunk with TRL's GRPO / SDPO clipped surrogate (token-level ratio):

    logp  = log_softmax(logits_s / T)[y]        (y = completion_ids)
    ratio = exp(logp - old_logps)               (old_logps None: ratio = 1, as TRL's logp.detach())
    policy_loss = -min(ratio · A, clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) · A)

With `delta` (TRL's two-sided clipping) the first term is `min(ratio, delta) · A`. Its logits
gradient, `coef · (δ_jy − p_j) / T`, is folded into the loss backend's row statistics (see
`fold_policy_grad`) plus one entry per row at y, so it costs no extra pass over the vocabulary.
Sequence-level importance sampling is not supported.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, replace

import torch

from .config import LossConfig
from .stats import RowStats

__all__ = ["FROM_CALL", "POLICY_KEYS", "POLICY_OPTIONAL_KEYS", "PolicyTerm", "as_policy_term"]

# Keys of the deprecated dict form of the policy term.
POLICY_KEYS = ("advantages", "epsilon_low", "epsilon_high", "weights")
POLICY_OPTIONAL_KEYS = ("old_logps", "delta")


class _FromCall(enum.Enum):
    FROM_CALL = "FROM_CALL"

    def __repr__(self) -> str:
        return "FROM_CALL"


# `PolicyTerm.old_logps` default: the ratio uses the call's own `old_logps` argument.
FROM_CALL = _FromCall.FROM_CALL


@dataclass(frozen=True, eq=False)
class PolicyTerm:
    """The GRPO clipped-surrogate term of hybrid mode (`linear_self_distillation_loss(policy=...)`).

    `[...]` is the loss call's row shape (the hidden states without D); tensors are on its device.

    Attributes:
        advantages: [...] floating-point tensor, the advantage A of each token.
        epsilon_low: number >= 0; the ratio is clipped below at `1 - epsilon_low`.
        epsilon_high: number >= 0; the ratio is clipped above at `1 + epsilon_high`.
        weights: [...] floating-point tensor; the term adds `Σ weights · policy_loss`
            (independent of the distillation weights; rows with weight 0 contribute exactly 0).
        old_logps: the ratio's old log-probs: a [...] floating-point tensor, None (ratio 1, as
            TRL's `logp.detach()`), or `FROM_CALL` (default: the call's `old_logps` argument,
            ratio 1 when that is None). Lets the ratio use other log-probs than IS clipping does.
        delta: None, or a number > 0: TRL's two-sided clipping, `min(ratio, delta) · A` as the
            unclipped term.
    """

    advantages: torch.Tensor
    epsilon_low: float
    epsilon_high: float
    weights: torch.Tensor
    old_logps: torch.Tensor | _FromCall | None = FROM_CALL
    delta: float | None = None

    @classmethod
    def from_dict(cls, policy: dict) -> PolicyTerm:
        """The term from the deprecated dict form (keys `POLICY_KEYS`, optionally `POLICY_OPTIONAL_KEYS`;
        a missing `old_logps` key is `FROM_CALL`)."""
        unknown = sorted(set(policy) - set(POLICY_KEYS) - set(POLICY_OPTIONAL_KEYS))
        missing = [k for k in POLICY_KEYS if k not in policy]
        if unknown or missing:
            raise ValueError(
                f"policy must have the keys {POLICY_KEYS} (optionally {POLICY_OPTIONAL_KEYS}); "
                f"missing {missing}, unknown {unknown}"
            )
        return cls(**policy)

    def flattened(self, n: int, call_old_logps: torch.Tensor | None) -> PolicyTerm:
        """The term with detached [n] tensors, float settings and `old_logps` resolved (never `FROM_CALL`)."""
        flat = lambda t: None if t is None else t.detach().reshape(n)
        return replace(
            self,
            advantages=flat(self.advantages),
            weights=flat(self.weights),
            old_logps=call_old_logps if self.old_logps is FROM_CALL else flat(self.old_logps),
            epsilon_low=float(self.epsilon_low),
            epsilon_high=float(self.epsilon_high),
            delta=None if self.delta is None else float(self.delta),
        )

    def surrogate(self, z_y: torch.Tensor, lse: torch.Tensor, lo: int, hi: int):
        """`clipped_surrogate` of rows [lo, hi) of a flattened term: (policy_loss, coef)."""
        old = None if self.old_logps is None else self.old_logps[lo:hi]
        return clipped_surrogate(
            z_y - lse,
            old,
            self.advantages[lo:hi],
            self.weights[lo:hi],
            self.epsilon_low,
            self.epsilon_high,
            self.delta,
        )


def as_policy_term(policy) -> PolicyTerm | None:
    """None, a `PolicyTerm`, or the deprecated dict (converted, with a DeprecationWarning)."""
    if policy is None or isinstance(policy, PolicyTerm):
        return policy
    if isinstance(policy, dict):
        warnings.warn(
            "linear_self_distillation_loss(policy=dict(...)) is deprecated; pass "
            "sdpo_kernels.PolicyTerm(advantages=..., epsilon_low=..., epsilon_high=..., weights=...)",
            DeprecationWarning,
            stacklevel=3,
        )
        return PolicyTerm.from_dict(policy)
    raise ValueError(
        f"policy must be None, a PolicyTerm or (deprecated) a dict with keys {POLICY_KEYS}, got {type(policy).__name__}"
    )


def clipped_surrogate(logp, old, adv, pw, eps_low: float, eps_high: float, delta: float | None = None):
    """TRL's clipped surrogate per row and the coefficient of d logp/dz in the gradient.

    Returns (policy_loss [n], coef [n]) with d(Σ pw·policy_loss)/d logp = coef (0 where pw == 0).
    """
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


def fold_policy_grad(
    stats: RowStats, g: torch.Tensor, policy_coef: torch.Tensor, logits: torch.Tensor, config: LossConfig
):
    """Row stats whose backward, with the returned 0/1 upstream gradient, gives
    `g · dℓ/dz − policy_coef · p` (the policy term's dense part) on every vocabulary entry.

    Follows the `RowStats` contract: entries at `sparse_index` hold their whole gradient, the
    others `dense_coef · p_j` (+ the full-vocabulary term). Rows with g = 0 get nothing of the
    distillation term, even where their stats are not finite. Not for renormalised top-K, whose
    dense coefficient backends skip (see `renormalised_policy_grad_`).
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


def renormalised_policy_grad_(logits, stats: RowStats, g, policy_coef, config: LossConfig) -> torch.Tensor:
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
