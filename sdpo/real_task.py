"""A real task for the real model SmolLM2-135M-Instruct, built in code: two-digit addition with a verifier
that explains what a correct answer is.

Question: "What is 23 + 45?", operands 10..49 (1,600 ordered pairs; the demo draws disjoint train and held-out
sets from them per seed). The prompt is the model's own ChatML text with the assistant turn *prefilled* with the
equation, so the model's first words are the sum::

    <|im_start|>user
    What is 23 + 45?<|im_end|>
    <|im_start|>assistant
    23 + 45 =

(no system turn: the default one would add 20 tokens to every prompt, and sequence length is the cost on two
CPU cores). SmolLM2-135M-Instruct gets the sum right on its first try only sometimes: in the demo's 4 seeds,
0.35-0.44 greedy on 100 held-out questions each (mean 0.38) and 0.19-0.56 of the first step's 32
temperature-1 rollouts (mean 0.30); on 100 other questions 0.25 greedy, 0.19 sampled (docs/real-model-demo.md).

Verifier (`check`): reward 1 when the first integer of the completion is the sum (what follows it is not
graded: the completion budget is a few tokens), else 0; its feedback says what was wrong with *this* attempt and
how to get the right sum, e.g. "Your answer 59 is wrong. Add tens and ones separately: 20 + 40 = 60 and
3 + 5 = 8, so 23 + 45 = 68." or "No number after '=': the reply must start with the sum in digits. ...".

What the trainer sees. `SDPOTrainer` takes environment feedback from the dataset's static `privileged_context`
column (per-attempt feedback is not wired into the trainer yet), so training uses the attempt-independent part
of the verifier's message, `worked_check(a, b)`: the column check (tens, ones, total) that `check` prints for
every failed attempt. It contains the answer, as the tiny demo's "expected dba" does, but as a derivation a
checker prints, not a label. The teacher (the same model, re-prompted) reads it in a system turn before the
question (`REPROMPT`); measured, that lifts greedy success on the training questions from 0.34 to 0.68 (demo
means over 4 seeds; sampled, on 64 questions of seed 0: 0.28 -> 0.46), so the self-teacher is better than the
student, which is what SDPO needs.

Fairness. Both arms get the same prompts, the same binary reward from `reward_sum` and the same sampling;
GRPO cannot read text feedback, SDPO can: using it is SDPO's claim, not a tilt of the comparison. The feedback
is a fixed function of the question, so it leaks nothing per attempt beyond what the verifier would print, and
it is never shown on held-out questions: held-out accuracy is measured on the bare prompt, so a gain there is a
gain in the student's own arithmetic, not copying.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

LOW, HIGH = 10, 49  # operand range: sums 20..98

# Teacher prompt for SDPOTrainer (plain-text prompts: the templates are formatted around the whole ChatML text).
# The demonstration (a successful sibling's completion, which starts after "a + b =") and/or the feedback go into
# a system turn before the question.
REPROMPT = "<|im_start|>system\n{solution}{feedback}<|im_end|>\n{prompt}"
SOLUTION = "A correct earlier answer:{successful_previous_attempt}\n"
FEEDBACK = "{feedback_raw}"

_LEADING_INT = re.compile(r"\s*(-?\d+)")


def all_pairs() -> list[tuple[int, int]]:
    """Every ordered operand pair (a, b) with LOW <= a, b <= HIGH."""
    return [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]


def split(seed: int, num_train: int, num_heldout: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Disjoint train / held-out pairs, shuffled by `random.Random(seed)` alone."""
    pairs = all_pairs()
    if num_train + num_heldout > len(pairs):
        raise ValueError(f"num_train + num_heldout = {num_train + num_heldout} > {len(pairs)} pairs")
    random.Random(seed).shuffle(pairs)
    return pairs[:num_train], pairs[num_train : num_train + num_heldout]


def question(a: int, b: int) -> str:
    """The user question for (a, b)."""
    return f"What is {a} + {b}?"


def prompt(a: int, b: int) -> str:
    """The student's prompt: ChatML user turn, assistant turn prefilled with 'a + b ='."""
    return f"<|im_start|>user\n{question(a, b)}<|im_end|>\n<|im_start|>assistant\n{a} + {b} ="


def parse_answer(completion: str) -> int | None:
    """The integer the completion starts with (after optional whitespace), or None."""
    m = _LEADING_INT.match(completion)
    return int(m.group(1)) if m else None


def worked_check(a: int, b: int) -> str:
    """The attempt-independent part of the verifier's message: the tens/ones column check."""
    ta, tb, oa, ob = a // 10 * 10, b // 10 * 10, a % 10, b % 10
    return f"Add tens and ones separately: {ta} + {tb} = {ta + tb} and {oa} + {ob} = {oa + ob}, so {a} + {b} = {a + b}."


@dataclass(frozen=True)
class Verdict:
    """What the verifier says about one attempt: its reward (1.0 or 0.0) and its feedback text."""

    reward: float
    feedback: str


def check(a: int, b: int, completion: str) -> Verdict:
    """The verifier: reward 1/0 and a message saying what was wrong with this attempt (and how to fix it)."""
    got = parse_answer(completion)
    if got == a + b:
        return Verdict(1.0, f"Correct: {a} + {b} = {a + b}.")
    if got is None:
        shown = completion.strip()[:40]
        what = f"got {shown!r}" if shown else "got nothing"
        return Verdict(
            0.0, f"No number after '=' ({what}): the reply must start with the sum in digits. " + worked_check(a, b)
        )
    off = got - (a + b)
    how = "too large" if off > 0 else "too small"
    detail = ""
    if abs(off) % 10 == 0 and abs(off) < 100:
        detail = f" (off by {abs(off)}: the tens are wrong)"
    elif got % 10 != (a + b) % 10:
        detail = f" (the ones digit should be {(a + b) % 10})"
    return Verdict(0.0, f"Your answer {got} is wrong, {how} by {abs(off)}{detail}. " + worked_check(a, b))


def reward_sum(completions: list[str], answer: list, **kwargs) -> list[float]:
    """TRL reward function: 1.0 when the completion starts with the integer `answer` (a dataset column)."""
    return [1.0 if parse_answer(c) == int(a) else 0.0 for c, a in zip(completions, answer)]


def dataset_columns(pairs: list[tuple[int, int]]) -> dict[str, list]:
    """Columns for `datasets.Dataset.from_dict`: prompt, answer, privileged_context (the worked check)."""
    return {
        "prompt": [prompt(a, b) for a, b in pairs],
        "answer": [a + b for a, b in pairs],
        "privileged_context": [worked_check(a, b) for a, b in pairs],
    }


def teacher_prompt(a: int, b: int, demonstration: str | None = None, feedback: bool = True) -> str:
    """The teacher prompt SDPOTrainer renders for (a, b) with these templates (for measuring the teacher)."""
    solution = SOLUTION.format(successful_previous_attempt=demonstration) if demonstration is not None else ""
    fb = FEEDBACK.format(feedback_raw=worked_check(a, b)) if feedback else ""
    return REPROMPT.format(prompt=prompt(a, b), solution=solution, feedback=fb)


def first_try_success(
    model,
    tokenizer,
    pairs: list[tuple[int, int]],
    *,
    samples: int = 0,
    temperature: float = 1.0,
    with_feedback: bool = False,
    max_new_tokens: int = 4,
    batch_size: int = 64,
) -> float:
    """Share of correct first tries on `pairs`: greedy when `samples` is 0, else `samples` draws per question at
    `temperature` (torch's global RNG: seed it before). `with_feedback` prepends the worked check as the
    trainer's teacher sees it (the self-teacher's success)."""
    import torch

    texts = [teacher_prompt(a, b) if with_feedback else prompt(a, b) for a, b in pairs]
    answers = [a + b for a, b in pairs]
    was_training = model.training
    model.eval()
    n = max(samples, 1)
    kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if samples else dict(do_sample=False)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=tokenizer.pad_token_id, **kw
            )
            done = tokenizer.batch_decode(out[:, enc["input_ids"].size(1) :], skip_special_tokens=True)
            correct += sum(parse_answer(t) == answers[i + j // n] for j, t in enumerate(done))
    model.train(was_training)
    return correct / (len(texts) * n)
