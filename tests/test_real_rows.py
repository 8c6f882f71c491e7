"""The losses on real rows of SmolLM2-135M-Instruct (tests/fixtures/smollm2_rows.pt) against TRL 1.16's loss.

The fixture (written by `bench/make_real_rows.py`, see `bench/real_rows.py`) holds 16 bf16 rows (model and
logits in bf16) and 8 fp32 rows, V = 49152: student logits at sampled completion tokens (math, prose, Python
prompts), the teacher's logits at the same tokens under a feedback-conditioned prompt, the sampled token and a
simulated rollout log-prob for the IS clip.

Real bf16 rows are tied at the K-th value: most rows have several entries equal to their 100th-largest logit
(8 significand bits, a few hundred values within the top-K's range). Our support keeps the lowest indices;
TRL's `torch.topk` picks some other subset, so on those rows TRL's loss is the loss of another support. Hence
three comparisons (docs/kernels.md, "Ties on real rows"):

* the tie rule: our selected set == the lowest-index top-K computed independently (a stable descending sort);
* TRL's unmodified loss, on the rows where `torch.topk` selects that same set;
* TRL's loss with our support substituted for `torch.topk`'s (its own formula otherwise), on every row.

Tiers. The reference backend and the TRL oracle (float64 on the same values) run on every row at full V.
Triton under the interpreter (TRITON_INTERPRET=1, ~25 s per full-vocabulary top-K row on 2 CPU cores) runs
two rows per case, restricted to a `SUB_VOCAB`-entry sub-vocabulary of each row that keeps its real values
where they matter (`_sub_vocab`); the sampled-token mode runs at full V (its kernel only streams). On a GPU
the same cases run every row at full V. Tolerances are tests/tolerances.py's entries for the computing dtype,
widened for V (`vocab=`) and by the ulps TRL's tail bucket can add (`oracles.trl_tail_condition`).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch

from sdpo_kernels import self_distillation_loss
from sdpo_kernels.config import LossConfig

from conftest import TIERS
from oracles import trl_self_distillation_loss, trl_tail_condition
from tolerances import assert_close, grad_kind

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_rows.pt"
pytestmark = [
    pytest.mark.skipif(not FIXTURE.exists(), reason=f"{FIXTURE} is absent (write it: python bench/make_real_rows.py)"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy's log(0) inside the interpreter
]

PARTS = ("bf16", "fp32")
TOPKS = (1, 20, 100)
SUB_VOCAB = 2560  # interpreter rows: more than one top-K block (2048 or 1024 by Triton version)
SUB_KEEP = 300  # sub-vocabulary: every entry >= the 300th-largest student logit (the top-K's ties intact) ...
SUB_TEACHER = 64  # ... the teacher's 64 largest, the sampled token, and a seeded sample of the rest


@pytest.fixture(scope="module")
def rows() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def _upstream(n: int) -> torch.Tensor:
    """[n] float32 upstream gradient of the per-token loss (token weights), fixed by a seed."""
    return torch.rand(n, generator=torch.Generator().manual_seed(7))


def lowest_index_topk(z: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] int64 sorted indices of the k largest entries per row, ties at the lowest indices.

    Independent of the library: a stable descending sort keeps equal values in index order."""
    return torch.sort(z.float(), dim=-1, descending=True, stable=True).indices[:, :k].sort(-1).values


def tied_at_kth(z: torch.Tensor, k: int) -> torch.Tensor:
    """[N] bool: the K-th largest value's tie group straddles the cut (the top-K set is ambiguous)."""
    z = z.float()
    kth = torch.sort(z, dim=-1, descending=True).values[:, k - 1 : k]
    return ((z > kth).sum(-1) < k) & ((z >= kth).sum(-1) > k)


@contextmanager
def support_substituted(index: torch.Tensor):
    """TRL's loss with `index` [N, K] as the support: `torch.topk`, which TRL's top-K loss calls once to select
    it, answers with `index` (values gathered from its input) while the context is open; nothing else changes."""
    real_topk = torch.topk
    calls = []

    def topk(x, k, dim=-1, *args, **kwargs):
        assert k == index.shape[-1] and dim in (-1, x.dim() - 1) and x.shape[:-1] == index.shape[:-1]
        calls.append(k)
        idx = index.to(x.device)
        return torch.return_types.topk((x.gather(-1, idx), idx))

    with mock.patch.object(torch, "topk", topk):
        yield
    assert calls, "TRL's loss did not call torch.topk: the substitution was not used"
    assert torch.topk is real_topk


def _trl(z, u, y, old, g, *, support=None, **kw):
    """TRL's per-token loss and gradient in float64 on the same values (`support`: substituted top-K)."""
    zz = z.double().requires_grad_()
    if support is None:
        loss = trl_self_distillation_loss(zz, u.double(), y, old.double(), **kw)
    else:
        with support_substituted(support):
            loss = trl_self_distillation_loss(zz, u.double(), y, old.double(), **kw)
    (loss * g.double()).sum().backward()
    return loss.detach(), zz.grad


def _ours(backend, z, u, y, old, g, **kw):
    zz = z.detach().clone().requires_grad_()
    loss = self_distillation_loss(zz, u, y, old, backend=backend, **kw)
    (loss * g.to(z.device)).sum().backward()
    return loss.detach().cpu(), zz.grad.cpu()


def _support(backend_name: str, z, u, **kw) -> torch.Tensor:
    """The backend's selected top-K set, [N, K] sorted indices."""
    from sdpo_kernels import ops

    config = LossConfig.from_args(z, u, None, None, **{"temperature": 1.0, **kw})
    _, stats = ops.backend_module(backend_name).forward(z, u, None, None, config)
    return stats.sparse_index.cpu().sort(-1).values


def _assert_matches_trl(ours, trl, z, u, dtype, cond_kw, rows=slice(None)):
    """Loss (float32) and gradient (`dtype`) against TRL in float64: "f32_vs_f64" / its rounded-output entry."""
    vocab = z.shape[-1]
    cond = trl_tail_condition(z[rows], u[rows], **cond_kw) if cond_kw else 0.0
    assert_close(ours[0][rows].double(), trl[0][rows], "f32_vs_f64", cond=cond, vocab=vocab)
    assert_close(ours[1][rows].double(), trl[1][rows], grad_kind(dtype, "f32_vs_f64"), cond=cond, vocab=vocab)


TOPK_SETTINGS = [
    dict(mode="topk_logits", topk=k, alpha=a, add_tail=tail, is_clip=clip)
    for k, tail, a, clip in itertools.product(TOPKS, (True, False), (0.0, 0.5, 1.0), (None, 2.0))
]
SAMPLED = [dict(mode="sampled_token", alpha=1.0, is_clip=clip) for clip in (None, 2.0)]


def _id(s: dict) -> str:
    if s["mode"] == "sampled_token":
        return f"sampled-is_clip={s['is_clip']}"
    return "-".join(f"{k}={v}" for k, v in s.items() if k != "mode")


def test_fixture_is_what_the_tests_expect(rows):
    meta = rows["meta"]
    assert meta["model"] == "smollm2-135m-instruct" and "seed" in meta and "versions" in meta
    for part, dtype, n in (("bf16", torch.bfloat16, 16), ("fp32", torch.float32, 8)):
        p = rows[part]
        assert p["student"].shape == p["teacher"].shape == (n, 49152)
        assert p["student"].dtype == p["teacher"].dtype == dtype
        assert p["token"].shape == p["old_logp"].shape == (n,) and p["token"].dtype == torch.int64
        assert set(p["kind"]) == {"math", "prose", "python"}
        assert torch.isfinite(p["student"].float()).all() and torch.isfinite(p["teacher"].float()).all()
        # logp is the student's own log-prob of the stored token (the label the row predicted)
        logp = torch.log_softmax(p["student"].double(), -1).gather(-1, p["token"][:, None]).squeeze(-1)
        torch.testing.assert_close(p["logp"].double(), logp, rtol=0, atol=1e-6)
    assert FIXTURE.stat().st_size < 8 * 2**20


# ----------------------------------------------------------------------------------------------------------
# the reference backend on every row at full V


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("topk", TOPKS)
def test_ties_on_real_rows(rows, part, topk, record_property):
    """The tie rule on real rows: our support is the lowest-index top-K; TRL's torch.topk set vs ours."""
    p = rows[part]
    z, u = p["student"], p["teacher"]
    kw = dict(mode="topk_logits", topk=topk, alpha=0.5, add_tail=True, is_clip=None)
    expected = lowest_index_topk(z, topk)
    assert torch.equal(_support("reference", z, u, **kw), expected)
    tied = tied_at_kth(z, topk)
    same = (torch.topk(z, topk, dim=-1).indices.sort(-1).values == expected).all(-1)
    assert bool(same[~tied].all()), "an untied row must have one top-K set"
    if part == "bf16" and topk == 100:
        assert int(tied.sum()) > 0, "the bf16 rows should exercise the tie rule"
    # How far TRL's loss (torch.topk's support) is from ours where the sets differ: the loss of another support.
    ours = self_distillation_loss(z.double(), u.double(), backend="reference", **kw)
    trl = trl_self_distillation_loss(z.double(), u.double(), **kw)
    rel = ((ours - trl).abs() / trl.abs())[~same]
    summary = (
        f"{part} K={topk}: {int(tied.sum())}/{len(z)} rows tied at the K-th value, torch.topk's set == ours on "
        f"{int(same.sum())}; |loss - TRL's| / TRL's on the others: "
        + (f"max {rel.max():.2e}, median {rel.median():.2e}" if rel.numel() else "none")
    )
    print(summary)
    record_property("ties", summary)
    # Where the sets agree the two float64 losses are one formula, sums reordered over V terms.
    cond = trl_tail_condition(z[same], u[same], **kw)
    assert_close(ours[same], trl[same], "f64_vs_f64", cond=cond)


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("setting", TOPK_SETTINGS + SAMPLED, ids=_id)
def test_reference_matches_trl_on_real_rows(rows, part, setting):
    p = rows[part]
    z, u, y, old = p["student"], p["teacher"], p["token"], p["old_logp"]
    g = _upstream(len(z))
    ours = _ours("reference", z, u, y, old, g, **setting)
    cond_kw = {k: v for k, v in setting.items() if k in ("mode", "topk", "add_tail")}
    if setting["mode"] == "sampled_token":
        _assert_matches_trl(ours, _trl(z, u, y, old, g, **setting), z, u, z.dtype, {})
        return
    support = lowest_index_topk(z, setting["topk"])
    same = (torch.topk(z, setting["topk"], dim=-1).indices.sort(-1).values == support).all(-1)
    if bool(same.all()):  # torch.topk selects our set on every row: unmodified TRL is the oracle
        _assert_matches_trl(ours, _trl(z, u, y, old, g, **setting), z, u, z.dtype, cond_kw)
        return
    _assert_matches_trl(ours, _trl(z, u, y, old, g, support=support, **setting), z, u, z.dtype, cond_kw)
    if bool(same.any()):  # and unmodified TRL on the rows where torch.topk selects the same set
        r = same.nonzero().squeeze(-1)
        trl = _trl(z[r], u[r], y[r], old[r], g[r], **setting)
        ours_r = (ours[0][r], ours[1][r])
        _assert_matches_trl(ours_r, trl, z[r], u[r], z.dtype, cond_kw)


# ----------------------------------------------------------------------------------------------------------
# the Triton kernels: interpreter (two rows per case, sub-vocabulary for top-K) and GPU (every row, full V)


def _sub_vocab(p: dict, index: list[int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Rows `index` of part `p` restricted to SUB_VOCAB entries each, in vocabulary order.

    Kept per row: every entry >= its SUB_KEEP-th largest student logit (so the top-K for K <= 100 and the
    ties at its K-th value are those of the real row, and index order decides ties as in the full row), the
    teacher's SUB_TEACHER largest, the sampled token, and a seeded uniform sample of the other entries up to
    SUB_VOCAB. The row is then a distribution over these entries (renormalised by the losses' own LSE); the
    rollout log-prob keeps its offset from the current one, so the IS weight is the real row's.
    Returns (student [n, SUB_VOCAB], teacher, token [n], old_logp [n]).
    """
    gen = torch.Generator().manual_seed(seed)
    zs, us, ys, olds = [], [], [], []
    for i in index:
        z, u, y = p["student"][i], p["teacher"][i], int(p["token"][i])
        keep = z.float() >= torch.sort(z.float(), descending=True).values[SUB_KEEP - 1]
        keep[torch.topk(u.float(), SUB_TEACHER).indices] = True
        keep[y] = True
        rest = (~keep).nonzero().squeeze(-1)
        fill = SUB_VOCAB - int(keep.sum())
        keep[rest[torch.randperm(rest.numel(), generator=gen)[:fill]]] = True
        idx = keep.nonzero().squeeze(-1)
        assert idx.numel() == SUB_VOCAB
        zs.append(z[idx])
        us.append(u[idx])
        ys.append(int((idx == y).nonzero()))
        offset = float(p["old_logp"][i]) - float(p["logp"][i])
        olds.append(float(torch.log_softmax(z[idx].double(), -1)[ys[-1]]) + offset)
    return torch.stack(zs), torch.stack(us), torch.tensor(ys), torch.tensor(olds, dtype=torch.float32)


def _pick(p: dict, topk: int, shift: int) -> list[int]:
    """Two rows for an interpreter case: the first row tied at the K-th value (if any) and another row of a
    different kind, rotated by `shift` so that the cases cover different rows."""
    n = len(p["kind"])
    order = [(i + shift) % n for i in range(n)]
    tied = tied_at_kth(p["student"], topk)
    first = next((i for i in order if tied[i]), order[0])
    second = next(i for i in order if p["kind"][i] != p["kind"][first])
    return sorted([first, second])


# (part, setting): every K with and without tail, every alpha, IS clip on and off, in both dtypes.
TRITON_CASES = [
    ("bf16", dict(mode="topk_logits", topk=1, alpha=0.0, add_tail=True, is_clip=None)),
    ("bf16", dict(mode="topk_logits", topk=20, alpha=0.5, add_tail=True, is_clip=2.0)),
    ("bf16", dict(mode="topk_logits", topk=100, alpha=1.0, add_tail=False, is_clip=2.0)),
    ("bf16", dict(mode="topk_logits", topk=100, alpha=0.5, add_tail=True, is_clip=None)),
    ("fp32", dict(mode="topk_logits", topk=1, alpha=1.0, add_tail=False, is_clip=2.0)),
    ("fp32", dict(mode="topk_logits", topk=20, alpha=0.0, add_tail=False, is_clip=None)),
    ("fp32", dict(mode="topk_logits", topk=100, alpha=0.5, add_tail=True, is_clip=2.0)),
    ("bf16", SAMPLED[1]),
    ("fp32", SAMPLED[0]),
]


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize(
    "case", range(len(TRITON_CASES)), ids=lambda i: f"{TRITON_CASES[i][0]}-{_id(TRITON_CASES[i][1])}"
)
def test_triton_matches_reference_and_trl_on_real_rows(rows, device, case):
    part, setting = TRITON_CASES[case]
    p = rows[part]
    topk = setting.get("topk")
    if device == "cuda":  # every row at full V
        z, u, y, old = p["student"], p["teacher"], p["token"], p["old_logp"]
    elif setting["mode"] == "sampled_token":  # streaming kernels only: full V is affordable for two rows
        index = [case % len(p["kind"]), (case + len(p["kind"]) // 2) % len(p["kind"])]
        z, u, y, old = (p[k][index] for k in ("student", "teacher", "token", "old_logp"))
    else:
        z, u, y, old = _sub_vocab(p, _pick(p, topk, shift=case))
    g = _upstream(len(z))
    args = [t.to(device) for t in (z, u, y, old)]
    tri = _ours("triton", *args, g, **setting)
    ref = _ours("reference", *args, g, **setting)
    vocab = z.shape[-1]
    assert_close(tri[0], ref[0], "f32_vs_f32", vocab=vocab)
    assert_close(tri[1].float(), ref[1].float(), grad_kind(z.dtype), vocab=vocab)
    if setting["mode"] == "sampled_token":
        _assert_matches_trl(tri, _trl(z, u, y, old, g, **setting), z, u, z.dtype, {})
        return
    support = lowest_index_topk(z, topk)
    if bool(tied_at_kth(z, topk).any()):  # the tie rule on Triton's own selection (one more forward)
        assert torch.equal(_support("triton", *args[:2], **setting), support)
    cond_kw = {k: v for k, v in setting.items() if k in ("mode", "topk", "add_tail")}
    _assert_matches_trl(tri, _trl(z, u, y, old, g, support=support, **setting), z, u, z.dtype, cond_kw)
