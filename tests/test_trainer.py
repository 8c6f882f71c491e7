"""SDPOTrainer: loss vs TRL's formulas, EMA math, checkpoint/resume of the teacher, fused-linear switch."""

import os

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl.experimental.sdpo import loss_utils as trl_loss
from trl.trainer.utils import selective_log_softmax

import sdpo_kernels
from sdpo import SDPOConfig, SDPOTrainer
from sdpo.teacher import EMATeacherCallback, SDPOTeacher, ema_update_
from sdpo.tiny import build_char_tokenizer, build_tiny_model, tiny_run_args
from sdpo.trainer import aggregation_weights, clipped_policy_per_token, distillation_aggregation_weights

from tolerances import assert_close_ulps

TEMPERATURE = 0.9


def length_parity_reward(completions, **kwargs):
    """Deterministic, mixed within groups: successes exist but not everywhere."""
    return [1.0 if len(c) % 2 == 0 else 0.0 for c in completions]


def make_trainer(tmp_path, peft_config=None, **kw):
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=0)
    # Spread the logits: a fresh tiny model is near-uniform, and near-ties in the top-K support would make
    # float32 rounding (whole-sequence vs completion-slice matmuls) pick different supports.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    ds = Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "5+1="]})
    defaults = tiny_run_args(str(tmp_path), max_steps=1, temperature=TEMPERATURE)
    defaults.update(kw)
    return SDPOTrainer(
        model=model,
        reward_funcs=length_parity_reward,
        args=SDPOConfig(**defaults),
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft_config,
    )


def manual_batch(trainer, seed=0):
    """A hand-made batch with padding, a masked row, and rollout log-probs (exercises IS clipping)."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(trainer.processing_class)
    B, P, T, PT = 4, 5, 6, 9
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(3, vocab, (B, T), generator=g)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 2:] = 0
    teacher_prompt = torch.randint(3, vocab, (B, PT), generator=g)
    teacher_prompt_mask = torch.ones(B, PT, dtype=torch.long)
    teacher_prompt_mask[3, :4] = 0
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "teacher_input_ids": torch.cat([teacher_prompt, completion_ids], 1),
        "teacher_attention_mask": torch.cat([teacher_prompt_mask, completion_mask], 1),
        "self_distillation_mask": torch.tensor([1.0, 1.0, 0.0, 1.0]),
        "advantages": torch.tensor([0.7, -1.2, 0.3, 0.2]),
        "old_per_token_logps": -3.0 - torch.rand(B, T, generator=g),
        "num_items_in_batch": completion_mask.sum(),
        "num_distillation_items_in_batch": (completion_mask * torch.tensor([1, 1, 0, 1])[:, None]).sum(),
    }


def completion_logits(model, input_ids, attention_mask, keep):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, -keep - 1 : -1] / TEMPERATURE


def trl_reference_loss(trainer, inputs, hybrid):
    """The loss by TRL 1.16's `loss_utils` formulas on the model's own logits (loss_type='grpo' aggregation)."""
    args = trainer.args
    keep = inputs["completion_ids"].size(1)
    s_in = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    s_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    student = completion_logits(trainer.model, s_in, s_mask, keep)
    with torch.no_grad(), trainer.teacher.forward_context() as teacher:
        teacher_logits = completion_logits(teacher, inputs["teacher_input_ids"], inputs["teacher_attention_mask"], keep)
    ids = inputs["completion_ids"]
    if args.distillation_mode == "topk_logits":
        per_token = trl_loss.compute_topk_self_distillation_loss(
            student,
            teacher_logits,
            distillation_topk=args.distillation_topk,
            distillation_alpha=args.distillation_alpha,
            distillation_add_tail=args.distillation_add_tail,
        )
    elif args.distillation_mode == "full_logits":
        per_token = trl_loss.compute_full_logit_self_distillation_loss(
            student, teacher_logits, distillation_alpha=args.distillation_alpha
        )
    else:
        per_token = trl_loss.compute_sampled_token_self_distillation_loss(
            student, teacher_logits, ids, distillation_alpha=args.distillation_alpha
        )
    logps = selective_log_softmax(student, ids)
    if args.distillation_is_clip is not None:
        per_token = trl_loss.apply_importance_sampling_clipping(
            per_token, logps, inputs["old_per_token_logps"], args.distillation_is_clip
        )
    mask = inputs["completion_mask"].float()
    loss_mask = mask * inputs["self_distillation_mask"][:, None]
    distill = ((per_token * loss_mask).sum(-1) / loss_mask.sum(-1).clamp(min=1.0)).mean()
    loss = args.distillation_weight * distill
    if hybrid:  # TRL GRPO's clipped surrogate, 'grpo' aggregation
        ratio = torch.exp(logps - inputs["old_per_token_logps"])
        adv = inputs["advantages"][:, None]
        clipped = torch.clamp(ratio, 1 - trainer.epsilon_low, 1 + trainer.epsilon_high)
        if args.delta is not None:  # two-sided clipping, after the clipped term took the raw ratio
            ratio = torch.clamp(ratio, max=args.delta)
        policy = -torch.min(ratio * adv, clipped * adv)
        if "importance_sampling_ratio" in inputs:  # vLLM's correction, on the clipped loss only
            policy = policy * inputs["importance_sampling_ratio"]
        policy_loss = ((policy * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        loss = loss + trainer.args.policy_loss_weight * policy_loss  # 1 (legacy hybrid) or 1 - w (TRL 1.16 blend)
    return loss


LOSS_CASES = {
    "topk_tail_jsd_is": dict(
        full_logit_distillation=True, distillation_topk=5, distillation_add_tail=True, distillation_alpha=0.5
    ),
    "topk_renorm_fkl": dict(full_logit_distillation=True, distillation_topk=7, distillation_alpha=0.0),
    "full_rkl": dict(full_logit_distillation=True, distillation_alpha=1.0, distillation_is_clip=None),
    "token_level": dict(),
    "hybrid_topk_weighted": dict(
        full_logit_distillation=True,
        distillation_topk=5,
        distillation_alpha=0.5,
        sdpo_policy_loss_mode="hybrid",
        distillation_weight=0.3,
    ),
    "hybrid_token_none": dict(sdpo_policy_loss_mode="hybrid", teacher_regularization="none"),
    # TRL 1.16's blend: (1 - w)·policy + w·distillation, from distillation_weight alone.
    "blend_topk_trl": dict(full_logit_distillation=True, distillation_topk=5, distillation_weight=0.3),
    "blend_token_policy_only": dict(distillation_weight=0.0),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_and_grad_equal_trl_formula(tmp_path, case):
    kw = LOSS_CASES[case]
    trainer = make_trainer(tmp_path, loss_type="grpo", **kw)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs = manual_batch(trainer)
    # Make the teacher differ from the student so the divergence is not trivially zero.
    with torch.no_grad():
        for p in trainer.teacher.pairs()[0]:
            p.add_(0.05 * torch.randn_like(p))
    loss = trainer._compute_loss(trainer.model, inputs)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    expected = trl_reference_loss(trainer, inputs, hybrid=trainer.args.policy_loss_weight > 0)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    assert expected.abs() > 1e-6
    # float32: the reference takes logits of the whole sequence, the trainer of the completion slice only.
    assert_close_ulps(loss, expected, scale=1.0)
    for g, e in zip(grads, expected_grads):
        if e is None:
            assert g is None or g.abs().max() == 0
        else:
            assert_close_ulps(g, e)


def test_masked_batch_gives_attached_zero_loss(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs = manual_batch(trainer)
    inputs["self_distillation_mask"] = torch.zeros(4)
    inputs["num_distillation_items_in_batch"] = torch.tensor(0)
    loss = trainer._compute_loss(trainer.model, inputs)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_aggregation_weights_match_trl_grpo(loss_type):
    g = torch.Generator().manual_seed(1)
    per_token = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    if loss_type == "grpo":
        expected = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        expected = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        expected = (per_token * mask).sum() / (3 * 7)
    else:
        expected = (per_token * mask).sum() / 20.0
    w = aggregation_weights(mask, loss_type, max_completion_length=7, normalizer=torch.tensor(20.0))
    torch.testing.assert_close((w * per_token).sum(), expected)
    with pytest.raises(ValueError, match="loss_type"):
        aggregation_weights(mask, "cispo")


def test_clipped_policy_matches_formula():
    logps = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.5, -1.0]])
    adv = torch.tensor([1.0])
    out = clipped_policy_per_token(logps, old, adv, torch.ones(1, 2), epsilon_low=0.2, epsilon_high=0.28)
    r = torch.exp(logps - old)
    torch.testing.assert_close(out, -torch.min(r, torch.clamp(r, 0.8, 1.28)))


def test_ema_update_math():
    torch.manual_seed(0)
    student = torch.nn.Linear(4, 3).double()
    teacher = SDPOTeacher(student, "ema", rate=0.25)
    t0 = [p.detach().clone() for p in teacher.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(t0, student.parameters()))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update()
    for t, t_old, s in zip(teacher.model.parameters(), t0, student.parameters()):
        torch.testing.assert_close(t, 0.75 * t_old + 0.25 * s, rtol=0, atol=1e-15)
        assert not t.requires_grad
    # the primitive itself
    a, b = [torch.ones(2)], [torch.zeros(2)]
    ema_update_(a, b, 0.1)
    torch.testing.assert_close(a[0], torch.full((2,), 0.9))
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.ones(2)], [torch.ones(3)], 0.1)


@pytest.mark.parametrize("chunk", [None, 999])
def test_bf16_ema_nearest_freezes_stochastic_tracks_float32(monkeypatch, chunk):
    """rate·|s − t| below half a bf16 ulp: nearest rounding never moves the teacher, stochastic rounding
    follows the float32 EMA in expectation (mean over 20000 elements), also in bounded work slices."""
    if chunk is not None:
        monkeypatch.setattr("sdpo.teacher._ROUNDING_CHUNK", chunk)
    n, rate, steps = 20000, 0.05, 20
    student = [torch.full((n,), 1.01)]
    expected = 1.01 - 0.01 * (1 - rate) ** steps  # float32 EMA from 1.0 towards 1.01
    nearest = [torch.ones(n, dtype=torch.bfloat16)]
    stochastic = [torch.ones(n, dtype=torch.bfloat16)]
    for step in range(steps):
        ema_update_(nearest, student, rate)
        ema_update_(stochastic, student, rate, seeds=[step])
    assert torch.equal(nearest[0], torch.ones(n, dtype=torch.bfloat16))
    mean = stochastic[0].double().mean().item()
    assert abs(mean - expected) < 3e-4, (mean, expected)  # ± ~4 standard errors of the mean
    assert set(stochastic[0].float().unique().tolist()) <= {1.0, 1.0078125, 1.015625}  # bf16 neighbours only
    # negative values and a zero mix: unbiased too
    neg = [torch.full((n,), -1.0, dtype=torch.bfloat16)]
    ema_update_(neg, [torch.full((n,), -1.03)], 0.1, seeds=[1])
    assert abs(neg[0].double().mean().item() - (-1.003)) < 2e-4


def test_bf16_ema_on_a_strided_teacher_rounds_stochastically():
    teacher = [torch.ones(200, 100, dtype=torch.bfloat16).t()]  # non-contiguous view
    for step in range(20):
        ema_update_(teacher, [torch.full((100, 200), 1.01)], 0.05, seeds=[step])
    assert abs(teacher[0].double().mean().item() - (1.01 - 0.01 * 0.95**20)) < 3e-4


def test_stochastic_rounding_edge_values():
    from sdpo.teacher import stochastic_round_to_bf16

    gen = torch.Generator().manual_seed(0)
    bits = torch.tensor([0x7FFFFFFF, -1, 0x7F800001, 0x7FC00000], dtype=torch.int32)  # NaNs with payloads
    specials = torch.cat([bits.view(torch.float32), torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])])
    for _ in range(20):
        out = stochastic_round_to_bf16(specials, gen).float()
        assert out[:4].isnan().all()
        assert out[4:].tolist() == [float("inf"), -float("inf"), 0.0, -0.0]
    # a carry into the exponent: just below 1 rounds to its bf16 neighbours 0.99609375 or 1.0 only
    x = torch.full((4096,), 0.99999994)
    assert set(stochastic_round_to_bf16(x, gen).float().unique().tolist()) <= {0.99609375, 1.0}


def test_stochastic_ema_is_seeded_and_resumes_exactly(tmp_path):
    def make(seed=0):
        torch.manual_seed(0)
        student = torch.nn.Linear(64, 64).to(torch.bfloat16)
        return student, SDPOTeacher(student, "ema", rate=0.05, seed=seed)

    runs = []
    for seed in (0, 0, 1):
        student, teacher = make(seed)
        with torch.no_grad():
            student.weight.add_(0.01)
        for _ in range(3):
            teacher.update()
        runs.append(teacher.model.weight.detach().clone())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])

    # save after 1 update, restore into a fresh teacher, do 2 more: same as 3 uninterrupted updates
    student, teacher = make()
    with torch.no_grad():
        student.weight.add_(0.01)
    teacher.update()
    teacher.save(str(tmp_path))
    student2, resumed = make()
    with torch.no_grad():
        student2.weight.add_(0.01)
    assert resumed.load(str(tmp_path))
    resumed.update()
    resumed.update()
    assert torch.equal(resumed.model.weight, runs[0])
    with pytest.raises(ValueError, match="rounding"):
        SDPOTeacher(student, "ema", rate=0.5, rounding="up")


def test_ema_callback_updates_every_sync_steps():
    from types import SimpleNamespace

    student = torch.nn.Linear(2, 2).double()
    teacher = SDPOTeacher(student, "ema", rate=0.5)
    callback = EMATeacherCallback(teacher, sync_steps=3)
    with torch.no_grad():
        student.weight.add_(1.0)
    before = teacher.model.weight.detach().clone()
    for step in (1, 2):
        callback.on_step_end(None, SimpleNamespace(global_step=step), None, model=student)
        assert torch.equal(teacher.model.weight, before)
    callback.on_step_end(None, SimpleNamespace(global_step=3), None, model=student)
    torch.testing.assert_close(teacher.model.weight, before + 0.5, rtol=0, atol=1e-15)


def test_teacher_none_is_the_student():
    student = torch.nn.Linear(2, 2)
    teacher = SDPOTeacher(student, "none", rate=0.5)
    assert teacher.model is student
    teacher.update()  # no-op
    with pytest.raises(ValueError, match="kind"):
        SDPOTeacher(student, "initial", rate=0.5)


def test_base_teacher_is_the_frozen_initial_student(tmp_path):
    """teacher_regularization='base' (TRL's teacher_model_kind='base'): a copy of the initial student that no
    update moves, and that no checkpoint carries (a resumed run builds it from the initial model again)."""
    trainer = make_trainer(tmp_path, teacher_model_kind="base", teacher_update_rate=0.5)
    teacher = trainer.teacher
    assert teacher.kind == "base" and teacher.model is not trainer.model and not teacher.checkpointed
    initial = teacher.state_dict()
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    for callback in trainer.callback_handler.callbacks:  # the EMA callback runs, and leaves it alone
        if isinstance(callback, EMATeacherCallback):
            callback.on_step_end(trainer.args, trainer.state, trainer.control, model=trainer.model)
    assert all(torch.equal(initial[k], v) for k, v in teacher.state_dict().items())
    teacher.save(str(tmp_path))
    assert not (tmp_path / "sdpo_teacher.pt").exists() and not teacher.load(str(tmp_path))


def test_base_teacher_under_peft_disables_the_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = make_trainer(tmp_path, teacher_regularization="base", peft_config=config)
    teacher = trainer.teacher
    assert teacher.base_adapters_off and teacher.model is trainer.model and not teacher.checkpointed
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        adapted = trainer.model(input_ids=ids).logits
        base = trainer.model.get_base_model()
        with teacher.forward_context() as t:
            via_teacher = t(input_ids=ids).logits
        with trainer.model.disable_adapter():
            expected = base(input_ids=ids).logits
    torch.testing.assert_close(via_teacher, expected, rtol=0, atol=0)
    assert not torch.allclose(adapted, expected)  # the adapters do change the outputs
    assert trainer.model(input_ids=ids).logits.equal(adapted)  # and are back on after the teacher forward


def test_fused_linear_switch(tmp_path, monkeypatch):
    # Without the kernel, "always" is a clear error and "auto" falls back to the logits path.
    monkeypatch.delattr(sdpo_kernels, "linear_self_distillation_loss", raising=False)
    with pytest.raises(ValueError, match="distillation_fused_linear"):
        make_trainer(tmp_path, distillation_fused_linear="always")
    assert not make_trainer(tmp_path).use_fused_linear


def test_auto_uses_fused_linear_for_a_plain_linear_head(tmp_path):
    trainer = make_trainer(tmp_path)
    assert trainer.use_fused_linear and trainer._fused_linear_reason is None


@pytest.mark.parametrize("fused", ["always", "never"])
def test_bf16_autocast_with_fp32_weights(tmp_path, fused):
    # The teacher forward runs under the same autocast as the student: both give bf16 logits.
    trainer = make_trainer(
        tmp_path, bf16=True, distillation_fused_linear=fused, full_logit_distillation=True, distillation_topk=5
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, manual_batch(trainer))
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("teacher_rows", ["some", "none"])
@pytest.mark.parametrize("rollout_logps", ["old_per_token_logps", "sampling_per_token_logps"])
def test_fused_linear_path_equals_logits_path(tmp_path, rollout_logps, teacher_rows):
    kw = dict(
        full_logit_distillation=True,
        distillation_topk=5,
        distillation_add_tail=True,
        distillation_alpha=0.5,
        sdpo_policy_loss_mode="hybrid",
        distillation_weight=0.5,
        loss_type="dapo",
    )
    losses, grads = [], []
    for choice in ("always", "never"):
        trainer = make_trainer(tmp_path, distillation_fused_linear=choice, **kw)
        assert trainer.use_fused_linear == (choice == "always")
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        with torch.no_grad():
            torch.manual_seed(3)
            for p in trainer.teacher.pairs()[0]:
                p.add_(0.05 * torch.randn_like(p))
        batch = manual_batch(trainer)
        # vLLM rollouts may carry only sampling log-probs: IS clipping uses them, the policy ratio is 1.
        batch[rollout_logps] = batch.pop("old_per_token_logps")
        if teacher_rows == "none":  # hybrid still learns from the policy term, on the fused path too
            batch["self_distillation_mask"] = torch.zeros(4)
            batch["num_distillation_items_in_batch"] = torch.tensor(0)
        loss = trainer._compute_loss(trainer.model, batch)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [p for p in trainer.model.parameters() if p.requires_grad]))
    assert_close_ulps(losses[0], losses[1], scale=1.0)
    for a, b in zip(*grads):
        assert_close_ulps(a, b)


@pytest.mark.parametrize("ratio_shape", ["token", "sequence", "token+delta"])
def test_vllm_is_correction_stays_on_the_fused_path(tmp_path, ratio_shape):
    """TRL scales the hybrid policy loss per token by vLLM's IS ratio ([B, T] token modes, [B, 1] sequence
    modes): the fused path folds it into the policy weights and must equal the logits path."""
    kw = dict(
        full_logit_distillation=True,
        distillation_topk=5,
        distillation_alpha=0.5,
        sdpo_policy_loss_mode="hybrid",
        distillation_weight=0.5,
        loss_type="grpo",
    )
    if ratio_shape.endswith("+delta"):  # two-sided clipping too (manual_batch's ratios are far from 1)
        kw["delta"] = 1.5
    g = torch.Generator().manual_seed(7)
    ratio = 0.5 + torch.rand(4, 1 if ratio_shape == "sequence" else 6, generator=g)
    losses, grads, metrics = [], [], []
    for choice in ("always", "never"):
        trainer = make_trainer(tmp_path, distillation_fused_linear=choice, **kw)
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True  # as after a vLLM rollout
        assert trainer._why_not_fused_linear() is None
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        batch = manual_batch(trainer)
        batch["importance_sampling_ratio"] = ratio
        if "delta" in kw:  # ratios far above delta in rows 0 (A > 0) and 1 (A < 0): the cap decides row 1
            batch["old_per_token_logps"][:2] = -40.0
        loss = trainer._compute_loss(trainer.model, batch)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [p for p in trainer.model.parameters() if p.requires_grad]))
        metrics.append(trainer._metrics["train"]["self_distillation/policy_loss"][-1])
    assert_close_ulps(losses[0], losses[1], scale=1.0)
    for a, b in zip(*grads):
        assert_close_ulps(a, b)
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-4, abs=1e-7)
    # and both are TRL's GRPO formula (IS ratio on the clipped term, delta) + the distillation term
    expected = trl_reference_loss(trainer, batch, hybrid=True)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    assert_close_ulps(losses[1], expected, scale=1.0)
    for a, b in zip(grads[0], torch.autograd.grad(expected, params)):
        assert_close_ulps(a, b)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_policy_loss_metric_does_not_depend_on_accumulation(tmp_path, loss_type):
    """TRL logs `self_distillation/policy_loss` before dividing by the accumulation steps (grpo), or with its
    window normaliser (dapo, whose value is the same for any steps count here)."""
    logged = []
    for ga in (1, 4):
        trainer = make_trainer(
            tmp_path,
            sdpo_policy_loss_mode="hybrid",
            loss_type=loss_type,
            steps_per_generation=ga,
            gradient_accumulation_steps=ga,
        )
        trainer.current_gradient_accumulation_steps = ga
        trainer.model.train()
        trainer._compute_loss(trainer.model, manual_batch(trainer))
        logged.append(trainer._metrics["train"]["self_distillation/policy_loss"][-1])
    assert logged[0] != 0 and logged[0] == pytest.approx(logged[1], rel=1e-5)


def test_checkpoint_saves_and_resume_restores_teacher_bit_exactly(tmp_path):
    from transformers import TrainerCallback

    snapshots = {}

    class Snap(TrainerCallback):
        def __init__(self):
            self.trainer = None

        def on_save(self, args, state, control, **kw):
            snapshots[state.global_step] = self.trainer.teacher.state_dict()

    kw = dict(max_steps=2, save_strategy="steps", save_steps=1, learning_rate=5e-2, teacher_update_rate=0.5)
    trainer = make_trainer(tmp_path, **kw)
    initial = trainer.teacher.state_dict()
    snap = Snap()
    snap.trainer = trainer
    trainer.add_callback(snap)
    trainer.train()
    assert set(snapshots) == {1, 2}
    ckpt = os.path.join(str(tmp_path), "checkpoint-1")
    assert os.path.isfile(os.path.join(ckpt, "sdpo_teacher.pt"))
    # the EMA teacher moved away from the initial weights (so restoring it is observable)
    assert any(not torch.equal(initial[k], snapshots[1][k]) for k in initial)

    # Resume from checkpoint-1: capture the teacher right before the first resumed step runs.
    resumed = make_trainer(tmp_path, **kw)
    assert all(torch.equal(initial[k], v) for k, v in resumed.teacher.state_dict().items())
    at_resume = {}

    class First(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            at_resume.setdefault("teacher", resumed.teacher.state_dict())

    resumed.add_callback(First())
    resumed.train(resume_from_checkpoint=ckpt)
    restored = at_resume["teacher"]
    assert all(torch.equal(snapshots[1][k], restored[k]) for k in restored)


# ---- behaviours checked by TRL 1.16's own SDPO test file ------------------------------------------------------
FLAT_MSG = "Observed flat SDPO rewards across all sampled generations"


@pytest.mark.parametrize(
    ("rewards", "warns"),
    [
        ([0.0, 0.0, 0.0, 0.0], True),  # flat everywhere
        ([1.0, 1.0, 0.0, 0.0], False),  # flat within each group, but the groups differ: TRL does not warn
        ([1.0, 0.0, 1.0, 1.0], False),
    ],
)
def test_flat_reward_warning_follows_trl(tmp_path, caplog, rewards, warns):
    trainer = make_trainer(tmp_path, num_generations=2, diagnostics_warning_interval=1)
    trainer._last_rewards_per_func = torch.tensor(rewards).unsqueeze(1)
    with caplog.at_level("WARNING", logger="sdpo.trainer"):
        trainer._record_reward_diagnostics("train", torch.tensor(rewards), 2)
    assert (FLAT_MSG in caplog.text) == warns
    m = trainer._metrics["train"]
    expected_std = torch.tensor(rewards).view(2, 2).std(dim=1).mean().item()
    assert m["self_distillation/group_reward_std_mean"] == [pytest.approx(expected_std)]
    assert m["self_distillation/rewards/length_parity_reward"] == [pytest.approx(sum(rewards) / 4)]


def test_diagnostics_interval_zero_is_silent(tmp_path, caplog):
    trainer = make_trainer(tmp_path, num_generations=2, diagnostics_warning_interval=0)
    trainer._last_rewards_per_func = torch.zeros(4, 1)
    with caplog.at_level("WARNING", logger="sdpo.trainer"):
        trainer._record_reward_diagnostics("train", torch.zeros(4), 2)
    assert FLAT_MSG not in caplog.text


def test_batch_without_self_distillation_mask_distills_every_row(tmp_path):
    trainer = make_trainer(tmp_path, loss_type="grpo")
    trainer.model.train()
    inputs = manual_batch(trainer)
    inputs["self_distillation_mask"] = torch.ones(4)
    expected = trainer._compute_loss(trainer.model, inputs)
    del inputs["self_distillation_mask"]
    torch.testing.assert_close(trainer._compute_loss(trainer.model, inputs), expected)


def test_single_generation_trains_on_environment_feedback(tmp_path):
    """num_generations=1 (GRPO rejects it): no siblings, the feedback alone makes the teacher."""
    trainer = make_trainer(
        tmp_path,
        num_generations=1,
        per_device_train_batch_size=2,
        include_environment_feedback=True,
        logging_steps=1,
    )
    trainer.train_dataset = Dataset.from_dict({"prompt": ["1+1=", "2+3="], "privileged_context": ["2", "5"]})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and logs[0]["self_distillation/feedback_used_fraction"] == 1.0
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_positional_arguments_and_eval_dataset_forms(tmp_path):
    tok = build_char_tokenizer()
    ds = Dataset.from_dict({"prompt": ["1+1=", "2+3="]})
    args = SDPOConfig(**tiny_run_args(str(tmp_path), per_device_train_batch_size=2, num_generations=2))
    for eval_dataset in (None, ds, {"a": ds, "b": ds}):
        trainer = SDPOTrainer(build_tiny_model(tok), length_parity_reward, args, ds, eval_dataset, tok)
        assert trainer.args is args
        if isinstance(eval_dataset, dict):
            assert set(trainer.eval_dataset) == {"a", "b"}
        else:
            assert trainer.eval_dataset is eval_dataset


def test_evaluation_groups_teachers_by_num_generations_eval(tmp_path):
    """Eval rollouts are grouped by num_generations_eval (2 here, training uses 3)."""
    texts = []

    class Capture(TrainerCallback):
        def on_teacher_context_built(self, args, state, control, processing_class=None, teacher_input_ids=None, **kw):
            texts.extend(processing_class.batch_decode(teacher_input_ids, skip_special_tokens=True))

    def reward(prompts, **kw):  # only the first rollout of the "a" prompt succeeds
        first_a = next(i for i, p in enumerate(prompts) if p.startswith("a"))
        return [1.0 if i == first_a else 0.0 for i in range(len(prompts))]

    tok = build_char_tokenizer()
    ds = Dataset.from_dict({"prompt": ["a1+1=", "b2+2="]})
    args = tiny_run_args(
        str(tmp_path),
        per_device_train_batch_size=3,
        num_generations=3,
        per_device_eval_batch_size=4,
        num_generations_eval=2,
        success_reward_threshold=0.5,
        dont_reprompt_on_self_success=False,
        shuffle_dataset=False,
    )
    trainer = SDPOTrainer(build_tiny_model(tok), reward, SDPOConfig(**args), ds, ds, tok, callbacks=[Capture()])
    trainer.evaluate()
    a_teachers = [t for t in texts if t.startswith("a1")]
    b_teachers = [t for t in texts if t.startswith("b2")]
    assert len(a_teachers) == 2 and len(b_teachers) == 2
    assert all("orrect solution:" in t for t in a_teachers)  # the char tokenizer has no capital letters
    assert all("orrect solution:" not in t for t in b_teachers)


def test_trust_remote_code_is_required_for_custom_model_code(tmp_path):
    """A local model directory with its own modeling code loads only with `trust_remote_code=True`."""
    import json

    from transformers import LlamaConfig

    tok = build_char_tokenizer()
    path = tmp_path / "remote"
    build_tiny_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "configuration_remote.py").write_text(
        "from transformers import LlamaConfig\nclass RemoteConfig(LlamaConfig):\n    model_type = 'remote'\n"
    )
    (path / "modeling_remote.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_remote import RemoteConfig\n"
        "class RemoteForCausalLM(LlamaForCausalLM):\n    config_class = RemoteConfig\n"
    )
    config = LlamaConfig.from_pretrained(path).to_dict()
    config.update(
        model_type="remote",
        architectures=["RemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_remote.RemoteConfig",
            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
        },
    )
    (path / "config.json").write_text(json.dumps(config))
    ds = Dataset.from_dict({"prompt": ["1+1=", "2+3="]})
    kw = tiny_run_args(str(tmp_path / "out"), per_device_train_batch_size=2, num_generations=2)
    with pytest.raises(ValueError, match="custom code"):
        SDPOTrainer(str(path), length_parity_reward, SDPOConfig(**kw), ds, processing_class=tok)
    trainer = SDPOTrainer(
        str(path), length_parity_reward, SDPOConfig(trust_remote_code=True, **kw), ds, processing_class=tok
    )
    assert type(trainer.model).__name__ == "RemoteForCausalLM"


def verl_agg_loss(loss_mat, loss_mask, mode, response_length):
    """The official SDPO aggregation (verl `agg_loss` as `compute_self_distillation_loss` calls it), rewritten."""
    if mode == "token-mean":
        return (loss_mat * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
    seq_tokens = loss_mask.sum(-1)
    nonempty = (seq_tokens > 0).float()
    if mode == "seq-mean-token-sum":
        return ((loss_mat * loss_mask).sum(-1) * nonempty).sum() / nonempty.sum()
    if mode == "seq-mean-token-mean":
        return ((loss_mat * loss_mask).sum(-1) / (seq_tokens + 1e-8) * nonempty).sum() / nonempty.sum()
    assert mode == "seq-mean-token-sum-norm"
    return (loss_mat * loss_mask).sum() / response_length


@pytest.mark.parametrize(
    "mode", ["trl", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_distillation_aggregations(mode):
    g = torch.Generator().manual_seed(3)
    per_token = torch.randn(4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    w = distillation_aggregation_weights(mask, mode, max_completion_length=7)
    if mode == "trl":  # TRL 1.16: per-sequence mean over all rows, the empty row counting 0
        expected = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:
        expected = verl_agg_loss(per_token, mask, mode, 7)
    torch.testing.assert_close((w * per_token).sum(), expected)
    with pytest.raises(ValueError, match="aggregation"):
        distillation_aggregation_weights(mask, "seq-mean")


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum-norm", "loss_type"])
def test_distillation_aggregation_option_reaches_the_loss(tmp_path, aggregation):
    """Pure distillation: the loss equals Σ per-token TRL loss × the aggregation's weights."""
    trainer = make_trainer(tmp_path, loss_type="bnpo", distillation_aggregation=aggregation, distillation_is_clip=None)
    trainer.model.train()
    inputs = manual_batch(trainer)
    loss = trainer._compute_loss(trainer.model, inputs)
    dist_mask = inputs["completion_mask"].float() * inputs["self_distillation_mask"][:, None]
    trl_default = make_trainer(tmp_path, distillation_is_clip=None)
    trl_default.model.load_state_dict(trainer.model.state_dict())
    trl_default.model.train()
    if aggregation == "loss_type":
        expected_w = dist_mask / dist_mask.sum()  # bnpo
    else:
        expected_w = distillation_aggregation_weights(dist_mask, aggregation, max_completion_length=6)
    # Every mode weighs the tokens of a row alike, so loss = Σ_r (Σ_t w_rt) · (token mean of row r); a one-row
    # batch under the TRL default gives that token mean.
    expected = 0.0
    for r in range(4):
        if dist_mask[r].sum() > 0:
            row = {k: (v[r : r + 1] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in inputs.items()}
            expected = expected + trl_default._compute_loss(trl_default.model, row) * expected_w[r].sum()
    assert_close_ulps(loss, expected, scale=1.0)


@pytest.mark.parametrize("fused", ["always", "never"])
def test_topk_at_least_vocab_is_clamped_with_one_warning(tmp_path, fused):
    """K >= V (the official SDPO clamps too): the loss equals full-vocabulary top-K with K = V."""
    vocab = len(build_char_tokenizer())
    kw = dict(full_logit_distillation=True, distillation_alpha=0.5, distillation_fused_linear=fused, loss_type="grpo")
    with pytest.warns(UserWarning, match="clamped") as record:
        big = make_trainer(tmp_path, distillation_topk=vocab + 50, **kw)
    assert sum("clamped" in str(w.message) for w in record) == 1 and big.distillation_topk == vocab
    exact = make_trainer(tmp_path, distillation_topk=vocab, **kw)
    for t in (big, exact):
        t.model.train()
    inputs = manual_batch(big)
    torch.testing.assert_close(
        big._compute_loss(big.model, inputs), exact._compute_loss(exact.model, inputs), rtol=0, atol=0
    )


def test_trust_region_teacher_mixes_reference_and_student_logits(tmp_path):
    """teacher_regularization='trust_region' (official SDPO): teacher logits = lerp(initial, current, rate)."""
    rate = 0.3
    kw = dict(full_logit_distillation=True, distillation_alpha=0.5, distillation_is_clip=None, loss_type="grpo")
    trainer = make_trainer(tmp_path, teacher_regularization="trust_region", teacher_update_rate=rate, **kw)
    assert trainer.teacher.kind == "trust_region" and trainer.teacher.checkpointed and not trainer.use_fused_linear
    with torch.no_grad():  # the student moves away from the reference
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.model.train()
    inputs = manual_batch(trainer)
    loss = trainer._compute_loss(trainer.model, inputs)
    keep = inputs["completion_ids"].size(1)
    s_in = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    s_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    student = completion_logits(trainer.model, s_in, s_mask, keep)
    with torch.no_grad():
        t_in, t_mask = inputs["teacher_input_ids"], inputs["teacher_attention_mask"]
        reference = completion_logits(trainer.teacher.model, t_in, t_mask, keep)
        current = completion_logits(trainer.model, t_in, t_mask, keep)
    per_token = trl_loss.compute_full_logit_self_distillation_loss(
        student, torch.lerp(reference, current, rate), distillation_alpha=0.5
    )
    loss_mask = inputs["completion_mask"].float() * inputs["self_distillation_mask"][:, None]
    expected = ((per_token * loss_mask).sum(-1) / loss_mask.sum(-1).clamp(min=1.0)).mean()
    assert_close_ulps(loss, expected, scale=1.0)


def test_trust_region_reference_is_frozen_checkpointed_and_restored(tmp_path):
    kw = dict(
        teacher_regularization="trust_region",
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        learning_rate=5e-2,
    )
    trainer = make_trainer(tmp_path, **kw)
    initial = trainer.teacher.state_dict()
    trainer.train()
    assert all(torch.equal(initial[k], v) for k, v in trainer.teacher.state_dict().items())  # never updated
    ckpt = os.path.join(str(tmp_path), "checkpoint-1")
    assert os.path.isfile(os.path.join(ckpt, "sdpo_teacher.pt"))
    resumed = make_trainer(tmp_path, **kw)
    with torch.no_grad():  # a different reference before resuming: the checkpoint's must come back
        for p in resumed.teacher.model.parameters():
            p.add_(1.0)
    seen = {}

    class First(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen.setdefault("teacher", resumed.teacher.state_dict())

    resumed.add_callback(First())
    resumed.train(resume_from_checkpoint=ckpt)
    assert all(torch.equal(initial[k], v) for k, v in seen["teacher"].items())


@pytest.mark.parametrize("fused", ["always", "never"])
def test_rollout_is_weights_scale_the_distillation_term(tmp_path, fused):
    """distillation_rollout_is: per-token distillation losses × GRPO's vLLM IS ratio ([B, 1] or [B, T])."""
    trainer = make_trainer(tmp_path, full_logit_distillation=True, distillation_fused_linear=fused)
    trainer.model.train()
    inputs = manual_batch(trainer)
    plain = trainer._compute_loss(trainer.model, inputs)
    trainer.args.distillation_rollout_is = True  # (the config accepts it under vLLM only)
    torch.testing.assert_close(trainer._compute_loss(trainer.model, inputs), plain)  # no ratio in the batch
    inputs["importance_sampling_ratio"] = torch.full((4, 1), 0.5)
    torch.testing.assert_close(trainer._compute_loss(trainer.model, inputs), 0.5 * plain)
    ratio = torch.ones(4, 6)
    ratio[0] = 0.0  # drop row 0 by its ratio ...
    inputs["importance_sampling_ratio"] = ratio
    with_ratio = trainer._compute_loss(trainer.model, inputs)
    inputs["self_distillation_mask"] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # ... = drop it by the mask ('trl' / B)
    trainer.args.distillation_rollout_is = False
    assert_close_ulps(with_ratio, trainer._compute_loss(trainer.model, inputs), scale=1.0)
