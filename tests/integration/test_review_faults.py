"""Defects found reviewing issue 9's reliability work, each reproduced for real.

A response cut by the distributor while the Node's last body waits for credit (the CANCEL
must still stop the Node), forged SENDs landing before a request's ack (the violation must
still fail the request), a fail-fast distributor whose command link goes silent while idle
(its pipelined LPUSH must be bounded like any command), and forged PINGs naming thousands of
ids (a Node's answers must stay bounded). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
import pytest

from minidasgi import Node, create_distributor, wire
from minidasgi.resp import Subscriber

from . import apps
from .faultproxy import FaultProxy
from .redis_server import RedisServer, calls, client_list
from .stack import poll, run_node, serve_app

pytestmark = pytest.mark.timeout(90)


async def _big_body(scope: Any, receive: Any, send: Any) -> None:
    """32 MiB in one ``http.response.body``: the Node splits it, under credit."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"x" * (32 << 20)})


async def test_a_cancel_stops_a_node_whose_last_body_waits_for_credit(
    redis_server: RedisServer,
) -> None:
    """The response timeout aborts a slow download: the distributor sends CANCEL (and no
    disconnect event). The app's last body is then sent but not yet published, so the
    response is not out: the Node must stop, not wait for credit that never comes."""
    distributor = create_distributor(url=redis_server.url, key="cancel-last", response_timeout=2)
    node = Node(url=redis_server.url, app=_big_body, key="cancel-last", lifespan="off")
    async with serve_app(distributor) as base, run_node(node):
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            received = 0
            deadline = time.monotonic() + 20
            # A slow reader: the distributor keeps relaying, so its response timeout fires.
            while time.monotonic() < deadline:
                try:
                    chunk = await asyncio.wait_for(reader.read(64 * 1024), 5)
                except (ConnectionError, asyncio.TimeoutError):
                    break
                if not chunk:
                    break
                received += len(chunk)
                if distributor._exchanges:  # once the response is cut, what is left is drained
                    await asyncio.sleep(0.05)
            assert 0 < received < 32 << 20, "the download was not cut by the response timeout"
        finally:
            writer.close()
        assert await poll(lambda: not distributor._exchanges, 5)
        assert await poll(lambda: node.in_flight == 0, 10), (
            "the Node still runs a request its distributor cancelled"
        )


async def test_forged_sends_before_the_ack_fail_the_request(redis_server: RedisServer) -> None:
    """More SENDs than the credit, forged while the request waits in the queue: the
    violation is seen before the ack. It must still end the request for its client instead
    of silently dropping everything the real Node sends later."""
    distributor = create_distributor(url=redis_server.url, key="forged-early", worker_timeout=20)
    async with serve_app(distributor) as base:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            # 16 MiB: far more than one window, so the Node needs credit to finish.
            request = asyncio.ensure_future(client.get("/?16777216"))
            assert await poll(lambda: len(distributor._exchanges) == 1, 10)
            assert await poll(lambda: redis_server.command("LLEN", "forged-early") == 1, 10)
            (exchange,) = list(distributor._exchanges.values())
            body = {"type": "http.response.body", "body": b"forged,", "more_body": True}
            message = wire.pack(wire.SEND, exchange.id, [body])
            count = exchange.credits * 4  # the credits its envelope announced, 4 times
            script = "for i = 1, tonumber(ARGV[2]) do redis.call('PUBLISH', KEYS[1], ARGV[1]) end"
            await asyncio.to_thread(
                redis_server.command, "EVAL", script, 1, distributor.channel, message, count
            )
            node = Node(url=redis_server.url, app=apps.download, key="forged-early", lifespan="off")
            async with run_node(node):
                done, _ = await asyncio.wait([request], timeout=20)
                if not done:
                    request.cancel()
                assert done, "the client still waits 20 s after forged SENDs"
                assert request.result().status_code == 502
                assert await poll(lambda: node.in_flight == 0, 10)


async def test_fail_fast_distributor_with_a_silent_idle_link_answers_503(
    redis_server: RedisServer,
) -> None:
    """With fail-fast, the LPUSH travels in a pipeline with PUBSUB NUMSUB. A pipeline sent on
    an idle connection whose link went silent must be bounded by the reply timeout like any
    command, not wait forever (a reply timeout of 1.5 s: that it bounds the pipeline is what
    is checked, not how long it is)."""
    with FaultProxy(redis_server.port) as proxy:
        distributor = create_distributor(
            url=f"{proxy.url()}?reply_timeout=1.5", key="ff-silent", fail_fast=True
        )
        node = Node(url=redis_server.url, app=apps.hello, key="ff-silent", lifespan="off")
        async with serve_app(distributor) as base, run_node(node):
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                assert (await client.get("/")).status_code == 200
                proxy.stall()  # both directions of the open flows, never resumed
                request = asyncio.ensure_future(client.get("/"))
                done, _ = await asyncio.wait([request], timeout=30)
                if not done:
                    request.cancel()
                assert done, "a request still waits 30 s into the silence"
                assert request.result().status_code in (502, 503)


async def test_a_forged_ping_naming_many_ids_is_answered_boundedly(
    redis_server: RedisServer,
) -> None:
    """A PING is answered with a GONE per id the receiver does not run: one forged PING of
    thousands of made-up ids must not make a Node publish thousands of messages at once."""
    node = Node(url=redis_server.url, app=apps.hello, key="ping-forged", lifespan="off")
    received: list[bytes] = []
    victim = "minidasgi:0:dist:victim"
    watcher = Subscriber(
        redis_server.url, on_message=lambda _c, data: received.extend(wire.split_frame(data))
    )
    async with run_node(node):
        await asyncio.wait_for(watcher.subscribe(victim), 5)
        try:
            ids = [f"{i:024x}" for i in range(wire.MAX_PING_IDS)]
            forged = wire.ping_messages(victim, ids)[0]
            for _ in range(3):
                await asyncio.to_thread(redis_server.command, "PUBLISH", node.channel, forged)
            assert await poll(lambda: len(received) >= wire.MAX_PING_ANSWERS, 10)
            await asyncio.sleep(1)  # whatever else is coming
        finally:
            await watcher.close()
    assert 0 < len(received) <= 3 * wire.MAX_PING_ANSWERS, (
        f"{len(received)} GONE messages for 3 forged PINGs"
    )


async def test_a_forged_ping_to_a_distributor_is_answered_boundedly(
    redis_server: RedisServer,
) -> None:
    """The distributor's side of the same: a CANCEL per id it does not relay, bounded."""
    distributor = create_distributor(url=redis_server.url, key="ping-forged-dist")
    received: list[bytes] = []
    victim = "minidasgi:0:node:victim"
    watcher = Subscriber(
        redis_server.url, on_message=lambda _c, data: received.extend(wire.split_frame(data))
    )
    async with serve_app(distributor):
        await asyncio.wait_for(watcher.subscribe(victim), 5)
        try:
            ids = [f"{i:024x}" for i in range(wire.MAX_PING_IDS)]
            forged = wire.ping_messages(victim, ids)[0]
            for _ in range(3):
                await asyncio.to_thread(
                    redis_server.command, "PUBLISH", distributor.channel, forged
                )
            assert await poll(lambda: len(received) >= wire.MAX_PING_ANSWERS, 10)
            await asyncio.sleep(1)  # whatever else is coming
        finally:
            await watcher.close()
    assert 0 < len(received) <= 3 * wire.MAX_PING_ANSWERS, f"{len(received)} CANCELs"


def _blocked_clients(redis: RedisServer) -> int:
    info = redis.command("INFO", "clients")
    assert isinstance(info, bytes)
    for line in info.decode().splitlines():
        if line.startswith("blocked_clients:"):
            return int(line.split(":", 1)[1])
    raise LookupError("no blocked_clients in INFO")


def _popped(redis: RedisServer, key: str, *, pushes: int) -> bool:
    """Whether LPUSH has reached Redis ``pushes`` times in all and ``key`` is empty again."""
    return calls(redis, "lpush") >= pushes and redis.command("LLEN", key) == 0


def _ack_landed(distributor: Any) -> bool:
    """Whether a Node's message (its ack first) waits in a request's inbox: read only once
    the take-back's LREM has its reply."""
    return any(len(e.inbox) for e in distributor._exchanges.values())


def _command_connection(proxy: FaultProxy, redis: RedisServer) -> Any:
    """The proxied connection that is not subscribed (a distributor's command connection)."""
    listing = redis.command("CLIENT", "LIST")
    assert isinstance(listing, bytes)
    ports = {c.upstream_port for c in proxy.connections()}
    for line in listing.decode().splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        port = int(fields["addr"].rsplit(":", 1)[1])
        if port in ports and fields.get("sub", "0") == "0" and fields.get("psub", "0") == "0":
            return proxy.connection_to(port)
    raise LookupError("no command connection through the proxy")


async def test_an_ack_that_lands_while_the_take_back_runs_is_kept(
    redis_server: RedisServer,
) -> None:
    """The Node popped the request just in time, its ack is held back past the deadline, and
    reaches the distributor while its LREM is on the way (the LREM's reply is held back): the
    LREM finds nothing, so the Node has the request, and its ack, already in, must be used,
    not drained (with a CANCEL to the Node) then waited for in vain until a 504."""
    with FaultProxy(redis_server.port) as dist_proxy, FaultProxy(redis_server.port) as node_proxy:
        distributor = create_distributor(url=dist_proxy.url(), key="ack-lrem", worker_timeout=2)
        node = Node(url=node_proxy.url(), app=apps.hello, key="ack-lrem", lifespan="off")
        async with serve_app(distributor) as base, run_node(node):
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                assert (await client.get("/warm")).status_code == 200
                command = _command_connection(dist_proxy, redis_server)
                # The Node's BRPOP is waiting: the request reaches it at once, its ack does not.
                assert await poll(lambda: _blocked_clients(redis_server) == 1, 10)
                pushed = calls(redis_server, "lpush")  # the warm-up's, however many
                node_proxy.stall(up=True, down=False)
                try:
                    request = asyncio.ensure_future(client.get("/"))
                    # Popped (pushed, and no longer in the list), its ack held back.
                    assert await poll(
                        lambda: _popped(redis_server, "ack-lrem", pushes=pushed + 1), 10
                    )
                    command.stall(up=False, down=True)  # the LREM at 2 s: its reply held back
                    assert await poll(lambda: calls(redis_server, "lrem") == 1, 10)
                finally:
                    node_proxy.resume()  # the ack lands before the LREM's reply
                assert await poll(lambda: _ack_landed(distributor), 10)
                command.resume()
                response = await asyncio.wait_for(request, 20)
                assert response.status_code == 200, response.text


async def test_a_refused_request_a_node_took_meanwhile_is_not_run_behind_a_503(
    redis_server: RedisServer,
) -> None:
    """Over ``max_queue`` the request is refused (503 + Retry-After: the client may retry)
    and taken back. If a Node popped it before the LREM, the app runs: answering 503 then
    invites a second run of the same request. The LPUSH's reply is held back while a Node
    pops the request (queued before the Node connected, it waits for the distributor's
    confirmation, which the distributor gives once it knows a Node has it)."""
    ran: list[str] = []

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            ran.append(scope["path"])
            await apps.hello(scope, receive, send)

    with FaultProxy(redis_server.port) as proxy:
        distributor = create_distributor(url=proxy.url(), key="refused-taken", max_queue=1)
        node = Node(url=redis_server.url, app=recorder, key="refused-taken", lifespan="off")
        async with serve_app(distributor) as base:
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                assert await poll(lambda: distributor.ready, 10)
                redis_server.command("LPUSH", "refused-taken", b"junk")  # the queue is at 1
                command = _command_connection(proxy, redis_server)
                command.stall(up=False, down=True)
                request = asyncio.ensure_future(client.get("/once"))
                assert await poll(lambda: redis_server.command("LLEN", "refused-taken") == 2, 10)
                async with run_node(node):
                    # The Node drops the junk and takes the request.
                    taken = lambda: redis_server.command("LLEN", "refused-taken") == 0  # noqa: E731
                    assert await poll(taken, 10)
                    command.resume()
                    response = await asyncio.wait_for(request, 20)
        assert ran == ["/once"]
        assert response.status_code == 200, (response.status_code, response.text)


_FLOOD = "for i = 1, tonumber(ARGV[2]) do redis.call('PUBLISH', KEYS[1], ARGV[1]) end"


async def test_forged_repeats_do_not_pile_up_in_a_distributor(redis_server: RedisServer) -> None:
    """ACK, DONE and GONE take no credit. A request gets one of each at most: repeats are
    forged, and while the relay waits on a client that does not read, they must not pile up
    in its inbox without bound."""
    distributor = create_distributor(url=redis_server.url, key="forged-acks")
    node = Node(url=redis_server.url, app=apps.download, key="forged-acks", lifespan="off")
    async with serve_app(distributor) as base, run_node(node):
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # 256 MiB to a client that reads nothing: the relay waits on the client's socket.
            writer.write(b"GET /?268435456 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert await poll(lambda: any(e.node for e in distributor._exchanges.values()), 10)
            (exchange,) = list(distributor._exchanges.values())
            assert exchange.node is not None
            ack = wire.pack(wire.ACK, exchange.id, exchange.node, 8, 1.0)
            await asyncio.to_thread(
                redis_server.command, "EVAL", _FLOOD, 1, distributor.channel, ack, 50_000
            )
            await asyncio.sleep(1)
            assert len(exchange.inbox) <= exchange.credits + 2
        finally:
            writer.close()
            del reader


async def test_forged_disconnects_do_not_pile_up_in_a_node(redis_server: RedisServer) -> None:
    """A disconnect EVENT takes no credit: one is all an app needs, and repeats (forged) must
    not pile up in a job's inbox while its app does not read."""
    distributor = create_distributor(url=redis_server.url, key="forged-gone")
    release = asyncio.Event()

    async def deaf(scope: Any, receive: Any, send: Any) -> None:
        # Reads nothing until released, once the flood is checked (it slept 4 s before).
        if scope["type"] == "http":
            await asyncio.wait_for(release.wait(), 20)
            await apps.hello(scope, receive, send)

    node = Node(url=redis_server.url, app=deaf, key="forged-gone", lifespan="off")
    async with serve_app(distributor) as base, run_node(node):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            request = asyncio.ensure_future(client.get("/"))
            assert await poll(lambda: node.in_flight == 1, 10)
            (job,) = list(node._jobs.values())
            event = wire.pack(wire.EVENT, job.id, {"type": "http.disconnect"})
            await asyncio.to_thread(
                redis_server.command, "EVAL", _FLOOD, 1, node.channel, event, 50_000
            )
            await asyncio.sleep(1)
            assert len(job.inbox) <= 2
            release.set()
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await request


async def test_a_subscriber_blip_spares_requests_not_queued_yet(redis_server: RedisServer) -> None:
    """The distributor's subscriber reconnects (``CLIENT KILL``) while a request is still
    being buffered: nothing of that request could have been lost, so once queued (the
    subscription back) it must be served, not failed with 502."""
    distributor = create_distributor(url=redis_server.url, key="blip-buffering")
    node = Node(url=redis_server.url, app=apps.count_upload, key="blip-buffering", lifespan="off")
    async with serve_app(distributor) as base:
        assert await poll(lambda: distributor.ready, 10)
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 200000\r\n\r\n" + b"x" * 100_000
            )
            await writer.drain()
            assert await poll(lambda: len(distributor._exchanges) == 1, 10)
            (subscriber,) = [c for c in client_list(redis_server) if c.get("sub", "0") != "0"]
            redis_server.command("CLIENT", "KILL", "ID", subscriber["id"])
            # It resubscribes on a new connection at once.
            assert await poll(
                lambda: (
                    [c["id"] for c in client_list(redis_server) if c.get("sub", "0") != "0"]
                    not in ([], [subscriber["id"]])
                ),
                10,
            )
            assert await poll(lambda: distributor.ready, 10)
            async with run_node(node):
                writer.write(b"x" * 100_000)
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
                assert head.startswith(b"HTTP/1.1 200"), head
        finally:
            writer.close()
