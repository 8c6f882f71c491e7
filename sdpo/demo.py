"""Offline demo: SDPO vs a GRPO baseline on a tiny char-level model, on CPU, in a few minutes.

Task (verifiable, with textual environment feedback): reverse a 3-letter string over "abcde",
e.g. prompt "abd>" -> completion "dba". Reward 1 for an exact answer, else 0. The environment's
feedback (the dataset's `privileged_context`) is what a unit test prints on failure: "expected dba".

Steps: (1) build a char tokenizer and a tiny Llama in code; (2) a short supervised warm-up that teaches
the direct task on a *part* of the training strings, and teaches the model to use a demonstration or
feedback placed in its context; (3) from the same weights and seed, SDPO and GRPO runs; held-out
(never-seen) strings measure generalisation. Writes metrics JSONL, a PNG, and prints a one-line verdict.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

ALPHABET = "abcde"
REPROMPT = "{solution}{feedback}{prompt}"  # hint first: the completion directly follows the question
SOLUTION = "ans {successful_previous_attempt};"
FEEDBACK = "fb {feedback_raw};"


@dataclass
class DemoSettings:
    out: str = "demo_out"
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    warmup_steps: int = 300
    rl_steps: int = 60
    eval_every: int = 10
    num_generations: int = 8
    prompts_per_step: int = 4
    learning_rate: float = 2e-3
    direct_fraction: float = 0.4  # share of training strings whose direct answer the warm-up shows


def _task(seed: int):
    strings = ["".join(p) for p in itertools.product(ALPHABET, repeat=3)]
    random.Random(seed).shuffle(strings)
    return strings[:100], strings[100:]  # train, held-out


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
    was_training = model.training
    model.eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].size(1) :], skip_special_tokens=True)
    model.train(was_training)
    return sum(t.strip() == x[::-1] for t, x in zip(texts, strings)) / len(strings)


def _run_rl(method: str, init_state, tok, build, train, heldout, s: DemoSettings, log) -> None:
    from datasets import Dataset
    from transformers import ProgressCallback, TrainerCallback
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
            sdpo_policy_loss_mode="distillation_only",
            include_environment_feedback=True,
            environment_feedback_only_without_solution=True,
            reprompt_template=REPROMPT,
            solution_template=SOLUTION,
            feedback_template=FEEDBACK,
            teacher_update_rate=0.1,
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
            row = {"method": method, "step": state.global_step, "reward": logs["reward"]}
            if state.global_step % s.eval_every == 0 or state.global_step == s.rl_steps:
                row["heldout_accuracy"] = accuracy(model, tok, heldout)
                row["train_accuracy"] = accuracy(model, tok, train)
            for k in ("self_distillation/distillation_loss", "self_distillation/reprompt_sample_fraction"):
                if k in logs:
                    row[k] = logs[k]
            log(row)

    class QuietProgress(ProgressCallback):
        def on_log(self, *a, **kw):  # keep the bar, drop the per-step metric dicts (they go to the JSONL)
            pass

    trainer = trainer_cls(
        model=model, reward_funcs=reward_exact, args=args, train_dataset=ds, processing_class=tok, callbacks=[Eval()]
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    log(
        {
            "method": method,
            "step": 0,
            "heldout_accuracy": accuracy(model, tok, heldout),
            "train_accuracy": accuracy(model, tok, train),
        }
    )
    trainer.train()


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, color in (("sdpo", "tab:blue"), ("grpo", "tab:orange")):
        acc = [
            (r["step"], r["heldout_accuracy"]) for r in rows if r.get("method") == method and "heldout_accuracy" in r
        ]
        rew = [(r["step"], r["reward"]) for r in rows if r.get("method") == method and "reward" in r]
        if acc:
            axes[0].plot(*zip(*acc), marker="o", color=color, label=method.upper())
        if rew:
            steps, vals = zip(*rew)
            k = 5  # moving average: per-step rewards over 32 rollouts are noisy
            smooth = [
                sum(vals[max(0, i - k + 1) : i + 1]) / len(vals[max(0, i - k + 1) : i + 1]) for i in range(len(vals))
            ]
            axes[1].plot(steps, vals, color=color, alpha=0.25)
            axes[1].plot(steps, smooth, color=color, label=f"{method.upper()} (5-step mean)")
    axes[0].set(title="held-out accuracy (greedy)", xlabel="step", ylabel="exact match", ylim=(-0.02, 1.02))
    axes[1].set(title="training reward (sampled rollouts)", xlabel="step", ylabel="mean reward", ylim=(-0.02, 1.02))
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verdict(rows: list[dict]) -> str:
    """One line summarising what the curves show (final held-out accuracy and late reward per method)."""
    parts, finals = [], {}
    for method in ("sdpo", "grpo"):
        acc = [r["heldout_accuracy"] for r in rows if r.get("method") == method and "heldout_accuracy" in r]
        rew = [r["reward"] for r in rows if r.get("method") == method and "reward" in r]
        late = sum(rew[-10:]) / max(len(rew[-10:]), 1)
        finals[method] = acc[-1] if acc else float("nan")
        parts.append(f"{method.upper()} held-out acc {acc[0]:.2f}->{acc[-1]:.2f}, last-10-step reward {late:.2f}")
    diff = finals["sdpo"] - finals["grpo"]
    if abs(diff) < 0.05:
        call = "no clear difference in held-out accuracy"
    else:
        call = f"{'SDPO' if diff > 0 else 'GRPO'} ahead by {abs(diff):.2f} held-out accuracy"
    return f"VERDICT: {call} ({'; '.join(parts)})."


def run_demo(settings: DemoSettings | None = None) -> str:
    """Run the whole demo; returns the verdict line (also printed). Outputs go to `settings.out`."""
    from transformers import logging as hf_logging

    from .tiny import build_char_tokenizer, build_tiny_model

    s = settings or DemoSettings()
    os.makedirs(s.out, exist_ok=True)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    hf_logging.set_verbosity_error()
    torch.manual_seed(s.seed)
    start = time.time()
    tok = build_char_tokenizer(ALPHABET + " >;:" + "nsxpectdf")

    def build():
        return build_tiny_model(tok, hidden_size=s.hidden, num_layers=s.layers, seed=s.seed)

    train, heldout = _task(s.seed)
    model = build()
    _warmup(model, tok, train, s)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    metrics_path = os.path.join(s.out, "metrics.jsonl")
    rows: list[dict] = []
    with open(metrics_path, "w") as f:
        warm = {
            "method": "warmup",
            "step": 0,
            "heldout_accuracy": accuracy(model, tok, heldout),
            "train_accuracy": accuracy(model, tok, train),
            "train_accuracy_with_demonstration": accuracy(model, tok, train, hint="demo"),
            "warmup_seconds": round(time.time() - start, 1),
        }
        f.write(json.dumps(warm) + "\n")
        print(f"after warm-up: {warm}")

        def log(row):
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()

        for method in ("sdpo", "grpo"):
            _run_rl(method, init_state, tok, build, train, heldout, s, log)
        line = verdict(rows)
        f.write(json.dumps({"verdict": line, "seconds": round(time.time() - start, 1)}) + "\n")
    _plot(rows, os.path.join(s.out, "curves.png"))
    print(f"wrote {metrics_path} and {os.path.join(s.out, 'curves.png')} in {time.time() - start:.0f}s")
    print(line)
    return line
