"""Control-flow graph of a kernel's SASS: basic blocks, dominators, natural loops and their nesting,
and the acyclic paths of a loop body (inner loops collapsed, small branch regions folded)."""

from __future__ import annotations

import functools
import sys
from collections import Counter
from dataclasses import dataclass, field

from .sass import Instr


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
