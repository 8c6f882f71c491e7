"""The real-model task (`sdpo.real_task`): prompts, split, parsing, the verifier's reward and feedback. Pure and fast:
no model is loaded."""

from __future__ import annotations

import pytest

from sdpo import real_task as rt


def test_split_is_disjoint_seeded_and_in_range():
    train, heldout = rt.split(3, 96, 100)
    assert len(train) == 96 and len(heldout) == 100
    assert not set(train) & set(heldout)
    assert all(rt.LOW <= x <= rt.HIGH for pair in train + heldout for x in pair)
    assert rt.split(3, 96, 100) == (train, heldout)  # the seed alone fixes the split
    assert rt.split(4, 96, 100) != (train, heldout)
    assert len(rt.all_pairs()) == (rt.HIGH - rt.LOW + 1) ** 2
    with pytest.raises(ValueError, match="pairs"):
        rt.split(0, 1000, 1000)


def test_prompt_prefills_the_equation():
    p = rt.prompt(23, 45)
    assert p == "<|im_start|>user\nWhat is 23 + 45?<|im_end|>\n<|im_start|>assistant\n23 + 45 ="
    # the teacher reads the worked check in a system turn before the same prompt; the prompt is unchanged
    t = rt.teacher_prompt(23, 45)
    assert t.startswith("<|im_start|>system\n") and t.endswith(p) and rt.worked_check(23, 45) in t
    assert rt.teacher_prompt(23, 45, feedback=False) == "<|im_start|>system\n<|im_end|>\n" + p
    demo = rt.teacher_prompt(23, 45, demonstration=" 68", feedback=False)
    assert "A correct earlier answer: 68\n" in demo


@pytest.mark.parametrize(
    ("completion", "expected"),
    [(" 68", 68), (" 68.\n", 68), ("68 is", 68), ("  -3", -3), (" 680", 680), (" sixty", None), ("", None)],
)
def test_parse_answer(completion, expected):
    assert rt.parse_answer(completion) == expected


def test_reward_is_binary_on_the_leading_integer():
    completions = [" 68", " 68.", " 86", " 680", " The", " 6 8"]
    assert rt.reward_sum(completions, [68] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert rt.reward_sum([" 68"], ["68"]) == [1.0]  # the dataset column may hold strings


def test_worked_check_is_the_column_addition():
    assert rt.worked_check(23, 45) == "Add tens and ones separately: 20 + 40 = 60 and 3 + 5 = 8, so 23 + 45 = 68."
    assert rt.worked_check(47, 38) == "Add tens and ones separately: 40 + 30 = 70 and 7 + 8 = 15, so 47 + 38 = 85."
    for a, b in rt.all_pairs()[::37]:
        assert rt.worked_check(a, b).endswith(f"so {a} + {b} = {a + b}.")


def test_verifier_feedback_says_what_was_wrong():
    ok = rt.check(23, 45, " 68.")
    assert ok.reward == 1.0 and ok.feedback == "Correct: 23 + 45 = 68."
    tens = rt.check(23, 45, " 78")
    assert tens.reward == 0.0 and "too large by 10" in tens.feedback and "the tens are wrong" in tens.feedback
    ones = rt.check(23, 45, " 66")
    assert "too small by 2" in ones.feedback and "the ones digit should be 8" in ones.feedback
    none = rt.check(23, 45, " The sum")
    assert none.reward == 0.0 and "No number after '='" in none.feedback and "'The sum'" in none.feedback
    assert "got nothing" in rt.check(23, 45, "  ").feedback
    for v in (tens, ones, none):  # every failure also shows how to get the right sum
        assert v.feedback.endswith(rt.worked_check(23, 45))


def test_dataset_columns():
    cols = rt.dataset_columns([(23, 45), (10, 49)])
    assert cols["answer"] == [68, 59]
    assert cols["prompt"] == [rt.prompt(23, 45), rt.prompt(10, 49)]
    assert cols["privileged_context"] == [rt.worked_check(23, 45), rt.worked_check(10, 49)]
