"""Crash safety with real kills: a training run or a collection killed with SIGKILL at any moment resumes,
by rerunning the same command, to exactly what an unbroken run gives, and nothing is lost or counted twice.

Two kinds of kill: from outside, once the k-th log line or the k-th shard is on disk (wherever the process
happens to be then), and from inside, at a chosen instant of an atomic write: `KILLER` runs the command
with `os.replace` wrapped so that the process SIGKILLs itself at the n-th rename onto a file, just before it
(the temporary file complete), with the temporary file cut in half (killed mid-write), or just after it.
A SIGTERM or SIGINT instead stops the command cleanly, with what it finished saved.

The training test and the collection test each break one run again and again: every rerun is itself killed or
stopped at the next chosen moment, resuming from what the last one left, until a last rerun finishes it; the end
must be what an unbroken run gives. (Some reruns change the number of worker processes, which is no setting of
the run.) A resume that goes wrong at any of the moments (a torn file taken for a good one, a step done twice, an
episode lost) spoils the end, or the rerun fails, and the test says so.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
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
    if os.fspath(dst).endswith(target):  # a file name's end, or a path's: "dynamics/state.safetensors"
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
# own run's precision: test_train.py). STEPS: four checkpoints, CKPT steps apart, the last at the end.
STEPS, CKPT = 20, 5
TRAIN = [
    *("--preset", "tiny", "--steps", str(STEPS), "--set", "workers=0", f"ckpt_every={CKPT}", "log_every=1"),
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


def start_when(args: list[str], ready, stderr=subprocess.DEVNULL, timeout: float = 120) -> subprocess.Popen:
    """Start `procgenie ARGS` and return it once `ready(proc)` holds (or it exited, or `timeout` passed)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "procgenie", *args], stdout=subprocess.DEVNULL, stderr=stderr, text=True
    )
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not ready(proc):
        time.sleep(0.002)
    return proc


def kill_when(args: list[str], ready) -> None:
    """Start `procgenie ARGS`, SIGKILL it as soon as `ready(proc)` holds; it must not have finished by then."""
    proc = start_when(args, ready)
    proc.send_signal(signal.SIGKILL)  # a no-op if it already exited: then the assert below says so
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the command finished before it could be killed"


def stop_when(args: list[str], sig: int, ready) -> tuple[str, float]:
    """Start `procgenie ARGS`, send it `sig` as soon as `ready(proc)` holds; it must stop with 128 + sig. Returns
    the last line it wrote (after the progress bar's) and the seconds it took to stop."""
    proc = start_when(args, ready, stderr=subprocess.PIPE)
    t0 = time.perf_counter()
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    took = time.perf_counter() - t0
    assert proc.returncode == 128 + sig, err[-2000:]
    return err.strip().splitlines()[-1], took


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def trained_to(stage_dir: Path) -> int:
    """The step of the trainer state on disk, where a rerun resumes (0: none yet)."""
    if not (stage_dir / "state.safetensors").exists():
        return 0
    with safe_open(str(stage_dir / "state.safetensors"), "pt") as f:
        return json.loads(f.metadata()["json"])["step"]


def nth_save(stage_dir: Path, step: int) -> int:
    """Which write of a checkpoint file, counted from its start, the next rerun makes at `step`."""
    n = step // CKPT - trained_to(stage_dir) // CKPT
    assert n >= 1, f"{stage_dir} is already at step {trained_to(stage_dir)}, past {step}"
    return n


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), f"{k} differs from the unbroken run's"


def assert_finished_cleanly(stage_dir: Path, steps: int = STEPS) -> None:
    """The resumed stage: at the last step, no temporary file left, every step logged exactly once."""
    assert trained_to(stage_dir) == steps
    assert not list(stage_dir.glob(".*.tmp")), list(stage_dir.glob(".*.tmp"))
    logged = [json.loads(line)["step"] for line in (stage_dir / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread in every command run here (the unbroken reference too, so all compute alike): the tiny runs
    gain nothing from a second, and two threads beside any other busy process on a 2-core machine (this one polling
    for the moment to kill, a loader worker, another job) made a step up to ten times slower."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def reference(coinrun_data, tmp_path_factory) -> Path:
    """All three stages trained without a break, with the settings the killed runs use."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_cli(*train_args("all", coinrun_data, run))
    return run


# -- training ----------------------------------------------------------------------------------


def stop_training(args: list[str], sig: int, stage_dir: Path, k: int) -> None:
    """Send `sig` once the k-th step is logged: the step in flight is checkpointed (not only the last CKPT-step
    save), promptly, and the command says where it stopped."""
    log = stage_dir / "log.jsonl"
    assert lines(log) < k, "a line the killed run left would trigger the signal early"
    said, took = stop_when(args, sig, lambda _: lines(log) >= k)
    assert (
        took < 10
        and said.startswith(f"procgenie train: stopped by {signal.Signals(sig).name}")
        and said.endswith("rerun the same command to resume")
    ), said
    step = trained_to(stage_dir)
    assert k <= step < STEPS and f"at step {step} of {STEPS}" in said  # the step in flight, not the last save


@pytest.mark.slow
def test_train_all_killed_and_stopped_again_and_again_resumes_every_stage_exactly(reference, coinrun_data, tmp_path):
    # The kill points that were a test case each, every one from a fresh folder, are moments of one `train all` run
    # here (`train STAGE` for each stage in turn: the same code path), each rerun resuming from what the kill before
    # it left: the same files on disk as in its own case, so a wrong resume at any of them still shows in the last
    # weights and logs, or fails the next rerun. Each kind of file is still killed before, torn or after its rename
    # as it was; from outside, once before the first checkpoint and once between two (the tokenizer killed at step
    # 16 and the dynamics at 9 were two more of the latter). The comments: what is on disk then.
    run = tmp_path / "run"
    args = train_args("all", coinrun_data, run)
    tok, dyn = run / "tokenizer", run / "dynamics"
    kill_inside(args, "torn", "tokenizer/config.json", 1)  # before any step: the config half-written, none in place
    assert not (tok / "config.json").exists()
    # from outside, before the first checkpoint, with a forked DataLoader worker; the next command starts at once:
    # the orphaned worker must not hold the folder's lock
    kill_when([*args, "workers=1"], lambda _: lines(tok / "log.jsonl") >= 3)
    stop_training(args, signal.SIGTERM, tok, 7)  # the state at 7 (the last save was 5)
    kill_inside(args, "torn", "tokenizer/model.safetensors", nth_save(tok, 10))  # step 10: mid-write of the weights
    stop_training(args, signal.SIGINT, tok, 12)  # resumed at 7 past the torn file, the log's lines to 10 dropped
    # step 20: the final weights in place, the state still at 15
    kill_inside(args, "after", "tokenizer/model.safetensors", nth_save(tok, 20))
    # step 20, all written (with the state written first, the weights stayed at step 15 for good: "already trained")
    kill_inside(args, "after", "tokenizer/state.safetensors", nth_save(tok, 20))
    kill_when(args, lambda _: lines(run / "lam" / "log.jsonl") >= 12)  # the tokenizer done; the LAM at 10
    kill_inside(args, "torn", "dynamics/state.safetensors", nth_save(dyn, 15))  # the weights at 15, the state at 10
    # the last: its weights written; by `train dynamics`, the command the dynamics cases ran (the LAM is done)
    dynamics = train_args("dynamics", coinrun_data, run)
    kill_inside(dynamics, "before", "dynamics/state.safetensors", nth_save(dyn, 20))
    run_cli(*args)  # the same command again
    for stage in ("tokenizer", "lam", "dynamics"):
        assert_same_weights(run / stage / "model.safetensors", reference / stage / "model.safetensors")
        assert_finished_cleanly(run / stage)
    assert (run / "lam" / "action_map.json").read_bytes() == (reference / "lam" / "action_map.json").read_bytes()
    # and the finished run plays: its stages still belong together
    from procgenie.world import WorldModel

    WorldModel.from_pretrained(run, device="cpu")


# -- collection --------------------------------------------------------------------------------


EPISODES = 75  # about 4,500 frames in some 25 shards: each kill below lands with episodes to come (the last at ~50)


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


def stop_collect(args: list[str], sig: int, out: Path, more: int) -> None:
    """Send `sig` once `more` shards more are recorded: every finished episode is written, and the command says so."""
    k = len(recorded(out)) + more
    said, _ = stop_when(args, sig, lambda _: len(recorded(out)) >= k)
    have = sum(s["episodes"] for s in recorded(out))
    assert said.startswith(
        f"procgenie collect: stopped by {signal.Signals(sig).name} with {have} of {EPISODES} episodes"
    ), said
    assert 0 < have < EPISODES and not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_collect_killed_and_stopped_again_and_again_loses_or_doubles_no_episode(tmp_path):
    # The kill points and signals that were a test case each, every one from a fresh folder, are moments of one
    # collection here, each rerun continuing from what the kill before it left (the same files on disk as in its own
    # case): a leftover not cleaned up, an episode lost or recorded twice at any of them shows in the finished
    # dataset. --workers is no setting of the dataset (a rerun may change it): the runs with two come last.
    out = tmp_path / "d"
    args, args2 = collect_args(out), collect_args(out, workers=2)
    before: list[dict] = []

    def counted_stays() -> None:
        nonlocal before
        now = recorded(out)
        assert now[: len(before)] == before  # what was counted stays, unchanged
        assert sum(s["episodes"] for s in now) < EPISODES
        before = now

    kill_when(args, lambda _: (out / "manifest.json").exists())  # the manifest started, no shard yet
    counted_stays()
    # (killed from outside after a few shards: tests/test_data.py)
    kill_inside(args, "torn", ".frames.npy", 3)  # mid-write of a shard's frames
    counted_stays()
    kill_inside(args, "before", "manifest.json", 4)  # a shard complete on disk, not yet recorded
    counted_stays()
    stop_collect(args, signal.SIGTERM, out, 2)
    counted_stays()

    k = len(before) + 3
    kill_when(args2, lambda _: len(recorded(out)) >= k)  # two worker processes; main killed after 3 shards more
    counted_stays()
    stop_collect(args2, signal.SIGINT, out, 2)  # SIGINT: also a terminal's Ctrl-C, all processes
    counted_stays()

    run_cli(*args2)  # the same command again
    assert run_cli("data", "validate", str(out)).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"][: len(before)] == before
    assert sum(s["episodes"] for s in manifest["shards"]) == EPISODES  # nothing lost, nothing twice
    names = [s["name"] for s in manifest["shards"]]
    assert len(set(names)) == len(names)
    on_disk = sorted(p.name for p in (out / "shards").iterdir())
    assert on_disk == sorted(f"{n}.{kind}" for n in names for kind in ("frames.npy", "steps.npz"))  # no orphans
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shards"]  # no stray temporary files


@pytest.mark.slow
def test_a_stopped_collection_writes_every_finished_episode_and_a_killed_ones_workers_stop(tmp_path):
    # The chain above cannot see either: its reruns collect whatever a stop dropped, and its workers finish their
    # few episodes before anyone could tell a stopped worker from a finished one. Here the quota is out of reach.
    many = ["--episodes", "1000000", "--policy", "random", "--max-steps", "60", "--envs", "8", "--workers", "2"]
    # 1. SIGTERM with nothing written yet (no shard is ever full): every episode that the progress bar counted
    # finished must be in the dataset, in shards written on the way out.
    out = tmp_path / "stopped"
    bar = r"\| (\d+)/1000000 \["
    err: list[str] = []  # what the command wrote to stderr so far, read as it goes, until it closes
    reader: list[threading.Thread] = []

    def finished_some(proc) -> bool:
        if not reader:
            reader.append(threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), ""))))
            reader[0].start()
        return any(int(n) >= 20 for n in re.findall(bar, "".join(err[-200:])))

    args = ["collect", "--out", str(out), *many, "--shard-frames", "10000000"]
    proc = start_when(args, finished_some, subprocess.PIPE)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, "".join(err)[-2000:]
    reader[0].join(timeout=10)  # the last characters, up to the end of the stream
    said = "".join(err)
    counted = int(re.findall(bar, said)[-1])  # the bar's last count, drawn as it closed
    have = sum(s["episodes"] for s in recorded(out))
    assert counted > 0 and have == counted, f"{counted} episodes finished, {have} written"
    assert f"with {have} of 1000000 episodes written" in said
    assert run_cli("data", "validate", str(out)).returncode == 0

    # 2. SIGKILL: the main process cannot tell its workers; they must see it gone and stop, not play on (or hang
    # on a full queue) writing shards that nothing records.
    if not Path("/proc/self/task").exists():
        pytest.skip("finding a process's children needs Linux's /proc")
    out, workers = tmp_path / "killed", []

    def two_workers_and_a_shard(proc) -> bool:
        workers[:] = children(proc.pid) or workers  # its workers (and multiprocessing's helper), while it lives
        return len(workers) >= 2 and len(recorded(out)) >= 2

    try:
        kill_when(["collect", "--out", str(out), *many, "--shard-frames", "300"], two_workers_and_a_shard)
        deadline = time.time() + 15
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(w) for w in workers), "collect workers outlived their killed main process by 15 s"
    finally:
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)


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
    train += ["--steps", "1", "--set", "precision=fp32"]  # one step, not timed: the lock is what is tested
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
