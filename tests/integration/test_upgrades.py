"""Upgrading a running fleet: Nodes and distributors of this release and of the first one
(codec format 1, today's envelope fields, single messages) read each other, and a side that
cannot read a format says so at once instead of leaving the client to a timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import websockets

from minidasgi import Node, codec, create_distributor, wire
from minidasgi.resp import Subscriber, connect
from minidasgi.testing import RedisServer

from . import apps
from .stack import poll, run_node, serve_app

RELEASED = codec.RELEASED


def _first_release_envelope(request_id: str, reply: str) -> bytes:
    """An envelope as the first release writes it: one codec dict in format 1."""
    return codec.encode_binary(
        {
            "id": request_id,
            "reply": reply,
            "deadline": time.time() + 30,
            "scope": apps.http_scope("/old"),
            "events": [{"type": "http.request", "body": b"", "more_body": False}],
            "window": 8,
            "liveness": 1.0,
            "queued": time.time(),
        },
        version=RELEASED,
    )


async def _listening(redis_server: RedisServer, channel: str, got: list[bytes]) -> Subscriber:
    subscriber = Subscriber(redis_server.url, on_message=lambda _, data: got.append(data))
    subscriber.start()
    await asyncio.wait_for(subscriber.subscribe(channel), 5)
    return subscriber


async def test_a_node_answers_an_envelope_of_the_first_release_in_that_format(
    redis_server: RedisServer,
) -> None:
    node = Node(url=redis_server.url, app=apps.hello, key="K", lifespan="off")
    reply = wire.new_channel("minidasgi", 0, "dist")
    request_id = wire.new_request_id()
    got: list[bytes] = []
    subscriber = await _listening(redis_server, reply, got)
    pusher = await asyncio.wait_for(connect(redis_server.url), 5)
    try:
        async with run_node(node):
            await pusher.lpush("K", _first_release_envelope(request_id, reply))
            assert await poll(lambda: len(got) >= 2, 10), got
    finally:
        await pusher.close()
        await subscriber.close()
    # Single messages (no batch frame), each in format 1: what the first release reads.
    assert [data[0] for data in got] == [RELEASED] * len(got)
    messages = [wire.unpack(data) for data in got]
    assert messages[0][:2] == (wire.ACK, request_id)
    events = [e for kind, _, args in messages if kind == wire.SEND for e in args[0]]
    assert [e["type"] for e in events] == ["http.response.start", "http.response.body"]
    assert events[-1]["body"] == b"Hello World!"


async def _fake_node(
    redis_server: RedisServer, key: str, answer: Callable[[Any, bytes], Awaitable[None]]
) -> None:
    """A Node of another release: pops one envelope and lets ``answer`` publish."""
    connection = await asyncio.wait_for(connect(redis_server.url), 5)
    try:
        popped = await connection.brpop(key, timeout=20)
        assert popped is not None, "nothing was pushed"
        await answer(connection, popped[1])
    finally:
        await connection.close()


async def test_a_distributor_writing_the_first_release_format_reads_its_nodes_replies(
    redis_server: RedisServer,
) -> None:
    distributor = create_distributor(url=redis_server.url, key="K", wire_format=RELEASED)
    seen: list[int] = []

    async def first_release_node(connection: Any, data: bytes) -> None:
        seen.append(data[0])
        envelope = codec.decode(data)  # a Node of the first release reads format 1 only
        request_id, reply = envelope["id"], envelope["reply"]
        node_channel = wire.new_channel("minidasgi", 0, "node")
        for message in (
            [wire.ACK, request_id, node_channel, 8, 0],
            [wire.SEND, request_id, [{"type": "http.response.start", "status": 200}]],
            [wire.SEND, request_id, [{"type": "http.response.body", "body": b"old node"}]],
        ):
            await connection.publish(reply, codec.encode_binary(message, version=RELEASED))

    async with serve_app(distributor) as base:
        fake = asyncio.ensure_future(_fake_node(redis_server, "K", first_release_node))
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            response = await client.get("/")
        await asyncio.wait_for(fake, 10)
    assert seen == [RELEASED]
    assert (response.status_code, response.text) == (200, "old node")


async def test_a_node_tells_at_once_about_an_envelope_it_cannot_read(
    redis_server: RedisServer,
) -> None:
    node = Node(url=redis_server.url, app=apps.hello, key="K", lifespan="off")
    reply = wire.new_channel("minidasgi", 0, "dist")
    request_id = wire.new_request_id()
    # A distributor of a later release: the preamble every version keeps, then a body in a
    # format this Node does not know.
    frame = bytes([wire.ENVELOPE_FRAME, len(request_id)]) + request_id.encode()
    frame += bytes([len(reply)]) + reply.encode() + b"\x09future body"
    got: list[bytes] = []
    subscriber = await _listening(redis_server, reply, got)
    pusher = await asyncio.wait_for(connect(redis_server.url), 5)
    try:
        async with run_node(node):
            await pusher.lpush("K", frame)
            assert await poll(lambda: len(got) >= 1, 10), "the Node said nothing"
    finally:
        await pusher.close()
        await subscriber.close()
    kind, answered, args = wire.unpack(got[0])
    assert (kind, answered) == (wire.GONE, request_id)
    assert args[0].startswith("unsupported wire format 9")


async def test_a_client_gets_its_answer_at_once_when_the_node_cannot_read_the_format(
    redis_server: RedisServer,
) -> None:
    # worker_timeout far above the client's own bound: only the Node's GONE can answer it.
    distributor = create_distributor(url=redis_server.url, key="K", worker_timeout=120)

    async def later_release_node(connection: Any, data: bytes) -> None:
        peek = wire.peek_envelope(data)
        assert peek is not None, "an envelope of this release has a preamble"
        request_id, reply = peek
        reason = "unsupported wire format 3: upgrade the worker"
        await connection.publish(reply, wire.pack(wire.GONE, request_id, reason))

    async with serve_app(distributor) as base:
        fake = asyncio.ensure_future(_fake_node(redis_server, "K", later_release_node))
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            response = await client.get("/")
        await asyncio.wait_for(fake, 10)
    assert response.status_code == distributor.no_worker_status


# WebSocket credit in bytes (``wire.CREDIT_UNIT``): used only when both sides announce a
# unit; a side of an earlier release, which announces none, is sent and granted credit in
# messages, whichever side it is.

WAIT = 10.0


def _ws_url(base: str) -> str:
    return "ws" + base.removeprefix("http") + "/"


async def _peer_queue(
    redis_server: RedisServer, channel: str
) -> tuple[Subscriber, asyncio.Queue[tuple[str, str, list[Any]]]]:
    """A subscriber on ``channel`` queuing each conversation message (batches split)."""
    queue: asyncio.Queue[tuple[str, str, list[Any]]] = asyncio.Queue()

    def on_message(_: bytes, data: bytes) -> None:
        for message in wire.split_frame(data):
            queue.put_nowait(wire.unpack(message))

    subscriber = Subscriber(redis_server.url, on_message=on_message)
    subscriber.start()
    await asyncio.wait_for(subscriber.subscribe(channel), 5)
    return subscriber, queue


async def _next(queue: asyncio.Queue[tuple[str, str, list[Any]]], kind: str) -> list[Any]:
    """The arguments of the next message, which must be of ``kind``."""
    got, _, args = await asyncio.wait_for(queue.get(), WAIT)
    assert got == kind, (got, args)
    return args


async def test_a_distributor_counts_messages_with_a_node_that_announces_no_credit_unit(
    redis_server: RedisServer,
) -> None:
    distributor = create_distributor(url=redis_server.url, key="K", liveness_interval=3600)
    node_channel = wire.new_channel("minidasgi", 0, "node")
    subscriber, queue = await _peer_queue(redis_server, node_channel)

    async def earlier_node(connection: Any, data: bytes) -> None:
        envelope = wire.Envelope.decode(data)
        assert envelope.unit == wire.CREDIT_UNIT  # announced: this Node's release ignores it

        async def publish(kind: str, *args: Any) -> None:
            await connection.publish(envelope.reply, wire.pack(kind, envelope.id, *args))

        credit = envelope.window  # in messages, as this release counts it

        async def next_event() -> dict[str, Any]:
            nonlocal credit
            while True:
                kind, _, args = await asyncio.wait_for(queue.get(), WAIT)
                if kind != wire.CREDIT:
                    assert kind == wire.EVENT, kind
                    return dict(args[0])
                credit += args[0]

        await publish(wire.ACK, node_channel, 1, 0)  # a window of one message, no unit
        await publish(wire.SEND, [{"type": "websocket.accept"}])
        credit -= 1
        for _ in range(3):
            event = await next_event()
            # A window of one message: the next may come only once this credit is out.
            assert all(m[0] != wire.EVENT for m in list(queue._queue))  # type: ignore[attr-defined]
            await publish(wire.CREDIT, 1)
            for i in range(4):  # 12 in all: more than the window, so credit must come back
                while credit == 0:
                    credit += (await _next(queue, wire.CREDIT))[0]
                credit -= 1
                text = f"{event['text']}{i}"
                await publish(wire.SEND, [{"type": "websocket.send", "text": text}])

    try:
        async with serve_app(distributor) as base:
            fake = asyncio.ensure_future(_fake_node(redis_server, "K", earlier_node))
            async with websockets.connect(_ws_url(base)) as ws:
                for n in range(3):
                    await ws.send(f"m{n}")
                got = [await asyncio.wait_for(ws.recv(), WAIT) for _ in range(12)]
                assert got == [f"m{n}{i}" for n in range(3) for i in range(4)]
            await asyncio.wait_for(fake, WAIT)
    finally:
        await subscriber.close()


async def test_a_node_counts_messages_with_a_distributor_that_announces_no_credit_unit(
    redis_server: RedisServer,
) -> None:
    await _node_against_fake_distributor(redis_server, unit=0)


async def test_a_node_counts_bytes_with_a_distributor_that_announces_a_credit_unit(
    redis_server: RedisServer,
) -> None:
    await _node_against_fake_distributor(redis_server, unit=wire.CREDIT_UNIT)


async def _node_against_fake_distributor(redis_server: RedisServer, *, unit: int) -> None:
    """A fake distributor grants a Node a WebSocket window of one message, in the earlier
    release's shape (``unit=0``: no unit in the envelope) or this one's. The app accepts,
    then sends 100 small messages for each it receives."""

    async def chatty(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (await receive())["type"] == "websocket.receive":
            for i in range(100):
                await send({"type": "websocket.send", "text": f"s{i}"})

    node = Node(url=redis_server.url, app=chatty, key="K", lifespan="off", liveness_interval=3600)
    reply = wire.new_channel("minidasgi", 0, "dist")
    request_id = wire.new_request_id()
    subscriber, queue = await _peer_queue(redis_server, reply)
    pusher = await asyncio.wait_for(connect(redis_server.url), 5)
    scope = {"type": "websocket", "path": "/", "headers": [], "subprotocols": []}
    envelope = wire.Envelope(
        request_id, reply, time.time() + 30, scope, [{"type": "websocket.connect"}], 1, unit=unit
    )

    async def publish(channel: str, kind: str, *args: Any) -> None:
        await pusher.publish(channel, wire.pack(kind, request_id, *args))

    try:
        async with run_node(node):
            await pusher.lpush("K", envelope.encode())
            ack = await _next(queue, wire.ACK)
            node_channel = ack[0]
            assert await _next(queue, wire.SEND) == [[{"type": "websocket.accept"}]]
            await publish(node_channel, wire.EVENT, {"type": "websocket.receive", "text": "go"})
            if unit:
                # The Node knows units, says so, and counts the window of one message (a
                # 128 KiB piece) in them: its 100 small messages need no credit at all.
                assert ack[5:] == [wire.CREDIT_UNIT]
                for i in range(100):
                    assert await _next(queue, wire.SEND) == [
                        [{"type": "websocket.send", "text": f"s{i}"}]
                    ]
            else:
                assert len(ack) < 6  # nothing announced to a distributor that did not
                # The accept took the one message of the window: each message waits for a
                # credit of one (one more would be a violation this loop would see first).
                await publish(node_channel, wire.CREDIT, 1)
                for i in range(100):
                    args = await _next(queue, wire.SEND)
                    assert args == [[{"type": "websocket.send", "text": f"s{i}"}]]
                    assert queue.empty()  # nothing more without credit
                    await publish(node_channel, wire.CREDIT, 1)
            await publish(node_channel, wire.EVENT, {"type": "websocket.disconnect", "code": 1000})
    finally:
        await pusher.close()
        await subscriber.close()


async def test_a_distributor_counts_bytes_with_a_node_that_announces_a_credit_unit(
    redis_server: RedisServer,
) -> None:
    distributor = create_distributor(url=redis_server.url, key="K", liveness_interval=3600)
    node_channel = wire.new_channel("minidasgi", 0, "node")
    subscriber, queue = await _peer_queue(redis_server, node_channel)
    events: list[str] = []

    async def this_release_node(connection: Any, data: bytes) -> None:
        envelope = wire.Envelope.decode(data)

        async def publish(kind: str, *args: Any) -> None:
            await connection.publish(envelope.reply, wire.pack(kind, envelope.id, *args))

        # A window of one 128 KiB message, counted in units: room for 100 small ones.
        await publish(wire.ACK, node_channel, 1, 0, False, wire.CHUNK_SIZE, wire.CREDIT_UNIT)
        await publish(wire.SEND, [{"type": "websocket.accept"}])
        while len(events) < 100:
            kind, _, args = await asyncio.wait_for(queue.get(), WAIT)
            if kind == wire.EVENT:
                events.append(args[0]["text"])
        await publish(wire.SEND, [{"type": "websocket.close", "code": 1000}])

    try:
        async with serve_app(distributor) as base:
            fake = asyncio.ensure_future(_fake_node(redis_server, "K", this_release_node))
            async with websockets.connect(_ws_url(base)) as ws:
                for n in range(100):
                    await ws.send(f"m{n}")
                await asyncio.wait_for(fake, WAIT)  # all 100 came, and no credit was given
    finally:
        await subscriber.close()
    assert events == [f"m{n}" for n in range(100)]


async def test_a_node_sending_more_units_than_granted_is_cut_off(
    redis_server: RedisServer,
) -> None:
    # Counting units, more than granted is still a violation: a (broken) Node that sends
    # twice its window of small messages in one go gets the socket closed with 1011 once the
    # window is full, whatever the client already read.
    distributor = create_distributor(url=redis_server.url, key="K", liveness_interval=3600)
    node_channel = wire.new_channel("minidasgi", 0, "node")
    subscriber, _ = await _peer_queue(redis_server, node_channel)
    window: list[int] = []

    async def greedy_node(connection: Any, data: bytes) -> None:
        envelope = wire.Envelope.decode(data)
        units = envelope.window * (wire.CHUNK_SIZE // envelope.unit)
        window.append(units)
        messages = [
            wire.pack(wire.ACK, envelope.id, node_channel, 1, 0, False, wire.CHUNK_SIZE, 1024),
            wire.pack(wire.SEND, envelope.id, [{"type": "websocket.accept"}]),
        ]
        for i in range(2 * units):
            event = {"type": "websocket.send", "text": f"t{i}"}
            messages.append(wire.pack(wire.SEND, envelope.id, [event]))
        # In one PUBLISH: all counted before the distributor consumes (and credits) any.
        await connection.publish(envelope.reply, wire.batch_frame(messages))

    received: list[str] = []
    try:
        async with serve_app(distributor) as base:
            fake = asyncio.ensure_future(_fake_node(redis_server, "K", greedy_node))
            async with websockets.connect(_ws_url(base)) as ws:
                with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
                    while True:
                        received.append(str(await asyncio.wait_for(ws.recv(), WAIT)))
            await asyncio.wait_for(fake, WAIT)
    finally:
        await subscriber.close()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1011
    # The accept took one unit: what fits in the rest of the window was relayed, no more.
    assert received == [f"t{i}" for i in range(window[0] - 1)]


async def _node_answering_fake_distributor(
    redis_server: RedisServer, app: Any, piece: int, window: int
) -> list[tuple[str, list[Any], int]]:
    """A Node runs ``app`` for an envelope pushed by hand announcing ``piece`` and ``window``
    (a distributor of the previous release announces at most ``EARLIER_PIECE_SIZE``); what it
    publishes back until its SEND or DONE completes the request: ``(kind, args, size)``."""
    node = Node(url=redis_server.url, app=app, key="K", lifespan="off", liveness_interval=3600)
    reply = wire.new_channel("minidasgi", 0, "dist")
    request_id = wire.new_request_id()
    got: list[tuple[str, list[Any], int]] = []

    def on_message(_: bytes, data: bytes) -> None:
        for message in wire.split_frame(data):
            kind, _, args = wire.unpack(message)
            got.append((kind, args, len(message)))

    subscriber = Subscriber(redis_server.url, on_message=on_message)
    subscriber.start()
    await asyncio.wait_for(subscriber.subscribe(reply), 5)
    pusher = await asyncio.wait_for(connect(redis_server.url), 5)
    events = [{"type": "http.request", "body": b"", "more_body": False}]
    envelope = wire.Envelope(
        request_id, reply, time.time() + 30, apps.http_scope(), events, window, piece=piece
    )

    def over() -> bool:
        if any(kind == wire.DONE for kind, _, _ in got):
            return True
        sends = [e for kind, args, _ in got if kind in (wire.SEND, wire.ACK_SEND) for e in args[0]]
        return bool(sends) and sends[-1].get("more_body") is False

    try:
        async with run_node(node):
            await pusher.lpush("K", envelope.encode())
            assert await poll(over, 10), got
    finally:
        await pusher.close()
        await subscriber.close()
    return got


@pytest.mark.parametrize("piece", [wire.EARLIER_PIECE_SIZE, wire.PIECE_SIZE])
async def test_a_node_sends_body_pieces_as_large_as_its_distributor_reads(
    redis_server: RedisServer, piece: int
) -> None:
    # A distributor of the previous release reads pieces of 512 KiB at most (and says so); one
    # of this release reads 1 MiB pieces, half the messages per MiB. Either way the window of
    # 4 MiB holds the whole 2 MiB body: no credit is needed.
    size = 2 * wire.PIECE_SIZE

    async def download(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"d" * size})

    window = 4 * wire.PIECE_SIZE // piece
    got = await _node_answering_fake_distributor(redis_server, download, piece, window)
    bodies = [
        e["body"]
        for kind, args, _ in got
        if kind in (wire.SEND, wire.ACK_SEND)
        for e in args[0]
        if e["type"] == "http.response.body"
    ]
    assert [len(body) for body in bodies] == [piece] * (size // piece)
    assert max(length for _, _, length in got) <= wire.message_limit(piece)


@pytest.mark.parametrize(
    ("piece", "together"),
    [(wire.EARLIER_PIECE_SIZE, False), (wire.PIECE_SIZE, True)],
)
async def test_a_node_never_sends_a_message_over_what_its_distributor_reads(
    redis_server: RedisServer, piece: int, together: bool
) -> None:
    # A start with 300 KiB of headers and a first body piece of 512 KiB: together over the
    # 768 KiB a distributor of the previous release reads, which would drop the message and
    # leave its client waiting. To that one the Node sends the start alone, then the body (it
    # failed the app before); a distributor of this release reads them in one message.
    async def big_headers(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [(b"x-filler-%d" % i, b"h" * 1000) for i in range(300)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"b" * wire.EARLIER_PIECE_SIZE})

    got = await _node_answering_fake_distributor(redis_server, big_headers, piece, 4)
    kinds = [kind for kind, _, _ in got]
    assert wire.DONE not in kinds, kinds
    assert max(length for _, _, length in got) <= wire.message_limit(piece)
    start_messages = [
        [e["type"] for e in args[0]]
        for kind, args, _ in got
        if kind in (wire.SEND, wire.ACK_SEND) and args[0][0]["type"] == "http.response.start"
    ]
    if together:
        assert start_messages == [["http.response.start", "http.response.body"]]
        assert max(length for _, _, length in got) > wire.EARLIER_MAX_MESSAGE_SIZE
    else:
        assert start_messages == [["http.response.start"]]


async def test_a_distributor_sends_a_node_of_the_previous_release_pieces_it_reads(
    redis_server: RedisServer,
) -> None:
    # A Node of the previous release announces 512 KiB pieces in its ACK (and takes 512 KiB
    # of the 1 MiB an envelope announces): an upload reaches it in pieces of that size at
    # most, each message within the 768 KiB it reads.
    size = 3 * wire.PIECE_SIZE
    distributor = create_distributor(url=redis_server.url, key="K", liveness_interval=3600)
    node_channel = wire.new_channel("minidasgi", 0, "node")
    got: list[tuple[dict[str, Any], int]] = []
    done = asyncio.Event()

    def on_message(_: bytes, data: bytes) -> None:
        for message in wire.split_frame(data):
            kind, _, args = wire.unpack(message)
            if kind == wire.EVENT:
                got.append((args[0], len(message)))
                if not args[0].get("more_body", False):
                    done.set()

    subscriber = Subscriber(redis_server.url, on_message=on_message)
    subscriber.start()
    await asyncio.wait_for(subscriber.subscribe(node_channel), 5)
    first: list[dict[str, Any]] = []

    async def previous_node(connection: Any, data: bytes) -> None:
        envelope = wire.Envelope.decode(data)
        assert envelope.piece == wire.PIECE_SIZE
        first.extend(envelope.events)

        async def publish(kind: str, *args: Any) -> None:
            await connection.publish(envelope.reply, wire.pack(kind, envelope.id, *args))

        # A window of 8 pieces of 512 KiB holds the whole body: no credit needed.
        await publish(wire.ACK, node_channel, 8, 0, False, wire.EARLIER_PIECE_SIZE)
        await asyncio.wait_for(done.wait(), WAIT)
        start = {"type": "http.response.start", "status": 200, "headers": []}
        await publish(wire.SEND, [start, {"type": "http.response.body", "body": b"ok"}])

    try:
        async with serve_app(distributor) as base:
            fake = asyncio.ensure_future(_fake_node(redis_server, "K", previous_node))
            async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
                response = await client.post("/", content=b"u" * size)
            await asyncio.wait_for(fake, WAIT)
    finally:
        await subscriber.close()
    assert (response.status_code, response.text) == (200, "ok")
    bodies = [event["body"] for event in first] + [event["body"] for event, _ in got]
    assert sum(map(len, bodies)) == size
    assert got and max(len(event["body"]) for event, _ in got) <= wire.EARLIER_PIECE_SIZE
    assert max(length for _, length in got) <= wire.EARLIER_MAX_MESSAGE_SIZE
