"""One compact table from a cost-report JSON: forward and forward + backward per loss variant.

    python bench/cost_summary.py bench/results/cost-report-<date>.json [--vocab 151936] [--gpu H100]

Every figure is a prediction of the static SASS model (`python -m sdpo_kernels.cost_report`).
"""

from __future__ import annotations

import argparse
import json


def summary(report: dict, vocab: int, gpu: str) -> str:
    shape = next(s for s in report["shapes"] if s["vocab"] == vocab)
    lines = [
        f"Predicted (static SASS model, Triton {report['triton']}, {report['arch']}), {gpu}, "
        f"N = {shape['rows']}, V = {vocab}, {shape['dtype']}; ratios to the HBM floor:",
        "",
        "| loss | forward: floor / static / latency-aware (ms) | fwd + bwd: floor / static / latency-aware (ms) |",
        "|---|---|---|",
    ]
    for entry in shape["variants"]:
        fwd = [k for k in entry["kernels"] if k["direction"] == "forward"]
        f_floor = sum(next(v for n, v in k["at_mix"].items() if gpu in n)["hbm_floor"] for k in fwd)
        f_static = sum(next(v for n, v in k["at_mix"].items() if gpu in n)["static_bound"] for k in fwd)
        f_lat = sum(next(v for n, v in k["at_mix"].items() if gpu in n)["latency_aware"] for k in fwd)
        t = next(v for n, v in entry["total"].items() if gpu in n)
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
    args = parser.parse_args(argv)
    with open(args.report) as f:
        print(summary(json.load(f), args.vocab, args.gpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
