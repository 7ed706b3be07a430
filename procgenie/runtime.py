"""Where training runs: the torchrun process group and device, CPU threads and allocator, fast kernels, and the
few values that every rank must agree on (a mean metric, a stop, a finite loss).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch
import torch.distributed as dist


def distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the torchrun process group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def set_cpu_threads(local_world: int = 1) -> None:
    """Share this machine's cores among the `local_world` processes that train on it.

    A single process keeps an explicit OMP_NUM_THREADS; torchrun sets that to 1 for every rank by
    default, which would leave cores idle, so under torchrun the cores are always shared out.
    """
    if local_world > 1 or "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, _cores() // local_world))


def _cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def speed_settings(device: torch.device, deterministic: bool) -> None:
    """Fast kernels that keep training's results: TF32 matmuls and convolutions and cuDNN autotuning on CUDA;
    on a CPU, freed memory kept for reuse (`keep_freed_memory`).

    TF32 (fp32's range, a 10-bit mantissa) is finer than the bf16 that autocast already computes most
    matmuls in. (bf16 autocast, fused AdamW, flash attention through SDPA, activation checkpointing and
    pinned-memory loading are set where they are used.)
    """
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not deterministic  # the shapes never change: tune once per conv


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of handing it back to the kernel (Linux only).

    PyTorch's CPU allocator has no cache: glibc serves each block over 32 MB (the dynamics model's logits,
    their float32 copy, their gradient) from fresh pages and unmaps them when freed, so every training
    step page-faults and zero-fills those blocks anew. Kept in the heap instead, they are reused at once
    (what that saves per step: docs/benchmarks.md).
    The process keeps its peak heap until it exits. Returns whether the setting took.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameters (malloc.h)
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc: leave the allocator as it is
        return False


def mean_across_ranks(values: dict, device) -> dict:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device)
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def any_rank(flag: bool, device) -> bool:
    """Is `flag` true on any rank? (A signal may reach one rank first; all must stop at the same step.)"""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return t.item() > 0


def finite_everywhere(ok: bool, device) -> bool:
    """Is `ok` (the loss is finite) true on every rank? All ranks must stop together, or the others wait forever."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    t = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(t)
    return t.item() == 0
