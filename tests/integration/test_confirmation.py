"""Requests left in a list by a Redis restart or a failover never run after their client was
answered, nor twice (``minidasgi.confirmation``): a Node asks their distributor first.

Each scenario is real: a redis-server SIGKILLed after an fsync'd AOF and restarted from it, a
``SENTINEL FAILOVER`` with a backlog queued on the master (and copied to the replica). Runs are
counted by the app, per request id, with the moment each started, and compared with the
moment its client got its answer (one process, one monotonic clock: an order, not a timing).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

import httpx
import pytest

from minidasgi import Node, create_distributor, wire
from minidasgi.resp import Subscriber, connect
from minidasgi.testing import RedisServer, SentinelSetup

from .faultproxy import FaultProxy
from .redis_server import RedisFactory
from .stack import poll, run_node, serve_app

pytestmark = pytest.mark.timeout(60)

BACKLOG = 5


class RunLog:
    """An app that notes when each request (``x-request-id``) started to run."""

    def __init__(self, work: float = 0.0) -> None:
        self.work = work
        self.started: collections.defaultdict[str, list[float]] = collections.defaultdict(list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request_id = dict(scope["headers"]).get(b"x-request-id", b"-").decode()
        self.started[request_id].append(time.monotonic())
        await asyncio.sleep(self.work)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": request_id.encode()})

    def count(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.started.items()}


async def _get(client: httpx.AsyncClient, request_id: str) -> tuple[str, float]:
    """``(status or error, when answered)``."""
    try:
        response = await client.get("/", headers={"x-request-id": request_id})
        outcome = str(response.status_code)
    except httpx.HTTPError as exc:  # an aborted response
        outcome = type(exc).__name__
    return outcome, time.monotonic()


def _llen(server: RedisServer, key: str) -> int:
    try:
        length = server.command("LLEN", key)
    except ConnectionError:  # Sentinel's reconfiguration resets connections
        return -1
    assert isinstance(length, int)
    return length


@pytest.mark.parametrize(
    ("count_by", "distributor_after"), [("llen", "gone"), ("clock", "gone"), ("llen", "back")]
)
async def test_requests_reloaded_by_a_restarted_redis_never_run(
    redis_factory: RedisFactory, count_by: str, distributor_after: str
) -> None:
    """Requests queued with no Node; Redis dies (its AOF fsync'd on every write), so each
    client gets its answer (502) while the request stays in the file; Redis restarts from it.
    A Node then pops them all: it must run none.

    ``gone``: their distributor stopped meanwhile (Redis reloaded them all: checked), so only
    the Node's recovery window keeps them from running; ``clock``: the Node's ACL user may not
    run LLEN, so that window is told by the envelopes' queued time. ``back``: the distributor
    reconnects too, and takes back what the Node has not popped yet."""
    server = redis_factory(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    runs = RunLog()
    # A deadline far away: only the confirmation can keep the Node from running them.
    first = create_distributor(url=server.url, key="K", worker_timeout=30)
    async with contextlib.AsyncExitStack() as stack:
        base = await stack.enter_async_context(serve_app(first))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=20))
        sent = [asyncio.ensure_future(_get(client, f"stale-{i}")) for i in range(BACKLOG)]
        assert await poll(lambda: _llen(server, "K") == BACKLOG, 10)
        await asyncio.to_thread(server.kill)
        answers = await asyncio.wait_for(asyncio.gather(*sent), 20)
        assert {outcome for outcome, _ in answers} <= {"502", "503"}, answers
        distributor = first
        if distributor_after == "gone":
            await stack.aclose()
        await asyncio.to_thread(server.start)
        if distributor_after == "gone":
            assert _llen(server, "K") == BACKLOG, "the premise: Redis reloaded the requests"
            distributor = create_distributor(url=server.url, key="K", worker_timeout=30)
            base = await stack.enter_async_context(serve_app(distributor))
            client = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=20))
        url = server.url
        if count_by == "clock":
            server.command("ACL", "SETUSER", "node", "on", ">node-pw", "~*", "&*", "+@all", "-llen")
            url = f"redis://node:node-pw@{server.host}:{server.port}"
        # One at a time: the fresh request is popped only once every stale one was dealt with.
        node = Node(url=url, app=runs, key="K", lifespan="off", concurrency=1)
        assert await poll(lambda: distributor.ready, 10)
        async with run_node(node):
            fresh, _ = await _get(client, "fresh")
            window = node.recovery.popped(b"K")
        if distributor_after == "gone":
            # Every request counted at the pop connection was popped: the window is used up.
            assert window is (None if count_by == "clock" else False)
        # ``back``: the distributor's take-back may land between the Node's LLEN and its pops,
        # and the window then outlasts the backlog (later requests pay a confirmation, none
        # runs unconfirmed): what it holds after depends on that timing, not checked here.
    assert fresh == "200"
    assert runs.count() == {"fresh": 1}, "requests answered 502 ran after their answer"
    assert _llen(server, "K") == 0


async def test_a_backlog_caught_by_a_failover_never_runs_after_its_answer_nor_twice(
    sentinels: SentinelSetup,
) -> None:
    """A Node of concurrency 1 and a slow app on the master, a backlog behind it, copied to
    the replica; ``SENTINEL FAILOVER``: every client gets an answer, no request runs twice, and
    none whose client got an error starts after that answer (the Node, back on the new master,
    finds the backlog there again)."""
    runs = RunLog(work=0.4)
    distributor = create_distributor(url=sentinels.url, key="fo-q", worker_timeout=30)
    node = Node(url=sentinels.url, app=runs, key="fo-q", lifespan="off", concurrency=1)
    old, replica = sentinels.servers
    async with (
        serve_app(distributor) as base,
        run_node(node),
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        ids = [f"queued-{i}" for i in range(8)]
        sent = {i: asyncio.ensure_future(_get(client, i)) for i in ids}

        def copied() -> bool:  # a backlog, on the replica too
            length = _llen(old, "fo-q")
            return length >= 4 and _llen(replica, "fo-q") == length

        assert await poll(copied, 10), "no backlog reached the replica"
        await asyncio.to_thread(sentinels.failover)
        promoted = await poll(lambda: asyncio.to_thread(lambda: sentinels.master() is replica), 15)
        assert promoted, "no promotion"
        answers = {i: await asyncio.wait_for(task, 30) for i, task in sent.items()}
        assert await poll(lambda: _llen(replica, "fo-q") == 0, 15), "the backlog stayed"
        assert await poll(lambda: node.in_flight == 0, 15)
        fresh, _ = await _get(client, "fresh")
    print({i: outcome for i, (outcome, _) in answers.items()}, runs.count())
    assert fresh == "200"
    twice = {i: n for i, n in runs.count().items() if n > 1}
    assert not twice, f"requests run more than once: {twice}"
    for request_id, (outcome, answered) in answers.items():
        assert outcome in ("200", "502", "503", "RemoteProtocolError"), answers
        if outcome != "200":
            late = [t for t in runs.started.get(request_id, []) if t > answered]
            assert not late, f"{request_id} ran after its client got {outcome}"
    assert any(outcome != "200" for outcome, _ in answers.values()), "the failover caught none"


def _envelope(request_id: str, reply: str, *, confirms: bool) -> bytes:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [[b"x-request-id", request_id.encode()]],
    }
    return wire.Envelope(
        request_id,
        reply,
        time.time() + 30,
        scope,
        [{"type": "http.request", "body": b"", "more_body": False}],
        window=1,
        liveness=1.0,
        queued=time.time(),
        confirms=confirms,
    ).encode()


@pytest.mark.parametrize("answer", ["confirm", "ping", "cancel", "silence", "old"])
async def test_a_node_runs_a_request_of_its_recovery_window_only_once_confirmed(
    redis_server: RedisServer, answer: str
) -> None:
    """A request waiting before the Node connects, from a distributor played by the test:
    the ACK asks for a confirmation, and the app starts on CONFIRM or a PING naming the
    request, never on CANCEL or silence (the wait ends after ``peer_timeout`` with a GONE).
    ``old``: a distributor of an earlier version (no ``confirms``) is not asked."""
    runs = RunLog()
    node = Node(url=redis_server.url, app=runs, key="K", lifespan="off", peer_timeout=1.5)
    reply = wire.new_channel("minidasgi", 0, "dist")
    request_id = wire.new_request_id()
    got: list[tuple[str, str, list[Any]]] = []
    subscriber = Subscriber(
        redis_server.url,
        on_message=lambda _, data: got.extend(wire.unpack(m) for m in wire.split_frame(data)),
    )
    subscriber.start()
    await asyncio.wait_for(subscriber.subscribe(reply), 5)
    pusher = await asyncio.wait_for(connect(redis_server.url), 5)
    kinds = lambda: [kind for kind, _, _ in got]  # noqa: E731
    try:
        await pusher.lpush("K", _envelope(request_id, reply, confirms=answer != "old"))
        async with run_node(node):
            assert await poll(lambda: wire.ACK in kinds(), 10), got
            ack = next(args for kind, _, args in got if kind == wire.ACK)
            assert wire.asks_confirmation(ack) is (answer != "old")
            if answer == "confirm":
                await pusher.publish(node.channel, wire.pack(wire.CONFIRM, request_id))
            elif answer == "ping":
                for message in wire.ping_messages(reply, [request_id]):
                    await pusher.publish(node.channel, message)
            elif answer == "cancel":
                await pusher.publish(node.channel, wire.pack(wire.CANCEL, request_id))
            ends = (wire.SEND,) if answer in ("confirm", "ping", "old") else (wire.GONE,)
            assert await poll(lambda: any(k in ends for k in kinds()), 10), got
            assert await poll(lambda: node.in_flight == 0, 10)
    finally:
        await pusher.close()
        await subscriber.close()
    ran = answer in ("confirm", "ping", "old")
    assert runs.count() == ({request_id: 1} if ran else {}), got
    if not ran:
        assert wire.SEND not in kinds()


async def test_a_second_ack_for_a_request_gets_a_cancel(redis_server: RedisServer) -> None:
    """Two copies of one envelope popped by two Nodes (played by the test): the first ACK
    is confirmed, the second, from another Node, gets a CANCEL, and so does a second ACK
    asking again from the first (a Node never acks an id twice while it runs it: that is
    another copy too)."""
    distributor = create_distributor(url=redis_server.url, key="K", worker_timeout=30)
    nodes = [wire.new_channel("minidasgi", 0, "node") for _ in range(2)]
    got: dict[str, list[tuple[str, str, list[Any]]]] = {n: [] for n in nodes}
    subscribers = []
    for name in nodes:
        subscriber = Subscriber(
            redis_server.url,
            on_message=lambda channel, data: got[channel.decode()].extend(
                wire.unpack(m) for m in wire.split_frame(data)
            ),
        )
        subscriber.start()
        await asyncio.wait_for(subscriber.subscribe(name), 5)
        subscribers.append(subscriber)
    connection = await asyncio.wait_for(connect(redis_server.url), 5)
    try:
        async with serve_app(distributor) as base, httpx.AsyncClient(base_url=base) as client:
            request = asyncio.ensure_future(client.get("/", timeout=20))
            popped = await connection.brpop("K", timeout=10)
            assert popped is not None
            envelope = wire.Envelope.decode(popped[1])
            assert envelope.confirms
            first, second = nodes
            for node in (first, second, first):
                ack = wire.pack(wire.ACK, envelope.id, node, 1, 1.0, True)
                await connection.publish(envelope.reply, ack)

            def answered(node: str, kind: str) -> bool:
                return any(k == kind for k, _, _ in got[node])

            assert await poll(lambda: answered(first, wire.CONFIRM), 10), got
            assert await poll(lambda: answered(second, wire.CANCEL), 10), got
            assert await poll(lambda: answered(first, wire.CANCEL), 10), got
            events = [
                {"type": "http.response.start", "status": 200, "headers": []},
                {"type": "http.response.body", "body": b"once"},
            ]
            await connection.publish(envelope.reply, wire.pack(wire.SEND, envelope.id, events))
            response = await asyncio.wait_for(request, 10)
    finally:
        await connection.close()
        for subscriber in subscribers:
            await subscriber.close()
    assert (response.status_code, response.text) == (200, "once")
    assert [k for k, _, _ in got[second]] == [wire.CANCEL], got


async def test_a_request_whose_lpush_reply_was_lost_is_taken_back_after_its_503(
    redis_server: RedisServer,
) -> None:
    """Redis runs the LPUSH, but the distributor's link fails before the reply comes back:
    its client gets 503 (the queue is unreachable) while the request waits in the list, for
    any Node to run after that answer. The distributor takes it back once it reaches Redis
    again, as it does an envelope whose LREM failed."""
    with FaultProxy(redis_server.port) as proxy:
        distributor = create_distributor(url=proxy.url(), key="K", worker_timeout=30)
        async with (
            serve_app(distributor) as base,
            httpx.AsyncClient(base_url=base, timeout=20) as client,
        ):
            assert await poll(lambda: distributor.ready, 10)
            proxy.stall(up=False, down=True)  # commands reach Redis, replies do not come back
            answer = asyncio.ensure_future(_get(client, "lost-reply"))
            assert await poll(lambda: _llen(redis_server, "K") == 1, 10)
            proxy.reset()
            outcome, _ = await asyncio.wait_for(answer, 20)
            assert outcome == "503"
            # No Node listens: only the take-back can empty the list (before: it stayed,
            # for a Node started within the envelope's deadline to run).
            assert await poll(lambda: _llen(redis_server, "K") == 0, 10)


async def test_requests_answered_while_the_distributor_could_not_reach_redis_never_run(
    redis_server: RedisServer,
) -> None:
    """Redis stays up, but the distributor's own connections are reset (its link failed)
    while requests wait behind a busy Node whose connection stays: their clients get 502 and
    the distributor cannot take them back then. They are in no Node's recovery window: the
    distributor takes them back once it reaches Redis again."""
    release = asyncio.Event()
    started: list[str] = []

    async def busy(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request_id = dict(scope["headers"]).get(b"x-request-id", b"-").decode()
        started.append(request_id)
        while request_id == "busy" and not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:  # its distributor gave it up: it works on
                continue
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    with FaultProxy(redis_server.port) as proxy:
        distributor = create_distributor(url=proxy.url(), key="K", worker_timeout=30)
        node = Node(url=redis_server.url, app=busy, key="K", lifespan="off", concurrency=1)
        async with (
            serve_app(distributor) as base,
            run_node(node),
            httpx.AsyncClient(base_url=base, timeout=20) as client,
        ):
            first = asyncio.ensure_future(_get(client, "busy"))
            assert await poll(lambda: started == ["busy"], 10)
            queued = [asyncio.ensure_future(_get(client, f"queued-{i}")) for i in range(3)]
            assert await poll(lambda: _llen(redis_server, "K") == 3, 10)
            proxy.reset()
            answers = await asyncio.wait_for(asyncio.gather(*queued), 20)
            assert {outcome for outcome, _ in answers} <= {"502", "503"}, answers
            taken = await poll(lambda: _llen(redis_server, "K") == 0, 10)
            release.set()  # the Node pops again: anything left runs now
            await asyncio.wait_for(first, 20)
            assert await poll(lambda: distributor.ready, 10)
            fresh, _ = await _get(client, "fresh")
    assert fresh == "200"
    assert started == ["busy", "fresh"], "requests answered 502 ran after their answer"
    assert taken
