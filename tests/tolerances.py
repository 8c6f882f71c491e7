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

Cancelling sums (`cancelling_bound`, the property test tests/test_properties.py::test_triton_equals_reference)
--------------------------------------------------------------------------------------------------------------
max(1, |value|) is the wrong scale when an entry is the difference of terms much larger than itself,
and the terms carry the rounding of log-domain values much larger than 1. The top-K gradient at a
support entry j is (1/T) (w c_j - p_j total), total = w (sum_{k in S} c_k + c_tail), c_k = dD/da_k
(reverse KL: p_k (a_k - b_k + 1)); p_j total is the softmax's -p_j sum and cancels against w c_j.
Hypothesis found (N=3, V=18, top-K K=2 with tail, reverse KL, clip 0.5, T=0.6, seed 3, scale 5): at
row 0, entry 10 the teacher gives the student's top token (p = 0.96) the log-prob b = -29, so w c_j / T
and p_j total / T are 24.1 and 23.4, the entry 0.689 (cancellation ratio 69). Against the float64
reference, Triton is 215 eps off there and the float32 reference 55 eps; "f32_vs_f32" allowed
64 eps (1 + 0.69) = 108 eps for their difference (160 eps). Neither is wrong: dg_j/dLSE_z = 13.6 / T
and Triton's LSE_z (13.26) is 1.28 ulp = 10.2 eps low (its base-2 streaming sum rounds
max(z)·log2(e), the exponents and base_z / log2(e)), the reference's 2.2 eps: 233 and 51 eps predicted.
The bound is derived from the sources of that error instead:

* Log-domain magnitudes. a = z/T - LSE(z/T) and b = u/T - LSE(u/T) are differences of values of size
  |z/T| and |LSE| (up to ~30 for logits of scale 5 at T = 0.6): each log-prob carries about one ulp of
  each operand (the scaled logit's two roundings, by 1/T and of 1/T; the LSE's final add, plus in
  Triton's base-2 streaming sum the roundings of max(z) log2(e) and base / log2(e); the difference),
  eps * l with l = max|z/T| + |LSE_z| ulps (of 1) for a and lam = max|u/T| + |LSE_u| for b (the LSEs
  the log-probs use). These half-ulp roundings rarely reach their maxima together (all together
  ~2 eps * l). An absolute error of a is a relative error of p = e^a. The IS weight
  w = min(exp(clamp(a_y - old, ±20)), clip) multiplies every term: it is exact when clipped or
  clamped, else it carries rho = |z_y/T| + |LSE_z| + |a_y - old| + 1 ulps (a_y's absolute error, the
  difference's and exp's roundings, as a relative error of w).
* Magnitudes of the terms summed. A term x = pi * f_1 * f_2 ... (pi a probability or w, the f log-domain
  factors such as a - b + 1, a - mix, a_y) errs by at most eps * (l + lam + rho) * m(x) to first order,
  m(x) = |x| + sum_i |x / f_i|: |x| carries the relative errors (of pi, w) and each |x / f_i| the
  absolute error of f_i (so a factor near 0 still counts: m(p (a - b + 1)) = |c| + p). A sum carries its
  terms' errors plus log2 V ulps of the sum of their magnitudes; the product p_j * total adds p_j's
  relative error, l once more. With M_j the sum of m over the terms that entry j is built from,
      |error of gradient entry j| <= eps * Lambda * M_j / T,   |error of the loss| <= eps * Lambda * sum m(terms),
      Lambda = 2 l + lam + rho + log2 V + 4
  (4: the roundings of the elementwise chain: exp, a - b (+ 1), the product, the final combination and
  the 1/T scaling, ~1 ulp each). 1/T multiplies the gradient, and the log-prob terms grow like |z|/T:
  both enter through M and l, not as constants. One float32 computation against the exact value: the
  test checks Triton and the float32 reference each against the float64 reference (not their difference).
  M_j (tests/test_properties.py: _error_bounds): support entry j: w m(c_j) + p_j W, W = w (sum_S m(c_k) +
  m(c_tail)); outside the support p_j (W + w m(c_tail) / P_tail) (renormalised top-K: 0, the gradient is
  exactly 0 there); full_logits has S = V; sampled_token S = {y}, c_y = a_y - b_y, m = |c_y| + 1.
  TRL's tail floor switches the tail's gradient off: a row whose a_tail lies within eps * Lambda of
  the floor may land on either side in float32, so its bound also holds the tail's whole part.
  The failing entry: l = 26.5, lam = 35.8, rho = 0 (clipped), Lambda = 97, M_j / T = 49: 4770 eps
  (5.7e-4); Triton's 215 eps is 0.045 of it. Measured (4000 random draws of the test's strategy,
  2026-12-02, interpreter): both float32 paths <= 0.38 of the bound, the largest at tiny entries off
  the support (p_j ~ 1e-15 .. 4e-7: a_j ~ -34 carries ~40 ulps, p_j's relative error); <= 0.20 at the
  top-K support entries (600 draws). The test fails when Triton's gradient is off by 2x the bound at the
  failing entry, its loss or gradient by 4x the bound, or either is scaled by 1 + 1e-5 (84 eps).
* The same bound with eps64 holds the float64 property tests, where the "explore" profile found
  "f64_vs_f64" too tight in the same way: the reference against TRL's formulas (twice the bound, one
  per computation, plus oracles.trl_tail_condition's ulps; full_logits, the top entry's gradient
  22.186892 - 22.186888: ours 283 eps64 off, because z/T - LSE carries ulps of 26 where TRL's
  log_softmax subtracts the row max first; measured <= 0.66 of the bound in 3000 draws) and the shift
  invariance (base plus shifted bound: |u/T| ~ 131 after the shift, 484 eps64; <= 0.22).
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
    # float64 reference vs a float64 oracle (TRL's formula in test_reference.py): same maths, sums
    # reordered over V <= 157 terms (~sqrt(V) ~ 12 ulps) of log-probs up to ~20x max(1, |value|)
    # (|z/T| ~ 15) -> 256 ulps. Measured: 12, 2.4 (masked vocabulary). The property tests (logits of
    # scale 5 at T = 0.6; shifts by up to 100, |u/T| up to ~170) went beyond it, 283 and 484 eps64, and
    # use `cancelling_bound` with eps64 (module docstring). TRL's tail
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
    # V = 700), 3.7 (half-precision inputs). Holds only where no entry cancels far below its terms
    # (logits of scale <= 3 here): the property test's scale-5 logits at T = 0.6 reached 95 ulps of
    # max(1, |value|) and use `cancelling_bound` instead (module docstring).
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


# Roundings of the elementwise chain of a loss term or gradient entry (exp, a - b (+ 1), the product, the
# final combination and the 1/T scaling), about one ulp each: the constant of Lambda (module docstring).
CHAIN_ROUNDINGS = 4


def cancelling_bound(
    magnitude: torch.Tensor,
    log_student: torch.Tensor,
    log_teacher: torch.Tensor,
    log_weight: torch.Tensor,
    vocab: int,
    eps: float = EPS32,
) -> torch.Tensor:
    """Bound on the error of one computation of entries summed from cancelling log-domain terms.

    eps * Lambda * magnitude, Lambda = 2 l + lam + rho + log2 V + CHAIN_ROUNDINGS (module docstring,
    "Cancelling sums"). magnitude: [N] or [N, V], the sum of the first-order magnitudes m of the terms
    each entry is built from (times 1/T for gradients); log_student l, log_teacher lam, log_weight rho: [N]
    ulps (of 1) that the row's student / teacher log-probs and its IS weight carry; eps: the machine
    epsilon of the computing dtype (float32; float64 for the reference's shift invariance).
    """
    ulps = 2 * log_student + log_teacher + log_weight + math.log2(vocab) + CHAIN_ROUNDINGS
    if magnitude.dim() == 2:
        ulps = ulps[:, None]
    return eps * ulps * magnitude


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    """|actual - expected| <= bound elementwise (bound 0: exactly equal; NaN fails), reporting the worst entry."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual - expected).abs()
    over = ~(err <= bound)
    if bool(over.any()):
        ratio = torch.where(bound > 0, err / bound, torch.where(over, math.inf, 0.0))
        i = int(ratio.argmax())
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(
            f"{what}: {int(over.sum())} of {err.numel()} entries exceed the derived bound; worst at {idx}: "
            f"{actual[idx].item():.9g} vs {expected[idx].item():.9g}, |diff| {err[idx].item():.3g} = "
            f"{ratio[idx].item():.3g} x the bound {bound[idx].item():.3g} ({err[idx].item() / EPS32:.3g} eps)"
        )


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
