"""`procgenie play`: the key mapping, the websocket protocol and its guards, the busy port, and a real
headless browser that plays, pauses, steps, records and changes level on the page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest
from conftest import run_cli, sh
from playkit import next_message as _next
from playkit import serving, sessions, wait_for

from procgenie.play import server as play
from procgenie.vocab import real_for_latent

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def server(tiny_run):
    """The play server with the tiny run, on a free port, its event loop in a thread of this process."""
    with serving(tiny_run, level=0, max_sessions=4) as s:
        yield s


@pytest.mark.parametrize(
    "keys, action",
    [
        ({}, 4),
        ({"left": True}, 1),
        ({"right": True}, 7),
        ({"up": True}, 5),
        ({"down": True}, 3),
        ({"right": True, "up": True}, 8),
        ({"left": True, "up": True}, 2),
        ({"right": True, "down": True}, 6),
        ({"left": True, "down": True}, 0),
        ({"left": True, "right": True}, 4),
        ({"up": True, "down": True}, 5),
    ],
)
def test_held_keys_map_to_coinrun_actions(keys, action):
    assert play.real_action(**{"left": False, "right": False, "up": False, "down": False, **keys}) == action


def test_latent_actions_map_to_their_most_common_real_action():
    counts = np.zeros((15, 4), np.int64)  # (real, latent)
    counts[7, 0], counts[1, 0] = 9, 3  # latent 0: mostly right
    counts[12, 1], counts[5, 1] = 5, 4  # latent 1: Procgen's 9..14 do nothing, so they count as noop
    counts[2, 3] = 1  # latent 2 never seen: noop
    assert real_for_latent(counts).tolist() == [7, 4, 4, 2]


def test_malformed_messages_get_an_error_and_change_nothing(server):
    async def go():
        async with aiohttp.ClientSession() as http, http.ws_connect(server.url + "/ws") as ws:
            hello = await _next(ws, "hello")
            assert hello["num_latent_actions"] == server.hub.wm.num_latent_actions
            meta, pixels = await _next(ws, "frame")
            assert len(pixels) == 2 * 64 * 64 * 3 and meta["level"] == 0
            await ws.send_str(json.dumps({"type": "pause", "paused": True}))
            assert (await _next(ws, "state"))["paused"]
            await asyncio.sleep(0.3)  # a frame already being made when the pause came still arrives
            (player,) = server.hub.players
            before = (player.step_no, dict(player.keys), player.latent, player.paused, player.level)
            bad = [
                "{not json",
                "[1, 2]",
                '"input"',
                "{}",
                json.dumps({"type": 3}),
                json.dumps({"type": "fly"}),
                json.dumps({"type": "input", "left": 1}),
                json.dumps({"type": "input", "latent": True}),
                json.dumps({"type": "input", "latent": 99}),
                json.dumps({"type": "input", "right": True, "x": 1}),
                json.dumps({"type": "reset", "level": "seven"}),
                json.dumps({"type": "reset", "level": -1}),
                json.dumps({"type": "pause", "paused": "no"}),
                json.dumps({"type": "input", "right": True, "pad": "y" * 900}),
            ]
            for text in bad:
                await ws.send_str(text)
                reply = await _next(ws, "error", timeout=5)  # (a frame sent before the pause may come first)
                assert isinstance(reply, dict) and reply["message"], text[:40]
            await ws.send_bytes(b"\x00" * 64)
            assert "JSON text" in (await _next(ws, "error", timeout=5))["message"]
            assert (player.step_no, dict(player.keys), player.latent, player.paused, player.level) == before
            # ... and the connection still works: a valid step gives the next frame.
            await ws.send_str(json.dumps({"type": "input", "right": True}))
            await ws.send_str(json.dumps({"type": "step"}))
            meta, _ = await _next(ws, "frame")
            while meta["step"] <= before[0]:  # a frame made before the pause, delivered late on a loaded machine
                meta, _ = await _next(ws, "frame")
            assert meta["step"] == before[0] + 1 and meta["real"] == 7 and meta["action"] == "right"
            assert meta["latent"] == server.hub.wm.latent_for_real_action(7) and meta["source"] == "keys"
            # A latent action picked directly wins over the arrows; the real side takes its usual real action.
            await ws.send_str(json.dumps({"type": "input", "right": True, "latent": 1}))
            await ws.send_str(json.dumps({"type": "step"}))
            meta, _ = await _next(ws, "frame")
            assert (meta["latent"], meta["source"], meta["real"]) == (1, "latent", server.hub.latent_to_real[1])

    asyncio.run(go())
    wait_for(lambda: sessions(server) == 0, what="the closed connection's session to be freed")


@pytest.mark.parametrize("size", [play.MAX_MESSAGE + 1, 2_000_000, 10_000_000])
def test_an_oversized_message_gets_why_then_closes_only_that_connection(server, size):
    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.url + "/ws") as other, http.ws_connect(server.url + "/ws") as ws:
                await _next(ws, "frame")
                with contextlib.suppress(ConnectionError):  # the server may close while the rest is in flight
                    await ws.send_str("z" * size)
                error = await _next(ws, "error")
                assert error["closing"] and f"at most {play.MAX_MESSAGE} bytes" in error["message"]
                assert (await _next(ws, "never")).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                # 1009; or, while a 10 MB message is still arriving, the reset of a socket closed with unread data
                assert ws.close_code in (aiohttp.WSCloseCode.MESSAGE_TOO_BIG,) + ((1006,) if size > 5e6 else ())
                step = (await _next(other, "frame"))[0]["step"]  # the other player plays on
                assert (await _next(other, "frame"))[0]["step"] > step

    asyncio.run(go())
    wait_for(lambda: sessions(server) == 0, what="both sessions to be freed")


def test_connections_are_bounded_and_freed(server):
    async def go():
        async with aiohttp.ClientSession() as http:
            four = [await http.ws_connect(server.url + "/ws") for _ in range(4)]
            for ws in four:  # four players at once: each gets frames, twice
                await _next(ws, "frame")
                await _next(ws, "frame")
            assert sessions(server) == 4
            fifth = await http.ws_connect(server.url + "/ws")
            refused = await _next(fifth)
            assert "full" in refused["message"] and refused["closing"]
            await four[0].send_str(json.dumps({"type": "input", "right": True}))
            assert (await _next(four[0], "frame"))[0]  # the others play on
            await four[0].close()
            wait_for(lambda: sessions(server) == 3, what="a freed session")
            for ws in (*four[1:], fifth):
                await ws.close()

    asyncio.run(go())
    wait_for(lambda: sessions(server) == 0, what="every session to be freed")


def test_a_busy_port_is_one_clear_line(tiny_run):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli(*sh(f"play --checkpoint {tiny_run} --port {port}"), check=False, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "--port N" in lines[0], proc.stderr


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"no {CHROMIUM}: `apt-get install chromium` for the browser test"
)
def test_a_browser_plays_pauses_steps_records_and_resets(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    step = "+document.getElementById('step').textContent"
    pixels = "id => document.getElementById(id).getContext('2d').getImageData(0, 0, 64, 64).data.join(',')"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(server.url + "/")
            page.wait_for_function(f"{step} >= 3", timeout=30_000)
            assert "jump" in page.inner_text("#controls") and page.locator("#latents li").count() >= 2
            dream0, real0, s0 = page.evaluate(pixels, "dream"), page.evaluate(pixels, "real"), page.evaluate(step)
            page.keyboard.down("ArrowRight")
            page.wait_for_function("document.getElementById('action').textContent.startsWith('right')")
            page.wait_for_function(f"{step} >= {s0 + 10}", timeout=30_000)
            page.keyboard.up("ArrowRight")
            assert page.evaluate(pixels, "dream") != dream0 and page.evaluate(pixels, "real") != real0
            assert "fps" in page.inner_text("header")
            page.keyboard.down("Digit2")  # latent action 1, directly
            page.wait_for_function("document.getElementById('action').textContent.startsWith('latent 1')")
            page.keyboard.up("Digit2")

            page.keyboard.press("KeyP")  # pause: the step count stops
            page.wait_for_selector(".flag.paused")
            time.sleep(0.3)
            s1 = page.evaluate(step)
            time.sleep(0.6)
            assert page.evaluate(step) == s1
            page.keyboard.press("KeyE")  # one step while paused
            page.wait_for_function(f"{step} === {s1 + 1}")
            time.sleep(0.4)
            assert page.evaluate(step) == s1 + 1

            page.keyboard.press("KeyG")  # record a few frames, then stop: the page offers the GIF
            page.keyboard.press("KeyP")
            page.wait_for_function(f"{step} >= {s1 + 5}", timeout=30_000)
            page.keyboard.press("KeyG")
            page.wait_for_selector("#gif", timeout=60_000)
            head = page.evaluate(
                "fetch(document.getElementById('gif').href).then(r => r.arrayBuffer())"
                ".then(b => String.fromCharCode(...new Uint8Array(b).slice(0, 6)))"
            )
            assert head == "GIF89a" and page.get_attribute("#gif", "download").endswith(".gif")

            level = page.inner_text("#level")
            page.keyboard.press("KeyR")  # a new level: a fresh test-split seed, the count starts again
            page.wait_for_function(f"document.getElementById('level').textContent !== '{level}'")
            assert int(page.inner_text("#level")) % 20 == 0
        finally:
            browser.close()
    wait_for(lambda: sessions(server) == 0, what="the page's session to be freed")


def test_the_server_shows_exactly_what_wm_play_returns(both_run):
    """Play's Player, stepped as the server steps it, sends the real-action model the keys themselves, and its
    dream is wm.play's for those keys after context frames under no-op."""
    from procgenie.world import WorldModel

    wm = WorldModel.from_pretrained(both_run, device="cpu")
    hub = play.Hub(wm, level=0)
    env, ctx, session = hub.open(0, 0)
    keys = [7, 7, 5, 1, 4, 8]
    dreams = np.stack([hub.step([(session, env, None, k)])[0][0] for k in keys])
    env.close()
    noops = np.full((1, len(ctx) - 1), 4)
    assert np.array_equal(dreams[None], wm.play(ctx[None], np.array([keys]), seed=0, context_keys=noops))
    assert hub.hello()["action_kind"] == "real"


@pytest.mark.parametrize(
    "decode, own, asked, want",
    [("mean", 2, None, 1), ("sample", 8, None, 2), ("sample", 1, None, 1), ("mean", 2, 3, 3)],
)
def test_play_decodes_expected_level_codes_in_one_round(decode, own, asked, want):
    from procgenie.world import WorldModel

    wm = SimpleNamespace(play_cfg=SimpleNamespace(model=SimpleNamespace(decode=decode, maskgit_steps=own)))
    assert WorldModel.play_steps(wm, asked) == want
