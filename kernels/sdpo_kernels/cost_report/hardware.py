"""The GPUs the cost report models (SMs, clock, HBM bandwidth, pipes, occupancy limits), the
instruction latencies of the list scheduler, and the resident CTAs per SM of a kernel."""

from __future__ import annotations

import math
from dataclasses import dataclass

PREDICTED = "predicted (static SASS model), not measured"


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_hz: float  # sustained
    hbm_bytes_per_s: float
    schedulers: int = 4  # warp schedulers per SM, 1 warp-instruction per clock each
    mufu_per_clk_sm: int = 16  # MUFU lanes per clock per SM
    alu_per_clk_sm: int = 64  # INT32 / compare / select / logic lanes per clock per SM
    regs_per_sm: int = 65536
    reg_alloc_unit: int = 256  # registers, per warp
    smem_per_sm: int = 228 * 1024
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32


H100 = Gpu("H100 SXM", sms=132, clock_hz=1.755e9, hbm_bytes_per_s=3.35e12)
H200 = Gpu("H200", sms=132, clock_hz=1.755e9, hbm_bytes_per_s=4.8e12)
GPUS = (H100, H200)

# Result latency in cycles of one instruction, by latency class (see `latency_class`). A warp
# issues in order; an instruction waits for its source registers (and guard predicate).
LATENCY = {
    "alu": 4,  # fp32, int, logic, moves, selects
    "conv": 6,  # F2F / I2F / F2I / F2FP
    "mufu": 18,
    "shfl": 30,
    "lds": 30,  # LDS / LDSM / ATOMS; an STS completes (for a barrier) after this too
    "ldg": 600,  # LDG / LD / ATOM / LDL: an HBM round trip
    "ldc": 10,  # constant cache
    "s2r": 20,
    "bar": 20,  # BAR: a full join (every outstanding result lands), then this
}


def ctas_per_sm(regs: int, smem_per_cta: int, num_warps: int, gpu: Gpu = H100) -> tuple[int, str]:
    """Resident CTAs per SM and the limiting resource."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / gpu.reg_alloc_unit) * gpu.reg_alloc_unit
    by_regs = (gpu.regs_per_sm // regs_per_warp) // num_warps
    by_smem = gpu.smem_per_sm // smem_per_cta if smem_per_cta else gpu.max_ctas_per_sm
    by_warps = gpu.max_warps_per_sm // num_warps
    limits = {"registers": by_regs, "shared memory": by_smem, "warps": by_warps, "CTA slots": gpu.max_ctas_per_sm}
    which = min(limits, key=limits.get)
    return limits[which], which
