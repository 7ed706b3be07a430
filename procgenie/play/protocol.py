"""The play protocol: what a browser may send, checked strictly, and how held keys become actions.

Client messages are JSON text of at most MAX_MESSAGE bytes; fields are optional, unknown ones are
refused, types are exact (`true` is not an int). `parse` raises BadMessage, whose text goes back to
the client as an error reply, before anything changes.
"""

from __future__ import annotations

import json

MAX_MESSAGE = 1024  # bytes in one client message; longer ones get an error reply
NONE = type(None)
MESSAGES = {  # type -> {field: allowed types}; `bool` is not accepted for `int`
    "input": {"left": (bool,), "right": (bool,), "up": (bool,), "down": (bool,), "latent": (int, NONE)},
    "pause": {"paused": (bool,)},
    "step": {},
    "reset": {"level": (int, NONE)},
    "record": {},
}


class BadMessage(Exception):
    """A client message that is refused: its text goes back as an error reply."""


def parse(text: str, num_latent: int) -> tuple[str, dict]:
    """A client message -> (type, fields), or BadMessage naming what is wrong. num_latent: the latent actions a
    client may pick (0 where the model takes Procgen's keys)."""
    # surrogatepass: text with a lone surrogate (no UTF-8 encoder takes one) is measured here, not a crash
    if len(text) > MAX_MESSAGE or len(text.encode("utf-8", "surrogatepass")) > MAX_MESSAGE:
        raise BadMessage(f"message too long: at most {MAX_MESSAGE} bytes")
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: `[[[[...` a thousand deep fits in MAX_MESSAGE
        raise BadMessage("not JSON") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise BadMessage('a message is a JSON object with a "type"')
    kind = msg.pop("type")
    if kind not in MESSAGES:
        raise BadMessage(f"unknown message type {kind[:40]!r}: use one of {', '.join(MESSAGES)}")
    for field, value in msg.items():
        if field not in MESSAGES[kind]:
            raise BadMessage(f"{kind}: unknown field {field[:40]!r}")
        if type(value) not in MESSAGES[kind][field]:
            raise BadMessage(f"{kind}: field {field!r} has the wrong type")
    if msg.get("latent") is not None and num_latent == 0:
        raise BadMessage("input: this world's model takes the keys themselves, not latent actions (no number keys)")
    if msg.get("latent") is not None and not 0 <= msg["latent"] < num_latent:
        raise BadMessage(f"input: latent must lie in 0..{num_latent - 1}")
    if msg.get("level") is not None and not 0 <= msg["level"] < 2**31 - 1:
        raise BadMessage(f"reset: level must lie in 0..{2**31 - 2}")
    return kind, msg
