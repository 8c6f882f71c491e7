"""Measured time of each launched Triton kernel next to the cost report's prediction (CUDA only).

    python bench/kernel_timing.py --rows 8192 --vocab 151936 --out bench/results/gpu-<device>-<date>-kernels

For every variant of `sdpo_kernels.cost_report.VARIANTS` it builds real bf16 inputs, takes the
launches `triton_backend.forward_launches` / `backward_launches` would run, times each with
`triton.testing.do_bench` (median), and prints measured ÷ predicted (static bound and latency-aware)
from `cost_report.build_report` for the same launch. Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import torch


def _inputs(rows: int, vocab: int, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    student = (2 * torch.randn(rows, vocab, generator=gen, device=device)).bfloat16()
    teacher = (student.float() + 0.5 * torch.randn(rows, vocab, generator=gen, device=device)).bfloat16()
    ids = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    old = torch.log_softmax(student.float(), -1).gather(-1, ids[:, None]).squeeze(-1)
    return student, teacher, ids, old + 0.5 * torch.randn(rows, generator=gen, device=device)


def measure(rows: int, vocab: int) -> list[dict]:
    import triton.testing

    from sdpo_kernels import cost_report, triton_backend

    student, teacher, ids, old = _inputs(rows, vocab, "cuda")
    out = []
    for variant in cost_report.VARIANTS:
        config = variant.config()
        launches, _, stats = triton_backend.forward_launches(student, teacher, ids, old, config)
        for launch in launches:
            launch.run()  # compile, and the stats the backward reads
        torch.cuda.synchronize()
        grad_loss = torch.ones(rows, device="cuda")
        back, _ = triton_backend.backward_launches(student, teacher, stats, grad_loss, config)
        for direction, group in (("forward", launches), ("backward", back)):
            for launch in group:
                ms = triton.testing.do_bench(launch.run, warmup=25, rep=200)
                out.append(
                    dict(variant=variant.name, direction=direction, kernel=launch.kernel.__name__, measured_ms=ms)
                )
    return out


def predicted(rows: int, vocab: int, gpu_name: str) -> dict:
    from sdpo_kernels import cost_report

    report = cost_report.build_report(rows=rows, vocabs=(vocab,))
    gpu = "H200" if "H200" in gpu_name else "H100"
    table = {}
    for entry in report["shapes"][0]["variants"]:
        for kr in entry["kernels"]:
            mix = next(v for k, v in kr["at_mix"].items() if gpu in k)
            table[(entry["name"], kr["direction"], kr["kernel"])] = mix
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--out", required=True, help="output path without extension")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernel_timing needs a CUDA device")
    import triton

    name = torch.cuda.get_device_name()
    rows = measure(args.rows, args.vocab)
    pred = predicted(args.rows, args.vocab, name)
    lines = [
        f"# Kernel times, measured on {name} ({datetime.date.today()}), N={args.rows}, V={args.vocab}, bf16",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}. Predicted = the static SASS cost report "
        "(`python -m sdpo_kernels.cost_report`) for the same launch.",
        "",
        "| variant | pass | kernel | measured ms | HBM floor ms | measured / floor | predicted static ms | "
        "predicted latency-aware ms | measured / latency-aware |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = pred.get((r["variant"], r["direction"], r["kernel"]), {})
        r.update(predicted={k: p.get(k) for k in ("hbm_floor", "static_bound", "latency_aware")})
        floor, lat = p.get("hbm_floor"), p.get("latency_aware")
        lines.append(
            f"| {r['variant']} | {r['direction']} | {r['kernel']} | {r['measured_ms']:.3f} | "
            f"{floor:.3f} | {r['measured_ms'] / floor:.2f} | {p.get('static_bound', float('nan')):.3f} | "
            f"{lat:.3f} | {r['measured_ms'] / lat:.2f} |"
            if floor and lat
            else f"| {r['variant']} | {r['direction']} | {r['kernel']} | {r['measured_ms']:.3f} | | | | | |"
        )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name, torch=torch.__version__, triton=triton.__version__, date=str(datetime.date.today()))
    out.with_suffix(".json").write_text(
        json.dumps(dict(meta, rows=args.rows, vocab=args.vocab, kernels=rows), indent=1)
    )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
