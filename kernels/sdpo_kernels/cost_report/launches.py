"""The launches the report costs: `triton_backend.forward_launches` / `backward_launches` of each loss
variant (`VARIANTS`) on meta tensors of the real shape (no memory), and the row statistics the
backward reads."""

from __future__ import annotations

from dataclasses import dataclass


def _launches(result) -> tuple[list, tuple]:
    """triton_backend's `*_launches` return (launches, *outputs); a bare list is accepted too."""
    if isinstance(result, tuple) and result and isinstance(result[0], list):
        return list(result[0]), result[1:]
    return list(result), ()


def forward_launches(student, teacher, completion_ids, old_logps, config) -> tuple[list, tuple]:
    from .. import triton_backend as tb

    return _launches(tb.forward_launches(student, teacher, completion_ids, old_logps, config))


def backward_launches(student, teacher, stats, grad_loss, config) -> tuple[list, tuple]:
    from .. import triton_backend as tb

    return _launches(tb.backward_launches(student, teacher, stats, grad_loss, config))


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str
    topk: int = 0
    alpha: float = 0.5
    add_tail: bool = False
    is_clip: float | None = 2.0
    temperature: float = 1.0

    def config(self):
        from ..config import LossConfig

        return LossConfig(
            mode=self.mode,
            topk=self.topk,
            alpha=self.alpha,
            add_tail=self.add_tail,
            is_clip=self.is_clip,
            temperature=self.temperature,
        )


HEADLINE = Variant("topk K=100, tail, IS, α=0.5", "topk_logits", topk=100, alpha=0.5, add_tail=True)
VARIANTS = (
    HEADLINE,
    Variant("topk K=100, no tail, IS, α=0.5", "topk_logits", topk=100, alpha=0.5, add_tail=False),
    Variant("topk K=100, tail, IS, α=0 (forward KL)", "topk_logits", topk=100, alpha=0.0, add_tail=True),
    Variant("topk K=100, tail, IS, α=1 (reverse KL)", "topk_logits", topk=100, alpha=1.0, add_tail=True),
    Variant("full_logits, IS, α=0.5", "full_logits", alpha=0.5),
    Variant("sampled_token, IS, α=1", "sampled_token", alpha=1.0),
)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def variant_launches(variant: Variant, rows: int, vocab: int, dtype: str = "bf16") -> tuple[list, list]:
    """(forward launches, backward launches) of one loss configuration on [rows, vocab] meta tensors."""
    import torch

    dt = getattr(torch, DTYPES[dtype])
    meta = dict(device="meta")
    student = torch.empty(rows, vocab, dtype=dt, **meta)
    teacher = torch.empty(rows, vocab, dtype=dt, **meta)
    ids = torch.empty(rows, dtype=torch.int64, **meta)
    old = torch.empty(rows, dtype=torch.float32, **meta) if variant.is_clip is not None else None
    config = variant.config()
    fwd, outputs = forward_launches(student, teacher, ids, old, config)
    stats = row_stats_of(outputs) or row_stats_like(config, (rows,))
    grad_loss = torch.empty(rows, dtype=torch.float32, **meta)
    bwd, _ = backward_launches(student, teacher, stats, grad_loss, config)
    return fwd, bwd


def row_stats_of(outputs: tuple):
    """The RowStats among a forward launcher's outputs, or None."""
    from ..stats import RowStats

    return next((o for o in outputs if isinstance(o, RowStats)), None)


def row_stats_like(config, rows_shape: tuple):
    """Meta row statistics of the shapes a forward pass saves (for a launcher that returns none)."""
    import torch

    from ..stats import RowStats

    f32 = dict(dtype=torch.float32, device="meta")
    sparse = {"topk_logits": config.topk, "sampled_token": 1}.get(config.mode, 0)
    full = config.mode == "full_logits"
    return RowStats(
        lse_student=torch.empty(rows_shape, **f32),
        dense_coef=torch.empty(rows_shape, **f32),
        sparse_index=torch.empty(*rows_shape, sparse, dtype=torch.int64, device="meta") if sparse else None,
        sparse_coef=torch.empty(*rows_shape, sparse, **f32) if sparse else None,
        lse_teacher=torch.empty(rows_shape, **f32) if full else None,
        is_weight=torch.empty(rows_shape, **f32) if full else None,
    )


def launch_stages(launch) -> int | None:
    return getattr(launch, "num_stages", None)
