"""Teacher log-probs served by the running vLLM generation server (TRL 1.16's `use_teacher_server`).

The server holds the current student weights (a 'live' teacher, synced by GRPO's vLLM weight sync) and scores the
teacher sequences (reprompted prompt + the sampled completion) through `VLLMClient.get_sequence_logprobs`; no local
teacher forward runs. The server returns the teacher's top-k log-probs, not the full vocabulary, so only
`sampled_token` (the realised token's log-prob) and `topk_logits` over the *teacher's* top-k support are possible.

Client protocol (as `trl.generation.vllm_client.VLLMClient`):
    get_sequence_logprobs(sequences, prompt_lengths, top_logprobs, temperature) -> {
        "actual_logprobs": [B][T_i][1], "logprobs": [B][T_i][k], "logprob_token_ids": [B][T_i][k]}
with T_i the number of completion tokens of row i (ragged; a row may be empty).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def build_teacher_request_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_attention_mask: torch.Tensor
) -> tuple[list[list[int]], list[int], list[int]]:
    """Trim padded [B, L] teacher inputs into per-row token lists, with prompt and completion lengths."""
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids and attention_mask must have the same shape, got {input_ids.shape} and {attention_mask.shape}."
        )
    rows = input_ids.detach().cpu()
    masks = attention_mask.detach().cpu().bool()
    prompt_lengths = prompt_attention_mask.detach().cpu().sum(dim=1).tolist()
    sequences, prompts, completions = [], [], []
    for row, mask, prompt_len in zip(rows, masks, prompt_lengths, strict=True):
        kept = row[mask]
        if not 0 <= prompt_len <= kept.numel():
            raise ValueError(f"Invalid prompt length {prompt_len} for trimmed sequence of length {kept.numel()}.")
        sequences.append(kept.tolist())
        prompts.append(int(prompt_len))
        completions.append(kept.numel() - int(prompt_len))
    return sequences, prompts, completions


def fetch_teacher_logprobs(
    client: Any, inputs: dict[str, torch.Tensor], logits_to_keep: int, top_logprobs: int, temperature: float
) -> dict[str, torch.Tensor]:
    """Ask `client` for the teacher's log-probs of the completion tokens; dense [B, T] / [B, T, k] tensors.

    Returns `actual_logprobs` [B, T] (the realised token), `topk_logprobs` [B, T, k] and `topk_token_ids` [B, T, k].
    Completions are right-padded: the server's values fill each row's leading positions, the padded tail keeps the
    sentinels `-inf` (log-probs) and 0 (ids); the caller neutralises every position outside its loss mask.
    """
    ids, attn = inputs["teacher_input_ids"], inputs["teacher_attention_mask"]
    batch = ids.size(0)
    prompt_attn = attn[:, : attn.size(1) - logits_to_keep]
    sequences, prompt_lengths, _ = build_teacher_request_inputs(ids, attn, prompt_attn)
    result = client.get_sequence_logprobs(
        sequences=sequences, prompt_lengths=prompt_lengths, top_logprobs=top_logprobs, temperature=temperature
    )
    actual = torch.full((batch, logits_to_keep), float("-inf"), dtype=torch.float32)
    topk = torch.full((batch, logits_to_keep, top_logprobs), float("-inf"), dtype=torch.float32)
    topk_ids = torch.zeros((batch, logits_to_keep, top_logprobs), dtype=torch.long)
    for i in range(batch):
        n = min(len(result["actual_logprobs"][i]), logits_to_keep)
        if n:
            actual[i, :n] = torch.tensor(result["actual_logprobs"][i], dtype=torch.float32)[:n, 0]
            topk[i, :n] = torch.tensor(result["logprobs"][i], dtype=torch.float32)[:n]
            topk_ids[i, :n] = torch.tensor(result["logprob_token_ids"][i], dtype=torch.long)[:n]
    device = ids.device
    return {
        "actual_logprobs": actual.to(device),
        "topk_logprobs": topk.to(device),
        "topk_token_ids": topk_ids.to(device),
    }


def divergence(student_logps: torch.Tensor, teacher_logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """Σ over the last dim: 0 forward KL(T‖S), 1 reverse KL(S‖T), otherwise the generalised JSD (TRL's formula)."""
    if alpha == 0.0:
        kl = F.kl_div(student_logps, teacher_logps, reduction="none", log_target=True)
    elif alpha == 1.0:
        kl = F.kl_div(teacher_logps, student_logps, reduction="none", log_target=True)
    else:
        a = torch.tensor(alpha, dtype=student_logps.dtype, device=student_logps.device)
        mixture = torch.logsumexp(torch.stack([student_logps + torch.log(1 - a), teacher_logps + torch.log(a)]), dim=0)
        kl_teacher = F.kl_div(mixture, teacher_logps, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, student_logps, reduction="none", log_target=True)
        kl = torch.lerp(kl_student, kl_teacher, alpha)
    return kl.sum(-1)


def add_tail_bucket(logps: torch.Tensor) -> torch.Tensor:
    """Append log(1 − Σ exp(logps)) (the mass outside a top-k support, floored as TRL does) as a last category."""
    log_mass = torch.logsumexp(logps, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logps, torch.log(-torch.expm1(log_mass))], dim=-1)


def server_per_token_loss(
    student_logits: torch.Tensor,
    teacher: dict[str, torch.Tensor],
    completion_ids: torch.Tensor,
    required: torch.Tensor,
    *,
    mode: str,
    alpha: float,
    add_tail: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [B, T] against server log-probs, and the teacher's realised-token log-probs (neutralised).

    student_logits [B, T, V] are temperature-scaled; `required` [B, T] marks the positions that enter the loss (every
    other position is set to finite values so that no -inf leaks through a masked product).
    """
    student_logps = torch.log_softmax(student_logits.float(), dim=-1)
    student_token = torch.gather(student_logps, -1, completion_ids.unsqueeze(-1)).squeeze(-1)
    teacher_token = teacher["actual_logprobs"]
    if (required & ~torch.isfinite(teacher_token)).any():
        raise ValueError("Teacher server returned no logprob for a required completion token.")
    teacher_token = torch.where(required, teacher_token, torch.zeros_like(teacher_token))
    if mode == "sampled_token":  # reverse KL on the realised token (TRL's sampled-token objective)
        return (student_token - teacher_token).detach() * student_token, teacher_token
    keep = required.unsqueeze(-1)
    student_topk = torch.gather(student_logps, -1, teacher["topk_token_ids"])
    student_topk = torch.where(keep, student_topk, torch.zeros_like(student_topk))
    teacher_topk = torch.where(keep, teacher["topk_logprobs"], torch.zeros_like(teacher["topk_logprobs"]))
    if add_tail:
        student_topk, teacher_topk = add_tail_bucket(student_topk), add_tail_bucket(teacher_topk)
    else:
        student_topk = student_topk - torch.logsumexp(student_topk, dim=-1, keepdim=True)
        teacher_topk = teacher_topk - torch.logsumexp(teacher_topk, dim=-1, keepdim=True)
    return divergence(student_topk, teacher_topk, alpha), teacher_token
