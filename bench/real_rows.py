"""Real logit rows of SmolLM2-135M-Instruct: student and feedback-conditioned teacher logits at sampled tokens.

```python
from real_rows import collect          # bench/ on sys.path (as bench/conftest.py puts it)

rows = collect(16, dtype=torch.bfloat16, seed=0)
rows["student"], rows["teacher"]       # [16, 49152] bf16: the logits that predicted rows["token"]
```

What a row is, as SDPO's self-teacher makes it. For each prompt a completion is sampled at temperature 1 (no
top-k / top-p) from the *student* prompt, token by token with a seeded `torch.Generator`, until `<|im_end|>`
or the kind's token budget. The student logits of a row are the model's logits at one completion position
(those that predicted the completion token there) under the student prompt; the teacher logits are the same
model's logits at the same completion token, teacher-forced under the *teacher* prompt, which prepends a
system turn holding feedback or a worked solution (the format of `sdpo.real_task.REPROMPT`). Rows are drawn
(seeded, without replacement) from every position of every completion, the EOS token included, in equal
shares of the kinds, in the order of `kinds`.

Kinds:

- "math": `sdpo.real_task` two-digit additions (prefilled "a + b =" assistant turn); the teacher prompt is
  `real_task.teacher_prompt(a, b)` (the verifier's worked column check in a system turn).
- "prose": short open questions (`PROSE` below); the teacher sees a model answer written here.
- "python": small function-writing requests with the assistant turn prefilled with a code fence (`PYTHON`);
  the teacher sees a correct solution.

`old_logp` (the rollout log-prob that the IS clip compares against) is simulated: the current log-prob of the
token plus `OLD_LOGP_NOISE` N(0, 1) (seeded), i.e. a rollout policy a few updates behind, so that at
`is_clip=2` some IS weights are clipped and others fall below 1 (with the exact current log-prob every
weight would be 1 and the clip would never act).

Everything runs on CPU, one sequence at a time (no padding, so no position-id question), with the KV cache.
Measured on 2 shared CPU cores under load: ~4 min for 8 fp32 rows, ~7.5 min for 16 bf16 rows (bf16 matmuls
are slow on CPUs without bf16 units).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

MODEL = "smollm2-135m-instruct"
KINDS = ("math", "prose", "python")
OLD_LOGP_NOISE = 0.7  # std of the simulated rollout log-prob offset (as tests/test_triton.py's inputs)
MAX_NEW_TOKENS = {"math": 8, "prose": 24, "python": 24}  # completion budget per kind
PROMPTS_PER_KIND = 4

# The teacher prompt: a system turn before the student's whole ChatML text (sdpo.real_task.REPROMPT's format).
_TEACHER = "<|im_start|>system\n{context}<|im_end|>\n{prompt}"
_USER = "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{prefill}"

# (question, feedback the teacher reads): the feedback is a model answer, as a successful sibling would give.
PROSE: tuple[tuple[str, str], ...] = (
    (
        "Describe the sea in two sentences.",
        "A good answer is concrete: The sea is a vast body of salt water that covers most of the Earth. "
        "Its waves rise and fall with the wind and the tides.",
    ),
    (
        "Why do leaves change colour in autumn? Answer briefly.",
        "A correct answer: In autumn trees stop making chlorophyll, so the green fades and the yellow and red "
        "pigments in the leaves show.",
    ),
    (
        "Write a short thank-you note to a teacher.",
        "A good note is warm and specific: Dear Ms. Lee, thank you for your patience this year. Your lessons "
        "made me enjoy reading again.",
    ),
    (
        "What is a good way to start the morning?",
        "A good answer gives one clear habit and why: Drink a glass of water and take a short walk; the light "
        "and movement wake you up.",
    ),
)
PYTHON: tuple[tuple[str, str], ...] = (
    (
        "Write a Python function square(x) that returns the square of x.",
        "A correct solution:\n```python\ndef square(x):\n    return x * x\n```",
    ),
    (
        "Write a Python function is_even(n) that returns True when n is even.",
        "A correct solution:\n```python\ndef is_even(n):\n    return n % 2 == 0\n```",
    ),
    (
        "Write a Python function reverse(s) that returns the string s reversed.",
        "A correct solution:\n```python\ndef reverse(s):\n    return s[::-1]\n```",
    ),
    (
        "Write a Python function total(xs) that returns the sum of a list of numbers.",
        "A correct solution:\n```python\ndef total(xs):\n    result = 0\n    for x in xs:\n        result += x\n"
        "    return result\n```",
    ),
)


@dataclass(frozen=True)
class PromptPair:
    """One prompt of a kind: the student's ChatML text and the teacher's (feedback prepended)."""

    kind: str
    student: str
    teacher: str


def prompts(kind: str, seed: int = 0) -> list[PromptPair]:
    """The `PROMPTS_PER_KIND` prompt pairs of `kind` ("math": operand pairs drawn by `real_task.split(seed)`)."""
    if kind == "math":
        from sdpo import real_task

        pairs, _ = real_task.split(seed, PROMPTS_PER_KIND, 0)
        return [PromptPair(kind, real_task.prompt(a, b), real_task.teacher_prompt(a, b)) for a, b in pairs]
    table, prefill = {"prose": (PROSE, ""), "python": (PYTHON, "```python\n")}.get(kind, (None, None))
    if table is None:
        raise ValueError(f"unknown row kind {kind!r}; known kinds: {', '.join(KINDS)}")
    out = []
    for question, context in table[:PROMPTS_PER_KIND]:
        student = _USER.format(question=question, prefill=prefill)
        out.append(PromptPair(kind, student, _TEACHER.format(context=context, prompt=student)))
    return out


@torch.no_grad()
def _completion_logits(model: Any, prompt_ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """[M, V] logits (model dtype) that predicted each of the M completion tokens after `prompt_ids` [P]."""
    ids = torch.cat([prompt_ids, completion])[None]
    logits = model(input_ids=ids).logits[0]
    p = prompt_ids.numel()
    return logits[p - 1 : p - 1 + completion.numel()]


@torch.no_grad()
def _sample(model: Any, prompt_ids: torch.Tensor, max_new: int, eos: int, gen: torch.Generator) -> torch.Tensor:
    """[M] int64 completion sampled at temperature 1 (full softmax in float32), ending at `eos` or `max_new`.

    Incremental decoding with the KV cache (a full re-forward per token costs ~60x more on CPU)."""
    out: list[int] = []
    step = model(input_ids=prompt_ids[None], use_cache=True)
    for _ in range(max_new):
        token = int(torch.multinomial(torch.softmax(step.logits[0, -1].float(), -1), 1, generator=gen))
        out.append(token)
        if token == eos:
            break
        # transformers 5.x names the cache `cache` (`past_key_values` is deprecated there); 4.x only knows the latter.
        cache = getattr(step, "cache", None)
        kw = {"cache": cache} if cache is not None else {"past_key_values": step.past_key_values}
        step = model(input_ids=torch.tensor([[token]]), use_cache=True, **kw)
    return torch.tensor(out, dtype=torch.long)


def collect(
    n_rows: int,
    *,
    kinds: tuple[str, ...] = KINDS,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    model: Any = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """`n_rows` real rows: student / teacher logits of SmolLM2-135M-Instruct at sampled completion tokens.

    Args:
        n_rows: rows to return (split as evenly as possible over `kinds`, the first kinds get one more).
        kinds: subset of `KINDS`, in the order the rows come back.
        seed: seeds the math operands, the sampling, the row draw and the simulated `old_logp`.
        dtype: the model's parameter dtype (float32 or bfloat16); the logits come back in it, as a trainer
            running the model in that dtype sees them.
        model, tokenizer: an already loaded `sdpo.models.load(MODEL, dtype=dtype)` pair (loaded when None).

    Returns:
        dict with
            "student", "teacher": [N, V] `dtype` logits (V = 49152) at the same completion token;
            "token": [N] int64, the sampled completion token at the row (the label; `completion_ids`);
            "logp": [N] float32, log_softmax(student)[token] computed in float64 from the returned logits;
            "old_logp": [N] float32, logp + OLD_LOGP_NOISE * N(0, 1) (simulated rollout log-prob);
            "kind": list[str] of N labels; "position": [N] int64 index of the row in its completion;
            "prompt": [N] int64 index of the row's prompt in "prompts"; "prompts": list[PromptPair] (as dicts);
            "completions": list[list[int]], the sampled completion of each prompt; "completion_text": decoded;
            "meta": how it was made (model, dtype, seed, versions).
    """
    if n_rows < 1:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    if model is None or tokenizer is None:
        from sdpo import models

        model, tokenizer = models.load(MODEL, dtype=dtype)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    draw = random.Random(seed)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    encode = lambda text: torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)

    share = [n_rows // len(kinds) + (i < n_rows % len(kinds)) for i in range(len(kinds))]
    all_prompts: list[PromptPair] = []
    completions: list[list[int]] = []
    student_rows, teacher_rows, tokens, kind_of, positions, prompt_of = [], [], [], [], [], []
    for kind, wanted in zip(kinds, share):
        candidates = []  # (prompt index, position) of every completion token of this kind
        cached = {}
        for pair in prompts(kind, seed):
            s_ids, t_ids = encode(pair.student), encode(pair.teacher)
            completion = _sample(model, s_ids, MAX_NEW_TOKENS[kind], eos, gen)
            j = len(all_prompts)
            all_prompts.append(pair)
            completions.append(completion.tolist())
            cached[j] = (_completion_logits(model, s_ids, completion), _completion_logits(model, t_ids, completion))
            candidates += [(j, m) for m in range(completion.numel())]
        if wanted > len(candidates):
            raise ValueError(f"{kind}: {wanted} rows wanted, only {len(candidates)} completion tokens sampled")
        for j, m in sorted(draw.sample(candidates, wanted)):
            student_rows.append(cached[j][0][m])
            teacher_rows.append(cached[j][1][m])
            tokens.append(completions[j][m])
            kind_of.append(kind)
            positions.append(m)
            prompt_of.append(j)

    student = torch.stack(student_rows).to(dtype).contiguous()
    teacher = torch.stack(teacher_rows).to(dtype).contiguous()
    token = torch.tensor(tokens, dtype=torch.long)
    logp = torch.log_softmax(student.double(), -1).gather(-1, token[:, None]).squeeze(-1)
    noise = torch.randn(len(tokens), generator=gen, dtype=torch.float64)
    return {
        "student": student,
        "teacher": teacher,
        "token": token,
        "logp": logp.float(),
        "old_logp": (logp + OLD_LOGP_NOISE * noise).float(),
        "kind": kind_of,
        "position": torch.tensor(positions, dtype=torch.long),
        "prompt": torch.tensor(prompt_of, dtype=torch.long),
        "prompts": [vars(p) for p in all_prompts],
        "completions": completions,
        "completion_text": [tokenizer.decode(c) for c in completions],
        "meta": meta(dtype=dtype, seed=seed, n_rows=n_rows, kinds=kinds),
    }


def meta(**fields: Any) -> dict[str, Any]:
    """How rows were made: the model, its cache marker, library versions, the sampling settings, plus `fields`."""
    import datetime
    import json
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from sdpo import models

    out: dict[str, Any] = {"model": MODEL, "model_description": models.OFFLINE_MODELS[MODEL]}
    try:
        out["model_cache_marker"] = json.loads((models.cache_path(MODEL) / models.MARKER).read_text())
    except (OSError, ValueError):
        out["model_cache_marker"] = None
    out["versions"] = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for pkg in ("transformers", "trl", "sdpo-kernels"):
        try:
            out["versions"][pkg] = version(pkg)
        except PackageNotFoundError:
            out["versions"][pkg] = None
    out["sampling"] = "temperature 1, full softmax in float32, torch.multinomial with a seeded torch.Generator"
    out["max_new_tokens"] = dict(MAX_NEW_TOKENS)
    out["old_logp"] = f"logp + {OLD_LOGP_NOISE} * N(0, 1) (simulated rollout log-prob)"
    out["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for k, v in fields.items():
        out[k] = str(v) if isinstance(v, torch.dtype) else list(v) if isinstance(v, tuple) else v
    return out


__all__ = ["KINDS", "MODEL", "PROSE", "PYTHON", "PromptPair", "collect", "meta", "prompts"]
