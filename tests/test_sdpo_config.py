"""SDPOConfig: documented defaults, field-by-field agreement with TRL 1.16's SDPOConfig, max_prompt_length, loss-mode
mapping, and every validation error."""

import dataclasses
import warnings

import pytest
import test_trl_parity
import torch
from datasets import Dataset
from trl import GRPOConfig
from trl.experimental.sdpo import SDPOConfig as TRLConfig
from trl.experimental.sdpo import SDPOTrainer as TRLTrainer

from sdpo import SDPOConfig, SDPOTrainer
from sdpo.tiny import build_char_tokenizer, tiny_run_args

model_dir = test_trl_parity.model_dir  # the saved tiny model fixture of test_trl_parity's harness


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
        teacher_update_rate=0.05,  # resolved from the deprecated alias ema_update_rate, as TRL 1.16's default
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


# ---- one-import switch: field-by-field agreement with TRL 1.16's `trl.experimental.sdpo.SDPOConfig` ----------------

# Fields only ours has (GRPOConfig's options that TRL 1.16's SDPOConfig lacks, and our SDPO options), with their
# defaults. Each default is inert or TRL's behaviour, except where a construction warning says otherwise (GRPO's
# vLLM importance-sampling correction with a policy term under vLLM: see test_defaults_warn_nothing_...).
OURS_ONLY = dict(
    cast_lm_head_to_fp32=False,
    delta=None,
    distillation_aggregation="trl",  # TRL's aggregation
    distillation_fused_linear="auto",  # same loss, computed without materialising logits when possible
    distillation_rollout_is=False,
    ema_update_rate=0.05,  # deprecated alias of teacher_update_rate
    entropy_coef=0.0,
    entropy_coef_delta=0.005,
    entropy_coef_max=1.0,
    entropy_coef_min=0.0,
    entropy_target=0.2,
    full_logit_distillation=False,  # = distillation_mode="sampled_token"
    log_completions=False,
    log_completions_hub_repo=None,
    log_multimodal=True,
    log_unique_prompts=False,
    max_tool_calling_iterations=None,
    multi_objective_aggregation="sum_then_normalize",
    num_completions_to_print=None,
    off_policy_mask_threshold=None,
    pad_to_multiple_of=None,
    ref_model_mixup_alpha=0.6,
    ref_model_sync_steps=512,
    router_aux_loss_coef=None,
    sapo_temperature_neg=1.05,
    sapo_temperature_pos=1.0,
    sdpo_policy_loss_mode=None,  # TRL 1.16's blend (1 - w)·policy + w·SD; at w = 1 the same as "distillation_only"
    shuffle_generation_batch=False,  # TRL splits a generation batch in order
    sync_ref_model=False,
    teacher_ema_rounding="stochastic",  # deliberate: bf16 EMA teachers only, the trainer warns (docs/trainer.md)
    teacher_regularization="ema",  # = teacher_model_kind="ema"
    top_entropy_quantile=1.0,
    transformers_continuous_batching_config=None,
    use_adaptive_entropy=False,
    use_bias_correction_kl=True,  # only with beta != 0, which the trainer rejects with it
    use_transformers_continuous_batching=False,
    use_transformers_paged=False,
    vespo_k_neg=3.0,
    vespo_k_pos=2.0,
    vespo_lambda_neg=2.0,
    vespo_lambda_pos=3.0,
    vllm_importance_sampling_cap=None,
    vllm_importance_sampling_clip_max=3.0,
    vllm_importance_sampling_clip_min=None,
    vllm_importance_sampling_correction=True,  # GRPO's; applies to a policy term under vLLM only, and warns then
    vllm_importance_sampling_mode="sequence_mask",
    vllm_structured_outputs_regex=None,
)


def _platform_kwargs():
    """What this machine needs to build either config (bf16 defaults to True in both): nothing on a bf16 GPU."""
    return {} if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else {"use_cpu": True}


def _field_diff(ours, theirs) -> dict:
    names = {f.name for f in dataclasses.fields(theirs)} & {f.name for f in dataclasses.fields(ours)}
    return {n: (getattr(theirs, n), getattr(ours, n)) for n in sorted(names) if getattr(theirs, n) != getattr(ours, n)}


def test_defaults_equal_trl_116_field_by_field():
    """Built from `output_dir` alone, every field TRL 1.16's SDPOConfig has holds the same value in ours."""
    theirs = TRLConfig(output_dir="unused", **_platform_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no difference warning at the defaults
        ours = SDPOConfig(output_dir="unused", **_platform_kwargs())
    trl_names = {f.name for f in dataclasses.fields(TRLConfig)}
    our_names = {f.name for f in dataclasses.fields(SDPOConfig)}
    assert trl_names - our_names == set()  # every TRL field exists here
    assert len(trl_names & our_names) > 170  # (a vacuous comparison would pass trivially)
    assert _field_diff(ours, theirs) == {}
    assert {n: getattr(ours, n) for n in our_names - trl_names} == OURS_ONLY
    # The values TRL resolves in __post_init__ are resolved alike (not left None).
    assert (ours.epsilon_high, ours.teacher_model_kind, ours.teacher_update_rate) == (0.2, "ema", 0.05)
    assert (ours.learning_rate, ours.disable_dropout, ours.max_completion_length) == (5e-5, True, 256)
    assert ours.max_prompt_length == 512 and ours.distillation_mode == "sampled_token"
    # sdpo_policy_loss_mode=None at the default w = 1 trains exactly as the legacy "distillation_only".
    legacy = SDPOConfig(output_dir="unused", sdpo_policy_loss_mode="distillation_only", **_platform_kwargs())
    assert (ours.policy_loss_weight, ours.distillation_loss_weight) == (0.0, 1.0)
    assert (legacy.policy_loss_weight, legacy.distillation_loss_weight) == (0.0, 1.0)


def _declared_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def test_every_trl_field_is_accepted_at_trls_default():
    """Ours accepts every TRL 1.16 keyword (each at TRL's declared default, all at once) and means the same."""
    kwargs = {
        f.name: _declared_default(f)
        for f in dataclasses.fields(TRLConfig)
        if f.init and _declared_default(f) is not dataclasses.MISSING
    }
    assert {"max_prompt_length", "teacher_model_kind", "teacher_update_rate", "distillation_mode"} <= kwargs.keys()
    kwargs.update(output_dir="unused", **_platform_kwargs())
    ours = SDPOConfig(**kwargs)  # no TypeError
    assert _field_diff(ours, TRLConfig(**kwargs)) == {}


def test_resolved_values_round_trip():
    """Re-building from the resolved TRL-style values gives the same config (and no alias warning)."""
    for kw in [dict(), dict(ema_update_rate=0.2), dict(teacher_model_kind="live"), dict(epsilon=0.1)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            c = make(**kw)
        again = make(
            teacher_update_rate=c.teacher_update_rate,
            ema_update_rate=c.ema_update_rate,
            teacher_model_kind=c.teacher_model_kind,
            teacher_regularization=c.teacher_regularization,
            epsilon=c.epsilon,
            epsilon_high=c.epsilon_high,
        )
        for name in ("teacher_update_rate", "teacher_model_kind", "teacher_regularization", "epsilon_high"):
            assert getattr(again, name) == getattr(c, name), (kw, name)
    with pytest.warns(FutureWarning, match="ema_update_rate"):
        assert make(ema_update_rate=0.2).teacher_update_rate == 0.2
    assert make(epsilon=0.1).epsilon_high == 0.1 and make(epsilon_high=0.28).epsilon_high == 0.28
    assert make(teacher_regularization="trust_region").teacher_model_kind is None  # TRL has no such teacher
    assert make(teacher_regularization="none").teacher_model_kind == "live"


def test_max_prompt_length_is_validated():
    assert make(max_prompt_length=None).max_prompt_length is None
    with pytest.raises(ValueError, match="max_prompt_length"):
        make(max_prompt_length=0)


# ---- max_prompt_length: left truncation where TRL 1.16's SDPOTrainer applies it -----------------------------------


def _both_trainers(tmp_path, model_path, **kw):
    tok = build_char_tokenizer()
    args = dict(tiny_run_args(str(tmp_path)), **kw)
    ds = Dataset.from_dict({"prompt": ["1+1="] * 4})
    common = dict(model=model_path, reward_funcs=_zero_reward, train_dataset=ds, processing_class=tok)
    return SDPOTrainer(args=SDPOConfig(**args), **common), TRLTrainer(args=TRLConfig(**args), **common), tok


def _zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


@pytest.mark.parametrize("max_prompt_length", [3, 5, None])
def test_max_prompt_length_truncates_prompt_tokens_from_the_left_like_trl(tmp_path, model_dir, max_prompt_length):
    ours, theirs, tok = _both_trainers(tmp_path, model_dir[0], max_prompt_length=max_prompt_length)
    text = ["1+1=", "12+34=", "7*8=?"]
    chat = [[{"role": "user", "content": "12+34="}], [{"role": "user", "content": "1"}]]
    for prompts in (text, chat):
        our_ids, images, fields = ours._tokenize_prompts(prompts)
        full = theirs._tokenize_prompts_untruncated(prompts)
        assert [list(x) for x in our_ids] == [list(x) for x in theirs._tokenize_prompts(prompts)]
        keep = max_prompt_length or max(len(x) for x in full)
        assert [list(x) for x in our_ids] == [list(x)[-keep:] for x in full]
        assert images is None and fields == {}
    assert any(len(x) > 3 for x in full)  # (the truncation is exercised)
    if max_prompt_length == 3:
        assert tok.decode(ours._tokenize_prompts(["12+34="])[0][0]) == "34="


@pytest.mark.slow
def test_max_prompt_length_in_a_training_step_matches_trl(tmp_path, model_dir):
    """One training step of both trainers (test_trl_parity's harness): generation sees the same truncated prompts,
    and the logged loss agrees (both build the teacher prompts from the untruncated prompts)."""
    path, tok = model_dir
    settings = dict(max_prompt_length=2, max_steps=1)
    trl_logs, _, trl_calls = test_trl_parity._run(tmp_path, False, path, tok, settings)
    our_logs, _, our_calls = test_trl_parity._run(tmp_path, True, path, tok, settings)
    assert our_calls == trl_calls
    assert all(len(ids) == 2 for call in our_calls for ids in call)
    for key in ("loss", "self_distillation/distillation_loss"):
        torch.testing.assert_close(our_logs[0][key], trl_logs[0][key], rtol=1e-4, atol=1e-6)
