"""The markdown rendering of a `build_report` dictionary (the CLI's stdout and `cost-report-<date>.md`)."""

from __future__ import annotations

from .hardware import GPUS, PREDICTED
from .sass import CLASSES

CLASS_ABBR = {
    "fp32": "fp32",
    "int": "int",
    "mufu": "mufu",
    "conv": "cvt",
    "gmem": "gmem",
    "smem": "smem",
    "sync": "shfl/bar",
    "ctrl": "ctrl",
    "other": "other",
}


def _ms(x: float) -> str:
    return f"{x * 1e3:.3g}"


def _pair(d: dict, key: str, fmt=_ms) -> str:
    return " / ".join(fmt(d[g.name][key]) for g in GPUS)


def _ratio(x: float) -> str:
    return f"{x:.1f}×"


def _classes(per_elem: dict) -> str:
    return " · ".join(f"{CLASS_ABBR[c]} {per_elem[c]:.3g}" for c in CLASSES if per_elem.get(c, 0) >= 0.005)


def _limiter(t: dict) -> str:
    names = [t[g.name]["limiter"] for g in GPUS]
    return names[0] if len(set(names)) == 1 else " / ".join(names)


def render_markdown(report: dict) -> str:
    gpus = " / ".join(g["name"] for g in report["gpus"])
    bandwidths = ", ".join(f"{g['name']} {g['hbm_bytes_per_s'] / 1e12:g} TB/s" for g in report["gpus"])
    lat = ", ".join(f"{k} {v}" for k, v in report["latency_cycles"].items())
    out = [
        f"# {report['title']} ({report['date']})",
        "",
        f"**All times are {PREDICTED}.** Triton {report['triton']}, {report['arch']} SASS of each kernel as the "
        f"launcher launches it. Time pairs are {gpus} in ms; ratios are to the HBM floor.",
        "",
        f"- HBM floor: bytes of the [N, V] tensors each kernel streams (+ row statistics) / bandwidth ({bandwidths}).",
        "- static bound: max(HBM floor, warp-instructions / (SMs · 4 schedulers · clock), MUFU pipe "
        "(16 lanes/clk/SM), INT/ALU pipe (integer, logic, compare, select but not IMAD: 64 lanes/clk/SM)); "
        "132 SMs at 1.755 GHz; the binding term in brackets.",
        "- latency-aware: per loop iteration max(one warp's in-order dependent critical path, issue/pipe cycles "
        "of all resident warps, HBM share), at the real CTAs per SM, in waves of SMs · CTAs programs (a partial last "
        "wave at its own concurrency); "
        f"latencies (cycles): {lat}.",
        "- path rows: per thread per vocabulary element, and the times if every iteration took that path; "
        "**mix** rows weight the paths by `path_mix` (iid logits for the top-K filter) and add the code outside "
        "the streaming loop ('outside loops': once per row) and the inner loops' extra iterations; **mix of the "
        "real rows** rows (where `--real-rows` matches V and dtype) the same at the replay of those rows.",
        "",
    ]
    for shape in report["shapes"]:
        n, v = shape["rows"], shape["vocab"]
        out += [f"## N = {n}, V = {v}, {shape['dtype']}", ""]
        out.append(
            "| mode | kernel | path | mix | regs | CTAs/SM | instr/elem | by class (per elem) | B/elem "
            "| crit. path cyc/iter | floor ms | static bound ms | ratio | latency-aware ms | ratio |"
        )
        out.append("|" + "---|" * 15)
        inner = []
        for entry in shape["variants"]:
            for kr in entry["kernels"]:
                kname = f"{kr['direction']} `{kr['kernel']}`"
                ctas = str(kr["ctas_per_sm"][report["gpus"][0]["name"]])
                regs = f"{kr['registers']}" + (f" ({kr['local_bytes']} B spill)" if kr["local_bytes"] else "")
                row = f"| {entry['name']} | {kname} |"
                for lp in kr["loops"]:
                    for p in lp["paths"]:
                        if p["fraction"] <= 0 and len(lp["paths"]) > 1:
                            continue
                        t = p["if_every_iteration"]
                        label = p["label"]
                        if len(kr["loops"]) > 1:
                            label = f"{lp['label']}: {label}"
                        if p["sass_paths_with_label"] > 1:
                            label += f" (heaviest of {p['sass_paths_with_label']})"
                        if p["inner_loops"]:
                            label += " ⟲ " + ", ".join(p["inner_loops"])
                        out.append(
                            f"{row} {label} | {p['fraction']:.3f} | {regs} | {ctas} "
                            f"| {p['per_elem']['instrs']:.1f} | {_classes(p['per_elem'])} | {lp['bytes_per_elem']:g} "
                            f"| {p['critical_cycles_per_iter']} | {_pair(t, 'hbm_floor')} | {_pair(t, 'static_bound')} "
                            f"| {_pair(t, 'static_ratio', _ratio)} | {_pair(t, 'latency_aware')} "
                            f"| {_pair(t, 'latency_ratio', _ratio)} |"
                        )
                    hidden = sum(1 for p in lp["paths"] if p["fraction"] <= 0)
                    if hidden and len(lp["paths"]) > 1:
                        note = f"({hidden} more SASS paths, not in the mix: see the JSON)"
                        out.append(f"{row} {note} | 0 | | | | | | | | | | | |")
                o = kr["outside_loops_per_row"]
                per_row = " · ".join(f"{CLASS_ABBR[c]} {o['by_class'][c]}" for c in CLASSES if o["by_class"][c])
                out.append(
                    f"{row} outside loops, per row: {o['instrs']} instr ({per_row}) | — | {regs} | {ctas} "
                    f"| {o['per_elem']['instrs']:.2f} | | — | {o['critical_cycles']} | | | | | |"
                )
                t = kr["at_mix"]
                out.append(
                    f"{row} **mix** | 1 | {regs} | {ctas} | | | {kr['hbm_bytes_per_elem']:g} | "
                    f"| {_pair(t, 'hbm_floor')} | **{_pair(t, 'static_bound')}** ({_limiter(t)}) "
                    f"| {_pair(t, 'static_ratio', _ratio)} "
                    f"| **{_pair(t, 'latency_aware')}** | {_pair(t, 'latency_ratio', _ratio)} |"
                )
                if "at_real_mix" in kr:
                    t = kr["at_real_mix"]
                    out.append(
                        f"{row} **mix of the real rows** | 1 | {regs} | {ctas} | | | {kr['hbm_bytes_per_elem']:g} | "
                        f"| {_pair(t, 'hbm_floor')} | **{_pair(t, 'static_bound')}** ({_limiter(t)}) "
                        f"| {_pair(t, 'static_ratio', _ratio)} "
                        f"| **{_pair(t, 'latency_aware')}** | {_pair(t, 'latency_ratio', _ratio)} |"
                    )
                for lo in kr["other_loops"]:
                    inner.append(
                        f"| {entry['name']} | {kname} | {lo['label']} | {lo['inside'] or '—'} | {lo['where']} "
                        f"| {lo['instrs_per_iter']} | {lo['critical_cycles_per_iter']} "
                        f"| {lo['extra_iterations_per_row']:g} |"
                    )
            for key, what in (("total", "forward + backward"), ("total_real_mix", "forward + backward, real rows")):
                if key not in entry:
                    continue
                t = entry[key]
                out.append(
                    f"| {entry['name']} | **{what}** | | | | | | | | | {_pair(t, 'hbm_floor')} "
                    f"| **{_pair(t, 'static_bound')}** | {_pair(t, 'static_ratio', _ratio)} "
                    f"| **{_pair(t, 'latency_aware')}** | {_pair(t, 'latency_ratio', _ratio)} |"
                )
        if inner:
            out += [
                "",
                "Other loops (inner loops appear collapsed in the paths above, counted once; code outside the "
                "streaming loop counts each of its loops once per row; `row_extras` adds the iterations beyond; "
                "a loop around the stream, e.g. the restream loop, is costed by its own code):",
                "",
                "| mode | kernel | loop | inside | source | instr/iter (heaviest path) | crit. path cyc/iter "
                "| extra iterations/row |",
                "|" + "---|" * 8,
                *inner,
            ]
        out += _replay_table(shape)
        notes = sorted(
            {f"{kr['kernel']}: {w}" for e in shape["variants"] for kr in e["kernels"] for w in kr["warnings"]}
        )
        if notes:
            out += ["", "Warnings:"] + [f"- {w}" for w in notes]
        out.append("")
    return "\n".join(out)


def _search_steps(trips: dict) -> float:
    """A selection's threshold-search steps, in registers ("tile bisection") or chunked ("bisection")."""
    return trips.get("tile bisection", 0.0) + trips.get("bisection", 0.0)


def _mean_spread(mean: float, spread: float | None) -> str:
    return f"{mean:.2f}" if spread is None else f"{mean:.2f} ± {spread:.2f}"


def _replay_table(shape: dict) -> list[str]:
    """The replays behind the top-K path mix (iid rows, and real rows where given), one row per distinct
    replay with the modes that share it."""
    seen: dict[str, tuple[dict, list[str]]] = {}
    for entry in shape["variants"]:
        for kr in entry["kernels"]:
            for kind in ("iid", "real"):
                rep = kr.get("replay", {}).get(kind)
                if rep is not None:
                    key = repr(rep)
                    seen.setdefault(key, (rep, []))[1].append(entry["name"])
    if not seen:
        return []
    out = [
        "",
        "Top-K forward path mix: the kernel's decisions replayed on sample rows (`replay_topk`), per row; "
        "± is the standard deviation of the means of equal row subsets (the mix above uses the iid rows):",
        "",
        "| rows | modes | subsets | blocks/row: first block · append · skip | mid-row tightenings/row "
        "| bisection steps/row: mid-row | final |",
        "|---|---|---|---|---|---|---|",
    ]
    for rep, names in seen.values():
        spread = rep.get("spread", {})
        has = "tightens_per_row" in spread
        sub = f"{spread['subsets']} × {spread['rows_per_subset']}" if has else "—"
        blocks = " · ".join(
            _mean_spread(rep["blocks"].get(k, 0.0), spread["blocks"].get(k, 0.0) if has else None)
            for k in ("first block", "append", "skip")
        )
        tight_spread = spread["tightens_per_row"]["stream"] if has else None
        tight = _mean_spread(rep["tightens_per_row"].get("stream", 0.0), tight_spread)
        bis = [
            _mean_spread(_search_steps(rep["trips_per_row"][w]), spread["bisection_per_row"][w] if has else None)
            for w in ("stream", "final")
        ]
        out.append(f"| {rep['source']} | {', '.join(names)} | {sub} | {blocks} | {tight} | {bis[0]} | {bis[1]} |")
    return out
