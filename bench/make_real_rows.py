"""Write tests/fixtures/smollm2_rows.pt: 16 bf16 + 8 fp32 real rows of SmolLM2-135M-Instruct (`real_rows.collect`).

    python bench/make_real_rows.py                       # seed 0 -> tests/fixtures/smollm2_rows.pt (6.0 MiB)
    python bench/make_real_rows.py --seed 1 --out /tmp/rows.pt

The file is a `torch.save` dict, loadable with `torch.load(path, weights_only=True)`:

- "bf16": `collect(16, dtype=torch.bfloat16, seed=seed)` with the model loaded in bf16 (logits stored in bf16,
  as a bf16 trainer computes them: [16, 49152] student and teacher, 3.1 MB);
- "fp32": `collect(8, dtype=torch.float32, seed=seed)` with the model in fp32 ([8, 49152] each, 3.1 MB);
- "meta": how it was made (model and its cache marker, library versions, seed, date, command).

Each part keeps every field `collect` documents (token ids, logp, simulated old_logp, kinds, positions, the
prompts and sampled completions). The rows are deterministic from the seed up to the CPU's float rounding
(the sampling draws from a seeded generator; another machine may round a logit differently and then sample
another token; two runs here gave identical rows). ~12-23 min on 2 shared CPU cores.
No model weights are written.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import real_rows  # noqa: E402  (bench/ is not a package)

DEFAULT_OUT = HERE.parent / "tests" / "fixtures" / "smollm2_rows.pt"
PARTS = {"bf16": (torch.bfloat16, 16), "fp32": (torch.float32, 8)}
MAX_BYTES = 8 * 2**20


def make(seed: int = 0) -> dict:
    """The fixture's dict: {"bf16": rows, "fp32": rows, "meta": {...}} (see the module docstring)."""
    from sdpo import models

    out: dict = {}
    for name, (dtype, n) in PARTS.items():
        model, tok = models.load(real_rows.MODEL, dtype=dtype)
        out[name] = real_rows.collect(n, dtype=dtype, seed=seed, model=model, tokenizer=tok)
        del model
    out["meta"] = real_rows.meta(
        seed=seed,
        parts={k: f"{n} rows, model and logits in {dt}" for k, (dt, n) in PARTS.items()},
        command=f"python bench/make_real_rows.py --seed {seed}",
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    data = make(a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, a.out)
    torch.load(a.out, weights_only=True)  # the tests load it so: only tensors and plain Python values inside
    size = a.out.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{a.out}: {size / 2**20:.1f} MiB > {MAX_BYTES / 2**20:.0f} MiB")
    for name in PARTS:
        part = data[name]
        print(f"{name}: {tuple(part['student'].shape)} {part['student'].dtype}, kinds {part['kind']}")
        for text in part["completion_text"]:
            print(f"    {text!r}")
    print(f"wrote {a.out} ({size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
