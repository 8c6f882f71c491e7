"""Test-time SDPO on one question at a time (`sdpo discover`), with best-of-k and multi-turn baselines.

The paper's third claim: on a hard binary-reward question, taking SDPO steps on that question alone, with the
self-teacher re-prompted with the verifier's feedback, discovers a solution in fewer attempts than sampling
independent attempts (best-of-k) or a conversation that accumulates the feedback in the prompt (multi-turn).

    from sdpo.discover import DiscoverConfig, discover
    result = discover(model, tokenizer, "cafeb>", verifier, method="sdpo", config=DiscoverConfig(), seed=0)
    result.first_success  # attempt number (1-based, in sampling order) of the first success, or None

`verifier(completion_text) -> (reward, feedback_text)`; a reward >= `success_threshold` is a success. Methods,
all with the same attempt budget and the same sampler (`temperature`, `max_new_tokens`, full-vocabulary sampling):

- "sdpo": rounds of `attempts_per_round` attempts from the current weights. After a round without a success, each
  failed attempt gets a teacher prompt: `teacher_template` with its own attempt and feedback (`entry_template`)
  before the question (`teacher_context="round"`: also the round's other failed attempts, trimmed oldest first
  to `max_context_tokens`). Then `steps_per_round` AdamW steps on the SDPO loss of `sdpo_kernels` over the
  round's attempts: top-K logit distillation (`linear_self_distillation_loss` on the last hidden states and the
  head weight) by default, the token-level surrogate with `loss_mode="sampled_token"`.
- "best_of_k": independent attempts from the unchanged model (sampled in the same rounds, so with the same seed
  its first round is exactly SDPO's first round).
- "multi_turn": one attempt at a time; attempt n's prompt holds the attempts and feedback of attempts 1..n-1 in
  order before the question, the oldest dropped first until the prompt fits `max_context_tokens` (the official
  lasgroup/SDPO baseline's rule), stopping at the first success.

State never leaks between questions: `discover` snapshots the weights and restores them bit-exactly when it
returns (also on error), and builds a fresh optimizer and teacher copy per question. Everything the run samples
comes from `torch.manual_seed(seed)` inside `torch.random.fork_rng()`: the caller's RNG is left as it was.

The measurement over questions x seeds (discovery curves, bootstrap bands, attempts to reach p, the verdict) is
in `sdpo.discover_stats`; the offline task (tiny model, positional feedback) in `sdpo.discover_task`; the
committed run and every setting in docs/discover.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

import sdpo_kernels

from .discover_task import ENTRY_TEMPLATE, TEACHER_TEMPLATE
from .loss_helpers import distillation_aggregation_weights
from .modeling import head_logits, is_plain_linear_head, padded_position_ids

METHODS = ("sdpo", "best_of_k", "multi_turn")
Verifier = Callable[[str], tuple[float, str]]


@dataclass
class DiscoverConfig:
    """Settings of one test-time discovery run (every method; SDPO-only ones say so). Defaults: the committed
    tiny-model run (docs/discover.md); `learning_rate` and the templates are sized for that char-level model."""

    budget: int = field(
        default=64, metadata={"help": "Attempts per question and method (counted one by one, in sampling order)."}
    )
    attempts_per_round: int = field(
        default=2,
        metadata={
            "help": "SDPO (and best-of-k's sampling batch): attempts sampled from the current weights per round."
        },
    )
    steps_per_round: int = field(
        default=1, metadata={"help": "SDPO: optimizer steps on the round's failed attempts after each failed round."}
    )
    learning_rate: float = field(
        default=3e-4, metadata={"help": "SDPO: AdamW learning rate (no weight decay); sized for the tiny model."}
    )
    teacher: str = field(
        default="current",
        metadata={
            "help": "SDPO self-teacher weights: 'current' (the live student, no gradient; TRL's 'live'), 'ema' (an "
            "EMA of the student, rate `teacher_update_rate`, from the question's initial weights) or 'initial' "
            "(the question's initial weights, frozen)."
        },
    )
    teacher_update_rate: float = field(default=0.05, metadata={"help": "SDPO, teacher='ema': the EMA rate per step."})
    teacher_context: str = field(
        default="own",
        metadata={
            "help": "SDPO: 'own' (each failed attempt's teacher sees its own attempt and feedback) or 'round' "
            "(also the round's other failed attempts, before its own, trimmed to `max_context_tokens`)."
        },
    )
    loss_mode: str = field(
        default="topk_logits",
        metadata={
            "help": "SDPO loss: 'topk_logits' (top-K logit distillation, generalised JSD `alpha`, tail bucket, IS "
            "clip) or 'sampled_token' (the token-level surrogate: reverse KL on the sampled token)."
        },
    )
    topk: int = field(
        default=5, metadata={"help": "SDPO top-K support size (clamped to the vocabulary; 5 of the tiny 14 tokens)."}
    )
    alpha: float = field(
        default=0.5, metadata={"help": "SDPO topk_logits: 0 forward KL, 1 reverse KL, else generalised JSD."}
    )
    add_tail: bool = field(default=True, metadata={"help": "SDPO topk_logits: a tail bucket for the non-top-K mass."})
    is_clip: float | None = field(
        default=2.0, metadata={"help": "SDPO: clip of the importance weight vs the round's sampling policy."}
    )
    fused_linear: bool = field(
        default=True,
        metadata={
            "help": "SDPO: `linear_self_distillation_loss` on the hidden states and head weight (needs a plain "
            "linear head; an error otherwise); False: logits, then `self_distillation_loss`."
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (every method)."})
    max_new_tokens: int = field(default=8, metadata={"help": "Tokens per attempt at most (every method)."})
    success_threshold: float = field(default=1.0, metadata={"help": "A reward at or above it is a success."})
    max_context_tokens: int = field(
        default=42,
        metadata={
            "help": "Multi-turn (and teacher_context='round'): the prompt, feedback history included, is trimmed "
            "oldest entry first to at most this many tokens (the question itself is always kept). 42 = 3 entries of "
            "the tiny task + the question, the history length its warm-up shows."
        },
    )
    entry_template: str = field(
        default=ENTRY_TEMPLATE,
        metadata={"help": "One earlier attempt in a prompt: placeholders {attempt} and {feedback}."},
    )
    teacher_template: str = field(
        default=TEACHER_TEMPLATE,
        metadata={"help": "Prompt with history (teacher and multi-turn): placeholders {history} and {prompt}."},
    )

    def __post_init__(self) -> None:
        if self.budget < 1 or self.attempts_per_round < 1 or self.steps_per_round < 0:
            raise ValueError("budget and attempts_per_round must be >= 1, steps_per_round >= 0")
        if self.teacher not in ("current", "ema", "initial"):
            raise ValueError(f"teacher must be 'current', 'ema' or 'initial', got {self.teacher!r}")
        if self.teacher_context not in ("own", "round"):
            raise ValueError(f"teacher_context must be 'own' or 'round', got {self.teacher_context!r}")
        if self.loss_mode not in ("topk_logits", "sampled_token"):
            raise ValueError(f"loss_mode must be 'topk_logits' or 'sampled_token', got {self.loss_mode!r}")


@dataclass
class DiscoveryResult:
    """One question, one method, one seed.

    `first_success`: 1-based attempt number of the first success, None when the budget ran out. `attempts_used`
    counts the attempts verified: every one up to and including the first success (later samples of the same
    round are discarded unverified), else the whole budget."""

    method: str
    seed: int
    first_success: int | None
    attempts_used: int
    rewards: list[float] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    feedbacks: list[str] = field(default_factory=list)
    rounds: int = 0
    sdpo_steps: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def solved(self) -> bool:
        return self.first_success is not None


# ----------------------------------------------------------------------------------------------
# prompts


def history_prompt(
    prompt: str,
    entries: Sequence[tuple[str, str]],
    tokenizer,
    config: DiscoverConfig,
) -> str:
    """`teacher_template` with the (attempt, feedback) `entries` (oldest first) before `prompt`.

    The oldest entries are dropped first until the whole prompt has at most `max_context_tokens` tokens; the
    newest entries and the question always stay (the question even when it alone exceeds the budget)."""
    kept = list(entries)
    while True:
        history = "".join(config.entry_template.format(attempt=a, feedback=f) for a, f in kept)
        text = config.teacher_template.format(history=history, prompt=prompt)
        if not kept or len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= config.max_context_tokens:
            return text
        kept.pop(0)


def teacher_prompts(prompt: str, failed: Sequence[tuple[str, str]], tokenizer, config: DiscoverConfig) -> list[str]:
    """One teacher prompt per failed (attempt, feedback) of a round (`teacher_context`: own / round)."""
    if config.teacher_context == "own":
        return [history_prompt(prompt, [entry], tokenizer, config) for entry in failed]
    # 'round': the others in sampling order, then its own last (closest to the question, never trimmed first)
    return [
        history_prompt(prompt, [*failed[:i], *failed[i + 1 :], failed[i]], tokenizer, config)
        for i in range(len(failed))
    ]


# ----------------------------------------------------------------------------------------------
# sampling


@torch.no_grad()
def sample(model: nn.Module, tokenizer, prompt: str, n: int, config: DiscoverConfig) -> tuple[list[str], torch.Tensor]:
    """`n` attempts at `prompt` from `model` (temperature `config.temperature`, full vocabulary).

    Returns (texts, completion_ids [n, T] int64): token ids up to and including the first eos, right-padded with
    the pad token; texts are decoded without special tokens."""
    was_training = model.training
    model.eval()
    enc = tokenizer([prompt], return_tensors="pt").to(_device(model))
    out = model.generate(
        **enc,
        max_new_tokens=config.max_new_tokens,
        do_sample=True,
        temperature=config.temperature,
        top_k=0,
        top_p=1.0,
        num_return_sequences=n,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    completion = out[:, enc["input_ids"].size(1) :]
    # generate pads finished rows with pad; keep the eos itself (stopping is part of the policy)
    eos = tokenizer.eos_token_id
    is_eos = completion == eos
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # positions strictly after the first eos
    completion = completion.masked_fill(after, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    return texts, completion


def sample_batch(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    samples: int,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    add_special_tokens: bool = True,
) -> list[list[str]]:
    """`samples` full-vocabulary samples for each of `prompts` in one left-padded `generate` call: per prompt, the
    decoded completions (special tokens dropped). For estimating pass rates (question selection); torch's global
    RNG, no gradient, the model's train/eval mode left as it is."""
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    with torch.no_grad():
        out = model.generate(
            **enc.to(_device(model)),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            num_return_sequences=samples,
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].size(1) :], skip_special_tokens=True)
    return [texts[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _completion_mask(completion_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """[n, T] float: 1 for the attempt's tokens up to and including its eos, 0 for the padding after it."""
    eos = tokenizer.eos_token_id
    is_eos = completion_ids == eos
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0
    pad = completion_ids == tokenizer.pad_token_id
    return (~after & ~(pad & ~is_eos)).float()


# ----------------------------------------------------------------------------------------------
# the SDPO step


def _hidden(model: nn.Module, prompt_ids: list[list[int]], completion_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Last hidden states [n, T, D] at the positions predicting each completion token.

    prompt_ids: n token lists (left-padded here to a common length); completion_ids [n, T] (right-padded)."""
    width = max(map(len, prompt_ids))
    device = completion_ids.device
    prompts = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    ids = torch.cat([prompts, completion_ids], 1)
    # completion padding sits after the tokens it could affect (causal), so every completion position is attended
    mask = torch.cat([prompt_mask, torch.ones_like(completion_ids)], 1)
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=padded_position_ids(mask), use_cache=False)
    t = completion_ids.size(1)
    return out.last_hidden_state[:, width - 1 : width - 1 + t]


def sdpo_loss(
    model: nn.Module,
    teacher: nn.Module,
    tokenizer,
    student_prompt: str,
    teacher_texts: list[str],
    completion_ids: torch.Tensor,
    old_logps: torch.Tensor | None,
    config: DiscoverConfig,
) -> torch.Tensor:
    """The SDPO loss (float32 scalar) of one round: student on `student_prompt` + each attempt, teacher (no
    gradient) on each attempt's teacher prompt + the same attempt; per-sequence token mean, averaged over attempts.

    completion_ids [n, T] int64; old_logps [n, T] (the round's sampling log-probs, for the IS clip) or None."""
    mask = _completion_mask(completion_ids, tokenizer)
    weights = distillation_aggregation_weights(mask, "trl")
    n = completion_ids.size(0)
    s_ids = [tokenizer(student_prompt, add_special_tokens=False)["input_ids"]] * n
    t_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in teacher_texts]
    pad = tokenizer.pad_token_id
    h_s = _hidden(model, s_ids, completion_ids, pad)
    with torch.no_grad():
        h_t = _hidden(teacher, t_ids, completion_ids, pad)
    vocab = model.get_output_embeddings().weight.size(0)
    sampled = config.loss_mode == "sampled_token"
    settings = dict(
        mode=config.loss_mode,
        topk=None if sampled else min(config.topk, vocab),
        alpha=1.0 if sampled else config.alpha,  # the token-level surrogate is reverse KL by definition
        add_tail=config.add_tail,
        is_clip=config.is_clip,
        temperature=config.temperature,
    )
    if config.fused_linear:
        if not (is_plain_linear_head(model) and is_plain_linear_head(teacher)):
            raise ValueError("fused_linear=True needs a plain nn.Linear head (no soft-capping / logit scaling)")
        head_s, head_t = model.get_output_embeddings(), teacher.get_output_embeddings()
        return sdpo_kernels.linear_self_distillation_loss(
            h_s,
            head_s.weight,
            h_t,
            head_t.weight.detach(),
            completion_ids,
            old_logps,
            weights=weights,
            student_bias=head_s.bias,
            teacher_bias=None if head_t.bias is None else head_t.bias.detach(),
            **settings,
        ).loss
    with torch.no_grad():
        t_logits = head_logits(h_t, teacher)
    per_token = sdpo_kernels.self_distillation_loss(
        head_logits(h_s, model), t_logits, completion_ids, old_logps, **settings
    )
    return (per_token.float() * weights).sum()


@torch.no_grad()
def sampled_logps(
    model: nn.Module, tokenizer, prompt: str, completion_ids: torch.Tensor, temperature: float
) -> torch.Tensor:
    """[n, T] float32 log-probs of `completion_ids` under `model` at `temperature` (the sampler's)."""
    ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"]] * completion_ids.size(0)
    logits = head_logits(_hidden(model, ids, completion_ids, tokenizer.pad_token_id), model).float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


class _Teacher:
    """The SDPO self-teacher of one question: the live student, or a copy (frozen initial / EMA)."""

    def __init__(self, model: nn.Module, kind: str, rate: float) -> None:
        self.kind, self.rate, self.student = kind, rate, model
        self.model = model if kind == "current" else copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def after_step(self) -> None:
        if self.kind == "ema":  # θ_t <- (1 - r) θ_t + r θ_s
            for t, s in zip(self.model.parameters(), self.student.parameters()):
                t.lerp_(s.detach().to(t.dtype), self.rate)


# ----------------------------------------------------------------------------------------------
# the loop


def _verify(
    texts: Sequence[str], verifier: Verifier, config: DiscoverConfig, result: DiscoveryResult
) -> list[tuple[str, str]] | None:
    """Verify `texts` in sampling order into `result`, stopping at the first success or at the budget.

    Returns the failed (attempt, feedback) pairs, or None when the question was solved or the budget is spent
    (the loop stops)."""
    failed = []
    for text in texts:
        if result.attempts_used >= config.budget:
            return None
        reward, feedback = verifier(text)
        result.attempts_used += 1
        result.rewards.append(float(reward))
        result.completions.append(text)
        result.feedbacks.append(feedback)
        if float(reward) >= config.success_threshold:
            result.first_success = result.attempts_used
            return None
        failed.append((text, feedback))
    return None if result.attempts_used >= config.budget else failed


def _run_rounds(model, tokenizer, prompt, verifier, config, result, learn: bool) -> None:
    """Best-of-k (`learn=False`) and SDPO (`learn=True`): rounds of `attempts_per_round` attempts."""
    teacher = _Teacher(model, config.teacher, config.teacher_update_rate) if learn else None
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0) if learn else None
    while True:
        n = min(config.attempts_per_round, config.budget - result.attempts_used)
        texts, completion_ids = sample(model, tokenizer, prompt, n, config)
        result.rounds += 1
        failed = _verify(texts, verifier, config, result)
        if failed is None:
            return
        if not learn or config.steps_per_round == 0:
            continue
        prompts = teacher_prompts(prompt, failed, tokenizer, config)
        old = sampled_logps(model, tokenizer, prompt, completion_ids, config.temperature) if config.is_clip else None
        for _ in range(config.steps_per_round):
            loss = sdpo_loss(model, teacher.model, tokenizer, prompt, prompts, completion_ids, old, config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            teacher.after_step()
            result.sdpo_steps += 1
            result.losses.append(loss.item())


def _run_multi_turn(model, tokenizer, prompt, verifier, config, result) -> None:
    history: list[tuple[str, str]] = []
    while True:
        texts, _ = sample(model, tokenizer, history_prompt(prompt, history, tokenizer, config), 1, config)
        result.rounds += 1
        failed = _verify(texts, verifier, config, result)
        if failed is None:
            return
        history.extend(failed)


@contextlib.contextmanager
def restored_state(model: nn.Module):
    """Snapshot the parameters and buffers; restore them bit-exactly on exit (also on error)."""
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training, grads = model.training, [p.requires_grad for p in model.parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(snapshot[k])
        for p, g in zip(model.parameters(), grads):
            p.grad = None
            p.requires_grad_(g)
        model.train(was_training)


def discover(
    model: nn.Module,
    tokenizer,
    prompt: str,
    verifier: Verifier,
    method: str = "sdpo",
    config: DiscoverConfig | None = None,
    seed: int = 0,
) -> DiscoveryResult:
    """Try to solve one question (`prompt`) within `config.budget` attempts with `method` (module docstring).

    `model`: a causal LM (parameters may be float32 or bfloat16); its weights are restored bit-exactly before
    this returns, so consecutive questions start from the same weights. `verifier(text) -> (reward, feedback)`."""
    config = config or DiscoverConfig()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    result = DiscoveryResult(method=method, seed=seed, first_success=None, attempts_used=0)
    start = time.perf_counter()
    devices = [d for d in [_device(model)] if d.type == "cuda"]
    with restored_state(model), torch.random.fork_rng(devices=devices):
        model.eval()  # dropout off throughout (as SDPOConfig's disable_dropout=True); gradients still flow
        torch.manual_seed(seed)
        if method == "multi_turn":
            _run_multi_turn(model, tokenizer, prompt, verifier, config, result)
        else:
            _run_rounds(model, tokenizer, prompt, verifier, config, result, learn=method == "sdpo")
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------
# command line: the offline benchmark (tiny model, positional feedback), docs/discover.md


def main(argv: list[str] | None = None) -> None:
    """`sdpo discover` / `python -m sdpo.discover`: run the benchmark, write discovery.json + discovery.png."""
    from .discover_bench import BenchSettings, run_benchmark
    from .discover_task import TaskSettings

    p = argparse.ArgumentParser(
        prog="sdpo discover",
        description="Test-time SDPO vs best-of-k vs multi-turn on hard questions of a tiny offline task: "
        "discovery curves, attempts to reach a discovery probability, and a verdict.",
    )
    b, c, t = BenchSettings(), DiscoverConfig(), TaskSettings()
    p.add_argument("--out", default=b.out, help="output directory (discovery.json, discovery.png)")
    p.add_argument("--methods", nargs="+", default=list(b.methods), choices=METHODS)
    p.add_argument("--num_seeds", type=int, default=b.num_seeds, help="model seeds (each: own warm-up)")
    p.add_argument("--questions", type=int, default=b.questions, help="hard questions per model seed")
    p.add_argument("--runs_per_question", type=int, default=b.runs_per_question, help="sampling seeds per question")
    p.add_argument("--target_p", type=float, default=b.target_p, help="discovery probability to compare at")
    p.add_argument("--workers", type=int, default=b.workers, help="processes (0: one per usable core)")
    p.add_argument("--bootstrap_samples", type=int, default=b.bootstrap_samples)
    p.add_argument("--warmup_steps", type=int, default=t.warmup_steps)
    for name, f in DiscoverConfig.__dataclass_fields__.items():
        if name in ("entry_template", "teacher_template"):
            continue
        default = getattr(c, name)
        kind = {bool: _bool, float: float, int: int, str: str}[type(default)] if default is not None else float
        p.add_argument(f"--{name}", type=kind, default=default, help=f.metadata.get("help"))
    a = p.parse_args(argv)
    config = DiscoverConfig(**{k: getattr(a, k) for k in DiscoverConfig.__dataclass_fields__ if hasattr(a, k)})
    settings = BenchSettings(
        out=a.out,
        methods=tuple(a.methods),
        num_seeds=a.num_seeds,
        questions=a.questions,
        runs_per_question=a.runs_per_question,
        target_p=a.target_p,
        workers=a.workers,
        bootstrap_samples=a.bootstrap_samples,
        task=TaskSettings(warmup_steps=a.warmup_steps),
        config=config,
    )
    run_benchmark(settings)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


if __name__ == "__main__":
    # `python -m sdpo.discover`: run the imported module's main, so the spawned workers unpickle the settings'
    # classes from `sdpo.discover`, not from this `__main__` copy of the module
    from sdpo.discover import main as _main

    _main()
