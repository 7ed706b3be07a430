"""One shard's two files, written atomically and checksummed on the way out (the layout: procgenie/data/store.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from procgenie.atomic import write_atomic


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_shard(root: Path, name: str, split: str, episodes: list[dict]) -> dict:
    """Write whole episodes as one shard (two files, each atomically) and return its manifest record.

    Each episode dict holds frames (L, H, W, 3) uint8, actions (L,), rewards (L,), level_seed, truncated.
    """
    frames = np.concatenate([e["frames"] for e in episodes])  # (N, H, W, 3)
    lengths = [len(e["frames"]) for e in episodes]
    firsts = np.zeros(len(frames), bool)
    firsts[np.cumsum([0] + lengths[:-1])] = True
    steps = dict(
        actions=np.concatenate([e["actions"] for e in episodes]).astype(np.uint8),
        rewards=np.concatenate([e["rewards"] for e in episodes]).astype(np.float32),
        firsts=firsts,
        level_seeds=np.repeat([int(e["level_seed"]) for e in episodes], lengths).astype(np.int64),
        truncated=np.array([bool(e["truncated"]) for e in episodes]),
    )
    shard_dir = root / "shards"
    fpath, spath = shard_dir / f"{name}.frames.npy", shard_dir / f"{name}.steps.npz"
    h = hashlib.sha256()
    write_atomic(fpath, lambda tmp: _save_hashed(tmp, frames, h))
    write_atomic(spath, lambda tmp: _save_npz(tmp, steps))  # small: hashed by reading it back
    return {
        "name": name,
        "split": split,
        "frames": int(len(frames)),
        "episodes": len(episodes),
        "shape": list(frames.shape[1:]),
        "sha256": {"frames": h.hexdigest(), "steps": sha256_file(spath)},
    }


def _save_npz(tmp: str, arrays: dict) -> None:
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def _save_hashed(tmp: str, arr: np.ndarray, h) -> None:
    """np.save, hashing the bytes on their way out (no second read of a large file)."""

    class Hashing:
        def write(self, b) -> int:
            h.update(b)
            return fh.write(b)

    with open(tmp, "wb") as fh:
        np.lib.format.write_array(Hashing(), arr, allow_pickle=False)
