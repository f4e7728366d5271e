"""A writer of format 3 (``jsoncodec``) specialised for a WebSocket's data messages.

Owns one shortcut, the twin of ``envelopewriter``'s: the messages a WebSocket conversation
is made of, ``[EVENT, id, {"type": "websocket.receive", "text"|"bytes": data}]`` from the
distributor and ``[SEND, id, [{"type": "websocket.send", "text"|"bytes": data}]]`` from the
Node, written straight to the bytes ``jsoncodec.try_encode_parts`` would produce, without its
passes over the text (counting and replacing markers, looking for keys ``json`` may have
coerced, bounding depth and ints): the keys are known, the request id is checked once per
request, and the one value is quoted by ``json``'s own C function. An event of any other shape
(another key, a third one, the keys in another order, a bytearray, a str subclass, U+E000 in
the text, a text too long to leave unbounded) makes it return None, and the caller uses the
general path, which decides. So the bytes on the wire never depend on which path wrote them
(``tests/test_messagewriter.py`` compares the two, fuzzed), and a peer of the previous release
reads them as it reads any format-3 message. Decoding is not its business.
"""

from __future__ import annotations

import json.encoder
import struct
from typing import Any, Final

from . import jsoncodec

__all__ = ["WebSocketMessages"]

_PREFIX: Final = struct.Struct(">BII")  # as jsoncodec: version, head length, bytes values
_U32: Final = struct.Struct(">I")  # the length of the one bytes value
_quote: Final = json.encoder.encode_basestring  # what jsoncodec's json writer quotes str with
_MARK: Final = "\ue000"  # the general path's second-pass marker: it decides on values holding it
_MAX_HEAD: Final = jsoncodec.DEFAULT_MAX_ITEMS  # a longer head: the general path bounds it
_GATHER_FROM: Final = 64 * 1024  # as wire.pack_parts: a smaller message travels as one bytes
_TEXT: Final = ("type", "text")
_BYTES: Final = ("type", "bytes")


class WebSocketMessages:
    """The data messages of one WebSocket, in format 3: ``receive`` writes the distributor's
    EVENT of a client's message, ``send`` the Node's SEND of an app's; each returns the
    message as ``wire.pack_parts`` would (bytes, or parts from 64 KiB), or None when the event
    is not of the usual shape (the caller then encodes it the general way).

    ``event_kind`` and ``send_kind`` are the wire's EVENT and SEND (given, not imported:
    ``wire`` uses this writer). A request id that is not plain ASCII letters and digits
    (every id a distributor makes is hex; a Node's comes from an untrusted envelope) gets no
    shortcut at all."""

    __slots__ = ("_receive", "_send")

    def __init__(self, request_id: str, event_kind: str, send_kind: str) -> None:
        plain = type(request_id) is str and request_id.isascii() and request_id.isalnum()
        self._receive: str | None = None
        self._send: str | None = None
        if plain:
            quoted = _quote(request_id)
            self._receive = f'[{_quote(event_kind)},{quoted},{{"type":"websocket.receive",'
            self._send = f'[{_quote(send_kind)},{quoted},[{{"type":"websocket.send",'

    def receive(self, event: Any) -> bytes | list[bytes | memoryview] | None:
        """``[EVENT, id, event]`` for a ``websocket.receive`` event, or None."""
        start = self._receive
        if start is None or type(event) is not dict or event.get("type") != "websocket.receive":
            return None
        return _write(start, "}]", event)

    def send(self, event: Any) -> bytes | list[bytes | memoryview] | None:
        """``[SEND, id, [event]]`` for a ``websocket.send`` event, or None."""
        start = self._send
        if start is None or type(event) is not dict or event.get("type") != "websocket.send":
            return None
        return _write(start, "}]]", event)


def _write(start: str, end: str, event: dict[str, Any]) -> bytes | list[bytes | memoryview] | None:
    keys = tuple(event)
    if keys == _TEXT:
        text = event["text"]
        if type(text) is not str or _MARK in text:
            return None
        head = (start + '"text":' + _quote(text) + end).encode("utf-8", "surrogatepass")
        if len(head) >= _MAX_HEAD:
            return None
        return _PREFIX.pack(jsoncodec.VERSION, len(head), 0) + head
    if keys == _BYTES:
        data = event["bytes"]
        if type(data) is not bytes:
            return None
        head = (start + '"bytes":0E0' + end).encode("ascii")
        first = _PREFIX.pack(jsoncodec.VERSION, len(head), 1) + head + _U32.pack(len(data))
        if len(first) + len(data) < _GATHER_FROM:
            return first + data
        return [first, data]  # the value not copied: it is copied once, into the write
    return None
