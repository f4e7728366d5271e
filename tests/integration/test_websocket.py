"""WebSockets through a real uvicorn, the distributor, a Node and a private redis-server.

The client is the ``websockets`` library; uvicorn serves WebSockets with it too. Every wait is
bounded, and every test ends with Redis holding no key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from minidasgi import Node, create_distributor
from minidasgi.outbox import Outbox

from .redis_server import RedisServer
from .stack import (
    NodeProcess,
    distributor_process,
    redis_keys,
    run_node,
    serve_app,
    uvicorn_only,
    ws_url,
)

pytestmark = pytest.mark.timeout(60)

KEY = "ws"
WAIT = 10.0  # seconds: bound on any single wait that should be quick
KILL_NOTICED = 5.0  # seconds: a dead peer must be noticed well within this (about 1-3 s)


class WsApp:
    """A WebSocket app whose behaviour depends on the path; records what it saw.

    ``/echo`` echoes; ``/reject`` closes before accepting; ``/subprotocol`` accepts ``chat``
    when offered; ``/headers`` accepts with extra headers; ``/close4001`` accepts then closes
    with 4001 and a reason; ``/record`` records every event until the disconnect; ``/deny``
    answers 401 through the ``websocket.http.response`` extension when the scope offers it;
    ``/late`` waits a second before accepting, then echoes.
    """

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.ended: list[str] = []
        self.accepted = asyncio.Event()
        self.disconnected = asyncio.Event()
        self._changed = asyncio.Condition()

    async def _end(self, how: str) -> None:
        self.ended.append(how)
        self.disconnected.set()
        async with self._changed:
            self._changed.notify_all()

    async def wait_ended(self, count: int, timeout: float) -> None:
        """Wait until ``count`` connections ended with a disconnect."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: self.ended.count("disconnect") >= count), timeout
            )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        self.scopes.append(scope)
        path = scope["path"]
        try:
            connect = await receive()
            assert connect["type"] == "websocket.connect"
            if path == "/reject":
                await send({"type": "websocket.close", "code": 1000})
                return
            if path == "/deny":
                if "websocket.http.response" in scope.get("extensions", {}):
                    body = b"no entry without a token\n"
                    await send(
                        {
                            "type": "websocket.http.response.start",
                            "status": 401,
                            "headers": [
                                (b"content-type", b"text/plain"),
                                (b"content-length", b"%d" % len(body)),
                                (b"www-authenticate", b"Bearer"),
                            ],
                        }
                    )
                    await send({"type": "websocket.http.response.body", "body": body})
                else:
                    await send({"type": "websocket.close", "code": 1000})
                return
            if path == "/late":  # thinks before answering the handshake
                await asyncio.sleep(1.0)
            accept: dict[str, Any] = {"type": "websocket.accept"}
            if path == "/subprotocol" and "chat" in scope.get("subprotocols", ()):
                accept["subprotocol"] = "chat"
            if path == "/headers":
                accept["headers"] = [(b"x-extra", b"hello"), (b"set-cookie", b"a=1")]
            await send(accept)
            self.accepted.set()
            if path == "/close4001":
                await send({"type": "websocket.send", "text": "last words"})
                await send({"type": "websocket.send", "bytes": b"really"})
                await send({"type": "websocket.close", "code": 4001, "reason": "go away"})
                return
            while True:
                message = await receive()
                self.events.append(message)
                if message["type"] == "websocket.disconnect":
                    await self._end("disconnect")
                    return
                if path == "/record":
                    continue
                if message.get("bytes") is not None:
                    await send({"type": "websocket.send", "bytes": message["bytes"]})
                else:
                    await send({"type": "websocket.send", "text": message["text"]})
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            self.disconnected.set()
            raise


@contextlib.asynccontextmanager
async def _stack(
    redis_server: RedisServer, app: Any, *, concurrency: int = 100, **options: Any
) -> AsyncIterator[str]:
    """The distributor under uvicorn and an in-process Node running ``app``; yields ws://."""
    distributor = create_distributor(url=redis_server.url, key=KEY, **options)
    node = Node(url=redis_server.url, app=app, key=KEY, lifespan="off", concurrency=concurrency)
    async with serve_app(distributor) as base, run_node(node):
        yield ws_url(base)


async def test_accept_and_echo_text_and_bytes(redis_server: RedisServer) -> None:
    app = WsApp()
    async with _stack(redis_server, app) as url:
        async with websockets.connect(url + "/echo", max_size=None) as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), WAIT) == "hello"
            await ws.send(b"\x00\x01binary\xff")
            assert await asyncio.wait_for(ws.recv(), WAIT) == b"\x00\x01binary\xff"
            await ws.send("")
            assert await asyncio.wait_for(ws.recv(), WAIT) == ""
            await ws.send(b"")
            assert await asyncio.wait_for(ws.recv(), WAIT) == b""
        await asyncio.wait_for(app.disconnected.wait(), WAIT)
    scope = app.scopes[0]
    assert scope["type"] == "websocket"
    assert scope["path"] == "/echo"
    assert scope["scheme"] == "ws"
    assert isinstance(dict(scope["headers"])[b"host"], bytes)
    assert redis_keys(redis_server) == []


async def test_slow_accept_outlives_the_worker_timeout(redis_server: RedisServer) -> None:
    """The ack says a worker took the socket, not that the app answered: an app may take
    longer than ``worker_timeout`` to accept."""
    async with _stack(redis_server, WsApp(), worker_timeout=0.5) as url:
        async with websockets.connect(url + "/late") as ws:
            await ws.send("late")
            assert await asyncio.wait_for(ws.recv(), WAIT) == "late"
    assert redis_keys(redis_server) == []


async def test_reject_before_accept_is_403(redis_server: RedisServer) -> None:
    async with _stack(redis_server, WsApp()) as url:
        with pytest.raises(InvalidStatus) as info:
            await asyncio.wait_for(websockets.connect(url + "/reject"), WAIT)
        assert info.value.response.status_code == 403
    assert redis_keys(redis_server) == []


async def test_subprotocol_negotiation(redis_server: RedisServer) -> None:
    app = WsApp()
    async with _stack(redis_server, app) as url:
        async with websockets.connect(
            url + "/subprotocol",
            subprotocols=["a", "chat"],  # type: ignore[list-item]
        ) as ws:
            assert ws.subprotocol == "chat"
            await ws.send("x")
            assert await asyncio.wait_for(ws.recv(), WAIT) == "x"
        async with websockets.connect(url + "/subprotocol") as ws:
            assert ws.subprotocol is None
    assert app.scopes[0]["subprotocols"] == ["a", "chat"]
    assert app.scopes[1]["subprotocols"] == []
    assert redis_keys(redis_server) == []


async def test_extra_headers_on_accept(redis_server: RedisServer) -> None:
    async with _stack(redis_server, WsApp()) as url:
        async with websockets.connect(url + "/headers") as ws:
            assert ws.response is not None
            headers = ws.response.headers
            assert headers["x-extra"] == "hello"
            assert headers["set-cookie"] == "a=1"
            await ws.send("still works")
            assert await asyncio.wait_for(ws.recv(), WAIT) == "still works"
    assert redis_keys(redis_server) == []


async def test_ten_thousand_pipelined_messages_in_order(redis_server: RedisServer) -> None:
    count = 10_000
    async with _stack(redis_server, WsApp()) as url:
        async with websockets.connect(url + "/echo", max_size=None) as ws:

            async def sender() -> None:
                for i in range(count):
                    await ws.send(f"message {i}" if i % 2 else b"%d" % i)

            async def receiver() -> list[str | bytes]:
                return [await ws.recv() for _ in range(count)]

            sending = asyncio.ensure_future(sender())
            received = await asyncio.wait_for(receiver(), 30)
            await asyncio.wait_for(sending, WAIT)
    expected = [f"message {i}" if i % 2 else b"%d" % i for i in range(count)]
    assert received == expected
    assert redis_keys(redis_server) == []


async def test_two_hundred_concurrent_sockets(redis_server: RedisServer) -> None:
    sockets = 200
    app = WsApp()
    async with _stack(redis_server, app, concurrency=250) as url:
        opened = 0
        all_open = asyncio.Event()

        async def conversation(n: int) -> list[str | bytes]:
            nonlocal opened
            async with websockets.connect(url + "/echo", open_timeout=20) as ws:
                opened += 1
                if opened == sockets:
                    all_open.set()
                # Hold every socket open until all are: they really run at the same time.
                await asyncio.wait_for(all_open.wait(), 20)
                replies = []
                for i in range(3):
                    await ws.send(f"{n}:{i}")
                    replies.append(await asyncio.wait_for(ws.recv(), 20))
                await ws.send(b"%d" % n)
                replies.append(await asyncio.wait_for(ws.recv(), 20))
                return replies

        results = await asyncio.wait_for(
            asyncio.gather(*(conversation(n) for n in range(sockets))), 40
        )
        for n, replies in enumerate(results):
            assert replies == [f"{n}:0", f"{n}:1", f"{n}:2", b"%d" % n]
        await app.wait_ended(sockets, WAIT)
        assert app.ended.count("disconnect") == sockets
    assert redis_keys(redis_server) == []


async def test_ten_mib_binary_and_one_mib_multibyte_text(redis_server: RedisServer) -> None:
    binary = os.urandom(10 * 1024 * 1024)
    unit = "aé€😀ß字"  # 1, 2, 3, 4, 2 and 3 UTF-8 bytes
    text = unit * (1024 * 1024 // len(unit.encode()) + 1)
    assert len(text.encode()) > 1024 * 1024
    emoji = "😀" * (3 * 16384 + 5)  # 4 bytes each: pieces at the byte ceiling of a chunk
    async with _stack(redis_server, WsApp()) as url:
        async with websockets.connect(url + "/echo", max_size=None) as ws:
            await ws.send(binary)
            echoed = await asyncio.wait_for(ws.recv(), 20)
            assert isinstance(echoed, bytes)
            assert len(echoed) == len(binary)
            assert echoed == binary
            for message in (text, emoji):
                await ws.send(message)
                echoed_text = await asyncio.wait_for(ws.recv(), 20)
                assert isinstance(echoed_text, str)
                assert len(echoed_text) == len(message)
                assert echoed_text == message
            # The connection is still usable afterwards.
            await ws.send("small")
            assert await asyncio.wait_for(ws.recv(), WAIT) == "small"
    assert redis_keys(redis_server) == []


async def test_app_closes_with_code_and_reason(redis_server: RedisServer) -> None:
    async with _stack(redis_server, WsApp()) as url:
        async with websockets.connect(url + "/close4001") as ws:
            # What the app sent before closing arrives first, in order.
            assert await asyncio.wait_for(ws.recv(), WAIT) == "last words"
            assert await asyncio.wait_for(ws.recv(), WAIT) == b"really"
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), WAIT)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 4001
        assert info.value.rcvd.reason == "go away"
    assert redis_keys(redis_server) == []


@uvicorn_only  # compares with uvicorn's message shape; hypercorn adds "bytes": None
async def test_client_close_code_reaches_the_app(redis_server: RedisServer) -> None:
    app = WsApp()
    async with _stack(redis_server, app) as url:
        async with websockets.connect(url + "/record") as ws:
            await ws.send("one")
            await ws.send(b"two")
            await asyncio.wait_for(ws.close(code=4002, reason="client leaves"), WAIT)
        await asyncio.wait_for(app.disconnected.wait(), WAIT)
    assert app.ended == ["disconnect"]
    assert app.events[0] == {"type": "websocket.receive", "text": "one"}
    assert app.events[1] == {"type": "websocket.receive", "bytes": b"two"}
    last = app.events[-1]
    assert last["type"] == "websocket.disconnect"
    assert last["code"] == 4002
    assert last.get("reason", "client leaves") == "client leaves"
    assert redis_keys(redis_server) == []


async def test_node_killed_mid_conversation_closes_1011(redis_server: RedisServer) -> None:
    distributor = create_distributor(url=redis_server.url, key=KEY)
    node = NodeProcess(redis_server.url, KEY, "apps:ws_echo")
    async with serve_app(distributor) as base:
        await asyncio.to_thread(node.start)
        try:
            async with websockets.connect(ws_url(base) + "/", subprotocols=["chat"]) as ws:  # type: ignore[list-item]
                assert ws.subprotocol == "chat"
                for i in range(5):
                    await ws.send(f"before {i}")
                    assert await asyncio.wait_for(ws.recv(), WAIT) == f"before {i}"
                await asyncio.to_thread(node.kill)
                killed = time.monotonic()
                # The client sends nothing: the distributor must notice the silent death.
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), KILL_NOTICED)
                noticed = time.monotonic() - killed
        finally:
            await asyncio.to_thread(node.stop)
    assert info.value.rcvd is not None, info.value
    assert info.value.rcvd.code == 1011
    assert noticed < KILL_NOTICED, f"closed {noticed:.2f} s after the kill"
    assert redis_keys(redis_server) == []


async def test_no_worker_refuses_the_handshake(redis_server: RedisServer) -> None:
    distributor = create_distributor(url=redis_server.url, key=KEY, worker_timeout=0.5)
    async with serve_app(distributor) as base:
        started = time.monotonic()
        with pytest.raises(InvalidStatus) as info:
            await asyncio.wait_for(websockets.connect(ws_url(base) + "/echo"), WAIT)
        elapsed = time.monotonic() - started
    assert info.value.response.status_code == 403
    assert 0.4 < elapsed < 3
    assert redis_keys(redis_server) == []


async def test_distributor_killed_disconnects_the_app(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    app = WsApp()
    node = Node(url=redis_server.url, app=app, key=KEY, lifespan="off")
    async with distributor_process(redis_server.url, KEY) as (base, process):
        url = base.replace("http://", "ws://")
        async with run_node(node):
            ws = await asyncio.wait_for(websockets.connect(url + "/echo"), WAIT)
            try:
                await ws.send("hi")
                assert await asyncio.wait_for(ws.recv(), WAIT) == "hi"
                assert node.in_flight == 1
                process.kill()
                killed = time.monotonic()
                await asyncio.wait_for(app.disconnected.wait(), 8)
                noticed = time.monotonic() - killed
                for _ in range(60):  # the job ends within 3 s
                    if not node.in_flight:
                        break
                    await asyncio.sleep(0.05)
                assert node.in_flight == 0
            finally:
                await ws.close()
    assert noticed < KILL_NOTICED, f"the app noticed after {noticed:.2f} s"
    assert app.ended == ["disconnect"]
    assert app.events[-1]["type"] == "websocket.disconnect"
    assert redis_keys(redis_server) == []


async def test_denial_response_extension(redis_server: RedisServer) -> None:
    """uvicorn offers ``websocket.http.response``: the Node's app sees it and can answer 401."""
    direct = WsApp()
    async with serve_app(direct) as base:
        with pytest.raises(InvalidStatus) as info:
            await asyncio.wait_for(websockets.connect(ws_url(base) + "/deny"), WAIT)
        direct_response = info.value.response
    offered = direct.scopes[0].get("extensions", {})

    app = WsApp()
    async with _stack(redis_server, app) as url:
        with pytest.raises(InvalidStatus) as info:
            await asyncio.wait_for(websockets.connect(url + "/deny"), WAIT)
        response = info.value.response
    # uvicorn (both of its websockets-based protocols) offers the extension; the Node's app
    # gets it exactly as uvicorn gave it, and its denial reaches the client unchanged.
    assert offered == {"websocket.http.response": {}}
    assert app.scopes[0].get("extensions") == offered
    assert direct_response.status_code == 401
    assert response.status_code == 401
    assert response.body == b"no entry without a token\n"
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "text/plain"
    assert response.body == direct_response.body
    assert redis_keys(redis_server) == []


async def test_no_keys_left_after_a_mix(redis_server: RedisServer) -> None:
    """Hygiene: after accepted, refused, denied, app-closed and client-closed sockets."""
    app = WsApp()
    async with _stack(redis_server, app) as url:
        for path in ("/reject", "/deny"):
            with pytest.raises(InvalidStatus):
                await asyncio.wait_for(websockets.connect(url + path), WAIT)
        async with websockets.connect(url + "/close4001") as ws:
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), WAIT)
        for _ in range(20):
            async with websockets.connect(url + "/echo") as ws:
                await ws.send("x")
                assert await asyncio.wait_for(ws.recv(), WAIT) == "x"
        async with websockets.connect(url + "/record") as ws:
            await ws.send("y")
            await ws.close(code=4002)
        await asyncio.wait_for(app.disconnected.wait(), WAIT)
    assert redis_keys(redis_server) == []


# The cost of a conversation, asserted structurally (PUBLISH commands from INFO commandstats).


def _publish_calls(server: RedisServer) -> int:
    info = server.command("INFO", "commandstats")
    assert isinstance(info, bytes)
    for line in info.decode().splitlines():
        if line.startswith("cmdstat_publish:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


@contextlib.asynccontextmanager
async def _patient_stack(redis_server: RedisServer, app: Any) -> AsyncIterator[str]:
    """``_stack`` whose distributor lets a held message wait a minute for company: what it
    holds then travels with the next message to the Node whatever the timing (or, wrongly
    held, stalls the test)."""
    distributor = create_distributor(url=redis_server.url, key=KEY, liveness_interval=3600)
    distributor.outbox = Outbox(lambda: distributor._client, hold_time=60.0)
    node = Node(url=redis_server.url, app=app, key=KEY, lifespan="off")
    async with serve_app(distributor) as base, run_node(node):
        yield ws_url(base)


async def test_a_lockstep_echo_costs_two_publish_per_round_trip(redis_server: RedisServer) -> None:
    # One PUBLISH each way per message: the distributor's credit (every half window) rides
    # with the client's next message instead of costing a PUBLISH of its own (2.25 before).
    n = 40
    async with _patient_stack(redis_server, WsApp()) as url:
        async with websockets.connect(url + "/echo") as ws:
            for i in range(8):  # warm up: the accept, the first credits
                await ws.send(f"warm {i}")
                assert await asyncio.wait_for(ws.recv(), WAIT) == f"warm {i}"
            before = await asyncio.to_thread(_publish_calls, redis_server)
            for i in range(n):
                await ws.send(f"m{i}")
                assert await asyncio.wait_for(ws.recv(), WAIT) == f"m{i}"
            publishes = await asyncio.to_thread(_publish_calls, redis_server) - before
    assert publishes <= 2 * n + 1, publishes
    assert redis_keys(redis_server) == []


async def test_a_held_credit_never_stalls_a_stream_to_the_client(
    redis_server: RedisServer,
) -> None:
    # The Node sends without the client sending anything: no message of the distributor's
    # can take a held credit along, so only the next credit may (never two held in a row).
    count = 500

    async def push(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        for i in range(count):
            await send({"type": "websocket.send", "text": f"p{i}"})
        await receive()  # the client's disconnect

    async with _patient_stack(redis_server, push) as url:
        async with websockets.connect(url + "/") as ws:
            received = [await asyncio.wait_for(ws.recv(), WAIT) for _ in range(count)]
    assert received == [f"p{i}" for i in range(count)]
    assert redis_keys(redis_server) == []


async def test_sixteen_lockstep_echoes_cost_about_one_message_each_way_per_round_trip(
    redis_server: RedisServer,
) -> None:
    # Past 8 sockets the credit pool gives each new one a window of one 128 KiB message;
    # counted in messages that returned a CREDIT per message each way (3.3 messages per round
    # trip). Counted in bytes (wire.CREDIT_UNIT), that window holds 64 small messages before
    # it returns credit, as the first sockets' windows do.
    sockets, rounds = 16, 40
    distributor = create_distributor(url=redis_server.url, key=KEY, liveness_interval=3600)
    node = Node(url=redis_server.url, app=WsApp(), key=KEY, lifespan="off", liveness_interval=3600)
    async with serve_app(distributor) as base, run_node(node):
        clients = [await websockets.connect(ws_url(base) + "/echo") for _ in range(sockets)]

        async def lockstep(ws: Any, tag: str) -> None:
            for i in range(rounds):
                await ws.send(f"{tag}{i}")
                assert await asyncio.wait_for(ws.recv(), WAIT) == f"{tag}{i}"

        await asyncio.gather(*(lockstep(ws, f"w{n}.") for n, ws in enumerate(clients)))
        before = distributor.outbox.batcher.items + node.outbox.batcher.items
        await asyncio.gather(*(lockstep(ws, f"{n}.") for n, ws in enumerate(clients)))
        sent = distributor.outbox.batcher.items + node.outbox.batcher.items - before
        for ws in clients:
            await ws.close()
    assert sent <= 2.1 * sockets * rounds, sent / (sockets * rounds)


async def test_a_client_message_leaves_the_distributor_with_no_flush_of_its_outbox(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The distributor's outbox is eager: a client's message, posted by the last callback of
    # its loop turn, leaves at once, not in the outbox's flush one loop iteration later
    # (before: a flush handle, and an iteration, per message). The client, uvicorn and the
    # Node share the test's loop: a turn in which one of them has work left flushes at its end.
    n = 20
    distributor = create_distributor(url=redis_server.url, key=KEY, liveness_interval=3600)
    node = Node(url=redis_server.url, app=WsApp(), key=KEY, lifespan="off", liveness_interval=3600)
    flushes = 0
    run = asyncio.Handle._run

    def counted(handle: asyncio.Handle) -> None:
        nonlocal flushes
        callback = getattr(handle, "_callback", None)
        if getattr(callback, "__self__", None) is distributor.outbox.batcher:
            flushes += 1
        run(handle)

    async with serve_app(distributor) as base, run_node(node):
        async with websockets.connect(ws_url(base) + "/echo") as ws:
            for i in range(8):  # warm up: the accept, the first credits
                await ws.send(f"warm {i}")
                assert await asyncio.wait_for(ws.recv(), WAIT) == f"warm {i}"
            monkeypatch.setattr(asyncio.Handle, "_run", counted)
            for i in range(n):
                await ws.send(f"m{i}")
                assert await asyncio.wait_for(ws.recv(), WAIT) == f"m{i}"
            monkeypatch.undo()
    assert flushes <= n // 2, f"{flushes} flushes for {n} messages"
    assert redis_keys(redis_server) == []
