"""Cross-check of the CPU peak-memory method: profiler peak vs resident-set growth.

    python bench/rss_check.py --n 2048 --v 151936 [--impl reference --impl trl_eager ...]

Each implementation runs in a fresh subprocess: inputs, one warm-up step, then (a) the peak
resident set growth of one step, read as VmHWM - VmRSS after resetting the high-water mark with
`echo 5 > /proc/self/clear_refs` (Linux >= 4.0), and (b) the profiler-based peak used by the
benchmarks (`harness.peak_extra_bytes`) in another step. Both are printed in [N, V] fp32 units.
RSS undercounts blocks that glibc serves from memory already resident (its heap keeps freed
blocks below the mmap threshold, up to 32 MiB), so expect (a) <= (b) up to tens of MiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(n: int, v: int, impl: str) -> dict:
    import harness

    case = harness.Case("cpu", "fp32", n, v)
    inp = harness.make_inputs(case)
    step = harness.make_step(harness.make_impl(impl), inp, "cpu")
    step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    step()
    rss_peak = (_status_kib("VmHWM") - base) * 1024
    prof_peak = harness.peak_extra_bytes(step, "cpu")
    unit = n * v * 4
    return {"impl": impl, "N": n, "V": v, "rss_growth_nv": rss_peak / unit, "profiler_peak_nv": prof_peak / unit}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--impl", action="append")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    impls = args.impl or ["reference", "trl_eager", "trl_compiled"]
    if args.child:
        print(json.dumps(child(args.n, args.v, impls[0])))
        return
    for impl in impls:
        cmd = [sys.executable, __file__, "--child", "--n", str(args.n), "--v", str(args.v), "--impl", impl]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(
            f"{impl:14s} N={r['N']} V={r['V']}: RSS growth {r['rss_growth_nv']:.3f}, "
            f"profiler peak {r['profiler_peak_nv']:.3f}  (fp32 [N,V] units)"
        )


if __name__ == "__main__":
    main()
