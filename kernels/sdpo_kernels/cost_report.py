"""Static cost report of the Triton kernels as the launcher launches them, without a GPU.

    python -m sdpo_kernels.cost_report                          # N=8192, V in {32000, 151936}, bf16
    python -m sdpo_kernels.cost_report --vocab 151936 --out bench/results/

Every time it prints is PREDICTED (static SASS model), NOT MEASURED. What it does:

1. Compiles each kernel launch of `triton_backend.forward_launches` / `backward_launches` (meta
   tensors of the real shape: no memory) exactly as Triton's JIT would at that launch: the
   arguments go through Triton's own binder (`create_function_from_signature` + `_pack_args`:
   stride/int == 1 → constexpr, 16-byte divisibility, i32/i64 by value, pointer dtypes) and
   `triton.compile` keeps Triton's default options and its own ptxas flags, so the cubin is the
   launched one (registers included). Target sm_90a by default.
2. Disassembles it (`nvdisasm -c -gi`, bundled in the triton wheel; with source line info),
   builds the control-flow graph (basic blocks, dominators, back edges → natural loops and their
   nesting) and classifies every instruction (fp32, int, mufu, conv, gmem, smem, sync =
   SHFL/BAR/…, ctrl, other). Registers and local memory from `cuobjdump --dump-resource-usage`.
3. Finds the vocabulary loop(s): those whose `for` line names an argument equal to V (n_cols)
   and that load or store an [N, V] tensor (address dataflow from the kernel parameters through
   the SASS; without line info, the innermost loops doing so). Enumerates the acyclic paths of
   each loop body from header to back edge (inner loops collapsed into one node and reported
   separately) and costs each path per thread per iteration and per element; code outside these
   loops counts once per row.
4. Time model for an H100 SXM and an H200 (`GPUS`): HBM floor, a static lower bound (HBM, issue,
   MUFU pipe, INT/ALU pipe) and a latency-aware estimate (one warp's in-order dependent critical
   path per iteration against the issue cycles of all resident warps), with the real CTAs per SM
   and the launch's waves (persistent grids included).
5. Weights the paths with `path_mix` and adds `row_extras` (the section at the bottom of this
   module: update it when a kernel's control flow changes).

Public entry points: `build_report` / `render_markdown` / `main` (the CLI), `analyze(launch, rows,
vocab)` → `KernelAnalysis` and `time_model(analysis, gpu)` for one launch, `compile_launch` (also
used by `compile_check`), and the SASS tools `parse_sass`, `build_cfg`, `loop_paths`,
`critical_path`, `address_params`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field

PREDICTED = "predicted (static SASS model), not measured"

# ----------------------------------------------------------------------------------------------
# Hardware and latency model
# ----------------------------------------------------------------------------------------------


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

# ----------------------------------------------------------------------------------------------
# SASS: parsing and instruction classes
# ----------------------------------------------------------------------------------------------

CLASSES = ("fp32", "int", "mufu", "conv", "gmem", "smem", "sync", "ctrl", "other")

_FP = {
    "FADD",
    "FMUL",
    "FFMA",
    "FMNMX",
    "FSETP",
    "FSEL",
    "FSET",
    "FCHK",
    "FSWZADD",
    "FADD32I",
    "FMUL32I",
    "FFMA32I",
    "HADD2",
    "HMUL2",
    "HFMA2",
    "HMNMX2",
    "HSETP2",
    "HSET2",
    "DADD",
    "DMUL",
    "DFMA",
    "DSETP",
    "DMNMX",
}
_INT = {
    "IADD3",
    "IADD",
    "IADD32I",
    "IMAD",
    "IMUL",
    "IABS",
    "IMNMX",
    "VIMNMX",
    "VIADD",
    "VIADDMNMX",
    "ISETP",
    "ISCADD",
    "LOP3",
    "LOP",
    "LOP32I",
    "SHF",
    "SHL",
    "SHR",
    "SEL",
    "PRMT",
    "LEA",
    "MOV",
    "MOV32I",
    "POPC",
    "FLO",
    "BREV",
    "BMSK",
    "SGXT",
    "IDP",
    "IDP4A",
    "P2R",
    "R2P",
    "PLOP3",
    "PSETP",
    "CS2R",
    "R2UR",
}
_CONV = {"F2F", "F2I", "I2F", "I2FP", "F2IP", "FRND", "F2FP", "I2I", "I2IP"}
_GMEM = {"LDG", "STG", "LD", "ST", "ATOM", "ATOMG", "RED", "REDG", "LDL", "STL", "LDGSTS", "LDGDEPBAR", "CCTL"}
_SMEM = {"LDS", "STS", "LDSM", "STSM", "ATOMS"}
_SYNC = {
    "SHFL",
    "BAR",
    "MEMBAR",
    "WARPSYNC",
    "VOTE",
    "VOTEU",
    "MATCH",
    "REDUX",
    "DEPBAR",
    "ERRBAR",
    "FENCE",
    "SYNCS",
    "ARRIVES",
    "ELECT",
    "CGAERRBAR",
}
_CTRL = {
    "BRA",
    "BRX",
    "JMP",
    "JMX",
    "EXIT",
    "RET",
    "CALL",
    "BSSY",
    "BSYNC",
    "BREAK",
    "BMOV",
    "YIELD",
    "KILL",
    "BPT",
    "NANOSLEEP",
}
# Pipes with less than one warp-instruction per clock per scheduler (static bound terms).
_ALU_PIPE_FP = {"FMNMX", "FSETP", "FSEL", "FSET"}  # compares / selects: INT32-rate (64/clk/SM)
_NO_DEST = {
    "ST",
    "STG",
    "STS",
    "STL",
    "STSM",
    "RED",
    "REDG",
    "BAR",
    "BRA",
    "BRX",
    "JMP",
    "JMX",
    "EXIT",
    "RET",
    "CALL",
    "BSSY",
    "BSYNC",
    "BREAK",
    "WARPSYNC",
    "MEMBAR",
    "NOP",
    "DEPBAR",
    "ERRBAR",
    "YIELD",
    "CCTL",
    "FENCE",
    "BPT",
    "KILL",
    "NANOSLEEP",
    "ARRIVES",
    "LDGDEPBAR",
    "CGAERRBAR",
}
_TWO_PRED_DEST = {
    "ISETP",
    "FSETP",
    "DSETP",
    "HSETP2",
    "PSETP",
    "PLOP3",
    "UISETP",
    "UPLOP3",
    "UPSETP",
    "VOTE",
    "VOTEU",
    "SHFL",
}
_BRANCH = {"BRA", "BRX", "JMP", "JMX"}
_REG = re.compile(r"(?<![A-Za-z0-9_])(UR|R|UP|P)(\d+)(\.64)?(?![0-9])")
_CBANK = re.compile(r"c\[0x0\]\[(0x[0-9a-fA-F]+)\]")
_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):")
_LINEINFO = re.compile(r'"([^"]+)", line (\d+)')


def instr_class(base: str) -> str:
    if base in _FP:
        return "fp32"
    if base == "MUFU":
        return "mufu"
    if base in _CONV:
        return "conv"
    if base in _GMEM:
        return "gmem"
    if base in _SMEM:
        return "smem"
    if base in _SYNC:
        return "sync"
    if base in _CTRL:
        return "ctrl"
    if base in _INT or (base.startswith("U") and base not in ("ULDC",)):
        return "int"
    return "other"


def latency_class(base: str) -> str:
    if base == "MUFU":
        return "mufu"
    if base in _CONV:
        return "conv"
    if base == "SHFL":
        return "shfl"
    if base in ("LDS", "LDSM", "ATOMS", "STS", "STSM"):
        return "lds"
    if base in ("LDG", "LD", "ATOM", "ATOMG", "LDL"):
        return "ldg"
    if base in ("LDC", "ULDC"):
        return "ldc"
    if base in ("S2R", "S2UR", "CS2R"):
        return "s2r"
    if base == "BAR":
        return "bar"
    return "alu"


def _split_operands(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _regs(operand: str, width: int = 1) -> list[str]:
    """Register names an operand reads or writes ('R4.64' → R4, R5; width for vector data)."""
    names = []
    for kind, num, wide in _REG.findall(operand):
        n = int(num)
        w = max(width, 2 if wide else 1)
        names.extend(f"{kind}{n + i}" for i in range(w if kind in ("R", "UR") else 1))
    return names


def _is_pred(operand: str) -> bool:
    return re.fullmatch(r"!?U?P(T|\d+)", operand) is not None


def _vector_width(op: str) -> int:
    mods = op.split(".")[1:]
    if "128" in mods:
        return 4
    if "64" in mods or "WIDE" in mods:
        return 2
    return 1


@dataclass
class Instr:
    addr: int
    op: str  # opcode with modifiers, e.g. "LDG.E.64"
    operands: list[str]
    pred: str | None = None  # guard, e.g. "P0", "!P1"
    target: int | None = None  # branch target address (BRA/JMP), resolved
    text: str = ""
    source: tuple[tuple[str, int], ...] = ()  # (file, line) of the code, innermost first, then inlined-at sites

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    @property
    def cls(self) -> str:
        return instr_class(self.base)

    @property
    def is_branch(self) -> bool:
        return self.base in _BRANCH

    @property
    def unconditional(self) -> bool:
        return self.pred is None or self.pred == "PT"

    @property
    def never(self) -> bool:
        return self.pred == "!PT"

    @functools.cached_property
    def dests(self) -> tuple[str, ...]:
        base = self.base
        if base in _NO_DEST or not self.operands:
            return ()
        ops = self.operands
        width = _vector_width(self.op)
        if base == "CS2R" and ".32" not in self.op:
            width = 2
        if base in _TWO_PRED_DEST:
            first = ops[:2]
        else:
            first = [ops[0]]
            for o in ops[1:3]:
                if not _is_pred(o):
                    break
                first.append(o)
        out = []
        for i, o in enumerate(first):
            w = width if (i == 0 or base == "SHFL") and not _is_pred(o) else 1
            out.extend(_regs(o, w))
        return tuple(out)

    @functools.cached_property
    def srcs(self) -> tuple[str, ...]:
        base = self.base
        n_dest_ops = 0
        if base not in _NO_DEST and self.operands:
            if base in _TWO_PRED_DEST:
                n_dest_ops = 2
            else:
                n_dest_ops = 1
                for o in self.operands[1:3]:
                    if not _is_pred(o):
                        break
                    n_dest_ops += 1
        out = []
        width = _vector_width(self.op)
        store_like = base in ("ST", "STG", "STS", "STL", "RED", "REDG", "ATOM", "ATOMG", "ATOMS", "STSM")
        reg_srcs = [o for o in self.operands[n_dest_ops:]]
        for i, o in enumerate(reg_srcs):
            w = 1
            if store_like and "[" not in o:
                w = width
            elif base == "IMAD" and "WIDE" in self.op and i == len(reg_srcs) - 1:
                w = 2
            out.extend(_regs(o, w))
        if self.pred and self.pred not in ("PT", "!PT"):
            out.extend(_regs(self.pred))
        return tuple(out)

    @property
    def cbank_offsets(self) -> list[int]:
        return [int(x, 16) for o in self.operands for x in _CBANK.findall(o)]

    @property
    def mem_width_bytes(self) -> int:
        """Bytes one thread moves with this global load/store (0 for anything else)."""
        if self.base not in ("LDG", "STG", "LD", "ST", "ATOM", "ATOMG", "RED", "REDG"):
            return 0
        mods = self.op.split(".")[1:]
        for m, b in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
            if m in mods:
                return b
        return 4


def parse_sass(text: str) -> list[Instr]:
    """Instructions of the (single) kernel in `cuobjdump -sass` or `nvdisasm [-gi]` text, in address order.

    With nvdisasm's `-gi` line info (`//## File "f.py", line 12 inlined at "g.py", line 40`), every
    instruction carries its source locations, inlining chain included."""
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    pending_labels: list[str] = []
    source: list[tuple[str, int]] = []
    fresh = True  # the next line-info comment starts a new location group
    for line in text.splitlines():
        if line.lstrip().startswith("//##"):
            if fresh:
                source, fresh = [], False
            for f, n in _LINEINFO.findall(line):
                if (f, int(n)) not in source:
                    source.append((f, int(n)))
            continue
        lab = _LABEL.match(line)
        if lab:
            pending_labels.append(lab.group(1))
            continue
        m = _LINE.match(line)
        if not m:
            continue
        fresh = True
        addr = int(m.group(1), 16)
        body = m.group(2).strip()
        for name in pending_labels:
            labels[name] = addr
        pending_labels = []
        pred = None
        if body.startswith("@"):
            pred, body = body[1:].split(None, 1)
        parts = body.split(None, 1)
        op = parts[0]
        operands = _split_operands(parts[1]) if len(parts) > 1 else []
        instrs.append(
            Instr(addr=addr, op=op, operands=operands, pred=pred, text=m.group(2).strip(), source=tuple(source))
        )
    for ins in instrs:
        if ins.is_branch or ins.base in ("CALL", "BSSY", "BREAK"):
            for o in reversed(ins.operands):
                lm = re.search(r"\(?(\.L_\w+)\)?", o)
                if lm and lm.group(1) in labels:
                    ins.target = labels[lm.group(1)]
                    break
                hm = re.fullmatch(r"`?\(?(0x[0-9a-fA-F]+)\)?", o.strip())
                if hm:
                    ins.target = int(hm.group(1), 16)
                    break
    return instrs


# ----------------------------------------------------------------------------------------------
# Control-flow graph, dominators, natural loops, paths
# ----------------------------------------------------------------------------------------------


@dataclass
class Block:
    id: int
    instrs: list[Instr]
    succs: list[int] = field(default_factory=list)
    preds: list[int] = field(default_factory=list)

    @property
    def start(self) -> int:
        return self.instrs[0].addr


@dataclass
class Loop:
    header: int
    latches: list[int]  # sources of the back edges
    body: set[int]  # block ids, header included
    parent: Loop | None = None
    children: list[Loop] = field(default_factory=list)
    label: str = ""

    @property
    def depth(self) -> int:
        d, p = 0, self.parent
        while p is not None:
            d, p = d + 1, p.parent
        return d


@dataclass
class Cfg:
    blocks: list[Block]  # reachable blocks only, id = index
    loops: list[Loop]  # every natural loop, outermost first
    irreducible: bool = False

    def loop_of(self, block: int) -> Loop | None:
        """Innermost loop containing `block`."""
        best = None
        for lp in self.loops:
            if block in lp.body and (best is None or len(lp.body) < len(best.body)):
                best = lp
        return best

    def own_blocks(self, loop: Loop) -> list[int]:
        """Blocks of `loop` outside its child loops."""
        inner = set().union(*(c.body for c in loop.children)) if loop.children else set()
        return sorted(loop.body - inner)


def build_cfg(instrs: list[Instr]) -> Cfg:
    """Basic blocks reachable from the entry (CALL targets are subroutines: not followed)."""
    if not instrs:
        raise ValueError("no instructions")
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    leaders = {0}
    for i, ins in enumerate(instrs):
        if ins.is_branch and not ins.never:
            if ins.target is not None and ins.target in index:
                leaders.add(index[ins.target])
            leaders.add(i + 1)
        elif ins.base in ("EXIT", "RET", "BREAK", "KILL"):
            leaders.add(i + 1)
    starts = sorted(x for x in leaders if x < len(instrs))
    raw = [instrs[s : (starts[k + 1] if k + 1 < len(starts) else len(instrs))] for k, s in enumerate(starts)]
    start_of = {blk[0].addr: k for k, blk in enumerate(raw)}

    def successors(k: int) -> list[int]:
        last = raw[k][-1]
        nxt = [k + 1] if k + 1 < len(raw) else []
        if last.is_branch and not last.never:
            tgt = [start_of[last.target]] if last.target in start_of else []  # BRX: unknown targets
            return tgt if last.unconditional else tgt + [s for s in nxt if s not in tgt]
        if last.base in ("EXIT", "RET", "KILL") and last.unconditional:
            return []
        return nxt

    # reachable from the entry
    seen, stack = {0}, [0]
    while stack:
        k = stack.pop()
        for s in successors(k):
            if s not in seen:
                seen.add(s)
                stack.append(s)
    order = sorted(seen)
    new_id = {k: i for i, k in enumerate(order)}
    blocks = [Block(id=new_id[k], instrs=raw[k]) for k in order]
    for k in order:
        b = blocks[new_id[k]]
        b.succs = [new_id[s] for s in successors(k)]
        for s in b.succs:
            blocks[s].preds.append(b.id)
    loops, irreducible = _natural_loops(blocks)
    return Cfg(blocks=blocks, loops=loops, irreducible=irreducible)


def _dominators(blocks: list[Block]) -> list[int]:
    """dom[b] as a bitset (bit d set: d dominates b); entry is block 0."""
    n = len(blocks)
    full = (1 << n) - 1
    dom = [full] * n
    dom[0] = 1
    changed = True
    while changed:
        changed = False
        for b in blocks[1:]:
            new = full
            for p in b.preds:
                new &= dom[p]
            new |= 1 << b.id
            if new != dom[b.id]:
                dom[b.id] = new
                changed = True
    return dom


def _natural_loops(blocks: list[Block]) -> tuple[list[Loop], bool]:
    dom = _dominators(blocks)
    by_header: dict[int, Loop] = {}
    retreating = False
    for b in blocks:
        for s in b.succs:
            if dom[b.id] >> s & 1:  # s dominates b: back edge b -> s
                lp = by_header.setdefault(s, Loop(header=s, latches=[], body={s}))
                lp.latches.append(b.id)
                stack = [b.id]
                while stack:
                    x = stack.pop()
                    if x not in lp.body:
                        lp.body.add(x)
                        stack.extend(blocks[x].preds)
            elif s <= b.id:
                retreating = True  # a retreating edge that is no back edge: irreducible (or layout)
    loops = sorted(by_header.values(), key=lambda lp: -len(lp.body))
    for i, lp in enumerate(loops):
        for outer in reversed(loops[:i]):
            if lp.header in outer.body and lp.body <= outer.body:
                lp.parent = outer
                outer.children.append(lp)
                break
    for lp in loops:
        lp.label = f"loop@{blocks[lp.header].start:#06x}"
    # irreducible only if some cycle is not covered by a natural loop
    return loops, retreating and _has_uncovered_cycle(blocks, loops)


def _has_uncovered_cycle(blocks: list[Block], loops: list[Loop]) -> bool:
    back = {(lt, lp.header) for lp in loops for lt in lp.latches}
    color = [0] * len(blocks)

    def dfs(x: int) -> bool:
        color[x] = 1
        for s in blocks[x].succs:
            if (x, s) in back:
                continue
            if color[s] == 1 or (color[s] == 0 and dfs(s)):
                return True
        color[x] = 2
        return False

    sys.setrecursionlimit(max(10000, 4 * len(blocks)))
    return any(color[b.id] == 0 and dfs(b.id) for b in blocks)


@dataclass
class Path:
    """One acyclic path through a loop body, header to back edge."""

    loop: Loop
    nodes: list[object]  # block ids (int) and collapsed child loops (Loop)
    instrs: list[Instr]  # in path order; a child loop contributes its heaviest path once
    label: str = ""

    @property
    def blocks(self) -> list[int]:
        return [n for n in self.nodes if isinstance(n, int)]

    @property
    def children(self) -> list[Loop]:
        return [n for n in self.nodes if isinstance(n, Loop)]

    def ops(self) -> Counter:
        return Counter(ins.base for ins in self.instrs)


@dataclass
class _LoopDag:
    """A loop body as a DAG: own blocks (int ids) and collapsed child loops (("loop", header) keys)."""

    loop: Loop
    succs: dict  # node -> successor nodes inside the loop (back edges and exits removed)
    closes: set  # nodes with a back edge to the header
    instrs: dict  # node -> instructions (a child loop: its heaviest path, once)
    children: dict  # ("loop", header) -> Loop
    order: list  # topological order from the header


def _loop_dag(cfg: Cfg, loop: Loop) -> _LoopDag:
    owner: dict[int, object] = {b: b for b in loop.body}
    children = {}
    for child in loop.children:
        key = ("loop", child.header)
        children[key] = child
        for b in child.body:
            owner[b] = key
    members: dict[object, set] = {}
    for b, node in owner.items():
        members.setdefault(node, set()).add(b)
    succs, closes = {}, set()
    for node, blocks in members.items():
        out = []
        for b in sorted(blocks):
            for s in cfg.blocks[b].succs:
                if s == loop.header and b in loop.latches:
                    closes.add(node)
                elif s in owner and owner[s] != node and owner[s] not in out:
                    out.append(owner[s])
        succs[node] = out
    # topological order by DFS from the header; an edge closing an (irreducible) cycle is cut
    order, state = [], {}

    def visit(root):
        stack = [(root, iter(succs[root]))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                order.append(node)
                stack.pop()
            elif state.get(nxt) == 1:
                succs[node] = [x for x in succs[node] if x != nxt]
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(list(succs[nxt]))))

    visit(loop.header)
    order.reverse()
    instrs = {}
    for node in order:
        if node in children:
            instrs[node] = heaviest_path_instrs(cfg, children[node])
        else:
            instrs[node] = cfg.blocks[node].instrs
    return _LoopDag(loop=loop, succs=succs, closes=closes, instrs=instrs, children=children, order=order)


def heaviest_path_instrs(cfg: Cfg, loop: Loop) -> list[Instr]:
    """Instructions of the loop's path (header to back edge) with the most instructions (DP, no enumeration)."""
    dag = _loop_dag(cfg, loop)
    best: dict = {}  # node -> (instructions to the end, next node or None)
    for node in reversed(dag.order):
        cands = [(len(dag.instrs[node]) + best[s][0], s) for s in dag.succs[node] if s in best]
        if node in dag.closes:
            cands.append((len(dag.instrs[node]), None))
        if cands:
            best[node] = max(cands, key=lambda c: c[0])
    out, node = [], loop.header if loop.header in best else None
    while node is not None:
        out.extend(dag.instrs[node])
        node = best[node][1]
    return out or [i for b in sorted(loop.body) for i in cfg.blocks[b].instrs]


def _count_paths(dag: _LoopDag, succs: dict) -> int:
    count: dict = {}
    for node in reversed(dag.order):
        count[node] = (1 if node in dag.closes else 0) + sum(count.get(s, 0) for s in succs[node])
    return count.get(dag.loop.header, 0)


def _fold_small_branches(dag: _LoopDag, limit: int) -> tuple[dict, int]:
    """Successor lists where the smallest branch regions keep only their heavier arm, so that at most
    `limit` paths remain. Returns (successors, largest folded region in instructions; 0 if none)."""
    end = ("end",)
    succ_e = {n: list(dag.succs[n]) + ([end] if n in dag.closes else []) for n in dag.order}
    succ_e[end] = []
    order = [*dag.order, end]
    # post-dominator sets as bitsets over this order
    bit = {n: 1 << i for i, n in enumerate(order)}
    pdom = {end: bit[end]}
    for n in reversed(dag.order):
        ss = [pdom[x] for x in succ_e[n] if x in pdom]
        if ss:
            pdom[n] = bit[n] | functools.reduce(lambda a, b: a & b, ss)
    weight = {n: len(dag.instrs[n]) for n in dag.order}
    weight[end] = 0
    regions = []  # (size, branch node, kept successor)
    for n in dag.order:
        outs = [x for x in succ_e[n] if x in pdom]
        if len(outs) < 2 or n not in pdom:
            continue
        rest = pdom[n] & ~bit[n]
        ipdom = next((m for m in order if rest & bit[m] and pdom[m] == rest), None)
        if ipdom is None:
            continue
        # heaviest distance from each node to ipdom (exclusive of ipdom)
        dist: dict = {ipdom: 0}
        for x in reversed(order):
            if x is ipdom or x not in pdom:
                continue
            ds = [dist[y] for y in succ_e[x] if y in dist]
            if ds and pdom[x] & bit[ipdom]:
                dist[x] = weight[x] + max(ds)
        arms = {x: dist[x] for x in outs if x in dist}
        if len(arms) >= 2:
            regions.append((max(arms.values()), n, max(arms, key=arms.get)))
    regions.sort(key=lambda r: r[0])
    succs = {n: list(dag.succs[n]) for n in dag.order}
    folded = 0
    for size, n, keep in regions:
        if _count_paths(dag, succs) <= limit:
            break
        succs[n] = [keep] if keep is not end else []
        folded = size
    return succs, folded


def loop_paths(cfg: Cfg, loop: Loop, limit: int = 4096) -> tuple[list[Path], int]:
    """Acyclic paths header → back edge of `loop`, child loops collapsed (each: its heaviest path, once).

    When there are more than `limit` paths (many small if-regions), the smallest single-entry
    single-exit branch regions keep only their heavier arm until at most `limit` remain. Returns
    (paths, size in instructions of the largest region folded so; 0 when none was)."""
    dag = _loop_dag(cfg, loop)
    succs, folded = dag.succs, 0
    if _count_paths(dag, succs) > limit:
        succs, folded = _fold_small_branches(dag, limit)
    result: list[Path] = []
    stack: list[list] = [[loop.header]]
    while stack:
        nodes = stack.pop()
        node = nodes[-1]
        if node in dag.closes:
            ins = [i for n in nodes for i in dag.instrs[n]]
            result.append(Path(loop=loop, nodes=[dag.children.get(n, n) for n in nodes], instrs=ins))
        for s in reversed(succs[node]):
            stack.append([*nodes, s])
        if len(result) > limit:
            break
    return result, folded


# ----------------------------------------------------------------------------------------------
# Compiling a launch exactly as Triton's JIT would
# ----------------------------------------------------------------------------------------------


def nvidia_bin(tool: str) -> pathlib.Path:
    import triton

    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool


def _unwrap(kernel):
    while not hasattr(kernel, "params") and hasattr(kernel, "fn"):
        kernel = kernel.fn  # autotuner / heuristics wrappers
    return kernel


@dataclass
class Compiled:
    name: str
    signature: dict  # param name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # param name -> value
    attrs: dict  # param name -> Triton attributes (e.g. [["tt.divisibility", 16]])
    num_warps: int
    num_stages: int
    sass: str
    regs: int
    local_bytes: int  # per thread: spills (Triton kernels use no local arrays)
    stack_bytes: int
    static_smem: int  # bytes, includes the 1 KiB the driver reserves per CTA on sm_90
    dynamic_smem: int  # bytes, Triton's `shared`
    params: list[tuple[str, int, int]]  # (name, constant-bank offset, size) of the kernel parameters
    triton_version: str = ""

    @property
    def smem_per_cta(self) -> int:
        return self.static_smem + self.dynamic_smem


def _jit_kwargs(fn, num_warps: int, num_stages: int) -> dict:
    """The options JITFunction.run adds before binding (Triton 3.6 and 3.9)."""
    from triton import knobs

    from .triton_backend import FP_FUSION

    kw = dict(num_warps=num_warps, enable_fp_fusion=FP_FUSION)  # as `KernelLaunch.run` passes it
    if num_stages is not None:  # else Triton's default, as for a launch that passes none
        kw["num_stages"] = num_stages
    kw["debug"] = getattr(fn, "debug", None) or knobs.runtime.debug
    comp = knobs.compilation
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(comp, name):
            kw[name] = getattr(comp, name)
    return kw


def specialize(kernel, args: dict, num_warps: int, num_stages: int | None, arch: int = 90):
    """(backend, target, signature, constexprs, attrs, options) that Triton's JIT derives for this launch.

    Runs Triton's own binder (`create_function_from_signature` → `native_specialize_impl`) and
    `JITFunction._pack_args`, so integer/stride specialisation, divisibility and dtypes are Triton's.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _unwrap(kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    missing = [p.name for p in fn.params if p.name not in args]
    if missing:
        raise ValueError(f"{fn.__name__}: launch args lack {missing}")
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = _jit_kwargs(fn, num_warps, num_stages)
    bound, specialization, options = binder(**{p.name: args[p.name] for p in fn.params}, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
    return backend, target, signature, constexprs, attrs, options


_COMPILED: dict[tuple, Compiled] = {}


def compile_launch(kernel, args: dict, num_warps: int, num_stages: int | None = None, arch: int = 90) -> Compiled:
    """Compile (cached by Triton's specialization key) and read back SASS and resource usage."""
    import triton
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    fn = _unwrap(kernel)
    _backend, target, signature, constexprs, attrs, options = specialize(fn, args, num_warps, num_stages, arch)
    key = (
        fn.__module__,
        fn.__name__,
        arch,
        str(sorted(signature.items())),
        str(sorted(constexprs.items(), key=str)),
        str(sorted(attrs.items(), key=str)),
        str(options),
    )
    if key in _COMPILED:
        return _COMPILED[key]
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    cubin = compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = _run([nvidia_bin("nvdisasm"), "-c", "-gi", path])
        usage = _run([nvidia_bin("cuobjdump"), "--dump-resource-usage", path])

    def res(name: str) -> int:
        m = re.search(rf"\b{name}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    names = [p.name for p in fn.params]

    def by_name(d: dict) -> dict:  # Triton keys constexprs/attrs by argument path, e.g. (3,)
        return {(names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k)): v for k, v in d.items()}

    sig = dict(signature)
    out = Compiled(
        name=fn.__name__,
        signature=sig,
        constexprs=by_name(constexprs),
        attrs={k: v for k, v in by_name(attrs).items() if v},
        num_warps=options.num_warps,
        num_stages=options.num_stages,
        sass=sass,
        regs=res("REG"),
        local_bytes=res("LOCAL"),
        stack_bytes=res("STACK"),
        static_smem=res("SHARED"),
        dynamic_smem=int(getattr(compiled.metadata, "shared", 0) or 0),
        params=_ptx_params(compiled.asm["ptx"], sig),
        triton_version=triton.__version__,
    )
    _COMPILED[key] = out
    return out


def _run(cmd: list) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {out.stderr[-2000:]}")
    return out.stdout


_PTX_SIZES = {
    "u64": 8,
    "s64": 8,
    "b64": 8,
    "f64": 8,
    "u32": 4,
    "s32": 4,
    "b32": 4,
    "f32": 4,
    "u16": 2,
    "s16": 2,
    "b16": 2,
    "f16": 2,
    "u8": 1,
    "s8": 1,
    "b8": 1,
    "pred": 1,
}
PARAM_BASE = 0x210  # sm_70+: kernel parameters start at c[0x0][0x210]


def _ptx_params(ptx: str, signature: dict) -> list[tuple[str, int, int]]:
    """(name, constant-bank offset, size) of each PTX kernel parameter: the non-constexpr arguments
    in order, then Triton's own scratch pointers."""
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S)
    types = re.findall(r"\.param\s+\.(\w+)", entry.group(1)) if entry else []
    names = [n for n, t in signature.items() if t != "constexpr"]
    out, off = [], PARAM_BASE
    for i, t in enumerate(types):
        size = _PTX_SIZES.get(t, 8)
        off = (off + size - 1) // size * size
        out.append((names[i] if i < len(names) else f"<triton scratch {i - len(names)}>", off, size))
        off += size
    return out


# ----------------------------------------------------------------------------------------------
# Which kernel parameter each global access addresses (flow-sensitive dataflow over the CFG)
# ----------------------------------------------------------------------------------------------

_LOADS = {"LDG", "LD", "LDS", "LDL", "LDSM", "ATOM", "ATOMG", "ATOMS", "REDUX"}


def address_params(cfg: Cfg, params: list[tuple[str, int, int]]) -> dict[int, frozenset]:
    """addr of each global load/store/atomic → names of the parameters its address derives from."""

    def param_at(off: int) -> str | None:
        for name, start, size in params:
            if start <= off < start + size:
                return name
        return None

    def transfer(block: Block, state: dict, record: dict | None) -> dict:
        state = dict(state)
        for ins in block.instrs:
            if ins.base in ("LDG", "STG", "LD", "ST", "ATOM", "ATOMG", "RED", "REDG") and record is not None:
                tags = set()
                for o in ins.operands:
                    if "[" in o:
                        for r in _regs(o):
                            tags |= state.get(r, frozenset())
                        tags |= {p for off in map(lambda x: int(x, 16), _CBANK.findall(o)) if (p := param_at(off))}
                record[ins.addr] = frozenset(tags)
            if not ins.dests:
                continue
            if ins.base in _LOADS:
                new = frozenset()
            else:
                tags = set()
                for r in ins.srcs:
                    tags |= state.get(r, frozenset())
                tags |= {p for off in ins.cbank_offsets if (p := param_at(off))}
                new = frozenset(tags)
            for d in ins.dests:
                state[d] = new | state.get(d, frozenset()) if ins.pred and ins.pred != "PT" else new
        return state

    def join(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = out.get(k, frozenset()) | v
        return out

    ins_state: dict[int, dict] = {0: {}}
    work = [0]
    while work:
        b = work.pop()
        out = transfer(cfg.blocks[b], ins_state[b], None)
        for s in cfg.blocks[b].succs:
            new = join(ins_state.get(s, {}), out)
            if s not in ins_state or new != ins_state[s]:
                ins_state[s] = new
                if s not in work:
                    work.append(s)
    record: dict[int, frozenset] = {}
    for b in cfg.blocks:
        transfer(b, ins_state.get(b.id, {}), record)
    return record


# ----------------------------------------------------------------------------------------------
# Per-path cost: counts by class, pipes, one warp's critical path
# ----------------------------------------------------------------------------------------------


def _alu_pipe(ins: Instr) -> bool:
    """Issued to the INT32/ALU pipe (16 lanes per scheduler on sm_80+): integer, logic, compare and
    select. IMAD runs on the FMA pipe (ptxas emits IMAD.MOV/IMAD.SHL to offload the ALU), uniform
    U* instructions on the uniform datapath."""
    base = ins.base
    int_alu = ins.cls == "int" and not base.startswith("U") and base not in ("R2UR", "IMAD", "IMUL")
    return int_alu or base in _ALU_PIPE_FP


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


# ----------------------------------------------------------------------------------------------
# Occupancy
# ----------------------------------------------------------------------------------------------


def ctas_per_sm(regs: int, smem_per_cta: int, num_warps: int, gpu: Gpu = H100) -> tuple[int, str]:
    """Resident CTAs per SM and the limiting resource."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / gpu.reg_alloc_unit) * gpu.reg_alloc_unit
    by_regs = (gpu.regs_per_sm // regs_per_warp) // num_warps
    by_smem = gpu.smem_per_sm // smem_per_cta if smem_per_cta else gpu.max_ctas_per_sm
    by_warps = gpu.max_warps_per_sm // num_warps
    limits = {"registers": by_regs, "shared memory": by_smem, "warps": by_warps, "CTA slots": gpu.max_ctas_per_sm}
    which = min(limits, key=limits.get)
    return limits[which], which


# ----------------------------------------------------------------------------------------------
# Analysis of one launch
# ----------------------------------------------------------------------------------------------


@functools.cache
def _resolve_source(file: str) -> str:
    """The loaded module's file for a line-info path. Triton's cache is keyed by source text, so a
    cubin may carry the path of another checkout with the same source (whose file may have changed
    since): a loaded module with the same package/file name wins."""
    path = pathlib.Path(file)
    loaded = [pathlib.Path(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
    if any(q == path for q in loaded):
        return file
    same = [q for q in loaded if q.parts[-2:] == path.parts[-2:]]
    return str(same[0]) if same else file


@functools.cache
def source_line(file: str, line: int) -> str:
    import linecache

    return linecache.getline(_resolve_source(file), line).strip()


@functools.cache
def _line_matches(pattern: str, file: str, line: int) -> bool:
    return re.search(pattern, source_line(file, line)) is not None


def _runs(source, pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.search(source_line(f, n)) for f, n in source)


@dataclass
class PathCost:
    label: str
    cost: Cost
    blocks: list[int]  # start addresses of the path's blocks
    children: list[str]  # collapsed inner loops on the path
    features: dict  # structural features used to label the path
    source: Counter = field(default_factory=Counter)  # (file, line) -> instructions (inlining sites included)
    fraction: float = 0.0  # of the loop's iterations (set by the path mix)
    siblings: list = field(default_factory=list, repr=False)  # every path of the loop, this one included

    def count(self, pattern: str) -> int:
        """Instructions on the path from source lines matching `pattern` (a regex)."""
        cache = self.__dict__.setdefault("_counts", {})
        if pattern not in cache:
            cache[pattern] = sum(n for (f, line), n in self.source.items() if _line_matches(pattern, f, line))
        return cache[pattern]

    def runs(self, pattern: str) -> bool:
        """Whether the path executes code of a source line matching `pattern` (e.g. r"tighten\\(") beyond
        what every path of its loop executes (compilers move a few instructions of a line into shared
        blocks, so presence alone does not tell a branch)."""
        floor = self.__dict__.setdefault("_floors", {})  # shared with the siblings below
        if pattern not in floor:
            least = min((p.count(pattern) for p in self.siblings), default=0)
            for p in self.siblings:
                p.__dict__.setdefault("_floors", {})[pattern] = least
        return self.count(pattern) > floor[pattern]


@dataclass
class LoopCost:
    label: str
    header: int  # address
    depth: int
    streaming: bool
    paths: list[PathCost]
    truncated: bool  # more paths than the limit: small if-regions folded to their heavier arm
    trips_per_row: float  # iterations per row (streaming loops: ceil(V / BLOCK_V))
    bytes_per_elem: float = 0.0  # HBM bytes per [N, V] element this loop streams
    source: tuple = ()  # (file, line) of the back-edge branch (the `for` / `while`), inlining sites included
    parent: str = ""  # label of the enclosing loop
    body_source: frozenset = frozenset()  # (file, line) of the instructions of the loop outside its inner loops
    own: Cost | None = None  # the loop's own blocks (inner loops excluded), each once
    encloses_stream: bool = False  # a streaming loop is nested in it
    over_vocab: bool = False  # its `for` / `while` line names the vocabulary size (streaming or restarting the stream)

    @property
    def where(self) -> str:
        if not self.source:
            return ""
        f, n = self.source[0]
        return f"{pathlib.Path(f).name}:{n} `{source_line(f, n)}`"

    def runs(self, pattern: str) -> bool:
        """Whether the loop's own code (inner loops excluded) comes from a source line matching `pattern`."""
        return _runs(self.body_source, pattern)

    def loops_over(self, pattern: str) -> bool:
        """Whether the loop's `for` / `while` line (its back-edge branch) matches `pattern`."""
        return bool(self.source) and re.search(pattern, source_line(*self.source[0])) is not None


@dataclass
class KernelAnalysis:
    name: str
    launch: object
    compiled: Compiled
    cfg: Cfg
    loops: list[LoopCost]  # streaming loops
    other_loops: list[LoopCost]  # every other loop (inner ones appear collapsed in the paths too)
    outside: Cost  # code outside the streaming loops, executed once per row
    block_v: int
    elems_per_thread: float
    bytes_per_elem: float  # HBM bytes per [N, V] element, all streaming loops together
    streams: list[str]  # e.g. "read student_ptr (bf16)"
    row_bytes: float  # other HBM bytes per row (row statistics, scratch), upper bound
    programs: int
    rows: int
    vocab: int
    warnings: list[str] = field(default_factory=list)
    extras: dict = field(default_factory=dict)  # per-row extras from `row_extras`

    @property
    def regs(self) -> int:
        return self.compiled.regs

    def occupancy(self, gpu: Gpu) -> tuple[int, str]:
        return ctas_per_sm(self.compiled.regs, self.compiled.smem_per_cta, self.compiled.num_warps, gpu)


def _tensor_args(args: dict):
    import torch

    return {name: v for name, v in args.items() if isinstance(v, torch.Tensor)}


def _block_size(constexprs: dict) -> int:
    if "BLOCK_V" in constexprs:
        return int(constexprs["BLOCK_V"])
    blocks = {k: v for k, v in constexprs.items() if "BLOCK" in k.upper() and isinstance(v, int)}
    if not blocks:
        raise ValueError(f"no BLOCK constexpr among {sorted(constexprs)}")
    return int(max(blocks.values()))


def analyze(launch, rows: int, vocab: int, arch: int = 90, path_limit: int = 256) -> KernelAnalysis:
    """Compile one KernelLaunch and cost its streaming loops, paths and the rest."""
    fn = _unwrap(launch.kernel)
    comp = compile_launch(fn, launch.args, launch.num_warps, _launch_stages(launch), arch)
    instrs = parse_sass(comp.sass)
    cfg = build_cfg(instrs)
    warnings = []
    if cfg.irreducible:
        warnings.append("irreducible control flow: some cycles are not natural loops (cut in path enumeration)")
    spills = sum(1 for i in instrs if i.base in ("LDL", "STL"))
    if comp.local_bytes:
        warnings.append(f"register spills: {comp.local_bytes} B local memory per thread, {spills} LDL/STL")
    elif spills:
        warnings.append(f"{spills} LDL/STL with no local memory ({comp.stack_bytes} B stack: call frames)")
    if any(i.base == "CALL" for b in cfg.blocks for i in b.instrs):
        warnings.append("CALL to a subroutine (slow path, e.g. division): its body is not costed")

    tensors = _tensor_args(launch.args)
    stream_params = {
        n for n, t in tensors.items() if t.numel() == rows * vocab and t.dim() >= 1 and t.shape[-1] == vocab
    }
    access = address_params(cfg, comp.params)

    # The tag analysis joins over the CFG, so a register reused for another base pointer carries both
    # tags: a store that also derives from a non-[N, V] pointer (e.g. the top-K scratch) is not a stream.
    other_pointers = {n for n in tensors if n not in stream_params}

    def stream_accesses(block_ids) -> list[tuple[Instr, set]]:
        out = []
        for b in block_ids:
            for ins in cfg.blocks[b].instrs:
                tags = access.get(ins.addr, frozenset())
                hit = tags & stream_params
                if hit and not (ins.base in ("STG", "ST", "RED", "REDG") and tags & other_pointers):
                    out.append((ins, set(hit)))
        return out

    # The vocabulary loops: those whose `for`/`while` line (line info of the back-edge branch) names
    # an argument equal to V (e.g. n_cols) and that load or store an [N, V] tensor. Without line
    # info: the innermost loops whose own blocks load or store one.
    vocab_names = [n for n, v in launch.args.items() if type(v) is int and v == vocab]
    vocab_rx = re.compile(r"\b(" + "|".join(map(re.escape, vocab_names)) + r")\b") if vocab_names else None

    def names_vocab(lp: Loop) -> bool:
        src = cfg.blocks[lp.latches[0]].instrs[-1].source
        return bool(vocab_rx and src and vocab_rx.search(source_line(*src[0])))

    streaming = [lp for lp in cfg.loops if names_vocab(lp) and stream_accesses(sorted(lp.body))]
    # Nested vocabulary loops (an outer one that restarts the stream): the innermost ones stream.
    streaming = [lp for lp in streaming if not any(o is not lp and o.body < lp.body for o in streaming)]
    if not streaming:
        streaming = [lp for lp in cfg.loops if stream_accesses(cfg.own_blocks(lp))]
        streaming = [lp for lp in streaming if not any(o is not lp and o.body < lp.body for o in streaming)]
    if not streaming:
        warnings.append("no loop streams an [N, V] tensor")

    block_v = _block_size(comp.constexprs)
    elems = block_v / (32 * comp.num_warps)
    n_iter = math.ceil(vocab / block_v)

    # HBM bytes per element: each streamed tensor read (LDG) / written (STG) per streaming loop
    streams, bytes_per_elem, loop_bytes = [], 0.0, {}
    for lp in streaming:
        reads, writes, before = {}, {}, bytes_per_elem
        for ins, hit in stream_accesses(sorted(lp.body)):
            for name in hit:
                t = tensors[name]
                bucket = writes if ins.base in ("STG", "ST", "RED", "REDG") else reads
                bucket[id(t)] = (name, t)
        for kind, bucket in (("read", reads), ("write", writes)):
            for name, t in bucket.values():
                bytes_per_elem += t.element_size()
                streams.append(f"{kind} {name} ({str(t.dtype).replace('torch.', '')}) in {lp.label}")
        loop_bytes[id(lp)] = bytes_per_elem - before
    seen, row_bytes = set(), 0.0
    touched = set().union(*access.values()) if access else set()
    for name, t in tensors.items():
        if name in stream_params or name not in touched or id(t) in seen:
            continue
        seen.add(id(t))
        row_bytes += t.numel() * t.element_size() / rows

    stream_ids = set().union(*(lp.body for lp in streaming)) if streaming else set()

    def loop_cost(lp: Loop, is_stream: bool) -> LoopCost:
        paths, folded = loop_paths(cfg, lp, path_limit)
        truncated = bool(folded)
        if folded:
            warnings.append(
                f"{lp.label}: over {path_limit} paths; branch regions of up to {folded} instructions "
                "folded to their heavier arm"
            )
        pcs = []
        for p in paths:
            ops = p.ops()
            gstores = [i for i in p.instrs if i.base in ("STG", "ST", "RED", "REDG", "ATOM", "ATOMG")]
            features = {
                "instrs": len(p.instrs),
                "global_stores": len(gstores),
                "stream_stores": sum(1 for i in gstores if access.get(i.addr, frozenset()) & stream_params),
                "global_loads": ops.get("LDG", 0) + ops.get("LD", 0),
                "shared_stores": ops.get("STS", 0),
                "shared_loads": ops.get("LDS", 0),
                "barriers": ops.get("BAR", 0),
                "shuffles": ops.get("SHFL", 0),
                "mufu": ops.get("MUFU", 0),
                "inner_loops": len(p.children),
            }
            pcs.append(
                PathCost(
                    label="",
                    cost=Cost.of(p.instrs),
                    blocks=[cfg.blocks[b].start for b in p.blocks],
                    children=[c.label for c in p.children],
                    features=features,
                    source=Counter(loc for i in p.instrs for loc in i.source),
                )
            )
        for pc in pcs:
            pc.siblings = pcs
        return LoopCost(
            label=lp.label,
            header=cfg.blocks[lp.header].start,
            depth=lp.depth,
            streaming=is_stream,
            paths=pcs,
            truncated=truncated,
            trips_per_row=n_iter if is_stream else 1.0,
            bytes_per_elem=loop_bytes.get(id(lp), 0.0),
            source=cfg.blocks[lp.latches[0]].instrs[-1].source,
            parent=lp.parent.label if lp.parent else "",
            body_source=frozenset(loc for b in cfg.own_blocks(lp) for i in cfg.blocks[b].instrs for loc in i.source),
            own=Cost.of([i for b in cfg.own_blocks(lp) for i in cfg.blocks[b].instrs]),
            encloses_stream=not is_stream and any(s.body < lp.body for s in streaming),
            over_vocab=names_vocab(lp),
        )

    loops = [loop_cost(lp, True) for lp in streaming]
    others = [loop_cost(lp, False) for lp in cfg.loops if lp not in streaming]
    _relabel_loops(fn.__name__, launch, loops, others)
    outside = Cost.of([i for b in cfg.blocks if b.id not in stream_ids for i in b.instrs])
    programs = math.prod(launch.grid) if launch.grid else 1
    ka = KernelAnalysis(
        name=fn.__name__,
        launch=launch,
        compiled=comp,
        cfg=cfg,
        loops=loops,
        other_loops=others,
        outside=outside,
        block_v=block_v,
        elems_per_thread=elems,
        bytes_per_elem=bytes_per_elem,
        streams=streams,
        row_bytes=row_bytes,
        programs=programs,
        rows=rows,
        vocab=vocab,
        warnings=warnings,
    )
    ctas, limit = ka.occupancy(H100)
    rest = programs % (H100.sms * ctas)
    if programs < rows and rest and "row_counter_ptr" not in launch.args:  # static rows: a partial wave
        ka.warnings.append(
            f"persistent grid of {programs} programs, {ctas} CTAs/SM fit ({limit}): "
            f"a partial wave of {rest} programs follows {programs // (H100.sms * ctas)} full one(s)"
        )
    assign_mix(ka)
    return ka


def _relabel_loops(name: str, launch, loops: list[LoopCost], others: list[LoopCost]) -> None:
    """Give loops the names `label_loop` chooses (unique), and update every reference to them."""
    every = loops + others
    parents = {lc.label: lc.parent for lc in every}
    over_vocab = {lc.label for lc in every if lc.streaming or lc.over_vocab}

    def inside_stream(label: str) -> bool:
        """Inside a vocabulary loop (the stream, or a loop that restarts it)."""
        while label:
            if label in over_vocab:
                return True
            label = parents.get(label, "")
        return False

    rename, used = {}, set()
    for lc in every:
        new = label_loop(name, launch, lc, inside_stream(lc.parent)) or lc.label
        base, k = new, 2
        while new in used:
            new, k = f"{base} #{k}", k + 1
        used.add(new)
        rename[lc.label] = new
    for lc in every:
        lc.label = rename[lc.label]
        lc.parent = rename.get(lc.parent, lc.parent)
        for p in lc.paths:
            p.children = [rename.get(c, c) for c in p.children]


def assign_mix(ka: KernelAnalysis) -> None:
    """Label every path (`label_paths`) and give it its share of the loop's iterations (`path_mix`)."""
    mix = path_mix(ka.name, ka.launch, ka) or {}
    ka.extras = row_extras(ka.name, ka.launch, ka) or {}
    for lc in ka.loops:
        labels = label_paths(ka.name, ka.launch, lc, ka)
        for p, lab in zip(lc.paths, labels):
            p.label = lab
        names = [p.label for p in lc.paths]
        distinct = sorted({n for n in names if n})
        known = {n: mix[n] for n in distinct if n in mix}
        if len(distinct) == 1:
            known = {distinct[0]: 1.0}
        elif not known:
            ka.warnings.append(f"{lc.label}: no path mix for labels {distinct}; equal split")
            known = {n: 1.0 for n in distinct}
        total = sum(known.values())
        if mix and total > 1.0:
            # Shares per vocabulary block summing over 1: some blocks are streamed again (e.g. after
            # the selection that their overflow triggered), so the loop runs more than V / BLOCK_V times.
            lc.trips_per_row *= total
        for n, f in known.items():
            # SASS paths sharing a label (small diamonds, inner loops entered or not): the heaviest one
            # takes the label's share (conservative); the others are listed with fraction 0.
            heaviest = max((p for p in lc.paths if p.label == n), key=lambda p: p.cost.instrs)
            heaviest.fraction = f / total if total else 0.0
        for p in lc.paths:
            if not p.label:
                p.label = "(not in mix)"
    labels = {p.label for lc in ka.loops for p in lc.paths}
    # A share or a trip count with nowhere to go would silently lower the figures: stop instead.
    lost = sorted(n for n, f in mix.items() if f > 0 and n not in labels)
    if lost:
        raise RuntimeError(f"{ka.name}: path mix labels without a SASS path: {lost} (update PATH LABELS)")
    names = {lc.label for lc in ka.loops + ka.other_loops}
    lost = sorted(n for n, f in ka.extras.items() if n != "bytes" and f > 0 and n not in names)
    if lost:
        raise RuntimeError(f"{ka.name}: row extras for loops not found: {lost} (update PATH LABELS)")


# ----------------------------------------------------------------------------------------------
# Time model
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The launches: triton_backend.forward_launches / backward_launches on meta tensors
# ----------------------------------------------------------------------------------------------


def _launches(result) -> tuple[list, tuple]:
    """triton_backend's `*_launches` return (launches, *outputs); a bare list is accepted too."""
    if isinstance(result, tuple) and result and isinstance(result[0], list):
        return list(result[0]), result[1:]
    return list(result), ()


def forward_launches(student, teacher, completion_ids, old_logps, config) -> tuple[list, tuple]:
    from . import triton_backend as tb

    return _launches(tb.forward_launches(student, teacher, completion_ids, old_logps, config))


def backward_launches(student, teacher, stats, grad_loss, config) -> tuple[list, tuple]:
    from . import triton_backend as tb

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
        from .config import LossConfig

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
    from .stats import RowStats

    return next((o for o in outputs if isinstance(o, RowStats)), None)


def row_stats_like(config, rows_shape: tuple):
    """Meta row statistics of the shapes a forward pass saves (for a launcher that returns none)."""
    import torch

    from .stats import RowStats

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


def _launch_stages(launch) -> int | None:
    return getattr(launch, "num_stages", None)


# ----------------------------------------------------------------------------------------------
# Report: JSON and markdown
# ----------------------------------------------------------------------------------------------

CLASS_ABBR = {
    "fp32": "fp32",
    "int": "int",
    "mufu": "mufu",
    "conv": "cvt",
    "gmem": "gmem",
    "smem": "smem",
    "sync": "shfl/bar",
    "ctrl": "ctrl",
    "other": "other",
}


def _timing_dict(t: Timing) -> dict:
    d = dataclasses.asdict(t)
    d["static_ratio"] = t.static_ratio
    d["latency_ratio"] = t.latency_ratio
    return d


def kernel_report(ka: KernelAnalysis, direction: str) -> dict:
    comp = ka.compiled
    per_elem = 1.0 / ka.elems_per_thread
    loops = []
    for lc in ka.loops:
        paths = []
        for p in lc.paths:
            if p.fraction <= 0 and len(lc.paths) > 8:  # compact entry for the many paths outside the mix
                paths.append(
                    {
                        "label": p.label,
                        "fraction": 0.0,
                        "instrs_per_iter": p.cost.instrs,
                        "critical_cycles_per_iter": p.cost.critical_cycles,
                        "inner_loops": p.children,
                    }
                )
                continue
            paths.append(
                {
                    "label": p.label,
                    "sass_paths_with_label": sum(1 for q in lc.paths if q.label == p.label),
                    "fraction": p.fraction,
                    "instrs_per_iter": p.cost.instrs,
                    "per_elem": p.cost.scaled(per_elem),
                    "critical_cycles_per_iter": p.cost.critical_cycles,
                    "gmem_bytes_per_thread_iter": p.cost.gmem_bytes,
                    "blocks": [f"{b:#06x}" for b in p.blocks],
                    "inner_loops": p.children,
                    "features": p.features,
                    "if_every_iteration": {g.name: _timing_dict(time_model(ka, g, only=p)) for g in GPUS},
                }
            )
        loops.append(
            {
                "where": lc.where,
                "label": lc.label,
                "depth": lc.depth,
                "iterations_per_row": lc.trips_per_row,
                "bytes_per_elem": lc.bytes_per_elem,
                "truncated": lc.truncated,
                "paths": paths,
            }
        )
    others = []
    for lc in ka.other_loops:
        heaviest = max(lc.paths, key=lambda p: p.cost.instrs) if lc.paths else None
        if lc.encloses_stream:  # costed by its own code: the stream and the inner loops count apart
            heaviest = PathCost(label="own code", cost=lc.own, blocks=[], children=[], features={})
        others.append(
            {
                "label": lc.label,
                "inside": lc.parent,
                "where": lc.where,
                "header": f"{lc.header:#06x}",
                "paths": len(lc.paths),
                "instrs_per_iter": heaviest.cost.instrs if heaviest else 0,
                "critical_cycles_per_iter": heaviest.cost.critical_cycles if heaviest else 0,
                "by_class_per_iter": heaviest.cost.by_class if heaviest else {},
                "extra_iterations_per_row": ka.extras.get(lc.label, 0.0),
            }
        )
    return {
        "kernel": ka.name,
        "direction": direction,
        "grid": list(ka.launch.grid),
        "num_warps": comp.num_warps,
        "num_stages": comp.num_stages,
        "constexprs": {
            k: (v if isinstance(v, (int, float, bool, str)) or v is None else str(v))
            for k, v in comp.constexprs.items()
        },
        "signature": comp.signature,
        "registers": comp.regs,
        "local_bytes": comp.local_bytes,
        "smem_per_cta": comp.smem_per_cta,
        "ctas_per_sm": {g.name: ka.occupancy(g)[0] for g in GPUS},
        "occupancy_limit": ka.occupancy(H100)[1],
        "block_v": ka.block_v,
        "elems_per_thread_iter": ka.elems_per_thread,
        "hbm_bytes_per_elem": ka.bytes_per_elem,
        "row_bytes": ka.row_bytes,
        "streams": ka.streams,
        "loops": loops,
        "other_loops": others,
        "outside_loops_per_row": {
            "instrs": ka.outside.instrs,
            "by_class": ka.outside.by_class,
            "critical_cycles": ka.outside.critical_cycles,
            "per_elem": ka.outside.scaled(1.0 / ka.vocab),
        },
        "row_extras": ka.extras,
        "at_mix": {g.name: _timing_dict(time_model(ka, g)) for g in GPUS},
        "warnings": ka.warnings,
    }


def build_report(
    rows: int = 8192, vocabs=(32000, 151936), dtype: str = "bf16", arch: int = 90, variants=VARIANTS, log=None
) -> dict:
    import triton

    shapes = []
    for vocab in vocabs:
        entries = []
        for v in variants:
            fwd, bwd = variant_launches(v, rows, vocab, dtype)
            kernels = []
            for direction, launches in (("forward", fwd), ("backward", bwd)):
                for launch in launches:
                    if log:
                        log(f"V={vocab} {v.name}: {direction} {_unwrap(launch.kernel).__name__}")
                    kernels.append(kernel_report(analyze(launch, rows, vocab, arch), direction))
            total = {}
            for g in GPUS:
                total[g.name] = {
                    k: sum(kr["at_mix"][g.name][k] for kr in kernels)
                    for k in ("hbm_floor", "static_bound", "latency_aware")
                }
                for k in ("static", "latency"):
                    name = "static_bound" if k == "static" else "latency_aware"
                    total[g.name][f"{k}_ratio"] = total[g.name][name] / total[g.name]["hbm_floor"]
            entries.append({"variant": dataclasses.asdict(v), "name": v.name, "kernels": kernels, "total": total})
        shapes.append({"rows": rows, "vocab": vocab, "dtype": dtype, "variants": entries})
    return {
        "title": "Static cost report of the SDPO Triton kernels",
        "note": f"All times are {PREDICTED}.",
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__,
        "arch": f"sm_{arch}a" if arch >= 90 else f"sm_{arch}",
        "gpus": [dataclasses.asdict(g) for g in GPUS],
        "latency_cycles": dict(LATENCY),
        "shapes": shapes,
    }


def _ms(x: float) -> str:
    return f"{x * 1e3:.3g}"


def _pair(d: dict, key: str, fmt=_ms) -> str:
    return " / ".join(fmt(d[g.name][key]) for g in GPUS)


def _ratio(x: float) -> str:
    return f"{x:.1f}×"


def _classes(per_elem: dict) -> str:
    return " · ".join(f"{CLASS_ABBR[c]} {per_elem[c]:.3g}" for c in CLASSES if per_elem.get(c, 0) >= 0.005)


def _limiter(t: dict) -> str:
    names = [t[g.name]["limiter"] for g in GPUS]
    return names[0] if len(set(names)) == 1 else " / ".join(names)


def render_markdown(report: dict) -> str:
    gpus = " / ".join(g["name"] for g in report["gpus"])
    bandwidths = ", ".join(f"{g['name']} {g['hbm_bytes_per_s'] / 1e12:g} TB/s" for g in report["gpus"])
    lat = ", ".join(f"{k} {v}" for k, v in report["latency_cycles"].items())
    out = [
        f"# {report['title']} ({report['date']})",
        "",
        f"**All times are {PREDICTED}.** Triton {report['triton']}, {report['arch']} SASS of each kernel as the "
        f"launcher launches it. Time pairs are {gpus} in ms; ratios are to the HBM floor.",
        "",
        f"- HBM floor: bytes of the [N, V] tensors each kernel streams (+ row statistics) / bandwidth ({bandwidths}).",
        "- static bound: max(HBM floor, warp-instructions / (SMs · 4 schedulers · clock), MUFU pipe "
        "(16 lanes/clk/SM), INT/ALU pipe (integer, logic, compare, select but not IMAD: 64 lanes/clk/SM)); "
        "132 SMs at 1.755 GHz; the binding term in brackets.",
        "- latency-aware: per loop iteration max(one warp's in-order dependent critical path, issue/pipe cycles "
        "of all resident warps, HBM share), at the real CTAs per SM, in waves of SMs · CTAs programs (a partial last "
        "wave at its own concurrency); "
        f"latencies (cycles): {lat}.",
        "- path rows: per thread per vocabulary element, and the times if every iteration took that path; "
        "**mix** rows weight the paths by `path_mix` (iid logits for the top-K filter) and add the code outside "
        "the streaming loop ('outside loops': once per row) and the inner loops' extra iterations.",
        "",
    ]
    for shape in report["shapes"]:
        n, v = shape["rows"], shape["vocab"]
        out += [f"## N = {n}, V = {v}, {shape['dtype']}", ""]
        out.append(
            "| mode | kernel | path | mix | regs | CTAs/SM | instr/elem | by class (per elem) | B/elem "
            "| crit. path cyc/iter | floor ms | static bound ms | ratio | latency-aware ms | ratio |"
        )
        out.append("|" + "---|" * 15)
        inner = []
        for entry in shape["variants"]:
            for kr in entry["kernels"]:
                kname = f"{kr['direction']} `{kr['kernel']}`"
                ctas = str(kr["ctas_per_sm"][report["gpus"][0]["name"]])
                regs = f"{kr['registers']}" + (f" ({kr['local_bytes']} B spill)" if kr["local_bytes"] else "")
                row = f"| {entry['name']} | {kname} |"
                for lp in kr["loops"]:
                    for p in lp["paths"]:
                        if p["fraction"] <= 0 and len(lp["paths"]) > 1:
                            continue
                        t = p["if_every_iteration"]
                        label = p["label"]
                        if len(kr["loops"]) > 1:
                            label = f"{lp['label']}: {label}"
                        if p["sass_paths_with_label"] > 1:
                            label += f" (heaviest of {p['sass_paths_with_label']})"
                        if p["inner_loops"]:
                            label += " ⟲ " + ", ".join(p["inner_loops"])
                        out.append(
                            f"{row} {label} | {p['fraction']:.3f} | {regs} | {ctas} "
                            f"| {p['per_elem']['instrs']:.1f} | {_classes(p['per_elem'])} | {lp['bytes_per_elem']:g} "
                            f"| {p['critical_cycles_per_iter']} | {_pair(t, 'hbm_floor')} | {_pair(t, 'static_bound')} "
                            f"| {_pair(t, 'static_ratio', _ratio)} | {_pair(t, 'latency_aware')} "
                            f"| {_pair(t, 'latency_ratio', _ratio)} |"
                        )
                    hidden = sum(1 for p in lp["paths"] if p["fraction"] <= 0)
                    if hidden and len(lp["paths"]) > 1:
                        note = f"({hidden} more SASS paths, not in the mix: see the JSON)"
                        out.append(f"{row} {note} | 0 | | | | | | | | | | | |")
                o = kr["outside_loops_per_row"]
                per_row = " · ".join(f"{CLASS_ABBR[c]} {o['by_class'][c]}" for c in CLASSES if o["by_class"][c])
                out.append(
                    f"{row} outside loops, per row: {o['instrs']} instr ({per_row}) | — | {regs} | {ctas} "
                    f"| {o['per_elem']['instrs']:.2f} | | — | {o['critical_cycles']} | | | | | |"
                )
                t = kr["at_mix"]
                out.append(
                    f"{row} **mix** | 1 | {regs} | {ctas} | | | {kr['hbm_bytes_per_elem']:g} | "
                    f"| {_pair(t, 'hbm_floor')} | **{_pair(t, 'static_bound')}** ({_limiter(t)}) "
                    f"| {_pair(t, 'static_ratio', _ratio)} "
                    f"| **{_pair(t, 'latency_aware')}** | {_pair(t, 'latency_ratio', _ratio)} |"
                )
                for lo in kr["other_loops"]:
                    inner.append(
                        f"| {entry['name']} | {kname} | {lo['label']} | {lo['inside'] or '—'} | {lo['where']} "
                        f"| {lo['instrs_per_iter']} | {lo['critical_cycles_per_iter']} "
                        f"| {lo['extra_iterations_per_row']:g} |"
                    )
            t = entry["total"]
            out.append(
                f"| {entry['name']} | **forward + backward** | | | | | | | | | {_pair(t, 'hbm_floor')} "
                f"| **{_pair(t, 'static_bound')}** | {_pair(t, 'static_ratio', _ratio)} "
                f"| **{_pair(t, 'latency_aware')}** | {_pair(t, 'latency_ratio', _ratio)} |"
            )
        if inner:
            out += [
                "",
                "Other loops (inner loops appear collapsed in the paths above, counted once; code outside the "
                "streaming loop counts each of its loops once per row; `row_extras` adds the iterations beyond; "
                "a loop around the stream, e.g. the restream loop, is costed by its own code):",
                "",
                "| mode | kernel | loop | inside | source | instr/iter (heaviest path) | crit. path cyc/iter "
                "| extra iterations/row |",
                "|" + "---|" * 8,
                *inner,
            ]
        notes = sorted(
            {f"{kr['kernel']}: {w}" for e in shape["variants"] for kr in e["kernels"] for w in kr["warnings"]}
        )
        if notes:
            out += ["", "Warnings:"] + [f"- {w}" for w in notes]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default 90 → sm_90a)")
    parser.add_argument("--rows", type=int, default=8192, help="token rows N (default 8192)")
    parser.add_argument(
        "--vocab", type=int, action="append", help="vocabulary size V, repeatable (default 32000 and 151936)"
    )
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="logits dtype (default bf16)")
    parser.add_argument("--variant", action="append", help="only the loss variants whose name contains this")
    parser.add_argument("--out", type=pathlib.Path, help="write cost-report-<date>.json and .md into this folder")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    variants = [v for v in VARIANTS if not args.variant or any(s in v.name for s in args.variant)]
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    report = build_report(args.rows, args.vocab or [32000, 151936], args.dtype, args.arch, variants, log)
    md = render_markdown(report)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"cost-report-{report['date']}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
        stem.with_suffix(".md").write_text(md + "\n")
        print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


# ==============================================================================================
# PATH LABELS AND PATH MIX: update this section when a kernel's control flow changes.
#
#   label_loop(kernel_name, launch, loop, in_stream) -> str | None      a stable name for a loop
#   label_paths(kernel_name, launch, loop, analysis) -> list[str | None]   one label per SASS path
#   path_mix(kernel_name, launch, analysis) -> {label: fraction of the streaming loop's iterations}
#   row_extras(kernel_name, launch, analysis) -> {loop label: extra iterations per row, "bytes": HBM bytes per row}
#
# Labels come from structural features of each path, never from block addresses:
# `PathCost.features` (global/shared stores, barriers, shuffles, instructions, inner loops) and
# `PathCost.runs(regex)` / `LoopCost.runs(regex)`: whether the path (loop) executes code of a
# source line matching the regex (nvdisasm line info, inlining sites included; robust to edits
# that move lines). A loop with one path needs no entry. Fractions are normalised per loop; of
# the SASS paths sharing a label (small diamonds, inner loops entered or not) the heaviest takes
# the label's fraction; a None label keeps a path out of the mix.
#
# Costs: a path counts each collapsed inner loop once (its heaviest path); code outside the
# streaming loops (the row loop's body, the final selection, prologue/epilogue) counts once per
# row, each of its loops once. `row_extras` adds the iterations beyond those, per row.
# ==============================================================================================


def label_loop(kernel_name: str, launch, loop: LoopCost, in_stream: bool) -> str | None:
    if loop.streaming:
        return "vocab loop"
    if kernel_name == "topk_forward_kernel":
        where = "stream" if in_stream else "final"
        if loop.loops_over(r"while row < n_rows"):
            return "row loop"
        if loop.encloses_stream:  # (Triton 3.6 gives its back edge the inner `while` line)
            return "restream loop"
        if loop.runs(r"support_z \+= "):
            return "support masses"
        if loop.runs(r"d_sum \+= "):
            return "support loss"
        if loop.runs(r"tl\.store\(coef_ptr"):
            return "support coefficients"
        if loop.loops_over(r"while \(hi - lo"):
            return f"{where} bisection"
        # Compaction before counting: compaction computes keys too, and the line info of inlined code
        # can name the counting line (it did under Triton 3.9 with the earlier run-based scratch).
        if loop.runs(r"tie_rank"):
            return f"{where} compact chunk"
        if loop.runs(r"ordered_key\(z\) >= key"):
            return f"{where} count chunk"
        if loop.runs(r"_exclusive_cumsum\(valid"):
            return f"{where} expand chunk"
    return None


def label_paths(kernel_name: str, launch, loop: LoopCost, analysis: KernelAnalysis) -> list[str]:
    paths = loop.paths
    if len(paths) == 1:
        return ["stream"]
    if kernel_name == "topk_forward_kernel":
        labels = []
        for p in paths:
            if p.runs(r"tl\.reshape\(z|base_z = _finite_or_zero"):
                lab = "first block"  # the threshold from K' group maxima, then append
            elif p.runs(r"tl\.store\(cand \+ slot"):
                lab = "append"  # some entries pass the threshold
            else:
                lab = "skip"  # none passes: tail sums only
            if p.runs(r"\b_rebase\(|reset = stale &|block_[zu] = _sum_all\(tl\.where\(passes"):
                lab += " + rebase"  # the rare base raise (overflow / first finite block)
            labels.append(lab)
        return labels
    return [f"path {i}" for i in range(len(paths))]


def path_mix(kernel_name: str, launch, analysis: KernelAnalysis) -> dict[str, float]:
    if kernel_name == "topk_forward_kernel":
        sim = _threshold_simulation(launch, analysis.vocab)
        return {k: v / sim["blocks_per_row"] for k, v in sim["blocks"].items()}
    return {}  # single-path streams (LSE, gradient)


def row_extras(kernel_name: str, launch, analysis: KernelAnalysis) -> dict[str, float]:
    if kernel_name == "topk_forward_kernel":
        return _threshold_simulation(launch, analysis.vocab)["extras"]
    return {}


# --- threshold filter + candidate scratch design -----------------------------------------------

IID_ROWS = 4  # rows simulated (iid normal logits, sigma IID_SIGMA, fixed seed)
IID_SIGMA = 3.0


def _ordered_key(z):
    import numpy as np

    bits = z.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(bits >= 0, bits, (bits ^ 0x7FFFFFFF) + 1)


def _key_value(key: int) -> float:
    import numpy as np

    bits = key if key >= 0 else (key - 1) ^ 0x7FFFFFFF
    return float(np.array([bits], dtype=np.int64).astype(np.int32).view(np.float32)[0])


def _tighten_sim(cand_z, n_runs: int, thr: float, keep_lo: int, keep_hi: int, chunk: int, compact_chunk: int, run: int):
    """The kernel's `tighten` on candidate values: (kept mask, new threshold, loop trips)."""
    import numpy as np

    expand = -(-n_runs // (chunk // run))
    if len(cand_z) <= keep_hi:  # nothing to select: all kept, the threshold unchanged
        trips = {"expand chunk": expand, "bisection": 0, "count chunk": 0, "compact chunk": 0}
        return np.ones(len(cand_z), bool), thr, trips
    keys = _ordered_key(cand_z)
    lo, hi = int(_ordered_key(np.float32([thr]))[0]), int(keys.max()) + 1
    count_hi, found, steps = 0, False, 0
    while hi - lo > 1 and not found:
        mid = lo + (hi - lo) // 2
        count = int((keys >= mid).sum())
        steps += 1
        if count >= keep_lo:
            lo, found = mid, count <= keep_hi
        else:
            hi, count_hi = mid, count
    room = len(cand_z) if found else keep_lo - count_hi
    keep = (keys > lo) | ((keys == lo) & (np.cumsum(keys == lo) <= room))
    trips = {
        "expand chunk": expand,
        "bisection": steps,
        "count chunk": steps * -(-len(cand_z) // chunk),
        "compact chunk": -(-len(cand_z) // compact_chunk),
    }
    return keep, _key_value(lo), trips


@functools.cache
def _threshold_simulation_cached(
    vocab: int,
    block_v: int,
    topk: int,
    k_pow2: int,
    runs_cap: int,
    chunk: int,
    compact_chunk: int,
    run: int,
    tighten_keep: int,
) -> dict:
    """Replay the kernel's control flow on iid rows: the first-block threshold, appends of runs of
    `run` entries with candidates, tightening when the runs would overflow the scratch, the final
    selection. Returns blocks per path, the inner loops' extra trips per row, tightens per row."""
    import numpy as np

    rng = np.random.default_rng(0)
    blocks = Counter()
    trips = {w: Counter() for w in ("stream", "final")}
    tightens = Counter()
    n_blocks = -(-vocab // block_v)
    for _ in range(IID_ROWS):
        row = (rng.standard_normal(vocab) * IID_SIGMA).astype(np.float32)
        thr, cand = -np.inf, np.empty(0, np.int64)  # candidate indices, in index order
        n_flat = 0  # of them, those already in the flat entries (the rest are recorded runs)
        for b in range(n_blocks):
            z = row[b * block_v : (b + 1) * block_v]
            if b == 0 and vocab >= block_v and block_v >= 2 * k_pow2:
                thr = float(z.reshape(k_pow2, block_v // k_pow2).max(1).min())
            passes = z >= thr if b == 0 or thr == -np.inf else z > thr
            if not passes.any():
                blocks["skip"] += 1
                continue
            new = b * block_v + np.flatnonzero(passes)
            n_runs = len(np.unique(cand[n_flat:] // run))
            if n_runs + len(np.unique(new // run)) > runs_cap:
                # The block stops at the check and leaves the stream (an exit, not a path through the
                # loop; costed as a skip, which does all it does and more); after the selection the
                # block is streamed again.
                blocks["skip"] += 1
                keep, thr, t = _tighten_sim(row[cand], n_runs, thr, topk, tighten_keep, chunk, compact_chunk, run)
                cand = cand[keep]
                n_flat = len(cand)
                trips["stream"].update(t)
                tightens["stream"] += 1
                new = new[row[new] >= thr] if thr == -np.inf else new[row[new] > thr]
            blocks["first block" if b == 0 else "append" if len(new) else "skip"] += 1
            cand = np.concatenate([cand, new])
        n_runs = len(np.unique(cand[n_flat:] // run))
        _, _, t = _tighten_sim(row[cand], n_runs, thr, topk, topk, chunk, compact_chunk, run)
        trips["final"].update(t)
        tightens["final"] += 1
    rows = IID_ROWS
    # Code outside the stream counts once per row: the restream loop's own code (one tightening)
    # and each loop of both selections (the bisection with one count chunk). Extras: the rest.
    extras = {"restream loop": tightens["stream"] / rows - 1}
    for where in ("stream", "final"):
        t = trips[where]
        extras[f"{where} expand chunk"] = t["expand chunk"] / rows - 1
        extras[f"{where} bisection"] = t["bisection"] / rows - 1
        extras[f"{where} count chunk"] = (t["count chunk"] - t["bisection"]) / rows
        extras[f"{where} compact chunk"] = t["compact chunk"] / rows - 1
    return {
        "blocks_per_row": n_blocks,
        "blocks": {k: v / rows for k, v in blocks.items()},
        "extras": extras,
        "tightens_per_row": {k: v / rows for k, v in tightens.items()},
        "trips_per_row": {w: {k: v / rows for k, v in t.items()} for w, t in trips.items()},
    }


def _threshold_simulation(launch, vocab: int) -> dict:
    a = launch.args
    return _threshold_simulation_cached(
        vocab,
        int(a["BLOCK_V"]),
        int(a["topk"]),
        int(a["K_POW2"]),
        int(a["RUNS_CAP"]),
        int(a["CHUNK"]),
        int(a["COMPACT_CHUNK"]),
        int(a["RUN"]),
        int(a["tighten_keep"]),
    )


if __name__ == "__main__":
    sys.exit(main())
