"""Teacher-context construction: which rollouts get a reprompted teacher, and with what text.

Pure functions over Python lists (no trainer, no process group), so they are unit-testable; the trainer
gathers the generation groups across processes, calls `select_teachers` on the global batch and
`build_teacher_prompts` for its local slice.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

_THINK_RE = re.compile(r"<think>.*?</think>", flags=re.DOTALL)


def strip_thinking(text: str) -> str:
    """Remove every `<think>...</think>` block (non-greedy, across newlines) and surrounding whitespace."""
    return _THINK_RE.sub("", text).strip()


@dataclass
class TeacherSelection:
    """Per-rollout teacher decisions for a global batch of N rollouts (N = groups × num_generations).

    Attributes:
        demo_index: [N] index of the successful sibling used as demonstration, or None.
        use_feedback: [N] whether the rollout's environment feedback goes into its teacher prompt.
        mask: [N] 1.0 where a teacher context exists (demonstration or feedback), else 0.0.
        metrics: the `self_distillation/*` fractions for this batch.
    """

    demo_index: list[int | None]
    use_feedback: list[bool]
    mask: list[float]
    metrics: dict[str, float] = field(default_factory=dict)


def _has_text(x: Any) -> bool:
    return isinstance(x, str) and x.strip() != ""


def select_teachers(
    rewards: Sequence[float],
    feedbacks: Sequence[Any] | None,
    num_generations: int,
    *,
    success_reward_threshold: float = 1.0,
    use_successful_as_teacher: bool = True,
    dont_reprompt_on_self_success: bool = True,
    include_environment_feedback: bool = False,
    environment_feedback_only_without_solution: bool = False,
) -> TeacherSelection:
    """Choose, for every rollout, a successful sibling from its generation group and/or its feedback.

    Args:
        rewards: [N] total reward of each rollout; groups are consecutive blocks of `num_generations`.
        feedbacks: [N] environment feedback strings (None/empty = unavailable), or None for no feedback.
        num_generations: group size G; N must be a multiple of G.
    Returns:
        TeacherSelection. The demonstration is the first successful sibling (reward ≥ threshold) in group order,
        skipping the rollout itself when `dont_reprompt_on_self_success`.
    """
    n = len(rewards)
    if num_generations < 1 or n % num_generations != 0:
        raise ValueError(f"num_generations={num_generations} must divide the number of rewards ({n}).")
    if feedbacks is not None and len(feedbacks) != n:
        raise ValueError(f"feedbacks has {len(feedbacks)} entries, expected {n} (one per rollout).")
    feedbacks = list(feedbacks) if feedbacks is not None else [None] * n
    success = [float(r) >= success_reward_threshold for r in rewards]  # NaN rewards are never successes

    demo_index: list[int | None] = [None] * n
    use_feedback = [False] * n
    mask = [0.0] * n
    n_success_groups = n_with_solution = n_feedback_available = n_feedback_used = 0
    for g0 in range(0, n, num_generations):
        group = range(g0, g0 + num_generations)
        n_success_groups += any(success[j] for j in group)
        for i in group:
            if use_successful_as_teacher:
                demo_index[i] = next(
                    (j for j in group if success[j] and not (dont_reprompt_on_self_success and j == i)), None
                )
            has_solution = demo_index[i] is not None
            available = _has_text(feedbacks[i])
            use_feedback[i] = (
                include_environment_feedback
                and available
                and not (environment_feedback_only_without_solution and has_solution)
            )
            mask[i] = 1.0 if (has_solution or use_feedback[i]) else 0.0
            n_with_solution += has_solution
            n_feedback_available += available
            n_feedback_used += use_feedback[i]

    denom = max(n, 1)
    metrics = {
        "self_distillation/success_group_fraction": n_success_groups / max(n // num_generations, 1),
        "self_distillation/success_sample_fraction": n_with_solution / denom,
        "self_distillation/feedback_available_fraction": n_feedback_available / denom,
        "self_distillation/feedback_used_fraction": n_feedback_used / denom,
        "self_distillation/reprompt_sample_fraction": sum(mask) / denom,
    }
    return TeacherSelection(demo_index=demo_index, use_feedback=use_feedback, mask=mask, metrics=metrics)


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    last = messages[-1]
    if last.get("role") != "user":
        raise ValueError(
            "Conversational prompts must end with a user turn to build a teacher reprompt; "
            f"the last message has role {last.get('role')!r}."
        )
    content = last.get("content", "")
    if isinstance(content, list):  # multimodal-style content parts: keep the text parts
        return " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content


def reprompt(
    prompt: str | list[dict[str, Any]],
    solution_text: str,
    feedback_text: str,
    reprompt_template: str,
) -> str | list[dict[str, Any]]:
    """Fill `reprompt_template` for one prompt; chats keep earlier turns and rewrite the last user turn."""
    if isinstance(prompt, list):
        text = reprompt_template.format(prompt=_last_user_text(prompt), solution=solution_text, feedback=feedback_text)
        return [*prompt[:-1], {"role": "user", "content": text}]
    return reprompt_template.format(prompt=prompt, solution=solution_text, feedback=feedback_text)


@dataclass(frozen=True)
class RepromptParts:
    """What a teacher prompt was filled from, so that truncation can cut the right part.

    `solution` is the raw demonstration (after thinking removal) or None; `feedback` the raw environment
    feedback or None. The rendered prompt is `render()` with both whole.
    """

    prompt: str | list[dict[str, Any]]
    solution: str | None
    feedback: str | None
    reprompt_template: str
    solution_template: str
    feedback_template: str

    def render(self, solution: str | None = None, feedback: str | None = None) -> str | list[dict[str, Any]]:
        """The teacher prompt with (possibly cut) `solution` / `feedback` text; None keeps the whole part."""
        sol = self.solution if solution is None else solution
        fb = self.feedback if feedback is None else feedback
        solution_text = "" if self.solution is None else self.solution_template.format(successful_previous_attempt=sol)
        feedback_text = "" if self.feedback is None else self.feedback_template.format(feedback_raw=fb)
        return reprompt(self.prompt, solution_text, feedback_text, self.reprompt_template)


class TeacherPrompts(list):
    """`build_teacher_prompts`' result: a plain list of prompts, plus `parts[k]` (a `RepromptParts`, or None
    where the rollout has no teacher and keeps its prompt) for `tokenize_teacher_prompts`' truncation."""

    def __init__(self, prompts: Sequence[Any] = (), parts: Sequence[RepromptParts | None] | None = None):
        super().__init__(prompts)
        self.parts: list[RepromptParts | None] = list(parts) if parts is not None else [None] * len(self)


class TeacherPromptIds(list):
    """`tokenize_teacher_prompts`' result: a plain list of token-id lists, plus truncation counts.

    Attributes:
        num_truncated: teacher prompts longer than `max_reprompt_len` (rows without a teacher, whose prompt
            is the original one and which are masked out, are cut from the left and not counted).
        tokens_cut: tokens removed from those prompts in total.
        num_fallback: of those, the prompts cut from the left because even their template, instruction and
            question did not fit (or no parts were known).
    """

    def __init__(
        self, ids: Sequence[list[int]] = (), num_truncated: int = 0, tokens_cut: int = 0, num_fallback: int = 0
    ):
        super().__init__(ids)
        self.num_truncated, self.tokens_cut, self.num_fallback = num_truncated, tokens_cut, num_fallback

    @property
    def truncated_frac(self) -> float:
        return self.num_truncated / max(len(self), 1)


def build_teacher_prompts(
    prompts: Sequence[str | list[dict[str, Any]]],
    completions: Sequence[str],
    feedbacks: Sequence[Any] | None,
    selection: TeacherSelection,
    indices: Sequence[int],
    *,
    reprompt_template: str,
    solution_template: str,
    feedback_template: str,
    remove_thinking_from_demonstration: bool = False,
) -> TeacherPrompts:
    """Teacher prompts for the rollouts `indices` of the global batch.

    Args:
        prompts: [N] global prompts (plain strings or message lists).
        completions: [N] global decoded completions (demonstration sources).
        feedbacks: [N] global feedback strings or None.
        selection: `select_teachers` output for the same global batch.
        indices: global indices of the rollouts to build (this process's slice).
    Returns:
        One prompt per index (a `TeacherPrompts` list, which also keeps each prompt's parts); rollouts without
        a teacher keep their original prompt (their rows are masked out).
    """
    out: list[str | list[dict[str, Any]]] = []
    parts: list[RepromptParts | None] = []
    for i in indices:
        demo, use_fb = selection.demo_index[i], selection.use_feedback[i]
        if demo is None and not use_fb:
            out.append(prompts[i])
            parts.append(None)
            continue
        demo_text = None
        if demo is not None:
            demo_text = completions[demo]
            if remove_thinking_from_demonstration:
                demo_text = strip_thinking(demo_text)
        p = RepromptParts(
            prompts[i],
            demo_text,
            feedbacks[i] if use_fb else None,
            reprompt_template,
            solution_template,
            feedback_template,
        )
        out.append(p.render())
        parts.append(p)
    return TeacherPrompts(out, parts)


def _encode(processing_class: Any, prompts: Sequence[Any], chat_template_kwargs: dict[str, Any] | None) -> list:
    if isinstance(prompts[0], list):
        return processing_class.apply_chat_template(
            conversation=list(prompts),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(chat_template_kwargs or {}),
        )["input_ids"]
    return processing_class(text=list(prompts))["input_ids"]


def _n_plain(processing_class: Any, text: str) -> int:
    return len(processing_class(text=text, add_special_tokens=False)["input_ids"]) if text else 0


def _longest_fitting(processing_class: Any, text: str, budget: int, keep_end: bool) -> str:
    """The longest prefix (or, with `keep_end`, suffix) of `text` of at most `budget` tokens, by bisection
    over characters (cuts never split a character, whatever the tokenizer)."""
    if budget <= 0:
        return ""
    lo, hi = 0, len(text)  # invariant: a cut keeping `lo` characters fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        piece = text[len(text) - mid :] if keep_end else text[:mid]
        if _n_plain(processing_class, piece) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[len(text) - lo :] if keep_end else text[:lo]


_warned_fallback = False


def _fit(processing_class: Any, p: RepromptParts, max_len: int, kwargs: dict[str, Any] | None) -> list[int] | None:
    """Ids of `p` with its solution / feedback cut to fit `max_len` tokens, or None if the rest does not fit.

    The rule: the chat template (header, system and earlier turns), the instruction and the question, and the
    solution / feedback templates' own text, are kept whole. The demonstration keeps its BEGINNING (the teacher
    reads it in order, and the student's completion it scores starts where the demonstration starts: a cut end
    reads as an unfinished solution, a cut start as steps without their setup); the feedback keeps its END
    (tracebacks, compilers and test runners report the decisive error last, after echoed logs). With both
    present each gets half of the room left, and either one's unused half goes to the other.
    """
    skeleton = _encode(processing_class, [p.render("", "")], kwargs)[0]  # both parts emptied
    room = max_len - len(skeleton)
    if room < 0:
        return None
    n_sol = _n_plain(processing_class, p.solution or "")
    n_fb = _n_plain(processing_class, p.feedback or "")
    for _ in range(4):  # tokens merging across part boundaries can overshoot by a few: shrink and retry
        k_sol = min(n_sol, max(room - n_fb, room // 2)) if p.feedback is not None else min(n_sol, room)
        k_fb = min(n_fb, room - k_sol)
        sol = _longest_fitting(processing_class, p.solution, k_sol, keep_end=False) if p.solution is not None else None
        fb = _longest_fitting(processing_class, p.feedback, k_fb, keep_end=True) if p.feedback is not None else None
        ids = list(_encode(processing_class, [p.render(sol, fb)], kwargs)[0])
        if len(ids) <= max_len:
            return ids
        room -= len(ids) - max_len
        if room < 0:
            return None
    return None


def tokenize_teacher_prompts(
    processing_class: Any,
    prompts: Sequence[str | list[dict[str, Any]]],
    max_reprompt_len: int,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> TeacherPromptIds:
    """Token ids of each teacher prompt, at most `max_reprompt_len` of them (a `TeacherPromptIds` list).

    Conversational prompts go through the chat template with a generation prompt, like the student's prompts.
    Prompts that fit are tokenized as they are (what TRL does). A longer teacher prompt built by
    `build_teacher_prompts` (whose `parts` are known) keeps its template, instruction and question whole and
    has its demonstration / feedback cut (see `_fit` for which ends, and why); if even those do not fit, or
    the parts are unknown (a plain list of prompts, or a rollout without a teacher), it keeps its LAST
    `max_reprompt_len` tokens (left truncation, TRL's rule), with a warning once for teacher prompts.
    """
    global _warned_fallback
    if len(prompts) == 0:
        return TeacherPromptIds()
    ids = [list(x) for x in _encode(processing_class, prompts, chat_template_kwargs)]
    parts = getattr(prompts, "parts", None)
    known = parts is not None and len(parts) == len(prompts)
    out: list[list[int]] = []
    num_truncated = tokens_cut = num_fallback = 0
    for k, x in enumerate(ids):
        if len(x) <= max_reprompt_len:
            out.append(x)
            continue
        p = parts[k] if known else None
        if known and p is None:  # no teacher: the original prompt, masked out; not counted
            out.append(x[-max_reprompt_len:])
            continue
        fitted = _fit(processing_class, p, max_reprompt_len, chat_template_kwargs) if p is not None else None
        if fitted is None:
            num_fallback += 1
            fitted = x[-max_reprompt_len:]
            if p is not None and not _warned_fallback:
                _warned_fallback = True
                logger.warning(
                    "A teacher prompt's template, instruction and question alone exceed `max_reprompt_len=%d` "
                    "tokens; such prompts keep their last %d tokens (left truncation, as TRL does). Raise "
                    "`max_reprompt_len`. (Warned once.)",
                    max_reprompt_len,
                    max_reprompt_len,
                )
        num_truncated += 1
        tokens_cut += len(x) - len(fitted)
        out.append(fitted)
    return TeacherPromptIds(out, num_truncated, tokens_cut, num_fallback)
