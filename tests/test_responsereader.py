"""Unit tests for ``minidasgi.responsereader``: the general decoder's value, or none."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest

from minidasgi import codec, jsoncodec, responsereader, wire
from minidasgi.codec import CodecError

NODE = "minidasgi:0:node:82b515ab9ac6c3fe40465eb2"


def ack_send(
    events: list[Any] | None = None, ack: tuple[Any, ...] = (NODE, 1, 1.0), request_id: str = ""
) -> bytes:
    """An ACK_SEND as a Node packs it (``Job._post_after_ack``)."""
    if events is None:
        events = [
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"12")],
            },
            {"type": "http.response.body", "body": b"Hello World!", "more_body": False},
        ]
    message = wire.pack_parts(wire.ACK_SEND, request_id or wire.new_request_id(), events, *ack)
    assert isinstance(message, bytes)
    return message


def general(data: bytes | memoryview) -> Any:
    """What the general path makes of ``data`` (the exception's type if it refuses it)."""
    try:
        return jsoncodec.decode(data, max_size=wire.MAX_MESSAGE_SIZE)
    except CodecError as exc:
        return type(exc)


def same(fast: Any, slow: Any) -> bool:
    """Equal, down to the types (``repr`` tells True from 1, 1.0 from 1, lists from tuples)."""
    return bool(fast == slow) and repr(fast) == repr(slow)


def test_the_usual_ack_send_is_read_without_the_general_decoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = ack_send()
    expected = general(data)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the general decoder was used")

    monkeypatch.setattr(codec, "decode", refuse)
    monkeypatch.setattr(jsoncodec, "decode", refuse)
    kind, request_id, args = wire.unpack(data)
    assert same([kind, request_id, *args], expected)
    # And from a batch frame, where messages are memoryviews.
    (view,) = wire.split_frame(wire.batch_frame([data]))[:1]
    assert isinstance(view, memoryview)
    assert same(list(wire.unpack(view)[2]), expected[2:])


@pytest.mark.parametrize(
    "events, ack",
    [
        (None, (NODE, 1, 1.0)),
        (None, (NODE, 8, 0.25, False, 524288)),
        (None, (NODE, 8, 2.5, False, 524288, 1024)),
        ([{"type": "http.response.start", "status": 404, "headers": []},
          {"type": "http.response.body", "body": b""}], (NODE, 1, 1.0)),
        ([{"type": "http.response.start", "status": 0, "headers": [(b"", b"")]},
          {"type": "http.response.body", "body": b"x" * 1000, "more_body": True}],
         (NODE, 1024, 10.0)),
    ],
)  # fmt: skip
def test_usual_shapes_take_the_fast_path_with_the_general_value(
    events: list[Any] | None, ack: tuple[Any, ...]
) -> None:
    data = ack_send(events, ack)
    fast = responsereader.try_decode(data)
    assert fast is not None
    assert same(fast, general(data))
    assert same(responsereader.try_decode(memoryview(data)), fast)
    assert wire.ack_of_ack_send(fast[2:]) == fast[3:]  # the distributor takes it unchecked


@pytest.mark.parametrize(
    "events, ack",
    [
        # Asking for a confirmation (the distributor refuses such an ACK_SEND, after decoding).
        (None, (NODE, 1, 1.0, True)),
        # A trailers flag, an extra key, a body event first, a third event.
        ([{"type": "http.response.start", "status": 200, "headers": [], "trailers": True},
          {"type": "http.response.body", "body": b""}], (NODE, 1, 1.0)),
        ([{"type": "http.response.start", "status": 200, "headers": [], "x": 1},
          {"type": "http.response.body", "body": b""}], (NODE, 1, 1.0)),
        ([{"type": "http.response.body", "body": b""}], (NODE, 1, 1.0)),
        (None, (NODE, 1, 1)),  # an int liveness
        (None, ('node"with\\escapes', 1, 1.0)),
        (None, ("nodé", 1, 1.0)),
        (None, (NODE, -1, 1.0)),
        (None, (NODE, 10**12, 1.0)),
        (None, (NODE, 1, 1e-05)),
        ([{"type": "http.response.start", "status": True, "headers": []},
          {"type": "http.response.body", "body": b""}], (NODE, 1, 1.0)),
        ([{"type": "http.response.start", "status": 200, "headers": [("a", "b")]},
          {"type": "http.response.body", "body": b""}], (NODE, 1, 1.0)),
    ],
)  # fmt: skip
def test_other_shapes_are_left_to_the_general_path(
    events: list[Any] | None, ack: tuple[Any, ...]
) -> None:
    data = ack_send(events, ack)
    assert responsereader.try_decode(data) is None
    assert general(data) is not CodecError  # valid all the same: the general path reads it


@pytest.mark.parametrize("request_id", ['ab"c', "ab\\c", "é", "a\x01", " "])
def test_an_id_json_would_escape_is_left_to_the_general_path(request_id: str) -> None:
    responsereader.try_decode(ack_send())  # the usual rest, known already
    data = ack_send(request_id=request_id)
    assert responsereader.try_decode(data) is None
    assert general(data)[1] == request_id  # valid all the same


_NO_LAST = (responsereader._ID_START, b"", (0, 0, None, ()))  # as the module starts


def test_answers_alike_but_for_their_ids_are_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[bytes] = []
    real = responsereader._template

    def spy(rest: bytes) -> Any:
        read.append(rest)
        return real(rest)

    monkeypatch.setattr(responsereader, "_template", spy)
    monkeypatch.setattr(responsereader, "_TEMPLATES", {})
    monkeypatch.setattr(responsereader, "_LAST", [_NO_LAST])
    messages = [ack_send() for _ in range(5)]  # five requests, five ids
    for data in messages:
        assert same(responsereader.try_decode(data), general(data))
    assert len(read) == 1  # the expression ran for the first only; the others matched its text
    other = ack_send(ack=(NODE, 8, 1.0))
    assert same(responsereader.try_decode(other), general(other))
    assert len(read) == 2


class _CountedPattern:
    """A compiled expression whose ``match`` calls are counted."""

    def __init__(self, pattern: Any) -> None:
        self.pattern = pattern
        self.calls = 0

    def match(self, *args: Any) -> Any:
        self.calls += 1
        return self.pattern.match(*args)


class _CountedDict(dict[bytes, Any]):
    """The templates kept, whose ``get`` calls (the look-ups) are counted."""

    looked_up = 0

    def get(self, key: bytes, default: Any = None) -> Any:
        self.looked_up += 1
        return super().get(key, default)


def test_the_same_nodes_next_answers_take_no_expression(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the id differs from the last answer's head: its id's end and its rest are checked
    # in place, with neither the expression for the start and the id nor a look-up.
    counted = _CountedPattern(responsereader._START_AND_ID)
    templates = _CountedDict()
    monkeypatch.setattr(responsereader, "_START_AND_ID", counted)
    monkeypatch.setattr(responsereader, "_TEMPLATES", templates)
    monkeypatch.setattr(responsereader, "_LAST", [_NO_LAST], raising=False)
    for _ in range(5):
        data = ack_send()
        assert same(responsereader.try_decode(data), general(data))
    assert (counted.calls, templates.looked_up) == (1, 1)
    # Another Node (another rest), then the first again: an id of the same length takes no
    # expression; the rest is looked up each time it changes.
    for ack in ((NODE + "x", 1, 1.0), (NODE, 1, 1.0), (NODE, 1, 1.0)):
        data = ack_send(ack=ack)
        assert same(responsereader.try_decode(data), general(data))
    assert (counted.calls, templates.looked_up) == (1, 3)
    # An id of another length: the expression finds its end, and the rest is looked up.
    for request_id in ("a" * 25, "a" * 23):
        data = ack_send(request_id=request_id)
        assert same(responsereader.try_decode(data), general(data))
    assert (counted.calls, templates.looked_up) == (3, 5)


def _grown(data: bytes, extra: bytes) -> bytes:
    """``data`` with ``extra`` after its head, the prefix's head length grown to hold it."""
    version, head_size, count = struct.unpack_from(">BII", data)
    head_end = 9 + head_size
    prefix = struct.pack(">BII", version, head_size + len(extra), count)
    return prefix + data[9:head_end] + extra + data[head_end:]


def test_after_a_usual_answer_another_start_is_not_read_as_one() -> None:
    assert responsereader.try_decode(ack_send()) is not None  # the last rest now
    data = ack_send().replace(b'["ack-send","', b'["ack-sent","', 1)
    assert general(data)[0] == "ack-sent"
    assert responsereader.try_decode(data) is None


def test_after_a_usual_answer_a_head_longer_than_its_rest_is_not_read_as_one() -> None:
    assert responsereader.try_decode(ack_send()) is not None
    data = _grown(ack_send(), b"x")  # head_size + 1, b"x" after the rest's "]"
    assert not isinstance(general(data), list)
    assert responsereader.try_decode(data) is None
    # The same length, its last byte another: the whole rest is compared, to its end.
    usual = ack_send()
    head_end = 9 + struct.unpack_from(">I", usual, 1)[0]
    data = usual[: head_end - 1] + b"}" + usual[head_end:]
    assert general(data) is CodecError
    assert responsereader.try_decode(data) is None


def test_after_a_usual_answer_a_head_ending_before_the_last_ids_end_is_refused() -> None:
    # Shorter than the last id's end: nothing read past the head (nor past the message).
    assert responsereader.try_decode(ack_send()) is not None
    data = jsoncodec.encode(["ack-send", "ab"])
    assert isinstance(data, bytes) and len(data) < 9 + 13 + 24
    assert general(data) == ["ack-send", "ab"]
    assert responsereader.try_decode(data) is None


@pytest.mark.parametrize(
    "request_id",
    ["a" * 23 + '"', "a" * 23 + "\\", "a" * 23 + " ", "a" * 23 + "\x7f", "a" * 22 + "é", "-" * 24],
)
def test_an_id_of_the_last_ones_length_is_read_as_json_reads_it(request_id: str) -> None:
    # In place of an id of letters and digits, what json would escape is refused, and what
    # it reads unchanged (but for letters and digits) is read by the expression.
    usual = ack_send()
    assert responsereader.try_decode(usual) is not None  # its rest now the last one
    data = ack_send(request_id=request_id)
    fast = responsereader.try_decode(data)
    if fast is None:
        assert request_id[-1] in '"\\ \x7f' or not request_id.isascii()
        assert general(data)[1] == request_id  # valid all the same
    else:
        assert request_id == "-" * 24
        assert same(fast, general(data))


def test_the_templates_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(responsereader, "_TEMPLATES", {})
    for window in range(1, 3 * responsereader._MAX_TEMPLATES):
        data = ack_send(ack=(NODE, window, 1.0))
        assert same(responsereader.try_decode(data), general(data))
        assert len(responsereader._TEMPLATES) <= responsereader._MAX_TEMPLATES


def test_what_is_kept_of_a_hostile_peer_s_answers_is_small(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Anyone who may publish on a distributor's channel chooses the heads it keeps: only
    heads of a bounded size are (at most 31 headers, a channel of at most 255 characters);
    larger ones are still read, by the general path."""
    monkeypatch.setattr(responsereader, "_TEMPLATES", {})
    many = [(b"x", b"y")] * 2000
    start = {"type": "http.response.start", "status": 200}
    body = {"type": "http.response.body", "body": b"", "more_body": False}
    hostile = [
        ack_send([{**start, "headers": many}, body], ack=(NODE, window, 1.0))
        for window in range(1, 50)
    ] + [ack_send(ack=("c" * 60_000 + str(window), 1, 1.0)) for window in range(50)]
    for data in hostile:
        assert responsereader.try_decode(data) is None
        assert not same(general(data), CodecError)
    assert responsereader._TEMPLATES == {}
    widest = ack_send([{**start, "headers": [(b"x", b"y")] * 31}, body], ack=("c" * 255, 1, 1.0))
    assert same(responsereader.try_decode(widest), general(widest))
    assert max(len(rest) for rest in responsereader._TEMPLATES) < 1024


def test_bounds_are_the_callers() -> None:
    data = ack_send()
    assert responsereader.try_decode(data, max_size=len(data) - 1) is None
    assert responsereader.try_decode(data, max_depth=4) is None
    assert responsereader.try_decode(data, max_items=10) is None
    assert responsereader.try_decode(bytearray(data)) is None  # another buffer: the usual path


def _mutations(rng: random.Random, data: bytes) -> bytes:
    """``data`` with a few bytes changed, inserted, deleted, or its tail cut."""
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        if not out:
            break
        roll = rng.random()
        where = rng.randrange(len(out))
        if roll < 0.4:
            out[where] = rng.choice(b'0123456789[]{},:"\\Eeantrufls.- \x00\xff')
        elif roll < 0.6:
            out.insert(where, rng.choice(b'0123456789[]{},:"\\E .-'))
        elif roll < 0.8:
            del out[where]
        elif roll < 0.9:
            out[where] = rng.randrange(256)
        else:
            del out[where:]
    return bytes(out)


def _random_events(rng: random.Random) -> list[Any]:
    headers = [
        (rng.randbytes(rng.randrange(5)), rng.randbytes(rng.randrange(5)))
        for _ in range(rng.randrange(4))
    ]
    body: dict[str, Any] = {"type": "http.response.body", "body": rng.randbytes(rng.randrange(9))}
    if rng.random() < 0.7:
        body["more_body"] = rng.random() < 0.5
    status = rng.choice([200, 0, 404, 599, 1000000000, -1])
    return [{"type": "http.response.start", "status": status, "headers": headers}, body]


def test_fuzzed_messages_give_the_general_value_or_none() -> None:
    rng = random.Random(10)
    taken = mutated = 0
    for i in range(6000):
        ack: tuple[Any, ...] = (NODE, rng.choice([1, 8, 0]), rng.choice([1.0, 0.5, 2.25]))
        if rng.random() < 0.3:
            ack += (rng.choice([False, True]), rng.choice([524288, 131072, 0]))
            if rng.random() < 0.5:
                ack += (1024,)
        data = ack_send(_random_events(rng), ack)
        if i % 3:
            # Its rest the last one (when read): the mutation meets the in-place checks.
            responsereader.try_decode(data, max_size=wire.MAX_MESSAGE_SIZE)
            data = _mutations(rng, data)
        fast = responsereader.try_decode(data, max_size=wire.MAX_MESSAGE_SIZE)
        if fast is None:
            continue
        taken += 1
        mutated += i % 3 != 0
        assert same(fast, general(data)), data
        assert same(responsereader.try_decode(memoryview(data)), fast)
        # For the distributor: the same value, but for the start's header pairs as tuples.
        tupled = responsereader.try_decode(data, max_size=wire.MAX_MESSAGE_SIZE, tuples=True)
        fast[2][0]["headers"] = [tuple(pair) for pair in fast[2][0]["headers"]]
        assert same(tupled, fast), data
        # What the distributor takes as it is, unchecked: what the check would give.
        assert wire.ack_of_ack_send(fast[2:]) == fast[3:], data
        # And in the parts it takes them as: the id, the events, the ACK's arguments.
        parts = responsereader.try_parts(data, max_size=wire.MAX_MESSAGE_SIZE, tuples=True)
        assert parts is not None and type(parts[2]) is tuple
        assert same(["ack-send", parts[0], parts[1], *parts[2]], tupled), data
    # The fuzz reaches the fast path, not only its refusals, mutated messages included.
    assert taken > 1000 and mutated > 100, (taken, mutated)


def _headers_handed(data: bytes) -> list[Any]:
    parts = responsereader.try_parts(data, max_size=wire.MAX_MESSAGE_SIZE, tuples=True)
    assert parts is not None
    headers: list[Any] = parts[1][0]["headers"]
    return headers


def test_the_same_headers_as_the_last_answers_are_handed_in_a_new_list() -> None:
    first = _headers_handed(ack_send())
    first.append((b"x", b"y"))  # the server's to change: the next answer's are its own
    second = _headers_handed(ack_send())
    assert second == [(b"content-type", b"text/plain"), (b"content-length", b"12")]
    assert second is not first
    # The pairs themselves (immutable) are the last ones': not cut from the tail again.
    assert all(a is b for a, b in zip(second, first, strict=False))
    # Headers of the same lengths but other bytes are read for themselves.
    events = [
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/html!"), (b"content-length", b"12")],
        },
        {"type": "http.response.body", "body": b"Hello World!", "more_body": False},
    ]
    third = _headers_handed(ack_send(events))
    assert third == [(b"content-type", b"text/html!"), (b"content-length", b"12")]


def test_fuzzed_answers_of_alike_headers_give_the_general_value() -> None:
    # Headers drawn from a few of equal lengths, so that an answer often has the last one's
    # lengths, or its bytes, or both.
    rng = random.Random(16)
    names = [b"ab", b"cd", b"abc"]
    kept = 0
    headers: list[Any] = []
    for _ in range(3000):
        if rng.random() < 0.5:  # the last answer's again, or others
            headers = [
                (rng.choice(names), rng.choice(names)) for _ in range(rng.choice([0, 1, 2, 2, 2]))
            ]
        body = {"type": "http.response.body", "body": rng.choice([b"", b"ab", b"abcd"])}
        events = [{"type": "http.response.start", "status": 200, "headers": headers}, body]
        data = ack_send(events)
        before = responsereader._HEADERS[0]
        parts = responsereader.try_parts(data, max_size=wire.MAX_MESSAGE_SIZE, tuples=True)
        assert parts is not None
        handed = parts[1][0]["headers"]
        kept += bool(handed and before[2]) and handed[0] is before[2][0]
        expected = general(data)
        expected[2][0]["headers"] = [tuple(pair) for pair in expected[2][0]["headers"]]
        assert same(["ack-send", parts[0], parts[1], *parts[2]], expected), data
        handed.append((b"z", b"z"))  # the server's own list
    assert kept > 300
