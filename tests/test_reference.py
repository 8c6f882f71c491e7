"""Reference backend against TRL's eager loss_utils (values and gradients) and float64 gradcheck."""

from __future__ import annotations

import itertools

import pytest
import torch

from sdpo_kernels import SelfDistillationLoss, self_distillation_loss
from sdpo_kernels.reference import topk_lowest_index

from oracles import tie_free_logits, trl_self_distillation_loss, trl_tail_condition
from tolerances import assert_close, grad_kind

B, T, V = 2, 3, 157  # leading dims [B, T], vocabulary not a power of two

SETTINGS = (
    [
        dict(mode="topk_logits", topk=k, alpha=a, add_tail=tail)
        for k, a, tail in itertools.product([1, 7, 100, V], [0.0, 0.3, 0.5, 1.0], [True, False])
    ]
    + [dict(mode="full_logits", alpha=a) for a in [0.0, 0.3, 0.5, 1.0]]
    + [dict(mode="sampled_token", alpha=1.0)]
)


def _ids(s: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in s.items())


def _inputs(dtype=torch.float64, scale=3.0):
    z = torch.randn(B, T, V, dtype=torch.float64) * scale
    u = torch.randn(B, T, V, dtype=torch.float64) * scale
    y = torch.randint(0, V, (B, T))
    old = torch.randn(B, T, dtype=torch.float64) - 4.0
    return z.to(dtype), u.to(dtype), y, old


def _loss_and_grad(fn, z, *args, upstream, **kw):
    z = z.detach().clone().requires_grad_()
    loss = fn(z, *args, **kw)
    (loss * upstream).sum().backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("setting", SETTINGS, ids=_ids)
@pytest.mark.parametrize("is_clip", [None, 1.5])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_trl_float64(setting, is_clip, temperature):
    z, u, y, old = _inputs()
    upstream = torch.rand(B, T, dtype=torch.float64)
    kw = dict(setting, is_clip=is_clip, temperature=temperature)
    ours = _loss_and_grad(self_distillation_loss, z, u, y, old, upstream=upstream, backend="reference", **kw)
    oracle = _loss_and_grad(trl_self_distillation_loss, z, u, y, old, upstream=upstream, **kw)
    cond = trl_tail_condition(z, u, **kw)
    assert_close(ours[0], oracle[0], "f64_vs_f64", cond=cond)
    assert_close(ours[1], oracle[1], "f64_vs_f64", cond=cond)


@pytest.mark.parametrize("setting", SETTINGS[::3] + SETTINGS[-5:], ids=_ids)
def test_matches_trl_float32(setting):
    z, u, y, old = _inputs(torch.float32)
    upstream = torch.rand(B, T)
    ours = _loss_and_grad(self_distillation_loss, z, u, y, old, upstream=upstream, **setting)
    oracle = _loss_and_grad(
        trl_self_distillation_loss, z.double(), u.double(), y, old.double(), upstream=upstream.double(), **setting
    )
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert_close(ours[0].double(), oracle[0], "f32_vs_f64")
    assert_close(ours[1].double(), oracle[1], "f32_vs_f64")


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.get("topk") in (None, 7, 100)], ids=_ids)
def test_matches_trl_bfloat16(setting):
    # Tie-free bf16 rows: the top-K support is unambiguous, so TRL (on the same values in
    # float64) is an exact oracle; the remaining difference is float32 arithmetic.
    z = tie_free_logits(B, T, V, dtype=torch.bfloat16)
    u = tie_free_logits(B, T, V, dtype=torch.bfloat16)
    y = torch.randint(0, V, (B, T))
    old = torch.randn(B, T) - 4.0
    upstream = torch.rand(B, T)
    ours = _loss_and_grad(self_distillation_loss, z, u, y, old, upstream=upstream, **setting)
    oracle = _loss_and_grad(
        trl_self_distillation_loss, z.double(), u.double(), y, old.double(), upstream=upstream.double(), **setting
    )
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.bfloat16
    assert_close(ours[0].double(), oracle[0], "f32_vs_f64")
    assert_close(ours[1].double(), oracle[1], grad_kind(ours[1].dtype))


@pytest.mark.parametrize(
    "setting",
    [
        dict(mode="topk_logits", topk=5, alpha=0.3, add_tail=True),
        dict(mode="topk_logits", topk=5, alpha=0.0, add_tail=True),
        dict(mode="topk_logits", topk=5, alpha=1.0, add_tail=False),
        dict(mode="topk_logits", topk=13, alpha=0.5, add_tail=True),
        dict(mode="full_logits", alpha=0.5),
        dict(mode="full_logits", alpha=1.0),
        dict(mode="full_logits", alpha=0.0),
    ],
    ids=_ids,
)
def test_gradcheck_float64(setting):
    # IS off: the importance weight is detached by design, so the loss is a surrogate there.
    z = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 3, 13, dtype=torch.float64)
    fn = lambda x: self_distillation_loss(x, u, is_clip=None, temperature=0.9, backend="reference", **setting)
    assert torch.autograd.gradcheck(fn, (z,))


@pytest.mark.parametrize("setting", SETTINGS[1::4] + SETTINGS[-5:], ids=_ids)
def test_masked_vocabulary_entries_are_absent(setting):
    """-inf in both student and teacher == the vocabulary without those columns (TRL gives NaN)."""
    z, u, y, old = _inputs()
    dropped = torch.tensor([0, 5, 6, 77, V - 1])
    kept = torch.ones(V, dtype=torch.bool)
    kept[dropped] = False
    y = torch.where(kept[y], y, torch.full_like(y, 1))
    z_masked, u_masked = z.clone(), u.clone()
    z_masked[..., dropped] = -torch.inf
    u_masked[..., dropped] = -torch.inf
    if setting.get("topk") == V:
        setting = dict(setting, topk=V - len(dropped))
    upstream = torch.rand(B, T, dtype=torch.float64)
    kw = dict(setting, is_clip=2.0)
    ours = _loss_and_grad(self_distillation_loss, z_masked, u_masked, y, old, upstream=upstream, **kw)
    new_pos = torch.cumsum(kept, 0) - 1
    oracle = _loss_and_grad(
        trl_self_distillation_loss, z[..., kept], u[..., kept], new_pos[y], old, upstream=upstream, **kw
    )
    cond = trl_tail_condition(z[..., kept], u[..., kept], **kw)
    assert_close(ours[0], oracle[0], "f64_vs_f64", cond=cond)
    assert_close(ours[1][..., kept], oracle[1], "f64_vs_f64", cond=cond)
    assert torch.all(ours[1][..., dropped] == 0)


def test_topk_ties_keep_lowest_index():
    z = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    assert topk_lowest_index(z, 2).tolist() == [[1, 2], [0, 1]]
    assert topk_lowest_index(z, 4).tolist() == [[1, 2, 3, 5], [0, 1, 2, 3]]


def test_non_contiguous_inputs_match_contiguous():
    z, u, y, old = _inputs(torch.float32)
    big_z = torch.randn(B, T + 1, V + 3)
    big_z[:, :T, :V] = z
    z_slice = big_z[:, :T, :V]  # leading dims that cannot be flattened without a copy, row stride != V
    u_t = u.transpose(0, 1).contiguous().transpose(0, 1)  # permuted leading strides
    assert not z_slice.is_contiguous() and not u_t.is_contiguous()
    kw = dict(mode="topk_logits", topk=7, alpha=0.5, add_tail=True)
    upstream = torch.rand(B, T)
    a = _loss_and_grad(self_distillation_loss, z_slice, u_t, y, old, upstream=upstream, **kw)
    b = _loss_and_grad(self_distillation_loss, z.contiguous(), u.contiguous(), y, old, upstream=upstream, **kw)
    assert_close(a, b, "exact")


def test_zero_upstream_rows_get_exact_zero_gradient():
    z, u, y, old = _inputs(torch.float32)
    z[0, 1] = -torch.inf  # a padded row whose loss is not finite
    upstream = torch.ones(B, T)
    upstream[0, 1] = 0.0
    for setting in SETTINGS[::5]:
        _, grad = _loss_and_grad(self_distillation_loss, z, u, y, old, upstream=upstream, **setting)
        assert torch.all(grad[0, 1] == 0)
        assert torch.isfinite(grad).all()


def test_inputs_are_not_mutated_and_module_matches_functional():
    z, u, y, old = _inputs(torch.float32)
    copies = [t.clone() for t in (z, u, y, old)]
    module = SelfDistillationLoss(mode="topk_logits", topk=7, alpha=0.3)
    zz = z.clone().requires_grad_()
    loss = module(zz, u, y, old)
    loss.sum().backward()
    for before, after in zip(copies, (z, u, y, old)):
        assert torch.equal(before, after)
    assert_close(loss, self_distillation_loss(z, u, y, old, topk=7, alpha=0.3), "exact")
    assert "topk=7" in repr(module)


def test_teacher_gets_no_gradient_and_no_grad_mode_works():
    z, u, y, old = _inputs(torch.float32)
    zz, uu = z.clone().requires_grad_(), u.clone().requires_grad_()
    self_distillation_loss(zz, uu, y, old).sum().backward()
    assert uu.grad is None and zz.grad is not None
    with torch.no_grad():
        loss = self_distillation_loss(z, u, y, old)
    assert loss.shape == (B, T) and not loss.requires_grad


def test_is_clip_ignored_without_old_logps():
    z, u, y, _ = _inputs(torch.float32)
    a = self_distillation_loss(z, u, y, None, is_clip=2.0)
    b = self_distillation_loss(z, u, None, None, is_clip=None)
    assert_close(a, b, "exact")


def test_large_vocab_chunking_matches_single_chunk(monkeypatch):
    from sdpo_kernels import reference

    z, u, y, old = _inputs(torch.float32)
    upstream = torch.rand(B, T)
    kw = dict(mode="topk_logits", topk=9, alpha=0.5, add_tail=True)
    whole = _loss_and_grad(self_distillation_loss, z, u, y, old, upstream=upstream, **kw)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", V)  # one row per chunk
    chunked = _loss_and_grad(self_distillation_loss, z, u, y, old, upstream=upstream, **kw)
    assert_close(whole, chunked, "exact")


def _profiled_peak_bytes(fn) -> int:
    """Peak bytes allocated by c10's CPU allocator while fn() runs, on top of what was live before
    (the method of bench/harness.py's CPU peak memory)."""
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
    events.sort()
    return max(e[2] for e in events) - (events[0][2] - events[0][1])


@pytest.mark.parametrize(
    "setting",
    [
        dict(mode="topk_logits", topk=100, alpha=0.5, add_tail=True),
        dict(mode="topk_logits", topk=100, alpha=0.5, add_tail=False),
        dict(mode="sampled_token", alpha=1.0),
    ],
    ids=_ids,
)
def test_peak_memory_is_the_gradient_plus_chunk_temporaries(monkeypatch, setting):
    """fp32, 8 row chunks: the forward's temporaries stay under 1.5 chunks (no int64 [rows, V] count),
    forward+backward under the gradient + half a chunk (the gradient is computed in its own rows)."""
    from sdpo_kernels import reference

    n, vocab = 32, 32768
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 4 * vocab)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, vocab, generator=gen).requires_grad_()
    u = torch.randn(n, vocab, generator=gen)
    y = torch.randint(0, vocab, (n,), generator=gen)
    old = torch.randn(n, generator=gen) - 10.0
    forward = lambda: self_distillation_loss(z, u, y, old, backend="reference", is_clip=2.0, **setting)
    forward()  # one-time costs outside the measurement
    unit, chunk = n * vocab * 4, 4 * vocab * 4
    assert _profiled_peak_bytes(forward) <= 1.5 * chunk
    assert _profiled_peak_bytes(lambda: torch.autograd.grad(forward().sum(), z)) <= unit + 0.5 * chunk
