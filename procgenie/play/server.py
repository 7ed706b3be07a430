"""`procgenie play`: the web server. One world model serves every connection; each connection gets its
own rollout (`session.Session`) and its own real Procgen level, fed the same actions, shown side by side.

Protocol, over the websocket at /ws (the page is /, the live session count is /stats):
  client -> server, JSON text of at most MAX_MESSAGE bytes, fields optional, unknown fields refused:
    {"type": "input", "left": bool, "right": bool, "up": bool, "down": bool, "latent": int | null}
        the keys held now; a latent id (number keys, latent models only) overrides the arrows while held
    {"type": "pause", "paused": bool}   (no "paused": toggle)
    {"type": "step"}                     one frame, while paused
    {"type": "reset", "level": int | null}   a new real level (null: a fresh test-split level)
    {"type": "record"}                   start recording; again: stop and receive the GIF
  server -> client:
    JSON text: {"type": "hello", ...} once (with "number_keys": what keys 1..9 do, none on a real-action model),
               {"type": "state", ...} on pause/record changes,
               {"type": "error", "message": str} for a refused message (nothing else changes), or with
               "closing": true just before the server closes the connection (full, too many or too long
               messages, a model failure)
    binary: kind (uint8), meta length L (uint32, big-endian), L bytes of JSON meta, then the payload:
            kind 1 = a frame: dream RGB (S, S, 3) then real RGB (S, S, 3); its meta holds model_ms (the model
            call that made it, shared by `batch` players), queue_ms (how long it waited for that call after
            it was due) and fps (frames sent to this player over the last second); kind 2 = a GIF file.
The hub (hub.py) steps every player due at the target rate (`fps`) in one batch; inputs are state, not a
queue, so a slow model lowers the frame rate and never builds a backlog. Who may connect: gate.py.

Letters: S frame size (64), A latent actions.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from pathlib import Path

from aiohttp import WSCloseCode, WSMsgType, web

from procgenie.errors import UserError
from procgenie.play.game import KIND_FRAME, KIND_GIF, Player  # noqa: F401
from procgenie.play.gate import BURST, HOSTS, MAX_RATE, Bucket, Socket, allowed_hosts, check_host, peer
from procgenie.play.hub import FPS, MAX_SESSIONS, Hub, load_hub
from procgenie.play.protocol import MAX_MESSAGE, BadMessage
from procgenie.vocab import key_action as real_action  # noqa: F401  (the tests' and the page's name for it)

log = logging.getLogger("procgenie.play")
STATIC = Path(__file__).parent / "static"
HUB = web.AppKey("hub", Hub)


# -- HTTP -------------------------------------------------------------------------------------------
async def websocket(request: web.Request) -> web.StreamResponse:
    hub: Hub = request.app[HUB]
    ws = Socket(max_msg_size=MAX_MESSAGE + 1, compress=False, heartbeat=20)  # longer: a JSON error, then 1009
    await ws.prepare(request)
    player = Player(hub, ws)
    if len(hub.players) >= hub.max_sessions:
        log.warning(f"refused {peer(request)}: the server is full ({hub.max_sessions} players)")
        await player.close_with(
            f"the server is full ({hub.max_sessions} players): try later", WSCloseCode.TRY_AGAIN_LATER
        )
        return ws
    hub.join(player)
    bucket = Bucket()
    try:
        await player.send_json(hub.hello())
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:  # over MAX_MESSAGE: Socket said why and closed (1009)
                log.warning(f"closed {peer(request)}: a message over {MAX_MESSAGE} bytes (1009)")
                break
            if not bucket.take():
                log.warning(f"closed {peer(request)}: over {MAX_RATE} messages a second (1008)")
                why = f"too many messages: at most {MAX_RATE} a second (bursts of {BURST}); closing the connection"
                await player.close_with(why, WSCloseCode.POLICY_VIOLATION)
                break
            try:
                if msg.type != WSMsgType.TEXT:
                    raise BadMessage("send JSON text messages only")
                await player.handle(msg.data)
            except BadMessage as e:
                await player.send_json({"type": "error", "message": str(e)})
    except ConnectionError:
        pass  # the browser went away
    finally:
        hub.leave(player)
    return ws


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def stats(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    return web.json_response({"sessions": len(hub.players), "max_sessions": hub.max_sessions, "fps": hub.fps})


def make_app(hub: Hub, hosts: frozenset[str]) -> web.Application:
    """The play server's routes; every one answers only the Host names in `hosts` (gate.allowed_hosts)."""
    app = web.Application(client_max_size=MAX_MESSAGE, middlewares=[check_host])  # nothing is ever posted
    app[HUB], app[HOSTS] = hub, hosts
    app.router.add_get("/", index)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/stats", stats)
    app.router.add_static("/static", STATIC)

    async def on_shutdown(app: web.Application) -> None:
        for p in list(hub.players):
            await p.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    async def on_cleanup(app: web.Application) -> None:
        await hub.stop()

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
    allow_hosts: list[str] | None = None,
) -> None:
    """Serve the play page until Ctrl-C. data: for a world learned from recordings, the dataset to start from.
    allow_hosts: Host names to answer beside the loopback ones and the bound address (gate.allowed_hosts)."""
    if level is not None and not 0 <= level < 2**31 - 1:
        raise UserError(f"--start-level must lie in 0..{2**31 - 2}, got {level}")
    if not 0 < fps <= 1000 or max_sessions < 1:
        raise UserError(f"--fps must lie in (0, 1000] and --max-players be at least 1, got {fps:g} and {max_sessions}")
    # Now, before the hub: its thread silences Procgen's import by swapping sys.stderr for a while (vocab.py), and a
    # handler made then would write the log there.
    logging.basicConfig(level=logging.WARNING, format="procgenie play: %(message)s", stream=sys.stderr)
    sock = listen(host, port)  # first: a busy port fails at once, before the model loads
    try:
        hub = load_hub(
            checkpoint,
            precision,
            maskgit_steps=maskgit_steps,
            level=level,
            fps=fps,
            max_sessions=max_sessions,
            data=data,
        )
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"procgenie play: open http://{shown}:{bound}/  (model {hub.wm.run_dir}, {hub.wm.num_latent_actions} "
        f"latent actions, {hub.steps} MaskGIT steps, {hub.wm.precision}, {fps:g} fps target, "
        f"{max_sessions} players at most)"
    )
    print(f"controls: {hub.controls()}; Ctrl-C stops the server")
    hosts = allowed_hosts(host, bound, allow_hosts or ())
    if host not in ("127.0.0.1", "localhost", "::1"):
        names = sorted(h for h in hosts if h.endswith(f":{bound}"))
        print(
            f"note: listening on {host}: other machines that reach it can play too, under these Host names only: "
            f"{', '.join(names)} (more with --allow-host NAME)"
        )
    web.run_app(make_app(hub, hosts), sock=sock, print=None, access_log=None)
