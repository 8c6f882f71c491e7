"""Per-rollout environment feedback returned by reward functions (sdpo.rollout_feedback), unit and end to end."""

import asyncio
import functools
import logging

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from sdpo import SDPOConfig, SDPOTrainer
from sdpo.rollout_feedback import FeedbackRecorder, combine_feedback
from sdpo.tiny import build_char_tokenizer, build_tiny_model, tiny_run_args

# --- combine_feedback --------------------------------------------------------------------------------------------


def test_combine_keeps_static_exactly_without_rollout_feedback():
    static = ["it is 2", "", None, "  x "]
    assert combine_feedback(static, []) == static
    assert combine_feedback(static, [[None, "  ", None, None]]) == static  # whitespace-only is no feedback


def test_combine_orders_static_then_functions():
    static = ["ctx", "", None]
    out = combine_feedback(static, [["a0", "a1", None], [None, "b1", "b2"]])
    assert out == ["ctx\n\na0", "a1\n\nb1", "b2"]


# --- FeedbackRecorder ----------------------------------------------------------------------------------------------


def plain(completions, **kwargs):
    return [1.0] * len(completions)


def with_feedback(completions, **kwargs):
    return {"rewards": [0.0] * len(completions), "feedback": [f"bad {c}" for c in completions]}


def test_wrapper_passes_plain_rewards_and_keeps_name():
    rec = FeedbackRecorder()
    wrapped = rec.wrap(plain)
    rec.start_batch()
    assert wrapped(completions=["a", "b"]) == [1.0, 1.0]
    assert wrapped.__name__ == "plain" and rec.per_rollout(2) == []


def test_wrapper_records_feedback_per_batch():
    rec = FeedbackRecorder()
    wrapped = rec.wrap(with_feedback)
    rec.start_batch()
    assert wrapped(completions=["x", "y"]) == [0.0, 0.0]
    assert rec.per_rollout(2) == [["bad x", "bad y"]]
    rec.start_batch()
    assert rec.per_rollout(2) == []


def test_wrapper_async_and_partial_and_callable_object():
    from trl.trainer.utils import is_async_callable

    async def judge(completions, **kwargs):
        return {"rewards": [0.5] * len(completions), "feedback": ["meh"] * len(completions)}

    class Scorer:
        __name__ = "scorer"

        def __call__(self, completions, **kwargs):
            return {"rewards": [1.0] * len(completions), "feedback": None}

    rec = FeedbackRecorder()
    wrapped_async = rec.wrap(judge)
    assert is_async_callable(wrapped_async) and wrapped_async.__name__ == "judge"
    rec.start_batch()
    assert asyncio.run(wrapped_async(completions=["a"])) == [0.5]
    assert rec.per_rollout(1) == [["meh"]]
    part = rec.wrap(functools.partial(with_feedback))
    assert not is_async_callable(part) and part(completions=["z"]) == [0.0]
    assert rec.wrap(Scorer())(completions=["q"]) == [1.0]  # feedback None: rewards only


@pytest.mark.parametrize(
    ("output", "error", "match"),
    [
        ({"reward": [1.0]}, ValueError, "without 'rewards'"),
        ({"rewards": [1.0], "feedbacks": ["x"]}, ValueError, "unknown keys"),
        ({"rewards": [1.0, 0.0], "feedback": ["x"]}, ValueError, "1 feedback texts for 2 rewards"),
        ({"rewards": [1.0], "feedback": "x"}, TypeError, "one str or None per completion"),
        ({"rewards": [1.0], "feedback": [3]}, TypeError, "str or None, got int"),
    ],
)
def test_wrapper_rejects_malformed_outputs_naming_the_function(output, error, match):
    def verifier(completions, **kwargs):
        return output

    with pytest.raises(error, match=match) as info:
        FeedbackRecorder().wrap(verifier)(completions=["a"])
    assert "verifier" in str(info.value)


# --- end to end: the teacher prompt of each rollout carries that rollout's feedback --------------------------------


class TeacherPrompts(TrainerCallback):
    def __init__(self):
        self.batches = []

    def on_teacher_context_built(self, args, state, control, processing_class=None, teacher_input_ids=None, **kw):
        self.batches.append(processing_class.batch_decode(teacher_input_ids, skip_special_tokens=True))


def length_verifier(completions, **kwargs):
    """Reward 1 for an even length; the feedback names this attempt's length (what a failing test would print)."""
    lengths = [len(c) for c in completions]
    return {
        "rewards": [1.0 if n % 2 == 0 else 0.0 for n in lengths],
        "feedback": [None if n % 2 == 0 else f"len {n} is odd" for n in lengths],
    }


def _train(tmp_path, reward, privileged=None, **kw):
    tok = build_char_tokenizer()
    prompts = ["1+1=", "2+3=", "4+4=", "5+1="]
    columns = {"prompt": prompts}
    if privileged is not None:
        columns["privileged_context"] = privileged
    recorder = TeacherPrompts()
    completions_seen = []

    def spy(completions, **kwargs):
        completions_seen.append(list(completions))
        return reward(completions, **kwargs)

    spy.__name__ = reward.__name__
    args = tiny_run_args(
        str(tmp_path),
        **{"max_steps": 2, "logging_steps": 1, "learning_rate": 1e-2, "include_environment_feedback": True, **kw},
        # Markers of characters in the tiny vocabulary (letters, digits, " +-*=?:.,!<>/"), none of them a prompt's.
        reprompt_template="{prompt}{solution}{feedback}",
        solution_template="sol/{successful_previous_attempt}/sol",
        feedback_template="fb/{feedback_raw}/fb",
    )
    trainer = SDPOTrainer(
        model=build_tiny_model(tok, seed=0),
        reward_funcs=spy,
        args=SDPOConfig(**args),
        train_dataset=Dataset.from_dict(columns),
        processing_class=tok,
        callbacks=[recorder],
    )
    trainer.train()
    return trainer, recorder.batches, completions_seen


def test_each_rollout_teacher_reads_its_own_feedback(tmp_path):
    trainer, batches, seen = _train(tmp_path, length_verifier, use_successful_as_teacher=False)
    assert len(batches) == len(seen) == 2
    for prompts, completions in zip(batches, seen):
        for teacher, completion in zip(prompts, completions):
            n = len(completion)
            # The teacher text is prompt + fb/feedback/fb + the completion itself.
            if n % 2:
                assert teacher == f"{teacher[:4]}fb/len {n} is odd/fb{completion}", (teacher, completion)
            else:
                assert teacher == teacher[:4] + completion, (teacher, completion)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert "rewards/length_verifier/mean" in logs[0]  # GRPO's metric name: the wrapper keeps the function's name
    odd = sum(len(c) % 2 for c in seen[0]) / len(seen[0])
    assert logs[0]["self_distillation/feedback_used_fraction"] == pytest.approx(odd)


def test_privileged_context_comes_first_and_only_without_solution_is_per_rollout(tmp_path):
    privileged = ["ctx0", "", None, "ctx3"]
    # Length cap 5 (odd): most rollouts fail, so groups both with and without a successful sibling occur.
    _, batches, seen = _train(
        tmp_path,
        length_verifier,
        privileged=privileged,
        environment_feedback_only_without_solution=True,
        max_completion_length=5,
        max_steps=4,
    )
    prompt_index = {"1+1=": 0, "2+3=": 1, "4+4=": 2, "5+1=": 3}
    checked_solution = checked_feedback = 0
    for prompts, completions in zip(batches, seen):
        groups = [completions[i : i + 4] for i in range(0, len(completions), 4)]
        for r, (teacher, completion) in enumerate(zip(prompts, completions)):
            group = groups[r // 4]
            has_solution = any(len(c) % 2 == 0 for j, c in enumerate(group) if j != r % 4)
            base = privileged[prompt_index[teacher[:4]]]
            parts = ([base] if base else []) + ([f"len {len(completion)} is odd"] if len(completion) % 2 else [])
            if has_solution:  # only_without_solution: the demonstration replaces the feedback, per rollout
                assert teacher.startswith(teacher[:4] + "sol/") and "fb/" not in teacher[: -len(completion) or None]
                checked_solution += 1
            elif parts:
                assert teacher == teacher[:4] + "fb/" + "\n\n".join(parts) + "/fb" + completion, (teacher, parts)
                checked_feedback += 1
    assert checked_solution and checked_feedback  # both branches were exercised


def test_unused_rollout_feedback_warns_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sdpo.grpo_options"):
        _train(tmp_path, length_verifier, include_environment_feedback=False)
    warnings = [r for r in caplog.records if "include_environment_feedback=False" in r.getMessage()]
    assert len(warnings) == 1


def test_plain_reward_list_leaves_training_bit_identical(tmp_path):
    """A reward returning a plain list goes through the wrapper unchanged: same weights as the unwrapped GRPO path."""

    def even(completions, **kwargs):
        return [1.0 if len(c) % 2 == 0 else 0.0 for c in completions]

    a, _, _ = _train(tmp_path / "a", even, privileged=["it is 2", "", "8", None])
    b, _, _ = _train(
        tmp_path / "b", lambda completions, **kw: {"rewards": even(completions)}, privileged=["it is 2", "", "8", None]
    )
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), name
