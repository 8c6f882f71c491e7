"""SDPO under sharding: 2 CPU processes (torchrun, gloo) with FSDP2 or DeepSpeed ZeRO-3 reproduce DDP.

Each run trains 2 steps from the same saved tiny model, seeds and data (`distributed/train_sharded.py`). DDP
replicates every parameter, so it is the oracle: a sharded run must give the same losses and the same
student and EMA-teacher weights. That covers the fused-linear head under sharding (ZeRO-3 gathers the
student's and the separate teacher's head around the kernel; FSDP hands the teacher's head out of its
forward), the EMA on local shards, and the gathered teacher checkpoint (save, scramble, load back); and the
trust-region teacher, whose frozen reference (the initial student) is sharded, gathered and checkpointed alike.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
DRIVER = HERE / "distributed" / "train_sharded.py"
sys.path.insert(0, str(DRIVER.parent))
from train_sharded import save_tiny_model  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo"),
]


def launch(tmp: Path, name: str, *args: str) -> dict:
    """torchrun 2 processes of the driver; returns what rank 0 saved."""
    out = tmp / f"{name}.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)  # the CPU losses run the PyTorch reference; no kernel is interpreted
    # --standalone: a free rendezvous port, so two launches may run at once (pytest -n 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(DRIVER), "--model", str(tmp / "model"), "--out", str(out), *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr + proc.stdout:
        # Seen once in ~30 launches (a C++ thread torn down in a rank's exit, not a wrong number): one rerun.
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sharded")
    save_tiny_model(str(tmp / "model"))
    return tmp


@pytest.fixture(scope="module")
def ddp(workdir) -> dict:
    return launch(workdir, "ddp", "--sharding", "ddp")


@pytest.fixture(scope="module")
def ddp_live_teacher(workdir) -> dict:
    return launch(workdir, "ddp-live", "--sharding", "ddp", "--teacher", "none", "--mode", "distillation_only")


# Tolerances in float32 ulps (eps = 2^-23 = 1.19e-7) of each compared tensor's magnitude: |run − ref| ≤
# ulps · eps · max|ref|, for the 3 losses together and for each weight tensor. A sharded run forms the same float32
# sums as DDP in another order (reduce-scatter vs all-reduce, ZeRO-3's buckets, gathered vs local GEMMs), and a
# reordered sum differs by up to ~n·eps·Σ|x_i|: relative to the terms' magnitude, not to each (possibly near-zero)
# element. A real sharding bug (a shard not updated, a wrong EMA, a gradient reduced twice or not at all) moves
# weights by ~lr = 5e-2 (~3e6 ulps of these 0.15-sized weights), far outside every bound below.
LOSS_ULPS = 256  # the logged losses: forward sums on weights that already differ by the steps before.
# Measured ≤ 20 ulps of max|loss| (8 on another machine, where the former bare atol=1e-6 failed at 1.43e-6).
WEIGHT_ULPS = 4096  # weights after 3 Adam steps: each step is lr · m/√v, a ratio of gradients, so an element whose
# gradient is small against the reordering noise carries the gradients' relative error amplified (the EMA
# teacher mixes those weights). Measured ≤ 573 ulps (FSDP2), ≤ 343 (ZeRO-3).
LOGITS_PATH_ULPS = 4  # × the above: the logits path is not a reordering of the fused one but other formulas
# (materialised logits, a separate loss kernel), so each step differs by more. Measured: losses ≤ 99, weights
# ≤ 3196 ulps.


def assert_same_run(run: dict, ref: dict, scale: int = 1) -> None:
    """`run` reproduces `ref` (the DDP oracle) within the float32 bounds above, `scale` times them."""

    def close(got, want, ulps, what):
        atol = ulps * scale * torch.finfo(torch.float32).eps * want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0.0, atol=atol, msg=lambda m: f"{what} ({ulps * scale} ulps): {m}")

    close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), LOSS_ULPS, "losses")
    assert len(ref["student"]) > 0 and len(run["losses"]) == 3
    for part in ("student", "teacher", "saved_teacher", "restored_teacher"):
        if part not in run:
            continue
        assert sorted(run[part]) == sorted(ref["teacher" if "teacher" in part else part])
        for name, value in ref["teacher" if "teacher" in part else part].items():
            close(run[part][name], value, WEIGHT_ULPS, f"{part} {name}")
            if part != "teacher" and "teacher" in part:  # the checkpoint round trip itself is exact
                assert torch.equal(run[part][name], run["teacher"][name]), f"{part} {name} != the run's teacher"


def test_ddp_reference_learns_and_the_teacher_lags(ddp, workdir):
    """The oracle itself is not trivial: the student moved, and the EMA teacher sits between start and student."""
    from safetensors.torch import load_file

    start = load_file(str(workdir / "model" / "model.safetensors"))
    assert ddp["fused"] and len(ddp["losses"]) == 3 and ddp["teacher_replicas_identical"]
    moved = max((ddp["student"][k] - start[k]).abs().max().item() for k in start)
    lag = max((ddp["teacher"][k] - ddp["student"][k]).abs().max().item() for k in start)
    teacher_moved = max((ddp["teacher"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3 and lag > 1e-4 and teacher_moved > 1e-4


def test_fsdp2_fused_linear_matches_ddp(ddp, workdir):
    run = launch(workdir, "fsdp2", "--sharding", "fsdp2", "--checkpoint-dir", str(workdir / "ckpt-fsdp2"))
    assert run["fused"] and run["wrapper"].startswith("FSDP") and run["teacher_param_types"] == ["DTensor"]
    assert run["teacher_fsdp_groups"] == 3  # the 2 decoder layers and the root, as the student
    assert "saved_teacher" in run
    assert_same_run(run, ddp)


def test_fsdp2_logits_path_matches_ddp_fused(ddp, workdir):
    """Also with `reshard_after_forward=False`: the teacher must still be resharded for its EMA."""
    run = launch(workdir, "fsdp2-logits", "--sharding", "fsdp2", "--fused", "never", "--no-reshard-after-forward")
    assert not run["fused"] and run["teacher_param_types"] == ["DTensor"]
    assert_same_run(run, ddp, scale=LOGITS_PATH_ULPS)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (pip install deepspeed)")
def test_zero3_fused_linear_matches_ddp(ddp, workdir):
    run = launch(workdir, "zero3", "--sharding", "zero3", "--checkpoint-dir", str(workdir / "ckpt-zero3"))
    assert run["fused"] and run["wrapper"] == "DeepSpeedEngine" and run["teacher_param_types"] == ["Parameter/zero3"]
    assert "saved_teacher" in run
    assert_same_run(run, ddp)  # DeepSpeed reduces gradients in its own buckets


@pytest.mark.parametrize("sharding", ["fsdp2", "zero3"])
def test_live_student_teacher_matches_ddp(ddp_live_teacher, workdir, sharding):
    """teacher_regularization='none': the teacher forward is the student's own sharded forward (no grad),
    and the fused call uses the student's head for both sides."""
    if sharding == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs deepspeed (pip install deepspeed)")
    live = ("--teacher", "none", "--mode", "distillation_only")
    run = launch(workdir, f"{sharding}-live", "--sharding", sharding, *live)
    assert run["fused"] and run["teacher"] == {} and ddp_live_teacher["losses"][0] > 0
    assert_same_run(run, ddp_live_teacher)


def test_bf16_stochastic_ema_keeps_ddp_replicas_identical(workdir):
    """Pure bf16 weights: every DDP rank rounds its (replicated) teacher with the same noise, so the replicas
    stay bit-identical, and the teacher still lags the student."""
    run = launch(workdir, "ddp-bf16", "--sharding", "ddp", "--dtype", "bfloat16")
    assert run["teacher_replicas_identical"] and len(run["losses"]) == 3
    lag = max((run["teacher"][k] - run["student"][k]).abs().max().item() for k in run["teacher"])
    assert lag > 1e-3


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (pip install deepspeed)")
@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
def test_zero3_peft_adapter_teacher_matches_ddp(workdir):
    """LoRA: the EMA teacher is a second adapter inside the (partitioned) student engine: its EMA runs on the
    adapter shards, its checkpoint gathers them."""
    ref = launch(workdir, "ddp-peft", "--sharding", "ddp", "--peft")
    run = launch(workdir, "zero3-peft", "--sharding", "zero3", "--peft", "--checkpoint-dir", str(workdir / "ck-peft"))
    assert ref["teacher_replicas_identical"] and len(ref["teacher"]) == 8  # A and B of q, v in 2 layers
    assert_same_run(run, ref)


TRUST_REGION = ("--teacher", "trust_region", "--fused", "auto")  # the logits path: the teacher mixes two models' logits


@pytest.fixture(scope="module")
def ddp_trust_region(workdir) -> dict:
    return launch(workdir, "ddp-trust", "--sharding", "ddp", *TRUST_REGION)


@pytest.mark.parametrize("sharding", ["fsdp2", "zero3"])
def test_trust_region_teacher_matches_ddp(ddp_trust_region, workdir, sharding):
    """teacher_regularization='trust_region': the frozen reference (the initial student) is sharded like the EMA
    teacher and its forward gathered; its logits are mixed with the sharded student's; its checkpoint gathers it,
    and it stays the initial weights (no EMA step moves it)."""
    if sharding == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs deepspeed (pip install deepspeed)")
    from safetensors.torch import load_file

    start = load_file(str(workdir / "model" / "model.safetensors"))
    ref = ddp_trust_region
    assert not ref["fused"] and ref["teacher_replicas_identical"] and len(ref["teacher"]) == len(start)
    assert all(torch.equal(ref["teacher"][k], start[k].float()) for k in start)  # the reference never moves
    assert max((ref["student"][k] - start[k]).abs().max().item() for k in start) > 1e-3
    ckpt = workdir / f"ckpt-{sharding}-trust"
    run = launch(workdir, f"{sharding}-trust", "--sharding", sharding, *TRUST_REGION, "--checkpoint-dir", str(ckpt))
    kind = ["DTensor"] if sharding == "fsdp2" else ["Parameter/zero3"]
    assert not run["fused"] and run["teacher_param_types"] == kind and "saved_teacher" in run
    if sharding == "fsdp2":
        assert run["teacher_fsdp_groups"] == 3
    assert all(torch.equal(run["teacher"][k], start[k].float()) for k in start)  # gathered, still the initial weights
    assert_same_run(run, ref, scale=LOGITS_PATH_ULPS)  # measured: losses <= 3 ulps, weights <= 256 (ZeRO-3)
