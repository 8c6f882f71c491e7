"""Triton backend against the reference backend on the same inputs, every cost-report variant (run before timing).

    python bench/gpu_selfcheck.py --out bench/results/gpu-<device>-<date>-selfcheck     # CUDA: N=256,
        # V in {151936, 32003}, bf16 and fp32, 6 variants = 24 cases, --jobs 8 processes (compiles in parallel)
    python bench/gpu_selfcheck.py --tiny                                                # CPU, TRITON_INTERPRET=1

For each variant of `sdpo_kernels.cost_report.VARIANTS` x vocabulary x logits dtype, on one set of
inputs (student 2·N(0,1), teacher student + 0.5·N(0,1), rollout log-probs near the current ones so
that some IS weights clip, a random upstream gradient per row):

- the public API: `self_distillation_loss(..., backend="triton")` vs `backend="reference"`, the
  per-token loss and the autograd gradient w.r.t. the student logits;
- the per-row stats the forward saves (`triton_backend.forward` vs `reference.forward`): the student
  LSE, the dense coefficient, the sparse support (as index sets: ties resolve to the lowest index
  in both) and its coefficients (aligned by index), and for full_logits the teacher LSE and IS weight.

Tolerances are tests/tolerances.py's (float32 compute): "f32_vs_f32" for every float32 quantity and
`grad_kind(dtype)` for the gradient, widened with the vocabulary (`tol(..., vocab=V)`); NaN must sit
at the same entries in both. Prints one line per case and a table of every quantity out of
tolerance; exits 1 if any is (2 if a case raised). `--out` writes `<out>.json` / `<out>.md`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import sys
import time
import traceback

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tolerances.py

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def make_inputs(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    student = (2 * torch.randn(rows, vocab, generator=gen, device=device)).to(dtype)
    teacher = (student.float() + 0.5 * torch.randn(rows, vocab, generator=gen, device=device)).to(dtype)
    ids = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    logp = torch.log_softmax(student.float(), -1).gather(-1, ids[:, None]).squeeze(-1)
    old = logp + 0.7 * torch.randn(rows, generator=gen, device=device)
    upstream = torch.rand(rows, generator=gen, device=device)
    return student, teacher, ids, old, upstream


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, kind: str, vocab: int) -> dict:
    """max |a - b| / (atol + rtol·|b|) over the entries (<= 1 passes, as torch.testing.assert_close), NaN placement."""
    from tolerances import tol

    t = tol(kind, vocab=vocab)
    a, b = actual.detach().double(), expected.detach().double()  # on their device: no [N, V] copies to the host
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    nan_mismatch = int((nan_a != nan_b).sum())
    both = ~(nan_a | nan_b)
    a, b = a[both], b[both]
    inf_mismatch = int(((torch.isinf(a) | torch.isinf(b)) & (a != b)).sum())
    finite = torch.isfinite(a) & torch.isfinite(b)
    diff = (a[finite] - b[finite]).abs()
    bound = t["atol"] + t["rtol"] * b[finite].abs()
    ratio = float((diff / bound).max()) if diff.numel() else 0.0
    ok = nan_mismatch == 0 and inf_mismatch == 0 and ratio <= 1.0
    return dict(
        quantity=name,
        kind=kind,
        rtol=t["rtol"],
        atol=t["atol"],
        max_abs=float(diff.max()) if diff.numel() else 0.0,
        ratio=ratio,
        nan_mismatch=nan_mismatch,
        inf_mismatch=inf_mismatch,
        ok=ok,
    )


def check_case(variant_index: int, dtype_name: str, rows: int, vocab: int, device: str) -> dict:
    """One (variant, dtype, vocab) case; returns its comparisons (or the error it raised)."""
    from sdpo_kernels import cost_report, reference, self_distillation_loss, triton_backend

    from tolerances import grad_kind

    variant = cost_report.VARIANTS[variant_index]
    dtype = DTYPES[dtype_name]
    case = dict(variant=variant.name, dtype=dtype_name, rows=rows, vocab=vocab)
    t0 = time.perf_counter()
    try:
        student, teacher, ids, old, upstream = make_inputs(
            rows, vocab, dtype, device, seed=1000 * variant_index + vocab
        )
        kw = dict(
            mode=variant.mode,
            topk=variant.topk or None,
            alpha=variant.alpha,
            add_tail=variant.add_tail,
            is_clip=variant.is_clip,
            temperature=variant.temperature,
        )
        results = {}
        for backend in ("triton", "reference"):
            z = student.detach().clone().requires_grad_()
            loss = self_distillation_loss(z, teacher, ids, old, backend=backend, **kw)
            (loss * upstream).sum().backward()
            results[backend] = (loss.detach(), z.grad)
        config = variant.config()
        _, st_tri = triton_backend.forward(student, teacher, ids, old, config)
        _, st_ref = reference.forward(student, teacher, ids, old, config)
        if device == "cuda":
            torch.cuda.synchronize()
        f32 = "f32_vs_f32"
        comps = [
            compare("loss", results["triton"][0], results["reference"][0], f32, vocab),
            compare("grad", results["triton"][1].float(), results["reference"][1].float(), grad_kind(dtype), vocab),
            compare("lse_student", st_tri.lse_student, st_ref.lse_student, f32, vocab),
            compare("dense_coef", st_tri.dense_coef, st_ref.dense_coef, f32, vocab),
        ]
        if st_ref.sparse_index is not None:
            idx_t, order_t = st_tri.sparse_index.sort(-1)
            idx_r, order_r = st_ref.sparse_index.sort(-1)
            rows_differ = int((idx_t != idx_r).any(-1).sum())
            comps.append(
                dict(
                    quantity="sparse_index (sets)",
                    kind="exact",
                    rtol=0.0,
                    atol=0.0,
                    max_abs=float((idx_t - idx_r).abs().max()) if idx_t.numel() else 0.0,
                    ratio=float(rows_differ),
                    nan_mismatch=0,
                    inf_mismatch=0,
                    rows_differ=rows_differ,
                    ok=rows_differ == 0,
                )
            )
            if rows_differ == 0:
                coef_t = st_tri.sparse_coef.gather(-1, order_t)
                coef_r = st_ref.sparse_coef.gather(-1, order_r)
                comps.append(compare("sparse_coef", coef_t, coef_r, f32, vocab))
        for name in ("lse_teacher", "is_weight"):
            ref_v = getattr(st_ref, name)
            if ref_v is not None:
                comps.append(compare(name, getattr(st_tri, name), ref_v, f32, vocab))
        case.update(comparisons=comps, ok=all(c["ok"] for c in comps))
    except Exception as exc:  # reported, not raised: the other cases still run
        case.update(comparisons=[], ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    case["seconds"] = time.perf_counter() - t0
    return case


def _worker_init(interpret: bool) -> None:
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"


def render(cases: list[dict], meta: dict) -> list[str]:
    lines = [
        f"# Triton vs reference self-check, {meta['device']} ({meta['date']}), N={meta['rows']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}. Ratio = max |triton - reference| / (atol + rtol·|reference|) "
        "(tests/tolerances.py, widened with V); <= 1 passes; NaN must sit at the same entries.",
        "",
        "| variant | dtype | V | worst quantity | worst ratio | seconds | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        worst = max(c["comparisons"], key=lambda r: (not r["ok"], r["ratio"]), default=None)
        status = "ok" if c["ok"] else ("ERROR: " + c["error"] if "error" in c else "DIFFERS")
        lines.append(
            f"| {c['variant']} | {c['dtype']} | {c['vocab']} | {worst['quantity'] if worst else ''} | "
            f"{worst['ratio']:.3g} | {c['seconds']:.1f} | {status} |"
            if worst
            else f"| {c['variant']} | {c['dtype']} | {c['vocab']} | | | {c['seconds']:.1f} | {status} |"
        )
    bad = [(c, r) for c in cases for r in c["comparisons"] if not r["ok"]]
    if bad:
        lines += [
            "",
            "## Out of tolerance",
            "",
            "| variant | dtype | V | quantity | tolerance | max abs diff | ratio | NaN mismatches | inf mismatches |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c, r in bad:
            lines.append(
                f"| {c['variant']} | {c['dtype']} | {c['vocab']} | {r['quantity']} | {r['kind']} "
                f"(rtol {r['rtol']:.2g}, atol {r['atol']:.2g}) | {r['max_abs']:.3g} | {r['ratio']:.3g} | "
                f"{r['nan_mismatch']} | {r['inf_mismatch']} |"
            )
    errors = [c for c in cases if "error" in c]
    for c in errors:
        lines += [
            "",
            f"### {c['variant']} {c['dtype']} V={c['vocab']} raised",
            "",
            "```",
            c["traceback"].rstrip(),
            "```",
        ]
    n_ok = sum(c["ok"] for c in cases)
    lines += [
        "",
        f"Self-check: {n_ok} of {len(cases)} cases within tolerance" + ("." if n_ok == len(cases) else ": FAILED."),
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 32003])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--tiny", action="store_true", help="N=4, V in {300, 257}: the CPU interpreter in < 1 min")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: 8 on CUDA, 1 on CPU)")
    parser.add_argument("--out", help="output path without extension (.json, .md)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.rows, args.vocab = 4, [300, 257]
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    interpret = device == "cpu"
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before sdpo_kernels is imported (here and in the workers)
    import triton

    from sdpo_kernels import cost_report

    jobs = args.jobs or (8 if device == "cuda" else 1)
    tasks = [
        (vi, dt, args.rows, v, device)
        for v in args.vocab
        for dt in args.dtype
        for vi in range(len(cost_report.VARIANTS))
    ]
    t0 = time.perf_counter()
    if jobs > 1:
        # Spawned processes (CUDA cannot fork): each compiles its own cases' kernels, in parallel.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=ctx, initializer=_worker_init, initargs=(interpret,)
        ) as pool:
            cases = list(pool.map(check_case, *zip(*tasks)))
    else:
        cases = [check_case(*t) for t in tasks]
    meta = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)",
        torch=torch.__version__,
        triton=triton.__version__,
        date=time.strftime("%Y-%m-%d"),
        rows=args.rows,
        vocabs=args.vocab,
        dtypes=args.dtype,
        seconds=time.perf_counter() - t0,
    )
    lines = render(cases, meta)
    print("\n".join(lines))
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(dict(meta, cases=cases), indent=1, default=str))
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if any("error" in c for c in cases):
        return 2
    return 0 if all(c["ok"] for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
