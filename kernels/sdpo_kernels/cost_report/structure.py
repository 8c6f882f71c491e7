"""The structural analysis of one launch: compile it, find its vocabulary (streaming) loops, cost
every path of each loop and the code outside them (`analyze_structure`), and the objects the path
labels and the time model read (`PathCost`, `LoopCost`, `KernelAnalysis`).

The vocabulary loops are those whose `for` line names an argument equal to V (n_cols) and that load
or store an [N, V] tensor (address dataflow from the kernel parameters through the SASS; without
line info, the innermost loops doing so).
"""

from __future__ import annotations

import functools
import math
import pathlib
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

from .cfg import Cfg, Loop, build_cfg, loop_paths
from .compile import Compiled, compile_launch, unwrap_kernel
from .dataflow import address_params
from .hardware import H100, Gpu, ctas_per_sm
from .launches import launch_stages
from .sass import Instr, parse_sass
from .timing import Cost


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


def analyze_structure(launch, rows: int, vocab: int, arch: int = 90, path_limit: int = 256) -> KernelAnalysis:
    """Compile one KernelLaunch and cost its streaming loops, paths and the rest; the loops keep their
    address labels and the paths have no labels and no share yet (`analysis.analyze` adds them)."""
    fn = unwrap_kernel(launch.kernel)
    cap = getattr(launch, "max_registers", None)
    comp = compile_launch(fn, launch.args, launch.num_warps, launch_stages(launch), arch, cap)
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
        reads, writes = {}, {}
        accesses = stream_accesses(sorted(lp.body))
        for ins, hit in accesses:
            for name in sorted(hit):  # sorted: a set of names iterates in hash order, which varies per run
                t = tensors[name]
                bucket = writes if ins.base in ("STG", "ST", "RED", "REDG") else reads
                bucket[id(t)] = (name, t)
        named = []
        tagged = 0.0
        for kind, bucket in (("read", reads), ("write", writes)):
            for name, t in bucket.values():
                tagged += t.element_size()
                named.append(f"{kind} {name} ({str(t.dtype).replace('torch.', '')}) in {lp.label}")
        # A register that held one tensor's address on one path and another's on another carries both
        # tags, so the tags can name a tensor the loop never reads: the widths of its accesses (per
        # thread per iteration, over the entries a thread covers) bound the bytes from above too.
        by_width = sum(ins.mem_width_bytes for ins, _ in accesses) / elems
        loop_bytes[id(lp)] = min(tagged, by_width) if by_width else tagged
        if loop_bytes[id(lp)] < tagged:
            named = [f"{' or '.join(named)}: {by_width:g} B per entry by the access widths"]
        streams += named
        bytes_per_elem += loop_bytes[id(lp)]
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
    return ka
