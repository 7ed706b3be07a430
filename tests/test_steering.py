"""What a player gets from the bundled model: held keys move the dream as they move the real level."""

import numpy as np
import pytest

from procgenie import WorldModel
from procgenie.metrics import camera_shift
from procgenie.steering import held_keys
from procgenie.vocab import RIGHT, start_frames


@pytest.fixture(scope="module")
def bundled():
    return WorldModel.from_pretrained(device="cpu", precision="fp32")


def test_the_bundled_model_plays_on_real_actions(bundled):
    assert bundled.play_kind == "real" and bundled.action_kind == "latent"  # play: keys; generate: Genie's path


@pytest.mark.slow
def test_a_held_jump_scrolls_the_dream_down_as_it_scrolls_the_level(bundled):
    r = held_keys(bundled, [0, 20, 40, 60], context=4, frames=10)["jump"]
    assert r["real_shift_px"] > 10 and r["levels_moved"] == 4  # the player rises: the level moves down
    assert r["dream_shift_px"] > 10 and r["same_direction"] == 1.0


@pytest.mark.slow
def test_holding_right_from_a_standing_start_scrolls_the_dream_left_as_the_level(bundled):
    """From four no-op frames at a level's start, ten frames of held right: the level scrolls left by about 15 px,
    and so does the dream on most levels (a third of the way or more: docs/bundled.md, *Keys that steer*)."""
    r = held_keys(bundled, [0, 20, 40, 60, 80, 100, 120, 140], context=4, frames=10)["right"]
    assert r["real_shift_px"] < -10 and r["levels_moved"] == 8
    assert r["dream_shift_px"] < -3 and r["same_direction"] >= 0.75


@pytest.mark.slow
def test_holding_right_while_running_keeps_the_dream_scrolling_left(bundled):
    """From context frames of a player already running right, holding right scrolls the dream the way the
    level scrolls (to the left)."""
    frames = []
    for level in (0, 20, 40, 60, 80, 100, 120, 140):
        env, first = start_frames(level, 1, bundled.env)
        seen = [first[0]]
        for _ in range(13):
            env.act(np.array([RIGHT]))
            seen.append(env.observe()[1]["rgb"][0])
        env.close()
        frames.append(np.stack(seen))
    frames = np.stack(frames)  # (8, 14, 64, 64, 3)
    ctx, future = frames[:, 2:6], frames[:, 6:]  # running from frame 2 on
    dream = bundled.play(ctx, np.full((8, 8), RIGHT), context_keys=np.full((8, 3), RIGHT))

    def dx(frames_):
        seq = np.concatenate([ctx[:, -1:], frames_], 1)
        return camera_shift(seq[:, :-1], seq[:, 1:])[..., 0].sum(1)  # (8,)

    assert dx(future).mean() < -5  # the real level scrolls left
    assert dx(dream).mean() < -1 and (dx(dream) <= 0).all()  # the dream too, never the other way
