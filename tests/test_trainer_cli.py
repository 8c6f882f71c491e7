"""`sdpo train --config cfg.yaml` end to end on a local tiny model, a jsonl dataset and an imported reward."""

import json
import os
import sys

import pytest

from sdpo.cli import import_callable, main
from sdpo.tiny import build_char_tokenizer, build_tiny_model


def test_import_callable_errors():
    assert import_callable("os.path:join") is os.path.join
    assert import_callable("os.path.join") is os.path.join
    with pytest.raises(ValueError, match="cannot import"):
        import_callable("os.path:nope")
    with pytest.raises(ValueError, match=r"package\.module:function"):
        import_callable("nodots")


def test_usage_exit_code():
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


@pytest.mark.slow
def test_train_from_yaml(tmp_path, monkeypatch):
    tok = build_char_tokenizer()
    model = build_tiny_model(tok)
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "hint": "it is 2"}) + "\n" for p in ["1+1=", "2+2="] * 2))
    (tmp_path / "my_rewards.py").write_text(
        "def parity(completions, **kw):\n    return [float(len(c) % 2 == 0) for c in completions]\n"
    )
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model_name_or_path: {model_dir}\n"
        f"dataset_name: {data}\n"
        "reward_funcs: [my_rewards:parity]\n"
        "feedback_column: hint\n"
        f"output_dir: {tmp_path / 'out'}\n"
        "bf16: false\nuse_cpu: true\nreport_to: none\nsave_strategy: 'no'\n"
        "per_device_train_batch_size: 4\nnum_generations: 4\nmax_completion_length: 4\nmax_steps: 1\n"
        "full_logit_distillation: true\ndistillation_topk: 4\ndistillation_alpha: 0.5\n"
        "include_environment_feedback: true\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    main(["train", "--config", str(cfg)])
    assert (tmp_path / "out" / "config.json").exists()
