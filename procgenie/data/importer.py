"""`procgenie data import`: recordings without actions (MP4, WebM, GIF, folders of frames) -> a dataset.

Each source file (or frame folder) is decoded, resampled to a frame rate, made square and resized,
cut into episodes of at most `episode_frames` frames, and written as shards of the same checksummed
format that `collect` writes, with the actions marked absent. The split (`parts`) keeps every split
supplied without a frame in two: from 20 sources on, whole sources are split as levels are (source i of
the sorted list goes where `store.split_of(i)` says, its index in the level seed's place); below that,
one source each to test and val would leave eval one clip or none, so each source holds out its last
tenth instead, after a gap of dropped frames. A rerun of the same command continues: every shard record
names the sources it holds, and all parts of a source reach the manifest in one write. A file that
cannot be decoded is named, skipped and counted, and stops nothing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from procgenie.atomic import exclusive
from procgenie.data import store
from procgenie.data.shards import open_for_writing, write_shard
from procgenie.errors import UserError

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FITS = ("crop", "pad", "squash")
MANY_SOURCES = 20  # from this many sources on, whole sources are split (as levels: 1 in 20 to test, 1 to val)
HELD_SHARE = 0.1  # below it, the share of each source held out at its end...
HELD_MIN = 16  # ...at least this many frames: eval's default clip (4 + 10) and the cpu preset's training clip
GAP = 8  # frames dropped before a held-out part, so that no frame of one split is next to another split's
SPLIT_RULES = {
    "source": "source index % 20 == 0 -> test, == 1 -> val, else train (sources in sorted order)",
    "time": (
        f"fewer than {MANY_SOURCES} sources: each holds out its last {HELD_SHARE:.0%} (at least {HELD_MIN} "
        f"frames), test for an even source index, val for an odd one (a single source: val, then test), {GAP} "
        "frames dropped before each held-out part; a source too short for it stays whole in train; "
        "level seed 20 * source index + (0 test, 1 val, 2 train)"
    ),
}


def find_sources(paths: list[str]) -> list[Path]:
    """Video files, GIFs and frame folders named by `paths` (a folder of videos or of frame folders is opened)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} does not exist: give video files, GIFs or folders of frames")
        if p.is_file():
            out.append(p)
        elif any(c.suffix.lower() in IMAGE_SUFFIXES for c in p.iterdir()):
            out.append(p)  # a folder of frames: one recording
        else:
            inner = sorted(
                c
                for c in p.iterdir()
                if not c.name.startswith(".") and (c.suffix.lower() in VIDEO_SUFFIXES + (".gif",) or c.is_dir())
            )
            if not inner:
                raise UserError(f"{p} holds no videos, GIFs or frames ({', '.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)})")
            out += inner
    return sorted(set(out), key=str)


def parse_crop(text: str | None) -> tuple[int, int, int, int] | None:
    if text is None:
        return None
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--crop {text}: write X,Y,W,H in source pixels, e.g. 0,40,640,400") from None
    if x < 0 or y < 0 or w < 1 or h < 1:
        raise UserError(f"--crop {text}: X and Y must be at least 0, W and H at least 1")
    return x, y, w, h


def read_frames(src: Path, fps: float | None):
    """Yield the RGB frames (PIL images) of one source at `fps` (None: every frame). Frame folders have no rate
    of their own: their frames are all kept."""
    from PIL import Image, ImageSequence

    if src.is_dir():
        for f in sorted(c for c in src.iterdir() if c.suffix.lower() in IMAGE_SUFFIXES):
            with Image.open(f) as im:
                yield im.convert("RGB")
        return
    if src.suffix.lower() == ".gif":
        with Image.open(src) as im:
            frames = [(f.convert("RGB"), max(f.info.get("duration", 100), 10)) for f in ImageSequence.Iterator(im)]
        # GIF writers merge repeated frames into one of a longer duration: the commonest duration is the
        # frame period, and a frame shown k periods counts k times (browsers show 0 ms frames for 10 ms or more).
        period = max(set(d for _, d in frames), key=[d for _, d in frames].count) / 1000
        step, t, keep = (period if fps is None else 1 / fps), 0.0, 0.0
        for frame, ms in frames:
            t += ms / 1000
            while keep < t - 1e-6:  # every frame time that falls within this frame's display
                yield frame
                keep += step
        return
    import imageio.v3 as iio

    rate = float(iio.immeta(src, plugin="pyav").get("fps") or 0) if fps is not None else 0.0
    keep = 0.0
    for i, arr in enumerate(iio.imiter(src, plugin="pyav")):
        if fps is None or rate <= 0 or i >= keep - 1e-9:
            yield Image.fromarray(np.asarray(arr)[..., :3])
            keep += rate / fps if rate > 0 and fps is not None else 0


def square(im, size: int, fit: str, crop: tuple[int, int, int, int] | None) -> np.ndarray:
    """One frame -> uint8 (size, size, 3): optionally cut to `crop`, then made square by centre crop, black
    padding or squashing, and resized with an area filter (each output pixel the mean of those it covers)."""
    from PIL import Image

    if crop is not None:
        x, y, w, h = crop
        if x + w > im.width or y + h > im.height:
            raise ValueError(f"--crop {x},{y},{w},{h} reaches outside the {im.width}x{im.height} frame")
        im = im.crop((x, y, x + w, y + h))
    w, h = im.size
    if fit == "crop":
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    elif fit == "pad":
        s = max(w, h)
        canvas = Image.new("RGB", (s, s))
        canvas.paste(im, ((s - w) // 2, (s - h) // 2))
        im = canvas
    return np.asarray(im.resize((size, size), Image.Resampling.BOX), np.uint8)


def decode(src: Path, fps: float | None, size: int, fit: str, crop) -> np.ndarray:
    frames = [square(im, size, fit, crop) for im in read_frames(src, fps)]
    if len(frames) < 2:
        raise ValueError(f"{len(frames)} frame(s): a recording needs at least 2")
    return np.stack(frames)


def parts(i: int, n: int, length: int, rule: str) -> list[tuple[str, int, int]]:
    """Where source i of n, `length` frames long, goes: (split, first frame, end) per part, in time order.

    'source': all of it to `store.split_of(i)`. 'time': its train part, then after `GAP` dropped frames its
    held-out tail (two tails, val then test, for the only source), unless the train part would come out
    shorter than a tail: then it all trains."""
    if rule == "source":
        return [(store.split_of(i), 0, length)]
    held = ["val", "test"] if n == 1 else ["test" if i % 2 == 0 else "val"]
    tail = max(math.ceil(length * HELD_SHARE), HELD_MIN)
    train = length - len(held) * (GAP + tail)
    if train < tail:
        return [("train", 0, length)]
    out = [("train", 0, train)]
    for split in held:
        start = out[-1][2] + GAP
        out.append((split, start, start + tail))
    return out


def episodes(part: np.ndarray, seed: int, episode_frames: int) -> list[dict]:
    """One part of a source (T, S, S, 3) -> episodes of at most `episode_frames` frames, with zeros for the
    actions and rewards it does not have (the manifest marks them absent); a last piece of 1 frame is dropped."""
    pieces = [part[c : c + episode_frames] for c in range(0, len(part), episode_frames)]
    return [
        {"frames": p, "actions": np.zeros(len(p)), "rewards": np.zeros(len(p)), "level_seed": seed, "truncated": False}
        for p in pieces
        if len(p) >= 2
    ]


def level_seed(i: int, split: str, rule: str) -> int:
    """The level seed of source i's episodes in `split`: the source index (as before there were two rules), or
    for a source cut in time one number per part whose `store.split_of` is its split (`data validate` checks)."""
    return i if rule == "source" else 20 * i + {"test": 0, "val": 1, "train": 2}[split]


def import_videos(
    sources: list[str],
    out: str,
    fps: float | None = None,
    size: int = 64,
    fit: str = "crop",
    crop: str | None = None,
    episode_frames: int = 1000,
    name: str = "video",
    shard_frames: int = 8192,
    quiet: bool = False,
) -> dict:
    """Import `sources` into the dataset at `out` (continuing it if a run of the same command was cut short)."""
    if fit not in FITS:
        raise UserError(f"--fit {fit}: choose one of {', '.join(FITS)}")
    if fps is not None and not 0 < fps <= 240:
        raise UserError(f"--fps must lie in (0, 240], got {fps}")
    if not 8 <= size <= 512:
        raise UserError(f"--size must lie in 8..512, got {size}")
    if episode_frames < 2:
        raise UserError(f"--episode-frames must be at least 2, got {episode_frames}")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"--name {name!r}: use letters, digits, - and _")
    box = parse_crop(crop)
    srcs = find_sources(sources)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file: give a folder for the dataset")
    identity = dict(
        sources=[str(s.resolve()) for s in srcs],
        fps=fps,
        size=size,
        fit=fit,
        crop=crop,
        episode_frames=episode_frames,
        name=name,
    )
    with exclusive(root, f"importing into {root}"):
        header = {"env": name, "image_size": size, "actions": False}
        manifest = open_for_writing(root, "import", identity, header)
        # The rule is fixed by the first run; an import begun before there were two rules continues by source.
        new_rule = "source" if manifest["shards"] or len(srcs) >= MANY_SOURCES else "time"
        rule = manifest["import"].setdefault("split", new_rule)
        manifest["split_rule"] = SPLIT_RULES[rule]
        done = {i for s in manifest["shards"] for i in s.get("sources", [])}
        session = manifest["sessions"]
        manifest["sessions"] = session + 1
        store.write_manifest(root, manifest)
        pending = {s: [] for s in store.SPLITS}  # split -> [(source index, its episodes in that split)]
        skipped, frames, dropped, shards, t0 = [], 0, 0, 0, time.perf_counter()

        def flush(splits) -> None:
            nonlocal shards
            for split in [s for s in splits if pending[s]]:
                name_ = f"{split}-s{session:03d}-w00-{shards:05d}"
                record = write_shard(root, name_, split, [e for _, eps in pending[split] for e in eps])
                record["sources"] = [i for i, _ in pending[split]]
                manifest["shards"].append(record)
                pending[split], shards = [], shards + 1
            store.write_manifest(root, manifest)  # once: all parts of a source count, or none (a rerun redoes it)

        bar = tqdm(
            total=len(srcs), initial=len(done), unit="file", desc=f"import {name}", disable=quiet, dynamic_ncols=True
        )
        for i, src in enumerate(srcs):
            if i in done:
                continue
            try:
                video = decode(src, fps, size, fit, box)  # (T, size, size, 3)
            except Exception as e:  # a damaged or unreadable file: name it, skip it, go on
                skipped.append(f"{src}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}")
                if not quiet:
                    tqdm.write(f"skipped {skipped[-1]}")
                bar.update()
                continue
            plan = parts(i, len(srcs), len(video), rule)  # [(split, start, stop)]
            for split, start, stop in plan:
                pending[split].append((i, episodes(video[start:stop], level_seed(i, split, rule), episode_frames)))
            frames += len(video)
            dropped += len(video) - sum(stop - start for _, start, stop in plan)  # the gaps
            bar.update()
            bar.set_postfix(frames=f"{frames:,}", refresh=False)
            full = [
                s for s in store.SPLITS if sum(len(e["frames"]) for _, es in pending[s] for e in es) >= shard_frames
            ]
            if full:  # a source cut in time has parts in several splits: they are written together
                flush(full if rule == "source" else store.SPLITS)
        flush(store.SPLITS)
        bar.close()
    seconds = time.perf_counter() - t0
    have = {s["split"]: 0 for s in manifest["shards"]}
    for s in manifest["shards"]:
        have[s["split"]] += s["episodes"]
    if not quiet:
        print(
            f"imported {len(srcs) - len(done) - len(skipped)} of {len(srcs)} sources ({frames:,} frames"
            + (f", {dropped:,} dropped between splits" if dropped else "")
            + f") in {seconds:.1f} s -> {root}; episodes by split: "
            + ", ".join(f"{k} {have.get(k, 0)}" for k in store.SPLITS)
            + (" (whole sources)" if rule == "source" else f" (each source's last {HELD_SHARE:.0%} held out)")
            + (f"; skipped {len(skipped)} unreadable file(s), named above" if skipped else "")
        )
        if not have.get("train"):
            print("note: no episode landed in the train split: import more recordings to train on")
        elif not have.get("test"):
            why = f" (a source under {2 * HELD_MIN + GAP} frames stays whole in train)" if rule == "time" else ""
            print(f"note: no test episode{why}: `procgenie eval` takes `--split val` on this dataset")
    return {
        "sources": len(srcs),
        "imported": len(srcs) - len(done) - len(skipped),
        "skipped": skipped,
        "frames": frames,
        "seconds": seconds,
        "split": rule,
        "episodes": {k: have.get(k, 0) for k in store.SPLITS},
    }
