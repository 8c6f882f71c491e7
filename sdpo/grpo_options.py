"""GRPO options under SDPO: each one either works, is refused with the option named and the fix, or warns once.

SDPOConfig inherits every GRPOConfig field, but SDPOTrainer computes its own loss: some GRPO options have no
effect in a mode, and some would silently change meaning. One function per concern, called from
`SDPOConfig.__post_init__` (config-only checks) or `SDPOTrainer.__init__` (checks that need the model).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from accelerate.utils import is_peft_model

logger = logging.getLogger(__name__)

VISION_INPUT_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")


def _ignored(option: str, detail: str = "") -> None:
    warnings.warn(
        f"`{option}` is ignored by SDPOTrainer in distillation-only mode (no policy term){detail}.",
        UserWarning,
        stacklevel=4,
    )


def warn_options_ignored_without_policy_term(config: Any) -> None:
    """Distillation-only mode (`policy_loss_weight == 0`): GRPO's policy-term options have no effect; warn once
    each. `beta` is then also set to 0.0 so that GRPOTrainer neither loads nor runs a reference model."""
    if config.policy_loss_weight != 0.0:
        return
    if config.beta != 0.0:
        _ignored(
            f"beta={config.beta}",
            ": the KL penalty belongs to GRPO's policy term; beta is set to 0.0 so no reference model is loaded "
            "(use sdpo_policy_loss_mode='hybrid' or distillation_weight < 1 for a KL-regularised policy term)",
        )
        config.beta = 0.0
    if (
        config.use_vllm
        and config.vllm_importance_sampling_correction
        and config.distillation_is_clip is None
        and not config.distillation_rollout_is
    ):
        # GRPO runs a student forward after each generation for this ratio; with neither the distillation IS clip
        # nor the rollout IS weights, nothing would read it.
        _ignored(
            "vllm_importance_sampling_correction=True",
            " with `distillation_is_clip=None` and `distillation_rollout_is=False`: it is set to False so GRPO "
            "runs no student forward for it",
        )
        config.vllm_importance_sampling_correction = False
    if config.top_entropy_quantile < 1.0:
        _ignored(f"top_entropy_quantile={config.top_entropy_quantile}")
    if config.off_policy_mask_threshold is not None:
        _ignored(f"off_policy_mask_threshold={config.off_policy_mask_threshold}")
    if config.entropy_coef != 0.0 or config.use_adaptive_entropy:
        _ignored("entropy_coef / use_adaptive_entropy", " (GRPO's entropy bonus is part of the policy loss)")


def refuse_policy_term_options(args: Any) -> None:
    """With a policy term (hybrid, or distillation_weight < 1): refuse GRPO options the SDPO policy term does not
    implement, rather than dropping them (which would silently change the objective)."""
    if args.policy_loss_weight == 0.0:
        return
    if args.top_entropy_quantile < 1.0 or args.off_policy_mask_threshold is not None:
        raise ValueError(
            "A policy term (hybrid, or distillation_weight < 1) does not support `top_entropy_quantile < 1` or "
            "`off_policy_mask_threshold`; use GRPO's options through `trl.GRPOTrainer` instead."
        )
    if args.beta != 0.0 and args.use_bias_correction_kl:
        raise ValueError(
            f"`beta={args.beta}` with `use_bias_correction_kl=True` (GRPOConfig's default) is not supported by "
            "SDPOTrainer's policy term: set `use_bias_correction_kl=False` (the k3 KL estimate to the reference "
            "model), or `beta=0.0`."
        )
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        raise ValueError(
            "`entropy_coef` / `use_adaptive_entropy` (GRPO's entropy bonus) are not implemented by SDPOTrainer's "
            "policy term: set `entropy_coef=0.0` and `use_adaptive_entropy=False`, or use `trl.GRPOTrainer`."
        )


def disable_router_aux_loss(trainer: Any) -> None:
    """GRPO adds the MoE router load-balancing loss to its own loss; SDPOTrainer's loss does not. Warn once and
    turn it off, so the router logits are not requested for nothing."""
    if not getattr(trainer, "aux_loss_enabled", False):
        return
    warnings.warn(
        f"The MoE router auxiliary loss (router_aux_loss_coef={trainer.router_aux_loss_coef}) is not added to "
        "SDPOTrainer's loss and is disabled; set `router_aux_loss_coef=0.0` to silence this warning.",
        UserWarning,
        stacklevel=3,
    )
    trainer.aux_loss_enabled = False


def fused_linear_blocker(args: Any, lm: torch.nn.Module) -> str | None:
    """`cast_lm_head_to_fp32=True` on low-precision weights: the head is fp32, the hidden states are not; the
    fused-linear loss needs one dtype, GRPO's cast head (fp32 logits) runs on the logits path."""
    if not args.cast_lm_head_to_fp32:
        return None
    head = lm.get_output_embeddings().weight
    hidden_dtype = lm.get_input_embeddings().weight.dtype
    if head.dtype == torch.float32 and hidden_dtype != torch.float32:
        return f"cast_lm_head_to_fp32=True with {hidden_dtype} hidden states needs the logits path (fp32 logits)"
    return None


def refuse_vision_inputs(inputs: Any) -> None:
    """Images never reach SDPO's loss forwards (student and teacher see text only): refuse the first batch with them."""
    rows = inputs if isinstance(inputs, list) else [inputs]
    for row in rows:
        if not isinstance(row, dict):
            continue
        found = [k for k in ("image", "images", *VISION_INPUT_KEYS) if row.get(k) is not None]
        if found:
            raise ValueError(
                f"SDPOTrainer does not support vision-language inputs (the batch has {found}): the images would not "
                "reach the student or teacher forwards. Remove the image columns, or use `trl.GRPOTrainer`."
            )


def warn_unused_feedback(trainer: Any, feedbacks: list[Any]) -> None:
    """TRL 1.16's warning: `privileged_context` in the batch but `include_environment_feedback=False` (once)."""
    if trainer.args.include_environment_feedback or getattr(trainer, "_warned_unused_feedback", False):
        return
    if any(isinstance(f, str) and f.strip() != "" for f in feedbacks):
        trainer._warned_unused_feedback = True
        logger.warning(
            "SDPO received environment feedback (`privileged_context`) in the batch, but "
            "`include_environment_feedback=False`, so it is being ignored (no reprompting from feedback). "
            "Set `include_environment_feedback=True` to use it."
        )


def _is_pure_lora(model: Any) -> bool:
    """TRL's `is_pure_lora_training`: the active adapter is LoRA and every trainable parameter is a LoRA one."""
    adapter = getattr(model, "active_adapter", None) or "default"
    config = model.peft_config.get(adapter)
    peft_type = getattr(config, "peft_type", None)
    if peft_type is None or str(peft_type).split(".")[-1] != "LORA":
        return False
    return all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)


def refuse_ema_with_non_lora_peft(args: Any, model: Any) -> None:
    """TRL 1.16 refuses an EMA teacher on a PEFT model whose trainable parameters are not all LoRA (e.g.
    `modules_to_save`): the EMA teacher cannot be parameter-matched to the student."""
    if args.teacher_regularization == "ema" and is_peft_model(model) and not _is_pure_lora(model):
        raise ValueError(
            "`teacher_model_kind='ema'` with a non-pure-LoRA PEFT model is not supported: the separate EMA "
            "teacher cannot be parameter-matched to the PEFT student (e.g. `modules_to_save`). Use pure-LoRA "
            "training, a non-PEFT model, or `teacher_model_kind` in {'live', 'base'}."
        )


def rebind_fp32_head(teacher: torch.nn.Module) -> None:
    """`cast_lm_head_to_fp32=True`: GRPO replaces the student head's `forward` by a closure over the *student's*
    head, which a deep-copied teacher inherits (the teacher would score with the student's head weights). Give
    the copy the same fp32 forward over its own head."""
    head = teacher.get_output_embeddings()
    if head is None or "forward" not in head.__dict__:
        return

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        bias = None if head.bias is None else head.bias.to(torch.float32)
        return torch.nn.functional.linear(hidden_states.to(torch.float32), head.weight.to(torch.float32), bias)

    head.forward = forward


def prepare_separate_teacher(args: Any, teacher: torch.nn.Module, copied_from_student: bool) -> None:
    """Give a separate (EMA / base / trust-region) teacher the student's GRPO model options, so that both run the
    same head and the same kernels.

    - `cast_lm_head_to_fp32`: a deep copy inherits GRPO's fp32 head forward, closed over the *student's* head; it
      is rebound to the copy's own head (`rebind_fp32_head`). A teacher built from the checkpoint path (ZeRO-3)
      has no cast head: refused.
    - `use_liger_kernel`: Trainer patches the student with Liger's kernels in `train()`, after this copy was
      made; the teacher is patched here with the same `liger_kernel_config` (GRPO has already turned off its
      fused linear cross-entropy, which would replace the forward).
    """
    if args.cast_lm_head_to_fp32:
        if not copied_from_student:
            raise ValueError(
                "`cast_lm_head_to_fp32=True` with a separate teacher under DeepSpeed ZeRO-3 is not supported (the "
                "teacher is built from the checkpoint path, without GRPO's fp32 head): set "
                "`cast_lm_head_to_fp32=False`, or `teacher_regularization='none'`."
            )
        rebind_fp32_head(teacher)
    if args.use_liger_kernel:
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(teacher, args.liger_kernel_config)
