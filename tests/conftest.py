"""Shared fixtures: a synthetic dataset whose frames say where they come from, and a tiny real one."""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from procgenie.data import shards, store


def write_synthetic(root: Path, lengths: list[int], seeds: list[int] | None = None, size: int = 64) -> Path:
    """A dataset whose frame pixels encode (episode, t): pixel [0,0,0] = episode, [0,0,1] = t.

    Action t of episode e is (e + t) % 15. Each episode goes into the split its level seed picks.
    """
    seeds = seeds if seeds is not None else [20 * i + 2 for i in range(len(lengths))]  # all train levels
    by_split = {s: [] for s in store.SPLITS}
    for e, (n, seed) in enumerate(zip(lengths, seeds)):
        frames = np.zeros((n, size, size, 3), np.uint8)
        frames[:, 0, 0, 0] = e
        frames[:, 0, 0, 1] = np.arange(n)
        by_split[store.split_of(seed)].append(
            {
                "frames": frames,
                "actions": (e + np.arange(n)) % 15,
                "rewards": np.zeros(n),
                "level_seed": seed,
                "truncated": False,
            }
        )
    manifest = {
        "format": store.FORMAT,
        "version": store.VERSION,
        "env": "coinrun",
        "image_size": size,
        "num_actions": 15,
        "split_rule": store.SPLIT_RULE,
        "sessions": 1,
        "collect": {"policy": "synthetic", "seed": 0},
        "shards": [],
    }
    for split, eps in by_split.items():
        for k in range(0, len(eps), 3):  # three episodes a shard: clips must not cross shards either
            manifest["shards"].append(shards.write_shard(root, f"{split}-s000-w00-{k:05d}", split, eps[k : k + 3]))
    store.write_manifest(root, manifest)
    return root


@pytest.fixture
def synthetic(tmp_path) -> Path:
    return write_synthetic(tmp_path / "synthetic", [5, 9, 3, 12, 7, 30, 6])


@pytest.fixture(scope="session")
def coinrun_data(tmp_path_factory) -> Path:
    """A small real CoinRun dataset (explorer play), shared by the tests of a session."""
    out = tmp_path_factory.mktemp("coinrun") / "data"
    # Ten levels: level 0 is the test split, level 1 val, so every split is there.
    run_cli(
        *sh(
            f"collect --out {out} --episodes 48 --policy mixed "
            "--max-steps 60 --num-levels 10 --shard-frames 512 --envs 8"
        ),
    )
    return out


@pytest.fixture(scope="session")
def tiny_run(coinrun_data, tmp_path_factory) -> Path:
    """All three stages trained with the tiny preset: a real run folder in seconds."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    run_cli(*sh(f"train all --data {coinrun_data} --run {run} --preset tiny --set workers=0"))
    return run


@pytest.fixture(scope="session")
def both_run(tiny_run, coinrun_data, tmp_path_factory):
    """The tiny run plus a dynamics model on real actions, trained beside the latent one by the same command."""
    run = tmp_path_factory.mktemp("both") / "run"
    shutil.copytree(tiny_run, run)
    run_cli(
        *sh(f"train dynamics --data {coinrun_data} --run {run} --preset tiny --set actions=real --set workers=0"),
    )
    return run


def sh(line: str) -> list[str]:
    """A command line as a user types it -> its arguments (the tests' temporary paths hold no spaces)."""
    return shlex.split(line)


def run_cli(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m procgenie ARGS` as a user would, capturing its output."""
    proc = subprocess.run([sys.executable, "-m", "procgenie", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"procgenie {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def serve_play_page(args: list[str], cwd) -> None:
    """Start `procgenie play ARGS` on a free port in `cwd`, fetch its page, stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "procgenie", *args, "--port", str(port)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert r.status == 200 and b"procgenie" in r.read()
                return
            except OSError:
                assert server.poll() is None and time.time() < deadline, "play did not start"
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(30)
