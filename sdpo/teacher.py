"""The SDPO teacher: an EMA copy of the student (full model or PEFT adapter), or the live student.

θ_t ← (1 − r)·θ_t + r·θ_s after every optimizer step. The EMA state is part of training state, so it is
written with every checkpoint and restored on resume (TRL's trainer rebuilds it from the initial weights).

Under ZeRO-3 / FSDP2 the EMA runs on each rank's local shards (no gather) and the checkpoint holds whole
tensors, gathered one at a time (see `sdpo.sharding`).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator

import torch
from torch import nn
from transformers import TrainerCallback

from .sharding import full_tensor, is_sharded, load_full_tensor_, local_shard, release_stale_gathered_

TEACHER_STATE_FILE = "sdpo_teacher.pt"
TEACHER_ADAPTER_NAME = "sdpo_teacher"


EMA_ROUNDINGS = ("stochastic", "nearest")
_ROUNDING_CHUNK = 1 << 24  # elements per float32 work slice: bounded temporaries for [V, D] embeddings


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 `x` rounded to bfloat16 up or down with probability proportional to proximity (unbiased).

    bfloat16 is float32 with the low 16 bits dropped: add uniform noise in [0, 2^16) to those bits of the
    magnitude (sign-magnitude format, so this works for negative values too), then truncate them. NaNs are
    kept as they are (their payload could otherwise carry into the sign bit).
    """
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # -65536 = 0xFFFF0000 as int32
    return torch.where(x.isnan(), x, bits.view(torch.float32)).to(torch.bfloat16)


def rounding_seed(seed: int, update: int, index: int, rank: int) -> int:
    """The seed of one tensor's rounding noise in one EMA update: a pure function, so nothing needs saving and
    a resumed run rounds exactly as an uninterrupted one. `rank` tells shards apart (0 for replicated
    tensors, which every DDP rank must round alike)."""
    return (((seed * 1_000_003 + update) * 1_000_033 + index) * 10_007 + rank) % (1 << 62)


@torch.no_grad()
def ema_update_(
    teacher: list[torch.Tensor],
    student: list[torch.Tensor],
    rate: float,
    seeds: list[int] | None = None,
) -> None:
    """In place: t ← (1 − rate)·t + rate·s for each pair (student cast to the teacher's dtype/device).

    With `seeds` (one per pair), bfloat16 teachers are updated in float32 and stochastically rounded: with
    nearest rounding an increment below half a bf16 ulp (2^-9 to 2^-8 of |t|, by where t sits in its binade)
    is lost: at rate 0.05 any gap |s − t| under 4 to 8 % of |t|, so a slowly tracking teacher freezes. Other
    dtypes round to nearest.
    """
    if len(teacher) != len(student) or (seeds is not None and len(seeds) != len(teacher)):
        raise ValueError(f"teacher has {len(teacher)} tensors, student {len(student)}: they must match.")
    if rate == 0.0:
        return
    for i, (t, s) in enumerate(zip(teacher, student, strict=True)):
        if t.shape != s.shape:
            raise ValueError(f"EMA shape mismatch: teacher {tuple(t.shape)} vs student {tuple(s.shape)}.")
        if seeds is None or t.dtype != torch.bfloat16:
            t.mul_(1.0 - rate).add_(s.to(device=t.device, dtype=t.dtype), alpha=rate)
            continue
        generator = torch.Generator(device=t.device).manual_seed(seeds[i])
        work = t if t.is_contiguous() else t.contiguous()  # a strided teacher is rounded in a copy
        flat_t, flat_s = work.view(-1), s.reshape(-1)
        for lo in range(0, flat_t.numel(), _ROUNDING_CHUNK):
            hi = min(flat_t.numel(), lo + _ROUNDING_CHUNK)
            mixed = flat_t[lo:hi].float().mul_(1.0 - rate)
            mixed.add_(flat_s[lo:hi].to(device=t.device, dtype=torch.float32), alpha=rate)
            flat_t[lo:hi] = stochastic_round_to_bf16(mixed, generator)
        if work is not t:
            t.copy_(work)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class SDPOTeacher:
    """Owns the teacher weights and routes the teacher forward.

    kind:
        "none": the teacher is the student (call it under `torch.no_grad()`).
        "ema": a frozen deep copy of the student (non-PEFT), or, under PEFT, a second adapter
            `sdpo_teacher` on the same base model: only adapter weights are averaged, the base stays shared.
        "base": the initial student, never updated: a frozen copy (non-PEFT), or, under PEFT, the student with its
            adapters disabled (TRL's 'base').
        "trust_region": the reference of the official SDPO's trust-region teacher (logits lerp(reference, student,
            rate), mixed by the trainer): held like "base", but checkpointed (non-PEFT).
    """

    def __init__(
        self,
        student: nn.Module,
        kind: str,
        rate: float,
        teacher_model: nn.Module | None = None,
        rounding: str = "stochastic",
        seed: int = 0,
    ):
        if kind not in ("ema", "none", "base", "trust_region"):
            raise ValueError(f"teacher kind must be 'ema', 'none', 'base' or 'trust_region', got {kind!r}.")
        if rounding not in EMA_ROUNDINGS:
            raise ValueError(f"EMA rounding must be one of {EMA_ROUNDINGS}, got {rounding!r}.")
        self.kind = kind
        self.rate = float(rate)
        self.rounding = rounding
        self.seed = seed
        self.updates = 0  # EMA steps taken: part of the rounding seeds, saved with the teacher
        # Set by the trainer when the teacher was not built as a copy of the student (ZeRO-3 loads it from the
        # checkpoint path): copy the student into it when training starts, unless a checkpoint restored it.
        self.sync_at_train_begin = False
        self.student = student
        self.adapter_mode = kind == "ema" and _is_peft(student)
        # 'trust_region' holds the reference model of its logit mix: the initial student, as 'base'.
        self.base_adapters_off = kind in ("base", "trust_region") and _is_peft(student)
        self.model: nn.Module | None = None
        if kind == "none" or self.base_adapters_off:
            self.model = student
        elif self.adapter_mode:
            self._init_adapter()
            self.model = student
        else:
            # A separate frozen copy; built by the caller under ZeRO-3 (a deep copy would clone empty shards).
            self.model = teacher_model if teacher_model is not None else copy.deepcopy(student)
            self.model.requires_grad_(False)
            self.model.eval()

    @property
    def checkpointed(self) -> bool:
        """True for the EMA teacher, whose state is training state, and for the trust-region reference copy (saved
        so that a resumed run mixes with the very reference it started from). A 'base' teacher is not saved: it is
        the initial student, rebuilt as such on resume (the student's checkpoint is loaded after it is built)."""
        return self.kind == "ema" or (self.kind == "trust_region" and not self.base_adapters_off)

    # ---- PEFT adapter teacher -------------------------------------------------------------------------------
    def _init_adapter(self) -> None:
        """Add a frozen `sdpo_teacher` adapter equal to the student's active adapter (θ_t(0) = θ_s(0))."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        student = self.student
        active = student.active_adapter if isinstance(student.active_adapter, str) else student.active_adapter[0]
        self._student_adapter = active
        student.add_adapter(TEACHER_ADAPTER_NAME, copy.deepcopy(student.peft_config[active]))
        state = get_peft_model_state_dict(student, adapter_name=active)
        set_peft_model_state_dict(student, state, adapter_name=TEACHER_ADAPTER_NAME)
        student.set_adapter(active)  # keep training the student's adapter
        for p in self._adapter_params(TEACHER_ADAPTER_NAME):
            p.requires_grad_(False)

    def _adapter_params(self, name: str) -> list[torch.Tensor]:
        """Parameters of adapter `name`, in module order (names contain `.{name}.`)."""
        key = f".{name}."
        return [p for n, p in self.student.named_parameters() if key in n]

    # ---- teacher API ----------------------------------------------------------------------------------------
    def pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher parameters, matching student parameters) that the EMA averages; possibly sharded."""
        if self.adapter_mode:
            return self._adapter_params(TEACHER_ADAPTER_NAME), self._adapter_params(self._student_adapter)
        teacher = [p for _, p in self.model.named_parameters()]
        student = [p for _, p in self.student.named_parameters()]
        return teacher, student

    @torch.no_grad()
    def update(self, student: nn.Module | None = None) -> None:
        """One EMA step (no-op for kind "none"). `student` replaces the tracked module (e.g. after unwrapping)."""
        if self.kind != "ema":
            return
        if student is not None and not self.adapter_mode:
            self.student = student
        seeds = None
        if self.rounding == "stochastic":
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            seeds = [
                rounding_seed(self.seed, self.updates, i, rank if is_sharded(t) else 0)
                for i, t in enumerate(self.pairs()[0])
            ]
        self._shardwise_ema(self.rate, seeds)
        self.updates += 1

    @torch.no_grad()
    def copy_from_student(self, student: nn.Module | None = None) -> None:
        """θ_t ← θ_s, shard by shard (an EMA step at rate 1, exact in every dtype)."""
        if student is not None and not self.adapter_mode:
            self.student = student
        self._shardwise_ema(1.0, None)

    def _shardwise_ema(self, rate: float, seeds: list[int] | None) -> None:
        """`ema_update_` on the local shards (elementwise, and teacher and student are partitioned alike), then
        drop ZeRO-3's stale whole copies of the updated teacher parameters."""
        teacher, student_params = self.pairs()
        ema_update_([local_shard(t) for t in teacher], [local_shard(s).detach() for s in student_params], rate, seeds)
        release_stale_gathered_(teacher)

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[nn.Module]:
        """Yield the module to run the teacher forward on (switches the active adapter, or disables the adapters
        for the PEFT 'base' teacher)."""
        if self.base_adapters_off:
            with self.student.disable_adapter():
                yield self.student
            return
        if not self.adapter_mode:
            yield self.model
            return
        self.student.set_adapter(TEACHER_ADAPTER_NAME)
        try:
            yield self.student
        finally:
            self.student.set_adapter(self._student_adapter)
            # PEFT's set_adapter marks the active adapter trainable: restore the freeze on the teacher adapter.
            for p in self._adapter_params(TEACHER_ADAPTER_NAME):
                p.requires_grad_(False)

    def state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Whole teacher tensors on CPU, by position (names differ between adapter and full-model modes; the
        order is stable). A collective under ZeRO-3 / FSDP2: every rank must call it; ranks with
        `keep=False` take part in the gathers and keep nothing (an empty dict)."""
        teacher, _ = self.pairs()
        state = {}
        for i, t in enumerate(teacher):
            whole = full_tensor(t)  # one tensor at a time: the gather's peak is the largest tensor
            if keep:
                state[str(i)] = whole.cpu()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        teacher, _ = self.pairs()
        if len(state) != len(teacher):
            raise ValueError(f"teacher checkpoint has {len(state)} tensors, the teacher has {len(teacher)}.")
        for i, t in enumerate(teacher):
            load_full_tensor_(t, state[str(i)])

    def save(self, directory: str, write: bool = True) -> None:
        """Write the teacher to `directory`. Every rank calls it (the gather is a collective); the ranks with
        `write=True` (`args.should_save`) write the file."""
        if not self.checkpointed:
            return
        state = {"rate": self.rate, "updates": self.updates, "tensors": self.state_dict(keep=write)}
        if write:
            torch.save(state, os.path.join(directory, TEACHER_STATE_FILE))

    def load(self, directory: str) -> bool:
        """Restore from `directory`; returns False when there is no teacher state there. Every rank reads the
        file (a shared filesystem, as for the rest of the checkpoint)."""
        path = os.path.join(directory, TEACHER_STATE_FILE)
        if not self.checkpointed:
            return False
        exists = os.path.isfile(path)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Loading is a collective under sharding: ranks that disagree on the file would hang, so fail loudly.
            seen: list[bool | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(seen, exists)
            if any(seen) and not all(seen):
                raise RuntimeError(
                    f"{path} is visible to some ranks only ({seen}): resuming the SDPO teacher needs the "
                    "checkpoint on a filesystem every rank reads, as for the rest of the checkpoint."
                )
        if not exists:
            return False
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        self.load_state_dict(state["tensors"])
        self.updates = int(state.get("updates", 0))
        self.sync_at_train_begin = False
        return True


class EMATeacherCallback(TrainerCallback):
    """Runs one EMA step after every `sync_steps`-th optimizer step (`on_step_end` fires after `optimizer.step()`)."""

    def __init__(self, teacher: SDPOTeacher, accelerator=None, sync_steps: int = 1):
        self.teacher = teacher
        self.accelerator = accelerator
        self.sync_steps = sync_steps

    def _unwrapped(self, model):
        return self.accelerator.unwrap_model(model) if model is not None and self.accelerator is not None else model

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.teacher.sync_at_train_begin:  # after the student is wrapped (partitioned) and any resume
            self.teacher.copy_from_student(self._unwrapped(model))
            self.teacher.sync_at_train_begin = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.sync_steps != 0:
            return
        self.teacher.update(self._unwrapped(model))
