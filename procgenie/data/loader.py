"""Training batches: random clips of T consecutive frames inside one episode, with their actions.

Batch `step` is a pure function of (seed, step): resuming at step s needs no loader state, and under
DDP rank r of w takes rows [r*B/w, (r+1)*B/w) of the same global batch, so any number of ranks
sees exactly the clips that one process would. A batch's reads are announced to the kernel together,
so a dataset larger than memory streams from disk at the disk's parallel speed (docs/benchmarks.md).

Letters: B clips, T frames per clip, H, W pixels, C=3 colours.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from procgenie.data.store import Dataset
from procgenie.errors import UserError


class ClipSampler:
    """Uniform random clips of `seq_len` frames from one split of a Dataset."""

    def __init__(
        self, ds: Dataset, split: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1
    ):
        self.ds, self.seq_len, self.seed = ds, seq_len, seed
        if batch_size % world:
            raise UserError(f"batch_size {batch_size} must be divisible by the number of ranks {world}")
        self.batch_size, self.rank, self.world = batch_size, rank, world
        eps = ds.episodes(split)
        eps = eps[eps["length"] >= seq_len]
        if len(eps) == 0:
            raise UserError(
                f"{ds.root} has no {split} episode of at least {seq_len} frames: collect more "
                f"episodes or lower seq_len (--set seq_len=N)"
            )
        self.eps = eps
        # Clip starts: episode e offers length-T+1 of them; cum[e] counts those before it.
        self.cum = np.concatenate([[0], np.cumsum(eps["length"] - seq_len + 1)])

    @property
    def num_clips(self) -> int:
        return int(self.cum[-1])

    def indices(self, step: int) -> np.ndarray:
        """This rank's clip indices for optimizer step `step`."""
        rng = np.random.default_rng([self.seed, step])
        idx = rng.integers(0, self.num_clips, self.batch_size)  # the global batch
        per = self.batch_size // self.world
        return idx[self.rank * per : (self.rank + 1) * per]

    def locate(self, i: int) -> tuple[int, int]:
        """Clip i -> (shard index, first step in that shard)."""
        e = int(np.searchsorted(self.cum, i, side="right") - 1)
        ep = self.eps[e]
        return int(ep["shard"]), int(ep["start"] + (i - self.cum[e]))

    def clip(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Clip i: frames (T, H, W, C) uint8 and actions (T-1,) where action t leads from frame t to t+1."""
        shard, s = self.locate(i)
        sh = self.ds.shards[shard]
        frames = np.array(sh.frames[s : s + self.seq_len])
        actions = sh.steps["actions"][s : s + self.seq_len - 1].astype(np.int64)
        return frames, actions

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        where = [self.locate(int(i)) for i in self.indices(step)]
        _prefetch(self.ds, where, self.seq_len)
        B, T = len(where), self.seq_len
        frames = np.empty((B, T, *self.ds.shards[where[0][0]].frames.shape[1:]), np.uint8)  # (B, T, H, W, C)
        actions = np.empty((B, T - 1), np.int64)  # (B, T-1)
        for b, (shard, s) in enumerate(where):  # copied straight into the batch: one copy per byte
            sh = self.ds.shards[shard]
            frames[b] = sh.frames[s : s + T]
            actions[b] = sh.steps["actions"][s : s + T - 1]
        return {"frames": torch.from_numpy(frames), "actions": torch.from_numpy(actions)}


def _prefetch(ds: Dataset, where: list[tuple[int, int]], T: int) -> None:
    """Ask the kernel to read all of a batch's clips at once.

    A dataset larger than memory is read from disk at random: copied one after another, a batch's
    clips each wait a full disk round trip. Announced together (POSIX_FADV_WILLNEED), their reads
    overlap. Where the frames are already in the page cache the call costs next to nothing.
    """
    if not hasattr(os, "posix_fadvise"):  # not on macOS or Windows: plain reads
        return
    by_shard: dict[int, list[int]] = {}
    for shard, s in where:
        by_shard.setdefault(shard, []).append(s)
    for shard, starts in by_shard.items():
        frames = ds.shards[shard].frames  # np.memmap: its file and where the array starts in it
        if not isinstance(frames, np.memmap):
            continue
        step_bytes = frames.strides[0]
        fd = os.open(frames.filename, os.O_RDONLY)
        try:
            for s in starts:
                os.posix_fadvise(fd, frames.offset + s * step_bytes, T * step_bytes, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


class StepBatches(torch.utils.data.Dataset):
    """Item k is the batch of step `start + k`: a DataLoader with workers prefetches them in order."""

    def __init__(self, sampler: ClipSampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return self.sampler.batch(self.start + k)


def batches(sampler: ClipSampler, start: int, stop: int, workers: int = 0, pin_memory: bool = False):
    """Iterate the batches of steps [start, stop), prefetched by `workers` processes."""
    return torch.utils.data.DataLoader(
        StepBatches(sampler, start, stop),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def loader_frames_per_s(
    data: str, batch_size: int = 8, seq_len: int = 16, seconds: float = 10.0, workers: int = 0
) -> dict:
    """Training frames/s that the clip loader serves from dataset `data` (random clips, as in training)."""
    sampler = ClipSampler(Dataset(data, verify=False), "train", seq_len, batch_size, seed=0)
    count, start = 0, time.perf_counter()
    for b in batches(sampler, 0, 10**9, workers=workers):
        count += 1
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {
        "batches_per_s": count / elapsed,
        "frames_per_s": count * batch_size * seq_len / elapsed,
        "batch_ms": 1000 * elapsed / count,
        "frames": int(sampler.eps["length"].sum()),
    }
