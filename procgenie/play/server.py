"""`procgenie play`: the web server. One world model serves every connection; each connection gets its
own rollout (`session.Session`) and its own real Procgen level, fed the same actions, shown side by side.

Protocol, over the websocket at /ws (the page is /, the live session count is /stats):
  client -> server, JSON text of at most MAX_MESSAGE bytes, fields optional, unknown fields refused:
    {"type": "input", "left": bool, "right": bool, "up": bool, "down": bool, "latent": int | null}
        the keys held now; a latent id (number keys) overrides the arrows while it is held
    {"type": "pause", "paused": bool}   (no "paused": toggle)
    {"type": "step"}                     one frame, while paused
    {"type": "reset", "level": int | null}   a new real level (null: a fresh test-split level)
    {"type": "record"}                   start recording; again: stop and receive the GIF
  server -> client:
    JSON text: {"type": "hello", ...} once, {"type": "state", ...} on pause/record changes,
               {"type": "error", "message": str} for a refused message (nothing else changes)
    binary: kind (uint8), meta length L (uint32, big-endian), L bytes of JSON meta, then the payload:
            kind 1 = a frame: dream RGB (S, S, 3) then real RGB (S, S, 3); kind 2 = a GIF file.
While not paused, each connection steps at a fixed target rate (`fps`); inputs are state, not a queue,
so a slow model lowers the frame rate and never builds a backlog. Model work runs on one thread.

Letters: S frame size (64), A latent actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web

from procgenie.errors import UserError
from procgenie.play.game import FPS, KIND_FRAME, KIND_GIF, MAX_SESSIONS, MAX_WS_FRAME, Hub, Player  # noqa: F401
from procgenie.play.protocol import MAX_MESSAGE, BadMessage  # noqa: F401
from procgenie.vocab import key_action as real_action  # noqa: F401  (the tests' and the page's name for it)

log = logging.getLogger("procgenie.play")
STATIC = Path(__file__).parent / "static"
HUB = web.AppKey("hub", object)


# -- HTTP -------------------------------------------------------------------------------------------
def _same_origin(request: web.Request) -> bool:
    """Refuse websockets opened by other sites' pages (a browser sends their Origin)."""
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


async def websocket(request: web.Request) -> web.StreamResponse:
    hub: Hub = request.app[HUB]
    if not _same_origin(request):
        return web.Response(status=403, text="websocket from another origin refused")
    ws = web.WebSocketResponse(max_msg_size=MAX_WS_FRAME, compress=False, heartbeat=20)
    await ws.prepare(request)
    if len(hub.players) >= hub.max_sessions:
        await ws.send_json({"type": "error", "message": f"the server is full ({hub.max_sessions} players): try later"})
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER)
        return ws
    player = Player(hub, ws)
    hub.players.add(player)
    ticker = None
    try:
        await player.send_json(hub.hello())
        await player.reset(hub.level)
        ticker = asyncio.create_task(_guard(player.run(), player))
        async for msg in ws:
            try:
                if msg.type != WSMsgType.TEXT:
                    raise BadMessage("send JSON text messages only")
                await player.handle(msg.data)
            except BadMessage as e:
                await player.send_json({"type": "error", "message": str(e)})
    except ConnectionError:
        pass  # the browser went away
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        player.close()
        hub.players.discard(player)
    return ws


async def _guard(coro, player: Player) -> None:
    """The step loop; a failure is logged and ends that connection, never the server."""
    try:
        await coro
    except ConnectionError:
        pass  # the browser went away: the handler frees the session
    except Exception:
        log.exception("play session failed")
        with contextlib.suppress(Exception):
            await player.send_json({"type": "error", "message": "the world model failed: see the server's log"})
            await player.ws.close(code=WSCloseCode.INTERNAL_ERROR)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def stats(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    return web.json_response({"sessions": len(hub.players), "max_sessions": hub.max_sessions, "fps": hub.fps})


def make_app(hub: Hub) -> web.Application:
    app = web.Application(client_max_size=MAX_MESSAGE)  # nothing is ever posted
    app[HUB] = hub
    app.router.add_get("/", index)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/stats", stats)
    app.router.add_static("/static", STATIC)

    async def on_shutdown(app: web.Application) -> None:
        for p in list(hub.players):
            await p.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    async def on_cleanup(app: web.Application) -> None:
        hub.executor.shutdown(wait=True)

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line UserError that says what to change."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must lie in 0..65535, got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ]
    except socket.gaierror:
        raise UserError(f"--host {host} is not an address this machine knows: use 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(
                f"port {port} on {host} is already in use: stop what uses it, or choose another "
                f"port with --port N (e.g. --port {port + 1})"
            ) from None
        if e.errno == errno.EACCES:
            raise UserError(f"port {port} needs privileges: choose one above 1023 with --port N") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host} is not an address of this machine: use 127.0.0.1") from None
        raise
    sock.setblocking(False)
    return sock


def serve(
    checkpoint,
    host: str = "127.0.0.1",
    port: int = 8000,
    maskgit_steps: int | None = None,
    level: int | None = None,
    fps: float = FPS,
    max_sessions: int = MAX_SESSIONS,
    precision: str = "auto",
    data: str | None = None,
) -> None:
    """Serve the play page until Ctrl-C. data: for a world learned from recordings, the dataset to start from."""
    from procgenie.world import WorldModel

    if level is not None and not 0 <= level < 2**31 - 1:
        raise UserError(f"--start-level must lie in 0..{2**31 - 2}, got {level}")
    if not 0 < fps <= 1000 or max_sessions < 1:
        raise UserError(f"--fps must lie in (0, 1000] and --max-players be at least 1, got {fps:g} and {max_sessions}")
    sock = listen(host, port)  # first: a busy port fails at once, before the model loads
    try:
        hub = Hub(
            WorldModel.from_pretrained(checkpoint, precision=precision), maskgit_steps, level, fps, max_sessions, data
        )
    except BaseException:
        sock.close()
        raise
    logging.basicConfig(level=logging.WARNING, format="procgenie play: %(message)s")
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"procgenie play: open http://{shown}:{bound}/  (model {hub.wm.run_dir}, {hub.wm.num_latent_actions} "
        f"latent actions, {hub.steps} MaskGIT steps, {hub.wm.precision}, {fps:g} fps target, "
        f"{max_sessions} players at most)"
    )
    print(f"controls: {hub.controls()}; Ctrl-C stops the server")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {host}: other machines that reach it can play too")
    web.run_app(make_app(hub), sock=sock, print=None, access_log=None)
