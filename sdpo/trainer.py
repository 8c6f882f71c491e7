"""`SDPOTrainer`: TRL's `GRPOTrainer` (generation, rewards, vLLM, accelerate, PEFT, logging) plus SDPO.

What this subclass adds on top of GRPO:
  * teacher contexts built from successful siblings / environment feedback (`sdpo.teacher_context`);
  * an EMA (or live) teacher that is checkpointed and restored (`sdpo.teacher`);
  * the loss: distillation_only or hybrid, computed from ONE student forward whose hidden states go through
    the output head into `sdpo_kernels.self_distillation_loss` (or, when available, straight into
    `sdpo_kernels.linear_self_distillation_loss` without materialising logits).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from accelerate.utils import gather_object, is_peft_model
from torch import nn
from transformers import PreTrainedModel, TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer import grpo_trainer as grpo_trainer_module
from trl.trainer.utils import create_model_from_path, get_config_model_id, pad, selective_log_softmax

import sdpo_kernels
from sdpo_kernels import self_distillation_loss

from . import grpo_options
from .config import SDPOConfig
from .loss_helpers import (  # re-exported: `sdpo.trainer` is their historical import path
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
from .modeling import add_head_fn_forward, head_logits, is_plain_linear_head, padded_position_ids
from .rollout_feedback import FeedbackRecorder, combine_feedback
from .teacher import EMATeacherCallback, SDPOTeacher
from .teacher_context import build_teacher_prompts, select_teachers, tokenize_teacher_prompts
from .teacher_server import fetch_teacher_logprobs, server_per_token_loss

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _generation_batch_order(shuffle: bool) -> Iterator[None]:
    """GRPO shuffles a generation batch before splitting it into its `steps_per_generation` micro-steps; TRL 1.16's
    SDPO splits it in order. Without `shuffle`, GRPO's shuffle is the identity for the duration of the call."""
    if shuffle:
        yield
        return
    original = grpo_trainer_module.shuffle_sequence_dict
    grpo_trainer_module.shuffle_sequence_dict = lambda batch: batch
    try:
        yield
    finally:
        grpo_trainer_module.shuffle_sequence_dict = original


class SDPOTrainer(GRPOTrainer):
    """Self-Distillation Policy Optimization on TRL's GRPO machinery, with the loss from `sdpo_kernels`.

    Args:
        model: hub id / local path, or a `PreTrainedModel` (causal LM).
        reward_funcs: as `trl.GRPOTrainer` (callables, reward-model ids, or a list).
        args: an `SDPOConfig`.
        train_dataset: needs a `prompt` column (plain text or conversational); an optional
            `privileged_context` column carries environment feedback (used with include_environment_feedback).
            It may be None with an `environment_factory` whose `reset()` returns the prompt (as GRPO).
        eval_dataset, processing_class, reward_processing_classes, callbacks, optimizers, peft_config,
        quantization_config, tools, rollout_func, environment_factory: as GRPO. The teacher reprompt is built from
            the prompt as generated (with an environment's `reset()` observation appended).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "sdpo"]
    _name = "SDPO"

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: Any,
        args: SDPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        peft_config: Any = None,
        quantization_config: Any = None,
        tools: list[Any] | None = None,
        rollout_func: Any = None,
        environment_factory: Any = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = SDPOConfig(output_dir=f"{str(name).split('/')[-1]}-SDPO")
        if not isinstance(args, SDPOConfig):
            raise ValueError(f"`args` must be an sdpo.SDPOConfig, got {type(args).__name__}.")
        no_reward_funcs = reward_funcs is None or (isinstance(reward_funcs, list) and len(reward_funcs) == 0)
        if no_reward_funcs and environment_factory is None:
            raise ValueError(
                "`reward_funcs` is required (or an `environment_factory` whose environments define `get_reward`): "
                "SDPO scores rollouts to find successful demonstrations."
            )
        if train_dataset is None and environment_factory is None:
            raise ValueError("`train_dataset` is required (unless an `environment_factory` returns the prompts).")
        grpo_options.refuse_policy_term_options(args)  # before GRPO loads a reference model for beta != 0
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
            quantization_config=quantization_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        # The prompts GRPO generated from (after an environment's `reset()` observation is appended): the teacher
        # reprompt is built from these, not from the dataset's raw `prompt` column.
        self._generation_prompts: list[Any] | None = None
        self._diagnostic_counters: dict[str, defaultdict[str, int]] = {
            "train": defaultdict(int),
            "eval": defaultdict(int),
        }
        self._last_rewards_per_func: torch.Tensor | None = None
        # Reward functions may return per-completion feedback (sdpo.rollout_feedback); rewards pass through.
        self._rollout_feedback = FeedbackRecorder()
        self.reward_funcs = [
            f if isinstance(f, nn.Module) else self._rollout_feedback.wrap(f) for f in self.reward_funcs
        ]
        self._setup_teacher_client()
        grpo_options.disable_router_aux_loss(self)
        grpo_options.refuse_ema_with_non_lora_peft(args, self.model)

        # The student computes its loss inside its own forward (see sdpo.modeling); patch the causal LM.
        lm = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_head_fn_forward(lm)
        self._setup_teacher()
        self._warn_on_bf16_ema_rounding()
        self.distillation_topk = self._clamped_topk(lm)
        self._fused_linear_reason = self._why_not_fused_linear()
        if args.distillation_fused_linear == "always" and self._fused_linear_reason is not None:
            raise ValueError(
                f"`distillation_fused_linear='always'` but the fused-linear loss cannot be used: "
                f"{self._fused_linear_reason}."
            )
        self.use_fused_linear = args.distillation_fused_linear != "never" and self._fused_linear_reason is None
        if args.distillation_fused_linear == "auto" and self._fused_linear_reason is not None:
            logger.info("SDPO uses the logits path, not the fused-linear loss: %s.", self._fused_linear_reason)

    # ---- setup ------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        # Keep `privileged_context` (environment feedback) when remove_unused_columns=True.
        if self._signature_columns is None:
            self._signature_columns = ["prompt", "image", "images", "privileged_context"]

    def _setup_teacher_client(self) -> None:
        """Teacher log-probs from GRPO's vLLM server (TRL 1.16's `use_teacher_server`): a read-only scoring client."""
        args = self.args
        self.use_teacher_server = args.use_teacher_server
        self.teacher_client = None
        if self.use_teacher_server:
            from trl.generation.vllm_client import VLLMClient

            base_url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
            self.teacher_client = VLLMClient(base_url=base_url, connection_timeout=args.vllm_server_timeout)

    def _setup_teacher(self) -> None:
        """Build the teacher; register the EMA callback. A separate teacher model is prepared like TRL's ref model."""
        args = self.args
        teacher_model = None
        separate = args.teacher_regularization in ("ema", "base", "trust_region") and not is_peft_model(self.model)
        if separate:
            if is_deepspeed_zero3_enabled():
                # Under ZeRO-3 the student's parameters are already partitioned: build from the path instead.
                kwargs = dict(args.model_init_kwargs or {})
                kwargs.setdefault("dtype", self.model.dtype)
                teacher_model = create_model_from_path(get_config_model_id(self.model.config), **kwargs)
            else:
                teacher_model = copy.deepcopy(self.model)
                # Drop the instance-level forwards patched onto the student (they close over the student).
                teacher_model.__dict__.pop("forward", None)
            grpo_options.prepare_separate_teacher(
                args, teacher_model, copied_from_student=not is_deepspeed_zero3_enabled()
            )
            # The teacher runs through its root forward too: FSDP unshards and ZeRO-3 gathers there.
            add_head_fn_forward(teacher_model)
        if (
            (separate or args.teacher_regularization == "ema")
            and self.is_fsdp_enabled
            and self.accelerator.state.fsdp_plugin.fsdp_version == 1
        ):
            raise ValueError(
                "An EMA or base teacher under FSDP needs `fsdp_version=2` (its EMA and checkpoint work on DTensor "
                "shards); FSDP1's flat parameters are not supported. Set fsdp_config={'fsdp_version': 2} or "
                "teacher_regularization='none'."
            )
        self.teacher = SDPOTeacher(
            self.model,
            args.teacher_regularization,
            args.effective_teacher_update_rate,
            teacher_model,
            rounding=args.teacher_ema_rounding,
            seed=args.seed,
        )
        self.teacher_model_wrapped = None
        if separate:
            if self.is_deepspeed_enabled:
                self.teacher_model_wrapped = prepare_deepspeed(self.teacher.model, self.accelerator)
                # Built from the checkpoint path, not from the student's current weights: copy them at train
                # start (shard by shard), unless a resumed run restores the teacher first.
                self.teacher.sync_at_train_begin = is_deepspeed_zero3_enabled()
            elif self.is_fsdp_enabled:
                self.teacher_model_wrapped = self._prepare_fsdp2_teacher(self.teacher.model)
            else:
                self.teacher_model_wrapped = self.accelerator.prepare_model(self.teacher.model, evaluation_mode=True)
        if self.teacher.kind == "ema" or self.teacher.sync_at_train_begin:  # EMA steps; a ZeRO-3 copy's start
            self.add_callback(EMATeacherCallback(self.teacher, self.accelerator, args.teacher_sync_steps))

    def _clamped_topk(self, lm: nn.Module) -> int | None:
        """`distillation_topk`, clamped to the vocabulary V (K >= V is the full distribution, as the official SDPO
        clamps it); warned about once, here."""
        k = self.args.distillation_topk
        if k is None:
            return None
        weight = lm.get_output_embeddings().weight
        vocab = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitions hold the full shape in ds_shape
        if k < vocab:
            return k
        warnings.warn(
            f"distillation_topk={k} >= the vocabulary size {vocab}: clamped to {vocab} (the top-K support is then the "
            "whole vocabulary and a tail bucket is empty).",
            UserWarning,
            stacklevel=3,
        )
        return vocab

    def _warn_on_bf16_ema_rounding(self) -> None:
        """A deliberate difference from TRL 1.16 that only the built teacher reveals: bf16 EMA weights."""
        if self.teacher.kind != "ema" or self.args.teacher_ema_rounding != "stochastic":
            return
        if any(t.dtype == torch.bfloat16 for t in self.teacher.pairs()[0]):
            warnings.warn(
                "SDPOTrainer differs from TRL 1.16's SDPO here: the bfloat16 EMA teacher is rounded stochastically "
                "after each update (TRL rounds to nearest, which freezes a slowly tracking teacher); set "
                "teacher_ema_rounding='nearest' for TRL's behaviour.",
                UserWarning,
                stacklevel=3,
            )

    def _prepare_fsdp2_teacher(self, teacher: nn.Module) -> nn.Module:
        """Shard the EMA teacher like the student: each block of the FSDP auto-wrap policy (the decoder layers)
        in its own group, resharded after its forward, then the root (TRL's `prepare_fsdp`, which alone would
        make the whole teacher one group, unsharded at once in every forward)."""
        from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        plugin = self.accelerator.state.fsdp_plugin
        mesh = getattr(self.accelerator, "torch_device_mesh", None)
        kwargs = dict(
            reshard_after_forward=True,  # no backward follows a teacher forward
            offload_policy=plugin.cpu_offload,
            mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
            mesh=mesh[tuple(self.accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
        )
        policy = fsdp2_prepare_auto_wrap_policy(plugin, teacher)
        if policy is not None:
            for module in reversed(list(teacher.modules())[1:]):  # children before parents
                if policy(module) and not isinstance(module, FSDPModule):
                    fully_shard(module, **kwargs)
        return prepare_fsdp(teacher, self.accelerator)

    def _why_not_fused_linear(self) -> str | None:
        """None when `linear_self_distillation_loss` can serve this run, else the reason it cannot."""
        if not hasattr(sdpo_kernels, "linear_self_distillation_loss"):
            return "sdpo_kernels has no `linear_self_distillation_loss` (not installed in this version)"
        lm = self.model.get_base_model() if is_peft_model(self.model) else self.model
        if not is_plain_linear_head(lm):
            return "the output head is not a plain nn.Linear (soft-capping, scaling or an adapter on the head)"
        if (reason := grpo_options.fused_linear_blocker(self.args, lm)) is not None:
            return reason
        if self.teacher.model is not None and not is_plain_linear_head(
            self.teacher.model.get_base_model() if is_peft_model(self.teacher.model) else self.teacher.model
        ):
            return "the teacher's output head is not a plain nn.Linear"
        if self.teacher.kind == "trust_region":
            return "the trust-region teacher mixes two models' logits"
        if self.args.policy_loss_weight != 0.0:
            if self.beta != 0.0:
                return "hybrid with beta != 0 (KL to the reference model) needs the logits path"
            if self.importance_sampling_level != "token":
                return "hybrid with sequence-level importance sampling needs the logits path"
        return None

    # ---- callbacks & checkpointing ----------------------------------------------------------------------------
    def _dispatch_self_distillation_callback(self, event_name: str, **payload: Any) -> None:
        """Call `event_name` on every callback that defines it, with TRL's SDPO payload conventions."""
        for callback in self.callback_handler.callbacks:
            fn = getattr(callback, event_name, None)
            if fn is not None:
                fn(
                    args=self.args,
                    state=self.state,
                    control=self.control,
                    model=self.model,
                    processing_class=self.processing_class,
                    **payload,
                )

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        # Every rank gathers (a collective under ZeRO-3 / FSDP); the saving rank writes.
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        output_dir = os.path.join(self._get_output_dir(trial=trial), folder)
        self.teacher.save(output_dir, write=self.args.should_save)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        # Called by `train(resume_from_checkpoint=...)` after the student weights are loaded.
        if checkpoint is not None:
            # A resumed student is not the initial one: never copy it into a ZeRO-3 teacher at train start.
            self.teacher.sync_at_train_begin = False
        if checkpoint is not None and self.teacher.checkpointed and not self.teacher.load(checkpoint):
            logger.warning(
                "No SDPO teacher state in %s: the EMA teacher restarts from the initial weights.", checkpoint
            )

    # ---- rollouts -> teacher contexts -------------------------------------------------------------------------
    def _prepare_inputs(self, generation_batch):
        generate_every = self.args.steps_per_generation * self.num_iterations
        will_generate = self.model.training and (self._step % generate_every == 0 or self._buffered_inputs is None)
        with _generation_batch_order(shuffle=self.args.shuffle_generation_batch):
            inputs = super()._prepare_inputs(generation_batch)
        if will_generate:
            self._dispatch_self_distillation_callback(
                "on_generation_batch_built",
                generate_every=generate_every,
                steps_per_generation=self.args.steps_per_generation,
            )
        return inputs

    def _tokenize_prompts(self, prompts: list):
        """GRPO's prompt tokenization, then TRL 1.16 SDPO's `max_prompt_length`: each prompt keeps its LAST
        `max_prompt_length` tokens (left truncation), before generation (transformers or vLLM), as TRL's
        `SDPOTrainer._tokenize_prompts` does. Teacher prompts are built from the untruncated prompts."""
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        max_len = self.args.max_prompt_length
        if max_len is not None and any(len(ids) > max_len for ids in prompt_ids):
            if images is not None or multimodal_fields:
                raise ValueError(
                    f"A multimodal prompt is longer than `max_prompt_length={max_len}` tokens: left truncation could "
                    "cut its image tokens. Set `max_prompt_length=None` (or larger) for multimodal prompts."
                )
            prompt_ids = [ids[-max_len:] for ids in prompt_ids]
        return prompt_ids, images, multimodal_fields

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # GRPO returns the rewards of the whole (cross-process) batch; keep them to find successful siblings.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate(self, prompts: list):
        self._generation_prompts = list(prompts)
        return super()._generate(prompts)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        grpo_options.refuse_vision_inputs(inputs)
        self._generation_prompts = None
        self._rollout_feedback.start_batch()
        output = super()._generate_and_score_completions(inputs)
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval

        rewards = self._total_rewards()
        self._record_reward_diagnostics(mode, rewards, num_generations)

        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        selection, local, teacher_prompts = self._select_teachers_and_build_prompts(
            inputs, completion_ids, completion_mask, rewards, num_generations
        )
        teacher_prompt_ids, teacher_prompt_mask = self._tokenize_teacher_prompts(teacher_prompts, device)
        sd_mask = torch.tensor([selection.mask[i] for i in local], dtype=torch.float32, device=device)
        output["teacher_input_ids"] = torch.cat([teacher_prompt_ids, completion_ids], dim=1)
        output["teacher_attention_mask"] = torch.cat([teacher_prompt_mask, completion_mask], dim=1)
        output["self_distillation_mask"] = sd_mask
        loss_mask = completion_mask if "tool_mask" not in output else completion_mask * output["tool_mask"]
        # dapo normaliser of the distillation term: global count of tokens that have a teacher.
        output["num_distillation_items_in_batch"] = self.accelerator.gather(
            (loss_mask * sd_mask.unsqueeze(1)).sum()
        ).sum()

        for key, value in selection.metrics.items():
            self._metrics[mode][key].append(value)
        self._warn_on_inactive_self_distillation(mode, selection.metrics)
        self._dispatch_teacher_context_callbacks(output, completion_mask, sd_mask)
        return output

    def _total_rewards(self) -> torch.Tensor:
        """Total reward per rollout over the global batch (same weighting as GRPO's sum_then_normalize)."""
        rpf = self._last_rewards_per_func
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rpf).all(dim=1)] = torch.nan
        return rewards

    def _select_teachers_and_build_prompts(
        self,
        inputs: list[dict[str, Any]],
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        rewards: torch.Tensor,
        num_generations: int,
    ) -> tuple[Any, range, list[Any]]:
        """Pick each rollout's demonstration / feedback over the global batch; the teacher prompts of this process."""
        args = self.args
        local_completions = self.processing_class.batch_decode(
            [ids[m.bool()] for ids, m in zip(completion_ids.cpu(), completion_mask.cpu())], skip_special_tokens=True
        )
        # As generated: with an `environment_factory`, each prompt carries its `reset()` observation.
        local_prompts = self._generation_prompts
        if local_prompts is None or len(local_prompts) != len(inputs):
            local_prompts = [x["prompt"] for x in inputs]
        # The dataset's privileged_context, then the reward functions' per-completion feedback (if any).
        local_feedbacks = combine_feedback(
            [x.get("privileged_context") for x in inputs], self._rollout_feedback.per_rollout(len(inputs))
        )
        # Groups may span processes: gather prompts, completions and feedback of the whole batch.
        all_prompts = gather_object(local_prompts)
        all_completions = gather_object(local_completions)
        all_feedbacks = gather_object(local_feedbacks)
        grpo_options.warn_unused_feedback(self, all_feedbacks)
        selection = select_teachers(
            rewards.tolist(),
            all_feedbacks,
            num_generations,
            success_reward_threshold=args.success_reward_threshold,
            use_successful_as_teacher=args.use_successful_as_teacher,
            dont_reprompt_on_self_success=args.dont_reprompt_on_self_success,
            include_environment_feedback=args.include_environment_feedback,
            environment_feedback_only_without_solution=args.environment_feedback_only_without_solution,
        )
        start = self.accelerator.process_index * len(inputs)
        local = range(start, start + len(inputs))
        teacher_prompts = build_teacher_prompts(
            all_prompts,
            all_completions,
            all_feedbacks,
            selection,
            local,
            reprompt_template=args.reprompt_template,
            solution_template=args.solution_template,
            feedback_template=args.feedback_template,
            remove_thinking_from_demonstration=args.remove_thinking_from_demonstration,
        )
        return selection, local, teacher_prompts

    def _tokenize_teacher_prompts(
        self, teacher_prompts: list[Any], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher prompt ids and attention mask, left-padded (the completion is appended after them)."""
        template_kwargs = dict(self.chat_template_kwargs or {})
        if getattr(self, "chat_template", None) is not None:
            template_kwargs["chat_template"] = self.chat_template
        if getattr(self, "tools", None):
            template_kwargs["tools"] = self.tools
        teacher_ids = tokenize_teacher_prompts(
            self.processing_class, teacher_prompts, self.args.max_reprompt_len, template_kwargs
        )
        # Teacher prompts cut to `max_reprompt_len` (their solution / feedback), as a fraction of the global batch.
        counts = self.accelerator.gather(torch.tensor([[teacher_ids.num_truncated, len(teacher_ids)]], device=device))
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["self_distillation/reprompt_truncated_frac"].append(
            counts[:, 0].sum().item() / max(counts[:, 1].sum().item(), 1)
        )
        teacher_prompt_ids = pad(
            [torch.tensor(x, dtype=torch.long) for x in teacher_ids],
            padding_value=self._tokenizer.pad_token_id,
            padding_side="left",
        ).to(device)
        teacher_prompt_mask = pad(
            [torch.ones(len(x), dtype=torch.long) for x in teacher_ids], padding_value=0, padding_side="left"
        ).to(device)
        return teacher_prompt_ids, teacher_prompt_mask

    def _dispatch_teacher_context_callbacks(
        self, output: dict[str, Any], completion_mask: torch.Tensor, sd_mask: torch.Tensor
    ) -> None:
        self._dispatch_self_distillation_callback(
            "on_teacher_context_built",
            teacher_input_ids=output["teacher_input_ids"],
            teacher_attention_mask=output["teacher_attention_mask"],
            completion_mask=completion_mask,
            self_distillation_mask=sd_mask,
        )
        self._dispatch_self_distillation_callback(
            "on_self_distillation_batch_prepared",
            prompt_ids=output["prompt_ids"],
            completion_ids=output["completion_ids"],
            old_per_token_logps=output.get("old_per_token_logps"),
            teacher_input_ids=output["teacher_input_ids"],
            teacher_attention_mask=output["teacher_attention_mask"],
            self_distillation_mask=sd_mask,
        )

    # ---- diagnostics (TRL 1.16's conditions and wording) -------------------------------------------------------
    def _warn_degenerate(self, mode: str, key: str, message: str) -> None:
        """Warn on the 1st and every `diagnostics_warning_interval`-th consecutive degenerate step (0: never)."""
        interval = self.args.diagnostics_warning_interval
        if interval == 0:
            return
        self._diagnostic_counters[mode][key] += 1
        count = self._diagnostic_counters[mode][key]
        if (count == 1 or count % interval == 0) and self.accelerator.is_main_process:
            logger.warning("%s Consecutive degenerate steps: %s.", message, count)

    def _record_reward_diagnostics(self, mode: str, rewards: torch.Tensor, num_generations: int) -> None:
        """Reward statistics of the global batch [N] (NaN = unscorable rollout, left out as in GRPO's metrics)."""
        tol = self.args.diagnostics_flat_tolerance
        valid = rewards[~torch.isnan(rewards)]
        if valid.numel() == 0:
            valid = torch.zeros(1, device=rewards.device)
        std = valid.std() if valid.numel() > 1 else torch.zeros((), device=valid.device)
        # Per-group std ([N / G]); a group of one has none (NaN, as in TRL: never counted as flat).
        grouped = torch.nan_to_num(rewards, nan=0.0).view(-1, num_generations)
        group_std = grouped.std(dim=1) if num_generations > 1 else torch.full_like(grouped[:, 0], float("nan"))
        flat = (group_std <= tol).float()
        # One host sync for all reward statistics.
        mean, std, lo, hi, flat_fraction, group_std_mean = torch.stack(
            [valid.mean(), std, valid.min(), valid.max(), flat.mean(), group_std.mean()]
        ).tolist()
        m = self._metrics[mode]
        m["self_distillation/reward_mean"].append(mean)
        m["self_distillation/reward_std"].append(std)
        m["self_distillation/reward_min"].append(lo)
        m["self_distillation/reward_max"].append(hi)
        m["self_distillation/flat_group_fraction"].append(flat_fraction)
        if num_generations > 1:
            m["self_distillation/group_reward_std_mean"].append(group_std_mean)
        rpf = self._last_rewards_per_func
        if rpf is not None and rpf.numel() > 0:
            for name, value in zip(self.reward_func_names, rpf.nanmean(dim=0).tolist(), strict=True):
                m[f"self_distillation/rewards/{name}"].append(value)
        if std <= tol and flat_fraction >= 1.0 - tol:  # flat across the batch AND within every group
            self._warn_degenerate(
                mode,
                "flat_rewards",
                "Observed flat SDPO rewards across all sampled generations. Policy advantages will collapse to "
                "zero, and SDPO will not learn. Check reward density, reward shaping, or `success_reward_threshold`.",
            )
        else:
            self._diagnostic_counters[mode]["flat_rewards"] = 0

    def _warn_on_inactive_self_distillation(self, mode: str, metrics: dict[str, float]) -> None:
        tol = self.args.diagnostics_flat_tolerance
        if metrics["self_distillation/reprompt_sample_fraction"] <= tol:
            self._warn_degenerate(
                mode,
                "inactive_self_distillation",
                "SDPO self-distillation is inactive because no reprompted samples were constructed. This usually "
                "means no rollout exceeded `success_reward_threshold` and no usable privileged feedback was available.",
            )
        else:
            self._diagnostic_counters[mode]["inactive_self_distillation"] = 0
        if metrics["self_distillation/success_group_fraction"] <= tol:
            self._warn_degenerate(
                mode,
                "no_successful_rollouts",
                "SDPO did not find any successful rollouts in the current generation groups. If this persists, "
                "reduce task difficulty, adjust reward shaping, or lower `success_reward_threshold`.",
            )
        else:
            self._diagnostic_counters[mode]["no_successful_rollouts"] = 0

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
                if "token_logps" in losses:  # the kernel's per-row log-probs: GRPO's clip ratios, the IS clip share
                    rows = losses.pop("token_rows")
                    losses["metric_stats"] = self._token_metric_stats(
                        losses.pop("token_logps"), inputs, old, mask * rows, dist_mask * rows, hybrid
                    )
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
            )
        loss, per_token = result

        def unflatten(values: torch.Tensor) -> torch.Tensor:
            """[B, T] from the kernel's values at the selected rows (0 elsewhere)."""
            full = torch.zeros_like(w_dist)
            full.view(-1)[flat] = values.detach().to(full.dtype)
            return full

        out = {"loss": loss, "distillation_per_token": unflatten(per_token)}
        if token_logps:
            out["token_logps"] = unflatten(result.token_logps)
            out["token_rows"] = flat.view_as(w_dist).to(w_dist.dtype)  # rows the kernel ran (logps 0 elsewhere)
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
