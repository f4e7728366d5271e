"""Connection.pipeline: several commands in one write, replies in order, cancellation safe."""

from __future__ import annotations

import asyncio
import socket
import tracemalloc
from collections.abc import Awaitable, Callable

from minidasgi.resp import ReplyError
from minidasgi.resp.connection import Connection
from minidasgi.resp.protocol import pack_command, pack_command_parts

from .faultproxy import FaultProxy
from .redis_server import RedisServer

Opener = Callable[..., Awaitable[Connection]]


async def test_replies_in_order_with_errors_in_place(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    conn = await open_conn(clean_redis.url)
    replies = await conn.pipeline(
        pack_command("SET", "k", "v"),
        pack_command("LPUSH", "k", "x"),  # WRONGTYPE: returned, not raised
        pack_command("GET", "k"),
    )
    assert replies[0] == b"OK"
    assert isinstance(replies[1], ReplyError) and "WRONGTYPE" in str(replies[1])
    assert replies[2] == b"v"
    assert await conn.execute("PING") == b"PONG"


async def test_a_cancelled_pipeline_does_not_shift_later_replies(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    conn = await open_conn(clean_redis.url)
    await conn.execute("MSET", "a", "reply-of-the-cancelled", "b", "expected")
    blocker = asyncio.ensure_future(conn.execute("BLPOP", "nothing", 0.3, blocking=True))
    await asyncio.sleep(0.05)  # the pipeline's replies now wait behind the BLPOP
    pipeline = asyncio.ensure_future(
        conn.pipeline(pack_command("GET", "a"), pack_command("GET", "a"))
    )
    await asyncio.sleep(0.05)
    pipeline.cancel()
    assert await conn.execute("GET", "b") == b"expected"
    assert await blocker is None


async def test_gathered_commands_arrive_whole_and_in_order_when_the_socket_backs_up(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    # Large values given as parts (memoryviews, not copied on their way) are gathered into a
    # reused scratch buffer: while Redis does not read, the transport holds what it could not
    # send, and no later write may overwrite it.
    bodies = [bytes([65 + i]) * (2 << 20) + bytes([i]) for i in range(6)]
    with FaultProxy(clean_redis.port) as proxy:
        conn = await open_conn(proxy.url())
        assert await conn.execute("PING") == b"PONG"  # the proxy has accepted it by now
        # Small socket buffers on both ends (no autotuning): the stalled link backs up soon.
        (proxied,) = proxy.connections()
        proxied.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        assert conn._writer is not None
        sock = conn._writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        proxy.stall(up=True, down=False)
        replies = [
            conn.send_packed(pack_command_parts("SET", f"k{i}", [b"<", memoryview(body), b">"]))
            for i, body in enumerate(bodies)
        ]
        await asyncio.sleep(0.1)  # the next loop turns flush while the socket is full
        assert conn._writer.transport.get_write_buffer_size() > 0  # it really backed up
        proxy.resume()
        assert await asyncio.wait_for(asyncio.gather(*replies), 10) == [b"OK"] * 6
        for i, body in enumerate(bodies):
            assert await conn.execute("GET", f"k{i}") == b"<" + body + b">"


async def test_large_gathered_writes_reuse_one_scratch_buffer(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    # A fresh buffer per large write costs page faults (the allocator hands large blocks back
    # to the system): a connection whose writes go through at once copies into the same one.
    conn = await open_conn(clean_redis.url)
    conn._fileno = -1  # as on a transport whose socket is not written directly (TLS, uvloop)
    body = memoryview(b"v" * 200_000)
    scratches = set()
    for i in range(5):
        assert await conn.send_packed(pack_command_parts("SET", f"s{i}", [body])) == b"OK"
        assert conn._scratch is not None
        scratches.add(id(conn._scratch))
    assert len(scratches) == 1
    assert await conn.execute("STRLEN", "s4") == 200_000


async def test_a_large_gathered_write_copies_each_value_once(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    # Gathering into the scratch buffer must copy a value straight in: a bytearray's slice
    # assignment first copies a bytes value into a temporary bytearray of its size (CPython
    # up to 3.12), which showed as a second copy of every body piece a Node published.
    conn = await open_conn(clean_redis.url)
    conn._fileno = -1  # as on a transport whose socket is not written directly (TLS, uvloop)
    body = b"v" * 300_000
    parts = [b"<", body, memoryview(b"w" * 100_000).cast("c"), b">"]  # any 1-byte format
    conn._scratch = bytearray(500_000)  # as left by an earlier write of this size
    write = conn._write
    peaks: list[int] = []

    def measured_write(data: bytes | memoryview) -> None:
        peaks.append(tracemalloc.get_traced_memory()[1])  # what gathering allocated
        write(data)

    conn._write = measured_write  # type: ignore[method-assign]
    tracemalloc.start()
    try:
        reply = conn.send_packed(pack_command_parts("SET", "big", parts))
    finally:
        tracemalloc.stop()
        conn._write = write  # type: ignore[method-assign]
    assert await reply == b"OK"
    assert peaks and max(peaks) < 50_000, peaks  # no temporary copy of a value
    assert await conn.execute("GET", "big") == b"<" + body + b"w" * 100_000 + b">"


async def test_a_large_gathered_write_goes_from_its_parts_to_the_socket(
    clean_redis: RedisServer, open_conn: Opener
) -> None:
    # On a plain socket with nothing buffered, the parts are written with one writev: no
    # scratch buffer, no join, no copy of a value in Python.
    conn = await open_conn(clean_redis.url)
    body = b"v" * 300_000
    parts = [b"<", body, memoryview(b"w" * 100_000).cast("c"), b">"]
    tracemalloc.start()
    try:
        reply = conn.send_packed(pack_command_parts("SET", "big", parts))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert await reply == b"OK"
    assert peak < 50_000, peak
    assert conn._scratch is None and conn._fileno >= 0
    assert await conn.execute("GET", "big") == b"<" + body + b"w" * 100_000 + b">"
