"""``minidasgi.resp.Subscriber`` against private redis-server processes and fake servers.

Every test runs once per reply parser (``python`` and ``hiredis``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from minidasgi.resp import (
    AuthenticationError,
    Connection,
    Message,
    ProtocolError,
    RedisConnectionError,
    Subscriber,
    connect,
)
from minidasgi.resp import connection as resp_connection
from minidasgi.resp.directread import SplitPayload

from .fakes import FakeRedis, drain_until_eof, read_command
from .faultproxy import FaultProxy
from .redis_server import RedisFactory, RedisServer
from .tailreads import recording_tail_reads

PASSWORD = "s3cr:t@x"

Opener = Callable[..., Awaitable[Connection]]
SubscriberFactory = Callable[..., Subscriber]


@pytest.fixture
async def make_subscriber(parser: str) -> AsyncIterator[SubscriberFactory]:
    """``make_subscriber(url, **kwargs)``: a Subscriber with this test's parser and quick
    reconnects; closed at teardown."""
    made: list[Subscriber] = []

    def factory(url: str | None = None, **kwargs: Any) -> Subscriber:
        kwargs.setdefault("parser", parser)
        kwargs.setdefault("min_backoff", 0.02)
        kwargs.setdefault("max_backoff", 0.2)
        subscriber = Subscriber(url, **kwargs)
        made.append(subscriber)
        return subscriber

    try:
        yield factory
    finally:
        for subscriber in made:
            await asyncio.wait_for(subscriber.close(), 5)


async def eventually(predicate: Callable[[], bool], within: float, step: float = 0.02) -> None:
    """Wait until ``predicate()`` is true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(step)


async def publish_until(conn: Connection, channel: str, data: str, receivers: int) -> None:
    """PUBLISH until Redis reports ``receivers`` receivers (subscriptions settle async)."""
    deadline = time.monotonic() + 3
    while (count := await conn.publish(channel, data)) != receivers:
        if time.monotonic() > deadline:
            pytest.fail(f"PUBLISH {channel} reached {count} receivers, wanted {receivers}")
        await asyncio.sleep(0.02)


# -- delivery ---------------------------------------------------------------------------------


async def test_messages_to_callback_in_order(
    clean_redis: RedisServer, open_conn: Opener, make_subscriber: SubscriberFactory
) -> None:
    received: list[tuple[bytes, bytes]] = []
    subscriber = make_subscriber(clean_redis.url, on_message=lambda c, d: received.append((c, d)))
    await asyncio.wait_for(subscriber.subscribe("news", b"sport"), 2)
    assert subscriber.connected
    assert subscriber.channels == {b"news", b"sport"}
    publisher = await open_conn(clean_redis.url)
    expected = []
    for i in range(20):
        channel = "news" if i % 2 else "sport"
        assert await publisher.publish(channel, f"m{i}") == 1
        expected.append((channel.encode(), f"m{i}".encode()))
    assert await publisher.publish("not-subscribed", "x") == 0
    await eventually(lambda: len(received) >= len(expected), 2)
    assert received == expected


async def test_messages_by_async_iteration(
    clean_redis: RedisServer, open_conn: Opener, make_subscriber: SubscriberFactory
) -> None:
    subscriber = make_subscriber(clean_redis.url)
    await asyncio.wait_for(subscriber.subscribe("a", "b"), 2)
    publisher = await open_conn(clean_redis.url)
    await publisher.publish("a", "1")
    await publisher.publish("b", b"\x00\xff")
    await publisher.publish("a", "3")

    async def take(n: int) -> list[Message]:
        got = []
        async for message in subscriber:
            got.append(message)
            if len(got) == n:
                break
        return got

    got = await asyncio.wait_for(take(3), 2)
    assert got == [Message(b"a", b"1"), Message(b"b", b"\x00\xff"), Message(b"a", b"3")]
    assert got[0].channel == b"a"
    assert got[0].data == b"1"


async def test_iteration_refused_with_callback(
    clean_redis: RedisServer, make_subscriber: SubscriberFactory
) -> None:
    subscriber = make_subscriber(clean_redis.url, on_message=lambda c, d: None)
    with pytest.raises(RuntimeError):
        async for _ in subscriber:
            pass


async def test_publish_counts_receivers_and_unsubscribe(
    clean_redis: RedisServer, open_conn: Opener, make_subscriber: SubscriberFactory
) -> None:
    received: list[bytes] = []
    subscriber = make_subscriber(clean_redis.url, on_message=lambda c, d: received.append(d))
    await asyncio.wait_for(subscriber.subscribe("ch", "keep"), 2)
    publisher = await open_conn(clean_redis.url)
    assert await publisher.publish("ch", "one") == 1
    await eventually(lambda: received == [b"one"], 2)
    await asyncio.wait_for(subscriber.subscribe("ch"), 1)  # already confirmed: returns at once
    await subscriber.unsubscribe("ch")
    assert subscriber.channels == {b"keep"}
    await publish_until(publisher, "ch", "ignored", 0)
    assert await publisher.publish("keep", "two") == 1
    await eventually(lambda: b"two" in received, 2)
    assert b"ignored" not in received
    assert received == [b"one", b"two"]
    await subscriber.unsubscribe()  # all
    assert subscriber.channels == frozenset()
    await publish_until(publisher, "keep", "x", 0)


async def until_numsub(conn: Connection, channel: str, subscribers: int) -> None:
    """Wait until Redis counts ``subscribers`` subscribers of ``channel`` (PUBSUB NUMSUB)."""
    deadline = time.monotonic() + 3
    while (await conn.execute("PUBSUB", "NUMSUB", channel))[1] != subscribers:
        if time.monotonic() > deadline:
            pytest.fail(f"{channel} never had {subscribers} subscribers")
        await asyncio.sleep(0.01)


async def test_a_late_confirmation_of_a_cancelled_subscribe_does_not_answer_a_new_one(
    clean_redis: RedisServer, open_conn: Opener, make_subscriber: SubscriberFactory
) -> None:
    """``subscribe`` cancelled before Redis confirmed, ``unsubscribe``, ``subscribe`` again,
    on a slow link: the first SUBSCRIBE's late confirmation is not the new one's. The new
    ``subscribe`` returns only once Redis has its SUBSCRIBE (held by the proxy here), so a
    message published once it returned is delivered."""
    received: list[bytes] = []
    with FaultProxy(clean_redis.port) as proxy:
        subscriber = make_subscriber(
            proxy.url(), on_message=lambda c, d: received.append(d), health_check_interval=60
        )
        await asyncio.wait_for(subscriber.subscribe("keep"), 5)
        (link,) = proxy.connections()
        publisher = await open_conn(clean_redis.url)
        link.stall(up=False, down=True)  # Redis' confirmations are held back
        first = asyncio.create_task(subscriber.subscribe("ch"))
        await until_numsub(publisher, "ch", 1)  # Redis has the first SUBSCRIBE
        first.cancel()
        await subscriber.unsubscribe("ch")
        await until_numsub(publisher, "ch", 0)  # ... and the UNSUBSCRIBE
        link.stall(up=True, down=False)  # what the client sends now is held back
        second = asyncio.create_task(subscriber.subscribe("ch"))
        assert await publisher.publish("keep", "marker") == 1  # behind the confirmations
        link.resume(up=False, down=True)
        await eventually(lambda: b"marker" in received, 5)  # the confirmations were read
        assert not second.done()  # its SUBSCRIBE has not reached Redis: nothing confirmed it
        link.resume()
        await asyncio.wait_for(second, 5)
        assert first.cancelled()
        assert await publisher.publish("ch", "after") == 1
        await eventually(lambda: b"after" in received, 5)
        assert subscriber.connected and subscriber.channels == {b"keep", b"ch"}


@pytest.mark.requires_server("7.0")
async def test_a_sharded_subscriber_s_own_sunsubscribe_answer_is_not_a_moved_slot(
    clean_redis: RedisServer, open_conn: Opener, make_subscriber: SubscriberFactory
) -> None:
    """Sharded: ``unsubscribe`` then ``subscribe`` of a channel while Redis' answers are held
    back. The late answer to our own SUNSUBSCRIBE is not taken for Redis moving the channel's
    slot away (which would drop the channel wanted again), and the new SSUBSCRIBE is
    confirmed: a message published afterwards is delivered."""
    received: list[bytes] = []
    moved: list[bytes] = []
    with FaultProxy(clean_redis.port) as proxy:
        subscriber = make_subscriber(
            proxy.url(),
            sharded=True,
            on_message=lambda c, d: received.append(d),
            on_unsubscribed=moved.append,
            health_check_interval=60,
        )
        await asyncio.wait_for(subscriber.subscribe("keep", "ch"), 5)
        (link,) = proxy.connections()
        publisher = await open_conn(clean_redis.url)

        async def until_shardnumsub(subscribers: int) -> None:
            deadline = time.monotonic() + 5
            while (await publisher.execute("PUBSUB", "SHARDNUMSUB", "ch"))[1] != subscribers:
                if time.monotonic() > deadline:
                    pytest.fail(f"ch never had {subscribers} shard subscribers")
                await asyncio.sleep(0.01)

        link.stall(up=False, down=True)  # Redis' answers are held back
        await subscriber.unsubscribe("ch")
        await until_shardnumsub(0)
        second = asyncio.create_task(subscriber.subscribe("ch"))
        await until_shardnumsub(1)
        link.resume()
        await asyncio.wait_for(second, 5)
        assert moved == []
        assert subscriber.channels == {b"keep", b"ch"}
        assert await publisher.execute("SPUBLISH", "ch", "after") == 1
        await eventually(lambda: b"after" in received, 5)


async def test_callback_exception_does_not_break_delivery(
    clean_redis: RedisServer,
    open_conn: Opener,
    make_subscriber: SubscriberFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    received: list[bytes] = []

    def on_message(channel: bytes, data: bytes) -> None:
        if data == b"boom":
            raise ValueError("callback failure")
        received.append(data)

    subscriber = make_subscriber(clean_redis.url, on_message=on_message)
    await asyncio.wait_for(subscriber.subscribe("ch"), 2)
    publisher = await open_conn(clean_redis.url)
    await publisher.publish("ch", "boom")
    await publisher.publish("ch", "after")
    await eventually(lambda: received == [b"after"], 2)
    assert subscriber.connected
    assert "on_message callback failed" in caplog.text


# -- reconnection -------------------------------------------------------------------------------


async def test_resubscribes_after_restart(
    redis_server: RedisServer, open_conn: Opener, make_subscriber: SubscriberFactory
) -> None:
    received: list[bytes] = []
    lost = asyncio.Event()
    connected: list[float] = []
    subscriber = make_subscriber(
        redis_server.url,
        on_message=lambda c, d: received.append(d),
        on_connection_lost=lost.set,
        on_connected=lambda: connected.append(time.monotonic()),
    )
    await asyncio.wait_for(subscriber.subscribe("jobs"), 2)
    assert len(connected) == 1
    publisher = await open_conn(redis_server.url)
    assert await publisher.publish("jobs", "before") == 1
    await eventually(lambda: received == [b"before"], 2)

    redis_server.restart()
    await asyncio.wait_for(lost.wait(), 2)
    await eventually(lambda: subscriber.connected, 3)
    assert len(connected) >= 2
    fresh = await open_conn(redis_server.url)
    await publish_until(fresh, "jobs", "after", 1)
    await eventually(lambda: b"after" in received, 2)
    assert received[0] == b"before"
    assert subscriber.channels == {b"jobs"}


async def test_subscribe_while_redis_is_down(
    redis_server: RedisServer, open_conn: Opener, make_subscriber: SubscriberFactory
) -> None:
    redis_server.stop()
    received: list[bytes] = []
    subscriber = make_subscriber(
        redis_server.url, on_message=lambda c, d: received.append(d), max_backoff=0.1
    )
    pending = asyncio.create_task(subscriber.subscribe("late"))
    try:
        await asyncio.sleep(0.3)
        assert not pending.done()
        assert not subscriber.connected
        assert isinstance(subscriber.last_error, RedisConnectionError)
        redis_server.start()
        await asyncio.wait_for(pending, 3)
    finally:
        pending.cancel()
    assert subscriber.connected
    publisher = await open_conn(redis_server.url)
    assert await publisher.publish("late", "hello") == 1
    await eventually(lambda: received == [b"hello"], 2)


async def test_subscribe_can_be_bounded_while_down(
    redis_server: RedisServer, open_conn: Opener, make_subscriber: SubscriberFactory
) -> None:
    redis_server.stop()
    subscriber = make_subscriber(redis_server.url, max_backoff=0.1)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(subscriber.subscribe("ch"), 0.2)
    # Cancelling the wait keeps the subscription: it is made once Redis is back.
    assert subscriber.channels == {b"ch"}
    redis_server.start()
    await asyncio.wait_for(subscriber.subscribe("ch"), 3)
    publisher = await open_conn(redis_server.url)
    assert await publisher.publish("ch", "x") == 1


async def test_idle_health_check_keeps_connection(
    clean_redis: RedisServer, open_conn: Opener, make_subscriber: SubscriberFactory
) -> None:
    # A PING sent with no channel subscribed is answered +PONG (not subscribe-mode pong).
    lost: list[int] = []
    received: list[bytes] = []
    subscriber = make_subscriber(
        clean_redis.url,
        health_check_interval=0.1,
        on_connection_lost=lambda: lost.append(1),
        on_message=lambda c, d: received.append(d),
    )
    await asyncio.wait_for(subscriber.wait_connected(), 2)
    await asyncio.sleep(0.35)
    await asyncio.wait_for(subscriber.subscribe("ch"), 2)
    await asyncio.sleep(0.35)
    await subscriber.unsubscribe("ch")
    await asyncio.sleep(0.35)
    assert lost == []
    assert subscriber.last_error is None
    assert subscriber.connected
    await asyncio.wait_for(subscriber.subscribe("ch"), 2)
    publisher = await open_conn(clean_redis.url)
    assert await publisher.publish("ch", "still-here") == 1
    await eventually(lambda: received == [b"still-here"], 2)


# -- authentication -----------------------------------------------------------------------------


async def test_password(
    redis_factory: RedisFactory, open_conn: Opener, make_subscriber: SubscriberFactory
) -> None:
    server = redis_factory(password=PASSWORD)
    received: list[bytes] = []
    subscriber = make_subscriber(server.url, on_message=lambda c, d: received.append(d))
    await asyncio.wait_for(subscriber.subscribe("secret-channel"), 2)
    publisher = await open_conn(server.url)
    assert await publisher.publish("secret-channel", "ok") == 1
    await eventually(lambda: received == [b"ok"], 2)
    assert PASSWORD not in repr(subscriber)
    assert PASSWORD not in repr(subscriber.params)

    by_keyword = make_subscriber(f"redis://127.0.0.1:{server.port}", password=PASSWORD)
    await asyncio.wait_for(by_keyword.subscribe("secret-channel"), 2)
    assert await publisher.publish("secret-channel", "two") == 2


async def test_acl_user(redis_factory: RedisFactory, make_subscriber: SubscriberFactory) -> None:
    server = redis_factory(acl_users={"alice": "pw1"})
    subscriber = make_subscriber(
        f"redis://127.0.0.1:{server.port}", username="alice", password="pw1"
    )
    await asyncio.wait_for(subscriber.subscribe("ch"), 2)
    assert server.command("PUBLISH", "ch", "x") == 1


async def test_wrong_password_retries_without_leaking(
    redis_factory: RedisFactory,
    make_subscriber: SubscriberFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = redis_factory(password=PASSWORD)
    secret = "wrong-Subscr1ber-pw"
    caplog.set_level(logging.DEBUG, logger="minidasgi")
    subscriber = make_subscriber(
        f"redis://127.0.0.1:{server.port}", password=secret, max_backoff=0.05
    )
    pending = asyncio.create_task(subscriber.subscribe("ch"))
    try:
        await eventually(lambda: isinstance(subscriber.last_error, AuthenticationError), 2)

        def attempts() -> int:
            return sum("refused AUTH" in r.getMessage() for r in caplog.records)

        await eventually(lambda: attempts() >= 3, 2)  # it keeps retrying
        assert not pending.done()
        assert not subscriber.connected
    finally:
        pending.cancel()
    error = subscriber.last_error
    assert error is not None
    for text in (repr(subscriber), str(error), repr(error), repr(subscriber.params), caplog.text):
        assert secret not in text
        assert PASSWORD not in text
    assert f"127.0.0.1:{server.port}" in str(error)


# -- fake servers -------------------------------------------------------------------------------


async def test_message_before_subscribe_confirmation(
    make_subscriber: SubscriberFactory,
) -> None:
    commands: list[list[bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        command = await read_command(reader)
        assert command is not None
        commands.append(command)
        writer.write(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n")
        await writer.drain()
        await drain_until_eof(reader)

    received: list[tuple[bytes, bytes]] = []
    async with FakeRedis(handler) as fake:
        subscriber = make_subscriber(fake.url, on_message=lambda c, d: received.append((c, d)))
        await asyncio.wait_for(subscriber.subscribe("ch"), 2)
        assert received == [(b"ch", b"hi")]
        assert commands == [[b"SUBSCRIBE", b"ch"]]
        await subscriber.close()


async def test_message_before_confirmation_in_one_packet(
    make_subscriber: SubscriberFactory,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_command(reader) == [b"SUBSCRIBE", b"ch"]
        writer.write(
            b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"
            b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
            b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nagain\r\n"
        )
        await writer.drain()
        await drain_until_eof(reader)

    async with FakeRedis(handler) as fake:
        subscriber = make_subscriber(fake.url)
        await asyncio.wait_for(subscriber.subscribe("ch"), 2)

        async def take(n: int) -> list[Message]:
            got = []
            async for message in subscriber:
                got.append(message)
                if len(got) == n:
                    break
            return got

        assert await asyncio.wait_for(take(2), 2) == [
            Message(b"ch", b"hi"),
            Message(b"ch", b"again"),
        ]
        await subscriber.close()


async def test_health_check_gives_up_silent_server(make_subscriber: SubscriberFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await drain_until_eof(reader)  # accepts, reads, never answers

    lost = asyncio.Event()
    async with FakeRedis(handler) as fake:
        subscriber = make_subscriber(
            fake.url, health_check_interval=0.2, on_connection_lost=lost.set
        )
        start = time.monotonic()
        await asyncio.wait_for(subscriber.wait_connected(), 1)
        await asyncio.wait_for(lost.wait(), 1)
        assert time.monotonic() - start < 1
        assert isinstance(subscriber.last_error, RedisConnectionError)
        assert "health-check" in str(subscriber.last_error)
        await eventually(lambda: fake.connections >= 2, 1)  # and it reconnects
        await subscriber.close()


async def test_malformed_push_drops_connection(make_subscriber: SubscriberFactory) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_command(reader) is not None
        writer.write(b"?garbage\r\n")
        await writer.drain()
        await drain_until_eof(reader)

    lost = asyncio.Event()
    async with FakeRedis(handler) as fake:
        subscriber = make_subscriber(fake.url, on_connection_lost=lost.set)
        pending = asyncio.create_task(subscriber.subscribe("ch"))
        try:
            await asyncio.wait_for(lost.wait(), 2)
        finally:
            pending.cancel()
        assert subscriber.last_error is not None
        await subscriber.close()


# -- closing ------------------------------------------------------------------------------------


async def test_close_is_idempotent_and_ends_iteration(
    clean_redis: RedisServer, open_conn: Opener, make_subscriber: SubscriberFactory
) -> None:
    subscriber = make_subscriber(clean_redis.url)
    await asyncio.wait_for(subscriber.subscribe("ch"), 2)
    got: list[Message] = []

    async def consume() -> None:
        async for message in subscriber:
            got.append(message)

    consumer = asyncio.create_task(consume())
    try:
        publisher = await open_conn(clean_redis.url)
        assert await publisher.publish("ch", "x") == 1
        await eventually(lambda: got == [Message(b"ch", b"x")], 2)
        await asyncio.wait_for(subscriber.close(), 2)
        await asyncio.wait_for(consumer, 1)
        await asyncio.wait_for(subscriber.close(), 2)
    finally:
        consumer.cancel()
    assert not subscriber.connected
    await publish_until(publisher, "ch", "y", 0)
    with pytest.raises(RedisConnectionError):
        await subscriber.subscribe("other")


def block_loop(seconds: float) -> None:
    """Hold the event loop (no await), so that bytes pile up in the socket meanwhile."""
    time.sleep(seconds)


@pytest.mark.parametrize("yields", [0, 1, 2, 3])
async def test_close_right_after_a_message_arrives(
    clean_redis: RedisServer, make_subscriber: SubscriberFactory, yields: int
) -> None:
    # close() while the read of a fresh message has completed but the supervisor has not
    # resumed yet: before Python 3.12 wait_for() drops that cancellation.
    received: list[bytes] = []
    subscriber = make_subscriber(clean_redis.url, on_message=lambda c, d: received.append(d))
    await asyncio.wait_for(subscriber.subscribe("ch"), 2)
    assert clean_redis.command("PUBLISH", "ch", "x") == 1
    block_loop(0.02)
    for _ in range(yields):
        await asyncio.sleep(0)
    start = time.monotonic()
    await asyncio.wait_for(asyncio.shield(subscriber.close()), 1)
    assert time.monotonic() - start < 0.5
    assert not subscriber.connected


async def test_close_fails_pending_subscribe(
    redis_server: RedisServer, make_subscriber: SubscriberFactory
) -> None:
    redis_server.stop()
    subscriber = make_subscriber(redis_server.url)
    pending = asyncio.create_task(subscriber.subscribe("ch"))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(subscriber.close(), 2)
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(pending, 1)
    await asyncio.wait_for(subscriber.close(), 2)


async def test_close_unstarted_subscriber(make_subscriber: SubscriberFactory) -> None:
    subscriber = make_subscriber("redis://127.0.0.1:1")
    await subscriber.close()
    await subscriber.close()
    assert not subscriber.connected


async def test_direct_reads_deliver_the_same_messages_in_order(
    clean_redis: RedisServer, open_conn: Opener, make_subscriber: SubscriberFactory
) -> None:
    # Large payloads are read straight into their own buffer (a memoryview of it is
    # delivered), small ones framed without the parser: the same messages, in order.
    received: list[tuple[bytes, Any]] = []
    subscriber = make_subscriber(
        clean_redis.url, on_message=lambda c, d: received.append((c, d)), direct_reads=True
    )
    await asyncio.wait_for(subscriber.subscribe("big"), 2)
    publisher = await open_conn(clean_redis.url)
    payloads = [bytes([i]) * (300_000 if i % 3 else 10) + b"\r\n$3\r\n" for i in range(30)]
    counts = await asyncio.gather(*(publisher.publish("big", p) for p in payloads))
    assert counts == [1] * len(payloads)
    await eventually(lambda: len(received) >= len(payloads), 5)
    assert [bytes(data) for _, data in received] == payloads
    assert {type(data) for _, data in received} == {bytes, memoryview}


def _tail_of_t_payloads(start: bytes, size: int) -> int:
    """The tests' ``tail_size``: a payload starting with ``T`` has all but its first 5 bytes
    read apart; any other is read whole."""
    return size - 5 if start[:1] == b"T" else 0


async def test_tails_read_apart_are_the_bytes_the_socket_read(
    clean_redis: RedisServer,
    open_conn: Opener,
    make_subscriber: SubscriberFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With a ``tail_size``, a large payload's last bytes are read by ``recv`` into bytes of
    # their own and delivered as they were read (``SplitPayload.tail``): no copy of them in
    # this process. The messages are the same, in order.
    reads = recording_tail_reads(monkeypatch)
    received: list[tuple[bytes, Any]] = []
    descriptors = len(os.listdir("/proc/self/fd"))
    subscriber = make_subscriber(
        clean_redis.url,
        on_message=lambda c, d: received.append((c, d)),
        direct_reads=_tail_of_t_payloads,
    )
    await asyncio.wait_for(subscriber.subscribe("big"), 2)
    publisher = await open_conn(clean_redis.url)
    payloads = [b"T" + bytes([i]) * (300_000 if i % 4 else 10) + b"\r\n$3\r\n" for i in range(40)]
    for count, payload in enumerate(payloads, 1):  # one at a time, as body pieces travel
        assert await publisher.publish("big", payload) == 1
        await eventually(lambda n=count: len(received) >= n, 5)
    assert [bytes(data) for _, data in received] == payloads
    split = [data for _, data in received if isinstance(data, SplitPayload)]
    # At most 20 of the 30 large ones: the first, and each after a small one, are read as
    # before (a small push ends the streaming); a peek that finds a header cut by the end
    # of what has arrived reads one as before too (19 were seen in a loaded run).
    assert len(split) >= 10, len(split)
    assert all(len(data.head) == 5 for data in split)
    whole = [data for data in split if any(data.tail is read for read in reads)]
    assert whole  # the others came in parts, joined once
    await publisher.close()
    await asyncio.wait_for(subscriber.close(), 5)
    assert len(os.listdir("/proc/self/fd")) == descriptors  # the socket's duplicate closed


async def _large_payloads_through(
    proxy: FaultProxy,
    server: RedisServer,
    open_conn: Opener,
    make_subscriber: SubscriberFactory,
    received: list[Any],
    lost: list[bool],
    health_check_interval: float,
) -> tuple[Any, Any, bytes]:
    """A subscriber to "big" through ``proxy`` that reads the tail of a payload starting with
    ``T`` apart, a publisher straight to ``server``, and a first such payload delivered (read
    as before: the next one's tail is read apart). Returns both and the first payload."""
    subscriber = make_subscriber(
        proxy.url(),
        on_message=lambda c, d: received.append(d),
        on_connection_lost=lambda: lost.append(True),
        health_check_interval=health_check_interval,
        direct_reads=_tail_of_t_payloads,
    )
    await asyncio.wait_for(subscriber.subscribe("big"), 2)
    publisher = await open_conn(server.url)
    first = b"T" + b"a" * 100_000
    assert await publisher.publish("big", first) == 1
    await eventually(lambda: len(received) == 1, 5)
    return subscriber, publisher, first


async def _published_slowly(proxy: FaultProxy, publisher: Any, payload: bytes, rate: int) -> None:
    """Publish ``payload`` to "big" and have the proxy relay it at ``rate`` bytes a second,
    its first slice holding the push's header and the payload's start. Redis 6.2 writes a
    large push's header and its payload in two writes, after the publisher's reply: a proxy
    relaying as they come may send the header alone, which the subscriber reads whole, as it
    should (nothing to read apart yet), and the test would prove nothing."""
    proxy.stall(up=False, down=True)
    assert await publisher.publish("big", payload) == 1
    await eventually(lambda: proxy.held_down() >= 4096, 5)  # the header and more
    proxy.throttle(down=rate)


async def test_a_tail_read_apart_on_a_slow_link_is_traffic_for_the_health_check(
    clean_redis: RedisServer,
    open_conn: Opener,
    make_subscriber: SubscriberFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A large payload's tail read apart over a slow link (bytes keep coming, slowly) takes
    # many health-check intervals: every part of it read shows the link alive, as every read
    # of a payload read as before does. The reads apart went unseen: the health check PINGed
    # (its answer queued behind the tail) and gave up a live connection after two intervals,
    # losing the payload and everything in flight on it.
    recording_tail_reads(monkeypatch)
    received: list[Any] = []
    lost: list[bool] = []
    with FaultProxy(clean_redis.port) as proxy:
        subscriber, publisher, first = await _large_payloads_through(
            proxy, clean_redis, open_conn, make_subscriber, received, lost, 0.4
        )
        second = b"T" + b"b" * 200_000
        await _published_slowly(proxy, publisher, second, 100_000)  # two seconds, five intervals
        await eventually(lambda: len(received) == 2 or bool(lost), 15)
        assert not lost, subscriber.last_error
        assert [bytes(data) for data in received] == [first, second]
        assert isinstance(received[1], SplitPayload)  # its tail was read apart
        await asyncio.wait_for(subscriber.close(), 5)


async def test_a_link_that_goes_silent_in_the_middle_of_a_tail_is_given_up(
    clean_redis: RedisServer,
    open_conn: Opener,
    make_subscriber: SubscriberFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The other side of the test above: a tail under way on a link that stops forwarding
    # (half-open, nothing closed) is silence like any other, and the health check gives the
    # connection up; the subscriber comes back on a new link and hears what is sent then.
    reads = recording_tail_reads(monkeypatch)
    received: list[Any] = []
    lost: list[bool] = []
    with FaultProxy(clean_redis.port) as proxy:
        subscriber, publisher, _ = await _large_payloads_through(
            proxy, clean_redis, open_conn, make_subscriber, received, lost, 0.3
        )
        await _published_slowly(proxy, publisher, b"T" + b"b" * 300_000, 50_000)
        await eventually(lambda: sum(map(len, reads)) > 0, 5)  # its tail is being read
        proxy.stall(up=False, down=True)
        await eventually(lambda: bool(lost), 10)
        assert "health-check" in str(subscriber.last_error)
        assert len(received) == 1  # the cut payload is not delivered
        await asyncio.wait_for(subscriber.wait_connected(), 5)  # on a new, relayed link
        assert await publisher.publish("big", b"after") == 1
        await eventually(lambda: len(received) == 2, 5)
        assert received[1] == b"after"
        await asyncio.wait_for(subscriber.close(), 5)


async def _tails_on_a_transport_of_its_own(url: str, **options: Any) -> list[Any]:
    """What a subscriber allowed to read tails apart receives of mixed payloads on the
    transport ``url`` and ``options`` give it."""
    received: list[Any] = []
    subscriber = Subscriber(
        url,
        on_message=lambda c, d: received.append(d),
        direct_reads=_tail_of_t_payloads,
        **options,
    )
    try:
        await asyncio.wait_for(subscriber.subscribe("big"), 5)
        publisher = await connect(url, **options)
        try:
            payloads = [b"T" + bytes([i]) * (300_000 if i % 4 else 10) for i in range(24)]
            for count, payload in enumerate(payloads, 1):  # one at a time: each could split
                assert await publisher.publish("big", payload) == 1
                await eventually(lambda n=count: len(received) >= n, 5)
        finally:
            await publisher.close()
    finally:
        await asyncio.wait_for(subscriber.close(), 5)
    assert [bytes(data) for data in received] == payloads
    return received


@pytest.mark.parametrize("transport", ["tls", "uvloop"])
def test_tails_are_read_as_before_on_a_transport_that_reads_the_socket_itself(
    redis_factory: RedisFactory, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    # TLS decrypts what the socket holds, and uvloop reads it in C: a read of the socket
    # beside theirs would take bytes from under them (ciphertext as a body, a stream out of
    # order). Allowed to read tails apart, a subscriber on either reads as before: the same
    # messages, no duplicate of its socket, no SplitPayload.
    monkeypatch.setattr(resp_connection, "_tails_apart", True)
    made: list[int] = []
    duplicate = resp_connection._duplicate

    def recording(fileno: int) -> Any:
        made.append(fileno)
        return duplicate(fileno)

    monkeypatch.setattr(resp_connection, "_duplicate", recording)
    if transport == "tls":
        server = redis_factory(tls=True)
        url, options = server.tls_url, {"ssl": server.ssl_context()}
        loop = asyncio.new_event_loop()
    else:
        uvloop = pytest.importorskip("uvloop")
        server = redis_factory()
        url, options = server.url, {}
        loop = uvloop.new_event_loop()
    try:
        received = loop.run_until_complete(_tails_on_a_transport_of_its_own(url, **options))
    finally:
        loop.close()
    assert not any(isinstance(data, SplitPayload) for data in received)
    assert not made


def test_a_tls_subscriber_has_finished_closing_when_close_returns(
    redis_factory: RedisFactory,
) -> None:
    # A TLS transport shuts its session down before it is closed (a round trip). close()
    # returned before that, so an owner closing its event loop next left the transport half
    # closed: "unclosed transport" when it was collected, in whatever code ran then.
    server = redis_factory(tls=True)

    async def subscribe_then_close() -> None:
        descriptors = len(os.listdir("/proc/self/fd"))
        subscriber = Subscriber(server.tls_url, ssl=server.ssl_context())
        await asyncio.wait_for(subscriber.subscribe("ch"), 5)
        assert len(os.listdir("/proc/self/fd")) == descriptors + 1
        await asyncio.wait_for(subscriber.close(), 5)
        # Its socket is closed once the session is shut down, not before.
        assert len(os.listdir("/proc/self/fd")) == descriptors

    gc.collect()  # what earlier tests left for the collector warns before, not below
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always", ResourceWarning)
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(subscribe_then_close())
        finally:
            loop.close()
        gc.collect()
    unclosed = [str(w.message) for w in warned if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed


async def test_each_connection_killed_after_tails_read_apart_leaves_no_descriptor(
    clean_redis: RedisServer,
    open_conn: Opener,
    make_subscriber: SubscriberFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A connection that read tails apart holds a duplicate of its socket. Killed by Redis
    # (CLIENT KILL) right after such a read, 20 times, the subscriber reconnects each time:
    # each lost connection closes its duplicate with its socket, and the process holds no
    # more descriptors than one live connection needs (its socket and its duplicate).
    reads = recording_tail_reads(monkeypatch)
    gc.collect()  # what earlier tests left for the collector warns before, not below
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always", ResourceWarning)
        received: list[Any] = []
        lost: list[bool] = []
        publisher = await open_conn(clean_redis.url)
        descriptors = len(os.listdir("/proc/self/fd"))
        subscriber = make_subscriber(
            clean_redis.url,
            on_message=lambda c, d: received.append(d),
            on_connection_lost=lambda: lost.append(True),
            direct_reads=_tail_of_t_payloads,
        )
        await asyncio.wait_for(subscriber.subscribe("big"), 2)
        payload = b"T" + b"k" * 200_000
        for kill in range(20):
            await asyncio.wait_for(subscriber.wait_connected(), 5)
            # The first large payload on a connection is read as before; a later one splits.
            for sent in range(len(received) + 1, len(received) + 11):
                assert await publisher.publish("big", payload) == 1
                await eventually(lambda n=sent: len(received) == n, 5)
                if isinstance(received[-1], SplitPayload):
                    break
            assert isinstance(received[-1], SplitPayload)
            assert await publisher.execute("CLIENT", "KILL", "TYPE", "pubsub") == 1
            await eventually(lambda n=kill + 1: len(lost) == n, 5)
        await asyncio.wait_for(subscriber.wait_connected(), 5)
        assert len(os.listdir("/proc/self/fd")) <= descriptors + 2
        assert all(bytes(data) == payload for data in received)
        assert len(reads) >= 20
        await asyncio.wait_for(subscriber.close(), 5)
        await asyncio.sleep(0)  # the transport closes its socket at the next loop turn
        assert len(os.listdir("/proc/self/fd")) == descriptors
        # Closed by the connection, not left to the collector (which closes a socket it frees,
        # with a ResourceWarning): a duplicate still open would live as long as its protocol.
        gc.collect()
        unclosed = [str(w.message) for w in warned if issubclass(w.category, ResourceWarning)]
        assert not [m for m in unclosed if "Recording" in m], unclosed  # a duplicate


def _push(payload: bytes, end: bytes = b"\r\n") -> bytes:
    return b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$%d\r\n%b%b" % (len(payload), payload, end)


@pytest.mark.parametrize("where", ["into its buffer", "read ahead", "tail read apart"])
async def test_a_large_payload_that_lies_about_its_length_ends_with_a_protocol_error(
    make_subscriber: SubscriberFactory, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # A payload followed by something else than CRLF: its announced length lied. Wherever
    # its bytes went (a buffer of its own, the buffer a read between payloads went into, a
    # tail read apart by recv), the connection ends with ProtocolError, as on the parser's
    # path, and nothing of that push is delivered; the subscriber comes back on a new one.
    # Read into a buffer, the error ended the stream from the transport's callback and was
    # reported as a lost connection (RedisConnectionError) instead.
    reads = recording_tail_reads(monkeypatch)
    first = b"T" + b"a" * 100_000  # a large payload read whole: what follows may split
    liar = b"T" + b"b" * 200_000
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        assert await read_command(reader) == [b"SUBSCRIBE", b"ch"]
        writer.write(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n")
        if connections == 1:
            if where == "into its buffer":
                writer.write(_push(liar, b"XY"))
            else:
                writer.write(_push(first))
                await writer.drain()
                await asyncio.sleep(0.1)  # read whole before the next one comes
                writer.write(_push(liar, b"\rX"))
        else:
            writer.write(_push(b"back"))
        await writer.drain()
        await drain_until_eof(reader)

    received: list[bytes] = []
    errors: list[Exception | None] = []
    async with FakeRedis(handler) as fake:
        subscriber: Subscriber

        def lost() -> None:
            errors.append(subscriber.last_error)

        subscriber = make_subscriber(
            fake.url,
            on_message=lambda c, d: received.append(bytes(d)),
            on_connection_lost=lost,
            min_backoff=0.01,
            direct_reads=(True if where == "read ahead" else _tail_of_t_payloads),
        )
        await asyncio.wait_for(subscriber.subscribe("ch"), 2)
        await eventually(lambda: b"back" in received, 5)
        await subscriber.close()
    assert len(errors) >= 1 and isinstance(errors[0], ProtocolError), errors
    assert liar not in received
    expected = [b"back"] if where == "into its buffer" else [first, b"back"]
    assert received[: len(expected)] == expected
    assert bool(reads) == (where == "tail read apart")  # the liar's bytes went where named


_NO_DESCRIPTOR_LEFT = """
import asyncio, os, resource, sys
from minidasgi.resp import Subscriber, connect
from minidasgi.resp import connection
from minidasgi.resp.directread import SplitPayload

connection.read_tails_apart()

async def main():
    publisher = await connect(sys.argv[1])
    received = []
    # The lowest free descriptor is the subscriber's socket: none is left for its duplicate.
    lowest = os.dup(0)
    os.close(lowest)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest + 1, hard))
    subscriber = Subscriber(
        sys.argv[1],
        on_message=lambda c, d: received.append(d),
        direct_reads=lambda start, size: size - 5 if start[:1] == b"T" else 0,
    )
    await asyncio.wait_for(subscriber.subscribe("big"), 5)
    payloads = [b"T" + bytes([i]) * (300_000 if i % 4 else 10) for i in range(16)]
    for count, payload in enumerate(payloads, 1):
        assert await publisher.publish("big", payload) == 1
        while len(received) < count:
            await asyncio.sleep(0.005)
    assert [bytes(data) for data in received] == payloads, "other bytes delivered"
    assert not any(isinstance(data, SplitPayload) for data in received)
    try:
        os.dup(0)
    except OSError:
        print("delivered, no descriptor left", subscriber.connected)

asyncio.run(asyncio.wait_for(main(), 30))
"""


def test_a_subscriber_that_cannot_duplicate_its_socket_reads_as_before(
    clean_redis: RedisServer,
) -> None:
    # Out of descriptors (a low RLIMIT_NOFILE, in a child process), the socket's duplicate
    # cannot be made: large payloads are read as before, every message delivered on the
    # connection it came on (a failed dup that escaped into the transport would end the
    # connection at each large payload, and lose what was in flight on it).
    child = subprocess.run(
        [sys.executable, "-c", _NO_DESCRIPTOR_LEFT, clean_redis.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip() == "delivered, no descriptor left True", child.stderr[-2000:]


async def test_tails_are_read_as_before_in_a_process_that_did_not_allow_it(
    clean_redis: RedisServer,
    open_conn: Opener,
    make_subscriber: SubscriberFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A subscriber in a process the library does not own (a distributor under the user's
    # own server, a Node under ``serve()``) reads large payloads as before, with the copy of
    # each: no duplicate of its socket, no ``SplitPayload``, and the allocator left alone.
    monkeypatch.setattr(resp_connection, "_tails_apart", False, raising=False)
    made: list[int] = []
    monkeypatch.setattr(resp_connection, "_duplicate", made.append)
    received: list[Any] = []
    subscriber = make_subscriber(
        clean_redis.url,
        on_message=lambda c, d: received.append(d),
        direct_reads=_tail_of_t_payloads,
    )
    await asyncio.wait_for(subscriber.subscribe("big"), 2)
    publisher = await open_conn(clean_redis.url)
    payloads = [b"T" + bytes([i]) * 300_000 for i in range(8)]
    for count, payload in enumerate(payloads, 1):
        assert await publisher.publish("big", payload) == 1
        await eventually(lambda n=count: len(received) >= n, 5)
    assert [bytes(data) for data in received] == payloads
    assert not any(isinstance(data, SplitPayload) for data in received)
    assert not made
    await publisher.close()
    await asyncio.wait_for(subscriber.close(), 5)


async def test_a_push_a_segment_cuts_in_its_length_line_is_delivered_whole() -> None:
    # The third push is read ahead into the buffer that held the second one, and a segment
    # ends inside its payload's length line: the length must be read from this push's bytes,
    # never from the earlier push's left in the buffer (it was: the push was never delivered).
    def push(payload: bytes) -> bytes:
        return b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$%d\r\n%b\r\n" % (len(payload), payload)

    payloads = [b"A" * 131072, b"B" * 131072, b"C" * 100000]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_command(reader) == [b"SUBSCRIBE", b"ch"]
        writer.write(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n")
        last = push(payloads[2])
        cut = last.index(b"$100000") + 2
        for data in (push(payloads[0]), push(payloads[1]), last[:cut], last[cut:]):
            writer.write(data)
            await writer.drain()
            await asyncio.sleep(0.1)  # each its own segment and read
        await drain_until_eof(reader)

    received: list[bytes] = []
    async with FakeRedis(handler) as fake:
        subscriber = Subscriber(
            fake.url,
            on_message=lambda channel, data: received.append(bytes(data)),
            direct_reads=True,
        )
        try:
            await asyncio.wait_for(subscriber.subscribe("ch"), 2)
            for _ in range(100):
                if len(received) == len(payloads):
                    break
                await asyncio.sleep(0.02)
        finally:
            await asyncio.wait_for(subscriber.close(), 5)
    assert received == payloads


async def test_a_subscriber_outlives_connections_reset_just_after_they_open(
    redis_server: RedisServer, make_subscriber: SubscriberFactory
) -> None:
    # A connection reset just after its accept (a Redis going down or restarting) may end
    # before the client has set its socket up: setsockopt then fails with EBADF, the transport
    # having closed the socket already. That raw OSError once ended the subscriber's
    # supervisor, which never reconnected (seen in the suite: a distributor never ready again
    # after a Redis restart). Each such reset must be one more failed attempt, nothing more.
    resets = 300  # about one in seven ends in that window on this machine
    with FaultProxy(redis_server.port) as proxy:
        proxy.reset_new(resets)
        got: list[bytes] = []
        subscriber = make_subscriber(
            proxy.url(),
            on_message=lambda _, data: got.append(data),
            min_backoff=0.001,
            max_backoff=0.001,
        )
        subscriber.start()
        supervisor = subscriber._task
        assert supervisor is not None
        # (A connection may count as connected for the moment before its reset arrives.)
        await eventually(lambda: proxy.resets == resets or supervisor.done(), 30)
        assert not supervisor.done(), supervisor.exception()
        await asyncio.wait_for(subscriber.subscribe("ch"), 5)
        assert redis_server.command("PUBLISH", "ch", "after") == 1
        await eventually(lambda: got == [b"after"], 5)
