"""A game of play: one connection's dreamed rollout and the real Procgen level beside it (Player). A world
learned from recordings without actions shows the recording it started from instead, and takes number keys only.

A Player holds state only: the keys held (state, not a queue), pause, the level it wants next. The hub's
tick (hub.py) does all model work and hands each frame back through `started` / `stepped`, which send it
without holding up the tick: a player whose last frame has not gone out yet is not due.

Letters: S frame size (64).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections import deque

import numpy as np
from aiohttp import WSCloseCode, web

from procgenie.play.protocol import BadMessage, parse
from procgenie.video import encode_video, upscale
from procgenie.vocab import MOVES, NOOP, key_action

PROBATION = 0.1  # seconds a new connection waits for its first start: a flood of connections that are closed
# at once (for what they send) costs no model work
MAX_RECORD = 600  # frames in one recording (40 s at 15 fps); then it stops and is sent
RECORD_SCALE = 3  # nearest-neighbour upscale of recorded GIFs (x4 makes them twice as big)
KIND_FRAME, KIND_GIF = 1, 2


class Player:
    """One connection's game: a dreamed rollout and the real level beside it, fed the same actions."""

    def __init__(self, hub, ws: web.WebSocketResponse | None):
        self.hub, self.ws = hub, ws
        self.keys = {"left": False, "right": False, "up": False, "down": False}
        self.latent: int | None = None
        self.paused = self.step_wanted = self.closed = False
        self.wanted: int | None = hub.starts.random_level(hub.rng) if hub.level is None else hub.level  # next level
        self.joined = time.perf_counter()
        self.send_lock = asyncio.Lock()  # frames and replies come from two tasks
        self.sending: asyncio.Task | None = None  # the last frame, on its way
        self.session = self.env = None
        self.level, self.step_no, self.episodes = None, 0, 0
        self.sent: deque[float] = deque()  # when frames went out over the last second: the delivered rate
        self.recording: list[np.ndarray] | None = None  # (S, 2S + gap, 3) frames while recording
        self.saving: asyncio.Task | None = None  # the GIF being encoded and sent

    # -- the hub's side -------------------------------------------------------------------------
    def due(self) -> bool:
        """Whether the next tick has work for this player."""
        if self.closed or (self.sending is not None and not self.sending.done()):
            return False
        if self.session is None and time.perf_counter() < self.joined + PROBATION:
            return False  # see hub.PROBATION
        return self.wanted is not None or (self.session is not None and (not self.paused or self.step_wanted))

    def choose(self) -> tuple[int | None, int, str]:
        """(latent, real, source) for the next step: a held number key, else the held arrows (a world learned
        from recordings without actions has no keys: its idle latent)."""
        hub = self.hub
        if not hub.wm.procgen:
            return (self.latent, NOOP, "latent") if self.latent is not None else (hub.wm.idle_latent, NOOP, "idle")
        if self.latent is not None:
            return self.latent, int(hub.latent_to_real[self.latent]), "latent"
        real = key_action(**self.keys)
        return (None if hub.real_to_latent is None else hub.real_to_latent[real]), real, "keys"

    def started(self, level: int, env, ctx: np.ndarray, session, times: dict) -> None:
        if self.closed:
            self.hub.later(env.close)
            return
        if self.env is not None:
            self.hub.later(self.env.close)
        self.env, self.session, self.level, self.step_no, self.episodes = env, session, level, 0, 0
        meta = {"action": "start", "real": NOOP, "latent": None, "source": None, "real_done": False}
        self.deliver(ctx[-1], ctx[-1], {**meta, **times, "batch": 1})

    def stepped(self, latent, real: int, source: str, dream, real_frame, done: bool, times: dict) -> None:
        if self.closed:
            return
        self.step_no += 1
        self.episodes += done
        if self.recording is not None:
            self.recording.append(side_by_side(dream, real_frame))
            if len(self.recording) >= MAX_RECORD:
                self.stop_recording()
        meta = {"action": MOVES[real], "real": real, "latent": latent, "source": source, "real_done": done}
        self.deliver(dream, real_frame, {**meta, **{k: round(v, 1) for k, v in times.items()}})

    def deliver(self, dream: np.ndarray, real: np.ndarray, meta: dict) -> None:
        """Send a frame in the background; the player is due again once it has gone out."""
        self.sent.append(time.perf_counter())
        self.sending = asyncio.create_task(
            self.send(KIND_FRAME, {**self.state(), **meta}, dream.tobytes() + real.tobytes())
        )

    def fail(self) -> None:
        """The model failed on this player's work: say so and end the connection."""
        why = "the world model failed: see the server's log"
        self.sending = asyncio.create_task(self.close_with(why, WSCloseCode.INTERNAL_ERROR))

    # -- messages -------------------------------------------------------------------------------
    async def handle(self, text: str) -> None:
        """Apply one client message; a refused one raises BadMessage before anything changes."""
        kind, msg = parse(text, self.hub.num_keys)
        await getattr(self, f"on_{kind}")(**msg)
        self.hub.wake.set()

    async def on_input(self, left=False, right=False, up=False, down=False, latent=None) -> None:
        self.keys = {"left": left, "right": right, "up": up, "down": down}
        self.latent = latent

    async def on_pause(self, paused=None) -> None:
        self.paused = not self.paused if paused is None else paused
        await self.send_state()

    async def on_step(self) -> None:
        if not self.paused:
            raise BadMessage("step works while paused: pause first (P)")
        self.step_wanted = True

    async def on_reset(self, level=None) -> None:
        self.wanted = self.hub.starts.random_level(self.hub.rng) if level is None else level

    async def on_record(self) -> None:
        if self.recording is None:
            if self.saving is not None and not self.saving.done():
                raise BadMessage("still saving the last recording: press G again in a moment")
            self.recording = []
            await self.send_state()
        else:
            self.stop_recording()

    def stop_recording(self) -> None:
        """Stop recording and send the GIF; encoding runs in the background so play goes on meanwhile."""
        frames, self.recording = self.recording, None
        self.saving = asyncio.create_task(self._send_gif(frames))

    async def _send_gif(self, frames: list[np.ndarray]) -> None:
        with contextlib.suppress(ConnectionError):
            await self.send_state()
        if not frames:
            return
        fps = min(self.hub.fps, self.fps() or self.hub.fps)  # play the GIF back at the speed it was played
        gif = await asyncio.get_running_loop().run_in_executor(None, _gif, frames, fps)
        await self.send(
            KIND_GIF, {"name": f"procgenie-level{self.level}-step{self.step_no}.gif", "frames": len(frames)}, gif
        )

    # -- sending --------------------------------------------------------------------------------
    async def send(self, kind: int, meta: dict, payload: bytes) -> None:
        head = json.dumps(meta).encode()
        with contextlib.suppress(ConnectionError):  # the browser went away: its handler frees the player
            async with self.send_lock:
                await self.ws.send_bytes(struct.pack(">BI", kind, len(head)) + head + payload)

    async def send_json(self, obj: dict) -> None:
        async with self.send_lock:
            await self.ws.send_str(json.dumps(obj))

    async def close_with(self, message: str, code: int) -> None:
        """One JSON error that says why, then the close (the page shows the text instead of 'disconnected')."""
        with contextlib.suppress(ConnectionError):
            await self.send_json({"type": "error", "message": message, "closing": True})
        await self.ws.close(code=code)

    def fps(self) -> float:
        """Frames sent over the last second."""
        while self.sent and time.perf_counter() - self.sent[0] > 1.0:
            self.sent.popleft()
        return float(len(self.sent))

    def state(self) -> dict:
        return {
            "step": self.step_no,
            "level": self.level,
            "paused": self.paused,
            "fps": self.fps(),
            "recording": None if self.recording is None else len(self.recording),
            "episodes": self.episodes,
        }

    async def send_state(self) -> None:
        await self.send_json({"type": "state", **self.state()})

    def close(self) -> None:
        self.closed = True
        for task in (self.saving, self.sending):
            if task is not None:
                task.cancel()
        if self.env is not None:  # after any step still running on the model thread
            self.hub.later(self.env.close)
            self.env = self.session = None


def _gif(frames: list[np.ndarray], fps: float) -> bytes:
    return encode_video(upscale(np.stack(frames), RECORD_SCALE), ".gif", fps)  # (T, S*k, (2S+gap)*k, 3)


def side_by_side(dream: np.ndarray, real: np.ndarray, gap: int = 2) -> np.ndarray:
    """(S, S, 3) x 2 -> (S, 2S + gap, 3): the dream left, the real game right, a dark gap between."""
    return np.concatenate([dream, np.full((dream.shape[0], gap, 3), 24, np.uint8), real], axis=1)
