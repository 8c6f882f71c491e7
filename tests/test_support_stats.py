"""Per-row top-K diagnostics (`sdpo_kernels.support_stats`): the student's top-K mass and the teacher-student KL
on the support, through `self_distillation_loss(return_support_stats=True)` and the fused-linear path, against an
independent float64 oracle (torch.topk on untied rows, full softmax)."""

import pytest
import torch

from sdpo_kernels import linear_self_distillation_loss, self_distillation_loss

from conftest import INTERPRET_MARKS
from tolerances import CHAIN_ROUNDINGS, assert_close

BACKENDS = ["reference", pytest.param("triton", marks=INTERPRET_MARKS)]


def oracle(student: torch.Tensor, teacher: torch.Tensor, k: int, temperature: float):
    """float64: mass of softmax(z/T) on torch.topk's K largest; KL(softmax_S(u/T) || softmax_S(z/T))."""
    z, u = student.double() / temperature, teacher.double() / temperature
    idx = z.topk(k, dim=-1).indices
    mass = z.softmax(-1).gather(-1, idx).sum(-1)
    log_s = z.gather(-1, idx).log_softmax(-1)
    log_t = u.gather(-1, idx).log_softmax(-1)
    p_t = log_t.exp()
    kl = torch.where(p_t > 0, p_t * (log_t - log_s), 0.0).sum(-1)  # 0 log 0 = 0 at teacher-absent entries
    return mass, kl


def untied(*shape: int, scale: float = 3.0) -> torch.Tensor:
    """Random logits whose values are all distinct (no tie at the K-th value: torch.topk's set is the set)."""
    x = torch.randn(*shape, dtype=torch.float64) * scale
    return x + torch.arange(shape[-1], dtype=torch.float64) * 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5, 37])
@pytest.mark.parametrize("add_tail", [True, False])
def test_functional_matches_oracle(backend, k, add_tail):
    torch.manual_seed(0)
    student, teacher = untied(3, 4, 37).float(), untied(3, 4, 37).float()
    _, stats = self_distillation_loss(
        student, teacher, topk=k, add_tail=add_tail, temperature=0.7, backend=backend, return_support_stats=True
    )
    mass, kl = oracle(student, teacher, k, 0.7)
    assert stats.topk_mass.shape == stats.support_kl.shape == (3, 4) and stats.topk_mass.dtype == torch.float32
    assert_close(stats.topk_mass.double(), mass, "f32_vs_f64")
    assert_close(stats.support_kl.double(), kl, "f32_vs_f64")
    if k == 37:  # the whole vocabulary: all the mass
        assert_close(stats.topk_mass.double(), torch.ones_like(mass), "f32_vs_f64")


def test_same_stats_for_a_strided_view_and_loss_unchanged():
    torch.manual_seed(1)
    student = untied(2, 6, 29).float()
    teacher = untied(2, 6, 29).float()
    view_s, view_t = student[:, :-1], teacher[:, :-1]  # [B, T, V] views whose leading dims do not collapse
    loss, stats = self_distillation_loss(view_s, view_t, topk=4, return_support_stats=True, backend="reference")
    loss_c, stats_c = self_distillation_loss(
        view_s.contiguous(), view_t.contiguous(), topk=4, return_support_stats=True, backend="reference"
    )
    plain = self_distillation_loss(view_s, view_t, topk=4, backend="reference")
    assert_close(loss, plain, "exact")
    assert_close(loss_c, plain, "exact")
    assert_close(stats.topk_mass, stats_c.topk_mass, "exact")
    assert_close(stats.support_kl, stats_c.support_kl, "exact")


def test_bf16_inputs_and_absent_entries():
    torch.manual_seed(2)
    student = untied(4, 40).float()
    teacher = untied(4, 40).float()
    teacher[0, student[0].argmax()] = float("-inf")  # absent for the teacher: contributes 0 to the KL
    student[1, student[1].argsort()[:10]] = float("-inf")  # absent student entries, outside the top-K
    bf_s, bf_t = student.bfloat16(), teacher.bfloat16()
    _, stats = self_distillation_loss(bf_s, bf_t, topk=6, return_support_stats=True, backend="reference")
    # Oracle on the bf16 values (exact in float32/float64); bf16 rows may tie at the K-th value, where the
    # lowest-index rule and torch.topk can pick different sets: compare only untied rows.
    z = bf_s.double()
    kth = z.topk(7, -1).values
    untied_rows = kth[:, 5] != kth[:, 6]
    mass, kl = oracle(bf_s, bf_t, 6, 1.0)
    assert untied_rows.sum() >= 2
    assert_close(stats.topk_mass.double()[untied_rows], mass[untied_rows], "f32_vs_f64")
    assert_close(stats.support_kl.double()[untied_rows], kl[untied_rows], "f32_vs_f64")
    assert torch.isfinite(stats.support_kl).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_matches_logits_path(backend):
    torch.manual_seed(3)
    n, d, v = 10, 8, 31
    h_s, h_t = torch.randn(n, d), torch.randn(n, d)
    w = torch.randn(v, d, requires_grad=True)
    weights = torch.ones(n)
    out = linear_self_distillation_loss(
        h_s, w, h_t, w.detach(), weights=weights, topk=5, temperature=0.8, chunk_size=3, backend=backend,
        return_support_stats=True,
    )  # fmt: skip
    _, expected = self_distillation_loss(
        h_s @ w.detach().t(), h_t @ w.detach().t(), topk=5, temperature=0.8, backend=backend, return_support_stats=True
    )
    assert out.support_stats.topk_mass.shape == (n,)
    # Same rows through two graphs (chunked matmul vs one matmul): a few ulps (tolerances.f32_vs_f32).
    assert_close(out.support_stats.topk_mass, expected.topk_mass, "f32_vs_f32")
    assert_close(out.support_stats.support_kl, expected.support_kl, "f32_vs_f32")
    out.loss.backward()  # the stats leave the gradient path alone
    assert w.grad is not None and torch.isfinite(w.grad).all()
    plain = linear_self_distillation_loss(
        h_s, w.detach(), h_t, w.detach(), weights=weights, topk=5, temperature=0.8, chunk_size=3, backend=backend
    )
    assert plain.support_stats is None
    assert_close(plain.loss, out.loss.detach(), "exact")


@pytest.mark.parametrize("mode", ["full_logits", "sampled_token"])
def test_support_stats_need_topk_mode(mode):
    z = torch.randn(2, 7)
    kw = dict(mode=mode, alpha=1.0, completion_ids=torch.tensor([1, 2]), return_support_stats=True)
    with pytest.raises(ValueError, match="return_support_stats needs mode='topk_logits'"):
        self_distillation_loss(z, z, **kw)
    with pytest.raises(ValueError, match="return_support_stats needs mode='topk_logits'"):
        linear_self_distillation_loss(torch.randn(2, 3), torch.randn(7, 3), torch.randn(2, 3), torch.randn(7, 3),
                                      weights=torch.ones(2), **kw)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["topk_logits", "full_logits"])
def test_fused_linear_token_logps(backend, mode):
    """`return_token_logps`: log softmax(z / T)_y per row, against the float64 log-softmax of the logits."""
    torch.manual_seed(4)
    n, d, v = 9, 8, 27
    h_s, h_t, w = torch.randn(n, d), torch.randn(n, d), torch.randn(v, d)
    ids = torch.randint(0, v, (n,))
    out = linear_self_distillation_loss(
        h_s, w, h_t, w, ids, weights=torch.ones(n), mode=mode, topk=4, temperature=0.6, chunk_size=4,
        backend=backend, return_token_logps=True,
    )  # fmt: skip
    expected = ((h_s.double() @ w.double().t()) / 0.6).log_softmax(-1).gather(1, ids[:, None]).squeeze(1)
    assert out.token_logps.shape == (n,) and out.support_stats is None
    assert_close(out.token_logps.double(), expected, "f32_vs_f64")
    with pytest.raises(ValueError, match="return_token_logps needs completion_ids"):
        linear_self_distillation_loss(h_s, w, h_t, w, weights=torch.ones(n), return_token_logps=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_entropy(backend):
    """`return_entropy`: H(softmax(z / T)) per row, against the float64 entropy of the logits (TRL's formula)."""
    torch.manual_seed(5)
    n, d, v = 7, 8, 33
    h_s, h_t, w = torch.randn(n, d) * 2, torch.randn(n, d), torch.randn(v, d)
    out = linear_self_distillation_loss(
        h_s, w, h_t, w, weights=torch.ones(n), topk=4, temperature=0.7, chunk_size=3, backend=backend,
        return_entropy=True,
    )  # fmt: skip
    z = (h_s @ w.t()).double() / 0.7  # the float32 logits the chunks see, then exact arithmetic
    expected = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    assert out.entropy.shape == (n,) and out.token_logps is None
    # H = LSE(z) - Σ p·z cancels: both terms are of size max|z| (up to ~24 here, entropies down to ~0.1), and each
    # carries about CHAIN_ROUNDINGS ulps of it (scaling, exp, product, sum), so the error is ulps of max|z|, not
    # of H: cond = 2 · CHAIN_ROUNDINGS · max|z| ulps on top of the float32 entry.
    cond = 2 * CHAIN_ROUNDINGS * z.abs().max().item()
    assert_close(out.entropy.double(), expected, "f32_vs_f64", cond=cond)
