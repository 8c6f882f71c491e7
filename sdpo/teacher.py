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

from .sharding import full_tensor, load_full_tensor_, local_shard

TEACHER_STATE_FILE = "sdpo_teacher.pt"
TEACHER_ADAPTER_NAME = "sdpo_teacher"


EMA_ROUNDINGS = ("stochastic", "nearest")


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 `x` rounded to bfloat16 up or down with probability proportional to proximity (unbiased).

    bfloat16 is float32 with the low 16 bits dropped: add uniform noise in [0, 2^16) to those bits of the
    magnitude (sign-magnitude format, so this works for negative values too), then truncate them.
    """
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # -65536 = 0xFFFF0000 as int32
    return bits.view(torch.float32).to(torch.bfloat16)


@torch.no_grad()
def ema_update_(
    teacher: list[torch.Tensor],
    student: list[torch.Tensor],
    rate: float,
    generator: torch.Generator | None = None,
) -> None:
    """In place: t ← (1 − rate)·t + rate·s for each pair (student cast to the teacher's dtype/device).

    With `generator`, bfloat16 teachers are updated in float32 and stochastically rounded: with nearest
    rounding an increment below half a bf16 ulp (rate·|s − t| < 2^-9·|t|, e.g. a 7% gap at rate 0.05) is
    lost, so a slowly tracking teacher freezes. Other dtypes round to nearest.
    """
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors, student {len(student)}: they must match.")
    if rate == 0.0:
        return
    for t, s in zip(teacher, student, strict=True):
        if t.shape != s.shape:
            raise ValueError(f"EMA shape mismatch: teacher {tuple(t.shape)} vs student {tuple(s.shape)}.")
        if generator is not None and t.dtype == torch.bfloat16:
            mixed = t.float().mul_(1.0 - rate).add_(s.to(device=t.device, dtype=torch.float32), alpha=rate)
            t.copy_(stochastic_round_to_bf16(mixed, generator))
        else:
            t.mul_(1.0 - rate).add_(s.to(device=t.device, dtype=t.dtype), alpha=rate)


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
        if kind not in ("ema", "none"):
            raise ValueError(f"teacher kind must be 'ema' or 'none', got {kind!r}.")
        if rounding not in EMA_ROUNDINGS:
            raise ValueError(f"EMA rounding must be one of {EMA_ROUNDINGS}, got {rounding!r}.")
        self.kind = kind
        self.rate = float(rate)
        self.rounding = rounding
        # Seeded alike on every rank: under DDP each rank holds the whole teacher and must round it the same way.
        self.seed = seed
        self._generator: torch.Generator | None = None
        self.student = student
        self.adapter_mode = kind == "ema" and _is_peft(student)
        self.model: nn.Module | None = None
        if kind == "none":
            self.model = student
        elif self.adapter_mode:
            self._init_adapter()
            self.model = student
        else:
            # A separate frozen copy; built by the caller under ZeRO-3 (a deep copy would clone empty shards).
            self.model = teacher_model if teacher_model is not None else copy.deepcopy(student)
            self.model.requires_grad_(False)
            self.model.eval()

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
        teacher, student_params = self.pairs()
        teacher = [local_shard(t) for t in teacher]  # elementwise, so shard by shard: partitioned alike
        student_params = [local_shard(s).detach() for s in student_params]
        ema_update_(teacher, student_params, self.rate, self.generator(teacher[0].device) if teacher else None)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The stochastic-rounding generator (None for nearest rounding), created on first use."""
        if self.rounding != "stochastic":
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[nn.Module]:
        """Yield the module to run the teacher forward on (switches the active adapter under PEFT)."""
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

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole teacher tensors on CPU, by position (names differ between adapter and full-model modes; the
        order is stable). A collective under ZeRO-3 / FSDP2: every rank must call it."""
        teacher, _ = self.pairs()
        return {str(i): full_tensor(t).cpu() for i, t in enumerate(teacher)}

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
        if self.kind != "ema":
            return
        state = {"rate": self.rate, "tensors": self.state_dict()}
        # The saving rank's generator: a resumed run then rounds exactly as an uninterrupted one wherever the
        # teacher is replicated (DDP, one process); sharded ranks draw per-shard streams, resumed from rank 0's.
        if self._generator is not None:
            state["rounding_generator"] = self._generator.get_state()
        if write:
            torch.save(state, os.path.join(directory, TEACHER_STATE_FILE))

    def load(self, directory: str) -> bool:
        """Restore from `directory`; returns False when there is no teacher state there."""
        path = os.path.join(directory, TEACHER_STATE_FILE)
        if self.kind != "ema" or not os.path.isfile(path):
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.load_state_dict(state["tensors"])
        if "rounding_generator" in state and self.rounding == "stochastic":
            device = local_shard(self.pairs()[0][0]).device
            self.generator(device).set_state(state["rounding_generator"])
        return True


class EMATeacherCallback(TrainerCallback):
    """Runs one EMA step after every `sync_steps`-th optimizer step (`on_step_end` fires after `optimizer.step()`)."""

    def __init__(self, teacher: SDPOTeacher, accelerator=None, sync_steps: int = 1):
        self.teacher = teacher
        self.accelerator = accelerator
        self.sync_steps = sync_steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.sync_steps != 0:
            return
        student = model
        if student is not None and self.accelerator is not None:
            student = self.accelerator.unwrap_model(student)
        self.teacher.update(student)
