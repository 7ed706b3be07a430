"""A game of play: one connection's dreamed rollout and the real Procgen level beside it (Player), and
what every connection shares: the world model and the one thread that runs it (Hub). A world learned
from recordings without actions shows the recording it started from instead, and takes number keys only.

While not paused, a Player steps at a fixed target rate; held keys are state, not a queue, so a
slow model lowers the frame rate and never builds a backlog.

Letters: S frame size (64), A latent actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from aiohttp import web

from procgenie.dream import context_length
from procgenie.errors import UserError
from procgenie.play.protocol import BadMessage, parse
from procgenie.starts import Starts
from procgenie.video import encode_video, upscale
from procgenie.vocab import MOVES, NOOP, NUM_ACTIONS, key_action

FPS = 15  # target frames per second of each connection
MAX_SESSIONS = 4  # connections at once; more are told the server is full
MAX_WS_FRAME = 1 << 20  # websocket frames past this close that connection (code 1009), as the protocol says
MAX_RECORD = 600  # frames in one recording (40 s at 15 fps); then it stops and is sent
RECORD_SCALE = 3  # nearest-neighbour upscale of recorded GIFs (x4 makes them twice as big)
KIND_FRAME, KIND_GIF = 1, 2
CONTROLS = (
    "arrows / WASD move, up / W / space jump (held keys combine), 1..{k} take latent action k-1 directly, "
    "R new level, P pause, E one step while paused, G record a GIF (again: stop and save)"
)
RECORDING_CONTROLS = (
    "1..{k} take latent action k-1 (none held: latent {idle}, what the recordings mostly do next), "
    "R another recording, P pause, E one step while paused, G record a GIF (again: stop and save)"
)


class Hub:
    """What every connection shares: the world model, the one thread that runs it, and the players."""

    def __init__(
        self,
        wm,
        maskgit_steps: int | None = None,
        level: int | None = None,
        fps: float = FPS,
        max_sessions: int = MAX_SESSIONS,
        data: str | None = None,
    ):
        self.wm, self.level, self.fps, self.max_sessions = wm.fast_weights(), level, fps, max_sessions
        self.steps = wm.play_steps(maskgit_steps)
        self.context = context_length(wm)
        self.starts = Starts(wm, data)
        self.latent_to_real = self.real_to_latent = None  # keys -> latents: only where data had keys
        if wm.procgen:
            if not wm.has_key_map:
                raise UserError(f"{wm.run_dir}/lam has no action_map.json: retrain the lam stage to write it")
            self.latent_to_real = [wm.key_for_latent(k) for k in range(wm.num_latent_actions)]
            self.real_to_latent = [wm.latent_for_real_action(a) for a in range(NUM_ACTIONS)]
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="procgenie-model")
        self.executor.submit(self.starts.warm)  # Procgen's library loads now, not at the first player
        self.players: set[Player] = set()
        self.rng = np.random.default_rng()

    async def run(self, fn, *args):
        """Run model or Procgen work on the model thread, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def later(self, fn) -> None:
        """Queue `fn` on the model thread, after the work already there (at shutdown: now)."""
        try:
            self.executor.submit(fn)
        except RuntimeError:
            fn()

    def hello(self) -> dict:
        return {
            "type": "hello",
            "num_latent_actions": self.wm.num_latent_actions,
            "action_kind": self.wm.play_kind,
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

    def controls(self) -> str:
        k = min(9, self.wm.num_latent_actions)  # number keys 1..9
        return CONTROLS.format(k=k) if self.wm.procgen else RECORDING_CONTROLS.format(k=k, idle=self.wm.idle_latent)


class Player:
    """One connection's game: a dreamed rollout and the real level beside it, fed the same actions."""

    def __init__(self, hub: Hub, ws: web.WebSocketResponse):
        self.hub, self.ws = hub, ws
        self.keys = {"left": False, "right": False, "up": False, "down": False}
        self.latent: int | None = None
        self.paused = False
        self.resume = asyncio.Event()
        self.resume.set()
        self.lock = asyncio.Lock()  # one model step or reset at a time for this session
        self.send_lock = asyncio.Lock()  # frames and replies come from two tasks
        self.session = self.env = None
        self.level, self.step_no, self.episodes, self.fps = None, 0, 0, 0.0
        self.recording: list[np.ndarray] | None = None  # (S, 2S + gap, 3) frames while recording
        self.saving: asyncio.Task | None = None  # the GIF being encoded and sent
        self.last_frame_t: float | None = None

    # -- model-thread work ----------------------------------------------------------------------
    def _start(self, level: int, seed: int):
        env, ctx = self.hub.starts.open(level, self.hub.context, seed)  # ctx (C, S, S, 3), under no-ops
        noops = np.full((1, len(ctx) - 1), NOOP)
        return env, ctx, self.hub.wm.play_session(ctx[None], noops, steps=self.hub.steps, seed=seed)

    def _step(self, latent: int, real: int):
        import torch

        action = real if self.hub.wm.play_kind == "real" else latent  # what the dream's model takes
        dream = self.session.step(torch.tensor([action]))[0]  # (S, S, 3)
        self.env.act(np.array([real]))
        _, obs, first = self.env.observe()
        return dream, obs["rgb"][0], bool(first[0])

    # -- game -----------------------------------------------------------------------------------
    async def reset(self, level: int | None) -> None:
        level = self.hub.starts.random_level(self.hub.rng) if level is None else level
        async with self.lock:
            env, ctx, session = await self.hub.run(self._start, level, int(self.hub.rng.integers(2**31)))
            if self.env is not None:
                self.hub.later(self.env.close)
            self.env, self.session, self.level, self.step_no, self.episodes = env, session, level, 0, 0
        await self.send_frame(
            ctx[-1],
            ctx[-1],
            {"action": "start", "real": NOOP, "latent": None, "source": None, "ms": 0.0, "real_done": False},
        )

    def choose(self) -> tuple[int, int, str]:
        """(latent, real, source) for the next step: a held number key, else the held arrows (a world learned
        from recordings without actions has no keys: its idle latent)."""
        if self.hub.latent_to_real is None:
            return (self.latent, NOOP, "latent") if self.latent is not None else (self.hub.wm.idle_latent, NOOP, "idle")
        if self.latent is not None:
            return self.latent, int(self.hub.latent_to_real[self.latent]), "latent"
        real = key_action(**self.keys)
        return self.hub.real_to_latent[real], real, "keys"

    async def advance(self, timed: bool = True) -> None:
        """One frame on both sides, then send it."""
        latent, real, source = self.choose()
        async with self.lock:
            t0 = time.perf_counter()
            dream, real_frame, done = await self.hub.run(self._step, latent, real)
            ms = 1000 * (time.perf_counter() - t0)
            self.step_no += 1
            self.episodes += done
        now = time.perf_counter()
        if timed and self.last_frame_t is not None:  # moving average of the delivered frame rate
            rate = 1 / max(now - self.last_frame_t, 1e-6)
            self.fps = rate if self.fps == 0 else 0.8 * self.fps + 0.2 * rate
        self.last_frame_t = now if timed else None
        if self.recording is not None:
            self.recording.append(side_by_side(dream, real_frame))
            if len(self.recording) >= MAX_RECORD:
                await self.stop_recording()
        if source == "keys" and self.hub.wm.play_kind == "real":
            latent = None  # the dream took the key itself
        await self.send_frame(
            dream,
            real_frame,
            {
                "action": MOVES[real],
                "real": real,
                "latent": latent,
                "source": source,
                "ms": round(ms, 1),
                "real_done": done,
            },
        )

    async def run(self) -> None:
        """Step at the target rate while not paused; when late, go on at once rather than catch up."""
        period = 1 / self.hub.fps
        next_t = time.perf_counter()
        while True:
            if self.paused:
                await self.resume.wait()
                next_t, self.last_frame_t = time.perf_counter(), None
            await self.advance()
            next_t = max(next_t + period, time.perf_counter())
            await asyncio.sleep(next_t - time.perf_counter())

    async def stop_recording(self) -> None:
        """Stop recording and send the GIF; encoding runs in the background so play goes on meanwhile."""
        frames, self.recording = self.recording, None
        await self.send_state()
        if frames:
            self.saving = asyncio.create_task(self._send_gif(frames))

    async def _send_gif(self, frames: list[np.ndarray]) -> None:
        fps = min(self.hub.fps, self.fps or self.hub.fps)  # play the GIF back at the speed it was played
        gif = await asyncio.get_running_loop().run_in_executor(None, _gif, frames, fps)
        with contextlib.suppress(ConnectionError):
            await self.send(
                KIND_GIF, {"name": f"procgenie-level{self.level}-step{self.step_no}.gif", "frames": len(frames)}, gif
            )

    # -- messages -------------------------------------------------------------------------------
    async def handle(self, text: str) -> None:
        """Apply one client message; a refused one raises BadMessage before anything changes."""
        kind, msg = parse(text, self.hub.wm.num_latent_actions)
        await getattr(self, f"on_{kind}")(**msg)

    async def on_input(self, left=False, right=False, up=False, down=False, latent=None) -> None:
        self.keys = {"left": left, "right": right, "up": up, "down": down}
        self.latent = latent

    async def on_pause(self, paused=None) -> None:
        self.paused = not self.paused if paused is None else paused
        self.resume.clear() if self.paused else self.resume.set()
        await self.send_state()

    async def on_step(self) -> None:
        if not self.paused:
            raise BadMessage("step works while paused: pause first (P)")
        await self.advance(timed=False)

    async def on_reset(self, level=None) -> None:
        await self.reset(level)

    async def on_record(self) -> None:
        if self.recording is None:
            if self.saving is not None and not self.saving.done():
                raise BadMessage("still saving the last recording: press G again in a moment")
            self.recording = []
            await self.send_state()
        else:
            await self.stop_recording()

    # -- sending --------------------------------------------------------------------------------
    async def send(self, kind: int, meta: dict, payload: bytes) -> None:
        head = json.dumps(meta).encode()
        async with self.send_lock:
            await self.ws.send_bytes(struct.pack(">BI", kind, len(head)) + head + payload)

    async def send_json(self, obj: dict) -> None:
        async with self.send_lock:
            await self.ws.send_str(json.dumps(obj))

    def state(self) -> dict:
        return {
            "step": self.step_no,
            "level": self.level,
            "paused": self.paused,
            "fps": round(self.fps, 1),
            "recording": None if self.recording is None else len(self.recording),
            "episodes": self.episodes,
        }

    async def send_state(self) -> None:
        await self.send_json({"type": "state", **self.state()})

    async def send_frame(self, dream: np.ndarray, real: np.ndarray, meta: dict) -> None:
        await self.send(KIND_FRAME, {**self.state(), **meta}, dream.tobytes() + real.tobytes())

    def close(self) -> None:
        if self.saving is not None:
            self.saving.cancel()
        if self.env is not None:  # after any step still running on the model thread
            self.hub.later(self.env.close)
            self.env = self.session = None


def _gif(frames: list[np.ndarray], fps: float) -> bytes:
    return encode_video(upscale(np.stack(frames), RECORD_SCALE), ".gif", fps)  # (T, S*k, (2S+gap)*k, 3)


def side_by_side(dream: np.ndarray, real: np.ndarray, gap: int = 2) -> np.ndarray:
    """(S, S, 3) x 2 -> (S, 2S + gap, 3): the dream left, the real game right, a dark gap between."""
    return np.concatenate([dream, np.full((dream.shape[0], gap, 3), 24, np.uint8), real], axis=1)
