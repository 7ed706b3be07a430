"""What every player shares: the world model, the one thread that runs it, and the clock that steps them.

One task ticks at the target rate. Each tick takes every player who is due (not paused, or asked for one
step, or asked for a new level; and whose last frame has gone out) and runs, on the model thread, at most
one start (a new player's or a new level's context) and then one batched step for all the others
(`batch.Together`: one dynamics call and one decoder call). Messages only change a player's state
(held keys, pause, a wanted level), so no client can make the model work for it more than once a tick,
and a player's frame rate does not depend on what another client sends.

Letters: S frame size (64).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from procgenie.dream import context_length
from procgenie.errors import UserError
from procgenie.play.batch import Together
from procgenie.play.game import PROBATION
from procgenie.starts import Starts
from procgenie.vocab import MOVES, NOOP, NUM_ACTIONS

FPS = 15  # target frames per second of each player
MAX_SESSIONS = 4  # players at once; more are told the server is full
STARTS_PER_TICK = 1  # context encodings a tick runs (a start costs two or three steps)
MOVE_CONTROLS = "arrows / WASD move, up / W / space jump (held keys combine)"
CONTROLS = "R new level, P pause, E one step while paused, G record a GIF (again: stop and save)"
log = logging.getLogger("procgenie.play")


def model_thread() -> ThreadPoolExecutor:
    """The thread that runs a hub's model work (load the model on it too: Hub's note on OpenMP)."""
    return ThreadPoolExecutor(1, thread_name_prefix="procgenie-model")


def load_hub(checkpoint: str | None, precision: str = "auto", **options) -> Hub:
    """A hub on the model at `checkpoint` (None: the bundled one), loaded on the thread that will run it."""
    from procgenie.world import WorldModel

    executor = model_thread()
    wm = executor.submit(WorldModel.from_pretrained, checkpoint, precision=precision).result()
    return Hub(wm, executor=executor, **options)


class Hub:
    """The world model, the model thread, the players and the tick that steps them together."""

    def __init__(
        self,
        wm,
        maskgit_steps: int | None = None,
        level: int | None = None,
        fps: float = FPS,
        max_sessions: int = MAX_SESSIONS,
        data: str | None = None,
        executor: ThreadPoolExecutor | None = None,
    ):
        # One thread runs all of the model's work, from loading on where the caller can (executor: model_thread's).
        # GNU OpenMP gives each thread that computes its own team of helper threads; with more of them than cores
        # (the main thread's team and the model thread's, on 2 cores) they sleep between parallel regions instead
        # of spinning, and each of a frame's few hundred regions waits for a wake-up: play took 73 instead of 37 ms
        # a frame on a 2-core CPU (390 context switches a frame against 0).
        self.executor = executor or model_thread()
        self.wm = self.executor.submit(wm.fast_weights).result()
        self.level, self.fps, self.max_sessions = level, fps, max_sessions
        self.steps = wm.play_steps(maskgit_steps)
        self.context = context_length(wm)
        self.starts = Starts(wm, data)
        self.latent_to_real = self.real_to_latent = None  # keys -> latents: only where data had keys
        if wm.procgen and wm.play_kind == "latent":
            if not wm.has_key_map:
                raise UserError(f"{wm.run_dir}/lam has no action_map.json: retrain the lam stage to write it")
            self.latent_to_real = [wm.key_for_latent(k) for k in range(wm.num_latent_actions)]
            self.real_to_latent = [wm.latent_for_real_action(a) for a in range(NUM_ACTIONS)]
        self.executor.submit(self.starts.warm)  # Procgen's library loads now, not at the first player
        self.together = Together()  # the players' stacked state, kept from tick to tick
        self.players: list = []  # in the order they came: starts are served first come, first served
        self.rng = np.random.default_rng()
        self.wake = asyncio.Event()  # set when a player may have become due
        self.ticker: asyncio.Task | None = None

    # -- what the page is told ------------------------------------------------------------------
    @property
    def num_keys(self) -> int:
        """Latent actions a client may pick directly (number keys): none where the model takes Procgen's keys."""
        return 0 if self.wm.play_kind == "real" else self.wm.num_latent_actions

    def key_labels(self) -> list[str]:
        """What number keys 1..9 do, one label each: a latent action, and on Procgen the real side's key."""
        if self.latent_to_real is None:
            return [f"latent {k}" for k in range(min(9, self.num_keys))]
        return [f"latent {k} (real side: {MOVES[r]})" for k, r in enumerate(self.latent_to_real[:9])]

    def controls(self) -> str:
        keys = self.key_labels()
        digits = f"1..{len(keys)} take latent action k-1 directly, " if keys else ""
        if not self.wm.procgen:
            return f"{digits}(none held: latent {self.wm.idle_latent}, what the recordings mostly do next), {CONTROLS}"
        return f"{MOVE_CONTROLS}, {digits}{CONTROLS}"

    def hello(self) -> dict:
        return {
            "type": "hello",
            "num_latent_actions": self.wm.num_latent_actions,
            "action_kind": self.wm.play_kind,
            "number_keys": self.key_labels(),
            "fps": self.fps,
            "maskgit_steps": self.steps,
            "context": self.context,
            "size": self.wm.image_size,
            "real_actions": list(MOVES),
            "controls": self.controls(),
            "world": "procgen" if self.wm.procgen else "recordings",
            "name": self.wm.env,
            "recordings": self.starts.count,
            "latent_to_real": self.latent_to_real,
            "real_to_latent": self.real_to_latent,
        }

    # -- players --------------------------------------------------------------------------------
    def join(self, player) -> None:
        self.players.append(player)
        if self.ticker is None or self.ticker.done():
            self.ticker = asyncio.create_task(self.loop())
            self.ticker.add_done_callback(_said)
        self.wake.set()

    def leave(self, player) -> None:
        if player in self.players:
            self.players.remove(player)
            self.later(self.together.forget)  # on the model thread, between ticks
        player.close()

    async def run(self, fn, *args):
        """Run model or Procgen work on the model thread, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def later(self, fn) -> None:
        """Queue `fn` on the model thread, after the work already there (at shutdown: now)."""
        try:
            self.executor.submit(fn)
        except RuntimeError:
            fn()

    # -- the tick -------------------------------------------------------------------------------
    async def loop(self) -> None:
        """Tick at the target rate while anyone is due; when late, go on at once rather than catch up."""
        period = 1 / self.fps
        next_t = time.perf_counter()
        while True:
            due = [p for p in self.players if p.due()]
            if not due:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):  # a new player's probation ends without a message
                    await asyncio.wait_for(self.wake.wait(), PROBATION)
                next_t = time.perf_counter()
                continue
            starting = [p for p in due if p.wanted is not None][:STARTS_PER_TICK]
            stepping = [p for p in due if p.wanted is None]
            starts = [(p.wanted, int(self.rng.integers(2**31))) for p in starting]
            plan = [(p.session, p.env, *p.choose()) for p in stepping]  # (session, env, latent, real, source)
            for p in starting:
                p.wanted = None
            for p in stepping:
                p.step_wanted = False
            try:
                opened, stepped, times = await self.run(self.tick, starts, plan)
            except Exception:  # a failure ends the players it concerned, never the server
                log.exception("play: the world model failed")
                for p in starting + stepping:
                    p.fail()
            else:
                t0, t1, t2 = times  # model thread: began, starts done, steps done
                for p, (level, _), started in zip(starting, starts, opened):
                    p.started(level, *started, {"model_ms": 1000 * (t1 - t0), "queue_ms": 1000 * (t0 - next_t)})
                batch = {"model_ms": 1000 * (t2 - t1), "queue_ms": 1000 * (t1 - next_t), "batch": len(plan)}
                for p, (_, _, latent, real, source), frames in zip(stepping, plan, stepped):
                    p.stepped(latent, real, source, *frames, batch)
            next_t = max(next_t + period, time.perf_counter())
            await asyncio.sleep(next_t - time.perf_counter())

    def tick(self, starts: list[tuple[int, int]], plan: list[tuple]):
        """Model thread: open the levels `starts` (level, seed) and step `plan`'s sessions together; with
        (began, starts done, steps done) perf_counter times."""
        t0 = time.perf_counter()
        opened = [self.open(level, seed) for level, seed in starts]
        t1 = time.perf_counter()
        stepped = self.step([(s, e, latent, real) for s, e, latent, real, _ in plan])
        return opened, stepped, (t0, t1, time.perf_counter())

    def open(self, level: int, seed: int):
        """A level's real source and context (C, S, S, 3) under no-ops, and the dream's session on it."""
        env, ctx = self.starts.open(level, self.context, seed)
        noops = np.full((1, len(ctx) - 1), NOOP)
        return env, ctx, self.wm.play_session(ctx[None], noops, steps=self.steps, seed=seed)

    def step(self, plan: list[tuple]) -> list[tuple[np.ndarray, np.ndarray, bool]]:
        """One frame for each (session, env, latent, real): the dreams in one batch, then each real side ->
        (dream (S, S, 3), real (S, S, 3), whether the real episode ended)."""
        if not plan:
            return []
        take = [torch.tensor([real if self.wm.play_kind == "real" else latent]) for _, _, latent, real in plan]
        dreams = self.together.step([session for session, *_ in plan], take)
        out = []
        for (_, env, _, real), dream in zip(plan, dreams):
            env.act(np.array([real]))
            _, obs, first = env.observe()
            out.append((dream[0], obs["rgb"][0], bool(first[0])))
        return out

    async def stop(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
            await asyncio.gather(self.ticker, return_exceptions=True)
        self.executor.shutdown(wait=True)


def _said(task: asyncio.Task) -> None:
    """A tick loop that ended on an error (a bug: model failures are caught) says so; the next player restarts it."""
    if not task.cancelled() and task.exception() is not None:
        log.error("play: the tick stopped", exc_info=task.exception())
