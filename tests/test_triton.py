"""Triton backend against the reference backend (and TRL), values and gradients.

Each test runs once per Triton tier: "interpret" (CPU tensors, TRITON_INTERPRET=1: tiny
shapes, the interpreter is slow) and "cuda" (a real GPU, skipped without one).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sdpo_kernels import self_distillation_loss
from sdpo_kernels.reference import topk_lowest_index

from conftest import HAS_CUDA, INTERPRET, INTERPRET_MARKS, TIERS, gpu_only
from oracles import tie_free_logits, trl_self_distillation_loss
from tolerances import TOLERANCES, assert_close, grad_kind

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's log(0) inside the interpreter


def _run(backend, z, u, y, old, upstream, **kw):
    z = z.detach().clone().requires_grad_()
    loss = self_distillation_loss(z, u, y, old, backend=backend, **kw)
    (loss * upstream).sum().backward()
    return loss.detach(), z.grad


def _compare(device, z, u, y, old, upstream, **kw):
    """Triton vs reference: float32 losses ("f32_vs_f32"); gradients in the logits' dtype (rounded to
    bf16/fp16 for half-precision logits: "grad_bf16"/"grad_fp16")."""
    args = [t.to(device) if t is not None else None for t in (z, u, y, old, upstream)]
    tri = _run("triton", *args, **kw)
    ref = _run("reference", *args, **kw)
    vocab = z.shape[-1]
    assert_close(tri[0], ref[0], "f32_vs_f32", vocab=vocab, equal_nan=True)
    assert_close(tri[1].float(), ref[1].float(), grad_kind(z.dtype), vocab=vocab, equal_nan=True)
    return tri


def _inputs(rows, vocab, dtype=torch.float32, scale=3.0):
    z = (torch.randn(rows, vocab) * scale).to(dtype)
    u = (torch.randn(rows, vocab) * scale).to(dtype)
    y = torch.randint(0, vocab, (rows,))
    # Rollout log-probs near the current ones: IS weights of order 1, some clipped at 2. (Far-off
    # values would scale every loss and gradient by a tiny weight and hide errors below atol.)
    old = torch.log_softmax(z.float(), -1).gather(-1, y[:, None]).squeeze(-1) + 0.7 * torch.randn(rows)
    return z, u, y, old, torch.rand(rows)


BROAD = (
    [
        dict(mode="topk_logits", topk=k, alpha=a, add_tail=tail)
        for k, a, tail in itertools.product([1, 7, 16], [0.0, 0.3, 1.0], [True, False])
    ]
    + [dict(mode="full_logits", alpha=a) for a in (0.0, 0.5, 1.0)]
    + [dict(mode="sampled_token", alpha=1.0)]
)


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("setting", BROAD, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("is_clip", [None, 2.0])
def test_matches_reference(device, setting, is_clip):
    z, u, y, old, g = _inputs(3, 157)  # V not a power of two, spans several blocks of the top-K merge
    _compare(device, z, u, y, old, g, is_clip=is_clip, temperature=0.8, **setting)


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_topk_100(device, add_tail, alpha):
    z, u, y, old, g = _inputs(2, 300)
    _compare(device, z, u, y, old, g, mode="topk_logits", topk=100, alpha=alpha, add_tail=add_tail)


@pytest.mark.parametrize("device", TIERS)
def test_topk_equals_vocab_and_matches_trl(device):
    z, u, y, old, g = _inputs(2, 37)
    kw = dict(mode="topk_logits", topk=37, alpha=0.3, add_tail=True, is_clip=1.5)
    tri = _compare(device, z, u, y, old, g, **kw)
    zz = z.double().requires_grad_()
    trl = trl_self_distillation_loss(zz, u.double(), y, old.double(), **kw)
    (trl * g.double()).sum().backward()
    assert_close(tri[0].cpu().double(), trl.detach(), "f32_vs_f64")  # top-K = V: TRL's tail is empty
    assert_close(tri[1].cpu().double(), zz.grad, "f32_vs_f64")


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("setting", [BROAD[4], BROAD[11], BROAD[-3], BROAD[-1]], ids=str)
def test_half_precision_tie_free(device, dtype, setting):
    z, u = tie_free_logits(3, 150, dtype=dtype), tie_free_logits(3, 150, dtype=dtype)
    y, old, g = torch.randint(0, 150, (3,)), torch.randn(3) - 4.0, torch.rand(3)
    tri = _compare(device, z, u, y, old, g, **setting)
    assert tri[0].dtype == torch.float32 and tri[1].dtype == dtype


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("add_tail", [True, False])
def test_tie_heavy_bf16_rows_select_lowest_index(device, add_tail):
    # Few distinct values: the K-th value is tied many times over; both backends must pick the
    # lowest indices, so their supports, losses and gradients agree exactly up to fp32 rounding.
    from sdpo_kernels import triton_backend
    from sdpo_kernels.config import LossConfig

    z = torch.randint(-3, 3, (4, 96)).to(torch.bfloat16)
    u = torch.randn(4, 96).to(torch.bfloat16)
    y, old, g = torch.randint(0, 96, (4,)), torch.randn(4) - 4.0, torch.rand(4)
    kw = dict(mode="topk_logits", topk=7, alpha=0.5, add_tail=add_tail, is_clip=None, temperature=1.0)
    _compare(device, z, u, y, old, g, **kw)
    config = LossConfig.from_args(z, u, None, None, **kw)
    _, stats = triton_backend.forward(z.to(device), u.to(device), None, None, config)
    expected = topk_lowest_index(z.float(), 7)
    assert torch.equal(stats.sparse_index.cpu().sort(-1).values, expected)


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("setting", [BROAD[3], BROAD[8], BROAD[-2], BROAD[-1]], ids=str)
def test_neg_inf_logits_and_zero_upstream_rows(device, setting):
    z, u, y, old, g = _inputs(4, 70)
    for t in (z, u):
        t[:, [0, 9, 33, 69]] = -torch.inf
    u[1, 40] = -torch.inf  # teacher-only mask
    y[y % 33 == 0] = 5
    y[y == 9] = 5
    y[y == 69] = 5
    z[3] = -torch.inf  # a fully masked (padding) row with zero upstream gradient
    u[3] = -torch.inf
    g[3] = 0.0
    tri = _compare(device, z, u, y, old, g, is_clip=2.0, **setting)
    assert torch.all(tri[1][3] == 0)
    assert torch.all(tri[1][:, [0, 9, 33, 69]] == 0)


@pytest.mark.parametrize("device", TIERS)
def test_non_contiguous_and_leading_dims(device):
    big_z = torch.randn(2, 4, 90) * 2
    big_u = torch.randn(2, 4, 90) * 2
    z, u = big_z[:, :3, 1:81], big_u[:, :3, 1:81]  # strided rows and a vocabulary offset
    zt = torch.randn(80, 6).t()  # column stride != 1
    y, old, g = torch.randint(0, 80, (2, 3)), torch.randn(2, 3) - 4.0, torch.rand(2, 3)
    kw = dict(mode="topk_logits", topk=5, alpha=0.3, add_tail=True, is_clip=2.0)
    tri = _compare(device, z, u, y, old, g, **kw)
    assert tri[0].shape == (2, 3) and tri[1].shape == (2, 3, 80)
    _compare(device, z, u.contiguous(), y, old, g, **kw)  # only the student needs the [B, T, V] form
    _compare(device, zt, zt.flip(0), y[0].repeat(2)[:6], old.flatten(), g.flatten(), **kw)


@pytest.mark.parametrize("device", TIERS)
def test_inputs_not_mutated(device):
    z, u, y, old, g = (t.to(device) for t in _inputs(3, 64))
    copies = [t.clone() for t in (z, u, y, old)]
    _run("triton", z, u, y, old, g, mode="topk_logits", topk=4, alpha=0.5)
    for a, b in zip(copies, (z, u, y, old)):
        assert torch.equal(a, b)


@gpu_only
@pytest.mark.parametrize("vocab", [32000, 151936])
@pytest.mark.parametrize("setting", [BROAD[0], dict(mode="topk_logits", topk=100, alpha=0.5, add_tail=True)], ids=str)
def test_cuda_real_vocab(vocab, setting):
    z, u, y, old, g = _inputs(64, vocab, dtype=torch.bfloat16)
    _compare("cuda", z, u, y, old, g, **setting)  # float32 entries widened for V > 2048 (tolerances.tol)


@gpu_only
@pytest.mark.parametrize("topk", [4096, 151936])
@pytest.mark.parametrize("add_tail", [True, False])
def test_cuda_large_k(topk, add_tail):
    # K' above half a block (no first-block threshold) up to K = V: same kernel, the support in chunks.
    z, u, y, old, g = _inputs(16, 151936, dtype=torch.bfloat16)
    _compare("cuda", z, u, y, old, g, mode="topk_logits", topk=topk, alpha=0.5, add_tail=add_tail)


def test_float64_is_rejected_by_triton():
    z = torch.randn(2, 8, dtype=torch.float64)
    if not (INTERPRET or HAS_CUDA):
        pytest.skip("no Triton execution target")
    with pytest.raises(ValueError, match="float64"):
        self_distillation_loss(
            z.to("cuda" if HAS_CUDA else "cpu"), z.to("cuda" if HAS_CUDA else "cpu"), topk=2, backend="triton"
        )


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("order", ["descending", "ascending"])
def test_blocks_that_cannot_enter_the_top_k_skip_the_merge(device, order):
    # Sorted rows over several vocabulary blocks: descending rows skip the merge in every block
    # after the first (their entries all go to the tail), ascending rows merge in every block.
    z, u, y, old, g = _inputs(2, 2100)
    z = z.sort(-1, descending=order == "descending").values
    for add_tail in (True, False):
        _compare(device, z, u, y, old, g, mode="topk_logits", topk=5, alpha=0.5, add_tail=add_tail, is_clip=None)


def test_sliced_logits_are_read_in_place(monkeypatch):
    # logits[:, :-1] does not flatten to [N, V]: the kernels take its [B, T, V] strides instead of a copy.
    from sdpo_kernels import functional, triton_backend

    if not (INTERPRET or HAS_CUDA):
        pytest.skip("no Triton execution target")
    device = "cuda" if HAS_CUDA else "cpu"
    logits = torch.randn(2, 5, 40, device=device)
    seen = []
    real_forward = triton_backend.forward
    monkeypatch.setattr(
        triton_backend, "forward", lambda s, t, *a: seen.append((s.data_ptr(), s.dim())) or real_forward(s, t, *a)
    )
    functional.self_distillation_loss(logits[:, :-1], logits[:, 1:], topk=3, backend="triton")
    assert seen == [(logits.data_ptr(), 3)]


@pytest.fixture
def small_topk_blocks(monkeypatch):
    """Top-K forward with 64-entry vocabulary blocks, 32-entry selection chunks, 16-entry compaction
    chunks, a 16-entry register tile and 4-entry support chunks: a few hundred vocabulary entries then
    exercise every path of the kernel (see the cases below), ties included that span compaction chunks,
    selections in the register tile and over more candidates than it."""
    from sdpo_kernels import triton_backend

    monkeypatch.setattr(triton_backend, "TOPK_BLOCK_V", 64)
    monkeypatch.setattr(triton_backend, "TOPK_CHUNK", 32)
    monkeypatch.setattr(triton_backend, "TOPK_COMPACT_CHUNK", 16)
    monkeypatch.setattr(triton_backend, "TOPK_TILE", 16)
    monkeypatch.setattr(triton_backend, "TOPK_SUPPORT_CHUNK", 4)


def _selection_rows(case: str, vocab: int = 700) -> torch.Tensor:
    """Student rows that force one path of the top-K forward (blocks of 64, K = 5: scratch of 80)."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, vocab, generator=gen)
    if case == "ascending":  # every block beats the threshold everywhere: the scratch overflows mid-row
        z = z.sort(-1).values
    elif case == "descending":  # nothing passes after the first block: every later block goes to the tail
        z = z.sort(-1, descending=True).values
    elif case == "all_equal":  # one value: the bisection ends on a tie, cut at the lowest indices
        z = torch.full((2, vocab), 0.25)
    elif case == "few_values":  # ties at the K-th value inside and across blocks, some cut by the support
        z = torch.randint(-2, 2, (2, vocab), generator=gen).float()
    elif case == "top_in_last_block":  # the support sits in the partial last block
        z[:, -7:] = 10.0 + torch.rand(2, 7, generator=gen)
    elif case == "neg_inf_runs":  # a masked first block, masked runs, and a row with fewer than K finite entries
        z[:, :64] = -torch.inf
        z[:, 200:330] = -torch.inf
        z[1, :] = -torch.inf
        z[1, [100, 500, 650]] = torch.tensor([1.0, 2.0, 3.0])
    elif case == "overflow_base":  # later blocks 300 above the first block's maximum: the base is raised
        z[:, 64:] += torch.linspace(0.0, 300.0, vocab - 64)
    elif case == "underflow_base":  # first block masked, the rest far below 0: the base is set late
        z[:, :64] = -torch.inf
        z[:, 64:] -= 300.0
    return z


SELECTION_CASES = [
    "iid",
    "ascending",
    "descending",
    "all_equal",
    "few_values",
    "top_in_last_block",
    "neg_inf_runs",
    "overflow_base",
    "underflow_base",
    "teacher_base_mid_row",
    "teacher_jump_at_support",
]


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("case", SELECTION_CASES)
@pytest.mark.parametrize("add_tail", [True, False])
def test_every_selection_path(device, case, add_tail, small_topk_blocks):
    from sdpo_kernels import triton_backend
    from sdpo_kernels.config import LossConfig

    z = _selection_rows(case)
    u = torch.randn(z.shape, generator=torch.Generator().manual_seed(2)) * 2
    if case == "overflow_base":  # the teacher's tail sums overflow too (a jump past the first block)
        u[:, 64:] += 300.0
    elif case == "teacher_base_mid_row":
        # A masked first teacher block (nothing summed: base 0), then tail entries 300 above it and above
        # every candidate's u: the teacher base is set mid-row and must not move down to the candidates'.
        u[:, :64] = -torch.inf
        u[:, 64:] += torch.where(z[:, 64:] < 1.0, 300.0, 0.0)
    elif case == "teacher_jump_at_support":
        # Teacher logits 300 above the rest at two of the five support entries only: no tail entry of the
        # stream ever exceeds the teacher base, so only the selection's carried maximum of the candidates'
        # u can raise it (else the support's teacher mass overflows).
        support = topk_lowest_index(z * (1 / 0.7), 5).sort(-1).values
        u.scatter_add_(1, support[:, 1::2], torch.full((2, 2), 300.0))
    y, old, g = torch.randint(0, z.shape[1], (2,)), torch.randn(2) - 4.0, torch.rand(2)
    # IS off: a small IS weight would hide errors.
    kw = dict(mode="topk_logits", topk=5, alpha=0.5, add_tail=add_tail, is_clip=None, temperature=0.7)
    _compare(device, z, u, y, old, g, **kw)
    config = LossConfig.from_args(z, u, None, None, **kw)
    _, stats = triton_backend.forward(z.to(device), u.to(device), None, None, config)
    # Selected on z·(1/T), the way both backends scale the logits.
    assert torch.equal(stats.sparse_index.cpu().sort(-1).values, topk_lowest_index(z * (1 / 0.7), 5).sort(-1).values)


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("add_tail", [True, False])
def test_bf16_pair_loads_give_the_bf16_loads_results(device, add_tail, small_topk_blocks):
    # bf16 rows with V % 8 == 0 and aligned row starts are streamed as int32 pairs (two entries per load,
    # one integer op per entry to float32). The conversion is exact, so every output equals the plain
    # bf16 loads' bit for bit: ties, -inf entries, a masked run, a partial last block (696 = 10 * 64 + 56).
    import dataclasses

    from sdpo_kernels import triton_backend
    from sdpo_kernels.config import LossConfig

    gen = torch.Generator().manual_seed(4)
    z = (torch.randint(-6, 6, (3, 696), generator=gen) * 0.75).to(torch.bfloat16)
    u = (torch.randn(3, 696, generator=gen) * 2).to(torch.bfloat16)
    z[0, 200:208] = -torch.inf
    z[1, [3, 64, 695]] = -torch.inf
    u[2, 100:300] = -torch.inf
    y, old = torch.randint(0, 696, (3,), generator=gen), torch.randn(3, generator=gen) - 4.0
    z, u, y, old = (t.to(device) for t in (z, u, y, old))
    kw = dict(mode="topk_logits", topk=9, alpha=0.5, add_tail=add_tail, is_clip=2.0, temperature=0.7)
    config = LossConfig.from_args(z, u, y, old, **kw)
    (launch,), loss, stats = triton_backend.forward_launches(z, u, y, old, config)
    assert launch.args["PAIRS"]
    outputs = (loss, stats.lse_student, stats.dense_coef, stats.sparse_index, stats.sparse_coef)
    results = []
    for pairs in (True, False):
        dataclasses.replace(launch, args={**launch.args, "PAIRS": pairs}).run()
        results.append([t.clone() for t in outputs])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    _compare(device, z.cpu(), u.cpu(), y.cpu(), old.cpu(), torch.rand(3, generator=gen), **kw)  # and the reference
    # The launcher keeps the plain loads where pairs would be misaligned or cut a run, and for fp16.
    wide = torch.zeros(3, 697, dtype=torch.bfloat16, device=device)
    assert not triton_backend._bf16_pairs_allowed(wide[:, 1:], None)  # odd row stride and start
    assert not triton_backend._bf16_pairs_allowed(wide[:, :692].contiguous()[:, :690], None)  # V % 8 != 0
    assert not triton_backend._bf16_pairs_allowed(z.half(), None)
    assert triton_backend._bf16_pairs_allowed(z, None) and not triton_backend._bf16_pairs_allowed(z, u.float())


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("topk", [1, 2, 32, 64, 100, 299, 300])
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("rows", ["randn", "neg_inf"])
def test_selection_k_extremes(device, topk, add_tail, rows, small_topk_blocks):
    # K = 1; K' = 32, the largest with the first block's group threshold (2K' = BLOCK_V); K' = 64 and
    # up: no group threshold, the threshold rises only once a selection holds more than K' candidates;
    # K = V - 1 and K = V (no selection at all); several support chunks for every K > 4. "neg_inf": the
    # support needs -inf entries from after the first block (row 0: two finite entries past it; row 1:
    # one -inf entry, in the last block).
    from sdpo_kernels import triton_backend
    from sdpo_kernels.config import LossConfig

    z, u, y, old, g = _inputs(2, 300)
    if rows == "neg_inf":
        z[0, 64:] = -torch.inf
        z[0, [150, 250]] = 5.0
        z[1, 290] = -torch.inf
    kw = dict(mode="topk_logits", topk=topk, alpha=0.5, add_tail=add_tail, is_clip=2.0, temperature=1.0)
    _compare(device, z, u, y, old, g, **kw)
    config = LossConfig.from_args(z, u, None, None, **kw)
    _, stats = triton_backend.forward(z.to(device), u.to(device), None, None, config)
    assert torch.equal(stats.sparse_index.cpu().sort(-1).values, topk_lowest_index(z, topk).sort(-1).values)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=INTERPRET_MARKS)])
def test_tail_log_mass_accurate_when_support_mass_is_tiny(backend):
    # Near-flat rows: the top-1 holds ~1/V of the mass and the per-token loss (reverse KL, tail) is
    # ~1e-6, made mostly of the tail term. log(P_tail) = LSE_{not S} - LSE would cancel to a few
    # float32 ulps of LSE (~1e-6 here); -log1p(P_S / P_tail) keeps it to a few ulps of itself.
    gen = torch.Generator().manual_seed(3)
    z = 40.0 + 0.05 * torch.randn(2, 20000, generator=gen, dtype=torch.float64)
    u = z + 0.05 * torch.randn(2, 20000, generator=gen, dtype=torch.float64)
    kw = dict(mode="topk_logits", topk=1, alpha=1.0, add_tail=True)
    exact = self_distillation_loss(z, u, backend="reference", **kw)
    fp32 = self_distillation_loss(z.float(), u.float(), backend=backend, **kw)
    # Inputs rounded to float32 move the float64 loss itself by far less than this bound (a tenth of it,
    # checked below: half an ulp of |z| ~ 40 over logit differences ~0.05 gives ~1e-4 relative).
    bound = TOLERANCES["tail_cancellation"]
    exact_rounded = self_distillation_loss(z.float().double(), u.float().double(), backend="reference", **kw)
    torch.testing.assert_close(exact_rounded, exact, rtol=bound.rtol / 10, atol=bound.atol)
    assert_close(fp32.double(), exact_rounded, "tail_cancellation")


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("setting", [BROAD[3], BROAD[-2]], ids=str)  # top-K with tail, full_logits
def test_backward_into_out_and_over_the_logits(device, setting):
    """`out=`: a given buffer, or the student logits themselves (the fused-linear path overwrites its chunk's
    logits with their gradient), gives exactly the freshly allocated result, on both backends."""
    from sdpo_kernels import reference, triton_backend
    from sdpo_kernels.config import LossConfig

    torch.manual_seed(0)
    z, u, y, old, g = (t.to(device) for t in _inputs(5, 9000))  # 3 streaming blocks of the gradient kernel
    kw = {"topk": None, "add_tail": False, "is_clip": 2.0, "temperature": 0.8, **setting}
    config = LossConfig.from_args(z, u, y, old, **kw)
    for backend in (reference, triton_backend):
        _, stats = backend.forward(z, u, y, old, config)
        fresh = backend.backward(z, u, stats, g, config)
        buffer = torch.full_like(z, float("nan"))
        assert backend.backward(z, u, stats, g, config, out=buffer) is buffer
        assert torch.equal(buffer, fresh)
        overwritten = z.clone()
        assert backend.backward(overwritten, u, stats, g, config, out=overwritten) is overwritten
        assert torch.equal(overwritten, fresh), backend.__name__
        with pytest.raises(ValueError, match="out"):
            backend.backward(z, u, stats, g, config, out=z[:, :-1].clone())
        shifted = torch.empty(6, 9000, dtype=z.dtype, device=device)
        shifted[:5] = z
        with pytest.raises(ValueError, match="no other view"):  # rows shifted by one: would read overwritten data
            backend.backward(shifted[:5], u, stats, g, config, out=shifted[1:])


def _decisions(z: torch.Tensor, device: str, **kw) -> tuple[torch.Tensor, object]:
    """Run the top-K forward with its decision counters on (COUNT_DECISIONS): per row [stream
    tightenings, their search steps, final search steps, first-block search steps, blocks that append,
    other blocks]; and the launch (its parameters for the replay)."""
    import dataclasses

    from sdpo_kernels import triton_backend
    from sdpo_kernels.config import LossConfig

    z = z.to(device)
    u = torch.randn(z.shape, generator=torch.Generator().manual_seed(2)).to(device)
    config = LossConfig.from_args(z, u, None, None, mode="topk_logits", **kw)
    (launch,), *_ = triton_backend.forward_launches(z, u, None, None, config)
    counters = torch.zeros(z.shape[0], 8, dtype=torch.int32, device=device)
    dataclasses.replace(launch, args={**launch.args, "counters_ptr": counters, "COUNT_DECISIONS": True}).run()
    return counters[:, :6].cpu(), launch


def _replayed(z: torch.Tensor, launch, inv_temp: float) -> list[list[int]]:
    """The cost report's replay (`replay_topk.replay_row`) of the same rows, as the kernel's counters."""
    import numpy as np

    from sdpo_kernels.cost_report import replay_topk as rt

    params = rt.TopkParams.of_launch(launch, z.shape[1])
    out = []
    for row in z.numpy().astype(np.float32):
        r = rt.replay_row(row * np.float32(inv_temp) if inv_temp != 1.0 else row, params)
        stream, final = r.trips["stream"], r.trips["final"]
        appends = r.blocks.get("first block", 0) + r.blocks.get("append", 0)
        out.append(
            [
                r.tightens["stream"],
                rt.search_steps(stream),
                rt.search_steps(final),
                r.first_search_steps,
                appends,
                r.blocks.get("skip", 0),
            ]
        )
    return out


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("case", SELECTION_CASES)
def test_the_cost_reports_replay_takes_the_kernels_decisions(device, case, small_topk_blocks):
    # The replay behind the cost report's path mix (`cost_report.replay_topk`) mirrors the kernel's
    # control flow: on the same rows it must count the same tightenings, search steps (stream, final,
    # first block) and blocks per path as the kernel's own counters.
    z = _selection_rows(case)
    counters, launch = _decisions(z, device, topk=5, alpha=0.5, add_tail=True, is_clip=None, temperature=0.7)
    assert counters.tolist() == _replayed(z, launch, 1 / 0.7)


@pytest.mark.parametrize("device", TIERS)
def test_the_cost_reports_replay_takes_the_kernels_decisions_at_the_launch_parameters(device):
    # The launch the report costs (K = 100, T = 1; BLOCK_V 2048, TILE 512 under Triton 3.9, 1024 and 256
    # under 3.6) on bf16-valued iid rows.
    z = (torch.randn(2, 16384, generator=torch.Generator().manual_seed(3)) * 3).bfloat16().float()
    counters, launch = _decisions(z, device, topk=100, alpha=0.5, add_tail=True, is_clip=None, temperature=1.0)
    assert counters[:, 0].min() >= 1  # mid-row tightenings happen
    assert counters.tolist() == _replayed(z, launch, 1.0)
