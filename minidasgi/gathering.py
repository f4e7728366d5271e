"""Piece gathering: body events a client sends in bulk, joined into one piece for its Node.

Owns the choice of when to wait for more of a streamed request body before relaying it. An
ASGI server hands the body over as it reads it (uvicorn: one socket read, up to 256 KiB, per
``receive()``), while a Node reads pieces of up to ``wire.PIECE_SIZE`` (1 MiB): relaying
every read as its own piece costs twice the PUBLISHes, pub/sub deliveries, decodes and credits
per MiB of upload. An event this large says the client sends faster than it is read, so the
next part is usually a loop turn away: it is joined to the piece, up to the piece size, for at
most ``wait`` seconds. A client that trickles (small events) is never waited for, and one that
pauses after a large event delays that piece by ``wait`` at most.

Memory stays bounded by one piece. It must never talk to Redis nor know about Nodes, and never
lose or reorder an event: one that does not fit (another kind, a disconnect, a body that would
pass the piece size) is handed back for the caller to handle next. Waiting uses
``receive_within``, whose cancellation of a ``receive()`` loses nothing.
"""

from __future__ import annotations

from typing import Final

from .asgi import Message, Receive
from .buffering import BodyIdle, receive_within
from .codec import Gathered

__all__ = ["GATHER_FROM", "GATHER_WAIT", "gather_body"]

GATHER_FROM: Final = 64 * 1024
"""Bytes of body in one event from which more is waited for: uvicorn's high-water mark, past
which it stops reading the socket until ``receive()`` is called again (so the client is ahead)."""
GATHER_WAIT: Final = 0.001
"""Seconds at most a piece waits for the next part of the body."""


async def gather_body(
    receive: Receive, event: Message, piece: int, wait: float = GATHER_WAIT
) -> tuple[Message, Message | None]:
    """``event`` (an ``http.request``) with the body events that follow at once joined to it,
    up to ``piece`` bytes, and the event received that did not fit (None if none). A joined
    body is a ``codec.Gathered`` of the parts, for the codec to copy once into a message: the
    event is for a Node, never for an app.

    Returns ``event`` itself when it is not worth waiting after (no more body, small, or a
    piece already)."""
    body = event.get("body", b"")
    if (
        not event.get("more_body", False)
        or type(body) is not bytes
        or not GATHER_FROM <= len(body) < piece
    ):
        return event, None
    parts = [body]
    size = len(body)
    more = True
    left_over: Message | None = None
    while more and size < piece:
        try:
            following = await receive_within(receive, wait)
        except BodyIdle:
            break  # the client paused: relay what came
        part = following.get("body", b"")
        if (
            following.get("type") != "http.request"
            or type(part) is not bytes
            or size + len(part) > piece
        ):
            left_over = following
            break
        parts.append(part)
        size += len(part)
        more = bool(following.get("more_body", False))
        if len(part) < GATHER_FROM:
            break  # the client slowed down: do not wait for the rest of the piece
    if len(parts) == 1:
        return event, left_over
    # Not joined: the parts are copied once, into the message that carries them.
    return {"type": "http.request", "body": Gathered(parts), "more_body": more}, left_over
