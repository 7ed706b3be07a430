"""Does holding a key move the dream as it moves the real level? (eval's `play.held_keys`) And what does
each latent action do when held? (eval's `dynamics.held_latents`, for any world, recordings included.)

On test-split levels, a real Procgen level and the dream play the same context frames under no-op, then
the same key held for a number of frames. For each, the camera's total shift (metrics.camera_shift summed
frame to frame): CoinRun's camera follows the player, so holding right moves the level left (dx < 0) and a
jump moves it down (dy > 0) while the player rises.
"""

from __future__ import annotations

import numpy as np

from procgenie.metrics import camera_shift
from procgenie.vocab import LEFT, NOOP, RIGHT, UP, start_frames

HELD = {"right": (RIGHT, 0), "left": (LEFT, 0), "jump": (UP, 1)}  # key -> (action, axis: 0 dx, 1 dy)
MOVED = 2  # pixels: less and the real level "did not move"


def total_shift(first: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """(K, S, S, 3) and (K, H, S, S, 3) -> (K, 2): the summed frame-to-frame camera shift (dx, dy)."""
    seq = np.concatenate([first[:, None], frames], 1)
    return camera_shift(seq[:, :-1], seq[:, 1:]).sum(1)


def held_keys(wm, levels: list[int], context: int, frames: int = 10, seed: int = 0) -> dict:
    """Per key: the real and dreamed shift along its axis (mean over levels) and the share of levels where the
    real level moved at least MOVED pixels and the dream moved the same way."""
    out = {}
    for name, (action, axis) in HELD.items():
        ctx, real = [], []
        for level in levels:
            env, c = start_frames(level, context, wm.env, seed)
            seen = []
            for _ in range(frames):
                env.act(np.array([action]))
                seen.append(env.observe()[1]["rgb"][0])
            env.close()
            ctx.append(c)
            real.append(np.stack(seen))
        ctx, real = np.stack(ctx), np.stack(real)  # (K, C, ...), (K, H, ...)
        keys = np.full((len(levels), frames), action)
        dream = wm.play(ctx, keys, seed=seed, context_keys=np.full((len(levels), context - 1), NOOP))
        r, d = total_shift(ctx[:, -1], real)[:, axis], total_shift(ctx[:, -1], dream)[:, axis]
        moved = np.abs(r) >= MOVED
        out[name] = {
            "real_shift_px": float(r.mean()),
            "dream_shift_px": float(d.mean()),
            "levels_moved": int(moved.sum()),
            "same_direction": float((np.sign(d[moved]) == np.sign(r[moved])).mean()) if moved.any() else None,
        }  # JSON has no NaN: no level moved, nothing to compare
    return out


def held_latents(wm, context: np.ndarray, frames: int = 10, seed: int = 0) -> tuple[list[dict], np.ndarray]:
    """Each latent action held for `frames` frames from every context (K, C, S, S, 3): the dream's camera shift,
    dx and dy summed over the frames (mean over contexts), and its size |dx| + |dy| (mean over contexts).
    Also returns the first context's dreams, uint8 (A, frames, S, S, 3), for the report."""
    out, first = [], []
    for k in range(wm.num_latent_actions):
        dream = wm.generate(context, np.full((len(context), frames), k), seed=seed)
        shift = total_shift(context[:, -1], dream)  # (K, 2)
        out.append(
            {
                "latent": k,
                "dx_px": float(shift[:, 0].mean()),
                "dy_px": float(shift[:, 1].mean()),
                "moved_px": float(np.abs(shift).sum(1).mean()),
            }
        )
        first.append(dream[0])
    return out, np.stack(first)
