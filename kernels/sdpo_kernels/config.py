"""Validated loss settings shared by every backend.

`LossConfig.from_args` is the one place where user arguments are checked; kernels and the
reference trust a `LossConfig` completely.
"""

from __future__ import annotations

import math
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
    if completion_ids.numel():
        # One host sync per call: an out-of-range id would otherwise read outside the logits row.
        lo, hi = (int(v) for v in torch.aminmax(completion_ids))
        if lo < 0 or hi >= vocab:
            raise ValueError(f"completion_ids must lie in [0, {vocab}), got values in [{lo}, {hi}]")
