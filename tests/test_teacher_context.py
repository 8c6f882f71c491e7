"""Teacher-context construction as a unit: selection, templates, chats, feedback flags, truncation."""

import string

import pytest

from sdpo import SDPOConfig
from sdpo.teacher_context import (
    TeacherSelection,
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
    # a plain list of prompts has no known parts: left truncation, counted as truncated (and as a fallback)
    ids = tokenize_teacher_prompts(tok, ["abcdefgh", "xy"], 5)
    assert (ids.num_truncated, ids.tokens_cut, ids.num_fallback) == (1, 3, 1)


# ---- reprompt truncation: template, instruction and question kept; solution / feedback cut ---------------------
def _tok():
    return build_char_tokenizer(string.printable)  # one token per character: lengths are exact, decode verbatim


def _one(prompt, demo, feedback):
    """A single-rollout teacher prompt from `prompt` with demonstration `demo` and/or `feedback`."""
    sel = TeacherSelection(
        demo_index=[0 if demo is not None else None], use_feedback=[feedback is not None], mask=[1.0]
    )
    return build_teacher_prompts([prompt], [demo or ""], [feedback], sel, [0], **TEMPLATES)


def _skeleton(prompt, demo, feedback):
    return REPROMPT.format(
        prompt=prompt,
        solution="" if demo is None else SOLUTION.format(successful_previous_attempt=""),
        feedback="" if feedback is None else FEEDBACK.format(feedback_raw=""),
    )


DEMO = "First, set up the sum. " * 8 + "So the answer is 4."
FB = "log: running test 1\n" * 8 + "Error: expected 4, got 5"


def test_long_solution_and_feedback_are_cut_question_and_template_verbatim():
    tok, q = _tok(), "What is 2+2? Show your work."
    prompts = _one(q, DEMO, FB)
    room = 40
    max_len = len(_skeleton(q, DEMO, FB)) + room
    ids = tokenize_teacher_prompts(tok, prompts, max_len)
    # both parts are long: each gets half the room; the demonstration keeps its start, the feedback its end
    expected = REPROMPT.format(
        prompt=q,
        solution=SOLUTION.format(successful_previous_attempt=DEMO[:20]),
        feedback=FEEDBACK.format(feedback_raw=FB[-20:]),
    )
    assert tok.decode(ids[0]) == expected and len(ids[0]) == max_len
    assert expected.startswith(q) and expected.endswith("Correctly solve the original question.\n")
    assert (ids.num_truncated, ids.num_fallback) == (1, 0)
    assert ids.tokens_cut == len(prompts[0]) - max_len
    assert ids.truncated_frac == 1.0


def test_short_part_lends_its_unused_room_to_the_other():
    tok, q = _tok(), "What is 2+2?"
    for demo, fb, want_demo, want_fb in [(DEMO, "Error: 5", DEMO[:32], "Error: 5"), ("4", FB, "4", FB[-39:])]:
        max_len = len(_skeleton(q, demo, fb)) + 40
        ids = tokenize_teacher_prompts(tok, _one(q, demo, fb), max_len)
        sol = SOLUTION.format(successful_previous_attempt=want_demo)
        assert tok.decode(ids[0]) == REPROMPT.format(
            prompt=q, solution=sol, feedback=FEEDBACK.format(feedback_raw=want_fb)
        )
    # solution only / feedback only: the single part gets all the room
    max_len = len(_skeleton(q, DEMO, None)) + 10
    ids = tokenize_teacher_prompts(tok, _one(q, DEMO, None), max_len)
    assert tok.decode(ids[0]) == REPROMPT.format(
        prompt=q, solution=SOLUTION.format(successful_previous_attempt=DEMO[:10]), feedback=""
    )
    max_len = len(_skeleton(q, None, FB)) + 10
    ids = tokenize_teacher_prompts(tok, _one(q, None, FB), max_len)
    assert tok.decode(ids[0]) == REPROMPT.format(prompt=q, solution="", feedback=FEEDBACK.format(feedback_raw=FB[-10:]))


def test_chat_reprompt_keeps_header_system_and_question():
    tok = _tok()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    prompts = _one(chat, DEMO, FB)
    skeleton = tok.apply_chat_template(
        [{**chat[0]}, {"role": "user", "content": _skeleton("What is 2+2?", DEMO, FB)}],
        add_generation_prompt=True,
        tokenize=False,
    )
    max_len = len(skeleton) + 12
    ids = tokenize_teacher_prompts(tok, prompts, max_len)
    user = REPROMPT.format(
        prompt="What is 2+2?",
        solution=SOLUTION.format(successful_previous_attempt=DEMO[:6]),
        feedback=FEEDBACK.format(feedback_raw=FB[-6:]),
    )
    assert tok.decode(ids[0]) == f"s:Be brief.\nu:{user}\na:"
    assert ids.num_truncated == 1


def test_truncation_counts_fallback_and_short_prompts_unchanged(caplog, monkeypatch):
    import sdpo.teacher_context as tc

    monkeypatch.setattr(tc, "_warned_fallback", False)
    tok, q = _tok(), "What is 2+2?"
    long_q = "What is " + "1+" * 80 + "1?"
    max_len = len(_skeleton(q, DEMO, FB)) + 20
    # rows: no teacher (long original prompt), short teacher prompt, long teacher prompt, question alone too long
    sel = TeacherSelection(demo_index=[None, 1, 2, 1], use_feedback=[False, False, True, False], mask=[0.0, 1, 1, 1])
    prompts = build_teacher_prompts(
        [long_q * 2, q, q, long_q], ["", "4", DEMO, ""], [None, None, FB, None], sel, range(4), **TEMPLATES
    )
    full = tokenize_teacher_prompts(tok, prompts, 10**6)
    assert full.num_truncated == 0 and full == [tok(text=p)["input_ids"] for p in prompts]
    with caplog.at_level("WARNING", logger="sdpo.teacher_context"):
        ids = tokenize_teacher_prompts(tok, prompts, max_len)
        tokenize_teacher_prompts(tok, prompts, max_len)
    assert ids[0] == full[0][-max_len:]  # no teacher: left-truncated, masked out, not counted
    assert ids[1] == full[1]  # fits: bit-for-bit the untruncated tokenization
    assert tok.decode(ids[2]).startswith(q) and len(ids[2]) == max_len
    assert ids[3] == full[3][-max_len:]  # fallback: TRL's left truncation
    assert (ids.num_truncated, ids.num_fallback) == (2, 1)
    assert ids.tokens_cut == (len(full[2]) - max_len) + (len(full[3]) - max_len)
    assert ids.truncated_frac == 0.5
    assert sum("max_reprompt_len" in r.getMessage() for r in caplog.records) == 1  # warned once
