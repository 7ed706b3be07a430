"""Where a rollout starts: a Procgen level played under no-ops, or, for a world learned from recordings
without actions (`data import`), the opening frames of one of its dataset's test recordings.

Either way `Starts.open` returns (source, frames): the source goes on from where the frames stop, one
frame per `act` + `observe` as Procgen's gym3 env does, so play can show it beside the dream. A
recording ignores the actions and starts over at its end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from procgenie.errors import UserError
from procgenie.vocab import start_frames


class Replay:
    """A recording played back with the interface of a one-environment ProcgenGym3Env."""

    def __init__(self, frames: np.ndarray, at: int):
        self.frames, self.i = frames, at  # (L, S, S, 3), frame shown now

    def act(self, action) -> None:
        self.i += 1

    def observe(self):
        first = self.i >= len(self.frames)
        if first:
            self.i = 0
        return np.zeros(1, np.float32), {"rgb": self.frames[self.i][None]}, np.array([first])

    def close(self) -> None:
        pass


class Starts:
    """Start frames for one world model: Procgen levels (a level is a seed), or the test recordings of the
    dataset it learned from (a level is a recording's number, taken modulo their count)."""

    def __init__(self, wm, data: str | None = None):
        self.wm, self.recordings = wm, None
        if wm.procgen:
            return
        from procgenie.data.store import Dataset
        from procgenie.models import check_data

        path = data or wm.data_path
        if path is None or not (Path(path) / "manifest.json").exists():
            raise UserError(
                f"{wm.run_dir} learned from recordings ({wm.env}) and starts from their frames, but "
                f"its dataset {path} is not there: give --data DIR, the `data import` dataset"
            )
        ds = Dataset(path, verify=False)
        check_data(wm.tok_extra, ds, "world model")
        eps = ds.episodes("test")
        eps = eps if len(eps) else ds.episodes()  # a small import may have no test recording: use them all
        self.ds, self.recordings = ds, eps

    @property
    def count(self) -> int | None:
        """How many recordings there are to start from (None: Procgen levels, 2^31 of them)."""
        return None if self.recordings is None else len(self.recordings)

    def random_level(self, rng: np.random.Generator) -> int:
        """A test-split level seed (seed % 20 == 0, the split no training episode used), or a test recording."""
        if self.recordings is not None:
            return int(rng.integers(0, len(self.recordings)))
        return 20 * int(rng.integers(0, (2**31 - 1) // 20 - 1))

    def open(self, level: int, frames: int, seed: int = 0):
        """(source, uint8 (frames, S, S, 3)): the first `frames` frames, under no-ops for a Procgen level."""
        if self.recordings is None:
            return start_frames(level, frames, self.wm.env, seed)
        if level < 0:
            raise UserError(f"a recording's number is at least 0, got {level}")
        video = self.ds.episode(self.recordings[level % len(self.recordings)])["frames"]
        if len(video) < frames:
            video = np.concatenate([video, np.repeat(video[-1:], frames - len(video), 0)])
        return Replay(video, frames - 1), video[:frames].copy()

    def warm(self) -> None:
        """Load Procgen's library now (~1.5 s for the first env in a process), not at the first player."""
        if self.recordings is None:
            start_frames(0, 1, self.wm.env)[0].close()
