"""Who may use the play server, and how much.

- Hosts: every route answers only the Host names it was started for (the loopback names, the address it is
  bound to, and each `--allow-host NAME`), with or without the port. A page on another site that points its
  own name at this machine (DNS rebinding) reaches it under that foreign name, and gets a 403.
- Origins: a browser names the page that makes a request; a page of another origin gets a 403.
- Each connection: at most MAX_RATE messages a second (bursts of BURST), each at most MAX_MESSAGE bytes. Past
  either, the connection gets one JSON error that says why and is closed (1008 for rate, 1009 for size); the
  other players are not touched. Every refused client is one line in the server's log.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import time
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, web

from procgenie.play.protocol import MAX_MESSAGE

MAX_RATE = 50  # messages a second from one connection, on average (a player sends one per key change)
BURST = 100  # messages at once beyond the average
LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
HOSTS = web.AppKey("hosts", frozenset)
log = logging.getLogger("procgenie.play")


def allowed_hosts(host: str, port: int, extra: list[str] | tuple = ()) -> frozenset[str]:
    """The Host header values to answer: the loopback names, the bound address itself unless it is a wildcard
    (0.0.0.0, ::), and the names given; each bare (a proxy's, or port 80's) and with `port`."""
    names = [*LOOPBACK, *(n.strip().lower() for n in extra)]
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(host)
        if not address.is_unspecified:
            names.append(f"[{host}]" if address.version == 6 else host)
    with_port = [n for n in names if not n.rsplit("]", 1)[-1].count(":")]  # a name that gives no port of its own
    return frozenset([*names, *(f"{n}:{port}" for n in with_port)])


def peer(request: web.Request) -> str:
    return f"{request.remote or '?'} (Host {request.host!r})"


@web.middleware
async def check_host(request: web.Request, handler):
    """Refuse a request under a Host this server was not started for, or from another origin's page: 403."""
    host = request.host.lower()
    if host not in request.app[HOSTS]:
        log.warning(f"refused {peer(request)}: not a Host this server answers")
        name = urlsplit(f"//{host}").hostname or host
        raise web.HTTPForbidden(
            text=f"403: this server does not answer to the Host {host!r} (a guard against DNS rebinding); "
            f"to play under that name, start it with `procgenie play --allow-host {name}`\n"
        )
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc.lower() != host:
        log.warning(f"refused {peer(request)}: a page of another origin ({origin[:80]!r})")
        raise web.HTTPForbidden(text=f"403: requests from pages of another origin ({origin[:80]}) are refused\n")
    return await handler(request)


class Bucket:
    """A token bucket: `take` says whether one more message fits MAX_RATE a second with bursts of BURST."""

    def __init__(self, rate: float = MAX_RATE, burst: float = BURST):
        self.rate, self.burst, self.tokens, self.t = rate, burst, burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Socket(web.WebSocketResponse):
    """A websocket that says why before aiohttp closes it for a message over max_msg_size (1009)."""

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not self.closed:
            why = f"message too long: at most {MAX_MESSAGE} bytes; closing the connection"
            with contextlib.suppress(Exception):  # the client may be gone already
                await self.send_str(json.dumps({"type": "error", "message": why, "closing": True}))
        return await super().close(code=code, message=message, drain=drain)
