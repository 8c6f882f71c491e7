"""PATH LABELS AND PATH MIX: update this module when a kernel's control flow changes.

    label_loop(kernel_name, launch, loop, in_stream) -> str | None      a stable name for a loop
    label_paths(kernel_name, launch, loop, analysis) -> list[str | None]   one label per SASS path
    path_mix(kernel_name, launch, analysis) -> {label: fraction of the streaming loop's iterations}
    row_extras(kernel_name, launch, analysis) -> {loop label: extra iterations per row, "bytes": HBM bytes per row}

Labels come from structural features of each path, never from block addresses:
`PathCost.features` (global/shared stores, barriers, shuffles, instructions, inner loops) and
`PathCost.runs(regex)` / `LoopCost.runs(regex)`: whether the path (loop) executes code of a
source line matching the regex (nvdisasm line info, inlining sites included; robust to edits
that move lines). A loop with one path needs no entry. Fractions are normalised per loop; of
the SASS paths sharing a label (small diamonds, inner loops entered or not) the heaviest takes
the label's fraction; a None label keeps a path out of the mix.

Costs: a path counts each collapsed inner loop once (its heaviest path); code outside the
streaming loops (the row loop's body, the final selection, prologue/epilogue) counts once per
row, each of its loops once. `row_extras` adds the iterations beyond those, per row.

The regexes below name source lines of `sdpo_kernels/triton_topk.py` (`topk_forward_kernel`,
`tighten`); the shares and extra trips come from `replay_topk`, which replays that kernel's
decisions. Rename a line there and the report stops (`analysis.assign_mix`) rather than
mislabel a path.
"""

from __future__ import annotations

from .replay_topk import real_row_replay, threshold_simulation
from .structure import KernelAnalysis, LoopCost


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
        if loop.loops_over(r"while \(found == 0\) & \(hi - lo"):
            return "first threshold search"  # the first block's K'-th largest run maximum
        if loop.loops_over(r"while \(hi - lo"):
            # The chunked search has its count loop inside; the search over one register tile none.
            return f"{where} bisection" if any(p.children for p in loop.paths) else f"{where} tile bisection"
        # Compaction before counting: compaction computes keys too, and the line info of inlined code
        # can name the counting line (it did under Triton 3.9 with the earlier run-based scratch).
        if loop.runs(r"tie_rank"):
            return f"{where} compact chunk"
        if loop.runs(r"_bracket_tile\(tl\.where\(offs"):
            return f"{where} count chunk"
        if loop.runs(r"at = n_flat \+ tl\.cumsum\(per_run|at \+= taken"):
            return f"{where} expand chunk"
    return None


def label_paths(kernel_name: str, launch, loop: LoopCost, analysis: KernelAnalysis) -> list[str]:
    paths = loop.paths
    if len(paths) == 1:
        return ["stream"]
    if kernel_name == "topk_forward_kernel":
        labels = []
        for p in paths:
            # (Triton 3.6 may give the first block's maxima only the line info of tl.max itself: the
            # branch's `if n_cols >= BLOCK_V` names it then.)
            if p.runs(r"tl\.reshape\(z|base_z = _finite_or_zero|if n_cols >= BLOCK_V"):
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


def path_mix(kernel_name: str, launch, analysis: KernelAnalysis, replay: dict | None = None) -> dict[str, float]:
    """`replay`: a replay summary (`replays(...)["real"]`) to take the mix from instead of the iid rows."""
    if kernel_name == "topk_forward_kernel":
        sim = replay or threshold_simulation(launch, analysis.vocab)
        return {k: v / sim["blocks_per_row"] for k, v in sim["blocks"].items()}
    return {}  # single-path streams (LSE, gradient)


def row_extras(kernel_name: str, launch, analysis: KernelAnalysis, replay: dict | None = None) -> dict[str, float]:
    if kernel_name == "topk_forward_kernel":
        return (replay or threshold_simulation(launch, analysis.vocab))["extras"]
    return {}


def replays(kernel_name: str, launch, analysis: KernelAnalysis, real_rows=None) -> dict:
    """The replays behind `path_mix` / `row_extras`, for the report: {"iid": summary} and, when a
    real-rows fixture at `real_rows` matches the launch (V, dtype), {"real": summary}. Empty for
    kernels whose mix needs no replay."""
    if kernel_name != "topk_forward_kernel":
        return {}
    out = {"iid": threshold_simulation(launch, analysis.vocab)}
    if real_rows is not None:
        real = real_row_replay(launch, analysis.vocab, real_rows)
        if real is not None:
            out["real"] = real
    return out
