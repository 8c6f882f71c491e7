"""Validated loss settings shared by every backend.

`LossConfig.from_args` and the `check_*` functions below (the fused-linear loss's hidden states,
lm_head weights, per-row tensors and policy term) are the one place where user arguments are
checked; kernels and the reference trust a `LossConfig` completely.
"""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass

import torch

MODES = ("topk_logits", "full_logits", "sampled_token")
BACKENDS = ("auto", "triton", "reference")
# float64 is accepted by the reference backend only (it computes in float64: gradcheck).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# TRL floors the tail mass: `log(-expm1(min(LSE(a_S), -1e-7)))`. The floored tail log-prob is
# this constant, and no gradient flows through the tail while the floor is active.
TAIL_LOG_FLOOR = math.log(-math.expm1(-1e-7))
# IS ratio clamp of TRL's `apply_importance_sampling_clipping`.
IS_LOG_RATIO_CLAMP = 20.0
# Divergence kinds, the kernels' compile-time switch (the same numbers as in `triton_math`).
FORWARD_KL, REVERSE_KL, GENERALISED_JSD = 0, 1, 2


@dataclass(frozen=True)
class LossConfig:
    """Settings of one self-distillation loss call (already validated).

    Attributes:
        mode: "topk_logits" | "full_logits" | "sampled_token".
        topk: size of the student's top-K support (topk_logits only, else 0).
        alpha: 0 forward KL, 1 reverse KL, otherwise generalised JSD.
        add_tail: topk_logits only: add the tail bucket instead of renormalising the top-K.
        is_clip: upper clip of the importance weight, or None when IS clipping is off
            (also None when no `old_logps` were given).
        temperature: logits are divided by it before every log-softmax.
    """

    mode: str
    topk: int
    alpha: float
    add_tail: bool
    is_clip: float | None
    temperature: float

    @property
    def divergence(self) -> int:
        """FORWARD_KL (alpha 0), REVERSE_KL (alpha 1) or GENERALISED_JSD: a compile-time switch for kernels."""
        return FORWARD_KL if self.alpha == 0.0 else REVERSE_KL if self.alpha == 1.0 else GENERALISED_JSD

    @property
    def alpha_kind(self) -> int:
        """Deprecated name of `divergence`."""
        warnings.warn(
            "LossConfig.alpha_kind is deprecated; use LossConfig.divergence", DeprecationWarning, stacklevel=2
        )
        return self.divergence

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    @staticmethod
    def from_args(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        completion_ids: torch.Tensor | None,
        old_logps: torch.Tensor | None,
        *,
        mode: str,
        topk: int | None,
        alpha: float,
        add_tail: bool,
        is_clip: float | None,
        temperature: float,
    ) -> LossConfig:
        """Check user arguments and return the config; raises ValueError naming the argument."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_logits(student_logits, "student_logits")
        check_logits(teacher_logits, "teacher_logits")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
                f"got {tuple(teacher_logits.shape)}"
            )
        if teacher_logits.dtype != student_logits.dtype:
            raise ValueError(
                f"teacher_logits must have the dtype of student_logits ({student_logits.dtype}), "
                f"got {teacher_logits.dtype}"
            )
        if teacher_logits.device != student_logits.device:
            raise ValueError(
                f"teacher_logits must be on the device of student_logits ({student_logits.device}), "
                f"got {teacher_logits.device}"
            )
        vocab = student_logits.shape[-1]
        rows_shape = student_logits.shape[:-1]
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        alpha = float(alpha)
        if not isinstance(temperature, (int, float)) or not float(temperature) > 0.0 or math.isinf(temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if is_clip is not None and (not isinstance(is_clip, (int, float)) or not float(is_clip) > 0.0):
            raise ValueError(f"is_clip must be None or a number > 0, got {is_clip!r}")

        if mode == "topk_logits":
            if topk is None:
                raise ValueError("topk is required when mode='topk_logits'")
            if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= vocab:
                raise ValueError(f"topk must be an integer in [1, vocab size {vocab}], got {topk!r}")
        else:
            topk = 0
        if mode == "sampled_token" and alpha != 1.0:
            raise ValueError(f"alpha must be 1.0 (reverse KL) when mode='sampled_token', got {alpha}")

        use_is = is_clip is not None and old_logps is not None
        if completion_ids is not None:
            check_completion_ids(completion_ids, rows_shape, vocab, student_logits.device)
        if mode == "sampled_token" and completion_ids is None:
            raise ValueError("completion_ids is required when mode='sampled_token'")
        if old_logps is not None:
            if not isinstance(old_logps, torch.Tensor) or not old_logps.is_floating_point():
                raise ValueError("old_logps must be a floating-point tensor")
            if old_logps.shape != rows_shape:
                raise ValueError(
                    f"old_logps must have shape {tuple(rows_shape)} (student_logits without the vocab dim), "
                    f"got {tuple(old_logps.shape)}"
                )
            if old_logps.device != student_logits.device:
                raise ValueError(f"old_logps must be on {student_logits.device}, got {old_logps.device}")
            if use_is and completion_ids is None:
                raise ValueError("completion_ids is required for IS clipping (old_logps given with is_clip)")
        return LossConfig(
            mode=mode,
            topk=int(topk),
            alpha=alpha,
            add_tail=bool(add_tail) and mode == "topk_logits",
            is_clip=float(is_clip) if use_is else None,
            temperature=float(temperature),
        )


def check_logits(logits: torch.Tensor, name: str) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 (or float64, reference only), got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty last (vocabulary) dimension, got {tuple(logits.shape)}")


def check_completion_ids(
    completion_ids: torch.Tensor, rows_shape: torch.Size, vocab: int, device: torch.device
) -> None:
    if (
        not isinstance(completion_ids, torch.Tensor)
        or completion_ids.is_floating_point()
        or completion_ids.is_complex()
    ):
        raise ValueError("completion_ids must be an integer tensor")
    if completion_ids.dtype == torch.bool:
        raise ValueError("completion_ids must be an integer tensor, got bool")
    if completion_ids.shape != rows_shape:
        raise ValueError(
            f"completion_ids must have shape {tuple(rows_shape)} (logits without the vocab dim), "
            f"got {tuple(completion_ids.shape)}"
        )
    if completion_ids.device != device:
        raise ValueError(f"completion_ids must be on {device}, got {completion_ids.device}")
    if completion_ids.numel() and values_checkable(completion_ids):
        lo, hi = (int(v) for v in torch.aminmax(completion_ids))
        if lo < 0 or hi >= vocab:
            raise ValueError(f"completion_ids must lie in [0, {vocab}), got values in [{lo}, {hi}]")


def values_checkable(x: torch.Tensor) -> bool:
    """Whether a check of `x`'s values is free: a CPU tensor in eager mode. On a GPU it would cost a host
    sync per call (and break CUDA-graph capture), under torch.compile a graph break; there the kernels
    handle the bad value instead (an out-of-range completion id makes its row's loss NaN, docs/kernels.md)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------
# fused-linear arguments (`linear_self_distillation_loss`)


def check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(x: torch.Tensor, name: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 (or float64, reference only), got {x.dtype}")


def check_same(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def check_linear(hidden, weight, bias, prefix: str) -> tuple[int, int]:
    """Checks one side (student or teacher) of the fused-linear loss; returns (V, D)."""
    hidden = check_tensor(hidden, f"{prefix}_hidden")
    weight = check_tensor(weight, f"{prefix}_weight")
    check_float(hidden, f"{prefix}_hidden")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{prefix}_hidden must be [..., D] with D >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"{prefix}_weight must be [V, D] with V >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{prefix}_weight must be [V, {hidden.shape[-1]}] ({prefix}_hidden's last dim), got {tuple(weight.shape)}"
        )
    check_same(weight, f"{prefix}_weight", hidden, f"{prefix}_hidden")
    if bias is not None:
        bias = check_tensor(bias, f"{prefix}_bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        check_same(bias, f"{prefix}_bias", hidden, f"{prefix}_hidden")
    return weight.shape[0], weight.shape[1]


def check_linear_pair(student: tuple, teacher: tuple) -> tuple[int, torch.Size]:
    """Checks both sides, each `(hidden, weight, bias)`, and that they match; returns (V, row shape)."""
    vocab, _ = check_linear(*student, "student")
    vocab_t, _ = check_linear(*teacher, "teacher")
    if vocab_t != vocab:
        raise ValueError(f"teacher_weight must have the student's vocabulary size {vocab}, got {vocab_t}")
    rows_shape = student[0].shape[:-1]
    if teacher[0].shape[:-1] != rows_shape:
        raise ValueError(
            f"teacher_hidden must have the leading dims of student_hidden {tuple(rows_shape)}, "
            f"got {tuple(teacher[0].shape[:-1])}"
        )
    check_same(teacher[0], "teacher_hidden", student[0], "student_hidden")
    return vocab, rows_shape


def check_rows(x, name: str, rows_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """A floating-point per-row tensor ([...], the hidden states without D) on `device`."""
    x = check_tensor(x, name)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape != rows_shape:
        raise ValueError(
            f"{name} must have shape {tuple(rows_shape)} (the hidden states without D), got {tuple(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"{name} must be on {device}, got {x.device}")
    return x


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")


def _is_finite_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def check_policy(policy, rows_shape: torch.Size, device: torch.device, completion_ids) -> None:
    """Checks a `sdpo_kernels.policy.PolicyTerm` against the call's rows."""
    if completion_ids is None:
        raise ValueError("completion_ids is required when policy is given (the policy term needs log p(y))")
    check_rows(policy.advantages, "policy.advantages", rows_shape, device)
    check_rows(policy.weights, "policy.weights", rows_shape, device)
    old = policy.old_logps  # a [...] tensor, None (ratio 1) or FROM_CALL (the call's old_logps)
    if old is not None and not (isinstance(old, enum.Enum) and old.name == "FROM_CALL"):
        check_rows(old, "policy.old_logps", rows_shape, device)
    for key in ("epsilon_low", "epsilon_high"):
        v = getattr(policy, key)
        if not _is_finite_number(v) or v < 0:
            raise ValueError(f"policy.{key} must be a finite number >= 0, got {v!r}")
    if policy.delta is not None and (not _is_finite_number(policy.delta) or policy.delta <= 0):
        raise ValueError(f"policy.delta must be None or a finite number > 0, got {policy.delta!r}")
