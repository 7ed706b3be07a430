"""Play's batching: players stepped together get the frames they would get alone, in one model call per tick;
and the number keys the page offers are what the model takes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from procgenie.play import batch
from procgenie.play import server as play
from procgenie.play.protocol import BadMessage, parse
from procgenie.session import Session
from procgenie.vocab import MOVES


def _sessions(wm, dynamics, n: int, temperature=None) -> list[Session]:
    """n rollouts from different contexts, each stepped a different number of frames (different clocks and,
    for some, caches not yet full)."""
    rng = np.random.default_rng(0)
    C = min(4, dynamics.cfg.seq_len - 1)
    out = []
    for i in range(n):
        ctx = rng.integers(0, 256, (1, C, 64, 64, 3), dtype=np.uint8)
        s = Session(wm, ctx, steps=2, temperature=temperature, seed=i, dynamics=dynamics)
        for _ in range(3 * i):
            s.step(torch.tensor([i % dynamics.A]))
        out.append(s)
    return out


def _check_batched_equals_alone(wm, dynamics, temperature=None, frames: int = 8):
    """Three sessions stepped tick after tick by one `Together`, as the hub does, against each stepped alone; at
    the fifth tick from the end the last one sits out (paused), and before the second from the end one takes a step
    on its own: the group must not step a stale stacked state."""
    together = _sessions(wm, dynamics, 3, temperature)
    alone = copy.deepcopy(together)
    ticker = batch.Together()
    rng = np.random.default_rng(1)
    calls, stacks = [], []
    for tick in range(frames):
        due = [0, 1] if tick == frames - 5 else [0, 1, 2]
        if tick == frames - 2:
            for s in (together[1], alone[1]):
                s.step(torch.tensor([0]))
        actions = [torch.tensor([int(a)]) for a in rng.integers(0, dynamics.A, len(due))]
        want = [alone[i].step(a) for i, a in zip(due, actions)]
        before, merged = Session.step.calls, batch.merge.calls
        got = ticker.step([together[i] for i in due], actions)
        calls.append(Session.step.calls - before)
        stacks.append(batch.merge.calls - merged)
        for w, g in zip(want, got):
            assert w.shape == g.shape
            far = np.abs(w.astype(int) - g.astype(int)) > 2  # float rounding moves a pixel by a level or so
            assert far.mean() < 0.01, f"{far.mean():.3%} of pixels differ"
    assert calls[-1] == 1, f"model calls per tick: {calls}"  # once every window is full: one call for all
    assert stacks[-2] > 0 and stacks[-1] == 0, f"stackings per tick: {stacks}"  # kept, but not across a change
    assert [s.state.t for s in together] == [together[0].state.t] * 3


def _counted(fn):
    def wrapper(*a, **k):
        wrapper.calls += 1
        return fn(*a, **k)

    wrapper.calls = 0
    return wrapper


@pytest.fixture
def count_steps(monkeypatch):
    """Session.step and batch.merge (each stacking of a state's part) count their calls in `.calls`."""
    monkeypatch.setattr(Session, "step", _counted(Session.step))
    monkeypatch.setattr(batch, "merge", _counted(batch.merge))


def test_batched_players_get_the_frames_they_would_get_alone(both_run, count_steps):
    from procgenie.world import WorldModel

    wm = WorldModel.from_pretrained(both_run, device="cpu", actions="latent")
    _check_batched_equals_alone(wm, wm.play_dynamics, temperature=0)  # real actions, as play drives them (greedy:
    # a sampling model draws a group's codes from one generator, see batch.py)
    _check_batched_equals_alone(wm, wm.dynamics, temperature=0)  # latent actions


@pytest.mark.slow
def test_batched_players_on_the_bundled_models(count_steps):
    """In fp32: a bf16 product's rounding depends on the batch's shape (oneDNN picks other kernels for 1 and 3
    rows), and on an avx512_bf16 CPU, where play computes in bf16, 6% of pixels differed by more than 2 levels
    within 10 frames, from codes picked the other way (README, *Playing together*). fp32 checks the stacking."""
    from procgenie.world import WorldModel

    wm = WorldModel.from_pretrained(device="cpu", precision="fp32").fast_weights()
    _check_batched_equals_alone(wm, wm.play_dynamics, frames=10)  # what play serves
    _check_batched_equals_alone(wm, wm.dynamics)  # the latent model, with warp's last frame and shift


def test_number_keys_say_what_the_model_takes(tiny_run, both_run):
    from procgenie.world import WorldModel

    wm = WorldModel.from_pretrained(tiny_run, device="cpu")  # latent actions: keys 1..9 pick them
    hub = play.Hub(wm, level=0)
    want = [f"latent {k} (real side: {MOVES[wm.key_for_latent(k)]})" for k in range(min(9, wm.num_latent_actions))]
    assert hub.hello()["number_keys"] == want and "take latent action" in hub.controls()
    assert parse('{"type": "input", "latent": 1}', hub.num_keys)[1]["latent"] == 1
    hub.executor.shutdown()

    wm = WorldModel.from_pretrained(both_run, device="cpu")  # play drives real actions: no number keys
    hub = play.Hub(wm, level=0)
    assert wm.play_kind == "real" and hub.hello()["number_keys"] == [] and "latent" not in hub.controls()
    with pytest.raises(BadMessage, match="not latent actions"):
        parse('{"type": "input", "latent": 1}', hub.num_keys)
    hub.executor.shutdown()


# The server's way: load_hub, then a level opened and stepped on the model thread, in a fresh process (this one's
# main thread has computed already). Prints the process's voluntary context switches per frame.
SWITCHES = """
import resource, torch
from procgenie.play.hub import load_hub
from procgenie.vocab import MOVES
hub = load_hub(None, level=0)
def frames():
    _, _, session = hub.open(0, 0)
    right = torch.tensor([MOVES.index("right")])
    for _ in range(5):
        session.step(right)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    for _ in range(10):
        session.step(right)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before) / 10
print(hub.executor.submit(frames).result())
hub.executor.shutdown()
"""


def test_the_model_thread_computes_without_waking_threads_at_every_operation():
    """All of the server's model work, loading included, runs on one thread: when the main thread computed too, GNU
    OpenMP's two thread teams outnumbered 2 cores and slept between operations (390 context switches a frame of the
    bundled model, against 0 to 3; play twice as slow)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SWITCHES], capture_output=True, text=True, timeout=300, check=True)
    assert float(out.stdout.split()[-1]) < 40, out.stdout
