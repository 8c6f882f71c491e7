"""What only a compiled GPU run would show, checked where the interpreter (or plain CPU) can show it.

- a launch run twice rewrites its outputs (the persistent top-K forward's row counter);
- rows with NaN / +inf student logits: a fixed, documented result (docs/kernels.md, non-finite
  inputs) whatever the scratch held before, every support index in [0, V) and distinct, the other
  rows bit-identical; out-of-range completion ids on the no-check path: a NaN row, no stray access;
- column offsets past int32 (non-unit column strides);
- launches on the tensors' device and with FP fusion pinned;
- the custom ops: `torch.compile(fullgraph=True)` over a model forward plus the loss, `opcheck`;
- double backward raises; the gradient's sparse part in chunks (any K).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from sdpo_kernels import linear_self_distillation_loss, ops, self_distillation_loss, triton_backend
from sdpo_kernels.config import LossConfig

from conftest import GPU_MARKS, INTERPRET_MARKS, TIERS, gpu_only, interpret_only
from tolerances import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's log(0) / NaN in the interpreter

SETTINGS = [
    dict(mode="topk_logits", topk=4, alpha=0.5, add_tail=True),
    dict(mode="topk_logits", topk=4, alpha=1.0, add_tail=False),
    dict(mode="full_logits", alpha=0.0),
    dict(mode="sampled_token", alpha=1.0),
]
SETTING_IDS = ["topk-tail", "topk-renorm", "full", "sampled"]


@pytest.fixture
def small_topk_blocks(monkeypatch):
    """64-entry top-K blocks (as test_triton's fixture): a few hundred entries take every path."""
    monkeypatch.setattr(triton_backend, "TOPK_BLOCK_V", 64)
    monkeypatch.setattr(triton_backend, "TOPK_CHUNK", 32)


def _config(vocab: int, **kw) -> LossConfig:
    z = torch.empty(1, vocab)
    settings = dict(dict(topk=None, add_tail=False, is_clip=2.0, temperature=1.0), **kw)
    return LossConfig.from_args(z, z, torch.zeros(1, dtype=torch.long), torch.zeros(1), **settings)


def _rows(n: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=gen) * 3
    u = torch.randn(n, vocab, generator=gen) * 3
    y = torch.randint(0, vocab, (n,), generator=gen)
    old = torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1) + 0.5
    return z, u, y, old


def _launch_outputs(launch) -> dict[str, torch.Tensor]:
    names = ("loss_ptr", "lse_ptr", "dense_ptr", "index_ptr", "coef_ptr", "lse_teacher_ptr", "weight_ptr", "grad_ptr")
    return {k: launch.args[k] for k in names if isinstance(launch.args.get(k), torch.Tensor)}


def _poison(outputs: dict[str, torch.Tensor], pattern: int) -> None:
    for t in outputs.values():
        t.fill_(pattern) if not t.is_floating_point() else t.fill_(float("nan"))


# ----------------------------------------------------------------------------------------------
# re-running a launch


@interpret_only
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_a_launch_run_twice_rewrites_its_outputs(setting):
    z, u, y, old = _rows(5, 40)
    config = _config(40, **setting)
    launches, _loss, stats = triton_backend.forward_launches(z, u, y, old, config)
    for launch in launches:
        launch.run()
    first = {k: v.clone() for k, v in _launch_outputs(launches[0]).items()}
    _poison(_launch_outputs(launches[0]), -7)
    for launch in launches:
        launch.run()
    for k, v in _launch_outputs(launches[0]).items():
        assert torch.equal(v, first[k]), k  # without the counter reset: still NaN / -7
    back, _grad = triton_backend.backward_launches(z, u, stats, torch.ones(5), config)
    back[0].run()
    grad = back[0].args["grad_ptr"].clone()
    back[0].args["grad_ptr"].fill_(float("nan"))
    back[0].run()
    assert torch.equal(back[0].args["grad_ptr"], grad)


def test_launch_runs_on_the_tensors_device_with_fp_fusion_pinned(monkeypatch):
    """`run()` enters the device of its tensors (not the current one) and passes enable_fp_fusion."""

    class FakeCuda(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 1)

    entered, calls = [], []

    @contextlib.contextmanager
    def device_guard(device):
        entered.append(device)
        yield

    class Kernel:
        def __getitem__(self, grid):
            return lambda **kw: calls.append((grid, kw))

    monkeypatch.setattr(torch.cuda, "device", device_guard)
    counter = torch.ones(1, dtype=torch.int32)
    x = torch.Tensor._make_subclass(FakeCuda, torch.zeros(2))
    triton_backend.KernelLaunch(Kernel(), (3,), dict(x_ptr=x), num_warps=4, zeroed=(counter,)).run()
    assert entered == [torch.device("cuda", 1)]
    assert calls[0][1]["enable_fp_fusion"] is triton_backend.FP_FUSION is True
    assert counter.item() == 0


def test_cost_report_compiles_with_the_launch_options():
    from sdpo_kernels import cost_report

    kw = cost_report._jit_kwargs(triton_backend.grad_kernel, 8, None)
    assert kw["enable_fp_fusion"] is triton_backend.FP_FUSION


# ----------------------------------------------------------------------------------------------
# non-finite inputs


def _bad_rows(vocab: int) -> torch.Tensor:
    """Rows 1-4 are bad: all NaN, 3 finite entries (the rest NaN), NaN in the last block only, a +inf."""
    z, *_ = _rows(6, vocab, seed=1)
    z[1] = float("nan")
    z[2, 3:] = float("nan")
    z[3, -5] = float("nan")
    z[4, vocab // 2] = float("inf")
    return z


BAD = [1, 2, 3, 4]
GOOD = [0, 5]


@interpret_only
@pytest.mark.parametrize("add_tail", [True, False])
def test_nan_rows_fixed_result_whatever_the_scratch_held(add_tail, small_topk_blocks):
    """Scratch poisoned by two patterns (0x3FFFFFFF as int32 bits, and NaN): identical results, every
    index in [0, V) and distinct, the bad rows' support 0..K-1 with NaN coefficients and loss."""
    vocab, k = 300, 6
    z = _bad_rows(vocab)
    _, u, y, old = _rows(6, vocab)
    config = _config(vocab, mode="topk_logits", topk=k, alpha=0.5, add_tail=add_tail)
    results = []
    for poison in (lambda s: s.view(torch.int32).fill_(0x3FFFFFFF), lambda s: s.fill_(float("nan"))):
        launches, loss, stats = triton_backend.forward_launches(z, u, y, old, config)
        poison(launches[0].args["scratch_ptr"])
        launches[0].run()
        results.append((loss, stats.lse_student, stats.dense_coef, stats.sparse_index, stats.sparse_coef))
    for a, b in zip(*results):
        assert torch.equal(a, b) or torch.allclose(a, b, equal_nan=True, rtol=0, atol=0)
    loss, lse, dense, index, coef = results[0]
    assert ((index >= 0) & (index < vocab)).all()
    assert all(len(set(r.tolist())) == k for r in index)
    assert torch.equal(index[BAD], torch.arange(k).expand(len(BAD), k))
    for t in (loss[BAD], lse[BAD], dense[BAD], coef[BAD]):
        assert t.isnan().all()
    assert not loss[GOOD].isnan().any()


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_nan_rows_documented_result_and_the_other_rows_untouched(device, setting, backend):
    vocab = 50
    z = _bad_rows(vocab).to(device)
    _, u, y, old = (t.to(device) for t in _rows(6, vocab))
    upstream = torch.ones(6, device=device)
    upstream[3] = 0.0  # a bad row with zero upstream gradient (padding): exact zeros
    zz = z.clone().requires_grad_()
    loss = self_distillation_loss(zz, u, y, old, backend=backend, **setting)
    (loss * upstream).sum().backward()
    alone = z[GOOD].clone().requires_grad_()
    loss_alone = self_distillation_loss(alone, u[GOOD], y[GOOD], old[GOOD], backend=backend, **setting)
    (loss_alone * upstream[GOOD]).sum().backward()
    assert torch.equal(loss[GOOD], loss_alone) and torch.equal(zz.grad[GOOD], alone.grad)
    assert loss[BAD].isnan().all()
    assert zz.grad[[1, 2, 4]].isnan().all()
    assert torch.equal(zz.grad[3], torch.zeros(vocab, device=device))


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_nan_rows_same_in_both_backends(device, setting):
    z = _bad_rows(50).to(device)
    _, u, y, old = (t.to(device) for t in _rows(6, 50))
    config = _config(50, **setting)
    got = [ops.backend_module(b).forward(z, u, y, old, config) for b in ("triton", "reference")]
    (loss_t, stats_t), (loss_r, stats_r) = got
    assert torch.equal(loss_t.isnan(), loss_r.isnan())
    if stats_t.sparse_index is not None:  # the fixed support 0..K-1 (topk), the sampled id
        assert torch.equal(stats_t.sparse_index[BAD], stats_r.sparse_index[BAD])
    # The saved LSE, dense and sparse coefficients are NaN in both (full_logits' teacher LSE and IS
    # weight of a bad row are unspecified: the NaN LSE already makes its gradient NaN).
    for a, b in [(stats_t.lse_student, stats_r.lse_student), (stats_t.dense_coef, stats_r.dense_coef),
                 (stats_t.sparse_coef, stats_r.sparse_coef)]:  # fmt: skip
        if a is not None:
            assert a[BAD].isnan().all() and b[BAD].isnan().all()


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_teacher_nan_where_the_loss_reads_it_gives_a_nan_row(device, alpha, add_tail, backend):
    """At the student's top entry (in every support): NaN loss, whatever the divergence (alpha = 0 once
    dropped the NaN: `where(q > 0, ...)` is false for NaN)."""
    z, u, y, old = (t.to(device) for t in _rows(3, 40))
    u[1, z[1].argmax()] = float("nan")
    kw = dict(mode="topk_logits", topk=4, alpha=alpha, add_tail=add_tail)
    loss = self_distillation_loss(z, u, y, old, backend=backend, **kw)
    assert loss[1].isnan() and not loss[[0, 2]].isnan().any()


@pytest.mark.parametrize("device", TIERS)
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_out_of_range_ids_on_the_unchecked_path_give_a_nan_row(device, setting, backend):
    """Where the eager check is not made (CUDA tensors, torch.compile), the backends mask the gathers:
    the bad row's loss is NaN, nothing is read or written outside a row, the other rows unchanged."""
    vocab = 40
    z, u, y, old = (t.to(device) for t in _rows(4, vocab))
    bad = y.clone()
    bad[1], bad[2] = vocab + 1000, -3
    config = _config(vocab, **setting)
    impl = ops.backend_module(backend)
    loss, stats = impl.forward(z, u, bad, old, config)
    ref, _ = impl.forward(z, u, y, old, config)
    assert loss[[1, 2]].isnan().all() and torch.equal(loss[[0, 3]], ref[[0, 3]])
    if stats.sparse_index is not None:
        assert ((stats.sparse_index >= 0) & (stats.sparse_index < vocab)).all()
    grad = impl.backward(
        z, u if setting["mode"] == "full_logits" else None, stats, torch.ones(4, device=device), config
    )
    assert grad.shape == z.shape and not grad[[0, 3]].isnan().any()


def test_out_of_range_ids_raise_on_cpu():
    z, u, y, old = _rows(3, 20)
    with pytest.raises(ValueError, match="completion_ids must lie in"):
        self_distillation_loss(z, u, y + 20, old, topk=4)


# ----------------------------------------------------------------------------------------------
# wide column strides


def test_wide_columns_switch():
    assert not triton_backend._wide_columns(151936, 1, 1)
    assert not triton_backend._wide_columns(151936, 1, 14_134)  # column-major logits (stride N): N = 14,134
    assert triton_backend._wide_columns(151936, 1, 14_135)
    assert not triton_backend._wide_columns(65600, 16384, 1)  # (V - 1) * 16384 < 2**31
    assert triton_backend._wide_columns(65600, 32768, 1)


@interpret_only
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_column_stride_past_int32_reads_the_right_entries(setting):
    """[2, 3] bf16 logits with column stride 2^30 (a 4 GiB storage, 3 pages touched): (V - 1) · stride
    = 2^31 wraps int32 offsets (segfault or wrong entries without the int64 path)."""
    vocab, stride = 3, 2**30
    storage = torch.empty(stride * (vocab - 1) + 2, dtype=torch.bfloat16)
    z = storage.as_strided((2, vocab), (1, stride))
    z.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]))
    u = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]], dtype=torch.bfloat16)
    y = torch.tensor([2, 0])
    old = torch.tensor([-1.0, -0.5])
    kw = dict(setting, topk=2) if setting["mode"] == "topk_logits" else setting
    zz = z.detach().requires_grad_()
    loss = self_distillation_loss(zz, u, y, old, backend="triton", **kw)
    loss.sum().backward()
    dense = z.contiguous().requires_grad_()
    want = self_distillation_loss(dense, u, y, old, backend="triton", **kw)
    want.sum().backward()
    assert torch.equal(loss, want) and torch.equal(zz.grad, dense.grad)


# ----------------------------------------------------------------------------------------------
# custom ops: torch.compile, opcheck, double backward


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 37, dim: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.body = torch.nn.Linear(dim, dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def hidden(self, ids):
        return torch.tanh(self.body(self.embed(ids)))


def _compile_inputs():
    torch.manual_seed(0)
    model = _TinyLM()
    ids = torch.randint(0, 37, (2, 7))
    teacher_ids = torch.randint(0, 37, (2, 7))
    old = torch.full((2, 7), -3.0)
    return model, ids, teacher_ids, old


def _logits_loss(model, ids, teacher_ids, old, backend):
    logits = model.lm_head(model.hidden(ids))
    with torch.no_grad():
        teacher = model.lm_head(model.hidden(teacher_ids))
    per_token = self_distillation_loss(logits[:, :-1], teacher[:, :-1], ids[:, 1:], old[:, 1:], topk=5, backend=backend)
    return per_token.mean()


def _linear_loss(model, ids, teacher_ids, old, backend):
    h = model.hidden(ids)
    with torch.no_grad():
        ht = model.hidden(teacher_ids)
    w = model.lm_head.weight
    weights = torch.full(ids.shape, 1.0 / ids.numel())
    return linear_self_distillation_loss(h, w, ht, w, ids, old, weights=weights, topk=5, backend=backend).loss


@pytest.mark.parametrize("loss_fn", [_logits_loss, _linear_loss], ids=["logits", "fused_linear"])
@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("triton", marks=INTERPRET_MARKS), pytest.param("auto", marks=GPU_MARKS)]
)
def test_compile_fullgraph_model_forward_plus_loss(loss_fn, backend):
    """No graph break (fullgraph=True raises on one), no host sync on the path; same loss and gradients."""
    model, ids, teacher_ids, old = _compile_inputs()
    device = "cuda" if backend == "auto" else "cpu"
    model, ids, teacher_ids, old = model.to(device), ids.to(device), teacher_ids.to(device), old.to(device)
    eager = loss_fn(model, ids, teacher_ids, old, backend)
    want = torch.autograd.grad(eager, list(model.parameters()), allow_unused=True)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got_loss = compiled(model, ids, teacher_ids, old, backend)
    got = torch.autograd.grad(got_loss, list(model.parameters()), allow_unused=True)
    assert torch.equal(got_loss, eager)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=0, atol=0)


def _op_args(setting, backend):
    z, u, y, old = _rows(3, 23)
    z.requires_grad_()
    s = dict(dict(topk=0, add_tail=False), **setting)
    return (z, u, y, old, s["mode"], s["topk"], s["alpha"], s["add_tail"], 2.0, 0.7, backend)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=INTERPRET_MARKS)])
def test_opcheck_loss_ops(setting, backend):
    torch.library.opcheck(ops.loss_forward, _op_args(setting, backend))


@pytest.mark.parametrize("row_outputs", [False, True])
@pytest.mark.parametrize("with_policy", [False, True])
def test_opcheck_linear_op(with_policy, row_outputs):
    torch.manual_seed(0)
    n = 6
    h = torch.randn(n, 8, requires_grad=True)
    w = torch.randn(23, 8, requires_grad=True)
    ids = torch.randint(0, 23, (n,))
    policy = (
        (torch.randn(n), torch.full((n,), 0.5), None, 0.2, 0.3, None) if with_policy else (None,) * 3 + (0.0, 0.0, None)
    )
    settings = ("topk_logits", 5, 0.5, True, 2.0, 1.0, 2, "reference", True, True, False, *(row_outputs,) * 3)
    args = (h, w, None, torch.randn(n, 8), w.detach(), None, ids, torch.randn(n) - 3, torch.ones(n), *policy,
            *settings)  # fmt: skip
    torch.library.opcheck(ops.linear_loss, args)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=INTERPRET_MARKS)])
def test_double_backward_raises(backend):
    z, u, y, old = _rows(3, 23)
    z.requires_grad_()
    loss = self_distillation_loss(z, u, y, old, topk=4, backend=backend).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, z, create_graph=True)
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(23, 8)
    out = linear_self_distillation_loss(h, w, torch.randn(4, 8), w, weights=torch.ones(4), topk=4, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.loss, h, create_graph=True)


# ----------------------------------------------------------------------------------------------
# the gradient's sparse part


def test_gradient_sparse_tile_is_bounded_at_k_equals_v():
    vocab = 151936
    meta = torch.empty(4, vocab, device="meta", dtype=torch.bfloat16)
    config = _config(vocab, mode="topk_logits", topk=vocab, alpha=0.5, add_tail=True)
    from sdpo_kernels.stats import RowStats

    f32 = dict(device="meta", dtype=torch.float32)
    stats = RowStats(torch.empty(4, **f32), torch.empty(4, **f32), torch.empty(4, vocab, device="meta",
                     dtype=torch.int64), torch.empty(4, vocab, **f32))  # fmt: skip
    (launch,), _ = triton_backend.backward_launches(meta, None, stats, torch.empty(4, **f32), config)
    assert launch.args["SPARSE_CHUNK"] == triton_backend.GRAD_SPARSE_CHUNK == 1024


@interpret_only
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize(
    "chunk, topk, vocab",
    [(4, 21, 40), (512, 600, 700)],
    ids=["chunks-of-4-first-prefetched", "chunk-of-512-loaded-after-the-dense-pass"],
)
def test_gradient_sparse_part_over_several_chunks(monkeypatch, add_tail, chunk, topk, vocab):
    # Chunks of at most 256 entries: the first is loaded before the dense pass, the others after it;
    # wider chunks: every chunk after it (triton_grad.py, PREFETCH).
    monkeypatch.setattr(triton_backend, "GRAD_SPARSE_CHUNK", chunk)
    z, u, y, old = _rows(3, vocab)
    kw = dict(mode="topk_logits", topk=topk, alpha=0.5, add_tail=add_tail)
    grads = []
    for backend in ("triton", "reference"):
        zz = z.clone().requires_grad_()
        self_distillation_loss(zz, u, y, old, backend=backend, **kw).sum().backward()
        grads.append(zz.grad)
    assert_close(grads[0], grads[1], "f32_vs_f32", vocab=vocab)


# ----------------------------------------------------------------------------------------------
# CUDA graphs (GPU tier)


@gpu_only
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_cuda_graph_capture_and_replay(setting):
    """Forward + backward captured once, replayed on new inputs copied into the static buffers."""
    vocab = 32003
    z, u, y, old = (t.cuda() for t in _rows(64, vocab))
    static_z = z.clone().requires_grad_()
    static_u, static_y, static_old = u.clone(), y.clone(), old.clone()
    kw = dict(setting, topk=100) if setting["mode"] == "topk_logits" else setting

    def step():
        static_z.grad = None
        loss = self_distillation_loss(static_z, static_u, static_y, static_old, **kw)
        loss.sum().backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: compile the kernels outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_z.grad = None
    with torch.cuda.graph(graph):
        static_loss = self_distillation_loss(static_z, static_u, static_y, static_old, **kw)
        static_loss.sum().backward()
    for seed in (1, 2):
        z2, u2, y2, old2 = (t.cuda() for t in _rows(64, vocab, seed=seed))
        with torch.no_grad():
            static_z.copy_(z2)
        static_u.copy_(u2), static_y.copy_(y2), static_old.copy_(old2)
        graph.replay()
        eager_z = z2.clone().requires_grad_()
        eager = self_distillation_loss(eager_z, u2, y2, old2, **kw)
        eager.sum().backward()
        assert torch.equal(static_loss, eager) and torch.equal(static_z.grad, eager_z.grad)
