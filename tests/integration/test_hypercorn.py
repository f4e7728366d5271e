"""The distributor under hypercorn, HTTP/1.1 and HTTP/2 over cleartext (h2c), compared with
the same app served by hypercorn directly (issue 11): trailers, early hints, extensions
offered, headers before a late body, WebSocket handshakes and streaming."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from minidasgi import Node, create_distributor

from . import apps
from .h2client import H2Response, h2_request
from .redis_server import RedisServer
from .stack import run_node, serve_hypercorn

pytestmark = pytest.mark.timeout(60)

KEY = "hypercorn"
WAIT = 10.0


def _port(base: str) -> int:
    port = urlsplit(base).port
    assert port is not None
    return port


@contextlib.asynccontextmanager
async def _distributed(redis_server: RedisServer, app: Any) -> AsyncIterator[str]:
    distributor = create_distributor(url=redis_server.url, key=KEY)
    node = Node(url=redis_server.url, app=app, key=KEY, lifespan="off")
    async with serve_hypercorn(distributor) as base, run_node(node):
        yield base


async def _both(redis_server: RedisServer, app: Any, path: str = "/") -> list[H2Response]:
    """The h2c answer served directly, then through the distributor."""
    answers = []
    async with serve_hypercorn(app) as base:
        answers.append(await h2_request(_port(base), path, timeout=WAIT))
    async with _distributed(redis_server, app) as base:
        answers.append(await h2_request(_port(base), path, timeout=WAIT))
    return answers


class Extensions:
    """Answers the extensions its scope offers, as JSON; remembers them."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.seen.append(scope.get("extensions", {}))
        body = json.dumps(sorted(scope.get("extensions", {}))).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


async def test_extensions_offered_over_h2_are_exactly_those_that_travel(
    redis_server: RedisServer,
) -> None:
    app = Extensions()
    direct, relayed = await _both(redis_server, app)
    assert direct.ended and relayed.ended
    # hypercorn offers push too over HTTP/2: it does not travel.
    assert "http.response.push" in json.loads(direct.body)
    assert json.loads(relayed.body) == ["http.response.early_hint", "http.response.trailers"]


async def _with_trailers(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    offered = "http.response.trailers" in scope.get("extensions", {})
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
            "trailers": offered,
        }
    )
    await send({"type": "http.response.body", "body": b"part one, ", "more_body": True})
    await send({"type": "http.response.body", "body": b"part two"})
    if offered:
        await send(
            {
                "type": "http.response.trailers",
                "headers": [(b"x-checksum", b"c0ffee")],
                "more_trailers": False,
            }
        )


async def test_trailers_travel_and_the_h2_stream_closes(redis_server: RedisServer) -> None:
    direct, relayed = await _both(redis_server, _with_trailers)
    assert direct.ended and direct.trailers == [(b"x-checksum", b"c0ffee")]
    assert relayed.ended, "the stream did not close cleanly"
    assert not relayed.reset
    assert relayed.status == direct.status == 200
    assert relayed.body == direct.body == b"part one, part two"
    assert relayed.trailers == direct.trailers


async def test_no_trailers_offered_over_http1(redis_server: RedisServer) -> None:
    """hypercorn offers no trailers over HTTP/1.1: the Node's app is not offered them either,
    and answers as it does directly."""
    answers = []
    async with serve_hypercorn(_with_trailers) as base, httpx.AsyncClient(base_url=base) as c:
        answers.append(await c.get("/"))
    async with _distributed(redis_server, _with_trailers) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            answers.append(await client.get("/"))
    direct, relayed = answers
    assert relayed.status_code == direct.status_code == 200
    assert relayed.content == direct.content == b"part one, part two"


async def _early_hint(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if "http.response.early_hint" in scope.get("extensions", {}):
        await send({"type": "http.response.early_hint", "links": [b"</style.css>; rel=preload"]})
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"page"})


async def test_early_hints_travel_over_h2(redis_server: RedisServer) -> None:
    direct, relayed = await _both(redis_server, _early_hint)

    def hints(response: H2Response) -> list[list[tuple[bytes, bytes]]]:
        return [[h for h in headers if h[0] != b"date"] for headers in response.informational]

    expected = [(b":status", b"103"), (b"link", b"</style.css>; rel=preload")]
    assert hints(direct) == [[*expected, (b"server", b"hypercorn-h2")]]
    assert hints(relayed) == hints(direct)
    assert relayed.ended and relayed.body == direct.body == b"page"


def _late_body(headers_seen: asyncio.Event) -> Any:
    """An app whose first body waits until its client has read the response headers (at
    most ``WAIT``: headers held back for the body fail the request)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.wait_for(headers_seen.wait(), WAIT)
        await send({"type": "http.response.body", "body": b"late"})

    return app


async def test_h2_headers_arrive_before_a_late_first_body(redis_server: RedisServer) -> None:
    # The body is sent only once the client read the headers (a fixed 3 s after them
    # before): a body only ends a stream whose headers came without it, and they came at
    # once, not held back for a while and then sent alone.
    direct_seen, relayed_seen = asyncio.Event(), asyncio.Event()
    async with (
        serve_hypercorn(_late_body(direct_seen)) as direct_base,
        _distributed(redis_server, _late_body(relayed_seen)) as relayed_base,
    ):
        direct, relayed = await asyncio.gather(
            h2_request(_port(direct_base), "/", timeout=WAIT, headers_seen=direct_seen),
            h2_request(_port(relayed_base), "/", timeout=WAIT, headers_seen=relayed_seen),
        )
    print(
        f"h2 headers after: direct {direct.headers_after * 1000:.1f} ms, "
        f"relayed {relayed.headers_after * 1000:.1f} ms"
    )
    assert direct.ended and direct.status == 200
    assert direct.headers_after < 1.5 and relayed.headers_after < 1.5
    assert relayed.ended and relayed.body == direct.body == b"late"


async def test_h2_streaming_download_matches(redis_server: RedisServer) -> None:
    direct, relayed = await _both(redis_server, apps.download, "/?3000000")
    assert relayed.ended and relayed.status == 200
    assert len(relayed.body) == len(direct.body) == 3_000_000


async def _raises_before_accept(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()
        raise RuntimeError("no database")


async def test_websocket_app_raising_before_accept_gets_500(redis_server: RedisServer) -> None:
    statuses = []
    for serve in ("direct", "relayed"):
        async with contextlib.AsyncExitStack() as stack:
            if serve == "direct":
                base = await stack.enter_async_context(serve_hypercorn(_raises_before_accept))
            else:
                base = await stack.enter_async_context(
                    _distributed(redis_server, _raises_before_accept)
                )
            with pytest.raises(InvalidStatus) as info:
                await asyncio.wait_for(websockets.connect("ws" + base.removeprefix("http")), WAIT)
            statuses.append(info.value.response.status_code)
    assert statuses == [500, 500]


async def test_websocket_echo_through_hypercorn(redis_server: RedisServer) -> None:
    async with _distributed(redis_server, apps.ws_echo) as base:
        url = "ws" + base.removeprefix("http")
        async with websockets.connect(url, subprotocols=["chat"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "chat"
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), WAIT) == "hello"
            await ws.send(b"\x00" * 300_000)
            assert await asyncio.wait_for(ws.recv(), WAIT) == b"\x00" * 300_000
