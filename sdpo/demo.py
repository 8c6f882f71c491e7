"""Offline demo: SDPO vs a GRPO baseline on a tiny char-level model, on CPU, in a few minutes.

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

Steps, repeated for `num_seeds` seeds (each seed: its own train/held-out split, init and warm-up):
(1) char tokenizer + tiny Llama built in code; (2) supervised warm-up (above; it shows demonstration-only,
feedback-only and both-in-context prompts); (3) from the same weights and seed, an SDPO run and a GRPO run with
identical lr, steps, batch (4 prompts x 8 generations), temperature and loss aggregation. SDPO uses the library
defaults (distillation_only, sampled-token reverse KL, EMA teacher at the default rate, successful siblings as
demonstrations) plus `include_environment_feedback=True` and task-sized templates; nothing is tuned per method.
Held-out (never-trained) strings measure generalisation. Writes `metrics.jsonl` (one row per step and per eval,
with `seed`), `curves.png` (held-out accuracy, reward and share of equal-reward groups vs step; per-seed thin
lines and seed means) and prints a verdict computed from the data (`verdict`).

The gap is modest and varies by seed (a seed whose warm-up starts higher leaves less for SDPO to add, and
held-out accuracy is a noisy 116-string greedy eval), which is why several seeds are run and the verdict
only names a winner that is ahead on the mean AND in most seeds.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

ALPHABET = "abcdef"
REPROMPT = "{solution}{feedback}{prompt}"  # hint first: the completion directly follows the question
SOLUTION = "ans {successful_previous_attempt};"
FEEDBACK = "fb {feedback_raw};"


@dataclass
class DemoSettings:
    out: str = "demo_out"
    seed: int = 0  # first seed; the demo repeats the whole pipeline for seeds seed, seed+1, ...
    num_seeds: int = 5
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
    bar = tqdm(range(s.warmup_steps), desc="warm-up (supervised)", leave=False)
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


def _run_rl(method: str, init_state, tok, build, train, heldout, s: DemoSettings, log) -> None:
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from sdpo import SDPOConfig, SDPOTrainer

    model = build()
    model.load_state_dict(init_state)
    ds = Dataset.from_dict(
        {
            "prompt": [_prompt(x) for x in train],
            "answer": [x[::-1] for x in train],
            "privileged_context": [f"expected {x[::-1]}" for x in train],
        }
    )
    common = dict(
        output_dir=os.path.join(s.out, f"run_{method}"),
        bf16=False,
        use_cpu=True,
        report_to="none",
        seed=s.seed,
        per_device_train_batch_size=s.prompts_per_step * s.num_generations,
        num_generations=s.num_generations,
        max_completion_length=4,
        max_steps=s.rl_steps,
        learning_rate=s.learning_rate / 4,
        logging_steps=1,
        save_strategy="no",
        temperature=1.0,
        beta=0.0,
        loss_type="grpo",
    )
    if method == "sdpo":
        args = SDPOConfig(
            **common,
            include_environment_feedback=True,  # the task's feedback column; every other SDPO knob at its default
            reprompt_template=REPROMPT,
            solution_template=SOLUTION,
            feedback_template=FEEDBACK,
            diagnostics_warning_interval=0,
        )
        trainer_cls = SDPOTrainer
    else:
        args = GRPOConfig(**common)
        trainer_cls = GRPOTrainer

    class Eval(TrainerCallback):
        def on_log(self, args_, state, control, logs=None, model=None, **kw):
            if logs is None or "reward" not in logs:
                return
            row = {"method": method, "seed": s.seed, "step": state.global_step, "reward": logs["reward"]}
            if "frac_reward_zero_std" in logs:  # share of groups whose rewards are all equal (no GRPO signal)
                row["frac_reward_zero_std"] = logs["frac_reward_zero_std"]
            if state.global_step % s.eval_every == 0 or state.global_step == s.rl_steps:
                row["heldout_accuracy"] = accuracy(model, tok, heldout)
                row["train_accuracy"] = accuracy(model, tok, train)
            for k in ("self_distillation/distillation_loss", "self_distillation/reprompt_sample_fraction"):
                if k in logs:
                    row[k] = logs[k]
            log(row)

    class Progress(TrainerCallback):  # one bar per run; per-step metric dicts go to the JSONL, not stdout
        def on_train_begin(self, args_, state, control, **kw):
            self.bar = tqdm(total=state.max_steps, desc=f"{method.upper()} seed {s.seed}", leave=False)

        def on_step_end(self, args_, state, control, **kw):
            self.bar.update(1)

        def on_train_end(self, args_, state, control, **kw):
            self.bar.close()

    trainer = trainer_cls(
        model=model, reward_funcs=reward_exact, args=args, train_dataset=ds, processing_class=tok, callbacks=[Eval()]
    )
    # With transformers' verbosity at "error", Trainer picks PrinterCallback (prints every log dict) over its bar.
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Progress())
    log(
        {
            "method": method,
            "seed": s.seed,
            "step": 0,
            "heldout_accuracy": accuracy(model, tok, heldout),
            "train_accuracy": accuracy(model, tok, train),
        }
    )
    trainer.train()


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


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, color in (("sdpo", "tab:blue"), ("grpo", "tab:orange")):
        acc = _series(rows, method, "heldout_accuracy")
        for curve in acc.values():  # one thin line per seed
            axes[0].plot(*zip(*sorted(curve.items())), color=color, alpha=0.3, lw=1)
        steps, mean = _mean_curve(acc)
        if steps:
            axes[0].plot(steps, mean, marker="o", color=color, lw=2.5, label=f"{method.upper()} (mean of {len(acc)})")
        steps, vals = _mean_curve(_series(rows, method, "reward"))
        if steps:
            k = 5  # moving average: per-step rewards over 32 rollouts are noisy
            smooth = [
                sum(vals[max(0, i - k + 1) : i + 1]) / len(vals[max(0, i - k + 1) : i + 1]) for i in range(len(vals))
            ]
            axes[1].plot(steps, vals, color=color, alpha=0.2)
            axes[1].plot(steps, smooth, color=color, lw=2, label=f"{method.upper()} (seed mean, 5-step avg)")
        steps, vals = _mean_curve(_series(rows, method, "frac_reward_zero_std"))
        if steps:
            smooth = [sum(vals[max(0, i - 9) : i + 1]) / len(vals[max(0, i - 9) : i + 1]) for i in range(len(vals))]
            axes[2].plot(steps, smooth, color=color, lw=2, label=f"{method.upper()} (seed mean, 10-step avg)")
    axes[0].set(
        title="held-out accuracy (greedy, unseen strings)", xlabel="RL step", ylabel="exact match", ylim=(-0.02, 1.02)
    )
    axes[1].set(title="training reward (sampled rollouts)", xlabel="RL step", ylabel="mean reward", ylim=(-0.02, 1.02))
    axes[2].set(
        title="groups with equal rewards (GRPO advantage 0)", xlabel="RL step", ylabel="fraction", ylim=(-0.02, 1.02)
    )
    for ax in axes:
        ax.legend(loc="lower left" if ax is axes[2] else "upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verdict(rows: list[dict]) -> str:
    """One line summarising what the curves show: final held-out accuracy (mean over seeds) and late reward.

    A method is called ahead only when its mean final held-out accuracy is >= 0.05 higher AND it is strictly
    ahead in a majority of seeds; otherwise the line says there is no clear difference.
    """
    parts, finals = [], {}
    for method in ("sdpo", "grpo"):
        acc = _series(rows, method, "heldout_accuracy")
        finals[method] = {seed: v[max(v)] for seed, v in acc.items()}
        first = sum(v[min(v)] for v in acc.values()) / max(len(acc), 1)
        last = sum(finals[method].values()) / max(len(acc), 1)
        rew = [
            sum(list(v.values())[-10:]) / len(list(v.values())[-10:]) for v in _series(rows, method, "reward").values()
        ]
        late = sum(rew) / max(len(rew), 1)
        tr = [v[max(v)] for v in _series(rows, method, "train_accuracy").values()]
        train = f", train acc {sum(tr) / len(tr):.2f}" if tr else ""
        parts.append(f"{method.upper()} held-out acc {first:.2f}->{last:.2f}{train}, last-10-step reward {late:.2f}")
    seeds = sorted(set(finals["sdpo"]) & set(finals["grpo"]))
    diffs = [finals["sdpo"][k] - finals["grpo"][k] for k in seeds]
    diff = sum(diffs) / max(len(diffs), 1)
    leader = "SDPO" if diff > 0 else "GRPO"
    wins = sum((d > 0) if diff > 0 else (d < 0) for d in diffs)
    if abs(diff) >= 0.05 and wins > len(diffs) / 2:
        call = f"{leader} ahead by {abs(diff):.2f} mean held-out accuracy, ahead in {wins}/{len(diffs)} seeds"
    else:
        call = (
            f"no clear difference in held-out accuracy (mean gap {diff:+.2f} SDPO-GRPO, "
            f"SDPO ahead in {sum(d > 0 for d in diffs)}/{len(diffs)} seeds)"
        )
    return f"VERDICT: {call} ({'; '.join(parts)})."


def versions() -> dict[str, str]:
    """Versions of the packages the run's numbers depend on (written to metrics.jsonl and printed)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "triton", "accelerate", "sdpo-kernels"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    out["torch_threads"] = f"{torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op"
    return out


def run_demo(settings: DemoSettings | None = None) -> str:
    """Run the whole demo; returns the verdict line (also printed). Outputs go to `settings.out`."""
    from transformers import logging as hf_logging

    from .tiny import build_char_tokenizer, build_tiny_model

    base = settings or DemoSettings()
    os.makedirs(base.out, exist_ok=True)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    hf_logging.set_verbosity_error()
    start = time.time()
    tok = build_char_tokenizer(ALPHABET + " >;:" + "nsxpectdf")
    metrics_path = os.path.join(base.out, "metrics.jsonl")
    rows: list[dict] = []
    env = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    with open(metrics_path, "w") as f:

        def log(row):
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()

        log({"versions": env})

        for seed in range(base.seed, base.seed + base.num_seeds):
            s = replace(base, seed=seed)
            torch.manual_seed(seed)

            def build(seed=seed):
                return build_tiny_model(tok, hidden_size=base.hidden, num_layers=base.layers, seed=seed)

            train, heldout = _task(seed)
            model = build()
            _warmup(model, tok, train, s)
            init_state = {k: v.clone() for k, v in model.state_dict().items()}
            warm = {
                "method": "warmup",
                "seed": seed,
                "step": 0,
                "heldout_accuracy": accuracy(model, tok, heldout),
                "train_accuracy": accuracy(model, tok, train),
                "train_sampled_success": sampled_success(model, tok, train),
                "train_accuracy_with_demonstration": accuracy(model, tok, train, hint="demo"),
                "train_accuracy_with_feedback": accuracy(model, tok, train, hint="feedback"),
                "seconds": round(time.time() - start, 1),
            }
            log(warm)
            tqdm.write(f"seed {seed} after warm-up: {warm}")
            for method in ("sdpo", "grpo"):
                _run_rl(method, init_state, tok, build, train, heldout, s, log)
        line = verdict(rows)
        f.write(json.dumps({"verdict": line, "seconds": round(time.time() - start, 1)}) + "\n")
    _plot(rows, os.path.join(base.out, "curves.png"))
    print(f"wrote {metrics_path} and {os.path.join(base.out, 'curves.png')} in {time.time() - start:.0f}s")
    per_seed = _series(rows, "sdpo", "heldout_accuracy"), _series(rows, "grpo", "heldout_accuracy")
    finals = ", ".join(
        f"seed {k}: {v[max(v)]:.2f}/{per_seed[1][k][max(per_seed[1][k])]:.2f}" for k, v in per_seed[0].items()
    )
    print(f"final held-out accuracy SDPO/GRPO per seed: {finals}")
    print(line)
    return line
