"""`procgenie dream`: render a rollout of the learned world to a GIF or MP4.

The rollout starts from real frames: a Procgen level (a test level unless --level says otherwise)
played for a few no-op steps gives the context, then the world model dreams `steps` frames under
the asked actions. The file shows the context and then the dream, every frame scaled up with
nearest-neighbour, above a timeline bar: green over the real frames, magenta over the dream.

Letters: T frames, C context frames, S frame size (64), K upscale factor.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from procgenie.atomic import write_bytes_atomic
from procgenie.errors import UserError
from procgenie.video import encode_video, upscale
from procgenie.vocab import ACTION_IDS, MOVES, NOOP

DEFAULT_ACTIONS = "right*8,right-up*4,right*6,right-up*3,noop*2"  # repeated to fill --steps
CONTEXT = 4  # real frames before the dream (fewer if the dynamics model sees fewer)
SCALE = 4  # nearest-neighbour upscale in the file
MAX_STEPS = 10_000
ACTIONS_HELP = (
    "Actions: comma-separated items, each NAME or ID, optionally *N to repeat it N times. NAME is a CoinRun "
    f"action ({', '.join(MOVES)}; also jump, left-jump, right-jump), sent as it is to a model on real actions, "
    "else mapped to the latent action the training data shows most often with it; ID is a latent action id "
    "0..K-1 (a model on real actions takes the key most often seen with it). The last action "
    "repeats if the list is shorter than --steps; a longer list is cut. Example: 'right*10,right-up*5,left*3' "
    f"or '3,3,1'. Default: '{DEFAULT_ACTIONS}' repeated; a world learned from recordings without actions takes "
    "latent ids only (default: each in turn). The file holds the context frames, then --steps dreamed frames."
)
_ITEM = re.compile(r"^(?P<what>[a-z-]+|\d+)(?:\*(?P<n>\d+))?$")


def parse_actions(text: str | None, steps: int, num_latent: int, to_latent, from_latent=None) -> list[int]:
    """The model's action ids, exactly `steps` of them, from an --actions string (see ACTIONS_HELP).

    `to_latent(real_action_id)` maps CoinRun names (WorldModel.latent_for_real_action); for a model on real
    actions pass `to_latent=None` (names are the ids themselves) and `from_latent(latent id) -> real id`.
    """
    pattern = text is None
    items = [s.strip().lower() for s in (DEFAULT_ACTIONS if pattern else text).split(",")]
    out: list[int] = []
    for item in items:
        m = _ITEM.match(item)
        if not m:
            raise UserError(
                f"--actions: cannot read '{item}': write NAME, ID, NAME*N or ID*N, "
                f"e.g. 'right*10,right-up*5' or '3,3,1'"
            )
        what, n = m["what"], int(m["n"] or 1)
        if not 1 <= n <= MAX_STEPS:
            raise UserError(f"--actions: repeat count in '{item}' must lie in 1..{MAX_STEPS}")
        if what.isdigit():
            if int(what) >= num_latent:
                raise UserError(
                    f"--actions: latent action {what} does not exist: this model has ids 0..{num_latent - 1}"
                )
            latent = int(what) if from_latent is None else int(from_latent(int(what)))
        elif what in ACTION_IDS:
            latent = ACTION_IDS[what] if to_latent is None else to_latent(ACTION_IDS[what])
        else:
            raise UserError(
                f"--actions: unknown action '{what}': use a latent id 0..{num_latent - 1} or one of "
                f"{', '.join(ACTION_IDS)}"
            )
        out += [latent] * n
    if pattern:  # the default pattern cycles; a user's list repeats its last action
        return (out * (steps // len(out) + 1))[:steps]
    return (out + [out[-1]] * steps)[:steps]


def context_length(wm) -> int:
    # The dynamics model attends to seq_len - 1 past frames; more context than that is never seen.
    return max(1, min(CONTEXT, wm.play_cfg.model.seq_len - 1))


def timeline(T: int, C: int, width: int, height: int = 2 * SCALE) -> np.ndarray:
    """A progress bar for each frame, uint8 (T, height, width, 3): green over the C real frames, magenta
    over the dream, bright up to the frame shown. It also keeps consecutive frames distinct (for T <= width),
    which GIF writers would otherwise merge into one longer frame."""
    x = np.arange(width)
    base = np.where((x < round(width * C / T))[:, None], (40, 200, 80), (220, 40, 200)).astype(np.uint8)
    done = x[None] < np.round(width * np.arange(1, T + 1) / T)[:, None]  # (T, width)
    bar = np.where(done[..., None], base, base // 4)  # (T, width, 3)
    return np.repeat(bar[:, None], height, axis=1)


def each_latent(num_latent: int, steps: int) -> str:
    """The default --actions of a world without keys: every latent action in turn, each held an equal share of
    the `steps` frames (at least 2)."""
    return ",".join(f"{k}*{max(2, steps // num_latent)}" for k in range(num_latent))


def dream(
    checkpoint,
    out: str,
    actions: str | None = None,
    steps: int = 32,
    level: int | None = None,
    fps: int = 15,
    seed: int = 0,
    maskgit_steps: int | None = None,
    precision: str = "auto",
    data: str | None = None,
) -> Path:
    """Write context + `steps` dreamed frames of level `level` (default: the first test level, 0) to `out`.
    A world learned from recordings starts from a test recording of its dataset (`data`: default its own)."""
    import torch

    from procgenie.data.store import split_of
    from procgenie.starts import Starts
    from procgenie.world import WorldModel

    path = Path(out)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise UserError(f"--out {out}: the file must end in .gif or .mp4")
    if not 1 <= steps <= MAX_STEPS:
        raise UserError(f"--steps must lie in 1..{MAX_STEPS}, got {steps}")
    if not 1 <= fps <= 60:
        raise UserError(f"--fps must lie in 1..60, got {fps}")
    level = 0 if level is None else level
    wm = WorldModel.from_pretrained(checkpoint, precision=precision)
    starts = Starts(wm, data)
    if not wm.has_key_map:  # recordings without actions: latent ids only

        def refuse(_):
            raise UserError(
                f"--actions: {wm.run_dir} learned from recordings without actions, so key names mean "
                f"nothing to it: give latent ids 0..{wm.num_latent_actions - 1}, e.g. '0*8,3*8'"
            )

        acts = parse_actions(actions or each_latent(wm.num_latent_actions, steps), steps, wm.num_latent_actions, refuse)
    elif wm.play_kind == "real":  # names are the keys themselves; a latent id stands for its most usual key
        acts = parse_actions(actions, steps, wm.num_latent_actions, None, wm.key_for_latent)
    else:
        acts = parse_actions(actions, steps, wm.num_latent_actions, wm.latent_for_real_action)
    C = context_length(wm)
    env, context = starts.open(level, C, seed)  # (C, S, S, 3), under no-ops
    env.close()
    session = wm.play_session(context[None], np.full((1, C - 1), NOOP), steps=maskgit_steps, seed=seed)
    dreamed = [session.step(torch.tensor([a]))[0] for a in acts]  # T x (S, S, 3)
    frames = np.concatenate([context, np.stack(dreamed)])  # (C + steps, S, S, 3)
    video = np.concatenate([upscale(frames, SCALE), timeline(len(frames), C, frames.shape[2] * SCALE)], axis=1)
    write_bytes_atomic(path, encode_video(video, suffix, fps))
    where = (
        f"level {level} ({split_of(level)} split"
        if starts.count is None
        else f"test recording {level % starts.count} of {starts.count} ({wm.env}"
    )
    print(f"dreamed {steps} frames after {C} real ones of {where}, {wm.precision}) -> {path}")
    return path
