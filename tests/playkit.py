"""What the play tests share: a play server in a thread of the test process, and reading its messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import threading
import time
import urllib.request
from types import SimpleNamespace

import aiohttp
from aiohttp import web

from procgenie.play import server as play


@contextlib.contextmanager
def serving(run, host: str = "127.0.0.1", allow: tuple = (), **hub_options):
    """The play server for `run` on a free port of `host`, its event loop in a thread: (url, hub, port)."""
    from procgenie.world import WorldModel

    hub = play.Hub(WorldModel.from_pretrained(run, device="cpu"), **hub_options)
    sock = play.listen(host, 0)
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(play.make_app(hub, play.allowed_hosts(host, port, allow)))
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", hub=hub, port=port)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def sessions(server) -> int:
    with urllib.request.urlopen(server.url + "/stats", timeout=10) as r:
        return json.load(r)["sessions"]


def wait_for(cond, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


async def next_message(ws, want: str | None = None, timeout: float = 20.0):
    """The next message: a dict for JSON text, (meta, payload) for binary; skip to type `want` if given."""
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.TEXT:
            obj = json.loads(msg.data)
            if want in (None, obj["type"]):
                return obj
        elif msg.type == aiohttp.WSMsgType.BINARY:
            kind, n = struct.unpack(">BI", msg.data[:5])
            if want in (None, "frame" if kind == play.KIND_FRAME else "gif"):
                return json.loads(msg.data[5 : 5 + n]), msg.data[5 + n :]
        else:
            return msg  # closed
