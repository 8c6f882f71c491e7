"""One dtype -> tolerance table for the loss-library tests (in the manner of Liger-Kernel's shared tables).

Every comparison in tests/test_reference.py, test_triton.py and test_properties.py names one entry
below instead of bare rtol/atol literals. Each entry is a multiple of the machine epsilon of the
dtype the compared values are *computed* in, and the multiple is derived from the operation:

* The losses and gradients are short chains of elementwise ops (exp, log, z - LSE, products; each
  rounded once, a few ulps in all) feeding reductions over the V vocabulary entries. Reordering a
  reduction (blocked / pairwise / online LSE against torch's cascade sums) changes its result by
  about log2(V) .. sqrt(V) ulps of the sum of the terms' magnitudes, V ulps at worst.
* The terms are of the size of the log-probs z - LSE (|z / T| up to ~15 for the tests' logits of
  scale 3 at T = 0.7), not of the compared value: a loss near 0 still carries the absolute error of
  its O(1..10) terms. Hence atol = rtol: the error is bounded relative to max(1, |value|).
* Values rounded to a narrow output dtype (bf16/fp16 gradients) differ by at most one ulp of that
  dtype, <= eps(dtype) * |value|, on top of the float32 error: rtol gains eps(dtype).

Measured errors (max |a - b| / (eps * (1 + |b|)), CPU, interpreter tier, 2026-11-29) are quoted
next to each entry, so the margin between derived bound and observation is visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS64 = torch.finfo(torch.float64).eps  # 2.2e-16
EPS32 = torch.finfo(torch.float32).eps  # 1.2e-7
EPS_BF16 = torch.finfo(torch.bfloat16).eps  # 7.8e-3 (8 significand bits)
EPS_FP16 = torch.finfo(torch.float16).eps  # 9.8e-4 (11 significand bits)

# Largest vocabulary of the CPU-verified comparisons (test_triton's sorted rows: V = 2100). Beyond it
# the float32 reductions run over more terms; `tol(..., vocab=V)` widens the float32 entries by
# sqrt(V / VERIFIED_VOCAB) (random-walk growth of the rounding errors of the longer reductions).
VERIFIED_VOCAB = 2048


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float
    why: str


TOLERANCES: dict[str, Tol] = {
    # Same arithmetic in the same order (a strided view vs its contiguous copy, one chunk vs many
    # chunks of whole rows, an ignored argument): the results must be bitwise equal.
    "exact": Tol(0.0, 0.0, "same ops in the same order"),
    # float64 reference vs a float64 oracle (TRL's formula, or the same loss on shifted logits):
    # same maths, sums reordered over V <= 157 terms (~sqrt(V) ~ 12 ulps) of log-probs up to ~20x
    # max(1, |value|) (|z/T| ~ 15; the shift-invariance test shifts logits by up to 100) -> 256 ulps.
    # Measured: 28 (shift invariance), 12 (hypothesis vs TRL), 2.4 (masked vocabulary). TRL's tail
    # bucket log(-expm1(log P_K)) cancels when the tail mass is small: pass the ulps it can add
    # (oracles.trl_tail_condition, ~1.6e6 at P_S ~ 7e-6 with P_T ~ 0.8) as `cond`; measured 4.1e3 ulps there.
    "f64_vs_f64": Tol(256 * EPS64, 256 * EPS64, "float64 vs float64, reordered sums over V terms"),
    # One float32 computation (inputs exactly representable) vs the float64 oracle on the same
    # values: a few ulps per elementwise op plus ~log2(V) ~ 8 ulps for the reductions, against an
    # essentially exact expected value -> 32 ulps. Measured: 3.3 (float32 inputs), 1.5 (bf16 inputs),
    # 2.6 (Triton, top-K = V vs TRL).
    "f32_vs_f64": Tol(32 * EPS32, 32 * EPS32, "float32 vs exact, float32 accumulation"),
    # Two float32 computations with differently ordered reductions (the Triton kernels' blocked /
    # online LSE and streamed gradient vs the reference's torch reductions): each errs by up to the
    # 32 ulps of "f32_vs_f64" -> 64 ulps. Also the loss (float32 output) for bf16/fp16 inputs, which
    # are exact in float32. Measured: 21 (gradient, full_logits, V = 157), 13 (loss, selection paths,
    # V = 700), 6.0 (hypothesis, V <= 40), 3.7 (half-precision inputs).
    "f32_vs_f32": Tol(64 * EPS32, 64 * EPS32, "float32 vs float32, reordered sums over V terms"),
    # Gradients returned in bf16: float32 values rounded to nearest bf16. Two roundings of nearby
    # float32 values (or one against the exact value) land at most one bf16 ulp apart, which is
    # <= eps_bf16 * |value|; the float32 error stays in atol. Measured: 0.96 ulp (Triton vs
    # reference), 0.39 ulp (reference vs TRL float64).
    "grad_bf16": Tol(EPS_BF16 + 64 * EPS32, 64 * EPS32, "float32 rounded to bfloat16 outputs"),
    # Same for fp16 gradients. fp16's subnormal spacing (2^-24 ~ 6e-8) is far below atol, so the
    # ulp-relative bound holds for the small gradient entries as well. Measured: <= 1 ulp.
    "grad_fp16": Tol(EPS_FP16 + 64 * EPS32, 64 * EPS32, "float32 rounded to float16 outputs"),
    # The claim of test_tail_log_mass_accurate_when_support_mass_is_tiny: on near-flat rows
    # (V = 20000, logits ~40) the float32 loss is ~3e-8..4e-7 while the naive log(P_tail) =
    # LSE_tail - LSE cancels to a few ulps of LSE (~1e-6, i.e. > 100 % of the loss); the accurate
    # -log1p(P_S / P_tail) form must keep 2 significant digits. The support term still carries
    # a few eps32 * |LSE| * P_S ~ 1e-10 absolute, ~3e-3 relative to the smallest loss (3.3e-8), so
    # 1e-2 is the derived bound (3x that), not slack. Measured: 3.9e-3.
    "tail_cancellation": Tol(1e-2, 0.0, "float32 loss of ~1e-7 against its float64 value"),
}

_FLOAT32_BASED = {"f32_vs_f64", "f32_vs_f32", "grad_bf16", "grad_fp16"}
_ROUNDED_GRAD = {torch.bfloat16: "grad_bf16", torch.float16: "grad_fp16"}


def tol(kind: str, *, cond: float = 0.0, vocab: int | None = None) -> dict[str, float]:
    """rtol/atol of table entry `kind`, as keyword arguments for torch.testing.assert_close.

    cond: ulps (of the entry's computing dtype) that one ill-conditioned step of the compared formula
    adds on top of the entry, e.g. oracles.trl_tail_condition for TRL's tail bucket. vocab: reduction
    length of a float32 entry, widened by sqrt(vocab / VERIFIED_VOCAB) beyond the CPU-verified vocabularies.
    """
    entry = TOLERANCES[kind]
    scale = 1.0
    if vocab is not None and kind in _FLOAT32_BASED:
        scale = max(1.0, math.sqrt(vocab / VERIFIED_VOCAB))
    rounding = {"grad_bf16": EPS_BF16, "grad_fp16": EPS_FP16}.get(kind, 0.0)  # one output ulp: does not grow
    extra = cond * (EPS64 if kind == "f64_vs_f64" else EPS32)
    return {"rtol": rounding + (entry.rtol - rounding) * scale + extra, "atol": entry.atol * scale + extra}


def grad_kind(dtype: torch.dtype, base: str = "f32_vs_f32") -> str:
    """Entry for a gradient returned in `dtype`: the rounded-output entry for bf16/fp16, else `base`."""
    return _ROUNDED_GRAD.get(dtype, base)


def assert_close(actual, expected, kind: str, *, cond: float = 0.0, vocab: int | None = None, **kwargs) -> None:
    """torch.testing.assert_close with the bounds of table entry `kind` (see `tol`)."""
    torch.testing.assert_close(actual, expected, **tol(kind, cond=cond, vocab=vocab), **kwargs)


# Two float32 computations of one quantity through different graphs (the fused-linear chunks vs the
# materialised logits, the completion slice vs the whole sequence, GRPO's formula vs the trainer):
# each rounds every operation once and reorders sums over V and D, so they differ by a few ulps of
# the largest term involved. 64 ulps of that scale; measured ≤ 12 (trainer tests, 2026-11-29).
PATHS_ULPS = 64


def assert_close_ulps(actual, expected, ulps: int = PATHS_ULPS, scale: float | None = None, **kwargs) -> None:
    """|actual - expected| ≤ ulps · eps32 · scale elementwise, scale = max|expected| unless given.

    Pass scale=1.0 for a loss that is a weighted mean of O(1) per-token terms: its error is ulps of
    the terms, however small the mean after cancellation.
    """
    expected_t = torch.as_tensor(expected)
    if scale is None:
        scale = float(expected_t.detach().abs().max()) if expected_t.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=ulps * EPS32 * max(scale, 1e-30), **kwargs)
