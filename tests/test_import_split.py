"""How `data import` splits recordings, and what `eval` does without a test split: a handful of recordings fills
every split with no frame of one next to another's, many keep the split by whole source, an import cut short
continues under the rule it began with, and eval names the split it can use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, sh, write_synthetic
from PIL import Image

from procgenie.data import importer, store
from procgenie.data.importer import GAP, HELD_MIN, HELD_SHARE, import_videos, parts
from procgenie.data.store import Dataset, split_of
from procgenie.errors import UserError
from procgenie.evaluate import test_clips as eval_clips


def write_recordings(root: Path, lengths: list[int], size: int = 16) -> Path:
    """Frame folders (lossless PNG) whose pixels say where they come from: red = source index, green = frame."""
    for i, n in enumerate(lengths):
        folder = root / f"rec-{i:02d}"
        folder.mkdir(parents=True)
        for t in range(n):
            frame = np.zeros((size, size, 3), np.uint8)
            frame[..., 0], frame[..., 1] = i, t
            Image.fromarray(frame).save(folder / f"{t:04d}.png")
    return root


def frames_by_split(out: Path) -> dict[str, set[tuple[int, int]]]:
    """split -> the (source, frame) pairs it holds, read back from the pixels; fails on a frame held twice."""
    ds, seen = Dataset(out), {s: set() for s in store.SPLITS}
    for ep in ds.episodes():
        split = store.SPLITS[ep["split"]]
        px = ds.episode(ep)["frames"][:, 0, 0]  # (L, 3)
        pairs = {(int(r), int(g)) for r, g, _ in px}
        assert len(pairs) == len(px) and not any(pairs & s for s in seen.values())  # no frame twice
        assert split_of(ep["level_seed"]) == split  # what `data validate` checks
        seen[split] |= pairs
    return seen


@pytest.mark.parametrize("n", [1, 2, 8, 19])
@pytest.mark.parametrize("length", [2, 39, 40, 63, 64, 90, 1000])
def test_a_source_cut_in_time_holds_out_its_end_after_a_gap_whenever_it_is_long_enough(n, length):
    for i in range(min(n, 2)):
        plan = parts(i, n, length, "time")
        assert plan[0][:2] == ("train", 0) and plan[-1][2] <= length
        assert all(a[2] + GAP <= b[1] for a, b in zip(plan, plan[1:]))  # in time order, GAP frames between
        want = ["val", "test"] if n == 1 else ["test" if i % 2 == 0 else "val"]
        held = [split for split, _, _ in plan[1:]]
        tail = max(HELD_MIN, np.ceil(length * HELD_SHARE))
        assert bool(held) == (length >= len(want) * (GAP + tail) + tail)  # held out whenever there is room
        if held:
            assert held == want and all(stop - start >= tail for _, start, stop in plan)  # train too
        else:
            assert plan == [("train", 0, length)]
    assert parts(21, 30, 100, "source") == [(split_of(21), 0, 100)]


def test_a_handful_of_short_recordings_fills_every_split_without_a_frame_in_two(tmp_path):
    """Issue 34: 8 short recordings (720 frames) left no test split that eval could use."""
    lengths = [90] * 7 + [30]  # the last too short to cut: it trains whole
    src = write_recordings(tmp_path / "videos", lengths)
    out = tmp_path / "ds"
    proc = run_cli(*sh(f"data import {src} --out {out} --size 16"))
    assert "held out" in proc.stdout and "dropped between splits" in proc.stdout
    seen = frames_by_split(out)
    for split in ("val", "test"):
        eps = Dataset(out).episodes(split)
        assert len(eps) >= 3 and (eps["length"] >= HELD_MIN).all()  # eval's 4 + 10 frames fit in each
    for i, n in enumerate(lengths):
        where = {t: s for s, pairs in seen.items() for src_, t in pairs if src_ == i}
        assert where[0] == "train" and set(where.values()) <= {"train", "test" if i % 2 == 0 else "val"}
        for t, split in where.items():  # no frame of one split next to a frame of another
            assert all(where.get(u, split) == split for u in (t - 1, t + 1))
        assert (len(where) == n) == (n < 40)  # a cut source loses its gap, a short one nothing
    run_cli("data", "validate", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["import"]["split"] == "time" and "last 10%" in manifest["split_rule"]


def test_many_recordings_keep_the_split_by_whole_source(tmp_path):
    src = write_recordings(tmp_path / "videos", [3] * 21, size=8)
    result = import_videos([str(src)], str(tmp_path / "ds"), size=8, quiet=True)
    by_rule = [split_of(i) for i in range(21)]  # the rule of collect's level seeds, on the source index
    assert result["split"] == "source" and result["episodes"] == {s: by_rule.count(s) for s in store.SPLITS}
    for ep in Dataset(tmp_path / "ds").episodes():
        assert store.SPLITS[ep["split"]] == split_of(ep["level_seed"])  # level seed = source index
    assert frames_by_split(tmp_path / "ds")["test"] == {(0, t) for t in range(3)} | {(20, t) for t in range(3)}


class Killed(Exception):
    pass


def kill_at_shard(monkeypatch, k: int) -> None:
    """Make the k-th shard write of the next import fail, as a kill would stop it there."""
    calls, real = [], importer.write_shard

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(importer, "write_shard", write)


def test_an_import_cut_in_time_continues_after_a_kill_between_the_parts_of_a_source(tmp_path, monkeypatch):
    src = write_recordings(tmp_path / "videos", [60] * 4)
    clean = tmp_path / "clean"
    import_videos([str(src)], str(clean), size=16, quiet=True)
    kill_at_shard(monkeypatch, 6)  # one shard a part: source 2's train part is written, its test part is not
    with pytest.raises(Killed):
        import_videos([str(src)], str(tmp_path / "ds"), size=16, shard_frames=1, quiet=True)
    monkeypatch.undo()
    assert len(Dataset(tmp_path / "ds").shards) == 4  # sources 0 and 1, two parts each
    again = import_videos([str(src)], str(tmp_path / "ds"), size=16, shard_frames=1, quiet=True)
    assert again["imported"] == 2 and frames_by_split(tmp_path / "ds") == frames_by_split(clean)


def test_an_import_begun_by_whole_source_continues_so(tmp_path, monkeypatch):
    """A manifest from before the import cut sources in time (no `split` field) loads and continues as it began."""
    src = write_recordings(tmp_path / "videos", [40] * 4)
    out = tmp_path / "ds"
    monkeypatch.setattr(importer, "MANY_SOURCES", 1)  # the old rule for this handful of sources
    kill_at_shard(monkeypatch, 3)
    with pytest.raises(Killed):
        import_videos([str(src)], str(out), size=16, shard_frames=1, quiet=True)
    monkeypatch.undo()
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["import"]["split"]
    store.write_manifest(out, manifest)
    assert import_videos([str(src)], str(out), size=16, quiet=True)["split"] == "source"
    seen = frames_by_split(out)
    assert all(seen[split_of(i)] >= {(i, t) for t in range(40)} for i in range(4))


def test_eval_without_a_usable_test_split_names_the_split_it_can_use(tmp_path):
    # One test episode too short for eval's 14 frames, two val episodes, two train ones.
    data = write_synthetic(tmp_path / "d", [20, 20, 20, 20, 5], seeds=[2, 3, 1, 21, 0])
    ds = Dataset(data)
    with pytest.raises(UserError, match=r"no test episode of 14 frames or more: .*--split val"):
        eval_clips(ds, 32, 14, 0)
    clips, _ = eval_clips(ds, 32, 14, 0, "val")
    assert clips.shape[:2] == (2, 14) and set(clips[:, 0, 0, 0, 0]) == {2, 3}  # episodes 2 and 3: the val ones
    with pytest.raises(UserError, match=r"no val episode of 30 frames.*longer episodes"):
        eval_clips(ds, 32, 30, 0, "val")
    only_train = write_synthetic(tmp_path / "t", [20, 5], seeds=[2, 0])
    with pytest.raises(UserError, match=r"--split train"):
        eval_clips(Dataset(only_train), 32, 14, 0)
    proc = run_cli(*sh(f"eval --data {data} --out {tmp_path / 'eval'}"), check=False)  # the bundled model
    assert proc.returncode == 2 and "--split val" in proc.stderr and "Traceback" not in proc.stderr
