"""Who the play server answers: only the Host names it was started for (DNS rebinding), pages of its own
origin, and connections that keep to the message rate; each refusal says why."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
from conftest import sh
from playkit import next_message, serving, sessions, wait_for

from procgenie.play import gate


@pytest.fixture(scope="module")
def server(tiny_run):
    with serving(tiny_run, level=0, max_sessions=4) as s:
        yield s


def get(url: str, host: str, origin: str | None = None) -> tuple[int, str]:
    """(status, body) of a GET sent with this Host (and Origin) header."""
    headers = {"Host": host} | ({"Origin": origin} if origin else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=20) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def ws_status(url: str, host: str, origin: str) -> int:
    """The HTTP status of a websocket handshake under this Host and Origin (101: accepted, and a frame came)."""
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(url + "/ws", headers={"Host": host, "Origin": origin}) as ws:
                assert isinstance((await next_message(ws, "frame"))[0], dict)
                return 101
        except aiohttp.WSServerHandshakeError as e:
            return e.status


@pytest.mark.parametrize("path", ["/", "/stats", "/static/play.js"])
@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example:{port}"])
def test_a_foreign_host_is_refused_on_every_route(server, path, host):
    status, body = get(server.url + path, host.format(port=server.port))
    assert status == 403 and "--allow-host " in body and "rebinding" in body


def test_a_foreign_host_gets_no_websocket(server):
    assert (
        asyncio.run(ws_status(server.url, f"evil.example:{server.port}", f"http://evil.example:{server.port}")) == 403
    )
    assert sessions(server) == 0


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1"])
def test_loopback_names_with_the_port_are_answered(server, name):
    host = f"{name}:{server.port}"
    assert get(server.url + "/", host)[0] == 200 and get(server.url + "/stats", host)[0] == 200
    assert asyncio.run(ws_status(server.url, host, f"http://{host}")) == 101
    assert get(server.url + "/", f"[::1]:{server.port}")[0] == 200
    wait_for(lambda: sessions(server) == 0, what="the session to be freed")


def test_a_page_of_another_origin_is_refused(server):
    host = f"127.0.0.1:{server.port}"
    assert asyncio.run(ws_status(server.url, host, "http://evil.example")) == 403
    assert get(server.url + "/stats", host, origin="http://evil.example")[0] == 403


def test_too_many_messages_get_why_then_close_only_that_connection(server):
    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.url + "/ws") as other, http.ws_connect(server.url + "/ws") as ws:
                await next_message(ws, "frame")
                for _ in range(gate.BURST + gate.MAX_RATE):  # at once: over the burst
                    await ws.send_str(json.dumps({"type": "input", "right": True}))
                error = await next_message(ws, "error")
                assert error["closing"] and f"at most {gate.MAX_RATE} a second" in error["message"]
                assert (await next_message(ws, "never")).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
                step = (await next_message(other, "frame"))[0]["step"]  # the other player plays on
                assert (await next_message(other, "frame"))[0]["step"] > step

    asyncio.run(go())
    wait_for(lambda: sessions(server) == 0, what="both sessions to be freed")


def test_allowed_hosts_take_the_port_and_the_bound_address():
    hosts = gate.allowed_hosts("0.0.0.0", 8000, ["Play.lan"])
    assert {"localhost:8000", "127.0.0.1:8000", "[::1]:8000", "play.lan", "play.lan:8000"} <= hosts
    assert "0.0.0.0:8000" not in hosts and "evil.example:8000" not in hosts
    assert "192.168.1.5:8000" in gate.allowed_hosts("192.168.1.5", 8000)
    assert "[fe80::1]:8000" in gate.allowed_hosts("fe80::1", 8000)


def test_a_wide_bind_answers_the_names_it_is_given(tiny_run, free_port):
    proc = subprocess.Popen(
        [sys.executable, "-m", "procgenie", *sh(f"play --checkpoint {tiny_run} --host 0.0.0.0 --port {free_port}")]
        + ["--allow-host", "play.lan"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{free_port}/"
    try:
        deadline = time.time() + 120
        while True:
            try:
                assert get(url, f"play.lan:{free_port}")[0] == 200
                break
            except OSError:  # not listening yet
                assert proc.poll() is None and time.time() < deadline, "play did not start"
                time.sleep(0.3)
        assert get(url, "play.lan")[0] == 200  # behind a proxy on the default port
        for foreign in (f"evil.example:{free_port}", f"10.9.8.7:{free_port}", f"play.lan.evil.example:{free_port}"):
            assert get(url, foreign)[0] == 403, foreign
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "play.lan:" in out and "--allow-host" in out  # the note names the Hosts it answers
    assert "refused" in out and "evil.example" in out  # each refused client is a line of the log


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
