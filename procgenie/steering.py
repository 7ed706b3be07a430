"""Does holding a key move the dream as it moves the real level? (eval's `play.held_keys`, and `play.scroll`: the
keys of CoinRun's main moves, from a standing start and at speed, and the dream's sharpness over long play.) And
what does each latent action do when held? (eval's `dynamics.held_latents`, for any world, recordings included.)

On test-split levels, a real Procgen level and the dream play the same context frames under no-op, then
the same key held for a number of frames. For each, the camera's total shift (metrics.camera_shift summed
frame to frame): CoinRun's camera follows the player, so holding right moves the level left (dx < 0) and a
jump moves it down (dy > 0) while the player rises.
"""

from __future__ import annotations

import numpy as np

from procgenie.data.policies import ExplorerPolicy
from procgenie.metrics import camera_shift, sharpness
from procgenie.vocab import LEFT, NOOP, RIGHT, RIGHT_UP, UP, start_frames

HELD = {"right": (RIGHT, 0), "left": (LEFT, 0), "jump": (UP, 1)}  # key -> (action, axis: 0 dx, 1 dy)
MOVED = 2  # pixels: less and the real level "did not move"
# scroll: one rollout per level from a standing start: right+up for 2 s (at play's 15 frames/s), then right, then
# left. Each part's shift along its axis is compared, dream against real.
RUN = (("right_up", RIGHT_UP, 30, 0), ("running_right", RIGHT, 10, 0), ("left_after_running", LEFT, 20, 0))


def total_shift(first: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """(K, S, S, 3) and (K, H, S, S, 3) -> (K, 2): the summed frame-to-frame camera shift (dx, dy)."""
    seq = np.concatenate([first[:, None], frames], 1)
    return camera_shift(seq[:, :-1], seq[:, 1:]).sum(1)


def drive(wm, levels: list[int], context: int, keys_KH: np.ndarray, seed: int = 0, progress=None):
    """Real test levels and play's dream from the same `context` frames under no-op, then the same keys
    (K, H): (the last context frames (K, S, S, 3), the real frames (K, H, ...), the dream's (K, H, ...))."""
    ctx, real = [], []
    for level, keys in zip(levels, keys_KH):
        env, c = start_frames(level, context, wm.env, seed)
        seen = []
        for key in keys:
            env.act(np.array([key]))
            seen.append(env.observe()[1]["rgb"][0])
        env.close()
        ctx.append(c)
        real.append(np.stack(seen))
    ctx, real = np.stack(ctx), np.stack(real)  # (K, C, ...), (K, H, ...)
    dream = wm.play(ctx, keys_KH, seed=seed, context_keys=np.full((len(levels), context - 1), NOOP), progress=progress)
    return ctx[:, -1], real, dream


def _compare(r: np.ndarray, d: np.ndarray) -> dict:
    """Real and dreamed shifts (K,) along one axis: their means, the dream's share of the real, and on how many
    levels the real one moved at least MOVED pixels and how many of those the dream moved the same way."""
    moved = np.abs(r) >= MOVED
    same = np.sign(d[moved]) == np.sign(r[moved])
    return {
        "real_shift_px": float(r.mean()),
        "dream_shift_px": float(d.mean()),
        "ratio": float(d.mean() / r.mean()) if abs(r.mean()) >= MOVED else None,  # JSON has no NaN
        "levels_moved": int(moved.sum()),
        "levels_same_direction": int(same.sum()),
        "same_direction": float(same.mean()) if moved.any() else None,  # no level moved, nothing to compare
    }


def held_keys(wm, levels: list[int], context: int, frames: int = 10, seed: int = 0) -> dict:
    """Per key: the real and dreamed shift along its axis (mean over levels) and the share of levels where the
    real level moved at least MOVED pixels and the dream moved the same way."""
    out = {}
    for name, (action, axis) in HELD.items():
        last, real, dream = drive(wm, levels, context, np.full((len(levels), frames), action), seed)
        out[name] = _compare(total_shift(last, real)[:, axis], total_shift(last, dream)[:, axis])
    return out


def scroll(wm, levels: list[int], context: int, long_frames: int = 500, seed: int = 0, held=None) -> dict:
    """CoinRun's moves, dream against real, on test levels: held right and a held jump from a standing start (10
    frames); right+up for 2 s, then right held while running, then left (RUN); and `long_play` over `long_frames`
    frames (0: none). held: held_keys' result for the same levels and context, if made already."""
    held = held or held_keys(wm, levels, context, 10, seed)
    out = {"standing_right": held["right"], "standing_jump": held["jump"]}
    keys = np.concatenate([np.full((len(levels), n), key) for _, key, n, _ in RUN], 1)
    last, real, dream = drive(wm, levels, context, keys, seed)
    begin = 0
    for name, _, n, axis in RUN:  # each part from the frame the last one left off at
        r = total_shift(real[:, begin - 1] if begin else last, real[:, begin : begin + n])
        d = total_shift(dream[:, begin - 1] if begin else last, dream[:, begin : begin + n])
        out[name] = _compare(r[:, axis], d[:, axis])
        begin += n
    return out | {"long_play": long_play(wm, levels, context, long_frames, seed) if long_frames else None}


def long_play(wm, levels: list[int], context: int, frames: int = 500, seed: int = 0) -> dict:
    """`frames` frames of explorer play (right-leaning, with jumps) on each level: the dream's sharpness (mean image
    gradient) over the last fifth against the real frames'. A level whose textures smear into blobs loses it."""
    policy = ExplorerPolicy(len(levels), np.random.default_rng(seed))
    keys = np.stack([policy.act() for _ in range(frames)], 1)
    _, real, dream = drive(wm, levels, context, keys, seed, progress=f"long play ({len(levels)} levels)")
    tail = slice(frames - frames // 5, frames)
    d, r = float(sharpness(dream[:, tail]).mean()), float(sharpness(real[:, tail]).mean())
    return {"frames": frames, "dream_sharpness": d, "real_sharpness": r, "ratio": d / r}


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
