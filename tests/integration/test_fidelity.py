"""An app behind a Node answers as it does served directly (issue 11), under uvicorn and
Starlette's TestClient; the same under hypercorn (HTTP/2 included) is in test_hypercorn.py.

Each test serves the same app directly and through the distributor and a Node, and compares
what the client (or the ASGI server) gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from starlette.applications import Starlette
from starlette.responses import FileResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from websockets.exceptions import InvalidStatus

from minidasgi import Distributor, Node, create_distributor

from .redis_server import RedisServer
from .stack import run_node, serve_app, ws_url

pytestmark = pytest.mark.timeout(60)

KEY = "fidelity"
WAIT = 10.0


@contextlib.asynccontextmanager
async def _distributed(
    redis_server: RedisServer, app: Any, *, front: Any = None, **options: Any
) -> AsyncIterator[str]:
    """The distributor under uvicorn (wrapped by ``front`` if given) and an in-process Node
    running ``app``; yields the base URL."""
    distributor = create_distributor(url=redis_server.url, key=KEY, **options)
    node = Node(url=redis_server.url, app=app, key=KEY, lifespan="off", **options)
    served = distributor if front is None else front(distributor)
    async with serve_app(served) as base, run_node(node):
        yield base


# Item 2: an extension a Node cannot honour is not offered to its app.


class PathsendServer:
    """Plays an ASGI server offering ``http.response.pathsend`` (as granian does) in front of
    ``app``: it serves the path the app names from its own filesystem. ``root``, if given,
    is where that filesystem keeps its files (the front machine's, not the Node's)."""

    def __init__(self, app: Any, root: Path | None = None) -> None:
        self.app = app
        self.root = root

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extensions = {**scope.get("extensions", {}), "http.response.pathsend": {}}
        scope = {**scope, "extensions": extensions}

        async def pathsend(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.pathsend":
                path = Path(message["path"])
                if self.root is not None:
                    path = self.root / path.name
                body = path.read_bytes() if path.exists() else b""
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, pathsend)


async def test_pathsend_is_not_offered_and_the_nodes_file_is_served(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    node_dir, front_dir = tmp_path / "node", tmp_path / "front"
    node_dir.mkdir()
    front_dir.mkdir()
    (node_dir / "report.txt").write_bytes(b"the node's report\n")
    (front_dir / "report.txt").write_bytes(b"the distributor's copy\n")
    seen: list[dict[str, Any]] = []

    async def report(request: Any) -> FileResponse:
        seen.append(dict(request.scope.get("extensions", {})))
        return FileResponse(node_dir / "report.txt", media_type="text/plain")

    app = Starlette(routes=[Route("/report", report)])
    async with serve_app(PathsendServer(app)) as base, httpx.AsyncClient(base_url=base) as c:
        direct = await c.get("/report")
    async with (
        _distributed(redis_server, app, front=lambda d: PathsendServer(d, front_dir)) as base,
        httpx.AsyncClient(base_url=base) as c,
    ):
        relayed = await c.get("/report")
    assert direct.status_code == relayed.status_code == 200
    assert direct.content == relayed.content == b"the node's report\n"
    assert relayed.headers["content-type"] == direct.headers["content-type"]
    assert "http.response.pathsend" in seen[0]  # served directly, the app is offered it
    assert "http.response.pathsend" not in seen[1]  # behind a Node, never


async def test_a_node_refuses_a_message_of_an_extension_not_offered(
    redis_server: RedisServer,
) -> None:
    """An app sending pathsend anyway fails as under a server without it: 500."""

    async def stubborn(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.pathsend", "path": "/etc/hostname"})

    async with serve_app(stubborn) as base, httpx.AsyncClient(base_url=base) as client:
        direct = await client.get("/")
    async with _distributed(redis_server, stubborn) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            relayed = await client.get("/")
    assert direct.status_code == relayed.status_code == 500


# Item 3: response headers do not wait for the first body.


def _late_body(headers_seen: asyncio.Event) -> Any:
    """An app whose first body waits until its client has read the response headers (at
    most ``WAIT``: headers held back for the body fail the request)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        start = {"type": "http.response.start", "status": 200, "headers": [(b"x-early", b"1")]}
        await send(start)
        await asyncio.wait_for(headers_seen.wait(), WAIT)
        await send({"type": "http.response.body", "body": b"late"})

    return app


async def _headers_after(
    base: str, headers_seen: asyncio.Event
) -> tuple[float, httpx.Response, bytes]:
    async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
        started = time.monotonic()
        async with client.stream("GET", "/") as response:
            seen = time.monotonic() - started
            headers_seen.set()
            body = await response.aread()
    return seen, response, body


async def test_headers_arrive_before_a_late_first_body(redis_server: RedisServer) -> None:
    # The body is sent only once the client read the headers (a fixed 3 s after them
    # before): a body only arrives for headers that came without it, and they came at once,
    # not held back for a while (a coalescing window, say) and then sent alone.
    direct_seen, relayed_seen = asyncio.Event(), asyncio.Event()
    async with (
        serve_app(_late_body(direct_seen)) as direct_base,
        _distributed(redis_server, _late_body(relayed_seen)) as relayed_base,
    ):
        (
            (direct_after, direct, direct_body),
            (relayed_after, relayed, relayed_body),
        ) = await asyncio.gather(
            _headers_after(direct_base, direct_seen), _headers_after(relayed_base, relayed_seen)
        )
    print(
        f"headers after: direct {direct_after * 1e3:.1f} ms, relayed {relayed_after * 1e3:.1f} ms"
    )
    assert direct.status_code == relayed.status_code == 200
    assert direct_after < 1.5 and relayed_after < 1.5
    assert relayed.headers["x-early"] == direct.headers["x-early"] == "1"
    assert relayed_body == direct_body == b"late"


def _publish_calls(redis_server: RedisServer) -> int:
    info = redis_server.command("INFO", "commandstats")
    assert isinstance(info, bytes)
    for line in info.decode().splitlines():
        if line.startswith("cmdstat_publish:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def test_a_start_followed_at_once_by_its_body_still_travels_in_one_message(
    redis_server: RedisServer,
) -> None:
    async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"hi"})

    # No liveness pings during the count: only the request's own messages are published.
    async with _distributed(redis_server, hello, liveness_interval=3600) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/")).text == "hi"
            redis_server.command("CONFIG", "RESETSTAT")
            for _ in range(5):
                assert (await client.get("/")).text == "hi"
            publishes = _publish_calls(redis_server)
    assert publishes == 5  # per request: the ack, then start and body in one SEND, together


# Item 4: a WebSocket app raising before it accepts.


async def _raises_before_accept(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()
        raise RuntimeError("no database")


async def _returns_before_accept(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()


@pytest.mark.parametrize("app", [_raises_before_accept, _returns_before_accept])
async def test_websocket_app_ending_before_accept_gets_the_servers_answer(
    redis_server: RedisServer, app: Any
) -> None:
    async def status(base: str) -> int:
        with pytest.raises(InvalidStatus) as info:
            await asyncio.wait_for(websockets.connect(ws_url(base)), WAIT)
        return info.value.response.status_code

    async with serve_app(app) as base:
        direct = await status(base)
    async with _distributed(redis_server, app) as base:
        relayed = await status(base)
    assert direct == 500
    assert relayed == direct


# Item 7: messages keep their shape on the way to the server.


class Recorder:
    """Wraps an ASGI app and records every message it sends to the server."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sent: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def record(message: dict[str, Any]) -> None:
            self.sent.append(message)
            await send(message)

        await self.app(scope, receive, record)


async def _accept_with_headers(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "websocket":
        return
    await receive()
    await send({"type": "websocket.accept", "headers": [(b"x-extra", b"hello")]})
    await send({"type": "websocket.close", "code": 1000})


async def test_websocket_accept_headers_reach_the_server_as_the_app_sent_them(
    redis_server: RedisServer,
) -> None:
    async def talk(base: str) -> str:
        async with websockets.connect(ws_url(base)) as ws:
            header = ws.response.headers["x-extra"]
            with contextlib.suppress(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), WAIT)
        return header

    direct = Recorder(_accept_with_headers)
    async with serve_app(direct) as base:
        assert await talk(base) == "hello"
    relayed: list[Recorder] = []

    def front(distributor: Any) -> Recorder:
        relayed.append(Recorder(distributor))
        return relayed[0]

    async with _distributed(redis_server, _accept_with_headers, front=front) as base:
        assert await talk(base) == "hello"
    direct_accept = next(m for m in direct.sent if m["type"] == "websocket.accept")
    relayed_accept = next(m for m in relayed[0].sent if m["type"] == "websocket.accept")
    assert relayed_accept["headers"] == direct_accept["headers"] == [(b"x-extra", b"hello")]
    assert type(relayed_accept["headers"][0]) is tuple


# Item 6: one Distributor used from several event loops (Starlette's TestClient).


def _starlette_app() -> Starlette:
    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse(f"hello {request.query_params.get('n', '')}")

    return Starlette(routes=[Route("/", hello)])


async def test_testclient_with_and_without_a_with_block(redis_server: RedisServer) -> None:
    distributor = Distributor(key=KEY, url=redis_server.url)
    node = Node(url=redis_server.url, app=_starlette_app(), key=KEY, lifespan="off")

    def use(client: TestClient) -> list[tuple[int, str]]:
        return [(r.status_code, r.text) for r in (client.get(f"/?n={n}") for n in range(3))]

    expected = [(200, f"hello {n}") for n in range(3)]
    async with run_node(node):
        # Each TestClient request outside a with block runs in an event loop of its own.
        assert await asyncio.to_thread(use, TestClient(distributor)) == expected

        def with_block() -> list[tuple[int, str]]:
            with TestClient(distributor) as client:
                return use(client)

        assert await asyncio.to_thread(with_block) == expected
        assert await asyncio.to_thread(with_block) == expected
        assert await asyncio.to_thread(use, TestClient(distributor)) == expected


async def test_a_distributor_busy_in_another_loop_says_what_to_do(
    redis_server: RedisServer,
) -> None:
    distributor = Distributor(key=KEY, url=redis_server.url)
    await distributor.startup()
    try:

        def elsewhere() -> None:
            asyncio.run(distributor.startup())

        with pytest.raises(RuntimeError, match="one event loop at a time; create one per loop"):
            await asyncio.to_thread(elsewhere)
    finally:
        await distributor.shutdown()


# Item 1 (also under hypercorn's HTTP/2 in test_hypercorn.py): trailers reach a client.


async def _with_trailers(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    offered = "http.response.trailers" in scope.get("extensions", {})
    await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": offered})
    await send({"type": "http.response.body", "body": b"data", "more_body": True})
    await send({"type": "http.response.body", "body": b""})
    if offered:
        trailer = {"type": "http.response.trailers", "headers": [(b"x-sum", b"1")]}
        await send({**trailer, "more_trailers": True})
        await send({**trailer, "headers": [(b"x-count", b"2")], "more_trailers": False})


async def test_trailers_reach_testclient_as_served_directly(redis_server: RedisServer) -> None:
    distributor = Distributor(key=KEY, url=redis_server.url)
    node = Node(url=redis_server.url, app=_with_trailers, key=KEY, lifespan="off")

    def get(app: Any) -> tuple[int, bytes, Any]:
        response = TestClient(app).get("/")
        return (
            response.status_code,
            response.content,
            response.extensions.get("http.response.trailers"),
        )

    direct = await asyncio.to_thread(get, _with_trailers)
    async with run_node(node):
        relayed = await asyncio.to_thread(get, distributor)
    assert direct == (200, b"data", [(b"x-sum", b"1"), (b"x-count", b"2")])
    assert relayed == direct
