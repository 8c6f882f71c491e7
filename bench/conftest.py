"""pytest setup of the benchmarks (run explicitly: `pytest bench/bench_loss.py ...`, see README.md).

Never sets TRITON_INTERPRET: Triton cases run on CUDA only. Adds the device, library versions and
date to pytest-benchmark's machine_info, so every saved JSON says where and with what it ran.
"""

from __future__ import annotations

import datetime
import os
import sys

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness


def pytest_benchmark_update_machine_info(config, machine_info):
    device = harness.selected_device()
    bw, bw_source = harness.peak_bandwidth_gbps(device)
    machine_info["sdpo_bench"] = {
        "device_kind": device,
        "device_name": harness.device_name(device),
        "cpu_model": harness.cpu_model(),
        "cuda_device_name": harness.device_name("cuda") if device == "cuda" else None,
        "versions": harness.versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_num_threads": __import__("torch").get_num_threads(),
        "logical_cpus": os.cpu_count(),
        "sdpo_kernels_sources": harness.source_digests(),
        "peak_bw_gbps": bw,
        "peak_bw_source": bw_source,
        "loss_kwargs": harness.LOSS_KWARGS,
    }
