"""`sdpo.metrics` against hand-computed values, and the metric keys of a tiny trainer run (docs/trainer.md)."""

import math

import pytest
import torch
from datasets import Dataset
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from sdpo import SDPOConfig, SDPOTrainer
from sdpo.metrics import (
    entropy_and_token_logps,
    is_clip_flags,
    masked_sum_count,
    per_token_kl,
    policy_clip_flags,
    reduce_sum_counts,
    teacher_prompt_lengths,
)
from sdpo.tiny import build_char_tokenizer, build_tiny_model, tiny_run_args

from tolerances import assert_close_ulps


def test_masked_sum_count_token_and_sequence_level():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    assert masked_sum_count(x, mask).tolist() == [8.0, 3.0]  # (1 + 3 + 4, 3 tokens)
    # [B, 1] values (sequence-level IS): every row counts once, whatever its mask
    assert masked_sum_count(torch.tensor([[2.0], [4.0]]), mask).tolist() == [6.0, 2.0]


def test_reduce_sum_counts_divides_global_totals_with_one_gather():
    calls = []

    def gather(t):  # a second "rank" with (sum 5, count 1) for "a" and (0, 0) for "b"
        calls.append(t.shape)
        return torch.cat([t, torch.tensor([[[5.0, 1.0], [0.0, 0.0]]])])

    stats = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([0.0, 0.0])}
    out = reduce_sum_counts(stats, gather)
    assert out == {"a": 6.0 / 4.0, "b": 0.0} and calls == [torch.Size([1, 2, 2])]
    assert reduce_sum_counts({}, gather) == {} and len(calls) == 1
    assert reduce_sum_counts({"a": torch.tensor([3.0, 2.0])}) == {"a": 1.5}


def test_entropy_and_token_logps_hand_values():
    # p = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4), log p_1 = ln 3/4; temperature 2 on doubled logits: same p
    logits = torch.tensor([[[0.0, 2 * math.log(3.0)], [0.0, 0.0]]])
    ids = torch.tensor([[1, 0]])
    entropy, logps = entropy_and_token_logps(logits, ids, temperature=2.0)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy[0].tolist() == pytest.approx([h, math.log(2.0)], abs=1e-6)
    assert logps[0].tolist() == pytest.approx([math.log(0.75), math.log(0.5)], abs=1e-6)


def test_entropy_and_token_logps_match_trl_across_chunks():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True) * 3
    ids = torch.randint(0, 11, (3, 5), generator=g)
    entropy, logps = entropy_and_token_logps(logits, ids, temperature=0.7, chunk_rows=4)
    assert not entropy.requires_grad and not logps.requires_grad
    torch.testing.assert_close(entropy, entropy_from_logits(logits.detach() / 0.7))
    torch.testing.assert_close(logps, selective_log_softmax(logits.detach() / 0.7, ids))


def test_policy_clip_flags_token_level():
    # ratios [[0.5, 1.5], [0.5, 1.5]], advantages [-1, +1], eps 0.2: row 0's 0.5 is low-clipped (A < 0),
    # row 1's 1.5 is high-clipped (A > 0); 1.5 with A < 0 and 0.5 with A > 0 are not clipped.
    logps = torch.log(torch.tensor([[0.5, 1.5], [0.5, 1.5]]))
    flags = policy_clip_flags(
        logps, torch.zeros(2, 2), torch.tensor([-1.0, 1.0]), torch.ones(2, 2), epsilon_low=0.2, epsilon_high=0.2
    )
    assert flags["low"].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert flags["high"].tolist() == [[0.0, 0.0], [0.0, 1.0]]
    assert flags["region"].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    # no old log-probs: ratio 1, nothing clipped (TRL's logp.detach())
    none = policy_clip_flags(
        logps, None, torch.tensor([-1.0, 1.0]), torch.ones(2, 2), epsilon_low=0.2, epsilon_high=0.2
    )
    assert none["region"].sum().item() == 0.0


def test_policy_clip_flags_sequence_level():
    # sequence ratio exp(mean(ln .5, ln 1.5)) = sqrt(.75) ≈ 0.866 < 1 - 0.1: low for A < 0 only
    logps = torch.log(torch.tensor([[0.5, 1.5], [0.5, 1.5]]))
    flags = policy_clip_flags(
        logps,
        torch.zeros(2, 2),
        torch.tensor([-1.0, 1.0]),
        torch.ones(2, 2),
        epsilon_low=0.1,
        epsilon_high=0.1,
        importance_sampling_level="sequence",
    )
    assert flags["low"].tolist() == [[1.0], [0.0]] and flags["high"].tolist() == [[0.0], [0.0]]
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_clip_flags(logps, None, torch.zeros(2), torch.ones(2, 2), epsilon_low=0.1, epsilon_high=0.1,
                          importance_sampling_level="bad")  # fmt: skip


def test_per_token_kl_is_grpo_k3():
    kl = per_token_kl(torch.zeros(1, 2), torch.tensor([[math.log(2.0), 0.0]]))
    assert kl[0].tolist() == pytest.approx([1.0 - math.log(2.0), 0.0])  # 2 - ln 2 - 1; equal log-probs: 0


def test_is_clip_flags():
    # ratios 3, 1.5, e^20 (log-ratio 30 clamped to 20), e^-20, against is_clip 2
    logps = torch.tensor([[math.log(3.0), math.log(1.5), 30.0, -30.0]])
    assert is_clip_flags(logps, torch.zeros(1, 4), 2.0).tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_teacher_prompt_lengths():
    attn = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])  # the last 2 columns are the completion
    assert teacher_prompt_lengths(attn, 2).tolist() == [2.0, 3.0]


# ---- end to end: the keys a tiny run logs -------------------------------------------------------------------


def parity_reward(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [1.0 if len(t) % 2 == 0 else 0.0 for t in texts]


def tiny_logs(tmp_path, from_disk=False, **kw):
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=0)
    if from_disk:  # beta != 0: GRPO loads its reference model from the policy's name_or_path
        model.save_pretrained(tmp_path / "tiny")
        model = str(tmp_path / "tiny")
    ds = Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "5+1="], "privileged_context": ["it is 2", "", "", ""]})
    args = tiny_run_args(str(tmp_path), max_steps=2, logging_steps=1, learning_rate=1e-2, **kw)
    trainer = SDPOTrainer(
        model=model,
        reward_funcs=parity_reward,
        args=SDPOConfig(**args),
        train_dataset=ds,
        processing_class=tok,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    return logs


GRPO_KEYS = ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
FRACTIONS = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "self_distillation/is_clip_frac",
    "self_distillation/reprompt_truncated_frac",
)


def test_hybrid_logits_path_logs_grpo_and_health_metrics(tmp_path):
    # num_iterations=2: TRL computes old_per_token_logps (the IS clip fraction needs them); beta > 0: a reference
    logs = tiny_logs(
        tmp_path,
        from_disk=True,
        sdpo_policy_loss_mode="hybrid",
        distillation_fused_linear="never",
        beta=0.1,
        use_bias_correction_kl=False,
        num_iterations=2,
    )
    keys = (*GRPO_KEYS, "kl", "self_distillation/is_clip_frac", "self_distillation/teacher_prompt_length")
    for h in logs:
        for key in keys:  # logged by every loss computation
            assert key in h and h[key] is not None and math.isfinite(h[key]), key
        assert all(0.0 <= h[k] <= 1.0 for k in FRACTIONS if k in h)
        assert h["entropy"] > 0.0 and h["kl"] >= 0.0 and h["self_distillation/teacher_prompt_length"] > 0.0
    # logged when a batch is generated (step 1; step 2 reuses it under num_iterations=2)
    assert 0.0 <= logs[0]["self_distillation/reprompt_truncated_frac"] <= 1.0


def test_distillation_only_logits_path_logs_entropy_but_not_policy_metrics(tmp_path):
    logs = tiny_logs(tmp_path, distillation_fused_linear="never")
    assert "entropy" in logs[0] and "self_distillation/teacher_prompt_length" in logs[0]
    assert not any(k in logs[0] for k in (*GRPO_KEYS[1:], "kl"))
    assert "self_distillation/is_clip_frac" not in logs[0]  # no old log-probs with num_iterations=1


def test_fused_linear_path_logs_grpo_metrics_from_the_kernels_row_outputs(tmp_path):
    """The fused kernel returns each row's log-prob of its token (one gathered logit, the forward's LSE) and its
    entropy (a pass over each chunk's logits): GRPO's entropy, clip ratios and the IS clip share come from them,
    equal to the logits path's on the same step-1 batch (hybrid: every completion token is a kernel row)."""
    kw = dict(sdpo_policy_loss_mode="hybrid", num_iterations=2, distillation_is_clip=1.0001)
    fused = tiny_logs(tmp_path / "fused", distillation_fused_linear="always", **kw)
    logits = tiny_logs(tmp_path / "logits", distillation_fused_linear="never", **kw)
    keys = (*GRPO_KEYS[1:], "self_distillation/is_clip_frac")
    assert "self_distillation/teacher_prompt_length" in fused[0] and "self_distillation/policy_loss" in fused[0]
    # Same logits through two graphs: ulps of the O(1..10) entropy terms (tolerances.PATHS_ULPS).
    assert_close_ulps(torch.tensor(fused[0]["entropy"]), torch.tensor(logits[0]["entropy"]), scale=10.0)
    for f, g in zip(fused, logits):
        for key in keys:
            assert key in f and 0.0 <= f[key] <= 1.0, key
            assert f[key] == pytest.approx(g[key], abs=1e-6), key  # fractions of the same tokens
    # Step 2 reuses step 1's batch (num_iterations=2) after an update: the ratio moved off 1, some tokens clip.
    assert fused[1]["self_distillation/is_clip_frac"] > 0.0


SUPPORT_KEYS = ("self_distillation/student_topk_mass", "self_distillation/teacher_student_support_kl")


def test_topk_support_metrics_on_both_paths_agree(tmp_path):
    """Top-K mode logs the student's top-K mass and the teacher-student KL on the support on the fused-linear and
    the logits path alike; step 1 sees the same batch and weights on both, so the values agree to a few ulps of
    the O(1) terms (tolerances.PATHS_ULPS: two graphs, chunked matmul vs logits)."""
    topk = dict(distillation_mode="topk_logits", distillation_topk=5, distillation_add_tail=True)
    fused = tiny_logs(tmp_path / "fused", distillation_fused_linear="always", **topk)
    logits = tiny_logs(tmp_path / "logits", distillation_fused_linear="never", **topk)
    for logs in (fused, logits):
        for h in logs:
            assert 0.0 < h[SUPPORT_KEYS[0]] <= 1.0 and h[SUPPORT_KEYS[1]] >= 0.0
    for key in SUPPORT_KEYS:
        assert_close_ulps(torch.tensor(fused[0][key]), torch.tensor(logits[0][key]), scale=1.0)
    # K = 5 of a 50-token vocabulary on a fresh tiny model: far from all the mass (the metric is not trivially 1).
    assert fused[0][SUPPORT_KEYS[0]] < 0.9


def test_support_metrics_absent_without_a_support(tmp_path):
    logs = tiny_logs(tmp_path, distillation_mode="sampled_token", distillation_fused_linear="never")
    assert not any(k in logs[0] for k in SUPPORT_KEYS)
