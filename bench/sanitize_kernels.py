"""Every Triton kernel once at a small shape, for compute-sanitizer (memcheck / racecheck).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python bench/sanitize_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python bench/sanitize_kernels.py --only topk_forward
    python bench/sanitize_kernels.py --tiny          # no GPU: CPU tensors under TRITON_INTERPRET=1

(`PYTORCH_NO_CUDA_MEMORY_CACHING=1`: every tensor its own cudaMalloc, so that an access past a
tensor's end is outside any allocation instead of inside the caching allocator's larger block.)

Cases, N = 16 rows (a multiple of 16, as the GPU self-check's N = 256: the same kernel
specialisations, already compiled by then), V = 32003 (odd: masked last blocks), bf16:

- topk_tail / topk_no_tail: the top-K forward (K = 100) with and without the tail bucket, and the backward;
- topk_k_eq_v: K = V = 300 (the candidate scratch capped at V), forward and backward;
- full_logits, sampled_token: the LSE forward in both modes, and the backward;
- nan_rows_topk / nan_rows_full: a student row of NaN, a teacher row of NaN, a row of mostly -inf
  (absent entries) with a few finite ones;
- column_strided: column-major student and teacher ([V, N] storage seen as [N, V]: column stride N),
  top-K forward and backward;
- fused_linear: `linear_self_distillation_loss(backend="triton")` (N = 128, D = 64: chunks of 16
  rows whose backward writes the gradient over the chunk's logits) and its autograd gradients.

Each case also runs on the reference backend and the two are compared (tests/tolerances.py bounds,
NaN at the same entries): exits 1 on a mismatch or an exception, so the script checks values
whatever tool wraps it. `--only topk_forward` launches the top-K forwards alone (no backward, no
reference: racecheck checks only what it must).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # gpu_selfcheck (its `compare`)

DEFAULTS = dict(topk=None, alpha=0.5, add_tail=False, is_clip=2.0, temperature=1.0)
TOPK = dict(mode="topk_logits", topk=100, alpha=0.5, add_tail=True)
TOPK_NO_TAIL = dict(TOPK, add_tail=False)
FULL = dict(mode="full_logits", alpha=0.5)
SAMPLED = dict(mode="sampled_token", alpha=1.0)
NAN_ROWS = (1, 2)  # a student row of NaN, a teacher row of NaN


def _rows(n: int, vocab: int, dtype, device: str, seed: int, columns: bool = False, nan_rows: bool = False):
    """student, teacher, completion ids, rollout log-probs, upstream gradient (made on the CPU: few device
    kernels besides the ones under test)."""
    gen = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(n, vocab, generator=gen)
    teacher = student + 0.5 * torch.randn(n, vocab, generator=gen)
    ids = torch.randint(0, vocab, (n,), generator=gen)
    if nan_rows:
        student[NAN_ROWS[0]] = float("nan")
        teacher[NAN_ROWS[1]] = float("nan")
        student[3], teacher[3] = float("-inf"), float("-inf")  # all absent but the first 7 entries
        student[3, :7] = torch.randn(7, generator=gen)
        teacher[3, :7] = torch.randn(7, generator=gen)
        ids[3] = 2
    old = torch.log_softmax(student, -1).gather(-1, ids[:, None]).squeeze(-1) + 0.5 * torch.randn(n, generator=gen)
    old = torch.nan_to_num(old, nan=-1.0)
    upstream = torch.rand(n, generator=gen)
    student, teacher = (x.to(dtype).to(device) for x in (student, teacher))
    if columns:  # [V, N] storage seen as [N, V]: column stride N
        student, teacher = (x.t().contiguous().t() for x in (student, teacher))
    return student, teacher, ids.to(device), old.to(device), upstream.to(device)


def logits_case(settings: dict, n: int, vocab: int, device: str, seed: int, **layout):
    """Per-token loss and the gradient w.r.t. the student logits (autograd, random upstream).

    With NaN rows, the reference (whose top-K selection cannot take a NaN row) gets row 0 in their
    place, and only the other rows are compared: they must not be touched by their neighbours' NaN."""
    from sdpo_kernels import self_distillation_loss

    student, teacher, ids, old, upstream = _rows(n, vocab, torch.bfloat16, device, seed, **layout)
    kw = DEFAULTS | settings

    def run(backend: str) -> dict:
        s, t = student, teacher
        if backend == "reference" and layout.get("nan_rows"):
            s, t = s.clone(), t.clone()
            for i in NAN_ROWS:
                s[i], t[i] = student[0], teacher[0]
        z = s.detach().clone().requires_grad_()  # clone keeps the (column-major) strides
        loss = self_distillation_loss(z, t, ids, old, backend=backend, **kw)
        (grad,) = torch.autograd.grad((loss * upstream).nansum(), z)
        out = {"loss": loss.detach(), "grad": grad}
        if layout.get("nan_rows"):
            keep = [i for i in range(n) if i not in NAN_ROWS]
            out = {k: v[keep] for k, v in out.items()}
        return out

    return run


def forward_only_case(settings: dict, n: int, vocab: int, device: str, seed: int, **layout):
    """The top-K forward launch alone (racecheck)."""
    from sdpo_kernels import triton_backend
    from sdpo_kernels.config import LossConfig

    student, teacher, ids, old, _ = _rows(n, vocab, torch.bfloat16, device, seed, **layout)
    config = LossConfig.from_args(student, teacher, ids, old, **(DEFAULTS | settings))

    def run(backend: str) -> dict:
        loss, stats = triton_backend.forward(student, teacher, ids, old, config)
        return {"loss": loss, "lse_student": stats.lse_student}

    return run


def linear_case(n: int, vocab: int, d: int, device: str, seed: int):
    """The fused-linear loss and its gradients w.r.t. hidden states and weight, in chunks of n // 8 rows (the
    Triton default) on both backends: the same row grouping, so only the kernels' arithmetic differs."""
    from sdpo_kernels import linear_self_distillation_loss

    gen = torch.Generator().manual_seed(seed)
    scale = 2 / d**0.5
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(vocab, d, generator=gen) * scale
    ht = h + 0.25 * torch.randn(n, d, generator=gen)
    wt = w + 0.05 * scale * torch.randn(vocab, d, generator=gen)
    ids = torch.randint(0, vocab, (n,), generator=gen)
    old = torch.log_softmax(h @ w.t(), -1).gather(-1, ids[:, None]).squeeze(-1)
    weights = torch.full((n,), 1.0 / n)
    h, w, ht, wt = (x.to(torch.bfloat16).to(device) for x in (h, w, ht, wt))
    ids, old, weights = ids.to(device), old.to(device), weights.to(device)

    def run(backend: str) -> dict:
        hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, per_token = linear_self_distillation_loss(
            hs, ws, ht, wt, ids, old, weights=weights, backend=backend, chunk_size=n // 8, **(DEFAULTS | TOPK)
        )
        grad_h, grad_w = torch.autograd.grad(loss, (hs, ws))
        return {"loss": loss.detach().reshape(1), "per_token": per_token, "grad_hidden": grad_h, "grad_weight": grad_w}

    return run


def cases(tiny: bool, only: str | None, device: str) -> list[tuple[str, int, object]]:
    """(name, vocabulary, run(backend) -> {quantity: tensor})."""
    n, vocab, small = (4, 257, 130) if tiny else (16, 32003, 300)
    k_eq_v = dict(TOPK, topk=small)
    if only == "topk_forward":
        return [
            ("topk_tail", vocab, forward_only_case(TOPK, n, vocab, device, 1)),
            ("topk_no_tail", vocab, forward_only_case(TOPK_NO_TAIL, n, vocab, device, 2)),
            ("topk_k_eq_v", small, forward_only_case(k_eq_v, n, small, device, 3)),
            ("nan_rows_topk", vocab, forward_only_case(TOPK, n, vocab, device, 4, nan_rows=True)),
            ("column_strided", vocab, forward_only_case(TOPK, n, vocab, device, 5, columns=True)),
        ]
    return [
        ("topk_tail", vocab, logits_case(TOPK, n, vocab, device, 1)),
        ("topk_no_tail", vocab, logits_case(TOPK_NO_TAIL, n, vocab, device, 2)),
        ("topk_k_eq_v", small, logits_case(k_eq_v, n, small, device, 3)),
        ("full_logits", vocab, logits_case(FULL, n, vocab, device, 6)),
        ("sampled_token", vocab, logits_case(SAMPLED, n, vocab, device, 7)),
        ("nan_rows_topk", vocab, logits_case(TOPK, n, vocab, device, 4, nan_rows=True)),
        ("nan_rows_full", vocab, logits_case(FULL, n, vocab, device, 8, nan_rows=True)),
        ("column_strided", vocab, logits_case(TOPK, n, vocab, device, 5, columns=True)),
        ("fused_linear", vocab, linear_case(8 * n, vocab, 64, device, 9)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["topk_forward"], help="launch the top-K forwards alone (racecheck)")
    parser.add_argument("--tiny", action="store_true", help="CPU tensors under TRITON_INTERPRET=1, N=4, V=257")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before sdpo_kernels is imported
        warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy's log(0) inside the interpreter
    from gpu_selfcheck import compare

    from tolerances import grad_kind

    failed = 0
    for name, vocab, run in cases(args.tiny, args.only, device):
        t0 = time.perf_counter()
        try:
            tri = run("triton")
            if device == "cuda":
                torch.cuda.synchronize()
            status = "ran"
            if not args.only:
                ref = run("reference")
                bad = []
                for key, value in tri.items():
                    kind = grad_kind(value.dtype) if key.startswith("grad") else "f32_vs_f32"
                    c = compare(key, value.float(), ref[key].float(), kind, vocab)
                    if not c["ok"]:
                        bad.append(f"{key}: ratio {c['ratio']:.3g}, NaN mismatches {c['nan_mismatch']}")
                status = "ok" if not bad else "MISMATCH " + "; ".join(bad)
                failed += bool(bad)
        except Exception:
            status = "ERROR\n" + traceback.format_exc()
            failed += 1
        print(f"sanitize_kernels: {name:15s} {time.perf_counter() - t0:6.1f} s  {status}", flush=True)
    print(f"sanitize_kernels: {'all cases ran' if not failed else f'{failed} case(s) failed'} on {device}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
