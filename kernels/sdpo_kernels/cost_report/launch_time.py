"""Whole-launch time on one GPU: the HBM floor, a static lower bound (HBM, issue, MUFU and ALU pipes)
and a latency-aware estimate (per iteration, one warp's critical path against the issue cycles of
every resident warp), with the real CTAs per SM and the launch's waves (persistent grids included).
Every figure is PREDICTED, not measured."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .hardware import Gpu
from .structure import KernelAnalysis, PathCost
from .timing import Cost


@dataclass
class Timing:
    """Seconds for the whole launch (all rows) on one GPU. PREDICTED, not measured."""

    gpu: str
    hbm_floor: float
    issue: float
    mufu_pipe: float
    alu_pipe: float
    static_bound: float
    limiter: str
    latency_aware: float
    ctas_per_sm: int
    row_cycles: float  # latency-aware SM cycles per row (at the resident CTAs per SM of a full wave)

    @property
    def static_ratio(self) -> float:
        return self.static_bound / self.hbm_floor if self.hbm_floor else float("nan")

    @property
    def latency_ratio(self) -> float:
        return self.latency_aware / self.hbm_floor if self.hbm_floor else float("nan")


def _iteration_cycles(cost: Cost, conc: int, warps: int, stream_bytes: float, gpu: Gpu) -> float:
    """SM cycles for one iteration of `conc` resident CTAs (all take the same path)."""
    w = conc * warps
    hbm_per_clk_sm = gpu.hbm_bytes_per_s / (gpu.sms * gpu.clock_hz)
    return max(
        cost.critical_cycles,
        w * cost.instrs / gpu.schedulers,
        w * cost.mufu * 32 / gpu.mufu_per_clk_sm,
        w * cost.alu_pipe * 32 / gpu.alu_per_clk_sm,
        conc * stream_bytes / hbm_per_clk_sm,
    )


def time_model(ka: KernelAnalysis, gpu: Gpu, only: PathCost | None = None) -> Timing:
    """Whole-launch times at the path mix, or as if every iteration took path `only`."""
    warps = ka.compiled.num_warps
    ctas, _ = ka.occupancy(gpu)
    weighted: list[tuple[Cost, float, float]] = []  # (cost, executions per row, streamed bytes per execution)
    for lc in ka.loops:
        paths = [(only, 1.0)] if only is not None and only in lc.paths else [(p, p.fraction) for p in lc.paths]
        weighted += [(p.cost, lc.trips_per_row * f, ka.block_v * lc.bytes_per_elem) for p, f in paths]
    extra_bytes = float(ka.extras.get("bytes", 0.0))
    weighted.append((ka.outside, 1.0, 0.0))
    all_loops = {lc.label: lc for lc in ka.loops + ka.other_loops}
    for name, count in ka.extras.items():
        if name in all_loops and all_loops[name].encloses_stream:
            # Its own code only: the streaming loop's iterations and the inner loops' trips are counted apart.
            weighted.append((all_loops[name].own, float(count), 0.0))
        elif name in all_loops and all_loops[name].paths:
            heaviest = max(all_loops[name].paths, key=lambda p: p.cost.instrs)
            weighted.append((heaviest.cost, float(count), 0.0))
    instrs = sum(n * c.instrs for c, n, _ in weighted)  # per thread per row
    mufu = sum(n * c.mufu for c, n, _ in weighted)
    alu = sum(n * c.alu_pipe for c, n, _ in weighted)

    def row_cycles(conc: int) -> float:
        """Latency-aware SM cycles per row with `conc` CTAs resident per SM."""
        return sum(n * _iteration_cycles(c, conc, warps, b, gpu) for c, n, b in weighted)

    rows, clk = ka.rows, gpu.clock_hz
    hbm = rows * (ka.vocab * ka.bytes_per_elem + ka.row_bytes + extra_bytes) / gpu.hbm_bytes_per_s
    issue = rows * warps * instrs / (gpu.sms * gpu.schedulers * clk)
    mufu_t = rows * warps * mufu * 32 / (gpu.mufu_per_clk_sm * gpu.sms * clk)
    alu_t = rows * warps * alu * 32 / (gpu.alu_per_clk_sm * gpu.sms * clk)
    terms = {"HBM": hbm, "issue": issue, "MUFU pipe": mufu_t, "ALU pipe": alu_t}
    limiter = max(terms, key=terms.get)
    static = terms[limiter]
    if "row_counter_ptr" in ka.launch.args:
        # Rows handed out by a counter: the resident CTAs (at most the programs) share them evenly;
        # programs beyond what fits start when the rows are gone.
        resident = min(ka.programs, gpu.sms * ctas)
        conc = math.ceil(resident / gpu.sms)
        latency = max(static, math.ceil(rows / resident) * row_cycles(conc) / clk)
    else:
        # Programs run in waves of SMs · CTAs; a partial last wave runs at its own (lower) concurrency.
        full_waves, rest = divmod(ka.programs, gpu.sms * ctas)
        rows_per_program = math.ceil(rows / ka.programs)
        cycles = full_waves * row_cycles(ctas) + (row_cycles(math.ceil(rest / gpu.sms)) if rest else 0.0)
        latency = max(static, rows_per_program * cycles / clk)
    return Timing(
        gpu=gpu.name,
        hbm_floor=hbm,
        issue=issue,
        mufu_pipe=mufu_t,
        alu_pipe=alu_t,
        static_bound=static,
        limiter=limiter,
        latency_aware=latency,
        ctas_per_sm=ctas,
        row_cycles=row_cycles(min(ctas, math.ceil(ka.programs / gpu.sms))),
    )
