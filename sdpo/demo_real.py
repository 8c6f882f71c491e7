"""The demo on a real pretrained model: `sdpo demo --model smollm2-135m-instruct`.

SDPO (top-K logit distillation through sdpo_kernels' fused-linear loss) against GRPO from the same start, on
SmolLM2-135M-Instruct (`sdpo.models`, offline) and the two-digit addition task of `sdpo.real_task`, on CPU.
It is the tiny demo's pipeline (`sdpo.demo`: seeds in parallel worker processes, `rl_args` for both arms, the
paired-bootstrap verdict, curves.png, metrics.jsonl) with another task: no warm-up (the pretrained model solves
the task sometimes, not reliably), full fine-tuning of all 135M parameters, K = 100 of the 49,152-token
vocabulary with the tail bucket, JSD alpha 0.5, IS clip 2. Held-out accuracy is greedy on the bare prompt (no
feedback) over questions no arm trains on. Results: docs/real-model-demo.md.

Per seed (`run_seed`): split the 1,600 operand pairs into disjoint train / held-out sets (`real_task.split`),
load the pretrained weights, log a `start` row (greedy held-out and train accuracy, and the self-teacher's
greedy success on the training questions with the worked check in its context), then run each arm from
freshly loaded weights with the same settings and seed.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import real_task
from .demo import DemoSettings, RLTask, arms, run_arm

# Per model: the settings `sdpo demo --model NAME` starts from (flags override them). Sized for ~30-40 minutes
# on 2 shared CPU cores (two seeds at a time, one thread each); every setting is shared by both arms.
DEFAULTS: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": dict(
        num_seeds=4,
        rl_steps=12,
        eval_every=4,
        num_generations=8,
        prompts_per_step=4,
        learning_rate=1e-5,
        topk=100,  # the recommended K=100 (of 49,152 tokens), with the tail bucket
        num_train=48,  # rl_steps x prompts_per_step: every training question is trained on once
        num_heldout=100,
    ),
}

MAX_COMPLETION_TOKENS = 4  # " 68" is 3 tokens (space, digits); the 4th shows whether the number ends


def defaults(model: str) -> dict[str, Any]:
    """The demo settings for real model `model`; ValueError naming the known models otherwise."""
    try:
        return dict(DEFAULTS[model])
    except KeyError:
        known = ", ".join(["tiny", *sorted(DEFAULTS)])
        raise ValueError(f"no demo for model {model!r}; known: {known}") from None


def vocab_size(model: str) -> int:
    """The model's vocabulary (the tokenizer's length), for metrics.jsonl's first row."""
    from transformers import AutoTokenizer

    from . import models

    return len(AutoTokenizer.from_pretrained(models.convert(model), local_files_only=True))


def run_seed(s: DemoSettings, log) -> None:
    """The start row, then every RL arm from the pretrained weights, for seed `s.seed`; rows go to `log(row)`.

    Seeded from `s.seed` alone: the split by its own `random.Random(seed)`, the start row's samples by
    `torch.manual_seed(seed)`, each arm by the trainer's `set_seed(seed)`."""
    from . import models

    t0 = time.time()
    torch.manual_seed(s.seed)
    model, tok = models.load(s.model)
    train, heldout = real_task.split(s.seed, s.num_train, s.num_heldout)

    def evaluate(m) -> dict[str, float]:
        return {
            "heldout_accuracy": real_task.first_try_success(m, tok, heldout),
            "train_accuracy": real_task.first_try_success(m, tok, train),
        }

    start_eval = evaluate(model)
    # The self-teacher's success (greedy, the worked check in its context). Sampled rates (student and teacher)
    # cost ~4x a greedy pass on two CPU cores: the first training step's reward is the student's sampled rate.
    log(
        {
            "method": "start",
            "seed": s.seed,
            "step": 0,
            **start_eval,
            "train_accuracy_with_feedback": real_task.first_try_success(model, tok, train, with_feedback=True),
            "seconds": round(time.time() - t0, 1),
        }
    )
    del model

    task = RLTask(
        tokenizer=tok,
        build=lambda: models.load(s.model)[0],  # the pretrained weights, afresh for each arm
        columns=real_task.dataset_columns(train),
        reward=real_task.reward_sum,
        evaluate=evaluate,
        start=start_eval,
        templates=(real_task.REPROMPT, real_task.SOLUTION, real_task.FEEDBACK),
        max_completion_length=MAX_COMPLETION_TOKENS,
        learning_rate=s.learning_rate,
    )
    for method in arms(s):
        run_arm(method, task, s, log)
