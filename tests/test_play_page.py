"""The play page in a headless browser: a refused player reads the server's reason, a real-action model offers
no number keys, and the header's figures are what arrives."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import aiohttp
import pytest
from playkit import next_message, serving
from test_play import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"no {CHROMIUM}: `apt-get install chromium` for the browser tests"
)


def open_page(p, url: str):
    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.goto(url + "/")
    return browser, page


def test_a_player_the_server_refuses_reads_why(tiny_run):
    sync_api = pytest.importorskip("playwright.sync_api")
    with serving(tiny_run, level=0, max_sessions=1) as server:
        seated, leave = threading.Event(), threading.Event()

        async def sit():  # the one seat, taken by another client for as long as the page needs
            async with aiohttp.ClientSession() as http, http.ws_connect(server.url + "/ws") as ws:
                await next_message(ws, "frame")
                seated.set()
                while not leave.is_set():
                    await asyncio.sleep(0.05)

        other = threading.Thread(target=asyncio.run, args=(sit(),))
        other.start()
        try:
            assert seated.wait(60)
            with sync_api.sync_playwright() as p:
                browser, page = open_page(p, server.url)
                try:
                    page.wait_for_function("document.getElementById('status').textContent.includes('full')")
                    page.wait_for_timeout(500)  # the close that follows must not overwrite it
                    status = page.inner_text("#status")
                    assert "the server is full (1 players): try later" in status and "disconnected" not in status
                finally:
                    browser.close()
        finally:
            leave.set()
            other.join(30)


def test_a_real_action_model_offers_no_number_keys_and_the_header_counts_arrivals(both_run):
    sync_api = pytest.importorskip("playwright.sync_api")
    with serving(both_run, level=0, fps=10) as server, sync_api.sync_playwright() as p:
        assert server.hub.wm.play_kind == "real"
        browser, page = open_page(p, server.url)
        try:
            page.wait_for_function("+document.getElementById('step').textContent >= 25", timeout=30_000)
            assert not page.is_visible("#numrow") and page.locator("#latents li").count() == 0
            fps = float(page.inner_text("#fps"))
            assert 5 <= fps <= 11, fps  # frames that arrived over the last second, at a target of 10
            assert float(page.inner_text("#ms")) >= 0 and float(page.inner_text("#queue")) >= 0
            page.keyboard.down("Digit2")  # no number key on this model: it sends nothing, the action stays keys'
            page.wait_for_timeout(400)
            assert "latent" not in page.inner_text("#action")
            page.keyboard.up("Digit2")
            page.keyboard.press("KeyP")  # paused: no frame arrives, and the figure falls to 0
            page.wait_for_selector(".flag.paused")
            page.wait_for_function("document.getElementById('fps').textContent === '0'", timeout=5_000)
        finally:
            browser.close()
