"""Forward+backward time and peak memory of the fused-linear SDPO loss against every anchor.

One step = hidden states + lm_head -> scalar loss Σ weights·ℓ -> gradients w.r.t. the student
hidden states and the student lm_head weight (`torch.autograd.grad`, returned and dropped).
Student and teacher have separate [V, D] weights (an EMA / frozen teacher head).

Implementations (extra_info["impl"]):
    fused_triton     linear_self_distillation_loss(backend="triton")            CUDA only
    fused_reference  linear_self_distillation_loss(backend="reference")          CPU and CUDA
    trl_eager        logits = h @ W.T (teacher under no_grad), then TRL 1.16's eager loss as
                     SDPOTrainer runs it (harness "trl_eager"), autograd backward
    trl_compiled     torch.compile(fullgraph=True) of the matmuls + the TRL formula (the
                     sdpo_kernels reference graph-breaks, so the TRL formula is what is compiled)
    liger_jsd_loss   liger_kernel.chunked_loss.LigerFusedLinearJSDLoss (full-vocabulary JSD,
                     beta=0.5, soft loss only) -- the closest fused kernel that exists; CUDA only
    liger_jsd        liger_kernel.transformers.LigerFusedLinearJSD (Triton JSD kernel); CUDA only
    matmul_floor     the four bare lm_head matmuls: student and teacher logits, grad_h = G @ W,
                     grad_W = G^T @ h (G a materialised [N, V] stand-in for the logits gradient)

Loss settings: harness.LOSS_KWARGS (topk_logits, K = 100, alpha = 0.5, tail, IS clip 2.0, T = 1).
Cases: CUDA bf16 N = 8192, V = 151936, D in {1536, 3584}; CPU fp32 small shapes, plus the issue's
memory case N = 2048, V = 151936, D = 1536 with SDPO_BENCH_LARGE_CPU=1. Peak memory: extra bytes
over the live inputs during one step (harness.peak_extra_bytes: torch.cuda.max_memory_allocated
on CUDA, the profiler's allocation trace on CPU), also in units of one [N, V] fp32 tensor. CPU
figures are CPU figures: the device is named in every result. Goals are recorded, never asserted.

Run: `pytest bench/bench_linear.py --benchmark-json bench/results/<name>.json` (see README.md).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import harness
import pytest
import torch


@dataclass(frozen=True)
class LinearCase:
    device: str
    dtype: str
    n: int
    v: int
    d: int
    large: bool = False

    @property
    def id(self) -> str:
        return f"{self.device}-{self.dtype}-N{self.n}-V{self.v}-D{self.d}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return harness.DTYPES[self.dtype]

    @property
    def nv_bytes(self) -> int:
        return self.n * self.v * torch.empty((), dtype=self.torch_dtype).element_size()


GPU_CASES = [LinearCase("cuda", "bf16", 8192, 151936, d) for d in (1536, 3584)]
CPU_CASES = [
    LinearCase("cpu", "fp32", 256, 32000, 512),
    LinearCase("cpu", "fp32", 1024, 32000, 1024),
    LinearCase("cpu", "fp32", 2048, 151936, 1536, large=True),
]

IMPLS = {
    "fused_triton": ("sdpo_kernels linear_self_distillation_loss(backend='triton')", ("cuda",)),
    "fused_reference": ("sdpo_kernels linear_self_distillation_loss(backend='reference')", ("cuda", "cpu")),
    "trl_eager": ("h @ W.T, then TRL 1.16 eager SDPO loss (as SDPOTrainer), autograd backward", ("cuda", "cpu")),
    "trl_compiled": ("torch.compile(fullgraph=True, dynamic=False) of h @ W.T + the TRL formula", ("cuda", "cpu")),
    "liger_jsd_loss": ("liger_kernel.chunked_loss.LigerFusedLinearJSDLoss (full-vocab JSD, beta=0.5)", ("cuda",)),
    "liger_jsd": ("liger_kernel.transformers.LigerFusedLinearJSD (Triton JSD, beta=0.5)", ("cuda",)),
    "matmul_floor": ("the 4 bare lm_head matmuls (2 logits, grad_h, grad_W)", ("cuda", "cpu")),
}

PARAMS = [
    pytest.param(case, impl, id=f"{case.id}-{impl}")
    for case in GPU_CASES + CPU_CASES
    for impl, (_, devices) in IMPLS.items()
    if case.device in devices
]


def _skip_reason(case: LinearCase, impl: str) -> str | None:
    import importlib.util

    if case.device == "cuda" and not torch.cuda.is_available():
        return "CUDA cases need a CUDA device"
    if case.device != harness.selected_device():
        return f"{case.device} cases are off (SDPO_BENCH_DEVICE selects {harness.selected_device()})"
    if case.large and os.environ.get("SDPO_BENCH_LARGE_CPU", "0") != "1":
        return "large CPU case: set SDPO_BENCH_LARGE_CPU=1"
    if impl == "fused_triton" and importlib.util.find_spec("sdpo_kernels.triton_backend") is None:
        return "sdpo_kernels.triton_backend is not available"
    if impl.startswith("trl") and importlib.util.find_spec("trl") is None:
        return "trl is not installed"
    if impl.startswith("liger") and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    return None


@dataclass
class LinearInputs:
    h: torch.Tensor  # [N, D] leaf, requires grad
    w: torch.Tensor  # [V, D] leaf, requires grad
    ht: torch.Tensor  # [N, D]
    wt: torch.Tensor  # [V, D]
    ids: torch.Tensor  # [N]
    old: torch.Tensor  # [N] float32
    weights: torch.Tensor  # [N] float32

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())


def make_inputs(case: LinearCase, seed: int = 0) -> LinearInputs:
    """Hidden states ~ N(0, 1), weights ~ N(0, 1)·(2/sqrt(D)) so logits have std ≈ 2 (as in
    bench_loss); teacher = student + noise (hidden 0.25·N, weight 0.05·N relative); old log-probs
    = the student's log-prob of the sampled token + 0.5·N(0,1); weights = 1/N (a token mean)."""
    gen = torch.Generator(device=case.device).manual_seed(seed)
    dev, dt = case.device, case.torch_dtype
    scale = 2.0 / case.d**0.5
    h = torch.randn(case.n, case.d, generator=gen, device=dev, dtype=dt)
    w = torch.randn(case.v, case.d, generator=gen, device=dev, dtype=dt).mul_(scale)
    ht = torch.randn(case.n, case.d, generator=gen, device=dev, dtype=dt).mul_(0.25).add_(h)
    wt = torch.randn(case.v, case.d, generator=gen, device=dev, dtype=dt).mul_(0.05 * scale).add_(w)
    ids = torch.randint(0, case.v, (case.n,), generator=gen, device=dev)
    old = torch.empty(case.n, device=dev, dtype=torch.float32)
    step = max(1, (1 << 24) // case.v)
    with torch.no_grad():
        for lo in range(0, case.n, step):
            z = (h[lo : lo + step] @ w.t()).float()
            old[lo : lo + step] = z.gather(-1, ids[lo : lo + step, None]).squeeze(-1) - torch.logsumexp(z, -1)
        old.add_(torch.randn(case.n, generator=gen, device=dev).mul_(0.5))
    weights = torch.full((case.n,), 1.0 / case.n, device=dev)
    return LinearInputs(h.requires_grad_(), w.requires_grad_(), ht, wt, ids, old, weights)


# ---------------------------------------------------------------------------------------------
# steps: each returns the loss and gradients w.r.t. (h, W), which the caller drops


def _fused(backend: str):
    from sdpo_kernels import linear_self_distillation_loss

    def run(x: LinearInputs):
        loss, _ = linear_self_distillation_loss(
            x.h, x.w, x.ht, x.wt, x.ids, x.old, weights=x.weights, backend=backend, **harness.LOSS_KWARGS
        )
        return loss

    return run


def _trl_eager():
    loss_fn = harness.make_impl("trl_eager")

    def run(x: LinearInputs):
        logits = x.h @ x.w.t()
        with torch.no_grad():
            teacher = x.ht @ x.wt.t()
        return (x.weights * loss_fn(logits, teacher, x.ids, x.old)).sum()

    return run


def _trl_compiled():
    formula = harness._trl_formula  # the TRL math in plain torch ops (one graph)

    def total(h, w, ht, wt, ids, old, weights):
        teacher = (ht @ wt.t()).detach()
        return (weights * formula(h @ w.t(), teacher, ids, old)).sum()

    compiled = torch.compile(total, fullgraph=True, dynamic=False)
    return lambda x: compiled(x.h, x.w, x.ht, x.wt, x.ids, x.old, x.weights)


def _liger_jsd_loss():
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, temperature=1.0)
    return lambda x: module(x.h, x.w, x.ht, x.wt, x.ids)


def _liger_jsd():
    from liger_kernel.transformers import LigerFusedLinearJSD

    module = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)
    return lambda x: module(x.h, x.w, x.ht, x.wt, x.ids)


def make_step(impl: str, x: LinearInputs, device: str):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if impl == "matmul_floor":
        h, w = x.h.detach(), x.w.detach()

        def floor_step() -> None:
            logits = h @ w.t()
            teacher = x.ht @ x.wt.t()
            grad_h = logits @ w  # the student logits stand in for their gradient (same shape, dtype)
            grad_w = logits.t() @ h
            del logits, teacher, grad_h, grad_w
            sync()

        return floor_step
    run = {
        "fused_triton": lambda: _fused("triton"),
        "fused_reference": lambda: _fused("reference"),
        "trl_eager": _trl_eager,
        "trl_compiled": _trl_compiled,
        "liger_jsd_loss": _liger_jsd_loss,
        "liger_jsd": _liger_jsd,
    }[impl]()

    def step() -> None:
        loss = run(x)
        grads = torch.autograd.grad(loss, (x.h, x.w))
        del loss, grads
        sync()

    return step


def _rounds(case: LinearCase, step_s: float) -> int:
    if os.environ.get("SDPO_BENCH_ROUNDS"):
        return int(os.environ["SDPO_BENCH_ROUNDS"])
    budget = float(os.environ.get("SDPO_BENCH_BUDGET_S", 10.0 if case.device == "cuda" else 30.0))
    most = 20 if case.device == "cuda" else 5
    return max(1 if case.large else 3, min(most, int(budget / max(step_s, 1e-9))))


@pytest.mark.parametrize(("case", "impl"), PARAMS)
def test_linear_fwd_bwd(benchmark, case: LinearCase, impl: str):
    reason = _skip_reason(case, impl)
    if reason:
        pytest.skip(reason)
    gc.collect()
    if case.device == "cuda":
        torch.cuda.empty_cache()
    benchmark.group = f"linear fwd+bwd {case.device} {case.dtype}"
    x = make_inputs(case)
    step = make_step(impl, x, case.device)
    t0 = time.perf_counter()
    step()  # compile / autotune / first touch, outside both measurements
    first_s = time.perf_counter() - t0
    if not case.large:
        t0 = time.perf_counter()
        step()  # warm-up round, also sizes the number of rounds
        first_s = time.perf_counter() - t0
    rounds = _rounds(case, first_s)
    load_before = os.getloadavg()[0]
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    load_after = os.getloadavg()[0]
    # Memory after timing, in one separate step (the CPU method runs the profiler).
    peak = harness.peak_extra_bytes(step, case.device)
    fp32_nv = case.n * case.v * 4
    benchmark.extra_info.update(
        {
            "suite": "linear",
            "impl": impl,
            "impl_label": IMPLS[impl][0],
            "device": case.device,
            "device_name": harness.device_name(case.device),
            "dtype": case.dtype,
            "N": case.n,
            "V": case.v,
            "D": case.d,
            **{f"loss_{k}": v for k, v in harness.LOSS_KWARGS.items()},
            "input_bytes": x.nbytes,
            "peak_mem_bytes": peak,
            "nv_unit_bytes": case.nv_bytes,
            "peak_mem_nv": peak / case.nv_bytes,
            "peak_mem_nv_fp32": peak / fp32_nv,
            "weight_grad_nv_fp32": case.v * case.d * x.w.element_size() / fp32_nv,
            # 1-minute load average around the timed rounds: other work on the machine shows up here.
            "loadavg_1min": [load_before, load_after],
        }
    )
