"""A batch's future is shared by every request whose message travels in it: a request
cancelled while it waits for the reply must not cancel it for the others (they would fail
though their command went through, a Node's jobs taking the distributor for gone)."""

from __future__ import annotations

import asyncio
import contextlib
import gc

from minidasgi import wire
from minidasgi.admission import Admission
from minidasgi.outbox import Outbox
from minidasgi.resp import connect
from minidasgi.resp.client import Client
from minidasgi.resp.connection import parse_url
from minidasgi.testing import RedisServer


async def test_a_cancelled_pusher_leaves_the_others_of_its_batch_their_answer(
    clean_redis: RedisServer,
) -> None:
    connection = await connect(clean_redis.url)
    try:
        admission = Admission(channel_prefix="p", db=0, fail_fast=True)
        pushes = [asyncio.ensure_future(admission.push(connection, "k", b"e")) for _ in range(3)]
        await asyncio.sleep(0)  # all three wait for the batch's reply now
        pushes[0].cancel()
        outcomes = await asyncio.gather(*pushes, return_exceptions=True)
        assert isinstance(outcomes[0], asyncio.CancelledError)
        # Nobody listens on the presence channel: fail-fast refuses the other two.
        assert outcomes[1:] == ["no_node", "no_node"], outcomes
        assert clean_redis.command("LLEN", "k") == 3  # the batch went through whole
    finally:
        await connection.close()


async def test_a_cancelled_publisher_leaves_the_others_of_its_batch_their_count(
    clean_redis: RedisServer,
) -> None:
    client = Client(parse_url(clean_redis.url), name="test")
    client.start()
    try:
        await client.wait_connected(5)
        outbox = Outbox(lambda: client)
        message = wire.pack(wire.GONE, "r", "x")
        publishes = [asyncio.ensure_future(outbox.publish("c", message)) for _ in range(2)]
        await asyncio.sleep(0)
        publishes[0].cancel()
        outcomes = await asyncio.gather(*publishes, return_exceptions=True)
        assert isinstance(outcomes[0], asyncio.CancelledError)
        assert outcomes[1] == 0, outcomes  # nobody subscribes: a count, not a cancellation
    finally:
        await client.close()


async def test_a_failed_batch_whose_only_pusher_was_cancelled_is_not_reported_lost(
    clean_redis: RedisServer,
) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    connection = await connect(clean_redis.url)
    try:
        admission = Admission(channel_prefix="p", db=0, fail_fast=True)
        push = asyncio.ensure_future(admission.push(connection, "k", b"e"))
        await asyncio.sleep(0)  # sent; waiting for the reply
        push.cancel()
        connection.fail(ConnectionError("the link died"))  # the batch fails
        with contextlib.suppress(asyncio.CancelledError):
            await push
        del push
        await asyncio.sleep(0)
        gc.collect()
        assert reported == []
    finally:
        loop.set_exception_handler(handler)
        await connection.close()
