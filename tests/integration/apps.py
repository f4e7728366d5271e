"""ASGI apps the integration tests run on Nodes (in-process or in ``node_process.py``)."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

Scope = dict[str, Any]


def http_scope(path: str = "/", headers: list[list[bytes]] | None = None) -> dict[str, Any]:
    """An HTTP scope as a server gives it, for a test that hands a request to a Node itself
    (an envelope pushed by hand)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [[b"host", b"example"]] if headers is None else headers,
        "client": ["127.0.0.1", 1],
        "server": ["127.0.0.1", 2],
    }


def uvicorn_scope() -> dict[str, Any]:
    """An HTTP scope as uvicorn gives it (its keys in its h11 protocol's order, its pairs as
    tuples): the usual scope, which the envelope's fast paths are for."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 51234),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [(b"host", b"bench"), (b"accept", b"*/*")],
    }


async def _read_body(receive: Any) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    return bytes(body)


async def _respond(
    send: Any, status: int, body: bytes, content_type: bytes = b"text/plain"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def hello(scope: Scope, receive: Any, send: Any) -> None:
    """Hello World!"""
    if scope["type"] == "http":
        await _respond(send, 200, b"Hello World!")


async def loop_class(scope: Scope, receive: Any, send: Any) -> None:
    """The class of the event loop the app runs on, as ``module.name``."""
    if scope["type"] == "http":
        loop = type(asyncio.get_running_loop())
        await _respond(send, 200, f"{loop.__module__}.{loop.__qualname__}".encode())


async def frozen(scope: Scope, receive: Any, send: Any) -> None:
    """How many objects the collector of the Node's process leaves alone (``gc.freeze``)."""
    if scope["type"] == "http":
        await _respond(send, 200, str(gc.get_freeze_count()).encode())


class SeedApp:
    """The seed's class-style worker, as written on its page."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"Hello World!"})


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": value.decode("latin-1")}
    if isinstance(value, tuple):
        return {"tuple": [_jsonable(v) for v in value]}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


async def scope_dump(scope: Scope, receive: Any, send: Any) -> None:
    """Answers the scope it saw, as JSON (bytes and tuples tagged), and the body length."""
    if scope["type"] != "http":
        return
    body = await _read_body(receive)
    dump = _jsonable({k: v for k, v in scope.items() if k != "state"})
    dump["state_type"] = type(scope.get("state")).__name__
    dump["body_length"] = len(body)
    await _respond(send, 200, json.dumps(dump).encode(), b"application/json")


async def echo(scope: Scope, receive: Any, send: Any) -> None:
    """Echoes the request body, streamed back chunk by chunk as it arrives."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        await send(
            {"type": "http.response.body", "body": message.get("body", b""), "more_body": True}
        )
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.body", "body": b""})


async def count_upload(scope: Scope, receive: Any, send: Any) -> None:
    """Reads the whole body without keeping it; answers its length."""
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            break
    await _respond(send, 200, str(size).encode())


async def download(scope: Scope, receive: Any, send: Any) -> None:
    """Sends ``?N`` bytes (default 1 MB) in 1 MiB pieces."""
    if scope["type"] != "http":
        return
    size = int(scope["query_string"] or b"1000000")
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(size).encode())],
        }
    )
    piece = b"x" * (1 << 20)
    while size > 0:
        chunk = piece[:size]
        size -= len(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": size > 0})


def small_chunk(index: int) -> bytes:
    """Chunk ``index`` of ``small_chunks``: 16 KiB, each chunk's bytes told apart by index."""
    return bytes([index % 251]) * (16 * 1024)


async def small_chunks(scope: Scope, receive: Any, send: Any) -> None:
    """Sends ``?N`` chunks of ``small_chunk``, each in its own ``send`` (as a streaming
    response does)."""
    if scope["type"] != "http":
        return
    count = int(scope["query_string"] or b"1")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for index in range(count):
        more = index < count - 1
        await send({"type": "http.response.body", "body": small_chunk(index), "more_body": more})


async def slow(scope: Scope, receive: Any, send: Any) -> None:
    """Starts a streamed response, then sends one piece per 0.1 s for ``?N`` pieces."""
    if scope["type"] != "http":
        return
    count = int(scope["query_string"] or b"100")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for i in range(count):
        await send({"type": "http.response.body", "body": b"%d\n" % i, "more_body": True})
        await asyncio.sleep(0.1)
    await send({"type": "http.response.body", "body": b"done\n"})


async def sleepy(scope: Scope, receive: Any, send: Any) -> None:
    """Sleeps ``?S`` seconds before answering (nothing is sent before)."""
    if scope["type"] != "http":
        return
    await asyncio.sleep(float(scope["query_string"] or b"1"))
    await _respond(send, 200, b"slept")


def _logged_lines() -> list[str]:
    """The lines written to ``$MINIDASGI_TEST_LOG`` so far (none when unset or not yet
    written)."""
    import os

    path = os.environ.get("MINIDASGI_TEST_LOG")
    if not path or not os.path.exists(path):
        return []
    with open(path) as log:
        return log.read().splitlines()


def _log_line(line: str) -> None:
    import os

    path = os.environ.get("MINIDASGI_TEST_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)


async def logged_sleepy(scope: Scope, receive: Any, send: Any) -> None:
    """Like ``sleepy``, and appends ``start ID`` / ``end ID`` lines (ID from the
    ``x-request-id`` header) to the file named by ``$MINIDASGI_TEST_LOG``, so a test can count
    across processes how many times each request ran."""
    if scope["type"] != "http":
        return
    request_id = dict(scope["headers"]).get(b"x-request-id", b"-").decode()
    _log_line(f"start {request_id}")
    await asyncio.sleep(float(scope["query_string"] or b"1"))
    _log_line(f"end {request_id}")
    await _respond(send, 200, b"slept " + request_id.encode())


async def ws_echo(scope: Scope, receive: Any, send: Any) -> None:
    """WebSocket: accepts (picking ``chat`` if offered), then echoes every message back."""
    if scope["type"] != "websocket":
        if scope["type"] == "http":
            await _respond(send, 404, b"WebSocket only")
        return
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    subprotocol = "chat" if "chat" in scope.get("subprotocols", ()) else None
    await send({"type": "websocket.accept", "subprotocol": subprotocol})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes") is not None:
            await send({"type": "websocket.send", "bytes": message["bytes"]})
        else:
            await send({"type": "websocket.send", "text": message.get("text", "")})


async def transfer(scope: Scope, receive: Any, send: Any) -> None:
    """``POST /up`` counts an upload (``count_upload``); anything else is a ``download``."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/up":
        await count_upload(scope, receive, send)
    else:
        await download(scope, receive, send)


def held(release: asyncio.Event) -> Any:
    """An app that starts its response and sends ``part1,``, then waits (20 s at most) for
    ``release`` before ``part2``: a request held mid-response."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part1,", "more_body": True})
        await asyncio.wait_for(release.wait(), 20)
        await send({"type": "http.response.body", "body": b"part2"})

    return app


async def ws_chatter(scope: Scope, receive: Any, send: Any) -> None:
    """WebSocket: accepts, then sends ``tick N`` every 10 ms on its own while it echoes every
    text message back as ``echo TEXT``: messages flow both ways at once, whatever the client
    does. Ends at the client's disconnect."""
    if scope["type"] != "websocket":
        if scope["type"] == "http":
            await _respond(send, 404, b"WebSocket only")
        return
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})

    async def tick() -> None:
        count = 0
        while True:
            await send({"type": "websocket.send", "text": f"tick {count}"})
            count += 1
            await asyncio.sleep(0.01)

    ticking = asyncio.ensure_future(tick())
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": f"echo {message.get('text')}"})
    finally:
        ticking.cancel()
        await asyncio.gather(ticking, return_exceptions=True)


async def ws_flood(scope: Scope, receive: Any, send: Any) -> None:
    """WebSocket: accepts, then sends 64 KiB messages for ever, writing ``sent N`` to
    ``$MINIDASGI_TEST_LOG`` after each (when set), and ``cancelled`` or the ``OSError`` that
    ends it: to a client that reads nothing it stays blocked in ``send`` once flow control
    holds it back."""
    if scope["type"] != "websocket" or (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    sent = 0
    try:
        while True:
            await send({"type": "websocket.send", "bytes": b"x" * 65536})
            sent += 1
            _log_line(f"sent {sent}")
    except asyncio.CancelledError:
        _log_line("cancelled")
        raise
    except OSError as exc:
        _log_line(f"ended: {type(exc).__name__}")


async def ws_echo_or_slow(scope: Scope, receive: Any, send: Any) -> None:
    """An HTTP request is ``slow``'s; a WebSocket is accepted and echoed, its end written to
    ``$MINIDASGI_TEST_LOG`` when set (``disconnect CODE``, or ``cancelled``). At ``/late`` it
    is accepted only once that log has a ``disconnect 1012`` (another socket's, closed as the
    Node began to stop: the Node drains by then), and the accept is logged (``accepted while
    draining``, or ``accepted, no 1012 seen`` after 20 s)."""
    if scope["type"] != "websocket":
        await slow(scope, receive, send)
        return
    if (await receive())["type"] != "websocket.connect":
        return
    if scope["path"] == "/late":
        seen = False
        for _ in range(2000):  # 20 s
            seen = "disconnect 1012" in _logged_lines()
            if seen:
                break
            await asyncio.sleep(0.01)
        await send({"type": "websocket.accept"})
        _log_line("accepted while draining" if seen else "accepted, no 1012 seen")
    else:
        await send({"type": "websocket.accept"})
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                _log_line(f"disconnect {message.get('code')}")
                return
            await send({"type": "websocket.send", "text": message.get("text", "")})
    except asyncio.CancelledError:
        _log_line("cancelled")
        raise


def _lifespan_hanging_at(phase: str) -> Any:
    """An app that answers ``hello`` and whose lifespan ``phase`` (``startup`` or
    ``shutdown``) never completes; it writes ``PHASE`` to ``$MINIDASGI_TEST_LOG`` when that
    phase begins."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await hello(scope, receive, send)
            return
        while True:
            message = await receive()
            current = message["type"].removeprefix("lifespan.")
            if current == phase:
                _log_line(phase)
                await asyncio.Event().wait()
            await send({"type": f"{message['type']}.complete"})

    return app


lifespan_hangs_at_startup = _lifespan_hanging_at("startup")
lifespan_hangs_at_shutdown = _lifespan_hanging_at("shutdown")


async def streamed(scope: Scope, receive: Any, send: Any) -> None:
    """Sends ``?N`` bytes in 1 MiB chunks, chunked (no content-length: a body cut short
    can end cleanly only if the relay ends it so), pausing 10 ms between chunks."""
    if scope["type"] != "http":
        return
    size = int(scope["query_string"] or b"1000000")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    piece = b"y" * (1 << 20)
    while size > 0:
        chunk = piece[:size]
        size -= len(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": size > 0})
        await asyncio.sleep(0.01)
