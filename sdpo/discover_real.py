"""`sdpo discover` on the real model SmolLM2-135M-Instruct: three-digit addition with answer-free feedback.

Task: "What is a + b?" with a, b in 100..499 (sums 200..998), the model's own ChatML prompt with the assistant
turn prefilled with "a + b =" (as `sdpo.real_task`). Reward 1 when the completion's first integer is the sum.

Feedback (`feedback`): one mark per digit of the attempt, ones first ("the ones digit is right, the tens digit is
wrong, the hundreds digit is wrong"), or "the sum has a different number of digits", or "there is no number
at the start of the reply". It is written in words and holds no digit at all, so it can never contain the sum,
and it is never enough to fix the sum: for a wrong attempt at least two sums of the task's range (in fact at
least 6) are consistent with it (`consistent_sums`; tests/test_discover_real.py checks both over every
question and every attempt 0..1999). It confirms digits the attempt wrote and rules one digit out at each wrong
position, as the tiny task's marks do (docs/discover.md); there is no "too large / too small", because with the
marks it can pin the sum at the range's edges.

Questions: pairs whose first-try pass rate at temperature 1, estimated with `selection_samples` samples on a
separate seed, lies in [1 / selection_samples, max_pass_rate]. Every method then runs with the same budget and
sampler (`sdpo.discover.discover`); the curves, bootstrap, verdict and plot are `sdpo.discover_stats`.
Settings and the committed run: docs/discover-smollm2.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field

import torch

from .discover import METHODS, DiscoverConfig, discover, sample_batch
from .discover_bench import per_question_table
from .discover_stats import analyse, plot, verdict

LOW, HIGH = 100, 499  # operands; sums 200..998
MODEL = "smollm2-135m-instruct"
DIGIT_NAMES = ("ones", "tens", "hundreds", "thousands")
_LEADING_INT = re.compile(r"\s*(-?\d+)")

# Multi-turn and the SDPO teacher alike: the earlier attempts and their feedback in a system turn before the
# question (the prompt itself starts with the user turn).
ENTRY_TEMPLATE = "Attempt:{attempt} Feedback: {feedback}\n"
TEACHER_TEMPLATE = "<|im_start|>system\nEarlier wrong attempts at this question:\n{history}<|im_end|>\n{prompt}"


def prompt(a: int, b: int) -> str:
    """ChatML user turn, assistant turn prefilled with 'a + b =' (the completion starts with the sum)."""
    return f"<|im_start|>user\nWhat is {a} + {b}?<|im_end|>\n<|im_start|>assistant\n{a} + {b} ="


def parse_answer(completion: str) -> int | None:
    m = _LEADING_INT.match(completion)
    return int(m.group(1)) if m else None


def feedback(completion: str, answer: int) -> tuple[float, str]:
    """(reward, feedback) for one attempt; the feedback never contains a digit (so never the sum)."""
    got = parse_answer(completion)
    if got is None:
        return 0.0, "There is no number at the start of the reply."
    if got == answer:
        return 1.0, "Correct."
    g, s = str(abs(got)), str(answer)
    if got < 0 or len(g) != len(s):
        return 0.0, "Wrong: the sum has a different number of digits."
    marks = [f"the {DIGIT_NAMES[i]} digit is {'right' if g[-1 - i] == s[-1 - i] else 'wrong'}" for i in range(len(s))]
    return 0.0, "Wrong: " + ", ".join(marks) + "."


def make_verifier(a: int, b: int):
    return lambda completion: feedback(completion, a + b)


def all_sums() -> range:
    return range(2 * LOW, 2 * HIGH + 1)


def consistent_sums(completion: str, text: str) -> list[int]:
    """The sums of the task's range for which `completion` gets exactly the feedback `text`."""
    return [s for s in all_sums() if feedback(completion, s)[1] == text]


def pass_rates(model, tok, pairs, samples: int, max_new_tokens: int, seed: int, batch: int = 8) -> list[float]:
    """First-try pass rate per pair: `samples` temperature-1 full-vocabulary samples (seeded by `seed`)."""
    torch.manual_seed(seed)
    rates = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            chunk = pairs[i : i + batch]
            texts = sample_batch(
                model, tok, [prompt(a, b) for a, b in chunk], samples, max_new_tokens, add_special_tokens=False
            )
            for (a, b), got in zip(chunk, texts):
                rates.append(sum(parse_answer(t) == a + b for t in got) / samples)
    return rates


@dataclass
class RealSettings:
    """The measured run (docs/discover-smollm2.md)."""

    out: str = "discover_real_out"
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    pool: int = 48  # candidate pairs drawn for selection
    selection_samples: int = 32
    max_pass_rate: float = 0.10
    questions: int = 8
    runs_per_question: int = 3
    time_limit: float = 0.0  # seconds: start no new question after this (0: no limit)
    target_p: float = 0.5
    bootstrap_samples: int = 2000
    threads: int = 2
    config: DiscoverConfig = field(
        default_factory=lambda: DiscoverConfig(
            budget=16,
            learning_rate=1e-5,
            topk=100,
            max_new_tokens=4,
            max_context_tokens=160,
            entry_template=ENTRY_TEMPLATE,
            teacher_template=TEACHER_TEMPLATE,
        )
    )


def select(model, tok, s: RealSettings) -> tuple[list[tuple[int, int]], list[float], float]:
    rng = random.Random(s.seed)
    pairs = [(rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)) for _ in range(s.pool)]
    rates = pass_rates(model, tok, pairs, s.selection_samples, s.config.max_new_tokens, seed=10_000 + s.seed)
    lo = 1 / s.selection_samples
    chosen = [(p, r) for p, r in zip(pairs, rates) if lo - 1e-12 <= r <= s.max_pass_rate + 1e-12]
    mean_all = sum(rates) / len(rates)
    return [p for p, _ in chosen], [r for _, r in chosen], mean_all


def run(s: RealSettings | None = None) -> str:
    from . import models
    from .runtime import limit_threads, quiet_libraries, versions

    s = s or RealSettings()
    limit_threads(s.threads)
    quiet_libraries()
    os.makedirs(s.out, exist_ok=True)
    start = time.time()
    model, tok = models.load(MODEL)
    env = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    questions, rates, pool_rate = select(model, tok, s)
    sel_seconds = time.time() - start
    print(f"pool pass rate {pool_rate:.3f}; {len(questions)} questions qualify ({sel_seconds:.0f}s)", flush=True)
    questions, rates = questions[: s.questions], rates[: s.questions]
    records = []
    for qi, ((a, b), rate) in enumerate(zip(questions, rates)):
        if s.time_limit and qi and time.time() - start > s.time_limit:
            print(f"time limit: stopping after {qi} questions", flush=True)
            break
        for r in range(s.runs_per_question):
            run_seed = s.seed * 1_000_003 + qi * 1009 + r
            for m in s.methods:
                res = discover(model, tok, prompt(a, b), make_verifier(a, b), m, s.config, run_seed)
                records.append(
                    {
                        "question": f"{a} + {b}",
                        "selection_pass_rate": rate,
                        "run": r,
                        "method": m,
                        "first_success": res.first_success,
                        "attempts_used": res.attempts_used,
                        "sdpo_steps": res.sdpo_steps,
                        "seconds": round(res.seconds, 2),
                        "completions": res.completions,
                        "feedbacks": res.feedbacks,
                    }
                )
                print(f"{a}+{b} run {r} {m}: {res.first_success} ({res.seconds:.1f}s)", flush=True)
    for r in records:
        r["model_seed"] = 0  # per_question_table keys on (model_seed, question)
    table = per_question_table(records, s.methods)
    analysis = analyse(table, s.config.budget, s.target_p, s.bootstrap_samples)
    line = verdict(analysis, s.runs_per_question)
    wall = round(time.time() - start, 1)
    seconds = {m: round(sum(r["seconds"] for r in records if r["method"] == m), 1) for m in s.methods}
    payload = {
        "verdict": line,
        "wall_seconds": wall,
        "selection_seconds": round(sel_seconds, 1),
        "method_seconds": seconds,
        "pool_pass_rate": pool_rate,
        "versions": env,
        "settings": asdict(s),
        "analysis": analysis,
        "records": records,
    }
    with open(os.path.join(s.out, "discovery-smollm2.json"), "w") as f:
        json.dump(payload, f, indent=1)
    n_q = analysis["questions"]
    plot(analysis, os.path.join(s.out, "discovery-smollm2.png"), f"SmolLM2-135M-Instruct, {n_q} hard additions")
    print(f"wrote {s.out} in {wall:.0f}s")
    print(line)
    return line


def main(argv: list[str] | None = None) -> None:
    s = RealSettings()
    p = argparse.ArgumentParser(prog="python -m sdpo.discover_real", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=s.out)
    for name in ("seed", "pool", "selection_samples", "questions", "runs_per_question", "threads"):
        p.add_argument(f"--{name}", type=int, default=getattr(s, name))
    for name in ("max_pass_rate", "time_limit", "target_p"):
        p.add_argument(f"--{name}", type=float, default=getattr(s, name))
    p.add_argument("--bootstrap_samples", type=int, default=s.bootstrap_samples)
    p.add_argument("--methods", nargs="+", default=list(s.methods), choices=METHODS)
    p.add_argument("--budget", type=int, default=s.config.budget)
    p.add_argument("--learning_rate", type=float, default=s.config.learning_rate)
    p.add_argument("--max_new_tokens", type=int, default=s.config.max_new_tokens)
    a = p.parse_args(argv)
    c = s.config
    c.budget, c.learning_rate, c.max_new_tokens = a.budget, a.learning_rate, a.max_new_tokens
    s = RealSettings(
        out=a.out,
        methods=tuple(a.methods),
        **{k: getattr(a, k) for k in ("seed", "pool", "selection_samples", "questions", "runs_per_question")},
        **{k: getattr(a, k) for k in ("threads", "max_pass_rate", "time_limit", "target_p", "bootstrap_samples")},
        config=c,
    )
    run(s)


if __name__ == "__main__":
    main()
