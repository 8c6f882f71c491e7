"""Write bench/fixtures/smollm2_replay_rows.pt: real SmolLM2-135M-Instruct logit rows, reduced to what the
cost report's replay of the top-K forward (`sdpo_kernels.cost_report.replay_topk`) reads.

    python bench/make_replay_rows.py                      # 64 rows, bf16 model, seed 0
    python -m sdpo_kernels.cost_report --vocab 49152 --real-rows bench/fixtures/smollm2_replay_rows.pt

The rows are `real_rows.collect(n, dtype=torch.bfloat16)`'s student logits (V = 49,152, the bf16 values a
trainer running the model in bf16 hands the loss). The replay takes its decisions on the student logits only
(the teacher is streamed for the tail sums, which decide nothing the replay models).

The reduction: per row the first block (BLOCK_V entries) in full, and after it only the entries at or above
a floor: the smallest of K_POW2 group maxima of the first block. The kernel's first-block threshold (the
K_POW2-th largest of the block's run maxima) is at or above that floor (each group maximum is a run maximum,
so K_POW2 run maxima reach it), every compare the kernel makes after the first block is against that
threshold or a higher one (tightening only raises it), so an entry below the floor never becomes a
candidate. The first block is kept whole so that the search for its threshold takes the same steps. The
replay on the reduced rows (dropped entries as -inf) is therefore the replay on the full rows;
`replay_reduced` refuses a row whose threshold falls below its floor, and this script checks the equality
on every row before writing.

Stored: "values" (bf16, the kept entries of all rows in index order), "mask" ([rows, V / 8] uint8, bit i
of a row, little-endian bit order, set where entry i is kept), "floor" ([rows] float32), "vocab", "dtype",
"made_for" (the launch parameters of the floor), "source", "reduction" and "meta" (how the rows were made).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "fixtures" / "smollm2_replay_rows.pt"
VOCAB = 49152


def topk_params(vocab: int = VOCAB):
    """The top-K forward's control-flow parameters at this V (the report's headline variant, bf16)."""
    from sdpo_kernels.cost_report import HEADLINE, variant_launches
    from sdpo_kernels.cost_report.replay_topk import TopkParams

    fwd, _ = variant_launches(HEADLINE, rows=8, vocab=vocab, dtype="bf16")
    (launch,) = [x for x in fwd if "K_POW2" in x.args]
    return TopkParams.of_launch(launch, vocab)


def row_floor(row: np.ndarray, block_v: int, k_pow2: int) -> float:
    """The smallest of K_POW2 group maxima of the first BLOCK_V entries: at or below the kernel's first-block
    threshold (the K_POW2-th largest run maximum), so no later entry below it is ever a candidate."""
    return float(row[:block_v].reshape(k_pow2, block_v // k_pow2).max(1).min())


def reduce_rows(rows: np.ndarray, params) -> dict:
    """Keep per row its first block and the entries at or above its floor (see the module docstring)."""
    floors = np.array([row_floor(r, params.block_v, params.k_pow2) for r in rows], np.float32)
    kept = rows >= floors[:, None]
    kept[:, : params.block_v] = True
    return {
        "vocab": rows.shape[1],
        "dtype": "bf16",
        "values": torch.from_numpy(rows[kept]).bfloat16(),
        "mask": torch.from_numpy(np.packbits(kept, axis=1, bitorder="little")),
        "floor": torch.from_numpy(floors),
        "made_for": {"block_v": params.block_v, "k_pow2": params.k_pow2},
        "reduction": "per row the first BLOCK_V entries and the later entries >= the floor (min of K_POW2 group "
        "maxima of the first block, `made_for`); the replay on these rows (dropped entries -inf) equals the "
        "full-row replay",
    }


def check_identical(rows: np.ndarray, fixture: dict, params) -> int:
    """Replay every row in full and reduced; raise if any differs. Returns the rows checked."""
    from sdpo_kernels.cost_report import replay_topk

    for i, (full, reduced) in enumerate(zip(rows, replay_topk.dense_rows(fixture))):
        a, b = replay_topk.replay_row(full, params), replay_topk.replay_row(reduced, params)
        seen = (a.blocks, a.trips, a.tightens, a.first_threshold, a.first_search_steps)
        if seen != (b.blocks, b.trips, b.tightens, b.first_threshold, b.first_search_steps):
            raise SystemExit(f"row {i}: the reduced replay differs from the full one: {a} vs {b}")
    full = replay_topk.summarize([replay_topk.replay_row(r, params) for r in rows], params)
    reduced = replay_topk.replay_reduced(params, fixture, subsets=1)
    for key in ("blocks", "extras", "tightens_per_row", "trips_per_row", "first_search_steps_per_row"):
        if full[key] != reduced[key]:
            raise SystemExit(f"summary {key} differs: {full[key]} vs {reduced[key]}")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="rows to collect (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from real_rows import collect

    t0 = time.time()
    collected = collect(args.rows, dtype=torch.bfloat16, seed=args.seed)
    rows = collected["student"].float().numpy()
    print(f"collected {rows.shape[0]} rows of V = {rows.shape[1]} in {time.time() - t0:.0f} s", file=sys.stderr)
    params = topk_params(rows.shape[1])
    fixture = reduce_rows(rows, params)
    fixture["source"] = f"SmolLM2-135M-Instruct student logits (bench/real_rows.py, seed {args.seed})"
    # JSON-safe (loads with torch.load(weights_only=True)): the kinds, the completions, how the rows were made.
    made = {"kind": collected["kind"], "completion_text": collected["completion_text"], "real_rows": collected["meta"]}
    fixture["meta"] = json.loads(json.dumps(made, default=str))
    checked = check_identical(rows, fixture, params)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    kept = int(fixture["values"].numel())
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {kept} of {rows.size} entries kept "
        f"({kept / rows.size:.1%}); replay identical to the full rows on all {checked} rows",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
