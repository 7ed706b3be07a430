"""Writing a dataset (the layout: procgenie/data/store.py): opening one to start or continue it, and one shard's
two files, written atomically and checksummed on the way out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from procgenie.atomic import remove_stale_tmp, write_atomic
from procgenie.data import store
from procgenie.errors import UserError


def open_for_writing(root: Path, how: str, identity: dict, header: dict) -> dict:
    """The manifest of the dataset at `root` that `how` ('collect' or 'import') continues, refused where it was
    made with other settings than `identity`; else a new one with `header` (root must be empty or new). The
    shards folder is made and what a killed run left behind is removed."""
    if (root / "manifest.json").exists():
        manifest = store.read_manifest(root)
        old = manifest.get(how) or {}
        diff = [f"{k} {old.get(k)!r:.60} (now {v!r:.60})" for k, v in identity.items() if old.get(k) != v]
        if diff:
            raise UserError(
                f"{root} holds a dataset made with other settings: {', '.join(diff)}; rerun with the "
                "same settings to continue it, or choose another --out"
            )
    else:
        if root.exists() and any(p for p in root.iterdir() if not p.name.startswith(".")):
            raise UserError(f"--out {root} is a folder with other files in it: give an empty or new folder")
        manifest = {"format": store.FORMAT, "version": store.VERSION, "split_rule": store.SPLIT_RULE, **header}
        manifest |= {how: identity, "sessions": 0, "shards": []}
    (root / "shards").mkdir(parents=True, exist_ok=True)
    remove_orphans(root, manifest)
    remove_stale_tmp(root)  # a manifest write that a kill cut short
    return manifest


def remove_orphans(root: Path, manifest: dict) -> int:
    """Delete shard files that no manifest record names (leftovers of a killed run)."""
    known = {s["name"] for s in manifest.get("shards", [])}
    removed = 0
    for path in (root / "shards").glob("*"):
        stem = path.name.split(".")[0]
        half_written = path.name.startswith(".") and path.name.endswith(".tmp")
        if half_written or (store.SHARD_NAME.match(stem) and stem not in known):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


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
        "sha256": {"frames": h.hexdigest(), "steps": store.sha256_file(spath)},
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
