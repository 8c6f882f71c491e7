"""A replay of `topk_forward_kernel`'s control flow (sdpo_kernels/triton_topk.py) on sample rows.

MIRRORS: `topk_forward_kernel` and `tighten` in `sdpo_kernels/triton_topk.py`, with the launch
parameters `triton_backend.forward_launches` passes (BLOCK_V, K_POW2, RUNS_CAP, RUNS_HIGH, CHUNK,
TILE, COMPACT_CHUNK, RUN, topk, tighten_keep). The replay takes the same decisions as the kernel on the
same values: the first-block threshold (the K-th largest run maximum, or K' group maxima), which
entries pass (`>=` in the first block and while the threshold is -inf, `>` after), runs of RUN
entries recorded per block, a tightening after a block that leaves more than RUNS_HIGH runs recorded
(unless it was the last), the block that would overflow RUNS_CAP recorded runs leaving the stream
for a tightening and being streamed again, the search over int32 ordered keys in `tighten`
(bisection snapped to candidate keys, its stopping rule, ties at the cut resolved towards the lowest
index; in registers when the candidates fit one TILE, else chunked from scratch) and the final
selection of exactly K. It counts how often each path of the vocabulary loop runs and how many
trips each selection loop makes.

WHEN THE KERNEL CHANGES: any change to the filter, the run recording, the watermark and overflow
rules, the restream, `tighten` (bisection bounds, stop rule, tie rule, chunk loops) or to the launch
parameters above must be made here too, and the path labels in `path_labels` kept in step (the
labels there must name every share this replay returns, or the report stops).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field

# iid rows: N(0, IID_SIGMA^2) logits, seed 0, rounded to the launch's logits dtype. Per-row spread
# (bf16, V = 151936, K = 100): final bisection steps 19.8 ± 6.1, mid-row bisection 14.4 ± 2.3,
# skipped blocks 5.9 ± 1.5. The 4 rows used before left standard errors of 8-17 % on those; 256 rows
# leave at most 2.2 % (the report prints the spread between subsets), for ~2 s of replay per shape.
IID_ROWS = 256
IID_SUBSETS = 8  # the spread reported: standard deviation of the means of IID_SUBSETS row subsets
IID_SIGMA = 3.0
SELECTIONS = ("stream", "final")  # mid-row tightenings (overflow of the recorded runs), the final top-K
# Per selection: the run expansion, the search over one register tile ("tile bisection") or else the
# chunked search ("bisection", its "count chunk"s) and chunked compaction ("compact chunk").
TRIP_LOOPS = ("expand chunk", "tile bisection", "bisection", "count chunk", "compact chunk")


@dataclass(frozen=True)
class TopkParams:
    """The launch parameters of `topk_forward_kernel` that its control flow depends on."""

    vocab: int
    block_v: int
    topk: int
    k_pow2: int
    runs_cap: int
    runs_high: int
    chunk: int
    compact_chunk: int
    run: int
    tighten_keep: int
    tile: int

    @staticmethod
    def of_launch(launch, vocab: int) -> TopkParams:
        a = launch.args
        names = ("BLOCK_V", "topk", "K_POW2", "RUNS_CAP", "RUNS_HIGH", "CHUNK", "COMPACT_CHUNK", "RUN")
        names += ("tighten_keep", "TILE")
        return TopkParams(vocab, *(int(a[n]) for n in names))


@dataclass
class RowReplay:
    """What the kernel does on one row: vocabulary blocks per path, selection-loop trips, tightenings."""

    blocks: Counter = field(default_factory=Counter)  # path label -> blocks (an overflowing block twice)
    trips: dict = field(default_factory=lambda: {w: Counter() for w in SELECTIONS})  # selection -> loop -> trips
    tightens: Counter = field(default_factory=Counter)  # selection -> calls of `tighten`
    restreams: int = 0  # blocks streamed twice (they would have overflowed the recorded runs)
    first_threshold: float = -math.inf  # the first block's threshold (the lowest any later compare uses)
    first_search_steps: int = 0  # steps of the search for it (the K-th largest run maximum)


DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def launch_dtype(launch) -> str:
    """The logits dtype of a top-K launch ("bf16", "fp16" or "fp32"), from its student tensor."""
    return DTYPE_NAMES[str(launch.args["student_ptr"].dtype)]


def round_to_dtype(x, dtype: str):
    """float32 values rounded (to nearest, ties to even) to `dtype` and back: what the kernel's load
    `.to(tl.float32)` sees when the logits are stored in that dtype."""
    import numpy as np

    x = np.asarray(x, np.float32)
    if dtype == "fp32":
        return x.copy()
    if dtype == "fp16":
        return x.astype(np.float16).astype(np.float32)
    if dtype != "bf16":
        raise ValueError(f"unknown dtype {dtype!r}")
    bits = x.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # finite values; NaN/inf do not occur here
    return bits.astype(np.uint32).view(np.float32)


def iid_rows(vocab: int, n_rows: int, dtype: str, inv_temp: float = 1.0, seed: int = 0) -> list:
    """`n_rows` iid N(0, IID_SIGMA^2) rows as the kernel's z: rounded to `dtype`, then times inv_temp in float32."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        row = round_to_dtype((rng.standard_normal(vocab) * IID_SIGMA).astype(np.float32), dtype)
        rows.append(row * np.float32(inv_temp) if inv_temp != 1.0 else row)
    return rows


def _ordered_key(z):
    import numpy as np

    bits = z.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(bits >= 0, bits, (bits ^ 0x7FFFFFFF) + 1)


def _key_value(key: int) -> float:
    import numpy as np

    bits = key if key >= 0 else (key - 1) ^ 0x7FFFFFFF
    return float(np.array([bits], dtype=np.int64).astype(np.int32).view(np.float32)[0])


def _snapped_search(keys, lo: int, hi: int, keep_lo: int, keep_hi: int) -> tuple[int, int, bool, int]:
    """The kernel's threshold search (`_bisect_step`) over int32 keys from count(lo) >= keep_lo >
    count(hi) = 0: each step counts the keys at or above the midpoint, then moves lo up to the
    smallest such key or hi down to one above the largest key below it. Returns (lo, count(hi),
    found: keep_lo <= count(lo) <= keep_hi, steps)."""
    count_hi, found, steps = 0, False, 0
    while hi - lo > 1 and not found:
        mid = lo + (hi - lo) // 2
        at_least = keys >= mid
        count = int(at_least.sum())
        steps += 1
        if count >= keep_lo:
            lo, found = int(keys[at_least].min()), count <= keep_hi
        else:
            hi, count_hi = int(keys[~at_least].max()) + 1, count
    return lo, count_hi, found, steps


def first_threshold(z, p: TopkParams) -> tuple[float, int]:
    """The first block's threshold and the steps of its search (0 for the group-minimum rule), or
    (-inf, 0) when the block sets none: the K-th largest of the block's run maxima when it has at
    least K' runs, else the smallest of K' group maxima when BLOCK_V >= 2K' (a full block only)."""
    if p.vocab < p.block_v:
        return -math.inf, 0
    if p.block_v // p.run >= p.k_pow2:
        keys = _ordered_key(z.reshape(p.block_v // p.run, p.run).max(1))
        lo, _, _, steps = _snapped_search(keys, int(keys.min()), int(keys.max()) + 1, p.topk, p.topk)
        return _key_value(lo), steps
    if p.block_v >= 2 * p.k_pow2:
        return float(z.reshape(p.k_pow2, p.block_v // p.k_pow2).max(1).min()), 0
    return -math.inf, 0


def _tighten_sim(
    cand_z, n_runs: int, thr: float, keep_lo: int, keep_hi: int, chunk: int, compact_chunk: int, run: int, tile: int
):
    """The kernel's `tighten` on candidate values: (kept mask, new threshold, loop trips).

    The search keeps count(lo) >= keep_lo > count(hi) and snaps each step to candidate keys: lo to
    the smallest key at or above the midpoint, hi to one above the largest key below it. It stops as
    the kernel's does: at a key that keep_lo..keep_hi candidates reach, or when hi - lo = 1 (ties at
    the cut, e.g. bf16 logits: the adjacent pair of distinct values around it); the ties are then
    cut at the lowest indices. Up to `tile` candidates are searched in registers ("tile bisection"),
    more in chunks from scratch ("bisection", "count chunk", "compact chunk")."""
    import numpy as np

    trips = dict.fromkeys(TRIP_LOOPS, 0)
    trips["expand chunk"] = -(-n_runs // (chunk // run))
    if len(cand_z) <= keep_hi:  # nothing to select: all kept, the threshold unchanged
        return np.ones(len(cand_z), bool), thr, trips
    keys = _ordered_key(cand_z)
    lo, count_hi, found, steps = _snapped_search(
        keys, int(_ordered_key(np.float32([thr]))[0]), int(keys.max()) + 1, keep_lo, keep_hi
    )
    room = len(cand_z) if found else keep_lo - count_hi
    keep = (keys > lo) | ((keys == lo) & (np.cumsum(keys == lo) <= room))
    if len(cand_z) <= tile:
        trips["tile bisection"] = steps
    else:
        trips["bisection"] = steps
        trips["count chunk"] = steps * -(-len(cand_z) // chunk)
        trips["compact chunk"] = -(-len(cand_z) // compact_chunk)
    return keep, _key_value(lo), trips


def _stream_tighten(row, cand, n_runs: int, thr: float, p: TopkParams, out: RowReplay):
    """A mid-row tightening of the candidates `cand` (indices, n_runs of their runs just recorded),
    counted in `out`: (the survivors, the new threshold)."""
    keep, thr, t = _tighten_sim(row[cand], n_runs, thr, p.topk, p.tighten_keep, p.chunk, p.compact_chunk, p.run, p.tile)
    out.trips["stream"].update(t)
    out.tightens["stream"] += 1
    return cand[keep], thr


def replay_row(row, p: TopkParams) -> RowReplay:
    """Replay the kernel's control flow on one row of z values (float32, as the kernel holds them):
    the first-block threshold, appends of runs of `run` entries with candidates, tightening when the
    runs would overflow the scratch, the final selection."""
    import numpy as np

    out = RowReplay()
    blocks, trips, tightens = out.blocks, out.trips, out.tightens
    n_blocks = -(-p.vocab // p.block_v)
    thr, cand = -np.inf, np.empty(0, np.int64)  # candidate indices, in index order
    n_flat = 0  # of them, those already in the flat entries (the rest are recorded runs)
    for b in range(n_blocks):
        z = row[b * p.block_v : (b + 1) * p.block_v]
        if b == 0:
            thr, steps = first_threshold(z, p)
            out.first_threshold = thr
            out.first_search_steps = steps
        passes = z >= thr if b == 0 or thr == -np.inf else z > thr
        if not passes.any():
            blocks["skip"] += 1
            continue
        new = b * p.block_v + np.flatnonzero(passes)
        n_runs = len(np.unique(cand[n_flat:] // p.run))
        if n_runs + len(np.unique(new // p.run)) > p.runs_cap:
            # The block stops at the check and leaves the stream (an exit, not a path through the
            # loop; costed as a skip, which does all it does and more); after the selection the
            # block is streamed again.
            blocks["skip"] += 1
            cand, thr = _stream_tighten(row, cand, n_runs, thr, p, out)
            n_flat = len(cand)
            out.restreams += 1
            new = new[row[new] >= thr] if thr == -np.inf else new[row[new] > thr]
        blocks["first block" if b == 0 else "append" if len(new) else "skip"] += 1
        cand = np.concatenate([cand, new])
        n_runs = len(np.unique(cand[n_flat:] // p.run))
        if n_runs > p.runs_high and b + 1 < n_blocks:
            # Past the watermark: tightened after this block (no block is streamed twice).
            cand, thr = _stream_tighten(row, cand, n_runs, thr, p, out)
            n_flat = len(cand)
    n_runs = len(np.unique(cand[n_flat:] // p.run))
    _, _, t = _tighten_sim(row[cand], n_runs, thr, p.topk, p.topk, p.chunk, p.compact_chunk, p.run, p.tile)
    trips["final"].update(t)
    tightens["final"] += 1
    return out


def search_steps(trips: dict) -> float:
    """Steps of a selection's threshold search, in registers or chunked."""
    return trips.get("tile bisection", 0.0) + trips.get("bisection", 0.0)


def _per_row(replays: list[RowReplay]) -> dict:
    """Means per row of the replays' counts: blocks per path, tightenings, selection-loop trips."""
    rows = len(replays)
    blocks, tightens = Counter(), Counter()
    trips = {w: Counter() for w in SELECTIONS}
    for r in replays:
        blocks.update(r.blocks)
        tightens.update(r.tightens)
        for w in SELECTIONS:
            trips[w].update(r.trips[w])
    return {
        "blocks": {k: v / rows for k, v in blocks.items()},
        "tightens_per_row": {k: v / rows for k, v in tightens.items()},
        "trips_per_row": {w: {k: v / rows for k, v in t.items()} for w, t in trips.items()},
        "first_search_steps_per_row": sum(r.first_search_steps for r in replays) / rows,
        "restreams_per_row": sum(r.restreams for r in replays) / rows,
    }


def _spread(replays: list[RowReplay], subsets: int) -> dict:
    """Standard deviation, over `subsets` equal row subsets, of the subset means of the headline counts
    (0 with fewer than two subsets)."""
    size = len(replays) // subsets if subsets else 0
    if subsets < 2 or size < 1:
        return {"subsets": subsets, "rows_per_subset": size}
    means = [_per_row(replays[i * size : (i + 1) * size]) for i in range(subsets)]

    def std(values: list[float]) -> float:
        m = sum(values) / len(values)
        return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))

    labels = sorted({k for m in means for k in m["blocks"]})
    return {
        "subsets": subsets,
        "rows_per_subset": size,
        "tightens_per_row": {w: std([m["tightens_per_row"].get(w, 0.0) for m in means]) for w in SELECTIONS},
        "blocks": {k: std([m["blocks"].get(k, 0.0) for m in means]) for k in labels},
        "bisection_per_row": {w: std([search_steps(m["trips_per_row"][w]) for m in means]) for w in SELECTIONS},
    }


def summarize(replays: list[RowReplay], p: TopkParams, subsets: int = 1, source: str = "") -> dict:
    """The path mix and row extras `path_labels` reads, from the replays of some rows."""
    rows = len(replays)
    per_row = _per_row(replays)
    trips, tightens = per_row["trips_per_row"], per_row["tightens_per_row"]
    # Code outside the stream counts once per row: the restream loop's own code (one tightening)
    # and each loop of both selections (the bisection with one count chunk). Extras: the rest.
    extras = {"restream loop": tightens.get("stream", 0.0) - 1}
    # The first block's path runs its threshold search once: the other steps are extra.
    extras["first threshold search"] = per_row["first_search_steps_per_row"] - 1
    for where in SELECTIONS:
        t = trips[where]
        extras[f"{where} expand chunk"] = t.get("expand chunk", 0.0) - 1
        extras[f"{where} tile bisection"] = t.get("tile bisection", 0.0) - 1
        extras[f"{where} bisection"] = t.get("bisection", 0.0) - 1
        extras[f"{where} count chunk"] = t.get("count chunk", 0.0) - t.get("bisection", 0.0)
        extras[f"{where} compact chunk"] = t.get("compact chunk", 0.0) - 1
    return {
        "source": source,
        "rows": rows,
        "blocks_per_row": -(-p.vocab // p.block_v),
        "blocks": per_row["blocks"],
        "extras": extras,
        "tightens_per_row": tightens,
        "trips_per_row": trips,
        "first_search_steps_per_row": per_row["first_search_steps_per_row"],
        "restreams_per_row": per_row["restreams_per_row"],
        "spread": _spread(replays, subsets),
    }


@functools.cache
def replay_iid(p: TopkParams, dtype: str = "fp32", inv_temp: float = 1.0, n_rows: int = IID_ROWS) -> dict:
    """The replay on `n_rows` iid rows in the launch's dtype (cached per launch parameters)."""
    rows = iid_rows(p.vocab, n_rows, dtype, inv_temp)
    source = f"{n_rows} iid rows, N(0, {IID_SIGMA:g}²) logits rounded to {dtype}"
    subsets = IID_SUBSETS if n_rows % IID_SUBSETS == 0 else 1
    return summarize([replay_row(r, p) for r in rows], p, subsets, source)


def threshold_simulation(launch, vocab: int) -> dict:
    """The replay for one top-K launch: iid rows in its logits dtype, at its temperature."""
    p = TopkParams.of_launch(launch, vocab)
    return replay_iid(p, launch_dtype(launch), float(launch.args["inv_temp"]))


# --- real rows: a fixture of reduced logit rows (bench/make_replay_rows.py writes it) ------------


def load_reduced_rows(path) -> dict:
    """A replay-rows fixture: per row every logit at or above a floor (values in the fixture's dtype,
    positions as a packed bit mask of the row); the rest of the row is below the floor."""
    import torch

    return torch.load(path, weights_only=True)


def dense_rows(fixture: dict) -> list:
    """The fixture's rows as float32 arrays of length V, -inf where an entry was dropped (below the floor)."""
    import numpy as np

    vocab = int(fixture["vocab"])
    values = fixture["values"].float().numpy()
    rows, at = [], 0
    for mask in fixture["mask"].numpy():
        kept = np.unpackbits(mask, bitorder="little")[:vocab].astype(bool)
        row = np.full(vocab, -np.inf, np.float32)
        n = int(kept.sum())
        row[kept] = values[at : at + n]
        rows.append(row)
        at += n
    return rows


def replay_reduced(p: TopkParams, fixture: dict, inv_temp: float = 1.0, subsets: int = IID_SUBSETS) -> dict:
    """The replay on a fixture's rows. Exact (the same as on the full rows) when the first block's
    threshold of every row is at or above the row's floor: every later compare is against that
    threshold or a higher one, so no dropped entry ever passes, and every group maximum that sets the
    threshold is kept. Raises ValueError for a row where that does not hold."""
    import numpy as np

    if int(fixture["vocab"]) != p.vocab:
        raise ValueError(f"fixture rows have V = {fixture['vocab']}, the launch V = {p.vocab}")
    floors = fixture["floor"].float().numpy() * np.float32(inv_temp)
    replays = []
    for i, row in enumerate(dense_rows(fixture)):
        r = replay_row(row * np.float32(inv_temp) if inv_temp != 1.0 else row, p)
        if not r.first_threshold >= floors[i]:
            raise ValueError(
                f"fixture row {i}: first-block threshold {r.first_threshold} below the floor {floors[i]} "
                "(the fixture was reduced for other launch parameters)"
            )
        replays.append(r)
    subsets = subsets if len(replays) % subsets == 0 and len(replays) >= 2 * subsets else 1
    source = f"{len(replays)} real rows, {fixture.get('source', 'fixture')}, {fixture['dtype']}"
    return summarize(replays, p, subsets, source)


def real_row_replay(launch, vocab: int, path) -> dict | None:
    """The replay on the fixture at `path` when it matches the launch (same V and logits dtype), else None."""
    fixture = _cached_fixture(str(path))
    if int(fixture["vocab"]) != vocab or fixture["dtype"] != launch_dtype(launch):
        return None
    return replay_reduced(TopkParams.of_launch(launch, vocab), fixture, float(launch.args["inv_temp"]))


@functools.cache
def _cached_fixture(path: str) -> dict:
    return load_reduced_rows(path)
