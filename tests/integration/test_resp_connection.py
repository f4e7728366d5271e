"""``minidasgi.resp.connect`` and ``Client`` against private redis-server processes.

Every test that opens a connection runs once per reply parser (``python`` and ``hiredis``).
Fake servers made with ``asyncio.start_server`` stand in for Redis where a real one cannot be
made to misbehave (malformed or oversize replies).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from minidasgi.resp import (
    AuthenticationError,
    Connection,
    ProtocolError,
    RedisConnectionError,
    ReplyError,
    connect,
    make_params,
)
from minidasgi.resp.client import Client
from minidasgi.resp.protocol import pack_command, pack_command_parts

from .fakes import FakeRedis, Handler, drain_until_eof, read_command
from .faultproxy import FaultProxy
from .redis_server import RedisFactory, RedisServer, client_list
from .stack import poll

PASSWORD = "s3cr:t@x"

Opener = Callable[..., Awaitable[Connection]]


async def eventually(predicate: Callable[[], bool], within: float, step: float = 0.02) -> None:
    """Wait until ``predicate()`` is true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(step)


# -- basics -------------------------------------------------------------------------------


async def test_ping_and_arbitrary_commands(clean_redis: RedisServer, open_conn: Opener) -> None:
    conn = await open_conn(clean_redis.url)
    assert await conn.ping() == b"PONG"
    assert await conn.execute("SET", "k", "v") == b"OK"
    assert await conn.execute("GET", "k") == b"v"
    assert await conn.execute("GET", "missing") is None
    assert await conn.execute("INCRBY", "n", 5) == 5
    assert await conn.rpush("l", "a", "b") == 2
    assert await conn.execute("LRANGE", "l", 0, -1) == [b"a", b"b"]
    assert clean_redis.command("GET", "k") == b"v"
    assert not conn.is_closed


async def test_reply_error_leaves_connection_usable(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    conn = await open_conn(clean_redis.url)
    with pytest.raises(ReplyError) as info:
        await conn.execute("LPUSH")
    assert not isinstance(info.value, AuthenticationError)
    assert info.value.code == "ERR"
    assert "wrong number of arguments" in str(info.value)
    await conn.execute("SET", "s", "x")
    with pytest.raises(ReplyError) as wrongtype:
        await conn.execute("LPUSH", "s", "v")
    assert wrongtype.value.code == "WRONGTYPE"
    assert not conn.is_closed
    assert await conn.ping() == b"PONG"
    assert await conn.execute("GET", "s") == b"x"


async def test_pipelined_error_does_not_shift_replies(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    conn = await open_conn(clean_redis.url)
    results = await asyncio.gather(
        conn.execute("SET", "a", "1"),
        conn.execute("LPUSH"),
        conn.execute("GET", "a"),
        conn.execute("NOSUCHCOMMAND"),
        conn.execute("PING"),
        return_exceptions=True,
    )
    assert results[0] == b"OK"
    assert isinstance(results[1], ReplyError)
    assert results[2] == b"1"
    assert isinstance(results[3], ReplyError)
    assert results[4] == b"PONG"


# -- authentication and databases ------------------------------------------------------------


async def test_password_in_url(redis_factory: RedisFactory, open_conn: Opener) -> None:
    server = redis_factory(password=PASSWORD)
    assert "s3cr%3At%40x" in server.url  # percent-encoded
    conn = await open_conn(server.url)
    assert await conn.ping() == b"PONG"
    assert await conn.execute("ACL", "WHOAMI") == b"default"


async def test_password_keyword(redis_factory: RedisFactory, open_conn: Opener) -> None:
    server = redis_factory(password=PASSWORD)
    conn = await open_conn(f"redis://127.0.0.1:{server.port}", password=PASSWORD)
    assert await conn.ping() == b"PONG"
    conn2 = await open_conn(host="127.0.0.1", port=server.port, password=PASSWORD, db=2)
    assert await conn2.ping() == b"PONG"


async def test_acl_user(redis_factory: RedisFactory, open_conn: Opener) -> None:
    server = redis_factory(acl_users={"alice": "pw1"})
    by_keyword = await open_conn(
        f"redis://127.0.0.1:{server.port}", username="alice", password="pw1"
    )
    assert await by_keyword.execute("ACL", "WHOAMI") == b"alice"
    by_url = await open_conn(f"redis://alice:pw1@127.0.0.1:{server.port}/1")
    assert await by_url.execute("ACL", "WHOAMI") == b"alice"


async def test_wrong_password_raises_authentication_error(
    redis_factory: RedisFactory, parser: str
) -> None:
    server = redis_factory(password=PASSWORD)
    secret = "not-the-Pa55word"
    with pytest.raises(AuthenticationError) as info:
        await asyncio.wait_for(
            connect(f"redis://127.0.0.1:{server.port}", password=secret, parser=parser), 5
        )
    message = str(info.value)
    assert f"127.0.0.1:{server.port}" in message
    assert secret not in message
    assert secret not in repr(info.value)
    assert PASSWORD not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


async def test_wrong_acl_password_raises_authentication_error(
    redis_factory: RedisFactory, parser: str
) -> None:
    server = redis_factory(acl_users={"alice": "pw1"})
    secret = "wrong-alice-pw"
    url = f"redis://alice:{secret}@127.0.0.1:{server.port}"
    with pytest.raises(AuthenticationError) as info:
        await asyncio.wait_for(connect(url, parser=parser), 5)
    assert f"127.0.0.1:{server.port}" in str(info.value)
    assert "alice" in str(info.value)
    assert secret not in str(info.value)


async def test_no_password_against_password_server(
    redis_factory: RedisFactory, open_conn: Opener
) -> None:
    server = redis_factory(password=PASSWORD)
    # Without credentials and db 0 there is no handshake: connect succeeds and the first
    # command is refused; the connection stays open.
    conn = await open_conn(f"redis://127.0.0.1:{server.port}")
    with pytest.raises(ReplyError) as info:
        await conn.ping()
    assert info.value.code == "NOAUTH"
    assert not conn.is_closed
    assert await conn.execute("AUTH", PASSWORD) == b"OK"
    assert await conn.ping() == b"PONG"


async def test_no_password_with_db_fails_at_connect(
    redis_factory: RedisFactory, parser: str
) -> None:
    server = redis_factory(password=PASSWORD)
    # With a db to SELECT, the handshake itself meets NOAUTH.
    with pytest.raises(AuthenticationError) as info:
        await asyncio.wait_for(connect(f"redis://127.0.0.1:{server.port}/3", parser=parser), 5)
    assert "NOAUTH" in str(info.value)
    assert f"127.0.0.1:{server.port}" in str(info.value)


async def test_select_db_from_url(clean_redis: RedisServer, open_conn: Opener) -> None:
    db3 = await open_conn(f"{clean_redis.url}/3")
    db0 = await open_conn(clean_redis.url)
    db3_keyword = await open_conn(clean_redis.url, db=3)
    assert db3.params.db == 3
    assert await db3.execute("SET", "only-in-3", "yes") == b"OK"
    assert await db0.execute("GET", "only-in-3") is None
    assert await db3_keyword.execute("GET", "only-in-3") == b"yes"
    assert clean_redis.command("GET", "only-in-3") is None
    assert await db3.execute("DBSIZE") == 1
    assert await db0.execute("DBSIZE") == 0


# -- reading ---------------------------------------------------------------------------------


async def test_replies_are_read_into_one_buffer_and_copied_before_the_next_read(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    """The transport reads into the connection's own buffer (``recv_into``: no 256 KiB bytes
    allocated per read, which costs glibc three system calls); what the parser keeps must not
    change under it when the next read reuses the buffer."""
    conn = await open_conn(clean_redis.url)
    values = [bytes([65 + i]) * (100_000 + i) for i in range(8)]  # each spans several reads
    for i, value in enumerate(values):
        assert await conn.execute("SET", f"big{i}", value) == b"OK"
    protocol = conn._writer.transport.get_protocol()  # type: ignore[union-attr]
    assert isinstance(protocol, asyncio.BufferedProtocol)
    buffer = protocol.get_buffer(-1)
    got = await asyncio.gather(*(conn.execute("GET", f"big{i % 8}") for i in range(40)))
    assert got == [values[i % 8] for i in range(40)]
    assert protocol.get_buffer(-1) is buffer


# -- blocking pops ----------------------------------------------------------------------------


async def test_lpush_brpop_is_fifo(clean_redis: RedisServer, open_conn: Opener) -> None:
    conn = await open_conn(clean_redis.url)
    assert await conn.lpush("q", "first") == 1
    assert await conn.lpush("q", "second", "third") == 3
    got = [await conn.brpop("q", timeout=1) for _ in range(3)]
    assert got == [(b"q", b"first"), (b"q", b"second"), (b"q", b"third")]
    assert await conn.execute("LLEN", "q") == 0


async def test_brpop_wakes_on_push_from_other_connection(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    waiter = await open_conn(clean_redis.url)
    pusher = await open_conn(clean_redis.url)
    task = asyncio.create_task(waiter.brpop("other", "q", timeout=2))
    await asyncio.sleep(0.05)
    assert not task.done()
    await pusher.lpush("q", b"\x00binary\xff")
    assert await asyncio.wait_for(task, 2) == (b"q", b"\x00binary\xff")


@pytest.mark.parametrize("command", ["brpop", "blpop"])
async def test_blocking_pop_times_out(
    clean_redis: RedisServer, open_conn: Opener, command: str
) -> None:
    conn = await open_conn(clean_redis.url)
    pop = getattr(conn, command)
    start = time.monotonic()
    assert await asyncio.wait_for(pop("empty", timeout=0.1), 2) is None
    elapsed = time.monotonic() - start
    assert 0.08 <= elapsed < 0.6
    start = time.monotonic()
    assert await asyncio.wait_for(pop("empty", "empty2", timeout=0.25), 2) is None
    elapsed = time.monotonic() - start
    assert 0.22 <= elapsed < 0.8
    assert not conn.is_closed
    assert await conn.ping() == b"PONG"


async def test_blpop_pops_head(clean_redis: RedisServer, open_conn: Opener) -> None:
    conn = await open_conn(clean_redis.url)
    await conn.rpush("q", "a", "b")
    assert await conn.blpop("q", timeout=0.5) == (b"q", b"a")
    assert await conn.brpop("q", timeout=0.5) == (b"q", b"b")


async def test_blocking_pop_argument_checks(clean_redis: RedisServer, open_conn: Opener) -> None:
    conn = await open_conn(clean_redis.url)
    with pytest.raises(ValueError):
        await conn.brpop(timeout=1)
    with pytest.raises(ValueError):
        await conn.blpop("q", timeout=-1)
    with pytest.raises(ValueError):
        await conn.brpop_many("q", count=0, timeout=1)
    assert await conn.ping() == b"PONG"


@pytest.mark.requires_server("7.0")  # BLMPOP; a Node falls back to BRPOP+RPOP before it
async def test_brpop_many_takes_up_to_count_oldest_first(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    conn = await open_conn(clean_redis.url)
    assert await conn.lpush("q", "first", "second", "third") == 3
    assert await conn.brpop_many("other", "q", count=2, timeout=1) == (
        b"q",
        [b"first", b"second"],
    )
    assert await conn.brpop_many("q", count=5, timeout=1) == (b"q", [b"third"])
    assert await asyncio.wait_for(conn.brpop_many("q", count=5, timeout=0.1), 2) is None
    assert not conn.is_closed


@pytest.mark.parametrize(
    "reply",
    [
        b"*2\r\n$1\r\nq\r\n*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n",
        b"*2\r\n$1\r\nq\r\n:1\r\n",
        b"*2\r\n$1\r\nq\r\n*2\r\n$1\r\na\r\n:7\r\n",
    ],
    ids=["more-than-count", "not-a-list", "a-value-not-bytes"],
)
async def test_brpop_many_refuses_a_reply_it_did_not_ask_for(
    open_conn: Opener, reply: bytes
) -> None:
    async with FakeRedis(answer_first_command_with(reply)) as fake:
        conn = await open_conn(fake.url)
        with pytest.raises(ProtocolError):
            await asyncio.wait_for(conn.brpop_many("q", count=2, timeout=1), 2)
        assert conn.is_closed


# -- sharing and cancellation -----------------------------------------------------------------


async def test_many_tasks_share_one_connection(clean_redis: RedisServer, open_conn: Opener) -> None:
    conn = await open_conn(clean_redis.url)

    async def worker(i: int) -> bytes:
        assert await conn.execute("SET", f"k{i}", f"v{i}") == b"OK"
        await asyncio.sleep(0)
        value: bytes = await conn.execute("GET", f"k{i}")
        return value

    results = await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(100))), 5)
    assert results == [f"v{i}".encode() for i in range(100)]


@pytest.mark.parametrize("yields", [1, 3])
async def test_cancelled_commands_do_not_shift_replies(
    clean_redis: RedisServer, open_conn: Opener, yields: int
) -> None:
    conn = await open_conn(clean_redis.url)
    n = 200
    await conn.execute("MSET", *(x for i in range(n) for x in (f"c{i}", f"value-{i}")))
    tasks = [asyncio.create_task(conn.execute("GET", f"c{i}")) for i in range(n)]
    for _ in range(yields):
        await asyncio.sleep(0)
    for i in range(0, n, 3):
        tasks[i].cancel()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    for i, result in enumerate(results):
        if i % 3 == 0:
            # Cancelled before its reply arrived (or, rarely, just after: then it is its own).
            assert isinstance(result, asyncio.CancelledError) or result == f"value-{i}".encode()
        else:
            assert result == f"value-{i}".encode(), i
    assert not conn.is_closed
    assert await conn.execute("GET", "c7") == b"value-7"
    again = await asyncio.gather(*(conn.execute("GET", f"c{i}") for i in range(0, n, 3)))
    assert again == [f"value-{i}".encode() for i in range(0, n, 3)]


async def test_callers_cancelled_at_random_points_of_split_replies_never_shift_replies(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    """A bounded randomized loop: commands of every non-blocking kind (``execute``,
    ``pipeline``, ``lpush``, ``publish``, ``ping``, ``send_packed``, ``send_packed_to``) issued
    together and cancelled at random moments (before their write is flushed, while their
    reply is on its way, with replies split over many reads by a throttled proxy). Every
    caller that was not cancelled gets its own reply, and the connection serves on."""
    rng = random.Random(20261202)
    with FaultProxy(clean_redis.port) as proxy:
        conn = await open_conn(proxy.url())
        for round_ in range(40):
            if round_ % 3 == 2:
                proxy.throttle(down=rng.choice([200_000, 800_000]))
            calls: list[tuple[object, asyncio.Future[Any]]] = []
            for index in range(rng.randint(1, 8)):
                token = b"r%d-%d-" % (round_, index) + b"x" * rng.choice([0, 10, 3000, 20_000])
                kind = rng.randrange(7)
                if kind == 0:
                    calls.append((token, asyncio.ensure_future(conn.execute("ECHO", token))))
                elif kind == 1:
                    tokens = [token + b"%d" % k for k in range(rng.randint(1, 3))]
                    packed = [pack_command("ECHO", t) for t in tokens]
                    calls.append((tokens, asyncio.ensure_future(conn.pipeline(*packed))))
                elif kind == 2:
                    key = f"cancel-{round_}-{index}"
                    calls.append((2, asyncio.ensure_future(conn.lpush(key, b"a", b"b"))))
                elif kind == 3:
                    calls.append((0, asyncio.ensure_future(conn.publish("nobody", token))))
                elif kind == 4:
                    calls.append((b"PONG", asyncio.ensure_future(conn.ping())))
                elif kind == 5:
                    calls.append((token, conn.send_packed(pack_command("ECHO", token))))
                else:
                    future = asyncio.get_running_loop().create_future()
                    conn.send_packed_to(
                        pack_command("ECHO", token),
                        lambda reply, f=future: None if f.done() else f.set_result(reply),
                    )
                    calls.append((token, future))
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(rng.choice([0, 0, 0.001, 0.005]))
                rng.choice(calls)[1].cancel()
            results = await asyncio.wait_for(
                asyncio.gather(*(call for _, call in calls), return_exceptions=True), 30
            )
            for (wanted, _), result in zip(calls, results, strict=True):
                if not isinstance(result, asyncio.CancelledError):
                    assert result == wanted, (round_, wanted, result)
            proxy.resume()
            assert not conn.is_closed
            assert await conn.execute("ECHO", b"after-%d" % round_) == b"after-%d" % round_


async def test_cancel_command_waiting_behind_brpop(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    conn = await open_conn(clean_redis.url)
    await conn.execute("MSET", "wrong", "reply-of-the-cancelled-get", "right", "expected")
    pop = asyncio.create_task(conn.brpop("empty", timeout=0.3))
    get = asyncio.create_task(conn.execute("GET", "wrong"))
    await asyncio.sleep(0.05)
    assert not get.done()
    get.cancel()
    with pytest.raises(asyncio.CancelledError):
        await get
    assert await asyncio.wait_for(pop, 2) is None
    assert not conn.is_closed
    assert await asyncio.wait_for(conn.execute("GET", "right"), 2) == b"expected"
    assert await conn.ping() == b"PONG"


@pytest.mark.parametrize(
    "command", ["brpop", pytest.param("brpop_many", marks=pytest.mark.requires_server("7.0"))]
)
async def test_cancelled_brpop_closes_connection_and_leaves_item(
    clean_redis: RedisServer, open_conn: Opener, command: str
) -> None:
    # brpop and brpop_many return the coroutine that does the work (no coroutine of their
    # own): cancelling the task that awaits it still closes the connection.
    blocked = await open_conn(clean_redis.url)
    other = await open_conn(clean_redis.url)
    if command == "brpop":
        pop = asyncio.create_task(blocked.brpop("jobs", timeout=5))
    else:
        pop = asyncio.create_task(blocked.brpop_many("jobs", count=2, timeout=5))

    def blocked_clients() -> int:
        info = clean_redis.command("INFO", "clients")
        assert isinstance(info, bytes)
        for line in info.decode().splitlines():
            if line.startswith("blocked_clients:"):
                return int(line.split(":")[1])
        raise AssertionError("no blocked_clients in INFO")

    await eventually(lambda: blocked_clients() == 1, 2)
    pop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pop
    assert blocked.is_closed
    reason = await asyncio.wait_for(blocked.wait_closed(), 1)
    assert isinstance(reason, RedisConnectionError)
    with pytest.raises(RedisConnectionError):
        await blocked.ping()
    await eventually(lambda: blocked_clients() == 0, 2)  # Redis noticed the hang-up
    assert await other.lpush("jobs", "job-1") == 1
    await asyncio.sleep(0.05)
    assert await other.execute("LLEN", "jobs") == 1
    assert await other.execute("LRANGE", "jobs", 0, -1) == [b"job-1"]


async def test_a_blocking_pop_cancelled_while_its_write_waits_closes_the_connection(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    """A pop cancelled while the socket is backlogged has still been handed to the transport:
    once the link moves again Redis runs it, and it would hold the connection (every later
    command queued behind a pop nobody awaits) for its whole server timeout."""
    with FaultProxy(clean_redis.port) as proxy:
        conn = await open_conn(proxy.url())
        assert await conn.ping() == b"PONG"
        proxy.stall(up=True, down=False)
        # Far more than the proxy and the kernel's buffers hold: the transport backs up.
        big = conn.send_packed(pack_command("SET", "big", b"x" * (32 * 1024 * 1024)))
        big.add_done_callback(lambda done: done.cancelled() or done.exception())
        pop = asyncio.create_task(conn.execute("BLPOP", "empty", 0, blocking=True))
        await asyncio.sleep(0.1)
        assert not pop.done(), "the write did not back up: nothing was tested"
        pop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pop
        proxy.resume()
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(conn.ping(), 5)
        assert conn.is_closed


# -- losing the server, closing ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_server_stop_fails_pending_command(
    redis_server: RedisServer, open_conn: Opener, how: str
) -> None:
    conn = await open_conn(redis_server.url)
    idle = await open_conn(redis_server.url)
    pop = asyncio.create_task(conn.brpop("k", timeout=5))
    # The pop waits at Redis (not merely sent) when the server goes.
    assert await poll(lambda: any("b" in c["flags"] for c in client_list(redis_server)), 5)
    start = time.monotonic()
    getattr(redis_server, how)()
    with pytest.raises(RedisConnectionError) as info:
        await asyncio.wait_for(pop, 2)
    assert time.monotonic() - start < 2
    assert str(redis_server.port) in str(info.value)
    assert conn.is_closed
    reason = await asyncio.wait_for(idle.wait_closed(), 2)
    assert isinstance(reason, RedisConnectionError)
    assert idle.is_closed
    with pytest.raises(RedisConnectionError):
        await idle.ping()
    redis_server.start()
    fresh = await open_conn(redis_server.url)
    assert await fresh.ping() == b"PONG"


async def test_connect_refused(redis_server: RedisServer, parser: str) -> None:
    redis_server.stop()
    with pytest.raises(RedisConnectionError) as info:
        await asyncio.wait_for(connect(redis_server.url, parser=parser), 5)
    assert f"127.0.0.1:{redis_server.port}" in str(info.value)


async def test_close_is_idempotent(clean_redis: RedisServer, open_conn: Opener) -> None:
    conn = await open_conn(clean_redis.url)
    assert await conn.ping() == b"PONG"
    await asyncio.wait_for(conn.close(), 2)
    assert conn.is_closed
    await asyncio.wait_for(conn.close(), 2)
    with pytest.raises(RedisConnectionError):
        await conn.ping()
    with pytest.raises(RedisConnectionError):
        await conn.execute("GET", "k")
    reason = await asyncio.wait_for(conn.wait_closed(), 1)
    assert isinstance(reason, RedisConnectionError)


async def test_close_fails_pending_commands(clean_redis: RedisServer, open_conn: Opener) -> None:
    conn = await open_conn(clean_redis.url)
    pop = asyncio.create_task(conn.brpop("k", timeout=5))
    behind = asyncio.create_task(conn.ping())
    await asyncio.sleep(0.05)
    await asyncio.wait_for(conn.close(), 2)
    for task in (pop, behind):
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(task, 1)


# -- malformed replies (fake servers) ---------------------------------------------------------


def answer_first_command_with(data: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_command(reader) is not None
        writer.write(data)
        await writer.drain()
        await drain_until_eof(reader)

    return handler


@pytest.mark.parametrize(
    "garbage",
    [b"?garbage\r\n", b":12x\r\n", b"*-5\r\n"],
    ids=["unknown-type", "bad-integer", "bad-array-length"],
)
async def test_malformed_reply_closes_connection(
    open_conn: Opener, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeRedis(answer_first_command_with(garbage)) as fake:
        conn = await open_conn(fake.url)
        waiting = [asyncio.create_task(conn.execute("GET", "k")) for _ in range(3)]
        for task in waiting:
            with pytest.raises(ProtocolError):
                await asyncio.wait_for(task, 2)
        assert conn.is_closed
        reason = await asyncio.wait_for(conn.wait_closed(), 1)
        assert isinstance(reason, ProtocolError)
        with pytest.raises(ProtocolError):
            await conn.ping()
    assert "malformed reply" in caplog.text


@pytest.mark.parametrize("kind", [b"*", b"~", b"%", b">"])
async def test_reply_announcing_two_billion_elements_closes_connection(
    open_conn: Opener, kind: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # Fourteen bytes that hiredis would take for a list of 2^31 slots (16 GiB): both parsers
    # refuse the header itself, the connection fails at once and nothing that size is made.
    async with FakeRedis(answer_first_command_with(kind + b"2147483647\r\n")) as fake:
        conn = await open_conn(fake.url)
        with pytest.raises(ProtocolError):
            await asyncio.wait_for(conn.execute("LRANGE", "k", 0, -1), 5)
        reason = await asyncio.wait_for(conn.wait_closed(), 1)
        assert isinstance(reason, ProtocolError)
        assert "limit" in str(reason)
    assert "malformed reply" in caplog.text


async def test_oversize_bulk_reply_closes_connection(open_conn: Opener) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_command(reader) is not None
        writer.write(b"$99999999999\r\n")
        # The python parser refuses the header at once; hiredis does not look at the
        # announced length and is bounded by the bytes it holds (64 MiB), so keep sending.
        chunk = b"x" * (1 << 20)
        for _ in range(200):
            if writer.is_closing():
                return
            writer.write(chunk)
            await writer.drain()
        await drain_until_eof(reader)

    async with FakeRedis(handler) as fake:
        conn = await open_conn(fake.url)
        with pytest.raises(ProtocolError):
            await asyncio.wait_for(conn.execute("GET", "big"), 5)
        assert conn.is_closed


async def test_unsolicited_reply_closes_connection(open_conn: Opener) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+SURPRISE\r\n")
        await writer.drain()
        await drain_until_eof(reader)

    async with FakeRedis(handler) as fake:
        conn = await open_conn(fake.url)
        reason = await asyncio.wait_for(conn.wait_closed(), 2)
        assert isinstance(reason, ProtocolError)
        assert conn.is_closed
        with pytest.raises(ProtocolError):
            await conn.ping()


async def test_server_hangs_up_mid_reply(open_conn: Opener) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_command(reader) is not None
        writer.write(b"$10\r\nhalf")
        await writer.drain()
        writer.close()

    async with FakeRedis(handler) as fake:
        conn = await open_conn(fake.url)
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(conn.execute("GET", "k"), 2)
        assert conn.is_closed


# -- transports -------------------------------------------------------------------------------


async def test_unix_socket(clean_redis: RedisServer, open_conn: Opener) -> None:
    conn = await open_conn(clean_redis.unix_url)
    assert conn.params.unix_socket == clean_redis.unix_socket
    assert await conn.ping() == b"PONG"
    await conn.execute("SET", "via-unix", "1")
    assert clean_redis.command("GET", "via-unix") == b"1"
    db2 = await open_conn(clean_redis.unix_url.replace("?db=0", "?db=2"))
    assert await db2.execute("GET", "via-unix") is None


def _send_buffer_cap() -> int:
    """The largest send buffer the system grants a socket (Linux' ``net.core.wmem_max``), or 0
    where it cannot be read."""
    try:
        return int(Path("/proc/sys/net/core/wmem_max").read_text())
    except (OSError, ValueError):
        return 0


@pytest.mark.skipif(
    _send_buffer_cap() < 2 * 1024 * 1024,
    reason="the system caps a socket's send buffer under 2 MiB (net.core.wmem_max)",
)
async def test_unix_socket_takes_a_body_piece_in_one_write(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    # A PUBLISH of a 1 MiB body piece goes into a unix socket whole, as over loopback TCP:
    # nothing is left for the transport to copy into its buffer and send in several more writes
    # (the system's default send buffer, 208 KiB on Linux, took a fifth of it).
    conn = await open_conn(clean_redis.unix_url)
    assert await conn.ping() == b"PONG"
    reply = conn.send_packed(pack_command_parts("PUBLISH", "nobody", b"x" * (1024 * 1024)))
    assert conn._writer.transport.get_write_buffer_size() == 0  # type: ignore[union-attr]
    assert await reply == 0


async def test_unix_socket_with_password(redis_factory: RedisFactory, open_conn: Opener) -> None:
    server = redis_factory(password=PASSWORD)
    conn = await open_conn(server.unix_url)
    assert await conn.ping() == b"PONG"


async def test_tls(redis_factory: RedisFactory, open_conn: Opener) -> None:
    server = redis_factory(tls=True)
    conn = await open_conn(server.tls_url, ssl=server.ssl_context())
    assert await conn.ping() == b"PONG"
    await conn.execute("SET", "over-tls", "yes")
    assert await conn.execute("GET", "over-tls") == b"yes"
    popped = await conn.brpop("empty", timeout=0.1)
    assert popped is None


async def test_tls_with_password(redis_factory: RedisFactory, open_conn: Opener) -> None:
    server = redis_factory(tls=True, password=PASSWORD)
    conn = await open_conn(server.tls_url, ssl=server.ssl_context())
    assert await conn.ping() == b"PONG"


async def test_tls_untrusted_certificate_is_refused(
    redis_factory: RedisFactory, parser: str
) -> None:
    server = redis_factory(tls=True)
    with pytest.raises(RedisConnectionError):
        # The system's default trust does not know the throwaway CA.
        await asyncio.wait_for(connect(server.tls_url, parser=parser), 5)


# -- repr ---------------------------------------------------------------------------------------


async def test_repr_hides_password(redis_factory: RedisFactory, open_conn: Opener) -> None:
    server = redis_factory(password=PASSWORD)
    conn = await open_conn(server.url)
    for text in (repr(conn), str(conn), repr(conn.params), str(conn.params)):
        assert PASSWORD not in text
        assert "s3cr%3At%40x" not in text
    assert f"127.0.0.1:{server.port}" in repr(conn)
    await conn.close()
    assert PASSWORD not in repr(conn)


# -- Client -------------------------------------------------------------------------------------


async def test_client_reconnects(redis_server: RedisServer, parser: str) -> None:
    client = Client(make_params(redis_server.url), parser=parser, min_backoff=0.02, max_backoff=0.2)
    client.start()
    try:
        await client.wait_connected(2)
        assert client.connected
        assert await client.execute("PING") == b"PONG"
        assert await client.lpush("q", "x") == 1

        redis_server.stop()

        def unreachable() -> bool:
            try:
                client.connection()
            except RedisConnectionError:
                return True
            return False

        await eventually(unreachable, 1)
        assert not client.connected
        with pytest.raises(RedisConnectionError) as info:
            await client.execute("PING")
        assert f"127.0.0.1:{redis_server.port}" in str(info.value)
        await asyncio.sleep(0.3)  # let a few reconnection attempts fail
        assert not client.connected

        redis_server.start()
        await client.wait_connected(3)
        assert await client.execute("PING") == b"PONG"
        assert await client.publish("nobody-listens", "x") == 0
    finally:
        await asyncio.wait_for(client.close(), 2)
    assert not client.connected
    with pytest.raises(RedisConnectionError):
        client.connection()
    await asyncio.wait_for(client.close(), 2)


async def test_client_with_password_hides_it(redis_factory: RedisFactory, parser: str) -> None:
    server = redis_factory(password=PASSWORD)
    client = Client(make_params(server.url), parser=parser)
    try:
        conn = await client.wait_connected(2)
        assert await conn.ping() == b"PONG"
        assert PASSWORD not in repr(client)
    finally:
        await asyncio.wait_for(client.close(), 2)


async def test_client_wrong_password(redis_factory: RedisFactory, parser: str) -> None:
    server = redis_factory(password=PASSWORD)
    secret = "client-wrong-pw"
    params = make_params(f"redis://127.0.0.1:{server.port}", password=secret)
    client = Client(params, parser=parser, min_backoff=0.02, max_backoff=0.05)
    client.start()
    try:
        await eventually(lambda: isinstance(client.last_error, AuthenticationError), 2)
        with pytest.raises(RedisConnectionError) as info:
            client.connection()
        assert secret not in str(info.value)
        assert secret not in repr(client)
        assert secret not in str(client.last_error)
        # Refused from the start: a configuration error, raised instead of waited out.
        with pytest.raises(AuthenticationError) as refused:
            await client.wait_connected(0.2)
        assert secret not in str(refused.value)
    finally:
        await asyncio.wait_for(client.close(), 2)


async def test_commands_sent_without_waiting(clean_redis: RedisServer, parser: str) -> None:
    """send_packed returns the raw reply future; Client.publish_soon/lpush_soon settle theirs
    from the reply: receivers counted (errors as 0), LPUSH values kept in FIFO order."""
    from minidasgi.resp.client import Client
    from minidasgi.resp.connection import make_params
    from minidasgi.resp.protocol import ReplyError, pack_command

    conn = await connect(clean_redis.url, parser=parser)
    try:
        ok = conn.send_packed(pack_command("SET", "k", "v"))
        wrong = conn.send_packed(pack_command("LPUSH", "k", "x"))  # WRONGTYPE: a value
        assert await asyncio.wait_for(ok, 5) == b"OK"
        assert isinstance(await asyncio.wait_for(wrong, 5), ReplyError)
    finally:
        await conn.close()
    client = Client(make_params(clean_redis.url), parser=parser)
    try:
        await client.wait_connected(5)
        assert await asyncio.wait_for(client.lpush_soon("q", [b"first", b"second"]), 5) == 2
        assert clean_redis.command("RPOP", "q") == b"first"
        with pytest.raises(ReplyError):
            await asyncio.wait_for(client.lpush_soon("k", [b"x"]), 5)
        assert await asyncio.wait_for(client.publish_soon("nobody", b"hi"), 5) == 0
    finally:
        await client.close()
    assert await client.publish_soon("nobody", b"hi") == 0  # unreachable counts as nobody


async def test_commands_sent_to_callbacks(
    clean_redis: RedisServer, parser: str, caplog: pytest.LogCaptureFixture
) -> None:
    """send_packed_to hands each reply to its callback, once and in order, from the code that
    reads it (an error reply as a value); a callback that raises is logged and the connection
    goes on; a lost connection hands its error to exactly the callbacks still waiting."""
    from minidasgi.resp.protocol import pack_command

    conn = await connect(clean_redis.url, parser=parser)
    try:
        seen: list[object] = []

        def broken(reply: object) -> None:
            seen.append(reply)
            raise RuntimeError("a caller's bug")

        conn.send_packed_to(pack_command("SET", "k", "v"), seen.append)
        conn.send_packed_to(pack_command("LPUSH", "k", "x"), seen.append)  # WRONGTYPE
        conn.send_packed_to(pack_command("PING"), broken)
        assert await asyncio.wait_for(conn.execute("GET", "k"), 5) == b"v"
        assert seen[0] == b"OK" and isinstance(seen[1], ReplyError) and seen[2] == b"PONG"
        assert len(seen) == 3 and "a reply callback failed" in caplog.text
        blocked: list[object] = []
        conn.send_packed_to(pack_command("BLPOP", "nothing", "0"), blocked.append)
        conn.fail(RedisConnectionError("given up"))
        assert len(blocked) == 1 and isinstance(blocked[0], RedisConnectionError)
        assert len(seen) == 3  # those answered are not called again
        with pytest.raises(RedisConnectionError):
            conn.send_packed_to(pack_command("PING"), seen.append)
        assert len(seen) == 3
    finally:
        await conn.close()


@pytest.mark.requires_server("7.0")  # BLMPOP
async def test_a_repeated_blmpop_is_packed_once(
    clean_redis: RedisServer, open_conn: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    from minidasgi.resp import connection as connection_module

    conn = await open_conn(clean_redis.url)
    packed: list[tuple[object, ...]] = []
    pack_command = connection_module.pack_command

    def counted(*args: object) -> bytes:
        packed.append(args)
        return pack_command(*args)

    monkeypatch.setattr(connection_module, "pack_command", counted)
    await conn.execute("RPUSH", "q", "a", "b", "c", "d")
    assert await conn.brpop_many("q", count=1, timeout=1) == (b"q", [b"d"])
    assert await conn.brpop_many("q", count=1, timeout=1) == (b"q", [b"c"])  # as packed
    assert await conn.brpop_many("q", count=1, timeout=1.0) == (b"q", [b"b"])  # "1.0": anew
    assert await conn.brpop_many("q", count=2, timeout=1.0) == (b"q", [b"a"])
    blmpops = [args for args in packed if args[0] == "BLMPOP"]
    # Each pop packed the command afresh before: four here.
    assert blmpops == [
        ("BLMPOP", 1, 1, "q", "RIGHT", "COUNT", 1),
        ("BLMPOP", 1.0, 1, "q", "RIGHT", "COUNT", 1),
        ("BLMPOP", 1.0, 1, "q", "RIGHT", "COUNT", 2),
    ]


async def test_a_connection_reset_just_after_its_accept_fails_as_a_connection_error(
    redis_server: RedisServer,
) -> None:
    # A reset can end the connection before the client has set its socket up (setsockopt then
    # fails with EBADF: the transport closed the socket already). The caller, whose retries
    # expect RedisConnectionError, once got that raw OSError instead.
    opened = 0
    with FaultProxy(redis_server.port) as proxy:
        proxy.reset_new(300)
        for _ in range(300):
            try:
                connection = await connect(proxy.url(), connect_timeout=5)
            except RedisConnectionError:
                continue
            opened += 1  # the reset came after the connection was set up
            await connection.close()
        # The proxy's thread accepts some of them after they were used.
        assert await poll(lambda: proxy.resets == 300, 5), proxy.resets
    assert opened < 300


# -- the path of a read and of a write, per event loop -------------------------------------

# What a read or a write of ours passed through before it reached the reply parser or the
# transport: StreamReaderProtocol's data_received (uvloop hands an asyncio.Protocol its reads
# as bytes, never through get_buffer), its weak reference to the reader and the reader's
# feed_data; StreamWriter.write and its transport property.
_DETOURS = {
    "StreamReaderProtocol.data_received",
    "StreamReaderProtocol._stream_reader",
    "ReplyReader.feed_data",
    "StreamWriter.write",
    "StreamWriter.transport",
}


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_reads_and_writes_go_straight_between_the_transport_and_the_parser(
    clean_redis: RedisServer, loop_kind: str
) -> None:
    from minidasgi.resp import Subscriber

    called: set[str] = set()

    def profile(frame: Any, event: str, _: Any) -> None:
        if event == "call":
            called.add(frame.f_code.co_qualname)

    async def scenario() -> list[bytes]:
        got: list[bytes] = []
        conn = await connect(clean_redis.url)
        subscriber = Subscriber(clean_redis.url, on_message=lambda _c, data: got.append(data))
        try:
            await asyncio.wait_for(subscriber.subscribe("ch"), 5)
            assert await conn.ping() == b"PONG"  # both connections up and used once
            sys.setprofile(profile)
            try:
                for index in range(3):
                    assert await conn.publish("ch", b"m%d" % index) == 1
                    assert await conn.execute("GET", "missing") is None
                assert await poll(lambda: len(got) == 3, 5)
            finally:
                sys.setprofile(None)
        finally:
            await subscriber.close()
            await conn.close()
        return got

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(scenario()) == [b"m0", b"m1", b"m2"]
    finally:
        loop.close()
    assert "Connection._on_data" in called  # the profile saw the reads
    assert not called & _DETOURS, sorted(called & _DETOURS)


async def test_commands_refused_by_a_closed_connection_say_they_were_never_sent(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    """A command sent after the connection was closed is refused before anything is written
    (``unsent``: the distributor may push such an LPUSH again); one written before the close
    and left unanswered is not (it may have run)."""
    conn = await open_conn(clean_redis.url)
    outcomes: list[Any] = []
    # Written, then left unanswered: BLPOP blocks, and the server closes the connection.
    conn.send_packed_to(pack_command("BLPOP", "nothing", 0), outcomes.append)
    await eventually(lambda: any(c["cmd"] == "blpop" for c in client_list(clean_redis)), 5)
    clean_redis.command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    await eventually(lambda: bool(outcomes), 5)
    (written,) = outcomes
    assert isinstance(written, RedisConnectionError) and not written.unsent
    with pytest.raises(RedisConnectionError) as refused:
        conn.send_packed_to(pack_command("LPUSH", "k", "v"), outcomes.append)
    assert refused.value.unsent
    assert len(outcomes) == 1  # no callback for the refused command
    assert clean_redis.command("LLEN", "k") == 0
