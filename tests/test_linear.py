"""Fused-linear loss: values and gradients equal materialising the logits and calling
`self_distillation_loss` (then Σ weights·ℓ), plus TRL's GRPO clipped surrogate for the hybrid term."""

from __future__ import annotations

import warnings

import pytest
import torch
from trl.trainer.utils import selective_log_softmax

import sdpo_kernels.chunking as chunking_mod
import sdpo_kernels.ops as ops_mod
from sdpo_kernels import reference
from sdpo_kernels.functional import self_distillation_loss
from sdpo_kernels.linear import (
    LinearLossOutput,
    LinearSelfDistillationLoss,
    PolicyTerm,
    default_chunk_rows,
    linear_self_distillation_loss,
)

from conftest import gpu_only, interpret_only
from oracles import trl_self_distillation_loss

SETTINGS = [
    dict(mode="topk_logits", topk=5, alpha=0.5, add_tail=True),
    dict(mode="topk_logits", topk=5, alpha=0.0, add_tail=True),
    dict(mode="topk_logits", topk=5, alpha=1.0, add_tail=True),
    dict(mode="topk_logits", topk=5, alpha=0.5, add_tail=False),
    dict(mode="topk_logits", topk=5, alpha=1.0, add_tail=False, temperature=0.7),
    dict(mode="topk_logits", topk=5, alpha=0.3, add_tail=True, temperature=1.5),
    dict(mode="full_logits", alpha=0.5),
    dict(mode="full_logits", alpha=0.0),
    dict(mode="full_logits", alpha=1.0, temperature=2.0),
    dict(mode="sampled_token", alpha=1.0),
    dict(mode="sampled_token", alpha=1.0, temperature=0.5),
]
SETTING_IDS = ["-".join(f"{k}={v}" for k, v in s.items()) for s in SETTINGS]


def make_inputs(n=12, vocab=40, dim=8, dtype=torch.float64, bias=True, device="cpu", lead=None, dim_t=None):
    g = lambda *s: torch.randn(*s, dtype=dtype, device=device)
    rows = (n,) if lead is None else lead
    dim_t = dim if dim_t is None else dim_t
    inp = dict(
        hs=g(*rows, dim).requires_grad_(),
        W=(g(vocab, dim) * 0.7).requires_grad_(),
        ht=g(*rows, dim_t),
        Wt=g(vocab, dim_t) * 0.7,
        bs=g(vocab).requires_grad_() if bias else None,
        bt=g(vocab) if bias else None,
        ids=torch.randint(0, vocab, rows, device=device),
        old=(torch.randn(*rows, dtype=torch.float32, device=device) * 0.5 - 3.0).to(dtype),
        weights=torch.rand(*rows, dtype=torch.float32, device=device).to(dtype),
    )
    if inp["weights"].numel() > 1:
        inp["weights"].view(-1)[1] = 0.0
    return inp


def trl_policy_loss(student_logits, completion_ids, old_logps, advantages, eps_low, eps_high, temperature, delta=None):
    """TRL 1.16 `SDPOTrainer._compute_policy_loss` (= GRPO's token-level clipped surrogate) per token;
    `delta` as GRPOTrainer's two-sided clipping."""
    per_token_logps = selective_log_softmax(student_logits / temperature, completion_ids)
    old_per_token_logps = per_token_logps.detach() if old_logps is None else old_logps
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    return -torch.min(coef_1 * advantages, coef_2 * advantages)


def materialised(inp, *, use_old=True, policy=None, backend="reference", **kw):
    """Oracle: full logits, `self_distillation_loss`, Σ weights·ℓ (+ Σ policy weights·policy loss)."""
    kw.setdefault("topk", 5)
    ls = inp["hs"] @ inp["W"].t()
    if inp["bs"] is not None:
        ls = ls + inp["bs"]
    with torch.no_grad():
        lt = inp["ht"] @ inp["Wt"].t()
        if inp["bt"] is not None:
            lt = lt + inp["bt"]
    old = inp["old"] if use_old else None
    per = self_distillation_loss(ls, lt, inp["ids"], old, backend=backend, **kw)
    total = (inp["weights"].to(per.dtype) * per).sum()
    pol = None
    if policy is not None:
        # (16-bit logits: the policy log-prob in float32, as the fused path computes it)
        z = ls if ls.dtype == torch.float64 else ls.float()
        pol = trl_policy_loss(
            z,
            inp["ids"],
            old,
            policy["advantages"],
            policy["epsilon_low"],
            policy["epsilon_high"],
            kw.get("temperature", 1.0),
            policy.get("delta"),
        )
        total = total + (policy["weights"] * pol).sum()
    return total, per, pol


def fused(inp, *, use_old=True, chunk_size=None, backend="reference", tied=False, **kw):
    kw.setdefault("topk", 5)
    return linear_self_distillation_loss(
        inp["hs"],
        inp["W"],
        inp["ht"],
        inp["W"] if tied else inp["Wt"],
        inp["ids"],
        inp["old"] if use_old else None,
        weights=inp["weights"],
        student_bias=inp["bs"],
        teacher_bias=inp["bt"],
        chunk_size=chunk_size,
        backend=backend,
        **kw,
    )


def params(inp):
    return [t for t in (inp["hs"], inp["W"], inp["bs"]) if t is not None]


# Tolerances, in units of the machine epsilon of the dtype the compared values were computed in
# (float64 2.2e-16, float32 1.19e-7, bfloat16 7.8e-3): |got − want| ≤ ulps · eps · scale elementwise, with
# scale = max(max|want|, 1). The bound is relative to the magnitude of the *terms* summed, not to each result:
# a sum of n terms formed in another order (or by a rewritten formula) differs by up to ~n·eps·Σ|x_i|, however
# small the sum, so an elementwise relative bound alone would fail on cancelled elements. The inputs are O(1)
# (randn, or multiples of 1/4), so the terms (logits, probabilities, log-ratios) are at least O(1): hence the 1.
REORDER_ULPS = 32  # the same formulas, only the row blocking differs (chunk sizes): the BLAS may reorder the
# dot products over D ≤ 16 (≤ D, typically √D ulps per logit), which then pass exp/log/softmax (condition ~2).
# Measured ≤ 6.
REWRITE_ULPS = 128  # the fused loss vs materialising the logits: chunked logits, the backend's analytic gradients
# vs autograd through log_softmax, the tail bucket's log1p(-Σp) vs the oracle's form, i.e. reordered and
# rewritten sums over V = 40 (√V ≈ 6 ulps each) through a few such stages. Measured ≤ 18 (float64), ≤ 6
# (float32, reference backend and Triton interpreter).
GPU_ULPS = 1024  # the Triton kernels on a GPU vs the oracle: tile-wise tree reductions over V = 4096 and the
# hardware's approximate exp2/log2 (a few ulps each). Never tighter than the bounds this tier passed with
# before (1e-5 + 1e-5·|want| for losses, 1e-5 + 1e-4·|want| for gradients); not re-measured (no device).
BF16_ULPS = 4  # bf16 gradients: exact logits, each bf16 product and the final cast round once (≤ 1 ulp each);
# measured ≤ 0.5 on CPU; never tighter than the GPU tier's former 1e-3 + 2e-2·|want|.


def assert_ulps(got, want, ulps, *, eps_of=None, msg=None):
    """|got − want| ≤ ulps · eps · max(max|want|, 1) elementwise; eps of `eps_of` (default: `got`'s dtype)."""
    want = want.detach().to(got.dtype)
    eps = torch.finfo(eps_of or got.dtype).eps
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=0.0, atol=ulps * eps * scale, msg=msg)


def assert_same(inp, got_total, want_total, ulps, *, eps_of=None):
    """The totals and the gradients of both w.r.t. the student hidden states, weight and bias agree."""
    ps = params(inp)
    g_got = torch.autograd.grad(got_total, ps)
    g_want = torch.autograd.grad(want_total, ps)
    assert_ulps(got_total, want_total, ulps, eps_of=eps_of)
    for name, a, b in zip(("student_hidden", "student_weight", "student_bias"), g_got, g_want):
        assert_ulps(a, b, ulps, eps_of=eps_of, msg=lambda m, name=name: f"grad {name}: {m}")


# ---------------------------------------------------------------------------------------------
# reference backend: values and gradients


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("is_clip", [None, 2.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_materialised(setting, is_clip, dtype):
    inp = make_inputs(dtype=dtype)
    out = fused(inp, is_clip=is_clip, chunk_size=5, **setting)
    want, per_want, _ = materialised(inp, is_clip=is_clip, **setting)
    assert isinstance(out, LinearLossOutput) and out.policy_per_token is None
    loss, per_token = out
    assert loss.dim() == 0 and not per_token.requires_grad
    assert_ulps(per_token, per_want, REWRITE_ULPS)
    assert_same(inp, loss, want, REWRITE_ULPS)


@pytest.mark.parametrize("setting", [SETTINGS[0], SETTINGS[3], SETTINGS[6], SETTINGS[9]], ids=str)
def test_matches_trl_oracle(setting):
    """Ties the fused path to TRL's eager loss_utils directly (not only through the reference)."""
    inp = make_inputs()
    loss, per_token = fused(inp, is_clip=2.0, **setting)
    ls = inp["hs"] @ inp["W"].t() + inp["bs"]
    lt = (inp["ht"] @ inp["Wt"].t() + inp["bt"]).detach()
    per = trl_self_distillation_loss(ls, lt, inp["ids"], inp["old"], is_clip=2.0, **setting)
    assert_ulps(per_token, per, REWRITE_ULPS)
    assert_same(inp, loss, (inp["weights"] * per).sum(), REWRITE_ULPS)


@pytest.mark.parametrize("setting", [SETTINGS[0], SETTINGS[4], SETTINGS[7], SETTINGS[10]], ids=str)
def test_tied_weights(setting):
    inp = make_inputs()
    inp["Wt"] = inp["W"].detach()  # oracle: the teacher logits from the same weight, no gradient
    loss, _ = fused(inp, tied=True, **setting)
    want, _, _ = materialised(inp, **setting)
    assert_same(inp, loss, want, REWRITE_ULPS)
    # through .backward(): the tied weight gets exactly the student's gradient, once
    loss, _ = fused(inp, tied=True, **setting)
    loss.backward()
    g_want = torch.autograd.grad(materialised(inp, **setting)[0], inp["W"])[0]
    assert_ulps(inp["W"].grad, g_want, REWRITE_ULPS)


def test_no_bias_and_teacher_bias_only():
    inp = make_inputs(bias=False)
    loss, _ = fused(inp)
    assert_same(inp, loss, materialised(inp)[0], REWRITE_ULPS)
    inp["bt"] = torch.randn(inp["W"].shape[0], dtype=torch.float64)
    loss, _ = fused(inp)
    assert_same(inp, loss, materialised(inp)[0], REWRITE_ULPS)


def test_different_teacher_hidden_dim():
    inp = make_inputs(dim=8, dim_t=5)
    loss, _ = fused(inp, mode="full_logits")
    assert_same(inp, loss, materialised(inp, mode="full_logits")[0], REWRITE_ULPS)


@pytest.mark.parametrize("setting", [SETTINGS[0], SETTINGS[3], SETTINGS[6], SETTINGS[9]], ids=str)
def test_zero_weight_rows_contribute_nothing(setting):
    inp = make_inputs()
    w = inp["weights"]
    w[::3] = 0.0
    loss, per_token = fused(inp, **setting)
    g_h, g_w, g_b = torch.autograd.grad(loss, params(inp))
    assert (g_h[::3] == 0).all()
    # garbage hidden states in weight-0 rows change nothing (padding rows)
    with torch.no_grad():
        hs2 = inp["hs"].detach().clone()
        hs2[::3] = 1e3 * torch.randn_like(hs2[::3])
    inp2 = dict(inp, hs=hs2.requires_grad_())
    loss2, per2 = fused(inp2, **setting)
    g2 = torch.autograd.grad(loss2, params(inp2))
    assert torch.equal(loss2, loss)
    assert not torch.equal(per2[::3], per_token[::3]) and torch.equal(per2[1::3], per_token[1::3])
    assert (g2[0][::3] == 0).all() and torch.equal(g2[0][1::3], g_h[1::3])
    # the weight-0 rows add exact zeros (0 · garbage) to the same sums in the same order: bit-identical
    assert torch.equal(g2[1], g_w) and torch.equal(g2[2], g_b)


def test_all_weights_zero_and_empty_rows():
    inp = make_inputs()
    inp["weights"].zero_()
    loss, _ = fused(inp)
    grads = torch.autograd.grad(loss, params(inp))
    assert loss.item() == 0.0 and all((g == 0).all() for g in grads)
    empty = make_inputs(n=0)
    loss, per_token = fused(empty)
    loss.backward()
    assert loss.item() == 0.0 and per_token.shape == (0,)
    assert (empty["W"].grad == 0).all() and empty["hs"].grad.shape == (0, 8)


def test_calling_twice_before_backward():
    inp = make_inputs()
    setting = dict(mode="topk_logits", topk=4, alpha=0.5)
    inp_b = dict(inp, weights=torch.rand_like(inp["weights"]), ht=torch.randn_like(inp["ht"]))
    first, _ = fused(inp, **setting)
    second, _ = fused(inp_b, mode="full_logits", alpha=0.2)
    got = first + 3.0 * second
    want = materialised(inp, **setting)[0] + 3.0 * materialised(inp_b, mode="full_logits", alpha=0.2)[0]
    assert_same(inp, got, want, REWRITE_ULPS)


def test_upstream_gradient_scales_and_double_backward_raises():
    inp = make_inputs()
    loss, _ = fused(inp)
    assert_same(inp, loss * -2.5, materialised(inp)[0] * -2.5, REWRITE_ULPS)
    loss, _ = fused(inp)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 12, 100])
@pytest.mark.parametrize("setting", [SETTINGS[0], SETTINGS[3], SETTINGS[6], SETTINGS[9]], ids=str)
def test_chunk_size_does_not_change_results(chunk_size, setting):
    inp = make_inputs(n=12)
    pol = dict(
        advantages=torch.randn(12, dtype=torch.float64),
        epsilon_low=0.2,
        epsilon_high=0.28,
        weights=torch.rand(12, dtype=torch.float64),
    )
    base = fused(inp, policy=pol, **setting)
    base_grads = torch.autograd.grad(base.loss, params(inp))
    out = fused(inp, policy=pol, chunk_size=chunk_size, **setting)
    grads = torch.autograd.grad(out.loss, params(inp))
    assert_ulps(out.loss, base.loss, REORDER_ULPS)
    assert_ulps(out.per_token, base.per_token, REORDER_ULPS)
    assert_ulps(out.policy_per_token, base.policy_per_token, REORDER_ULPS)
    for a, b in zip(grads, base_grads):
        assert_ulps(a, b, REORDER_ULPS)


def test_default_chunking():
    assert default_chunk_rows(0) == 1 and default_chunk_rows(1) == 1 and default_chunk_rows(8) == 1
    assert default_chunk_rows(15) == 1 and default_chunk_rows(17) == 2 and default_chunk_rows(8192) == 1024
    for n in (8, 12, 15, 16, 17, 31, 1000, 2047, 2048, 8192):
        assert 2 * default_chunk_rows(n) <= n / 4, n  # two [rows, V] buffers ≤ 1/4 of [N, V]
    assert default_chunk_rows(8192, reference_backend=True) == 256 and default_chunk_rows(31, True) == 1


def test_leading_dims():
    inp = make_inputs(lead=(3, 4))
    out = fused(inp, mode="topk_logits", topk=6)
    assert out.per_token.shape == (3, 4)
    assert_same(inp, out.loss, materialised(inp, mode="topk_logits", topk=6)[0], REWRITE_ULPS)


def test_non_contiguous_hidden():
    inp = make_inputs(n=10)
    base = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    inp["hs"] = base[:, ::2]
    loss, _ = fused(inp)
    want = materialised(inp)[0]
    (g,) = torch.autograd.grad(loss, base)
    (g_want,) = torch.autograd.grad(want, base)
    assert_ulps(g, g_want, REWRITE_ULPS)


def test_module_form():
    inp = make_inputs()
    module = LinearSelfDistillationLoss(mode="full_logits", alpha=0.25, chunk_size=4)
    assert "full_logits" in repr(module)
    loss, _ = module(
        inp["hs"],
        inp["W"],
        inp["ht"],
        inp["Wt"],
        inp["ids"],
        inp["old"],
        weights=inp["weights"],
        student_bias=inp["bs"],
        teacher_bias=inp["bt"],
    )
    assert_same(inp, loss, materialised(inp, mode="full_logits", alpha=0.25)[0], REWRITE_ULPS)


def test_inputs_not_mutated():
    inp = make_inputs()
    before = {k: v.detach().clone() for k, v in inp.items() if v is not None}
    loss, _ = fused(
        inp,
        policy=dict(
            advantages=torch.randn(12, dtype=torch.float64), epsilon_low=0.2, epsilon_high=0.2, weights=inp["weights"]
        ),
    )
    loss.backward()
    for k, v in before.items():
        assert torch.equal(inp[k].detach(), v), k


# ---------------------------------------------------------------------------------------------
# no gradient work


def _forbid_gradient_work(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("gradient work under no_grad")

    monkeypatch.setattr(reference, "backward", boom)
    monkeypatch.setattr(chunking_mod, "_accumulate_weight_grad", boom)
    monkeypatch.setattr(chunking_mod, "fold_policy_grad", boom)
    monkeypatch.setattr(chunking_mod, "renormalised_policy_grad_", boom)


@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_no_gradient_work_without_grad(monkeypatch, how):
    inp = make_inputs()
    pol = dict(
        advantages=torch.randn(12, dtype=torch.float64),
        epsilon_low=0.2,
        epsilon_high=0.3,
        weights=torch.rand(12, dtype=torch.float64),
    )
    want = fused(inp, policy=pol)
    _forbid_gradient_work(monkeypatch)
    if how == "nothing_requires_grad":
        got = fused({k: (v.detach() if v is not None else None) for k, v in inp.items()}, policy=pol)
    else:
        with torch.no_grad() if how == "no_grad" else torch.inference_mode():
            got = fused(inp, policy=pol)
    assert not got.loss.requires_grad and got.loss.grad_fn is None
    torch.testing.assert_close(got.loss, want.loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(got.per_token, want.per_token, rtol=0, atol=0)
    torch.testing.assert_close(got.policy_per_token, want.policy_per_token, rtol=0, atol=0)


def test_only_requested_gradients_are_computed(monkeypatch):
    inp = make_inputs()
    inp["W"].requires_grad_(False)
    inp["bs"].requires_grad_(False)
    monkeypatch.setattr(chunking_mod, "_accumulate_weight_grad", lambda *a: (_ for _ in ()).throw(AssertionError))
    loss, _ = fused(inp)
    (g,) = torch.autograd.grad(loss, inp["hs"])
    (g_want,) = torch.autograd.grad(materialised(inp)[0], inp["hs"])
    assert_ulps(g, g_want, REWRITE_ULPS)


# ---------------------------------------------------------------------------------------------
# hybrid policy term (TRL GRPO / SDPO clipped surrogate)


def _policy(n, dtype=torch.float64, device="cpu"):
    adv = torch.randn(n, dtype=dtype, device=device)
    adv[0] = 0.0
    pw = torch.rand(n, dtype=dtype, device=device)
    pw[2] = 0.0
    return dict(advantages=adv, epsilon_low=0.2, epsilon_high=0.28, weights=pw)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("old_kind", ["none", "near", "far"])
def test_hybrid_policy_matches_trl(setting, old_kind):
    inp = make_inputs(n=14)
    if old_kind != "none":
        # old log-probs near the current ones (ratios inside and outside the clip range) or far
        with torch.no_grad():
            ls = (inp["hs"] @ inp["W"].t() + inp["bs"]) / setting.get("temperature", 1.0)
            logp = torch.log_softmax(ls, -1).gather(-1, inp["ids"][:, None]).squeeze(-1)
        spread = 0.3 if old_kind == "near" else 3.0
        inp["old"] = logp + spread * torch.randn_like(logp)
    pol = _policy(14)
    use_old = old_kind != "none"
    out = fused(inp, use_old=use_old, policy=pol, is_clip=2.0, chunk_size=4, **setting)
    want, per_want, pol_want = materialised(inp, use_old=use_old, policy=pol, is_clip=2.0, **setting)
    assert_ulps(out.per_token, per_want, REWRITE_ULPS)
    assert_ulps(out.policy_per_token, pol_want, REWRITE_ULPS)
    assert not out.policy_per_token.requires_grad
    assert_same(inp, out.loss, want, REWRITE_ULPS)


@pytest.mark.parametrize("setting", [SETTINGS[0], SETTINGS[3], SETTINGS[6]], ids=str)
def test_policy_two_sided_clipping_delta(setting):
    """TRL's `delta`: ratios above delta cap the unclipped term (no gradient there); old log-probs far from
    the current ones put rows on every branch (capped, clipped, live) for both signs of the advantage."""
    inp = make_inputs(n=14)
    with torch.no_grad():
        ls = (inp["hs"] @ inp["W"].t() + inp["bs"]) / setting.get("temperature", 1.0)
        logp = torch.log_softmax(ls, -1).gather(-1, inp["ids"][:, None]).squeeze(-1)
    inp["old"] = logp + torch.linspace(-1.5, 1.5, 14, dtype=logp.dtype)  # ratios from e^-1.5 to e^1.5
    pol = _policy(14)
    pol["delta"] = 1.5
    out = fused(inp, policy=pol, is_clip=2.0, chunk_size=4, **setting)
    want, _, pol_want = materialised(inp, policy=pol, is_clip=2.0, **setting)
    ratio = torch.exp(logp - inp["old"])
    assert (ratio > 1.5).sum() >= 3 and (ratio < 0.8).sum() >= 3  # capped rows and clipped rows exist
    assert_ulps(out.policy_per_token, pol_want, REWRITE_ULPS)
    assert_same(inp, out.loss, want, REWRITE_ULPS)
    without = fused(inp, policy={k: v for k, v in pol.items() if k != "delta"}, is_clip=2.0, **setting)
    assert not torch.allclose(without.policy_per_token, out.policy_per_token)  # delta changed something
    with pytest.raises(ValueError, match="delta"):
        fused(inp, policy={**pol, "delta": 0.0}, **setting)


def test_hybrid_policy_weights_independent_of_distillation_weights():
    """Rows with distillation weight 0 still get the policy gradient (and vice versa)."""
    inp = make_inputs(n=10)
    inp["weights"][:5] = 0.0
    pol = _policy(10)
    pol["weights"][5:] = 0.0
    for setting in (SETTINGS[0], SETTINGS[3], SETTINGS[6], SETTINGS[9]):
        out = fused(inp, policy=pol, **setting)
        want = materialised(inp, policy=pol, **setting)[0]
        assert_same(inp, out.loss, want, REWRITE_ULPS)


def test_policy_only_gradient_matches_trl():
    """Distillation weights all 0: the loss is exactly TRL's weighted policy loss."""
    inp = make_inputs(n=10)
    inp["weights"].zero_()
    pol = _policy(10)
    out = fused(inp, policy=pol, mode="topk_logits", topk=3, add_tail=False, temperature=0.8)
    ls = inp["hs"] @ inp["W"].t() + inp["bs"]
    want = (pol["weights"] * trl_policy_loss(ls, inp["ids"], inp["old"], pol["advantages"], 0.2, 0.28, 0.8)).sum()
    assert_same(inp, out.loss, want, REWRITE_ULPS)


@pytest.mark.parametrize("old_kind", ["from_call", "none", "own"])
def test_policy_term_equals_the_deprecated_dict(old_kind):
    """`PolicyTerm` and the old dict give bit-identical results; only the dict warns."""
    inp = make_inputs(n=10)
    pol = _policy(10)
    if old_kind != "from_call":
        pol["old_logps"] = None if old_kind == "none" else inp["old"] + 0.3 * torch.randn_like(inp["old"])
    term = PolicyTerm(**pol)
    setting = dict(mode="topk_logits", topk=4, alpha=0.5, add_tail=True, temperature=0.9, is_clip=1.5)
    with pytest.warns(DeprecationWarning, match="PolicyTerm"):
        want = fused(inp, policy=pol, **setting)
    (gw,) = torch.autograd.grad(want.loss, inp["W"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        got = fused(inp, policy=term, **setting)
    (gg,) = torch.autograd.grad(got.loss, inp["W"])
    for a, b in [(got.loss, want.loss), (got.policy_per_token, want.policy_per_token), (gg, gw)]:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_policy_term_is_frozen_and_validated():
    pol = PolicyTerm(**_policy(12))
    with pytest.raises(AttributeError):
        pol.epsilon_low = 0.5
    inp = make_inputs()
    with pytest.raises(ValueError, match=r"policy\.epsilon_high"):
        fused(inp, policy=PolicyTerm(**{**_policy(12), "epsilon_high": float("nan")}))
    with pytest.raises(ValueError, match=r"policy\.old_logps"):
        fused(inp, policy=PolicyTerm(**_policy(12), old_logps=torch.zeros(3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="PolicyTerm"):
        fused(inp, policy=[1, 2])


@pytest.mark.parametrize("policy_old", ["none", "own"])
def test_policy_ratio_can_use_its_own_old_logps(policy_old):
    """IS clipping with one set of old log-probs (e.g. vLLM's sampling ones), the ratio with another."""
    inp = make_inputs(n=10)
    pol = _policy(10)
    own = None if policy_old == "none" else inp["old"] + 0.3 * torch.randn_like(inp["old"])
    pol["old_logps"] = own
    setting = dict(mode="topk_logits", topk=4, alpha=0.5, add_tail=True, temperature=0.9)
    out = fused(inp, policy=pol, is_clip=1.5, **setting)
    ls = inp["hs"] @ inp["W"].t() + inp["bs"]
    want = materialised(inp, is_clip=1.5, **setting)[0]  # distillation term: IS with inp["old"]
    want = want + (pol["weights"] * trl_policy_loss(ls, inp["ids"], own, pol["advantages"], 0.2, 0.28, 0.9)).sum()
    assert_same(inp, out.loss, want, REWRITE_ULPS)


# ---------------------------------------------------------------------------------------------
# argument validation


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(hs=torch.randn(12, 7, dtype=torch.float64)), "student_weight"),
        (dict(W=torch.randn(40, 8, 2, dtype=torch.float64)), "student_weight"),
        (dict(Wt=torch.randn(41, 8, dtype=torch.float64), bt=None), "teacher_weight"),
        (dict(ht=torch.randn(11, 8, dtype=torch.float64)), "teacher_hidden"),
        (dict(ht=torch.randn(12, 8, dtype=torch.float32), Wt=torch.randn(40, 8)), "teacher_hidden"),
        (dict(W=torch.randn(40, 8, dtype=torch.float32)), "student_weight"),
        (dict(bs=torch.randn(39, dtype=torch.float64)), "student_bias"),
        (dict(bt=torch.randn(40, dtype=torch.float32)), "teacher_bias"),
        (dict(weights=torch.rand(11, dtype=torch.float64)), "weights"),
        (dict(weights=torch.ones(12, dtype=torch.long)), "weights"),
        (dict(ids=torch.randint(0, 40, (11,))), "completion_ids"),
        (dict(ids=torch.full((12,), 40)), "completion_ids"),
        (dict(old=torch.randn(3)), "old_logps"),
        (dict(hs="not a tensor"), "student_hidden"),
    ],
)
def test_validation(change, match):
    inp = dict(make_inputs(), **change)
    with pytest.raises(ValueError, match=match):
        fused(inp)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="nope"), "mode"),
        (dict(topk=0), "topk"),
        (dict(alpha=2.0), "alpha"),
        (dict(mode="sampled_token", alpha=0.5), "alpha"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(backend="cuda"), "backend"),
        (dict(policy=dict(advantages=torch.zeros(12))), "policy"),
        (
            dict(policy=dict(advantages=torch.zeros(12), epsilon_low=-1, epsilon_high=0.2, weights=torch.ones(12))),
            "epsilon_low",
        ),
        (
            dict(policy=dict(advantages=torch.zeros(3), epsilon_low=0.2, epsilon_high=0.2, weights=torch.ones(12))),
            "advantages",
        ),
        (
            dict(
                policy=dict(
                    advantages=torch.zeros(12),
                    epsilon_low=0.2,
                    epsilon_high=0.2,
                    weights=torch.ones(12),
                    delta=float("inf"),
                )
            ),
            "delta",
        ),
        (
            dict(
                policy=dict(
                    advantages=torch.zeros(12),
                    epsilon_low=0.2,
                    epsilon_high=0.2,
                    weights=torch.ones(12),
                    sequence_level=True,
                )
            ),
            "unknown",
        ),
    ],
)
def test_validation_of_settings(kwargs, match):
    inp = make_inputs()
    with pytest.raises(ValueError, match=match):
        fused(inp, **kwargs)


def test_policy_needs_completion_ids():
    inp = dict(make_inputs(), ids=None)
    with pytest.raises(ValueError, match="completion_ids"):
        fused(inp, mode="full_logits", is_clip=None, use_old=False, policy=_policy(12))


# ---------------------------------------------------------------------------------------------
# Triton backend: interpreter tier (tiny shapes) and GPU tier

INTERPRET_SETTINGS = [
    dict(mode="topk_logits", topk=4, alpha=0.5, add_tail=True),
    dict(mode="topk_logits", topk=4, alpha=1.0, add_tail=False, temperature=0.7),
    dict(mode="topk_logits", topk=8, alpha=0.0, add_tail=True),
    dict(mode="full_logits", alpha=0.5),
    dict(mode="sampled_token", alpha=1.0, temperature=1.5),
]


@interpret_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("setting", INTERPRET_SETTINGS, ids=str)
@pytest.mark.parametrize("hybrid", [False, True])
def test_interpreter_matches_materialised(setting, hybrid):
    inp = make_inputs(n=6, vocab=48, dim=12, dtype=torch.float32)
    pol = _policy(6, dtype=torch.float32) if hybrid else None
    out = fused(inp, policy=pol, is_clip=2.0, chunk_size=4, backend="triton", **setting)
    want, per_want, pol_want = materialised(inp, policy=pol, is_clip=2.0, **setting)
    assert_ulps(out.per_token, per_want, REWRITE_ULPS)
    if hybrid:
        assert_ulps(out.policy_per_token, pol_want, REWRITE_ULPS)
    assert_same(inp, out.loss, want, REWRITE_ULPS)


@interpret_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_interpreter_tied_zero_rows_and_two_calls():
    inp = make_inputs(n=5, vocab=32, dim=8, dtype=torch.float32)
    inp["weights"][::2] = 0.0
    inp["Wt"] = inp["W"].detach()
    s = dict(mode="topk_logits", topk=4)
    first, _ = fused(inp, tied=True, backend="triton", chunk_size=2, **s)
    second, _ = fused(inp, tied=True, backend="triton", mode="full_logits")
    want = materialised(inp, **s)[0] + 0.5 * materialised(inp, mode="full_logits")[0]
    assert_same(inp, first + 0.5 * second, want, REWRITE_ULPS)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "setting",
    [
        dict(mode="topk_logits", topk=100, alpha=0.5, add_tail=True),
        dict(mode="topk_logits", topk=20, alpha=1.0, add_tail=False),
        dict(mode="full_logits", alpha=0.5),
        dict(mode="sampled_token", alpha=1.0),
    ],
    ids=str,
)
def test_gpu_matches_materialised(dtype, setting):
    """Inputs are multiples of 1/4 in [-0.5, 0.5] with D = 16: every logit is exact in bf16, so the
    chunked and the full matmul give the same logits and the comparison is not bf16 noise."""
    n, vocab, dim = 300, 4096, 16
    inp = make_inputs(n=n, vocab=vocab, dim=dim, dtype=dtype, device="cuda")
    q = lambda *shape: (torch.randint(-2, 3, shape, device="cuda") / 4).to(dtype)
    inp.update(
        hs=q(n, dim).requires_grad_(),
        W=q(vocab, dim).requires_grad_(),
        ht=q(n, dim),
        Wt=q(vocab, dim),
        bs=q(vocab).requires_grad_(),
        bt=q(vocab),
    )
    pol = _policy(n, dtype=torch.float32, device="cuda")
    out = fused(inp, policy=pol, backend="triton", chunk_size=64, **setting)
    want, per_want, pol_want = materialised(inp, policy=pol, backend="triton", **setting)
    assert_ulps(out.per_token, per_want.float(), GPU_ULPS)  # float32 outputs for either input dtype
    assert_ulps(out.policy_per_token, pol_want.float(), GPU_ULPS)
    ulps = GPU_ULPS if dtype == torch.float32 else BF16_ULPS
    ps = params(inp)
    for a, b in zip(torch.autograd.grad(out.loss, ps), torch.autograd.grad(want, ps)):
        assert a.dtype == dtype
        assert_ulps(a.float(), b.float(), ulps, eps_of=dtype)


# ---------------------------------------------------------------------------------------------
# 16-bit inputs and memory (CPU, reference backend)


@pytest.mark.parametrize("setting", [SETTINGS[0], SETTINGS[3], SETTINGS[6], SETTINGS[9]], ids=str)
def test_bf16_matches_materialised(setting):
    """bf16 logits chunks, float32 weight-gradient accumulation, cast once at the end. Inputs are
    multiples of 1/4 in [-0.5, 0.5] with D = 16, so every logit is exact in bf16 and the chunked
    and the full matmul agree exactly; what remains is the gradient products' bf16 rounding."""
    inp = make_inputs(n=20, vocab=64, dim=16, dtype=torch.bfloat16)
    q = lambda *shape: (torch.randint(-2, 3, shape) / 4).to(torch.bfloat16)
    inp.update(
        hs=q(20, 16).requires_grad_(),
        W=q(64, 16).requires_grad_(),
        ht=q(20, 16),
        Wt=q(64, 16),
        bs=q(64).requires_grad_(),
        bt=q(64),
    )
    pol = _policy(20, dtype=torch.float32)
    out = fused(inp, policy=pol, chunk_size=6, **setting)
    want, per_want, pol_want = materialised(inp, policy=pol, **setting)
    assert out.loss.dtype == torch.float32 and out.per_token.dtype == torch.float32
    # exact logits: the float32 losses differ only by the chunks' row blocking
    assert_ulps(out.per_token, per_want, REORDER_ULPS)
    assert_ulps(out.policy_per_token, pol_want, REORDER_ULPS)
    assert_ulps(out.loss, want, REORDER_ULPS)
    ps = params(inp)
    for a, b in zip(torch.autograd.grad(out.loss, ps), torch.autograd.grad(want, ps)):
        assert a.dtype == torch.bfloat16
        assert_ulps(a.float(), b.float(), BF16_ULPS, eps_of=torch.bfloat16)


def _cpu_peak_extra_bytes(fn) -> int:
    """Peak bytes allocated by `fn()` over what was live before (profiler allocation trace)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    return max(e[2] for e in events) - (events[0][2] - events[0][1])


def _memory_inputs(n=256, vocab=16384, dim=8):
    torch.manual_seed(0)
    h = torch.randn(n, dim, requires_grad=True)
    w = torch.randn(vocab, dim, requires_grad=True)
    return h, w, torch.randn(n, dim), torch.randn(vocab, dim), torch.randint(0, vocab, (n,)), torch.rand(n)


def _extra_over_grads(mode, backend, n=256, vocab=16384, dim=8) -> float:
    """Peak extra memory of one fused fwd+bwd minus the returned gradients, in [N, V] fp32 units."""
    h, w, ht, wt, ids, weights = _memory_inputs(n, vocab, dim)

    def step():
        loss, _ = linear_self_distillation_loss(h, w, ht, wt, ids, weights=weights, mode=mode, topk=16, backend=backend)
        grads = torch.autograd.grad(loss, (h, w))
        del loss, grads

    step()
    peak = _cpu_peak_extra_bytes(step)
    return (peak - (vocab * dim + n * dim) * 4) / (n * vocab * 4)


class _NoTempBackend:
    """A backend allocating nothing of vocabulary size but its outputs (as the Triton kernels):
    isolates the fused-linear layer's own [chunk, V] buffers."""

    @staticmethod
    def forward(student, teacher, completion_ids, old_logps, config):
        from sdpo_kernels.stats import RowStats

        zeros = student.new_zeros(student.shape[0], dtype=torch.float32)
        return zeros, RowStats(zeros, zeros, lse_teacher=zeros, is_weight=zeros)

    @staticmethod
    def backward(student, teacher, stats, grad_loss, config, out=None):
        return torch.zeros_like(student) if out is None else out.zero_()


@pytest.mark.parametrize("mode", ["topk_logits", "full_logits"])
def test_chunk_buffers_stay_below_a_quarter_of_the_logits(monkeypatch, mode):
    """Default chunking (N // 8): at most two [N/8, V] buffers alive (the gradient overwrites the student
    logits), 1/4 of one [N, V]."""
    monkeypatch.setattr(ops_mod, "backend_module", lambda name: _NoTempBackend)
    extra = _extra_over_grads(mode, "triton")
    assert extra <= 2 / 8 + 0.01, extra


def test_reference_backend_peak_memory():
    """With the reference backend's own work tensors: still ≤ 1/4 of [N, V] in top-K mode."""
    extra = _extra_over_grads("topk_logits", "reference")
    assert extra <= 0.25, extra


def test_autocast_casts_float32_operands_like_linear():
    inp = make_inputs(n=10, vocab=32, dim=8, dtype=torch.float32)
    q = lambda *shape: torch.randint(-2, 3, shape) / 4  # exact in bf16, and so are the logits
    inp.update(
        hs=q(10, 8).requires_grad_(),
        W=q(32, 8).requires_grad_(),
        ht=q(10, 8),
        Wt=q(32, 8),
        bs=q(32).requires_grad_(),
        bt=q(32),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(inp, mode="full_logits")
    assert inp["W"].dtype == torch.float32
    cast = {k: (v.to(torch.bfloat16) if k in ("hs", "W", "ht", "Wt", "bs", "bt") else v) for k, v in inp.items()}
    want, per_want, _ = materialised(cast, mode="full_logits")
    assert_ulps(out.per_token, per_want, REORDER_ULPS)  # the same bf16 logits, float32 losses
    ps = params(inp)
    for a, b in zip(torch.autograd.grad(out.loss, ps), torch.autograd.grad(want, ps)):
        assert a.dtype == torch.float32
        assert_ulps(a, b, BF16_ULPS, eps_of=torch.bfloat16)  # float32 gradients of bf16 products
