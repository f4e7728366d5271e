"""Forged envelopes of millions of empty containers, pushed straight onto a Node's list while
a real request streams through it: the Node refuses them cheaply (bounded memory, no stall)
and keeps serving. The Node runs in a child process so its peak memory can be read."""

from __future__ import annotations

import asyncio
import struct
import time

import httpx
import pytest

from minidasgi import create_distributor

from .redis_server import RedisServer
from .stack import NodeProcess, peak_rss_mib, poll, serve_app

pytestmark = pytest.mark.timeout(90)


def _flood(count: int) -> bytes:
    """An envelope whose scope is a list of ``count`` empty dicts (5 bytes each)."""
    scope = b"l" + struct.pack(">I", count) + (b"d" + struct.pack(">I", 0)) * count
    return b"\x01d" + struct.pack(">I", 1) + b"s" + struct.pack(">I", 5) + b"scope" + scope


async def test_forged_envelopes_of_empty_containers_are_refused_cheaply(
    redis_server: RedisServer,
) -> None:
    big = _flood(1_600_000)  # 8 MB: ~100 MiB of dicts if it were decoded
    batch = [_flood(120_000)] * 16  # popped together, by one RPOP with a count
    app = create_distributor(url=redis_server.url, key="flood")
    with NodeProcess(redis_server.url, "flood", "apps:slow") as node:
        assert node.process is not None
        async with serve_app(app) as base, httpx.AsyncClient(base_url=base) as client:
            gaps: list[float] = []

            async def stream() -> bytes:
                # 40 pieces, one per 0.1 s: a stalled Node loop shows as a longer gap.
                body = b""
                async with client.stream("GET", "/?40", timeout=30) as response:
                    last = time.monotonic()
                    async for piece in response.aiter_raw():
                        now = time.monotonic()
                        gaps.append(now - last)
                        last = now
                        body += piece
                return body

            streaming = asyncio.ensure_future(stream())
            assert await poll(lambda: len(gaps) >= 3, 10)
            before = peak_rss_mib(node.process.pid)
            await asyncio.to_thread(redis_server.command, "LPUSH", "flood", big)
            await asyncio.to_thread(redis_server.command, "LPUSH", "flood", *batch)
            assert await poll(lambda: redis_server.command("LLEN", "flood") == 0, 10)
            body = await asyncio.wait_for(streaming, 30)
            assert body.endswith(b"done\n")
            # Still serving.
            response = await client.get("/?1")
            assert response.status_code == 200
            after = peak_rss_mib(node.process.pid)
    assert after - before < 64, (before, after)
    assert max(gaps[1:]) < 0.1 + 0.5, gaps
    assert node.output().count("dropped a malformed request") == 17
