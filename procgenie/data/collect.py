"""`procgenie collect`: play Procgen with vectorised environments and write a dataset.

Each worker process runs `envs` environments in one ProcgenGym3Env, pinned to the level range
[start_level, start_level + num_levels), and writes whole episodes into shards of one split each;
the main process records every finished shard in the manifest. Rerunning the same command after a
crash removes the unrecorded leftovers and collects only the episodes still missing.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import signal
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Empty

import numpy as np
from tqdm import tqdm

from procgenie.atomic import exclusive
from procgenie.data import store
from procgenie.data.policies import POLICIES, make_policy
from procgenie.data.shards import open_for_writing, write_shard
from procgenie.errors import Stopped, UserError
from procgenie.stopping import StopSignals
from procgenie.vocab import NUM_ACTIONS, PROCGEN_GAMES, make_env

# The settings that must match for a rerun to continue a dataset rather than start another.


def _worker(args: dict, worker: int, session: int, quota: int, send, stop: StopSignals) -> None:
    """Collect `quota` episodes and write them as shards; `send` reports progress to the main process.
    On SIGTERM or SIGINT (`stop.signum`) the finished episodes go into shards too, and the unfinished are dropped.

    Frames go from Procgen into per-environment episode buffers (one vectorised copy per step), then
    once into their split's shard; shards are written by a background thread while play goes on.
    """
    n, max_steps, shard_frames = args["envs"], args["max_steps"], args["shard_frames"]
    wseed = int(np.random.SeedSequence([args["seed"], session, worker]).generate_state(1)[0] % 2**31)
    env = make_env(args["env"], n, args["start_level"], args["num_levels"], wseed, args["distribution_mode"])
    policy = make_policy(args["policy"], n, wseed)
    root = Path(args["out"])
    send(("started", worker))

    _, obs, _ = env.observe()
    frames = np.empty((n, max_steps, *obs["rgb"].shape[1:]), np.uint8)  # (n, L, H, W, C) episode buffers
    actions = np.empty((n, max_steps), np.uint8)
    rewards = np.empty((n, max_steps), np.float32)
    length = np.zeros(n, np.int64)
    skip = np.zeros(n, bool)  # cut at max_steps: ignore the rest of that episode
    level = np.array([info["level_seed"] for info in env.get_info()], np.int64)
    pending = {s: [] for s in store.SPLITS}  # finished episodes of each split not yet in a shard
    rows, done, shards = np.arange(n), 0, 0
    writer = ThreadPoolExecutor(max_workers=1)
    writes = []

    def finish(i: int, truncated: bool) -> None:
        nonlocal done, shards
        if done >= quota:
            return
        L = int(length[i])
        split = store.split_of(level[i])
        pending[split].append(
            {
                "frames": frames[i, :L].copy(),
                "actions": actions[i, :L].copy(),
                "rewards": rewards[i, :L].copy(),
                "level_seed": int(level[i]),
                "truncated": truncated,
            }
        )
        done += 1
        send(("episode", L))
        if sum(len(e["frames"]) for e in pending[split]) >= shard_frames or done == quota:
            flush((split,))

    def flush(splits, wait: bool = False) -> None:
        nonlocal shards
        for sp in store.SPLITS if done == quota else splits:
            if pending[sp]:
                name = f"{sp}-s{session:03d}-w{worker:02d}-{shards:05d}"
                writes.append(writer.submit(write_shard, root, name, sp, pending[sp]))
                pending[sp], shards = [], shards + 1
        while writes and (writes[0].done() or done == quota or wait):
            send(("shard", writes.pop(0).result()))  # in order, so the manifest grows in order

    try:
        while done < quota:
            if stop.signum is not None:
                flush(store.SPLITS, wait=True)
                break
            live = ~skip
            frames[rows[live], length[live]] = obs["rgb"][live]  # the frames the actions are taken at
            act = policy.act()
            actions[rows, np.minimum(length, max_steps - 1)] = act
            env.act(act)
            rew, obs, first = env.observe()  # outcome of `act`; first: a new episode began
            rewards[rows, np.minimum(length, max_steps - 1)] = rew
            length[live] += 1
            for i in np.flatnonzero((length >= max_steps) & ~first & live):
                finish(i, truncated=True)
                skip[i] = True
            if first.any():
                for i in np.flatnonzero(first & ~skip):
                    finish(i, truncated=False)
                level[first] = [info["level_seed"] for info, f in zip(env.get_info(), first) if f]
                length[first], skip[first] = 0, False
                policy.reset(first)
    except BaseException:  # a failed write (a full disk): the writes queued after it stop, none lands after this
        writer.shutdown(wait=True, cancel_futures=True)
        raise
    writer.shutdown(wait=True)
    for w in writes:
        send(("shard", w.result()))


def _worker_process(args, worker, session, quota, queue) -> None:
    parent = mp.parent_process()

    def send(msg) -> None:
        # A main process killed outright (SIGKILL runs no clean-up) cannot stop its workers: they stop here,
        # or they would go on writing shards that nothing records, beside those of the rerun.
        if parent is not None and not parent.is_alive():
            os._exit(1)
        queue.put(msg)

    try:
        with StopSignals() as stop:  # the main process forwards SIGTERM; a terminal's Ctrl-C reaches every process
            _worker(args, worker, session, quota, send, stop)
        queue.put(("done", worker))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # the user's to fix: the main process names it in one line
            queue.put(("disk-full", (e.errno, e.strerror, e.filename)))
        else:
            queue.put(("error", traceback.format_exc()))
    except BaseException:  # report everything: the main process decides
        queue.put(("error", traceback.format_exc()))


def collect(
    out: str,
    episodes: int,
    env: str = "coinrun",
    policy: str = "random",
    start_level: int = 0,
    num_levels: int = 10_000,
    max_steps: int = 1000,
    seed: int = 0,
    workers: int = 1,
    envs: int = 16,
    shard_frames: int = 8192,
    distribution_mode: str = "hard",
    quiet: bool = False,
) -> dict:
    """Collect until the dataset at `out` holds `episodes` episodes; returns a summary of this run."""
    if env not in PROCGEN_GAMES:
        raise UserError(f"unknown Procgen game '{env}': choose one of {', '.join(PROCGEN_GAMES)}")
    if policy not in POLICIES:
        raise UserError(f"unknown policy '{policy}': choose one of {', '.join(POLICIES)}")
    for name, value, low in (
        ("--episodes", episodes, 1),
        ("--workers", workers, 1),
        ("--max-steps", max_steps, 2),
        ("--num-levels", num_levels, 0),
        ("--start-level", start_level, 0),
        ("--envs", envs, 1),
        ("--shard-frames", shard_frames, 1),
    ):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file: give a folder for the dataset")
    with exclusive(root, f"collecting into {root}"):
        identity = {  # what makes the dataset what it is: a rerun into `out` must ask for the same
            "env": env,
            "policy": policy,
            "start_level": start_level,
            "num_levels": num_levels,
            "max_steps": max_steps,
            "seed": seed,
            "distribution_mode": distribution_mode,
        }
        header = {"env": env, "image_size": 64, "num_actions": NUM_ACTIONS}
        manifest = open_for_writing(root, "collect", identity, header)
        have = sum(s["episodes"] for s in manifest["shards"])
        todo = episodes - have
        if todo <= 0:
            if not quiet:
                print(f"{root} already holds {have} episodes (asked for {episodes}): nothing to collect")
            return {"episodes": 0, "frames": 0, "seconds": 0.0, "frames_per_s": 0.0}
        session = manifest["sessions"]
        manifest["sessions"] = session + 1
        manifest["collect"]["episodes"] = episodes
        store.write_manifest(root, manifest)

        args = dict(identity, out=str(root), envs=envs, shard_frames=shard_frames)
        quotas = [todo // workers + (w < todo % workers) for w in range(workers)]
        bar = tqdm(
            total=episodes, initial=have, unit="ep", desc=f"collect {env}/{policy}", disable=quiet, dynamic_ncols=True
        )
        frames, start = 0, time.perf_counter()
        started = []  # when each worker finished starting Procgen (a one-off ~1.5 s per process)

        def on_message(msg) -> None:
            nonlocal frames
            kind, payload = msg
            if kind == "started":
                started.append(time.perf_counter())
            elif kind == "episode":
                frames += payload
                bar.update(1)
                bar.set_postfix(fps=f"{frames / (time.perf_counter() - min(started)):,.0f}", refresh=False)
            elif kind == "shard":
                manifest["shards"].append(payload)
                store.write_manifest(root, manifest)

        try:
            with StopSignals() as stop:
                if workers == 1:
                    _worker(args, 0, session, quotas[0], on_message, stop)
                else:
                    _run_processes(args, session, quotas, on_message, stop)
        finally:
            bar.close()
        if stop.signum is not None:
            have = sum(s["episodes"] for s in manifest["shards"])
            raise Stopped(
                f"stopped by {signal.Signals(stop.signum).name} with {have} of {episodes} episodes written "
                f"to {root}: rerun the same command to continue",
                128 + stop.signum,
            )
        end = time.perf_counter()
        seconds, startup = end - start, (max(started) if started else end) - start
        result = {
            "episodes": todo,
            "frames": frames,
            "seconds": seconds,
            "startup_s": startup,
            "frames_per_s": frames / max(end - min(started, default=start), 1e-9),
        }
        if not quiet:
            print(
                f"collected {todo} episodes, {frames:,} frames in {seconds:.1f} s ({startup:.1f} s starting Procgen, "
                f"then {result['frames_per_s']:,.0f} frames/s) -> {root}"
            )
        return result


def _run_processes(args: dict, session: int, quotas: list[int], on_message, stop: StopSignals) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue(maxsize=1024)
    procs = [
        ctx.Process(target=_worker_process, args=(args, w, session, q, queue), daemon=True)
        for w, q in enumerate(quotas)
        if q > 0
    ]
    for p in procs:
        p.start()
    running = len(procs)
    forwarded = False
    try:
        while running:
            if stop.signum is not None and not forwarded:  # each worker writes what it finished, then stops
                for p in procs:
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGTERM)
                forwarded = True
            try:
                msg = queue.get(timeout=0.2)
            except Empty:  # look at the stop flag again; a worker stopped before it could answer says nothing
                if not any(p.is_alive() for p in procs):
                    if stop.signum is not None:
                        break
                    raise RuntimeError(
                        "a collect worker exited before finishing its episodes: rerun the same command to continue"
                    )
                continue
            if msg[0] == "done":
                running -= 1
            elif msg[0] == "error":
                raise RuntimeError(f"a collect worker failed:\n{msg[1]}")
            elif msg[0] == "disk-full":
                raise OSError(*msg[1])
            else:
                on_message(msg)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
