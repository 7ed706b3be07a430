"""Data: collection end to end, level splits, resume after a kill, validation, clip alignment."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run_cli, sh, write_synthetic

from procgenie.data import store
from procgenie.data.loader import ClipSampler, batches
from procgenie.errors import UserError


def test_collect_writes_a_dataset_with_disjoint_pinned_level_splits(tmp_path):
    out = tmp_path / "d"
    proc = run_cli(
        *sh(
            f"collect --out {out} --episodes 40 --policy explorer --start-level 1000 "
            "--num-levels 200 --max-steps 50 --shard-frames 300 --envs 8"
        ),
    )
    assert "frames/s" in proc.stdout
    ds = store.Dataset(out, verify=True)
    eps = ds.episodes()
    assert len(eps) == 40
    assert ((eps["level_seed"] >= 1000) & (eps["level_seed"] < 1200)).all()  # the pinned range only
    assert (eps["length"] <= 50).all() and (eps["length"] >= 1).all()
    levels = {s: set(ds.episodes(s)["level_seed"].tolist()) for s in store.SPLITS}
    assert not (levels["train"] & levels["test"]) and not (levels["train"] & levels["val"])
    assert not (levels["val"] & levels["test"])
    assert all(seed % 20 == 0 for seed in levels["test"])
    for shard in ds.shards:  # every shard: whole episodes of one split, frames and steps aligned
        assert shard.steps["firsts"][0] and len(shard.frames) == len(shard.steps["actions"])
        assert {store.split_of(s) for s in shard.steps["level_seeds"]} == {shard.record["split"]}
    # frames are real CoinRun pictures, not blanks
    assert ds.shards[0].frames[:10].std() > 10
    info = json.loads(run_cli("data", "info", str(out), "--json").stdout)
    assert info["episodes"] == 40 and sum(info["action_histogram"].values()) == info["frames"]
    text = run_cli("data", "info", str(out)).stdout
    assert "reached the coin" in text and "test" in text


def test_rerun_of_a_finished_collect_adds_nothing_and_other_settings_are_refused(tmp_path):
    out = str(tmp_path / "d")
    args = ["collect", "--out", out, "--episodes", "6", "--max-steps", "20", "--envs", "4"]
    run_cli(*args)
    before = (tmp_path / "d" / "manifest.json").read_text()
    assert "nothing to collect" in run_cli(*args).stdout
    assert (tmp_path / "d" / "manifest.json").read_text() == before
    proc = run_cli(*args[:-4], "--max-steps", "20", "--envs", "4", "--policy", "explorer", check=False)
    assert proc.returncode == 2 and "other settings" in proc.stderr and "policy" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_more_episodes_extend_a_dataset(tmp_path):
    out = str(tmp_path / "d")
    run_cli("collect", "--out", out, "--episodes", "5", "--max-steps", "20", "--envs", "4")
    run_cli("collect", "--out", out, "--episodes", "11", "--max-steps", "20", "--envs", "4", "--workers", "2")
    assert len(store.Dataset(out).episodes()) == 11


@pytest.mark.slow
def test_collect_killed_mid_run_resumes_without_losing_or_doubling_episodes(tmp_path):
    out = tmp_path / "d"
    args = [
        sys.executable,
        "-m",
        "procgenie",
        "collect",
        "--out",
        str(out),
        "--episodes",
        "120",  # about 7,000 frames: the kill, after 3 shards of 200 frames, lands early in the run
        "--policy",
        "random",
        "--max-steps",
        "60",
        "--shard-frames",
        "200",
        "--envs",
        "8",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a few shards are recorded, mid-write most likely
        m = out / "manifest.json"
        if m.exists() and len(json.loads(m.read_text())["shards"]) >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    recorded = json.loads((out / "manifest.json").read_text())["shards"]
    assert 3 <= len(recorded) and sum(s["episodes"] for s in recorded) < 120
    subprocess.run(args, check=True, capture_output=True)
    assert run_cli("data", "validate", str(out)).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"][: len(recorded)] == recorded  # what was counted stays, unchanged
    assert sum(s["episodes"] for s in manifest["shards"]) == 120
    on_disk = {p.name.split(".")[0] for p in (out / "shards").iterdir()}
    assert on_disk == {s["name"] for s in manifest["shards"]}  # no orphans left behind


def test_validate_names_a_shard_with_one_flipped_byte(synthetic):
    assert run_cli("data", "validate", str(synthetic)).returncode == 0
    victim = sorted((synthetic / "shards").glob("*.frames.npy"))[1]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x01
    victim.write_bytes(bytes(data))
    proc = run_cli("data", "validate", str(synthetic), check=False)
    assert proc.returncode != 0
    assert victim.name.split(".")[0] in proc.stderr and "checksum" in proc.stderr
    with pytest.raises(UserError, match="damaged"):
        store.Dataset(synthetic)


def test_truncated_shard_and_missing_dataset_are_named(synthetic, tmp_path):
    victim = sorted((synthetic / "shards").glob("*.frames.npy"))[0]
    victim.write_bytes(victim.read_bytes()[:-5000])
    with pytest.raises(UserError, match=victim.name.split(".")[0]):
        store.Dataset(synthetic, verify=False).shards[0].frames
    with pytest.raises(UserError, match="no dataset at"):
        store.Dataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a procgenie dataset"):
        store.Dataset(tmp_path / "empty")


@pytest.mark.parametrize("seq_len", [2, 5, 9])
def test_clips_stay_inside_one_episode_and_actions_align(synthetic, seq_len):
    ds = store.Dataset(synthetic)
    sampler = ClipSampler(ds, "train", seq_len, batch_size=64, seed=3)
    seen = set()
    for step in range(20):
        b = sampler.batch(step)
        frames, actions = b["frames"].numpy(), b["actions"].numpy()
        assert frames.shape == (64, seq_len, 64, 64, 3) and actions.shape == (64, seq_len - 1)
        ep, t = frames[:, :, 0, 0, 0].astype(int), frames[:, :, 0, 0, 1].astype(int)
        assert (ep == ep[:, :1]).all()  # one episode per clip
        assert (np.diff(t, axis=1) == 1).all()  # consecutive frames
        assert (actions == (ep[:, :-1] + t[:, :-1]) % 15).all()  # action t is taken at frame t
        seen |= set(ep[:, 0].tolist())
    lengths = [5, 9, 3, 12, 7, 30, 6]
    assert seen == {e for e, n in enumerate(lengths) if n >= seq_len}  # short episodes never used


def test_batches_are_a_function_of_seed_and_step_and_shard_over_ranks(synthetic):
    ds = store.Dataset(synthetic)
    one = ClipSampler(ds, "train", 4, batch_size=8, seed=1)
    again = ClipSampler(ds, "train", 4, batch_size=8, seed=1)
    other = ClipSampler(ds, "train", 4, batch_size=8, seed=2)
    assert (one.indices(7) == again.indices(7)).all() and not (one.indices(7) == other.indices(7)).all()
    ranks = [ClipSampler(ds, "train", 4, batch_size=8, seed=1, rank=r, world=2) for r in range(2)]
    assert (np.concatenate([r.indices(7) for r in ranks]) == one.indices(7)).all()
    # through a DataLoader with worker processes, in step order, resumable at any step
    loaded = [b["frames"] for b in batches(one, 5, 9, workers=2)]
    assert len(loaded) == 4 and all((x == one.batch(5 + k)["frames"]).all() for k, x in enumerate(loaded))


def test_too_short_episodes_give_a_clear_error(tmp_path):
    ds = store.Dataset(write_synthetic(tmp_path / "s", [3, 4]))
    with pytest.raises(UserError, match="no train episode of at least 8 frames"):
        ClipSampler(ds, "train", 8, batch_size=2)


def test_data_info_into_a_closed_pipe_ends_quietly(coinrun_data):
    """`procgenie data info D | head -0`: the reader has gone before the first line; no traceback, status 0."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "procgenie", "data", "info", str(coinrun_data)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]


def test_runner_holds_its_moves_and_runs_back_left():
    """The runner policy holds each move for a while (runs, not sticky flicker), right-leaning, with held lefts."""
    from procgenie.data.policies import make_policy
    from procgenie.vocab import LEFT, LEFT_UP, RIGHT, RIGHT_UP

    acts = np.stack([make_policy("runner", 64, seed=0).act().copy() for _ in range(200)], 1)  # (64, 200)
    changes = (acts[:, 1:] != acts[:, :-1]).mean()
    assert changes < 0.1  # a hold lasts 20 frames on average
    right, left = np.isin(acts, [RIGHT, RIGHT_UP]).mean(), np.isin(acts, [LEFT, LEFT_UP]).mean()
    assert 0.4 < right < 0.6 and 0.2 < left < 0.4

    def longest(row):  # the longest run of LEFT in a row of actions
        edges = np.diff(np.r_[0, row == LEFT, 0].astype(int))
        return (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).max(initial=0)

    assert max(longest(row) for row in acts) >= 20


def test_blend_plays_each_episode_as_explorer_random_or_runner():
    """`blend`: a third of the episodes each; a runner episode holds its moves, a random one flickers."""
    from procgenie.data.policies import make_policy

    pol = make_policy("blend", 300, seed=0)
    kinds = np.bincount(pol.kind, minlength=3) / 300
    assert (kinds > 0.25).all()  # explorer, random, runner
    acts = np.stack([pol.act().copy() for _ in range(100)], 1)  # (300, 100)
    changes = (acts[:, 1:] != acts[:, :-1]).mean(1)
    assert changes[pol.kind == 2].mean() < 0.1 < 0.5 < changes[pol.kind == 1].mean()
    assert 0.1 < changes[pol.kind == 0].mean() < 0.3  # explorer: sticky, 0.8 repeat
    old = pol.kind.copy()
    pol.reset(np.arange(300) < 150)  # new episodes draw their kind again
    assert (pol.kind[150:] == old[150:]).all() and (pol.kind[:150] != old[:150]).any()
