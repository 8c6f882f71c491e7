"""One launch analysed end to end (`analyze`): the structure, then stable loop names and path labels
(`path_labels`), and each path's share of the streaming loop's iterations (the path mix)."""

from __future__ import annotations

from .path_labels import label_loop, label_paths, path_mix, row_extras
from .structure import KernelAnalysis, LoopCost, analyze_structure


def analyze(
    launch, rows: int, vocab: int, arch: int = 90, path_limit: int = 256, replay: dict | None = None
) -> KernelAnalysis:
    """Compile one KernelLaunch and cost its streaming loops, paths and the rest (at the iid path mix,
    or at the mix of `replay`, a replay summary)."""
    ka = analyze_structure(launch, rows, vocab, arch, path_limit)
    _relabel_loops(ka.name, launch, ka.loops, ka.other_loops)
    assign_mix(ka, replay)
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


def assign_mix(ka: KernelAnalysis, replay: dict | None = None) -> None:
    """Label every path (`label_paths`) and give it its share of the loop's iterations (`path_mix`):
    of the iid replay, or of `replay` (a replay summary, e.g. of real rows). Call once per analysis
    (it scales the streaming loops' trips): `with_mix` gives a copy at another mix."""
    mix = path_mix(ka.name, ka.launch, ka, replay) or {}
    ka.extras = row_extras(ka.name, ka.launch, ka, replay) or {}
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
