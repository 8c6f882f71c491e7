"""Which kernel parameter each global access addresses: a flow-sensitive dataflow over the CFG from
the constant-bank parameter slots through the registers to the load/store addresses."""

from __future__ import annotations

from .cfg import Block, Cfg
from .sass import CBANK_OPERAND, operand_regs

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
                        for r in operand_regs(o):
                            tags |= state.get(r, frozenset())
                        offsets = (int(x, 16) for x in CBANK_OPERAND.findall(o))
                        tags |= {p for off in offsets if (p := param_at(off))}
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
