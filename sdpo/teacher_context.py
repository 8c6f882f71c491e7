"""Teacher-context construction: which rollouts get a reprompted teacher, and with what text.

Pure functions over Python lists (no trainer, no process group), so they are unit-testable; the trainer
gathers the generation groups across processes, calls `select_teachers` on the global batch and
`build_teacher_prompts` for its local slice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
) -> list[str | list[dict[str, Any]]]:
    """Teacher prompts for the rollouts `indices` of the global batch.

    Args:
        prompts: [N] global prompts (plain strings or message lists).
        completions: [N] global decoded completions (demonstration sources).
        feedbacks: [N] global feedback strings or None.
        selection: `select_teachers` output for the same global batch.
        indices: global indices of the rollouts to build (this process's slice).
    Returns:
        One prompt per index; rollouts without a teacher keep their original prompt (their rows are masked out).
    """
    out: list[str | list[dict[str, Any]]] = []
    for i in indices:
        demo, use_fb = selection.demo_index[i], selection.use_feedback[i]
        if demo is None and not use_fb:
            out.append(prompts[i])
            continue
        solution_text = ""
        if demo is not None:
            demo_text = completions[demo]
            if remove_thinking_from_demonstration:
                demo_text = strip_thinking(demo_text)
            solution_text = solution_template.format(successful_previous_attempt=demo_text)
        feedback_text = feedback_template.format(feedback_raw=feedbacks[i]) if use_fb else ""
        out.append(reprompt(prompts[i], solution_text, feedback_text, reprompt_template))
    return out


def tokenize_teacher_prompts(
    processing_class: Any,
    prompts: Sequence[str | list[dict[str, Any]]],
    max_reprompt_len: int,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[list[int]]:
    """Token ids of each teacher prompt, keeping the LAST `max_reprompt_len` tokens (left truncation, as TRL).

    Conversational prompts go through the chat template with a generation prompt, like the student's prompts.
    """
    if len(prompts) == 0:
        return []
    if isinstance(prompts[0], list):
        ids = processing_class.apply_chat_template(
            conversation=list(prompts),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(chat_template_kwargs or {}),
        )["input_ids"]
    else:
        ids = processing_class(text=list(prompts))["input_ids"]
    return [list(x)[-max_reprompt_len:] for x in ids]
