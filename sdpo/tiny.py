"""Tiny in-code models and a character-level tokenizer (offline tests and the demo; no hub access)."""

from __future__ import annotations

import string
from typing import Any

from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"
DEFAULT_CHARS = string.digits + string.ascii_lowercase + " +-*=?:.,!<>/\n"
# A minimal chat template (system/user/assistant turns) so conversational prompts work offline.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def build_char_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """One token per character in `chars` (+ pad/eos/bos); unknown characters map to `<pad>`-free `?`."""
    chars = "".join(dict.fromkeys(chars))  # dedupe, keep order
    vocab = {PAD: 0, EOS: 1, BOS: 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    unk = "?" if "?" in vocab else PAD
    # BPE without merges = character-level; Fuse() joins characters back without spaces.
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=unk, padding_side="left"
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A small Llama-architecture causal LM over `tokenizer`'s vocabulary (untied head: a plain nn.Linear)."""
    import torch

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def tiny_run_args(output_dir: str, **overrides: Any) -> dict[str, Any]:
    """`SDPOConfig` keyword arguments for a few-step CPU run of the tiny model (tests); `overrides` win."""
    args: dict[str, Any] = dict(
        output_dir=output_dir,
        bf16=False,
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        save_strategy="no",
        disable_tqdm=True,
    )
    args.update(overrides)
    return args
