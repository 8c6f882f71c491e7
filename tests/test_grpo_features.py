"""GRPO features through SDPOTrainer (issue 16): environments, Liger on the teacher, teacher positions."""

import os

import pytest
import torch
from datasets import Dataset
from test_trainer import length_parity_reward
from transformers import GPT2Config, GPT2LMHeadModel

from sdpo import SDPOConfig, SDPOTrainer, grpo_options
from sdpo.modeling import padded_position_ids
from sdpo.tiny import CHAT_TEMPLATE, build_char_tokenizer, build_tiny_model, tiny_run_args

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# GRPO needs a chat template that renders a tool-calling exchange whenever `environment_factory` is set.
TOOL_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<{{ c['function']['name'] }} "
    "{{ c['function']['arguments'] | tojson }}>{% endfor %}{% endif %}"
    "{% if m.get('name') %}[{{ m['name'] }}]{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)
OBSERVATION = "x7y"


class CountingEnvironment:
    """An environment whose `reset()` appends an observation to the prompt; reward alternates per instance."""

    def __init__(self):
        self.resets = 0

    def reset(self, **kwargs):
        self.resets += 1
        return OBSERVATION

    def get_reward(self) -> float:
        return float(self.resets % 2)


def _capture_teacher_prompts(trainer, tok):
    seen = []
    inner = trainer._generate_and_score_completions

    def spy(inputs):
        out = inner(inputs)
        keep = out["completion_ids"].size(1)
        ids, mask = out["teacher_input_ids"][:, :-keep], out["teacher_attention_mask"][:, :-keep]
        seen.extend(tok.decode(i[m.bool()]) for i, m in zip(ids, mask))
        return out

    trainer._generate_and_score_completions = spy
    return seen


@pytest.mark.parametrize("with_dataset", [True, False])
def test_environment_observation_reaches_the_teacher_reprompt(tmp_path, with_dataset):
    tok = build_char_tokenizer()
    tok.chat_template = TOOL_CHAT_TEMPLATE
    model = build_tiny_model(tok, seed=0)
    args = SDPOConfig(**tiny_run_args(str(tmp_path), max_steps=1, include_environment_feedback=True))
    # Without a dataset GRPO drives the loop with empty prompts and the environment supplies the question.
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+1="}]] * 4}) if with_dataset else None
    trainer = SDPOTrainer(
        model=model,
        reward_funcs=None if not with_dataset else length_parity_reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        environment_factory=CountingEnvironment,
    )
    seen = _capture_teacher_prompts(trainer, tok)
    trainer.train()
    assert len(seen) == 4
    question = ("1+1=" if with_dataset else "") + OBSERVATION
    assert all(f"u:{question}" in s for s in seen), seen


def test_no_reward_source_is_refused(tmp_path):
    tok = build_char_tokenizer()
    args = SDPOConfig(**tiny_run_args(str(tmp_path), max_steps=1))
    ds = Dataset.from_dict({"prompt": ["1+1="] * 4})
    with pytest.raises(ValueError, match="reward_funcs"):
        SDPOTrainer(model=build_tiny_model(tok), reward_funcs=None, args=args, train_dataset=ds, processing_class=tok)
    with pytest.raises(ValueError, match="train_dataset"):
        SDPOTrainer(model=build_tiny_model(tok), reward_funcs=length_parity_reward, args=args, processing_class=tok)


# ---- use_liger_kernel ---------------------------------------------------------------------------------------------
def test_liger_kernels_are_applied_to_a_separate_teacher_with_the_students_config(tmp_path, monkeypatch):
    # liger-kernel's Triton kernels need a GPU: record the call instead of running it.
    import transformers.integrations.liger as liger

    calls = []
    monkeypatch.setattr(liger, "apply_liger_kernel", lambda model, config: calls.append((model, config)))
    tok = build_char_tokenizer()
    args = SDPOConfig(**tiny_run_args(str(tmp_path), max_steps=1, use_liger_kernel=True))
    ds = Dataset.from_dict({"prompt": ["1+1="] * 4})
    with pytest.warns(FutureWarning, match="use_liger_kernel"):
        trainer = SDPOTrainer(
            model=build_tiny_model(tok),
            reward_funcs=length_parity_reward,
            args=args,
            train_dataset=ds,
            processing_class=tok,
        )
    assert len(calls) == 1
    model, config = calls[0]
    assert model is trainer.teacher.model and model is not trainer.model
    assert config == trainer.args.liger_kernel_config and config["fused_linear_cross_entropy"] is False


def test_liger_is_not_applied_without_the_option(tmp_path, monkeypatch):
    import transformers.integrations.liger as liger

    calls = []
    monkeypatch.setattr(liger, "apply_liger_kernel", lambda model, config: calls.append(model))
    args = SDPOConfig(**tiny_run_args(str(tmp_path)))
    model = torch.nn.Linear(2, 2)
    grpo_options.prepare_separate_teacher(args, model, copied_from_student=True)
    assert calls == []


def test_cast_head_with_a_teacher_built_from_the_path_is_refused(tmp_path):
    args = SDPOConfig(**tiny_run_args(str(tmp_path), cast_lm_head_to_fp32=True))
    with pytest.raises(ValueError, match="cast_lm_head_to_fp32"):
        grpo_options.prepare_separate_teacher(args, torch.nn.Linear(2, 2), copied_from_student=False)


# ---- teacher positions ----------------------------------------------------------------------------------------------
def test_padded_position_ids_count_attended_tokens_from_zero():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 1, 2]])
    assert torch.equal(padded_position_ids(mask), expected)


def _gpt2_trainer(tmp_path):
    tok = build_char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # large absolute position embeddings: a position shift shows at once
        model.transformer.wpe.weight.normal_(0.0, 1.0)
    args = SDPOConfig(**tiny_run_args(str(tmp_path), teacher_regularization="ema"))
    ds = Dataset.from_dict({"prompt": ["1+1="] * 4})
    return SDPOTrainer(
        model=model, reward_funcs=length_parity_reward, args=args, train_dataset=ds, processing_class=tok
    )


def test_teacher_logits_do_not_depend_on_left_padding_with_absolute_positions(tmp_path):
    trainer = _gpt2_trainer(tmp_path)
    g = torch.Generator().manual_seed(0)
    prompt, completion = torch.randint(3, 40, (1, 7), generator=g), torch.randint(3, 40, (1, 5), generator=g)
    rows = []
    for pad in (0, 6):  # the same row, alone and left-padded as in a batch with a longer reprompt
        ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), prompt, completion], 1)
        mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
        inputs = {"teacher_input_ids": ids, "teacher_attention_mask": mask, "completion_ids": completion}
        rows.append(trainer._teacher_outputs(trainer.model, inputs, fused=False))
    # Same computation up to float32 attention over masked columns (exp(-inf) = 0 exactly): a few ulps.
    torch.testing.assert_close(rows[0], rows[1], rtol=1e-5, atol=1e-5)
    # Without the position ids the padded row is shifted by 6 positions, far outside that tolerance.
    teacher = trainer.teacher.model
    with torch.no_grad():
        shifted = teacher(input_ids=ids, attention_mask=mask).logits[:, -6:-1]
    assert (shifted - rows[0]).abs().max() > 1e-2
