"""GRPO options under SDPO (issue 16 item 2): each works, is refused naming the option, or warns once."""

import copy
import logging
import types
import warnings

import pytest
import torch
from datasets import Dataset
from test_trainer import length_parity_reward, make_trainer, manual_batch

from sdpo import SDPOConfig, SDPOTrainer, grpo_options
from sdpo.tiny import build_char_tokenizer, build_tiny_model, tiny_run_args


def config(tmp_path, **kw):
    return SDPOConfig(**tiny_run_args(str(tmp_path), **kw))


# ---- beta -------------------------------------------------------------------------------------------------------
def test_beta_is_ignored_in_distillation_only_mode_and_loads_no_reference_model(tmp_path):
    with pytest.warns(UserWarning, match=r"`beta=0.1` is ignored .* distillation-only"):
        trainer = make_trainer(tmp_path, beta=0.1)  # GRPO's default use_bias_correction_kl=True
    assert trainer.args.beta == 0.0 and trainer.beta == 0.0
    assert trainer.ref_model is None
    assert trainer.use_fused_linear


def test_beta_with_bias_correction_kl_in_hybrid_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"use_bias_correction_kl=False"):
        make_trainer(tmp_path, sdpo_policy_loss_mode="hybrid", beta=0.1)


# ---- cast_lm_head_to_fp32 ---------------------------------------------------------------------------------------
def _bf16_trainer(tmp_path, **kw):
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=0).to(torch.bfloat16)
    ds = Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "5+1="]})
    args = config(tmp_path, max_steps=1, cast_lm_head_to_fp32=True, **kw)
    return SDPOTrainer(
        model=model, reward_funcs=length_parity_reward, args=args, train_dataset=ds, processing_class=tok
    )


@pytest.mark.parametrize("kw", [{}, dict(full_logit_distillation=True, distillation_topk=5)])
def test_cast_lm_head_to_fp32_on_bf16_weights_uses_the_logits_path(tmp_path, kw):
    trainer = _bf16_trainer(tmp_path, **kw)
    assert trainer.model.lm_head.weight.dtype == torch.float32
    assert not trainer.use_fused_linear and "cast_lm_head_to_fp32" in trainer._fused_linear_reason
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, manual_batch(trainer))
    assert torch.isfinite(loss)
    loss.backward()


def test_cast_lm_head_to_fp32_teacher_scores_with_its_own_head(tmp_path):
    # GRPO's fp32 head forward closes over the student's head; the deep-copied EMA teacher must not inherit it.
    trainer = _bf16_trainer(tmp_path, teacher_regularization="ema")
    head = trainer.teacher.model.lm_head
    with torch.no_grad():
        head.weight.zero_()
        out = head(torch.randn(2, head.in_features, dtype=torch.bfloat16))
    assert out.dtype == torch.float32 and torch.count_nonzero(out) == 0


def test_cast_lm_head_to_fp32_with_fused_linear_always_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cast_lm_head_to_fp32"):
        _bf16_trainer(tmp_path, distillation_fused_linear="always")


# ---- options the chosen mode ignores or cannot honour -----------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
        (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
        (dict(entropy_coef=0.01), "entropy_coef"),
        (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
    ],
)
def test_policy_options_warn_once_in_distillation_only_mode(tmp_path, kw, match):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config(tmp_path, **kw)
    ours = [w for w in caught if match in str(w.message) and "ignored" in str(w.message)]
    assert len(ours) == 1


@pytest.mark.parametrize("kw", [dict(entropy_coef=0.01), dict(use_adaptive_entropy=True)])
def test_entropy_bonus_with_a_policy_term_is_refused(tmp_path, kw):
    with pytest.raises(ValueError, match="entropy_coef"):
        make_trainer(tmp_path, distillation_weight=0.5, **kw)


def test_router_aux_loss_is_disabled_with_a_warning():
    trainer = types.SimpleNamespace(aux_loss_enabled=True, router_aux_loss_coef=0.001)
    with pytest.warns(UserWarning, match="router_aux_loss_coef"):
        grpo_options.disable_router_aux_loss(trainer)
    assert trainer.aux_loss_enabled is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grpo_options.disable_router_aux_loss(trainer)  # once


def test_trainer_disables_the_router_aux_loss(tmp_path, monkeypatch):
    # The tiny Llama is no MoE: make GRPO's flag true as it would be for one, and check the trainer turns it off.
    original = SDPOTrainer._setup_teacher_client

    def enable_then_setup(self):
        self.aux_loss_enabled, self.router_aux_loss_coef = True, 0.001
        original(self)

    monkeypatch.setattr(SDPOTrainer, "_setup_teacher_client", enable_then_setup)
    with pytest.warns(UserWarning, match="router_aux_loss_coef"):
        trainer = make_trainer(tmp_path)
    assert trainer.aux_loss_enabled is False


# ---- batches ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["image", "images"])
def test_vision_inputs_are_refused_at_the_first_batch(tmp_path, key):
    trainer = make_trainer(tmp_path)
    with pytest.raises(ValueError, match="vision-language"):
        trainer._generate_and_score_completions([{"prompt": "1+1=", key: object()}])


def test_unused_privileged_context_warns_once_like_trl(tmp_path, caplog):
    trainer = make_trainer(tmp_path, per_device_train_batch_size=2, num_generations=2)
    tok = trainer.processing_class
    ids = torch.tensor(tok(["12", "34"])["input_ids"])
    mask = torch.ones_like(ids)
    inputs = [{"prompt": "1+1=", "privileged_context": "2"}, {"prompt": "1+1=", "privileged_context": "2"}]
    with caplog.at_level(logging.WARNING, logger="sdpo.grpo_options"):
        for _ in range(2):
            trainer._select_teachers_and_build_prompts(inputs, ids, mask, torch.tensor([0.0, 1.0]), 2)
    ours = [r for r in caplog.records if "include_environment_feedback=False" in r.getMessage()]
    assert len(ours) == 1 and "privileged_context" in ours[0].getMessage()


# ---- PEFT -------------------------------------------------------------------------------------------------------
def test_ema_teacher_with_non_lora_trainable_peft_modules_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="non-pure-LoRA"):
        make_trainer(tmp_path, teacher_regularization="ema", peft_config=lora)


def test_ema_teacher_with_pure_lora_is_accepted(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_trainer(tmp_path, teacher_regularization="ema", peft_config=lora)


# ---- PEFT + EMA teacher: what GRPO's vLLM weight sync would send ----------------------------------------------------
def _vllm_sync_names_and_weights(model):
    """Run TRL's `VLLMGeneration._iter_named_params` (the names and tensors `sync_weights` sends) on `model`, without
    vLLM: a bare instance with a single-process, non-sharded `_dist`."""
    import contextlib

    from trl.generation.vllm_generation import VLLMGeneration

    sync = VLLMGeneration.__new__(VLLMGeneration)
    sync.model = model
    sync._dist = types.SimpleNamespace(gather_params=lambda params: contextlib.nullcontext(), is_fsdp=False)
    return {name: p.detach().clone() for name, p in sync._iter_named_params()}


def test_peft_ema_teacher_adapter_is_not_sent_by_the_vllm_weight_sync(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = make_trainer(tmp_path, teacher_regularization="ema", peft_config=config)
    model = trainer.model
    assert "sdpo_teacher" in model.peft_config  # the EMA teacher is a second adapter on the same base
    with torch.no_grad():  # make the teacher adapter differ from the student's, so a leak would show in the values
        for name, p in model.named_parameters():
            if ".sdpo_teacher." in name:
                p.add_(1.0)
    sent = _vllm_sync_names_and_weights(model)
    plain = build_tiny_model(build_char_tokenizer(), seed=0)
    assert set(sent) == {n for n, _ in plain.named_parameters()}  # exactly the names vLLM's model has
    assert not any("sdpo_teacher" in n or "lora_" in n for n in sent)
    # The values are the student's merged weights (base + the student's adapter), not the teacher's.
    student = copy.deepcopy(model)
    student.delete_adapter("sdpo_teacher")
    merged = dict(student.merge_and_unload().named_parameters())
    for name, value in sent.items():
        torch.testing.assert_close(value, merged[name].detach(), rtol=0, atol=0)


def test_why_modules_to_save_is_refused_the_sync_would_send_the_teachers_copy(tmp_path, monkeypatch):
    # With the refusal bypassed, the teacher adapter's `modules_to_save` copy passes GRPO's name filter.
    peft = pytest.importorskip("peft")
    monkeypatch.setattr(grpo_options, "refuse_ema_with_non_lora_peft", lambda *args: None)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    trainer = make_trainer(tmp_path, teacher_regularization="ema", peft_config=config)
    assert "lm_head.modules_to_save.sdpo_teacher.weight" in _vllm_sync_names_and_weights(trainer.model)


def test_vllm_is_correction_is_turned_off_when_nothing_in_distillation_only_mode_reads_it(tmp_path):
    with pytest.warns(UserWarning, match=r"vllm_importance_sampling_correction=True.* is ignored"):
        args = config(tmp_path, use_vllm=True, distillation_is_clip=None)
    assert args.vllm_importance_sampling_correction is False  # GRPO then runs no student forward for the ratio
    # Kept where something reads it: the distillation IS clip (old log-probs), the rollout IS weights, a policy term.
    for kw in (
        dict(distillation_is_clip=2.0),
        dict(distillation_is_clip=None, distillation_rollout_is=True),
        dict(distillation_is_clip=None, sdpo_policy_loss_mode="hybrid"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert config(tmp_path, use_vllm=True, **kw).vllm_importance_sampling_correction is True, kw
