"""bench/kernel_timing.py's prediction side without a GPU: every vocabulary gets its predicted column.

The cost report compiles (no interpreter), so the script runs in a subprocess without TRITON_INTERPRET
(tests/conftest.py sets it); skipped when triton's NVIDIA tools are missing. The cheap sampled-token
variant keeps the compile short; the table's shape does not depend on the variant.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from conftest import requires_nvidia_tools

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCABS = (32000, 49152, 128256, 151936)


@requires_nvidia_tools
def test_predict_only_fills_the_predicted_column_for_every_vocabulary(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "kt"
    cmd = [sys.executable, str(ROOT / "bench" / "kernel_timing.py"), "--predict-only", "--rows", "256"]
    cmd += ["--variant", "sampled_token", "--out", str(out)]  # default --vocab: the four vocabularies
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["vocabs"] == list(VOCABS)
    rows = result["kernels"]
    assert {r["vocab"] for r in rows} == set(VOCABS)
    for vocab in VOCABS:
        directions = {r["direction"] for r in rows if r["vocab"] == vocab}
        assert directions == {"forward", "backward"}
    for r in rows:
        assert r["measured_ms"] is None and r["rewritten"] is None  # no GPU: nothing measured
        p = r["predicted"]
        assert 0 < p["hbm_floor"] <= p["static_bound"] <= p["latency_aware"]
    md = out.with_suffix(".md").read_text()
    assert "| variant | pass | kernel | " + " | ".join(f"V={v}" for v in VOCABS) + " |" in md
    per_vocab = md.split("per vocabulary")[1].splitlines()
    table = [line for line in per_vocab if line.startswith("| sampled_token")]
    assert len(table) == 2  # forward and backward
    for line in table:
        cells = line.strip("|").split("|")[3:]
        assert len(cells) == len(VOCABS) and all(c.strip().startswith("— (") and "ms)" in c for c in cells)
