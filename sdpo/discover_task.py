"""The offline test-time discovery task for `sdpo discover`: reverse a 5-letter string, feedback = a failing test.

Question: a string over "abcdef", e.g. prompt "cafeb>"; the answer is the string reversed ("befac"). Reward 1
for an exact answer, else 0 (binary). On a wrong answer the verifier returns what a failing positional test
prints: one mark per position of the attempt, `.` where the attempt's letter is right and `x` where it is wrong
(e.g. attempt "bedac" -> ".x.x."); a wrong length, or a letter past the answer's end, is `x` as well.

Why the feedback is fair. It never contains a letter of the answer: for a right position it confirms a letter
the attempt already produced, for a wrong one it only rules out the attempted letter (one of the 6), so a solver
that ignores the question still needs several rounds per position, and one that copies text from its context
gets nothing it did not write itself. The multi-turn baseline therefore cannot copy the answer from its context;
it must combine the marks with what it knows about reversal, which is exactly what SDPO's self-teacher does.

The model. `build_task_model` builds the char tokenizer and the tiny Llama of `sdpo.tiny` and gives it a short
supervised warm-up on training strings only: direct answers for a share of them (a weak prior on reversal) and
answers after 1..`history` earlier wrong attempts with their marks (so the model can read feedback in context:
both the self-teacher and the multi-turn baseline rely on that). The questions are held-out strings (never seen
in the warm-up) on which the warmed-up model's sampled success rate, estimated with its own samples and seed, is
at most `max_pass_rate` (hard questions: most best-of-k draws fail) and at least `min_pass_rate` (not
impossible: a question the model can never produce measures nothing).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

ALPHABET = "abcdef"
RIGHT, WRONG = ".", "x"
# The compact templates the warm-up teaches (a char-level model pays per character): an earlier attempt and its
# marks, e.g. "bedac:.x.x.;", then the question. Passed to `DiscoverConfig` by the benchmark.
ENTRY_TEMPLATE = "{attempt}:{feedback};"
TEACHER_TEMPLATE = "{history}{prompt}"
TOKEN_CHARS = ALPHABET + ">:;" + RIGHT + WRONG


@dataclass
class TaskSettings:
    """The tiny model, its warm-up and the question selection (defaults: the committed run, docs/discover.md)."""

    length: int = 5  # letters per string (6**5 = 7776 strings)
    hidden: int = 64
    layers: int = 2
    train_fraction: float = 0.5  # share of the strings the warm-up may use; the rest is held out
    direct_fraction: float = 0.01  # share of the training strings whose direct answer the warm-up shows
    history: int = 3  # the warm-up shows 1..history earlier attempts in context (the multi-turn budget is sized so)
    wrong_rate: float = 0.5  # per position, the chance that a warm-up attempt's letter is wrong
    warmup_steps: int = 600
    warmup_batch: int = 32
    warmup_lr: float = 2e-3
    selection_samples: int = 64  # samples per held-out string to estimate its pass rate (own seed)
    max_pass_rate: float = 0.05
    min_pass_rate: float = 1 / 64
    selection_pool: int = 800  # held-out strings scanned (in their shuffled order) for hard questions


def reverse_prompt(s: str) -> str:
    return f"{s}>"


def positional_feedback(attempt: str, answer: str) -> str:
    """One mark per attempted position: `.` right letter, `x` wrong (or past the answer's end); "" when empty.

    Missing trailing letters are reported by the marks' length (shorter than the answer), never by content."""
    return "".join(RIGHT if i < len(answer) and c == answer[i] else WRONG for i, c in enumerate(attempt))


def make_verifier(answer: str) -> Callable[[str], tuple[float, str]]:
    """The verifier of one question: completion text -> (reward 1.0/0.0, feedback marks; "" on success)."""

    def verify(completion: str) -> tuple[float, str]:
        attempt = completion.strip()
        if attempt == answer:
            return 1.0, ""
        return 0.0, positional_feedback(attempt, answer) or WRONG

    return verify


def split_strings(settings: TaskSettings, seed: int) -> tuple[list[str], list[str]]:
    """(train, held_out): all strings over ALPHABET of `length` letters, shuffled by `seed`."""
    strings = ["".join(p) for p in itertools.product(ALPHABET, repeat=settings.length)]
    random.Random(seed).shuffle(strings)
    n_train = int(len(strings) * settings.train_fraction)
    return strings[:n_train], strings[n_train:]


def _corrupt(answer: str, rng: random.Random, wrong_rate: float) -> str:
    """A wrong attempt: each letter replaced by another with probability `wrong_rate` (at least one replaced)."""
    letters = list(answer)
    wrong = [i for i in range(len(letters)) if rng.random() < wrong_rate] or [rng.randrange(len(letters))]
    for i in wrong:
        letters[i] = rng.choice([c for c in ALPHABET if c != answer[i]])
    return "".join(letters)


def warmup_example(s: str, rng: random.Random, settings: TaskSettings, direct: bool) -> tuple[str, str, list[str]]:
    """(prompt, answer, marks) for the warm-up: the question alone (`direct`) or after 1..history wrong attempts.

    `marks[j]` says what the warm-up teaches at answer position j: "" (the letter: a direct example), "="
    (the letter, copied from an earlier attempt that had it right) or the letters earlier attempts had wrong there
    (no letter is taught, only to avoid those: the feedback must not teach reversal itself)."""
    answer = s[::-1]
    if direct:
        return reverse_prompt(s), answer, [""] * len(answer)
    entries, right, wrong = [], set(), [set() for _ in answer]
    for _ in range(rng.randint(1, settings.history)):
        attempt = _corrupt(answer, rng, settings.wrong_rate)
        marks = positional_feedback(attempt, answer)
        entries.append(ENTRY_TEMPLATE.format(attempt=attempt, feedback=marks))
        for j, m in enumerate(marks):
            (right.add(j) if m == RIGHT else wrong[j].add(attempt[j]))
    marks = ["=" if j in right else "".join(sorted(wrong[j])) for j in range(len(answer))]
    return TEACHER_TEMPLATE.format(history="".join(entries), prompt=reverse_prompt(s)), answer, marks


def warm_up(model, tok, train: list[str], settings: TaskSettings, seed: int) -> list[float]:
    """Supervised warm-up (AdamW); returns the per-step losses.

    Half of each batch are direct answers (cross-entropy on the answer + eos) drawn from the `direct_fraction`
    subset: a weak prior on reversal. The other half read feedback on any training string: cross-entropy only
    where an earlier attempt had the letter right (copy it), and at the other positions an unlikelihood term
    -log(1 - p(letter)) for each letter an earlier attempt had wrong there (avoid it). No letter the feedback
    does not show is ever a target there, so reading feedback is learned without learning the task from it."""
    rng = random.Random(seed)
    direct = train[: max(1, int(len(train) * settings.direct_fraction))]
    opt = torch.optim.AdamW(model.parameters(), lr=settings.warmup_lr)
    vocab = len(tok)
    model.train()
    losses = []
    for _ in range(settings.warmup_steps):
        batch = [warmup_example(rng.choice(direct), rng, settings, True) for _ in range(settings.warmup_batch // 2)]
        batch += [warmup_example(rng.choice(train), rng, settings, False) for _ in range(settings.warmup_batch // 2)]
        rows = []
        for p, a, marks in batch:
            p_ids = tok(p)["input_ids"]
            a_ids = [*tok(a)["input_ids"], tok.eos_token_id]
            label = [t if m in ("", "=") else -100 for t, m in zip(a_ids, [*marks, ""])]
            avoid = [tok.convert_tokens_to_ids(list(m)) if m not in ("", "=") else [] for m in marks] + [[]]
            rows.append((p_ids + a_ids, [-100] * len(p_ids) + label, [[]] * len(p_ids) + avoid))
        n = max(len(r[0]) for r in rows)
        pad = lambda x, v, n=n: [v] * (n - len(x)) + x  # left padding, as generation sees prompts
        input_ids = torch.tensor([pad(r[0], tok.pad_token_id) for r in rows])
        attn = torch.tensor([pad([1] * len(r[0]), 0) for r in rows])
        labels = torch.tensor([pad(r[1], -100) for r in rows])
        banned = torch.zeros(len(rows), n, vocab)
        for b, r in enumerate(rows):
            for t, letters in enumerate(pad(r[2], [])):
                banned[b, t, letters] = 1.0
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding: count attended tokens only
        logits = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids).logits.float()
        # Token t predicts token t+1: shift the targets (labels, banned letters) left by one.
        logp = torch.log_softmax(logits[:, :-1], -1)
        target, ban = labels[:, 1:], banned[:, 1:]
        ce = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)[target >= 0].sum()
        ul = -(torch.log1p(-logp.exp().clamp(max=1 - 1e-6)) * ban).sum()
        loss = (ce + ul) / ((target >= 0).sum() + ban.sum()).clamp(min=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def build_task_model(settings: TaskSettings, seed: int):
    """(model, tokenizer, train, held_out): the tiny Llama of `sdpo.tiny`, warmed up on `train` (seeded by `seed`)."""
    from .tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer(TOKEN_CHARS)
    model = build_tiny_model(tok, hidden_size=settings.hidden, num_layers=settings.layers, seed=seed)
    train, held_out = split_strings(settings, seed)
    warm_up(model, tok, train, settings, seed)
    return model, tok, train, held_out


@torch.no_grad()
def pass_rates(model, tok, strings: list[str], samples: int, seed: int, prompt_prefix: str = "") -> list[float]:
    """Per string, the share of `samples` temperature-1 samples that are exact (`prompt_prefix` + question)."""
    from .discover import sample_batch  # (sdpo.discover imports this module at its top)

    rates = []
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        for chunk in range(0, len(strings), 16):
            part = strings[chunk : chunk + 16]
            prompts = [prompt_prefix + reverse_prompt(s) for s in part]
            for s, got in zip(part, sample_batch(model, tok, prompts, samples, max_new_tokens=len(part[0]) + 2)):
                rates.append(sum(t.strip() == s[::-1] for t in got) / samples)
    return rates


def select_questions(
    model, tok, held_out: list[str], settings: TaskSettings, count: int, seed: int
) -> tuple[list[str], list[float]]:
    """Up to `count` hard held-out strings: estimated pass rate in [min_pass_rate, max_pass_rate].

    The estimate uses its own seed (`seed` + 7919), so the samples that select a question are not the ones that
    later measure it. Scans the first `selection_pool` held-out strings in their shuffled order."""
    candidates = held_out[: settings.selection_pool]
    rates = pass_rates(model, tok, candidates, settings.selection_samples, seed + 7919)
    picked = [(s, r) for s, r in zip(candidates, rates) if settings.min_pass_rate <= r <= settings.max_pass_rate]
    picked = picked[:count]
    return [s for s, _ in picked], [r for _, r in picked]


def feedback_lift(model, tok, questions: list[str], settings: TaskSettings, seed: int) -> list[float]:
    """Per question, the pass rate after one random wrong attempt and its marks in context (vs the bare question's
    `selection_pass_rate`): how much the warmed-up model gets out of one failing test's output."""
    rng = random.Random(seed + 104729)
    rates = []
    for q in questions:
        attempt = _corrupt(q[::-1], rng, settings.wrong_rate)
        entry = ENTRY_TEMPLATE.format(attempt=attempt, feedback=positional_feedback(attempt, q[::-1]))
        rates += pass_rates(model, tok, [q], settings.selection_samples, seed + 7919, prompt_prefix=entry)
    return rates
