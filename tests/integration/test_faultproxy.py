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
