"""``Client.publish_into`` against a real redis-server: the caller's ``settled`` callback is
told once, with its future settled, on every way the PUBLISH can end. The outbox relies on it
to forget a batch watched for a lost message (``Outbox._lost``): a path that skipped it would
leave that batch, and the callbacks of the requests it carried, behind for good."""

from __future__ import annotations

import asyncio
import logging

import pytest

from minidasgi.resp import RedisConnectionError, connect, make_params
from minidasgi.resp.client import Client

from .redis_server import RedisServer
from .stack import poll


async def test_publish_into_tells_settled_on_a_reply_a_lost_connection_and_a_failed_send(
    redis_server: RedisServer,
) -> None:
    client = Client(make_params(redis_server.url))
    client.start()
    admin = await connect(redis_server.url)
    told: list[asyncio.Future[int]] = []
    loop = asyncio.get_running_loop()
    try:
        assert await poll(lambda: client.connected, 10)

        # The reply: the receiver count.
        replied: asyncio.Future[int] = loop.create_future()
        client.publish_into("nobody", b"x", replied, told.append)
        assert await poll(lambda: len(told) == 1, 5)
        assert told[0] is replied and replied.result() == 0

        # The connection lost with the PUBLISH in flight: a blocking pop sent ahead of it on
        # the same connection keeps Redis from answering it before the kill.
        blocked = asyncio.ensure_future(client.connection().execute("BLPOP", "never", "10"))

        async def one_blocked() -> bool:
            info = await admin.execute("INFO", "clients")
            return b"blocked_clients:1\r\n" in info

        assert await poll(one_blocked, 5)
        lost: asyncio.Future[int] = loop.create_future()
        client.publish_into("nobody", b"y", lost, told.append)
        await admin.execute("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert await poll(lambda: len(told) == 2, 5)
        assert told[1] is lost and lost.result() == 0
        with pytest.raises(RedisConnectionError):  # the pop failed with the connection
            await asyncio.wait_for(blocked, 5)

        # A send that fails at once: the client's connection closed, not yet replaced.
        assert await poll(lambda: client.connected, 10)
        await client.connection().close()
        unsent: asyncio.Future[int] = loop.create_future()
        client.publish_into("nobody", b"z", unsent, told.append)
        assert told[2:] == [unsent] and unsent.result() == 0

        assert len(told) == 3  # each told once
    finally:
        await admin.close()
        await client.close()


async def test_wait_reopened_waits_for_a_replaced_connection_not_for_a_redis_away(
    redis_server: RedisServer,
) -> None:
    """A connection Redis closes while it is up (``CLIENT KILL`` here; its idle ``timeout``
    in service) is replaced at once: ``wait_reopened``, called as its end is known, waits for
    that attempt and finds a connection. With Redis gone the attempt is refused and it returns
    False at once, not after the backoff's later attempts."""
    client = Client(make_params(redis_server.url))
    client.start()
    admin = await connect(redis_server.url)
    try:
        assert await poll(lambda: client.connected, 10)
        ended = client.connection()
        await admin.execute("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await ended.wait_closed()  # its replacement may be under way, or made already
        assert await asyncio.wait_for(client.wait_reopened(), 10)
        assert client.connected and client.connection() is not ended

        ended = client.connection()
        redis_server.kill()
        await ended.wait_closed()
        assert not await asyncio.wait_for(client.wait_reopened(), 10)
    finally:
        await admin.close()
        await client.close()


async def test_redis_closing_idle_connections_is_told_once_with_advice(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis' idle ``timeout`` (1 s) below ``health_check_interval`` (5 s): Redis closes the
    idle connection about every 2 s and it is replaced at once. Each close was a WARNING;
    now the first is told at INFO with the advice that stops it, the others at DEBUG. A close
    whose replacement fails (Redis shut down) is still a warning."""
    caplog.set_level(logging.DEBUG, logger="minidasgi.resp.client")
    redis_server.command("CONFIG", "SET", "timeout", "1")
    client = Client(make_params(redis_server.url), name="tested", health_check_interval=5.0)
    client.start()
    try:
        assert await poll(lambda: client.connected, 10)
        first = client.connection()
        seen = [first]

        def replaced_three_times() -> bool:
            if client.connected and client.connection() not in seen:
                seen.append(client.connection())
            return len(seen) == 4

        assert await poll(replaced_three_times, 20)
        redis_server.stop()  # the next close of an idle one is not replaced
        assert await poll(lambda: not client.connected, 10)
        assert await poll(lambda: any(r.levelno == logging.WARNING for r in caplog.records), 10)
    finally:
        await client.close()
    records = [r for r in caplog.records if r.name == "minidasgi.resp.client"]
    told = [r for r in records if r.levelno == logging.INFO and "idle" in r.getMessage()]
    assert len(told) == 1, [r.getMessage() for r in records]
    assert (
        "timeout" in told[0].getMessage() and "health_check_interval (5 s)" in told[0].getMessage()
    )
    replaced = [r for r in records if r.levelno == logging.DEBUG and "replaced" in r.getMessage()]
    assert len(replaced) >= 2
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert warnings == [f"tested: Redis at {client.params.address} closed the connection"]
    assert first.closed_by_server and first.closed_idle


async def test_idle_closes_that_go_on_are_counted_at_info_now_and_then(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """After the first INFO line, idle closes that go on (Redis' ``timeout``, but also a
    ``CLIENT KILL`` loop or a proxy closing idle connections, days later) are not hidden at
    DEBUG for good: they are counted at INFO at most once per ``idle_close_repeat`` seconds
    (600 by default: once in the test above). With 0, every later close is its own count."""
    caplog.set_level(logging.INFO, logger="minidasgi.resp.client")
    redis_server.command("CONFIG", "SET", "timeout", "1")
    client = Client(make_params(redis_server.url), name="tested", health_check_interval=5.0)
    client.idle_close_repeat = 0.0
    client.start()
    try:
        assert await poll(lambda: client.connected, 10)
        seen = [client.connection()]

        def replaced_twice() -> bool:
            if client.connected and client.connection() not in seen:
                seen.append(client.connection())
            return len(seen) == 3

        assert await poll(replaced_twice, 20)
    finally:
        await client.close()
    records = [r for r in caplog.records if r.name == "minidasgi.resp.client"]
    told = [
        r.getMessage() for r in records if r.levelno == logging.INFO and "idle" in r.getMessage()
    ]
    assert len(told) >= 2, told
    assert "(its 'timeout' setting, most likely)" in told[0]
    for line in told[1:]:
        assert line.startswith(f"tested: Redis at {client.params.address} closed 1 more idle ")
        assert "health_check_interval (5 s)" in line
    assert not [r for r in records if r.levelno >= logging.WARNING]
