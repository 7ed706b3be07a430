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
TEST_EVERY, SCAN = 20, 12  # test-split seeds are multiples of 20; the run scans up to 12 per level it needs


def total_shift(first: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """(K, S, S, 3) and (K, H, S, S, 3) -> (K, 2): the summed frame-to-frame camera shift (dx, dy)."""
    seq = np.concatenate([first[:, None], frames], 1)
    return camera_shift(seq[:, :-1], seq[:, 1:]).sum(1)


def real_run(env_name: str, level: int, context: int, keys_H: np.ndarray, seed: int = 0):
    """A real level from `context` frames under no-op, then keys (H,): (the context frames (C, S, S, 3), the frames
    after each key (H, S, S, 3), and where a frame is the first of a new episode (H,) bool: the player reached the
    coin or died, and Procgen started the next level, which a dream knows nothing of)."""
    env, ctx = start_frames(level, context, env_name, seed)
    seen, new = [], []
    for key in keys_H:
        env.act(np.array([key]))
        _, obs, first = env.observe()
        seen.append(obs["rgb"][0])
        new.append(bool(first[0]))
    env.close()
    return ctx, np.stack(seen), np.array(new, bool)


def drive(wm, levels: list[int], context: int, keys_KH: np.ndarray, seed: int = 0, progress=None):
    """Real test levels and play's dream from the same `context` frames under no-op, then the same keys
    (K, H): (the last context frames (K, S, S, 3), the real frames (K, H, ...), the dream's (K, H, ...), and where a
    real frame starts a new episode (K, H): real_run)."""
    runs = [real_run(wm.env, level, context, keys, seed) for level, keys in zip(levels, keys_KH)]
    ctx, real, new = (np.stack(x) for x in zip(*runs))  # (K, C, ...), (K, H, ...), (K, H)
    dream = wm.play(ctx, keys_KH, seed=seed, context_keys=np.full((len(levels), context - 1), NOOP), progress=progress)
    return ctx[:, -1], real, dream, new


def played_through(env_name: str, context: int, keys_H: np.ndarray, want: int, seed: int = 0) -> list[int]:
    """The first `want` test-split levels (seeds 0, 20, 40, ...) on which the real player plays `keys` through
    without the episode ending. CoinRun's levels are short: four seconds of running end most of them (on 13 of
    the first 16 the player reached the coin or died before the run's last part)."""
    out = []
    for level in range(0, TEST_EVERY * SCAN * want, TEST_EVERY):
        if len(out) == want:
            break
        if not real_run(env_name, level, context, keys_H, seed)[2].any():
            out.append(level)
    return out


def _compare(r: np.ndarray, d: np.ndarray, same_level: np.ndarray) -> dict:
    """Real and dreamed shifts (K,) along one axis, on the levels whose real episode went on throughout
    (same_level, K bool; a new level's first frame is no camera move): their means, the dream's share of the real,
    and on how many levels the real one moved at least MOVED pixels and how many of those the dream moved the same
    way."""
    r, d = r[same_level], d[same_level]
    moved = np.abs(r) >= MOVED
    same = np.sign(d[moved]) == np.sign(r[moved])
    return {
        "levels_compared": int(same_level.sum()),
        "real_shift_px": float(r.mean()) if len(r) else None,
        "dream_shift_px": float(d.mean()) if len(r) else None,
        "ratio": float(d.mean() / r.mean()) if len(r) and abs(r.mean()) >= MOVED else None,  # JSON has no NaN
        "levels_moved": int(moved.sum()),
        "levels_same_direction": int(same.sum()),
        "same_direction": float(same.mean()) if moved.any() else None,  # no level moved, nothing to compare
    }


def held_keys(wm, levels: list[int], context: int, frames: int = 10, seed: int = 0) -> dict:
    """Per key: the real and dreamed shift along its axis (mean over levels) and the share of levels where the
    real level moved at least MOVED pixels and the dream moved the same way."""
    out = {}
    for name, (action, axis) in HELD.items():
        last, real, dream, new = drive(wm, levels, context, np.full((len(levels), frames), action), seed)
        out[name] = _compare(total_shift(last, real)[:, axis], total_shift(last, dream)[:, axis], ~new.any(1))
    return out


def scroll(wm, levels: list[int], context: int, long_frames: int = 500, seed: int = 0, held=None) -> dict:
    """CoinRun's moves, dream against real: held right and a held jump from a standing start (10 frames) on
    `levels`; right+up for 2 s, then right held while running, then left (RUN), on as many test levels that the
    real player plays through (played_through); and `long_play` over `long_frames` frames (0: none) on `levels`.
    held: held_keys' result for the same levels and context, if made already."""
    held = held or held_keys(wm, levels, context, 10, seed)
    out = {"standing_right": held["right"], "standing_jump": held["jump"]}
    keys = np.concatenate([np.full(n, key) for _, key, n, _ in RUN])
    run_levels = played_through(wm.env, context, keys, len(levels), seed)
    if not run_levels:  # a game whose levels all end sooner
        return out | {name: None for name, *_ in RUN} | {"long_play": None}
    last, real, dream, new = drive(wm, run_levels, context, np.tile(keys, (len(run_levels), 1)), seed)
    played = ~new.any(1)  # all of them: played_through chose them so
    begin = 0
    for name, _, n, axis in RUN:  # each part from the frame the last one left off at
        r = total_shift(real[:, begin - 1] if begin else last, real[:, begin : begin + n])
        d = total_shift(dream[:, begin - 1] if begin else last, dream[:, begin : begin + n])
        out[name] = _compare(r[:, axis], d[:, axis], played) | {"levels": run_levels}
        begin += n
    return out | {"long_play": long_play(wm, levels, context, long_frames, seed) if long_frames else None}


def long_play(wm, levels: list[int], context: int, frames: int = 500, seed: int = 0) -> dict:
    """`frames` frames of explorer play (right-leaning, with jumps) on each level: the dream's sharpness (mean image
    gradient) over the last fifth against the real frames'. A level whose textures smear into blobs loses it."""
    policy = ExplorerPolicy(len(levels), np.random.default_rng(seed))
    keys = np.stack([policy.act() for _ in range(frames)], 1)
    _, real, dream, _ = drive(wm, levels, context, keys, seed, progress=f"long play ({len(levels)} levels)")
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
