"""Loop turns and futures between a coalesced command's reply and its waiters, counted
structurally (no timings): a PUBLISH's or LPUSH's reply settles the batch's future from the
code that reads it, so whoever waits runs one loop turn later, and a batch costs one future."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from minidasgi import Node, batching, create_distributor, wire
from minidasgi.admission import Admission
from minidasgi.asgi import Receive, Scope, Send
from minidasgi.outbox import Outbox
from minidasgi.resp import Connection, connect
from minidasgi.resp.client import Client
from minidasgi.resp.connection import parse_url
from minidasgi.testing import RedisServer

from . import apps
from .stack import run_node, serve_app

# Some tests wait for callbacks turn by turn, with no future to await: a regression that never
# tells them fails here rather than hanging the suite.
pytestmark = pytest.mark.timeout(60)


class Counts:
    """Loop iterations, futures created, the iteration in which the last reply was read, and
    those in which the futures handed to ``woken`` were done."""

    def __init__(self) -> None:
        self.turns = 0
        self.futures = 0
        self.read_in = -1
        self.woken_in: list[int] = []
        self.writes = 0

    def woken(self, _: object) -> None:
        self.woken_in.append(self.turns)


@contextmanager
def counting(connection: Connection) -> Iterator[Counts]:
    loop: Any = asyncio.get_running_loop()
    if not hasattr(loop, "_run_once"):
        pytest.skip("needs asyncio's own event loop")
    counts = Counts()
    run_once, create_future = loop._run_once, loop.create_future
    parser = connection._parser

    def turn() -> None:
        counts.turns += 1
        run_once()

    def new_future() -> asyncio.Future[Any]:
        counts.futures += 1
        future: asyncio.Future[Any] = create_future()
        return future

    class Reading:
        def feed(self, data: Any) -> None:
            counts.read_in = counts.turns
            parser.feed(data)

        def feed_gets(self, data: Any) -> Any:
            counts.read_in = counts.turns
            return parser.feed_gets(data)

        def gets(self) -> Any:
            return parser.gets()

    def write(data: Any) -> None:
        counts.writes += 1
        send(data)

    class CountedShared(batching.SharedFuture[Any]):  # a batch's future, made directly
        def __init__(self, *, loop: Any = None) -> None:
            counts.futures += 1
            super().__init__(loop=loop)

    loop._run_once, loop.create_future = turn, new_future
    shared = batching.SharedFuture
    batching.SharedFuture = CountedShared  # type: ignore[misc]
    connection._parser = Reading()
    send = connection._write
    connection._write = write  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        del loop._run_once, loop.create_future, connection._write
        batching.SharedFuture = shared  # type: ignore[misc]
        connection._parser = parser


async def test_a_publish_reply_wakes_its_waiter_one_turn_later_with_one_future(
    clean_redis: RedisServer,
) -> None:
    client = Client(parse_url(clean_redis.url), name="test")
    client.start()
    try:
        connection = await client.wait_connected(5)
        outbox = Outbox(lambda: client)
        await outbox.publish("warm-up", wire.pack(wire.GONE, "r", "x"))
        for _ in range(3):
            with counting(connection) as counts:
                posted = outbox.post("c", wire.pack(wire.GONE, "r", "x"))
                posted.add_done_callback(counts.woken)
                assert await posted == 0  # nobody subscribes
            # Before: the reply's future, the client's, then the batch's: three turns.
            assert counts.woken_in == [counts.read_in + 1]
            assert counts.futures == 1  # the batch's: none for the reply, none for the client
    finally:
        await client.close()


async def test_an_lpush_reply_wakes_its_pushers_one_turn_later_with_one_future(
    clean_redis: RedisServer,
) -> None:
    connection = await connect(clean_redis.url)
    try:
        admission = Admission(channel_prefix="p", db=0, fail_fast=True)
        await admission.push(connection, "k", b"warm-up")
        for _ in range(3):
            with counting(connection) as counts:
                pushes = [
                    asyncio.ensure_future(admission.push(connection, "k", b"e")) for _ in range(3)
                ]
                for push in pushes:
                    push.add_done_callback(counts.woken)
                # Nobody listens on the presence channel: fail-fast refuses all three.
                assert await asyncio.gather(*pushes) == ["no_node"] * 3
            # Each pusher's task resumes in the turn after the reply was read and ends there;
            # its done callbacks run one turn later (before: three turns later).
            assert counts.woken_in == [counts.read_in + 2] * 3
            # The batch's future only: none for the NUMSUB's or the LPUSH's reply.
            assert counts.futures == 1
            assert counts.writes == 1  # NUMSUB and LPUSH together (before: two writes)
    finally:
        await connection.close()


async def test_an_lpush_reply_tells_the_pushers_callbacks_in_its_own_turn_in_order(
    clean_redis: RedisServer,
) -> None:
    connection = await connect(clean_redis.url)
    try:
        admission = Admission(channel_prefix="p", db=0, fail_fast=True)
        await admission.push(connection, "k", b"warm-up")
        told: list[tuple[int, int, str | None]] = []
        with counting(connection) as counts:

            def then(outcome: Any, index: int) -> None:
                told.append((counts.turns, index, admission.verdict("k", index, outcome)))

            loop = asyncio.get_running_loop()
            for _ in range(3):  # three requests' callbacks in one turn: one LPUSH
                loop.call_soon(admission.put, connection, "k", b"e", then)
            await asyncio.sleep(0)
            while len(told) < 3:  # noqa: ASYNC110 (no future to await: the callbacks tell)
                await asyncio.sleep(0)
        # Told by the code that read the reply, in the batch's order, with no loop handle per
        # request (before: a done callback each on the batch's future, one turn later).
        assert told == [(counts.read_in, i, "no_node") for i in range(3)]
        assert counts.futures == 1  # the batch's
    finally:
        await connection.close()


async def _two_pushes_told(connection: Connection, bound: int | None) -> list[Any]:
    """Two pushes in one batch (one LPUSH) onto an empty list bounded by ``bound``: what
    their callbacks were told, as ``(index, verdict)``, once the batch settled."""
    admission = Admission(channel_prefix="p", db=0, max_queue=bound)
    told: list[tuple[int, str | None]] = []
    futures: list[asyncio.Future[Any]] = []

    def then(outcome: Any, index: int) -> None:
        told.append((index, admission.verdict("q", index, outcome)))

    def push() -> None:
        futures.append(admission.put(connection, "q", b"e", then)[0])

    await connection.execute("DEL", "q")
    loop = asyncio.get_running_loop()
    for _ in range(2):  # two requests' callbacks in one turn: one LPUSH
        loop.call_soon(push)
    await asyncio.sleep(0)
    assert [length for _, length, _ in await asyncio.gather(*futures)] == [2, 2]
    return told


async def test_an_lpush_that_went_through_tells_only_pushers_a_verdict_may_stop(
    clean_redis: RedisServer,
) -> None:
    # Without fail-fast nor a queue bound the verdict of an LPUSH that went through can only
    # be None: the batch's future settles, and no request's callback is called to learn it
    # (one call per request less). With a bound, each is told, its verdict to check.
    connection = await connect(clean_redis.url)
    try:
        assert await _two_pushes_told(connection, None) == []
        assert await _two_pushes_told(connection, 1) == [(0, None), (1, "queue_full")]
    finally:
        await connection.close()


async def test_a_failed_lpush_batch_tells_every_pusher(clean_redis: RedisServer) -> None:
    connection = await connect(clean_redis.url)
    admission = Admission(channel_prefix="p", db=0)
    await admission.push(connection, "k", b"warm-up")
    await connection.close()
    told: list[tuple[int, str]] = []

    def then(outcome: Any, index: int) -> None:
        told.append((index, type(outcome).__name__))

    loop = asyncio.get_running_loop()
    for _ in range(2):  # two requests' callbacks in one turn: one batch
        loop.call_soon(admission.put, connection, "k", b"e", then)
    await asyncio.sleep(0)
    while len(told) < 2:  # noqa: ASYNC110 (no future to await: the callbacks tell)
        await asyncio.sleep(0)
    # The write failed before any command existed: each request hears of it all the same.
    assert told == [(0, "RedisConnectionError"), (1, "RedisConnectionError")]


@types.coroutine
def _suspensions(awaitable: Awaitable[None], count: list[int]) -> Generator[Any, Any, None]:
    """Await ``awaitable``, counting in ``count[0]`` how often it gives the loop back."""
    inner = awaitable.__await__()
    try:
        signal = inner.send(None)
        while True:
            count[0] += 1
            try:
                value = yield signal
            except BaseException as exc:
                signal = inner.throw(exc)
            else:
                signal = inner.send(value)
    except StopIteration:
        return


async def test_a_request_wakes_the_distributor_once_for_its_answer_not_also_for_the_lpush(
    redis_server: RedisServer,
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    suspended = [0]

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await distributor(scope, receive, send)
            return
        await _suspensions(distributor(scope, receive, send), suspended)

    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    async with serve_app(counted) as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections warm
            suspended[0] = 0
            for _ in range(20):
                assert (await client.get("/")).status_code == 200
    # One wait, for the Node's ack and answer (they come in one PUBLISH): the LPUSH's reply,
    # which comes first, no longer resumes the request's task (before: two per request).
    assert suspended[0] <= 30


async def test_a_request_costs_the_distributor_no_loop_handle_for_its_lpush(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributor = create_distributor(url=redis_server.url, key="hello", worker_timeout=30)
    ran: list[str] = []
    run = asyncio.Handle._run

    def counted(handle: asyncio.Handle) -> None:
        callback = getattr(handle, "_callback", None)
        if getattr(callback, "__self__", None) is distributor.admission.pushes:
            ran.append("the pushes' flush")
        callback = getattr(callback, "func", callback)  # a functools.partial's function
        ran.append(getattr(callback, "__qualname__", ""))
        run(handle)

    node = Node(url=redis_server.url, app=apps.hello, key="hello")
    async with serve_app(distributor) as base, run_node(node):
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "Hello World!"  # connections warm
            monkeypatch.setattr(asyncio.Handle, "_run", counted)
            for _ in range(20):
                assert (await client.get("/")).status_code == 200
            monkeypatch.undo()
    # The LPUSH's reply tells the exchange from the code that reads it (before: a done
    # callback on the batch's future, one handle and often one loop iteration per request).
    assert ran and not [name for name in ran if name.startswith("_Exchange.")]
    # The request's task is the last callback of its turn: its LPUSH leaves at once (before:
    # in the pushes' flush, a handle and a loop iteration later, for each of the 20). Here the
    # client and the Node share the loop: a turn in which one of them has work left too
    # flushes at its end, as under load.
    flushes = ran.count("the pushes' flush")
    assert flushes <= 10, f"{flushes} flushes for 20 requests"


async def test_a_batch_is_written_at_once_with_no_flush_left_for_a_later_iteration(
    clean_redis: RedisServer,
) -> None:
    client = Client(parse_url(clean_redis.url), name="test")
    client.start()
    try:
        connection = await client.wait_connected(5)
        outbox = Outbox(lambda: client)
        await outbox.publish("warm-up", wire.pack(wire.GONE, "r", "x"))
        loop: Any = asyncio.get_running_loop()
        if not hasattr(loop, "_ready"):
            pytest.skip("needs asyncio's own event loop")
        posted = outbox.post("c", wire.pack(wire.GONE, "r", "x"))
        outbox.batcher.flush()  # what the batcher does at the end of the loop turn
        # The batcher gathered the turn's messages: the connection wrote them at once, and
        # left nothing to run in the next iteration (before: its own flush, one more turn).
        pending = [getattr(handle, "_callback", None) for handle in loop._ready]
        assert connection._flush not in pending
        assert connection._wbuf == []
        assert await posted == 0
    finally:
        await client.close()


async def test_a_blocking_pop_is_written_at_once_with_no_flush_left_for_a_later_iteration(
    clean_redis: RedisServer,
) -> None:
    connection = await connect(clean_redis.url)
    try:
        loop: Any = asyncio.get_running_loop()
        if not hasattr(loop, "_ready"):
            pytest.skip("needs asyncio's own event loop")
        pop = asyncio.ensure_future(connection.brpop_many("k", count=1, timeout=0.01))
        await asyncio.sleep(0)  # the pop runs to its wait for the reply
        # Nothing can follow a blocking command on its connection: it left alone, at once,
        # with no flush for the next iteration (before: one per pop, at one request in flight
        # a loop iteration of its own).
        pending = [getattr(handle, "_callback", None) for handle in loop._ready]
        assert connection._flush not in pending
        assert connection._wbuf == []
        assert await pop is None
    finally:
        await connection.close()


async def test_a_blocking_pops_values_are_handed_over_before_its_caller_wakes(
    clean_redis: RedisServer,
) -> None:
    # ``popped`` runs in the code that reads the BLMPOP's reply: a task it creates takes its
    # first step in the next loop turn, before the caller of brpop_many resumes (a Node's
    # request runs a turn sooner). Before, the caller woke first and started the task, which
    # ran a turn after that.
    connection = await connect(clean_redis.url)
    pusher = await connect(clean_redis.url)
    order: list[str] = []
    jobs: list[asyncio.Future[None]] = []

    async def job(value: bytes) -> None:
        order.append(f"job {value.decode()}")

    def popped(key: bytes, values: list[bytes]) -> None:
        order.append(f"popped {key.decode()}")
        for value in values:
            jobs.append(asyncio.ensure_future(job(value)))

    try:
        pop = asyncio.ensure_future(connection.brpop_many("k", count=2, timeout=5, popped=popped))
        await asyncio.sleep(0)  # written
        await pusher.execute("LPUSH", "k", "a", "b")
        assert await pop == (b"k", [b"a", b"b"])
        order.append("caller")
        assert order == ["popped k", "job a", "job b", "caller"]
        # A timeout calls nothing; a malformed reply still closes the connection.
        assert await connection.brpop_many("k", count=1, timeout=0.01, popped=popped) is None
        assert order[-1] == "caller"
    finally:
        await pusher.close()
        await connection.close()
