"""One SDPO training step: peak memory and time of the loss + backward, per trainer.

    python bench/bench_trainer.py --out bench/results/cpu-trainer-<date>      # writes <out>.json/.md/.png
    python bench/bench_trainer.py --model smollm2-135m-instruct --out bench/results/cpu-trainer-smollm2-<date>
    python bench/bench_trainer.py --render bench/results/cpu-trainer-<date>.json   # re-write .md/.png only

Implementations (each in its own subprocess, same tiny model, same prepared batch):

- `trl_sdpo`:    TRL 1.16's `trl.experimental.sdpo.SDPOTrainer`
- `ours_fused`:  `sdpo.SDPOTrainer`, `distillation_fused_linear="always"` (hidden states x head weight, no logits)
- `ours_logits`: `sdpo.SDPOTrainer`, `distillation_fused_linear="never"` (logits path)
- `trl_grpo`:    TRL 1.16's `trl.GRPOTrainer` (the policy loss only: the floor a GRPO step already pays)

Settings of the SDPO trainers: `distillation_mode="topk_logits"`, top-K 100 with the tail bucket, alpha 0.5,
`distillation_is_clip=2.0` (with rollout log-probs in the batch, so the clip acts), `distillation_weight=1.0`,
EMA teacher (TRL's default), temperature 1, loss_type "dapo" (TRL's default). GRPO: its defaults (beta 0).

Model (default): an in-code Llama (hidden 64, 2 layers, 4 heads, untied head) over an in-code character tokenizer
of exactly 151936 tokens. With `--model smollm2-135m-instruct`: the real pretrained SmolLM2-135M-Instruct
(`sdpo.models`; V = 49152, hidden 576, 30 layers, tied embeddings, fp32), loaded by every trainer from its cache
folder (never copied), with its own tokenizer; batch 8 x 64 completion tokens (`SMOLLM2_SHAPE`: two CPU cores
take ~4 s per step of the whole 135M model), the same prompt / teacher-prompt lengths and token ids drawn
uniformly from the real vocabulary; the EMA teacher is perturbed by 0.05 x each parameter's std x N(0,1)
(relative: an absolute 0.05 would swamp pretrained weights of std ~0.02..0.1). Every parameter trains, so the
peak includes the gradients of all 134.5M parameters (5.3 units at this shape; reported separately).
Default batch: 8 sequences, prompt 16 tokens (two rows left-padded), 128 completion tokens each (no padding:
tokens = 8 x 128 = 1024), teacher prompt 48 tokens, every row distilled. The EMA teacher copy is perturbed by
0.05 N(0,1) (same noise in every SDPO trainer). `old_per_token_logps` = the model's own log-probs of the completion
+ 0.5 N(0,1). The batch is built once in the parent (generation is not measured) and
fed to `trainer.compute_loss(model, inputs)` as `_prepare_inputs` would: the keys of TRL SDPO's
`_prepare_training_batch` output, plus GRPO's `advantages` / `old_per_token_logps` / `num_items_in_batch`.

Measured per implementation: one untimed warm-up step, then the allocation peak of one step (`compute_loss` +
`.backward()`, gradients set to None before it, as after `optimizer.zero_grad()`) by `harness.peak_extra_bytes`
(torch.profiler with profile_memory on CPU: bytes allocated on top of what was live before the step, so the
parameter gradients -- [V, D] for the embedding and the head, 2 x 64/1024 = 0.125 units -- are included), reported
in units of one fp32 [tokens, V] tensor; then the median wall time of `--rounds` un-profiled steps.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

V = 151936
B, P, T, PT = 8, 16, 128, 48
HIDDEN, LAYERS, HEADS = 64, 2, 4
TOPK, ALPHA, IS_CLIP = 100, 0.5, 2.0
MODEL: str | None = None  # None: the in-code model; else a name of `sdpo.models.OFFLINE_MODELS`
REAL_MODELS = ("smollm2-135m-instruct",)
SMOLLM2_SHAPE = dict(B=8, P=16, T=64, PT=48)  # sequences, prompt, completion, teacher prompt tokens


def configure(model: str | None) -> None:
    """Set the module's shape globals for `model` (None: the in-code model at V = 151936, unchanged)."""
    global MODEL, V, B, P, T, PT, HIDDEN, LAYERS, HEADS
    if model is None:
        return
    if model not in REAL_MODELS:
        raise SystemExit(f"--model must be one of {REAL_MODELS}, got {model!r}")
    from transformers import AutoConfig

    from sdpo import models

    cfg = AutoConfig.from_pretrained(models.convert(model), local_files_only=True)
    MODEL = model
    V, HIDDEN, LAYERS, HEADS = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    B, P, T, PT = (SMOLLM2_SHAPE[k] for k in ("B", "P", "T", "PT"))


def load_tokenizer():
    """The tokenizer every trainer gets: the in-code character tokenizer, or the real model's pinned one."""
    if MODEL is None:
        return build_tokenizer()
    from sdpo import models

    model, tok = models.load(MODEL)
    del model
    return tok


IMPLS = {
    "trl_sdpo": "TRL 1.16 trl.experimental.sdpo.SDPOTrainer",
    "ours_fused": "sdpo.SDPOTrainer, distillation_fused_linear='always'",
    "ours_logits": "sdpo.SDPOTrainer, distillation_fused_linear='never' (logits path)",
    "trl_grpo": "TRL 1.16 trl.GRPOTrainer (policy loss only; the floor)",
}


def build_tokenizer():
    """`sdpo.tiny.build_char_tokenizer` over the default characters plus enough other code points for V tokens."""
    from sdpo.tiny import DEFAULT_CHARS, build_char_tokenizer

    need = V - 3 - len(set(DEFAULT_CHARS))
    extra, cp = [], 0x100
    while len(extra) < need:
        if not 0xD800 <= cp <= 0xDFFF:  # no surrogates
            extra.append(chr(cp))
        cp += 1
    tok = build_char_tokenizer(DEFAULT_CHARS + "".join(extra))
    assert len(tok) == V, len(tok)
    return tok


def build_model(tok):
    from sdpo.tiny import build_tiny_model

    return build_tiny_model(tok, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, max_positions=512, seed=0)


def make_batch(path: Path, model_dir: Path) -> None:
    """The one batch every implementation sees (saved with torch.save), and the model every trainer loads.

    The model is saved and passed to the trainers as a path: TRL's SDPOTrainer builds its EMA teacher from the
    student's model id, which an in-memory model built in code does not have."""
    import torch

    tok = load_tokenizer()
    if MODEL is None:
        model = build_model(tok).eval()
        model.save_pretrained(model_dir)
    else:  # the trainers load the converted checkpoint from its cache folder (`model_path`)
        from sdpo import models

        model, _ = models.load(MODEL)
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :3] = 0
    prompt_mask[5, :6] = 0
    prompt_ids[prompt_mask == 0] = tok.pad_token_id
    completion_ids = torch.randint(3, V, (B, T), generator=g)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    teacher_prompt = torch.randint(3, V, (B, PT), generator=g)
    teacher_prompt_mask = torch.ones(B, PT, dtype=torch.long)
    teacher_prompt_mask[2, :10] = 0
    teacher_prompt[teacher_prompt_mask == 0] = tok.pad_token_id
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
        logits = logits[:, -T - 1 : -1].float()
        logps = logits.gather(-1, completion_ids[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
        del logits
    old = logps + 0.5 * torch.randn(B, T, generator=g)
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "raw_completion_lengths": torch.full((B,), T, dtype=torch.long),
        "teacher_input_ids": torch.cat([teacher_prompt, completion_ids], 1),
        "teacher_attention_mask": torch.cat([teacher_prompt_mask, completion_mask], 1),
        "self_distillation_mask": torch.ones(B),
        "rewards": torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]),
        "advantages": torch.tensor([0.9, -0.9, 0.9, -0.9, -0.9, 0.9, -0.9, 0.9]),
        "old_per_token_logps": old,
        "num_items_in_batch": completion_mask.sum(),
        "num_distillation_items_in_batch": completion_mask.sum(),
    }
    torch.save(batch, path)


def reward(completions, **kwargs):
    return [float(len(c) % 2 == 0) for c in completions]


def make_trainer(impl: str, tok, model, outdir: str):
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "5+1="] * 2})
    common = dict(
        output_dir=outdir,
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=B,
        num_generations=B,
        max_completion_length=T,
        max_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    sd = dict(
        distillation_mode="topk_logits",
        distillation_topk=TOPK,
        distillation_add_tail=True,
        distillation_alpha=ALPHA,
        distillation_is_clip=IS_CLIP,
        distillation_weight=1.0,
    )
    if impl == "trl_sdpo":
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

        args = SDPOConfig(**common, **sd)
    elif impl in ("ours_fused", "ours_logits"):
        from sdpo import SDPOConfig, SDPOTrainer

        fused = "always" if impl == "ours_fused" else "never"
        args = SDPOConfig(**common, **sd, distillation_fused_linear=fused)
    elif impl == "trl_grpo":
        from trl import GRPOConfig
        from trl import GRPOTrainer as SDPOTrainer

        args = GRPOConfig(**common)
    else:
        raise KeyError(impl)
    return SDPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)


def model_path(tmp_model_dir: Path) -> Path:
    """Where the trainers load the model from: the saved in-code model, or the real model's cache folder."""
    if MODEL is None:
        return tmp_model_dir
    from sdpo import models

    return models.convert(MODEL)


def worker(impl: str, batch_path: Path, model_dir: Path, rounds: int, out_path: Path) -> None:
    import torch
    from harness import device_name, peak_extra_bytes

    torch.manual_seed(0)
    tok = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(impl, tok, str(model_dir), tmp)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = torch.load(batch_path)
    # The EMA teacher starts as an exact copy of the student (divergence ~0); move it off by the same
    # deterministic noise in every SDPO implementation so the loss is not trivially zero.
    teacher = {"trl_sdpo": lambda: trainer.teacher_model, "ours_fused": lambda: trainer.teacher.model}
    teacher["ours_logits"] = teacher["ours_fused"]
    if impl in teacher:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in sorted(teacher[impl]().named_parameters()):
                # Relative for pretrained weights (absolute 0.05 would swamp them); absolute for the in-code model.
                scale = 0.05 if MODEL is None else 0.05 * float(p.float().std()) if p.numel() > 1 else 0.0
                p.add_(scale * torch.randn(p.shape, generator=g))
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []

    def step() -> None:
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        losses.append(loss.detach().item())

    def zero() -> None:
        for p in params:
            p.grad = None

    zero()
    step()  # warm-up (first touch, lazy init)
    zero()
    peak = peak_extra_bytes(step, "cpu")
    times = []
    for _ in range(rounds):
        zero()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    unit = B * T * V * 4
    param_grad = sum(p.numel() * p.element_size() for p in params)
    res = {
        "impl": impl,
        "label": IMPLS[impl],
        "peak_bytes": peak,
        "peak_tokens_v_fp32": peak / unit,
        "param_grad_bytes": param_grad,
        "param_grad_tokens_v_fp32": param_grad / unit,
        "times_s": times,
        "median_s": statistics.median(times),
        "loss": losses[-1],
        "losses": losses,
        "use_fused_linear": getattr(trainer, "use_fused_linear", None),
        "torch_threads": torch.get_num_threads(),
        "device_name": device_name("cpu"),
    }
    out_path.write_text(json.dumps(res, indent=2))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import harness

    v = harness.versions()
    for pkg in ("transformers", "accelerate", "datasets"):
        try:
            v[pkg] = version(pkg)
        except PackageNotFoundError:
            v[pkg] = None
    return v


def _model_text(s: dict) -> str:
    if s.get("model"):
        return (
            f"pretrained {s['model']} (hidden {s['hidden']}, {s['layers']} layers, tied embeddings, every parameter "
            "trains)"
        )
    return f"in-code Llama (hidden {s['hidden']}, {s['layers']} layers, untied head)"


def write_md(data: dict, path: Path) -> None:
    s = data["settings"]
    lines = [
        f"# One SDPO trainer step at V = {s['V']}: loss + backward ({data['date']})",
        "",
        f"Device: {data['device_name']}. Versions: "
        + ", ".join(f"{k} {data['versions'].get(k)}" for k in ("torch", "transformers", "trl", "python")),
        "",
        f"Shape: {s['B']} sequences x {s['T']} completion tokens = {s['tokens']} tokens, V = {s['V']}, "
        f"{_model_text(s)}, fp32. Settings: "
        f"top-K {s['topk']} logit distillation with tail, alpha {s['alpha']}, IS clip {s['is_clip']}, "
        "distillation_weight 1, EMA teacher, loss_type dapo. One batch prepared once (no generation); "
        "`trainer.compute_loss(model, inputs)` + `.backward()`, one subprocess per implementation.",
        "",
        f"Peak = extra bytes allocated during one step (torch.profiler profile_memory, `harness.peak_extra_bytes`), "
        f"in units of one fp32 [tokens, V] tensor ({s['unit_bytes'] / 2**20:.0f} MiB); it includes the parameter "
        f"gradients ({'all parameters' if s.get('model') else 'embedding + head'}, "
        f"{next(r for r in data['results'] if 'error' not in r)['param_grad_tokens_v_fp32']:.3f} units). "
        f"Time = median of {s['rounds']} un-profiled steps (wall clock, shared 2-core CPU: noisy).",
        "",
        "| implementation | what | peak (fp32 [tokens,V]) | peak (MiB) | time (median) | times (s) | loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['label']} | failed: {r['error'][:120]} | | | | |")
            continue
        ts = ", ".join(f"{t:.2f}" for t in r["times_s"])
        lines.append(
            f"| {r['impl']} | {r['label']} | {r['peak_tokens_v_fp32']:.2f} | {r['peak_bytes'] / 2**20:.0f} | "
            f"{r['median_s']:.2f} s | {ts} | {r['loss']:.6g} |"
        )
    lines.append("")
    path.write_text("\n".join(lines))


def write_png(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if "error" not in r]
    names = [r["impl"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    bars = a1.bar(names, [r["peak_tokens_v_fp32"] for r in rows], color="tab:blue")
    a1.bar_label(bars, fmt="%.2f")
    a1.set_ylabel("peak of loss + backward, fp32 [tokens, V] units")
    bars = a2.bar(names, [r["median_s"] for r in rows], color="tab:orange")
    a2.bar_label(bars, fmt="%.2f")
    a2.set_ylabel("median time of loss + backward (s)")
    s = data["settings"]
    what = f"{s['model']}, " if s.get("model") else ""
    fig.suptitle(f"SDPO trainer step, {what}{s['B']}x{s['T']} tokens, V={s['V']}, CPU fp32 ({data['date']})")
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="output stem: writes OUT.json, OUT.md, OUT.png")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per implementation")
    ap.add_argument("--render", type=Path, help="only re-write the .md and .png of an existing results JSON")
    ap.add_argument(
        "--model", choices=REAL_MODELS, help="a real pretrained model (sdpo.models) instead of the in-code one"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        configure(a.model)
        worker(a.worker, a.batch, model_path(a.batch.parent / "model"), a.rounds, a.result)
        return
    if a.render:
        data = json.loads(a.render.read_text())
        stem = a.render.with_suffix("")
        write_md(data, Path(f"{stem}.md"))
        write_png(data, Path(f"{stem}.png"))
        return
    if a.out is None:
        ap.error("--out is required")
    from harness import device_name

    configure(a.model)
    impls = [i for i in a.impls.split(",") if i]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        batch = Path(tmp) / "batch.pt"
        make_batch(batch, Path(tmp) / "model")
        for impl in impls:
            res_path = Path(tmp) / f"{impl}.json"
            cmd = [sys.executable, __file__, "--worker", impl, "--batch", str(batch), "--rounds", str(a.rounds)]
            cmd += ["--result", str(res_path)] + (["--model", a.model] if a.model else [])
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0 or not res_path.exists():
                err = (p.stderr or p.stdout).strip().splitlines()
                print(f"{impl}: FAILED rc={p.returncode}\n" + "\n".join(err[-30:]), file=sys.stderr)
                results.append({"impl": impl, "label": IMPLS[impl], "error": err[-1] if err else f"rc {p.returncode}"})
                continue
            r = json.loads(res_path.read_text())
            r["process_wall_s"] = time.perf_counter() - t0
            results.append(r)
            print(
                f"{impl}: peak {r['peak_tokens_v_fp32']:.3f} [tokens,V] fp32 ({r['peak_bytes'] / 2**20:.0f} MiB), "
                f"median {r['median_s']:.2f} s, loss {r['loss']:.6g}",
                flush=True,
            )
    data = {
        "suite": "bench_trainer",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": "cpu",
        "device_name": device_name("cpu"),
        "versions": versions(),
        "settings": {
            "B": B,
            "T": T,
            "P": P,
            "teacher_prompt": PT,
            "tokens": B * T,
            "V": V,
            "hidden": HIDDEN,
            "layers": LAYERS,
            "heads": HEADS,
            "model": MODEL,
            "dtype": "fp32",
            "topk": TOPK,
            "add_tail": True,
            "alpha": ALPHA,
            "is_clip": IS_CLIP,
            "distillation_weight": 1.0,
            "teacher": "ema",
            "loss_type": "dapo",
            "rounds": a.rounds,
            "unit": "one fp32 [tokens, V] tensor",
            "unit_bytes": B * T * V * 4,
            "peak_method": "harness.peak_extra_bytes (torch.profiler profile_memory) around compute_loss + backward",
        },
        "results": results,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}.json").write_text(json.dumps(data, indent=2))
    write_md(data, Path(f"{a.out}.md"))
    if any("error" not in r for r in results):
        write_png(data, Path(f"{a.out}.png"))
    print(f"wrote {a.out}.json/.md/.png")


if __name__ == "__main__":
    main()
