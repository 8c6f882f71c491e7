"""Measured time of each launched Triton kernel next to the cost report's prediction (CUDA only).

    python bench/kernel_timing.py --rows 8192 --out bench/results/gpu-<device>-<date>-kernels
    python bench/kernel_timing.py --predict-only --rows 8192 --out /tmp/kt-pred     # no GPU: predictions only

For every variant of `sdpo_kernels.cost_report.VARIANTS` and every `--vocab` (default the four
vocabularies the model is checked at: 32000, 49152, 128256, 151936) it builds real bf16 inputs, takes
the launches `triton_backend.forward_launches` / `backward_launches` would run, times each with
`triton.testing.do_bench` (median), and prints measured ÷ predicted (HBM floor, static bound and
latency-aware) from `cost_report.build_report` for the same launch (same N, V, variant), and a table
of measured ÷ predicted latency-aware per vocabulary (the predicted ms in brackets), so one GPU run
tests the model at each V. Writes `<out>.json` and `<out>.md`.

`--predict-only` (no GPU: the cost report compiles without one, TRITON_INTERPRET unset) produces the
same tables with the predicted columns filled and the measured ones empty (`measured_ms` None,
`rewritten` None): the prediction side of the script, testable on CPU.

Every timed launch is checked to have done its work: its outputs (forward: loss, row stats, top-K
index/coef; backward: the gradient) are filled with NaN (int64 outputs with -1) before its timed
batch, and afterwards must hold exactly what the first, untimed run wrote (no NaN / -1 left). A
launch whose `run()` does nothing when repeated (e.g. the top-K row counter left at N from an earlier
run) fails this check: its row says `NOT REWRITTEN` and the script exits 1, whatever its time.

`--dry-run` (no GPU needed; sets TRITON_INTERPRET=1): runs the same launches and checks on CPU
tensors under the Triton interpreter at a tiny shape, without timing or predictions, to test the
check itself: `python bench/kernel_timing.py --dry-run --rows 4 --vocab 300 --out /tmp/kt`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import sys

import torch

# Outputs of each direction's launches, by argument name (the backward's lse/dense/index/coef are
# its inputs: the forward's row stats).
OUTPUTS = {
    "forward": ("loss_ptr", "lse_ptr", "dense_ptr", "index_ptr", "coef_ptr", "lse_teacher_ptr", "weight_ptr"),
    "backward": ("grad_ptr",),
}
INT_SENTINEL = -1  # never a vocabulary index
# The vocabularies a first GPU run checks the cost model at (Llama-2, SmolLM2, Llama-3, Qwen2.5).
VOCABS = (32000, 49152, 128256, 151936)


def _inputs(rows: int, vocab: int, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    student = (2 * torch.randn(rows, vocab, generator=gen, device=device)).bfloat16()
    teacher = (student.float() + 0.5 * torch.randn(rows, vocab, generator=gen, device=device)).bfloat16()
    ids = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    old = torch.log_softmax(student.float(), -1).gather(-1, ids[:, None]).squeeze(-1)
    return student, teacher, ids, old + 0.5 * torch.randn(rows, generator=gen, device=device)


def kernel_name(launch) -> str:
    kernel = launch.kernel
    return getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))


def outputs_of(launch, direction: str) -> dict[str, torch.Tensor]:
    """The output tensors of one launch, by argument name."""
    return {k: v for k in OUTPUTS[direction] if isinstance(v := launch.args.get(k), torch.Tensor)}


def poison(outputs: dict[str, torch.Tensor]) -> None:
    """NaN into float outputs, INT_SENTINEL into integer ones: what a launch that writes nothing leaves."""
    for t in outputs.values():
        t.fill_(math.nan if t.is_floating_point() else INT_SENTINEL)


def _unwritten(t: torch.Tensor) -> torch.Tensor:
    return torch.isnan(t) if t.is_floating_point() else t == INT_SENTINEL


def check_written(outputs: dict[str, torch.Tensor], expected: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Problems with `outputs` after a run that followed `poison`: entries still NaN / INT_SENTINEL
    (where `expected` has a value there, or anywhere when no `expected` is given), and entries that
    differ from `expected` (bitwise; NaN equals NaN). Empty when everything was rewritten."""
    problems = []
    for name, t in outputs.items():
        left = _unwritten(t)
        if expected is not None:
            want = expected[name]
            left &= ~_unwritten(want)
            same = (t == want) | (_unwritten(t) & _unwritten(want)) if t.is_floating_point() else t == want
            differ = int((~same).sum())
        else:
            differ = 0
        n_left = int(left.sum())
        if n_left:
            problems.append(f"{name}: {n_left} of {t.numel()} entries not rewritten")
        elif differ:
            problems.append(f"{name}: {differ} of {t.numel()} entries differ from the first run")
    return problems


def snapshot(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in outputs.items()}


def _variants(patterns: list[str] | None):
    """The cost report's VARIANTS whose name contains one of `patterns` (all without patterns)."""
    from sdpo_kernels import cost_report

    return tuple(v for v in cost_report.VARIANTS if not patterns or any(s in v.name for s in patterns))


def measure(rows: int, vocab: int, device: str = "cuda", timer=None, variants=None) -> list[dict]:
    """One row per launch: variant, direction, kernel, measured_ms (None without `timer`), rewrite problems.

    timer(fn) -> milliseconds (default triton.testing.do_bench's median); None runs each launch twice
    instead (the dry run under the interpreter)."""
    from sdpo_kernels import cost_report, triton_backend

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if timer is None and device == "cuda":
        import triton.testing

        timer = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    student, teacher, ids, old = _inputs(rows, vocab, device)
    out = []
    for variant in cost_report.VARIANTS if variants is None else variants:
        config = variant.config()
        fwd, _, stats = triton_backend.forward_launches(student, teacher, ids, old, config)
        grad_loss = torch.ones(rows, device=device)
        bwd, _ = triton_backend.backward_launches(student, teacher, stats, grad_loss, config)
        groups = (("forward", fwd), ("backward", bwd))
        # The first, untimed run of each group (compiles; the forward writes the stats the backward
        # reads) on poisoned outputs: with these finite inputs every output entry must be written.
        first, expected = {}, {}
        for direction, launches in groups:
            outs = {k: v for launch in launches for k, v in outputs_of(launch, direction).items()}
            poison(outs)
            for launch in launches:
                launch.run()
            sync()
            first[direction] = check_written(outs)
            expected[direction] = snapshot(outs)
        for direction, launches in groups:
            if direction == "backward":  # the stats as the first run left them, whatever the forward timing did
                for launch in fwd:
                    for k, v in outputs_of(launch, "forward").items():
                        v.copy_(expected["forward"][k])
            for launch in launches:
                outs = outputs_of(launch, direction)
                poison(outs)
                if timer is None:
                    launch.run()
                    launch.run()
                    ms = None
                else:
                    ms = timer(launch.run)
                sync()
                problems = [f"first run: {p}" for p in first[direction]]
                problems += check_written(outs, {k: expected[direction][k] for k in outs})
                out.append(
                    dict(
                        variant=variant.name,
                        vocab=vocab,
                        direction=direction,
                        kernel=kernel_name(launch),
                        measured_ms=ms,
                        rewritten=not problems,
                        problems=problems,
                    )
                )
        del fwd, bwd, stats, expected
    return out


def gpu_model_name(device_name: str) -> str:
    """The cost report's GPU for a device name: "H200" for an H200, else "H100" (the report models those two)."""
    return "H200" if "H200" in device_name else "H100"


def predicted(rows: int, vocabs: list[int], gpu_name: str, variants=None) -> dict:
    """(vocab, variant, direction, kernel) -> the cost report's times for that launch, in ms."""
    from sdpo_kernels import cost_report

    variants = cost_report.VARIANTS if variants is None else variants
    report = cost_report.build_report(rows=rows, vocabs=tuple(vocabs), variants=variants)
    gpu = gpu_model_name(gpu_name)
    table = {}
    for shape in report["shapes"]:
        for entry in shape["variants"]:
            for kr in entry["kernels"]:
                mix = next(v for k, v in kr["at_mix"].items() if gpu in k)
                # The report's times are in seconds.
                table[(shape["vocab"], entry["name"], kr["direction"], kr["kernel"])] = {
                    k: mix[k] * 1e3 for k in ("hbm_floor", "static_bound", "latency_aware")
                }
    return table


def prediction_rows(rows: int, vocabs: list[int], gpu_name: str = "H100", variants=None) -> list[dict]:
    """The table rows without a GPU: one per (vocab, variant, direction, kernel) the cost report costs,
    in the order `measure` produces them, with `predicted` filled and `measured_ms` / `rewritten` None."""
    table = predicted(rows, vocabs, gpu_name, variants)
    return [
        dict(
            variant=variant,
            vocab=vocab,
            direction=direction,
            kernel=kernel,
            measured_ms=None,
            rewritten=None,
            problems=[],
            predicted=pred,
        )
        for (vocab, variant, direction, kernel), pred in table.items()
    ]


def _cells_per_vocab(r: dict | None) -> str:
    """measured ÷ predicted latency-aware (predicted ms); without a measurement only the prediction."""
    p = (r or {}).get("predicted") or {}
    lat = p.get("latency_aware")
    if lat is None:
        return ""
    ratio = _ratio(r["measured_ms"], lat)
    return f"{_f(ratio, '.2f')} ({_f(lat)} ms)" if ratio is not None else f"— ({_f(lat)} ms)"


def _f(x, fmt=".3f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def render(rows: list[dict], meta: dict) -> list[str]:
    lines = [
        f"# Kernel times, {'measured on' if any(r['measured_ms'] is not None for r in rows) else 'for'} "
        f"{meta['device']} ({meta['date']}), N={meta['rows']}, "
        f"V={', '.join(map(str, meta['vocabs']))}, bf16",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}. Measured: `triton.testing.do_bench` median. "
        "Predicted = the static SASS cost report (`python -m sdpo_kernels.cost_report`) for the same launch. "
        "`rewritten`: the launch's outputs, NaN-filled before its timed batch, hold the first run's values after it.",
        "",
        "| V | variant | pass | kernel | measured ms | HBM floor ms | measured / floor | predicted static ms | "
        "predicted latency-aware ms | measured / latency-aware | rewritten |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r.get("predicted") or {}
        m = r["measured_ms"]
        if r["rewritten"] is None:
            checked = "— (not run)"
        else:
            checked = "yes" if r["rewritten"] else "NOT REWRITTEN: " + "; ".join(r["problems"])
        lines.append(
            f"| {r['vocab']} | {r['variant']} | {r['direction']} | {r['kernel']} | {_f(m)} | "
            f"{_f(p.get('hbm_floor'))} | {_f(_ratio(m, p.get('hbm_floor')), '.2f')} | {_f(p.get('static_bound'))} | "
            f"{_f(p.get('latency_aware'))} | {_f(_ratio(m, p.get('latency_aware')), '.2f')} | "
            f"{checked} |"
        )
    vocabs = meta["vocabs"]
    lines += [
        "",
        "## Measured ÷ predicted latency-aware, per vocabulary (predicted ms in brackets)",
        "",
        "| variant | pass | kernel | " + " | ".join(f"V={v}" for v in vocabs) + " |",
        "|---|---|---|" + "---|" * len(vocabs),
    ]
    keyed = {(r["variant"], r["direction"], r["kernel"], r["vocab"]): r for r in rows}
    seen = []
    for r in rows:
        key = (r["variant"], r["direction"], r["kernel"])
        if key not in seen:
            seen.append(key)
    for key in seen:
        cells = [_cells_per_vocab(keyed.get((*key, v))) for v in vocabs]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    run = [r for r in rows if r["rewritten"] is not None]
    bad = [f"{r['variant']} {r['direction']} V={r['vocab']}" for r in run if not r["rewritten"]]
    verdict = f"; FAILED: {', '.join(bad)}" if bad else "."
    if run:
        lines += ["", f"Rewrite check: {len(run) - len(bad)} of {len(run)} launches rewrote all their outputs{verdict}"]
    else:
        lines += ["", "Rewrite check: not run (predictions only, no launch ran)."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument(
        "--vocab",
        type=int,
        nargs="+",
        default=list(VOCABS),
        help=f"vocabulary sizes (default {' '.join(map(str, VOCABS))})",
    )
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, no timing (see above)")
    parser.add_argument("--no-predict", action="store_true", help="skip the cost report (no predictions)")
    parser.add_argument(
        "--predict-only", action="store_true", help="no GPU: the cost report's predictions, measured columns empty"
    )
    parser.add_argument("--gpu", default="H100", help="--predict-only: the modelled GPU, H100 or H200 (default H100)")
    parser.add_argument("--variant", action="append", help="only the loss variants whose name contains this")
    args = parser.parse_args(argv)
    variants = _variants(args.variant)
    if args.predict_only:
        os.environ.pop("TRITON_INTERPRET", None)  # the cost report compiles: the interpreter would replace it
        device = None
    elif args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before sdpo_kernels (and its kernels) are imported
        device = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("kernel_timing needs a CUDA device (or --dry-run / --predict-only)")
    else:
        device = "cuda"
    import triton

    if device is None:
        name = f"no device (predictions only, {gpu_model_name(args.gpu)} model): not measured"
        rows = prediction_rows(args.rows, args.vocab, args.gpu, variants)
    else:
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter, dry run: not timed)"
        rows = []
        for vocab in args.vocab:
            rows += measure(args.rows, vocab, device, variants=variants)
        if device == "cuda" and not args.no_predict:
            pred = predicted(args.rows, args.vocab, name, variants)
            for r in rows:
                r["predicted"] = pred.get((r["vocab"], r["variant"], r["direction"], r["kernel"]))
    meta = dict(
        device=name,
        torch=torch.__version__,
        triton=triton.__version__,
        date=str(datetime.date.today()),
        rows=args.rows,
        vocabs=args.vocab,
    )
    lines = render(rows, meta)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta, kernels=rows), indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["rewritten"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
