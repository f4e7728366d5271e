"""Connection.pipeline: several commands in one write, replies in order, cancellation safe."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from minidasgi.resp import ReplyError
from minidasgi.resp.connection import Connection
from minidasgi.resp.protocol import pack_command

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
