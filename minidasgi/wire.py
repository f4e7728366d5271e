"""The conversation between a distributor and a Node, as both sides see it.

Both sides import this module; neither imports the other. It owns message kinds, the request
envelope, channel names and flow-control credits; it does no I/O.

The conversation for one request (``id``):

1. The distributor ``LPUSH``es an ``Envelope`` onto the route's key: the scope, the first ASGI
   events already received (a small request travels whole), the distributor's reply channel,
   a deadline and the flow-control window. An HTTP envelope without events is a request
   whose client waits for "100 Continue": the Node publishes ``[CONTINUE, id]`` when its app
   first calls ``receive()``, and only then does the distributor read the body and relay it.
2. A Node pops it (``BLMPOP ... RIGHT COUNT n``, or ``BRPOP`` then ``RPOP`` with a count
   before Redis 7.0: first in, first out, up to one request per free slot) and publishes
   ``[ACK, id, node_channel, window, liveness]``: the window is how many pieces of request
   body the distributor may send ahead. It runs the app at once; the ACK of a whole HTTP
   request usually travels in one batch with the response's first SEND (or in one message
   with it: see below).
   Except in a Node's recovery window (``confirmation``: a request that may predate the
   Node's pop connection, so may come from a Redis restarted from its files or a promoted
   replica, and may have been answered or run already): if the envelope says its
   distributor confirms (``confirms``), the Node adds ``True`` to the ACK and waits, app
   not started, for ``[CONFIRM, id]`` (run it) or ``[CANCEL, id]`` (drop it). The
   distributor confirms only the first ACK of a request it still waits an ack for; an
   unknown id (answered already) or a second ACK (another Node has it) gets a CANCEL.
   Body pieces are ``CHUNK_SIZE`` unless the receiving side announced more for this request
   (``PIECE_SIZE``): a distributor in the envelope (``piece``), a Node as the ACK's fifth
   argument (its fourth, the confirmation flag, then ``False`` when not asking).
   When the envelope says its distributor reads it (``ack_send``), a Node whose ACK may wait
   for the response (a whole HTTP request, no confirmation asked) and whose app sends its
   first SEND in the loop turn the job started in sends the two as one message,
   ``[ACK_SEND, id, [events...], node_channel, window, liveness, ...]``: the SEND's argument,
   then all of the ACK's (``split_ack_send``). Else the ACK goes alone, as above. The
   distributor handles it as the ACK then the SEND, with the same checks: a late one
   (unknown id) or a second ACK from another Node gets a CANCEL, and the SEND of any second
   ACK is dropped (it comes from another copy of the request).
3. The Node publishes ``[SEND, id, [events...]]`` with what the app sends; the distributor
   publishes ``[EVENT, id, event]`` with what the client sends after the envelope.
4. Each side may have at most ``window`` data-bearing messages unconsumed by its peer; the
   consumer returns ``[CREDIT, id, n]`` as it consumes (``ReceiveWindow``/``SendWindow``),
   and a process bounds the sum over its requests (``CreditPool``, in bytes: a credit holds
   a piece's worth). A WebSocket's credit may count bytes instead (``CREDIT_UNIT``): a
   distributor announces its unit in the envelope (``unit``), a Node that knows units
   answers with its own as the ACK's sixth argument, and from then on each side counts in
   the other's unit, ``piece // unit`` units per message of the window, a message taking
   its encoded size in units (rounded up, at most half a piece's worth: ``credit_cost``;
   WebSocket messages then travel in half pieces). The bytes a window lets in stay what
   they were (a message over half a piece, big headers or escaped text, counts as half a
   piece, as any message counted as a whole piece before); a window of one piece, all a
   busy pool gives, holds 128 small messages instead of one. Either side of an earlier
   release announces nothing, and both count messages, as before.
   A receiver counts what arrives against the credit it granted: more is a protocol
   violation that fails the request (``ReceiveWindow.arrived``); a sender never lets credit
   raise its window above what it started with, so a forged CREDIT cannot make either side
   buffer more than its own bound.
5. ``[DONE, id, failed]`` ends a request whose app returned without completing the response;
   ``[CANCEL, id]`` tells a Node that the distributor gave the request up; ``[GONE, id,
   reason]`` tells the distributor that the Node ended the request without completing its
   response (its subscriber was lost, a publish failed, a cancel came, the app was cancelled)
   or never ran it (the envelope had expired when popped: no ACK was sent before it).
6. ``[PING, sender, [ids...]]``: while two processes share requests, each publishes one to the
   other every ``liveness_interval``, naming its own channel and the requests it has in flight
   with that peer (``liveness.PeerTracker``). The receiver answers each id it does not know
   (a Node with GONE, a distributor with CANCEL), and the receiver count PUBLISH returns tells
   the sender whether the peer's subscriber is still there. A side that heard nothing from a
   peer for ``peer_timeout`` fails the requests it shares with it. The old ``[PING]``, without
   sender or ids, is still read (and ignored). Whether a peer pings at all is announced in the
   envelope (``liveness``) and the ACK (its third argument), so a peer of an older version,
   which does not, is never blamed for its silence. A Node waiting for a confirmation takes
   a distributor's PING naming the request as one (the distributor names only requests whose
   ACK it accepted), and gives up after ``peer_timeout``.

Formats and fleet upgrades. Every message starts with its format's version byte (``codec``).
A process sends what it has for one peer channel in one loop turn as one PUBLISH (``outbox``):
a single message as itself, several as a *batch frame* (``batch_frame``: the byte
``BATCH_FRAME``, a u32 count, then each message as a u32 length and its bytes), which receivers
split with ``split_frame``. An envelope starts with a preamble every later version keeps
(``ENVELOPE_FRAME``, then the request id and the reply channel, each behind a u8 length), then
its fields as a codec message: a Node that cannot read the body's version still knows whom to
tell (``peek_envelope``), and answers ``[GONE, id, "unsupported ..."]`` at once. A Node answers
in the envelope's format: the first release's (``codec.RELEASED``, an envelope that is a plain
codec dict) gets single messages in that format, which its distributor reads. A Node asks for
a confirmation only when the envelope announces that its distributor gives one
(``confirms``): a distributor of an earlier version, which would never answer, is not asked
(the request runs at once, as that version expects), and a Node of an earlier version ignores
the field and the fourth ACK argument it never sends. Likewise a Node sends ``ACK_SEND`` only
to a distributor whose envelope announces it (``ack_send``): an earlier one gets the ACK and
the SEND as two messages, and a Node of an earlier version ignores the field.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from math import isfinite
from typing import TYPE_CHECKING, Any, Final

from . import (
    codec,
    envelopereader,
    envelopewriter,
    memo,
    messagewriter,
    responsereader,
    responsewriter,
)
from .resp.cluster import hash_tag

if TYPE_CHECKING:  # in annotations only: the codec reads one
    from .resp.directread import SplitPayload

__all__ = [
    "ACK",
    "ACK_SEND",
    "BATCH_FRAME",
    "CANCEL",
    "CHUNK_SIZE",
    "CONFIRM",
    "CONTINUE",
    "CREDIT",
    "CREDIT_UNIT",
    "DONE",
    "EARLIER_MAX_MESSAGE_SIZE",
    "EARLIER_PIECE_SIZE",
    "ENVELOPE_FRAME",
    "EVENT",
    "GONE",
    "LARGE_WINDOW",
    "MORE_KEY",
    "PIECE_SIZE",
    "PING",
    "RELAYED_EXTENSIONS",
    "SEND",
    "WINDOW",
    "CreditPool",
    "Envelope",
    "Packed",
    "Reassembler",
    "ReceiveWindow",
    "SendWindow",
    "WebSocketData",
    "WireError",
    "ack_of_ack_send",
    "asks_confirmation",
    "batch_frame",
    "batch_frame_parts",
    "credit_cost",
    "credit_unit",
    "drop_rest",
    "message_limit",
    "new_channel",
    "new_request_id",
    "pack",
    "pack_parts",
    "pack_response",
    "packed_size",
    "parse_ping",
    "peek_envelope",
    "piece_size",
    "ping_messages",
    "split_ack_send",
    "split_frame",
    "split_message",
    "tail_size",
    "unit_window",
    "unpack",
    "write_response",
]

ACK: Final = "ack"
SEND: Final = "send"
EVENT: Final = "event"
CREDIT: Final = "credit"
DONE: Final = "done"
CANCEL: Final = "cancel"
PING: Final = "ping"
CONTINUE: Final = "continue"
GONE: Final = "gone"
CONFIRM: Final = "confirm"
ACK_SEND: Final = "ack-send"
"""An ACK and the response's first SEND in one message (see the module's docstring)."""

CHUNK_SIZE: Final = 128 * 1024
"""Largest body piece sent to a peer that announced no piece size (earlier releases, which
send and expect pieces of this size); bigger bodies are split."""
PIECE_SIZE: Final = 1024 * 1024
"""Largest body piece this release reads from a peer that knows it (announced per request, see
``ReceiveWindow.piece``): an eighth of the messages per MiB of ``CHUNK_SIZE`` pieces. Every
message costs each of the three processes a wake-up, a few reads and its Python, whatever its
size: measured on a 256 MiB download, 1 MiB pieces cost 15-20% less CPU per MiB in the Node
and the distributor than 512 KiB ones (2 MiB ones no less than 1 MiB, and more page faults).
Earlier releases read at most ``EARLIER_PIECE_SIZE`` and announce at most that (or nothing):
``piece_size`` never sends them more."""
EARLIER_PIECE_SIZE: Final = 512 * 1024
"""The largest piece the previous release reads (and announces)."""
WINDOW: Final = 8
"""Data-bearing messages a side may have unconsumed by its peer, per request."""
LARGE_WINDOW: Final = 4
"""Pieces of ``PIECE_SIZE`` in a window of large pieces (``CreditPool.window``): 4 MiB, what
the previous release's 8 pieces of ``EARLIER_PIECE_SIZE`` held, credit returned every 2 MiB."""
POOL_BUDGET: Final = 64
"""What all peers together may have sent one process and it has not consumed, in units of
``CHUNK_SIZE`` (8 MiB; a ``PIECE_SIZE`` credit costs ``PIECE_SIZE // CHUNK_SIZE`` units), well
under Redis' default 32 MB limit on a subscriber's output buffer."""
MAX_LARGE_WINDOWS: Final = 8
"""Windows of ``PIECE_SIZE`` pieces one process has open at most (see ``CreditPool``)."""
CREDIT_UNIT: Final = 1024
"""Bytes of encoded message one credit stands for, for a WebSocket whose receiving side
announced it (the envelope's ``unit``, the ACK's sixth argument) and whose sender knows it: a
small message then takes one unit of the window instead of a whole piece's worth, so a window
shrunk to one piece by a busy pool still holds ``CHUNK_SIZE // CREDIT_UNIT`` small messages."""
MIN_CREDIT_UNIT: Final = 256
"""The smallest credit unit a sender accepts (a forged tiny one would only make numbers big)."""
MAX_MESSAGE_SIZE: Final = PIECE_SIZE + 256 * 1024
"""Bound on one message or batch frame this release reads: a piece plus scope and headers,
with room to spare (a batch frame's items add up to at most ``MAX_BATCH_SIZE``). What it sends
a peer is bounded by what that peer reads (``message_limit``)."""
EARLIER_MAX_MESSAGE_SIZE: Final = 768 * 1024
"""The bound of every earlier release (``4 * CHUNK_SIZE + 256 KiB``): what a peer that reads no
pieces over ``EARLIER_PIECE_SIZE`` may be sent."""
MAX_BATCH_SIZE: Final = 512 * 1024
"""Bytes of messages one batch frame gathers at most; a larger message travels alone."""
MAX_WEBSOCKET_MESSAGE: Final = 64 * 1024 * 1024
"""Largest WebSocket message either side reassembles (uvicorn's own default limit is 16 MiB)."""
BATCH_FRAME: Final = 0xB7
"""First byte of a batch frame: never a codec version (those count up from 1)."""
ENVELOPE_FRAME: Final = 0xE5
"""First byte of an envelope with a preamble (from this release on)."""
PING_MESSAGE: Final = codec.encode([PING], version=codec.RELEASED)
"""The id-less PING of earlier versions."""
_MIN_MESSAGE: Final = min(
    len(codec.encode(value, version=version))
    for value in ([PING], ["", ""])  # the shortest a message's reader takes
    for version in (codec.RELEASED, codec.BINARY, codec.FAST)
)
"""Bytes of the shortest message: a batch frame bounds its messages' count by its size with it."""
MAX_PING_IDS: Final = 4096
"""Request ids in one PING message (a longer list travels as several)."""
MAX_PING_ANSWERS: Final = 32
"""Unknown ids a receiver answers (GONE or CANCEL) per PING. A PING may be forged: answering
every id would turn one message into thousands. A real peer names the same ids again in its
next PING, so the rest are answered then."""

RELAYED_EXTENSIONS: Final = frozenset(
    {
        "http.response.trailers",
        "http.response.early_hint",
        "websocket.http.response",
        "tls",
    }
)
"""The scope extensions a Node's app is offered, when (and only when) the front server offers
them: those whose messages a Node can relay whole (trailers, 103 early hints, the WebSocket
denial response) and ``tls``, which only informs. Everything else stays behind: a file-based
extension (``http.response.pathsend``, ``http.response.zerocopysend``) would have the front
server open a path on its own filesystem, and ``http.response.push`` is not relayed."""


class WireError(ValueError):
    """A message that decodes but does not follow the conversation."""


_ids: list[str] = []


def new_request_id() -> str:
    """A fresh, unguessable request id (96 random bits; one getrandom per 256 ids)."""
    if not _ids:
        block = os.urandom(12 * 256).hex()
        _ids.extend(block[i : i + 24] for i in range(0, len(block), 24))
    return _ids.pop()


os.register_at_fork(after_in_child=_ids.clear)  # a forked child must never reuse its parent's


def new_channel(prefix: str, db: int, role: str) -> str:
    """A unique channel name. Pub/sub ignores SELECT, so the db is part of the name."""
    return f"{prefix}:{db}:{role}:{os.urandom(12).hex()}"


def pack(kind: str, request_id: str, *args: Any, version: int = codec.FAST) -> bytes:
    """Encode one conversation message (in ``version``: the format the peer reads)."""
    return codec.encode([kind, request_id, *args], version=version)


class CreditMessages:
    """The CREDIT messages of one request, each encoded once per value: most credits are half
    the window, so a request going back and forth (a WebSocket) returns the same one again
    and again."""

    __slots__ = ("_encoded", "_request_id", "_version")

    def __init__(self, request_id: str, version: int) -> None:
        self._request_id = request_id
        self._version = version
        self._encoded: tuple[int, bytes] | None = None  # the last credit and its encoding

    def pack(self, credit: int) -> bytes:
        encoded = self._encoded
        if encoded is None or encoded[0] != credit:
            data = pack(CREDIT, self._request_id, credit, version=self._version)
            encoded = self._encoded = (credit, data)
        return encoded[1]


Packed = bytes | list[bytes | memoryview]
"""An encoded message: bytes, or (a large one) the consecutive parts of its bytes, which the
RESP client gathers into its write with one copy (``pack_parts``)."""
_GATHER_FROM: Final = 64 * 1024


def pack_parts(kind: str, request_id: str, *args: Any, version: int = codec.FAST) -> Packed:
    """``pack`` for a message that may carry a large body: from 64 KiB, its parts (the body
    not copied: ``codec.encode_parts``), else its bytes. Parts are sent later in the loop
    turn: a view of a mutable buffer (a bytearray the sender may reuse once its send
    returned) is copied now."""
    parts = codec.encode_parts([kind, request_id, *args], version=version)
    if len(parts) == 1 or sum(map(len, parts)) < _GATHER_FROM:
        return b"".join(parts)  # a lone bytes part is returned as it is
    for part in parts:
        if isinstance(part, memoryview) and type(part.obj) is not bytes:
            return b"".join(parts)
    return parts


def pack_response(
    kind: str,
    request_id: str,
    events: list[Any],
    ack: tuple[Any, ...] = (),
    *,
    version: int = codec.FAST,
) -> Packed:
    """``pack_parts`` of a Node's ``SEND`` (or ``ACK_SEND``, the ACK's arguments ``ack``
    after the events). In the fast format the usual response (a start and its first body, or
    a body) is written straight (``responsewriter``: the same bytes, without the general
    writer's passes); any other, or another format, as ``pack_parts`` writes it. ``ack`` is
    taken as a tuple, not unpacked: the writer knows a tuple it saw last by its identity."""
    if version == codec.FAST:
        message = responsewriter.try_write(kind, request_id, events, ack)
        if message is not None:
            return message
    return pack_parts(kind, request_id, events, *ack, version=version)


def write_response(
    kind: str,
    request_id: str,
    start: Any,
    body: bytes,
    more: bool,
    ack: tuple[Any, ...] = (),
    *,
    version: int = codec.FAST,
) -> Packed | None:
    """``pack_response`` of ``[start, body_event]`` (the body alone when ``start`` is None),
    ``body_event`` being ``{"type": "http.response.body", "body": body, "more_body": more}``,
    when the response writer takes it (``responsewriter.try_write_body``: the same bytes, no
    event made for the body); None when it declines, or for another format: the caller then
    makes the events and goes the general way."""
    if version != codec.FAST:
        return None
    return responsewriter.try_write_body(kind, request_id, start, body, more, ack)


def packed_size(message: Packed) -> int:
    """The size in bytes of an encoded message."""
    return len(message) if isinstance(message, bytes) else sum(map(len, message))


_U32 = struct.Struct(">I")


class WebSocketData:
    """The data messages of one WebSocket: the distributor's EVENT of each client message, the
    Node's SEND of each app message. In the fast format a message of the usual shape (a
    ``websocket.receive`` or ``websocket.send`` with only its text or bytes) is written
    straight (``messagewriter``: the same bytes, without the general writer's passes); any
    other, or another format, as ``pack_parts`` writes it."""

    __slots__ = ("_request_id", "_version", "_writer")

    def __init__(self, request_id: str, version: int) -> None:
        self._request_id = request_id
        self._version = version
        self._writer = (
            messagewriter.WebSocketMessages(request_id, EVENT, SEND)
            if version == codec.FAST
            else None
        )

    def event(self, event: Mapping[str, Any]) -> Packed:
        """``[EVENT, id, event]``, encoded."""
        writer = self._writer
        if writer is not None:
            message = writer.receive(event)
            if message is not None:
                return message
        return pack_parts(EVENT, self._request_id, dict(event), version=self._version)

    def send(self, events: list[Any]) -> Packed:
        """``[SEND, id, events]``, encoded."""
        writer = self._writer
        if writer is not None and len(events) == 1:
            message = writer.send(events[0])
            if message is not None:
                return message
        return pack_parts(SEND, self._request_id, events, version=self._version)


def batch_frame(messages: list[bytes]) -> bytes:
    """One frame carrying ``messages`` (encoded messages, in order) for one PUBLISH."""
    return b"".join(batch_frame_parts(messages))  # type: ignore[arg-type]


def batch_frame_parts(messages: list[Packed]) -> list[bytes | memoryview]:
    """``batch_frame`` as consecutive parts: the messages' own parts are not copied."""
    parts: list[bytes | memoryview] = [bytes([BATCH_FRAME]) + _U32.pack(len(messages))]
    for message in messages:
        if isinstance(message, bytes):
            parts.append(_U32.pack(len(message)))
            parts.append(message)
        else:
            parts.append(_U32.pack(packed_size(message)))
            parts.extend(message)
    return parts


def split_frame(data: bytes | memoryview | SplitPayload) -> list[Any]:
    """The messages a PUBLISH carried: those of a batch frame (as memoryviews, no copies), or
    ``[data]`` itself (a lone message, read apart or not). Raise ``WireError`` for a
    malformed frame (nothing of it is used)."""
    if not data or data[0] != BATCH_FRAME:
        return [data]
    # Never a SplitPayload: ``tail_size``, the only one a subscriber of ours is given, reads
    # no batch frame apart, and a split payload's first byte is the one it was shown.
    frame: bytes | memoryview = data  # type: ignore[assignment]
    size = len(frame)
    if size > MAX_MESSAGE_SIZE:
        raise WireError(f"batch frame of {size} bytes exceeds the limit of {MAX_MESSAGE_SIZE}")
    if size < 5:
        raise WireError("batch frame truncated")
    (count,) = _U32.unpack_from(frame, 1)
    # Each message takes its length and at least the shortest message's bytes: a frame of
    # one-byte messages made 262,143 views of a 1.25 MiB PUBLISH, each read and refused.
    if count > (size - 5) // (4 + _MIN_MESSAGE):
        raise WireError("batch frame holds more messages than bytes")
    view = memoryview(frame)
    messages: list[Any] = []
    pos = 5
    for _ in range(count):
        if pos + 4 > size:
            raise WireError("batch frame truncated")
        (length,) = _U32.unpack_from(frame, pos)
        pos += 4
        end = pos + length
        if end > size:
            raise WireError("batch frame truncated")
        if length < _MIN_MESSAGE:
            raise WireError(f"batch frame holds a message of {length} bytes")
        messages.append(view[pos:end])
        pos = end
    if pos != size:
        raise WireError(f"{size - pos} trailing bytes after a batch frame")
    return messages


def drop_rest(log: logging.Logger, messages: list[Any], index: int, where: str) -> None:
    """Drop what follows ``messages[index]``, a malformed or unexpected message in a batch
    (``split_frame``'s), with one line on ``log`` (the receiving side's logger) for all of it:
    a peer of ours never sends one, and a forged frame of thousands logged each (seconds of
    loop)."""
    rest = len(messages) - index - 1
    if rest:
        log.warning("dropped the %d messages after it in its batch on %s", rest, where)


def tail_size(start: memoryview, size: int) -> int:
    """How many of the last bytes of a PUBLISH's payload of ``size`` bytes starting with
    ``start`` to read apart (``resp.directread``): a lone message's last bytes value, the
    body of a body piece, which ``unpack`` then decodes without copying it; 0 for a batch
    frame or anything else."""
    if not start or start[0] == BATCH_FRAME:
        return 0
    return codec.tail_size(start, size)


def unpack(data: bytes | memoryview | SplitPayload) -> tuple[str, str, list[Any]]:
    """Decode one conversation message into ``(kind, request_id, args)``; a format this side
    cannot read raises ``codec.UnsupportedVersion``."""
    # The usual small response, without the general scanner: the same value (``responsereader``).
    message = responsereader.try_decode(data, max_size=MAX_MESSAGE_SIZE)
    if message is not None:  # an ACK_SEND with its id: nothing more to check here
        return ACK_SEND, message[1], message[2:]
    return unpack_general(data)


def unpack_general(data: bytes | memoryview | SplitPayload) -> tuple[str, str, list[Any]]:
    """``unpack`` for a message that ``responsereader.try_decode(data,
    max_size=MAX_MESSAGE_SIZE)`` did not read (its caller tried it first), or on a side that
    never receives an ACK_SEND (a Node, ``status``), where trying it would only fail. A large
    body read apart, a ``SplitPayload``, is decoded without a copy of it."""
    message = codec.decode(data, max_size=MAX_MESSAGE_SIZE, max_items=codec.DEFAULT_MAX_ITEMS)
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise WireError("message is not a [kind, id, ...] list")
    if message[0] == PING:
        return PING, "", message[1:]
    if len(message) < 2 or not isinstance(message[1], str):
        raise WireError(f"{message[0][:20]!r} message without a request id")
    return message[0], message[1], message[2:]


def ping_messages(sender: str, request_ids: list[str], *, version: int = codec.FAST) -> list[bytes]:
    """The PING messages naming ``request_ids`` (at least one message, even for no ids)."""
    chunks = [request_ids[i : i + MAX_PING_IDS] for i in range(0, len(request_ids), MAX_PING_IDS)]
    return [codec.encode([PING, sender, chunk], version=version) for chunk in chunks or [[]]]


def asks_confirmation(ack_args: Sequence[Any]) -> bool:
    """True if an ACK's arguments (after the id) ask the distributor for a confirmation."""
    return len(ack_args) > 3 and ack_args[3] is True


def split_ack_send(args: list[Any]) -> tuple[list[Any], list[Any]]:
    """``(ack_args, send_args)`` of an ``ACK_SEND``'s arguments (after the id): the SEND's one
    argument, its list of events, comes first, then the ACK's. Raise ``WireError`` unless
    both are well formed as far as the message's dispatch goes (a list of events, a Node
    channel) and the ACK asks for no confirmation (a Node that asks runs nothing, so sends
    nothing, before the answer); the rest is checked where an ACK's and a SEND's are."""
    return ack_of_ack_send(args), args[:1]


def ack_of_ack_send(args: list[Any]) -> list[Any]:
    """``split_ack_send(args)[0]``, checked alike, for a reader that takes ``args`` itself as
    the SEND's arguments (its first, the events, is all a SEND's reader reads): a slice
    less per response."""
    if len(args) < 2 or type(args[0]) is not list:
        raise WireError("ack-send message without its events and its ack")
    channel = args[1]
    if not (isinstance(channel, str) and 0 < len(channel) <= 256):
        raise WireError("ack-send message without a Node channel")
    ack = args[1:]
    if len(ack) > 3 and ack[3] is True:  # asks_confirmation(ack), inline: one per request
        raise WireError("ack-send message asking for a confirmation")
    return ack


def peek_envelope(data: bytes) -> tuple[str, str] | None:
    """``(id, reply)`` from an envelope's preamble, whatever the version of its body; None if
    it has no preamble (the first release's envelopes) or a malformed one."""
    try:
        return _preamble(data)[:2]
    except (WireError, IndexError, UnicodeDecodeError):
        return None


_COPIED_BODY: Final = 16 * 1024
_DICTS: Final = frozenset([dict])  # what a decoded dict is (the codecs build plain dicts)
_NUMBERS: Final = frozenset([int, float])  # what a decoded number is (a bool is not one)


def _preamble(data: bytes) -> tuple[str, str, int]:
    """``(id, reply, where the body starts)``."""
    if not data or data[0] != ENVELOPE_FRAME:
        raise WireError("not an envelope frame")
    pos = 2 + data[1]
    end = pos + 1 + data[pos]  # IndexError if the id is cut short (the callers' "malformed")
    if end >= len(data):  # the reply channel cut short, or no body after it
        raise WireError("envelope preamble truncated")
    return data[2:pos].decode("ascii"), data[pos + 1 : end].decode("ascii"), end


def parse_ping(args: list[Any]) -> tuple[str, list[str]] | None:
    """``(sender, ids)`` of a PING's arguments; None for the old id-less PING or a malformed
    one (a PING is never worth an error: at worst it is ignored)."""
    if len(args) < 2:
        return None
    sender, ids = args[0], args[1]
    if not (isinstance(sender, str) and 0 < len(sender) <= 256 and isinstance(ids, list)):
        return None
    if len(ids) > MAX_PING_IDS:
        return None
    return sender, [i for i in ids if isinstance(i, str) and 0 < len(i) <= 64]


@dataclass
class Envelope:
    """A request as pushed onto a queue."""

    id: str
    reply: str
    deadline: float
    scope: dict[str, Any]
    events: list[dict[str, Any]]
    window: int = WINDOW
    liveness: float = 0.0
    """The distributor's PING interval for this request; 0 if it does not ping (older
    versions, which also leave the key out)."""
    queued: float = 0.0  # wall-clock time of the LPUSH, for the age of the oldest request
    confirms: bool = False
    """The distributor answers an ACK that asks for a confirmation (``confirmation``); False
    for older versions, which leave the key out."""
    version: int = codec.FAST
    """The format of the envelope's body: the one its distributor reads, and is answered in."""
    piece: int = CHUNK_SIZE
    """The largest body piece the distributor reads for this request (``CHUNK_SIZE`` when the
    envelope does not say: an earlier release)."""
    unit: int = 0
    """The distributor's credit unit (``CREDIT_UNIT``): it counts credit in units of that many
    bytes once its Node announces one too; 0 (absent) when it counts messages."""
    ack_send: bool = False
    """The distributor reads ``ACK_SEND``; False for older versions, which leave the key out."""
    link: str = field(default="", repr=False)
    """The distributor's link offer, ``host:port:token`` (``link``): the rest of a large
    response body may come on a direct connection; "" (absent) when it offers none. Not in
    the repr: the token is a secret."""
    asgi: bool = field(default=False, compare=False, repr=False)
    """The scope's header pairs, server and client are tuples already, as an ASGI server
    gives them (``decode(..., asgi=True)`` read it by ``envelopereader``); not on the wire."""

    def encode(self) -> bytes:
        """The bytes to LPUSH: a preamble and a body in ``version`` (the first release's
        format, ``codec.RELEASED``: a plain codec dict, as that release reads); the usual
        envelope through ``encode_envelope``'s shortcut."""
        return encode_envelope(
            self.id,
            self.reply,
            self.deadline,
            self.scope,
            self.events,
            window=self.window,
            liveness=self.liveness,
            queued=self.queued,
            confirms=self.confirms,
            version=self.version,
            piece=self.piece,
            unit=self.unit,
            ack_send=self.ack_send,
            link=self.link,
        )

    def _encode_generally(self) -> bytes:
        """``encode`` by the general writer (``encode_envelope`` when its shortcut declines)."""
        if self.version == codec.RELEASED:
            return codec.encode(
                {"id": self.id, "reply": self.reply, **self.fields()}, version=codec.RELEASED
            )
        preamble = _envelope_preamble(self.id, self.reply)
        return preamble + codec.encode(self.fields(), version=self.version)

    def fields(self) -> dict[str, Any]:
        """The envelope's body as a dict (without the id and reply channel), keys in the
        order they travel; the fields older releases do not know only when they are set."""
        fields = {
            "deadline": self.deadline,
            "scope": self.scope,
            "events": self.events,
            "window": self.window,
            "liveness": self.liveness,
            "queued": self.queued,
        }
        if self.piece != CHUNK_SIZE:
            fields["piece"] = self.piece
        if self.confirms:
            fields["confirms"] = True
        if self.unit:
            fields["unit"] = self.unit
        if self.ack_send:
            fields["ack_send"] = True
        if self.link:
            fields["link"] = self.link
        return fields

    @classmethod
    def decode(
        cls, data: bytes, *, max_size: int = codec.DEFAULT_MAX_SIZE, asgi: bool = False
    ) -> Envelope:
        """Decode and validate; raise ``CodecError`` (``codec.UnsupportedVersion`` for a body
        this side cannot read: ``peek_envelope`` still tells whom to answer) or ``WireError``.
        ``asgi``: the usual envelope's scope read with tuples where an ASGI server gives
        tuples (``envelopereader.try_fields``; the envelope's ``asgi`` says so), any other
        with the lists the codec gives."""
        if len(data) > max_size:
            raise codec.CodecError(f"envelope of {len(data)} bytes exceeds the limit of {max_size}")
        if data and data[0] == ENVELOPE_FRAME:
            # ``_preamble``, inline (a call and a tuple per request less).
            try:
                pos = 2 + data[1]
                start = pos + 1 + data[pos]  # IndexError if the id is cut short
                if start >= len(data):  # the reply channel cut short, or no body after it
                    raise WireError("envelope preamble truncated")
                request_id = data[2:pos].decode("ascii")
                reply = data[pos + 1 : start].decode("ascii")
            except (IndexError, UnicodeDecodeError):
                raise WireError("malformed envelope preamble") from None
            version = data[start]
            # A small body is copied once (cheaper than decoding through a memoryview, which
            # costs a view per bytes value); a large one is read in place.
            body = data[start:] if len(data) <= _COPIED_BODY else memoryview(data)[start:]
            # The usual fields, without the general scanner: the same value (``envelopereader``).
            fields = envelopereader.try_fields(body, max_size=max_size, asgi=asgi)
            if fields is not None:
                return cls._from_fields(request_id, reply, version, fields, asgi)
            value = codec.decode(body, max_size=max_size, max_items=codec.DEFAULT_MAX_ITEMS)
            if not isinstance(value, dict):
                raise WireError("envelope is not a dict")
        else:
            version = data[0] if data else 0
            value = codec.decode(data, max_size=max_size, max_items=codec.DEFAULT_MAX_ITEMS)
            if not isinstance(value, dict):
                raise WireError("envelope is not a dict")
            if "id" not in value:
                raise WireError("envelope without 'id'")
            if "reply" not in value:
                raise WireError("envelope without 'reply'")
            request_id, reply = value["id"], value["reply"]
        try:
            deadline = value["deadline"]
            scope = value["scope"]
            events = value["events"]
            window = value["window"]
        except KeyError as exc:
            raise WireError(f"envelope without {exc.args[0]!r}") from None
        # Exact types (``type(x) in``, not isinstance): the codecs build plain values, and a
        # bool, an int subclass, is refused where a number is expected.
        if not (type(request_id) is str and 0 < len(request_id) <= 64):
            raise WireError("envelope id is not a short string")
        if not (type(reply) is str and 0 < len(reply) <= 256):
            raise WireError("envelope reply channel is not a short string")
        if type(deadline) not in _NUMBERS:
            raise WireError("envelope deadline is not a number")
        if not isfinite(deadline):
            raise WireError("envelope deadline is not finite")
        if not (type(scope) is dict and scope.get("type") in ("http", "websocket")):
            raise WireError("envelope scope is not an http or websocket scope")
        if not (type(events) is list and _DICTS.issuperset(map(type, events))):
            raise WireError("envelope events are not a list of dicts")
        if not (type(window) is int and 1 <= window <= 1024):
            raise WireError("envelope window out of range")
        get = value.get
        piece = get("piece", CHUNK_SIZE)  # absent from envelopes of earlier releases
        if type(piece) is not int:
            raise WireError("envelope piece size is not an int")
        liveness = get("liveness", 0.0)
        if type(liveness) not in _NUMBERS:
            raise WireError("envelope liveness is not a number")
        if not (isfinite(liveness) and liveness >= 0):
            raise WireError("envelope liveness out of range")
        queued = get("queued", 0.0)  # absent from envelopes of older distributors
        if type(queued) not in _NUMBERS:
            raise WireError("envelope queued time is not a number")
        if not isfinite(queued):
            raise WireError("envelope queued time is not finite")
        confirms = get("confirms", False)  # absent from envelopes of older distributors
        if type(confirms) is not bool:
            raise WireError("envelope confirms is not a boolean")
        unit = value.get("unit", 0)  # likewise
        if type(unit) is not int:
            raise WireError("envelope credit unit is not an int")
        ack_send = value.get("ack_send", False)  # absent from envelopes of older distributors
        if not isinstance(ack_send, bool):
            raise WireError("envelope ack_send is not a boolean")
        link = value.get("link", "")  # absent from envelopes of older distributors
        if not (type(link) is str and len(link) <= _MAX_LINK):
            raise WireError("envelope link offer is not a short string")
        return cls(
            request_id,
            reply,
            float(deadline),
            scope,
            events,
            window,
            piece=piece if piece == CHUNK_SIZE else piece_size(piece),
            liveness=float(liveness),
            queued=float(queued),
            confirms=confirms,
            ack_send=ack_send,
            version=codec.RELEASED if version == codec.RELEASED else codec.FAST,
            unit=credit_unit(unit, piece_size(piece)),
            link=link,
        )

    @classmethod
    def _from_fields(
        cls,
        request_id: str,
        reply: str,
        version: int,
        fields: envelopereader.Fields,
        asgi: bool = False,
    ) -> Envelope:
        """``decode``'s envelope from the usual fields (``envelopereader.try_fields``), with
        only the checks their reader leaves open (the same outcome: ``tests/test_envelopereader.py``
        compares the two, fuzzed): its expression admits only finite numbers of the right
        types, a dict scope, a list of one dict for the events, and no negative int."""
        (
            deadline,
            scope,
            events,
            window,
            liveness,
            queued,
            piece,
            confirms,
            unit,
            ack_send,
            link,
        ) = fields
        if not (type(request_id) is str and 0 < len(request_id) <= 64):
            raise WireError("envelope id is not a short string")
        if not (type(reply) is str and 0 < len(reply) <= 256):
            raise WireError("envelope reply channel is not a short string")
        if scope["type"] not in ("http", "websocket"):
            raise WireError("envelope scope is not an http or websocket scope")
        if not 1 <= window <= 1024:
            raise WireError("envelope window out of range")
        if not liveness >= 0:
            raise WireError("envelope liveness out of range")
        pieces = CHUNK_SIZE if piece is None or piece == CHUNK_SIZE else piece_size(piece)
        # Every field by position, in the order the class declares them: keywords would cost
        # the call a dict of them (test_wire checks the envelope against the general path's).
        return cls(
            request_id,
            reply,
            deadline,
            scope,
            events,
            window,
            liveness,
            queued,
            confirms,
            codec.RELEASED if version == codec.RELEASED else codec.FAST,
            pieces,
            0 if unit is None else credit_unit(unit, piece_size(piece)),
            ack_send,
            link,
            asgi,
        )

    def expired(self, now: float | None = None) -> bool:
        """True once the distributor has stopped waiting for an ack."""
        return (time.time() if now is None else now) > self.deadline


_MAX_LINK: Final = 400  # an offer's longest text (``link.parse_offer`` reads it)


def message_limit(piece: int) -> int:
    """The largest message to send a peer that reads pieces of up to ``piece`` bytes (what it
    announced, through ``piece_size``): a peer announcing more than ``EARLIER_PIECE_SIZE`` is of
    this release or later, and reads ``MAX_MESSAGE_SIZE``; any other may be an earlier one."""
    return MAX_MESSAGE_SIZE if piece > EARLIER_PIECE_SIZE else EARLIER_MAX_MESSAGE_SIZE


def encode_envelope(
    request_id: str,
    reply: str,
    deadline: float,
    scope: dict[str, Any],
    events: list[dict[str, Any]],
    *,
    window: int = WINDOW,
    liveness: float = 0.0,
    queued: float = 0.0,
    confirms: bool = False,
    version: int = codec.FAST,
    piece: int = CHUNK_SIZE,
    unit: int = 0,
    ack_send: bool = False,
    portable: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    millis: bool = False,
    link: str = "",
) -> bytes:
    """``Envelope(...).encode()`` with these fields, without making the ``Envelope`` when the
    usual envelope's writer takes them (a distributor writes one per request: the same bytes
    as the general writer, ``envelopewriter``); else the general writer decides.

    ``portable``, if given, makes of ``scope`` the one that travels; it must leave a scope of
    ``envelopewriter.PLAIN_SCOPE_KEYS`` and a ``state`` as it is but for the ``state``,
    dropped. The usual writer drops a uvicorn scope's ``state`` itself, sparing the call
    (a copy of the scope per request); for any other scope it is called. With ``millis``,
    ``deadline`` and ``queued`` are whole milliseconds, ints, and the envelope's times those
    over 1000, which the usual writer writes from the ints (``try_encode_parts``)."""
    if version == codec.FAST:
        parts = envelopewriter.try_encode_parts(
            deadline,
            scope,
            events,
            window,
            liveness,
            queued,
            piece,
            CHUNK_SIZE,
            bool(confirms),
            unit,
            bool(ack_send),
            portable is not None,
            millis,
            link,
        )
        if parts is None and portable is not None:
            scope = portable(scope)
            portable = None
            parts = envelopewriter.try_encode_parts(
                deadline,
                scope,
                events,
                window,
                liveness,
                queued,
                piece,
                CHUNK_SIZE,
                bool(confirms),
                unit,
                bool(ack_send),
                False,
                millis,
                link,
            )
        if parts is not None:
            return b"".join([*_envelope_preamble_parts(request_id, reply), *parts])
    if millis:
        deadline, queued = deadline / 1000, queued / 1000
    if portable is not None:
        scope = portable(scope)
    envelope = Envelope(
        request_id,
        reply,
        deadline,
        scope,
        events,
        window,
        liveness=liveness,
        queued=queued,
        confirms=confirms,
        version=version,
        piece=piece,
        unit=unit,
        ack_send=ack_send,
        link=link,
    )
    return envelope._encode_generally()


def _envelope_preamble(request_id: str, reply: str) -> bytes:
    """An envelope's frame byte, id and reply channel, each with its length."""
    return b"".join(_envelope_preamble_parts(request_id, reply))


def _envelope_preamble_parts(request_id: str, reply: str) -> tuple[bytes, bytes, bytes]:
    """``_envelope_preamble`` in parts: the frame byte and the id's length, the id, and the
    reply channel with its length (the same for every envelope of a distributor: kept)."""
    request_id_bytes = request_id.encode("ascii")
    reply_part = _REPLY_PARTS.get(reply)
    if reply_part is None:
        reply_bytes = reply.encode("ascii")
        if len(reply_bytes) > 255:
            raise WireError("envelope id or reply channel too long")
        reply_part = bytes([len(reply_bytes)]) + reply_bytes
        if type(reply) is str:
            memo.keep(_REPLY_PARTS, reply, reply_part)
    size = len(request_id_bytes)
    if size > 64:
        raise WireError("envelope id or reply channel too long")
    return _ENVELOPE_HEADS[size], request_id_bytes, reply_part


_REPLY_PARTS: Final[dict[str, bytes]] = {}
"""A reply channel's part of the preamble, by the channel (a distributor has one)."""
_ENVELOPE_HEADS: Final = [bytes([ENVELOPE_FRAME, size]) for size in range(65)]
"""The frame byte and the id's length, by that length: made once, not per envelope."""


def piece_size(announced: Any) -> int:
    """The piece size to send a peer that announced ``announced`` (an ACK's fifth argument,
    an envelope's ``piece``): within ``CHUNK_SIZE`` (what every release reads, and what a
    peer announcing nothing or nonsense gets) and ``PIECE_SIZE`` (what this release sends at
    most, whatever a newer peer may take)."""
    # Comparisons rather than min(max(...)): the builtins cost more than these two tests
    # (once per request on a Node, for the envelope's piece).
    if type(announced) is not int or announced <= CHUNK_SIZE:
        return CHUNK_SIZE
    return announced if announced < PIECE_SIZE else PIECE_SIZE


class SendWindow:
    """The sending side of flow control: wait for credit before each data-bearing message.

    Credit counts messages, or, when the receiver announced a credit unit (``credit_unit``),
    units of that many bytes of encoded message: a message then costs ``cost(size)``, and
    carries at most ``piece`` bytes of a WebSocket message (``unit_window``)."""

    def __init__(self, window: int = WINDOW, unit: int = 0, piece: int = CHUNK_SIZE) -> None:
        # (``unit`` and ``piece`` may come by position: a class called with keyword arguments
        # makes a dict of them, and a Node makes a window per request.)
        self.unit = unit
        if unit:
            self.window, self.largest = unit_window(window, piece, unit)
            self.piece = self.largest * unit
        else:  # counting messages (``unit_window``'s answer without the call)
            self.window, self.largest, self.piece = window, 1, piece
        self.available = self.window
        self._wakeup: asyncio.Event | None = None
        self._error: BaseException | None = None

    def cost(self, size: int) -> int:
        """The credit a message of ``size`` encoded bytes takes (``credit_cost``)."""
        return credit_cost(size, self.unit, self.largest)

    def try_take(self, cost: int = 1) -> bool:
        """Take ``cost`` credits if they are there (True), without waiting: ``acquire``
        without the coroutine a call of it makes, for a sender that usually has credit."""
        if self.available < cost or self._error is not None:
            return False
        self.available -= cost
        return True

    async def acquire(self, cost: int = 1) -> None:
        """Take ``cost`` credits, waiting until the peer grants them."""
        while self.available < cost:
            if self._error is not None:
                raise self._error
            if self._wakeup is None:
                self._wakeup = asyncio.Event()
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._error is not None:
            raise self._error
        self.available -= cost

    def grant(self, n: int) -> None:
        """The peer consumed messages worth ``n`` credits. Credit never raises the window
        above what it started with: more than that is forged or mistaken, and would let the
        peer's buffer grow past its bound."""
        if n > 0:
            self.available = min(self.available + n, self.window)
            if self._wakeup is not None:
                self._wakeup.set()

    def abort(self, error: BaseException) -> None:
        """Fail the current and future waiters with ``error``."""
        self._error = error
        if self._wakeup is not None:
            self._wakeup.set()


def credit_unit(announced: Any, piece: int) -> int:
    """The credit unit to count in for a receiver that announced ``announced`` (an envelope's
    ``unit``, an ACK's sixth argument) and reads pieces of ``piece`` bytes: 0 (count messages,
    what earlier releases do) unless it is a power of two within ``MIN_CREDIT_UNIT`` and the
    piece, so that a piece is a whole number of units."""
    if type(announced) is not int or not MIN_CREDIT_UNIT <= announced <= piece:
        return 0
    return announced if announced & (announced - 1) == 0 else 0


def unit_window(window: int, piece: int, unit: int) -> tuple[int, int]:
    """``(credits, largest)`` of a window of ``window`` messages of ``piece`` bytes counted
    in units of ``unit`` bytes (0: messages): ``piece // unit`` units per message of the
    window, and the credit one message takes at most: half a piece's worth. The receiver
    tops the sender's credit up to a whole piece whenever it falls under that half, whatever
    its pool's budget (``ReceiveWindow``): no message waits for credit for good, and even a
    window of one piece returns credit in batches of half a piece, not per message."""
    if not unit:
        return window, 1
    per = piece // unit
    return window * per, max(1, per // 2)


def credit_cost(size: int, unit: int, largest: int) -> int:
    """The credit a message of ``size`` encoded bytes takes: 1 when credit counts messages,
    else its units (rounded up), at most ``largest``: what a whole piece takes, so that a
    message never costs more than it would have counting messages."""
    if not unit:
        return 1
    return min(largest, -(-size // unit)) or 1


class CreditPool:
    """A process-wide bound on the data messages peers may send before this side reads them.

    Everything a peer publishes to this process waits in Redis' output buffer for this
    process' subscriber until read, and Redis drops a subscriber whose buffer passes 32 MB (by
    default), losing every request in flight with it. Per-request windows alone bound that
    only per request; the pool bounds the sum, in bytes: a credit costs what the message it
    lets in may weigh at most (a piece, or a credit unit's bytes: ``ReceiveWindow``). A window
    always keeps room for one piece, so no transfer ever stalls: the bound is max(budget,
    number of open windows) units of ``CHUNK_SIZE``, plus ``PIECE_SIZE // CHUNK_SIZE - 1``
    units per window of large pieces, of which at most ``MAX_LARGE_WINDOWS`` are open (by
    default 8 MiB, or 128 KiB per open window past 64 windows, plus 7 MiB at most: under
    Redis' 32 MB still).

    A window of large pieces (``window``: ``LARGE_WINDOW`` of them) is opened only when it fits
    in half the budget with what is already taken: the other half stays for full windows of
    ``CHUNK_SIZE`` pieces, so a few concurrent transfers still get a whole window each (with
    the default budget, one transfer at a time gets large pieces, the next ones small ones,
    as before).
    """

    def __init__(self, budget: int = POOL_BUDGET) -> None:
        self.limit = budget * CHUNK_SIZE  # bytes
        self.used = 0  # bytes held by peers' credits over all windows
        self.large = 0  # open windows of large pieces
        self._starved: dict[ReceiveWindow, None] = {}  # windows owed credit, oldest first

    @property
    def budget(self) -> int:
        """The bound, in units of ``CHUNK_SIZE``."""
        return self.limit // CHUNK_SIZE

    @property
    def in_flight(self) -> int:
        """What peers' credits hold, in units of ``CHUNK_SIZE`` (rounded up)."""
        return -(-self.used // CHUNK_SIZE)

    def open(self, wanted: int = WINDOW) -> int:
        """Credits of ``CHUNK_SIZE`` pieces for a new window: ``wanted`` if the budget has
        room, else fewer, at least 1."""
        # Comparisons rather than max(1, min(...)): the builtins cost more than these tests
        # (once per request at more than one request in flight, ``reserve``'s usual answer).
        room = (self.limit - self.used) // CHUNK_SIZE
        n = wanted if wanted <= room else room
        if n < 1:
            n = 1
        self.used += n * CHUNK_SIZE
        return n

    def window(
        self, grant: Callable[[int], None] | None = None, wanted: int = WINDOW
    ) -> ReceiveWindow:
        """A new window: of ``LARGE_WINDOW`` pieces of ``PIECE_SIZE`` while half the budget
        has room for the whole of it (and fewer than ``MAX_LARGE_WINDOWS`` are open), else of
        ``wanted`` pieces of ``CHUNK_SIZE`` (fewer if the budget is short)."""
        credits, piece = self.reserve(wanted)
        return ReceiveWindow(credits, self, grant, piece)

    def reserve(self, wanted: int = WINDOW) -> tuple[int, int]:
        """The credits and the piece size ``window`` would open, taken from the pool without
        making the window: for a transfer that may never need one (a response that comes
        whole in one message). Make it with ``ReceiveWindow(credits, pool, grant, piece)``
        once needed, or give the credits back with ``release``."""
        size = LARGE_WINDOW * PIECE_SIZE
        if self.large < MAX_LARGE_WINDOWS and size <= self.limit // 2 - self.used:
            self.used += size
            self.large += 1
            return _LARGE_RESERVATION
        return self.open(wanted), CHUNK_SIZE

    def release(self, credits: int, piece: int) -> None:
        """Give back what ``reserve`` (or ``open``, with ``CHUNK_SIZE``) took for a window
        never made: as that window's ``close`` would, nothing of it consumed."""
        self.used -= credits * piece
        if piece > CHUNK_SIZE:  # counted among the large windows
            self.large -= 1
        if self._starved:
            self._feed_starved()

    def _feed_starved(self) -> None:
        while self._starved and self.used < self.limit:
            window = next(iter(self._starved))
            room = (self.limit - self.used) // window._cost
            if window.outstanding >= window.largest and room < window.largest:
                # No room for one of its credits yet, and its peer can still send: oldest
                # first, it waits (paying a newer one first would starve it for good).
                return
            del self._starved[window]
            window._regrant()


_LARGE_RESERVATION: Final = (LARGE_WINDOW, PIECE_SIZE)  # made once, not per request


class ReceiveWindow:
    """The receiving side of flow control: returns credit in batches of half the window, and,
    with a ``CreditPool``, only while the pool has room (``grant`` is called with credit owed
    earlier once room comes back).

    ``piece`` is the largest piece announced to the peer (in the envelope or the ACK); each
    credit costs the pool ``piece`` bytes. The pool's credits for this window must already be
    taken (``CreditPool.open``, ``CreditPool.window`` or ``CreditPool.reserve``). ``window``
    counts messages (what is announced to the peer); once the peer is known to count in
    credit units (``count_units``), credits are units of that many bytes of encoded message,
    ``piece // unit`` per message of the window, and a small message takes one or a few of
    them."""

    # Until a window counts units or sees traffic: read from the class, not set per window
    # (one per request: each attribute set, and the work out of the batch, cost it more than
    # the lookups that find these here).
    unit = 0  # 0: credit counts messages
    largest = 1  # the credit the largest message takes
    _floor = 1  # the credit the peer may hold whatever the pool's budget
    unconsumed = 0  # arrived, not yet consumed
    _pending = 0  # consumed, not yet returned
    _costs: deque[int] | None = None  # what each unconsumed message took (units)
    _closed = False
    piece = CHUNK_SIZE
    _cost = CHUNK_SIZE  # bytes of the pool one credit holds
    _batch = 0  # the credit returned at once; 0: half the window, at least 1 (``_take``)

    def __init__(
        self,
        window: int = WINDOW,
        pool: CreditPool | None = None,
        grant: Callable[[int], None] | None = None,
        piece: int = CHUNK_SIZE,
    ) -> None:
        # The piece may come by position (``CreditPool.window``): a class called with a
        # keyword argument makes a dict of it, once per request here.
        self.window = self.outstanding = window  # outstanding: granted, not yet consumed
        if piece != CHUNK_SIZE:
            self.piece = self._cost = piece
        self._pool = pool
        self._grant = grant

    def count_units(self, unit: int) -> None:
        """Count credit in units of ``unit`` bytes from now on (a power of two no larger than
        the piece): the peer announced that it does. The pool holds the same bytes."""
        if self.unit or not unit:
            return
        per = self.piece // unit
        self.unit = unit
        self.largest = unit_window(self.window, self.piece, unit)[1]
        self._floor = per
        self._cost = unit
        self.outstanding *= per
        self._pending *= per
        self._batch = max(1, self.window * per // 2)
        # Messages arrived before (only forged ones can) each held a whole credit.
        self._costs = deque([per] * self.unconsumed)
        self.unconsumed *= per

    def arrived(self, size: int = 0) -> bool:
        """Record one data-bearing message of ``size`` encoded bytes as it arrives; False if
        the peer sent more than the credit granted (a protocol violation: the caller fails
        the request)."""
        costs = self._costs
        cost = 1 if costs is None else credit_cost(size, self.unit, self.largest)
        if self.unconsumed + cost > self.outstanding:
            return False
        self.unconsumed += cost
        if costs is not None:
            costs.append(cost)
        return True

    def _taken(self) -> int:
        """What the oldest unconsumed message took."""
        costs = self._costs
        return costs.popleft() if costs else 1

    def dropped(self) -> None:
        """An arrived message that will never be consumed (it was refused): it holds no
        credit of the peer's, so it must not count against what the peer may still send."""
        self.unconsumed = max(0, self.unconsumed - self._taken())

    def consumed(self) -> int:
        """Record one consumed message; return the credit to send now (often 0)."""
        cost = self._taken()
        self.unconsumed = max(0, self.unconsumed - cost)
        self.outstanding -= cost
        self._pending += cost
        pool = self._pool
        if pool is not None:
            pool.used -= cost * self._cost
        n = self._take()
        if pool is not None:
            pool._feed_starved()
        return n

    def _take(self) -> int:
        if self._closed or (
            self._pending < (self._batch or self.window // 2 or 1)
            and self.outstanding >= self.largest
        ):
            return 0
        n = self._pending
        pool = self._pool
        if pool is not None:
            room = (pool.limit - pool.used) // self._cost
            if self.outstanding < self.largest:
                # A peer that may lack credit for its next message gets up to a piece's
                # worth whatever the budget (what the pool allows any window): progress for
                # everyone, and still in batches.
                room = max(room, self._floor - self.outstanding)
            elif room < self.largest:
                room = 0  # counting units, a grant of a few is not worth its message: wait
            n = min(n, room)
            if n <= 0:
                pool._starved[self] = None
                return 0
            pool.used += n * self._cost
        self._pending -= n
        self.outstanding += n
        return n

    def _regrant(self) -> None:
        n = self._take()
        if n and self._grant is not None:
            self._grant(n)

    def close(self) -> None:
        """The transfer is over: give its credits back to the pool."""
        if self._closed:
            return
        self._closed = True
        self._grant = None  # usually a bound method of the owner: no cycle left for the collector
        pool = self._pool
        if pool is not None:
            pool.used -= self.outstanding * self._cost
            if self.piece > CHUNK_SIZE:  # the pool counts it among its large windows
                pool.large -= 1
            if pool._starved:  # usually empty: no call then
                pool._starved.pop(self, None)
                pool._feed_starved()
        self.outstanding = 0


# WebSocket messages can be far larger than a chunk. They travel as pieces: every piece but
# the last carries MORE_KEY, and the receiving side joins them before the ASGI peer sees the
# message, so flow control works on pieces and memory is bounded by the largest message.
MORE_KEY: Final = "minidasgi.more"


def split_message(event: dict[str, Any], piece: int = CHUNK_SIZE) -> list[dict[str, Any]]:
    """Split a ``websocket.send``/``websocket.receive`` event into pieces of ``piece`` bytes
    or less (text in ``piece // 4`` characters: at most 4 UTF-8 bytes each)."""
    data = event.get("bytes")
    field, size = "bytes", piece
    if data is None:
        data = event.get("text")
        field, size = "text", piece // 4
    if data is None or len(data) <= size:
        return [event]
    pieces = []
    for start in range(0, len(data), size):
        part = dict(event)
        part[field] = data[start : start + size]
        if start + size < len(data):
            part[MORE_KEY] = True
        pieces.append(part)
    return pieces


class Reassembler:
    """Joins the pieces made by ``split_message``, refusing messages over ``max_size``."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._parts: list[Any] = []
        self._size = 0

    def add(self, piece: dict[str, Any]) -> dict[str, Any] | None:
        """Add a piece; return the whole message once its last piece arrived, else None."""
        field = "bytes" if piece.get("bytes") is not None else "text"
        data = piece.get(field)
        if not isinstance(data, (bytes, str)):
            raise WireError("a WebSocket message without bytes or text")
        more = piece.pop(MORE_KEY, False)
        if not more and not self._parts:
            return piece
        if self._parts and type(self._parts[0]) is not type(data):
            raise WireError("the pieces of a WebSocket message mix text and bytes")
        self._size += len(data)
        if self._size > self.max_size:
            raise WireError(f"WebSocket message larger than {self.max_size} bytes")
        self._parts.append(data)
        if more:
            return None
        joined = "".join(self._parts) if field == "text" else b"".join(self._parts)
        self._parts, self._size = [], 0
        message = dict(piece)
        message[field] = joined
        return message


# Operations (see ``presence``, ``stats`` and ``status``): a Node subscribes, beside its own
# channel, to one presence channel per key it pops, so ``PUBSUB NUMSUB`` on it counts the Nodes
# listening on that key; every process subscribes to the stats channel, where
# ``[STATS, id, reply_channel]`` asks it to publish ``[STATS_REPLY, id, payload]`` there.
STATS: Final = "stats"
STATS_REPLY: Final = "stats-reply"


def presence_channel(prefix: str, db: int, key: str, *, cluster: bool = False) -> str:
    """The channel a Node serving ``key`` subscribes to, so that it can be counted.

    On a Redis Cluster (``cluster=True``) it shares the key's slot, so that the fail-fast
    count and the push go to one master: a key with a ``{hash tag}`` already gives the name
    its tag (the prefix has no brace); any other key becomes the name's tag, ``{key}``. A key
    whose braces make no tag (``a{b``, ``a}b``, ``{}``), or a prefix with a brace, keeps the
    plain name, in a slot of its own. On one server the name is the plain one (what every
    release of the fleet uses)."""
    name = f"{prefix}:{db}:presence:{key}"
    if not cluster or "{" in prefix or hash_tag(key) is not None:
        return name
    if key and "{" not in key and "}" not in key:
        return f"{prefix}:{db}:presence:{{{key}}}"
    return name


def stats_channel(prefix: str, db: int) -> str:
    """The channel every Node and distributor listens on for stats requests."""
    return f"{prefix}:{db}:stats"
