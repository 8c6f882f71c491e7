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


@torch.no_grad()
def ema_update_(teacher: list[torch.Tensor], student: list[torch.Tensor], rate: float) -> None:
    """In place: t ← (1 − rate)·t + rate·s for each pair (student cast to the teacher's dtype/device)."""
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors, student {len(student)}: they must match.")
    if rate == 0.0:
        return
    for t, s in zip(teacher, student, strict=True):
        if t.shape != s.shape:
            raise ValueError(f"EMA shape mismatch: teacher {tuple(t.shape)} vs student {tuple(s.shape)}.")
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

    def __init__(self, student: nn.Module, kind: str, rate: float, teacher_model: nn.Module | None = None):
        if kind not in ("ema", "none"):
            raise ValueError(f"teacher kind must be 'ema' or 'none', got {kind!r}.")
        self.kind = kind
        self.rate = float(rate)
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
        # Elementwise, so shard by shard: teacher and student are partitioned alike.
        ema_update_([local_shard(t) for t in teacher], [local_shard(s).detach() for s in student_params], self.rate)

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
        state = self.state_dict()
        if write:
            torch.save({"rate": self.rate, "tensors": state}, os.path.join(directory, TEACHER_STATE_FILE))

    def load(self, directory: str) -> bool:
        """Restore from `directory`; returns False when there is no teacher state there."""
        path = os.path.join(directory, TEACHER_STATE_FILE)
        if self.kind != "ema" or not os.path.isfile(path):
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["tensors"])
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
