"""Unit tests for ``minidasgi.envelopereader``: the same value as the general path, or none."""

from __future__ import annotations

import dataclasses
import random
import struct
import time
from typing import Any

import pytest

from minidasgi import codec, envelopereader, jsoncodec, wire

MAX_SIZE = 1 << 24


def uvicorn_scope(**changes: Any) -> dict[str, Any]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 51000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [(b"host", b"bench")],
    }
    scope.update(changes)
    return scope


HTTPTOOLS_ORDER = (
    "type",
    "asgi",
    "http_version",
    "server",
    "client",
    "scheme",
    "root_path",
    "headers",
    "method",
    "path",
    "raw_path",
    "query_string",
)
"""The scope's keys in the order uvicorn's httptools protocol gives them."""


def httptools_scope(scope: dict[str, Any]) -> dict[str, Any]:
    """``scope`` with its keys in the order of uvicorn's httptools protocol."""
    return {key: scope[key] for key in HTTPTOOLS_ORDER}


def fields(
    scope: dict[str, Any] | None = None, events: list[Any] | None = None, **options: Any
) -> bytes:
    """An envelope's fields (its body after the preamble) as the distributor writes them."""
    if events is None:
        events = [{"type": "http.request", "body": b"", "more_body": False}]
    envelope = wire.Envelope(
        wire.new_request_id(),
        "minidasgi:0:dist:" + "ab" * 12,
        options.pop("deadline", time.time() + 30),
        uvicorn_scope() if scope is None else scope,
        events,
        **{"liveness": 1.0, "ack_send": True, **options},
    )
    data = envelope.encode()
    return data[wire._preamble(data)[2] :]


def same(a: Any, b: Any) -> bool:
    """Equal, with the same types throughout (1 == 1.0 == True, but json reads them apart)
    and dicts in the same order."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(map(same, a, b))
    if type(a) is float:
        return a.hex() == b.hex()
    return bool(a == b)


def general(data: bytes) -> Any:
    try:
        return jsoncodec.decode(data, max_size=MAX_SIZE)
    except codec.CodecError:
        return codec.CodecError


def check_read(data: bytes) -> dict[str, Any]:
    value = envelopereader.try_decode(data, max_size=MAX_SIZE)
    assert value is not None
    assert same(value, general(data))
    return value


SCOPES = [
    uvicorn_scope(),
    uvicorn_scope(headers=[]),
    uvicorn_scope(headers=[(b"h%d" % i, b"v" * i) for i in range(40)]),
    uvicorn_scope(headers=[(b'quote " backslash \\', b"\xff\x00 null 0E0")]),
    uvicorn_scope(path="/a/b;c?d=e&f", raw_path=b"/a/b", query_string=b"x=1&y=\xff"),
    uvicorn_scope(server=None, client=None),
    uvicorn_scope(server=("::1", 0), client=("unix", 999_999_999)),
    uvicorn_scope(method="POST", scheme="https", http_version="2", root_path="/root"),
]
SCOPES += [httptools_scope(scope) for scope in SCOPES]


@pytest.mark.parametrize("scope", SCOPES)
def test_usual_envelopes_are_read_as_the_general_path_reads_them(scope: dict[str, Any]) -> None:
    check_read(fields(scope))
    check_read(fields(scope))  # the second from the kept scope
    check_read(fields(scope, []))
    body = {"type": "http.request", "body": b"x" * 70_000, "more_body": True}
    check_read(fields(scope, [body]))


@pytest.mark.parametrize("scope", SCOPES)
def test_the_scope_is_read_in_the_asgi_form_when_asked(scope: dict[str, Any]) -> None:
    # asgi=True: the pairs, server and client as the tuples an ASGI server gives, the same
    # values otherwise (a Node hands the scope to its app as it is).
    data = fields(scope)
    for _ in range(2):  # the second from the kept scope
        plain = envelopereader.try_fields(data, max_size=MAX_SIZE)
        asgi = envelopereader.try_fields(data, max_size=MAX_SIZE, asgi=True)
        assert plain is not None and asgi is not None
        read = asgi[1]
        assert all(type(pair) is tuple and len(pair) == 2 for pair in read["headers"])
        assert read["server"] is None or type(read["server"]) is tuple
        assert read["client"] is None or type(read["client"]) is tuple
        lists = {
            key: [list(pair) for pair in value]
            if key == "headers"
            else (list(value) if type(value) is tuple else value)
            for key, value in read.items()
        }
        assert same(lists, plain[1])
        assert same(list(asgi[2:]), list(plain[2:])) and asgi[0] == plain[0]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"ack_send": False},
        {"confirms": True},
        {"piece": 1 << 20},
        {"unit": 16, "piece": 1 << 20, "confirms": True},
        {"window": 1024, "liveness": 0.0, "queued": 123.456},
        {"deadline": 0.5, "liveness": 1e-3, "queued": -0.0},
    ],
)
def test_the_optional_fields_are_read_as_the_general_path_reads_them(options: Any) -> None:
    check_read(fields(**options))


DECLINED = [
    fields(uvicorn_scope(path="/é")),  # not ASCII
    fields(uvicorn_scope(path='/"q"')),  # an escape
    fields(uvicorn_scope(path="/\x7f")),
    fields(uvicorn_scope(subprotocols=[])),  # another key
    fields(httptools_scope(uvicorn_scope(path='/"q"'))),
    fields(dict(reversed(list(uvicorn_scope().items())))),  # another order
    fields({"type": "http", "path": "/"}),  # another scope
    fields(uvicorn_scope(client=("h", -1))),
    fields(uvicorn_scope(client=("h", 10**10))),
    fields(events=[{"type": "http.request", "body": b"", "more_body": True}] * 2),
    fields(events=[{"type": "http.disconnect"}]),
    fields(deadline=1e20),  # an exponent
    fields(queued=1e-7),
    fields(deadline=12345678901234.5),  # a number literal past 32 characters: refused there
]


@pytest.mark.parametrize("data", DECLINED)
def test_other_envelopes_are_left_to_the_general_path(data: bytes) -> None:
    assert envelopereader.try_decode(data, max_size=MAX_SIZE) is None


def test_what_is_kept_of_scopes_is_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever may push on a queue, and a client through its path, chooses the scope texts
    the reader keeps: a long one is read, never kept."""
    monkeypatch.setattr(envelopereader, "_SCOPES", {})
    monkeypatch.setattr(envelopereader, "_last_scope", (None, envelopereader._last_scope[1]))
    for index in range(20):
        path = "/" + "p" * 60_000 + str(index)
        check_read(fields(uvicorn_scope(path=path)))
    assert envelopereader._SCOPES == {}
    check_read(fields(uvicorn_scope()))
    assert len(envelopereader._SCOPES) == 1
    assert max(map(len, envelopereader._SCOPES)) <= envelopereader._MAX_KEPT


def test_the_texts_around_the_queued_time_are_kept_once_per_distributor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests differ by their deadline and queued time: the fields around the queued time
    (the event, the window, the liveness; the optional fields) are read once and kept by
    their short texts, the queued time read each time."""
    monkeypatch.setattr(envelopereader, "_BEFORES", {})
    monkeypatch.setattr(envelopereader, "_AFTERS", {})
    monkeypatch.setattr(envelopereader, "_last_before", (None, envelopereader._last_before[1]))
    monkeypatch.setattr(envelopereader, "_last_after", (None, envelopereader._last_after[1]))
    now = time.time()
    for index in range(20):
        value = check_read(fields(deadline=now + index, queued=now - index / 7))
        assert value["queued"] == now - index / 7  # each its own
    assert len(envelopereader._BEFORES) == 1
    assert len(envelopereader._AFTERS) == 1
    check_read(fields(events=[], window=8, piece=1 << 20, confirms=True, unit=4096))
    assert len(envelopereader._BEFORES) == 2
    assert len(envelopereader._AFTERS) == 2
    assert max(map(len, [*envelopereader._BEFORES, *envelopereader._AFTERS])) < 200


class _CountedLookups(dict[bytes, Any]):
    looked_up = 0

    def get(self, key: bytes, default: Any = None) -> Any:
        self.looked_up += 1
        return super().get(key, default)


def test_a_text_like_the_last_one_is_read_without_a_table_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A route's requests come alike one after the other: a text equal to the last one read
    (a memcmp) needs no lookup in its table (which hashes the fresh slice first), and the
    value stays that of the general path whatever changes between requests."""
    tables = {name: _CountedLookups() for name in ("_SCOPES", "_BEFORES", "_AFTERS")}
    for name, table in tables.items():
        monkeypatch.setattr(envelopereader, name, table)
    for name in ("_last_scope", "_last_before", "_last_after"):  # nothing read before
        last = getattr(envelopereader, name, (None, None))
        monkeypatch.setattr(envelopereader, name, (None, last[1]), raising=False)
    now = time.time()
    for index in range(10):
        value = check_read(fields(uvicorn_scope(), deadline=now + index, queued=now - index))
        assert value["queued"] == now - index
    assert {name: table.looked_up for name, table in tables.items()} == {
        "_SCOPES": 1,
        "_BEFORES": 1,
        "_AFTERS": 1,
    }
    # Another scope, then the first one again: each looked up (and read alike) once more.
    check_read(fields(uvicorn_scope(path="/other")))
    check_read(fields(uvicorn_scope()))
    assert tables["_SCOPES"].looked_up == 3


class _CountedPattern:
    """A compiled expression that counts its calls by method."""

    def __init__(self, pattern: Any) -> None:
        self.pattern = pattern
        self.calls: dict[str, int] = {"match": 0, "fullmatch": 0}

    def match(self, *args: Any) -> Any:
        self.calls["match"] += 1
        return self.pattern.match(*args)

    def fullmatch(self, *args: Any) -> Any:
        self.calls["fullmatch"] += 1
        return self.pattern.fullmatch(*args)


def test_an_envelope_laid_out_as_the_last_one_is_read_where_its_fields_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests alike, their deadline, queued time and client port as long as the last ones:
    the texts around the queued time are compared where they were, not found again (the
    deadline read with ``fullmatch`` up to where the scope began, not searched with
    ``match``), and the values stay the general path's."""
    start = _CountedPattern(envelopereader._START)
    monkeypatch.setattr(envelopereader, "_START", start)
    now = 1_796_000_000.0
    for index in range(20):
        scope = uvicorn_scope(client=("127.0.0.1", 51000 + index))
        value = check_read(fields(scope, deadline=now + index + 0.5, queued=now - index - 0.25))
        assert value["scope"]["client"] == ["127.0.0.1", 51000 + index]
        assert (value["deadline"], value["queued"]) == (now + index + 0.5, now - index - 0.25)
    assert start.calls == {"match": 1, "fullmatch": 19}
    # Laid out otherwise (a longer deadline, a shorter queued time: the same head length),
    # or another text where the last one's was: read from scratch, as the general path.
    check_read(fields(deadline=now + 0.125, queued=now - 0.5))
    check_read(fields(deadline=now + 0.5, queued=now - 0.25, window=9))
    check_read(fields(deadline=now + 0.5, queued=now - 0.25, ack_send=False))
    assert start.calls["match"] == 4


def test_in_place_edits_of_the_last_layout_are_read_as_the_general_path_or_left_to_it() -> None:
    """Edits that keep the head's length (the layout the reader compares first): each read
    right after the envelope it edits, whose layout is then the last one."""
    rng = random.Random(20261201)
    alphabet = b'0123456789.-+eE"\\,:[]{} nultrfasx\x00\x7f'
    for base in (fields(), fields(httptools_scope(uvicorn_scope())), fields(confirms=True)):
        head_size = struct.unpack_from(">I", base, 1)[0]
        for _ in range(1500):
            data = bytearray(base)
            for _ in range(rng.randrange(1, 3)):
                data[9 + rng.randrange(head_size)] = rng.choice(alphabet)
            check_read(base)
            value = envelopereader.try_decode(bytes(data), max_size=MAX_SIZE)
            if value is not None:
                assert same(value, general(bytes(data))), bytes(data)


def test_the_bounds_are_those_of_the_general_path() -> None:
    data = fields()
    assert envelopereader.try_decode(data, max_size=len(data) - 1) is None
    assert envelopereader.try_decode(data, max_size=MAX_SIZE, max_items=10) is None
    assert envelopereader.try_decode(data, max_size=MAX_SIZE, max_depth=3) is None
    assert envelopereader.try_decode(memoryview(data), max_size=MAX_SIZE) is None


def test_uvicorn_httptools_scope_is_read_with_its_key_order_and_values_in_place() -> None:
    scope = httptools_scope(
        uvicorn_scope(headers=[(b"a", b"1"), (b"b", b"2")], raw_path=b"/r", query_string=b"q")
    )
    value = check_read(fields(scope, [{"type": "http.request", "body": b"B", "more_body": False}]))
    assert tuple(value["scope"]) == HTTPTOOLS_ORDER
    assert value["scope"]["headers"] == [[b"a", b"1"], [b"b", b"2"]]
    assert (value["scope"]["raw_path"], value["scope"]["query_string"]) == (b"/r", b"q")
    assert value["events"][0]["body"] == b"B"


def _mutations(data: bytes, rng: random.Random) -> bytes:
    """``data`` with its head edited a little (the prefix's head length kept right, or not)."""
    _, head_size, count = struct.unpack_from(">BII", data)
    head = bytearray(data[9 : 9 + head_size])
    tail = bytearray(data[9 + head_size :])
    alphabet = b'0123456789.-+eE"\\,:[]{} nultrfasx\x00\x7f\xc3\xa9'
    for _ in range(rng.randrange(1, 4)):
        where = rng.randrange(len(head) + 1)
        action = rng.randrange(3)
        if action == 0 and where < len(head):
            head[where] = rng.choice(alphabet)
        elif action == 1:
            head[where:where] = bytes([rng.choice(alphabet)])
        elif where < len(head):
            del head[where]
    if rng.random() < 0.1 and tail:
        tail[rng.randrange(len(tail))] ^= 1 << rng.randrange(8)
    if rng.random() < 0.05:
        count += rng.choice([-1, 1])
    size = len(head) if rng.random() < 0.95 else head_size
    return struct.pack(">BII", 3, size, max(count, 0)) + bytes(head) + bytes(tail)


def test_fuzzed_envelopes_are_read_as_the_general_path_reads_them_or_left_to_it() -> None:
    rng = random.Random(10)
    originals = [fields(scope) for scope in SCOPES] + [fields(events=[]), fields(confirms=True)]
    read = 0
    for _ in range(20_000):
        data = _mutations(rng.choice(originals), rng)
        value = envelopereader.try_decode(data, max_size=MAX_SIZE)
        if value is None:
            continue
        read += 1
        assert same(value, general(data)), data
    assert read > 600  # edits the reader reads: digits changed, keys or strings still plain


def _decoded(data: bytes) -> Any:
    """What ``wire.Envelope.decode`` gives for ``data``: the envelope, or the error's type
    and text."""
    try:
        return wire.Envelope.decode(data, max_size=MAX_SIZE)
    except (codec.CodecError, wire.WireError) as exc:
        return type(exc), str(exc)


def _envelope(body: bytes, request_id: str = "a" * 24, reply: str = "r") -> bytes:
    """A whole envelope (preamble and ``body``) as the distributor pushes it."""
    ids = request_id.encode()
    return (
        bytes([wire.ENVELOPE_FRAME, len(ids)]) + ids + bytes([len(reply)]) + reply.encode() + body
    )


def test_envelope_decode_checks_what_the_reader_read_as_it_checks_the_general_paths_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The usual envelope skips the type checks its reader makes moot: the same envelope, or
    # the same error, as when the general path reads it.
    rng = random.Random(12)
    originals = [fields(scope) for scope in SCOPES] + [
        fields(window=1024, liveness=0.0),
        fields(piece=1 << 20, unit=16, confirms=True),
        fields(piece=3),
    ]
    # Each range the checks left bound, just inside and just outside.
    edges = [
        fields(window=0),
        fields(window=1025),
        fields(window=999_999_999),
        fields(liveness=-0.5),
        fields(liveness=-0.0),
        fields(uvicorn_scope(type="websocket")),
        fields(uvicorn_scope(type="lifespan")),
    ]
    cases = [_envelope(data) for data in originals + edges]
    cases += [_envelope(originals[0], request_id=i) for i in ("", "x" * 64, "x" * 65)]
    cases += [_envelope(originals[0], reply=r) for r in ("", "x" * 255)]
    for _ in range(3000):
        cases.append(_envelope(_mutations(rng.choice(originals), rng)))
    read = 0
    for data in cases:
        fast = _decoded(data)
        read += (
            envelopereader.try_decode(data[wire._preamble(data)[2] :], max_size=MAX_SIZE)
            is not None
        )
        with monkeypatch.context() as patch:
            patch.setattr(envelopereader, "try_fields", lambda *args, **kwargs: None)
            general = _decoded(data)
        assert fast == general, data
    assert read > 100  # edits the reader reads: digits changed, keys or strings still plain


def test_the_usual_envelope_is_checked_without_the_general_type_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(value: Any) -> bool:
        raise AssertionError("a check the reader's types make moot")

    data = _envelope(fields())
    expected = wire.Envelope.decode(data)
    monkeypatch.setattr(wire, "isfinite", refuse)
    assert wire.Envelope.decode(data) == expected


def _outcome(data: bytes) -> Any:
    """What ``wire.Envelope.decode`` makes of ``data``: its fields, or its error."""
    try:
        envelope = wire.Envelope.decode(data, max_size=MAX_SIZE)
    except (codec.CodecError, wire.WireError) as exc:
        return [type(exc), str(exc)]
    return [getattr(envelope, f.name) for f in dataclasses.fields(envelope)]


def _edited(data: bytes, old: bytes, new: bytes) -> bytes:
    """A whole envelope with ``old`` replaced in its body's head (its length kept right)."""
    start = wire._preamble(data)[2]
    version, head_size, count = struct.unpack_from(">BII", data, start)
    head = data[start + 9 : start + 9 + head_size]
    assert old in head
    head = head.replace(old, new, 1)
    tail = data[start + 9 + head_size :]
    return data[:start] + struct.pack(">BII", version, len(head), count) + head + tail


def _whole(**options: Any) -> bytes:
    scope = options.pop("scope", None)
    envelope = wire.Envelope(
        wire.new_request_id(),
        "minidasgi:0:dist:" + "ab" * 12,
        time.time() + 30,
        uvicorn_scope() if scope is None else scope,
        [{"type": "http.request", "body": b"", "more_body": False}],
        **{"liveness": 1.0, "ack_send": True, **options},
    )
    return envelope.encode()


def test_envelopes_decode_alike_from_the_usual_fields_or_the_general_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # wire.Envelope.decode takes the usual fields as a tuple, with only the checks their
    # reader leaves open; the general path checks a dict. Same envelope, or the same error.
    rng = random.Random(11)
    originals = [_whole(scope=scope) for scope in SCOPES] + [
        _whole(confirms=True, piece=1 << 20, unit=16),
        _whole(window=1024, liveness=0.0),
        _whole(piece=1 << 30, unit=1 << 12),
        _whole(piece=3, unit=3),
    ]
    edits = [
        (b'"type":"http"', b'"type":"htto"'),
        (b'"type":"http"', b'"type":"websocket"'),
        (b'"window":8,', b'"window":0,'),
        (b'"window":8,', b'"window":1025,'),
        (b'"liveness":1.0', b'"liveness":-1.0'),
        (b'"liveness":1.0', b'"liveness":-0.0'),
        (b'"ack_send":true', b'"unit":1024,"ack_send":true'),
        (b'"ack_send":true', b'"piece":65537,"ack_send":true'),
    ]
    corpus = list(originals)
    for old, new in edits:
        corpus.append(_edited(originals[0], old, new))
    for _ in range(6000):
        data = rng.choice(originals)
        start = wire._preamble(data)[2]
        corpus.append(data[:start] + _mutations(data[start:], rng))
    taken = [0]
    try_fields = envelopereader.try_fields

    def counted(*args: Any, **kwargs: Any) -> Any:
        fields = try_fields(*args, **kwargs)
        taken[0] += fields is not None
        return fields

    monkeypatch.setattr(envelopereader, "try_fields", counted)
    usual = [_outcome(data) for data in corpus]
    monkeypatch.setattr(envelopereader, "try_fields", lambda *args, **kwargs: None)
    generally = [_outcome(data) for data in corpus]
    for data, a, b in zip(corpus, usual, generally, strict=True):
        assert same(a, b), data
    assert taken[0] > 200
    assert sum(type(o[0]) is type and o[0] is wire.WireError for o in usual) >= 6


def test_a_usual_envelope_is_decoded_without_a_dict_of_its_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a dict of the fields was built")

    # Before: try_decode built the dict, which Envelope.decode then looked each field up in.
    monkeypatch.setattr(envelopereader, "try_decode", refused)
    monkeypatch.setattr(codec, "decode", refused)
    envelope = wire.Envelope.decode(_whole(window=7), max_size=MAX_SIZE)
    assert (envelope.window, envelope.scope["path"], envelope.ack_send) == (7, "/", True)


def test_an_envelope_with_a_link_offer_is_read_by_the_usual_reader() -> None:
    offer = "10.0.0.7:40123:" + "0f" * 32
    data = fields(link=offer)
    value = check_read(data)
    assert value["link"] == offer
    assert same(value, general(data))
    assert "link" not in check_read(fields())
