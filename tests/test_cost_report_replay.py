"""The cost report's replay of the top-K forward's control flow (`cost_report.replay_topk`).

CPU tier, numpy only: the replay takes the kernel's decisions on sample rows (iid rows in the
launch's dtype, or the committed real-rows fixture) and counts the paths and selection-loop trips.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from sdpo_kernels.cost_report import replay_topk as rt

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "bench" / "fixtures" / "smollm2_replay_rows.pt"


def params(
    vocab=151936,
    block_v=2048,
    topk=100,
    k_pow2=128,
    runs_cap=256,
    runs_high=192,
    chunk=512,
    compact=128,
    run=8,
    keep=128,
    tile=512,
):
    return rt.TopkParams(vocab, block_v, topk, k_pow2, runs_cap, runs_high, chunk, compact, run, keep, tile)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_threshold_simulation_counts_every_selection_loop(dtype):
    # The replay of the top-K forward's decisions on iid rows: blocks per path add up to the blocks
    # streamed (each overflow streams its block twice), and the selection loops run.
    sim = rt.replay_iid(params(), dtype, 1.0, 8)
    n_blocks, tightens = sim["blocks_per_row"], sim["tightens_per_row"]["stream"]
    assert n_blocks == 75 and tightens >= 1
    assert abs(sum(sim["blocks"].values()) - (n_blocks + sim["restreams_per_row"])) < 1e-9
    # Without the watermark every mid-row tightening is an overflow (its block streamed twice).
    sim = rt.replay_iid(params(runs_high=256), dtype, 1.0, 8)
    assert sim["restreams_per_row"] == sim["tightens_per_row"]["stream"] >= 1
    assert abs(sum(sim["blocks"].values()) - (n_blocks + sim["tightens_per_row"]["stream"])) < 1e-9
    assert sim["blocks"]["first block"] == 1
    for where in ("stream", "final"):
        trips = sim["trips_per_row"][where]
        assert rt.search_steps(trips) >= 1
        assert trips["count chunk"] >= trips["bisection"]
    # Mid-row selections over more candidates than one register tile search and compact in chunks.
    assert sim["trips_per_row"]["stream"]["tile bisection"] > 0
    chunked = rt.replay_iid(params(tile=64), dtype, 1.0, 8)["trips_per_row"]["stream"]
    assert chunked["bisection"] > 0 and chunked["compact chunk"] >= 1 and chunked["count chunk"] >= chunked["bisection"]


def test_threshold_simulation_follows_the_kernel_for_large_k():
    # K' > BLOCK_V / 2: no first-block threshold, and a selection with at most K' candidates keeps
    # them all (no bisection): only selections over more than K' candidates bisect.
    sim = rt.replay_iid(params(topk=4096, k_pow2=4096, chunk=1024, keep=4096), "fp32", 1.0, 4)
    assert sim["blocks"]["first block"] == 1 and sim["tightens_per_row"]["stream"] >= 1
    # V = 2 blocks, K = V: every entry passes (thr stays -inf), the first block's 256 runs pass the
    # watermark (192), and neither that selection (2048 candidates) nor the final one (4096) exceeds
    # K' = 4096.
    sim = rt.replay_iid(params(vocab=4096, topk=4096, k_pow2=4096, chunk=1024, keep=4096), "fp32", 1.0, 4)
    assert sim["tightens_per_row"]["stream"] == 1
    for where in ("stream", "final"):
        trips = sim["trips_per_row"][where]
        assert trips["expand chunk"] == 2 and rt.search_steps(trips) == 0 and trips["compact chunk"] == 0


def test_rounding_to_the_launch_dtype_is_torchs():
    x = (np.random.default_rng(1).standard_normal(20000) * 7).astype(np.float32)
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        want = torch.from_numpy(x).to(torch_dtype).float().numpy()
        assert np.array_equal(rt.round_to_dtype(x, dtype), want)
    assert np.array_equal(rt.round_to_dtype(x, "fp32"), x)


def test_ties_at_the_cut_end_the_snapped_search_and_keep_the_lowest_indices():
    # 3 entries above the cut, 4 tied at it, the rest below; keep exactly 5: no key has a count of
    # exactly 5. The search snaps to candidate keys, so it ends at the adjacent pair of distinct
    # values (4, 5) instead of bisecting the ~2^23 int32 keys between them; the two lowest-index ties stay.
    z = np.array([1.0, 4.0, 5.0, 4.0, 1.0, 5.0, 4.0, 4.0, 5.0, 1.0], np.float32)
    keep, thr, trips = rt._tighten_sim(
        z, n_runs=2, thr=0.5, keep_lo=5, keep_hi=5, chunk=512, compact_chunk=128, run=8, tile=512
    )
    assert keep.tolist() == [False, True, True, True, False, True, False, False, True, False]
    assert thr == 4.0
    # Each step removes at least one distinct candidate value from the bracket.
    assert 1 <= trips["tile bisection"] <= len(np.unique(z)) + 1
    assert trips["bisection"] == trips["count chunk"] == trips["compact chunk"] == 0  # 10 candidates: one tile
    # Over more candidates than a tile the same search runs chunked, with the same result.
    keep_chunked, thr_chunked, chunked = rt._tighten_sim(z, 2, 0.5, 5, 5, 4, 4, 4, 8)
    assert keep_chunked.tolist() == keep.tolist() and thr_chunked == thr
    assert chunked["bisection"] == trips["tile bisection"] and chunked["count chunk"] == 3 * chunked["bisection"]
    assert chunked["compact chunk"] == 3 and chunked["tile bisection"] == 0


def test_bf16_ties_do_not_lengthen_the_final_search():
    # bf16 logits tie at the K-th value often; bisecting int32 keys ran those searches to hi - lo = 1
    # (~20 steps at V = 151936). Snapped to candidate keys, bf16 rows (fewer distinct values) search
    # no longer than fp32 rows.
    p = params()
    fp32, bf16 = rt.replay_iid(p, "fp32", 1.0, 16), rt.replay_iid(p, "bf16", 1.0, 16)
    assert rt.search_steps(bf16["trips_per_row"]["final"]) <= rt.search_steps(fp32["trips_per_row"]["final"])


def test_the_spread_between_row_subsets_is_reported():
    sim = rt.replay_iid(params(vocab=32000), "bf16", 1.0, 16)
    spread = sim["spread"]
    assert spread["subsets"] == rt.IID_SUBSETS and spread["rows_per_subset"] == 2
    assert set(spread["tightens_per_row"]) == {"stream", "final"} and spread["tightens_per_row"]["final"] == 0
    assert spread["bisection_per_row"]["final"] > 0  # ties make the final bisection vary between rows
    assert sim["rows"] == 16 and "bf16" in sim["source"]


def _reduce(rows: np.ndarray, p: rt.TopkParams) -> dict:
    """The fixture's own reduction, `reduce_rows` of bench/make_replay_rows.py (a script, loaded from its path)."""
    import importlib.util

    path = FIXTURE.parents[1] / "make_replay_rows.py"
    spec = importlib.util.spec_from_file_location("make_replay_rows", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reduce_rows(rows, p)


def test_reduced_rows_replay_as_the_full_rows():
    p = params(vocab=49152)
    rows = np.stack(rt.iid_rows(p.vocab, 4, "bf16", seed=3))
    fixture = _reduce(rows, p)
    assert fixture["values"].numel() < rows.size / 2
    for full, reduced in zip(rows, rt.dense_rows(fixture)):
        a, b = rt.replay_row(full, p), rt.replay_row(reduced, p)
        seen = (a.blocks, a.trips, a.tightens, a.first_threshold, a.first_search_steps)
        assert seen == (b.blocks, b.trips, b.tightens, b.first_threshold, b.first_search_steps)
    # A floor above the first block's threshold (a fixture made for other launch parameters) is refused,
    # not replayed wrongly: the thresholds of N(0, 3^2) rows lie far below 1000.
    fixture["floor"] = fixture["floor"] + 1000.0
    with pytest.raises(ValueError, match="below the floor"):
        rt.replay_reduced(p, fixture)


@pytest.mark.skipif(not FIXTURE.exists(), reason="bench/fixtures/smollm2_replay_rows.pt not generated")
def test_the_real_rows_fixture_is_small_and_replays():
    assert FIXTURE.stat().st_size < 10e6
    fixture = rt.load_reduced_rows(FIXTURE)
    assert fixture["vocab"] == 49152 and fixture["dtype"] == "bf16"
    p = params(vocab=49152, chunk=1024, block_v=fixture["made_for"]["block_v"], k_pow2=fixture["made_for"]["k_pow2"])
    sim = rt.replay_reduced(p, fixture)
    assert sim["rows"] == fixture["mask"].shape[0] and sim["blocks"]["first block"] == 1
    assert abs(sum(sim["blocks"].values()) - (sim["blocks_per_row"] + sim["restreams_per_row"])) < 1e-9
