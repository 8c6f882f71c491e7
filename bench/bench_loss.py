"""Forward+backward time and peak memory of the logits-level SDPO loss.

Implementations (see harness.IMPLS): sdpo_kernels Triton (CUDA only), sdpo_kernels reference,
TRL 1.16 eager, torch.compile of the TRL formula. Cases: bf16 N in {4096, 8192, 16384} x
V in {32000, 151936} on CUDA; fp32 N in {256, 1024} x V = 32000 on CPU, plus N = 2048,
V = 151936 with SDPO_BENCH_LARGE_CPU=1. K = 100, alpha = 0.5, tail bucket, IS clip 2.0, T = 1.

Run: see bench/README.md. Goals are recorded, never asserted.
"""

from __future__ import annotations

import gc
import os
import time

import harness
import pytest
import torch

CASES = harness.GPU_CASES + harness.CPU_CASES
PARAMS = [
    pytest.param(case, impl, id=f"{case.id}-{impl}")
    for case in CASES
    for impl, (_, devices) in harness.IMPLS.items()
    if case.device in devices
]


def _rounds(case: harness.Case, step_s: float) -> int:
    """Timed rounds: as many as fit in a time budget per case (SDPO_BENCH_BUDGET_S, default 10 s on
    CUDA, 30 s on CPU), at least 3 and at most 20 (CUDA) / 5 (CPU); SDPO_BENCH_ROUNDS fixes it."""
    if os.environ.get("SDPO_BENCH_ROUNDS"):
        return int(os.environ["SDPO_BENCH_ROUNDS"])
    budget = float(os.environ.get("SDPO_BENCH_BUDGET_S", 10.0 if case.device == "cuda" else 30.0))
    most = 20 if case.device == "cuda" else 5
    return max(3, min(most, int(budget / max(step_s, 1e-9))))


@pytest.mark.parametrize(("case", "impl"), PARAMS)
def test_loss_fwd_bwd(benchmark, case: harness.Case, impl: str):
    reason = harness.skip_reason(case, impl)
    if reason:
        pytest.skip(reason)
    gc.collect()
    if case.device == "cuda":
        torch.cuda.empty_cache()
    benchmark.group = f"loss fwd+bwd {case.device} {case.dtype}"
    inp = harness.make_inputs(case)
    step = harness.make_step(harness.make_impl(impl), inp, case.device)
    step()  # compile / autotune / first touch, outside both measurements
    t0 = time.perf_counter()
    step()  # warm-up round, also sizes the number of rounds
    rounds = _rounds(case, time.perf_counter() - t0)

    load_before = os.getloadavg()[0]
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    load_after = os.getloadavg()[0]
    # Memory after timing, in one separate step (the CPU method runs the profiler).
    peak = harness.peak_extra_bytes(step, case.device)

    bw, bw_source = harness.peak_bandwidth_gbps(case.device)
    median = benchmark.stats.stats.median
    info = {
        "suite": "loss",
        "impl": impl,
        "impl_label": harness.IMPLS[impl][0],
        "device": case.device,
        "device_name": harness.device_name(case.device),
        "dtype": case.dtype,
        "N": case.n,
        "V": case.v,
        "K": case.k,
        **harness.LOSS_KWARGS,
        "input_bytes": inp.nbytes,
        "peak_mem_bytes": peak,
        "nv_unit_bytes": case.nv_bytes,
        "peak_mem_nv": peak / case.nv_bytes,
        "peak_mem_nv_fp32": peak / (case.n * case.v * 4),
        "floor_bytes": case.floor_bytes,
        "achieved_gbps": case.floor_bytes / median / 1e9,
        "peak_bw_gbps": bw,
        "peak_bw_source": bw_source,
        # 1-minute load average around the timed rounds: other work on the machine shows up here.
        "loadavg_1min": [load_before, load_after],
    }
    if bw:
        floor_time = case.floor_bytes / (bw * 1e9)
        info["floor_time_s"] = floor_time
        info["time_over_floor"] = median / floor_time
    benchmark.extra_info.update(info)
