"""`procgenie dream`: the --actions syntax, and real GIF and MP4 files of the asked length."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
from conftest import run_cli, sh

from procgenie.cli import main
from procgenie.dream import DEFAULT_ACTIONS, SCALE, parse_actions, timeline
from procgenie.errors import UserError
from procgenie.vocab import MOVES as REAL_ACTIONS

LATENT_OF = {7: 3, 8: 5, 1: 2, 5: 6}.get  # a made-up action map: right -> 3, right-up -> 5, left -> 2, up -> 6


def parse(text, steps, num_latent=8):
    return parse_actions(text, steps, num_latent, lambda a: LATENT_OF(a, 0))


@pytest.mark.parametrize(
    "text, steps, want",
    [
        ("right*3,right-up*2", 7, [3, 3, 3, 5, 5, 5, 5]),  # the last action repeats to fill --steps
        ("3,3,1", 5, [3, 3, 1, 1, 1]),  # latent ids, used as they are
        ("right*10", 4, [3, 3, 3, 3]),  # a longer list is cut
        (" Left , jump*2, 7 ", 4, [2, 6, 6, 7]),  # spaces and case do not matter; names and ids mix
        ("noop", 2, [0, 0]),
    ],
)
def test_actions_parse(text, steps, want):
    assert parse(text, steps) == want


def test_default_actions_lean_right_and_cycle():
    got = parse(None, 60)
    first = parse(DEFAULT_ACTIONS, 1)
    assert len(got) == 60 and got[0] == first[0] == 3 and got.count(3) > len(got) / 2
    n = sum(int(item.partition("*")[2] or 1) for item in DEFAULT_ACTIONS.split(","))  # one cycle
    assert got[n : 2 * n] == got[:n] == parse(DEFAULT_ACTIONS, n)


@pytest.mark.parametrize(
    "text, says",
    [
        ("rigt*3", "unknown action 'rigt'"),
        ("8", "latent action 8 does not exist"),
        ("right*0", "repeat count"),
        ("right*", "cannot read"),
        ("", "cannot read"),
        ("right**2", "cannot read"),
        ("-1", "cannot read"),
        ("right,,left", "cannot read"),
        ("right*99999999", "repeat count"),
    ],
)
def test_bad_actions_are_one_clear_line(text, says):
    with pytest.raises(UserError, match=says) as e:
        parse(text, 5)
    assert "\n" not in str(e.value)


def test_every_coinrun_name_parses():
    assert len(parse(",".join(REAL_ACTIONS), len(REAL_ACTIONS))) == len(REAL_ACTIONS)


def test_the_timeline_keeps_frames_distinct():
    bar = timeline(T=10, C=3, width=64)  # (T, height, width, 3)
    assert bar.shape == (10, 2 * SCALE, 64, 3)
    assert all((bar[t] != bar[t + 1]).any() for t in range(9))  # GIF writers merge identical frames


def _frames(path, **kw) -> np.ndarray:
    return iio.imread(path, index=None, **kw)


def _context(run) -> int:
    from procgenie.dream import context_length
    from procgenie.world import WorldModel

    return context_length(WorldModel.from_pretrained(run, device="cpu"))


def test_dream_writes_a_gif_of_context_plus_steps(tiny_run, tmp_path):
    C = _context(tiny_run)
    out = tmp_path / "named.gif"
    proc = run_cli(*sh(f"dream --checkpoint {tiny_run} --out {out} --steps 6 --actions right*3,right-up"))
    assert "dreamed 6 frames" in proc.stdout and "test split" in proc.stdout
    frames = _frames(out)
    assert frames.shape == (C + 6, 64 * SCALE + 2 * SCALE, 64 * SCALE, 3)
    # The first frame is the real level, scaled up with nearest-neighbour: 4x4 blocks of one colour.
    top = frames[0, : 64 * SCALE]
    assert (top == top[::SCALE, ::SCALE].repeat(SCALE, 0).repeat(SCALE, 1)).mean() > 0.99
    assert [p.name for p in tmp_path.iterdir()] == ["named.gif"]  # written atomically: no temp file left


def test_dream_writes_an_mp4_from_latent_ids(tiny_run, tmp_path):
    pytest.importorskip("av")
    out = tmp_path / "ids.mp4"
    run_cli(
        *sh(f"dream --checkpoint {tiny_run} --out {out} --steps 5 --actions 3,3,1 --level 40 --fps 10"),
    )
    frames = _frames(out, plugin="pyav")
    assert frames.shape[0] == _context(tiny_run) + 5 and frames.shape[1:] == (64 * SCALE + 2 * SCALE, 64 * SCALE, 3)


@pytest.mark.parametrize(
    "name, args, says",
    [
        ("x.gif", ["--actions", "right*2,fly"], "unknown action 'fly'"),
        ("x.png", [], "must end in .gif or .mp4"),
        ("x.gif", ["--steps", "0"], "--steps must lie in"),
    ],
)
def test_dream_errors_are_one_line(capsys, tiny_run, tmp_path, name, args, says):
    """Run in this process, as tests/test_bad_input.py runs the command line: an exception that escaped its handling
    fails the test, as a traceback would show it to a user."""
    out = tmp_path / name
    code = main(["dream", "--checkpoint", str(tiny_run), "--out", str(out), *args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and says in lines[0], err
    assert lines[0].startswith("procgenie dream: error: ") and not out.exists()
