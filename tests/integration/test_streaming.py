"""Large bodies both ways with bounded memory in every process, a slow reader, and one that
stops reading.

The distributor and the Node run in child processes, so each one's peak resident memory can be
read from /proc; Redis' peak memory shows that nothing piled up in its pub/sub buffers (the
output buffer of a subscriber that falls behind counts there, and past 32 MB Redis would drop
the subscriber, and everything in flight with it).
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from minidasgi import Node, ResponseAborted, create_distributor

from . import apps
from .redis_server import RedisServer
from .stack import NodeProcess, distributor_process, peak_rss_mib, poll, run_node, serve_app

pytestmark = pytest.mark.timeout(120)

GIB = 1 << 30
MIB = 1 << 20
PEAK_RSS_LIMIT_MIB = 150  # a process at rest takes about 30 MiB; a body held whole, over 1000


def _redis_peak_mib(server: RedisServer) -> float:
    info = server.command("INFO", "memory")
    assert isinstance(info, bytes)
    for line in info.decode().splitlines():
        if line.startswith("used_memory_peak:"):
            return int(line.split(":")[1]) / MIB
    raise AssertionError("no used_memory_peak in INFO")


async def _download(base: str, size: int, *, pause_every: int = 0, pause: float = 0.0) -> int:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=MIB)
    try:
        writer.write(f"GET /?{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        received = 0
        while received < size:
            data = await reader.read(MIB)
            assert data, f"connection closed after {received} bytes"
            received += len(data)
            if pause_every and received // pause_every != (received - len(data)) // pause_every:
                await asyncio.sleep(pause)
        return received
    finally:
        writer.close()


async def _upload(base: str, size: int) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n".encode())
        piece = b"u" * MIB
        for _ in range(size // MIB):
            writer.write(piece)
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        return await reader.read(100)
    finally:
        writer.close()


async def test_one_gib_each_way_with_bounded_memory(redis_server: RedisServer) -> None:
    node = NodeProcess(redis_server.url, "big", "apps:transfer")
    with node:
        async with distributor_process(redis_server.url, "big") as (base, distributor):
            assert await asyncio.wait_for(_download(base, GIB), 60) == GIB
            assert await asyncio.wait_for(_upload(base, GIB), 60) == str(GIB).encode()
            assert node.process is not None
            distributor_peak = peak_rss_mib(distributor.pid)
            node_peak = peak_rss_mib(node.process.pid)
    assert distributor_peak < PEAK_RSS_LIMIT_MIB, distributor_peak
    assert node_peak < PEAK_RSS_LIMIT_MIB, node_peak
    assert _redis_peak_mib(redis_server) < 16
    assert redis_server.command("KEYS", "*") == []


async def test_slow_reader_of_a_large_download(redis_server: RedisServer) -> None:
    """A client reading 256 MiB at a crawl (a pause every 8 MiB) holds the Node back through
    flow control: memory stays flat everywhere and the pub/sub connection survives."""
    size = 256 * MIB
    node = NodeProcess(redis_server.url, "slow", "apps:transfer")
    with node:
        async with distributor_process(redis_server.url, "slow") as (base, distributor):
            started = time.monotonic()
            got = await asyncio.wait_for(_download(base, size, pause_every=8 * MIB, pause=0.1), 90)
            assert got == size
            assert time.monotonic() - started > 3  # it really was slow: 32 pauses
            assert node.process is not None
            distributor_peak = peak_rss_mib(distributor.pid)
            node_peak = peak_rss_mib(node.process.pid)
    assert distributor_peak < PEAK_RSS_LIMIT_MIB, distributor_peak
    assert node_peak < PEAK_RSS_LIMIT_MIB, node_peak
    assert _redis_peak_mib(redis_server) < 16


async def test_many_concurrent_downloads_keep_the_pubsub_buffer_small(
    redis_server: RedisServer,
) -> None:
    """48 streams at once: per-request windows alone would let Nodes put 48 MiB in flight
    toward one distributor, past Redis' 32 MB limit on a subscriber's output buffer (which
    would drop it and every request with it); the distributor's credit pool keeps the total
    near its budget."""
    streams, size = 48, 24 * MIB
    node = NodeProcess(redis_server.url, "many", "apps:transfer", "--concurrency", "100")
    with node:
        async with distributor_process(redis_server.url, "many") as (base, _):
            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    listing = await asyncio.to_thread(
                        redis_server.command, "CLIENT", "LIST", "TYPE", "pubsub"
                    )
                    assert isinstance(listing, bytes)
                    for line in listing.decode().splitlines():
                        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                        peak = max(peak, int(fields.get("omem", "0")))
                    await asyncio.sleep(0.02)

            watcher = asyncio.ensure_future(watch())
            try:
                got = await asyncio.wait_for(
                    asyncio.gather(*(_download(base, size) for _ in range(streams))), 90
                )
            finally:
                watcher.cancel()
    assert got == [size] * streams
    assert peak < 16 * MIB, peak


async def test_a_client_that_stops_reading_is_bounded_by_the_response_timeout(
    redis_server: RedisServer,
) -> None:
    """A client that asks for 256 MiB, then never reads nor closes (a small receive buffer):
    the distributor waits in the server's flow control, the app on the Node for credit. With
    ``response_timeout`` the response is aborted at that bound (``ResponseAborted``, its
    text saying why) and the Node's slot freed while the client still holds its connection
    (it was held until the client left). Without it nothing bounds the wait, as when uvicorn
    serves the app directly.

    How the distributor's call ended is read at its boundary with the server: the abort must
    be told from "the client went away", which also frees the slot but counts the response
    as complete (as it was, with ``except OSError`` first: ``TimeoutError`` is an
    ``OSError`` since Python 3.11)."""
    distributor = create_distributor(url=redis_server.url, key="stall", response_timeout=2)
    node = Node(url=redis_server.url, app=apps.download, key="stall", lifespan="off")
    endings: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await distributor(scope, receive, send)
        except ResponseAborted as exc:
            endings.append(f"aborted: {exc}")
            raise
        if scope["type"] == "http":
            endings.append("returned")

    async with serve_app(app) as base, run_node(node):
        port = int(base.rsplit(":", 1)[1])
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect(("127.0.0.1", port))
            stalled.sendall(b"GET /?%d HTTP/1.1\r\nHost: t\r\n\r\n" % (256 * MIB))
            assert await poll(lambda: len(node._jobs) == 1, 10)
            assert await poll(lambda: not node._jobs and not distributor._exchanges, 20), (
                "the stalled client still holds the Node's slot"
            )
            assert await poll(lambda: bool(endings), 10)
            assert endings == [
                "aborted: the client did not read the response within response_timeout"
            ]
