"""Step-by-step parity with TRL 1.16's `trl.experimental.sdpo.SDPOTrainer`.

Both trainers start from the same saved tiny model, see the same prompts (same sampler seed) and the same completions
(generation is replaced by one deterministic function of the call and row), score them with the same reward, and take
4 SGD steps. After every step the logged loss, TRL's metrics and every weight are compared.

Tolerances (float32, eps = 1.2e-7): the two trainers compute the same sums in different orders (TRL: full-vocabulary
log-softmax on [B, T, V] logits; ours: the fused-linear kernel on hidden states × head weight, chunked), so single
values agree to a few hundred eps relative (rtol 1e-4, atol 1e-6 for values of order 1e-1..1). Weights move by
lr · grad per step; a gradient differing by ~1e-5 relative moves a weight by < 1e-6 absolute per step at lr 0.1, so
4 steps stay under atol 2e-5 (rtol 1e-4). Exact quantities (rewards, fractions) are compared exactly.
"""

import random

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl.experimental.sdpo import SDPOConfig as TRLConfig
from trl.experimental.sdpo import SDPOTrainer as TRLTrainer

from sdpo import SDPOConfig, SDPOTrainer
from sdpo.tiny import build_char_tokenizer, build_tiny_model

STEPS = 4
PROMPTS = ["1+1=", "2+3=", "4+4=", "5+1=", "7+2=", "3+3="]
EXACT_METRICS = [
    "self_distillation/reward_mean",
    "self_distillation/reward_min",
    "self_distillation/reward_max",
    "self_distillation/flat_group_fraction",
    "self_distillation/success_group_fraction",
    "self_distillation/success_sample_fraction",
    "self_distillation/feedback_available_fraction",
    "self_distillation/feedback_used_fraction",
    "self_distillation/reprompt_sample_fraction",
    "self_distillation/rewards/parity_reward",
]
CLOSE_METRICS = ["self_distillation/reward_std", "self_distillation/group_reward_std_mean"]
LOSS_METRICS = [
    "loss",
    "self_distillation/distillation_loss",
    "sdpo/distillation_loss",
    "self_distillation/policy_loss",
]


def parity_reward(completions, **kwargs):
    return [1.0 if len(c) % 2 == 0 else 0.0 for c in completions]


def fake_completions(call: int, n: int, vocab: int, eos: int, max_len: int) -> list[list[int]]:
    """Deterministic completions: row i of generation call `call`; some end with EOS, lengths vary."""
    out = []
    for i in range(n):
        rng = random.Random(1000 * call + i)
        length = rng.randint(1, max_len)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        if length < max_len and rng.random() < 0.5:
            ids.append(eos)
        out.append(ids)
    return out


class Snapshots(TrainerCallback):
    def __init__(self):
        self.weights = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})


def _patch_generation(trainer, ours: bool, tok, max_len: int) -> list:
    """Replace sampling with `fake_completions`; record the prompts each call received."""
    calls = []

    def completions_for(prompt_ids):
        calls.append([list(p) for p in prompt_ids])
        return fake_completions(len(calls), len(prompt_ids), len(tok), tok.eos_token_id, max_len)

    if ours:  # GRPO's single-turn generation: (completion_ids, sampling logprobs)
        trainer._generate_single_turn = lambda prompt_ids, *a, **k: (completions_for(prompt_ids), None)
    else:  # TRL's SDPO: (prompt_ids, completion_ids)
        trainer._generate = lambda prompt_ids: (prompt_ids, completions_for(prompt_ids))
    return calls


def _run(tmp_path, ours: bool, model_dir: str, tok, settings: dict):
    common = dict(
        per_device_train_batch_size=4,
        output_dir=str(tmp_path / ("ours" if ours else "trl")),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        num_generations=2,
        max_completion_length=6,
        save_strategy="no",
        disable_tqdm=True,
        seed=7,
    )
    common.update(settings)
    config = SDPOConfig(**common) if ours else TRLConfig(**common)
    cls = SDPOTrainer if ours else TRLTrainer
    snapshots = Snapshots()
    trainer = cls(
        model=model_dir,
        reward_funcs=parity_reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS, "privileged_context": ["", "it is 5", "", "", "9", ""]}),
        processing_class=tok,
        callbacks=[snapshots],
    )
    calls = _patch_generation(trainer, ours, tok, common["max_completion_length"])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, snapshots.weights, calls


SETTINGS = {
    # TRL's defaults: sampled-token reverse KL, EMA teacher, distillation_weight 1, IS clip 2 (inactive: no old logps).
    "defaults": dict(),
    # TRL's convex blend: 0.5 · GRPO policy loss + 0.5 · distillation (ours: sdpo_policy_loss_mode left None).
    "hybrid_blend": dict(distillation_weight=0.5),
    # Top-K + tail JSD on a live teacher, with rollout log-probs (steps_per_generation 2) so the IS clip acts.
    "topk_tail_jsd_live_is": dict(
        distillation_mode="topk_logits",
        distillation_topk=5,
        distillation_add_tail=True,
        distillation_alpha=0.5,
        teacher_model_kind="live",
        steps_per_generation=2,
        per_device_train_batch_size=2,
    ),
    # The recommended top-K logit distillation at TRL's teacher default (EMA, update rate 0.05) and alpha default,
    # with rollout log-probs so the IS clip (default 2) acts.
    "topk_tail_ema_is": dict(
        distillation_mode="topk_logits",
        distillation_topk=5,
        distillation_add_tail=True,
        steps_per_generation=2,
        per_device_train_batch_size=2,
    ),
    # Full-vocabulary forward KL against the frozen initial student, with environment feedback.
    "full_fkl_base_feedback": dict(
        distillation_mode="full_logits",
        distillation_alpha=0.0,
        teacher_model_kind="base",
        include_environment_feedback=True,
    ),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=0)
    with torch.no_grad():  # spread the logits (a fresh tiny model is near-uniform: top-K near-ties)
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    return str(path), tok


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_steps_match_trl(tmp_path, model_dir, setting):
    path, tok = model_dir
    trl_logs, trl_weights, trl_calls = _run(tmp_path, False, path, tok, SETTINGS[setting])
    our_logs, our_weights, our_calls = _run(tmp_path, True, path, tok, SETTINGS[setting])
    assert our_calls == trl_calls  # same prompts, same order
    assert len(our_logs) == len(trl_logs) == STEPS
    for step, (ours, theirs) in enumerate(zip(our_logs, trl_logs, strict=True), start=1):
        # Rollout metrics exist on generation steps only (every steps_per_generation-th step) in both.
        for keys, rtol, atol in ((EXACT_METRICS, 0, 0), (CLOSE_METRICS, 1e-6, 1e-7), (LOSS_METRICS, 1e-4, 1e-6)):
            for key in keys:
                assert (key in ours) == (key in theirs), (step, key)
                if key in theirs:
                    msg = f"step {step} {key}"
                    torch.testing.assert_close(ours[key], theirs[key], rtol=rtol, atol=atol, msg=msg)
        assert "self_distillation/reward_mean" in theirs or SETTINGS[setting].get("steps_per_generation")
    for step, (ours, theirs) in enumerate(zip(our_weights, trl_weights, strict=True), start=1):
        for name, value in theirs.items():
            torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=2e-5, msg=f"step {step} {name}")
    if setting != "hybrid_blend":  # distillation moves the weights (not a vacuous comparison)
        assert any(not torch.equal(our_weights[-1][n], trl_weights[0][n]) for n in trl_weights[0])
