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


def _piece(start: int, size: int) -> bytes:
    """The bytes of a test body from ``start``, ``size`` of them, within one MiB: each MiB of
    it differs (a piece out of place changes the hash)."""
    return ((start // MIB) & 0xFFFFFFFF).to_bytes(4, "big") * (size // 4) + b"z" * (size % 4)


def _digest(size: int, chunk: int = MIB) -> str:
    digest = hashlib.sha256()
    for start in range(0, size, chunk):
        digest.update(_piece(start, min(chunk, size - start)))
    return digest.hexdigest()


class Gated:
    """An app that sends its start and a first chunk, waits for ``release``, then streams
    ``/?SIZE`` in all (its link is opened only after the release)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        size = int(scope["query_string"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": _piece(0, MIB), "more_body": True})
        await asyncio.wait_for(self.release.wait(), 20)
        for start in range(MIB, size, MIB):
            piece = _piece(start, min(MIB, size - start))
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


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
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for start in range(0, size, self.chunk):
                piece = _piece(start, min(self.chunk, size - start))
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
    options.setdefault("liveness_interval", 0.2)
    options.setdefault("peer_timeout", 2.0)
    distributor = create_distributor(url=redis.url, key=KEY, **options)
    async with serve_app(distributor) as base:
        if app is None:
            yield base, distributor, None
            return
        node = Node(url=redis.url, key=KEY, app=app, liveness_interval=0.2, peer_timeout=2.0)
        async with run_node(node):
            yield base, distributor, node


async def _get(
    base: str,
    size: int,
    *,
    read_pause: float = 0.0,
    read_size: int = MIB,
    stop_after: int = -1,
    hold: tuple[int, float] = (-1, 0.0),
) -> Any:
    """GET ``/?size`` on a raw socket: (status line, body hash, bytes read, ended cleanly).
    ``hold``: once that many bytes are read, read nothing for that many seconds."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    if read_size < MIB:  # a slow client's small window: the distributor's send waits
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, read_size)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=MIB)
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
                while length:  # in reads of ``read_size``, as a slow client takes them
                    data = await asyncio.wait_for(reader.readexactly(min(length, read_size)), 10)
                    digest.update(data)
                    got += len(data)
                    length -= len(data)
                    if 0 <= hold[0] <= got:
                        await asyncio.sleep(hold[1])
                        hold = (-1, 0.0)
                    if read_pause:
                        await asyncio.sleep(read_pause)
                await asyncio.wait_for(reader.readexactly(2), 10)
            else:
                data = await asyncio.wait_for(reader.read(read_size), 10)
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
        assert digest == _digest(size)
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


async def test_an_unreachable_link_falls_back_to_redis_and_is_not_tried_again(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = free_port()  # nothing listens there: the connect is refused
    tries: list[str] = []
    real_open = link.open_link

    async def counted(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        tries.append(f"{host}:{port}")
        return await real_open(host, port, *args, **kwargs)

    monkeypatch.setattr(link, "open_link", counted)
    size = 8 * MIB + 7
    options = {"link_advertise": f"127.0.0.1:{closed}"}
    async with stack(redis_server, Streamer(), **options) as (base, distributor, node):
        assert node is not None
        for attempt in (1, 2):
            status, digest, got, clean = await _get(base, size)
            assert (status, got, clean) == (b"HTTP/1.1 200 OK", size, True)
            assert digest == _digest(size)
            assert node.metrics.link_fallbacks.get() == attempt
        assert node.metrics.links.get() == 0
        # The second response did not try the address again (remembered for 30 s).
        assert tries == [f"127.0.0.1:{closed}"]
        assert f"127.0.0.1:{closed}" in node.unreachable_links
        assert distributor.metrics.links.get() == 0


async def test_a_link_stalled_both_ways_ends_the_exchange(redis_server: RedisServer) -> None:
    # The link goes through a proxy that then stops relaying, as a stalled path or a NAT
    # that forgot the flow does: no FIN, no RST, and Redis (PINGs) still works both ways.
    port = free_port()
    with FaultProxy(port) as proxy:
        options = {"link": f"127.0.0.1:{port}", "link_advertise": f"127.0.0.1:{proxy.port}"}
        app = Streamer(chunk=256 * 1024, pause=0.01)
        async with stack(redis_server, app, **options) as (base, distributor, node):
            assert node is not None

            async def stall_once_linked() -> None:
                await poll(lambda: node.metrics.link_bytes.get() > 2 * MIB, 10)
                proxy.stall(up=True, down=True)

            staller = asyncio.ensure_future(stall_once_linked())
            size = 512 * MIB
            started = time.monotonic()
            status, _, got, clean = await asyncio.wait_for(_get(base, size), 20)
            elapsed = time.monotonic() - started
            await staller
            assert status == b"HTTP/1.1 200 OK"
            assert not clean and got < size  # aborted: the client sees the connection end
            assert distributor.metrics.links.get() == 1
            assert distributor.metrics.aborts.total() == 1
            # The Node's app was stopped too (CANCEL through Redis), not left writing.
            await asyncio.wait_for(app.ended.wait(), 10)
            print(f"stalled link ended the exchange after {elapsed:.1f} s")


async def test_a_node_killed_mid_body_aborts_the_response(redis_server: RedisServer) -> None:
    distributor = create_distributor(
        url=redis_server.url, key=KEY, link="127.0.0.1", liveness_interval=0.5, peer_timeout=30
    )
    # A peer_timeout of 30 s: only the link's end can end this exchange within the test's
    # bound (the liveness check would take 30 s).
    async with serve_app(distributor) as base:
        with NodeProcess(redis_server.url, KEY, "apps:streamed") as process:
            size = 1024 * MIB

            async def kill_once_linked() -> None:
                await poll(lambda: distributor.metrics.link_bytes_counter.get() > 4 * MIB, 10)
                process.kill()

            killer = asyncio.ensure_future(kill_once_linked())
            status, _, got, clean = await asyncio.wait_for(_get(base, size), 15)
            await killer
            assert status == b"HTTP/1.1 200 OK"
            assert not clean and 4 * MIB < got < size
            assert distributor.metrics.links.get() == 1
            assert distributor.metrics.aborts.total() == 1


async def test_a_slow_client_does_not_trip_the_links_watchdog(redis_server: RedisServer) -> None:
    # The client reads about 2 MiB/s: once 4 MiB wait unsent, the reader holds back
    # reading the link for about 0.5 s at a time (a 1 MiB frame's sending), longer than the
    # watchdog's 0.3 s ticks (peer_timeout 0.6 s); the Node, blocked in drain(), writes no
    # heartbeat through meanwhile.
    size = 16 * MIB
    options = {"peer_timeout": 0.6, "liveness_interval": 0.1}
    async with stack(redis_server, Streamer(), **options) as (base, distributor, _):
        status, digest, got, clean = await asyncio.wait_for(
            _get(base, size, read_pause=0.03, read_size=64 * 1024), 30
        )
        assert (status, got, clean) == (b"HTTP/1.1 200 OK", size, True)
        assert digest == _digest(size)
        assert distributor.metrics.links.get() == 1
        assert distributor.metrics.aborts.total() == 0


async def test_a_client_pausing_past_the_tcp_timeouts_gets_its_whole_download(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client reads nothing for a while: the distributor's reader holds back, its receive
    # window closes and the Node's kernel probes a zero window. A TCP_USER_TIMEOUT on the
    # Node's end (here shortened to 0.5 s) reset the link then (Linux applies it to a zero
    # window), where the Redis path just waits for the client: the link must wait as well.
    monkeypatch.setattr(link, "_USER_TIMEOUT_MS", 500)
    size = 32 * MIB
    async with stack(redis_server, Streamer()) as (base, distributor, node):
        assert node is not None
        status, digest, got, clean = await asyncio.wait_for(
            _get(base, size, read_size=64 * 1024, hold=(2 * MIB, 4.0)), 30
        )
        assert (status, got, clean) == (b"HTTP/1.1 200 OK", size, True)
        assert digest == _digest(size)
        assert node.metrics.links.get() == 1
        assert distributor.metrics.aborts.total() == 0


async def test_a_client_gone_mid_body_stops_the_node_sending(redis_server: RedisServer) -> None:
    app = Streamer(pause=0.002)
    size = 1024 * MIB
    async with stack(redis_server, app) as (base, distributor, node):
        assert node is not None
        _, _, got, clean = await asyncio.wait_for(_get(base, size, stop_after=8 * MIB), 10)
        assert not clean and got >= 8 * MIB
        # The distributor's end of the exchange closes its link and forgets it (the Node is
        # also told through the disconnect event and a CANCEL: either alone stops its app).
        listener = distributor._link_listener
        assert await poll(lambda: not listener._taken and not listener._waiting, 10)
        assert listener.unread == 0
        # The distributor closes the link as the exchange ends: the Node's next write fails,
        # and the app's sends return without sending, as under uvicorn once the client is gone.
        await asyncio.wait_for(app.ended.wait(), 20)
        assert node.metrics.links.get() == 1
        assert node.metrics.link_bytes.get() < size // 4


async def _holding(base: str, size: int) -> tuple[asyncio.StreamWriter, socket.socket]:
    """A client that asks for ``/?size``, reads its head, then nothing: the connection and
    its socket (to read or close later)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=MIB)
    writer.write(f"GET /?{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return writer, sock


async def test_slow_clients_holding_their_share_do_not_starve_a_fast_download(
    redis_server: RedisServer,
) -> None:
    """Slow clients that read nothing hold what their links handed on, up to the listener's
    whole budget (here 4 of them, 4 MiB each, a 16 MiB budget; 16 and 64 MiB by default):
    a fast client's linked download still completes, its link reading at least its share."""
    slow = 4
    async with stack(redis_server, Streamer()) as (base, distributor, node):
        assert node is not None
        listener = distributor._link_listener
        listener.budget = slow * link.READ_HIGH
        holders = [await _holding(base, 64 * MIB) for _ in range(slow)]
        try:
            # Every slow link reads until held back: by its own bound or by the budget.
            assert await poll(
                lambda: (
                    len(listener._taken) == slow
                    and all(reader._paused for reader in listener._taken.values())
                ),
                20,
            )
            size = 24 * MIB
            status, digest, got, clean = await asyncio.wait_for(_get(base, size), 20)
            assert (status, got, clean) == (b"HTTP/1.1 200 OK", size, True)
            assert digest == _digest(size)
            assert node.metrics.links.get() == slow + 1
            # The slow ones still hold their links, within the budget and a piece each.
            assert len(listener._taken) == slow
            assert listener.unread <= listener.budget + (2 * slow + 1) * link.PIECE
        finally:
            for writer, _ in holders:
                writer.transport.abort()
        assert await poll(lambda: not listener._taken and listener.unread == 0, 20)


# -- the listener is untrusted input ---------------------------------------------------------


async def _closed_unanswered(port: int, send: bytes, timeout: float = 5.0) -> bool:
    """Connect to the listener, send ``send``: True if it closes the connection without a
    byte back (no ``link.ACCEPTED``), within ``timeout`` (else the test's bound fails it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if send:
            writer.write(send)
        answer = await asyncio.wait_for(reader.read(16), timeout)
        return answer == b""
    except ConnectionError:
        return True
    finally:
        writer.close()


async def test_hostile_handshakes_are_closed_and_the_download_goes_on(
    redis_server: RedisServer,
) -> None:
    app = Gated()
    async with stack(redis_server, app) as (base, distributor, node):
        assert node is not None and distributor.link_port is not None
        port = distributor.link_port
        size = 16 * MIB
        download = asyncio.ensure_future(_get(base, size))
        assert await poll(lambda: bool(distributor._exchanges), 10)
        (request_id,) = distributor._exchanges
        token = distributor._link_token
        wrong = bytes(b ^ 1 for b in token)
        # A wrong token for the request in flight: closed, never taken for its link.
        assert await _closed_unanswered(port, link.pack_handshake(wrong, request_id))
        # Garbage of the handshake's size, and a handshake cut short then silent.
        assert await _closed_unanswered(port, b"G" * link.HANDSHAKE_SIZE)
        assert await _closed_unanswered(port, link.pack_handshake(token, request_id)[:50])
        # The right token for a request not relayed here.
        assert await _closed_unanswered(port, link.pack_handshake(token, "f" * 24))
        # Nothing at all: closed once the handshake's 2 s are up.
        assert await _closed_unanswered(port, b"")
        app.release.set()  # the Node's own link, taken
        status, digest, got, clean = await asyncio.wait_for(download, 30)
        assert (status, got, clean) == (b"HTTP/1.1 200 OK", size, True)
        assert digest == _digest(size)
        assert distributor._link_listener is not None
        assert distributor._link_listener.refusals == 5
        assert node.metrics.links.get() == 1


async def test_too_many_handshakes_are_refused_and_the_node_falls_back(
    redis_server: RedisServer,
) -> None:
    async with stack(redis_server, Streamer()) as (base, distributor, node):
        assert node is not None and distributor.link_port is not None
        port = distributor.link_port
        idle = []
        try:
            for _ in range(link.MAX_HANDSHAKING):
                sock = socket.create_connection(("127.0.0.1", port))
                idle.append(sock)
            # One more is refused at once (the 64 are still within their 2 s).
            assert await _closed_unanswered(port, b"", timeout=1.5)
            # A Node's link is refused the same way: its body goes through Redis.
            size = 8 * MIB
            status, digest, got, clean = await asyncio.wait_for(_get(base, size), 20)
            assert (status, got, clean) == (b"HTTP/1.1 200 OK", size, True)
            assert digest == _digest(size)
            assert node.metrics.link_fallbacks.get() == 1
            assert node.metrics.links.get() == 0
        finally:
            for sock in idle:
                sock.close()
        # A refusal is not an unreachable address: the next response takes the link.
        assert not node.unreachable_links
        assert await poll(lambda: not distributor._link_listener._handshaking, 5)
        status, digest, got, clean = await asyncio.wait_for(_get(base, size), 20)
        assert (status, got, clean, digest) == (b"HTTP/1.1 200 OK", size, True, _digest(size))
        assert node.metrics.links.get() == 1


async def test_an_app_pausing_mid_body_keeps_its_link(redis_server: RedisServer) -> None:
    # 1.1 s between chunks, more than two of the watchdog's 0.5 s ticks (peer_timeout 1 s):
    # the Node's heartbeats keep the link alive through the app's pauses.
    size = 3 * MIB
    options = {"peer_timeout": 1.0}
    async with stack(redis_server, Streamer(pause=1.1), **options) as (base, distributor, _):
        status, digest, got, clean = await asyncio.wait_for(_get(base, size), 20)
        assert (status, got, clean) == (b"HTTP/1.1 200 OK", size, True)
        assert digest == _digest(size)
        assert distributor.metrics.links.get() == 1


async def test_a_graceful_node_stop_lets_a_slow_client_read_its_whole_download(
    redis_server: RedisServer,
) -> None:
    """A rolling deploy: the Node is stopped gracefully once its app sent the last body of a
    24 MiB download a slower client still reads. The job lasts until the distributor read the
    link's last frame (so the stop waits for it), and the distributor, with the response in
    hand, does not abort it when it loses the Node: the client gets every byte."""
    app = Streamer()
    size = 24 * MIB
    distributor = create_distributor(
        url=redis_server.url, key=KEY, link="127.0.0.1", liveness_interval=0.2, peer_timeout=2.0
    )
    async with serve_app(distributor) as base:
        node = Node(url=redis_server.url, key=KEY, app=app, liveness_interval=0.2, peer_timeout=2.0)
        serving = asyncio.ensure_future(node.serve())
        try:
            await asyncio.wait_for(node.wait_started(), 10)
            download = asyncio.ensure_future(_get(base, size, read_pause=0.02, read_size=64 * 1024))
            await asyncio.wait_for(app.ended.wait(), 30)
            node.stop()  # graceful, as on SIGTERM
            await asyncio.wait_for(serving, 30)
            status, digest, got, clean = await asyncio.wait_for(download, 40)
        finally:
            serving.cancel()
        assert node.metrics.links.total() == 1
        assert (status, got, clean) == (b"HTTP/1.1 200 OK", size, True)
        assert digest == _digest(size)
        assert distributor.metrics.aborts.total() == 0
