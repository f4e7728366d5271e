"""The request body on the direct link (``minidasgi.link``'s upload links): a large upload
arrives whole and in order off Redis, a refused link leaves it on Redis, and every fault (a
slow client, a broken link, a dead Node, an app that stops reading or answers early) ends in
bounded time with bounded memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from minidasgi import Node, create_distributor, link, wire

from .faultproxy import FaultProxy
from .ports import free_port
from .redis_server import RedisServer, calls
from .stack import NodeProcess, poll, run_node, serve_app

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
KEY = "uplink-test"


def _piece(start: int, size: int) -> bytes:
    """Bytes of a test body from ``start`` (within one MiB): each MiB differs, so a piece
    lost, repeated or out of place changes the hash."""
    return ((start // MIB) & 0xFFFFFFFF).to_bytes(4, "big") * (size // 4) + b"u" * (size % 4)


def _digest(size: int) -> str:
    digest = hashlib.sha256()
    for start in range(0, size, MIB):
        digest.update(_piece(start, min(MIB, size - start)))
    return digest.hexdigest()


class Hasher:
    """Reads the whole body (after its first piece, once ``release`` is set), answers
    ``{"size": N, "sha256": H}``; ``/early`` answers 413 once past 4 MiB instead."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.release.set()
        self.first = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.ended = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        digest = hashlib.sha256()
        size = 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.disconnected.set()
                    return
                digest.update(message.get("body", b""))
                size += len(message.get("body", b""))
                if scope["path"] == "/early" and size > 4 * MIB:
                    text = b"too large"
                    await send({"type": "http.response.start", "status": 413, "headers": []})
                    await send({"type": "http.response.body", "body": text})
                    return
                if not self.first.is_set():
                    self.first.set()
                    await asyncio.wait_for(self.release.wait(), 30)
                if not message.get("more_body", False):
                    break
            answer = json.dumps({"size": size, "sha256": digest.hexdigest()}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": answer})
        finally:
            self.ended.set()


@asynccontextmanager
async def stack(
    redis: RedisServer, app: Any, *, node_options: dict[str, Any] | None = None, **options: Any
) -> AsyncIterator[tuple[str, Any, Node]]:
    options.setdefault("link", "127.0.0.1")
    options.setdefault("liveness_interval", 0.2)
    options.setdefault("peer_timeout", 2.0)
    distributor = create_distributor(url=redis.url, key=KEY, **options)
    async with serve_app(distributor) as base:
        node = Node(
            key=KEY,
            app=app,
            **{
                "url": redis.url,
                "liveness_interval": 0.2,
                "peer_timeout": 2.0,
                **(node_options or {}),
            },
        )
        async with run_node(node):
            yield base, distributor, node


async def _post(
    base: str,
    size: int,
    *,
    path: str = "/",
    chunk: int = 256 * 1024,
    pauses: dict[int, float] | None = None,
    sent: list[int] | None = None,
) -> tuple[bytes, bytes]:
    """POST ``size`` bytes on a raw socket, in writes of ``chunk`` (pausing ``pauses[n]``
    seconds before the ``n``th): (status line, body), or (b"", b"") if the connection ended
    without an answer. The answer may come before the body is all sent: then the rest is
    not sent. ``sent`` gets the bytes written so far."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n".encode())
    written = sent if sent is not None else []
    written.append(0)

    async def upload() -> None:
        for index, start in enumerate(range(0, size, chunk)):
            if pauses and index in pauses:
                await asyncio.sleep(pauses[index])
            part = b"".join(
                _piece(at, min(MIB - at % MIB, start + chunk - at, size - at))
                for at in _starts(start, min(start + chunk, size))
            )
            writer.write(part)
            await writer.drain()
            written[0] += len(part)

    uploading = asyncio.ensure_future(upload())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 40)
        status = head.split(b"\r\n", 1)[0]
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if b"transfer-encoding: chunked" not in head.lower():
            body = await asyncio.wait_for(reader.readexactly(length), 10) if length else b""
            return status, body
        parts = []
        while part := int((await asyncio.wait_for(reader.readline(), 10)).strip() or b"0", 16):
            parts.append(await asyncio.wait_for(reader.readexactly(part), 10))
            await reader.readexactly(2)
        return status, b"".join(parts)
    except (asyncio.IncompleteReadError, ConnectionError):
        return b"", b""
    finally:
        uploading.cancel()
        await asyncio.gather(uploading, return_exceptions=True)
        writer.close()


def _starts(start: int, end: int) -> list[int]:
    """Where the MiB-wise parts of ``[start, end)`` begin."""
    points = [start]
    at = (start // MIB + 1) * MIB
    while at < end:
        points.append(at)
        at += MIB
    return points


def _answer(body: bytes) -> tuple[int, str]:
    got = json.loads(body)
    return got["size"], got["sha256"]


async def test_a_large_upload_comes_whole_through_the_link(redis_server: RedisServer) -> None:
    size = 40 * MIB + 12345
    async with stack(redis_server, Hasher()) as (base, distributor, node):
        before = calls(redis_server, "publish")
        status, body = await _post(base, size)
        publishes = calls(redis_server, "publish") - before
        assert status == b"HTTP/1.1 200 OK"
        assert _answer(body) == (size, _digest(size))
        assert node.metrics.upload_links.get() == 1
        assert node.metrics.upload_fallbacks.get() == 0
        # Nearly all of it came on the link: Redis carried the envelope's part, a few
        # pieces before the link was taken, the marker and the answer.
        assert node.metrics.upload_bytes.get() > size - 8 * MIB
        assert distributor.metrics.uploads.get() == 1
        assert distributor.metrics.upload_bytes.get() == node.metrics.upload_bytes.get()
        print(f"{publishes} PUBLISH for {size / MIB:.0f} MiB")
        assert publishes < 16
        listener = distributor._link_listener
        assert await poll(lambda: not listener._uploads, 5)
        # A body that comes whole in its envelope never opens one, nor one that declares
        # less than link.UPLOAD_FROM.
        for small in (1000, link.UPLOAD_FROM - 1):
            status, body = await _post(base, small)
            assert _answer(body) == (small, _digest(small))
        assert node.metrics.upload_links.get() == 1
        assert node.metrics.upload_fallbacks.get() == 0


@pytest.mark.parametrize("refusal", ["token", "full"])
async def test_a_refused_upload_link_leaves_the_body_on_redis(
    redis_server: RedisServer, refusal: str
) -> None:
    size = 16 * MIB + 3
    async with stack(redis_server, Hasher()) as (base, distributor, node):
        listener = distributor._link_listener
        if refusal == "token":  # the offer's token no longer opens it
            listener.token = bytes(b ^ 1 for b in listener.token)
        else:
            listener.max_uploads = 0
        before = calls(redis_server, "publish")
        status, body = await _post(base, size)
        publishes = calls(redis_server, "publish") - before
        assert status == b"HTTP/1.1 200 OK"
        assert _answer(body) == (size, _digest(size))
        assert node.metrics.upload_links.get() == 0
        assert node.metrics.upload_fallbacks.get() == 1
        assert node.metrics.upload_bytes.get() == 0
        assert listener.refusals == 1
        assert publishes >= 16  # at least a piece (1 MiB at most) a PUBLISH
        # A refusal is not an unreachable address.
        assert not node.unreachable_links


async def test_a_slow_uploader_is_not_taken_for_a_dead_link(redis_server: RedisServer) -> None:
    # The client pauses 1.5 s, more than the Node's 0.6 s peer_timeout, between pieces
    # sent once the link carries the body: the distributor's heartbeats (every 0.2 s) keep
    # the Node's watchdog quiet.
    size = 6 * MIB
    options = {"node_options": {"peer_timeout": 0.6}, "peer_timeout": 0.6}
    async with stack(redis_server, Hasher(), **options) as (base, distributor, node):
        pauses = {8: 1.5, 12: 1.5, 16: 1.5}
        status, body = await asyncio.wait_for(_post(base, size, pauses=pauses), 30)
        assert status == b"HTTP/1.1 200 OK"
        assert _answer(body) == (size, _digest(size))
        assert node.metrics.upload_links.get() == 1
        assert node.metrics.upload_bytes.get() > 2 * MIB
        assert distributor.metrics.aborts.total() == 0


async def test_an_app_that_stops_reading_holds_the_client_back(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The app holds its first piece past the TCP timeouts (TCP_USER_TIMEOUT shortened here
    # to 0.5 s): the Node's receive window stays shut and the distributor's kernel probes a
    # zero window, which Linux times out by TCP_USER_TIMEOUT where it is set. The link must
    # wait for the app as Redis does, then carry the whole body.
    monkeypatch.setattr(link, "_USER_TIMEOUT_MS", 500)
    app = Hasher()
    app.release.clear()
    size = 256 * MIB
    async with stack(redis_server, app) as (base, distributor, node):
        sent: list[int] = []
        posting = asyncio.ensure_future(_post(base, size, sent=sent))
        await asyncio.wait_for(app.first.wait(), 10)
        assert await poll(lambda: node.metrics.upload_links.get() == 1, 10)
        await asyncio.sleep(4.0)  # the client sends what it can meanwhile, then waits
        (exchange,) = distributor._exchanges.values()
        uplink = exchange.uplink
        assert uplink is not None and exchange.uplinked
        # The distributor holds at most its transport's 1 MiB plus the frame it wrote; the
        # rest waits in the sockets' buffers and the client's.
        buffered = uplink.transport.get_write_buffer_size()
        print(f"sent {sent[0] / MIB:.1f} MiB, {buffered} bytes buffered")
        assert buffered <= 2 * MIB
        assert sent[0] < 64 * MIB
        app.release.set()
        status, body = await asyncio.wait_for(posting, 40)
        assert status == b"HTTP/1.1 200 OK"
        assert _answer(body) == (size, _digest(size))


async def test_an_app_answering_before_the_bodys_end_is_relayed(
    redis_server: RedisServer,
) -> None:
    # The app answers 413 once past 4 MiB of the body and ends: its Node tells the
    # distributor on the link (``UPLOAD_DONE``, not a break), so the answer through Redis is
    # relayed. The Node's Redis connections go through a proxy that holds what the Node sends
    # for a second from the app's answer on: the answer comes after the link's end, as it
    # may off loopback (a link just dropped would then fail the request: 502).
    size = 64 * MIB
    with FaultProxy(redis_server.port) as proxy:

        class Early(Hasher):
            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                async def held_send(message: Any) -> None:
                    if message["type"] == "http.response.start":
                        proxy.stall(up=True, down=False)
                        asyncio.get_running_loop().call_later(1.0, proxy.resume)
                    await send(message)

                await super().__call__(scope, receive, held_send)

        app = Early()
        node_options = {"url": proxy.url(), "peer_timeout": 10.0}
        async with stack(redis_server, app, peer_timeout=30, node_options=node_options) as (
            base,
            distributor,
            node,
        ):
            status, body = await asyncio.wait_for(_post(base, size, path="/early"), 20)
            assert (status, body) == (b"HTTP/1.1 413 Request Entity Too Large", b"too large")
            assert node.metrics.upload_links.get() == 1
            assert node.metrics.upload_bytes.get() > 0
            assert distributor.metrics.aborts.total() == 0
            listener = distributor._link_listener
            assert await poll(lambda: not listener._uploads, 5)


async def test_a_node_killed_mid_upload_fails_the_request(redis_server: RedisServer) -> None:
    # peer_timeout 30 s: only the link's end can end this exchange within the test's bound.
    distributor = create_distributor(
        url=redis_server.url, key=KEY, link="127.0.0.1", liveness_interval=0.5, peer_timeout=30
    )
    async with serve_app(distributor) as base:
        with NodeProcess(redis_server.url, KEY, "apps:count_upload") as process:

            def linked_bytes() -> int:
                return sum(
                    e.uplink.bytes for e in distributor._exchanges.values() if e.uplink is not None
                )

            async def kill_once_linked() -> None:
                await poll(lambda: linked_bytes() > 4 * MIB, 10)
                process.kill()

            killer = asyncio.ensure_future(kill_once_linked())
            status, body = await asyncio.wait_for(_post(base, 1024 * MIB), 15)
            await killer
            assert status == b"HTTP/1.1 502 Bad Gateway"
            assert body == b"the worker's link broke\n"
            assert await poll(lambda: not distributor._exchanges, 5)


async def test_a_stalled_upload_link_fails_the_request(redis_server: RedisServer) -> None:
    # The link goes through a proxy that stops relaying once it carries the body (no FIN,
    # no RST; Redis still works both ways): the Node's watchdog hears nothing for its
    # peer_timeout, drops the link and disconnects the app, which ends.
    port = free_port()
    with FaultProxy(port) as proxy:
        options = {"link": f"127.0.0.1:{port}", "link_advertise": f"127.0.0.1:{proxy.port}"}
        app = Hasher()
        async with stack(redis_server, app, **options) as (base, distributor, node):

            async def stall_once_linked() -> None:
                await poll(lambda: node.metrics.upload_bytes.get() > 2 * MIB, 10)
                proxy.stall(up=True, down=True)

            staller = asyncio.ensure_future(stall_once_linked())
            status, _ = await asyncio.wait_for(_post(base, 1024 * MIB), 30)
            await staller
            assert status in (b"HTTP/1.1 502 Bad Gateway", b"HTTP/1.1 500 Internal Server Error")
            await asyncio.wait_for(app.disconnected.wait(), 10)
            assert await poll(lambda: not distributor._exchanges, 10)


async def test_an_echo_uses_both_links_at_once(redis_server: RedisServer) -> None:
    # The body comes on an upload link while the answer, streamed as it arrives, leaves on
    # a download link: two connections, one for each direction.
    async def echo(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            more = message.get("more_body", False)
            await send({"type": "http.response.body", "body": message["body"], "more_body": more})
            if not more:
                return

    size = 32 * MIB + 5
    async with stack(redis_server, echo) as (base, _, node):
        before = calls(redis_server, "publish")
        status, body = await asyncio.wait_for(_post(base, size), 40)
        publishes = calls(redis_server, "publish") - before
        assert status == b"HTTP/1.1 200 OK"
        assert len(body) == size and hashlib.sha256(body).hexdigest() == _digest(size)
        assert node.metrics.upload_links.get() == 1
        assert node.metrics.links.get() == 1
        print(f"{publishes} PUBLISH for an echo of {size / MIB:.0f} MiB")
        assert publishes < 24


async def test_an_upload_link_reset_mid_body_fails_the_request(redis_server: RedisServer) -> None:
    # The proxy resets the link (RST both ways) once it carries the body, the Node alive and
    # Redis fine: the distributor answers that the link broke, the app sees a disconnect.
    port = free_port()
    with FaultProxy(port) as proxy:
        options = {"link": f"127.0.0.1:{port}", "link_advertise": f"127.0.0.1:{proxy.port}"}
        app = Hasher()
        async with stack(redis_server, app, peer_timeout=30, **options) as (
            base,
            distributor,
            node,
        ):

            async def reset_once_linked() -> None:
                await poll(lambda: node.metrics.upload_bytes.get() > 2 * MIB, 10)
                proxy.reset()

            resetter = asyncio.ensure_future(reset_once_linked())
            status, body = await asyncio.wait_for(_post(base, 1024 * MIB), 20)
            await resetter
            assert (status, body) == (b"HTTP/1.1 502 Bad Gateway", b"the worker's link broke\n")
            await asyncio.wait_for(app.disconnected.wait(), 10)
            assert await poll(lambda: not distributor._exchanges, 10)


@pytest.mark.parametrize("credits", ["short", "default"])
async def test_an_upload_link_lost_before_the_marker_leaves_the_body_on_redis(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, credits: str
) -> None:
    # The link is taken while the pump waits for credit (the app holds its pieces; the
    # Node's connect is slow), then breaks (the Node resets it) before the marker went: the
    # body goes on through Redis and arrives whole. With a Node short of budget the window
    # is one credit: the marker's credit, taken and then not spent, must come back, or the
    # pump waits for it for ever.
    real_open = link.open_upload

    async def slow_open(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(1.0)  # a slow connect: the window fills meanwhile
        return await real_open(*args, **kwargs)

    monkeypatch.setattr(link, "open_upload", slow_open)
    permits: asyncio.Queue[None] = asyncio.Queue()
    free = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        digest = hashlib.sha256()
        size = 0
        while True:
            if size and not free.is_set():
                await asyncio.wait_for(permits.get(), 30)
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            digest.update(message.get("body", b""))
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        answer = json.dumps({"size": size, "sha256": digest.hexdigest()}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": answer})

    size = 8 * MIB
    async with stack(redis_server, app) as (base, distributor, node):
        if credits == "short":
            node.credit_pool.limit = wire.CHUNK_SIZE  # a short budget: windows of 1 credit
        posting = asyncio.ensure_future(_post(base, size, chunk=64 * 1024))
        assert await poll(
            lambda: any(e.uplink is not None for e in distributor._exchanges.values()), 10
        )
        (exchange,) = distributor._exchanges.values()
        permits.put_nowait(None)  # a credit back: the pump's next piece waits in ``_upload``
        assert await poll(lambda: not exchange.window.available, 5)
        await asyncio.sleep(0.3)
        assert not exchange.uplinked
        (job,) = node._jobs.values()
        job.uplink.abort()  # the link breaks before the marker
        assert await poll(lambda: exchange.uplink is None, 5)
        free.set()
        permits.put_nowait(None)
        status, body = await asyncio.wait_for(posting, 10)
        assert status == b"HTTP/1.1 200 OK"
        assert _answer(body) == (size, _digest(size))
        assert distributor.metrics.uploads.get() == 0  # no marker went
        assert distributor.metrics.aborts.total() == 0


async def test_a_client_gone_mid_upload_ends_everything(redis_server: RedisServer) -> None:
    # The client resets its connection once the body rides the link: the app sees
    # http.disconnect, and nothing is left: no exchange, no job, no upload link on either side.
    app = Hasher()
    async with stack(redis_server, app) as (base, distributor, node):
        host, port = base.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (256 * MIB))
        chunk = b"x" * (256 * 1024)
        for _ in range(64):
            writer.write(chunk)
            await writer.drain()
        assert await poll(lambda: node.metrics.upload_bytes.get() > 2 * MIB, 10)
        (exchange,) = distributor._exchanges.values()
        uplink = exchange.uplink
        assert uplink is not None and exchange.uplinked
        # The app has read all that was sent and waits on the link for more: the reset finds
        # it there (not between two reads, where it would end by itself at its next one).
        read: list[int] = []

        def settled() -> bool:
            read.append(node.metrics.upload_bytes.get())
            return len(read) > 10 and read[-1] == read[-10]

        assert await poll(settled, 10)
        writer.transport.abort()
        await asyncio.wait_for(app.disconnected.wait(), 10)
        listener = distributor._link_listener
        assert await poll(
            lambda: not distributor._exchanges and not node._jobs and not listener._uploads, 10
        )
        assert uplink.closed and uplink.transport is not None and uplink.transport.is_closing()


async def test_a_stopped_node_mid_upload_fails_the_request(redis_server: RedisServer) -> None:
    # SIGSTOP of the Node process once the body rides the link: no TCP_USER_TIMEOUT on the
    # distributor's end (an app may pause), so the Node's liveness through Redis ends it.
    distributor = create_distributor(
        url=redis_server.url, key=KEY, link="127.0.0.1", liveness_interval=0.5, peer_timeout=3
    )
    async with serve_app(distributor) as base:
        with NodeProcess(redis_server.url, KEY, "apps:count_upload") as process:

            def linked_bytes() -> int:
                return sum(
                    e.uplink.bytes for e in distributor._exchanges.values() if e.uplink is not None
                )

            async def stop_once_linked() -> None:
                await poll(lambda: linked_bytes() > 4 * MIB, 10)
                os.kill(process.process.pid, signal.SIGSTOP)

            stopper = asyncio.ensure_future(stop_once_linked())
            try:
                status, body = await asyncio.wait_for(_post(base, 1024 * MIB), 40)
                await stopper
                assert status == b"HTTP/1.1 502 Bad Gateway"
                assert body == b"lost contact with the worker\n"
                listener = distributor._link_listener
                assert await poll(lambda: not distributor._exchanges and not listener._uploads, 5)
            finally:
                os.kill(process.process.pid, signal.SIGCONT)
