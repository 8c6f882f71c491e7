"""SASS text → instructions: parsing (`cuobjdump -sass` and `nvdisasm -gi` syntax, line info
included), opcode classes, latency classes, and each instruction's destination / source registers."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

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
ALU_PIPE_FP = {"FMNMX", "FSETP", "FSEL", "FSET"}  # compares / selects: INT32-rate (64/clk/SM)
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
CBANK_OPERAND = re.compile(r"c\[0x0\]\[(0x[0-9a-fA-F]+)\]")
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


def operand_regs(operand: str, width: int = 1) -> list[str]:
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
            out.extend(operand_regs(o, w))
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
            out.extend(operand_regs(o, w))
        if self.pred and self.pred not in ("PT", "!PT"):
            out.extend(operand_regs(self.pred))
        return tuple(out)

    @property
    def cbank_offsets(self) -> list[int]:
        return [int(x, 16) for o in self.operands for x in CBANK_OPERAND.findall(o)]

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
