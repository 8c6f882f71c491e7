"""Two SDPO training steps under torchrun (2 CPU processes, gloo) with DDP, FSDP or DeepSpeed ZeRO-3.

Writes the logged losses and the full (gathered) student and EMA-teacher (or trust-region reference) weights to
`--out` on rank 0, so that `tests/test_distributed.py` can compare a sharded run with a DDP run of the same seeds
and data: the sharded code paths (the fused-linear head gathered for the kernel, the EMA on sharded parameters,
the teacher checkpoint) must reproduce the replicated ones.

    torchrun --nproc_per_node 2 tests/distributed/train_sharded.py --sharding fsdp2 --fused always --out r.pt
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from sdpo import SDPOConfig, SDPOTrainer
from sdpo.sharding import local_shard
from sdpo.teacher import TEACHER_ADAPTER_NAME, TEACHER_STATE_FILE
from sdpo.tiny import build_char_tokenizer, build_tiny_model, tiny_run_args


def length_parity_reward(completions, **kwargs):
    return [1.0 if len(c) % 2 == 0 else 0.0 for c in completions]


def save_tiny_model(directory: str) -> None:
    """The model every run starts from: the tiny Llama with spread logits (no near-ties in the top-K)."""
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's torch comm backend JIT-compiles a shared-memory op at start-up even on gloo (~40 s of g++);
    the gloo collectives do not need it. (`import deepspeed.comm.torch as m` would bind torch: go through
    sys.modules.)"""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def allow_fsdp_on_cpu() -> None:
    """Let accelerate run FSDP on CPU processes (gloo).

    accelerate enables FSDP only for accelerator devices and silently falls back to DDP on MULTI_CPU; FSDP2's
    `fully_shard` itself runs on CPU with gloo. Only that gate is lifted here: wrapping, unsharding,
    reduce-scatter and the DTensor parameters are torch's real code paths.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # AcceleratorState re-reads PartialState's type on every construction: set both.
            PartialState().distributed_type = self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = __init__


def sharding_args(sharding: str, reshard_after_forward: bool = True) -> dict:
    if sharding == "ddp":
        return {}
    if sharding in ("fsdp1", "fsdp2"):
        return dict(
            fsdp=True,
            fsdp_config={
                "fsdp_version": int(sharding[-1]),
                "reshard_after_forward": reshard_after_forward if sharding == "fsdp2" else "FULL_SHARD",
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "use_orig_params": True,
            },
        )
    if sharding == "zero3":
        return dict(
            ddp_backend="gloo",
            deepspeed={
                # threshold 100: the head (53 x 32) stays partitioned between forwards, as a large one does, and
                # the norms (32) persist gathered, as every small tensor does by default (1e5 elements)
                "zero_optimization": {
                    "stage": 3,
                    "stage3_param_persistence_threshold": 100,
                    "stage3_gather_16bit_weights_on_model_save": True,  # lets get_state_dict gather (fp32 here)
                },
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            },
        )
    raise ValueError(f"unknown --sharding {sharding!r}")


def teacher_names(trainer: SDPOTrainer) -> list[str]:
    """The teacher's parameter names in `SDPOTeacher.state_dict` order (its keys are positions)."""
    if trainer.teacher.adapter_mode:  # the EMA adapter's parameters inside the student
        return [name for name, _ in trainer.model.named_parameters() if f".{TEACHER_ADAPTER_NAME}." in name]
    return [name for name, _ in trainer.teacher.model.named_parameters()]


def full_state(trainer: SDPOTrainer) -> dict[str, dict[str, torch.Tensor]]:
    """Gathered student and teacher weights by name (collective: every rank calls it)."""
    student = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    teacher = {}
    if trainer.teacher.checkpointed:  # the EMA teacher, or the trust-region reference (frozen)
        names = teacher_names(trainer)
        teacher = {names[int(i)]: t for i, t in trainer.teacher.state_dict().items()}
    return {"student": {k: v.detach().float().cpu() for k, v in (student or {}).items()}, "teacher": teacher}


def replicas_identical(trainer: SDPOTrainer) -> bool:
    """True when every rank holds bit-identical teacher tensors (meaningful where the teacher is replicated)."""
    digest = [local_shard(t).detach().float().cpu().double().sum().item() for t in trainer.teacher.pairs()[0]]
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest)
    return all(d == digests[0] for d in digests)


def teacher_checkpoint_roundtrip(trainer: SDPOTrainer, directory: str) -> dict[str, dict[str, torch.Tensor]]:
    """Save the teacher (gathered), scramble every shard, load it back (re-sharded): the saved and the restored
    teacher, by name, for the test to compare with the DDP run's teacher."""
    os.makedirs(directory, exist_ok=True)
    trainer.teacher.save(directory, write=trainer.args.should_save)
    trainer.accelerator.wait_for_everyone()
    saved = torch.load(os.path.join(directory, TEACHER_STATE_FILE), weights_only=True)["tensors"]
    with torch.no_grad():
        for t in trainer.teacher.pairs()[0]:
            local_shard(t).add_(1.0)
    assert trainer.teacher.load(directory)
    restored = trainer.teacher.state_dict()
    names = teacher_names(trainer)
    return {
        "saved_teacher": {names[int(i)]: t.float() for i, t in saved.items()},
        "restored_teacher": {names[int(i)]: t.float() for i, t in restored.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sharding", default="ddp")
    parser.add_argument("--fused", default="always")
    parser.add_argument("--mode", default="hybrid")
    parser.add_argument("--teacher", default="ema", help="teacher_regularization: ema, none or trust_region")
    parser.add_argument("--no-reshard-after-forward", action="store_true", help="FSDP2 keeps gathered weights")
    parser.add_argument("--peft", action="store_true", help="LoRA: the EMA teacher is a second adapter")
    parser.add_argument("--dtype", default="float32", help="the weights' dtype (bfloat16: pure bf16 training)")
    parser.add_argument("--model", required=True, help="a saved model + tokenizer (see save_tiny_model)")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        help="after training, save the teacher there, scramble it, load it back, and record both errors",
    )
    cli = parser.parse_args()
    if cli.sharding.startswith("fsdp"):
        allow_fsdp_on_cpu()

    if cli.sharding == "zero3":
        skip_deepspeed_shm_build()
    tok = AutoTokenizer.from_pretrained(cli.model)
    prompts = ["1+1=", "2+3=", "4+4=", "5+1=", "3+3=", "6+2=", "7+0=", "1+8="]
    ds = Dataset.from_dict({"prompt": prompts, "privileged_context": ["it is 2", "", "it is 8", None] * 2})
    args = SDPOConfig(
        **tiny_run_args(cli.checkpoint_dir or "sdpo-sharded-unused"),
        max_steps=3,  # the third step's teacher forward runs on EMA-updated weights twice over
        learning_rate=5e-2,
        logging_steps=1,
        seed=0,
        sdpo_policy_loss_mode=cli.mode,
        full_logit_distillation=True,
        distillation_topk=5,
        distillation_add_tail=True,
        teacher_regularization=cli.teacher,
        teacher_update_rate=0.5,
        distillation_fused_linear=cli.fused,
        model_init_kwargs={"dtype": cli.dtype},
        **sharding_args(cli.sharding, reshard_after_forward=not cli.no_reshard_after_forward),
    )
    if cli.sharding == "zero3":
        import deepspeed

        _ = args.device  # accelerate's process group first, then DeepSpeed's comm layer on top of it
        deepspeed.init_distributed(dist_backend="gloo")
    # A path, as real users pass: under ZeRO-3 the student and the EMA teacher load partitioned (zero.Init).
    peft_config = None
    if cli.peft:
        from peft import LoraConfig

        # Random A and B: the adapters change the outputs from the first step on.
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = SDPOTrainer(
        model=cli.model,
        reward_funcs=length_parity_reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft_config,
    )
    trainer.train()
    result = full_state(trainer)
    if cli.checkpoint_dir:
        result.update(teacher_checkpoint_roundtrip(trainer, cli.checkpoint_dir))
    result["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result["distillation_loss"] = [
        h["self_distillation/distillation_loss"] for h in trainer.state.log_history if "loss" in h
    ]
    result["fused"] = trainer.use_fused_linear
    if trainer.teacher.checkpointed:
        result["teacher_replicas_identical"] = replicas_identical(trainer)
    # What the run really sharded: the parameter types the EMA saw, and the student's wrapper.
    teacher_params, _ = trainer.teacher.pairs()
    kinds = {type(p).__name__ + ("/zero3" if hasattr(p, "ds_tensor") else "") for p in teacher_params}
    result["teacher_param_types"] = sorted(kinds)
    result["wrapper"] = type(trainer.model_wrapped).__name__
    if trainer.teacher_model_wrapped is not None and cli.sharding == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        result["teacher_fsdp_groups"] = sum(isinstance(m, FSDPModule) for m in trainer.teacher.model.modules())
    if trainer.accelerator.is_main_process:
        torch.save(result, cli.out)
    trainer.accelerator.wait_for_everyone()
    # gloo aborts at interpreter exit when its process group is still alive; and a rank once aborted in
    # interpreter teardown ("terminate called without an active exception") after a complete run, so
    # skip the teardown: everything is written and every rank has passed the barrier.
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
