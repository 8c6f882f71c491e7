"""Non-finite inputs in the reference backend (issue 15): the rules the Triton kernels follow too.

- A bad student row (NaN or +inf student logits): loss, lse_student, dense_coef and sparse_coef NaN,
  the top-K support 0..K-1 (sampled_token: the completion id), the gradient row NaN throughout
  (exact zeros where the upstream gradient is 0). The other rows are bit-identical to a run
  without the bad row.
- Completion ids outside [0, V), where a mode reads them (sampled_token, IS clipping): no
  out-of-bounds access, the row's student log-prob, IS weight and loss NaN, its gradient NaN at
  present entries (where its mode has a dense term; on the support in renormalised top-K) and
  exactly zero at absent (-inf) ones, sampled_token index 0.
- Teacher NaN where the loss reads it makes that row's loss NaN; a teacher entry the loss does not
  read (outside the support in renormalised top-K) changes nothing.

The backend is called directly (`reference.forward` / `reference.backward`): the public function
rejects out-of-range ids on CPU before the backend sees them.

Bit-identity across runs with different row sets relies on every row's result depending on that
row alone, and on torch's CPU kernels computing each element the same way in both runs: the shapes
are small (every ATen op runs serially, below its parallel grain), V and K are multiples of 32 and
N < 16, so an element of a [N, V] or [N, K] tensor never moves between a vector loop's body and its
scalar remainder when rows are dropped (with K = 5 it does, on AVX-512: ulp-level differences).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sdpo_kernels import reference
from sdpo_kernels.config import LossConfig
from sdpo_kernels.reference import topk_lowest_index

N, V, K = 6, 128, 32
INF, NAN = float("inf"), float("nan")

SETTINGS = (
    [dict(mode="topk_logits", alpha=a, add_tail=tail) for a, tail in itertools.product([0.0, 0.5, 1.0], [True, False])]
    + [dict(mode="full_logits", alpha=a) for a in [0.0, 0.5, 1.0]]
    + [dict(mode="sampled_token", alpha=1.0)]
)
DTYPES = [torch.float32, torch.float64]


def _ids(s: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in s.items())


def _config(setting: dict, is_clip: float | None, temperature: float = 1.0) -> LossConfig:
    mode = setting["mode"]
    return LossConfig(
        mode=mode,
        topk=K if mode == "topk_logits" else 0,
        alpha=setting["alpha"],
        add_tail=setting.get("add_tail", False),
        is_clip=is_clip,
        temperature=temperature,
    )


def _inputs(dtype: torch.dtype, seed: int = 0):
    """Continuous rows and integer-valued ones (ties at the K-th value: the tie code runs), a few
    absent (-inf) student entries, teacher near the student."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=gen, dtype=torch.float64) * 2.0
    z[::2] = z[::2].round()
    z[0, [3, 10]] = -INF
    u = z + 0.5 * torch.randn(N, V, generator=gen, dtype=torch.float64)
    u[0, [3, 10]] = -INF
    ids = torch.randint(0, V, (N,), generator=gen)
    ids[0] = 1  # a present entry of row 0
    old = torch.randn(N, generator=gen, dtype=torch.float64) - 4.0
    return z.to(dtype), u.to(dtype), ids, old.to(dtype)


def _run(z, u, ids, old, config, upstream):
    loss, stats = reference.forward(z, u, ids, old, config)
    teacher = u if config.mode == "full_logits" else None
    grad = reference.backward(z, teacher, stats, upstream.to(loss.dtype), config)
    return loss, stats, grad


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.contiguous().view(torch.int64 if t.dtype == torch.float64 else torch.int32)
    return t


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(_bits(a), _bits(b)), (a, b)


def assert_rows_match(full, part, rows: list[int], part_rows: list[int] | None = None) -> None:
    """Outputs of a run, restricted to `rows`, == those of another run (restricted to `part_rows`
    if given: else a run over those rows alone), bit for bit."""
    loss, stats, grad = full
    loss_p, stats_p, grad_p = part
    pick = (lambda t: t) if part_rows is None else (lambda t: t[part_rows])
    assert_bits_equal(loss[rows], pick(loss_p))
    for field, t, t_p in zip(("lse", "dense", "index", "coef", "lse_t", "w"), stats.tensors(), stats_p.tensors()):
        assert (t is None) == (t_p is None), field
        if t is not None:
            assert_bits_equal(t[rows], pick(t_p))
    assert_bits_equal(grad[rows], pick(grad_p))


def _make_bad(row: torch.Tensor, kind: str) -> torch.Tensor:
    row = row.clone()
    if kind == "nan":
        row[7] = NAN
    elif kind == "nan_at_kth":  # more NaNs than K: the K-th largest value is NaN
        row[1 : 2 * K + 4 : 2] = NAN
    elif kind == "posinf":
        row[9] = INF
    elif kind == "posinf_ties":  # more +inf than K: the K-th value is +inf and tied
        row[: K + 2] = INF
    elif kind == "nan_and_posinf":
        row[4], row[20] = NAN, INF
    row[30] = -INF  # an absent entry: NaN in the gradient of a bad row too
    return row


BAD_KINDS = ["nan", "nan_at_kth", "posinf", "posinf_ties", "nan_and_posinf"]


@pytest.mark.parametrize("setting", SETTINGS, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_clip", [None, 2.0])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_student_row(setting, dtype, is_clip, kind):
    config = _config(setting, is_clip)
    z, u, ids, old = _inputs(dtype)
    bad = 2
    z[bad] = _make_bad(z[bad], kind)
    upstream = torch.rand(N, dtype=torch.float64) + 0.5
    loss, stats, grad = out = _run(z, u, ids, old, config, upstream)

    assert loss[bad].isnan()
    assert stats.lse_student[bad].isnan()
    assert stats.dense_coef[bad].isnan()
    if config.mode == "topk_logits":
        assert torch.equal(stats.sparse_index[bad], torch.arange(K))
    if config.mode == "sampled_token":
        assert torch.equal(stats.sparse_index[bad], ids[bad : bad + 1])
    if stats.sparse_coef is not None:
        assert stats.sparse_coef[bad].isnan().all()
    assert grad[bad].isnan().all()

    good = [i for i in range(N) if i != bad]
    assert_rows_match(out, _run(z[good], u[good], ids[good], old[good], config, upstream[good]), good)

    upstream[bad] = 0.0  # a padding row: exact zeros whatever its statistics
    grad0 = _run(z, u, ids, old, config, upstream)[2]
    assert torch.equal(_bits(grad0[bad]), torch.zeros_like(_bits(grad0[bad])))
    assert_bits_equal(grad0[good], grad[good])


@pytest.mark.parametrize("setting", SETTINGS, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_clip", [None, 2.0])
def test_out_of_range_completion_ids(setting, dtype, is_clip):
    config = _config(setting, is_clip)
    z, u, ids, old = _inputs(dtype, seed=1)
    out_rows = {1: V, 3: -1, 4: V + 10**9}
    z[1, 7] = z[3, 9] = z[4, 11] = -INF  # absent entries of the rows with a bad id
    bad_ids = ids.clone()
    for r, y in out_rows.items():
        bad_ids[r] = y
    upstream = torch.rand(N, dtype=torch.float64) + 0.5
    loss, stats, grad = out = _run(z, u, bad_ids, old, config, upstream)
    rows = list(out_rows)
    reads_ids = config.mode == "sampled_token" or is_clip is not None
    if not reads_ids:  # the ids are not read at all: the same result as with in-range ids
        assert_rows_match(out, _run(z, u, ids, old, config, upstream), list(range(N)), list(range(N)))
        return

    assert loss[rows].isnan().all()
    # the student LSE does not depend on the id: as with an in-range id
    assert_bits_equal(stats.lse_student[rows], reference.forward(z, u, ids, old, config)[1].lse_student[rows])
    if config.mode == "full_logits":
        assert stats.is_weight[rows].isnan().all()
    if config.mode == "sampled_token":
        assert torch.equal(stats.sparse_index[rows], torch.zeros(len(rows), 1, dtype=torch.int64))
    present = torch.isfinite(z[rows])
    g = grad[rows]
    if config.mode == "topk_logits" and not config.add_tail:
        # renormalised top-K: no dense term, NaN on the support, exact zeros elsewhere
        on_support = torch.zeros_like(present).scatter_(1, stats.sparse_index[rows], True)
        assert g[on_support].isnan().all()
        assert torch.all(g[~on_support] == 0)
    else:
        assert g[present].isnan().all()
        if config.mode != "full_logits":  # full_logits adds w·∂D/∂a there, and w is NaN
            assert torch.all(g[~present] == 0)

    good = [i for i in range(N) if i not in out_rows]
    assert_rows_match(out, _run(z[good], u[good], bad_ids[good], old[good], config, upstream[good]), good)


@pytest.mark.parametrize("setting", SETTINGS, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_clip", [None, 2.0])
def test_teacher_nan(setting, dtype, is_clip):
    config = _config(setting, is_clip)
    z, u, ids, old = _inputs(dtype, seed=2)
    off, on = 3, 5  # rows with a teacher NaN outside / inside the student's top-K
    j_off = int(z[off].argmin())
    j_on = int(z[on].argmax())
    u_nan = u.clone()
    u_nan[off, j_off] = NAN
    u_nan[on, j_on] = NAN
    ids[off] = (j_off + 1) % V  # the sampled token is not the NaN entry itself
    upstream = torch.rand(N, dtype=torch.float64) + 0.5
    loss = (out := _run(z, u_nan, ids, old, config, upstream))[0]
    assert loss[on].isnan()
    if config.mode == "topk_logits" and not config.add_tail:
        # the renormalised top-K reads the teacher on the support only
        assert_rows_match(out, _run(z, u, ids, old, config, upstream), [off], [off])
    else:
        assert loss[off].isnan()
    good = [i for i in range(N) if i not in (off, on)]
    assert_rows_match(out, _run(z[good], u_nan[good], ids[good], old[good], config, upstream[good]), good)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_selection_with_nonfinite_rows(dtype):
    """NaN at the K-th value, +inf ties, and tied rows in the same call: no error, 0..K-1 for the
    bad rows, the other rows as selected alone."""
    k = 4
    z = torch.tensor(
        [
            [1.0, 3.0, 3.0, 3.0, 0.0, 3.0, 3.0, 2.0],  # tie at the K-th value
            [NAN, 1.0, NAN, 2.0, NAN, NAN, NAN, 0.0],  # K-th value NaN
            [0.0, INF, INF, INF, INF, INF, 1.0, 2.0],  # +inf tied at the K-th value
            [0.5, 0.1, 0.7, 0.2, 0.9, 0.3, 0.8, 0.4],
            [2.0, 2.0, -INF, 2.0, 2.0, 2.0, 1.0, 2.0],
        ],
        dtype=dtype,
    )
    index = topk_lowest_index(z, k)
    for bad in (1, 2):
        assert index[bad].tolist() == list(range(k))
    good = [0, 3, 4]
    assert torch.equal(index[good], topk_lowest_index(z[good], k))
    assert index[0].tolist() == [1, 2, 3, 5]
    assert index[4].tolist() == [0, 1, 3, 4]
    assert topk_lowest_index(z[[1]], k).tolist() == [list(range(k))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_absent_entries(dtype):
    """The gradient's rule from hand-made statistics: p_j > 0 gets g·dense·p_j (NaN with a NaN
    coefficient), p_j == 0 (absent) exactly 0, unless the row's LSE is NaN: NaN."""
    config = _config(dict(mode="topk_logits", alpha=0.5, add_tail=True), None)
    z = torch.randn(6, V, dtype=dtype)
    z[:, ::4] = -INF
    z[4] = -INF  # every entry absent
    lse = torch.logsumexp(z, -1)
    lse[0] = NAN  # a bad row's saved LSE
    lse[5] = NAN  # the same with a zero upstream gradient
    dense = torch.full((6,), -0.25, dtype=dtype)
    dense[1] = NAN  # e.g. an out-of-range id's row: finite LSE, NaN coefficients
    dense[2] = INF
    index = torch.tensor([[1, 2]] * 6)
    coef = torch.tensor([[0.5, -0.5]] * 6, dtype=dtype)
    coef[[0, 1, 5]] = NAN
    stats = reference.RowStats(lse, dense, index, coef)
    upstream = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=dtype)
    grad = reference.backward(z, None, stats, upstream, config)
    absent = torch.isinf(z)
    off = torch.ones(6, V, dtype=torch.bool)
    off[:, [1, 2]] = False
    assert grad[0].isnan().all()
    assert grad[1][~absent[1] & off[1]].isnan().all() and torch.all(grad[1][absent[1]] == 0)
    assert (grad[2][~absent[2] & off[2]] == INF).all() and torch.all(grad[2][absent[2]] == 0)
    p = torch.exp(z[3] - lse[3])
    assert torch.equal(grad[3][off[3]], (p * dense[3])[off[3]])
    assert torch.equal(grad[3][[1, 2]], coef[3])
    assert torch.all(grad[4][off[4]] == 0)  # all-absent row (LSE -inf): zeros off the support
    assert torch.equal(_bits(grad[5]), torch.zeros_like(_bits(grad[5])))
