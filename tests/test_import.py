"""`procgenie data import`: recordings without actions (MP4, GIF, frame folders) -> a dataset that trains,
evaluates, dreams and plays; damaged files are named and skipped; a rerun continues."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from conftest import run_cli, serve_play_page, sh
from PIL import Image, ImageSequence

from procgenie.data.importer import level_seed, parts, square
from procgenie.data.store import Dataset, split_of
from procgenie.video import encode_video, upscale


@pytest.fixture(scope="module")
def recordings(coinrun_data, tmp_path_factory):
    """Six CoinRun episodes as a user's recordings: two GIFs, two frame folders, two MP4s at twice the size, and
    a damaged MP4 (sorted last). Returns the folder and each source's original frames, in sorted order."""
    ds = Dataset(coinrun_data)
    eps = [ds.episode(e)["frames"] for e in ds.episodes()[:6]]
    root = tmp_path_factory.mktemp("recordings") / "videos"
    root.mkdir()
    names = []
    for i, frames in enumerate(eps):
        kind = ("gif", "png", "mp4")[i % 3]
        name = f"rec-{i}" + ("" if kind == "png" else f".{kind}")
        if kind == "png":
            (root / name).mkdir()
            for t, f in enumerate(frames):
                iio.imwrite(root / name / f"{t:04d}.png", f)
        else:
            (root / name).write_bytes(encode_video(frames if kind == "gif" else upscale(frames, 2), f".{kind}", 15))
        names.append(name)
    (root / "zz-damaged.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    return root, eps


def test_import_keeps_every_frame_splits_in_time_and_names_the_damaged_one(recordings, tmp_path):
    root, originals = recordings
    out = tmp_path / "imported"
    proc = run_cli(*sh(f"data import {root} --out {out}"))
    assert "zz-damaged.mp4" in proc.stdout + proc.stderr and "skipped 1 unreadable" in proc.stdout
    ds = Dataset(out)
    assert not ds.has_actions and ds.image_size == 64
    eps = ds.episodes()
    assert sorted({int(s) // 20 for s in eps["level_seed"]}) == list(range(6))  # the damaged source left out
    for i, want in enumerate(originals):  # 7 sources: each cut in time, its end held out
        for split, start, stop in parts(i, 7, len(want), "time"):
            (ep,) = eps[eps["level_seed"] == level_seed(i, split, "time")]
            frames = ds.episode(ep)["frames"]
            assert ds.shards[ep["shard"]].record["split"] == split == split_of(ep["level_seed"])
            assert frames.shape == want[start:stop].shape
            err = np.abs(frames.astype(int) - want[start:stop]).mean()
            if i % 3 == 1:
                assert err == 0  # PNG frames: exact
            else:
                assert err < 6  # GIF palette / H.264 at twice the size, scaled back down
    assert {"train", "val", "test"} <= {s.record["split"] for s in ds.shards}
    run_cli("data", "validate", str(out))
    info = json.loads(run_cli("data", "info", str(out), "--json").stdout)
    assert info["action_histogram"] is None and len(info["import"]["sources"]) == 7

    again = run_cli(*sh(f"data import {root} --out {out}"))  # a rerun: nothing twice, the damaged retried
    assert "imported 0 of 7" in again.stdout and len(Dataset(out).episodes()) == len(eps)
    other = run_cli(*sh(f"data import {root} --out {out} --size 32"), check=False)
    assert other.returncode == 2 and "other settings: size 64 (now 32)" in other.stderr


def test_frames_are_resampled_to_the_asked_rate(tmp_path):
    video = np.zeros((30, 64, 64, 3), np.uint8)
    video[:, :, :, 0] = np.arange(30)[:, None, None] * 8  # frame t has red 8t
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.gif").write_bytes(encode_video(video, ".gif", 20))  # 50 ms a frame
    out = tmp_path / "ds"
    run_cli(*sh(f"data import {tmp_path / 'src'} --out {out} --fps 10"))
    ds = Dataset(out)
    frames = ds.episode(ds.episodes()[0])["frames"]
    assert len(frames) == 15 and list(frames[:4, 0, 0, 0]) == [0, 16, 32, 48]  # every other frame


@pytest.mark.parametrize("fit, left, centre", [("crop", 200, 200), ("pad", 0, 200), ("squash", 100, 200)])
def test_a_wide_frame_is_made_square_as_asked(fit, left, centre):
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, 32:96] = 200  # a bright square in the middle
    wide[:, :32] = 100 if fit == "squash" else 0  # dark sides (grey to tell squash)
    wide[:, 96:] = 100 if fit == "squash" else 0
    out = square(Image.fromarray(wide), 32, fit, None)
    assert out.shape == (32, 32, 3)
    assert out[16, 0, 0] == (left if fit != "crop" else 200) and out[16, 16, 0] == centre


def test_a_missing_source_or_bad_crop_is_one_clear_line(tmp_path):
    proc = run_cli(*sh(f"data import {tmp_path / 'nothing.mp4'} --out {tmp_path / 'd'}"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(*sh(f"data import {tmp_path} --out {tmp_path / 'd'} --crop 1,2,3"), check=False)
    assert proc.returncode == 2 and "X,Y,W,H" in proc.stderr


def as_imported(src: Path, frames: np.ndarray, fps: float | None) -> np.ndarray:
    """A source's original frames (T, S, S, 3) as `data import --fps` keeps them: the frame on screen at each
    1/fps instant. A GIF's frame times are whole hundredths (15 fps is written as 70 ms a frame), so at --fps 15
    about one frame in 14 is kept twice; a frame folder has no rate and an MP4 here has the asked one: all kept."""
    if fps is None or src.suffix != ".gif":
        return frames
    with Image.open(src) as im:  # a repeated frame is merged into a longer one: the shortest is the period
        period = min(f.info["duration"] for f in ImageSequence.Iterator(im)) / 1000
    t = np.arange(0, len(frames) * period - 1e-6, 1 / fps)
    return frames[((t + 1e-6) // period).astype(int)]


def readme_video_commands() -> list[list[str]]:
    """The procgenie steps of the README's "Your own videos" command line."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Your own videos.*?```bash\n(.*?)```", text, re.S)[1]
    return [shlex.split(step)[1:] for step in block.strip().split("&&")]


@pytest.mark.slow
def test_a_world_learned_from_recordings_trains_evaluates_dreams_and_plays(recordings, tmp_path):
    """The README's command line for your own videos (tiny preset): import, train, eval on the held-out ends of
    the recordings, play; then eval on the val split, dream and play on its world."""
    root, originals = recordings
    steps = readme_video_commands()
    assert [s[:2] for s in steps] == [
        ["data", "import"],
        ["train", "all"],
        ["eval", "--checkpoint"],
        ["play", "--checkpoint"],
    ]
    shutil.copytree(root, tmp_path / steps[0][2])  # the user's folder of recordings
    for step in steps[:3]:  # as written, in the user's folder
        tiny = ["--preset", "tiny", "--set", "workers=0"] if step[0] == "train" else []
        subprocess.run(
            [sys.executable, "-m", "procgenie", *step, *tiny],
            cwd=tmp_path,
            check=True,
            capture_output=True,
            timeout=900,
        )
    data, run = tmp_path / steps[0][steps[0].index("--out") + 1], tmp_path / steps[1][steps[1].index("--run") + 1]
    report = tmp_path / steps[2][steps[2].index("--out") + 1]
    serve_play_page(steps[3], tmp_path)

    real = run_cli(
        *sh(f"train dynamics --data {data} --run {run} --preset tiny --set actions=real"),
        check=False,
    )
    assert real.returncode == 2 and "no actions" in real.stderr

    m = json.loads((report / "metrics.json").read_text())
    assert m["lam"]["nmi_real_actions"] is None and m["play"] is None and m["data"]["actions"] is False
    assert np.isfinite(m["dynamics"]["delta_psnr_t4"]) and len(m["dynamics"]["psnr_by_step"]) == 10
    assert not (report / "lam_confusion.png").exists()
    fps = float(steps[0][steps[0].index("--fps") + 1]) if "--fps" in steps[0] else None
    imported = [as_imported(src, v, fps) for src, v in zip(sorted(root.iterdir()), originals)]  # the cuts' frames
    ends = [parts(i, 7, len(v), "time")[-1] for i, v in enumerate(imported)]  # (split, start, stop) of each end
    tests = [i for i, end in enumerate(ends) if end[0] == "test"]  # the even sources long enough to cut
    assert m["data"]["split"] == "test" and m["data"]["episodes"] == len(tests) >= 1
    val = run_cli(*sh(f"eval --checkpoint {run} --data {data} --out {tmp_path / 'val'} --horizon 4 --split val"))
    assert "eval on the val split" in val.stdout
    assert json.loads((tmp_path / "val" / "metrics.json").read_text())["data"]["split"] == "val"

    gif = tmp_path / "dream.gif"
    run_cli(*sh(f"dream --checkpoint {run} --out {gif} --actions 0*3,1*3 --steps 6"))
    assert iio.imread(gif, index=None).shape[0] == 6 + 3  # context (tiny: seq_len 4 -> 3 frames) + dream
    named = run_cli(*sh(f"dream --checkpoint {run} --out {gif} --actions right*3"), check=False)
    assert named.returncode == 2 and "latent ids" in named.stderr

    from procgenie.play import server as play
    from procgenie.world import WorldModel

    wm = WorldModel.from_pretrained(run, device="cpu")
    assert not wm.procgen and not wm.has_key_map
    hub = play.Hub(wm, level=0)
    hello = hub.hello()
    assert hello["world"] == "recordings" and hello["real_to_latent"] is None and hello["recordings"] == len(tests)
    player = play.Player(hub, ws=None)
    env, ctx, session = hub.open(0, 0)  # what the hub's tick does for a new player
    _, start, stop = ends[tests[0]]
    test_video = imported[tests[0]][start:stop]  # test recording 0: the held-out end of the first source cut
    assert np.abs(ctx.astype(int) - test_video[: len(ctx)]).mean() < 6
    player.keys["right"] = True  # arrows mean nothing here
    assert player.choose() == (wm.idle_latent, 4, "idle")
    player.latent = 1
    latent, real, _ = player.choose()
    ((dream, shown, _),) = hub.step([(session, env, latent, real)])
    assert dream.shape == (64, 64, 3) and np.abs(shown.astype(int) - test_video[len(ctx)]).mean() < 6
