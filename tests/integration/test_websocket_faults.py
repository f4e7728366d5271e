"""WebSockets under faults of real processes and clients: a pause (SIGSTOP) of the Node in
the middle of a conversation flowing both ways; a client that stops reading while the app
floods it; the Node's stop with sockets open.

The pause is shorter than ``peer_timeout`` and the reply bound, and longer than a liveness
round: the conversation must go on with every message delivered once and in order, in both
directions. (Pauses of the distributor and of redis-server are not repeated here: the
distributor's mirrors the Node's, and Redis stopped mid-response is ``test_liveness``'s.)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from minidasgi import Node, create_distributor

from . import apps
from .redis_server import RedisServer
from .stack import SERVER, NodeProcess, poll, redis_keys, run_node, serve_app, ws_url

pytestmark = pytest.mark.timeout(60)

KEY = "ws-faults"
WAIT = 10.0  # seconds: bound on any single wait that should be quick
PAUSE = 1.5  # seconds the Node stays stopped: over a liveness round (1 s), short of peer_timeout


async def _stopped(pid: int) -> None:
    """Stop process ``pid`` for ``PAUSE`` seconds, then let it run again."""
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(PAUSE)
    finally:
        os.kill(pid, signal.SIGCONT)


async def _converse_through(url: str, pause: Callable[[], Awaitable[None]]) -> None:
    """Talk to ``apps.ws_chatter`` at ``url`` both ways (a message from the client every
    10 ms, a tick from the app every 10 ms), ``pause()`` in the middle, go on a while, then
    check that the socket is still open and that every echo and every tick came once and in
    order."""
    async with websockets.connect(url, max_size=None) as ws:
        echoes: list[int] = []
        ticks: list[int] = []
        sent = 0

        async def receive() -> None:
            async for message in ws:
                assert isinstance(message, str)
                kind, _, number = message.partition(" ")
                (echoes if kind == "echo" else ticks).append(int(number))

        async def send_for(seconds: float) -> None:
            nonlocal sent
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            while loop.time() < end:
                await ws.send(str(sent))
                sent += 1
                await asyncio.sleep(0.01)

        receiving = asyncio.ensure_future(receive())
        try:
            await send_for(0.5)
            sending = asyncio.ensure_future(send_for(PAUSE + 1.5))
            await asyncio.sleep(0.1)
            await pause()
            await asyncio.wait_for(sending, WAIT)
            assert await poll(lambda: len(echoes) >= sent or receiving.done(), WAIT), (
                f"{len(echoes)} echoes of {sent} messages"
            )
            assert not receiving.done(), receiving
            # The socket goes on after the pause.
            await ws.send("after")
            assert await poll(lambda: len(echoes) > sent or receiving.done(), WAIT)
        finally:
            receiving.cancel()
            await asyncio.gather(receiving, return_exceptions=True)
    assert echoes[:sent] == list(range(sent)), "echoes lost, doubled or reordered"
    assert ticks == list(range(len(ticks))), "ticks lost, doubled or reordered"
    assert len(ticks) > 100


async def test_a_node_paused_mid_conversation_loses_nothing(redis_server: RedisServer) -> None:
    distributor = create_distributor(url=redis_server.url, key=KEY)
    async with serve_app(distributor) as base:
        with NodeProcess(redis_server.url, KEY, "apps:ws_chatter") as node:
            assert node.process is not None
            pid = node.process.pid
            await _converse_through(ws_url(base) + "/", lambda: _stopped(pid))
    assert await poll(lambda: redis_keys(redis_server) == [], WAIT)


def _silent_client(port: int, path: str = "/flood") -> socket.socket:
    """A WebSocket client of ``path`` on a raw socket with a small receive buffer: it
    completes the handshake, then never reads and never closes."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: not one byte of the flood is read
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


async def test_a_client_that_stops_reading_holds_the_flood_back(redis_server: RedisServer) -> None:
    """The app sends 64 KiB messages for ever to a client that never reads: flow control holds
    the app's ``send`` back after a few MiB (about 50 messages; 32 served directly by uvicorn),
    rather than piling the flood up in the Node, Redis or the distributor. The socket stays
    open and its Node slot held while the client neither reads nor closes, as its app stays
    blocked in ``send`` served directly (uvicorn's keepalive ping cannot get through either);
    the Node's other slots serve on."""
    sent = 0
    flooding = asyncio.Event()

    async def flood(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal sent
        if scope["path"] != "/flood":
            await apps.ws_echo(scope, receive, send)
            return
        await receive()
        await send({"type": "websocket.accept"})
        flooding.set()
        while True:
            await send({"type": "websocket.send", "bytes": b"x" * 65536})
            sent += 1

    distributor = create_distributor(url=redis_server.url, key=KEY)
    node = Node(url=redis_server.url, app=flood, key=KEY, lifespan="off", concurrency=2)
    async with serve_app(distributor) as base, run_node(node):
        port = int(base.rsplit(":", 1)[1])
        sock = await asyncio.to_thread(_silent_client, port)
        try:
            await asyncio.wait_for(flooding.wait(), WAIT)
            # Held back: the count stops growing (a flood unheld sends thousands a second).
            last = -1
            while sent != last:
                last = sent
                await asyncio.sleep(0.5)
            assert sent < 256, f"{sent} messages of 64 KiB sent to a client that reads none"
            assert node.in_flight == 1
            async with websockets.connect(ws_url(base) + "/other") as ws:
                await ws.send("still served")
                assert await asyncio.wait_for(ws.recv(), WAIT) == "still served"
        finally:
            sock.close()
        assert await poll(lambda: node.in_flight == 0, WAIT), "the slot outlived the client"
    assert redis_keys(redis_server) == []


async def test_sigterm_closes_websockets_1012_and_ends_streams_in_time(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to a Node with three WebSockets open, one whose app accepts only once the Node
    drains (once another socket's app heard its 1012; its log says so), and three streamed
    responses in flight (two that would run 100 s, one that ends in 0.5 s): as uvicorn does
    at its own shutdown, each WebSocket is closed with 1012 (Service Restart) at once, the
    late one as it is accepted, and each app sees ``websocket.disconnect`` with that code;
    the short stream completes, the long ones are aborted at ``shutdown_timeout``; the Node
    exits 0 and leaves no key. (Before, each WebSocket held the drain to
    ``shutdown_timeout``, its app was cancelled and its client got 1011, an internal
    error.)"""
    log = tmp_path / "ends.log"
    monkeypatch.setenv("MINIDASGI_TEST_LOG", str(log))  # inherited by the Node process
    distributor = create_distributor(url=redis_server.url, key=KEY)
    # shutdown_timeout 2 s: the short stream (0.5 s) ends well within it, the long ones not.
    node = NodeProcess(redis_server.url, KEY, "apps:ws_echo_or_slow", "--shutdown-timeout", "2")
    async with serve_app(distributor) as base:
        await asyncio.to_thread(node.start)
        try:
            sockets = [
                await asyncio.wait_for(websockets.connect(ws_url(base) + "/"), WAIT)
                for _ in range(3)
            ]
            for ws in sockets:
                await ws.send("hi")
                assert await asyncio.wait_for(ws.recv(), WAIT) == "hi"
            async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:

                async def stream(pieces: int) -> str:
                    try:
                        async with client.stream("GET", f"/?{pieces}") as response:
                            body = b"".join([chunk async for chunk in response.aiter_bytes()])
                    except httpx.RemoteProtocolError:
                        return "aborted"
                    return body.decode().splitlines()[-1]

                streams = [asyncio.ensure_future(stream(n)) for n in (1000, 1000, 5)]
                late = asyncio.ensure_future(websockets.connect(ws_url(base) + "/late"))
                exchanges = distributor._exchanges.values
                started = lambda: sum(e.started for e in exchanges())  # noqa: E731
                taken = lambda: sum(e.node is not None for e in exchanges())  # noqa: E731
                assert await poll(lambda: started() == 6 and taken() == 7, WAIT)
                assert node.process is not None
                node.process.send_signal(signal.SIGTERM)
                sockets.append(await asyncio.wait_for(late, WAIT))
                codes = []
                for ws in sockets:
                    with pytest.raises(ConnectionClosed) as info:
                        await asyncio.wait_for(ws.recv(), WAIT)
                    codes.append(info.value.rcvd.code if info.value.rcvd else None)
                ends = await asyncio.wait_for(asyncio.gather(*streams), WAIT)
            code = await asyncio.wait_for(asyncio.to_thread(node.process.wait), WAIT)
        finally:
            await asyncio.to_thread(node.stop)
    assert codes == [1012] * 4
    assert sorted(ends) == ["aborted", "aborted", "done"]
    assert code == 0
    ends_of_sockets = log.read_text().splitlines()
    assert "accepted while draining" in ends_of_sockets  # not before the signal
    ends_of_sockets.remove("accepted while draining")
    assert ends_of_sockets == ["disconnect 1012"] * 4
    assert redis_keys(redis_server) == []


async def test_sigterm_while_an_app_is_blocked_sending_to_a_client_that_reads_nothing(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to a Node whose WebSocket app is blocked in ``send``, held back by flow control
    (its client reads nothing): the Node's 1012 close waits its turn behind that send, and at
    ``shutdown_timeout`` the app is cancelled as any other; the Node exits 0 and logs no
    error. (Before, the close then raised ``WebSocketClosed`` in a task nobody read, and
    asyncio logged "Task exception was never retrieved" at ERROR: once per such socket at
    every restart.) Its log is not asked to be empty: a publish may meet the publisher
    closing as the Node exits ("cannot publish", a WARNING), a race of its own."""
    log = tmp_path / "flood.log"
    monkeypatch.setenv("MINIDASGI_TEST_LOG", str(log))  # inherited by the Node process
    distributor = create_distributor(url=redis_server.url, key=KEY)
    node = NodeProcess(redis_server.url, KEY, "apps:ws_flood", "--shutdown-timeout", "1")

    def lines() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    async with serve_app(distributor) as base:
        port = int(base.rsplit(":", 1)[1])
        await asyncio.to_thread(node.start)
        try:
            assert node.process is not None
            sock = await asyncio.to_thread(_silent_client, port, "/")
            try:
                assert await poll(lambda: len(lines()) > 0, WAIT)
                last = -1
                while len(lines()) != last:  # held back: the count stops growing
                    last = len(lines())
                    await asyncio.sleep(0.5)
                node.process.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(asyncio.to_thread(node.process.wait), WAIT)
            finally:
                sock.close()
            output = await asyncio.to_thread(node.output)
        finally:
            await asyncio.to_thread(node.stop)
        assert await poll(lambda: redis_keys(redis_server) == [], WAIT)
    assert code == 0
    assert "ERROR" not in output and "never retrieved" not in output, output
    assert lines()[-1] == "cancelled"


async def test_an_app_that_only_sends_ends_once_its_client_left(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An app that pushes a message every 10 ms and never calls ``receive()`` (a ticker, a
    notification feed): once the client closes, its next ``send`` raises an ``OSError``, as the
    ASGI spec asks and uvicorn does (Starlette makes it ``WebSocketDisconnect``), so the app
    ends and its Node slot is free, with nothing logged above INFO. (Before, each send returned
    as if delivered: the app pushed into the void for ever, holding its slot.)"""
    ended: list[BaseException] = []

    async def ticker(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        try:
            while True:
                await send({"type": "websocket.send", "text": "tick"})
                await asyncio.sleep(0.01)
        except BaseException as exc:
            ended.append(exc)
            raise

    async def tick_then_leave(url: str) -> None:
        async with websockets.connect(url) as ws:
            for _ in range(5):
                assert await asyncio.wait_for(ws.recv(), WAIT) == "tick"

    if SERVER == "uvicorn":  # served directly, for comparison (hypercorn drops the sends)
        async with serve_app(ticker) as base:
            await tick_then_leave(ws_url(base) + "/")
            assert await poll(lambda: ended, WAIT)
        assert isinstance(ended[0], OSError), repr(ended[0])
        ended.clear()
    distributor = create_distributor(url=redis_server.url, key=KEY)
    node = Node(url=redis_server.url, app=ticker, key=KEY, lifespan="off")
    with caplog.at_level(logging.INFO, logger="minidasgi"):
        async with serve_app(distributor) as base, run_node(node):
            await tick_then_leave(ws_url(base) + "/")
            assert await poll(lambda: node.in_flight == 0, WAIT), "the app still runs"
            # The distributor ends its side once the close and the client's end reach it: a
            # moment after the Node's; an exchange kept would fail the poll.
            assert await poll(lambda: not distributor._exchanges, WAIT), distributor._exchanges
    assert len(ended) == 1 and isinstance(ended[0], OSError), ended
    assert [r.getMessage() for r in caplog.records if r.levelno > logging.INFO] == []
    assert redis_keys(redis_server) == []


def _masked_text_frame(text: bytes) -> bytes:
    """A client's WebSocket text frame (masked, as a client must), ``text`` under 126 bytes."""
    mask = os.urandom(4)
    payload = bytes(byte ^ mask[i % 4] for i, byte in enumerate(text))
    return bytes([0x81, 0x80 | len(text)]) + mask + payload


async def test_a_client_sending_after_the_app_closed_reaches_no_app(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The app closes after the first message; a raw client goes on sending 200 messages
    without reading the close: none reaches the app (its ``receive()`` answers the
    disconnect), nothing is logged above INFO, and no exchange, job or key is left. A guard:
    this behaved when the hunt came to it."""
    seen: list[dict[str, Any]] = []

    async def closer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        seen.append(await receive())
        await send({"type": "websocket.close", "code": 4000})
        seen.append(await receive())

    def client(port: int) -> None:
        sock = _silent_client(port, "/")
        with sock:
            sock.sendall(_masked_text_frame(b"first"))
            with contextlib.suppress(OSError):  # hypercorn closes the connection soon
                for i in range(200):
                    sock.sendall(_masked_text_frame(b"after %d" % i))

    distributor = create_distributor(url=redis_server.url, key=KEY)
    node = Node(url=redis_server.url, app=closer, key=KEY, lifespan="off")
    with caplog.at_level(logging.INFO, logger="minidasgi"):
        async with serve_app(distributor) as base, run_node(node):
            await asyncio.to_thread(client, int(base.rsplit(":", 1)[1]))
            assert await poll(lambda: len(seen) == 2 and node.in_flight == 0, WAIT), seen
            # The distributor ends its side once the close and the client's end reach it: a
            # moment after the Node's; an exchange kept would fail the poll.
            assert await poll(lambda: not distributor._exchanges, WAIT), distributor._exchanges
    assert (seen[0]["type"], seen[0]["text"]) == ("websocket.receive", "first")
    assert seen[1]["type"] == "websocket.disconnect"
    assert [r.getMessage() for r in caplog.records if r.levelno > logging.INFO] == []
    assert redis_keys(redis_server) == []
