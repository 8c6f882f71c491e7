"""Hidden states of the completion positions and the model's output head, without full-sequence logits.

The student's loss runs *inside* its forward (`add_head_fn_forward`): DDP/FSDP/DeepSpeed hooks fire as in a
normal forward, and the caller's `head_fn` sees only the completion positions' hidden states. The logits path
applies the head (`head_logits`); the fused-linear path hands the hidden states and head weight to the kernel.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def logit_transform(model: nn.Module) -> tuple[float | None, float]:
    """(final_logit_softcapping, logit_scale) the model applies after its head (None / 1.0 when absent).

    Covers the transforms TRL's fused head knows: Gemma-style soft-capping, Cohere `logit_scale`, and the
    `output_multiplier` / `lm_head_multiplier` / `logits_scaling` families.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1.0 / config.logits_scaling
    return softcap, 1.0 if scale is None else float(scale)


def is_plain_linear_head(model: nn.Module) -> bool:
    """True when logits = hidden @ W.T (+ b) exactly: an `nn.Linear` head with no soft-capping or scaling."""
    softcap, scale = logit_transform(model)
    head = model.get_output_embeddings()
    return isinstance(head, nn.Linear) and not softcap and scale == 1.0


def head_logits(hidden: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Raw (not temperature-scaled) logits of `model`'s head. hidden [..., D] -> [..., V]."""
    logits = model.get_output_embeddings()(hidden)
    softcap, scale = logit_transform(model)
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] (int64) of left-padded rows, as `generate` computes them: 0 at each row's first attended
    token, counting attended tokens only; padding positions get 0 (they are masked out).

    Without them a model counts positions from column 0, padding included: no effect with rotary embeddings
    (attention scores depend on relative positions only, up to float rounding), but with absolute position
    embeddings a row's logits would depend on how much padding its batch gave it.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_with_head(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    head_fn: Callable[[torch.Tensor, nn.Module], Any],
    **kwargs: Any,
) -> Any:
    """Run `model`'s backbone and return `head_fn(hidden, model)`.

    hidden is [B, logits_to_keep, D]: the states that predict the last `logits_to_keep` tokens of `input_ids`
    (position t predicts token t+1, so the slice is [-K-1:-1]).
    """
    kwargs["use_cache"] = False
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.last_hidden_state[:, -logits_to_keep - 1 : -1]
    return head_fn(hidden, model)


def add_head_fn_forward(model: nn.Module) -> None:
    """Patch `model.forward` to accept `sdpo_head_fn` / `sdpo_logits_to_keep` (see `forward_with_head`).

    Without `sdpo_head_fn` the previous forward runs unchanged (generation, TRL's fused log-prob head).
    Patch the causal-LM itself (the PEFT base model under PEFT), as TRL does for its fused head.
    """
    previous = model.forward

    @functools.wraps(type(model).forward)
    def _forward(self, *args, sdpo_head_fn=None, sdpo_logits_to_keep=None, **kwargs):
        if sdpo_head_fn is None:
            return previous(*args, **kwargs)
        if args:
            raise ValueError("pass input_ids/attention_mask as keywords together with `sdpo_head_fn`")
        for key in ("labels", "output_attentions", "output_hidden_states", "return_dict"):
            kwargs.pop(key, None)  # PEFT forwards these as None; the backbone does not need them
        return forward_with_head(
            self, kwargs.pop("input_ids"), kwargs.pop("attention_mask"), sdpo_logits_to_keep, sdpo_head_fn, **kwargs
        )

    model.forward = types.MethodType(_forward, model)
