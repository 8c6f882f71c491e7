"""Extra peak memory of the reference backend, by resident set and by the profiler, in fresh processes.

    python bench/reference_memory.py [--n 2048] [--v 151936] [--repeat 2] [--src DIR] [--md PATH]

Loss settings are the CPU goal's (`harness.LOSS_KWARGS`: topk_logits, K = 100, tail, JSD α = 0.5,
IS clip 2.0 with old log-probs), fp32 inputs. Each (phase, method, repeat) runs in its own fresh
subprocess: inputs are allocated and touched first (with no temporary above 8 MiB, so the
high-water mark sits at the inputs), then one call, never a warm-up of the measured shape:

- phase `fwd`: `self_distillation_loss(..., backend="reference")`, the loss (and the autograd
  graph with its saved row stats) kept alive; `fwd+bwd`: then `torch.autograd.grad(loss.sum(),
  student)`, the gradient kept alive (it is 1.0 of the figure).
- method `rss`: `resource.getrusage(RUSAGE_SELF).ru_maxrss` after the call minus before it; just
  before the call the kernel's high-water mark is reset to the current resident set
  (`echo 5 > /proc/self/clear_refs`, Linux; skipped where unavailable), so the delta starts at the
  resident inputs. This is what the OS sees: memory glibc keeps after `free` counts.
- method `rss_warm`: the same, after one forward+backward on a tiny [4, 256] problem in the same
  process: what the first call of a process costs once whatever the shape (about 150 MiB: the
  first custom-op call imports torch._dynamo, sympy and ~900 other modules; code pages) is paid
  there, and the delta is the call's own.
- method `profiler`: `torch.profiler.profile(profile_memory=True)` around the call; the peak of
  c10's running total of allocated-and-not-freed CPU bytes minus the total before the first event
  (`harness._cpu_profiled_peak`, the benchmarks' CPU method): live tensor bytes, allocator-free.

Figures are printed in units of one fp32 [N, V] tensor. `--src DIR` measures another copy of the
package (e.g. `git archive <commit> kernels | tar -x -C DIR`, then `--src DIR/kernels`).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("fwd", "fwd+bwd")
METHODS = ("rss", "rss_warm", "profiler")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _inputs(n: int, v: int):
    """harness.make_inputs' distribution, built in place (no [N, V] temporary)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    student = torch.randn((n, v), generator=gen).mul_(2.0)
    teacher = torch.randn((n, v), generator=gen).mul_(0.5).add_(student)
    ids = torch.randint(0, v, (n,), generator=gen)
    old = torch.empty(n)
    step = max(1, (1 << 21) // v)  # <= 8 MiB of float32 temporaries
    for lo in range(0, n, step):
        z = student[lo : lo + step]
        old[lo : lo + step] = z.gather(-1, ids[lo : lo + step, None]).squeeze(-1) - torch.logsumexp(z, -1)
    old.add_(torch.randn(n, generator=gen).mul_(0.5))
    return student.requires_grad_(), teacher, ids, old


def child(n: int, v: int, phase: str, method: str) -> dict:
    import harness
    import torch

    from sdpo_kernels import self_distillation_loss

    student, teacher, ids, old = _inputs(n, v)
    kept = []

    def call() -> None:
        loss = self_distillation_loss(student, teacher, ids, old, backend="reference", **harness.LOSS_KWARGS)
        kept.append(loss)
        if phase == "fwd+bwd":
            kept.append(torch.autograd.grad(loss.sum(), student)[0])

    if method == "rss_warm":  # pay the process's one-time costs on a tiny call of another shape
        tiny = _inputs(4, 256)
        self_distillation_loss(*tiny, backend="reference", **harness.LOSS_KWARGS).sum().backward()
        del tiny
    gc.collect()
    if method in ("rss", "rss_warm"):
        reset = _reset_high_water_mark()
        before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_kib = _status_kib("VmRSS")
        call()
        after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = (after_kib - before_kib) * 1024
        extra = {"hwm_reset": reset, "maxrss_minus_rss_before_mib": (before_kib - rss_kib) / 1024}
    else:
        peak = harness._cpu_profiled_peak(call)
        extra = {}
    import sdpo_kernels

    return {
        "phase": phase,
        "method": method,
        "N": n,
        "V": v,
        "peak_bytes": peak,
        "peak_nv": peak / (n * v * 4),
        "package": os.path.dirname(sdpo_kernels.__file__),
        "threads": torch.get_num_threads(),
        **extra,
    }


def run_child(args, phase: str, method: str) -> dict:
    cmd = [sys.executable, __file__, "--child", phase, method, "--n", str(args.n), "--v", str(args.v)]
    env = dict(os.environ)
    paths = [HERE] + ([os.path.abspath(args.src)] if args.src else [])
    env["PYTHONPATH"] = os.pathsep.join([*paths, env["PYTHONPATH"]] if env.get("PYTHONPATH") else paths)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(results: list[dict]) -> list[str]:
    lines = [
        "| phase | method | runs (fp32 [N,V] units) | max | beyond the gradient (max) |",
        "|---|---|---|---|---|",
    ]
    for phase in PHASES:
        for method in METHODS:
            vals = [r["peak_nv"] for r in results if r["phase"] == phase and r["method"] == method]
            if not vals:
                continue
            grad = 1.0 if phase == "fwd+bwd" else 0.0
            runs = ", ".join(f"{x:.3f}" for x in vals)
            lines.append(f"| {phase} | {method} | {runs} | {max(vals):.3f} | {max(vals) - grad:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--src", help="directory holding the sdpo_kernels package to measure (default: installed)")
    ap.add_argument("--method", action="append", choices=METHODS)
    ap.add_argument("--md", help="also write the table as Markdown to this path")
    ap.add_argument("--child", nargs=2, metavar=("PHASE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, HERE)
        print(json.dumps(child(args.n, args.v, *args.child)))
        return
    results = []
    for phase in PHASES:
        for method in args.method or METHODS:
            for _ in range(args.repeat):
                r = run_child(args, phase, method)
                results.append(r)
                print(f"{phase:8s} {method:8s} {r['peak_nv']:.3f} fp32 [N,V]  ({r['peak_bytes'] / 2**20:.0f} MiB)")
    import torch

    head = [
        f"- N = {args.n}, V = {args.v}, fp32; one fp32 [N, V] = {args.n * args.v * 4 / 2**20:.0f} MiB",
        f"- package: {results[0]['package']}",
        f"- torch {torch.__version__}, {results[0]['threads']} threads, {platform.libc_ver()[0]} "
        f"{platform.libc_ver()[1]}, {platform.machine()}, {datetime.date.today().isoformat()}",
        "- MALLOC_* environment: "
        + (", ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")) or "none"),
    ]
    lines = [*head, "", *table(results)]
    print("\n".join(lines))
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
