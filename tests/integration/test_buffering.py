"""Request buffering, slow clients and ``Expect: 100-continue``, through a real uvicorn (or
hypercorn, with ``MINIDASGI_TEST_SERVER``: "100 Continue" is said as that server says it
serving the app directly), the distributor, a Node and a private redis-server. Slow clients
are raw sockets that send their headers and a few bytes of body, then nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from minidasgi import Distributor, Node

from . import apps
from .redis_server import RedisServer
from .stack import SERVER, poll, run_node, serve_app

pytestmark = pytest.mark.timeout(90)

KIB = 1024
MIB = 1024 * 1024


def _address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


@contextlib.asynccontextmanager
async def _stalled_uploads(
    base: str, count: int, *, length: int = 10 * MIB, sent: bytes = b"abc"
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    """``count`` uploads that announce ``length`` bytes, send ``sent``, then stall."""
    host, port = _address(base)
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(host, port)
            clients.append((reader, writer))
            head = f"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n"
            writer.write(head.encode() + sent)
            await writer.drain()
        yield clients
    finally:
        for _, writer in clients:
            writer.close()


async def _response_head(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)


def _distributor(server: RedisServer, key: str, **options: Any) -> Distributor:
    return Distributor(key=key, url=server.url, **options)


class _Recorder:
    """An app that reads the body event by event, keeps what it got, and answers 200 with
    the body's length once it is whole (nothing if the client goes away)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            self.events.append(
                {
                    "type": message["type"],
                    "size": len(message.get("body", b"")),
                    "more_body": message.get("more_body", False),
                }
            )
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = str(size).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


# --- slow clients and request buffering (issue 9, item 5) -----------------------------------


async def test_stalled_uploads_take_no_node_slot(redis_server: RedisServer) -> None:
    """110 stalled uploads against a Node of concurrency 100, with the defaults: a GET still
    gets 200 within 10 s, and no stalled upload ever reached the Node."""
    app = _distributor(redis_server, "slow")
    node = Node(url=redis_server.url, app=apps.echo, key="slow", concurrency=100)
    async with serve_app(app) as base, run_node(node):
        async with _stalled_uploads(base, 110):
            assert await poll(lambda: len(app._exchanges) == 110, 10)
            async with httpx.AsyncClient(base_url=base) as client:
                response = await asyncio.wait_for(client.get("/"), 10)
            assert response.status_code == 200
            assert node.in_flight == 0
            assert redis_server.command("LLEN", "slow") == 0
            assert app.buffer_budget.used == 110 * 3


async def test_an_upload_stalled_while_buffered_gets_408(redis_server: RedisServer) -> None:
    recorder = _Recorder()
    app = _distributor(redis_server, "idle", body_idle_timeout=0.5)
    node = Node(url=redis_server.url, app=recorder, key="idle")
    async with serve_app(app) as base, run_node(node):
        async with _stalled_uploads(base, 1) as clients:
            head = await _response_head(clients[0][0])
        assert head.startswith(b"HTTP/1.1 408"), head
        assert recorder.events == []  # never queued
        assert app.buffer_budget.used == 0


async def test_an_upload_stalled_after_the_bound_gets_408_and_the_app_a_disconnect(
    redis_server: RedisServer,
) -> None:
    """A body larger than the buffer is queued once the bound is reached and streams the
    rest; a stall then still ends it: 408 to the client, http.disconnect to the app."""
    recorder = _Recorder()
    app = _distributor(redis_server, "idle", request_buffer_size=64 * KIB, body_idle_timeout=0.5)
    node = Node(url=redis_server.url, app=recorder, key="idle")
    async with serve_app(app) as base, run_node(node):
        async with _stalled_uploads(base, 1, length=MIB, sent=b"x" * 200 * KIB) as clients:
            head = await _response_head(clients[0][0])
        assert head.startswith(b"HTTP/1.1 408"), head
        assert await poll(lambda: recorder.events[-1:] == [_DISCONNECT], 5), recorder.events
    first = recorder.events[0]
    assert first["size"] >= 64 * KIB and first["more_body"]  # queued with the bound's worth
    assert sum(e["size"] for e in recorder.events) == 200 * KIB  # the rest streamed


_DISCONNECT = {"type": "http.disconnect", "size": 0, "more_body": False}


async def test_a_body_within_the_bound_reaches_the_app_whole(redis_server: RedisServer) -> None:
    """A body sent in pieces, slowly, travels in the envelope as one event."""
    recorder = _Recorder()
    app = _distributor(redis_server, "whole")
    node = Node(url=redis_server.url, app=recorder, key="whole")
    async with serve_app(app) as base, run_node(node):
        host, port = _address(base)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            size = 600 * KIB
            writer.write(f"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n".encode())
            for _ in range(6):
                writer.write(b"y" * 100 * KIB)
                await writer.drain()
                await asyncio.sleep(0.05)
            head = await _response_head(reader)
            assert head.startswith(b"HTTP/1.1 200"), head
        finally:
            writer.close()
    assert recorder.events == [{"type": "http.request", "size": size, "more_body": False}]


async def test_past_the_process_budget_a_request_is_queued_with_what_it_has(
    redis_server: RedisServer,
) -> None:
    recorder = _Recorder()
    app = _distributor(redis_server, "budget", request_buffer_budget=100 * KIB)
    node = Node(url=redis_server.url, app=recorder, key="budget")
    async with serve_app(app) as base, run_node(node):
        async with _stalled_uploads(base, 1, length=MIB, sent=b"a" * 80 * KIB):
            assert await poll(lambda: app.buffer_budget.used == 80 * KIB, 10)
            assert node.in_flight == 0  # within the budget: buffered, not queued
            async with _stalled_uploads(base, 1, length=MIB, sent=b"b" * 50 * KIB):
                assert await poll(lambda: node.in_flight == 1, 10)
                assert await poll(lambda: sum(e["size"] for e in recorder.events) == 50 * KIB, 10)
                assert recorder.events[0]["more_body"]
                assert app.buffer_budget.used == 80 * KIB  # the queued one gave its bytes back


# --- Expect: 100-continue (issue 11, item 5) -------------------------------------------------


async def _unauthorized(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 401 without reading the body."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 401, "headers": []})
    await send({"type": "http.response.body", "body": b"who are you?"})


def _expecting(length: int) -> bytes:
    return (
        f"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()


async def _heads(base: str, request: bytes) -> list[bytes]:
    """The status codes of the heads answered to ``request`` (which announces a body and
    sends none), up to the first that is not "100 Continue"."""
    host, port = _address(base)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        codes = [(await _response_head(reader)).split(b" ", 2)[1]]
        while codes[-1] == b"100":
            codes.append((await _response_head(reader)).split(b" ", 2)[1])
    finally:
        writer.close()
    return codes


async def _answers_405(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 405 without reading the body, as the no-worker answer does."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 405, "headers": []})
    await send({"type": "http.response.body", "body": b"nobody"})


async def _served_directly(app: Any) -> list[bytes]:
    """The heads the server itself answers, serving ``app`` directly, to a request that
    expects "100 Continue": uvicorn says it only once the app reads the body; hypercorn
    says it as the request arrives, whatever the app does."""
    async with serve_app(app) as base:
        return await _heads(base, _expecting(5 * MIB))


async def test_expect_continue_an_app_answering_without_reading_never_asks_for_the_body(
    redis_server: RedisServer,
) -> None:
    app = _distributor(redis_server, "expect")
    node = Node(url=redis_server.url, app=_unauthorized, key="expect")
    async with serve_app(app) as base, run_node(node):
        relayed = await _heads(base, _expecting(5 * MIB))
    # As the server answers the app served directly: not "100 Continue" first under uvicorn.
    assert relayed == await _served_directly(_unauthorized)
    assert relayed == ([b"100", b"401"] if SERVER == "hypercorn" else [b"401"]), relayed


async def test_expect_continue_without_a_node_gets_the_no_worker_answer_unasked(
    redis_server: RedisServer,
) -> None:
    app = _distributor(redis_server, "nobody", worker_timeout=0.5)
    async with serve_app(app) as base:
        relayed = await _heads(base, _expecting(5 * MIB))
    assert relayed == await _served_directly(_answers_405)
    assert relayed == ([b"100", b"405"] if SERVER == "hypercorn" else [b"405"]), relayed
    assert redis_server.command("LLEN", "nobody") == 0


async def test_expect_continue_an_app_reading_the_body_gets_it_whole(
    redis_server: RedisServer,
) -> None:
    app = _distributor(redis_server, "expect")
    node = Node(url=redis_server.url, app=apps.count_upload, key="expect")
    async with serve_app(app) as base, run_node(node):
        host, port = _address(base)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            size = 3 * MIB
            writer.write(_expecting(size))
            head = await _response_head(reader)
            assert head.startswith(b"HTTP/1.1 100"), head
            for _ in range(3):
                writer.write(b"z" * MIB)
                await writer.drain()
            head = await _response_head(reader)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert await asyncio.wait_for(reader.read(100), 10) == str(size).encode()
        finally:
            writer.close()
        # And through httpx, which sends the body without waiting to be told to continue.
        async with httpx.AsyncClient(base_url=base) as client:
            response = await client.post(
                "/", content=b"q" * 12345, headers={"expect": "100-continue"}
            )
    assert response.status_code == 200 and response.text == "12345"
