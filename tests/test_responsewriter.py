"""Unit tests for ``minidasgi.responsewriter``: the same bytes as the general path, or none."""

from __future__ import annotations

import enum
import math
import random
from typing import Any

import pytest

from minidasgi import codec, jsoncodec, responsewriter, wire
from minidasgi.responsewriter import try_write, try_write_body

ID = wire.new_request_id()
ACK = ("minidasgi:0:node:" + "ab" * 12, 1, 1.0)  # a Node's usual ACK: channel, window, liveness


def general(kind: str, request_id: str, events: Any, tail: tuple[Any, ...]) -> bytes | None:
    """The message as the general path writes it (None: format 3 declines it)."""
    parts = jsoncodec.try_encode_parts([kind, request_id, events, *tail])
    return None if parts is None else b"".join(parts)


def fast(kind: str, request_id: str, events: Any, tail: tuple[Any, ...]) -> bytes | None:
    """The message as the writer writes it (None: it declines). Whenever ``events`` ends with
    a body event of the usual keys and type (exactly: str, not a subclass), ``try_write_body``
    given its start, body and flag writes the same (or declines too)."""
    message = try_write(kind, request_id, events, tail)
    written = None if message is None else _joined(message)
    if (
        type(events) is list
        and len(events) in (1, 2)
        and type(events[-1]) is dict
        and list(events[-1]) == ["type", "body", "more_body"]
        and all(type(key) is str for key in events[-1])
        and type(events[-1]["type"]) is str
        and events[-1]["type"] == "http.response.body"
        and not (len(events) == 2 and events[0] is None)  # None there means no start
    ):
        start = events[0] if len(events) == 2 else None
        event = events[-1]
        parts = try_write_body(kind, request_id, start, event["body"], event["more_body"], tail)
        assert (None if parts is None else _joined(parts)) == written
    return written


def _joined(message: bytes | list[bytes | memoryview]) -> bytes:
    return message if isinstance(message, bytes) else b"".join(message)


def start(status: Any = 200, headers: Any = None) -> dict[str, Any]:
    if headers is None:
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"12")]
    return {"type": "http.response.start", "status": status, "headers": headers}


def body(data: Any = b"Hello World!", more: Any = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


def check_written(events: Any, tail: tuple[Any, ...] = ACK, kind: str = wire.ACK_SEND) -> bytes:
    """Assert the writer writes ``events`` exactly as the general path does, and that the
    message decodes to what was written."""
    written = fast(kind, ID, events, tail)
    assert written is not None
    assert written == general(kind, ID, events, tail)
    expected = [
        {key: bytes(v) if isinstance(v, memoryview) else v for key, v in event.items()}
        for event in events
    ]
    for event in expected:
        if "headers" in event:
            event["headers"] = [list(pair) for pair in event["headers"]]
    assert codec.decode(written) == [kind, ID, expected, *tail]
    return written


HEADERS: list[Any] = [
    [],
    [(b"content-type", b"text/plain")],
    [[b"x-list", b"pair"]],
    ((b"a", b"b"), [b"c", b"d"]),  # a tuple of pairs: json writes it as a list
    [(b'quote " backslash \\', b"null true 0E0 \xee\x80\x80 \\u0000")],
    [("é 漢字".encode(), b"\xff\xfe\x00\x01\x80")],
    [(b"", b"")],
    [(b"x-%d" % i, b"v" * i) for i in range(40)],  # more than the table of pair texts
]


@pytest.mark.parametrize("headers", HEADERS)
@pytest.mark.parametrize("kind", [wire.ACK_SEND, wire.SEND])
def test_a_start_and_body_are_written_as_the_general_path_writes_them(
    kind: str, headers: Any
) -> None:
    tail = ACK if kind == wire.ACK_SEND else ()
    check_written([start(200, headers), body()], tail, kind)
    check_written([start(404, headers), body(b"", more=True)], tail, kind)


@pytest.mark.parametrize("status", [0, 1, 200, 599, -1, 10**17, 10**18 - 1, -(10**18) + 1])
def test_statuses_are_written_as_the_general_path_writes_them(status: int) -> None:
    check_written([start(status), body()])


@pytest.mark.parametrize("size", [0, 1, 64 * 1024 - 300, 64 * 1024, 200_000])
def test_bodies_are_written_as_the_general_path_writes_them(size: int) -> None:
    data = bytes(random.Random(size).randrange(256) for _ in range(size))
    check_written([start(), body(data)])
    check_written([body(data, more=True)], (), wire.SEND)
    check_written([start(), body(memoryview(data)[1:])])  # a piece cut from a larger body


ACK_TAILS: list[tuple[Any, ...]] = [
    (),
    ACK,
    (*ACK, False, 1024 * 1024),
    (*ACK, False, 1024 * 1024, 16),
    (*ACK, True),
    ('a " quote \\ backslash', 0, 0.1),
    ("é 漢字 🎉 \u2028 \x00\x1f\x7f", 10**17, 1e-300),
    ("lone surrogate \ud800 and \udfff", -5, 1e300),
    ('null "null": "true": Infinity": 1": NaN', 3, -0.0),
    ("", 1, 5),  # a liveness given as an int
]


@pytest.mark.parametrize("tail", ACK_TAILS)
def test_ack_arguments_are_written_as_the_general_path_writes_them(tail: tuple[Any, ...]) -> None:
    check_written([start(), body()], tail)


def test_equal_values_of_other_types_or_signs_are_not_written_from_one_template() -> None:
    # The text around the id is kept by what it is written from: 1 == 1.0 == True and
    # 0.0 == -0.0, but json writes each its own way.
    channel = ACK[0]
    for tail in [
        (channel, 1, 1.0),
        (channel, True, 1.0),
        (channel, 1, 1),
        (channel, 1.0, True),
        (channel, 1, 0.0),
        (channel, 1, -0.0),
        (channel, 1, 0.0),
        (channel, 0, False),
    ]:
        for events in ([start(), body()], [start(1), body()], [body(more=True)]):
            check_written(events, tail)


def test_the_kept_templates_are_bounded() -> None:
    for status in range(1000):
        check_written([start(status), body()])
    assert 0 < len(responsewriter._TEMPLATES) <= 256


def test_a_message_travels_as_pack_parts_would_send_it() -> None:
    # Bytes under 64 KiB, the parts of a larger one with its body not copied; a view of a
    # mutable buffer copied at once.
    mutable = bytearray(b"m" * 100_000)
    for data in (b"small", b"x" * 100_000, memoryview(b"y" * 100_000)[5:], memoryview(mutable)):
        events = [start(), body(data)]
        written = wire.pack_response(wire.ACK_SEND, ID, events, ACK)
        expected = wire.pack_parts(wire.ACK_SEND, ID, events, *ACK)
        assert type(written) is type(expected)
        if isinstance(written, list):
            assert written[-1] is data
            assert b"".join(written) == b"".join(expected)  # type: ignore[arg-type]
        else:
            assert written == expected
    mutable[:] = b"n" * len(mutable)  # a copy was taken: the message is unchanged
    assert written == expected


def test_a_small_body_behind_large_headers_travels_as_parts() -> None:
    # The body under 64 KiB is joined with the rest, the headers take the message past it:
    # parts, as pack_parts sends them, the body the very object given.
    data = b"small"
    events = [start(headers=[(b"x-large", b"h" * 70_000)]), body(data)]
    written = wire.pack_response(wire.ACK_SEND, ID, events, ACK)
    expected = wire.pack_parts(wire.ACK_SEND, ID, events, *ACK)
    assert isinstance(written, list) and isinstance(expected, list)
    assert written[-1] is data
    assert b"".join(written) == b"".join(expected)


def test_the_last_tail_is_known_by_identity_not_by_equality() -> None:
    # The writer skips its key for the tail it wrote last, known by identity: an equal tail
    # of other types (True == 1 == 1.0) is written as itself, not as the last one's text.
    channel = ACK[0]
    first = (channel, 1, 1.0)
    equal = (channel, True, 1)
    for events in ([start(), body()], [body(more=True)]):
        for tail in (first, first, equal, equal, first, (channel, 1.0, True), first):
            check_written(events, tail)


class Status(enum.IntEnum):
    OK = 200


class Text(str):
    pass


DECLINED: list[tuple[list[Any], tuple[Any, ...]]] = [
    ([start(), body(), body()], ACK),
    ([], ACK),
    ([start()], ACK),  # a start alone
    ([body(), start()], ACK),
    ([None, body()], ACK),  # None as a start: try_write_body would write the body alone
    ([{"status": 200, "type": "http.response.start", "headers": []}, body()], ACK),
    ([{"type": "http.response.start", "status": 200}, body()], ACK),  # no headers
    ([dict(start(), trailers=False), body()], ACK),
    ([dict(start(), trailers=True), body()], ACK),
    ([dict(start(), extra=None), body()], ACK),
    ([start(True), body()], ACK),
    ([start(Status.OK), body()], ACK),
    ([start(200.0), body()], ACK),
    ([start("200"), body()], ACK),
    ([start(10**18), body()], ACK),
    ([start(10**200), body()], ACK),
    ([start(headers=[(b"a", bytearray(b"b"))]), body()], ACK),
    ([start(headers=[(b"a", memoryview(b"b"))]), body()], ACK),
    ([start(headers=[(b"a", "b")]), body()], ACK),
    ([start(headers=[(b"a", b"b", b"c")]), body()], ACK),
    ([start(headers=[b"ab"]), body()], ACK),
    ([start(headers=b"ab"), body()], ACK),
    ([start(headers={b"a": b"b"}), body()], ACK),
    ([start(), body(bytearray(b"x"))], ACK),
    ([start(), body(memoryview(b"abcd")[::2])], ACK),  # not contiguous
    ([start(), body(memoryview(b"abcd").cast("i"))], ACK),  # items of 4 bytes
    ([start(), body("text")], ACK),
    ([start(), body(None)], ACK),
    ([start(), body(more=1)], ACK),
    ([start(), body(more=None)], ACK),
    ([start(), {"type": "http.response.body", "body": b"x"}], ACK),
    ([start(), {"body": b"x", "type": "http.response.body", "more_body": False}], ACK),
    ([start(), dict(body(), extra=1)], ACK),
    ([dict(start(), type="http.response.body"), body()], ACK),
    ([start(), dict(body(), type="http.response.trailers")], ACK),
    ([dict(start(), type=Text("http.response.start")), body()], ACK),
    ([start(), dict(body(), type=Text("http.response.body"))], ACK),
    ([{Text("type"): "http.response.start", "status": 200, "headers": []}, body()], ACK),
    ([start(), {"type": "websocket.send", "bytes": b"x"}], ACK),
    ([start(), body()], (*ACK[:2], math.nan)),
    ([start(), body()], (*ACK[:2], math.inf)),
    ([start(), body()], (*ACK[:1], 10**18, 1.0)),
    ([start(), body()], (*ACK, None)),
    ([start(), body()], (*ACK, [1])),
    ([start(), body()], ("private use \ue000", 1, 1.0)),
    ([start(), body()], (Text("channel"), 1, 1.0)),
    ([start(headers=[(b"x", b"y")] * 20_000), body()], ACK),  # a head to bound the general way
]


@pytest.mark.parametrize(("events", "tail"), DECLINED)
def test_other_messages_are_left_to_the_general_path(
    events: list[Any], tail: tuple[Any, ...]
) -> None:
    assert fast(wire.ACK_SEND, ID, events, tail) is None
    # wire.pack_response then writes what pack_parts writes, whatever that is.
    try:
        expected = wire.pack_parts(wire.ACK_SEND, ID, events, *tail)
    except (codec.CodecError, TypeError, ValueError) as exc:
        with pytest.raises(type(exc)):
            wire.pack_response(wire.ACK_SEND, ID, events, tail)
    else:
        assert wire.pack_response(wire.ACK_SEND, ID, events, tail) == expected


def test_events_that_are_not_a_list_are_left_to_the_general_path() -> None:
    assert fast(wire.SEND, ID, (start(), body()), ()) is None


@pytest.mark.parametrize("request_id", ["", "a-b", 'a"b', "null", "é", "a\ue000b", "a b"])
def test_an_unusual_request_id_gets_no_shortcut(request_id: str) -> None:
    events = [start(), body()]
    if request_id.isascii() and request_id.isalnum():  # "null": plain, and written alike
        assert fast(wire.SEND, request_id, events, ()) == general(wire.SEND, request_id, events, ())
    else:
        assert fast(wire.SEND, request_id, events, ()) is None


def test_other_formats_take_the_general_path() -> None:
    events = [start(), body()]
    for version in (codec.RELEASED, codec.BINARY):
        expected = wire.pack_parts(wire.ACK_SEND, ID, events, *ACK, version=version)
        assert wire.pack_response(wire.ACK_SEND, ID, events, ACK, version=version) == expected


def _fuzzed_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            0,
            -1,
            200,
            10**17,
            10**18,
            10**40,
            True,
            False,
            None,
            0.5,
            1e-7,
            0.0,
            -0.0,
            1.0,
            math.nan,
            -math.inf,
            Status.OK,
            "",
            "null",
            'a"b\\c',
            "\ud800",
            "\ue000",
            "é漢🎉",
            "0E0",
            b"",
            b"x" * rng.randrange(200),
            bytearray(b"ab"),
            memoryview(b"abc"),
            [],
            [b"a", b"b"],
            Text("x"),
        ]
    )


def _fuzzed_bytes(rng: random.Random) -> Any:
    data = bytes(rng.randrange(256) for _ in range(rng.randrange(20)))
    return rng.choice(
        [data, data, data, data, bytearray(data), memoryview(data), data.decode("latin-1")]
    )


def test_fuzzed_responses_are_written_as_the_general_path_writes_them() -> None:
    rng = random.Random(10)
    written_count = 0
    for _ in range(3000):
        headers: Any = [
            rng.choice([tuple, list])(
                _fuzzed_bytes(rng) for _ in range(rng.choice([2, 2, 2, 1, 3]))
            )
            for _ in range(rng.randrange(5))
        ]
        if rng.random() < 0.1:
            headers = tuple(headers)
        first: dict[str, Any] = {
            "type": rng.choice(["http.response.start"] * 8 + ["http.response.body", Text("x")]),
            "status": rng.choice([200, 404, 0, 10**18 - 1])
            if rng.random() < 0.8
            else _fuzzed_value(rng),
            "headers": headers,
        }
        if rng.random() < 0.1:
            first["trailers"] = rng.choice([True, False])
        if rng.random() < 0.05:
            first = dict(reversed(first.items()))
        last: dict[str, Any] = {
            "type": "http.response.body",
            "body": _fuzzed_bytes(rng) if rng.random() < 0.9 else _fuzzed_value(rng),
            "more_body": rng.choice([True, False]) if rng.random() < 0.9 else _fuzzed_value(rng),
        }
        if rng.random() < 0.05:
            last[rng.choice(["extra", "trailers"])] = _fuzzed_value(rng)
        events = [first, last] if rng.random() < 0.8 else [last]
        tail: tuple[Any, ...] = tuple(
            _fuzzed_value(rng) if rng.random() < 0.3 else rng.choice([*ACK, False, 16])
            for _ in range(rng.randrange(7))
        )
        written = fast(wire.ACK_SEND, ID, events, tail)
        if written is None:
            continue
        written_count += 1
        assert written == general(wire.ACK_SEND, ID, events, tail), (events, tail)
    assert written_count > 250  # the fuzzing reached the writer often enough to mean something
