"""Unit tests for ``minidasgi.wire``: messages, envelopes, channel names and flow control."""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import logging
import math
import re
import struct
import time
from typing import Any

import pytest

from minidasgi import codec, wire
from minidasgi.codec import CodecError
from minidasgi.resp.cluster import key_slot
from minidasgi.resp.directread import SplitPayload
from minidasgi.wire import Envelope, ReceiveWindow, SendWindow, WireError


def http_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": "/api/test",
        "headers": [(b"host", b"example.com")],
    }


def envelope_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": "a" * 24,
        "reply": "minidasgi:0:distributor:abcdef",
        "deadline": 1_700_000_000.5,
        "scope": http_scope(),
        "events": [{"type": "http.request", "body": b"hi", "more_body": False}],
        "window": 8,
    }
    fields.update(overrides)
    return fields


# pack / unpack


@pytest.mark.parametrize(
    ("kind", "args"),
    [
        (wire.ACK, ["minidasgi:0:node:0123"]),
        (wire.SEND, [[{"type": "http.response.start", "status": 200, "headers": []}]]),
        (wire.EVENT, [{"type": "http.request", "body": b"x" * 10, "more_body": True}]),
        (wire.CREDIT, [4]),
        (wire.DONE, [True]),
        (wire.DONE, [False]),
        (wire.CANCEL, []),
    ],
)
def test_pack_unpack_round_trip_for_each_kind(kind: str, args: list[Any]) -> None:
    request_id = wire.new_request_id()
    assert wire.unpack(wire.pack(kind, request_id, *args)) == (kind, request_id, args)


def test_unpack_ping() -> None:
    assert wire.unpack(wire.PING_MESSAGE) == (wire.PING, "", [])
    assert wire.unpack(codec.encode([wire.PING])) == (wire.PING, "", [])
    assert wire.parse_ping([]) is None  # the old id-less PING
    # A malformed ping is ignored, never an error.
    assert wire.unpack(codec.encode([wire.PING, 5, "x"])) == (wire.PING, "", [5, "x"])
    assert wire.parse_ping([5, "x"]) is None
    assert wire.parse_ping(["chan", "x"]) is None
    assert wire.parse_ping(["chan", ["a"] * (wire.MAX_PING_IDS + 1)]) is None


def test_ping_messages_name_the_sender_and_the_ids() -> None:
    (message,) = wire.ping_messages("chan", ["a", "b"])
    kind, _, args = wire.unpack(message)
    assert kind == wire.PING
    assert wire.parse_ping(args) == ("chan", ["a", "b"])
    # Ids that are not short strings are left out.
    assert wire.parse_ping(["chan", ["a", 5, "", "x" * 65]]) == ("chan", ["a"])
    # An empty list still makes one message; a long one several.
    assert len(wire.ping_messages("chan", [])) == 1
    many = [f"{i:024x}" for i in range(wire.MAX_PING_IDS * 2 + 1)]
    messages = wire.ping_messages("chan", many)
    assert len(messages) == 3
    found = [i for m in messages for i in (wire.parse_ping(wire.unpack(m)[2]) or ("", []))[1]]
    assert found == many
    assert all(len(m) <= wire.MAX_MESSAGE_SIZE for m in messages)


def test_send_window_credit_never_raises_the_window_above_its_start() -> None:
    window = wire.SendWindow(4)
    window.grant(10**6)  # forged
    assert window.available == 4
    window.available = 1
    window.grant(2)
    assert window.available == 3
    window.grant(5)
    assert window.available == 4


def test_receive_window_refuses_arrivals_beyond_the_credit_granted() -> None:
    window = wire.ReceiveWindow(4)
    assert all(window.arrived() for _ in range(4))
    assert not window.arrived()  # a fifth before any credit came back
    assert window.consumed() == 0
    assert window.consumed() == 2  # half the window goes back to the peer...
    assert window.arrived() and window.arrived()  # ...which may send that much more
    assert not window.arrived()


def test_receive_window_refuses_arrivals_after_close() -> None:
    window = wire.ReceiveWindow(4)
    window.close()
    assert not window.arrived()


def test_envelope_liveness_is_optional_for_older_distributors() -> None:
    envelope = wire.Envelope("id", "chan", 1.0, {"type": "http"}, [], liveness=1.5)
    assert wire.Envelope.decode(envelope.encode()).liveness == 1.5
    old = codec.decode(dataclasses.replace(envelope, version=codec.RELEASED).encode())
    del old["liveness"]
    assert wire.Envelope.decode(codec.encode(old)).liveness == 0.0
    for bad in (-1.0, float("inf"), "1", True):
        old["liveness"] = bad
        with pytest.raises(wire.WireError):
            wire.Envelope.decode(codec.encode(old))


@pytest.mark.parametrize(
    "message",
    [None, "ack", 5, b"ack", {"kind": "ack", "id": "x"}, []],
    ids=["none", "str", "int", "bytes", "dict", "empty-list"],
)
def test_unpack_refuses_a_non_list_or_empty_message(message: Any) -> None:
    with pytest.raises(WireError):
        wire.unpack(codec.encode(message))


@pytest.mark.parametrize("message", [[wire.SEND], [wire.ACK], [wire.SEND, 7], [wire.ACK, None]])
def test_unpack_refuses_a_message_without_a_request_id(message: list[Any]) -> None:
    with pytest.raises(WireError, match="request id"):
        wire.unpack(codec.encode(message))


@pytest.mark.parametrize("kind", [1, None, b"ack", ["ack"], {"k": 1}])
def test_unpack_refuses_a_non_str_kind(kind: Any) -> None:
    with pytest.raises(WireError):
        wire.unpack(codec.encode([kind, "id"]))


@pytest.mark.parametrize(
    "data", [b"", b"garbage", b"\x01", b"\x01l\x00\x00\x00\x05N", wire.pack(wire.ACK, "x") + b"!"]
)
def test_unpack_of_garbage_raises_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        wire.unpack(data)


def test_unpack_refuses_a_message_over_the_wire_size_limit() -> None:
    data = wire.pack(wire.SEND, "id", b"x" * (wire.MAX_MESSAGE_SIZE + 1))
    with pytest.raises(CodecError, match="exceeds"):
        wire.unpack(data)


def test_a_whole_piece_with_large_headers_fits_in_one_message() -> None:
    # The first SEND carries the start with the first piece: 1 MiB and 200 KiB of headers.
    headers = [[b"x-filler", b"h" * 1000] for _ in range(200)]
    events = [
        {"type": "http.response.start", "status": 200, "headers": headers},
        {"type": "http.response.body", "body": b"x" * wire.PIECE_SIZE, "more_body": True},
    ]
    data = wire.pack(wire.SEND, "id", events)
    assert len(data) <= wire.message_limit(wire.PIECE_SIZE) == wire.MAX_MESSAGE_SIZE
    assert wire.unpack(data)[2][0][1]["body"] == b"x" * wire.PIECE_SIZE


@pytest.mark.parametrize(
    ("piece", "limit"),
    [
        (wire.CHUNK_SIZE, wire.EARLIER_MAX_MESSAGE_SIZE),
        (wire.EARLIER_PIECE_SIZE, wire.EARLIER_MAX_MESSAGE_SIZE),
        (wire.PIECE_SIZE, wire.MAX_MESSAGE_SIZE),
    ],
)
def test_a_peer_is_sent_messages_no_larger_than_its_release_reads(piece: int, limit: int) -> None:
    # A peer announcing pieces of 512 KiB or less may be of the previous release, which reads
    # messages of 768 KiB at most.
    assert wire.message_limit(piece) == limit


def test_a_full_chunk_fits_in_one_message() -> None:
    chunk = b"x" * wire.CHUNK_SIZE
    events = [{"type": "http.response.body", "body": chunk, "more_body": True}]
    kind, _, args = wire.unpack(wire.pack(wire.SEND, "id", events))
    assert kind == wire.SEND
    assert args[0][0]["body"] == chunk


# Envelope


def test_envelope_encode_decode_round_trip() -> None:
    envelope = Envelope(**envelope_fields())
    decoded = Envelope.decode(envelope.encode())
    assert decoded.id == envelope.id
    assert decoded.reply == envelope.reply
    assert decoded.deadline == envelope.deadline
    assert decoded.window == envelope.window
    assert decoded.events == envelope.events
    # The fast format gives tuples back as lists (the Node makes the scope's tuples again).
    assert decoded.scope == codec.decode(codec.encode_binary(http_scope(), version=codec.RELEASED))


def test_envelope_default_window_and_int_deadline() -> None:
    envelope = Envelope("id1", "reply", 10, {"type": "websocket", "path": "/"}, [])
    assert envelope.window == wire.WINDOW
    decoded = Envelope.decode(envelope.encode())
    assert decoded.deadline == 10.0
    assert isinstance(decoded.deadline, float)
    assert decoded.scope == {"type": "websocket", "path": "/"}
    assert decoded.events == []


@pytest.mark.parametrize("missing", ["id", "reply", "deadline", "scope", "events", "window"])
def test_envelope_decode_refuses_each_missing_field(missing: str) -> None:
    fields = envelope_fields()
    del fields[missing]
    with pytest.raises(WireError, match=missing):
        Envelope.decode(codec.encode(fields))


@pytest.mark.parametrize("value", [None, [1], "text", 5, b"bytes"])
def test_envelope_decode_refuses_a_non_dict(value: Any) -> None:
    with pytest.raises(WireError, match="not a dict"):
        Envelope.decode(codec.encode(value))


def test_envelope_decode_propagates_codec_errors() -> None:
    with pytest.raises(CodecError):
        Envelope.decode(b"\x01garbage")
    data = Envelope(**envelope_fields()).encode()
    with pytest.raises(CodecError, match="exceeds"):
        Envelope.decode(data, max_size=len(data) - 1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", 5),
        ("id", b"abc"),
        ("id", None),
        ("id", ""),
        ("id", "x" * 65),
        ("reply", 5),
        ("reply", b"channel"),
        ("reply", ""),
        ("reply", "x" * 257),
        ("deadline", "1700000000"),
        ("deadline", True),
        ("deadline", False),
        ("deadline", None),
        ("deadline", math.inf),
        ("deadline", -math.inf),
        ("deadline", math.nan),
        ("scope", "http"),
        ("scope", ["type", "http"]),
        ("scope", {}),
        ("scope", {"type": "lifespan"}),
        ("scope", {"type": b"http"}),
        ("events", {"type": "http.request"}),
        ("events", "events"),
        ("events", [{"type": "http.request"}, "not a dict"]),
        ("events", [[("type", "http.request")]]),
        ("window", 0),
        ("window", -1),
        ("window", 5000),
        ("window", 1.5),
        ("window", "8"),
    ],
)
def test_envelope_decode_refuses_wrong_types(field: str, value: Any) -> None:
    with pytest.raises(WireError):
        Envelope.decode(codec.encode(envelope_fields(**{field: value})))


@pytest.mark.parametrize("size", [0, 16 * 1024 - 700, 16 * 1024, 64 * 1024])
def test_an_envelope_decodes_alike_whether_its_body_is_copied_or_read_in_place(
    size: int,
) -> None:
    # Envelopes up to 16 KiB are decoded from a copy, larger ones through a memoryview.
    body = bytes(range(256)) * (size // 256) + b"!" * (size % 256)
    events = [{"type": "http.request", "body": body, "more_body": False}]
    for version in (codec.FAST, codec.BINARY):
        data = Envelope(**envelope_fields(events=events), version=version).encode()
        decoded = Envelope.decode(data)
        assert decoded.events == events
        assert type(decoded.events[0]["body"]) is bytes
        assert decoded.scope == Envelope.decode(bytearray(data)).scope


@pytest.mark.parametrize(
    ("field", "value"),
    [("id", "x" * 64), ("reply", "x" * 256), ("window", 1), ("window", 1024), ("deadline", 0)],
)
def test_envelope_decode_accepts_values_at_the_limits(field: str, value: Any) -> None:
    decoded = Envelope.decode(codec.encode(envelope_fields(**{field: value})))
    assert getattr(decoded, field) == value


def test_envelope_expired() -> None:
    envelope = Envelope(**envelope_fields(deadline=1000.0))
    assert not envelope.expired(999.0)
    assert not envelope.expired(1000.0)
    assert envelope.expired(1000.001)
    assert Envelope(**envelope_fields(deadline=time.time() - 1)).expired()
    assert not Envelope(**envelope_fields(deadline=time.time() + 60)).expired()


# Names


def test_new_request_id_is_unique_and_24_hex_chars() -> None:
    ids = {wire.new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for request_id in ids:
        assert re.fullmatch(r"[0-9a-f]{24}", request_id)


def test_new_channel_names_prefix_db_and_role() -> None:
    channel = wire.new_channel("minidasgi", 3, "node")
    assert channel.startswith("minidasgi:3:node:")
    assert re.fullmatch(r"minidasgi:3:node:[0-9a-f]+", channel)
    assert wire.new_channel("minidasgi", 3, "node") != channel
    assert wire.new_channel("minidasgi", 4, "node").startswith("minidasgi:4:node:")
    assert wire.new_channel("other", 0, "distributor").startswith("other:0:distributor:")


# Flow control


async def test_send_window_acquires_up_to_the_window_without_waiting() -> None:
    window = SendWindow(4)
    for _ in range(4):
        await asyncio.wait_for(window.acquire(), 2)
    assert window.available == 0


def test_send_window_try_take_takes_what_is_there_and_never_waits() -> None:
    window = SendWindow(4, unit=1024, piece=4096)  # 16 units, at most 2 a message
    assert window.try_take(2) and window.available == 14
    assert not window.try_take(15) and window.available == 14  # not there: nothing taken
    assert window.try_take(14) and window.available == 0
    assert not window.try_take(1)
    window.grant(3)
    window.abort(ConnectionError("peer gone"))
    assert not window.try_take(1) and window.available == 3  # acquire() raises instead


async def test_send_window_waits_for_grant() -> None:
    window = SendWindow(2)
    await asyncio.wait_for(window.acquire(), 2)
    await asyncio.wait_for(window.acquire(), 2)
    waiter = asyncio.ensure_future(window.acquire())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    window.grant(0)
    await asyncio.sleep(0.01)
    assert not waiter.done()
    window.grant(1)
    await asyncio.wait_for(waiter, 2)
    assert window.available == 0


async def test_send_window_grant_wakes_several_waiters() -> None:
    window = SendWindow(2)
    await asyncio.wait_for(window.acquire(), 2)
    await asyncio.wait_for(window.acquire(), 2)
    waiters = [asyncio.ensure_future(window.acquire()) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiters)
    window.grant(2)
    await asyncio.sleep(0.01)
    assert sum(w.done() for w in waiters) == 2
    window.grant(1)
    await asyncio.wait_for(asyncio.gather(*waiters), 2)
    assert window.available == 0


async def test_send_window_abort_fails_a_waiting_and_a_later_acquire() -> None:
    window = SendWindow(1)
    await asyncio.wait_for(window.acquire(), 2)
    waiter = asyncio.ensure_future(window.acquire())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    error = ConnectionError("peer gone")
    window.abort(error)
    with pytest.raises(ConnectionError, match="peer gone") as caught:
        await asyncio.wait_for(waiter, 2)
    assert caught.value is error
    with pytest.raises(ConnectionError, match="peer gone"):
        await asyncio.wait_for(window.acquire(), 2)
    # Even with credit available, an aborted window stays aborted.
    window.grant(5)
    with pytest.raises(ConnectionError, match="peer gone"):
        await asyncio.wait_for(window.acquire(), 2)


async def test_send_window_abort_before_any_wait() -> None:
    window = SendWindow(3)
    window.abort(RuntimeError("cancelled"))
    with pytest.raises(RuntimeError, match="cancelled"):
        await asyncio.wait_for(window.acquire(), 2)


def test_receive_window_returns_credit_in_batches_of_half_the_window() -> None:
    window = ReceiveWindow(8)
    assert [window.consumed() for _ in range(8)] == [0, 0, 0, 4, 0, 0, 0, 4]


@pytest.mark.parametrize(("size", "expected"), [(1, [1, 1, 1]), (2, [1, 1, 1]), (3, [1, 1, 1])])
def test_receive_window_small_windows_return_credit_at_once(size: int, expected: list[int]) -> None:
    window = ReceiveWindow(size)
    assert [window.consumed() for _ in range(3)] == expected


def test_a_new_window_sets_only_what_differs_from_the_class() -> None:
    # One window per request: what every window starts with is read from the class, and the
    # piece comes by position (no dict of keywords), so making one sets four attributes (six
    # with large pieces). The values are the same as ever.
    pool = wire.CreditPool()
    large = pool.window()
    small = pool.window()
    assert sorted(vars(small)) == ["_grant", "_pool", "outstanding", "window"]
    assert sorted(vars(large)) == ["_cost", "_grant", "_pool", "outstanding", "piece", "window"]
    assert (large.piece, large._cost, large.window) == (wire.PIECE_SIZE, wire.PIECE_SIZE, 4)
    assert (small.piece, small._cost) == (wire.CHUNK_SIZE, wire.CHUNK_SIZE)
    assert pool.large == 1
    large.close()
    small.close()
    assert (pool.large, pool.used) == (0, 0)


def test_credit_pool_reserves_what_a_window_would_take_and_takes_it_back() -> None:
    # A distributor takes its response window's credits when it writes the envelope, and
    # makes the window only if a message needs it: reserved and released, the pool is as a
    # window made and closed would leave it, large pieces and all.
    pool = wire.CreditPool()
    reserved = [pool.reserve() for _ in range(3)]
    assert reserved == [(wire.LARGE_WINDOW, wire.PIECE_SIZE)] + [(8, wire.CHUNK_SIZE)] * 2
    made = pool.window()
    assert (made.window, made.piece) == (8, wire.CHUNK_SIZE)
    assert pool.large == 1
    assert pool.in_flight == pool.budget // 2 + 24
    for credits, piece in reserved:
        pool.release(credits, piece)
    assert (pool.large, pool.in_flight) == (0, 8)
    made.close()
    assert pool.used == 0


def test_a_released_reservation_pays_a_starved_window() -> None:
    # As test_starved_window_is_paid_when_room_returns, the first window never made.
    pool = wire.CreditPool(budget=6)
    granted: list[int] = []
    credits, piece = pool.reserve(4)
    second = wire.ReceiveWindow(pool.open(4), pool, granted.append)
    third = wire.ReceiveWindow(pool.open(4), pool)  # over budget: one credit
    assert (credits, second.window, third.window) == (4, 2, 1)
    assert second.consumed() == 0  # its peer still holds a credit, and there is no room
    pool.release(credits, piece)  # room again: the credit owed to ``second`` is granted
    assert granted == [1]
    second.close()
    third.close()
    assert pool.in_flight == 0


def test_credit_pool_opens_windows_within_its_budget() -> None:
    pool = wire.CreditPool(budget=10)
    assert [pool.open(8), pool.open(8), pool.open(8)] == [8, 2, 1]  # at least one each
    assert pool.in_flight == 11


def test_credit_pool_opens_windows_by_comparisons(monkeypatch: pytest.MonkeyPatch) -> None:
    # A distributor with more than one request in flight opens a window per request
    # (``reserve``'s usual answer): no builtin min or max, which cost more than the tests.
    called: list[str] = []
    for name in ("min", "max"):
        real = getattr(builtins, name)
        monkeypatch.setattr(
            wire,
            name,
            lambda *args, _name=name, _real=real: called.append(_name) or _real(*args),
            raising=False,
        )
    pool = wire.CreditPool(budget=17)
    assert [pool.open(8), pool.open(8), pool.open(1), pool.open(8), pool.open(8)] == [8, 8, 1, 1, 1]
    assert pool.in_flight == 19  # past the budget: one credit each all the same
    assert pool.reserve() == (1, wire.CHUNK_SIZE)
    assert called == []


def test_credit_pool_defers_grants_while_full_and_pays_them_later() -> None:
    pool = wire.CreditPool(budget=8)
    granted: list[int] = []
    busy = wire.ReceiveWindow(pool.open(8), pool)  # takes the whole budget
    window = wire.ReceiveWindow(pool.open(8), pool, granted.append)  # gets 1, over budget
    assert (busy.window, window.window) == (8, 1)
    # Its peer used its one credit: a peer without credit always gets one back.
    assert window.consumed() == 1
    assert pool.in_flight == 9
    # Half its window consumed, it returns only what fits: 8 - 5 = 3, not 4.
    assert [busy.consumed() for _ in range(4)] == [0, 0, 0, 3]
    assert pool.in_flight == 8
    busy.close()  # the big transfer ends: its credits go back to the pool
    assert pool.in_flight == 1
    assert window.consumed() == 1
    assert granted == []  # nothing was owed to it: its own grants went out directly


def test_starved_window_is_paid_when_room_returns() -> None:
    pool = wire.CreditPool(budget=6)
    granted: list[int] = []
    first = wire.ReceiveWindow(pool.open(4), pool)
    second = wire.ReceiveWindow(pool.open(4), pool, granted.append)
    third = wire.ReceiveWindow(pool.open(4), pool)  # over budget: one credit
    assert (first.window, second.window, third.window) == (4, 2, 1)
    assert second.consumed() == 0  # its peer still holds a credit, and there is no room
    assert granted == []
    first.close()  # room again: the credit owed to ``second`` is granted now
    assert granted == [1]
    second.close()
    third.close()
    assert pool.in_flight == 0


def test_credit_pool_opens_windows_of_large_pieces_only_while_it_has_room_for_them() -> None:
    pool = wire.CreditPool()  # 64 units of CHUNK_SIZE
    weight = wire.PIECE_SIZE // wire.CHUNK_SIZE
    first = pool.window()  # fits in half the budget
    assert (first.piece, first.window) == (wire.PIECE_SIZE, wire.LARGE_WINDOW)
    assert pool.in_flight == wire.LARGE_WINDOW * weight == pool.budget // 2
    # The other half stays for whole windows of small pieces, then one credit each.
    others = [pool.window() for _ in range(5)]
    assert [(w.piece, w.window) for w in others] == [(wire.CHUNK_SIZE, 8)] * 4 + [
        (wire.CHUNK_SIZE, 1)
    ]
    assert pool.large == 1
    first.close()
    assert pool.large == 0
    assert pool.in_flight == 33
    for window in others:
        window.close()
    assert (pool.in_flight, pool.large) == (0, 0)


def test_credit_pool_opens_at_most_max_large_windows() -> None:
    pool = wire.CreditPool(budget=10_000)
    windows = [pool.window() for _ in range(wire.MAX_LARGE_WINDOWS + 2)]
    assert [w.piece for w in windows].count(wire.PIECE_SIZE) == wire.MAX_LARGE_WINDOWS
    assert windows[-1].piece == wire.CHUNK_SIZE


def test_large_pieces_are_charged_to_the_pool_by_their_size() -> None:
    pool = wire.CreditPool()
    weight = wire.PIECE_SIZE // wire.CHUNK_SIZE
    window = pool.window()
    assert [window.consumed() for _ in range(4)] == [0, 2, 0, 2]
    assert pool.in_flight == wire.LARGE_WINDOW * weight  # four consumed, four granted again
    window.close()
    assert pool.in_flight == 0


def test_a_starved_large_window_waits_for_room_without_spinning() -> None:
    # Small windows over budget (one credit each) leave room for a small credit but not for a
    # large one: the pool must neither pay the large window past its budget while its peer
    # still holds credit, nor loop forever trying, nor pay a newer window before it.
    pool = wire.CreditPool(budget=64)
    granted: list[int] = []
    large = pool.window(granted.append)  # 32 units: 4 credits of 8
    other = wire.ReceiveWindow(pool.open(32), pool)  # the other 32
    smalls = [wire.ReceiveWindow(pool.open(8), pool) for _ in range(14)]  # one credit each
    assert pool.in_flight == 78
    assert [large.consumed() for _ in range(2)] == [0, 0]  # 62: no room for 8 more
    assert smalls[0].consumed() == 1  # a window left without credit always gets one
    assert granted == []  # 62 + 8 > 64: the large window still waits
    assert [other.consumed() for _ in range(5)] == [0] * 5  # 57
    assert granted == []
    assert other.consumed() == 0  # 56: room for one large credit, paid to it first
    assert granted == [1]
    assert pool.in_flight == 64
    for window in (large, other, *smalls):
        window.close()
    assert (pool.in_flight, pool.large) == (0, 0)


def test_split_message_cuts_pieces_of_the_size_asked() -> None:
    event = {"type": "websocket.send", "bytes": b"x" * (3 * wire.PIECE_SIZE + 1)}
    pieces = wire.split_message(event, wire.PIECE_SIZE)
    assert [len(p["bytes"]) for p in pieces] == [wire.PIECE_SIZE] * 3 + [1]
    text = {"type": "websocket.send", "text": "y" * wire.PIECE_SIZE}
    assert len(wire.split_message(text, wire.PIECE_SIZE)) == 4


@pytest.mark.parametrize(
    ("announced", "used"),
    [
        (None, wire.CHUNK_SIZE),
        ("big", wire.CHUNK_SIZE),
        (True, wire.CHUNK_SIZE),
        (1, wire.CHUNK_SIZE),
        (0, wire.CHUNK_SIZE),
        (-(10**12), wire.CHUNK_SIZE),
        (wire.CHUNK_SIZE - 1, wire.CHUNK_SIZE),
        (wire.CHUNK_SIZE, wire.CHUNK_SIZE),
        (wire.CHUNK_SIZE + 1, wire.CHUNK_SIZE + 1),
        (wire.PIECE_SIZE - 1, wire.PIECE_SIZE - 1),
        (wire.PIECE_SIZE, wire.PIECE_SIZE),
        (wire.PIECE_SIZE + 1, wire.PIECE_SIZE),
        (200_000, 200_000),
        (10**12, wire.PIECE_SIZE),
    ],
)
def test_piece_size_stays_between_what_every_release_reads_and_what_this_one_sends(
    announced: object, used: int
) -> None:
    assert wire.piece_size(announced) == used


def test_an_envelope_carries_the_piece_size_and_older_ones_mean_chunk_size() -> None:
    envelope = wire.Envelope(
        "id", "reply", time.time() + 5, {"type": "http"}, [], piece=wire.PIECE_SIZE
    )
    assert wire.Envelope.decode(envelope.encode()).piece == wire.PIECE_SIZE
    plain = wire.Envelope("id", "reply", time.time() + 5, {"type": "http"}, [])
    assert b"piece" not in plain.encode()
    assert wire.Envelope.decode(plain.encode()).piece == wire.CHUNK_SIZE
    # A first-release envelope never names one; a forged one cannot exceed this release's.
    forged = wire.Envelope("id", "reply", time.time() + 5, {"type": "http"}, [], piece=10**9)
    assert wire.Envelope.decode(forged.encode()).piece == wire.PIECE_SIZE


def test_pack_parts_is_pack_without_copying_a_large_body() -> None:
    body = b"b" * 200_000
    piece = memoryview(body)[1000:150_000]
    event = {"type": "http.response.body", "body": piece, "more_body": True}
    parts = wire.pack_parts(wire.SEND, "id", [event])
    assert isinstance(parts, list)
    assert any(part is piece for part in parts)
    assert b"".join(parts) == wire.pack(wire.SEND, "id", [dict(event, body=bytes(piece))])
    assert wire.packed_size(parts) == len(b"".join(parts))
    small = wire.pack_parts(wire.SEND, "id", [dict(event, body=piece[:100])])
    assert isinstance(small, bytes)  # gathering pays only for large messages


def test_pack_parts_copies_a_view_of_a_mutable_buffer_at_once() -> None:
    # Parts are written later in the loop turn: an app may reuse its bytearray once its send
    # returned, and what travels must be what it sent.
    buffer = bytearray(b"m" * 100_000)
    packed = wire.pack_parts(wire.SEND, "id", [{"type": "websocket.send", "bytes": buffer}])
    assert isinstance(packed, bytes)
    buffer[:] = b"X" * len(buffer)
    (_, _, args) = wire.unpack(packed)
    assert args[0][0]["bytes"] == b"m" * 100_000


def test_batch_frame_parts_join_to_the_batch_frame() -> None:
    big = wire.pack_parts(wire.SEND, "a", [{"body": memoryview(b"q" * 100_000)}])
    assert isinstance(big, list)
    small = wire.pack(wire.CREDIT, "a", 4)
    frame = b"".join(wire.batch_frame_parts([small, big]))
    assert frame == wire.batch_frame([small, b"".join(big)])
    assert [bytes(m) for m in wire.split_frame(frame)] == [small, b"".join(big)]


# Batch frames, the envelope preamble, formats


def test_a_batch_frame_splits_into_its_messages_in_order() -> None:
    messages = [wire.pack(wire.ACK, "id", "node", 8, 1.0), wire.pack(wire.SEND, "id", [])]
    frame = wire.batch_frame(messages)
    assert frame[0] == wire.BATCH_FRAME
    assert [bytes(m) for m in wire.split_frame(frame)] == messages
    assert wire.split_frame(messages[0]) == [messages[0]]  # a single message is itself


def test_only_a_lone_message_is_read_apart() -> None:
    # ``split_frame`` meets a SplitPayload only as a lone message: ``tail_size`` reads no
    # batch frame apart, even one ending with a large body.
    body = bytes(range(256)) * 400
    event = {"type": "http.response.body", "body": body, "more_body": True}
    piece = wire.pack(wire.SEND, "id", [event])
    assert wire.tail_size(memoryview(piece), len(piece)) == len(body)
    frame = wire.batch_frame([wire.pack(wire.CREDIT, "id", 4), piece])
    assert frame.endswith(body)
    assert wire.tail_size(memoryview(frame), len(frame)) == 0
    split = SplitPayload(piece[: -len(body)], piece[-len(body) :])
    assert wire.split_frame(split) == [split]
    kind, request_id, args = wire.unpack_general(split)
    assert (kind, request_id, args) == (wire.SEND, "id", [[event]])
    assert args[0][0]["body"] is split.tail  # not a copy


@pytest.mark.parametrize(
    "frame",
    [
        bytes([wire.BATCH_FRAME]),  # no count
        bytes([wire.BATCH_FRAME]) + struct.pack(">I", 1),  # a message missing
        bytes([wire.BATCH_FRAME]) + struct.pack(">II", 1, 5) + b"abc",  # truncated
        bytes([wire.BATCH_FRAME]) + struct.pack(">II", 1, 0),  # an empty message
        bytes([wire.BATCH_FRAME]) + struct.pack(">II", 1, 1) + b"ab",  # trailing bytes
        bytes([wire.BATCH_FRAME]) + struct.pack(">I", 2**32 - 1) + b"x" * 10,  # forged count
        bytes([wire.BATCH_FRAME]) + struct.pack(">II", 1, 1) + b"x",  # shorter than any message
        wire.batch_frame([wire.PING_MESSAGE] * 3 + [b"x" * 14]),  # one of them is
        # Bytes enough for its count (one long message), yet one message too short:
        wire.batch_frame([b"x" * 100, b"x"]),
    ],
)
def test_a_malformed_batch_frame_is_refused_whole(frame: bytes) -> None:
    with pytest.raises(WireError):
        wire.split_frame(frame)


def test_the_shortest_messages_still_travel_in_a_batch_frame() -> None:
    shortest = [
        codec.encode(value, version=version)
        for value in ([wire.PING], ["", ""])
        for version in (codec.RELEASED, codec.BINARY, codec.FAST)
    ]
    assert [bytes(m) for m in wire.split_frame(wire.batch_frame(shortest))] == shortest


def test_an_envelope_preamble_names_id_and_reply_whatever_the_body() -> None:
    envelope = Envelope(**envelope_fields())
    data = envelope.encode()
    assert data[0] == wire.ENVELOPE_FRAME
    assert wire.peek_envelope(data) == (envelope.id, envelope.reply)
    start = 3 + len(envelope.id) + len(envelope.reply)
    future = data[:start] + b"\x09" + data[start + 1 :]
    with pytest.raises(codec.UnsupportedVersion):
        Envelope.decode(future)
    assert wire.peek_envelope(future) == (envelope.id, envelope.reply)
    assert wire.peek_envelope(b"\x01garbage") is None


def test_an_envelope_preamble_holds_ids_of_up_to_64_bytes() -> None:
    # The frame byte and the id's length are taken from a table made once, for every length.
    for size in (1, 24, 63, 64):
        envelope = Envelope(**{**envelope_fields(), "id": "i" * size})
        data = envelope.encode()
        assert data[:2] == bytes([wire.ENVELOPE_FRAME, size])
        assert wire.peek_envelope(data) == (envelope.id, envelope.reply)
        assert Envelope.decode(data).id == envelope.id
    with pytest.raises(WireError, match="too long"):
        Envelope(**{**envelope_fields(), "id": "i" * 65}).encode()


def test_an_envelope_cut_short_in_its_preamble_is_refused() -> None:
    envelope = Envelope(**envelope_fields())
    data = envelope.encode()
    start = 3 + len(envelope.id) + len(envelope.reply)  # where the body starts
    for cut in range(start + 1):  # up to and including a preamble with no body
        assert wire.peek_envelope(data[:cut]) is None, cut
        with pytest.raises((WireError, codec.CodecError)):
            Envelope.decode(data[:cut])
    assert wire.peek_envelope(data[: start + 1]) == (envelope.id, envelope.reply)


def test_an_envelope_in_the_first_release_format_is_a_plain_codec_dict() -> None:
    envelope = dataclasses.replace(Envelope(**envelope_fields()), version=codec.RELEASED)
    data = envelope.encode()
    assert data[0] == codec.RELEASED and codec.decode(data)["id"] == envelope.id
    decoded = Envelope.decode(data)
    assert decoded.version == codec.RELEASED and decoded.reply == envelope.reply
    assert Envelope.decode(Envelope(**envelope_fields()).encode()).version == codec.FAST


def test_request_ids_are_unique_and_short() -> None:
    ids = {wire.new_request_id() for _ in range(2000)}
    assert len(ids) == 2000 and all(len(i) == 24 for i in ids)


def test_envelope_confirms_is_announced_and_optional_for_older_distributors() -> None:
    envelope = wire.Envelope("id", "chan", 1.0, {"type": "http"}, [], confirms=True)
    assert wire.Envelope.decode(envelope.encode()).confirms is True
    released = dataclasses.replace(envelope, version=codec.RELEASED)
    assert wire.Envelope.decode(released.encode()).confirms is True
    old = codec.decode(released.encode())
    del old["confirms"]  # an older distributor: a Node must never wait for its answer
    assert wire.Envelope.decode(codec.encode(old)).confirms is False
    for bad in (1, "yes", None):
        old["confirms"] = bad
        with pytest.raises(wire.WireError):
            wire.Envelope.decode(codec.encode(old))
    plain = wire.Envelope("id", "chan", 1.0, {"type": "http"}, [])
    assert b"confirms" not in plain.encode()


def test_only_an_ack_with_true_as_its_fourth_argument_asks_for_a_confirmation() -> None:
    assert wire.asks_confirmation(["node", 8, 1.0, True])
    assert not wire.asks_confirmation(["node", 8, 1.0])  # every ack until now
    assert not wire.asks_confirmation(["node", 8, 1.0, 1])
    assert not wire.asks_confirmation(["node", 8, 1.0, "true"])
    assert not wire.asks_confirmation([])


def test_presence_channels_share_their_key_slot_on_a_cluster() -> None:
    # On one server the name stays what every release of the fleet subscribes to.
    assert wire.presence_channel("minidasgi", 0, "q") == "minidasgi:0:presence:q"
    assert wire.presence_channel("p", 3, "{api}:users") == "p:3:presence:{api}:users"
    # On a Cluster: the key's own tag, or the key as the tag; the fail-fast NUMSUB and the
    # LPUSH then go to the same master.
    named = {
        "q": "minidasgi:0:presence:{q}",
        "ASGI-testing": "minidasgi:0:presence:{ASGI-testing}",
        "{api}:users": "minidasgi:0:presence:{api}:users",
        "x{tag}y{z}": "minidasgi:0:presence:x{tag}y{z}",
        "é/ü": "minidasgi:0:presence:{é/ü}",
    }
    for key, channel in named.items():
        assert wire.presence_channel("minidasgi", 0, key, cluster=True) == channel
        assert key_slot(channel) == key_slot(key), key
    # Keys of one tag still get a channel each.
    assert wire.presence_channel("m", 0, "{api}:a", cluster=True) != wire.presence_channel(
        "m", 0, "{api}:b", cluster=True
    )
    # Braces that make no tag, or a prefix with a brace: the plain name (its own slot).
    for key in ("a{b", "a}b", "{}", "a{}b", ""):
        assert wire.presence_channel("m", 0, key, cluster=True) == f"m:0:presence:{key}"
    assert wire.presence_channel("{t}", 0, "q", cluster=True) == "{t}:0:presence:q"


def test_an_ack_announcing_a_piece_size_asks_confirmation_only_when_it_says_so() -> None:
    # The ACK's fourth argument is the confirmation flag, the fifth the piece size announced.
    assert not wire.asks_confirmation(["node", 8, 1.0, False, wire.PIECE_SIZE])
    assert wire.asks_confirmation(["node", 8, 1.0, True, wire.PIECE_SIZE])
    assert wire.piece_size(["node", 8, 1.0, False, wire.PIECE_SIZE][4]) == wire.PIECE_SIZE


def test_credit_messages_are_the_plain_encoding_each_value_encoded_once() -> None:
    credits = wire.CreditMessages("r1", codec.FAST)
    first = credits.pack(4)
    assert first == wire.pack(wire.CREDIT, "r1", 4, version=codec.FAST)
    assert credits.pack(4) is first  # the same value again: not encoded again
    assert credits.pack(8) == wire.pack(wire.CREDIT, "r1", 8, version=codec.FAST)
    assert credits.pack(4) == first


# Credit counted in bytes (a WebSocket whose both sides announce ``CREDIT_UNIT``).

UNIT = wire.CREDIT_UNIT
PER = wire.CHUNK_SIZE // UNIT  # units per message of a window


def test_a_window_of_one_piece_counted_in_units_holds_many_small_messages() -> None:
    window = ReceiveWindow(1)
    window.count_units(UNIT)
    assert (window.window, window.outstanding, window.largest) == (1, PER, PER // 2)
    assert all(window.arrived(100) for _ in range(PER))  # one unit each
    assert not window.arrived(100)  # more than granted is still a violation
    # Credit goes back by halves of the window, not per message.
    assert [window.consumed() for _ in range(PER)] == ([0] * (PER // 2 - 1) + [PER // 2]) * 2


def test_a_message_costs_its_size_in_units_and_at_most_half_a_piece() -> None:
    window = ReceiveWindow(8)
    window.count_units(UNIT)
    assert window.arrived(3 * UNIT)  # exactly three units
    assert window.arrived(3 * UNIT + 1)  # four
    assert window.arrived(10**9)  # whatever its size, never more than the largest message
    assert window.unconsumed == 3 + 4 + PER // 2
    assert wire.credit_cost(0, UNIT, PER) == 1
    assert wire.credit_cost(5000, 0, PER) == 1  # counting messages
    sender = SendWindow(8, unit=UNIT, piece=wire.CHUNK_SIZE)
    assert (sender.window, sender.largest) == (8 * PER, PER // 2)
    assert sender.piece == PER // 2 * UNIT  # WebSocket messages travel in half pieces
    assert [sender.cost(n) for n in (1, UNIT, UNIT + 1, 10**9)] == [1, 1, 2, PER // 2]


async def test_a_forged_credit_never_raises_a_unit_window_above_its_start() -> None:
    window = SendWindow(1, unit=UNIT, piece=wire.CHUNK_SIZE)
    window.grant(10**6)
    assert window.available == PER
    await asyncio.wait_for(window.acquire(PER - 1), 2)
    waiter = asyncio.ensure_future(window.acquire(2))  # one unit left: it waits
    await asyncio.sleep(0)
    assert not waiter.done()
    window.grant(1)
    await asyncio.wait_for(waiter, 2)
    assert window.available == 0


def test_counting_units_charges_the_pool_the_same_bytes() -> None:
    pool = wire.CreditPool(budget=4)
    window = ReceiveWindow(pool.open(2), pool)
    assert pool.used == 2 * wire.CHUNK_SIZE
    window.count_units(UNIT)
    assert pool.used == 2 * wire.CHUNK_SIZE  # the same bytes, now in units
    assert window.arrived(UNIT) and window.consumed() == 0
    assert pool.used == 2 * wire.CHUNK_SIZE - UNIT
    window.close()
    assert pool.used == 0


def test_a_full_pool_tops_a_unit_window_up_to_one_piece_in_one_grant() -> None:
    pool = wire.CreditPool(budget=2)
    busy = ReceiveWindow(pool.open(2), pool)  # takes the whole budget
    window = ReceiveWindow(pool.open(2), pool)  # over budget: one piece
    window.count_units(UNIT)
    assert window.outstanding == PER
    grants = []
    for _ in range(PER):
        assert window.arrived(100)
        grants.append(window.consumed())
    # No room: nothing while its peer holds half a piece or more, then the piece back at once.
    assert grants == [0] * (PER // 2) + [PER // 2 + 1] + [0] * (PER // 2 - 1)
    assert window.outstanding >= window.largest
    assert pool.used <= 3 * wire.CHUNK_SIZE  # never more than a piece beyond the budget
    busy.close()
    window.close()
    assert pool.used == 0


def test_credit_units_are_powers_of_two_within_a_piece() -> None:
    piece = wire.CHUNK_SIZE
    assert wire.credit_unit(UNIT, piece) == UNIT
    assert wire.credit_unit(piece, piece) == piece
    for bad in (0, 3000, wire.MIN_CREDIT_UNIT // 2, 2 * piece, "1024", 1024.0, True, None):
        assert wire.credit_unit(bad, piece) == 0  # count messages, as earlier releases


def test_envelope_credit_unit_is_announced_and_optional_for_older_distributors() -> None:
    envelope = wire.Envelope("id", "chan", 1.0, {"type": "websocket"}, [], unit=UNIT)
    assert wire.Envelope.decode(envelope.encode()).unit == UNIT
    plain = wire.Envelope("id", "chan", 1.0, {"type": "websocket"}, [])
    assert b"unit" not in plain.encode()  # what an older distributor sends
    assert wire.Envelope.decode(plain.encode()).unit == 0
    odd = dataclasses.replace(envelope, unit=3000)
    assert wire.Envelope.decode(odd.encode()).unit == 0
    with pytest.raises(wire.WireError):
        wire.Envelope.decode(codec.encode(envelope_fields(unit="1024")))


def test_envelope_ack_send_is_announced_and_optional_for_older_distributors() -> None:
    envelope = wire.Envelope("id", "chan", 1.0, {"type": "http"}, [], ack_send=True)
    assert wire.Envelope.decode(envelope.encode()).ack_send is True
    released = dataclasses.replace(envelope, version=codec.RELEASED)
    assert wire.Envelope.decode(released.encode()).ack_send is True
    old = codec.decode(released.encode())
    del old["ack_send"]  # an older distributor: it reads an ACK and a SEND, not the two in one
    assert wire.Envelope.decode(codec.encode(old)).ack_send is False
    for bad in (1, "yes", None):
        old["ack_send"] = bad
        with pytest.raises(wire.WireError):
            wire.Envelope.decode(codec.encode(old))
    plain = wire.Envelope("id", "chan", 1.0, {"type": "http"}, [])
    assert b"ack_send" not in plain.encode()


def test_an_ack_send_is_the_sends_events_then_all_of_the_acks_arguments() -> None:
    events = [{"type": "http.response.start", "status": 200, "headers": []}]
    for ack in (["node", 1, 1.0], ["node", 8, 1.0, False, wire.PIECE_SIZE]):
        kind, request_id, args = wire.unpack(wire.pack(wire.ACK_SEND, "r1", events, *ack))
        assert (kind, request_id) == (wire.ACK_SEND, "r1")
        assert wire.split_ack_send(args) == (ack, [events])
        assert wire.ack_of_ack_send(args) == ack and args[0] == events


@pytest.mark.parametrize(
    "args",
    [
        [],
        [[]],  # events, no ack
        ["node", 1, 1.0],  # an ack, no events
        [{"type": "http.response.start"}, "node", 1, 1.0],  # events not in a list
        [[], 7, 1, 1.0],  # no Node channel
        [[], "", 1, 1.0],
        [[], "n" * 257, 1, 1.0],
        [[], "node", 1, 1.0, True],  # asks for a confirmation: it would run nothing before
    ],
)
def test_split_ack_send_refuses_a_malformed_one(args: list[Any]) -> None:
    with pytest.raises(WireError):
        wire.split_ack_send(args)
    with pytest.raises(WireError):
        wire.ack_of_ack_send(args)


def test_drop_rest_logs_one_line_on_the_callers_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    messages = wire.split_frame(wire.batch_frame([wire.pack(wire.CANCEL, "r")] * 5))
    wire.drop_rest(logging.getLogger("minidasgi.node"), messages, 1, "the channel")
    wire.drop_rest(logging.getLogger("minidasgi.distributor"), messages, 4, "the channel")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("minidasgi.node", "dropped the 3 messages after it in its batch on the channel")
    ]  # nothing follows the last: no line
