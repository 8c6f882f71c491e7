"""Render pytest-benchmark JSON results as a markdown table and a PNG plot.

    python bench/render.py                      # every bench/results/*.json
    python bench/render.py bench/results/cpu-2026-11-22.json [--baseline trl_eager]
    python bench/render.py a.json b.json --out bench/results/gpu-h100-2026-11-22   # merged

For each JSON file, writes `<stem>.md` and `<stem>.png` next to it. Generic over suites: rows are
grouped by the benchmark `group`; within a group, `extra_info` supplies the implementation
(`impl`), the shape (any of N, V, D, K), `dtype`, `peak_mem_bytes` and optionally `floor_bytes` /
`peak_bw_gbps` (memory-traffic floor) -- missing fields are left blank. The speedup column is
the baseline implementation's median time over the row's median, at the same shape and dtype.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE_KEYS = ("N", "V", "D", "K")
DEFAULT_BASELINES = ("trl_eager", "trl", "torch_eager", "eager", "torch")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp64": 8, "float64": 8}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def norm_dtype(d) -> str:
    d = str(d or "").replace("torch.", "")
    return DTYPE_SHORT.get(d, d)


def load_rows(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    rows = []
    for b in data.get("benchmarks", []):
        ei = dict(b.get("extra_info") or {})
        params = b.get("params") or {}
        for k in SHAPE_KEYS:
            if k not in ei and k in params:
                ei[k] = params[k]
        shape = tuple((k, ei[k]) for k in SHAPE_KEYS if ei.get(k) is not None)
        dtype = norm_dtype(ei.get("dtype") or params.get("dtype"))
        st = b["stats"]
        peak = ei.get("peak_mem_bytes")
        nv = None
        if peak is not None:
            if ei.get("peak_mem_nv") is not None:
                nv = ei["peak_mem_nv"]
            elif ei.get("N") and ei.get("V") and dtype in DTYPE_BYTES:
                nv = peak / (ei["N"] * ei["V"] * DTYPE_BYTES[dtype])
        rows.append(
            {
                "group": b.get("group") or "(no group)",
                "impl": ei.get("impl") or params.get("impl") or b["name"],
                "shape": shape,
                "shape_str": " ".join(f"{k}={v}" for k, v in shape) or b.get("param") or b["name"],
                "dtype": dtype,
                "device_name": ei.get("device_name", ""),
                "mean": st["mean"],
                "median": st["median"],
                "min": st["min"],
                "stddev": st["stddev"],
                "rounds": st["rounds"],
                "peak": peak,
                "peak_nv": nv,
                "floor_bytes": ei.get("floor_bytes"),
                "bw": ei.get("peak_bw_gbps"),
                "extra": ei,
            }
        )
    return data, rows


def add_speedups(rows: list[dict], baselines: tuple[str, ...]) -> dict[str, str | None]:
    """Set row['speedup'] (baseline median / median); returns the baseline impl per group."""
    by_group = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r)
    chosen = {}
    for group, grows in by_group.items():
        impls = {r["impl"] for r in grows}
        base = next((b for b in baselines if b in impls), None)
        chosen[group] = base
        ref = {(r["shape"], r["dtype"]): r["median"] for r in grows if r["impl"] == base}
        for r in grows:
            t = ref.get((r["shape"], r["dtype"]))
            r["speedup"] = t / r["median"] if t else None
    return chosen


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt(x, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def machine_lines(data: dict) -> list[str]:
    mi = data.get("machine_info", {})
    sb = mi.get("sdpo_bench", {})
    cpu = mi.get("cpu", {})
    lines = [
        f"- device: **{sb.get('device_name') or cpu.get('brand_raw') or mi.get('processor', '?')}**",
        f"- date: {sb.get('date') or data.get('datetime', '?')}",
    ]
    if sb.get("versions"):
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sb["versions"].items() if v))
    else:
        lines.append(f"- python {mi.get('python_version', '?')}")
    if sb.get("peak_bw_gbps"):
        bw, src = sb["peak_bw_gbps"], sb.get("peak_bw_source")
        lines.append(f"- peak memory bandwidth used for the floor: {bw} GB/s ({src})")
    if sb.get("torch_num_threads"):
        lines.append(f"- torch threads: {sb['torch_num_threads']}")
    commit = data.get("commit_info", {})
    if commit.get("id"):
        lines.append(f"- commit: {commit['id'][:12]}{' (dirty)' if commit.get('dirty') else ''}")
    return lines


def group_table(grows: list[dict], base: str | None) -> list[str]:
    has_floor = any(r["floor_bytes"] for r in grows)
    head = ["impl", "shape", "dtype", "mean", "median", "min", "rounds", f"speedup vs {base or '-'}"]
    head += ["extra peak mem", "peak / [N,V] (input dtype)"]
    if has_floor:
        head += ["GB/s (floor bytes / median)", "median / floor time"]
    has_load = any(r["extra"].get("loadavg_1min") for r in grows)
    if has_load:
        head += ["load avg (before, after)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(grows, key=lambda r: (r["dtype"], r["shape"], r["median"])):
        peak = r["peak"]
        cells = [
            r["impl"],
            r["shape_str"],
            r["dtype"],
            fmt_time(r["mean"]),
            fmt_time(r["median"]),
            fmt_time(r["min"]),
            str(r["rounds"]),
            fmt(r["speedup"], ".2f") + ("×" if r["speedup"] else ""),
            "" if peak is None else f"{peak / 2**30:.3f} GiB",
            fmt(r["peak_nv"], ".2f"),
        ]
        if has_floor:
            fb = r["floor_bytes"]
            cells.append(fmt(fb / r["median"] / 1e9 if fb else None, ".1f"))
            cells.append(fmt(r["median"] / (fb / (r["bw"] * 1e9)) if fb and r["bw"] else None, ".2f"))
        if has_load:
            load = r["extra"].get("loadavg_1min")
            cells.append(", ".join(f"{x:.1f}" for x in load) if load else "")
        out.append("| " + " | ".join(cells) + " |")
    return out


def loss_goal_lines(rows: list[dict]) -> list[str]:
    """The issue's goals for the logits-level loss, shown (never asserted) where measured."""
    idx = {(r["impl"], r["shape"], r["dtype"]): r for r in rows if r["extra"].get("suite") == "loss"}

    def get(impl, n, v, dtype):
        return idx.get((impl, (("N", n), ("V", v), ("K", 100)), dtype))

    out = []
    tri, trl, comp = (get(i, 8192, 151936, "bf16") for i in ("triton", "trl_eager", "trl_compiled"))
    if tri:
        lines = []
        if trl:
            lines.append(f"fwd+bwd speedup vs TRL eager: {trl['median'] / tri['median']:.2f}× (goal ≥ 5×)")
        if comp:
            lines.append(f"fwd+bwd speedup vs torch.compile: {comp['median'] / tri['median']:.2f}× (goal ≥ 2×)")
        if tri["floor_bytes"] and tri["bw"]:
            ratio = tri["median"] / (tri["floor_bytes"] / (tri["bw"] * 1e9))
            lines.append(f"median / memory-traffic floor at {tri['bw']} GB/s: {ratio:.2f} (goal ≤ 1.5)")
        if tri["peak_nv"] is not None:
            lines.append(f"extra peak memory: {tri['peak_nv']:.3f} bf16 [N,V] (goal ≤ 1.0)")
        out.append("- GPU, Triton, N=8192 V=151936 K=100 bf16: " + "; ".join(lines))
    ref, trl = get("reference", 2048, 151936, "fp32"), get("trl_eager", 2048, 151936, "fp32")
    if ref:
        s = "- CPU, reference, N=2048 V=151936 K=100 fp32: "
        s += f"extra peak memory {ref['peak_nv']:.2f} fp32 [N,V] (goal ≤ 1.5)"
        if trl:
            s += f"; TRL eager {trl['peak_nv']:.2f}"
            s += f"; time reference / TRL eager = {ref['median'] / trl['median']:.2f} (goal ≤ 1)"
        out.append(s)
    if out:
        out = ["## Issue goals (shown, not asserted)", "", *out, ""]
    return out


def labels(rows: list[dict]) -> list[str]:
    seen = {}
    for r in rows:
        if r["extra"].get("impl_label"):
            seen.setdefault(r["impl"], r["extra"]["impl_label"])
    if not seen:
        return []
    return ["## Implementations", "", *[f"- `{k}`: {v}" for k, v in sorted(seen.items())], ""]


def loaded(data: dict, rows: list[dict]) -> bool:
    """Whether the load average reached 3/4 of the logical CPUs during some timed rounds."""
    cpus = os_cpus(data)
    return bool(cpus) and any(max(r["extra"].get("loadavg_1min") or [0]) > 0.75 * cpus for r in rows)


def os_cpus(data: dict) -> int | None:
    cpu = data.get("machine_info", {}).get("cpu", {})
    return cpu.get("count") or data.get("machine_info", {}).get("sdpo_bench", {}).get("logical_cpus")


def is_cpu(data: dict, rows: list[dict]) -> bool:
    kind = data.get("machine_info", {}).get("sdpo_bench", {}).get("device_kind")
    return kind == "cpu" or (kind is None and all(r["extra"].get("device", "cpu") == "cpu" for r in rows))


def render_markdown(path: Path, data: dict, rows: list[dict], chosen: dict) -> str:
    cpu = is_cpu(data, rows)
    title = f"# Benchmarks: {path.stem} ({'CPU — not GPU numbers' if cpu else 'GPU'})"
    lines = [title, "", *machine_lines(data), ""]
    lines.append(
        "Times are forward+backward per call (pytest-benchmark, 1 iteration per round). "
        "Extra peak memory is measured on top of the live inputs (see bench/README.md for the method); "
        "`peak / [N,V]` divides it by the bytes of one [N, V] tensor in the input dtype."
    )
    if loaded(data, rows):
        lines += [
            "",
            "**Load warning**: the 1-minute load average during some timed rounds was close to or above the "
            "number of logical CPUs (other processes shared the machine); those times are inflated and noisy. "
            "Memory numbers are unaffected.",
        ]
    lines.append("")
    lines += loss_goal_lines(rows)
    by_group = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r)
    for group in sorted(by_group):
        lines += [f"## {group}", "", *group_table(by_group[group], chosen.get(group)), ""]
    lines += labels(rows)
    return "\n".join(lines)


def render_png(path: Path, data: dict, rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_group = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r)
    groups = sorted(by_group)
    fig, axes = plt.subplots(len(groups), 2, figsize=(14, 4.8 * len(groups)), squeeze=False)
    device = data.get("machine_info", {}).get("sdpo_bench", {}).get("device_name", "")
    tag = "CPU" if is_cpu(data, rows) else "GPU"
    note = " — machine shared during timing (high load): times noisy" if loaded(data, rows) else ""
    fig.suptitle(f"{path.stem} [{tag}] — {device}{note}", fontsize=11)
    for gi, group in enumerate(groups):
        grows = by_group[group]
        shapes = sorted({(r["shape"], r["dtype"]) for r in grows})
        impls = sorted({r["impl"] for r in grows})
        width = 0.8 / max(len(impls), 1)
        xt = [f"{' '.join(f'{k}={v}' for k, v in s)}\n{d}" for s, d in shapes]
        for col, (key, ylabel, log) in enumerate(
            (("median", "median fwd+bwd time (s, log)", True), ("peak_nv", "extra peak mem / [N,V] input dtype", False))
        ):
            ax = axes[gi][col]
            for ii, impl in enumerate(impls):
                vals = {(r["shape"], r["dtype"]): r[key] for r in grows if r["impl"] == impl}
                xs = [si + (ii - (len(impls) - 1) / 2) * width for si in range(len(shapes))]
                ys = [vals.get(s) or 0.0 for s in shapes]
                bars = ax.bar(xs, ys, width, label=impl)
                for b, y in zip(bars, ys):
                    if y:
                        txt = fmt_time(y) if key == "median" else f"{y:.2f}"
                        ax.annotate(
                            txt,
                            (b.get_x() + b.get_width() / 2, y),
                            ha="center",
                            va="bottom",
                            fontsize=7,
                            rotation=90 if key == "median" else 0,
                            xytext=(0, 2),
                            textcoords="offset points",
                        )
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(xt, fontsize=8)
            ax.set_ylabel(ylabel)
            if log:
                ax.set_yscale("log")
                ax.margins(y=0.3)
            else:
                ax.margins(y=0.15)
            ax.set_title(f"{group}: {'time' if log else 'peak memory'}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def render(paths: list[Path], baselines: tuple[str, ...], out: Path | None = None) -> tuple[Path, Path]:
    """Render one JSON next to itself, or several merged into `out` (.md/.png; machine info of the first)."""
    data, rows = load_rows(paths[0])
    for p in paths[1:]:
        rows += load_rows(p)[1]
    path = out or paths[0]
    chosen = add_speedups(rows, baselines)
    md, png = path.with_suffix(".md"), path.with_suffix(".png")
    md.write_text(render_markdown(path, data, rows, chosen) + "\n")
    if rows:
        render_png(path, data, rows, png)
    return md, png


def _is_benchmark_json(path: Path) -> bool:
    try:
        return "benchmarks" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, help="JSON files or folders (default: bench/results)")
    ap.add_argument(
        "--baseline", action="append", help="baseline impl for the speedup column (repeatable, first found wins)"
    )
    ap.add_argument("--out", type=Path, help="merge all inputs into OUT.md / OUT.png instead of one pair per JSON")
    args = ap.parse_args(argv)
    baselines = tuple(args.baseline) if args.baseline else DEFAULT_BASELINES
    files = []
    for p in args.paths or [RESULTS]:
        # Folders: pytest-benchmark results only (cost-report-* and cpu-trainer-* have their own renderers).
        files += sorted(f for f in p.glob("*.json") if _is_benchmark_json(f)) if p.is_dir() else [p]
    if args.out:
        md, png = render(files, baselines, args.out)
        print(f"{len(files)} files -> {md}, {png}")
        return
    for f in files:
        md, png = render([f], baselines)
        print(f"{f} -> {md.name}, {png.name}")


if __name__ == "__main__":
    main()
