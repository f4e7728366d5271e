"""Unit tests for ``minidasgi.messagewriter``: the same bytes as the general path, or none."""

from __future__ import annotations

import random
from typing import Any

import pytest

from minidasgi import codec, jsoncodec, wire
from minidasgi.messagewriter import WebSocketMessages

ID = wire.new_request_id()


def general(kind: str, request_id: str, value: Any) -> bytes | None:
    """The message as the general path writes it (None: format 3 declines it)."""
    parts = jsoncodec.try_encode_parts([kind, request_id, value])
    return None if parts is None else b"".join(parts)


def fast(kind: str, request_id: str, event: Any) -> bytes | None:
    """The message as the writer writes it (None: it declines)."""
    writer = WebSocketMessages(request_id, wire.EVENT, wire.SEND)
    message = writer.receive(event) if kind == wire.EVENT else writer.send(event)
    if message is None:
        return None
    return message if isinstance(message, bytes) else b"".join(message)


def both(kind: str, event: dict[str, Any], request_id: str = ID) -> tuple[Any, Any]:
    value = event if kind == wire.EVENT else [event]
    return fast(kind, request_id, event), general(kind, request_id, value)


TEXTS = [
    "",
    "hello",
    "x" * 64,
    'quote " backslash \\ slash / null true "true": 1": Infinity":',
    "control \x00\x01\x1f\x7f tab\t newline\n",
    "é 漢字 🎉 \u2028\u2029",
    "lone surrogate \ud800 and \udfff",
    "[{[{[{" * 40 + ",:" * 100,
    "0" * 300,
    "null" * 10,
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("kind", [wire.EVENT, wire.SEND])
def test_text_is_written_as_the_general_path_writes_it(kind: str, text: str) -> None:
    event_type = "websocket.receive" if kind == wire.EVENT else "websocket.send"
    written, expected = both(kind, {"type": event_type, "text": text})
    assert written is not None
    assert written == expected
    event = {"type": event_type, "text": text}
    assert codec.decode(written) == [kind, ID, event if kind == wire.EVENT else [event]]


@pytest.mark.parametrize("size", [0, 1, 64, 1000, 64 * 1024 - 200, 64 * 1024, 200_000])
@pytest.mark.parametrize("kind", [wire.EVENT, wire.SEND])
def test_bytes_are_written_as_the_general_path_writes_them(kind: str, size: int) -> None:
    event_type = "websocket.receive" if kind == wire.EVENT else "websocket.send"
    data = bytes(random.Random(size).randrange(256) for _ in range(size))
    written, expected = both(kind, {"type": event_type, "bytes": data})
    assert written is not None
    assert written == expected


@pytest.mark.parametrize("kind", [wire.EVENT, wire.SEND])
def test_a_message_travels_as_pack_parts_would_send_it(kind: str) -> None:
    # Bytes under 64 KiB, the parts of a larger one with its value not copied.
    event_type = "websocket.receive" if kind == wire.EVENT else "websocket.send"
    writer = WebSocketMessages(ID, wire.EVENT, wire.SEND)
    write = writer.receive if kind == wire.EVENT else writer.send
    value = (lambda e: e) if kind == wire.EVENT else (lambda e: [e])
    for data in (b"small", b"x" * 100_000):
        event = {"type": event_type, "bytes": data}
        written = write(event)
        expected = wire.pack_parts(kind, ID, value(event))
        assert type(written) is type(expected)
        if isinstance(written, list):
            assert written[-1] is data
            assert b"".join(written) == b"".join(expected)  # type: ignore[arg-type]
        else:
            assert written == expected


DECLINED: list[dict[str, Any]] = [
    {"text": "x", "type": "websocket.receive"},  # keys in another order
    {"type": "websocket.receive", "text": "x", "bytes": None},
    {"type": "websocket.receive", "bytes": None, "text": "x"},
    {"type": "websocket.receive", "text": None},
    {"type": "websocket.receive", "bytes": bytearray(b"x")},
    {"type": "websocket.receive", "bytes": memoryview(b"x")},
    {"type": "websocket.receive", "text": "private use \ue000"},
    {"type": "websocket.receive", "text": "x" * (jsoncodec.DEFAULT_MAX_ITEMS + 1)},
    {"type": "websocket.disconnect", "code": 1000},
    {"type": "websocket.send", "text": "x"},  # a SEND's type in an EVENT
    {"type": "websocket.receive"},
    {"type": "websocket.receive", "text": "x", "minidasgi.more": True},
]


class Text(str):
    pass


@pytest.mark.parametrize("event", DECLINED)
def test_other_events_are_left_to_the_general_path(event: dict[str, Any]) -> None:
    assert fast(wire.EVENT, ID, event) is None


def test_a_str_subclass_is_left_to_the_general_path() -> None:
    assert fast(wire.EVENT, ID, {"type": "websocket.receive", "text": Text("x")}) is None


@pytest.mark.parametrize("request_id", ["", "a-b", 'a"b', "null", "é", "a\ue000b", "a b"])
def test_an_unusual_request_id_gets_no_shortcut(request_id: str) -> None:
    event = {"type": "websocket.receive", "bytes": b"x"}
    if request_id.isascii() and request_id.isalnum():  # "null": plain, and written alike
        assert both(wire.EVENT, event, request_id)[0] == both(wire.EVENT, event, request_id)[1]
    else:
        assert fast(wire.EVENT, request_id, event) is None


def test_fuzzed_texts_are_written_as_the_general_path_writes_them() -> None:
    rng = random.Random(10)
    alphabet = 'ab"\\/\x00\x1f\x7f{}[],:0123456789 é漢🎉\ud800\u2028nultrue'
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
        for kind in (wire.EVENT, wire.SEND):
            event_type = "websocket.receive" if kind == wire.EVENT else "websocket.send"
            written, expected = both(kind, {"type": event_type, "text": text})
            assert written == expected, text


def test_websocket_data_falls_back_to_the_general_path() -> None:
    # wire.WebSocketData: the writer when it can, pack_parts otherwise, in every format.
    event = {"type": "websocket.receive", "text": "x", "bytes": None}
    for version in (codec.RELEASED, codec.BINARY, codec.FAST):
        data = wire.WebSocketData(ID, version)
        assert data.event(event) == wire.pack_parts(wire.EVENT, ID, event, version=version)
        plain = {"type": "websocket.send", "text": "x"}
        assert data.send([plain]) == wire.pack_parts(wire.SEND, ID, [plain], version=version)
        two = [plain, plain]
        assert data.send(two) == wire.pack_parts(wire.SEND, ID, two, version=version)
