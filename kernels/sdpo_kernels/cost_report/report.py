"""The report as data: per kernel of each launch its compile facts, loops, paths (their costs and the
times if every iteration took them) and the times at the path mix (`kernel_report`), and the whole
report over vocabularies × loss variants (`build_report`), the JSON the CLI writes."""

from __future__ import annotations

import dataclasses
import datetime

from .analysis import analyze
from .compile import unwrap_kernel
from .hardware import GPUS, H100, LATENCY, PREDICTED
from .launch_time import Timing, time_model
from .launches import VARIANTS, variant_launches
from .path_labels import replays
from .structure import KernelAnalysis, PathCost


def _timing_dict(t: Timing) -> dict:
    d = dataclasses.asdict(t)
    d["static_ratio"] = t.static_ratio
    d["latency_ratio"] = t.latency_ratio
    return d


def kernel_report(ka: KernelAnalysis, direction: str, real_rows=None, arch: int = 90) -> dict:
    """One kernel of a launch as a dictionary; `real_rows`: a replay-rows fixture to replay next to the iid
    rows (its times at that mix as "at_real_mix", where the fixture matches the launch)."""
    comp = ka.compiled
    per_elem = 1.0 / ka.elems_per_thread
    rep = replays(ka.name, ka.launch, ka, real_rows)
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
        **_real_mix_times(ka, rep, arch),
        "warnings": ka.warnings,
        "replay": rep,
    }


def _real_mix_times(ka: KernelAnalysis, rep: dict, arch: int) -> dict:
    """{"at_real_mix": times per GPU} at the real rows' path mix, when the replay has real rows."""
    if "real" not in rep:
        return {}
    real = analyze(ka.launch, ka.rows, ka.vocab, arch, replay=rep["real"])
    return {"at_real_mix": {g.name: _timing_dict(time_model(real, g)) for g in GPUS}}


def _total(kernels: list[dict], mix: str = "at_mix") -> dict:
    """Floor, static and latency-aware sums over a variant's kernels per GPU, at `mix` where a kernel has
    it (the real-row mix: the top-K forward), else at its iid mix."""
    total = {}
    for g in GPUS:
        times = [kr.get(mix, kr["at_mix"])[g.name] for kr in kernels]
        t = {k: sum(x[k] for x in times) for k in ("hbm_floor", "static_bound", "latency_aware")}
        t["static_ratio"] = t["static_bound"] / t["hbm_floor"]
        t["latency_ratio"] = t["latency_aware"] / t["hbm_floor"]
        total[g.name] = t
    return total


def build_report(
    rows: int = 8192,
    vocabs=(32000, 151936),
    dtype: str = "bf16",
    arch: int = 90,
    variants=VARIANTS,
    log=None,
    real_rows=None,
) -> dict:
    """The report over `vocabs` × `variants` ([rows, V] logits of `dtype`, compiled for `arch`); `real_rows`:
    a replay-rows fixture (bench/fixtures/smollm2_replay_rows.pt) whose top-K replay is reported next to
    the iid one where V and dtype match."""
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
                        log(f"V={vocab} {v.name}: {direction} {unwrap_kernel(launch.kernel).__name__}")
                    kernels.append(kernel_report(analyze(launch, rows, vocab, arch), direction, real_rows, arch))
            total = _total(kernels)
            entry = {"variant": dataclasses.asdict(v), "name": v.name, "kernels": kernels, "total": total}
            if any("at_real_mix" in kr for kr in kernels):
                entry["total_real_mix"] = _total(kernels, "at_real_mix")
            entries.append(entry)
        shapes.append({"rows": rows, "vocab": vocab, "dtype": dtype, "variants": entries})
    return {
        "title": "Static cost report of the SDPO Triton kernels",
        "note": f"All times are {PREDICTED}.",
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__,
        "arch": f"sm_{arch}a" if arch >= 90 else f"sm_{arch}",
        "gpus": [dataclasses.asdict(g) for g in GPUS],
        "latency_cycles": dict(LATENCY),
        "real_rows": str(real_rows) if real_rows is not None else None,
        "shapes": shapes,
    }
