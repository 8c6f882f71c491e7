"""`SDPOTrainer`: TRL's `GRPOTrainer` (generation, rewards, vLLM, accelerate, PEFT, logging) plus SDPO.

What this subclass adds on top of GRPO:
  * teacher contexts built from successful siblings / environment feedback (`sdpo.teacher_context`);
  * an EMA (or live) teacher that is checkpointed and restored (`sdpo.teacher`);
  * the loss: distillation_only or hybrid, computed from ONE student forward whose hidden states go through
    the output head into `sdpo_kernels.self_distillation_loss` (or, when available, straight into
    `sdpo_kernels.linear_self_distillation_loss` without materialising logits): `sdpo.loss_paths.SDPOLossMixin`.

Other concerns live in their own modules: GRPO option checks (`sdpo.grpo_options`), metrics (`sdpo.metrics`),
per-rollout feedback (`sdpo.rollout_feedback`), teacher prompts (`sdpo.teacher_context`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator
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
from trl.trainer.utils import create_model_from_path, get_config_model_id, pad

import sdpo_kernels

from . import grpo_options
from .config import SDPOConfig
from .loss_helpers import (  # noqa: F401  (re-exported: `sdpo.trainer` is their historical import path)
    aggregation_weights,
    clipped_policy_per_token,
    distillation_aggregation_weights,
    distillation_loss_kwargs,
)
from .loss_paths import SDPOLossMixin
from .modeling import add_head_fn_forward, is_plain_linear_head
from .rollout_feedback import FeedbackRecorder, combine_feedback
from .teacher import EMATeacherCallback, SDPOTeacher
from .teacher_context import build_teacher_prompts, select_teachers, tokenize_teacher_prompts

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


class SDPOTrainer(SDPOLossMixin, GRPOTrainer):
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
