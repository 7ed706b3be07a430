"""Timing helpers of `procgenie bench` and the scripts: wall-clock seconds of repeated calls (waiting for the
device), the device's name, and the matmul peak that training's FLOP/s are measured against."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_calls(fn, device, seconds: float, min_calls: int) -> list[float]:
    """Wall-clock seconds of each of repeated fn() calls, for `seconds` and at least `min_calls` calls."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return f"mps: {platform.machine()}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {torch.get_num_threads()} threads"


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, seconds: float) -> tuple[float, int]:
    """FLOP/s of an (n, n) @ (n, n) product in `dtype`, n large enough to reach the kernels' peak."""
    n = {"cuda": 8192, "mps": 4096}.get(device.type, 2048)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    times = time_calls(lambda: a @ b, device, min(0.2, seconds / 4), 1)  # warm-up: kernel choice, clocks
    times = time_calls(lambda: a @ b, device, seconds, 3)
    return 2 * n**3 * len(times) / sum(times), n
