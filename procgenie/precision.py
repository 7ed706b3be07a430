"""Which precision to compute in: `auto | bf16 | fp32`, and the autocast context for it.

bf16 autocast is 2.4x faster than fp32 on a CPU with bf16 instructions (avx512_bf16, AMX) and on
GPUs, but a CPU without them emulates it: on an AVX2-only EPYC a bf16 matrix product ran at
1 GFLOP/s against 176 in fp32, and every command ran 5 to 100 times slower (issue 20). So `auto`
decides per device:

- CUDA: bf16 where the GPU supports it (`torch.cuda.is_bf16_supported`), else fp32.
- MPS: fp32 (autocast's bf16 there was never measured faster).
- CPU: an x86 CPU whose flags lack avx512_bf16 and amx_bf16 gets fp32 straight away (no kernel can be
  fast there, and timing the emulated product would itself cost a second). Any other CPU (x86 with
  the flags, ARM, ...) times one matrix product of a training-sized shape in each precision and takes
  bf16 only if it is faster: a flag says an instruction exists, not that PyTorch's kernels use it.

The decision is made once per process and device type.
"""

from __future__ import annotations

import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from procgenie.config import PRECISIONS
from procgenie.errors import UserError

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_decided: dict[str, str] = {}


def check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where there is no such file (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def time_matmul(dtype: torch.dtype, n: int = 256, m: int = 1024, reps: int = 3) -> float:
    """Best-of-`reps` seconds of an (m, n) @ (n, n) product in `dtype` on the CPU, after one warm-up call."""
    a, b = torch.randn(m, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_prefers_bf16(flags: set[str] | None = None, probe=time_matmul, rounds: int = 5) -> tuple[bool, str]:
    """(bf16 is faster here, why): the feature check, then the measurement (`probe(dtype) -> seconds`)."""
    flags = cpu_flags() if flags is None else flags
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    if x86 and flags is not None and not any(f in flags for f in _BF16_FLAGS):
        return False, "no avx512_bf16/amx_bf16 in the CPU flags: bf16 is emulated here"
    # Alternate the two, best of each: on a busy CPU one block of timings can fall in another process's time
    # slice (measured: two trainings running, back-to-back blocks chose fp32 in 2 of 6 processes).
    bf16_s = fp32_s = float("inf")
    for _ in range(rounds):
        bf16_s, fp32_s = min(bf16_s, probe(torch.bfloat16)), min(fp32_s, probe(torch.float32))
    return bf16_s < fp32_s, f"measured matmul: bf16 {bf16_s * 1e3:.2f} ms, fp32 {fp32_s * 1e3:.2f} ms"


def resolve(precision: str, device: torch.device) -> str:
    """'bf16' or 'fp32': what `precision` means on `device` (module docstring)."""
    if check(precision) != "auto":
        return precision
    key = device.type
    if key not in _decided:
        if key == "cuda":
            _decided[key] = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        elif key == "cpu":
            _decided[key] = "bf16" if cpu_prefers_bf16()[0] else "fp32"
        else:
            _decided[key] = "fp32"
    return _decided[key]


def autocast(device: torch.device, precision: str):
    """bf16 autocast for a resolved 'bf16', nothing for 'fp32'."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
