"""The ACK inside the response (``wire.ACK_SEND``): a Node whose app answers a whole request in
the loop turn it started in sends one message where it sent an ACK and a SEND, to a
distributor that announced it reads it; distributors and Nodes of the previous version go on
exchanging the two. Asserted on what travels (the messages each PUBLISH carries), not timed."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import pytest

from minidasgi import Node, create_distributor, wire
from minidasgi.resp import Subscriber, connect
from minidasgi.testing import RedisServer

from . import apps
from .stack import poll, run_node, serve_app

pytestmark = pytest.mark.timeout(60)

Message = tuple[str, str, list[Any]]


async def _get_sniffed(redis_server: RedisServer, app: Any) -> tuple[httpx.Response, list[Message]]:
    """One GET through a distributor to a Node serving ``app``: the answer, and what the Node
    sent the distributor meanwhile."""
    distributor = create_distributor(url=redis_server.url, key="K", liveness_interval=3600)
    node = Node(url=redis_server.url, app=app, key="K", lifespan="off")
    got: list[Message] = []
    async with (
        serve_app(distributor) as base,
        run_node(node),
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        subscriber = await _sniff(redis_server, distributor.channel, got)
        try:
            response = await client.get("/")
        finally:
            await subscriber.close()
    return response, got


async def _sniff(redis_server: RedisServer, channel: str, got: list[Message]) -> Subscriber:
    """A subscriber beside the owner of ``channel``, noting every message published there
    but liveness PINGs, in order (those of a batch frame one by one)."""

    def note(_: bytes, data: bytes) -> None:
        messages = (wire.unpack(m) for m in wire.split_frame(data))
        got.extend(m for m in messages if m[0] != wire.PING)

    subscriber = Subscriber(redis_server.url, on_message=note)
    subscriber.start()
    await asyncio.wait_for(subscriber.subscribe(channel), 5)
    return subscriber


def _kinds(got: list[Message]) -> list[str]:
    return [kind for kind, _, _ in got]


def _envelope(request_id: str, reply: str, *, ack_send: bool, confirms: bool = False) -> bytes:
    """A whole GET as a distributor of this release (``ack_send``) or of the previous one
    writes it; ``confirms`` only where the recovery window is tested (a request pushed while
    the Node starts may be in it)."""
    return wire.Envelope(
        request_id,
        reply,
        time.time() + 30,
        apps.http_scope(),
        [{"type": "http.request", "body": b"", "more_body": False}],
        liveness=1.0,
        queued=time.time(),
        confirms=confirms,
        ack_send=ack_send,
    ).encode()


async def test_a_request_answered_at_once_costs_one_message_carrying_the_ack(
    redis_server: RedisServer,
) -> None:
    distributor = create_distributor(url=redis_server.url, key="K", liveness_interval=3600)
    node = Node(url=redis_server.url, app=apps.hello, key="K", lifespan="off")
    got: list[Message] = []
    async with (
        serve_app(distributor) as base,
        run_node(node),
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        subscriber = await _sniff(redis_server, distributor.channel, got)
        try:
            responses = [await client.get("/") for _ in range(20)]
        finally:
            await subscriber.close()
    assert [r.text for r in responses] == ["Hello World!"] * 20
    # One message per request where there were two (an ACK, then a SEND).
    assert _kinds(got) == [wire.ACK_SEND] * 20, got
    for _, _, args in got:
        ack, send = wire.split_ack_send(args)
        assert ack[0] == node.channel and ack[1] == 1  # the ACK's arguments, all there
        events = [event["type"] for event in send[0]]
        assert events == ["http.response.start", "http.response.body"]


async def test_an_app_that_answers_in_a_later_loop_turn_gets_its_ack_sent_alone(
    redis_server: RedisServer,
) -> None:
    """The ACK leaves at the end of the turn the app started in, as before: the combined
    message never delays it."""
    distributor = create_distributor(url=redis_server.url, key="K", liveness_interval=3600)
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        # The first request sleeps until released, once the second one is answered (it slept
        # a fixed 5 s before).
        if scope["type"] == "http" and scope["query_string"] == b"held":
            await asyncio.wait_for(release.wait(), 20)
            scope = {**scope, "query_string": b"0"}
        await apps.sleepy(scope, receive, send)

    node = Node(url=redis_server.url, app=app, key="K", lifespan="off")
    got: list[Message] = []
    async with (
        serve_app(distributor) as base,
        run_node(node),
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        subscriber = await _sniff(redis_server, distributor.channel, got)
        try:
            first = asyncio.ensure_future(client.get("/?held"))
            # The ACK arrives while the app still sleeps.
            assert await poll(lambda: _kinds(got) == [wire.ACK], 10), got
            assert not first.done()
            response = await client.get("/?0.01")
            release.set()
            assert (await first).text == "slept"
        finally:
            await subscriber.close()
    assert response.text == "slept"
    assert _kinds(got) == [wire.ACK, wire.ACK, wire.SEND, wire.SEND], got


async def test_an_app_that_returns_without_answering_gets_its_ack_before_its_done(
    redis_server: RedisServer,
) -> None:
    """Only a SEND carries the waiting ACK: any other message follows it."""

    async def silent(scope: Any, receive: Any, send: Any) -> None:
        return None

    response, got = await _get_sniffed(redis_server, silent)
    assert response.status_code == 500
    assert _kinds(got) == [wire.ACK, wire.DONE], got


async def test_a_start_sent_while_the_ack_waits_is_not_held_past_the_turn(
    redis_server: RedisServer,
) -> None:
    """An app that sends its start and then waits before its body: the ACK and the start
    leave without the body, as they did before the ACK could wait."""
    release = asyncio.Event()

    async def late_body(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await release.wait()
            await send({"type": "http.response.body", "body": b"late"})

    distributor = create_distributor(url=redis_server.url, key="K", liveness_interval=3600)
    node = Node(url=redis_server.url, app=late_body, key="K", lifespan="off")
    got: list[Message] = []
    async with (
        serve_app(distributor) as base,
        run_node(node),
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        subscriber = await _sniff(redis_server, distributor.channel, got)
        try:
            request = asyncio.ensure_future(client.get("/"))
            assert await poll(lambda: _kinds(got) == [wire.ACK, wire.SEND], 10), got
            release.set()
            response = await request
        finally:
            await subscriber.close()
    assert response.text == "late"
    assert _kinds(got) == [wire.ACK, wire.SEND, wire.SEND], got
    assert [event["type"] for event in got[1][2][0]] == ["http.response.start"]


@pytest.mark.parametrize("distributor", ["announcing", "previous", "recovery"])
async def test_a_node_sends_the_combined_message_only_to_a_distributor_that_announced_it(
    redis_server: RedisServer, distributor: str
) -> None:
    """The test plays a distributor of this release (``announcing``) or of the previous one.
    ``recovery``: a request of this release waiting before the Node connects is in its
    recovery window: its ACK asks for a confirmation and goes alone, the app runs once
    confirmed, and its response follows."""
    node = Node(url=redis_server.url, app=apps.hello, key="K", lifespan="off")
    reply = wire.new_channel("minidasgi", 0, "dist")
    request_id = wire.new_request_id()
    got: list[Message] = []
    subscriber = await _sniff(redis_server, reply, got)
    pusher = await asyncio.wait_for(connect(redis_server.url), 5)
    announced = distributor != "previous"
    envelope = _envelope(request_id, reply, ack_send=announced, confirms=distributor == "recovery")
    try:
        if distributor == "recovery":
            await pusher.lpush("K", envelope)
        async with run_node(node):
            if distributor == "recovery":
                assert await poll(lambda: wire.ACK in _kinds(got), 10), got
                await pusher.publish(node.channel, wire.pack(wire.CONFIRM, request_id))
            else:
                await pusher.lpush("K", envelope)
            done = (wire.SEND, wire.ACK_SEND)
            assert await poll(lambda: any(k in done for k in _kinds(got)), 10), got
            assert await poll(lambda: node.in_flight == 0, 10)
    finally:
        await pusher.close()
        await subscriber.close()
    assert {r for _, r, _ in got} == {request_id}
    if distributor == "announcing":
        assert _kinds(got) == [wire.ACK_SEND], got
        ack, send = wire.split_ack_send(got[0][2])
        assert ack == [node.channel, 1, node.liveness_interval]
        events = send[0]
    else:
        # What a distributor of the previous version reads: the ACK, then the SEND.
        assert _kinds(got) == [wire.ACK, wire.SEND], got
        asks = distributor == "recovery"
        assert got[0][2] == [node.channel, 1, node.liveness_interval] + [True] * asks
        events = got[1][2][0]
    assert events[-1]["body"] == b"Hello World!"


async def _play_node(
    redis_server: RedisServer, key: str, answer: Any
) -> tuple[wire.Envelope, list[Any]]:
    """Pop one envelope as a Node would, and let ``answer(connection, envelope)`` publish."""
    connection = await asyncio.wait_for(connect(redis_server.url), 5)
    try:
        popped = await connection.brpop(key, timeout=20)
        assert popped is not None, "nothing was pushed"
        envelope = wire.Envelope.decode(popped[1])
        return envelope, await answer(connection, envelope)
    finally:
        await connection.close()


def _response(body: bytes, *, more: bool = False) -> list[dict[str, Any]]:
    start = {"type": "http.response.start", "status": 200, "headers": []}
    return [start, {"type": "http.response.body", "body": body, "more_body": more}]


async def test_a_distributor_reads_a_node_of_the_previous_version(
    redis_server: RedisServer,
) -> None:
    """Its envelope announces the combined message; a Node of the previous version ignores
    that and sends the ACK and the SEND in one batch frame, which is read as ever."""
    distributor = create_distributor(url=redis_server.url, key="K")

    async def previous_node(connection: Any, envelope: wire.Envelope) -> list[Any]:
        node = wire.new_channel("minidasgi", 0, "node")
        frame = wire.batch_frame(
            [
                wire.pack(wire.ACK, envelope.id, node, 1, 1.0),
                wire.pack(wire.SEND, envelope.id, _response(b"previous")),
            ]
        )
        await connection.publish(envelope.reply, frame)
        return []

    async with serve_app(distributor) as base:
        node = asyncio.ensure_future(_play_node(redis_server, "K", previous_node))
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            response = await client.get("/")
        envelope, _ = await asyncio.wait_for(node, 10)
    assert envelope.ack_send is True
    assert (response.status_code, response.text) == (200, "previous")


async def test_malformed_combined_messages_are_dropped_and_the_distributor_serves_on(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # 2 s, not the default 5: the request after the forged ones gets the no-worker answer.
    distributor = create_distributor(url=redis_server.url, key="K", worker_timeout=2)
    node = wire.new_channel("minidasgi", 0, "node")
    got: list[Message] = []

    async def forging_node(connection: Any, envelope: wire.Envelope) -> list[Any]:
        request_id = envelope.id
        malformed: list[list[Any]] = [
            [],  # neither events nor an ack
            [_response(b"x")],  # no ack
            ["not a list", node, 1, 1.0],
            [{"type": "http.response.start"}, node, 1, 1.0],  # events not in a list
            [_response(b"x"), 7, 1, 1.0],  # no Node channel
            [_response(b"x"), "", 1, 1.0],
            [_response(b"x"), "n" * 257, 1, 1.0],
            [_response(b"x"), node, 1, 1.0, True],  # asks for a confirmation
        ]
        for args in malformed:
            await connection.publish(envelope.reply, wire.pack(wire.ACK_SEND, request_id, *args))
        good = wire.pack(wire.ACK_SEND, request_id, _response(b"served"), node, 1, 1.0)
        await connection.publish(envelope.reply, good)
        return malformed

    subscriber = await _sniff(redis_server, node, got)
    caplog.set_level(logging.WARNING, logger="minidasgi.distributor")
    try:
        async with serve_app(distributor) as base:
            fake = asyncio.ensure_future(_play_node(redis_server, "K", forging_node))
            async with httpx.AsyncClient(base_url=base, timeout=20) as client:
                response = await client.get("/")
                _, malformed = await asyncio.wait_for(fake, 10)
                after = await client.get("/")  # nothing left behind: the next one is served
    finally:
        await subscriber.close()
    assert (response.status_code, response.text) == (200, "served")
    assert after.status_code == 405  # no Node: the no-worker answer, as ever
    dropped = [r for r in caplog.records if "dropped a malformed message" in r.getMessage()]
    assert len(dropped) == len(malformed), caplog.text
    assert wire.CONFIRM not in _kinds(got), got  # the one asking for it was not an ACK


async def test_a_second_or_late_combined_message_gets_a_cancel_and_its_send_is_dropped(
    redis_server: RedisServer,
) -> None:
    """Three Nodes (played by the test) send the combined message for one request: the first
    one's is taken; the second one's (another copy of the envelope) gets a CANCEL and its
    response is dropped; the third, after the response completed (an unknown id by then),
    gets a CANCEL too."""
    distributor = create_distributor(url=redis_server.url, key="K", worker_timeout=30)
    nodes = [wire.new_channel("minidasgi", 0, "node") for _ in range(3)]
    got: dict[str, list[Message]] = {n: [] for n in nodes}
    subscribers = [await _sniff(redis_server, n, got[n]) for n in nodes]

    async def three_nodes(connection: Any, envelope: wire.Envelope) -> list[Any]:
        first, second = nodes[:2]
        start = _response(b"")[:1]
        message = wire.pack(wire.ACK_SEND, envelope.id, start, first, 8, 1.0)
        await connection.publish(envelope.reply, message)
        other = wire.pack(wire.ACK_SEND, envelope.id, _response(b"second"), second, 8, 1.0)
        await connection.publish(envelope.reply, other)
        assert await poll(lambda: wire.CANCEL in _kinds(got[second]), 10), got
        body = [{"type": "http.response.body", "body": b"first", "more_body": False}]
        await connection.publish(envelope.reply, wire.pack(wire.SEND, envelope.id, body))
        return []

    try:
        async with serve_app(distributor) as base:
            fake = asyncio.ensure_future(_play_node(redis_server, "K", three_nodes))
            async with httpx.AsyncClient(base_url=base, timeout=20) as client:
                response = await client.get("/")
            envelope, _ = await asyncio.wait_for(fake, 10)
            publisher = await asyncio.wait_for(connect(redis_server.url), 5)
            try:
                late = wire.pack(wire.ACK_SEND, envelope.id, _response(b"late"), nodes[2], 1, 1.0)
                await publisher.publish(envelope.reply, late)
                assert await poll(lambda: wire.CANCEL in _kinds(got[nodes[2]]), 10), got
            finally:
                await publisher.close()
    finally:
        for subscriber in subscribers:
            await subscriber.close()
    assert (response.status_code, response.text) == (200, "first")
    assert _kinds(got[nodes[1]]) == [wire.CANCEL] and _kinds(got[nodes[2]]) == [wire.CANCEL]
    assert wire.CANCEL not in _kinds(got[nodes[0]]), got


async def test_an_app_cancelled_in_its_first_turn_gets_its_ack_before_its_gone(
    redis_server: RedisServer,
) -> None:
    """A job that ends in the loop turn its ACK waits in, with a GONE (its app cancelled, not
    by the distributor): the ACK leaves first. A GONE before any ACK says the request never
    ran, and its client would get the no-worker answer for a request that did run."""

    async def cancelled(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raise asyncio.CancelledError  # e.g. its own task group torn down

    response, got = await _get_sniffed(redis_server, cancelled)
    assert _kinds(got) == [wire.ACK, wire.GONE], got
    assert response.status_code == 502  # the worker dropped it: not the no-worker answer
