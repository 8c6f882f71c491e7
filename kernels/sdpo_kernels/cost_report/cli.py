"""The command line: `python -m sdpo_kernels.cost_report [--vocab V ...] [--out DIR]`."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from .launches import DTYPES, VARIANTS
from .render import render_markdown
from .report import build_report

# The first line of the package docstring (argparse's description, as before the split).
DESCRIPTION = "Static cost report of the Triton kernels as the launcher launches them, without a GPU."
# The program name `--help` printed when the report was one module, `python -m sdpo_kernels.cost_report`.
PROG = "cost_report.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default 90 → sm_90a)")
    parser.add_argument("--rows", type=int, default=8192, help="token rows N (default 8192)")
    parser.add_argument(
        "--vocab", type=int, action="append", help="vocabulary size V, repeatable (default 32000 and 151936)"
    )
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="logits dtype (default bf16)")
    parser.add_argument("--variant", action="append", help="only the loss variants whose name contains this")
    parser.add_argument("--out", type=pathlib.Path, help="write cost-report-<date>.json and .md into this folder")
    parser.add_argument(
        "--real-rows",
        type=pathlib.Path,
        help="replay-rows fixture (bench/fixtures/smollm2_replay_rows.pt): its top-K replay is reported next to "
        "the iid one where V and dtype match",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    variants = [v for v in VARIANTS if not args.variant or any(s in v.name for s in args.variant)]
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    vocabs = args.vocab or [32000, 151936]
    report = build_report(args.rows, vocabs, args.dtype, args.arch, variants, log, args.real_rows)
    md = render_markdown(report)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"cost-report-{report['date']}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
        stem.with_suffix(".md").write_text(md + "\n")
        print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0
