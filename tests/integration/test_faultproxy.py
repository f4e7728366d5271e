"""The tests' fault-injecting proxy does what the fault tests rely on."""

from __future__ import annotations

import asyncio

import pytest

from minidasgi.resp import connect

from .faultproxy import FaultProxy
from .redis_server import RedisServer

pytestmark = pytest.mark.timeout(30)


async def test_relays_stalls_resumes_and_resets(clean_redis: RedisServer) -> None:
    with FaultProxy(clean_redis.port) as proxy:
        conn = await connect(proxy.url())
        try:
            assert await conn.ping() == b"PONG"
            assert len(proxy.connections()) == 1
            proxy.stall(up=False, down=True)
            pending = asyncio.ensure_future(conn.execute("SET", "k", "v"))
            await asyncio.sleep(0.3)
            assert not pending.done()
            assert clean_redis.command("GET", "k") == b"v"  # the command went through
            proxy.resume()
            assert await asyncio.wait_for(pending, 5) == b"OK"

            proxy.stall(up=True, down=False)
            pending = asyncio.ensure_future(conn.execute("SET", "k", "w"))
            await asyncio.sleep(0.3)
            assert clean_redis.command("GET", "k") == b"v"  # held back on the way in
            other = await connect(proxy.url())  # a new flow is not stalled
            assert await other.ping() == b"PONG"
            await other.close()
            proxy.resume()
            assert await asyncio.wait_for(pending, 5) == b"OK"
            assert clean_redis.command("GET", "k") == b"w"

            upstream = proxy.connections()[0].upstream_port
            clients = clean_redis.command("CLIENT", "LIST")
            assert isinstance(clients, bytes) and f":{upstream} ".encode() in clients
            proxy.connection_to(upstream).reset()
            assert await asyncio.wait_for(conn.wait_closed(), 5) is not None
        finally:
            await conn.close()


async def test_stall_new_blackholes_new_connections(clean_redis: RedisServer) -> None:
    with FaultProxy(clean_redis.port) as proxy:
        proxy.stall(stall_new=True)
        conn = await connect(proxy.url())
        try:
            pending = asyncio.ensure_future(conn.ping())
            await asyncio.sleep(0.3)
            assert not pending.done()
            proxy.resume()
            assert await asyncio.wait_for(pending, 5) == b"PONG"
        finally:
            await conn.close()


async def test_bytes_held_by_a_stall_come_slowly_once_throttled(clean_redis: RedisServer) -> None:
    # What a stall towards the client holds back is counted (``held_down``) and, once the link
    # is throttled, relayed at the rate from its first byte: 100 kB at 200 kB/s take about
    # half a second, in slices.
    with FaultProxy(clean_redis.port) as proxy:
        conn = await connect(proxy.url())
        try:
            await conn.execute("SET", "k", b"x" * 100_000)
            assert proxy.held_down() == 0
            proxy.stall(up=False, down=True)
            pending = asyncio.ensure_future(conn.execute("GET", "k"))
            # The reply, left unread in the proxy's socket (a peek counts up to 64 KiB).
            for _ in range(500):
                if proxy.held_down() == 65_536:
                    break
                await asyncio.sleep(0.01)
            assert proxy.held_down() == 65_536
            assert not pending.done()
            proxy.throttle(down=200_000)
            start = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(pending, 5) == b"x" * 100_000
            assert asyncio.get_running_loop().time() - start >= 0.3  # not all at once
            assert proxy.held_down() == 0
        finally:
            await conn.close()
