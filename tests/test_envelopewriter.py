"""Unit tests for ``minidasgi.envelopewriter``: the same bytes as the general path, or none."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import math
import random
import time
from typing import Any
from unittest import mock

import pytest

from minidasgi import codec, envelopewriter, jsoncodec, memo, wire
from minidasgi.codec import CodecError


def uvicorn_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 51234),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": "/hello",
        "raw_path": b"/hello",
        "query_string": b"a=1",
        "headers": [(b"host", b"bench"), (b"accept", b"*/*")],
    }


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
"""The scope's keys in the order uvicorn's httptools protocol gives them (it makes the scope at
the request line's start, and adds the method and the paths once the URL is parsed)."""


def httptools_scope() -> dict[str, Any]:
    scope = uvicorn_scope()
    return {key: scope[key] for key in HTTPTOOLS_ORDER}


def envelope(scope: dict[str, Any], events: list[Any] | None = None, **extra: Any) -> wire.Envelope:
    now = time.time()
    value = wire.Envelope(
        id="a" * 24,
        reply="minidasgi:0:distributor:x",
        deadline=now + 5.0,
        scope=scope,
        events=[{"type": "http.request", "body": b"", "more_body": False}]
        if events is None
        else events,
        liveness=2.0,
        queued=now,
        confirms=True,
        ack_send=True,
    )
    for name, field in extra.items():
        setattr(value, name, field)
    return value


def general(value: wire.Envelope) -> bytes | None:
    """The envelope's body as the general path writes it (None: it declines or refuses)."""
    try:
        parts = jsoncodec.try_encode_parts(value.fields())
    except CodecError:
        return None
    return None if parts is None else b"".join(parts)


class Spy:
    """Records what ``envelopewriter.try_encode_parts`` returned to ``Envelope.encode``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.written: bytes | None = None
        self.calls = 0
        real = envelopewriter.try_encode_parts

        def spy(*args: Any) -> list[bytes] | None:
            parts = real(*args)
            self.calls += 1
            self.written = None if parts is None else b"".join(parts)
            return parts

        monkeypatch.setattr(envelopewriter, "try_encode_parts", spy)


@pytest.mark.parametrize("make_scope", [uvicorn_scope, httptools_scope])
def test_the_usual_envelope_takes_the_fast_path_with_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch, make_scope: Any
) -> None:
    spy = Spy(monkeypatch)
    value = envelope(make_scope())
    data = value.encode()
    assert spy.written is not None
    assert spy.written == general(value)
    assert data.endswith(spy.written)
    decoded = jsoncodec.decode(spy.written)
    assert decoded["scope"]["headers"] == [[b"host", b"bench"], [b"accept", b"*/*"]]
    assert decoded["deadline"] == value.deadline


def test_envelope_encode_skips_the_general_writer_for_the_usual_scope(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    envelope = wire.Envelope(
        id="a" * 24,
        reply="minidasgi:0:distributor:x",
        deadline=time.time() + 5,
        scope=uvicorn_scope(),
        events=[{"type": "http.request", "body": b"hi", "more_body": False}],
        liveness=2.0,
        queued=time.time(),
        confirms=True,
        ack_send=True,
    )
    expected = envelope.encode()

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the general writer was used")

    monkeypatch.setattr(codec, "encode", refuse)
    monkeypatch.setattr(jsoncodec, "try_encode_parts", refuse)
    assert envelope.encode() == expected
    decoded = wire.Envelope.decode(expected)
    assert decoded.scope["path"] == "/hello" and decoded.events[0]["body"] == b"hi"
    assert (decoded.deadline, decoded.queued) == (envelope.deadline, envelope.queued)


def test_an_unusual_envelope_still_encodes_through_the_general_path() -> None:
    scope = uvicorn_scope()
    scope["extensions"] = {}  # not a key the fast path knows
    envelope = wire.Envelope(
        id="b" * 24, reply="r", deadline=1.5, scope=scope, events=[{"type": "x", "n": None}]
    )
    decoded = wire.Envelope.decode(envelope.encode())
    assert decoded.scope["extensions"] == {} and decoded.events == [{"type": "x", "n": None}]


_STRINGS = [
    "",
    "null",
    "x null y",
    "\ue000",
    '"',
    "\\",
    '\\"',
    "\x00\x1f",
    "\ud800",
    "héllo wörld ☃",
    "0E0",
    "true",
    "1",
    "a" * 300,
]
_VALUES: list[Any] = [
    *_STRINGS,
    None,
    True,
    False,
    0,
    -1,
    65535,
    10**17,
    10**18,
    10**40,
    1.5,
    math.nan,
    math.inf,
    b"",
    b"abc",
    b"null",
    bytearray(b"ab"),
    memoryview(b"cd"),
    (),
    [],
    {},
]


def _pick(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.15:
        return rng.choice(_VALUES)
    if roll < 0.3:
        return (rng.choice(_VALUES), rng.choice(_VALUES))
    if roll < 0.4:
        return [rng.choice(_VALUES) for _ in range(rng.randrange(4))]
    if roll < 0.5:
        return {rng.choice([*_STRINGS, 1, None, True, 1.5]): rng.choice(_VALUES)}
    return rng.choice(_STRINGS)


def _mutated_scope(rng: random.Random) -> dict[str, Any]:
    scope = rng.choice([uvicorn_scope, httptools_scope])()
    for _ in range(rng.randrange(1, 4)):
        roll = rng.random()
        key = rng.choice(list(scope))
        if roll < 0.4:
            scope[key] = _pick(rng)
        elif roll < 0.5:
            del scope[key]
        elif roll < 0.6:
            scope[rng.choice([*_STRINGS, 1, None, True, 2.5, "extensions", "state"])] = _pick(rng)
        elif roll < 0.7:
            scope["asgi"] = {rng.choice(["version", "spec_version", "x", 1]): _pick(rng)}
        elif roll < 0.85:
            scope["headers"] = [
                rng.choice(
                    [
                        (b"a", b"b"),
                        [b"a", b"b"],
                        (b"a",),
                        (b"a", b"b", b"c"),
                        (b"a", "b"),
                        (bytearray(b"a"), b"b"),
                        b"ab",
                        None,
                    ]
                )
                for _ in range(rng.randrange(4))
            ]
        else:
            scope = dict(reversed(list(scope.items())))  # another server's key order
    return scope


def _mutated_events(rng: random.Random) -> list[Any]:
    event: dict[Any, Any] = {"type": "http.request", "body": b"x", "more_body": True}
    roll = rng.random()
    if roll < 0.3:
        event[rng.choice(list(event))] = _pick(rng)
    elif roll < 0.4:
        event["extra"] = 1
    elif roll < 0.5:
        event = dict(reversed(list(event.items())))
    elif roll < 0.6:
        return [event, event, _pick(rng)]
    return [event] * rng.randrange(3)


def test_fuzzed_envelopes_give_the_general_paths_bytes_or_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = Spy(monkeypatch)
    rng = random.Random(10)
    taken = 0
    numbers = [math.nan, -math.inf, 1e300, 5e-324, -0.0, 3, 10**20, True, None, "1"]
    # Whole milliseconds (written from ints), and their neighbours (written by repr).
    numbers += [1764503520.123, 1764503520.0, 0.001, -0.001, 999999999999.999, 1e12, 0.0005]
    for _ in range(4000):
        extra: dict[str, Any] = {}
        if rng.random() < 0.3:
            name = rng.choice(["piece", "unit", "window", "liveness", "queued", "deadline"])
            extra[name] = rng.choice([*numbers, 1.5, 0, 2**20])
        if rng.random() < 0.2:
            extra[rng.choice(["confirms", "ack_send"])] = rng.choice([False, 0, 1, "yes"])
        value = envelope(_mutated_scope(rng), _mutated_events(rng), **extra)
        spy.written = None
        with contextlib.suppress(CodecError):  # where the general path refuses too
            value.encode()
        if spy.written is None:
            continue
        taken += 1
        assert spy.written == general(value), value
        assert jsoncodec.decode(spy.written)["window"] == value.window  # and it decodes
    assert spy.calls == 4000
    assert taken > 400  # the fuzz reaches the fast path, not only its refusals


def _spy_on_the_whole_scope_writer(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each call of the writer of the whole scope wrote it (else: key by key)."""
    whole: list[bool] = []
    real = envelopewriter._uvicorn_scope

    def spy(*args: Any) -> str | None:
        text = real(*args)
        whole.append(text is not None)
        return text

    monkeypatch.setattr(envelopewriter, "_uvicorn_scope", spy)
    return whole


@pytest.mark.parametrize("make_scope", [uvicorn_scope, httptools_scope])
def test_uvicorns_scopes_are_written_in_one_expression_not_key_by_key(
    monkeypatch: pytest.MonkeyPatch, make_scope: Any
) -> None:
    # Either of uvicorn's key orders (h11's, httptools') takes the writer of the whole scope;
    # the loop over its keys is for other servers' scopes.
    whole = _spy_on_the_whole_scope_writer(monkeypatch)
    scope = make_scope()
    scope["headers"] = [(b"a", b"1"), (b"b", b"2")]
    value = envelope(scope)
    assert value.encode().endswith(general(value) or b"unreachable")
    assert whole == [True]


class _Transport(asyncio.Transport):
    """Just enough of a connection for uvicorn's protocols to serve one request."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        addresses = {"peername": ("127.0.0.1", 51000), "sockname": ("127.0.0.1", 8000)}
        return addresses.get(name, default)

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def _served_scope(http: str) -> dict[str, Any]:
    """The scope uvicorn's ``http`` protocol gives an app for a GET with a query."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    scopes: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = Config(app=app, http=http, lifespan="off", log_level="warning")
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(_Transport())
    protocol.data_received(b"GET /p?q=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
    for _ in range(10):  # the app runs in a task of its own
        await asyncio.sleep(0)
    protocol.connection_lost(None)
    return scopes[0]


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_the_scopes_uvicorn_gives_take_the_writer_of_the_whole_scope(
    monkeypatch: pytest.MonkeyPatch, http: str
) -> None:
    pytest.importorskip(http)
    scope = dict(asyncio.run(_served_scope(http)))
    del scope["state"]  # the distributor keeps it at home
    whole = _spy_on_the_whole_scope_writer(monkeypatch)
    value = envelope(scope)
    assert value.encode().endswith(general(value) or b"unreachable")
    assert whole == [True]


class _Formatted(str):
    """A str whose ``__str__`` (hence its ``format``) is not its text, as a str enum's is."""

    def __str__(self) -> str:
        return 'version":"3.0","injected":"1'


def test_a_str_subclass_key_of_the_asgi_dict_is_written_as_its_text_not_its_str() -> None:
    scope = uvicorn_scope()
    scope["asgi"] = {_Formatted("version"): "3.0"}
    value = envelope(scope)
    data = value.encode()
    # Before: the fast path wrote the key with an f-string, so ``__str__`` went into the head
    # unescaped (JSON the Node refuses, or a key it never had); json writes the key's text.
    assert data.endswith(general(value) or b"unreachable")
    assert wire.Envelope.decode(data).scope["asgi"] == {"version": "3.0"}


def test_every_envelope_field_is_one_the_writer_knows() -> None:
    # The writer takes the Envelope's attributes one by one (no fields dict): a field added
    # to Envelope.fields() and not to the writer would travel only by the general path's
    # bytes, and the usual envelope would silently lose it. Add it to both (and to
    # ``wire.encode_envelope``'s arguments), then here.
    known = {
        "id",
        "reply",
        "deadline",
        "scope",
        "events",
        "window",
        "liveness",
        "queued",
        "confirms",
        "version",
        "piece",
        "unit",
        "ack_send",
        "link",
    }
    # Not on the wire: how this side read the scope (``Envelope.decode(..., asgi=True)``).
    local = {"asgi"}
    assert {field.name for field in dataclasses.fields(wire.Envelope)} == known | local


def test_the_addresses_of_a_connection_are_written_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    real = envelopewriter._address

    def spy(value: Any) -> str | None:
        calls.append(value)
        return real(value)

    monkeypatch.setattr(envelopewriter, "_address", spy)
    # Pairs of their own (equal constants of a module are one object), as uvicorn makes per
    # connection.
    server, client = tuple(["127.0.0.1", 8000]), tuple(["127.0.0.1", 51234])
    first, second = uvicorn_scope(), uvicorn_scope()
    first["server"] = second["server"] = server
    first["client"] = second["client"] = client
    second["path"] = "/other"
    envelope(first).encode()
    assert calls == [server, client]
    value = envelope(second)
    assert value.encode().endswith(general(value) or b"unreachable")
    assert calls == [server, client]  # the second request of the connection: from the cache
    # Equal pairs of another connection are other objects: written for themselves.
    third = uvicorn_scope()
    third["server"], third["client"] = tuple([*server]), tuple([*client])
    value = envelope(third)
    assert value.encode().endswith(general(value) or b"unreachable")
    assert len(calls) == 4


def test_a_mutable_address_is_written_every_time() -> None:
    client = ["127.0.0.1", 51234]  # a list: it may change between two requests
    scope = uvicorn_scope()
    scope["client"] = client
    first = envelope(scope).encode()
    client[1] = 51235
    value = envelope(scope)
    assert value.encode().endswith(general(value) or b"unreachable")
    assert b"51235" in value.encode() and b"51235" not in first


def test_fuzzed_scopes_of_shared_addresses_give_the_general_paths_bytes_or_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Connections reuse their address pairs from request to request: the cached text must
    # follow whatever else changes, and odd pairs must never be cached as good ones.
    spy = Spy(monkeypatch)
    rng = random.Random(11)
    pairs = [
        ("127.0.0.1", 8000),
        ("127.0.0.1", 8001),
        ("::1", 443),
        ("h", True),
        ("h", 10**20),
        ("\ue000", 1),
        ("é\ud800", 2),
        (b"h", 1),
        ("h", 1, 2),
        ["h", 3],
        None,
    ]
    taken = 0
    for _ in range(3000):
        scope = _mutated_scope(rng)
        for name in ("server", "client"):
            if name in scope and rng.random() < 0.8:
                scope[name] = rng.choice(pairs)
        value = envelope(scope)
        spy.written = None
        with contextlib.suppress(CodecError):
            value.encode()
        if spy.written is None:
            continue
        taken += 1
        assert spy.written == general(value), value
    assert taken > 300


def test_encode_envelope_gives_the_envelopes_bytes_without_making_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(12)
    made: list[wire.Envelope] = []
    init = wire.Envelope.__init__

    def counted(self: wire.Envelope, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        init(self, *args, **kwargs)

    for i in range(600):
        value = envelope(_mutated_scope(rng), _mutated_events(rng))
        if i % 5 == 0:
            value.version = rng.choice([codec.RELEASED, codec.BINARY])
        if i % 7 == 0:
            value.piece, value.unit, value.confirms = 2**19, 1024, False
        try:
            expected: bytes | type[Exception] = value.encode()
        except CodecError as exc:
            expected = type(exc)
        monkeypatch.setattr(wire.Envelope, "__init__", counted)
        try:
            data: bytes | type[Exception] = wire.encode_envelope(
                value.id,
                value.reply,
                value.deadline,
                value.scope,
                value.events,
                window=value.window,
                liveness=value.liveness,
                queued=value.queued,
                confirms=value.confirms,
                version=value.version,
                piece=value.piece,
                unit=value.unit,
                ack_send=value.ack_send,
            )
        except CodecError as exc:
            data = type(exc)
        monkeypatch.undo()
        assert data == expected
    # Only envelopes the usual writer declines (or of another version) made one, to decide.
    assert 0 < len(made) < 600
    usual = envelope(uvicorn_scope())
    made.clear()
    monkeypatch.setattr(wire.Envelope, "__init__", counted)
    assert wire.encode_envelope(
        usual.id,
        usual.reply,
        usual.deadline,
        usual.scope,
        usual.events,
        liveness=usual.liveness,
        queued=usual.queued,
        confirms=True,
        ack_send=True,
    ) == wire.Envelope.encode(usual)
    assert made == []


def test_a_float_of_whole_milliseconds_is_written_as_repr_writes_it() -> None:
    rng = random.Random(13)
    values = [0.001, 0.01, 0.5, 1.0, 2.0, 1764503520.0, 1764503520.1, 999999999999.999]
    values += [rng.randrange(1, 10**15) / 1000 for _ in range(20000)]
    values += [rng.randrange(1, 10**13) / 1000 for _ in range(20000)]
    # And floats that are not: more digits, negative, tiny, huge, not finite.
    values += [time.time(), -0.001, -0.0, 0.0, 0.0005, 1e15, 1e16, 1e22, 5e-324, math.inf]
    values += [rng.random() * 10 ** rng.randrange(-5, 18) for _ in range(20000)]
    for value in values:
        expected = repr(value) if math.isfinite(value) else None
        assert envelopewriter._number(value) == expected, value


def test_timestamps_in_whole_milliseconds_are_written_without_repr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    written: list[float] = []
    real = envelopewriter._float_repr

    def spy(value: float) -> str:
        written.append(value)
        return real(value)

    monkeypatch.setattr(envelopewriter, "_float_repr", spy)
    now = int(time.time() * 1000)  # as the distributor writes them
    value = envelope(uvicorn_scope(), deadline=(now + 5000) / 1000, queued=now / 1000)
    data = value.encode()
    assert data.endswith(general(value) or b"unreachable")
    # repr's search for the shortest digits costs about 9k instructions for a timestamp of
    # 17 digits; from ints, half. Before: repr for the deadline, the liveness and the queued
    # time.
    assert written == []


def test_the_settings_of_the_last_envelope_are_written_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    numbers: list[Any] = []
    real = envelopewriter._number

    def spy(value: Any) -> str | None:
        numbers.append(value)
        return real(value)

    value = envelope(uvicorn_scope(), piece=2**20, unit=4096)
    value.encode()
    monkeypatch.setattr(envelopewriter, "_number", spy)
    second = envelope(uvicorn_scope(), piece=value.piece, unit=value.unit)
    data = second.encode()
    assert data.endswith(general(second) or b"unreachable")
    # Only the deadline and the queued time (before: the window, the liveness, the piece and
    # the unit too, every time).
    assert numbers == [second.deadline, second.queued]
    # Equal settings of other objects are written for themselves (1.0 is not written as 1).
    numbers.clear()
    third = envelope(uvicorn_scope(), piece=value.piece, unit=value.unit, window=8.0)
    assert third.encode().endswith(general(third) or b"unreachable")
    assert 8.0 in numbers and b'"window":8.0' in third.encode()


def test_settings_written_in_turn_are_kept_by_their_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A distributor with requests in flight writes the pool's large window (4 pieces of
    # 1 MiB), small ones (8 of 128 KiB) and, while the pool runs short, fewer credits: each
    # window's set stays kept, in any order.
    numbers: list[Any] = []
    real = envelopewriter._number

    def spy(value: Any) -> str | None:
        numbers.append(value)
        return real(value)

    large = {"window": wire.LARGE_WINDOW, "piece": wire.PIECE_SIZE}
    short = [{"window": n, "piece": wire.CHUNK_SIZE} for n in range(1, wire.WINDOW + 1)]
    short.remove({"window": wire.LARGE_WINDOW, "piece": wire.CHUNK_SIZE})  # the large one's
    for settings in (large, *short):
        envelope(uvicorn_scope(), **settings).encode()
    monkeypatch.setattr(envelopewriter, "_number", spy)
    rng = random.Random(17)
    for settings in rng.sample([large, *short] * 3, 3 * (len(short) + 1)):
        value = envelope(uvicorn_scope(), **settings)
        data = value.encode()
        assert data.endswith(general(value) or b"unreachable")
        # Only the deadline and the queued time (before: the window and the liveness too,
        # and the piece of the large one, for all but the last two sets written).
        assert numbers == [value.deadline, value.queued]
        numbers.clear()
    # The large window's size with small pieces: written, and kept in the large one's place.
    for settings, written in (
        ({"window": wire.LARGE_WINDOW, "piece": wire.CHUNK_SIZE}, True),
        ({"window": wire.LARGE_WINDOW, "piece": wire.CHUNK_SIZE}, False),
        (large, True),
        ({"window": float(wire.WINDOW), "piece": wire.CHUNK_SIZE}, True),  # not the int's
        ({"window": True, "piece": wire.CHUNK_SIZE}, None),  # no window json writes as 1
    ):
        value = envelope(uvicorn_scope(), **settings)
        data = value.encode()
        assert data.endswith(general(value) or b"unreachable")
        if written is not None:
            assert (value.window in numbers) is written
        numbers.clear()
    assert b'"window":8.0,' in envelope(uvicorn_scope(), window=8.0).encode()


def test_the_settings_kept_are_bounded() -> None:
    sizes = set()
    for window in range(3 * memo.BOUND):
        value = envelope(uvicorn_scope(), window=window)
        assert value.encode().endswith(general(value) or b"unreachable")
        sizes.add(len(envelopewriter._KEPT_SETTINGS))
    assert max(sizes) == memo.BOUND  # one set per window, up to the bound, never past it


def test_the_start_of_a_connections_scopes_is_written_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quoted: list[str] = []
    real = envelopewriter._quote

    def spy(text: str) -> str:
        quoted.append(text)
        return real(text)

    server, client = tuple(["127.0.0.1", 8000]), tuple(["127.0.0.1", 51234])
    first, second = uvicorn_scope(), uvicorn_scope()
    first["server"] = second["server"] = server
    first["client"] = second["client"] = client
    second["path"] = "/other"
    second["http_version"] = "".join(["1", ".1"])  # equal, another object (as h11's)
    envelope(first).encode()
    monkeypatch.setattr(envelopewriter, "_quote", spy)
    value = envelope(second)
    assert value.encode().endswith(general(value) or b"unreachable")
    # The method and the paths (before: the type, both ASGI versions, the HTTP version and
    # the scheme too).
    assert quoted == ["GET", "", "/other"]
    # Another HTTP version on the same pairs: the start is written again.
    quoted.clear()
    third = uvicorn_scope()
    third["server"], third["client"], third["http_version"] = server, client, "1.0"
    value = envelope(third)
    assert value.encode().endswith(general(value) or b"unreachable")
    assert "1.0" in quoted and b'"http_version":"1.0"' in value.encode()


def _with_state(scope: dict[str, Any], httptools: bool) -> dict[str, Any]:
    """``scope`` with a ``state`` where uvicorn puts it: last (h11), after the headers
    (httptools)."""
    items = list(scope.items())
    at = HTTPTOOLS_ORDER.index("headers") + 1 if httptools else len(items)
    items.insert(at, ("state", {"pool": object()}))
    return dict(items)


def _parts(scope: Any, drop_state: bool) -> bytes | None:
    now = 1764519000.123
    events = [{"type": "http.request", "body": b"", "more_body": False}]
    args = (now, scope, events, 4, 2.0, now, wire.PIECE_SIZE, wire.CHUNK_SIZE, True, 0, True)
    parts = envelopewriter.try_encode_parts(*args, drop_state)
    return None if parts is None else b"".join(parts)


@pytest.mark.parametrize("httptools", [False, True])
def test_a_uvicorn_scope_with_its_state_is_written_without_it(httptools: bool) -> None:
    # The distributor's copy of the scope without its state is spared: the writer leaves
    # the state out itself, with the same bytes as for the copy; only when told to.
    scope = httptools_scope() if httptools else uvicorn_scope()
    stateful = _with_state(scope, httptools)
    written = _parts(stateful, True)
    assert written is not None and written == _parts(scope, False)
    assert b"state" not in written and b"pool" not in written
    assert _parts(stateful, False) is None


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_the_scopes_uvicorn_gives_are_written_whole_with_their_state_left_out(
    monkeypatch: pytest.MonkeyPatch, http: str
) -> None:
    pytest.importorskip(http)
    scope = asyncio.run(_served_scope(http))
    assert "state" in scope  # as uvicorn gives it
    copy = {k: v for k, v in scope.items() if k != "state"}
    whole = _spy_on_the_whole_scope_writer(monkeypatch)
    assert _parts(scope, True) == _parts(copy, False) is not None
    assert whole == [True, True]


def test_encode_envelope_calls_portable_only_when_its_writer_cannot_drop_the_state() -> None:
    rng = random.Random(14)
    calls: list[dict[str, Any]] = []

    def portable(scope: dict[str, Any]) -> dict[str, Any]:
        calls.append(scope)
        return {k: v for k, v in scope.items() if k != "state"}

    def encoded(scope: dict[str, Any], **extra: Any) -> bytes | type[Exception]:
        try:
            return wire.encode_envelope(
                "a" * 24, "r", 1764519000.123, scope, [], liveness=2.0, **extra
            )
        except CodecError as exc:
            return type(exc)

    for httptools in (False, True):
        scope = _with_state(httptools_scope() if httptools else uvicorn_scope(), httptools)
        assert encoded(scope, portable=portable) == encoded(portable(scope))
        calls.clear()
        encoded(scope, portable=portable)
        assert calls == []  # uvicorn's: no copy
    for i in range(600):
        scope = _mutated_scope(rng)
        if i % 2:
            scope["state"] = {"x": object()}
        version = rng.choice([codec.RELEASED, codec.FAST])
        expected = encoded(portable(scope), version=version)
        calls.clear()
        assert encoded(scope, portable=portable, version=version) == expected
        assert len(calls) <= 1


@pytest.mark.parametrize("version", [codec.RELEASED, codec.FAST])
def test_encode_envelope_in_whole_milliseconds_writes_the_envelope_of_the_floats(
    version: int,
) -> None:
    # Times in ms reach the general path too (a scope the usual writer declines, another
    # format, times out of its bounds) as the floats they make over 1000.
    now = int(time.time() * 1000)
    scope = uvicorn_scope()
    odd = {**scope, "extension": 1.5}  # a float in the scope: the usual writer declines it
    for deadline_ms, queued_ms, value in [
        (now + 5000, now, scope),
        (now + 5000, now, odd),
        (10**15, now, scope),
    ]:
        in_ms = wire.encode_envelope(
            "a" * 24, "r", deadline_ms, value, [], liveness=2.0, queued=queued_ms,
            version=version, millis=True,
        )  # fmt: skip
        expected = wire.Envelope(
            "a" * 24, "r", deadline_ms / 1000, value, [], liveness=2.0,
            queued=queued_ms / 1000, version=version,
        )  # fmt: skip
        assert in_ms == expected.encode() == expected._encode_generally()
        decoded = wire.Envelope.decode(in_ms)
        assert (decoded.deadline, decoded.queued) == (deadline_ms / 1000, queued_ms / 1000)


def test_timestamps_given_in_whole_milliseconds_are_written_from_the_ints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The distributor has its times in ms, and gives the writer those ints alone: written
    # from them, no float is taken apart (``_number``: about 4.4k instructions a timestamp,
    # 2k from the ints), with the same bytes as the floats they make over 1000. Ints out of
    # bounds (or not ints) are written as those floats are.
    rng = random.Random(15)
    events = [{"type": "http.request", "body": b"", "more_body": False}]

    def parts(deadline: Any, queued: Any, millis: bool = False) -> bytes | None:
        args = (deadline, uvicorn_scope(), events, 4, 2.0, queued, wire.PIECE_SIZE)
        written = envelopewriter.try_encode_parts(
            *args, wire.CHUNK_SIZE, True, 0, True, False, millis
        )
        return None if written is None else b"".join(written)

    now = int(time.time() * 1000)
    cases = [(now + 5000, now), (0, 0), (1, 1), (10**15 - 1, 10**15 - 2)]
    cases += [(q + rng.randrange(0, 10**6), q) for q in rng.sample(range(10**15), 2000)]
    for deadline_ms, queued_ms in cases:
        floats = parts(deadline_ms / 1000, queued_ms / 1000)
        assert floats is not None
        assert parts(deadline_ms, queued_ms, True) == floats
    numbers: list[Any] = []
    real = envelopewriter._number

    def spy(value: Any) -> str | None:
        numbers.append(value)
        return real(value)

    monkeypatch.setattr(envelopewriter, "_number", spy)
    parts(now + 5000, now, True)
    assert numbers == []
    for deadline_ms, queued_ms in [
        (now + 5000, now + 5001),  # the queued time after the deadline
        (float(now + 5000), now),  # not ints
        (now + 5000, True),
        (now, -1),
        (10**15, now),
    ]:
        deadline, queued = deadline_ms / 1000, queued_ms / 1000
        numbers.clear()
        assert parts(deadline_ms, queued_ms, True) == parts(deadline, queued)
        assert numbers == [deadline, queued, deadline, queued], (deadline_ms, queued_ms)


def test_the_whole_seconds_of_the_last_envelope_are_written_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A second's requests share the text of their times' whole seconds: written once (a
    # divmod and a str each), then found by a subtraction. Any other time (the next second,
    # an earlier one: another thread's distributor, a clock stepped back) is written anew,
    # and every text is the one the floats give.
    rng = random.Random(16)
    events = [{"type": "http.request", "body": b"", "more_body": False}]

    def parts(deadline: Any, queued: Any, millis: bool = False) -> bytes | None:
        args = (deadline, uvicorn_scope(), events, 4, 2.0, queued, wire.PIECE_SIZE)
        written = envelopewriter.try_encode_parts(
            *args, wire.CHUNK_SIZE, True, 0, True, False, millis
        )
        return None if written is None else b"".join(written)

    second = int(time.time()) * 1000
    cases = [(second + 5000, second), (second + 5999, second + 999)]
    cases += [(second + 6000, second + 999), (second + 5000, second + 1000)]
    cases += [(second + 4999, second - 1), (second + 5000, second), (0, 0), (999, 999), (1000, 0)]
    # In order: the deadline kept in its second, the queued time just out of its own (one
    # millisecond before it, a thousand after its start).
    cases += [(second + 5500, second), (second + 5400, second - 1)]
    cases += [(second + 5000, second), (second + 5500, second + 1000)]
    for _ in range(3000):
        queued = second + rng.randrange(-2500, 2500)
        cases.append((queued + rng.choice([0, 1, 999, 1000, 5000, rng.randrange(10**6)]), queued))
    for deadline_ms, queued_ms in cases:
        floats = parts(deadline_ms / 1000, queued_ms / 1000)
        assert floats is not None
        assert parts(deadline_ms, queued_ms, True) == floats, (deadline_ms, queued_ms)
    # divmod spied (str is also the writer's type checks'): each comes with a str.
    called: list[Any] = []

    def spy(*args: Any) -> Any:
        called.append(args)
        return builtins.divmod(*args)

    monkeypatch.setattr(envelopewriter, "divmod", spy, raising=False)
    monkeypatch.setattr(envelopewriter, "_SECONDS", [(-1000, "", -1000, "")], raising=False)
    parts(second + 5000, second, True)  # this second's first envelope: written
    assert sorted(called) == [(second, 1000), (second + 5000, 1000)]  # in either order
    called.clear()
    for offset in (0, 1, 500, 999):
        parts(second + 5000 + offset, second + offset, True)
    assert called == []  # before: a divmod and a str for each time of each envelope
    parts(second + 6000, second + 1000, True)
    assert sorted(called) == [(second + 1000, 1000), (second + 6000, 1000)]


def _copied(scope: dict[str, Any]) -> dict[str, Any]:
    """An equal scope of other objects (as a server makes for each request), but the pairs."""
    copy: dict[str, Any] = {}
    for key, value in scope.items():
        if type(value) is str:
            value = "".join(["", *value]) if len(value) > 1 else value
        elif type(value) is bytes:
            value = b"".join([b"", value])
        elif type(value) is list:
            value = [tuple(pair) if type(pair) is tuple else pair for pair in value]
        elif type(value) is dict:
            value = dict(value)
        copy[key] = value
    return copy


@pytest.mark.parametrize("httptools", [False, True])
def test_an_equal_request_of_a_connection_is_written_from_the_last_ones(
    monkeypatch: pytest.MonkeyPatch, httptools: bool
) -> None:
    server, client = tuple(["127.0.0.1", 8000]), tuple(["127.0.0.1", 51234])
    first = httptools_scope() if httptools else uvicorn_scope()
    first["server"], first["client"] = server, client
    second, third = _copied(first), _copied(first)
    envelope(first).encode()
    calls: list[Any] = []
    real_pairs, real_quote = envelopewriter._pairs, envelopewriter._quote

    def pairs(*args: Any) -> str | None:
        calls.append(args[0])
        return real_pairs(*args)

    def quote(text: str) -> str:
        calls.append(text)
        return real_quote(text)

    monkeypatch.setattr(envelopewriter, "_pairs", pairs)
    monkeypatch.setattr(envelopewriter, "_quote", quote)
    # The first request's headers changed after it was written (a middleware may): the kept
    # ones are a copy, still those written.
    first["headers"][0] = (b"host", b"other")
    first["headers"].append((b"x", b"y"))
    value = envelope(second)
    assert value.encode().endswith(general(value) or b"unreachable")
    assert calls == []  # neither the headers nor the method and the paths written again
    # A header of another value, a header more, a header as a list: written anew.
    for headers in (
        [(b"host", b"bench"), (b"accept", b"*/+")],
        [(b"host", b"bench"), (b"accept", b"*/*"), (b"a", b"b")],
        [(b"host", b"bench"), [b"accept", b"*/*"]],
        first["headers"],
    ):
        other = _copied(third)
        other["headers"] = headers
        value = envelope(other)
        assert value.encode().endswith(general(value) or b"unreachable")
    assert len(calls) > 4
    for _ in range(envelopewriter._SKIP):  # after a miss, kept again only after these
        envelope(_copied(first)).encode()
    calls.clear()
    value = envelope(first)  # the list changed in place: its text follows it
    assert value.encode().endswith(general(value) or b"unreachable")
    assert calls == []  # equal to the last request's: from the kept ones
    assert b"other" in value.encode()


@pytest.mark.parametrize("httptools", [False, True])
def test_after_a_request_unlike_the_last_the_next_few_are_not_kept(
    monkeypatch: pytest.MonkeyPatch, httptools: bool
) -> None:
    # A connection whose requests differ (a request id each) would pay for keeping each and
    # comparing the next with it: after a miss, _SKIP requests are written without keeping.
    envelopewriter._STARTS.clear()
    make = httptools_scope if httptools else uvicorn_scope
    written: list[Any] = []
    real_pairs = envelopewriter._pairs

    def pairs(*args: Any) -> str | None:
        written.append(args[0])
        return real_pairs(*args)

    monkeypatch.setattr(envelopewriter, "_pairs", pairs)
    assert _parts(make(), False) is not None  # kept
    other = make()
    other["path"] = "/other"
    assert _parts(other, False) is not None  # a miss
    for number in range(envelopewriter._SKIP + 2):
        written.clear()
        scope = make()
        assert _parts(scope, False) is not None
        (entry,) = envelopewriter._STARTS.values()
        if number < envelopewriter._SKIP - 1:
            assert entry[4] is None  # not kept: written anew, and the next one too
        elif number == envelopewriter._SKIP - 1:
            assert entry[4] is not None and written  # kept again
        else:
            assert not written  # from the kept text


class _Liar(str):
    """A str whose ``__eq__`` says it equals anything."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = str.__hash__


class _LyingBlob(bytes):
    """Bytes whose ``__eq__`` says they equal anything."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = bytes.__hash__


def _odd_scope(scope: dict[str, Any], case: str) -> None:
    host = {
        "bytearray": bytearray(b"bench"),
        "memoryview": memoryview(b"bench"),
        "strided memoryview": memoryview(b"bxexnxcxhx")[::2],  # not C-contiguous
        "any value": mock.ANY,
        "lying bytes": _LyingBlob(b"other"),
    }
    if case in host:
        scope["headers"] = [(b"host", host[case]), (b"accept", b"*/*")]
    elif case == "any pair":
        scope["headers"] = [mock.ANY, (b"accept", b"*/*")]
    elif case == "lying method":
        scope["method"] = _Liar("POST")
    elif case == "any path":
        scope["path"] = mock.ANY
    else:
        raise AssertionError(case)


@pytest.mark.parametrize("httptools", [False, True])
@pytest.mark.parametrize(
    "case",
    [
        "bytearray",
        "memoryview",
        "strided memoryview",
        "any value",
        "lying bytes",
        "any pair",
        "lying method",
        "any path",
    ],
)
def test_a_value_of_another_type_equal_to_the_kept_one_is_declined_as_without_it(
    httptools: bool, case: str
) -> None:
    # A value equal to the last request's (by its __eq__ or its buffer) but not of the exact
    # type: declined as the writer declines it with nothing kept (the general path decides:
    # writes it, or refuses it), never written from the last request's text.
    server, client = tuple(["127.0.0.1", 8000]), tuple(["127.0.0.1", 51234])
    make = httptools_scope if httptools else uvicorn_scope
    first, second = make(), make()
    first["server"], first["client"] = second["server"], second["client"] = server, client
    _odd_scope(second, case)
    assert _parts(first, False) is not None
    assert _parts(second, False) is None
    envelopewriter._STARTS.clear()
    assert _parts(second, False) is None  # as without the last request kept


@pytest.mark.parametrize("path", ["/caf\u00e9", "/\U0001f600", "/" + "a" * 4096])
def test_a_request_of_non_ascii_text_or_too_long_is_not_kept(path: str) -> None:
    # What an entry holds is bounded in bytes: a character of the text is one byte.
    envelopewriter._STARTS.clear()
    scope = uvicorn_scope()
    scope["path"] = path
    assert _parts(scope, False) is not None
    (entry,) = envelopewriter._STARTS.values()
    assert entry[4] is None  # the start kept, not the request
    scope["path"] = "/caf"
    assert _parts(scope, False) is not None
    (entry,) = envelopewriter._STARTS.values()
    assert entry[4] is not None


class _Text(str):
    pass


class _Blob(bytes):
    pass


class _Pair(tuple[Any, ...]):
    pass


def test_fuzzed_requests_of_a_connection_give_the_general_paths_bytes_or_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A connection's requests, each equal to the last but for a few values (of the same
    # types, or of others that may compare equal: subclasses, bytearrays, lists), or the
    # last one's own objects changed in place after it was written.
    spy = Spy(monkeypatch)
    rng = random.Random(15)
    server, client = tuple(["127.0.0.1", 8000]), tuple(["127.0.0.1", 51234])
    last = uvicorn_scope()
    odd = [
        _Text("GET"),
        _Text("/hello"),
        _Blob(b"bench"),
        bytearray(b"bench"),
        _Pair((b"host", b"bench")),
        [b"host", b"bench"],
        (b"host", _Blob(b"bench")),
        (b"host", bytearray(b"bench")),
        "1.1",
        "",
        b"",
        {"version": "3.0", "spec_version": "2.4"},
        {"spec_version": "2.4", "version": "3.0"},
        _Liar("GET"),
        mock.ANY,
        memoryview(b"bench"),
        memoryview(b"bxexnxcxhx")[::2],
    ]
    odd_pairs = [
        *odd[4:8],
        (b"host", memoryview(b"bench")),
        (b"host", memoryview(b"bxexnxcxhx")[::2]),  # not C-contiguous: the general path refuses
        (b"host", mock.ANY),
        (b"host", _LyingBlob(b"other")),
        mock.ANY,
    ]
    pairs_written: list[Any] = []
    real_pairs = envelopewriter._pairs

    def pairs(*args: Any) -> str | None:
        pairs_written.append(args[0])
        return real_pairs(*args)

    monkeypatch.setattr(envelopewriter, "_pairs", pairs)
    taken = kept = 0
    for _ in range(3000):
        roll = rng.random()
        if roll < 0.1:
            scope = rng.choice([uvicorn_scope, httptools_scope])()
        elif roll < 0.2:
            scope = _mutated_scope(rng)
        else:
            scope = _copied(last)
            for _ in range(rng.randrange(3)):
                key = rng.choice(list(scope))
                if key == "headers" and rng.random() < 0.7:
                    headers = scope["headers"] = list(scope["headers"])
                    if headers and rng.random() < 0.7:
                        headers[rng.randrange(len(headers))] = rng.choice(odd_pairs)
                    else:
                        headers.append(rng.choice([(b"a", b"b"), *odd_pairs]))
                elif key not in ("server", "client"):
                    scope[key] = rng.choice(odd)
        if rng.random() < 0.1 and type(last.get("headers")) is list:
            last["headers"].append((b"late", b"1"))  # the last request's list, changed after
        scope["server"], scope["client"] = server, client
        value = envelope(scope)
        spy.written = None
        pairs_written.clear()
        with contextlib.suppress(CodecError):
            value.encode()
        last = scope
        if spy.written is None:
            last = rng.choice([uvicorn_scope, httptools_scope])()  # back to a usual one
            continue
        taken += 1
        kept += not pairs_written  # written from the last request's kept text
        assert spy.written == general(value), value
    assert taken > 1000
    assert kept > 200  # the fuzz reaches the kept requests, not only the writer (302)


def test_the_link_offer_travels_by_both_paths_alike() -> None:
    # The offer is kept with the other settings: the usual writer and the general one write
    # the same bytes, and the usual reader reads it back.
    offer = "127.0.0.1:4567:" + "ab" * 32
    for link in (offer, "", 'with"quote', "sp ace"):
        value = wire.Envelope(
            "r1", "chan", 1.5, {"type": "http", "path": "/"}, [], link=link, ack_send=True
        )
        data = value.encode()
        assert data == value._encode_generally()
        assert wire.Envelope.decode(data).link == link
        assert "ab" * 32 not in repr(value)  # the token is a secret
