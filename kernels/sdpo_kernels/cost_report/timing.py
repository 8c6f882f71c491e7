"""Per-path cost: instruction counts by class and pipe, and one warp's in-order dependent critical
path through a piece of code (the latency list scheduler)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .hardware import LATENCY
from .sass import ALU_PIPE_FP, CLASSES, Instr, latency_class


def _alu_pipe(ins: Instr) -> bool:
    """Issued to the INT32/ALU pipe (16 lanes per scheduler on sm_80+): integer, logic, compare and
    select. IMAD runs on the FMA pipe (ptxas emits IMAD.MOV/IMAD.SHL to offload the ALU), uniform
    U* instructions on the uniform datapath."""
    base = ins.base
    int_alu = ins.cls == "int" and not base.startswith("U") and base not in ("R2UR", "IMAD", "IMUL")
    return int_alu or base in ALU_PIPE_FP


def critical_path(instrs: list[Instr], latency: dict = LATENCY) -> int:
    """Cycles one warp needs for `instrs` (one loop iteration), all inputs ready at cycle 0.

    In-order issue, one instruction per cycle at most; an instruction issues when its source
    registers and guard predicate are ready (producer's issue cycle + its class latency); BAR is
    a full join (every outstanding result, including shared stores, lands first)."""
    ready: dict[str, int] = {}
    t = -1  # issue cycle of the previous instruction
    end = 0
    for ins in instrs:
        issue = max([t + 1] + [ready.get(r, 0) for r in ins.srcs])
        lcls = latency_class(ins.base)
        if ins.base == "BAR":
            issue = max(issue, end)
            t = issue + latency["bar"] - 1
            end = max(end, t + 1)
            continue
        lat = latency[lcls]
        for d in ins.dests:
            if d not in ("PT", "UPT"):
                ready[d] = issue + lat
        if ins.dests or ins.base in ("STS", "STSM"):
            end = max(end, issue + lat)
        t = issue
    return max(end, t + 1)


@dataclass
class Cost:
    """Per thread (= per warp: SIMT) instruction counts of a piece of code, and its critical path."""

    instrs: int
    by_class: dict[str, int]
    mufu: int
    alu_pipe: int
    critical_cycles: int
    gmem_bytes: int  # per thread, every global load/store of the path (L2 hits included)

    @staticmethod
    def of(instrs: list[Instr]) -> Cost:
        cls = Counter(ins.cls for ins in instrs)
        return Cost(
            instrs=len(instrs),
            by_class={c: cls.get(c, 0) for c in CLASSES},
            mufu=cls.get("mufu", 0),
            alu_pipe=sum(1 for ins in instrs if _alu_pipe(ins)),
            critical_cycles=critical_path(instrs),
            gmem_bytes=sum(ins.mem_width_bytes for ins in instrs),
        )

    def scaled(self, f: float) -> dict:
        return {
            "instrs": self.instrs * f,
            **{c: v * f for c, v in self.by_class.items()},
            "mufu_pipe": self.mufu * f,
            "alu_pipe": self.alu_pipe * f,
        }
