"""SDPOConfig: documented defaults, loss-mode mapping, and every validation error."""

import warnings

import pytest
from trl import GRPOConfig

from sdpo import SDPOConfig


def make(**kw):
    return SDPOConfig(output_dir="unused", bf16=False, use_cpu=True, report_to="none", **kw)


def test_subclasses_grpo_config():
    assert issubclass(SDPOConfig, GRPOConfig)


def test_documented_defaults():
    c = make()
    expected = dict(
        distillation_alpha=1.0,
        distillation_topk=None,
        full_logit_distillation=False,
        distillation_is_clip=2.0,
        distillation_add_tail=False,
        distillation_weight=1.0,
        diagnostics_warning_interval=10,
        diagnostics_flat_tolerance=1e-8,
        dont_reprompt_on_self_success=True,
        sdpo_policy_loss_mode=None,  # TRL 1.16: distillation_weight blends (1 - w)·policy + w·distillation
        distillation_aggregation="trl",
        use_teacher_server=False,
        teacher_regularization="ema",
        teacher_update_rate=None,
        ema_update_rate=0.05,
        max_reprompt_len=10240,
        use_successful_as_teacher=True,
        success_reward_threshold=1.0,
        reprompt_template="{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n",
        solution_template="\nCorrect solution:\n\n{successful_previous_attempt}\n\n",
        feedback_template="\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n",
        include_environment_feedback=False,
        environment_feedback_only_without_solution=False,
        remove_thinking_from_demonstration=False,
        distillation_fused_linear="auto",
    )
    for name, value in expected.items():
        assert getattr(c, name) == value, name
    assert c.effective_teacher_update_rate == 0.05
    assert (c.policy_loss_weight, c.distillation_loss_weight) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("kw", "mode"),
    [
        (dict(), "sampled_token"),
        (dict(full_logit_distillation=True), "full_logits"),
        (dict(full_logit_distillation=True, distillation_topk=20, distillation_alpha=0.5), "topk_logits"),
    ],
)
def test_mode_mapping(kw, mode):
    assert make(**kw).distillation_mode == mode


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(distillation_topk=10), "distillation_topk"),
        (dict(distillation_alpha=0.5), "distillation_alpha=1.0"),
        (dict(full_logit_distillation=True, distillation_topk=0), "distillation_topk"),
        (dict(full_logit_distillation=True, distillation_alpha=1.5), "distillation_alpha"),
        (dict(sdpo_policy_loss_mode="grpo_only"), "sdpo_policy_loss_mode"),
        (dict(teacher_regularization="initial"), "teacher_regularization"),
        (dict(distillation_fused_linear="sometimes"), "distillation_fused_linear"),
        (dict(distillation_is_clip=0.0), "distillation_is_clip"),
        (dict(distillation_weight=-1.0), "distillation_weight"),
        (dict(max_reprompt_len=0), "max_reprompt_len"),
        (dict(diagnostics_warning_interval=-1), "diagnostics_warning_interval"),
        (dict(teacher_update_rate=1.5), "teacher_update_rate"),
        (dict(teacher_update_rate=0.1, ema_update_rate=0.2), "ema_update_rate"),
        (dict(loss_type="cispo"), "loss_type"),
    ],
)
def test_validation_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_ema_update_rate_is_a_deprecated_alias():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = make(ema_update_rate=0.2)
    assert c.effective_teacher_update_rate == 0.2
    assert any(issubclass(w.category, FutureWarning) and "ema_update_rate" in str(w.message) for w in caught)
    assert make(teacher_update_rate=0.3).effective_teacher_update_rate == 0.3
    # Same value in both is accepted.
    assert make(teacher_update_rate=0.2, ema_update_rate=0.2).effective_teacher_update_rate == 0.2


def test_grpo_options_still_validated():
    with pytest.raises(ValueError):
        make(per_device_train_batch_size=3, num_generations=2)  # 3 not divisible by 2


@pytest.mark.parametrize(
    "trl_kw, expected",
    [
        (dict(distillation_mode="sampled_token"), dict(full_logit_distillation=False)),
        (dict(distillation_mode="full_logits", distillation_alpha=0.5), dict(full_logit_distillation=True)),
        (
            dict(distillation_mode="topk_logits", distillation_topk=20, distillation_alpha=0.5),
            dict(full_logit_distillation=True, distillation_topk=20),
        ),
        (dict(teacher_model_kind="live"), dict(teacher_regularization="none")),
        (dict(teacher_model_kind="ema"), dict(teacher_regularization="ema")),
        (dict(teacher_model_kind="base"), dict(teacher_regularization="base")),
        (dict(teacher_sync_steps=4), dict(teacher_sync_steps=4)),
    ],
)
def test_trl_116_spellings_are_accepted(trl_kw, expected):
    c = make(**trl_kw)
    for key, value in expected.items():
        assert getattr(c, key) == value
    assert c.distillation_mode == trl_kw.get("distillation_mode", "sampled_token")


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(distillation_mode="topk"), "distillation_mode"),
        (dict(distillation_mode="topk_logits"), "distillation_topk"),
        (dict(distillation_mode="full_logits", distillation_topk=5), "distillation_topk"),
        (dict(distillation_mode="sampled_token", full_logit_distillation=True), "full_logit_distillation"),
        (dict(teacher_model_kind="frozen"), "teacher_model_kind"),
        (dict(teacher_model_kind="base", teacher_regularization="none"), "teacher_regularization"),
        (dict(teacher_model_kind="ema", teacher_regularization="none"), "teacher_regularization"),
        (dict(teacher_sync_steps=0), "teacher_sync_steps"),
    ],
)
def test_trl_116_spellings_are_validated(kw, name):
    with pytest.raises(ValueError, match=name):
        make(**kw)


def test_resolved_mode_round_trips():
    c = make(full_logit_distillation=True, distillation_topk=7, distillation_alpha=0.5)
    assert c.distillation_mode == "topk_logits"
    again = make(
        full_logit_distillation=c.full_logit_distillation,
        distillation_topk=c.distillation_topk,
        distillation_alpha=0.5,
        distillation_mode=c.distillation_mode,
    )
    assert again.distillation_mode == "topk_logits"


def test_single_generation_is_accepted():
    """TRL 1.16's SDPO accepts num_generations=1 (environment feedback needs no siblings); GRPO does not."""
    c = make(num_generations=1, per_device_train_batch_size=1)
    assert c.num_generations == 1 and type(c.num_generations) is int
    with pytest.raises(ValueError, match="at least 2 generations"):
        GRPOConfig(output_dir="unused", bf16=False, use_cpu=True, num_generations=1, per_device_train_batch_size=1)


def test_vllm_defaults_match_trl():
    c = make()
    assert c.vllm_mode == "colocate" and c.vllm_model_impl == "vllm" and c.use_teacher_server is False


def test_distillation_weight_is_trl_116s_convex_blend():
    assert (
        make(distillation_weight=0.25).policy_loss_weight,
        make(distillation_weight=0.25).distillation_loss_weight,
    ) == (
        0.75,
        0.25,
    )
    assert make(distillation_weight=0.0).policy_loss_weight == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make(distillation_weight=1.5)
    # The explicit legacy modes keep their meaning: w·SD, or policy + w·SD (w may exceed 1).
    assert make(sdpo_policy_loss_mode="distillation_only", distillation_weight=0.5).policy_loss_weight == 0.0
    hybrid = make(sdpo_policy_loss_mode="hybrid", distillation_weight=2.0)
    assert (hybrid.policy_loss_weight, hybrid.distillation_loss_weight) == (1.0, 2.0)


def test_defaults_warn_nothing_and_differences_from_trl_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (transformers' own FutureWarnings are not ours)
        make()
        make(distillation_weight=0.5)
    for kw, match in [
        (dict(distillation_aggregation="token-mean"), "distillation_aggregation"),
        (dict(distillation_weight=0.5, beta=0.1), "beta"),
        (dict(scale_rewards="none"), "scale_rewards"),
        (dict(distillation_weight=0.5, steps_per_generation=2, per_device_train_batch_size=8), "dapo"),
    ]:
        with pytest.warns(UserWarning, match=match):
            make(**kw)


def test_official_defaults_match_the_official_recipe():
    """Values of lasgroup/SDPO's sdpo.yaml / actor.yaml `self_distillation` (read from the repository)."""
    c = SDPOConfig.official_defaults(output_dir="unused", bf16=False, use_cpu=True, report_to="none")
    assert c.distillation_mode == "topk_logits" and c.distillation_topk == 100 and c.distillation_add_tail
    assert c.distillation_alpha == 0.5 and c.distillation_is_clip == 2.0
    assert c.distillation_aggregation == "token-mean" and c.policy_loss_weight == 0.0
    assert c.success_reward_threshold == 0.5 and c.dont_reprompt_on_self_success
    assert c.include_environment_feedback and c.environment_feedback_only_without_solution
    assert c.remove_thinking_from_demonstration
    assert c.teacher_regularization == "ema" and c.effective_teacher_update_rate == 0.05
    assert c.max_reprompt_len == 10240 and c.num_generations == 8 and c.learning_rate == 1e-5
    assert c.solution_template.format(successful_previous_attempt="x") == "\nCorrect solution:\n\nx"
    assert c.reprompt_template.endswith("Correctly solve the original question.")
    # overrides win, and the result is validated like any config
    assert (
        SDPOConfig.official_defaults(output_dir="o", use_cpu=True, bf16=False, distillation_topk=20).distillation_topk
        == 20
    )
    with pytest.raises(ValueError, match="distillation_alpha"):
        SDPOConfig.official_defaults(output_dir="o", use_cpu=True, bf16=False, distillation_alpha=2.0)


def test_distillation_rollout_is_needs_vllm_and_official_defaults_enable_it_under_vllm():
    with pytest.raises(ValueError, match="distillation_rollout_is"):
        make(distillation_rollout_is=True)
    c = SDPOConfig.official_defaults(output_dir="unused", bf16=False, use_cpu=True, use_vllm=True)
    assert c.distillation_rollout_is and c.vllm_importance_sampling_mode == "token_truncate"
    assert c.vllm_importance_sampling_clip_max == 2.0
    assert not SDPOConfig.official_defaults(output_dir="unused", bf16=False, use_cpu=True).distillation_rollout_is
