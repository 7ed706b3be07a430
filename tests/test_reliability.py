"""Crash safety with real kills: a training run or a collection killed with SIGKILL at any moment resumes,
by rerunning the same command, to exactly what an unbroken run gives, and nothing is lost or counted twice.

Two kinds of kill: from outside, once the k-th log line or the k-th shard is on disk (wherever the process
happens to be then), and from inside, at a chosen instant of an atomic write: `KILLER` runs the command
with `os.replace` wrapped so that the process SIGKILLs itself at the n-th rename onto a file, just before it
(the temporary file complete), with the temporary file cut in half (killed mid-write), or just after it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file

KILLER = r"""
import os, signal, sys
when, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen, replace = 0, os.replace

def killing_replace(src, dst):
    global seen
    if os.path.basename(dst).endswith(target):
        seen += 1
        if seen == n and when == "torn":
            with open(src, "r+b") as fh:
                fh.truncate(os.path.getsize(src) // 2)
        if seen == n and when in ("before", "torn"):
            os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)
    if seen == n and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = killing_replace
from procgenie.cli import main
sys.exit(main(sys.argv[4:]))
"""

# precision fixed: the unbroken reference is another process, and `auto` is timed in each (a resumed run keeps its
# own run's precision: test_train.py). STEPS: four checkpoints, 5 steps apart, the last at the end.
STEPS = 20
TRAIN = [
    *("--preset", "tiny", "--steps", str(STEPS), "--set", "workers=0", "ckpt_every=5", "log_every=1"),
    *("deterministic=true", "precision=fp32"),
]


def train_args(stage: str, data: Path, run: Path) -> list[str]:
    return ["train", stage, "--data", str(data), "--run", str(run), *TRAIN]


def kill_inside(args: list[str], when: str, target: str, n: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, when, target, str(n), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, f"not killed ({proc.returncode}):\n{proc.stderr[-2000:]}"


def kill_when(args: list[str], ready, timeout: float = 120) -> subprocess.Popen:
    """Start `procgenie ARGS`, SIGKILL it as soon as `ready(proc)` holds; it must not have finished by then."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "procgenie", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not ready(proc):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # a no-op if it already exited: then the assert below says so
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the command finished before it could be killed"
    return proc


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), f"{k} differs from the unbroken run's"


def assert_finished_cleanly(stage_dir: Path, steps: int = STEPS) -> None:
    """The resumed stage: at the last step, no temporary file left, every step logged exactly once."""
    with safe_open(str(stage_dir / "state.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["json"])["step"] == steps
    assert not list(stage_dir.glob(".*.tmp")), list(stage_dir.glob(".*.tmp"))
    logged = [json.loads(line)["step"] for line in (stage_dir / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))


@pytest.fixture(scope="module")
def reference(coinrun_data, tmp_path_factory) -> Path:
    """All three stages trained without a break, with the settings the killed runs use."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_cli(*train_args("all", coinrun_data, run))
    return run


def without_dynamics(reference: Path, to: Path) -> Path:
    """The reference run's tokenizer and LAM, byte for byte: the start of a dynamics run."""
    shutil.copytree(reference, to, ignore=lambda d, names: ["dynamics"] if Path(d) == reference else [])
    return to


# -- training ----------------------------------------------------------------------------------

TOKENIZER_KILLS = [
    ("log", 3),
    ("log", 16),  # from outside, mid-training
    ("torn", "model.safetensors", 2),  # step 10: mid-write of the weights
    ("after", "model.safetensors", 4),  # step 20: final weights in place, the state still at 15
    ("after", "state.safetensors", 4),  # step 20, all written (with the state written first, the
    # weights stayed at step 15 for good: "already trained")
    ("torn", "config.json", 1),  # before any step: the config half-written
]


@pytest.mark.slow
@pytest.mark.parametrize("kill", TOKENIZER_KILLS, ids=lambda k: "-".join(map(str, k)))
def test_tokenizer_killed_resumes_to_the_unbroken_weights(reference, coinrun_data, tmp_path, kill):
    run = tmp_path / "run"
    args = train_args("tokenizer", coinrun_data, run)
    if kill[0] == "log":
        kill_when(args, lambda _: lines(run / "tokenizer" / "log.jsonl") >= kill[1])
    else:
        kill_inside(args, *kill)
    run_cli(*args)  # the same command again
    assert_same_weights(run / "tokenizer" / "model.safetensors", reference / "tokenizer" / "model.safetensors")
    assert_finished_cleanly(run / "tokenizer")


@pytest.mark.slow
def test_an_immediate_rerun_after_sigkill_resumes_though_a_loader_worker_outlived_the_trainer(
    reference, coinrun_data, tmp_path
):
    run = tmp_path / "run"
    args = [*train_args("tokenizer", coinrun_data, run), "workers=1"]  # a forked DataLoader worker
    kill_when(args, lambda _: (run / "tokenizer" / "state.safetensors").exists())
    run_cli(*args)  # at once: the orphaned worker must not hold the folder's lock
    assert_same_weights(run / "tokenizer" / "model.safetensors", reference / "tokenizer" / "model.safetensors")
    assert_finished_cleanly(run / "tokenizer")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_a_signal_checkpoints_the_step_in_flight_and_the_rerun_ends_at_the_unbroken_weights(
    reference, coinrun_data, tmp_path, sig
):
    run = tmp_path / "run"
    args = train_args("tokenizer", coinrun_data, run)
    proc = subprocess.Popen(
        [sys.executable, "-m", "procgenie", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and lines(run / "tokenizer" / "log.jsonl") < 3:
        time.sleep(0.002)
    t0 = time.perf_counter()
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    took = time.perf_counter() - t0
    assert proc.returncode == 128 + sig, err[-2000:]
    said = err.strip().splitlines()[-1]  # after the progress bar's last line
    assert (
        took < 10
        and said.startswith(f"procgenie train: stopped by {signal.Signals(sig).name}")
        and said.endswith("rerun the same command to resume")
    ), err[-2000:]
    with safe_open(str(run / "tokenizer" / "state.safetensors"), "pt") as f:
        step = json.loads(f.metadata()["json"])["step"]
    assert 3 <= step < STEPS and f"at step {step} of {STEPS}" in said  # the step in flight, not the last 5-step save
    run_cli(*args)
    assert_same_weights(run / "tokenizer" / "model.safetensors", reference / "tokenizer" / "model.safetensors")
    assert_finished_cleanly(run / "tokenizer")


DYNAMICS_KILLS = [("log", 9), ("torn", "state.safetensors", 3), ("before", "state.safetensors", 4)]  # 4: the last


@pytest.mark.slow
@pytest.mark.parametrize("kill", DYNAMICS_KILLS, ids=lambda k: "-".join(map(str, k)))
def test_dynamics_killed_resumes_to_the_unbroken_weights(reference, coinrun_data, tmp_path, kill):
    run = without_dynamics(reference, tmp_path / "run")
    args = train_args("dynamics", coinrun_data, run)
    if kill[0] == "log":
        kill_when(args, lambda _: lines(run / "dynamics" / "log.jsonl") >= kill[1])
    else:
        kill_inside(args, *kill)
    run_cli(*args)
    assert_same_weights(run / "dynamics" / "model.safetensors", reference / "dynamics" / "model.safetensors")
    assert_finished_cleanly(run / "dynamics")
    # and the finished run plays: its stages still belong together
    from procgenie.world import WorldModel

    WorldModel.from_pretrained(run, device="cpu")


@pytest.mark.slow
def test_train_all_killed_in_the_lam_stage_resumes_every_stage_exactly(reference, coinrun_data, tmp_path):
    run = tmp_path / "run"
    args = train_args("all", coinrun_data, run)
    kill_when(args, lambda _: lines(run / "lam" / "log.jsonl") >= 12)
    run_cli(*args)
    for stage in ("tokenizer", "lam", "dynamics"):
        assert_same_weights(run / stage / "model.safetensors", reference / stage / "model.safetensors")
        assert_finished_cleanly(run / stage)
    assert (run / "lam" / "action_map.json").read_bytes() == (reference / "lam" / "action_map.json").read_bytes()


# -- collection --------------------------------------------------------------------------------


EPISODES = 60  # about 3,600 frames in some 20 shards: every kill below lands with most of them still to come


def collect_args(out: Path, workers: int = 1) -> list[str]:
    return [
        "collect",
        "--out",
        str(out),
        "--episodes",
        str(EPISODES),
        "--policy",
        "random",
        "--max-steps",
        "60",
        "--shard-frames",
        "150",
        "--envs",
        "8",
        "--workers",
        str(workers),
    ]


def recorded(out: Path) -> list[dict]:
    try:
        return json.loads((out / "manifest.json").read_text())["shards"]
    except (FileNotFoundError, ValueError):  # not written yet
        return []


def children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc; elsewhere none are found)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


COLLECT_KILLS = [
    ("manifest", 1),  # the manifest started, no shard yet
    # (killed from outside after a few shards: tests/test_data.py)
    ("torn", ".frames.npy", 3),  # mid-write of a shard's frames
    ("before", "manifest.json", 4),  # a shard complete on disk, not yet recorded
    ("workers", 3),  # two worker processes; main killed after 3 shards
]


@pytest.mark.slow
@pytest.mark.parametrize("kill", COLLECT_KILLS, ids=lambda k: "-".join(map(str, k)))
def test_collect_killed_resumes_without_losing_or_doubling_episodes(tmp_path, kill):
    out = tmp_path / "d"
    args = collect_args(out, workers=2 if kill[0] == "workers" else 1)
    workers: list[int] = []

    def ready(proc) -> bool:
        workers[:] = children(proc.pid) or workers  # its collector processes, while it lives
        return len(recorded(out)) >= kill[1]

    if kill[0] == "manifest":
        kill_when(args, lambda _: (out / "manifest.json").exists())
    elif kill[0] == "workers":
        kill_when(args, ready)
    else:
        kill_inside(args, *kill)
    before = recorded(out)
    assert sum(s["episodes"] for s in before) < EPISODES
    if kill[0] == "workers":  # they notice that the main process is gone and stop: no shard written after
        if not Path("/proc/self/task").exists():
            pytest.skip("finding the worker processes needs Linux's /proc")
        assert workers, "no worker processes seen"
        deadline = time.time() + 30
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(w) for w in workers), "collect workers outlived their killed main process"

    run_cli(*args)  # the same command again
    assert run_cli("data", "validate", str(out)).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"][: len(before)] == before  # what was counted stays, unchanged
    assert sum(s["episodes"] for s in manifest["shards"]) == EPISODES  # nothing lost, nothing twice
    names = [s["name"] for s in manifest["shards"]]
    assert len(set(names)) == len(names)
    on_disk = sorted(p.name for p in (out / "shards").iterdir())
    assert on_disk == sorted(f"{n}.{kind}" for n in names for kind in ("frames.npy", "steps.npz"))  # no orphans
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shards"]  # no stray temporary files


HOLDER = r"""
import sys, time
from procgenie.atomic import exclusive
with exclusive(sys.argv[1], "holding"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_process_cannot_train_or_collect_into_a_busy_folder_and_a_killed_holder_frees_it(
    coinrun_data, tmp_path
):
    run, data = tmp_path / "run", tmp_path / "data"
    train = ["train", "tokenizer", "--data", str(coinrun_data), "--run", str(run), "--preset", "tiny"]
    collect = ["collect", "--out", str(data), "--episodes", "2"]
    for folder, argv, doing in (
        (run / "tokenizer", train, f"training {run / 'tokenizer'}"),
        (data, collect, f"collecting into {data}"),
    ):
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            busy = run_cli(*argv, check=False)
            assert busy.returncode == 2
            assert f"another process is {doing}: wait for it" in busy.stderr, busy.stderr
        finally:
            holder.kill()  # SIGKILL: no clean-up runs, and the system drops the lock
            holder.wait()
        done = run_cli(*argv, check=False)
        assert done.returncode == 0, done.stderr
    assert (run / "tokenizer" / "model.safetensors").exists()
    assert json.loads((data / "manifest.json").read_text())["shards"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "workers, sig",
    [(1, signal.SIGTERM), (2, signal.SIGINT)],  # SIGINT: also a terminal's
    ids=["SIGTERM", "SIGINT-2-workers"],
)  # Ctrl-C, all processes
def test_a_signal_stops_collect_with_every_finished_episode_written(tmp_path, workers, sig):
    out = tmp_path / "d"
    args = collect_args(out, workers=workers)
    proc = subprocess.Popen(
        [sys.executable, "-m", "procgenie", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and len(recorded(out)) < 2:
        time.sleep(0.002)
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + sig, err[-2000:]
    said = err.strip().splitlines()[-1]
    have = sum(s["episodes"] for s in recorded(out))
    assert said.startswith(
        f"procgenie collect: stopped by {signal.Signals(sig).name} with {have} of {EPISODES} episodes"
    )
    assert 0 < have < EPISODES and not list(out.glob(".*.tmp"))
    run_cli(*args)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["episodes"] for s in manifest["shards"]) == EPISODES  # nothing lost, nothing twice
    assert run_cli("data", "validate", str(out)).returncode == 0
