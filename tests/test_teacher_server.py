"""Teacher log-probs from the vLLM server (`use_teacher_server`): request trimming, the client protocol with a fake
client, the loss against TRL 1.16's formulas, masked/padded rows, and the config's validation."""

import pytest
import torch
from datasets import Dataset
from trl.experimental.sdpo import loss_utils as trl_loss

from sdpo import SDPOConfig, SDPOTrainer
from sdpo.teacher_server import build_teacher_request_inputs, fetch_teacher_logprobs, server_per_token_loss
from sdpo.tiny import build_char_tokenizer, build_tiny_model, tiny_run_args


class FakeTeacherClient:
    """Answers `get_sequence_logprobs` like `VLLMClient` (ragged per-row lists) and records the requests."""

    def __init__(self, response):
        self.response = response
        self.calls = []

    def get_sequence_logprobs(self, **kwargs):
        self.calls.append(kwargs)
        return self.response


def test_request_inputs_drop_padding_and_split_prompt_from_completion():
    ids = torch.tensor([[0, 5, 6, 7, 8, 0], [4, 5, 6, 7, 8, 9]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    sequences, prompts, completions = build_teacher_request_inputs(ids, attn, attn[:, :3])
    assert sequences == [[5, 6, 7, 8], [4, 5, 6, 7, 8, 9]]
    assert prompts == [2, 3] and completions == [2, 3]
    with pytest.raises(ValueError, match="same shape"):
        build_teacher_request_inputs(ids, attn[:, :5], attn[:, :3])


def test_fetch_fills_ragged_rows_and_keeps_sentinels():
    client = FakeTeacherClient(
        {
            "actual_logprobs": [[], [[-1.1], [-0.4]]],
            "logprobs": [[], [[-1.1, -1.5], [-0.4, -0.9]]],
            "logprob_token_ids": [[], [[14, 15], [16, 17]]],
        }
    )
    inputs = {
        "teacher_input_ids": torch.tensor([[20, 21, 22, 14, 15, 16], [23, 24, 25, 17, 18, 19]]),
        "teacher_attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]),
    }
    out = fetch_teacher_logprobs(client, inputs, logits_to_keep=3, top_logprobs=2, temperature=0.7)
    assert client.calls == [
        dict(sequences=[[20, 21, 22], [23, 24, 25, 17, 18]], prompt_lengths=[3, 3], top_logprobs=2, temperature=0.7)
    ]
    inf = float("-inf")
    torch.testing.assert_close(out["actual_logprobs"], torch.tensor([[inf, inf, inf], [-1.1, -0.4, inf]]))
    assert out["topk_token_ids"][1].tolist() == [[14, 15], [16, 17], [0, 0]]
    assert torch.isinf(out["topk_logprobs"][0]).all() and torch.isinf(out["topk_logprobs"][1, 2]).all()


def _teacher_from_logits(teacher_logits, completion_ids, k):
    """What a server holding `teacher_logits` returns, densified: realised-token and top-k log-probs."""
    logps = torch.log_softmax(teacher_logits, -1)
    top, top_ids = logps.topk(k, dim=-1)
    actual = logps.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return {"actual_logprobs": actual, "topk_logprobs": top, "topk_token_ids": top_ids}


@pytest.mark.parametrize("add_tail", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_loss_equals_trl_formula_on_the_teachers_support(alpha, add_tail):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 11, generator=g, requires_grad=True)
    teacher_logits = torch.randn(2, 3, 11, generator=g)
    ids = torch.randint(0, 11, (2, 3), generator=g)
    teacher = _teacher_from_logits(teacher_logits, ids, 4)
    required = torch.ones(2, 3, dtype=torch.bool)
    loss, _ = server_per_token_loss(student, teacher, ids, required, mode="topk_logits", alpha=alpha, add_tail=add_tail)
    # TRL's top-k loss with the *teacher's* support: gather both sides at the teacher's top-k ids.
    s = torch.log_softmax(student, -1).gather(-1, teacher["topk_token_ids"])
    t = teacher["topk_logprobs"]
    if add_tail:
        s, t = trl_loss.add_tail_bucket(s), trl_loss.add_tail_bucket(t)
    else:
        s, t = s - s.logsumexp(-1, keepdim=True), t - t.logsumexp(-1, keepdim=True)
    torch.testing.assert_close(loss, trl_loss.compute_divergence(s, t, alpha))


def test_sampled_token_loss_equals_trl_formula():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 4, 9, generator=g, requires_grad=True)
    teacher_logits = torch.randn(2, 4, 9, generator=g)
    ids = torch.randint(0, 9, (2, 4), generator=g)
    teacher = _teacher_from_logits(teacher_logits, ids, 1)
    required = torch.ones(2, 4, dtype=torch.bool)
    loss, _ = server_per_token_loss(student, teacher, ids, required, mode="sampled_token", alpha=1.0, add_tail=False)
    expected = trl_loss.compute_sampled_token_self_distillation_loss(
        student, teacher_logits, ids, distillation_alpha=1.0
    )
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(*(torch.autograd.grad(x.sum(), student)[0] for x in (loss, expected)))


def test_missing_required_logprob_is_an_error():
    teacher = {"actual_logprobs": torch.full((1, 2), float("-inf"))}
    with pytest.raises(ValueError, match="no logprob for a required"):
        server_per_token_loss(
            torch.zeros(1, 2, 5),
            teacher,
            torch.zeros(1, 2, dtype=torch.long),
            torch.tensor([[True, False]]),
            mode="sampled_token",
            alpha=1.0,
            add_tail=False,
        )


def _server_trainer(tmp_path, **kw):
    tok = build_char_tokenizer()
    args = tiny_run_args(str(tmp_path), per_device_train_batch_size=1, num_generations=1, max_completion_length=3)
    args.update(kw)
    return SDPOTrainer(
        model=build_tiny_model(tok),
        reward_funcs=lambda completions, **k: [0.0] * len(completions),
        args=SDPOConfig(**args),
        train_dataset=Dataset.from_dict({"prompt": ["2+2="], "privileged_context": ["it is 4"]}),
        processing_class=tok,
    )


def test_trainer_server_loss_is_finite_with_masked_and_padded_rows(tmp_path):
    """Row 0 has no scored token, row 1 a completion shorter than the padded batch; no sd mask (= every row)."""
    trainer = _server_trainer(
        tmp_path,
        distillation_mode="topk_logits",
        distillation_topk=2,
        distillation_alpha=0.5,
        distillation_add_tail=True,
        distillation_is_clip=None,
    )
    trainer.use_teacher_server = True
    trainer.teacher_client = FakeTeacherClient(
        {
            "actual_logprobs": [[], [[-1.1], [-0.4]]],
            "logprobs": [[], [[-1.1, -1.5], [-0.4, -0.9]]],
            "logprob_token_ids": [[], [[14, 15], [16, 17]]],
        }
    )
    batch = {
        "prompt_ids": torch.tensor([[10, 11], [12, 13]]),
        "prompt_mask": torch.ones(2, 2, dtype=torch.long),
        "completion_ids": torch.tensor([[14, 15, 16], [17, 18, 19]]),
        "completion_mask": torch.tensor([[0, 0, 0], [1, 1, 0]]),
        "teacher_input_ids": torch.tensor([[20, 21, 22, 14, 15, 16], [23, 24, 25, 17, 18, 19]]),
        "teacher_attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]),
    }
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in trainer.model.parameters() if p.grad is not None)
    assert trainer.teacher_client.calls[0]["top_logprobs"] == 2
    mode = "train" if trainer.model.training else "eval"
    assert trainer._metrics[mode]["self_distillation/server_logprob_abs_diff"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(), "use_vllm=True"),
        (dict(use_vllm=True, vllm_mode="server"), "live teacher"),
        (dict(use_vllm=True, vllm_mode="server", teacher_model_kind="live", distillation_weight=0.5), "pure self"),
        (
            dict(use_vllm=True, vllm_mode="server", teacher_model_kind="live", full_logit_distillation=True),
            "sampled_token",
        ),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SDPOConfig(output_dir="unused", use_cpu=True, bf16=False, use_teacher_server=True, **kw)


def test_config_accepts_a_valid_server_setup():
    c = SDPOConfig(
        output_dir="unused",
        use_cpu=True,
        bf16=False,
        use_teacher_server=True,
        use_vllm=True,
        vllm_mode="server",
        teacher_model_kind="live",
        distillation_mode="topk_logits",
        distillation_topk=8,
        full_logit_distillation=True,
    )
    assert c.use_teacher_server and c.teacher_regularization == "none"
