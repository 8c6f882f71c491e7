"""Teacher-context construction as a unit: selection, templates, chats, feedback flags, truncation."""

import pytest

from sdpo import SDPOConfig
from sdpo.teacher_context import (
    build_teacher_prompts,
    reprompt,
    select_teachers,
    strip_thinking,
    tokenize_teacher_prompts,
)
from sdpo.tiny import build_char_tokenizer

T = SDPOConfig.__dataclass_fields__
REPROMPT = T["reprompt_template"].default
SOLUTION = T["solution_template"].default
FEEDBACK = T["feedback_template"].default
TEMPLATES = dict(reprompt_template=REPROMPT, solution_template=SOLUTION, feedback_template=FEEDBACK)


def test_select_first_successful_sibling_never_itself():
    # two groups of 3: group 0 has successes at 1 and 2; group 1 has a single success at 4
    sel = select_teachers([0.0, 1.0, 1.0, 0.0, 1.0, 0.2], None, 3)
    assert sel.demo_index == [1, 2, 1, 4, None, 4]
    assert sel.mask == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    m = sel.metrics
    assert m["self_distillation/success_group_fraction"] == 1.0
    assert m["self_distillation/success_sample_fraction"] == pytest.approx(5 / 6)
    assert m["self_distillation/reprompt_sample_fraction"] == pytest.approx(5 / 6)


def test_self_success_allowed_when_flag_off():
    sel = select_teachers([0.0, 1.0, 0.0, 0.0], None, 2, dont_reprompt_on_self_success=False)
    assert sel.demo_index == [1, 1, None, None]
    assert sel.metrics["self_distillation/success_group_fraction"] == 0.5


def test_threshold_and_nan_rewards():
    sel = select_teachers([0.5, float("nan"), 0.49, 0.0], None, 4, success_reward_threshold=0.5)
    assert sel.demo_index == [None, 0, 0, 0]
    sel = select_teachers([1.0, 1.0], None, 2, use_successful_as_teacher=False)
    assert sel.demo_index == [None, None] and sel.mask == [0.0, 0.0]


@pytest.mark.parametrize(
    ("include", "only_without", "use", "mask"),
    [
        (False, False, [False, False, False, False], [0.0, 0.0, 0.0, 1.0]),
        (True, False, [True, False, False, True], [1.0, 0.0, 0.0, 1.0]),
        (True, True, [True, False, False, False], [1.0, 0.0, 0.0, 1.0]),
    ],
)
def test_feedback_flags(include, only_without, use, mask):
    # rollout 2 succeeds: rollout 3 has it as demonstration; rollout 0 has feedback but no successful sibling.
    rewards = [0.0, 0.0, 1.0, 0.0]
    feedbacks = ["off by one", "  ", None, "too long"]
    sel = select_teachers(
        rewards,
        feedbacks,
        2,
        include_environment_feedback=include,
        environment_feedback_only_without_solution=only_without,
    )
    assert sel.use_feedback == use
    assert sel.mask == mask
    assert sel.metrics["self_distillation/feedback_available_fraction"] == 0.5
    assert sel.metrics["self_distillation/feedback_used_fraction"] == sum(use) / 4


def test_bad_group_size():
    with pytest.raises(ValueError, match="num_generations"):
        select_teachers([0.0, 1.0, 1.0], None, 2)
    with pytest.raises(ValueError, match="feedbacks"):
        select_teachers([0.0, 1.0], ["a"], 2)


def test_plain_prompt_text_and_no_teacher_keeps_prompt():
    prompts = ["Q1", "Q1", "Q2", "Q2"]
    completions = ["<think>hmm</think> 42", "41", "x", "y"]
    feedbacks = [None, "wrong sign", None, None]
    sel = select_teachers([1.0, 0.0, 0.0, 0.0], feedbacks, 2, include_environment_feedback=True)
    out = build_teacher_prompts(
        prompts, completions, feedbacks, sel, range(4), remove_thinking_from_demonstration=True, **TEMPLATES
    )
    solution = SOLUTION.format(successful_previous_attempt="42")
    feedback = FEEDBACK.format(feedback_raw="wrong sign")
    assert out[1] == REPROMPT.format(prompt="Q1", solution=solution, feedback=feedback)
    assert out[0] == "Q1"  # its only successful sibling is itself: no teacher, prompt unchanged
    assert out[2:] == ["Q2", "Q2"]
    # without stripping, the think block stays in the demonstration
    out = build_teacher_prompts(prompts, completions, feedbacks, sel, [1], **TEMPLATES)
    assert "<think>hmm</think> 42" in out[0]


def test_strip_thinking_multiline_and_multiple():
    assert strip_thinking("<think>a\nb</think>x<think>c</think> y ") == "x y"
    assert strip_thinking("no think") == "no think"


def test_conversational_keeps_system_and_rewrites_last_user_turn():
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
    ]
    out = reprompt(chat, "S", "F", REPROMPT)
    assert out[0] == chat[0]
    assert out[1] == {"role": "user", "content": REPROMPT.format(prompt="2+2?", solution="S", feedback="F")}
    assert chat[1]["content"] == "2+2?"  # input not mutated
    with pytest.raises(ValueError, match="user turn"):
        reprompt([*chat, {"role": "assistant", "content": "4"}], "S", "F", REPROMPT)


def test_tokenize_truncates_from_the_left():
    tok = build_char_tokenizer()
    ids = tokenize_teacher_prompts(tok, ["abcdefgh", "xy"], 5)
    assert tok.decode(ids[0]) == "defgh"
    assert tok.decode(ids[1]) == "xy"
    chat = [[{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}]]
    full = tokenize_teacher_prompts(tok, chat, 10_000)[0]
    assert tok.decode(full) == "s:s\nu:hello\na:"
    assert tokenize_teacher_prompts(tok, chat, 4)[0] == full[-4:]
