"""Parameters that may be sharded: DeepSpeed ZeRO-3 partitions, FSDP2 `DTensor`s, or plain tensors.

The EMA teacher and its checkpoint touch every parameter outside any forward, where ZeRO-3 and FSDP hold
only this rank's shard. The EMA is elementwise, so it runs on the local shards (teacher and student are
partitioned alike: same shapes, same world size) and needs no gather; the checkpoint gathers one tensor at a
time so that the saving rank writes full, world-size-independent tensors.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def is_zero3_param(p: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (its data lives in `p.ds_tensor`, `p` itself is empty)."""
    return hasattr(p, "ds_tensor")


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of `p`, as a plain tensor that in-place updates write through to `p`."""
    if is_zero3_param(p):
        return p.ds_tensor
    if isinstance(p, DTensor):
        return p.to_local()
    return p


@torch.no_grad()
def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole of `p` on every rank (a collective when sharded: every rank must call it). A new tensor."""
    if is_zero3_param(p):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.data.detach().clone()
    if isinstance(p, DTensor):
        return p.full_tensor().detach()
    return p.detach().clone()


@torch.no_grad()
def load_full_tensor_(p: torch.Tensor, full: torch.Tensor) -> None:
    """In place: set `p` (sharded or not) to the whole tensor `full`, given identically on every rank."""
    if tuple(full.shape) != tuple(getattr(p, "ds_shape", p.shape)):
        raise ValueError(f"tensor of shape {tuple(full.shape)} cannot load into a parameter of {tuple(p.shape)}.")
    if is_zero3_param(p):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(full.to(device=p.device, dtype=p.dtype))
        return
    if isinstance(p, DTensor):
        shard = distribute_tensor(full.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements)
        p.to_local().copy_(shard.to_local())
        return
    p.copy_(full.to(device=p.device, dtype=p.dtype))


def is_sharded(p: torch.Tensor) -> bool:
    """True when this rank holds only part of `p` (ZeRO-3 or FSDP2), False for a replicated tensor."""
    return is_zero3_param(p) or isinstance(p, DTensor)


def release_stale_gathered_(params: list[torch.Tensor]) -> None:
    """After an in-place update of ZeRO-3 shards (`local_shard`): drop the whole copies some parameters keep
    between forwards (those under `stage3_param_persistence_threshold`, by default every tensor of ≤ 1e5
    elements: norms, biases). They would go on serving the old values; the next forward gathers the new ones.
    """
    stale = [p for p in params if is_zero3_param(p) and p.data.numel() == p.ds_numel and p.ds_numel > 0]
    if stale:
        stale[0].partition(param_list=stale)
