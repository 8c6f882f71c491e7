"""`sdpo` command line: `sdpo train --config cfg.yaml` (TRL-style), `sdpo demo` and `sdpo discover`.

sdpo train --config examples/sdpo_config.yaml          # or flags: --model_name_or_path ... --dataset_name ...
sdpo demo --out demo_out
sdpo demo --model smollm2-135m-instruct --out demo_real   # real pretrained model, 39 min measured on 2 shared cores
sdpo discover --out discover_out                          # test-time SDPO vs best-of-k vs multi-turn (docs/discover.md)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass, field


@dataclass
class ScriptArguments:
    """What to train on (the model comes from TRL's `ModelConfig.model_name_or_path`: hub id or local path).

    Everything else is an `SDPOConfig` field (TRL's GRPO options included) or a `ModelConfig` field."""

    dataset_name: str = field(
        default=None, metadata={"help": "Hub dataset name, a local dataset dir, or a .json/.jsonl/.csv/.parquet file."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Optional evaluation split."})
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Reward functions by import path, e.g. `my_pkg.rewards:accuracy` or `my_pkg.rewards.accuracy`."
        },
    )
    feedback_column: str | None = field(
        default=None, metadata={"help": "Dataset column forwarded as `privileged_context` (environment feedback)."}
    )


def import_callable(path: str):
    """Import `pkg.mod:name` or `pkg.mod.name`; a clear ValueError when it cannot be found or called."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward_funcs entry {path!r} must look like 'package.module:function'.")
    sys.path.insert(0, os.getcwd())  # allow reward modules next to the config
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import reward function {path!r}: {e}") from e
    if not callable(obj):
        raise ValueError(f"reward function {path!r} is not callable.")
    return obj


def load_dataset_any(name: str, config: str | None = None):
    """A hub dataset, a `save_to_disk` directory, or a local data file (json/jsonl/csv/parquet)."""
    import datasets

    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        return datasets.load_from_disk(name)
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        return datasets.DatasetDict({"train": datasets.load_from_disk(name)})
    ext = os.path.splitext(name)[1].lstrip(".").lower()
    if os.path.isfile(name):
        kind = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
        if kind is None:
            raise ValueError(f"dataset_name {name!r}: unsupported file type {ext!r} (json, jsonl, csv, parquet).")
        return datasets.load_dataset(kind, data_files=name)
    return datasets.load_dataset(name, config)


def train(argv: list[str]) -> None:
    from trl import ModelConfig, TrlParser, get_peft_config

    from .config import SDPOConfig
    from .trainer import SDPOTrainer

    parser = TrlParser((ScriptArguments, SDPOConfig, ModelConfig), prog="sdpo train")
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (hub id or local path).")
    if not script_args.dataset_name:
        raise ValueError("dataset_name is required (hub name, local dir, or data file).")
    if not script_args.reward_funcs:
        raise ValueError("reward_funcs is required: at least one import path like 'my_pkg.rewards:accuracy'.")
    model_id = model_args.model_name_or_path
    init_kwargs = dict(training_args.model_init_kwargs or {})
    if model_args.dtype not in (None, "auto"):
        init_kwargs.setdefault("dtype", model_args.dtype)
    if model_args.attn_implementation is not None:
        init_kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    training_args.model_init_kwargs = init_kwargs or None

    data = load_dataset_any(script_args.dataset_name, script_args.dataset_config)
    if script_args.feedback_column:
        data = data.rename_column(script_args.feedback_column, "privileged_context")
    rewards = [import_callable(p) for p in script_args.reward_funcs]
    trainer = SDPOTrainer(
        model=model_id,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=data[script_args.dataset_train_split],
        eval_dataset=data[script_args.dataset_test_split] if script_args.dataset_test_split else None,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)


def demo(argv: list[str]) -> None:
    from .demo import TINY, run_demo, settings_for

    p = argparse.ArgumentParser(
        prog="sdpo demo",
        description="Offline demo: SDPO (top-K, fused-linear) vs GRPO, on a tiny char model (default) or a real "
        "pretrained model (--model smollm2-135m-instruct). Unset flags take the model's defaults.",
    )
    p.add_argument("--model", default=TINY, help="'tiny' (in-code char model) or a real model, see sdpo.models")
    p.add_argument("--out", default="demo_out", help="output directory (metrics.jsonl, curves.png)")
    p.add_argument("--seed", type=int, help="first seed")
    p.add_argument("--num_seeds", type=int)
    p.add_argument("--rl_steps", type=int)
    p.add_argument("--eval_every", type=int, help="RL steps between held-out evaluations")
    p.add_argument("--warmup_steps", type=int, help="tiny model only: supervised warm-up steps")
    p.add_argument("--learning_rate", type=float, help="tiny: warm-up lr (RL uses a quarter); real: RL lr")
    p.add_argument("--topk", type=int, help="SDPO's top-K support size")
    p.add_argument(
        "--token_level_arm",
        action=argparse.BooleanOptionalAction,
        help="also run SDPO with the token-level (sampled-token) loss",
    )
    p.add_argument("--workers", type=int, help="processes running seeds (0: one per core)")
    p.add_argument("--threads", type=int, help="torch intra-op threads per process")
    a = vars(p.parse_args(argv))
    run_demo(settings_for(a.pop("model"), **a))


def discover(argv: list[str]) -> None:
    """`sdpo discover ...`: `sdpo.discover.main` (imported only when used)."""
    importlib.import_module("sdpo.discover").main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train, "demo": demo, "discover": discover}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        print(
            "\ncommands: train (real runs, TrlParser: --config cfg.yaml), demo (offline demo; --model for a real "
            "model), discover (test-time SDPO on single hard questions, with best-of-k and multi-turn baselines)"
        )
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
