"""2-step end-to-end SDPO runs on a tiny in-code model across modes, teachers, aggregations and PEFT."""

import logging

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from sdpo import SDPOConfig, SDPOTrainer
from sdpo.tiny import build_char_tokenizer, build_tiny_model, tiny_run_args


def parity_reward(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [1.0 if len(t) % 2 == 0 else 0.0 for t in texts]


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_generation_batch_built(self, args, state, control, model=None, processing_class=None, **kw):
        assert model is not None and processing_class is not None
        self.events.append(("on_generation_batch_built", kw))

    def on_teacher_context_built(self, args, state, control, **kw):
        self.events.append(("on_teacher_context_built", kw))

    def on_self_distillation_batch_prepared(self, args, state, control, **kw):
        self.events.append(("on_self_distillation_batch_prepared", kw))


def run(
    tmp_path, conversational=False, peft_config=None, callbacks=None, reward=parity_reward, expect_change=True, **kw
):
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=0)
    prompts = ["1+1=", "2+3=", "4+4=", "5+1="]
    if conversational:
        prompts = [[{"role": "system", "content": "add"}, {"role": "user", "content": p}] for p in prompts]
    ds = Dataset.from_dict({"prompt": prompts, "privileged_context": ["it is 2", "", "it is 8", None]})
    args = tiny_run_args(str(tmp_path), **{"max_steps": 2, "learning_rate": 1e-2, "logging_steps": 1, **kw})
    trainer = SDPOTrainer(
        model=model,
        reward_funcs=reward,
        args=SDPOConfig(**args),
        train_dataset=ds,
        processing_class=tok,
        callbacks=callbacks,
        peft_config=peft_config,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    separate = trainer.teacher.model is not trainer.model or trainer.teacher.adapter_mode  # weights of its own
    teacher_before = trainer.teacher.state_dict() if separate else None
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and len(logs) == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    changed = any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)
    assert changed == expect_change, "trainable parameters moved" if changed else "no trainable parameter moved"
    if teacher_before is not None:
        after = trainer.teacher.state_dict()
        moved = any(not torch.equal(teacher_before[k], after[k]) for k in after)
        assert moved == (trainer.teacher.kind == "ema"), "EMA teacher did not move" if not moved else "base moved"
    elif trainer.teacher.kind == "none":
        assert trainer.teacher.model is trainer.model
    for key in (
        "self_distillation/success_group_fraction",
        "self_distillation/success_sample_fraction",
        "self_distillation/feedback_available_fraction",
        "self_distillation/feedback_used_fraction",
        "self_distillation/reprompt_sample_fraction",
        "self_distillation/distillation_loss",
        "self_distillation/reward_mean",
        "self_distillation/reward_std",
        "self_distillation/reward_min",
        "self_distillation/reward_max",
    ):
        assert key in logs[0], key
    return trainer, logs


CASES = {
    # topk + tail + JSD + IS: steps_per_generation=2 with GA=1 makes GRPO compute rollout log-probs (IS active).
    "topk_tail_jsd_is_ema": dict(
        full_logit_distillation=True,
        distillation_topk=5,
        distillation_add_tail=True,
        distillation_alpha=0.5,
        steps_per_generation=2,
        per_device_train_batch_size=2,
    ),
    "full_logit_hybrid_none_bnpo": dict(
        full_logit_distillation=True,
        distillation_alpha=0.0,
        sdpo_policy_loss_mode="hybrid",
        teacher_regularization="none",
        loss_type="bnpo",
    ),
    "token_level_distill_only_ema_dapo": dict(loss_type="dapo", teacher_update_rate=0.5),
    "token_level_hybrid_ema_grpo_feedback": dict(
        sdpo_policy_loss_mode="hybrid", loss_type="grpo", include_environment_feedback=True
    ),
    "topk_hybrid_base_trl_spelling": dict(
        full_logit_distillation=True, distillation_topk=4, sdpo_policy_loss_mode="hybrid", teacher_model_kind="base"
    ),
    "topk_distill_only_none_dr_grpo_chat": dict(
        full_logit_distillation=True,
        distillation_topk=4,
        teacher_regularization="none",
        loss_type="dr_grpo",
        conversational=True,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_step_run(tmp_path, case):
    kw = dict(CASES[case])
    _, logs = run(tmp_path, **kw)
    if kw.get("sdpo_policy_loss_mode") == "hybrid":
        assert "self_distillation/policy_loss" in logs[0]
    if kw.get("include_environment_feedback"):
        assert logs[0]["self_distillation/feedback_used_fraction"] > 0


@pytest.mark.slow
def test_callbacks_fire_with_trl_payloads(tmp_path):
    rec = Recorder()
    run(tmp_path, callbacks=[rec], steps_per_generation=2, per_device_train_batch_size=2)
    names = [e for e, _ in rec.events]
    # one generation batch (2 steps per generation) -> each event exactly once
    assert names.count("on_generation_batch_built") == 1
    assert names.count("on_teacher_context_built") == 1
    assert names.count("on_self_distillation_batch_prepared") == 1
    payload = dict(rec.events)
    assert payload["on_generation_batch_built"] == {"generate_every": 2, "steps_per_generation": 2}
    built = payload["on_teacher_context_built"]
    assert set(built) >= {"teacher_input_ids", "teacher_attention_mask", "completion_mask", "self_distillation_mask"}
    assert built["teacher_input_ids"].shape == built["teacher_attention_mask"].shape
    assert built["self_distillation_mask"].shape == (4,)
    # the completion sits at the end of the teacher input
    T = built["completion_mask"].size(1)
    assert torch.equal(built["teacher_attention_mask"][:, -T:], built["completion_mask"])
    prepared = payload["on_self_distillation_batch_prepared"]
    assert set(prepared) >= {"prompt_ids", "completion_ids", "old_per_token_logps"}
    assert prepared["old_per_token_logps"] is not None  # steps_per_generation > GA: rollout log-probs exist


@pytest.mark.slow
def test_flat_reward_and_inactive_warnings(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sdpo.trainer"):
        _, logs = run(
            tmp_path,
            reward=lambda completions, **kw: [0.0] * len(completions),
            sdpo_policy_loss_mode="hybrid",
            diagnostics_warning_interval=1,
            expect_change=False,  # zero advantages and no teacher: the loss is an attached zero
        )
    text = caplog.text
    assert "flat" in text and "inactive" in text
    assert logs[0]["self_distillation/reprompt_sample_fraction"] == 0.0


@pytest.mark.slow
def test_peft_ema_on_adapter_only(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer, _ = run(tmp_path, peft_config=config, teacher_update_rate=0.5, learning_rate=5e-2)
    assert trainer.teacher.adapter_mode
    teacher, student = trainer.teacher.pairs()
    assert len(teacher) == len(student) > 0
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert all(not t.requires_grad for t in teacher)
    # the teacher adapter lags the student adapter (EMA), it is not a copy of it
    assert any(not torch.equal(t, s) for t, s in zip(teacher, student))
