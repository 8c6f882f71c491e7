"""Process set-up and provenance shared by the offline runs (`sdpo demo`, `sdpo discover`): thread limits,
library noise, worker counts, and the versions / CPU dispatch a run's numbers depend on."""

from __future__ import annotations

import os

import torch


def versions() -> dict[str, str]:
    """Versions of the packages the run's numbers depend on (written to metrics.jsonl and printed)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "triton", "accelerate", "sdpo-kernels"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    out["torch_threads"] = f"{torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op"
    out.update(cpu_info())
    return out


DISPATCH_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def cpu_info() -> dict[str, str]:
    """The CPU kernels torch dispatches to (`cpu_capability`: e.g. AVX512, AVX2), the variables that force a
    dispatch (ATen's, and MKL's / oneDNN's, which pick their own kernels) when set, and the CPU model.

    The figures are bit-identical on one dispatch; another (AVX-512 vs AVX2 vectorised kernels) rounds differently
    and RL amplifies that, so the per-seed figures, the gap and its interval move (the call held in our runs)."""
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    out.update({k: os.environ[k] for k in DISPATCH_VARIABLES if os.environ.get(k)})
    try:
        with open("/proc/cpuinfo") as f:
            model = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), None)
        if model:
            out["cpu"] = model
    except OSError:  # not Linux
        pass
    return out


def cpu_capability_text(env: dict[str, str] | None = None) -> str:
    """'CPU capability AVX512' (plus the dispatch variables that are set, e.g. ATEN_CPU_CAPABILITY=avx2), for the
    verdict line."""
    env = env or cpu_info()
    forced = ", ".join(f"{k}={env[k]}" for k in DISPATCH_VARIABLES if env.get(k))
    return f"CPU capability {env['cpu_capability']}" + (f" ({forced})" if forced else "")


def limit_threads(n: int) -> int:
    """`n` intra-op and one inter-op torch thread: a model this small gains nothing from more, and when other
    processes share the cores, spinning thread pools slowed the demo 40x. Returns the previous intra-op count.
    The inter-op pool can only be sized before its first use (else it is left as it is)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already started (e.g. in a test session that ran torch work first)
        pass
    return previous


def quiet_libraries() -> None:
    """Silence per-process library noise (transformers' deprecation warnings and logging, TRL's experimental
    notice) and turn off tokenizers' Rust thread pool."""
    import warnings

    from transformers import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecations, per process

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust thread pool either
    hf_logging.set_verbosity_error()


def default_workers(num_seeds: int) -> int:
    """One process per usable core, at most one per seed."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(num_seeds, cores))
