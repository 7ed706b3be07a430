"""The on-disk dataset: sharded, memory-mapped, checksummed, written atomically.

Layout of a dataset folder DIR:

    DIR/manifest.json              collection settings, split rule, one record per shard
    DIR/shards/NAME.frames.npy     uint8 (N, H, W, 3): every frame of the shard's episodes
    DIR/shards/NAME.steps.npz      per step: actions (N,) uint8, rewards (N,) float32,
                                   firsts (N,) bool, level_seeds (N,) int64;
                                   per episode: truncated (E,) bool

A dataset imported from recordings (`data import`) has no actions: its manifest says `"actions": false`,
its action and reward arrays are zeros, and its level seeds say where each episode came from, so the same
split rule (`split_of`) places it: from 20 sources on, the index of its source file (a recording stays whole
in one split); below that each source is cut in time, and its parts get 20 * index + 0 (its held-out end in
test), + 1 (the end in val) or + 2 (the rest, in train). The manifest's `import.split` names the rule.

Step i holds frame i and the action taken *at* frame i, whose outcome is frame i+1 (the last
action of an episode has no next frame). A shard holds whole episodes of one split only. The
manifest is the source of truth: a shard counts once its record is in the manifest, so a
collection killed at any instant loses nothing it counted and counts nothing twice.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from procgenie.atomic import read_json_object, write_json_atomic
from procgenie.errors import UserError

FORMAT = "procgenie-dataset"
VERSION = 1
SPLITS = ("train", "val", "test")
SHARD_NAME = re.compile(r"^(train|val|test)-s\d{3}-w\d{2}-\d{5}$")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def split_of(level_seed: int) -> str:
    """Split by level: no level is ever in two splits, whatever range was collected."""
    r = int(level_seed) % 20
    return "test" if r == 0 else "val" if r == 1 else "train"


SPLIT_RULE = "level_seed % 20 == 0 -> test, == 1 -> val, else train"


# ---------------------------------------------------------------------------------------------
# writing (opening a dataset for writing, one shard's files: procgenie/data/shards.py)


def write_manifest(root: Path, manifest: dict) -> None:
    write_json_atomic(root / "manifest.json", manifest)


# ---------------------------------------------------------------------------------------------
# reading


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    if not root.exists():
        raise UserError(f"no dataset at {root}: collect one with `procgenie collect --out {root} --episodes 200`")
    path = root / "manifest.json"
    if not path.exists():
        raise UserError(
            f"{root} is not a procgenie dataset (no manifest.json): collect one with "
            f"`procgenie collect --out {root} --episodes 200`"
        )
    manifest = read_json_object(path, "recollect the dataset")
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a procgenie dataset manifest: collect one with `procgenie collect`")
    if manifest.get("version") != VERSION:
        raise UserError(
            f"{root} has dataset format version {manifest.get('version')}, this procgenie reads "
            f"version {VERSION}: recollect it with this version"
        )
    if not _well_formed(manifest):  # a hand-edited manifest: named here, not as a KeyError deep inside
        raise UserError(
            f"{path} is damaged (a field is missing or of the wrong type): restore it, or recollect the dataset"
        )
    return manifest


RECORD = {"name": str, "split": str, "frames": int, "episodes": int, "shape": list, "sha256": dict}


def _well_formed(manifest: dict) -> bool:
    shards = manifest.get("shards")
    if (
        not isinstance(manifest.get("env"), str)
        or not isinstance(manifest.get("image_size"), int)
        or not isinstance(shards, list)
    ):
        return False
    # A record's name becomes a path: only the collector's own names, never `../` or a folder.
    return all(
        isinstance(r, dict)
        and all(isinstance(r.get(k), t) for k, t in RECORD.items())
        and SHARD_NAME.match(r["name"])
        and r["split"] in SPLITS
        and r["frames"] >= 0
        for r in shards
    )


@dataclass
class Shard:
    """One shard, memory-mapped on first use (so a Dataset pickles cheaply into DataLoader workers)."""

    root: Path
    record: dict
    _frames: np.ndarray | None = None
    _steps: dict | None = None

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def frames(self) -> np.ndarray:  # (N, H, W, 3) uint8, memory-mapped
        if self._frames is None:
            self._frames = _open_frames(self.root / "shards" / f"{self.name}.frames.npy", self.record)
        return self._frames

    @property
    def steps(self) -> dict:
        if self._steps is None:
            self._steps = _open_steps(self.root / "shards" / f"{self.name}.steps.npz", self.record)
        return self._steps

    def __getstate__(self):
        return {"root": self.root, "record": self.record, "_frames": None, "_steps": None}


def _open_frames(path: Path, record: dict) -> np.ndarray:
    if not path.exists():
        raise UserError(f"shard {record['name']} is missing {path.name}: run `procgenie data validate` and recollect")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise UserError(f"shard {record['name']} is damaged ({path.name}: {e}): recollect it") from None
    want = (record["frames"], *record["shape"])
    if arr.shape != want or arr.dtype != np.uint8:
        raise UserError(
            f"shard {record['name']} is damaged: {path.name} holds {arr.dtype}{arr.shape}, the "
            f"manifest says uint8{want}: recollect it"
        )
    return arr


def _open_steps(path: Path, record: dict) -> dict:
    if not path.exists():
        raise UserError(f"shard {record['name']} is missing {path.name}: run `procgenie data validate` and recollect")
    try:
        with np.load(path) as z:
            steps = {k: z[k] for k in ("actions", "rewards", "firsts", "level_seeds", "truncated")}
    except Exception as e:  # zipfile raises several types on damage
        raise UserError(f"shard {record['name']} is damaged ({path.name}: {e}): recollect it") from None
    n = record["frames"]
    if (
        any(len(steps[k]) != n for k in ("actions", "rewards", "firsts", "level_seeds"))
        or int(steps["firsts"].sum()) != record["episodes"]
        or (n and not steps["firsts"][0])
    ):
        raise UserError(f"shard {record['name']} is damaged: its step arrays disagree with the manifest: recollect it")
    return steps


class Dataset:
    """A collected dataset: its manifest, its shards and an index of its episodes."""

    def __init__(self, root: str | Path, verify: bool | None = None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.shards = [Shard(self.root, rec) for rec in self.manifest["shards"]]
        if not self.shards:
            raise UserError(
                f"{self.root} holds no episodes yet: finish the collection by rerunning its `procgenie collect` command"
            )
        total_bytes = sum(s.record["frames"] * int(np.prod(s.record["shape"])) for s in self.shards)
        # Full checksums take seconds for a dataset that fits in memory; above 2 GB, `data validate` does it.
        if verify if verify is not None else total_bytes < 2e9:
            for problem in iter_problems(self.root, self.manifest):
                raise UserError(f"{problem}; run `procgenie data validate {self.root}` and recollect the damaged shard")
        self._episodes = None

    @property
    def env(self) -> str:
        return self.manifest["env"]

    @property
    def has_actions(self) -> bool:
        """False for recordings imported without actions (`data import`): their action arrays are zeros."""
        return bool(self.manifest.get("actions", True))

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    def episodes(self, split: str | None = None) -> np.ndarray:
        """Structured array of episodes: shard index, start, length, level seed, return, truncated."""
        if self._episodes is None:
            rows = []
            for i, sh in enumerate(self.shards):
                st = sh.steps
                starts = np.flatnonzero(st["firsts"])
                ends = np.append(starts[1:], len(st["firsts"]))
                ret = np.add.reduceat(st["rewards"], starts) if len(starts) else np.zeros(0)
                for j, (a, b) in enumerate(zip(starts, ends)):
                    rows.append(
                        (
                            i,
                            a,
                            b - a,
                            st["level_seeds"][a],
                            ret[j],
                            st["truncated"][j],
                            SPLITS.index(sh.record["split"]),
                        )
                    )
            self._episodes = np.array(
                rows,
                dtype=[
                    ("shard", "i4"),
                    ("start", "i8"),
                    ("length", "i8"),
                    ("level_seed", "i8"),
                    ("ret", "f4"),
                    ("truncated", "?"),
                    ("split", "i1"),
                ],
            )
        eps = self._episodes
        return eps if split is None else eps[eps["split"] == SPLITS.index(split)]

    def episode(self, ep) -> dict:
        """One episode's frames (L, H, W, 3) uint8 and actions (L,) int64, as arrays in memory."""
        sh = self.shards[ep["shard"]]
        sl = slice(int(ep["start"]), int(ep["start"] + ep["length"]))
        return {
            "frames": np.asarray(sh.frames[sl]),
            "actions": sh.steps["actions"][sl].astype(np.int64),
            "level_seed": int(ep["level_seed"]),
        }


# ---------------------------------------------------------------------------------------------
# validation and summary


def iter_problems(root: Path, manifest: dict):
    """Yield one line per damaged shard: missing, truncated, checksum mismatch, inconsistent arrays."""
    names = set()
    for rec in manifest["shards"]:
        name = rec["name"]
        if name in names:
            yield f"shard {name} is listed twice in the manifest"
        names.add(name)
        for kind, suffix in (("frames", "frames.npy"), ("steps", "steps.npz")):
            path = root / "shards" / f"{name}.{suffix}"
            if not path.exists():
                yield f"shard {name} is damaged: {path.name} is missing"
                break
            if sha256_file(path) != rec["sha256"][kind]:
                yield f"shard {name} is damaged: {path.name} does not match its checksum"
                break
        else:
            try:
                _open_frames(root / "shards" / f"{name}.frames.npy", rec)
                steps = _open_steps(root / "shards" / f"{name}.steps.npz", rec)
            except UserError as e:
                yield str(e).split(": recollect")[0]
                continue
            bad = {split_of(s) for s in np.unique(steps["level_seeds"])} - {rec["split"]}
            if bad:
                yield f"shard {name} is damaged: it holds levels of the {', '.join(sorted(bad))} split"
