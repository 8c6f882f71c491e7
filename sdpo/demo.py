"""Offline demo: SDPO (top-K logit distillation through sdpo_kernels' fused-linear loss) vs a GRPO baseline on a
tiny char-level model, on CPU, in about 3 minutes on 2 cores.

Task (verifiable, with textual environment feedback): reverse a 3-letter string over "abcdef",
e.g. prompt "abd>" -> completion "dba" (216 strings: 100 for training, 116 held out). Reward 1 for an exact
answer, else 0. The environment's feedback (the dataset's `privileged_context`) is what a unit test prints on
failure: "expected dba". This is the most informative feedback possible; it is what makes the teacher good.

Regime. SDPO's claim is about *sparse* reward with *rich* feedback: when no rollout of a group succeeds, GRPO's
group-relative advantage is zero and it learns nothing from that group, while SDPO's teacher (the same model
re-prompted with the feedback and/or a successful sibling) still gives token-level credit. The warm-up is built
to land there: it shows direct answers for only `direct_fraction` (8%) of the training strings, so the policy
starts at ~5-20% sampled success on training prompts (logged as `train_sampled_success`; most groups are
all-fail or all-success, see `frac_reward_zero_std`), yet it copies an answer shown in its context perfectly
(`train_accuracy_with_feedback` = 1.0), i.e. the self-teacher is good.

Steps, repeated for `num_seeds` (12) seeds (each seed: its own train/held-out split, init and warm-up; seeds run
in parallel worker processes, one per core):
(1) char tokenizer (18 tokens) + tiny Llama (2 layers, width 64) built in code; (2) supervised warm-up (above;
it shows demonstration-only, feedback-only and both-in-context prompts); (3) from the same weights and seed,
an SDPO run and a GRPO run with identical lr, steps (150), batch (4 prompts x 8 generations), temperature and
loss aggregation. SDPO uses the recommended top-K logit distillation (K=100 of a ~150k vocabulary, tail bucket,
JSD alpha 0.5, IS clip 2), with K scaled to this vocabulary: `full_logit_distillation=True`,
`distillation_topk=6` (a third of the 18 tokens), `distillation_add_tail=True`, `distillation_alpha=0.5`,
`distillation_is_clip=2.0`, computed by `sdpo_kernels.linear_self_distillation_loss` from the hidden states and
the head weight (`distillation_fused_linear="always"`: the run fails rather than silently take the logits
path; on CPU the kernel library runs its PyTorch reference backend, on CUDA its Triton kernels). Everything else
is at the library defaults (distillation_only, EMA teacher, successful siblings as demonstrations) plus
`include_environment_feedback=True` and task-sized templates; nothing is tuned per method. With
`token_level_arm=True` (`sdpo demo --token_level_arm`) a third arm runs SDPO's token-level surrogate (the
library default loss: sampled-token reverse KL) from the same weights.

Held-out (never-trained) strings measure generalisation. Writes `metrics.jsonl` (first row: package versions,
thread counts, the CPU dispatch (`cpu_capability`, and ATEN_CPU_CAPABILITY when set) and settings; then one
row per step and per eval, with `seed`; each SDPO run's first row records its resolved loss mode and whether
the fused-linear path ran), `curves.png` (held-out accuracy, reward and share of equal-reward groups vs step;
per-seed thin lines and seed means) and prints a verdict computed from the data (`verdict`): the mean final
held-out gap SDPO - GRPO with a 95% paired-bootstrap CI over seeds, and the per-seed wins, followed by the CPU
capability. A winner is named only with at least 3 seeds, when the mean gap is >= 0.05, the CI excludes 0 and
it wins most seeds. The gap varies by seed (a seed whose warm-up starts higher leaves less for SDPO to add, and
held-out accuracy is a noisy 116-string greedy eval), which is why 12 seeds are run.

Reproducibility. Every random draw is seeded from the seed alone (task split and warm-up batches: their own
`random.Random(seed)`; init: `build_tiny_model`'s forked RNG; sampling: torch's global RNG, reseeded by
`torch.manual_seed(seed)` before the warm-up and by the trainers' `set_seed(seed)` before each arm), and torch runs
one intra-op thread, so no reduction depends on scheduling: the per-seed figures do not depend on the seed order,
the worker count or the load. They do depend on the CPU kernels torch dispatches to (AVX-512 vs AVX2 round
differently and RL amplifies it; MKL and oneDNN also pick kernels by CPU model), which is why the dispatch and
the CPU model are recorded and the dispatch is printed with the verdict.

Real models. `sdpo demo --model smollm2-135m-instruct` runs the same pipeline (`run_seed` -> `run_arm` for each
arm, with one `RLTask` per seed; the same `rl_args`, verdict, plot and metrics) on a pretrained model and the
addition task of `sdpo.real_task`, without a warm-up: see `sdpo.demo_real` and docs/real-model-demo.md.

Threads: each process uses one intra-op and one inter-op torch thread (`threads`), and tokenizers' Rust pool
is off: for a model this small more threads only spin, and when other processes shared the cores, spinning
pools slowed the demo 40x.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from .runtime import (  # noqa: F401  (cpu_info, DISPATCH_VARIABLES: their historical import path)
    DISPATCH_VARIABLES,
    cpu_capability_text,
    cpu_info,
    default_workers,
    limit_threads,
    quiet_libraries,
    versions,
)

ALPHABET = "abcdef"
TOKEN_CHARS = ALPHABET + " >;:" + "nsxpectdf"  # everything prompts, answers and feedback use: 15 + 3 special
REPROMPT = "{solution}{feedback}{prompt}"  # hint first: the completion directly follows the question
SOLUTION = "ans {successful_previous_attempt};"
FEEDBACK = "fb {feedback_raw};"


TINY = "tiny"  # the default model: the in-code char-level Llama (the other names: `sdpo.models.OFFLINE_MODELS`)


@dataclass
class DemoSettings:
    """The demo's settings; the defaults are the tiny demo's (`settings_for(model)` gives a real model's)."""

    out: str = "demo_out"
    model: str = TINY  # "tiny", or a real model's registry name (`sdpo.models`; the run is `sdpo.demo_real`'s)
    seed: int = 0  # first seed; the demo repeats the whole pipeline for seeds seed, seed+1, ...
    num_seeds: int = 12
    hidden: int = 64
    layers: int = 2
    warmup_steps: int = 300
    rl_steps: int = 150
    eval_every: int = 10
    num_generations: int = 8
    prompts_per_step: int = 4
    learning_rate: float = 2e-3
    direct_fraction: float = (
        0.08  # share of training strings whose direct answer the warm-up shows (low: sparse reward)
    )
    topk: int = 6  # SDPO's top-K support: a third of the 18-token vocabulary (the recommended K=100 of ~150k, scaled)
    token_level_arm: bool = False  # also run SDPO with the token-level surrogate (library default loss)
    threads: int = 1  # torch intra-op threads per process (inter-op: 1); a 64-wide model gains nothing from more
    workers: int = 0  # seeds run in this many processes at once; 0: one per usable core (at most one per seed)
    bootstrap_samples: int = 10000
    progress: bool = True  # tqdm bars
    # Real-model task only (`sdpo.demo_real`): training and held-out questions per seed (disjoint).
    num_train: int = 0
    num_heldout: int = 0


def settings_for(model: str = TINY, **overrides) -> DemoSettings:
    """`DemoSettings` with `model`'s defaults (the tiny demo's, or `sdpo.demo_real.DEFAULTS[model]`), then
    `overrides` (None values are ignored: unset command-line flags)."""
    fields = {k: v for k, v in overrides.items() if v is not None}
    if model != TINY:
        from .demo_real import defaults

        fields = {**defaults(model), **fields}
    return DemoSettings(model=model, **fields)


METHODS = {"sdpo": "SDPO top-K", "grpo": "GRPO", "sdpo_token": "SDPO token-level"}
COLORS = {"sdpo": "tab:blue", "grpo": "tab:orange", "sdpo_token": "tab:green"}


def _task(seed: int):
    strings = ["".join(p) for p in itertools.product(ALPHABET, repeat=3)]
    random.Random(seed).shuffle(strings)
    return strings[:100], strings[100:]  # train (100), held-out (116)


def _prompt(s: str) -> str:
    return f"{s}>"


def reward_exact(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion (before any trailing text) equals the reversed string."""
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def _warmup(model, tok, train: list[str], s: DemoSettings) -> None:
    """Supervised warm-up: direct answers for a subset; hinted (demonstration / feedback) answers for all."""
    rng = random.Random(s.seed)
    direct = train[: int(len(train) * s.direct_fraction)]
    examples = [(_prompt(x), x[::-1]) for x in direct]
    for x in train:  # in-context use of a demonstration or of feedback (copy the shown answer)
        demo = SOLUTION.format(successful_previous_attempt=x[::-1])
        fb = FEEDBACK.format(feedback_raw=f"expected {x[::-1]}")
        examples.append((REPROMPT.format(solution=demo, feedback="", prompt=_prompt(x)), x[::-1]))
        examples.append((REPROMPT.format(solution="", feedback=fb, prompt=_prompt(x)), x[::-1]))
        examples.append((REPROMPT.format(solution=demo, feedback=fb, prompt=_prompt(x)), x[::-1]))
    opt = torch.optim.AdamW(model.parameters(), lr=s.learning_rate)
    model.train()
    bar = tqdm(range(s.warmup_steps), desc=f"warm-up seed {s.seed}", leave=False, disable=not s.progress)
    for _ in bar:
        batch = rng.sample(examples, 32)
        ids, labels = [], []
        for p, a in batch:
            p_ids = tok(p)["input_ids"]
            a_ids = [*tok(a)["input_ids"], tok.eos_token_id]
            ids.append(p_ids + a_ids)
            labels.append([-100] * len(p_ids) + a_ids)
        n = max(map(len, ids))
        input_ids = torch.tensor([[tok.pad_token_id] * (n - len(x)) + x for x in ids])
        attn = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids])
        lab = torch.tensor([[-100] * (n - len(x)) + x for x in labels])
        loss = model(input_ids=input_ids, attention_mask=attn, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


@torch.no_grad()
def accuracy(model, tok, strings: list[str], hint: str | None = None) -> float:
    """Greedy exact-match accuracy on `strings` (optionally with the reversed answer as a demonstration)."""
    prompts = [_prompt(x) for x in strings]
    if hint == "demo":
        prompts = [SOLUTION.format(successful_previous_attempt=x[::-1]) + p for x, p in zip(strings, prompts)]
    elif hint == "feedback":
        prompts = [FEEDBACK.format(feedback_raw=f"expected {x[::-1]}") + p for x, p in zip(strings, prompts)]
    was_training = model.training
    model.eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].size(1) :], skip_special_tokens=True)
    model.train(was_training)
    return sum(t.strip() == x[::-1] for t, x in zip(texts, strings)) / len(strings)


@torch.no_grad()
def sampled_success(model, tok, strings: list[str], n: int = 8) -> float:
    """Mean exact-match of `n` temperature-1 samples per prompt: the success rate RL rollouts start from."""
    was_training = model.training
    model.eval()
    enc = tok([_prompt(x) for x in strings], return_tensors="pt", padding=True)
    out = model.generate(
        **enc, max_new_tokens=4, do_sample=True, temperature=1.0, num_return_sequences=n, pad_token_id=tok.pad_token_id
    )
    texts = tok.batch_decode(out[:, enc["input_ids"].size(1) :], skip_special_tokens=True)
    model.train(was_training)
    return sum(t.strip() == strings[i // n][::-1] for i, t in enumerate(texts)) / len(texts)


@dataclass
class RLTask:
    """What an RL arm needs from a demo task: the demo's one RL loop (`run_arm`) runs any task given as one.

    Attributes:
        tokenizer: the processing class (left padding).
        build: a fresh model holding the arms' common starting weights (called once per arm).
        columns: dataset columns `prompt`, `answer` and `privileged_context` (the environment feedback).
        reward: the TRL reward function (reads the `answer` column).
        evaluate: model -> {"heldout_accuracy": ..., "train_accuracy": ...} (greedy, bare prompts).
        start: `evaluate` of the starting weights, computed once per seed and logged as each arm's step-0 row
            (greedy: no random draw, so computing it once changes no figure).
        templates: SDPO's (reprompt, solution, feedback) templates for this task's prompts.
        max_completion_length: completion budget in tokens.
        learning_rate: the RL learning rate, shared by every arm.
    """

    tokenizer: Any
    build: Callable[[], Any]
    columns: dict[str, list]
    reward: Callable[..., list[float]]
    evaluate: Callable[[Any], dict[str, float]]
    start: dict[str, float]
    templates: tuple[str, str, str]
    max_completion_length: int
    learning_rate: float


def rl_args(method: str, task: RLTask, s: DemoSettings):
    """The arm's trainer config: everything but the SDPO-only fields is shared by every arm (nothing per method).

    SDPO top-K is the recommended top-K logit distillation (tail bucket, JSD alpha 0.5, IS clip 2) with
    `s.topk`, through sdpo_kernels' fused-linear loss (`distillation_fused_linear="always"`: an error, not a
    silent logits path, when it cannot run)."""
    from trl import GRPOConfig

    from sdpo import SDPOConfig

    common = dict(
        output_dir=os.path.join(s.out, f"run_{method}"),
        bf16=False,
        use_cpu=True,
        report_to="none",
        seed=s.seed,
        per_device_train_batch_size=s.prompts_per_step * s.num_generations,
        num_generations=s.num_generations,
        max_completion_length=task.max_completion_length,
        max_steps=s.rl_steps,
        learning_rate=task.learning_rate,
        disable_dropout=False,  # GRPOConfig's default, pinned: SDPOConfig's is TRL 1.16 SDPO's True
        logging_steps=1,
        save_strategy="no",
        temperature=1.0,
        beta=0.0,
        loss_type="grpo",
    )
    reprompt, solution, feedback = task.templates
    sdpo_common = dict(
        include_environment_feedback=True,  # the task's feedback column
        reprompt_template=reprompt,
        solution_template=solution,
        feedback_template=feedback,
        diagnostics_warning_interval=0,
    )
    if method == "sdpo":
        return SDPOConfig(
            **common,
            **sdpo_common,
            full_logit_distillation=True,
            distillation_topk=s.topk,
            distillation_add_tail=True,
            distillation_alpha=0.5,
            distillation_is_clip=2.0,
            distillation_fused_linear="always",
        )
    if method == "sdpo_token":  # the library default loss: sampled-token reverse KL (no logits distilled)
        return SDPOConfig(**common, **sdpo_common)
    return GRPOConfig(**common)


def run_arm(method: str, task: RLTask, s: DemoSettings, log) -> None:
    """One RL arm from the task's starting weights; per-step and per-eval rows go to `log(row)`."""
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback
    from trl import GRPOTrainer

    from sdpo import SDPOConfig, SDPOTrainer

    model = task.build()
    ds = Dataset.from_dict(task.columns)
    args = rl_args(method, task, s)
    trainer_cls = SDPOTrainer if isinstance(args, SDPOConfig) else GRPOTrainer

    class Eval(TrainerCallback):
        def on_log(self, args_, state, control, logs=None, model=None, **kw):
            if logs is None or "reward" not in logs:
                return
            row = {"method": method, "seed": s.seed, "step": state.global_step, "reward": logs["reward"]}
            if "frac_reward_zero_std" in logs:  # share of groups whose rewards are all equal (no GRPO signal)
                row["frac_reward_zero_std"] = logs["frac_reward_zero_std"]
            if state.global_step % s.eval_every == 0 or state.global_step == s.rl_steps:
                row.update(task.evaluate(model))
            for k in ("self_distillation/distillation_loss", "self_distillation/reprompt_sample_fraction"):
                if k in logs:
                    row[k] = logs[k]
            log(row)

    class Progress(TrainerCallback):  # one bar per run; per-step metric dicts go to the JSONL, not stdout
        def on_train_begin(self, args_, state, control, **kw):
            self.bar = tqdm(
                total=state.max_steps, desc=f"{METHODS[method]} seed {s.seed}", leave=False, disable=not s.progress
            )

        def on_step_end(self, args_, state, control, **kw):
            self.bar.update(1)

        def on_train_end(self, args_, state, control, **kw):
            self.bar.close()

    trainer = trainer_cls(
        model=model,
        reward_funcs=task.reward,
        args=args,
        train_dataset=ds,
        processing_class=task.tokenizer,
        callbacks=[Eval()],
    )
    # With transformers' verbosity at "error", Trainer picks PrinterCallback (prints every log dict) over its bar.
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Progress())
    start = {"method": method, "seed": s.seed, "step": 0, **task.start}
    if isinstance(args, SDPOConfig):  # what the loss really ran: its mode and whether the fused-linear path
        start["distillation_mode"] = args.distillation_mode
        start["fused_linear"] = trainer.use_fused_linear
    log(start)
    t0 = time.time()
    trainer.train()
    log({"method": method, "seed": s.seed, "run_seconds": round(time.time() - t0, 1)})


def _series(rows: list[dict], method: str, key: str) -> dict[int, dict[int, float]]:
    """{seed: {step: value}} for one method and metric."""
    out: dict[int, dict[int, float]] = {}
    for r in rows:
        if r.get("method") == method and key in r:
            out.setdefault(r.get("seed", 0), {})[r["step"]] = r[key]
    return out


def _mean_curve(per_seed: dict[int, dict[int, float]]) -> tuple[list[int], list[float]]:
    """Mean over seeds at the steps every seed has."""
    if not per_seed:
        return [], []
    steps = sorted(set.intersection(*(set(v) for v in per_seed.values())))
    return steps, [sum(v[t] for v in per_seed.values()) / len(per_seed) for t in steps]


def _methods(rows: list[dict]) -> list[str]:
    """The RL arms present in `rows`, in display order."""
    present = {r.get("method") for r in rows}
    return [m for m in METHODS if m in present]


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method in _methods(rows):
        color, label = COLORS[method], METHODS[method]
        acc = _series(rows, method, "heldout_accuracy")
        for curve in acc.values():  # one thin line per seed
            axes[0].plot(*zip(*sorted(curve.items())), color=color, alpha=0.25, lw=1)
        steps, mean = _mean_curve(acc)
        if steps:
            axes[0].plot(steps, mean, marker="o", color=color, lw=2.5, label=f"{label} (mean of {len(acc)} seeds)")
        steps, vals = _mean_curve(_series(rows, method, "reward"))
        if steps:
            k = 5  # moving average: per-step rewards over 32 rollouts are noisy
            smooth = [
                sum(vals[max(0, i - k + 1) : i + 1]) / len(vals[max(0, i - k + 1) : i + 1]) for i in range(len(vals))
            ]
            axes[1].plot(steps, vals, color=color, alpha=0.2)
            axes[1].plot(steps, smooth, color=color, lw=2, label=f"{label} (seed mean, 5-step avg)")
        steps, vals = _mean_curve(_series(rows, method, "frac_reward_zero_std"))
        if steps:
            smooth = [sum(vals[max(0, i - 9) : i + 1]) / len(vals[max(0, i - 9) : i + 1]) for i in range(len(vals))]
            axes[2].plot(steps, smooth, color=color, lw=2, label=f"{label} (seed mean, 10-step avg)")
    axes[0].set(
        title="held-out accuracy (greedy, unseen prompts)", xlabel="RL step", ylabel="exact match", ylim=(-0.02, 1.02)
    )
    axes[1].set(title="training reward (sampled rollouts)", xlabel="RL step", ylabel="mean reward", ylim=(-0.02, 1.02))
    axes[2].set(
        title="groups with equal rewards (GRPO advantage 0)", xlabel="RL step", ylabel="fraction", ylim=(-0.02, 1.02)
    )
    for ax in axes:
        ax.legend(loc="lower left" if ax is axes[2] else "upper left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def final_accuracies(rows: list[dict], method: str) -> dict[int, float]:
    """{seed: held-out accuracy at the last evaluated step} for one arm."""
    return {seed: v[max(v)] for seed, v in _series(rows, method, "heldout_accuracy").items()}


def paired_bootstrap_ci(diffs: list[float], samples: int = 10000, level: float = 0.95, seed: int = 0):
    """Percentile CI of the mean of paired per-seed differences, resampling seeds with replacement.

    With few seeds the percentile interval is somewhat too narrow (it cannot show more spread than the
    seeds have), which is why the verdict also needs a majority of per-seed wins."""
    if not diffs:
        return 0.0, 0.0
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(rng.choice(diffs) for _ in range(n)) / n for _ in range(samples))
    lo = means[int((1 - level) / 2 * samples)]
    hi = means[min(samples - 1, int((1 + level) / 2 * samples))]
    return lo, hi


def compare(rows: list[dict], a: str, b: str, samples: int = 10000) -> dict:
    """Paired per-seed comparison of final held-out accuracy, arm `a` minus arm `b`."""
    fa, fb = final_accuracies(rows, a), final_accuracies(rows, b)
    seeds = sorted(set(fa) & set(fb))
    diffs = [fa[k] - fb[k] for k in seeds]
    mean = sum(diffs) / max(len(diffs), 1)
    lo, hi = paired_bootstrap_ci(diffs, samples)
    return {
        "seeds": seeds,
        "diffs": diffs,
        "mean": mean,
        "ci": (lo, hi),
        "wins": sum(d > 0 for d in diffs),
        "losses": sum(d < 0 for d in diffs),
    }


MIN_SEEDS_FOR_CALL = 3  # below this the bootstrap interval and the majority of wins mean nothing


def _call(c: dict, a: str, b: str) -> str:
    """'X ahead ...' only when there are at least `MIN_SEEDS_FOR_CALL` seeds, the mean gap is >= 0.05, its 95% CI
    (at the 2 printed decimals) excludes 0 and X wins a majority of seeds."""
    n = len(c["diffs"])
    lo, hi = (round(x, 2) + 0.0 for x in c["ci"])  # judged as printed: a CI shown as [+0.00, ...] is no call
    stats = (
        f"mean held-out gap {c['mean']:+.2f} ({METHODS[a]} - {METHODS[b]}), 95% paired-bootstrap CI "
        f"[{lo:+.2f}, {hi:+.2f}] over {n} seed{'s' if n != 1 else ''}, {METHODS[a]} ahead in {c['wins']}/{n} seeds"
        + (f", behind in {c['losses']}/{n}" if c["losses"] else "")
    )
    if n < MIN_SEEDS_FOR_CALL:  # one seed's interval is a point, two seeds' a coin toss: no winner named
        return (
            f"no call between {METHODS[a]} and {METHODS[b]} (only {n} seed{'s' if n != 1 else ''}: a call needs "
            f"at least {MIN_SEEDS_FOR_CALL}, the interval and the per-seed majority mean nothing below that): {stats}"
        )
    if c["mean"] >= 0.05 and lo > 0 and c["wins"] > n / 2:
        return f"{METHODS[a]} ahead of {METHODS[b]}: {stats}"
    if c["mean"] <= -0.05 and hi < 0 and c["losses"] > n / 2:
        return f"{METHODS[b]} ahead of {METHODS[a]}: {stats}"
    return f"no clear difference between {METHODS[a]} and {METHODS[b]}: {stats}"


def verdict(rows: list[dict], samples: int = 10000) -> str:
    """One line summarising what the curves show, computed from `rows`.

    The call compares SDPO top-K with GRPO on final held-out accuracy, paired by seed: with fewer than
    `MIN_SEEDS_FOR_CALL` (3) seeds no call is made (the line says why); otherwise a method is called ahead
    only when its mean gap is >= 0.05, the 95% paired-bootstrap CI of the mean gap excludes 0 and it is strictly
    ahead in a majority of seeds; otherwise the line says there is no clear difference. The token-level SDPO
    arm, when present, gets the same comparison with GRPO. Then per arm: held-out accuracy first->last (seed
    means), final train accuracy and the mean reward over the last 10 steps.
    """
    methods = _methods(rows)
    calls = [_call(compare(rows, "sdpo", "grpo", samples), "sdpo", "grpo")]
    if "sdpo_token" in methods:
        calls.append(_call(compare(rows, "sdpo_token", "grpo", samples), "sdpo_token", "grpo"))
    parts = []
    for method in methods:
        acc = _series(rows, method, "heldout_accuracy")
        if not acc:
            continue
        first = sum(v[min(v)] for v in acc.values()) / len(acc)
        last = sum(v[max(v)] for v in acc.values()) / len(acc)
        rew = [
            sum(list(v.values())[-10:]) / len(list(v.values())[-10:]) for v in _series(rows, method, "reward").values()
        ]
        late = f", last-10-step reward {sum(rew) / len(rew):.2f}" if rew else ""
        tr = [v[max(v)] for v in _series(rows, method, "train_accuracy").values()]
        train = f", train acc {sum(tr) / len(tr):.2f}" if tr else ""
        parts.append(f"{METHODS[method]} held-out acc {first:.2f}->{last:.2f}{train}{late}")
    return f"VERDICT: {calls[0]} ({'; '.join(parts)})." + "".join(f" Also: {c}." for c in calls[1:])


def run_seed(s: DemoSettings, log) -> None:
    """Warm-up, then every RL arm from the warmed-up weights, for seed `s.seed`; rows go to `log(row)`.

    Everything is seeded from `s.seed` alone, so a seed gives the same rows in any process and order. A real
    model (`s.model` other than "tiny") runs `sdpo.demo_real.run_seed` instead (no warm-up)."""
    if s.model != TINY:
        from .demo_real import run_seed as run_real_seed

        run_real_seed(s, log)
        return
    from .tiny import build_char_tokenizer, build_tiny_model

    start = time.time()
    torch.manual_seed(s.seed)
    tok = build_char_tokenizer(TOKEN_CHARS)

    def build():
        return build_tiny_model(tok, hidden_size=s.hidden, num_layers=s.layers, seed=s.seed)

    train, heldout = _task(s.seed)
    model = build()
    _warmup(model, tok, train, s)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}

    def evaluate(m) -> dict[str, float]:
        return {"heldout_accuracy": accuracy(m, tok, heldout), "train_accuracy": accuracy(m, tok, train)}

    start_eval = evaluate(model)
    log(
        {
            "method": "warmup",
            "seed": s.seed,
            "step": 0,
            **start_eval,
            "train_sampled_success": sampled_success(model, tok, train),
            "train_accuracy_with_demonstration": accuracy(model, tok, train, hint="demo"),
            "train_accuracy_with_feedback": accuracy(model, tok, train, hint="feedback"),
            "seconds": round(time.time() - start, 1),
        }
    )

    def build_warm():
        m = build()
        m.load_state_dict(init_state)
        return m

    task = RLTask(
        tokenizer=tok,
        build=build_warm,
        columns={
            "prompt": [_prompt(x) for x in train],
            "answer": [x[::-1] for x in train],
            "privileged_context": [f"expected {x[::-1]}" for x in train],
        },
        reward=reward_exact,
        evaluate=evaluate,
        start=start_eval,
        templates=(REPROMPT, SOLUTION, FEEDBACK),
        max_completion_length=4,
        learning_rate=s.learning_rate / 4,
    )
    for method in arms(s):
        run_arm(method, task, s, log)


START_ROWS = ("warmup", "start")  # each seed's row on the arms' starting weights: tiny (after warm-up), real


def _vocab_size(s: DemoSettings) -> int:
    if s.model == TINY:
        from .tiny import build_char_tokenizer

        return len(build_char_tokenizer(TOKEN_CHARS))
    from .demo_real import vocab_size

    return vocab_size(s.model)


def _loadavg() -> list[float]:
    """The machine's 1/5/15-minute load averages (the demo's wall time depends on what else runs)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return []


def arms(s: DemoSettings) -> list[str]:
    return ["sdpo", "grpo"] + (["sdpo_token"] if s.token_level_arm else [])


def _seed_worker(s: DemoSettings) -> list[dict]:
    """One seed in a worker process (spawned: a fresh interpreter, single-threaded torch, no progress bars)."""
    limit_threads(s.threads)
    quiet_libraries()
    rows: list[dict] = []
    run_seed(replace(s, progress=False), rows.append)
    return rows


def run_demo(settings: DemoSettings | None = None) -> str:
    """Run the whole demo; returns the verdict line (also printed). Outputs go to `settings.out`."""
    base = settings or DemoSettings()
    previous_threads = limit_threads(base.threads)
    try:
        return _run_demo(base)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(base: DemoSettings) -> str:
    import concurrent.futures
    import multiprocessing

    os.makedirs(base.out, exist_ok=True)
    quiet_libraries()
    start = time.time()
    seeds = list(range(base.seed, base.seed + base.num_seeds))
    workers = base.workers or default_workers(len(seeds))
    metrics_path = os.path.join(base.out, "metrics.jsonl")
    rows: list[dict] = []
    run_arms = arms(base)
    env = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"{len(seeds)} seeds x ({' | '.join(METHODS[m] for m in run_arms)}), {workers} worker process(es)")
    with open(metrics_path, "w") as f:

        def log(row):
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()

        first = {"versions": env, "settings": asdict(base), "workers": workers, "vocab_size": _vocab_size(base)}
        log({**first, "loadavg": _loadavg()})

        def done(seed: int) -> None:
            final = " ".join(f"{METHODS[m]} {final_accuracies(rows, m).get(seed, float('nan')):.2f}" for m in run_arms)
            warm = next(r for r in rows if r.get("method") in START_ROWS and r["seed"] == seed)
            sampled = (
                f"start sampled success {warm['train_sampled_success']:.2f}, "
                if "train_sampled_success" in warm
                else ""
            )
            tqdm.write(
                f"seed {seed} done at {time.time() - start:.0f}s (load average {_loadavg()}): {sampled}"
                f"final held-out accuracy {final}"
            )

        if workers == 1:
            for seed in seeds:
                run_seed(replace(base, seed=seed), log)
                done(seed)
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch/OpenMP state
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = [pool.submit(_seed_worker, replace(base, seed=seed)) for seed in seeds]
                for seed, fut in zip(seeds, tqdm(futures, desc="seeds", disable=not base.progress)):
                    for row in fut.result():  # in seed order: the file does not depend on the scheduling
                        log(row)
                    done(seed)
        # The CPU dispatch next to the call: figures reproduce exactly only on the same one (see `cpu_info`).
        line = f"{verdict(rows, base.bootstrap_samples)} [{cpu_capability_text(env)}]"
        end = {"verdict": line, "seconds": round(time.time() - start, 1), "versions": env, "loadavg": _loadavg()}
        f.write(json.dumps(end) + "\n")
    _plot(rows, os.path.join(base.out, "curves.png"))
    print(f"wrote {metrics_path} and {os.path.join(base.out, 'curves.png')} in {time.time() - start:.0f}s")
    finals = {m: final_accuracies(rows, m) for m in run_arms}
    per_seed = ", ".join(
        f"seed {k}: " + "/".join(f"{finals[m][k]:.2f}" for m in run_arms) for k in sorted(finals["sdpo"])
    )
    print(f"final held-out accuracy {'/'.join(METHODS[m] for m in run_arms)} per seed: {per_seed}")
    print(line)
    return line
