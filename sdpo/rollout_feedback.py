"""Environment feedback per rollout: a reward function may say, for each completion, what was wrong with it.

TRL 1.16's SDPO reads feedback only from the dataset's static `privileged_context` column (one text per prompt).
The environment's answer to *this* attempt -- a failing test's message, a runtime error, a judge's remark -- is
richer, and it is what the official SDPO code feeds its teacher. Here a reward function passed to `SDPOTrainer`
may return, instead of a list of rewards, a mapping::

    def unit_tests(completions, **kwargs):
        results = [run_tests(c) for c in completions]
        return {
            "rewards": [1.0 if r.passed else 0.0 for r in results],
            "feedback": [None if r.passed else r.first_failure for r in results],   # str or None per completion
        }

The rewards go to GRPO unchanged (a plain list works as before: nothing changes when no function returns
feedback); the feedback texts go into that rollout's teacher reprompt through `feedback_template`, when
`include_environment_feedback=True`. The text a rollout's teacher reads is, in order and separated by a blank line:
its prompt's `privileged_context` (when the dataset has one and it is not empty), then the feedback of each reward
function that returned some for this completion, in the order of `reward_funcs`. `None` or whitespace-only text is
no feedback. `environment_feedback_only_without_solution` applies per rollout, as it does to `privileged_context`.

Implementation: `SDPOTrainer` wraps each callable reward function once (`FeedbackRecorder`, keeping its
`__name__` -- GRPO's metric names -- and its sync/async kind); the wrapper passes rewards through and records
the feedback of the current generation batch, which `combine_feedback` merges with `privileged_context`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from trl.trainer.utils import is_async_callable

REWARDS_KEY = "rewards"
FEEDBACK_KEY = "feedback"


def _has_text(x: Any) -> bool:
    return isinstance(x, str) and x.strip() != ""


def _split(name: str, output: Any, sink: list[list[str | None]]) -> Any:
    """Rewards of `output` (passed through when it is a plain list); its feedback appended to `sink`."""
    if not isinstance(output, Mapping):
        return output
    if REWARDS_KEY not in output:
        raise ValueError(
            f"reward function {name!r} returned a mapping without {REWARDS_KEY!r} (keys: {sorted(output)}); "
            f"return a list of rewards, or {{{REWARDS_KEY!r}: [...], {FEEDBACK_KEY!r}: [...]}}."
        )
    unknown = set(output) - {REWARDS_KEY, FEEDBACK_KEY}
    if unknown:
        raise ValueError(f"reward function {name!r} returned unknown keys {sorted(unknown)}.")
    rewards = list(output[REWARDS_KEY])
    feedback = output.get(FEEDBACK_KEY)
    if feedback is not None:
        if isinstance(feedback, str) or not isinstance(feedback, Sequence):
            raise TypeError(
                f"reward function {name!r}: {FEEDBACK_KEY!r} must be a list with one str or None per completion, "
                f"got {type(feedback).__name__}."
            )
        if len(feedback) != len(rewards):
            raise ValueError(
                f"reward function {name!r} returned {len(feedback)} feedback texts for {len(rewards)} rewards "
                "(one per completion expected)."
            )
        bad = next((f for f in feedback if f is not None and not isinstance(f, str)), None)
        if bad is not None:
            raise TypeError(
                f"reward function {name!r}: feedback entries must be str or None, got {type(bad).__name__}."
            )
        sink.append(list(feedback))
    return rewards


class FeedbackRecorder:
    """Wraps the callable reward functions of a trainer; records per-completion feedback per generation batch.

    `wrap(func)` returns a function with `func`'s name and sync/async kind that returns `func`'s rewards;
    `start_batch()` clears what was recorded; `per_rollout(n)` returns the recorded lists (each [n]).
    """

    def __init__(self) -> None:
        self._recorded: list[list[str | None]] = []

    def wrap(self, func: Callable[..., Any]) -> Callable[..., Any]:
        name = getattr(func, "__name__", type(func).__name__)
        if is_async_callable(func):  # GRPO awaits these together: the wrapper must stay a coroutine function

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                return _split(name, await func(*args, **kwargs), self._recorded)

            wrapper: Callable[..., Any] = async_wrapper
        else:

            @functools.wraps(func)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                return _split(name, func(*args, **kwargs), self._recorded)

            wrapper = sync_wrapper
        wrapper.__name__ = name  # functools.wraps leaves it unset for callable objects without __name__
        wrapper.__wrapped_reward__ = func  # type: ignore[attr-defined]
        return wrapper

    def start_batch(self) -> None:
        self._recorded = []

    def per_rollout(self, n: int) -> list[list[str | None]]:
        """The feedback lists recorded since `start_batch`, each [n] (one per local rollout)."""
        for feedback in self._recorded:
            if len(feedback) != n:
                raise ValueError(f"recorded {len(feedback)} feedback texts for {n} rollouts")
        return list(self._recorded)


def combine_feedback(static: Sequence[Any], per_rollout: Sequence[Sequence[str | None]]) -> list[str | None]:
    """Each rollout's feedback text: its `privileged_context`, then each reward function's feedback.

    Args:
        static: [N] the dataset's `privileged_context` per rollout (str, None or missing values).
        per_rollout: lists of [N] texts (str or None), one per reward function that returned feedback.

    Returns:
        [N] the non-empty parts joined by a blank line; `static[i]` itself when no reward function returned feedback
        for rollout i (so `privileged_context` behaves exactly as before), None when nothing has text.
    """
    out: list[Any] = []
    for i, base in enumerate(static):
        extra = [f[i] for f in per_rollout if _has_text(f[i])]
        if not extra:
            out.append(base)
            continue
        parts = ([base] if _has_text(base) else []) + extra
        out.append("\n\n".join(parts))
    return out


__all__ = ["FEEDBACK_KEY", "REWARDS_KEY", "FeedbackRecorder", "combine_feedback"]
