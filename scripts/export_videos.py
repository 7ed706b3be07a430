"""Write each episode of a procgenie dataset as its own video file: recordings without actions, for
`procgenie data import` (issue 24's real run records another Procgen game this way).

    python scripts/export_videos.py data/bigfish videos/bigfish --scale 4 --fps 15

Frames are upscaled by --scale with nearest-neighbour, as a screen recording of the game would be,
and encoded as H.264 MP4 (or GIF with --format gif); the actions are not written anywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from procgenie.atomic import write_bytes_atomic
from procgenie.data.store import Dataset
from procgenie.video import encode_video, upscale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="dataset folder (from `procgenie collect`)")
    p.add_argument("out", help="folder for the videos")
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscale (default 4: 256 px)")
    p.add_argument("--fps", type=float, default=15, help="frame rate written into the files (default 15)")
    p.add_argument("--format", choices=("mp4", "gif"), default="mp4")
    p.add_argument("--limit", type=int, default=None, help="at most this many episodes")
    a = p.parse_args()
    ds = Dataset(a.data)
    eps = ds.episodes()[: a.limit]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, ep in enumerate(tqdm(eps, unit="video", desc="export")):
        frames = upscale(ds.episode(ep)["frames"], a.scale)
        write_bytes_atomic(out / f"episode-{i:05d}.{a.format}", encode_video(frames, f".{a.format}", a.fps))
    print(f"wrote {len(eps)} videos to {out}")


if __name__ == "__main__":
    main()
