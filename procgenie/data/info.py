"""What `procgenie data info` reports about a dataset: sizes per split, episodes, actions taken."""

from __future__ import annotations

import numpy as np

from procgenie.data.store import SPLITS, Dataset
from procgenie.vocab import ACTION_NAMES


def summary(ds: Dataset) -> dict:
    """The dataset's figures as JSON-ready values (`data info --json` prints them as they are)."""
    eps = ds.episodes()
    actions = np.concatenate([sh.steps["actions"] for sh in ds.shards])
    hist = np.bincount(actions, minlength=len(ACTION_NAMES)) if ds.has_actions else None
    by_split = {}
    for s in SPLITS:
        e = ds.episodes(s)
        by_split[s] = {
            "episodes": int(len(e)),
            "frames": int(e["length"].sum()),
            "levels": int(len(np.unique(e["level_seed"]))),
        }
    return {
        "env": ds.env,
        "image_size": ds.image_size,
        "episodes": int(len(eps)),
        "frames": int(eps["length"].sum()),
        "splits": by_split,
        "mean_episode_length": float(eps["length"].mean()),
        "reached_coin": float((eps["ret"] > 0).mean()),
        "truncated": int(eps["truncated"].sum()),
        "action_histogram": None
        if hist is None
        else {ACTION_NAMES[i] if i < len(ACTION_NAMES) else str(i): int(c) for i, c in enumerate(hist)},
        "collect": ds.manifest.get("collect", {}),
        "import": ds.manifest.get("import"),
    }
