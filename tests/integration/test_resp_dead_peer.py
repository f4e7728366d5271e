"""Dead-peer detection in the RESP layer: TCP keepalive, the reply bound of ``Connection``,
the bounded handshake, ``Client``'s idle health check, and a ``Subscriber`` that counts as
connected only once Redis confirmed its channels (and retries a refused SUBSCRIBE).

Fake servers that accept and then never answer stand in for a peer that went silent; every
test runs once per reply parser (``python`` and ``hiredis``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from minidasgi.resp import Connection, RedisConnectionError, Subscriber, connect, make_params
from minidasgi.resp.client import Client
from minidasgi.resp.protocol import pack_command

from .fakes import FakeRedis, drain_until_eof, read_command
from .faultproxy import FaultProxy
from .redis_server import RedisServer
from .stack import poll

Opener = Callable[..., Awaitable[Connection]]


async def eventually(predicate: Callable[[], bool], within: float, step: float = 0.02) -> None:
    """Wait until ``predicate()`` is true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(step)


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A peer that accepts and reads everything, and never answers."""
    await drain_until_eof(reader)


def tcp_socket(writer: Any) -> socket.socket:
    sock = writer.transport.get_extra_info("socket")
    assert sock is not None
    return sock  # type: ignore[no-any-return]


def assert_keepalive(sock: socket.socket) -> None:
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
    if hasattr(socket, "TCP_KEEPINTVL"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 2
    if hasattr(socket, "TCP_KEEPCNT"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        assert 0 < sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) <= 30_000
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


@pytest.fixture
async def make_subscriber(parser: str) -> AsyncIterator[Callable[..., Subscriber]]:
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


# -- TCP keepalive -------------------------------------------------------------------------------


async def test_every_tcp_connection_has_keepalive_tuned_to_seconds(
    clean_redis: RedisServer, open_conn: Opener, make_subscriber: Callable[..., Subscriber]
) -> None:
    conn = await open_conn(clean_redis.url)
    assert_keepalive(tcp_socket(conn._writer))

    subscriber = make_subscriber(clean_redis.url)
    await asyncio.wait_for(subscriber.subscribe("ch"), 5)
    assert_keepalive(tcp_socket(subscriber._writer))


# -- the reply bound -----------------------------------------------------------------------------


async def test_reply_timeout_fails_every_waiting_command(open_conn: Opener) -> None:
    async with FakeRedis(silent) as fake:
        conn = await open_conn(fake.url, reply_timeout=0.4)
        commands = [asyncio.ensure_future(conn.execute("GET", f"k{i}")) for i in range(3)]
        done, pending = await asyncio.wait(commands, timeout=5)
        assert not pending
        for command in done:
            error = command.exception()
            assert isinstance(error, RedisConnectionError)
            assert str(error) == f"no reply from Redis at 127.0.0.1:{fake.port} within 0.4 s"
        assert conn.is_closed
        with pytest.raises(RedisConnectionError):
            await conn.execute("PING")


async def test_reply_timeout_bounds_a_pipeline_on_an_idle_connection(open_conn: Opener) -> None:
    # A pipeline first on an idle connection arms the watchdog as a single command does;
    # nothing else would ever check the FIFO (the health PING waits for an empty one).
    async with FakeRedis(silent) as fake:
        conn = await open_conn(fake.url, reply_timeout=0.4)
        pipelined = asyncio.ensure_future(
            conn.pipeline(pack_command("PUBSUB", "NUMSUB", "c"), pack_command("LPUSH", "k", "v"))
        )
        behind = asyncio.ensure_future(conn.execute("GET", "k"))
        done, pending = await asyncio.wait([pipelined, behind], timeout=5)
        for task in pending:
            task.cancel()
        assert not pending, "a pipeline on a silent connection waited past its reply bound"
        for task in done:
            assert isinstance(task.exception(), RedisConnectionError)
        assert conn.is_closed


async def test_reply_timeout_from_the_url(open_conn: Opener) -> None:
    async with FakeRedis(silent) as fake:
        conn = await open_conn(f"{fake.url}?reply_timeout=0.3")
        with pytest.raises(RedisConnectionError, match=r"within 0\.3 s"):
            await asyncio.wait_for(conn.ping(), 5)


async def test_slow_but_alive_server_is_not_cut_off(open_conn: Opener) -> None:
    # Each reply comes 0.3 s after the previous one: the queue as a whole waits longer than
    # the bound, but the head keeps moving, so the peer is alive. A caller cancelled on the
    # way does not shift anyone's reply.
    async def slow_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (command := await read_command(reader)) is not None:
            await asyncio.sleep(0.3)
            writer.write(b"+" + command[-1] + b"\r\n")
            await writer.drain()

    async with FakeRedis(slow_echo) as fake:
        conn = await open_conn(fake.url, reply_timeout=0.8)
        commands = [asyncio.ensure_future(conn.execute("ECHO", f"r{i}")) for i in range(6)]
        await asyncio.sleep(0.1)
        commands[1].cancel()
        _, pending = await asyncio.wait(commands, timeout=10)
        assert not pending
        for i, command in enumerate(commands):
            if i == 1:
                assert command.cancelled()
            else:
                assert command.result() == f"r{i}".encode()
        assert not conn.is_closed
        assert await asyncio.wait_for(conn.execute("ECHO", "after"), 5) == b"after"


async def test_cancelled_waiter_then_silence(open_conn: Opener) -> None:
    async with FakeRedis(silent) as fake:
        conn = await open_conn(fake.url, reply_timeout=0.4)
        first = asyncio.ensure_future(conn.execute("GET", "a"))
        await asyncio.sleep(0.1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.ensure_future(conn.execute("GET", "b"))
        with pytest.raises(RedisConnectionError, match="no reply"):
            await asyncio.wait_for(second, 5)
        assert conn.is_closed


async def test_blocking_pop_bound_is_its_timeout_plus_the_reply_bound(open_conn: Opener) -> None:
    async with FakeRedis(silent) as fake:
        conn = await open_conn(fake.url, reply_timeout=0.4)
        with pytest.raises(RedisConnectionError, match=r"within 0\.9 s"):
            await asyncio.wait_for(conn.brpop("q", timeout=0.5), 5)

    # A server that honours the pop's timeout (answers nil after 0.8 s) is not cut off,
    # though 0.8 s is more than the reply bound.
    async def nil_after_timeout(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (command := await read_command(reader)) is not None:
            await asyncio.sleep(float(command[-1]) * 0.8)
            writer.write(b"*-1\r\n")
            await writer.drain()

    async with FakeRedis(nil_after_timeout) as fake:
        conn = await open_conn(fake.url, reply_timeout=0.4)
        assert await asyncio.wait_for(conn.brpop("q", timeout=1), 5) is None
        assert not conn.is_closed


async def test_handshake_is_bounded(parser: str) -> None:
    # A server that accepts TCP and never answers AUTH/SELECT.
    async with FakeRedis(silent) as fake:
        for url in (f"redis://:pw@127.0.0.1:{fake.port}", f"redis://127.0.0.1:{fake.port}/2"):
            with pytest.raises(RedisConnectionError, match="handshake") as info:
                await asyncio.wait_for(
                    connect(url, connect_timeout=0.3, reply_timeout=0, parser=parser), 5
                )
            assert "pw" not in str(info.value)


async def test_client_reconnects_after_a_reply_timeout(parser: str) -> None:
    async def silent_then_pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if fake.connections == 1:
            await drain_until_eof(reader)
            return
        while await read_command(reader) is not None:
            writer.write(b"+PONG\r\n")
            await writer.drain()

    async with FakeRedis(silent_then_pong) as fake:
        params = make_params(fake.url, reply_timeout=0.4)
        client = Client(params, parser=parser, min_backoff=0.02, max_backoff=0.1)
        try:
            await client.wait_connected(5)
            with pytest.raises(RedisConnectionError, match="no reply"):
                await asyncio.wait_for(client.execute("PING"), 5)
            connection = await client.wait_connected(5)
            assert await asyncio.wait_for(connection.ping(), 5) == b"PONG"
            assert fake.connections == 2
        finally:
            await asyncio.wait_for(client.close(), 5)


async def test_idle_client_finds_a_silent_peer_by_itself(parser: str) -> None:
    async with FakeRedis(silent) as fake:
        params = make_params(fake.url, reply_timeout=0.3)
        client = Client(
            params, parser=parser, min_backoff=0.02, max_backoff=0.1, health_check_interval=0.2
        )
        try:
            first = await client.wait_connected(5)
            # No command is sent: the health check's PING goes unanswered, the watchdog gives
            # the connection up and the client opens another.
            await eventually(lambda: first.is_closed and fake.connections >= 2, 5)
            assert "no reply" in str(client.last_error)
        finally:
            await asyncio.wait_for(client.close(), 5)


# -- subscriptions must be confirmed -------------------------------------------------------------


async def test_subscriber_is_not_connected_before_confirmation(
    make_subscriber: Callable[..., Subscriber],
) -> None:
    async with FakeRedis(silent) as fake:
        subscriber = make_subscriber(fake.url, health_check_interval=30)
        pending = asyncio.ensure_future(subscriber.subscribe("ch"))
        try:
            await eventually(lambda: fake.connections == 1, 5)
            await asyncio.sleep(0.3)
            assert not subscriber.connected
            with pytest.raises(asyncio.TimeoutError):
                await subscriber.wait_connected(0.2)
        finally:
            pending.cancel()


async def test_refused_subscribe_is_retried(make_subscriber: Callable[..., Subscriber]) -> None:
    refusals = 2

    async def refuse_then_accept(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (command := await read_command(reader)) is not None:
            if command[0].upper() != b"SUBSCRIBE":
                continue
            if fake.connections <= refusals:
                writer.write(
                    b"-NOPERM this user has no permissions to access one of the channels\r\n"
                )
            else:
                for channel in command[1:]:
                    writer.write(
                        b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(channel), channel)
                    )
            await writer.drain()

    connected: list[int] = []
    async with FakeRedis(refuse_then_accept) as fake:
        subscriber = make_subscriber(fake.url, on_connected=lambda: connected.append(1))
        await asyncio.wait_for(subscriber.subscribe("ch"), 5)
        assert subscriber.connected
        assert fake.connections == refusals + 1
        assert connected == [1]
        assert "NOPERM" in str(subscriber.last_error)


# -- A process stopped is not a dead peer ----------------------------------------------------------

# A process stopped (SIGSTOP) in its event loop's wait and resumed after its next timer was due
# gets no I/O events on that wake-up (CPython's epoll gives up at its deadline, unpolled): its
# timers run before it reads what arrived meanwhile. A check that then counts the stop as the
# peer's silence gives up a live connection whose answer is waiting in its socket.

_STOPPED_POP = """
import asyncio, sys
from minidasgi.resp import connect

async def main() -> None:
    connection = await connect(sys.argv[1], reply_timeout=1)  # bound: 1 s + BRPOP's 2 s
    print("ready", flush=True)
    try:
        print("reply", await connection.brpop("stopped-pop", timeout=2), flush=True)
    except Exception as exc:
        print("error", exc, flush=True)

asyncio.run(main())
"""

_STOPPED_SUBSCRIBER = """
import asyncio, sys
from minidasgi.resp import Subscriber

async def main() -> None:
    subscriber = Subscriber(
        sys.argv[1],
        health_check_interval=2,
        on_message=lambda channel, data: print("message", data.decode(), flush=True),
        on_connection_lost=lambda: print("lost", flush=True),
    )
    await subscriber.subscribe("stopped")
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def _child(code: str, url: str) -> asyncio.subprocess.Process:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, url, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    assert await asyncio.wait_for(child.stdout.readline(), 20) == b"ready\n"
    return child


def _blocked(server: RedisServer) -> bool:
    listing = server.command("CLIENT", "LIST")
    assert isinstance(listing, bytes)
    return any("flags=b " in line for line in listing.decode().splitlines())


async def test_a_stopped_process_reads_the_reply_its_stop_held(redis_server: RedisServer) -> None:
    """The reply bound counts no time its own process was stopped: Redis answered the BRPOP
    (nil, after its 2 s) while the process was stopped for 4 s, past the 3 s bound."""
    child = await _child(_STOPPED_POP, redis_server.url)
    try:
        assert await poll(lambda: _blocked(redis_server), 10)
        # The bound's watchdog looked at the BRPOP (every 0.25 s) before the stop, or the test
        # would pass without the discount; Redis answers the BRPOP 2 s after it came.
        await asyncio.sleep(0.75)
        os.kill(child.pid, signal.SIGSTOP)
        try:
            assert _blocked(redis_server)  # answered only once the process is stopped
            await asyncio.sleep(4)
        finally:
            os.kill(child.pid, signal.SIGCONT)
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 10) == b"reply None\n"
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()


async def test_a_stopped_subscriber_reads_the_answer_to_its_health_check(
    redis_server: RedisServer,
) -> None:
    """The health check counts no time its own process was stopped: the answer to its PING,
    held back by the link until the process was stopped, waits in its socket for 3 s, past the
    2 s the check gives it."""
    with FaultProxy(redis_server.port) as proxy:
        child = await _child(_STOPPED_SUBSCRIBER, proxy.url())
        try:
            proxy.stall(up=False, down=True)
            # Idle for 2 s, the subscriber PINGs: Redis' PONG is held back (the check gives
            # up only 2 s after the PING, far later than this takes).
            assert await poll(lambda: proxy.held_down() > 0, 10, interval=0.01)
            os.kill(child.pid, signal.SIGSTOP)
            try:
                proxy.resume()
                await asyncio.sleep(3)
            finally:
                os.kill(child.pid, signal.SIGCONT)
            assert child.stdout is not None
            line = b""
            while line != b"message hello\n":  # whatever came before it is read
                redis_server.command("PUBLISH", "stopped", "hello")
                line = await asyncio.wait_for(child.stdout.readline(), 10)
                assert line != b"lost\n", "the subscriber gave up a live connection"
        finally:
            if child.returncode is None:
                child.kill()
            await child.wait()
