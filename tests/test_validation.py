"""Bad input raises ValueError naming the argument."""

from __future__ import annotations

import pytest
import torch

from sdpo_kernels import self_distillation_loss

N, V = 3, 11


def _ok():
    return dict(
        student_logits=torch.randn(N, V),
        teacher_logits=torch.randn(N, V),
        completion_ids=torch.randint(0, V, (N,)),
        old_logps=torch.randn(N),
    )


CASES = [
    ("teacher_logits", dict(teacher_logits=torch.randn(N, V + 1)), {}),
    ("teacher_logits", dict(teacher_logits=torch.randn(N, V).bfloat16()), {}),
    ("student_logits", dict(student_logits=torch.randint(0, 3, (N, V))), {}),
    ("student_logits", dict(student_logits=[[0.0]]), {}),
    ("teacher_logits", dict(teacher_logits=torch.randn(N, V).to(torch.complex64)), {}),
    ("topk", {}, dict(topk=0)),
    ("topk", {}, dict(topk=V + 1)),
    ("topk", {}, dict(topk=2.5)),
    ("topk", {}, dict(topk=None)),
    ("alpha", {}, dict(alpha=-0.1)),
    ("alpha", {}, dict(alpha=1.5)),
    ("alpha", {}, dict(alpha=float("nan"))),
    ("alpha", {}, dict(mode="sampled_token", alpha=0.5)),
    ("completion_ids", dict(completion_ids=None), dict(mode="sampled_token", alpha=1.0)),
    ("completion_ids", dict(completion_ids=None), dict(is_clip=2.0)),
    ("completion_ids", dict(completion_ids=torch.tensor([0, 1, V])), {}),
    ("completion_ids", dict(completion_ids=torch.tensor([0, -1, 2])), {}),
    ("completion_ids", dict(completion_ids=torch.zeros(N)), {}),
    ("completion_ids", dict(completion_ids=torch.zeros(N + 1, dtype=torch.long)), {}),
    ("completion_ids", dict(completion_ids=torch.zeros(N, dtype=torch.bool)), {}),
    ("old_logps", dict(old_logps=torch.zeros(N + 1)), {}),
    ("old_logps", dict(old_logps=torch.zeros(N, dtype=torch.long)), {}),
    ("is_clip", {}, dict(is_clip=0.0)),
    ("is_clip", {}, dict(is_clip=-1.0)),
    ("temperature", {}, dict(temperature=0.0)),
    ("temperature", {}, dict(temperature=-1.0)),
    ("temperature", {}, dict(temperature=float("inf"))),
    ("mode", {}, dict(mode="topk")),
    ("backend", {}, dict(backend="cuda")),
]


@pytest.mark.parametrize("name,tensors,kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_names_the_argument(name, tensors, kwargs):
    args = {**_ok(), **tensors}
    with pytest.raises(ValueError, match=name):
        self_distillation_loss(**args, **{"topk": 5, **kwargs})


def test_triton_backend_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        self_distillation_loss(**_ok(), topk=5, backend="triton")


def test_device_mismatch_is_named():
    meta = torch.randn(N, V, device="meta")
    with pytest.raises(ValueError, match="teacher_logits"):
        self_distillation_loss(torch.randn(N, V), meta, topk=2)
