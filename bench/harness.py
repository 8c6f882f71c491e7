"""Shared pieces of the loss benchmarks: cases, implementations, inputs, peak-memory measurement.

Imported by `bench_loss.py` (pytest puts `bench/` on sys.path through `bench/conftest.py`).
Nothing here asserts a performance goal: the numbers are recorded and rendered, never checked.
"""

from __future__ import annotations

import gc
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch

# Loss settings of every case (the defaults).
LOSS_KWARGS = dict(mode="topk_logits", topk=100, alpha=0.5, add_tail=True, is_clip=2.0, temperature=1.0)

# Peak HBM bandwidth (GB/s, 1 GB = 1e9 B) by device-name substring, first match wins.
# Override with SDPO_BENCH_PEAK_BW_GBPS. Vendor datasheet numbers.
PEAK_BW_GBPS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # H100 SXM5 80GB
    ("A100-SXM4-80GB", 2039.0),
    ("A100", 1555.0),
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One benchmark shape: N token rows, vocabulary V, top-K, input dtype, device kind."""

    device: str  # "cuda" | "cpu"
    dtype: str  # key of DTYPES
    n: int
    v: int
    k: int = 100
    large: bool = False  # opt-in (SDPO_BENCH_LARGE_CPU=1)

    @property
    def id(self) -> str:
        return f"{self.device}-{self.dtype}-N{self.n}-V{self.v}-K{self.k}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def nv_bytes(self) -> int:
        """Bytes of one [N, V] tensor in the input dtype."""
        return self.n * self.v * self.elem_bytes

    @property
    def floor_bytes(self) -> int:
        """Memory-traffic floor of fwd+bwd: read student and teacher once (forward), read the
        student and write the gradient once (backward): 4 · N · V · element size."""
        return 4 * self.nv_bytes


GPU_CASES = [Case("cuda", "bf16", n, v) for v in (32000, 151936) for n in (4096, 8192, 16384)]
CPU_CASES = [Case("cpu", "fp32", n, 32000) for n in (256, 1024)] + [Case("cpu", "fp32", 2048, 151936, large=True)]

# name -> (label written into the results, devices it runs on)
IMPLS = {
    "triton": ("sdpo_kernels self_distillation_loss(backend='triton')", ("cuda",)),
    "reference": (
        "sdpo_kernels self_distillation_loss(backend='reference') (chunked PyTorch, hand-written backward)",
        ("cuda", "cpu"),
    ),
    "trl_eager": (
        "TRL 1.16 eager: logits/T -> compute_topk_self_distillation_loss + selective_log_softmax -> "
        "apply_importance_sampling_clipping, autograd backward (the trainer's logits/T copy, made also at "
        "T = 1, is one [N,V] of its peak memory)",
        ("cuda", "cpu"),
    ),
    "trl_compiled": (
        "torch.compile(fullgraph=True, dynamic=False) of the TRL eager formula (logits/T -> "
        "compute_topk_self_distillation_loss; IS log-prob as gather - logsumexp) -- the sdpo_kernels "
        "reference graph-breaks (nonzero, .item()), so it is not what is compiled",
        ("cuda", "cpu"),
    ),
}


def selected_device() -> str:
    """Device kind whose cases run: SDPO_BENCH_DEVICE=cpu|cuda, default cuda when available."""
    want = os.environ.get("SDPO_BENCH_DEVICE", "auto")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want not in ("cpu", "cuda"):
        raise ValueError(f"SDPO_BENCH_DEVICE must be auto, cpu or cuda, got {want!r}")
    return want


def skip_reason(case: Case, impl: str) -> str | None:
    """Why (case, impl) does not run here, or None."""
    if case.device == "cuda" and not torch.cuda.is_available():
        return "CUDA cases need a CUDA device"
    if case.device != selected_device():
        return f"{case.device} cases are off (SDPO_BENCH_DEVICE selects {selected_device()})"
    if case.large and os.environ.get("SDPO_BENCH_LARGE_CPU", "0") != "1":
        return "large CPU case: set SDPO_BENCH_LARGE_CPU=1"
    import importlib.util

    if impl == "triton" and importlib.util.find_spec("sdpo_kernels.triton_backend") is None:
        return "sdpo_kernels.triton_backend is not available yet"
    if impl.startswith("trl") and importlib.util.find_spec("trl") is None:
        return "trl is not installed"
    return None


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    student: torch.Tensor  # [N, V] leaf, requires_grad
    teacher: torch.Tensor  # [N, V]
    ids: torch.Tensor  # [N] int64
    old_logps: torch.Tensor  # [N] float32

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.student, self.teacher, self.ids, self.old_logps))


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Student logits ~ 2·N(0,1); teacher = student + 0.5·N(0,1); old log-probs = the student's
    log-prob of the sampled token plus 0.5·N(0,1) noise (so the IS weight is ~1 and sometimes clipped)."""
    gen = torch.Generator(device=case.device).manual_seed(seed)
    shape = (case.n, case.v)
    student = torch.randn(shape, generator=gen, device=case.device, dtype=case.torch_dtype).mul_(2.0)
    teacher = torch.randn(shape, generator=gen, device=case.device, dtype=case.torch_dtype).mul_(0.5).add_(student)
    ids = torch.randint(0, case.v, (case.n,), generator=gen, device=case.device)
    old = torch.empty(case.n, device=case.device, dtype=torch.float32)
    step = max(1, (1 << 24) // case.v)
    with torch.no_grad():
        for lo in range(0, case.n, step):
            z = student[lo : lo + step].float()
            old[lo : lo + step] = z.gather(-1, ids[lo : lo + step, None]).squeeze(-1) - torch.logsumexp(z, -1)
        old.add_(torch.randn(case.n, generator=gen, device=case.device).mul_(0.5))
    return Inputs(student.requires_grad_(), teacher, ids, old)


# ---------------------------------------------------------------------------------------------
# Implementations: fn(student, teacher, ids, old_logps) -> per-token loss [N]


def _trl_eager(student, teacher, ids, old):
    from trl.experimental.sdpo.loss_utils import apply_importance_sampling_clipping, compute_topk_self_distillation_loss
    from trl.trainer.utils import selective_log_softmax

    kw = LOSS_KWARGS
    # As SDPOTrainer: the model's logits are divided by the temperature, then the loss functions run.
    z = student / kw["temperature"]
    u = teacher / kw["temperature"]
    loss = compute_topk_self_distillation_loss(
        z, u, distillation_topk=kw["topk"], distillation_alpha=kw["alpha"], distillation_add_tail=kw["add_tail"]
    )
    logps = selective_log_softmax(z, ids)
    return apply_importance_sampling_clipping(loss, logps, old, kw["is_clip"])


def _trl_formula(student, teacher, ids, old):
    """The TRL eager math in plain torch ops (selective_log_softmax's Triton/loop paths replaced by
    gather - logsumexp, which is its documented equivalent) so that torch.compile sees one graph."""
    from trl.experimental.sdpo.loss_utils import apply_importance_sampling_clipping, compute_topk_self_distillation_loss

    kw = LOSS_KWARGS
    z = student / kw["temperature"]
    u = teacher / kw["temperature"]
    loss = compute_topk_self_distillation_loss(
        z, u, distillation_topk=kw["topk"], distillation_alpha=kw["alpha"], distillation_add_tail=kw["add_tail"]
    )
    logps = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return apply_importance_sampling_clipping(loss, logps, old, kw["is_clip"])


_COMPILED: dict[str, Callable] = {}


def make_impl(name: str) -> Callable:
    if name in ("triton", "reference"):
        from sdpo_kernels import self_distillation_loss

        return lambda s, t, i, o: self_distillation_loss(s, t, i, o, backend=name, **LOSS_KWARGS)
    if name == "trl_eager":
        return _trl_eager
    if name == "trl_compiled":
        if name not in _COMPILED:
            _COMPILED[name] = torch.compile(_trl_formula, fullgraph=True, dynamic=False)
        return _COMPILED[name]
    raise KeyError(name)


def make_step(fn: Callable, inp: Inputs, device: str) -> Callable[[], None]:
    """One forward+backward: per-token loss, then d(sum loss)/d(student logits) by autograd.
    The gradient is returned by autograd.grad (not accumulated into .grad) and dropped."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> None:
        loss = fn(inp.student, inp.teacher, inp.ids, inp.old_logps)
        (grad,) = torch.autograd.grad(loss.sum(), inp.student)
        del grad
        sync()

    return step


# ---------------------------------------------------------------------------------------------
# Peak memory


def peak_extra_bytes(step: Callable[[], None], device: str) -> int:
    """Peak bytes allocated during one `step()` on top of what was live before it (the inputs).

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated
    before the step. CPU: torch.profiler(profile_memory=True) records every c10 CPU allocation and
    free made while it runs, each with the running total of bytes allocated (and not yet freed)
    since profiling started; the peak is the largest running total minus the one before the step.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _cpu_profiled_peak(step)


def _cpu_profiled_peak(step: Callable[[], None]) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            events.append((node.start_time_ns, f.alloc_size, f.total_allocated))
        stack.extend(node.children)
    if not events:
        return 0
    events.sort(key=lambda e: e[0])
    base = events[0][2] - events[0][1]
    return max(e[2] for e in events) - base


def peak_bandwidth_gbps(device: str) -> tuple[float | None, str]:
    """(peak memory bandwidth in GB/s or None, where the number came from)."""
    env = os.environ.get("SDPO_BENCH_PEAK_BW_GBPS")
    if env:
        return float(env), "SDPO_BENCH_PEAK_BW_GBPS"
    if device != "cuda":
        return None, "unknown for CPU (set SDPO_BENCH_PEAK_BW_GBPS)"
    name = torch.cuda.get_device_name()
    for key, bw in PEAK_BW_GBPS:
        if key in name:
            return bw, f"datasheet value for '{key}' matched in device name '{name}'"
    return None, f"no datasheet value for '{name}' (set SDPO_BENCH_PEAK_BW_GBPS)"


# ---------------------------------------------------------------------------------------------
# Machine description


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU: {cpu_model()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "trl", "liger-kernel", "sdpo-kernels", "pytest-benchmark"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    return out


def source_digests() -> dict[str, str]:
    """sha256 (first 12 hex digits) of each sdpo_kernels source file: pins what was measured
    when the git tree is dirty."""
    import hashlib
    from pathlib import Path

    import sdpo_kernels

    root = Path(sdpo_kernels.__file__).parent
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in sorted(root.glob("*.py"))}
