"""What a player gets from the bundled model: held keys move the dream as they move the real level.

The scroll bounds are the issue's bar, 70% of the level's shift (docs/bundled.md, *Trained on a GPU*: on 16 levels
that the real player plays through, the bundled model measured standing right 97%, right+up 107%, running right 87%,
left after running 75%; the model before it 53, 57, 42 and 15%, so each fails on it)."""

import numpy as np
import pytest

from procgenie import WorldModel
from procgenie.metrics import camera_shift
from procgenie.steering import RUN, long_play, played_through, real_run, scroll
from procgenie.vocab import RIGHT, start_frames


@pytest.fixture(scope="module")
def bundled():
    return WorldModel.from_pretrained(device="cpu", precision="fp32")


def test_the_bundled_model_plays_on_real_actions(bundled):
    assert bundled.play_kind == "real" and bundled.action_kind == "latent"  # play: keys; generate: Genie's path


RATIO = {"standing_right": 0.7, "right_up": 0.7, "running_right": 0.7, "left_after_running": 0.7, "long_play": 0.3}


@pytest.fixture(scope="module")
def scrolled(bundled):
    """play.scroll on 16 test levels, as eval reports it (without the long play)."""
    return scroll(bundled, [20 * i for i in range(16)], context=4, long_frames=0)


@pytest.mark.slow
def test_holding_right_from_a_standing_start_scrolls_the_dream_as_far_as_the_level(scrolled):
    """From four no-op frames at a level's start, ten frames of held right: the level scrolls left by about 15 px,
    and so does the dream (docs/bundled.md, *Sideways*)."""
    r = scrolled["standing_right"]
    assert r["real_shift_px"] < -10 and r["levels_moved"] == 16
    assert r["ratio"] >= RATIO["standing_right"] and r["levels_same_direction"] >= 14


@pytest.mark.slow
def test_a_held_jump_scrolls_the_dream_down_as_it_scrolls_the_level(scrolled):
    r = scrolled["standing_jump"]
    assert r["real_shift_px"] > 10 and r["levels_moved"] == 16  # the player rises: the level moves down
    assert r["ratio"] > 0.8 and r["same_direction"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("move", ["right_up", "running_right", "left_after_running"])
def test_the_dream_scrolls_with_the_level_while_the_player_runs(scrolled, move):
    """Right+up for 2 s, then right held, then left: each part's horizontal shift, dream against the level's, on 16
    levels where the real episode goes on throughout (a level that ends restarts at its left wall, where a held left
    moves nothing: the dream, which knows nothing of the restart, looked 2.5 times too fast)."""
    r = scrolled[move]
    assert r["levels_compared"] == 16 and r["levels_moved"] >= 12
    assert r["ratio"] is not None and r["ratio"] >= RATIO[move]
    assert r["levels_same_direction"] >= r["levels_moved"] - 2


def test_the_run_is_measured_on_levels_the_real_player_plays_through():
    keys = np.concatenate([np.full(n, key) for _, key, n, _ in RUN])
    levels = played_through("coinrun", 4, keys, 3)
    assert len(levels) == 3 and all(level % 20 == 0 for level in levels)  # test-split levels
    assert all(not real_run("coinrun", level, 4, keys)[2].any() for level in levels)
    skipped = [level for level in range(0, levels[-1], 20) if level not in levels]
    assert skipped and all(real_run("coinrun", level, 4, keys)[2].any() for level in skipped)


@pytest.mark.slow
def test_long_play_keeps_the_level_textures(bundled):
    """500 frames of explorer play on 2 test levels: over the last 100 the dream keeps a share of the real frames'
    image gradients: a floor against a dream that melts into flat colour. On these two levels the bundled model keeps
    43% (the model before it 50%); on eval's 16 levels 70% (the one before 34%; the issue's bar 80%)."""
    r = long_play(bundled, [0, 20], context=4, frames=500)
    assert r["ratio"] >= RATIO["long_play"]


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
