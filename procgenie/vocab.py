"""The game's vocabulary: Procgen's actions and their names, the keys that press them, how keys and latent
actions map onto each other, and an environment started at a level. Every other module takes them from here.

Procgen has 15 actions in every game, in this order; in CoinRun the first nine are the combinations of
left/right and down/up (up jumps), and the last six do nothing.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

PROCGEN_GAMES = (
    "bigfish",
    "bossfight",
    "caveflyer",
    "chaser",
    "climber",
    "coinrun",
    "dodgeball",
    "fruitbot",
    "heist",
    "jumper",
    "leaper",
    "maze",
    "miner",
    "ninja",
    "plunder",
    "starpilot",
)
ACTION_NAMES = (
    "left-down",
    "left",
    "left-up",
    "down",
    "noop",
    "up",
    "right-down",
    "right",
    "right-up",
    "d",
    "a",
    "w",
    "s",
    "q",
    "e",
)
NUM_ACTIONS = len(ACTION_NAMES)  # 15
MOVES = ACTION_NAMES[:9]  # the actions that do something in CoinRun
LEFT_DOWN, LEFT, LEFT_UP, DOWN, NOOP, UP, RIGHT_DOWN, RIGHT, RIGHT_UP = range(9)
ALIASES = {"jump": UP, "left-jump": LEFT_UP, "right-jump": RIGHT_UP}
ACTION_IDS = {**{n: i for i, n in enumerate(MOVES)}, **ALIASES}  # names a user may write


def key_action(left: bool, right: bool, up: bool, down: bool) -> int:
    """Held keys -> Procgen action 0..8: left+right cancel, up (jump) wins over down."""
    dx = int(right) - int(left)
    return 3 * (dx + 1) + (2 if up else 0 if down else 1)


def most_specific_latent(counts_RA: np.ndarray) -> np.ndarray:
    """For each real action (rows of the co-occurrence counts), the latent action most over-represented
    with it: argmax of P(latent | real) / P(latent). A plain argmax of the counts would give the most
    common latent (the one for "keep moving as before") to nearly every real action."""
    counts = counts_RA.astype(np.float64)
    p_latent = counts.sum(0) / max(counts.sum(), 1)
    p_given_real = counts / np.clip(counts.sum(1, keepdims=True), 1, None)
    return (p_given_real / np.clip(p_latent, 1e-12, None)).argmax(1)


def real_for_latent(counts_RA: np.ndarray) -> np.ndarray:
    """For each latent action, the real action (0..8) the training data shows most often with it (A,).

    Procgen's 9..14 do nothing in CoinRun, so they count as noop; a latent the data never used maps to noop.
    """
    merged = counts_RA[:9].astype(np.int64)
    merged[NOOP] += counts_RA[9:].sum(0).astype(np.int64)
    out = merged.argmax(0)
    out[merged.sum(0) == 0] = NOOP
    return out


def make_env(env: str, num: int, start_level: int, num_levels: int, seed: int, mode: str = "hard"):
    """`num` copies of Procgen game `env` pinned to levels [start_level, start_level + num_levels) in
    distribution mode `mode`, stepped on the calling thread (quietly: gym prints a deprecation notice on import)."""
    with contextlib.redirect_stderr(io.StringIO()):
        from procgen import ProcgenGym3Env
    return ProcgenGym3Env(
        num, env, start_level=start_level, num_levels=num_levels, rand_seed=seed, distribution_mode=mode, num_threads=0
    )


def start_frames(level: int, frames: int, env_name: str = "coinrun", seed: int = 0):
    """A Procgen env pinned to `level` and its first `frames` frames under no-ops: uint8 (C, S, S, 3).

    Returns (env, frames); the env is left at the last of them, so play can go on from there.
    """
    from procgenie.errors import UserError

    if not 0 <= level < 2**31 - 1:
        raise UserError(f"a level seed lies in 0..{2**31 - 2}, got {level}")
    env = make_env(env_name, 1, start_level=level, num_levels=1, seed=seed)
    out = [env.observe()[1]["rgb"][0]]
    for _ in range(frames - 1):
        env.act(np.array([NOOP]))
        out.append(env.observe()[1]["rgb"][0])
    return env, np.stack(out)
