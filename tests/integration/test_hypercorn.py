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

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from minidasgi import Distributor, Node, create_distributor, draining

from . import apps
from .h2client import H2Response, h2_request
from .redis_server import RedisServer
from .stack import poll, run_node, serve_hypercorn

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


# A request body the app never reads. hypercorn hands the body to the app through a queue of
# 10 events and stops reading the socket while it is full; when the response ends, it puts
# ``http.disconnect`` in that queue, waiting for room: with nobody reading, the connection was
# stuck for good (the client hung). The distributor reads the body while it sends the
# response's end, so hypercorn closes a connection whose request was not read to its end: a
# client still uploading gets its response or a closed connection (a reset), never a hang,
# and the server answers the next connection. Each upload is many times that queue.
UPLOAD = 8 * 1024 * 1024
_CLOSED = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


class _Running:
    """An ASGI app's calls still running (HTTP ones): with the connection stuck, the
    distributor's last ``send`` never returned, and its call never ended."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.calls += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.calls -= 1

    async def all_ended(self) -> bool:
        """Whether every call ended within ``WAIT`` (none stuck)."""
        return await poll(lambda: self.calls == 0, WAIT)


@contextlib.asynccontextmanager
async def _running(redis_server: RedisServer, app: Any) -> AsyncIterator[tuple[str, _Running]]:
    """``_distributed``, the distributor's calls counted."""
    running = _Running(create_distributor(url=redis_server.url, key=KEY))
    node = Node(url=redis_server.url, app=app, key=KEY, lifespan="off")
    async with serve_hypercorn(running) as base, run_node(node):
        yield base, running


async def _answers_unread(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"not read"})


async def _answered_or_closed(base: str, path: str, content: Any) -> httpx.Response | None:
    """POST ``content`` on a new connection: the response, or None if the server closed the
    connection (a reset) before the client read it. A timeout (``WAIT``: the hang) fails."""
    async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
        try:
            return await client.post(path, content=content)
        except _CLOSED:
            return None


async def _status(base: str, path: str) -> int:
    """The status a bodiless GET gets on a new connection: the server still answers."""
    async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
        return (await client.get(path)).status_code


async def test_an_upload_the_app_does_not_read_gets_its_response_or_a_closed_connection(
    redis_server: RedisServer,
) -> None:
    async with _running(redis_server, _answers_unread) as (base, running):
        for filler in (b"x", b"y"):
            answer = await _answered_or_closed(base, "/", filler * UPLOAD)
            assert answer is None or (answer.status_code, answer.content) == (200, b"not read")
            assert await running.all_ended()
            assert await _status(base, "/") == 200


async def _chunks(size: int) -> AsyncIterator[bytes]:
    """A body of ``size`` bytes sent chunked (no Content-Length)."""
    for _ in range(size // 65536):
        yield b"z" * 65536


async def test_refusals_of_an_unread_upload_get_their_answer_or_a_closed_connection(
    redis_server: RedisServer,
) -> None:
    """The distributor's own answers, given with the body unread: a path with no route
    (404, before any exchange), a Content-Length over ``max_body_size`` (413, before any
    exchange), a chunked body growing past it (413, while buffering), and no Node taking
    the request within ``worker_timeout`` (the no-worker answer, 405, the body streaming
    past the buffer)."""
    limit = 4 * 1024 * 1024
    unserved = create_distributor(
        url=redis_server.url, key=KEY, max_body_size=limit, worker_timeout=2.0
    )
    routed = Distributor(
        {r"^/routed/": KEY},
        url=redis_server.url,
        max_body_size=limit,
        request_buffer_size=2 * limit,
    )
    running = _Running(unserved)
    routed_running = _Running(routed)
    async with serve_hypercorn(running) as base, serve_hypercorn(routed_running) as routed_base:
        cases = [
            (routed_base, routed_running, "/elsewhere", b"x" * UPLOAD, 404),
            (routed_base, routed_running, "/routed/", _chunks(UPLOAD), 413),
            (base, running, "/", b"x" * UPLOAD, 413),
            (base, running, "/", _chunks(limit - 65536), 405),
        ]
        for where, counted, path, content, status in cases:
            answer = await _answered_or_closed(where, path, content)
            assert answer is None or answer.status_code == status, (path, status)
            assert await counted.all_ended(), (path, status)
        assert await _status(routed_base, "/elsewhere") == 404
        assert await _status(base, "/") == 405


async def test_a_413_on_the_first_body_event_reads_the_rest_and_never_hangs(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request's very first body event is over ``max_body_size`` (a chunked upload, the
    request not ended): the 413 is sent while the rest of the body is read (else hypercorn's
    closing may find its queue full), and the connection ends (the 413, or a reset) instead
    of hanging."""
    readers: list[Any] = []
    start_reader = draining.read_in_background

    def recorded(receive: Any, sending: Any = None) -> None:
        readers.append(receive)
        start_reader(receive, sending)

    monkeypatch.setattr(draining, "read_in_background", recorded)
    distributor = _Running(
        create_distributor(url=redis_server.url, key=KEY, max_body_size=1000, worker_timeout=1.0)
    )
    chunk = b"%x\r\n%s\r\n" % (2000, b"c" * 2000)
    request = b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n" + chunk * 12
    async with serve_hypercorn(distributor) as base:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
        try:
            writer.write(request)
            received = b""
            with contextlib.suppress(ConnectionError):  # a reset ends it as well as an EOF
                while data := await asyncio.wait_for(reader.read(65536), WAIT):
                    received += data
        finally:
            writer.close()
        assert len(readers) == 1  # the rest of the body was read
        assert await distributor.all_ended()
        # The 413, unless the reset of the connection closed with unread data took it.
        assert received == b"" or received.startswith(b"HTTP/1.1 413")
        assert await _status(base, "/") == 405


async def _fails_mid_body_unread(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Fails mid-body for a POST, without reading its body; answers anything else."""
    if scope["type"] != "http":
        return
    if scope["method"] != "POST":
        await _answers_unread(scope, receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"part", "more_body": True})
    raise RuntimeError("the app fails mid-body")


async def test_an_aborted_response_with_an_unread_upload_never_hangs_the_connection(
    redis_server: RedisServer,
) -> None:
    """The app fails mid-body without reading the upload: the response is aborted at once,
    and hypercorn, closing the stream after the distributor's exception, finds room in its
    queue for its ``http.disconnect`` (a task reads the body), so the connection ends."""
    head = b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % UPLOAD
    async with _running(redis_server, _fails_mid_body_unread) as (base, running):
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(base))
        try:
            writer.write(head + b"x" * UPLOAD)
            received = b""
            with contextlib.suppress(ConnectionError):  # a reset ends it as well as an EOF
                while data := await asyncio.wait_for(reader.read(65536), WAIT):
                    received += data
        finally:
            writer.close()
        # What came of the aborted response, if the reset did not take it: never its end.
        assert received == b"" or received.startswith(b"HTTP/1.1 200")
        assert not received.endswith(b"0\r\n\r\n")
        assert await running.all_ended()
        assert await _status(base, "/") == 200


async def _trailers_after_reading(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Announces trailers, sends its body, then reads the whole upload, then sends the
    trailers, which count what it read."""
    if scope["type"] != "http":
        return
    offered = "http.response.trailers" in scope.get("extensions", {})
    await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": offered})
    await send({"type": "http.response.body", "body": b"body first"})
    received = len(await apps._read_body(receive))
    if offered:
        count = str(received).encode()
        await send({"type": "http.response.trailers", "headers": [(b"x-received", count)]})


async def test_an_app_reading_the_upload_before_its_trailers_completes(
    redis_server: RedisServer,
) -> None:
    """The response's last body is not its end when trailers were announced: the app may
    read the rest of the upload before sending them. Draining the body there would starve
    the app, and the response would never end."""
    upload = 3 * 1024 * 1024
    async with _distributed(redis_server, _trailers_after_reading) as base:
        relayed = await h2_request(
            _port(base), "/", method="POST", timeout=WAIT, body=b"t" * upload
        )
    assert relayed.ended and not relayed.reset
    assert relayed.status == 200 and relayed.body == b"body first"
    assert relayed.trailers == [(b"x-received", str(upload).encode())]


async def _raw_exchange(port: int, head: bytes, body: bytes, then: bytes) -> tuple[bytes, bytes]:
    """Send ``head`` (a request with ``Expect: 100-continue``), its ``body`` once the
    server says "100 Continue" (and only then), then the request ``then`` on the same
    connection; the bytes read before ``then`` and those read after it (each up to the end
    of a response, by its ``content-length`` or its last chunk, or of the connection: a
    reset counts as an end), every read bounded by ``WAIT`` (``asyncio.TimeoutError`` past it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def response() -> bytes:
        seen = b""
        while True:
            head_end = seen.find(b"\r\n\r\n")
            if head_end >= 0 and not seen.startswith(b"HTTP/1.1 100"):
                length, chunked = 0, False
                for line in seen[:head_end].split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                    elif name.strip().lower() == b"transfer-encoding":
                        chunked = value.strip().lower() == b"chunked"
                if chunked and seen.endswith(b"\r\n0\r\n\r\n"):
                    return seen
                if not chunked and len(seen) >= head_end + 4 + length:
                    return seen
            elif head_end >= 0:  # the 100 Continue: the client sends its body now
                with contextlib.suppress(ConnectionError):
                    writer.write(body)
                seen = seen[head_end + 4 :]
                continue
            try:
                data = await asyncio.wait_for(reader.read(65536), WAIT)
            except ConnectionError:  # reset, or a write found the connection closed
                return seen
            if not data:
                return seen
            seen += data

    try:
        writer.write(head)
        before = await response()
        with contextlib.suppress(ConnectionError):
            writer.write(then)
        after = await response()
    finally:
        writer.close()
    return before, after


async def test_a_100_continue_upload_the_app_does_not_read_never_hangs_the_connection(
    redis_server: RedisServer,
) -> None:
    """hypercorn says "100 Continue" itself as the request arrives: the client uploads a
    body nobody asks for. The distributor reads it while it sends the response's end:
    hypercorn, whose queue it fills, then closes the connection (it keeps only one whose
    request was read to its end) instead of leaving it stuck, the response's last send
    waiting for room in that queue for good."""
    head = (
        b"POST / HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: %d\r\n\r\n" % UPLOAD
    )
    async with _running(redis_server, _answers_unread) as (base, running):
        before, after = await _raw_exchange(
            _port(base), head, b"x" * UPLOAD, b"GET / HTTP/1.1\r\nhost: t\r\n\r\n"
        )
        # The connection was closed (the request was not read to its end when the response
        # ended), or, were it read by then, kept; never left stuck. The server still answers.
        assert after == b"" or after.startswith(b"HTTP/1.1 200")
        assert await running.all_ended()
        async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
            assert (await client.get("/")).status_code == 200
    # The response, unless the reset of a connection closed with unread data took it.
    assert before == b"" or (
        before.startswith(b"HTTP/1.1 200") and before.endswith(b"not read\r\n0\r\n\r\n")
    )


ANSWER = 1024 * 1024


async def _answers_a_mib_unread(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers a MiB in one final message, without reading the body."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"r" * ANSWER})


async def _h2_upload_unacknowledged(port: int, pause: float) -> tuple[int, bool]:
    """POST over h2c, uploading all along, with the client's flow-control window left shut
    (the response's first 64 KiB unacknowledged) for ``pause`` seconds, then opened to the
    whole response. The bytes of body received, and whether the stream ended (cleanly or
    reset) within ``WAIT`` of the pause's end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    connection.initiate_connection()
    stream = connection.get_next_available_stream_id()
    request = [(":method", "POST"), (":scheme", "http"), (":authority", "t"), (":path", "/")]
    connection.send_headers(stream, request)
    loop = asyncio.get_running_loop()
    pause_ends = loop.time() + pause
    deadline = pause_ends + WAIT
    received, ended, shut = 0, False, True
    try:
        while not ended and loop.time() < deadline:
            # Upload as far as hypercorn's window lets: it widens it only as it reads.
            while (size := min(connection.local_flow_control_window(stream), 16384)) > 0:
                connection.send_data(stream, b"u" * size)
            if shut and loop.time() >= pause_ends:  # room for the whole response
                connection.increment_flow_control_window(ANSWER)
                connection.increment_flow_control_window(ANSWER, stream_id=stream)
                shut = False
            writer.write(connection.data_to_send())
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.1)
            except asyncio.TimeoutError:
                continue
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    received += len(event.data)
                ended = ended or isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset))
    except (ConnectionError, h2.exceptions.ProtocolError):
        ended = True
    finally:
        writer.close()
    return received, ended


async def test_an_h2_client_that_shuts_its_window_past_the_drain_time_while_uploading_never_hangs(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The response's end (a MiB, more than the client's flow-control window) waits for a
    client that acknowledges none of it, for longer than the body is read in the background
    (0.5 s here), while it uploads; then it acknowledges. The
    reader goes on while that send waits: else, stopped, it left hypercorn's queue to fill,
    hypercorn stopped reading the connection (its WINDOW_UPDATEs too), and the send, the
    stream and the connection were stuck for good."""
    # The bound, as ``drain`` reads it at each call: its ``seconds`` default (the code before
    # this fix took ``DRAIN_TIME`` there, bound once; this code reads ``DRAIN_TIME`` when it is
    # None). Patched there, the test meets the old code's bound as the new one's.
    monkeypatch.setattr(draining.drain, "__defaults__", (0.5,))
    async with _running(redis_server, _answers_a_mib_unread) as (base, running):
        received, ended = await _h2_upload_unacknowledged(_port(base), 2.0)
        assert ended, received
        assert await running.all_ended()
        assert await _status(base, "/") == 200
