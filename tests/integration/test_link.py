"""The direct Node -> distributor link for large response bodies (``minidasgi.link``):
the bytes arrive whole and in order through it, a link that cannot be opened falls back to
Redis, and every fault (a stalled or broken link, a dead Node, a slow or vanished client,
hostile connections to the listener) ends in bounded time while the distributor serves on.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from minidasgi import Node, create_distributor, link

from .faultproxy import FaultProxy
from .ports import free_port
from .redis_server import RedisServer
from .stack import NodeProcess, poll, run_node, serve_app

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
KEY = "link-test"


def _pattern(size: int) -> bytes:
    """A body whose every MiB differs (a piece out of place changes the hash)."""
    whole = b"".join(i.to_bytes(4, "big") * (MIB // 4) for i in range(size // MIB + 1))
    return whole[:size]


class Streamer:
    """An app streaming ``/?SIZE`` bytes in 1 MiB chunks (``/slow?...``: pausing between
    chunks), recording what it saw (a disconnect, a cancel)."""

    def __init__(self, chunk: int = MIB, pause: float = 0.0) -> None:
        self.chunk = chunk
        self.pause = pause
        self.cancelled = asyncio.Event()
        self.ended = asyncio.Event()
        self.sent = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        size = int(scope["query_string"] or b"1")
        body = _pattern(size)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for start in range(0, size, self.chunk):
                piece = body[start : start + self.chunk]
                more = start + self.chunk < size
                await send({"type": "http.response.body", "body": piece, "more_body": more})
                self.sent += len(piece)
                if self.pause:
                    await asyncio.sleep(self.pause)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            self.ended.set()


@asynccontextmanager
async def stack(
    redis: RedisServer, app: Any, **options: Any
) -> AsyncIterator[tuple[str, Any, Node | None]]:
    options.setdefault("link", "127.0.0.1")
    distributor = create_distributor(
        url=redis.url, key=KEY, liveness_interval=0.2, peer_timeout=2.0, **options
    )
    async with serve_app(distributor) as base:
        if app is None:
            yield base, distributor, None
            return
        node = Node(url=redis.url, key=KEY, app=app, liveness_interval=0.2, peer_timeout=2.0)
        async with run_node(node):
            yield base, distributor, node


async def _get(base: str, size: int, *, read_pause: float = 0.0, stop_after: int = -1) -> Any:
    """GET ``/?size`` on a raw socket: (status line, body hash, bytes read, ended cleanly)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=MIB)
    try:
        writer.write(f"GET /?{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = head.split(b"\r\n", 1)[0]
        digest = hashlib.sha256()
        got = 0
        chunked = b"transfer-encoding: chunked" in head.lower()
        while True:
            if chunked:
                line = await asyncio.wait_for(reader.readline(), 10)
                if not line:
                    return status, digest.hexdigest(), got, False
                length = int(line.strip() or b"0", 16)
                if length == 0:
                    await reader.readline()
                    return status, digest.hexdigest(), got, True
                data = await asyncio.wait_for(reader.readexactly(length + 2), 10)
                digest.update(data[:-2])
                got += length
            else:
                data = await asyncio.wait_for(reader.read(MIB), 10)
                if not data:
                    return status, digest.hexdigest(), got, got == size
                digest.update(data)
                got += len(data)
                if got >= size:
                    return status, digest.hexdigest(), got, True
            if 0 <= stop_after <= got:
                return status, digest.hexdigest(), got, False
            if read_pause:
                await asyncio.sleep(read_pause)
    except (asyncio.IncompleteReadError, ConnectionError):
        return b"", "", -1, False
    finally:
        writer.close()


async def test_a_large_body_comes_whole_through_the_link(redis_server: RedisServer) -> None:
    size = 24 * MIB + 12345
    async with stack(redis_server, Streamer()) as (base, distributor, node):
        status, digest, got, clean = await _get(base, size)
        assert (status, got, clean) == (b"HTTP/1.1 200 OK", size, True)
        assert digest == hashlib.sha256(_pattern(size)).hexdigest()
        assert node is not None
        assert node.metrics.links.get() == 1
        assert node.metrics.link_fallbacks.get() == 0
        # All but the first MiB came on the link.
        assert node.metrics.link_bytes.get() == size - MIB
        assert distributor.metrics.link_bytes_counter.get() == size - MIB
        # A small response never takes one.
        status, _, got, clean = await _get(base, 1000)
        assert (got, clean) == (1000, True)
        assert node.metrics.links.get() == 1
