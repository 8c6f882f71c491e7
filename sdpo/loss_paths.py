"""The loss side of `SDPOTrainer`: GRPO's `_compute_loss` replaced by SDPO's (`SDPOLossMixin`).

One student forward whose hidden states go through the output head into `sdpo_kernels.self_distillation_loss`
(the logits path) or straight into `sdpo_kernels.linear_self_distillation_loss` (the fused-linear path), the
teacher's side (EMA / base / live / trust-region teacher, or a vLLM teacher server), the distillation and policy
weights of each aggregation, and the metrics the loss computation logs (docs/trainer.md, "Which loss runs",
"Metrics"). A mixin: the methods read the trainer's state (`self.args`, `self.teacher`, ...) set up in
`sdpo.trainer.SDPOTrainer.__init__`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from trl.trainer.utils import selective_log_softmax

import sdpo_kernels
from sdpo_kernels import self_distillation_loss

from .loss_helpers import (
    aggregation_weights,
    clipped_policy_per_token,
    distillation_aggregation_weights,
    distillation_loss_kwargs,
)
from .metrics import (
    entropy_and_token_logps,
    is_clip_flags,
    masked_sum_count,
    per_token_kl,
    policy_clip_flags,
    reduce_sum_counts,
    teacher_prompt_lengths,
)
from .modeling import head_logits, padded_position_ids
from .teacher_server import fetch_teacher_logprobs, server_per_token_loss

logger = logging.getLogger(__name__)


class SDPOLossMixin:
    """SDPO's loss computation for `SDPOTrainer` (placed before `GRPOTrainer` in its bases)."""

    # ---- loss -------------------------------------------------------------------------------------------------
    def _accumulation_steps(self, mode: str) -> int:
        """The loss's gradient-accumulation divisor: 1 in eval; outside `train()` (a hand-made batch) the configured
        steps, since `current_gradient_accumulation_steps` is only set by the training loop."""
        if mode != "train":
            return 1
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def _distillation_weights(self, dist_mask: torch.Tensor, inputs: dict[str, Any], mode: str) -> torch.Tensor:
        """Weights [B, T] of the per-token distillation losses: aggregation, GA scaling and the loss coefficient."""
        args = self.args
        if args.distillation_aggregation == "loss_type":
            w = self._loss_type_weights(dist_mask, inputs.get("num_distillation_items_in_batch"), mode)
        else:
            w = distillation_aggregation_weights(
                dist_mask, args.distillation_aggregation, max_completion_length=self.max_completion_length
            )
            w = w / self._accumulation_steps(mode)
        ratio = inputs.get("importance_sampling_ratio")
        if args.distillation_rollout_is and ratio is not None:  # official SDPO's rollout IS, [B, T] or [B, 1]
            w = w * ratio.to(w.dtype).expand_as(w)
        return w * args.distillation_loss_weight

    def _loss_type_weights(self, mask: torch.Tensor, num_items: torch.Tensor | None, mode: str) -> torch.Tensor:
        """`aggregation_weights` for `loss_type` (GRPO's policy-term aggregation), with TRL's gradient-accumulation
        scaling folded in."""
        ga = self._accumulation_steps(mode)
        if self.loss_type == "dapo":
            if num_items is None:  # a batch built without GRPO's counts: the local count stands in for the global
                num_items = mask.sum() * self.accelerator.num_processes
            normalizer = num_items.to(torch.float32).clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * ga / self.args.steps_per_generation
            return aggregation_weights(mask, "dapo", normalizer=normalizer)
        w = aggregation_weights(mask, self.loss_type, max_completion_length=self.max_completion_length)
        return w / ga

    def _teacher_head(self, model, inputs: dict[str, Any], head_fn: Callable) -> Any:
        """Run the teacher forward (no grad) on its reprompted inputs, returning `head_fn(hidden, lm)`."""
        ids, attn = inputs["teacher_input_ids"], inputs["teacher_attention_mask"]
        # Reprompts differ in length far more than prompts: count positions from each row's first token, as
        # `generate` does (docs/trainer.md, "Teacher positions").
        kw = dict(input_ids=ids, attention_mask=attn, position_ids=padded_position_ids(attn))
        keep = inputs["completion_ids"].size(1)
        with torch.no_grad():
            if self.teacher_model_wrapped is not None:  # separate EMA copy, through its (wrapped) root forward
                out = self.teacher_model_wrapped(**kw, sdpo_head_fn=head_fn, sdpo_logits_to_keep=keep)
                if self.is_fsdp_enabled:
                    # FSDP2 leaves the root group (embeddings, norm, head) unsharded after a forward; the EMA
                    # and the checkpoint need the shards back, and so does the memory.
                    self.teacher_model_wrapped.reshard()
                return out
            with self.teacher.forward_context():  # live student, or the EMA adapter under PEFT
                return model(**kw, sdpo_head_fn=head_fn, sdpo_logits_to_keep=keep)

    def _teacher_outputs(self, model, inputs: dict[str, Any], fused: bool) -> Any:
        """The teacher's side of the loss: (hidden, head weight, bias) on the fused path, else logits [B, T, V].

        Under autocast like the student: fp32 weights with bf16=True give bf16 logits on both sides.
        """
        with self.accelerator.autocast():
            if fused:
                return self._teacher_head(model, inputs, self._teacher_fused_head)
            if self.teacher.kind == "trust_region":
                return self._trust_region_teacher_logits(model, inputs)
            return self._teacher_head(model, inputs, head_logits)

    def _trust_region_teacher_logits(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        """The official SDPO's trust-region teacher: lerp(reference logits, current student logits, rate) [B, T, V],
        both on the teacher's reprompted inputs (the reference is the initial student; no gradient)."""
        reference = self._teacher_head(model, inputs, head_logits)
        with torch.no_grad():
            attn = inputs["teacher_attention_mask"]
            student = model(
                input_ids=inputs["teacher_input_ids"],
                attention_mask=attn,
                position_ids=padded_position_ids(attn),
                sdpo_head_fn=head_logits,
                sdpo_logits_to_keep=inputs["completion_ids"].size(1),
            )
        return torch.lerp(reference.float(), student.float(), self.teacher.rate)

    def _teacher_fused_head(self, hidden: torch.Tensor, lm: nn.Module) -> tuple:
        """Teacher head_fn of the fused path: (hidden [B, T, D], head weight [V, D] or None, bias or None).

        None means "read the head outside the forward" (see `_fused_linear_losses`). Only a separate teacher under
        FSDP must hand its head out of the forward: it is unsharded just inside it, so it is copied ([V, D]).
        """
        if self.teacher_model_wrapped is not None and self.is_fsdp_enabled:
            head = lm.get_output_embeddings()
            return hidden, head.weight.detach().clone(), None if head.bias is None else head.bias.detach().clone()
        return hidden, None, None

    def _teacher_head_params(self, student_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's (weight, bias) read outside its forward: the student's head when the teacher shares it
        (live student, EMA adapter), else the separate teacher's own parameters (ZeRO-3: gathered by the caller).
        """
        if self.teacher_model_wrapped is None:
            return student_head.weight, student_head.bias
        head = self.teacher.model.get_output_embeddings()
        return head.weight, head.bias

    def _compute_loss(self, model, inputs):
        """distillation_only: w_d·SD; hybrid: GRPO clipped loss + w_d·SD, from one student forward.

        Shapes: prompt_ids [B, P], completion_ids/mask [B, T], teacher_input_ids [B, P'+T], advantages [B].
        """
        args = self.args
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        keep = completion_ids.size(1)
        mask, dist_mask = self._loss_masks(inputs)
        if self.use_teacher_server:
            return self._server_distillation_loss(model, inputs, mask, dist_mask, mode)
        hybrid = args.policy_loss_weight != 0.0
        w_dist = self._distillation_weights(dist_mask, inputs, mode)
        w_pol = None
        if hybrid:
            w_pol = self._loss_type_weights(mask, inputs.get("num_items_in_batch"), mode) * args.policy_loss_weight
        # IS clipping uses the rollout log-probs when the rollout produced them.
        old = inputs.get("old_per_token_logps", inputs.get("sampling_per_token_logps"))
        # Every process runs the teacher forward when several do: under ZeRO-3 / FSDP it holds
        # collectives, and a per-rank decision would leave the others waiting.
        has_teacher = args.distillation_loss_weight != 0.0 and (
            self.accelerator.num_processes > 1 or bool(dist_mask.any())
        )
        # Hybrid batches without a teacher row still take the fused path (policy term only): the
        # logits path would hold the [B, T, V] logits, the peak a fused-linear run is sized without.
        fused = self.use_fused_linear and (has_teacher or hybrid)

        teacher_out = self._teacher_outputs(model, inputs, fused) if has_teacher else None

        def student_head(hidden: torch.Tensor, lm: nn.Module) -> dict[str, torch.Tensor]:
            if teacher_out is None and w_pol is None:
                # Nothing to learn from this batch: skip the output head, but keep every parameter in
                # the graph (a zero loss) so that backward and DDP's gradient sync still run.
                return {
                    "loss": hidden.sum() * 0.0 + sum(p.sum() for p in lm.get_output_embeddings().parameters()) * 0.0
                }
            if fused:
                losses = self._fused_linear_losses(hidden, lm, teacher_out, inputs, old, w_dist, w_pol)
                # From the kernel's per-row outputs, over the tokens it ran on: GRPO's entropy (a pass over each
                # chunk's logits, as GRPO's own), its clip ratios and the IS clip share (token log-probs).
                rows = losses.pop("token_rows")
                stats = {"entropy": masked_sum_count(losses.pop("entropy"), mask * rows)}
                if "token_logps" in losses:
                    stats.update(
                        self._token_metric_stats(
                            losses.pop("token_logps"), inputs, old, mask * rows, dist_mask * rows, hybrid
                        )
                    )
                losses["metric_stats"] = stats
                return losses
            logits = head_logits(hidden, lm)
            losses = self._logits_losses(logits, teacher_out, inputs, old, w_dist, w_pol)
            losses["metric_stats"] = self._logits_metric_stats(logits, inputs, old, mask, dist_mask, hybrid)
            return losses

        student_input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        student_attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        with self.accelerator.autocast():
            out = model(
                input_ids=student_input_ids,
                attention_mask=student_attention_mask,
                sdpo_head_fn=student_head,
                sdpo_logits_to_keep=keep,
            )
        # TRL logs the policy loss before the gradient-accumulation division (dapo's normalizer keeps it).
        ga = self._accumulation_steps(mode)
        self._log_loss_metrics(mode, out, dist_mask, mask, policy_scale=1.0 if self.loss_type == "dapo" else ga)
        stats = dict(out.get("metric_stats", {}))
        if "topk_mass" in out:  # both paths, top-K mode: over the tokens that have a teacher
            stats["self_distillation/student_topk_mass"] = masked_sum_count(out["topk_mass"], dist_mask)
            stats["self_distillation/teacher_student_support_kl"] = masked_sum_count(out["support_kl"], dist_mask)
        self._log_metric_stats(mode, stats, inputs)
        return out["loss"]

    @staticmethod
    def _loss_masks(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, dist_mask) [B, T]: completion tokens (minus tool output), and those whose row has a teacher.

        A batch without `self_distillation_mask` distills every row (as TRL 1.16).
        """
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        sd_mask = inputs.get("self_distillation_mask")
        dist_mask = mask if sd_mask is None else mask * sd_mask.unsqueeze(1)
        return mask, dist_mask

    def _sync_teacher_server(self) -> None:
        """Push the current student to the vLLM server before it scores as the live teacher (a reused buffered
        batch can otherwise be scored by weights one optimizer step old)."""
        if self.use_vllm and self.state.global_step != self._last_loaded_step:
            self.vllm_generation.sync_weights()
            # Only the main process pushes: hold every rank until the server has the new weights.
            self.accelerator.wait_for_everyone()
            self._last_loaded_step = self.state.global_step

    def _server_distillation_loss(self, model, inputs, mask, dist_mask, mode: str) -> torch.Tensor:
        """Distillation against teacher log-probs served by the vLLM server (`use_teacher_server`, live teacher).

        The student runs locally (logits [B, T, V]); the teacher's realised-token / top-k log-probs come from
        `self.teacher_client.get_sequence_logprobs` (see `sdpo.teacher_server`).
        """
        args = self.args
        completion_ids = inputs["completion_ids"]
        keep = completion_ids.size(1)
        self._sync_teacher_server()
        with self.accelerator.autocast():
            logits = model(
                input_ids=torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
                sdpo_head_fn=head_logits,
                sdpo_logits_to_keep=keep,
            )
        logits = logits.float() / self.temperature
        top = self.distillation_topk if args.distillation_mode == "topk_logits" else 1
        teacher = fetch_teacher_logprobs(self.teacher_client, inputs, keep, top, self.temperature)
        per_token, teacher_token = server_per_token_loss(
            logits,
            teacher,
            completion_ids,
            dist_mask.bool(),
            mode=args.distillation_mode,
            alpha=args.distillation_alpha,
            add_tail=args.distillation_add_tail,
        )
        student_token = selective_log_softmax(logits, completion_ids)
        old = inputs.get("old_per_token_logps", inputs.get("sampling_per_token_logps"))
        if args.distillation_is_clip is not None and old is not None:
            log_ratio = (student_token - old).detach().clamp(min=-20.0, max=20.0)
            per_token = per_token * torch.exp(log_ratio).clamp(max=args.distillation_is_clip)
        loss = (per_token * self._distillation_weights(dist_mask, inputs, mode)).sum()
        # Disagreement of the local student and the served teacher on the realised tokens (stale server weights).
        diff = ((student_token.detach() - teacher_token).abs() * dist_mask).sum() / dist_mask.sum().clamp(min=1.0)
        self._metrics[mode]["self_distillation/server_logprob_abs_diff"].append(
            self.accelerator.gather(diff).mean().item()
        )
        self._log_loss_metrics(mode, {"loss": loss, "distillation_per_token": per_token.detach()}, dist_mask, mask)
        # `logits` are already divided by the temperature here.
        stats = self._logits_metric_stats(logits, inputs, old, mask, dist_mask, hybrid=False, temperature=1.0)
        self._log_metric_stats(mode, stats, inputs)
        return loss

    def _logits_losses(self, logits, teacher_logits, inputs, old, w_dist, w_pol) -> dict[str, torch.Tensor]:
        """Logits path. logits/teacher_logits [B, T, V] (raw, un-tempered); returns loss and per-token terms."""
        completion_ids = inputs["completion_ids"]
        out: dict[str, torch.Tensor] = {}
        if teacher_logits is not None:
            topk = self.args.distillation_mode == "topk_logits"
            result = self_distillation_loss(
                logits,
                teacher_logits.to(logits.dtype),  # no copy when the dtypes already agree
                completion_ids,
                old,
                **distillation_loss_kwargs(self.args, self.temperature, self.distillation_topk),
                return_support_stats=topk,  # two [N, K] gathers at the kernel's support (metrics)
            )
            per_token = result[0] if topk else result
            if topk:
                out["topk_mass"], out["support_kl"] = result[1]
            loss = (per_token * w_dist).sum()
            out["distillation_per_token"] = per_token.detach()
        else:  # only reached in hybrid mode (see student_head): the policy term keeps the graph attached
            loss = logits.new_zeros((), dtype=torch.float32)
        if w_pol is not None:
            mask = (w_pol > 0).to(torch.float32)
            logps = selective_log_softmax(logits / self.temperature, completion_ids)
            policy = clipped_policy_per_token(
                logps,
                inputs.get("old_per_token_logps"),
                inputs["advantages"],
                mask,
                epsilon_low=self.epsilon_low,
                epsilon_high=self.epsilon_high,
                importance_sampling_level=self.importance_sampling_level,
                delta=self.args.delta,
            )
            if self.use_vllm and self.vllm_importance_sampling_correction:
                policy = policy * inputs["importance_sampling_ratio"]
            if self.beta != 0.0:
                ref = inputs["ref_per_token_logps"]
                policy = policy + self.beta * (torch.exp(ref - logps) - (ref - logps) - 1)
            policy = policy.expand_as(w_pol)
            policy_loss = (policy * w_pol).sum()
            out["policy_loss"] = policy_loss.detach()
            loss = loss + policy_loss
        out["loss"] = loss
        return out

    def _fused_linear_losses(self, hidden, lm, teacher_out, inputs, old, w_dist, w_pol) -> dict[str, torch.Tensor]:
        """Fused-linear path: hidden [B, T, D] × head weight [V, D] straight into the kernel (no logits)."""
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        head = lm.get_output_embeddings()
        # Per-row top-K diagnostics (metrics), on the chunks' logits: two [rows, K] gathers per chunk.
        support_stats = teacher_out is not None and self.args.distillation_mode == "topk_logits"
        # The student's log-prob of each completion token (one gathered logit per row): what GRPO's clip ratios
        # (policy term on) and the distillation IS clip share (rollout log-probs present) are computed from.
        args = self.args
        is_clip_stat = (
            args.distillation_loss_weight != 0.0 and args.distillation_is_clip is not None and old is not None
        )
        token_logps = w_pol is not None or is_clip_stat
        if teacher_out is None:  # no teacher row: w_dist is all zero, the student stands in as a teacher
            teacher_out = (hidden.detach(), head.weight, head.bias)
        t_hidden, t_weight, t_bias = teacher_out
        if t_weight is None:
            t_weight, t_bias = self._teacher_head_params(head)
        rows = (w_dist > 0) if w_pol is None else (w_dist > 0) | (w_pol > 0)
        flat = rows.reshape(-1)
        d = hidden.size(-1)
        policy = None
        if w_pol is not None:
            adv = inputs["advantages"]
            adv = adv.unsqueeze(1).expand_as(w_pol) if adv.dim() == 1 else adv
            ratio_old = inputs.get("old_per_token_logps")  # the ratio's (None: 1), as on the logits path
            if self.use_vllm and self.vllm_importance_sampling_correction:
                # TRL multiplies the per-token policy loss by the (detached) vLLM IS ratio, [B, T] or [B, 1]:
                # a per-token weight, folded into the policy weights.
                w_pol = w_pol * inputs["importance_sampling_ratio"].to(w_pol.dtype).expand_as(w_pol)
            policy = sdpo_kernels.PolicyTerm(
                advantages=adv.reshape(-1)[flat],
                epsilon_low=self.epsilon_low,
                epsilon_high=self.epsilon_high,
                weights=w_pol.reshape(-1)[flat],
                old_logps=None if ratio_old is None else ratio_old.reshape(-1)[flat],
                delta=self.args.delta,
            )
        with maybe_gather_lm_head_ctx(head.weight, head.bias, t_weight, t_bias):
            result = sdpo_kernels.linear_self_distillation_loss(
                hidden.reshape(-1, d)[flat],
                head.weight,
                t_hidden.reshape(-1, d)[flat],
                t_weight,
                inputs["completion_ids"].reshape(-1)[flat],
                None if old is None else old.reshape(-1)[flat],
                weights=w_dist.reshape(-1)[flat],
                student_bias=head.bias,
                teacher_bias=t_bias,
                policy=policy,
                **distillation_loss_kwargs(self.args, self.temperature, self.distillation_topk),
                return_support_stats=support_stats,
                return_token_logps=token_logps,
                return_entropy=True,
            )
        loss, per_token = result

        def unflatten(values: torch.Tensor) -> torch.Tensor:
            """[B, T] from the kernel's values at the selected rows (0 elsewhere)."""
            full = torch.zeros_like(w_dist)
            full.view(-1)[flat] = values.detach().to(full.dtype)
            return full

        out = {"loss": loss, "distillation_per_token": unflatten(per_token)}
        out["entropy"] = unflatten(result.entropy)
        out["token_rows"] = flat.view_as(w_dist).to(w_dist.dtype)  # rows the kernel ran (its outputs 0 elsewhere)
        if token_logps:
            out["token_logps"] = unflatten(result.token_logps)
        if support_stats:
            out["topk_mass"] = unflatten(result.support_stats.topk_mass)
            out["support_kl"] = unflatten(result.support_stats.support_kl)
        if w_pol is not None:
            # The kernel's per-token policy losses (a difference of totals would cancel in float32).
            policy_tokens = torch.zeros_like(w_pol)
            policy_tokens.view(-1)[flat] = result.policy_per_token.to(policy_tokens.dtype)
            out["policy_loss"] = (policy_tokens * w_pol).sum()
        return out

    def _log_loss_metrics(
        self, mode: str, out: dict[str, torch.Tensor], dist_mask, mask, policy_scale: float = 1.0
    ) -> None:
        gather = self.accelerator.gather
        if "distillation_per_token" in out:
            num = (out["distillation_per_token"] * dist_mask).sum()
            den = dist_mask.sum()
        else:
            num = den = torch.zeros((), device=mask.device)
        policy = out.get("policy_loss", torch.zeros((), device=mask.device))
        # One collective and one host sync per step for both metrics.
        rows = gather(torch.stack([num.float(), den.float(), policy.float()]).unsqueeze(0))
        num_total, den_total, policy_sum = rows.sum(0).tolist()
        if self.args.distillation_loss_weight != 0.0:  # TRL logs it under both names
            for key in ("self_distillation/distillation_loss", "sdpo/distillation_loss"):
                self._metrics[mode][key].append(num_total / max(den_total, 1.0))
        if "policy_loss" in out:  # the policy loss itself, before the blend's coefficient (as TRL)
            scale = policy_scale / self.args.policy_loss_weight
            self._metrics[mode]["self_distillation/policy_loss"].append(scale * policy_sum / rows.shape[0])

    # ---- watched metrics (docs/trainer.md, "Metrics") ---------------------------------------------------------
    def _logits_metric_stats(
        self, logits, inputs: dict[str, Any], old, mask, dist_mask, hybrid: bool, temperature: float | None = None
    ) -> dict[str, torch.Tensor]:
        """(sum, count) pairs of the metrics the student logits [B, T, V] make available: GRPO's `entropy`,
        `clip_ratio/*` and `kl` (hybrid), and the distillation IS clip fraction. One no-grad pass over the logits."""
        temperature = self.temperature if temperature is None else temperature
        entropy, logps = entropy_and_token_logps(logits, inputs["completion_ids"], temperature)
        stats = {"entropy": masked_sum_count(entropy, mask)}
        stats.update(self._token_metric_stats(logps, inputs, old, mask, dist_mask, hybrid))
        return stats

    def _token_metric_stats(self, logps, inputs: dict[str, Any], old, mask, dist_mask, hybrid: bool):
        """(sum, count) pairs of what the student's token log-probs logps [B, T] give: GRPO's `kl` and
        `clip_ratio/*` (hybrid) and the distillation IS clip fraction (rollout log-probs present)."""
        args = self.args
        stats: dict[str, torch.Tensor] = {}
        if hybrid:
            if self.beta != 0.0 and "ref_per_token_logps" in inputs:
                stats["kl"] = masked_sum_count(per_token_kl(logps, inputs["ref_per_token_logps"]), mask)
            flags = policy_clip_flags(
                logps,
                inputs.get("old_per_token_logps"),
                inputs["advantages"],
                mask,
                epsilon_low=self.epsilon_low,
                epsilon_high=self.epsilon_high,
                importance_sampling_level=self.importance_sampling_level,
            )
            for name in ("low", "high", "region"):
                stats[f"clip_ratio/{name}_mean"] = masked_sum_count(flags[name], mask)
        if args.distillation_loss_weight != 0.0 and args.distillation_is_clip is not None and old is not None:
            flags = is_clip_flags(logps, old, args.distillation_is_clip)
            stats["self_distillation/is_clip_frac"] = masked_sum_count(flags, dist_mask)
        return stats

    def _log_metric_stats(self, mode: str, stats: dict[str, torch.Tensor], inputs: dict[str, Any]) -> None:
        """Log `stats` and the teacher prompt length (mean over rows with a teacher), with one collective."""
        stats = dict(stats)
        if "teacher_attention_mask" in inputs:
            lengths = teacher_prompt_lengths(inputs["teacher_attention_mask"], inputs["completion_ids"].size(1))
            sd_mask = inputs.get("self_distillation_mask")
            rows = torch.ones_like(lengths) if sd_mask is None else sd_mask.float()
            stats["self_distillation/teacher_prompt_length"] = masked_sum_count(lengths.unsqueeze(1), rows.unsqueeze(1))
        for key, value in reduce_sum_counts(stats, self.accelerator.gather).items():
            self._metrics[mode][key].append(value)
