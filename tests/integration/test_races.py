"""Races and corner cases found in review: a final send blocked on credit, a receive() pending
when the response ends, concurrent WebSocket sends, an ACL user without CLIENT, credits lost
with a killed connection, a response's end (or its ACK) lost while its app works on, and a
stop while a batch of requests is being popped.

Every test runs the real pieces (uvicorn, the distributor, in-process Nodes, a private
redis-server) or a fake distributor speaking the wire protocol, and bounds every wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets

from minidasgi import Node, create_distributor, wire
from minidasgi.resp import ReplyError, Subscriber, connect

from . import apps
from .redis_server import RedisFactory, RedisReplyError, RedisServer
from .stack import poll, run_node, serve_app

pytestmark = pytest.mark.timeout(60)

Receive = Any
Send = Any


class _FakeDistributor:
    """Pushes envelopes onto a queue and records what Nodes publish back; never grants
    credit, never acks anything."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.channel = wire.new_channel("minidasgi", 0, "dist")
        self.got: list[tuple[str, str, list[Any]]] = []
        self._subscriber = Subscriber(url, on_message=self._on_message)
        self._connection: Any = None

    def _on_message(self, channel: bytes, data: bytes) -> None:
        self.got.extend(wire.unpack(message) for message in wire.split_frame(data))

    async def start(self) -> None:
        self._connection = await asyncio.wait_for(connect(self.url), 5)
        await asyncio.wait_for(self._subscriber.subscribe(self.channel), 5)

    async def push(self, key: str, count: int = 1) -> list[str]:
        ids = []
        for _ in range(count):
            request_id = wire.new_request_id()
            ids.append(request_id)
            envelope = wire.Envelope(
                request_id,
                self.channel,
                time.time() + 60,
                apps.http_scope(headers=[]),
                [{"type": "http.request", "body": b"", "more_body": False}],
            )
            await self._connection.lpush(key, envelope.encode())
        return ids

    def ids(self, kind: str) -> set[str]:
        return {request_id for got_kind, request_id, _ in self.got if got_kind == kind}

    def sends(self, kind: str = wire.SEND) -> list[tuple[str, list[Any]]]:
        return [(request_id, args) for got, request_id, args in self.got if got == kind]

    def statuses(self) -> dict[str, int]:
        """Request id -> the status of the http.response.start it published."""
        found = {}
        for request_id, args in self.sends():
            for event in args[0] if args and isinstance(args[0], list) else []:
                if event.get("type") == "http.response.start":
                    found[request_id] = event.get("status")
        return found

    async def vanish(self) -> None:
        """Go away as a crashed distributor does: nobody listens on its channel any more."""
        await self._subscriber.close()
        if self._connection is not None:
            await self._connection.close()


@contextlib.asynccontextmanager
async def _fake_distributor(url: str) -> AsyncIterator[_FakeDistributor]:
    distributor = _FakeDistributor(url)
    try:
        await distributor.start()
        yield distributor
    finally:
        await distributor.vanish()


# 1. A final send blocked on credit still notices its distributor vanished -------------------


async def test_final_send_blocked_on_credit_notices_the_distributor_vanished(
    redis_server: RedisServer,
) -> None:
    state: dict[str, str] = {}

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200})
        # The start is held and goes out with the first body: 8 messages fill the window of 8
        # (each body in its own loop turn: those of one turn travel as one message).
        for _ in range(8):
            await send({"type": "http.response.body", "body": b"x" * 1000, "more_body": True})
            await asyncio.sleep(0)
        state["final"] = "sending"
        try:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except BaseException as exc:
            state["final"] = type(exc).__name__
            raise
        state["final"] = "sent"

    node = Node(
        url=redis_server.url,
        app=app,
        key="blocked",
        lifespan="off",
        liveness_interval=0.2,
        shutdown_timeout=1,
    )
    async with run_node(node), _fake_distributor(redis_server.url) as fake:
        await fake.push("blocked")
        assert await poll(
            lambda: len(fake.sends()) == wire.WINDOW and state.get("final") == "sending", 5
        ), f"the app did not block on its final send: {state}, {len(fake.sends())} sends"
        # A liveness round or more with the distributor alive (the Node's PING reached it).
        pings = len(fake.sends(wire.PING))
        assert await poll(lambda: len(fake.sends(wire.PING)) > pings, 5), "no liveness round"
        assert node.in_flight == 1 and state["final"] == "sending"
        await fake.vanish()
        ended = await poll(lambda: node.in_flight == 0, 5)
        assert ended, (
            "the job blocked on its final send never noticed its distributor vanished "
            f"(final send: {state['final']})"
        )
    assert state["final"] != "sending", "the app is still blocked in its final send"


# 2. A pending receive() is woken when the response ends; a disconnect is sticky ------------


@contextlib.asynccontextmanager
async def _through_minidasgi(server: RedisServer, app: Any) -> AsyncIterator[str]:
    node = Node(url=server.url, app=app, key="races", lifespan="off", shutdown_timeout=1)
    distributor = create_distributor(url=server.url, key="races")
    async with run_node(node), serve_app(distributor) as base:
        yield base


async def _pending_then_again(
    receive: Receive, pending: asyncio.Future[Any], outcome: asyncio.Future[Any]
) -> None:
    """Report what the ``pending`` receive() gave within 2 s, then what one more receive()
    gives within 0.5 s (``"timed out"`` for either if nothing)."""
    try:
        first = await asyncio.wait_for(pending, 2)
    except asyncio.TimeoutError:
        outcome.set_result(("timed out", None))
        return
    try:
        second = await asyncio.wait_for(receive(), 0.5)
    except asyncio.TimeoutError:
        second = "timed out"
    outcome.set_result((first, second))


async def test_pending_http_receive_is_woken_when_the_response_completes(
    redis_server: RedisServer,
) -> None:
    outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()  # the (empty) request body
        pending = asyncio.ensure_future(receive())
        await asyncio.sleep(0.2)  # the receive() now waits for an event
        assert not pending.done()
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})
        await _pending_then_again(receive, pending, outcome)

    async with _through_minidasgi(redis_server, app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            response = await client.get("/")
        assert response.status_code == 200 and response.text == "ok"
        first, second = await asyncio.wait_for(outcome, 5)
    assert first == {"type": "http.disconnect"}, "the pending receive() was not woken"
    assert second == {"type": "http.disconnect"}, "a receive() after the disconnect waited"


async def test_pending_websocket_receive_is_woken_after_close(
    redis_server: RedisServer,
) -> None:
    outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        pending = asyncio.ensure_future(receive())
        await asyncio.sleep(0.2)
        assert not pending.done()
        await send({"type": "websocket.send", "text": "bye"})
        await send({"type": "websocket.close", "code": 1000})
        await _pending_then_again(receive, pending, outcome)

    async with _through_minidasgi(redis_server, app) as base:
        async with websockets.connect(base.replace("http", "ws", 1) + "/ws") as ws:
            assert await asyncio.wait_for(ws.recv(), 5) == "bye"
            with pytest.raises(websockets.ConnectionClosedOK):
                await asyncio.wait_for(ws.recv(), 5)
        first, second = await asyncio.wait_for(outcome, 5)
    assert isinstance(first, dict) and first.get("type") == "websocket.disconnect", (
        f"the pending receive() was not woken after websocket.close: {first}"
    )
    assert second == first, f"a receive() after the disconnect gave {second}"


# 3. Concurrent WebSocket sends never interleave ---------------------------------------------


async def test_concurrent_websocket_sends_keep_messages_whole(redis_server: RedisServer) -> None:
    size = 400_000  # several wire pieces each

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})

        async def sender(fill: bytes) -> None:
            await send({"type": "websocket.send", "bytes": fill * size})

        await asyncio.gather(sender(b"a"), sender(b"b"))
        await send({"type": "websocket.close", "code": 1000})

    async with _through_minidasgi(redis_server, app) as base:
        url = base.replace("http", "ws", 1) + "/ws"
        async with websockets.connect(url, max_size=None) as ws:
            messages = []
            with contextlib.suppress(websockets.ConnectionClosedOK):
                while len(messages) < 3:
                    messages.append(await asyncio.wait_for(ws.recv(), 5))
    shapes = sorted((len(m), bytes(sorted(set(m)))) for m in messages)
    assert shapes == [(size, b"a"), (size, b"b")], f"messages received: {shapes}"


# 4. A Node whose ACL user may not use CLIENT still serves -----------------------------------


async def hello(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"hi"})


async def test_node_serves_as_an_acl_user_without_client(redis_factory: RedisFactory) -> None:
    rules = ["~*", "&*", "+@list", "+@pubsub", "+ping", "+auth", "+hello", "+select"]
    server = redis_factory(extra_args=["--user", "worker", "on", ">pw", *rules])
    url = server.url.replace("redis://", "redis://worker:pw@")
    connection = await asyncio.wait_for(connect(url), 5)
    try:
        with pytest.raises(ReplyError):  # the premise: CLIENT ID is refused to this user
            await asyncio.wait_for(connection.execute("CLIENT", "ID"), 5)
    finally:
        await connection.close()
    # pop_timeout bounds the stop: without CLIENT UNBLOCK it waits for the BRPOP to end.
    node = Node(url=url, app=hello, key="acl", lifespan="off", pop_timeout=1)
    distributor = create_distributor(url=url, key="acl", worker_timeout=2)
    async with run_node(node), serve_app(distributor) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            response = await client.get("/")
    assert response.status_code == 200, response.text
    assert response.text == "hi"


# 5. Credits lost with a killed connection do not stall a transfer ---------------------------

_PIECE = b"z" * 65536


async def endless(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """Streams 64 KiB pieces far longer than any test waits (about 1.3 GB)."""
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200})
    for _ in range(20_000):
        await send({"type": "http.response.body", "body": _PIECE, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _kill_command_connections(server: RedisServer, user: str) -> int:
    """CLIENT KILL every connection of ``user`` that is not a subscriber; how many."""
    listing = server.command("CLIENT", "LIST")
    assert isinstance(listing, bytes)
    killed = 0
    for line in listing.decode().splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("user") == user and "P" not in fields.get("flags", ""):
            with contextlib.suppress(RedisReplyError):  # already gone
                server.command("CLIENT", "KILL", "ID", fields["id"])
                killed += 1
    return killed


class _LostCredits:
    """A large download during which the distributor's command connection is killed until
    CREDIT publishes are lost (at most 2; then the kills stop), tried up to three times."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.task: asyncio.Future[None] = None  # type: ignore[assignment]  # the download
        self.received = 0
        self.kills = 0
        self.lost: list[str] = []  # kinds of the distributor's publishes lost (see post)

    def lost_count(self, kind: str) -> int:
        return sum(1 for lost in self.lost if lost == kind)


@contextlib.asynccontextmanager
async def _download_losing_credits(redis_factory: RedisFactory) -> AsyncIterator[_LostCredits]:
    # The distributor logs in as its own user, so its connections can be told from the Node's.
    server = redis_factory(acl_users={"dist": "pw"})
    node = Node(url=server.url, app=endless, key="big", lifespan="off", shutdown_timeout=1)
    distributor = create_distributor(
        url=server.url.replace("redis://", "redis://dist:pw@"), key="big"
    )
    scenario = _LostCredits(node)
    post = distributor.outbox.post

    def observed_post(
        channel: str, message: bytes, **options: Any
    ) -> asyncio.Future[int]:  # observes, changes nothing
        posted = post(channel, message, **options)

        def count(done: asyncio.Future[int]) -> None:
            # Lost as the outbox counts it (``Outbox.post``'s ``lost``): the PUBLISH reached
            # nobody, or it failed with its connection, whether or not Redis had run it.
            if done.cancelled():
                return
            if done.exception() is not None or done.result() == 0:
                scenario.lost.append(wire.unpack(message)[0])

        posted.add_done_callback(count)
        return posted

    distributor.outbox.post = observed_post  # type: ignore[method-assign]

    async def download(base: str) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            async with client.stream("GET", "/") as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    scenario.received += len(chunk)

    async with run_node(node), serve_app(distributor) as base:
        try:
            # A kill may instead lose another publish (a PING, whose loss ends the download
            # too): then nothing was tested, and a fresh download tries again.
            for _attempt in range(3):
                scenario.received = 0
                task = scenario.task = asyncio.ensure_future(download(base))
                assert await poll(
                    lambda: scenario.received >= 5_000_000 or scenario.task.done(), 5
                ), f"the download did not get going: {scenario.received} bytes"
                assert not task.done(), f"the download ended early: {task}"
                while (
                    scenario.lost_count(wire.CREDIT) < 2 and not task.done() and scenario.kills < 60
                ):
                    scenario.kills += _kill_command_connections(server, "dist")
                    await asyncio.sleep(0.1)
                if scenario.lost_count(wire.CREDIT):
                    break
                task.cancel()
                await asyncio.wait([task])
            assert scenario.lost_count(wire.CREDIT), (
                f"no CREDIT publish was lost in {scenario.kills} kills: nothing was tested "
                f"(lost: {scenario.lost})"
            )
            yield scenario
        finally:
            if scenario.task is not None:
                scenario.task.cancel()
                await asyncio.wait([scenario.task])


async def test_lost_credits_do_not_stall_a_download(redis_factory: RedisFactory) -> None:
    async with _download_losing_credits(redis_factory) as scenario:
        # Now the download must end (complete or fail) rather than sit without progress.
        task = scenario.task
        last, last_change = scenario.received, time.monotonic()
        deadline = time.monotonic() + 5
        while not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if scenario.received != last:
                last, last_change = scenario.received, time.monotonic()
        stalled = time.monotonic() - last_change
        assert task.done(), (
            f"the download neither completed nor failed after "
            f"{scenario.lost_count(wire.CREDIT)} lost credits ({scenario.kills} kills): "
            f"{scenario.received / 1e6:.1f} MB received, no byte for {stalled:.1f} s"
        )
    if not task.cancelled() and task.exception() is not None:
        error = task.exception()
        assert isinstance(error, (httpx.RemoteProtocolError, httpx.ReadError)), repr(error)


async def test_a_request_failed_for_a_lost_credit_ends_on_its_node(
    redis_factory: RedisFactory,
) -> None:
    async with _download_losing_credits(redis_factory) as scenario:
        assert await poll(lambda: scenario.task.done(), 5), "the download did not end"
        ended = await poll(lambda: scenario.node.in_flight == 0, 3)
        cancels_lost = scenario.lost_count(wire.CANCEL)
        assert ended, (
            f"the Node's job still runs 3 s after its request failed "
            f"({cancels_lost} CANCEL publishes reached nobody)"
        )


@contextlib.asynccontextmanager
async def _served_by_a_worker_user(server: RedisServer, app: Any) -> AsyncIterator[str]:
    """A distributor and a Node running ``app`` that logs in as the ACL user ``worker`` (so
    ``_kill_command_connections(server, "worker")`` kills the Node's connections only);
    yields the distributor's base URL."""
    node = Node(
        url=server.url.replace("redis://", "redis://worker:pw@"),
        app=app,
        key="k",
        lifespan="off",
        shutdown_timeout=1,
    )
    distributor = create_distributor(url=server.url, key="k")
    async with run_node(node), serve_app(distributor) as base:
        yield base


@pytest.mark.parametrize("background", [20.0, 0.0], ids=["app-works-on", "app-ends"])
async def test_a_lost_end_of_response_is_told(
    redis_factory: RedisFactory, background: float
) -> None:
    """The PUBLISH of a response's last message is not awaited (the request ends in the turn
    the app sent it), but a loss is still found: lost with the Node's link to Redis while the
    app works on after its response (a background task), its distributor is told the request
    is gone, not left waiting for the app's end; once the app has ended, the distributor's
    PING finds the request gone. Another request to the same distributor keeps the two
    talking, so no liveness timeout steps in either."""
    server = redis_factory(acl_users={"worker": "pw"})

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        if scope["path"] == "/slow":
            await asyncio.sleep(background + 5)
            return
        await asyncio.sleep(0.1)  # the ACK travels alone, first
        await send({"type": "http.response.start", "status": 200})
        # The Node's command connections die between the start and the end of the response.
        assert _kill_command_connections(server, "worker"), "no connection of the Node killed"
        await send({"type": "http.response.body", "body": b"hello"})
        if background:
            await asyncio.sleep(background)  # work after the response

    async with _served_by_a_worker_user(server, app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            slow = asyncio.ensure_future(client.get("/slow"))
            try:
                await asyncio.sleep(0.3)
                started = time.monotonic()
                try:
                    response = await asyncio.wait_for(client.get("/"), 8)
                    outcome = f"{response.status_code} {response.content!r}"
                except httpx.HTTPError as exc:  # the start had got through: the body breaks
                    outcome = repr(exc)
                except asyncio.TimeoutError:
                    pytest.fail("the client still waits 8 s after its response's end was lost")
                assert time.monotonic() - started < 5, outcome
                assert outcome != "200 b'hello'", "the response's end was not lost"
            finally:
                slow.cancel()
                await asyncio.wait([slow])


async def test_a_response_lost_with_its_ack_is_not_answered_no_worker(
    redis_factory: RedisFactory,
) -> None:
    """The ACK rides on the response's first message (``ACK_SEND``). Lost with it (the Node's
    link to Redis killed just before) while the app works on, the request ends with a GONE:
    a GONE with no ACK ahead says the request never ran, and the client would be answered
    "no worker", which it may take as safe to retry, although the app ran. The Node posts the
    ACK again first: a 502."""
    server = redis_factory(acl_users={"worker": "pw"})
    ran: list[str] = []

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        ran.append(scope["path"])
        assert _kill_command_connections(server, "worker"), "no connection of the Node killed"
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"hello"})
        await asyncio.sleep(20)  # work after the response

    async with _served_by_a_worker_user(server, app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            started = time.monotonic()
            response = await asyncio.wait_for(client.get("/"), 15)
            elapsed = time.monotonic() - started
    assert ran == ["/"]
    assert response.status_code == 502, (response.status_code, response.text, f"{elapsed:.1f} s")
    assert elapsed < 5, f"answered after {elapsed:.1f} s"


# 6. stop() while a batch pop is in flight serves every popped request ----------------------


@pytest.mark.parametrize("pop_many", [True, False], ids=["blmpop", "brpop-then-rpop"])
async def test_stop_during_a_batch_pop_serves_every_popped_request(
    redis_server: RedisServer, pop_many: bool
) -> None:
    """With BLMPOP the batch arrives in one reply; without it (Redis before 7.0, an ACL user
    without +blmpop) the first request runs while the RPOP of the rest is in flight."""
    started: list[str] = []
    finished: list[str] = []
    cancelled: list[str] = []

    async def sleepy(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await receive()
        started.append("x")
        # The first request to start ends first: a drain that waited only for the jobs
        # registered when it began would then stop, cancelling the rest.
        try:
            await asyncio.sleep(0.1 if len(started) == 1 else 0.3)
        except asyncio.CancelledError:
            cancelled.append("x")
            raise
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"slept"})
        finished.append("x")

    async with _fake_distributor(redis_server.url) as fake:
        pushed = set(await fake.push("batch", 20))
        node = Node(
            url=redis_server.url,
            app=sleepy,
            key="batch",
            concurrency=20,
            shutdown_timeout=30,
            lifespan="off",
        )
        node._pop_many = pop_many
        serving = asyncio.ensure_future(node.serve())
        try:
            # Without BLMPOP the first popped request registers while the batch RPOP is in
            # flight.
            await poll(lambda: node.in_flight > 0 or serving.done(), 5, interval=0)
            assert node.in_flight > 0, "the Node popped nothing"
            if not pop_many:
                assert node.in_flight < 20, "the stop came too late: the batch had been popped"
            node.stop()
            await asyncio.wait_for(asyncio.shield(serving), 10)
            running_at_return = len(started) - len(finished)
        finally:
            if not serving.done():
                node.stop()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(serving, 10)
        await poll(lambda: len(fake.statuses()) >= len(fake.ids(wire.ACK)), 2)
        acked = fake.ids(wire.ACK)
        statuses = fake.statuses()
        left = redis_server.command("LLEN", "batch")
        assert isinstance(left, int)
    assert len(acked) > 1, "the batch was not popped: the race was not exercised"
    assert acked <= pushed and len(acked) + left == 20, (len(acked), left)
    assert not cancelled, f"{len(cancelled)} popped requests were cancelled by the stop"
    assert running_at_return == 0, f"serve() returned with {running_at_return} apps running"
    missing = sorted(acked - set(statuses))
    assert not missing, f"{len(missing)} of {len(acked)} acked requests got no response"
    assert {statuses[i] for i in acked} == {200}, statuses
