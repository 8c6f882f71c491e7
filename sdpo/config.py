"""`SDPOConfig`: TRL's `GRPOConfig` plus the documented SDPO options.

Every GRPO option (generation incl. vLLM, rewards, accelerate/DeepSpeed/FSDP, PEFT, logging) keeps its
meaning; the fields below add self-distillation. Names and defaults follow TRL's SDPO documentation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

from trl import GRPOConfig

from .grpo_options import warn_options_ignored_without_policy_term

# The choice fields are typed as `Literal[...]` so that `HfArgumentParser` / `TrlParser` list their values in
# `sdpo train --help`; the tuples are the same values, for the validators (a `Literal` is not enforced at runtime).
PolicyLossMode = Literal["distillation_only", "hybrid"]
POLICY_LOSS_MODES = get_args(PolicyLossMode)
DistillationAggregation = Literal[
    "trl", "loss_type", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]
DISTILLATION_AGGREGATIONS = get_args(DistillationAggregation)
TeacherRegularization = Literal["ema", "none", "base", "trust_region"]
TEACHER_REGULARIZATIONS = get_args(TeacherRegularization)
DistillationMode = Literal["sampled_token", "full_logits", "topk_logits"]
DISTILLATION_MODES = get_args(DistillationMode)
FusedLinearChoice = Literal["auto", "always", "never"]
FUSED_LINEAR_CHOICES = get_args(FusedLinearChoice)
TeacherModelKind = Literal["ema", "live", "base"]
TeacherEmaRounding = Literal["stochastic", "nearest"]
# Aggregations with a defined meaning for the distillation term (same normalisers as TRL's GRPO policy loss).
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_DEFAULT_EMA_UPDATE_RATE = 0.05


class _OneGeneration(int):
    """The value 1 that passes `GRPOConfig.__post_init__`'s `num_generations < 2` check.

    GRPO needs siblings for its advantages; SDPO with environment feedback does not (TRL 1.16's SDPO accepts
    `num_generations=1`). Only held while GRPO's checks run; a plain `1` is restored after them.
    """

    def __lt__(self, other: object) -> bool:
        return False


@dataclass
class SDPOConfig(GRPOConfig):
    r"""Configuration for [`SDPOTrainer`]: every `trl.GRPOConfig` option plus the SDPO ones.

    Mapping to the `sdpo_kernels` loss: `full_logit_distillation=True` with `distillation_topk` → mode
    `"topk_logits"`; without → `"full_logits"`; `full_logit_distillation=False` → `"sampled_token"`
    (token-level reverse KL, needs `distillation_alpha=1.0`).

    Parameters:
        > Parameters that control the distillation loss

        distillation_alpha (`float`, *optional*, defaults to `1.0`):
            0 forward KL, 1 reverse KL, otherwise generalised JSD.
        distillation_topk (`int` or `None`, *optional*, defaults to `None`):
            Student top-K support size (needs `full_logit_distillation=True`).
        full_logit_distillation (`bool`, *optional*, defaults to `False`):
            Distill full (or top-K) distributions instead of the sampled token.
        distillation_is_clip (`float` or `None`, *optional*, defaults to `2.0`):
            Clip of the IS weight exp(logp - rollout logp); `None` disables.
        distillation_add_tail (`bool`, *optional*, defaults to `False`):
            Top-K only: add a bucket for the non-top-K mass.
        distillation_weight (`float`, *optional*, defaults to `1.0`):
            w. Default (`sdpo_policy_loss_mode=None`, TRL 1.16): loss = (1 − w)·policy + w·SD, w in [0, 1].
            Legacy explicit modes: `"distillation_only"` → w·SD, `"hybrid"` → policy + w·SD.
        sdpo_policy_loss_mode (`Literal["distillation_only", "hybrid"]` or `None`, *optional*, defaults to `None`):
            `None` (TRL 1.16 blend by `distillation_weight`), or the legacy `"distillation_only"` / `"hybrid"` (GRPO
            clipped policy loss + w·SD).
        distillation_aggregation (`str`, *optional*, defaults to `"trl"`):
            How per-token SD losses become the loss: `"trl"` (per-sequence mean over all rows), `"loss_type"`, or
            the official SDPO modes `"token-mean"`, `"seq-mean-token-mean"`, `"seq-mean-token-sum"`,
            `"seq-mean-token-sum-norm"` (see the field's help).
        distillation_fused_linear (`Literal["auto", "always", "never"]`, *optional*, defaults to `"auto"`):
            Use `sdpo_kernels.linear_self_distillation_loss` (hidden states × head weight, never materialising
            logits) when available and the head is a plain linear.
        distillation_rollout_is (`bool`, *optional*, defaults to `False`):
            Multiply the per-token distillation loss by GRPO's vLLM importance-sampling ratio (the official SDPO's
            `rollout_is`; needs `use_vllm=True` and `vllm_importance_sampling_correction=True`).

        > Parameters that control the teacher

        teacher_regularization (`Literal["ema", "none", "base", "trust_region"]`, *optional*, defaults to `"ema"`):
            `"ema"` (EMA copy of the student), `"none"` (current student, no grad), `"trust_region"` (logits
            lerp(initial student, student, teacher_update_rate), as the official SDPO) or `"base"` (the initial
            student, frozen; under PEFT the base model with the adapters disabled).
        teacher_update_rate (`float` or `None`, *optional*, defaults to `None`):
            EMA rate r in θ_t ← (1 − r)·θ_t + r·θ_s (falls back to `ema_update_rate`); after construction it holds
            the effective rate (0.05 by default, TRL 1.16's default).
        ema_update_rate (`float`, *optional*, defaults to `0.05`):
            Deprecated alias of `teacher_update_rate`.
        teacher_sync_steps (`int`, *optional*, defaults to `1`):
            Update the EMA teacher every N optimizer steps (TRL 1.16).
        teacher_ema_rounding (`Literal["stochastic", "nearest"]`, *optional*, defaults to `"stochastic"`):
            Rounding of bf16 EMA teacher weights (see the field's help).
        use_teacher_server (`bool`, *optional*, defaults to `False`):
            TRL 1.16's teacher log-probs from the vLLM server (live teacher; see the field's help).

        > Parameters that control the teacher context (demonstrations and feedback)

        use_successful_as_teacher (`bool`, *optional*, defaults to `True`):
            Successful siblings become demonstrations.
        success_reward_threshold (`float`, *optional*, defaults to `1.0`):
            Reward ≥ threshold counts as success.
        dont_reprompt_on_self_success (`bool`, *optional*, defaults to `True`):
            A rollout is never its own demonstration.
        max_reprompt_len (`int`, *optional*, defaults to `10240`):
            Longer teacher prompts keep the template, question and instruction whole; the demonstration
            keeps its beginning and the feedback its end (docs/trainer.md). Logged as
            `self_distillation/reprompt_truncated_frac`.
        reprompt_template, solution_template, feedback_template (`str`, *optional*):
            Teacher prompt templates (defaults: see the fields).
        include_environment_feedback (`bool`, *optional*, defaults to `False`):
            Use the dataset's `privileged_context` column as feedback.
        environment_feedback_only_without_solution (`bool`, *optional*, defaults to `False`):
            Feedback only for rollouts without a demonstration.
        remove_thinking_from_demonstration (`bool`, *optional*, defaults to `False`):
            Strip `<think>...</think>` from demonstrations.

        > Parameters that control the generation batch

        shuffle_generation_batch (`bool`, *optional*, defaults to `False`):
            Shuffle a generation batch before its micro-steps (GRPO); off as in TRL 1.16.

        > Parameters that control the diagnostics

        diagnostics_warning_interval (`int`, *optional*, defaults to `10`):
            Warn every N consecutive degenerate steps (0 disables).
        diagnostics_flat_tolerance (`float`, *optional*, defaults to `1e-8`):
            Tolerance for "flat rewards" / "no reprompt" diagnostics.

        > GRPO options whose defaults follow TRL 1.16's `SDPOConfig` (not `GRPOConfig`)

        learning_rate (`float`, *optional*, defaults to `5e-5`):
            As TRL 1.16's SDPO (transformers' default; `GRPOConfig` uses `1e-6`).
        disable_dropout (`bool`, *optional*, defaults to `True`):
            As TRL 1.16's SDPO (`GRPOConfig` uses `False`).
        max_completion_length (`int` or `None`, *optional*, defaults to `256`):
            As TRL 1.16's SDPO (`GRPOConfig` uses `512`).
        max_prompt_length (`int` or `None`, *optional*, defaults to `512`):
            TRL 1.16's SDPO option (`GRPOConfig` has none): each prompt keeps its last `max_prompt_length` tokens
            (left truncation) after tokenization / chat templating, before generation. `None` disables it. Teacher
            prompts are built from the untruncated prompt (and cut to `max_reprompt_len`), as TRL does.
        epsilon_high (`float` or `None`, *optional*, defaults to `None`):
            Upper clip; after construction it holds `epsilon` when not set (as TRL 1.16's SDPO).

        > TRL 1.16 aliases (accepted so that switching from `trl.experimental.sdpo` is an import change)

        distillation_mode (`str` or `None`, *optional*, defaults to `None`):
            `"sampled_token"`, `"full_logits"` or `"topk_logits"`: sets `full_logit_distillation`; after
            construction it always holds the resolved loss mode.
        teacher_model_kind (`Literal["ema", "live", "base"]` or `None`, *optional*, defaults to `None`):
            `"ema"`, `"live"` (= `teacher_regularization="none"`) or `"base"` (= `"base"`). After construction it
            holds TRL's name of the resolved teacher (`"ema"` by default; `None` for `"trust_region"`, which TRL
            lacks).
    """

    # GRPO options whose defaults follow TRL 1.16's `SDPOConfig` instead of `GRPOConfig`
    learning_rate: float = field(
        default=5e-5, metadata={"help": "The initial learning rate for AdamW (TRL 1.16's SDPO default)."}
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Whether to disable dropout in the model (TRL 1.16's SDPO default; GRPO's is False). This is "
            "useful for training with a reference model, as it prevents the model from generating different logprobs "
            "for the same input."
        },
    )
    max_completion_length: int | None = field(
        default=256, metadata={"help": "Maximum length of the generated completion (TRL 1.16's SDPO default)."}
    )
    max_prompt_length: int | None = field(
        default=512,
        metadata={
            "help": "Maximum prompt length in tokens (TRL 1.16's SDPO). Longer prompts are truncated from the left "
            "(the last tokens are kept) after tokenization, before generation; None disables truncation."
        },
    )

    # Parameters that control the distillation loss
    distillation_alpha: float = field(
        default=1.0, metadata={"help": "0 forward KL, 1 reverse KL, otherwise generalised JSD."}
    )
    distillation_topk: int | None = field(
        default=None, metadata={"help": "Top-K support size; requires `full_logit_distillation=True`."}
    )
    full_logit_distillation: bool = field(
        default=False, metadata={"help": "Distill (top-K or full) distributions instead of the sampled token."}
    )
    distillation_is_clip: float | None = field(
        default=2.0, metadata={"help": "IS weight clip for the distillation loss; None disables it."}
    )
    distillation_add_tail: bool = field(
        default=False, metadata={"help": "Top-K only: add a tail bucket for the non-top-K probability mass."}
    )
    distillation_weight: float = field(
        default=1.0,
        metadata={
            "help": "With `sdpo_policy_loss_mode=None` (default, TRL 1.16): convex weight of the blend "
            "`(1 - w) * policy_loss + w * distillation_loss`, in [0, 1]; 1.0 is pure self-distillation, 0.0 pure GRPO "
            "policy gradient. With the explicit legacy modes: 'distillation_only' trains on `w * distillation_loss`, "
            "'hybrid' on `policy_loss + w * distillation_loss` (w >= 0)."
        },
    )
    sdpo_policy_loss_mode: PolicyLossMode | None = field(
        default=None,
        metadata={
            "help": "None (default, TRL 1.16): `distillation_weight` w blends `(1 - w) * policy_loss + w * "
            "distillation_loss` (w = 1: distillation only). Legacy explicit modes (TRL's first SDPO API): "
            "'distillation_only' (`w * distillation_loss`) or 'hybrid' (GRPO's clipped policy loss + `w * "
            "distillation_loss`)."
        },
    )
    distillation_aggregation: DistillationAggregation = field(
        default="trl",
        metadata={
            "help": "How the per-token distillation losses [B, T] (tokens of rows with a teacher) become the loss, "
            "per micro-batch and divided by the gradient-accumulation steps. 'trl' (default, TRL 1.16): per-sequence "
            "token mean, averaged over ALL B rows (a row without a teacher counts 0). 'loss_type': like GRPO's policy "
            "term, per `loss_type` (grpo / bnpo / dr_grpo / dapo; dapo divides by the global count of teacher "
            "tokens of the generation batch). The official SDPO (verl `agg_loss`) modes: 'token-mean' (mean over the "
            "teacher tokens), 'seq-mean-token-mean' (per-sequence token mean, averaged over the rows that have "
            "teacher tokens), 'seq-mean-token-sum' (per-sequence token sum, averaged over those rows), "
            "'seq-mean-token-sum-norm' (sum of all teacher-token losses / `max_completion_length`)."
        },
    )
    distillation_fused_linear: FusedLinearChoice = field(
        default="auto",
        metadata={"help": "'auto' | 'always' | 'never': use sdpo_kernels' fused linear loss when possible."},
    )
    distillation_rollout_is: bool = field(
        default=False,
        metadata={
            "help": "Multiply the per-token distillation loss by GRPO's vLLM importance-sampling ratio (trainer / "
            "sampler mismatch), as the official SDPO's `rollout_is` does: token or sequence level and truncation "
            "by `vllm_importance_sampling_mode` ('token_truncate' + `vllm_importance_sampling_clip_max=2.0` is the "
            "official setting). Needs `use_vllm=True` and `vllm_importance_sampling_correction=True`."
        },
    )

    # Parameters that control the teacher
    teacher_regularization: TeacherRegularization = field(
        default="ema",
        metadata={
            "help": "'ema' (EMA copy of the student), 'none' (the current student), 'base' (the initial student, "
            "frozen; under PEFT the base model with the adapters disabled) or 'trust_region' (the official SDPO's "
            "trust-region teacher: logits lerp(reference, student, teacher_update_rate), the reference being the "
            "initial student; logits path only)."
        },
    )
    teacher_update_rate: float | None = field(
        default=None,
        metadata={
            "help": "EMA teacher update rate, or the trust-region mixing coefficient; defaults to `ema_update_rate` "
            "(0.05). After construction it holds the effective rate."
        },
    )
    ema_update_rate: float = field(
        default=_DEFAULT_EMA_UPDATE_RATE, metadata={"help": "Deprecated alias of `teacher_update_rate`."}
    )
    teacher_sync_steps: int = field(
        default=1,
        metadata={"help": "Update the EMA teacher every N optimizer steps (TRL 1.16)."},
    )
    teacher_ema_rounding: TeacherEmaRounding = field(
        default="stochastic",
        metadata={
            "help": "'stochastic' | 'nearest': rounding of bfloat16 EMA teacher weights after each update. "
            "'nearest' (TRL's behaviour) loses every increment below half a bf16 ulp, so a slowly tracking "
            "teacher freezes; 'stochastic' keeps the EMA unbiased. No effect on other dtypes."
        },
    )
    use_teacher_server: bool = field(
        default=False,
        metadata={
            "help": "Compute teacher logprobs from the running vLLM generation server instead of a local teacher "
            "forward. Only supported for `teacher_model_kind='live'` (teacher_regularization='none') with "
            "`use_vllm=True`, `vllm_mode='server'`, `distillation_weight=1.0` (pure distillation), and "
            "`distillation_mode` in {'sampled_token', 'topk_logits'} (the server returns the teacher's top-k "
            "logprobs, not the full vocabulary; `topk_logits` distills over the teacher's own top-k support)."
        },
    )

    # Parameters that control the teacher context (demonstrations and feedback)
    use_successful_as_teacher: bool = field(
        default=True, metadata={"help": "Use successful sibling rollouts as demonstrations."}
    )
    success_reward_threshold: float = field(
        default=1.0, metadata={"help": "Reward at or above which a rollout is successful."}
    )
    dont_reprompt_on_self_success: bool = field(
        default=True, metadata={"help": "Never use a rollout as its own demonstration."}
    )
    max_reprompt_len: int = field(default=10240, metadata={"help": "Max teacher prompt length in tokens."})
    reprompt_template: str = field(
        default="{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n",
        metadata={"help": "Teacher prompt template with {prompt}, {solution}, {feedback}."},
    )
    solution_template: str = field(
        default="\nCorrect solution:\n\n{successful_previous_attempt}\n\n",
        metadata={"help": "Demonstration template with {successful_previous_attempt}."},
    )
    feedback_template: str = field(
        default="\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n",
        metadata={"help": "Feedback template with {feedback_raw}."},
    )
    include_environment_feedback: bool = field(
        default=False, metadata={"help": "Use the `privileged_context` column as environment feedback."}
    )
    environment_feedback_only_without_solution: bool = field(
        default=False, metadata={"help": "Use feedback only for rollouts without a demonstration."}
    )
    remove_thinking_from_demonstration: bool = field(
        default=False, metadata={"help": "Strip <think>...</think> blocks from demonstrations."}
    )

    # Parameters that control the generation batch
    shuffle_generation_batch: bool = field(
        default=False,
        metadata={
            "help": "Shuffle each generation batch before splitting it into its `steps_per_generation` optimizer "
            "micro-steps (GRPO's behaviour). False (default) splits it in order, as TRL 1.16's SDPO does."
        },
    )

    # Parameters that control the diagnostics
    diagnostics_warning_interval: int = field(
        default=10, metadata={"help": "Warn every N consecutive degenerate steps; 0 disables."}
    )
    diagnostics_flat_tolerance: float = field(
        default=1e-8, metadata={"help": "Tolerance for flat-reward / inactive-distillation diagnostics."}
    )

    # TRL 1.16 aliases (accepted so that switching from `trl.experimental.sdpo` is an import change)
    distillation_mode: DistillationMode | None = field(
        default=None,
        metadata={
            "help": "TRL 1.16 spelling: 'sampled_token' | 'full_logits' | 'topk_logits'; sets "
            "`full_logit_distillation`. After construction it always holds the resolved loss mode."
        },
    )
    teacher_model_kind: TeacherModelKind | None = field(
        default=None,
        metadata={
            "help": "TRL 1.16 spelling: 'ema' | 'live' (= teacher_regularization 'none') | 'base'. After construction "
            "it holds the resolved teacher's TRL name ('ema' by default; None for 'trust_region')."
        },
    )

    def __post_init__(self):
        self._resolve_trl_116_spellings()
        # Validate the SDPO fields first: their errors are the actionable ones.
        self._validate_loss_fields()
        self._validate_choices_and_bounds()
        self._validate_teacher_update_rate()
        self._validate_loss_type()
        # After construction `distillation_mode` always names the sdpo_kernels loss mode.
        if not self.full_logit_distillation:
            self.distillation_mode = "sampled_token"
        else:
            self.distillation_mode = "topk_logits" if self.distillation_topk is not None else "full_logits"
        self._validate_teacher_server()
        self._validate_rollout_is()
        single = self.num_generations == 1
        if single:
            self.num_generations = _OneGeneration(1)
        try:
            super().__post_init__()
        finally:
            if single:
                self.num_generations = 1
        self._resolve_to_trl_116_values()
        self._warn_on_trl_differences()
        warn_options_ignored_without_policy_term(self)  # sets beta to 0.0 there: no reference model

    def _resolve_to_trl_116_values(self) -> None:
        """After validation, the fields TRL 1.16's `SDPOConfig` resolves hold the same values as there (so that the
        two configs agree field by field); re-constructing from these values gives the same config."""
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        self.teacher_update_rate = self.effective_teacher_update_rate
        self.teacher_model_kind = {"ema": "ema", "none": "live", "base": "base"}.get(self.teacher_regularization)

    def _validate_loss_fields(self) -> None:
        if self.distillation_topk is not None and not self.full_logit_distillation:
            raise ValueError(
                "`distillation_topk` requires `full_logit_distillation=True` (top-K is a logit-level approximation); "
                f"got distillation_topk={self.distillation_topk} with full_logit_distillation=False."
            )
        if self.distillation_topk is not None and self.distillation_topk < 1:
            raise ValueError(f"`distillation_topk` must be >= 1, got {self.distillation_topk}.")
        if not self.full_logit_distillation and self.distillation_alpha != 1.0:
            raise ValueError(
                "`full_logit_distillation=False` is token-level reverse KL and requires `distillation_alpha=1.0`, "
                f"got distillation_alpha={self.distillation_alpha}. Set `full_logit_distillation=True` for other "
                "divergences."
            )
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise ValueError(f"`distillation_alpha` must be in [0, 1], got {self.distillation_alpha}.")
        if self.sdpo_policy_loss_mode is not None and self.sdpo_policy_loss_mode not in POLICY_LOSS_MODES:
            raise ValueError(
                f"`sdpo_policy_loss_mode` must be None or one of {POLICY_LOSS_MODES}, "
                f"got {self.sdpo_policy_loss_mode!r}."
            )
        if self.sdpo_policy_loss_mode is None and not 0.0 <= self.distillation_weight <= 1.0:
            raise ValueError(
                f"`distillation_weight` must be in [0, 1] (TRL 1.16's convex blend), got {self.distillation_weight}; "
                "set sdpo_policy_loss_mode='hybrid' for `policy_loss + w * distillation_loss` with w > 1."
            )
        if self.distillation_aggregation not in DISTILLATION_AGGREGATIONS:
            raise ValueError(
                f"`distillation_aggregation` must be one of {DISTILLATION_AGGREGATIONS}, "
                f"got {self.distillation_aggregation!r}."
            )

    def _validate_choices_and_bounds(self) -> None:
        """The choice fields' values (a `Literal` is not enforced at runtime) and the numeric bounds."""
        if self.teacher_regularization not in TEACHER_REGULARIZATIONS:
            raise ValueError(
                f"`teacher_regularization` must be one of {TEACHER_REGULARIZATIONS}, "
                f"got {self.teacher_regularization!r}."
            )
        if self.distillation_fused_linear not in FUSED_LINEAR_CHOICES:
            raise ValueError(
                f"`distillation_fused_linear` must be one of {FUSED_LINEAR_CHOICES}, "
                f"got {self.distillation_fused_linear!r}."
            )
        if self.distillation_is_clip is not None and self.distillation_is_clip <= 0:
            raise ValueError(f"`distillation_is_clip` must be > 0 or None, got {self.distillation_is_clip}.")
        if self.distillation_weight < 0:
            raise ValueError(f"`distillation_weight` must be >= 0, got {self.distillation_weight}.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"`max_prompt_length` must be >= 1 or None, got {self.max_prompt_length}.")
        if self.max_reprompt_len < 1:
            raise ValueError(f"`max_reprompt_len` must be >= 1, got {self.max_reprompt_len}.")
        if self.teacher_ema_rounding not in ("stochastic", "nearest"):
            raise ValueError(
                f"`teacher_ema_rounding` must be 'stochastic' or 'nearest', got {self.teacher_ema_rounding!r}."
            )
        if self.diagnostics_warning_interval < 0:
            raise ValueError(f"`diagnostics_warning_interval` must be >= 0, got {self.diagnostics_warning_interval}.")

    def _validate_teacher_update_rate(self) -> None:
        """`teacher_update_rate` vs its deprecated alias `ema_update_rate`, and the effective rate's range."""
        if self.teacher_update_rate is not None and self.ema_update_rate != _DEFAULT_EMA_UPDATE_RATE:
            if self.teacher_update_rate != self.ema_update_rate:
                raise ValueError(
                    "Both `teacher_update_rate` and its deprecated alias `ema_update_rate` are set to different "
                    f"values ({self.teacher_update_rate} vs {self.ema_update_rate}); set only `teacher_update_rate`."
                )
        elif self.teacher_update_rate is None and self.ema_update_rate != _DEFAULT_EMA_UPDATE_RATE:
            warnings.warn(
                "`ema_update_rate` is deprecated; use `teacher_update_rate` instead.", FutureWarning, stacklevel=2
            )
        if not 0.0 <= self.effective_teacher_update_rate <= 1.0:
            raise ValueError(f"`teacher_update_rate` must be in [0, 1], got {self.effective_teacher_update_rate}.")

    def _validate_loss_type(self) -> None:
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(f"`loss_type` must be one of {SUPPORTED_LOSS_TYPES} for SDPO, got {self.loss_type!r}.")

    def _warn_on_trl_differences(self) -> None:
        """One warning per setting in which this trainer deliberately trains differently from TRL 1.16's SDPO."""
        notes = []
        if self.use_vllm and self.distillation_is_clip is not None:
            notes.append(
                "the distillation IS clip uses the rollout log-probs GRPO computes under vLLM (TRL 1.16's SDPO asks "
                "vLLM for none and clips only when its gradient accumulation is misaligned)"
            )
        if self.policy_loss_weight > 0.0:
            if self.beta != 0.0:
                notes.append(
                    f"the policy term includes GRPO's KL penalty beta={self.beta} (TRL 1.16's SDPO ignores beta)"
                )
            if self.use_vllm and self.vllm_importance_sampling_correction:
                notes.append(
                    "the policy term applies GRPO's vLLM importance-sampling correction (TRL 1.16's SDPO does not)"
                )
            if self.loss_type == "dapo" and (self.steps_per_generation > 1 or self.world_size > 1):
                notes.append(
                    "loss_type='dapo' normalises the policy term by the token count of the whole generation batch, as "
                    "documented and as GRPO does (TRL 1.16's SDPO takes each micro-batch's token mean)"
                )
            if self.scale_rewards == "none":
                notes.append(
                    "scale_rewards='none' leaves GRPO's advantages unscaled (TRL 1.16's SDPO divides them by 1 + 1e-4)"
                )
        if self.scale_rewards == "none":
            notes.append(
                "scale_rewards='none': the reward diagnostics use the true per-group std (TRL 1.16 substitutes 1, so "
                "it never reports flat groups)"
            )
        if self.distillation_aggregation != "trl":
            notes.append(
                f"distillation_aggregation={self.distillation_aggregation!r} (TRL 1.16 always takes the per-sequence "
                "mean over all rows: 'trl')"
            )
        for note in notes:
            warnings.warn(f"SDPOConfig differs from TRL 1.16's SDPO here: {note}.", UserWarning, stacklevel=3)

    def _validate_rollout_is(self) -> None:
        if self.distillation_rollout_is and not (self.use_vllm and self.vllm_importance_sampling_correction):
            raise ValueError(
                "`distillation_rollout_is=True` needs GRPO's vLLM importance-sampling ratio: set `use_vllm=True` and "
                "`vllm_importance_sampling_correction=True`."
            )

    def _validate_teacher_server(self) -> None:
        """`use_teacher_server` needs a live teacher on GRPO's vLLM server and a loss the server's top-k can serve."""
        if not self.use_teacher_server:
            return
        if not (self.use_vllm and self.vllm_mode == "server"):
            raise ValueError(
                "`use_teacher_server=True` requires `use_vllm=True` and `vllm_mode='server'`: teacher logprobs are "
                "served by the same vLLM server used for generation."
            )
        if self.teacher_regularization != "none":
            raise ValueError(
                "`use_teacher_server=True` only supports the live teacher (`teacher_model_kind='live'`, i.e. "
                f"teacher_regularization='none'): the server holds the current student weights; got "
                f"{self.teacher_regularization!r}."
            )
        if self.policy_loss_weight != 0.0:
            raise ValueError(
                "`use_teacher_server=True` only supports pure self-distillation (`distillation_weight=1.0`, no "
                "hybrid policy term): the policy loss needs the full-vocabulary logits, which the server does not "
                "return."
            )
        if self.distillation_mode not in ("sampled_token", "topk_logits"):
            raise ValueError(
                "`use_teacher_server=True` only supports `distillation_mode` in {'sampled_token', 'topk_logits'}, "
                f"got {self.distillation_mode!r}: the server returns the teacher's top-k logprobs, not the full "
                "vocabulary."
            )

    @property
    def policy_loss_weight(self) -> float:
        """Coefficient of GRPO's clipped policy loss: 1 − w (TRL 1.16 blend), 1 ('hybrid') or 0."""
        if self.sdpo_policy_loss_mode is None:
            return 1.0 - self.distillation_weight
        return 1.0 if self.sdpo_policy_loss_mode == "hybrid" else 0.0

    @property
    def distillation_loss_weight(self) -> float:
        """Coefficient of the self-distillation loss (`distillation_weight` in every mode)."""
        return self.distillation_weight

    # The official SDPO recipe (lasgroup/SDPO: verl/trainer/config/sdpo.yaml over actor/actor.yaml's
    # `self_distillation` block and its `loss_agg_mode`), in this config's field names.
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = dict(
        full_logit_distillation=True,
        distillation_topk=100,
        distillation_add_tail=True,
        distillation_alpha=0.5,
        distillation_is_clip=2.0,
        distillation_weight=1.0,
        distillation_aggregation="token-mean",
        success_reward_threshold=0.5,
        dont_reprompt_on_self_success=True,
        teacher_regularization="ema",
        teacher_update_rate=0.05,
        max_reprompt_len=10240,
        include_environment_feedback=True,
        environment_feedback_only_without_solution=True,
        remove_thinking_from_demonstration=True,
        reprompt_template="{prompt}{solution}{feedback}\n\nCorrectly solve the original question.",
        solution_template="\nCorrect solution:\n\n{successful_previous_attempt}",
        feedback_template="\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}",
        num_generations=8,
        learning_rate=1e-5,
    )

    @classmethod
    def official_defaults(cls, **overrides: Any) -> SDPOConfig:
        """The official SDPO recommended configuration; `overrides` (any field, e.g. `output_dir`) win.

        Top-K 100 distillation with a tail bucket, JSD alpha 0.5, IS clip 2, token-mean aggregation, success
        threshold 0.5, environment feedback on (only without a demonstration), thinking removed from
        demonstrations, the official templates, an EMA teacher at rate 0.05, 8 rollouts per prompt, lr 1e-5.
        With `use_vllm=True` in `overrides`, also the official rollout IS weights on the distillation term
        (token level, truncated at 2). Not carried over: the official right-truncation of long teacher prompts (here
        the demonstration and feedback are cut, the question and instruction kept: docs/trainer.md).
        """
        rollout_is = {}
        if overrides.get("use_vllm"):
            rollout_is = dict(
                distillation_rollout_is=True,
                vllm_importance_sampling_correction=True,
                vllm_importance_sampling_mode="token_truncate",
                vllm_importance_sampling_clip_max=2.0,
            )
        return cls(**{**cls.OFFICIAL_DEFAULTS, **rollout_is, **overrides})

    @property
    def effective_teacher_update_rate(self) -> float:
        """The EMA rate r actually used: `teacher_update_rate`, else the deprecated `ema_update_rate`."""
        return self.ema_update_rate if self.teacher_update_rate is None else self.teacher_update_rate

    def _resolve_trl_116_spellings(self) -> None:
        """Map TRL 1.16's `distillation_mode` / `teacher_model_kind` onto the documented fields."""
        if self.distillation_mode is not None:
            if self.distillation_mode not in DISTILLATION_MODES:
                raise ValueError(
                    f"`distillation_mode` must be one of {DISTILLATION_MODES} or None, got {self.distillation_mode!r}."
                )
            full = self.distillation_mode != "sampled_token"
            if self.full_logit_distillation and not full:
                raise ValueError(
                    "`distillation_mode='sampled_token'` contradicts `full_logit_distillation=True`; set only one."
                )
            if self.distillation_mode == "topk_logits" and self.distillation_topk is None:
                raise ValueError("`distillation_mode='topk_logits'` requires `distillation_topk`.")
            if self.distillation_mode == "full_logits" and self.distillation_topk is not None:
                raise ValueError("`distillation_mode='full_logits'` requires `distillation_topk=None`.")
            self.full_logit_distillation = full
        if self.teacher_model_kind is not None:
            kinds = {"ema": "ema", "live": "none", "base": "base"}
            if self.teacher_model_kind not in kinds:
                raise ValueError(
                    f"`teacher_model_kind` must be 'ema', 'live' or 'base', got {self.teacher_model_kind!r}."
                )
            wanted = kinds[self.teacher_model_kind]
            if self.teacher_regularization not in ("ema", wanted):  # "ema" is also the default
                raise ValueError(
                    f"`teacher_model_kind={self.teacher_model_kind!r}` contradicts "
                    f"`teacher_regularization={self.teacher_regularization!r}`; set only one."
                )
            self.teacher_regularization = wanted
        if self.teacher_sync_steps < 1:
            raise ValueError(f"`teacher_sync_steps` must be >= 1, got {self.teacher_sync_steps}.")
