"""The loader at a scale this disk cannot hold: a dataset of FRAMES frames whose frame files are sparse.

Usage: python scripts/loader_scale.py DIR [FRAMES] [SECONDS]     (default 10,000,000 frames, 5 s per timing)

Writes DIR (a valid procgenie dataset: real step files, frame files of the right size that hold no
data blocks, 123 GB apparent at 10M frames, a few hundred MB on disk), then times opening it and the
training loader's random clips (8 x 16 frames, as `data.loader.loader_frames_per_s`) in-process and through
one and two DataLoader workers. Reads of a sparse file cost no disk time, so this measures what grows
with the dataset (index, shard count, memory maps), not the disk; docs/benchmarks.md has the disk's part.
Delete DIR afterwards.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from procgenie.data.loader import loader_frames_per_s
from procgenie.data.shards import _save_npz
from procgenie.data.store import SPLIT_RULE, Dataset, write_manifest

root = Path(sys.argv[1])
total = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000_000
seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
per_shard, episode = 16_384, 128  # 128-frame episodes: CoinRun's mixed-policy episodes average about 170

(root / "shards").mkdir(parents=True, exist_ok=False)
rng = np.random.default_rng(0)
records, done, i = [], 0, 0
t0 = time.perf_counter()
while done < total:
    n = min(per_shard, total - done)
    name = f"train-s000-w00-{i:05d}"
    frames = np.lib.format.open_memmap(root / "shards" / f"{name}.frames.npy", "w+", np.uint8, (n, 64, 64, 3))
    del frames  # sized, never written: a sparse file
    firsts = np.zeros(n, bool)
    firsts[::episode] = True
    episodes = int(firsts.sum())
    _save_npz(
        str(root / "shards" / f"{name}.steps.npz"),
        {
            "actions": rng.integers(0, 15, n).astype(np.uint8),
            "rewards": np.zeros(n, np.float32),
            "firsts": firsts,
            # train-split seeds only (seed % 20 >= 2), one per episode
            "level_seeds": np.repeat(20 * np.arange(i * 1000, i * 1000 + episodes) + 2, episode)[:n].astype(np.int64),
            "truncated": np.zeros(episodes, bool),
        },
    )
    records.append(
        {
            "name": name,
            "split": "train",
            "frames": n,
            "episodes": episodes,
            "shape": [64, 64, 3],
            "sha256": {"frames": "not-computed", "steps": "not-computed"},
        }
    )
    done, i = done + n, i + 1
write_manifest(
    root,
    {
        "format": "procgenie-dataset",
        "version": 1,
        "env": "coinrun",
        "image_size": 64,
        "num_actions": 15,
        "split_rule": SPLIT_RULE,
        "collect": {},
        "sessions": 1,
        "shards": records,
    },
)
print(f"wrote {total:,} frames in {len(records)} shards in {time.perf_counter() - t0:.1f} s")

t0 = time.perf_counter()
ds = Dataset(root)  # above 2 GB: no checksums on open (as in training)
eps = ds.episodes("train")
print(f"opened and indexed: {len(eps):,} episodes in {time.perf_counter() - t0:.2f} s")
results = {}
for workers in (0, 1, 2):
    r = loader_frames_per_s(str(root), 8, 16, seconds=seconds, workers=workers)
    results[workers] = r
    print(
        f"workers={workers}: {r['batch_ms']:.2f} ms/batch, {r['frames_per_s']:,.0f} frames/s over "
        f"{r['frames']:,} frames"
    )
print(json.dumps(results))
