"""One compact table from a cost-report JSON: forward and forward + backward per loss variant.

    python bench/cost_summary.py bench/results/cost-report-<date>.json [--vocab 151936] [--gpu H100] [--mix real]

`--mix real`: the top-K forward at the path mix of the report's real rows (`--real-rows`; V = 49,152 only).

Every figure is a prediction of the static SASS model (`python -m sdpo_kernels.cost_report`).
"""

from __future__ import annotations

import argparse
import json


def summary(report: dict, vocab: int, gpu: str, mix: str = "iid") -> str:
    shape = next(s for s in report["shapes"] if s["vocab"] == vocab)
    at, total_key = ("at_real_mix", "total_real_mix") if mix == "real" else ("at_mix", "total")
    if mix == "real" and not any(total_key in e for e in shape["variants"]):
        raise SystemExit(f"no real-row mix at V = {vocab} in this report (made without --real-rows, or V differs)")
    where = "the real rows' path mix for the top-K forward" if mix == "real" else "iid rows' path mix"
    lines = [
        f"Predicted (static SASS model, Triton {report['triton']}, {report['arch']}), {gpu}, "
        f"N = {shape['rows']}, V = {vocab}, {shape['dtype']}, {where}; ratios to the HBM floor:",
        "",
        "| loss | forward: floor / static / latency-aware (ms) | fwd + bwd: floor / static / latency-aware (ms) |",
        "|---|---|---|",
    ]
    for entry in shape["variants"]:
        fwd = [k for k in entry["kernels"] if k["direction"] == "forward"]
        times = [next(v for n, v in k.get(at, k["at_mix"]).items() if gpu in n) for k in fwd]
        keys = ("hbm_floor", "static_bound", "latency_aware")
        f_floor, f_static, f_lat = (sum(t[key] for t in times) for key in keys)
        t = next(v for n, v in entry.get(total_key, entry["total"]).items() if gpu in n)
        f_floor, f_static, f_lat = (1e3 * x for x in (f_floor, f_static, f_lat))  # seconds -> ms
        t = {k: 1e3 * v if not k.endswith("ratio") else v for k, v in t.items()}
        lines.append(
            f"| {entry['name']} | {f_floor:.2f} / {f_static:.2f} ({f_static / f_floor:.1f}×) / "
            f"{f_lat:.2f} ({f_lat / f_floor:.1f}×) | {t['hbm_floor']:.2f} / {t['static_bound']:.2f} "
            f"({t['static_ratio']:.1f}×) / {t['latency_aware']:.2f} ({t['latency_ratio']:.1f}×) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="cost-report JSON")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--gpu", default="H100", help="H100 or H200")
    parser.add_argument("--mix", choices=("iid", "real"), default="iid", help="the top-K forward's path mix")
    args = parser.parse_args(argv)
    with open(args.report) as f:
        print(summary(json.load(f), args.vocab, args.gpu, args.mix))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
