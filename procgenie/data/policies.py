"""Behaviour policies that play Procgen to make training data, vectorised over environments.

Random play (Genie's choice) rarely gets past a CoinRun level's start, and a world model trained on
it overfits to level starts. `explorer` leans right and jumps, so episodes cover whole levels, while
still trying every action so the latent action model sees all of them.
"""

from __future__ import annotations

import numpy as np

from procgenie.vocab import DOWN, LEFT, LEFT_UP, NOOP, NUM_ACTIONS, RIGHT, RIGHT_UP, UP

# explorer's action distribution when it changes action: mostly right and right-jumps.
_EXPLORE_P = np.full(NUM_ACTIONS, 0.01)
_EXPLORE_P[[RIGHT, RIGHT_UP]] = [0.38, 0.30]
_EXPLORE_P[[UP, LEFT, LEFT_UP, NOOP, DOWN]] = [0.08, 0.06, 0.04, 0.03, 0.02]
_EXPLORE_P /= _EXPLORE_P.sum()


class Policy:
    """Chooses actions for `n` environments; `reset(mask)` starts new episodes where mask is set."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng = n, rng
        self.last = rng.integers(0, NUM_ACTIONS, n)

    def reset(self, mask: np.ndarray) -> None:
        pass

    def act(self) -> np.ndarray:  # (n,) int
        raise NotImplementedError


class RandomPolicy(Policy):
    """Uniform over all of Procgen's actions, every step (Genie's data)."""

    def act(self) -> np.ndarray:
        return self.rng.integers(0, NUM_ACTIONS, self.n)


class StickyPolicy(Policy):
    """Repeats its last action with probability `repeat`, else draws from `probs` (uniform by default)."""

    def __init__(self, n: int, rng: np.random.Generator, repeat: float = 0.75, probs: np.ndarray | None = None):
        super().__init__(n, rng)
        self.repeat, self.probs = repeat, probs

    def act(self) -> np.ndarray:
        fresh = self.rng.choice(NUM_ACTIONS, self.n, p=self.probs)
        keep = self.rng.random(self.n) < self.repeat
        self.last = np.where(keep, self.last, fresh)
        return self.last


class ExplorerPolicy(StickyPolicy):
    """Right-leaning sticky play with jumps: gets through levels, yet tries every action now and then."""

    def __init__(self, n: int, rng: np.random.Generator):
        super().__init__(n, rng, repeat=0.8, probs=_EXPLORE_P)


class MixedPolicy(ExplorerPolicy):
    """Each episode of each environment is played by `explorer` or `random`, half and half."""

    def __init__(self, n: int, rng: np.random.Generator):
        super().__init__(n, rng)
        self.random = rng.random(n) < 0.5

    def reset(self, mask: np.ndarray) -> None:
        self.random[mask] = self.rng.random(int(mask.sum())) < 0.5

    def act(self) -> np.ndarray:
        return np.where(self.random, self.rng.integers(0, NUM_ACTIONS, self.n), super().act())


# runner's moves and how often it picks each when a hold ends: right-leaning, with runs back to the left.
_RUN_MOVES = np.array([RIGHT, RIGHT_UP, LEFT, LEFT_UP, UP, NOOP, DOWN])
_RUN_P = np.array([0.28, 0.22, 0.18, 0.12, 0.08, 0.07, 0.05])


class RunnerPolicy(Policy):
    """Holds each move for 1 to 40 frames, as a person running through a level holds a key: runs right, and back
    left after them, at full speed. Sticky play seldom holds left long (1% of `mixed` frames are the fifth of a
    held left), so a world model trained on it had not seen the camera turn round after a run."""

    def __init__(self, n: int, rng: np.random.Generator):
        super().__init__(n, rng)
        self.left = np.zeros(n, int)  # frames the current move is still held

    def act(self) -> np.ndarray:
        done = self.left <= 0
        k = int(done.sum())
        self.last[done] = self.rng.choice(_RUN_MOVES, k, p=_RUN_P)
        self.left[done] = self.rng.integers(1, 41, k)
        self.left -= 1
        return self.last


class BlendPolicy(RunnerPolicy):
    """Each episode of each environment is played by `explorer`, `random` or `runner`, a third each: the
    explorer's standing starts and short holds beside the runner's long runs, turns and holds against walls, in
    every batch (a model trained on runner data alone learned that a held key often goes nowhere)."""

    def __init__(self, n: int, rng: np.random.Generator):
        super().__init__(n, rng)
        self.explorer = ExplorerPolicy(n, rng)
        self.kind = rng.integers(0, 3, n)  # 0 explorer, 1 random, 2 runner

    def reset(self, mask: np.ndarray) -> None:
        self.kind[mask] = self.rng.integers(0, 3, int(mask.sum()))

    def act(self) -> np.ndarray:
        explore, run = self.explorer.act(), super().act()
        return np.select([self.kind == 0, self.kind == 2], [explore, run], self.rng.integers(0, NUM_ACTIONS, self.n))


POLICIES = {
    "random": RandomPolicy,
    "sticky": StickyPolicy,
    "explorer": ExplorerPolicy,
    "mixed": MixedPolicy,
    "runner": RunnerPolicy,
    "blend": BlendPolicy,
}


def make_policy(name: str, n: int, seed: int) -> Policy:
    return POLICIES[name](n, np.random.default_rng(seed))
