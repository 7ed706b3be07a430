"""The game's vocabulary: Procgen's actions and their names, the keys that press them, and an environment
started at a level. Every other module takes them from here.

Procgen has 15 actions in every game, in this order; in CoinRun the first nine are the combinations of
left/right and down/up (up jumps), and the last six do nothing.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

ACTION_NAMES = ("left-down", "left", "left-up", "down", "noop", "up", "right-down", "right", "right-up",
                "d", "a", "w", "s", "q", "e")
NUM_ACTIONS = len(ACTION_NAMES)                   # 15
MOVES = ACTION_NAMES[:9]                          # the actions that do something in CoinRun
LEFT_DOWN, LEFT, LEFT_UP, DOWN, NOOP, UP, RIGHT_DOWN, RIGHT, RIGHT_UP = range(9)
ALIASES = {"jump": UP, "left-jump": LEFT_UP, "right-jump": RIGHT_UP}
ACTION_IDS = {**{n: i for i, n in enumerate(MOVES)}, **ALIASES}   # names a user may write


def key_action(left: bool, right: bool, up: bool, down: bool) -> int:
    """Held keys -> Procgen action 0..8: left+right cancel, up (jump) wins over down."""
    dx = int(right) - int(left)
    return 3 * (dx + 1) + (2 if up else 0 if down else 1)


def make_env(env: str, num: int, start_level: int, num_levels: int, seed: int, distribution_mode: str = "hard"):
    """A ProcgenGym3Env pinned to a level range (quietly: gym prints a deprecation notice on import)."""
    with contextlib.redirect_stderr(io.StringIO()):
        from procgen import ProcgenGym3Env
    return ProcgenGym3Env(num=num, env_name=env, start_level=start_level, num_levels=num_levels,
                          rand_seed=seed, distribution_mode=distribution_mode, num_threads=0)


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
